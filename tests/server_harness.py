"""The CPU harness of the served API (tests/server_api_app.py) as plain functions.

Used by tests/test_server_api.py, tests/test_open_webui.py and bench/server_hardening.py: a venv
with ktransformers 0.2.1.post1's Python requirements, a patched sdist tree, the test models, and
servers started on free 127.0.0.1 ports (their /health polled while the model loads).
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
APP = REPO / "tests" / "server_api_app.py"
# ktransformers 0.2.1.post1's requirements that its server API path does not import
NOT_IMPORTED = {"torch", "langchain", "blessed", "build", "fire", "ninja", "wheel", "setuptools"}


class HarnessError(Exception):
    pass


def api_python() -> Path:
    from cached_venv import TORCH_CPU, cached_venv
    from ktlegacy.testing.wheelhouse import ktransformers_requirements
    reqs = [r for r in ktransformers_requirements() if re.split(r"[\s<>=!~\[;]", r, 1)[0].lower() not in NOT_IMPORTED]
    runtime = (REPO / "images" / "requirements" / "runtime.txt").read_text().split("\n")
    reqs += [r.strip() for r in runtime if r.strip() and not r.startswith("#")]
    return cached_venv("server-api-0.2.1.post1", [TORCH_CPU, *reqs, "pyyaml", "jinja2", "gguf", "tokenizers"])


def prepare(root: Path, python: Path, sdist_tree: Path | None = None) -> dict:
    """A patched 0.2.1.post1 tree and the two test models under ``root``."""
    from ktlegacy.core.arch import get_arch
    from ktlegacy.core.overlay import patch_tree
    root.mkdir(parents=True, exist_ok=True)
    tree = root / "tree"
    if sdist_tree is None:
        from ktlegacy.core.source import fetch_source
        fetch_source(tree, "0.2.1.post1")
    else:
        shutil.copytree(sdist_tree, tree, symlinks=True)
    patch_tree(tree, get_arch("sm75"), out=lambda line: None)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(root / "home"), "PYTHONPATH": str(REPO)}
    models = {}
    for template in ("default", "deepseek-v3"):
        models[template] = root / f"model-{template}"
        subprocess.run([str(python), str(APP), "make-model", "--model", str(models[template]), "--template",
                        template], check=True, env=env, capture_output=True, timeout=600)
    return {"root": root, "tree": tree, "env": env, "models": models, "python": python}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(served: dict, label: str, model: Path, settings: dict, *args: str, name: str = "ktlegacy-test",
          timeout: float = 300) -> dict:
    """Start tests/server_api_app.py; poll /health while the model loads (every 0.1 s, recorded)."""
    port = free_port()
    log_path = served["root"] / f"server-{label}.log"
    log = log_path.open("w")
    proc = subprocess.Popen([str(served["python"]), str(APP), "serve", "--tree", str(served["tree"]), "--model",
                             str(model), "--port", str(port), "--name", name, *args],
                            stdout=log, stderr=subprocess.STDOUT, env={**served["env"], **settings})
    base = f"http://127.0.0.1:{port}"
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.close()
            raise HarnessError(f"server {label} exited: {log_path.read_text()[-3000:]}")
        try:
            r = httpx.get(base + "/health", timeout=2)
            seen.append((r.status_code, r.json()))
            if r.status_code == 200:
                return {"base": base, "log": log_path, "proc": proc, "logf": log, "health_seen": seen, "port": port,
                        "name": name}
        except (httpx.HTTPError, json.JSONDecodeError):
            pass
        time.sleep(0.1)
    proc.kill()
    log.close()
    raise HarnessError(f"server {label} did not become healthy within {timeout} s")


def stop(server: dict) -> None:
    server["proc"].terminate()
    try:
        server["proc"].wait(timeout=20)
    except subprocess.TimeoutExpired:
        server["proc"].kill()
        server["proc"].wait()
    server["logf"].close()


def request_lines(server: dict) -> list[str]:
    """The server's per-request log lines (``ktlegacy request id=... status=...``)."""
    return [line for line in server["log"].read_text(errors="replace").splitlines() if "ktlegacy request id=" in line]
