"""ktlegacy/core is what the image stages run, copied into them as one folder (images/Dockerfile).

Here the stages' steps run outside Docker with that folder (and the package's ``__init__.py``)
and the repository files the stages copy beside it, nothing else: ``python -S``, so no installed
or editable ktlegacy fills a gap. Statically, nothing in ``ktlegacy/core`` imports the rest of
the library (a lazy import on a path no step here takes would otherwise hide), and no library
module imports itself back.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LIB = REPO / "ktlegacy"


@pytest.fixture
def layout(tmp_path) -> Path:
    """The stages' /ktlegacy: ktlegacy/__init__.py, ktlegacy/core, the overlays and image scripts."""
    dest = tmp_path / "ktlegacy-root"
    (dest / "ktlegacy").mkdir(parents=True)
    shutil.copy(LIB / "__init__.py", dest / "ktlegacy")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "build")
    shutil.copytree(LIB / "core", dest / "ktlegacy" / "core", ignore=ignore)
    shutil.copytree(REPO / "overlays", dest / "overlays", ignore=ignore)
    shutil.copytree(REPO / "images" / "scripts", dest / "images" / "scripts", ignore=ignore)
    return dest


def _isolated(layout: Path, *args: str) -> subprocess.CompletedProcess:
    """This Python on the layout: -S skips site (no .pth file, so no editable ktlegacy); the
    site-packages directories come back as plain path entries, after the layout."""
    site = [p for p in sysconfig.get_paths().values() if p.endswith("-packages")]
    for d in site:
        assert not (Path(d) / "ktlegacy").exists(), f"{d} holds a ktlegacy package: it would fill gaps in the layout"
    return subprocess.run([sys.executable, "-S", *args], cwd=layout, capture_output=True, text=True, timeout=600,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home()),
                               "PYTHONPATH": ":".join([str(layout), *dict.fromkeys(site)])})


def test_the_core_commands_parse_with_only_the_folder(layout):
    for args in (["-m", "ktlegacy.core", "--help"], *(["-m", "ktlegacy.core", name, "--help"] for name in
                 ("fetch-source", "patch", "fingerprint", "build-stub", "check-triton"))):
        proc = _isolated(layout, *args)
        assert proc.returncode == 0 and "usage:" in proc.stdout, (args, proc.stderr[-2000:])


def test_the_source_stage_fetches_and_patches_with_only_the_folder(layout, tmp_path, sdist_tree):
    src = tmp_path / "src"
    proc = _isolated(layout, "-m", "ktlegacy.core", "fetch-source", "--ref", "0.2.1.post1", "--dest", str(src))
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = _isolated(layout, "-m", "ktlegacy.core", "patch", "--src", str(src), "--arch", "sm75")
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = _isolated(layout, str(layout / "images/scripts/check_source.py"), "--src", str(src), "--arch", "sm75")
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_wheels_stage_builds_the_stub_with_only_the_folder(layout, tmp_path):
    proc = _isolated(layout, "-m", "ktlegacy.core", "build-stub", "--dest", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(list((tmp_path / "out").glob("flash_attn-*.whl"))) == 1


def test_the_kernels_stage_check_starts_with_only_the_folder(layout, tmp_path, sdist_tree):
    # finds the tree's kernels, then, given a Python without Triton, stops with its one line
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    no_triton = tmp_path / "python-without-triton"   # the layout's PYTHONPATH must not reach it
    no_triton.write_text(f"#!/bin/sh\nexec env -u PYTHONPATH {bare / 'bin' / 'python'} \"$@\"\n")
    no_triton.chmod(0o755)
    proc = _isolated(layout, str(layout / "images/scripts/check_triton_kernels.py"), "--src", str(sdist_tree),
                     "--arch", "sm75", "--python", str(no_triton))
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot import triton" in lines[0] and "torch pin" in lines[0], proc.stderr[-2000:]


def _imports(path: Path) -> set[Path]:
    """The library files ``path`` imports, anywhere in it (a function's imports too)."""
    package = path.relative_to(REPO).parent.parts
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = list(package[:len(package) - node.level + 1]) if node.level else []
            module = ".".join(base + (node.module.split(".") if node.module else []))
            names = [module] + [f"{module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            target = REPO.joinpath(*name.split("."))
            for f in (target.with_suffix(".py"), target / "__init__.py"):
                if name.startswith("ktlegacy") and f.is_file() and f != path:
                    found.add(f)
    return found


def test_core_imports_nothing_outside_itself():
    for path in sorted((LIB / "core").rglob("*.py")):
        outside = [f.relative_to(REPO).as_posix() for f in _imports(path)
                   if not f.is_relative_to(LIB / "core") and f != LIB / "__init__.py"]
        assert not outside, f"{path.relative_to(REPO)} imports {outside}, which the image stages do not copy"


def test_no_library_module_imports_itself_back():
    """Imports anywhere in a file count: a module that needs a late import to load is a circle."""
    graph = {p: {f for f in _imports(p) if f.name != "__init__.py"} for p in sorted(LIB.rglob("*.py"))}
    state: dict[Path, str] = {}

    def visit(node: Path, path: list[Path]) -> list[Path]:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = "done"
        return []

    for start in graph:
        if start not in state:
            assert (cycle := visit(start, [start])) == [], [c.relative_to(REPO).as_posix() for c in cycle]
