"""The base install carries what the commands need, nothing that exists for tests (issue 14 item 5).

The commands run in an interpreter that holds only the base ``dependencies`` of pyproject.toml
(and what they depend on): a venv without pip whose site-packages links exactly those
distributions from this test environment, so no network and no download is needed.
"""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib
try:
    from packaging.requirements import Requirement
except ModuleNotFoundError:
    from pip._vendor.packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
# packages that exist for tests, benchmarks or the engine: never a base dependency
TEST_ONLY = {"tokenizers", "torch", "transformers", "pytest", "numpy", "openai", "ollama", "pyzmq", "bcrypt"}


def _name(req: str) -> str:
    return re.sub(r"[-_.]+", "-", Requirement(req).name).lower()


def test_base_dependencies_leave_out_test_only_packages():
    base = {_name(r) for r in PROJECT["dependencies"]}
    assert not base & TEST_ONLY, base & TEST_ONLY
    extras = PROJECT["optional-dependencies"]
    assert {"tokenizers", "numpy", "gguf"} <= {_name(r) for r in extras["testing"]}
    assert "ktlegacy[testing]" in extras["test"]   # the suite gets the testing extra with it


def _closure(requirements: list[str]) -> dict[str, importlib.metadata.Distribution]:
    """The installed distributions ``requirements`` need, transitively (extras' requirements left out)."""
    found: dict[str, importlib.metadata.Distribution] = {}
    todo = list(requirements)
    while todo:
        req = Requirement(todo.pop())
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        key = _name(req.name)
        if key in found:
            continue
        try:
            dist = importlib.metadata.distribution(req.name)
        except importlib.metadata.PackageNotFoundError:
            pytest.fail(f"{req.name} (a base dependency's closure) is not installed in this test environment")
        found[key] = dist
        todo.extend(dist.requires or [])
    return found


@pytest.fixture(scope="module")
def base_python(tmp_path_factory) -> Path:
    """A venv holding ktlegacy (this checkout) and the base dependencies' closure only."""
    root = tmp_path_factory.mktemp("base-venv")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    links = root / "base-site"
    links.mkdir()
    for dist in _closure(PROJECT["dependencies"]).values():
        base = Path(dist.locate_file(""))
        for top in {Path(f).parts[0] for f in dist.files or []}:
            src = base / top
            if src.exists() and not (links / top).exists() and top not in ("..", "__pycache__"):
                (links / top).symlink_to(src)
    (site / "ktlegacy-base.pth").write_text(f"{REPO}\n{links}\n")
    return python


def _run(python: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_the_base_venv_lacks_the_test_only_packages(base_python):
    proc = _run(base_python, "-c", "import importlib.util as u, sys; "
                "print(*[m for m in sys.argv[1:] if u.find_spec(m)])", "tokenizers", "torch", "transformers", "invoke",
                "yaml", "gguf", "ktlegacy")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["invoke", "yaml", "gguf", "ktlegacy"]


def test_the_commands_run_with_the_base_dependencies_only(base_python):
    proc = _run(base_python, "-m", "ktlegacy", "--help")
    assert proc.returncode == 0, proc.stderr
    for name in ("fetch-source", "patch", "build", "doctor", "publish", "make-test-model"):
        assert name in proc.stdout
    proc = _run(base_python, "-m", "invoke", "--list")
    assert proc.returncode == 0 and "make-test-model" in proc.stdout, proc.stderr


def test_every_library_module_imports_without_test_only_packages(base_python):
    # every module outside ktlegacy.testing, then the parser (every command's arguments): none of
    # them pulls numpy (gguf's, imported only when the doctor reads a GGUF) or a test-only package
    modules = sorted(f"ktlegacy.{p.stem}" for p in (REPO / "ktlegacy").glob("*.py") if p.stem != "__main__")
    script = ("import importlib, sys\n"
              f"for m in {modules!r}: importlib.import_module(m)\n"
              "from ktlegacy.cli import build_parser\nbuild_parser()\n"
              "print(*sorted({m.split('.')[0] for m in sys.modules}))")
    proc = _run(base_python, "-c", script)
    assert proc.returncode == 0, proc.stderr
    loaded = set(proc.stdout.split())
    assert "ktlegacy" in loaded and not loaded & (TEST_ONLY | {"gguf"}), loaded & (TEST_ONLY | {"gguf"})


def test_make_test_model_without_the_extra_names_it(base_python, tmp_path):
    proc = _run(base_python, "-m", "ktlegacy", "make-test-model", "--dest", str(tmp_path / "model"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: make-test-model needs tokenizers"), proc.stderr
    assert "pip install 'ktlegacy[testing]'" in lines[0]
    assert not (tmp_path / "model").exists()
