"""Wall time of CI's real CUDA 11.8 compile lane (tests/test_cuda118_compile.py, marker cuda118).

    .venv/bin/python bench/cuda118_lane.py [--label cold|warm] [--out bench/results/cuda118_lane.json]

Runs ``pytest -m cuda118 tests/test_cuda118_compile.py`` once and records its wall time, exit
code and pass count under ``--label`` (results of other labels in the file are kept). "cold" is
whatever the daemon holds the first time (the Debian root file system may already be there: the
stand-in tests make it too); "warm" is a second run, with the toolkit and torch layers in
BuildKit's cache and the compile step a cache hit (or ccache-fed when its inputs changed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--label", default="run")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "cuda118_lane.json")
    args = p.parse_args()
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda118", "tests/test_cuda118_compile.py"]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.monotonic() - start
    summary = (proc.stdout.strip().splitlines() or [""])[-1]
    passed = int(m.group(1)) if (m := re.search(r"(\d+) passed", summary)) else 0
    data = json.loads(args.out.read_text()) if args.out.is_file() else {}
    data.setdefault("runs", {})[args.label] = {
        "wall_s": round(wall, 1), "exit": proc.returncode, "passed": passed, "summary": summary,
    }
    data["command"] = " ".join(["python", "bench/cuda118_lane.py", "--label", "LABEL"])
    data["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(),
                       "docker": subprocess.run(["/usr/bin/docker", "version", "--format", "{{.Server.Version}}"],
                                                capture_output=True, text=True).stdout.strip()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    print(f"cuda118 lane ({args.label}): {wall:.1f} s, exit {proc.returncode}, {summary}")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
