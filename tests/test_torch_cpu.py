"""tests/torch_cpu.py: the suite's CPU torch comes from a local wheel cache when there is one,
else from PyTorch's CPU index, so tests/run works on a fresh machine without /opt/wheels.

The fresh machine is simulated with pip's configuration switched off (no find-links, no local
indexes) and PyPI replaced by an empty index; "PyTorch's CPU index" is a PEP 503 directory
holding the same wheel, reached through KTLEGACY_TORCH_INDEX_URL exactly as a mirror would be.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import torch_cpu

REPO = Path(__file__).resolve().parent.parent


def _wheel() -> Path:
    wheel = torch_cpu.local_wheel()
    if wheel is None:
        pytest.skip(f"no local {torch_cpu.REQUIREMENT} wheel to serve from a stand-in index "
                    "(this machine got it from the CPU index itself)")
    return wheel


def _fresh_env(tmp_path: Path, **extra) -> dict:
    empty = tmp_path / "pypi" / "simple"
    empty.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and not k.startswith("KTLEGACY_")}
    env.update({"PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": empty.as_uri(),
                "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_CACHE_DIR": "1",
                "KTLEGACY_TORCH_WHEELS": str(tmp_path / "no-wheels")})
    env.update(extra)
    return env


def _resolve(env: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    """tests/torch_cpu.py's requirement + arguments, then pip's resolver (nothing installed)."""
    out = subprocess.run([sys.executable, str(REPO / "tests" / "torch_cpu.py")], env=env,
                         capture_output=True, text=True, check=True).stdout.splitlines()
    report = tmp_path / "report.json"
    return subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--ignore-installed",
                           "--report", str(report), *out[1:], out[0]], env=env, capture_output=True, text=True)


def test_local_cache_wins(monkeypatch):
    wheel = _wheel()
    monkeypatch.setenv("KTLEGACY_TORCH_WHEELS", str(wheel.parent))
    assert torch_cpu.pip_args() == ["--find-links", str(wheel.parent)]


def test_fresh_machine_gets_the_pin_from_the_cpu_index(tmp_path):
    wheel = _wheel()
    index = tmp_path / "cpu-index" / "simple"
    (index / "torch").mkdir(parents=True)
    (index / "torch" / wheel.name).symlink_to(wheel)
    (index / "torch" / "index.html").write_text(f'<a href="{wheel.name}">{wheel.name}</a>\n')
    env = _fresh_env(tmp_path, KTLEGACY_TORCH_INDEX_URL=index.as_uri())
    proc = _resolve(env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    got = json.loads((tmp_path / "report.json").read_text())["install"]
    assert [(i["metadata"]["name"], i["metadata"]["version"]) for i in got] == [("torch", torch_cpu.VERSION)]
    assert got[0]["download_info"]["url"].startswith(index.as_uri())


def test_without_cache_or_index_pip_cannot_find_it(tmp_path):
    """The failure the fallback exists for: PyPI alone has no +cpu torch."""
    _wheel()
    env = _fresh_env(tmp_path, KTLEGACY_TORCH_INDEX_URL="")
    proc = _resolve(env, tmp_path)
    assert proc.returncode != 0
    assert "No matching distribution found for torch" in proc.stderr


def test_default_index_is_pytorchs_cpu_index(monkeypatch, tmp_path):
    monkeypatch.setenv("KTLEGACY_TORCH_WHEELS", str(tmp_path))
    monkeypatch.delenv("KTLEGACY_TORCH_INDEX_URL", raising=False)
    assert torch_cpu.pip_args() == ["--extra-index-url", "https://download.pytorch.org/whl/cpu"]
