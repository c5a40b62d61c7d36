"""Virtual environments holding real toolchains from PyPI (Triton wheels, CUDA compilers), cached.

Tests that compile for a GPU without having one need the exact tool versions the images use
(triton 3.1.0, CUDA 11.8's ptxas...), which do not belong in the project's own venv. Each set
of requirements gets its own venv under ``~/.cache/ktlegacy/venvs/<name>`` (KTLEGACY_CACHE
moves it), created once with pip and reused while the requirement list is unchanged; a venv
left half-built by an interrupted run is rebuilt.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import torch_cpu

CACHE = Path(os.environ.get("KTLEGACY_CACHE", Path.home() / ".cache" / "ktlegacy"))
VENVS = CACHE / "venvs"
MARKER = ".ktlegacy-requirements"

# A CPU torch for the venvs that import the patched tree (its ktlegacy_runtime imports torch).
# The "+cpu" local version keeps pip from ever choosing PyPI's multi-GB CUDA build; where pip
# finds it (a local wheel cache, else PyTorch's CPU index) is tests/torch_cpu.py's business.
TORCH_CPU = os.environ.get("KTLEGACY_TEST_TORCH_CPU", torch_cpu.REQUIREMENT)


def cached_venv(name: str, requirements: list[str]) -> Path:
    """Path of ``<venv>/bin/python`` with ``requirements`` installed (created on first use)."""
    root = VENVS / name
    marker = root / MARKER
    wanted = "\n".join(requirements) + "\n"
    python = root / "bin" / "python"
    if marker.is_file() and marker.read_text() == wanted and python.exists():
        return python
    if root.exists():
        shutil.rmtree(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True)
    extra = []
    torch_pin = next((r for r in requirements if re.match(r"torch\s*==", r)), None)
    if torch_pin:
        extra = torch_cpu.pip_args(torch_pin.split("==", 1)[1].strip())
    proc = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                           *extra, *requirements], capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"pip could not install {requirements} into {root}: {tail}")
    marker.write_text(wanted)
    return python


def site_packages(python: Path) -> Path:
    """The site-packages directory of the venv whose interpreter is ``python``."""
    lib = Path(python).parent.parent / "lib"
    found = sorted(lib.glob("python3*/site-packages"))
    assert found, f"no site-packages under {lib}"
    return found[0]
