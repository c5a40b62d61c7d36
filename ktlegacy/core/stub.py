"""The flash-attn stand-in (``overlays/flash-attn-stub``): where it lives and how to build its wheel.

The stub is a pure-Python distribution named ``flash-attn`` whose ``flash_attn`` package
answers FlashAttention 2's API with torch SDPA, so ktransformers and transformers import and
run on sm70/sm75. The image build installs the wheel this module builds; building needs no
network (``--no-index --no-build-isolation --no-deps``), only setuptools in the building
Python. The build runs on a scratch copy so the source directory never gets build debris.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from . import safefs
from .command import command
from .errors import KtlegacyError

STUB_DIR = Path(__file__).resolve().parents[2] / "overlays" / "flash-attn-stub"
DISTRIBUTION = "flash-attn"
# Building without isolation needs setuptools and its bdist_wheel (built in from setuptools
# 70.1, from the ``wheel`` package before that).
_PROBE = (
    "import setuptools\n"
    "try:\n    import setuptools.command.bdist_wheel\n"
    "except ImportError:\n    import wheel.bdist_wheel\n"
)
# Where the version is declared (pyproject reads it from there too).
_VERSION_FILE = STUB_DIR / "flash_attn" / "__init__.py"


def stub_version() -> str:
    """The stub's version string, read from its source without importing it (no torch needed)."""
    try:
        text = _VERSION_FILE.read_text()
    except OSError as exc:
        raise KtlegacyError(f"flash-attn stub source missing at {STUB_DIR}: {exc.strerror}") from None
    match = re.search(r'^__version__\s*=\s*"([^"]+)"', text, re.M)
    if not match:
        raise KtlegacyError(f"no __version__ = \"...\" line in {_VERSION_FILE}")
    return match.group(1)


def _run(cmd: list) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True)
    except OSError as exc:
        raise KtlegacyError(f"cannot run {cmd[0]}: {exc.strerror}; pass an existing Python (--python)") from None


def build_stub_wheel(dest_dir: Path, python: str = sys.executable, isolation: bool = False) -> Path:
    """Build the stub's wheel into ``dest_dir`` with ``python -m pip wheel``; return its path.

    Without ``isolation`` nothing is downloaded: ``python`` must have setuptools >= 61 (and
    ``wheel`` if setuptools < 70.1). With ``isolation`` pip fetches setuptools from its index.
    An existing wheel of the same name in ``dest_dir`` is replaced; nothing is left half-written
    (temp file and rename, :func:`ktlegacy.core.safefs.write_atomic`), and a symlinked ``dest_dir``
    or wheel path is refused.
    """
    stub_version()  # fails clearly if the source is missing
    dest_dir = Path(dest_dir)
    if dest_dir.is_symlink():
        raise KtlegacyError(f"--dest {dest_dir} is a symlink (to {os.readlink(dest_dir)}); build-stub never writes "
                            "through a link: pass the real directory")
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KtlegacyError(f"cannot create --dest {dest_dir}: {safefs.reason(exc)}") from None
    if not isolation:
        probe = _run([python, "-c", _PROBE])
        if probe.returncode != 0:
            raise KtlegacyError(
                f"{python} has no setuptools with bdist_wheel to build the flash-attn stub: "
                f"{python} -m pip install 'setuptools>=61' wheel (or build with isolation)"
            )
    with tempfile.TemporaryDirectory(prefix="ktlegacy-stub-") as scratch:
        source = Path(scratch) / "src"
        shutil.copytree(STUB_DIR, source, ignore=shutil.ignore_patterns(
            "__pycache__", "*.pyc", "build", "dist", "*.egg-info"))
        out = Path(scratch) / "out"
        cmd = [python, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", "-q", "-w", str(out)]
        if not isolation:
            cmd += ["--no-build-isolation", "--no-index"]
        proc = _run(cmd + [str(source)])
        if proc.returncode != 0:
            lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
            # the innermost "error: ..." line (the build backend's) says more than pip's summary
            reason = next((ln for ln in lines if ln.startswith("error:")), lines[-1] if lines else "no output")
            raise KtlegacyError(f"building the flash-attn stub wheel failed: {reason}")
        wheels = sorted(out.glob("flash_attn-*.whl"))
        if len(wheels) != 1:
            raise KtlegacyError(f"pip wheel produced {[w.name for w in wheels]}, expected one flash_attn wheel")
        target = dest_dir / wheels[0].name
        if target.is_symlink():
            raise KtlegacyError(f"{target} is a symlink (to {os.readlink(target)}); build-stub writes the wheel as "
                                "a regular file and never through a link: remove it")
        try:  # through .NAME.tmp (a killed run's leftover is removed first) and a rename: all or nothing
            safefs.write_atomic(target, wheels[0].read_bytes())
        except OSError as exc:
            raise KtlegacyError(f"cannot write {target}: {safefs.reason(exc)}; {dest_dir} was left as it was") from None
    return target


def _build_stub_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dest", required=True, type=Path, help="directory to write the wheel into")
    p.add_argument("--python", default=sys.executable, help="Python whose pip builds it (default: this one)")
    p.add_argument("--isolation", action="store_true", help="let pip fetch setuptools from its index")


@command("build-stub", "build the flash-attn stand-in wheel (SDPA) without network", _build_stub_args)
def build_stub(args) -> int:
    wheel = build_stub_wheel(args.dest, python=args.python, isolation=args.isolation)
    print(f"built {wheel}")
    return 0
