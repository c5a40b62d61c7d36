"""``invoke up``: the doctor gates ``docker compose up``; --force passes the gate."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ktlegacy.core.errors import KtlegacyError
from ktlegacy.hostfacts import HostFacts
from ktlegacy.profiles import PROFILES
from ktlegacy.up import up

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def gpu_less():
    if HostFacts.probe().gpus is not None:
        pytest.skip("this host has GPUs: up's refusal is tested on GPU-less hosts (CI)")


def test_up_refuses_on_a_failing_check(gpu_less):
    with pytest.raises(KtlegacyError, match=r"not starting profile t4x4: \d+ doctor check\(s\) failed, first GPUs"):
        up("t4x4")


def test_up_unknown_profile_is_one_line():
    proc = subprocess.run([sys.executable, "-m", "ktlegacy", "up", "--profile", "a100"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: unknown profile 'a100': use one of {', '.join(PROFILES)}"]


@pytest.mark.docker
def test_force_starts_compose_and_reports_its_error_in_one_line(gpu_less, docker, standin_base, tmp_path,
                                                                monkeypatch, capsys):
    """--force gets past the doctor to `docker compose up`; with no NVIDIA runtime here the engine
    refuses the GPU reservation, and that arrives as one line."""
    repo = "h4-ktl/ktransformers"
    tag = f"{repo}:0.2.1.post1-cu118-sm75-avx2"
    subprocess.run([docker.path, "tag", standin_base, tag], check=True)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    (tmp_path / "gguf").mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"KTLEGACY_REPOSITORY": repo, "KTLEGACY_MODEL_DIR": str(tmp_path / "hf"),
           "KTLEGACY_GGUF_DIR": str(tmp_path / "gguf"), "KTLEGACY_PORT": str(port),
           "COMPOSE_PROJECT_NAME": "h4-up-force"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    try:
        with pytest.raises(KtlegacyError, match="docker compose --profile 2080ti-x2 up failed: .*nvidia") as exc:
            up("2080ti-x2", force=True)
        assert "\n" not in str(exc.value)
        out = capsys.readouterr().out
        assert "GPUs" in out and "FAIL" in out                # the table was printed first
        assert "+ " in out and "compose --profile 2080ti-x2 up -d" in out
    finally:
        subprocess.run([docker.path, "compose", "--profile", "2080ti-x2", "down", "-v"], cwd=REPO,
                       capture_output=True)
        subprocess.run([docker.path, "rmi", tag], capture_output=True)
