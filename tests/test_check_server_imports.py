"""tests/smoke/check_server_imports.py: what the server imports when it starts, followed from server/main.py.

The smoke runs inside built images (tests/test_build.py runs it in the stand-in image); here it
runs on small trees written by the test and on the 0.2.1.post1 sdist, without an image.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tests" / "smoke" / "check_server_imports.py"


def _run(root: Path, tmp_path: Path, *python_flags: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), str(SCRIPT.parent)]),
               KTLEGACY_MANIFEST_DIR=str(tmp_path / "no-manifest"))
    return subprocess.run([sys.executable, *python_flags, str(SCRIPT)], env=env, capture_output=True, text=True,
                          timeout=120)


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / "ktransformers" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_follows_module_level_imports_from_main_only(tmp_path):
    root = _tree(tmp_path / "t", {
        "__init__.py": "",
        "server/__init__.py": "",
        "server/main.py": ("import json\nimport h14_at_start\nimport KTransformersOps\n"
                           "from ktransformers.server import backend\nfrom .util.helper import thing\n"
                           "from ktransformers.local_chat import chat\n"),
        "server/backend.py": "import os\ndef start():\n    import h14_lazy_backend\n",
        "server/util/__init__.py": "import h14_package_init\n",
        "server/util/helper.py": "try:\n    import h14_optional\nexcept ImportError:\n    pass\nthing = 1\n",
        "local_chat.py": "import h14_outside_server\nchat = 1\n",
        "server/balance_serve/sched.py": "import h14_never_reached\n",
    })
    proc = _run(root, tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    line = proc.stderr.strip()
    assert line.startswith("FAIL: the server imports modules that are not installed: "), line
    for name, where in (("h14_at_start", "server/main.py"), ("h14_package_init", "server/util/__init__.py"),
                        ("h14_outside_server", "local_chat.py")):
        assert f"{name} (from ktransformers/{where})" in line, line
    # lazy (inside a function), optional (try/except), never reached from main.py, compiled extension
    for name in ("h14_lazy_backend", "h14_optional", "h14_never_reached", "KTransformersOps"):
        assert name not in line, line


def test_passes_when_everything_reached_is_installed(tmp_path):
    root = _tree(tmp_path / "t", {
        "__init__.py": "",
        "server/__init__.py": "",
        "server/main.py": "import json\nimport pytest\nfrom ktransformers.server.api import router\n",
        "server/api/__init__.py": "import yaml\nrouter = None\n",
        "server/balance_serve/settings.py": "import sched_ext\n",  # the sm80+ backend, lazily loaded upstream
    })
    proc = _run(root, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "all 2 third-party modules installed (4 ktransformers modules read" in proc.stdout, proc.stdout


def test_the_sdist_server_reaches_local_chat(sdist_tree, tmp_path):
    """0.2.1.post1's server, with no site-packages at all (python -S: every third-party module is
    missing): the walk names what main.py reaches outside server/ (local_chat's fire, util's
    colorlog), which the old server/-only scan did not, and leaves the compiled extensions alone."""
    proc = _run(sdist_tree, tmp_path, "-S")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    line = proc.stderr.strip()
    assert line.count("\n") == 0, line
    for expected in ("fire (from ktransformers/local_chat.py)", "fastapi (from ktransformers/server/main.py)",
                     "torch (from "):
        assert expected in line, line
    assert "KTransformersOps" not in line and "cpuinfer_ext" not in line, line
