"""Prove that every CUDA extension holds machine code (SASS) for the GPU the image is built for.

A ktransformers build whose ``KTransformersOps*.so`` lacks SASS for the card fails at run time
with "no kernel image is available for execution on the device" -- on the user's V100 or T4,
after the download. This check catches it at build time: for each ``.so`` (given directly,
found under a directory, or inside a ``.whl``) it asks ``cuobjdump --list-elf`` (and
``--list-ptx``) what device code the file holds and requires a cubin for exactly the target
``sm_XX``; with ``--expect-ptx`` (a ``7.5+PTX`` build) it also requires ``compute_XX`` PTX.

A ``.so`` without any device code is host-only and passes (``cpuinfer_ext`` is CPU code),
except where its name matches ``--require-device-code`` (default ``KTransformersOps*``, ``ktlegacy_gguf_ops*``): a
CUDA extension built without any GPU arch fails. If none of the files holds device code the
check fails too.

Exact match is on purpose: an ``sm_70`` cubin would in fact load on a 7.5 card, but an sm75
image built that way was built with the wrong ``TORCH_CUDA_ARCH_LIST`` and its labels lie.

Output: a table (file, device code, verdict) on stdout; each failure as one line on stderr,
``error: <file> holds sm_90 only; expected sm_75: rebuild with TORCH_CUDA_ARCH_LIST=7.5``;
exit 1 on failure, 2 on bad usage (no cuobjdump, no file). ``--json`` writes the results.

Standard library only: it runs in the image's compile stage and on a GPU host, with no
ktlegacy installed. cuobjdump is looked up in ``--cuobjdump``, ``$CUOBJDUMP``, ``PATH``,
``$CUDA_HOME/bin``, ``/usr/local/cuda/bin``, then in Python packages that ship it (Triton's
``backends/nvidia/bin``, PyPI's ``nvidia-cuda-cuobjdump``).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

def _load_facts(*places: Path):
    """ktlegacy/core/facts.py (standard library only), loaded by path: beside this script in the image (the
    compile stage's scripts, the smoke's lib/), in the checkout otherwise."""
    import importlib.util
    for path in places:
        if path.is_file():
            spec = importlib.util.spec_from_file_location("ktlegacy_facts", path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module   # dataclasses look their module up there
            spec.loader.exec_module(module)
            return module
    raise SystemExit(f"{Path(__file__).name}: ktlegacy's facts.py is in none of {[str(p) for p in places]}")


HERE = Path(__file__).resolve().parent
# the one loader: compile_extensions.py (beside it in the compile stage) and the smoke's smokelib.py
# (beside it in lib/) import FACTS from here
FACTS = _load_facts(HERE / "facts.py", HERE.parents[1] / "ktlegacy" / "core" / "facts.py")
# arch name -> (cubin name as cuobjdump prints it, TORCH_CUDA_ARCH_LIST value)
ARCHES = {name: (arch.cuobjdump_name, arch.torch_cuda_arch_list) for name, arch in FACTS.ARCHES.items()}
DEFAULT_REQUIRED = ("KTransformersOps*", "ktlegacy_gguf_ops*")   # CUDA extensions that must hold device code


class UsageError(Exception):
    """Bad input (no cuobjdump, no file, unknown arch): exit 2."""


@dataclass
class FileReport:
    file: str                              # as shown to the user
    elf: list = field(default_factory=list)  # ["sm_75", ...]
    ptx: list = field(default_factory=list)  # ["sm_75", ...] (cuobjdump names PTX by its sm)
    verdict: str = ""                       # pass | host-only | fail
    message: str = ""

    @property
    def device_code(self) -> str:
        parts = [f"SASS {','.join(sorted(set(self.elf)))}"] if self.elf else []
        if self.ptx:
            parts.append(f"PTX {','.join('compute_' + p[3:] for p in sorted(set(self.ptx)))}")
        return " + ".join(parts) or "none (host-only)"


# -- cuobjdump -----------------------------------------------------------------------------------

def _package_candidates() -> list[Path]:
    found = []
    for entry in sys.path:
        base = Path(entry or ".")
        for rel in ("triton/backends/nvidia/bin/cuobjdump", "nvidia/cu13/bin/cuobjdump",
                    "nvidia/cuda_cuobjdump/bin/cuobjdump", "nvidia/cu12/bin/cuobjdump"):
            found.append(base / rel)
    return found


def find_cuobjdump(explicit: str | None = None) -> str:
    if explicit:
        if Path(explicit).is_file() and os.access(explicit, os.X_OK):
            return explicit
        raise UsageError(f"--cuobjdump {explicit}: not an executable file")
    env = os.environ.get("CUOBJDUMP")
    if env:
        if Path(env).is_file() and os.access(env, os.X_OK):
            return env
        raise UsageError(f"CUOBJDUMP={env}: not an executable file")
    on_path = shutil.which("cuobjdump")
    if on_path:
        return on_path
    candidates = []
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(Path(home) / "bin" / "cuobjdump")
    candidates += _package_candidates()
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    raise UsageError("cuobjdump not found (PATH, CUDA_HOME/bin, /usr/local/cuda/bin, triton, "
                     "nvidia-cuda-cuobjdump): install the CUDA toolkit or `pip install "
                     "nvidia-cuda-cuobjdump`, or pass --cuobjdump PATH")


_LISTED = re.compile(r"^(ELF|PTX) file\s+\d+:\s+(\S+)$")
_SM = re.compile(r"\.(sm_\d+[a-z]?)\.(cubin|ptx)$")


def _list(cuobjdump: str, what: str, path: Path) -> tuple[list, str]:
    """Names cuobjdump lists for ``--list-elf``/``--list-ptx``; ('' or the reason none are)."""
    proc = subprocess.run([cuobjdump, what, str(path)], capture_output=True, text=True)
    names = []
    for line in proc.stdout.splitlines():
        m = _LISTED.match(line.strip())
        if m:
            sm = _SM.search(m.group(2))
            names.append(sm.group(1) if sm else m.group(2))
    if names:
        return names, ""
    text = (proc.stderr + proc.stdout).strip()
    if "does not contain device code" in text or "No PTX file found" in text or \
            "No ELF file found" in text or proc.returncode == 0:
        return [], ""
    raise UsageError(f"cuobjdump {what} {path.name} failed (exit {proc.returncode}): "
                     f"{text.splitlines()[-1] if text else 'no output'}")


# -- inputs --------------------------------------------------------------------------------------

def collect(paths: list[Path], scratch: Path) -> list[tuple[str, Path]]:
    """(shown name, file) for every .so in the inputs; wheels are unpacked into ``scratch``."""
    found: list[tuple[str, Path]] = []
    for p in paths:
        if not p.exists():
            raise UsageError(f"{p}: no such file or directory")
        if p.is_dir():
            for so in sorted(p.rglob("*.so")):
                found.append((so.relative_to(p).as_posix(), so))
        elif p.suffix == ".whl":
            with zipfile.ZipFile(p) as whl:
                for name in sorted(n for n in whl.namelist() if n.endswith(".so")):
                    dest = scratch / p.stem / name
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    dest.write_bytes(whl.read(name))
                    found.append((f"{p.name}:{name}", dest))
        else:
            found.append((p.name, p))
    if not found:
        raise UsageError(f"no .so file in {', '.join(map(str, paths))}: nothing to check")
    return found


# -- the verdict ---------------------------------------------------------------------------------

def judge(report: FileReport, arch: str, expect_ptx: bool, required: tuple) -> FileReport:
    sm, arch_list = ARCHES[arch]
    want = f"{arch_list}+PTX" if expect_ptx else arch_list
    rebuild = f"rebuild with TORCH_CUDA_ARCH_LIST={want}"
    short = report.file.rsplit("/", 1)[-1].rsplit(":", 1)[-1]
    if not report.elf and not report.ptx:
        if any(fnmatch.fnmatch(short, pat) for pat in required):
            report.verdict = "fail"
            report.message = (f"{report.file} holds no device code; expected {sm}: it is a CUDA "
                              f"extension built without any GPU arch ({rebuild}, with nvcc found)")
        else:
            report.verdict = "host-only"
        return report
    problems = []
    if sm not in report.elf:
        held = ", ".join(sorted(set(report.elf))) or "no SASS"
        held += (" (+PTX " + ", ".join("compute_" + p[3:] for p in sorted(set(report.ptx))) + ")") if report.ptx else ""
        only = " only" if report.elf else ""
        problems.append(f"holds {held}{only}; expected {sm}")
    if expect_ptx and sm not in report.ptx:
        problems.append(f"holds no compute_{sm[3:]} PTX; expected it for a {want} build")
    if problems:
        report.verdict = "fail"
        report.message = f"{report.file} " + " and ".join(problems) + f": {rebuild}"
    else:
        report.verdict = "pass"
    return report


def check(paths: list[Path], arch: str, expect_ptx: bool = False, cuobjdump: str | None = None,
          required: tuple = DEFAULT_REQUIRED) -> list[FileReport]:
    key = arch.strip().lower().replace("_", "")
    if key not in ARCHES:
        raise UsageError(f"unknown arch {arch!r}: use one of {', '.join(ARCHES)}")
    tool = find_cuobjdump(cuobjdump)
    with tempfile.TemporaryDirectory(prefix="ktlegacy-arch-") as scratch:
        reports = []
        for shown, path in collect(paths, Path(scratch)):
            elf, _ = _list(tool, "--list-elf", path)
            ptx, _ = _list(tool, "--list-ptx", path)
            reports.append(judge(FileReport(shown, elf, ptx), key, expect_ptx, required))
    if not any(r.elf or r.ptx for r in reports) and not any(r.verdict == "fail" for r in reports):
        # one failure for the set, not one per file: nothing at all was built for the GPU
        names = ", ".join(r.file for r in reports[:3]) + (", ..." if len(reports) > 3 else "")
        reports[0].verdict = "fail"
        reports[0].message = (f"none of the files checked ({names}) holds device code: "
                              f"no CUDA extension was built for {ARCHES[key][0]}")
    return reports


def format_table(reports: list[FileReport], arch: str) -> str:
    rows = [("file", "device code", f"verdict ({arch})")]
    rows += [(r.file, r.device_code, r.verdict) for r in reports]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    return "\n".join(f"{a.ljust(w0)}  {b.ljust(w1)}  {c}" for a, b, c in rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", required=True, help=f"{FACTS.arch_choice()}: the cubin every CUDA extension must hold")
    p.add_argument("--expect-ptx", action="store_true",
                   help="also require compute_XX PTX (a TORCH_CUDA_ARCH_LIST=X.Y+PTX build)")
    p.add_argument("--cuobjdump", default=None, help="cuobjdump to use (default: searched, see above)")
    p.add_argument("--require-device-code", action="append", default=None, metavar="GLOB",
                   help=f"file names that must hold device code (default: {', '.join(DEFAULT_REQUIRED)})")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("paths", nargs="+", type=Path, help=".so files, directories of them, or .whl files")
    args = p.parse_args(argv)
    required = tuple(args.require_device_code) if args.require_device_code else DEFAULT_REQUIRED
    try:
        reports = check(args.paths, args.arch, args.expect_ptx, args.cuobjdump, required)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    arch = args.arch.strip().lower().replace("_", "")
    print(format_table(reports, arch + ("+PTX" if args.expect_ptx else "")))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"arch": arch, "expect_ptx": args.expect_ptx,
                                         "files": [asdict(r) for r in reports]}, indent=2) + "\n")
    failures = [r for r in reports if r.verdict == "fail"]
    for r in failures:
        print(f"error: {r.message}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
