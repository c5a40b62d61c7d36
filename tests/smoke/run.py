#!/usr/bin/env python3
"""Run every smoke check (``tests/smoke/check_*.py``) and print one line each.

    python tests/smoke/run.py [--only NAME ...] [--json FILE]

Runs inside the images (the runtime stage's last build step, ``invoke smoke``, the default CMD)
and unchanged outside Docker on a GPU machine. A check is a script: exit 0 = pass,
exit 77 = skipped (its last output line says why), anything else = fail. A skip that only a GPU
lifts says "needs a GPU" (smokelib.skip(..., gpu=True)); the summary names those checks, so a
run without a GPU says what it did not cover. ``--json FILE`` writes every check's status and line.
Exit status: 0 when nothing failed, 1 otherwise. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SKIP = 77
# A check that has not ended after this many seconds fails (a hang must not stall an image build)
TIMEOUT = float(os.environ.get("KTLEGACY_SMOKE_TIMEOUT", "600"))
NEEDS_GPU = "needs a GPU: "   # smokelib's marker


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="*", default=None, help="run only these checks (file stem, e.g. check_gpu)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    checks = sorted(HERE.glob("check_*.py"))
    if args.only:
        wanted = set(args.only)
        unknown = wanted - {c.stem for c in checks}
        if unknown:
            print(f"error: no such smoke check: {', '.join(sorted(unknown))}", file=sys.stderr)
            return 2
        checks = [c for c in checks if c.stem in wanted]
    counts = {"pass": 0, "skip": 0, "FAIL": 0}
    results = []
    for check in checks:
        start = time.monotonic()
        try:
            proc = subprocess.run([sys.executable, str(check)], capture_output=True, text=True, timeout=TIMEOUT)
        except subprocess.TimeoutExpired as exc:
            out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            proc = subprocess.CompletedProcess(exc.cmd, -9, out, f"timed out after {TIMEOUT:.0f} s (killed; "
                                               "KTLEGACY_SMOKE_TIMEOUT changes the limit)")
        took = time.monotonic() - start
        if proc.returncode == 0:
            status, detail = "pass", _last_line(proc.stdout)
        elif proc.returncode == SKIP:
            status, detail = "skip", _last_line(proc.stdout) or _last_line(proc.stderr)
        else:
            status = "FAIL"
            detail = _last_line(proc.stderr) or _last_line(proc.stdout) or f"exit {proc.returncode}"
        counts[status] += 1
        gpu = status == "skip" and NEEDS_GPU in detail
        results.append({"check": check.stem, "status": status.lower(), "needs_gpu": gpu, "seconds": round(took, 1),
                        "detail": detail})
        print(f"smoke {status:4s} {check.stem} ({took:.1f}s): {detail}", flush=True)
        if status == "FAIL":
            # the whole output of a failing check, for the build log
            for line in (proc.stdout + proc.stderr).strip().splitlines()[-30:]:
                print(f"    {line}")
    gpu = [r["check"] for r in results if r["needs_gpu"]]
    print(f"smoke: {counts['pass']} passed, {counts['skip']} skipped, {counts['FAIL']} failed"
          + (f"; skipped for want of a GPU: {', '.join(gpu)}" if gpu else ""))
    if args.json:
        Path(args.json).write_text(json.dumps({"passed": counts["pass"], "skipped": counts["skip"],
                                               "failed": counts["FAIL"], "needs_gpu": gpu, "checks": results},
                                              indent=2) + "\n")
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
