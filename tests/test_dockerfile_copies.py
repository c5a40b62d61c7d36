"""images/Dockerfile copies into each stage only the library files its RUN steps import (issue 14 item 6).

BuildKit keys a COPY by the content of what it copies, so a stage that copied all of ``ktlegacy/``
re-ran (and re-fetched the sdist, and re-ran every stage after it) whenever any module changed,
the doctor included. Each check walks the Dockerfile: for every RUN, the library files copied
into the stage before it must hold everything that RUN can import, and every library file a COPY
adds must be imported by the RUN right after it (copied late, so earlier steps stay cached).

What a RUN can import, statically: the ``python -m ktlegacy CMD`` / ``main(["CMD"])`` commands
(``patch``: with the ``overlays/*.py`` it loads) and the ``images/scripts/*.py`` it runs,
directly or through the shell scripts it calls; from
those, every ``ktlegacy`` import, at module level or inside a function (a lazy import runs when
its path does), except imports guarded by ``except ImportError`` (optional by construction).
For ``ktlegacy/cli.py`` only the command functions of the commands run count (each one imports
what it calls; argument parsers and the rest count always, the parser builds them all); a
command defined elsewhere brings its whole module. Files a module opens beside itself
(``Path(__file__).with_name("x")``) count as imports. Then the stages run outside Docker with
only their copies of the library (``python -S``, so no installed or editable ktlegacy fills a gap).
"""

from __future__ import annotations

import ast
import re
import shlex
import subprocess
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "images" / "Dockerfile"
LIB = "ktlegacy"


# -- the Dockerfile -----------------------------------------------------------------------------

@dataclass
class Run:
    text: str
    library: set[str]          # ktlegacy files present in the stage when it runs
    copied_since: set[str]     # ktlegacy files copied since the previous RUN of the stage
    files: set[str]            # every repo file present in the stage when it runs


@dataclass
class Stage:
    name: str
    runs: list[Run] = field(default_factory=list)
    leftover: set[str] = field(default_factory=set)   # library files copied after the last RUN


def _instructions(text: str) -> list[tuple[str, str]]:
    lines, out, buf = text.splitlines(), [], ""
    for line in lines:
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):
            continue
        buf += line.rstrip()[:-1] + " " if line.rstrip().endswith("\\") else line
        if not line.rstrip().endswith("\\"):
            keyword, _, rest = buf.strip().partition(" ")
            out.append((keyword.upper(), rest.strip()))
            buf = ""
    return out


def _repo_files(source: str) -> set[str]:
    path = REPO / source
    if path.is_file():
        return {source}
    if path.is_dir():
        return {p.relative_to(REPO).as_posix() for p in path.rglob("*")
                if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}
    raise AssertionError(f"images/Dockerfile copies {source}, which the checkout does not have")


def parse_stages(text: str) -> list[Stage]:
    stages: dict[str, Stage] = {}
    state: dict[str, tuple[set, set]] = {}   # stage -> (library files, all repo files) at its end
    current, library, files, since = None, set(), set(), set()
    order = []
    for keyword, rest in _instructions(text):
        if keyword == "FROM":
            m = re.match(r"(\S+)\s+AS\s+(\S+)", rest, re.I)
            if current is not None:
                current.leftover = set(since)
                state[current.name] = (library, files)
            parent = m.group(1) if m else rest
            library, files = (set(s) for s in state.get(parent, (set(), set())))
            since = set()
            current = Stage(m.group(2) if m else rest)
            stages[current.name] = current
            order.append(current.name)
        elif keyword == "COPY":
            args = shlex.split(rest)
            if any(a.startswith("--from") for a in args):
                continue
            paths = [a for a in args if not a.startswith("--")]
            sources, dest = paths[:-1], paths[-1]
            for source in sources:
                got = _repo_files(source)
                files |= got
                # a library file copied as data (the smoke's moe_reference.py) is not the importable library
                lib = {f for f in got if f.startswith(f"{LIB}/")} if dest.startswith(f"/ktlegacy/{LIB}") else set()
                library |= lib
                since |= lib
        elif keyword == "RUN":
            current.runs.append(Run(rest, set(library), set(since), set(files)))
            since = set()
    if current is not None:
        current.leftover = set(since)
    return [stages[n] for n in order]


# -- what a RUN runs ---------------------------------------------------------------------------

COMMAND = re.compile(r"-m\s+ktlegacy\s+([a-z][\w-]*)")
SCRIPT = re.compile(r"(?:/ktlegacy/|\$here/|\$\{here\}/)((?:images/scripts/)?[\w.-]+\.(?:sh|py))")


def _cli_calls(path: Path) -> set[str]:
    """Commands a Python script runs through ``main(["CMD", ...])`` (ktlegacy.cli.main)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if (isinstance(node, ast.Call) and getattr(node.func, "id", "") == "main" and node.args
                and isinstance(node.args[0], ast.List) and node.args[0].elts
                and isinstance(node.args[0].elts[0], ast.Constant)):
            found.add(node.args[0].elts[0].value)
    return found


def _scripts_and_commands(run: Run) -> tuple[set[str], set[tuple[str, bool]]]:
    """(repo paths of the images/scripts files the RUN runs, {(command, via -m ktlegacy)})."""
    scripts, commands, todo = set(), set(), [run.text]
    while todo:
        text = "\n".join(ln for ln in todo.pop().splitlines() if not ln.lstrip().startswith("#"))
        commands |= {(name, True) for name in COMMAND.findall(text)}
        for m in SCRIPT.finditer(text):
            rel = m.group(1) if m.group(1).startswith("images/") else f"images/scripts/{m.group(1)}"
            if rel not in scripts and (REPO / rel).is_file():
                assert rel in run.files, f"a RUN calls {rel}, which its stage does not copy"
                scripts.add(rel)
                if rel.endswith(".sh"):
                    todo.append((REPO / rel).read_text())
                else:
                    commands |= {(name, False) for name in _cli_calls(REPO / rel)}
    return scripts, commands


def command_modules() -> dict[str, str]:
    """command name -> the library file that registers it (``command("name", ...)``)."""
    found = {}
    for path in sorted((REPO / LIB).rglob("*.py")):
        for name in re.findall(r"""\bcommand\(\s*["']([a-z][\w-]*)["']""", path.read_text()):
            found[name] = path.relative_to(REPO).as_posix()
    return found


def _module_file(module: str) -> str | None:
    base = REPO / Path(*module.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand.relative_to(REPO).as_posix()
    return None


def _package_of(rel: str) -> list[str]:
    """The package a file's relative imports start from (for an __init__.py, its own)."""
    return list(Path(rel).parts[:-1])


def _guarded(node: ast.AST, parents: dict) -> bool:
    while node in parents:
        node, child = parents[node], node
        if isinstance(node, ast.Try) and child in node.body:
            for handler in node.handlers:
                names = ({n.id for n in ast.walk(handler.type) if isinstance(n, ast.Name)}
                         if handler.type else {"BaseException"})
                if names & {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"}:
                    return True
    return False


def imports_of(rel: str, commands: set[str] = frozenset()) -> set[str]:
    """Library files the file ``rel`` imports or opens beside itself. For cli.py, the bodies of
    commands other than ``commands`` are left out."""
    text = (REPO / rel).read_text()
    tree = ast.parse(text)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    skip: set[ast.AST] = set()
    if rel == f"{LIB}/cli.py":
        for node in tree.body:
            if isinstance(node, ast.FunctionDef):
                for dec in node.decorator_list:
                    if (isinstance(dec, ast.Call) and getattr(dec.func, "id", "") == "command"
                            and isinstance(dec.args[0], ast.Constant) and dec.args[0].value not in commands):
                        skip |= set(ast.walk(node))
    package = _package_of(rel)
    found = set()
    for node in ast.walk(tree):
        if node in skip or not isinstance(node, (ast.Import, ast.ImportFrom)) or _guarded(node, parents):
            continue
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + (node.module.split(".") if node.module else []))
            targets = [module] + [f"{module}.{a.name}" for a in node.names]
        for target in targets:
            if target == LIB or target.startswith(f"{LIB}."):
                # a package's modules bring the package's __init__ with them
                for i in range(1, target.count(".") + 2):
                    f = _module_file(".".join(target.split(".")[:i]))
                    if f:
                        found.add(f)
    for name in re.findall(r"""with_name\(\s*["']([^"']+)["']\s*\)""", text):
        sibling = (REPO / rel).parent / name
        if sibling.is_file() and sibling.is_relative_to(REPO / LIB):
            found.add(sibling.relative_to(REPO).as_posix())
    if rel.startswith(f"{LIB}/"):
        for i in range(1, len(package) + 1):
            found.add("/".join(package[:i]) + "/__init__.py")
    return found


def needed_by(run: Run) -> set[str]:
    """Every library file the RUN can import."""
    scripts, commands = _scripts_and_commands(run)
    registry = command_modules()
    names = {name for name, _ in commands}
    todo = [s for s in scripts if s.endswith(".py")]
    for name, via_m in commands:
        assert name in registry, f"a RUN runs ktlegacy {name}, which no library module registers"
        todo.append(registry[name])
        if name == "patch":  # the overlays it loads (overlays/*.py) import the library too
            todo += sorted(p.relative_to(REPO).as_posix() for p in (REPO / "overlays").glob("*.py"))
        todo.append(f"{LIB}/cli.py")
        if via_m:
            todo += [f"{LIB}/__main__.py", f"{LIB}/__init__.py"]
    needed, seen = set(), set()
    while todo:
        rel = todo.pop()
        if rel in seen:
            continue
        seen.add(rel)
        if rel.startswith(f"{LIB}/"):
            needed.add(rel)
        if rel.endswith(".py"):
            todo.extend(imports_of(rel, names))
    return needed


STAGES = parse_stages(DOCKERFILE.read_text())


def test_the_parser_sees_the_stages_and_their_library_runs():
    names = [s.name for s in STAGES]
    assert names[:2] == ["wheelhouse", "toolchain"] and names[-1] == "runtime", names
    running = {s.name for s in STAGES for r in s.runs if needed_by(r)}
    assert {"source", "kernels", "wheels"} <= running, running


@pytest.mark.parametrize("stage", [s for s in STAGES if s.runs], ids=lambda s: s.name)
def test_each_run_has_what_it_imports_and_each_copy_is_used_at_once(stage):
    for run in stage.runs:
        needed = needed_by(run)
        missing = needed - run.library
        assert not missing, f"{stage.name}: `RUN {run.text[:70]}` imports {sorted(missing)}, not copied before it"
        unused = run.copied_since - needed
        assert not unused, (f"{stage.name}: {sorted(unused)} copied before `RUN {run.text[:70]}`, which does not "
                            "import them (copy them before the step that does, or not at all)")
    assert not stage.leftover, f"{stage.name}: {sorted(stage.leftover)} copied after its last RUN"


def test_a_module_no_stage_runs_is_copied_nowhere():
    copied = {f for s in STAGES for r in s.runs for f in r.library}
    for module in ("doctor.py", "hostfacts.py", "vram.py", "profiles.py", "up.py", "publish.py", "build.py",
                   "docker.py", "standin.py", "images.py", "testing/__init__.py"):
        assert f"{LIB}/{module}" not in copied, module


def test_the_check_sees_a_missing_import():
    # the check itself: a RUN of `patch` without overlay.py, and cli.py's other commands ignored
    run = Run('python -m ktlegacy patch --src /src --arch sm75', {f"{LIB}/cli.py"}, set(), set())
    needed = needed_by(run)
    assert {f"{LIB}/overlay.py", f"{LIB}/fingerprint.py", f"{LIB}/fingerprints.json", f"{LIB}/arch.py"} <= needed
    assert f"{LIB}/source.py" not in needed   # fetch-source's import, not patch's


# -- the stages outside Docker, with only their copies -------------------------------------------

def _layout(run: Run, dest: Path) -> Path:
    """The stage's /ktlegacy as of this RUN: the repo files it copied, nothing else."""
    for rel in run.files:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_bytes((REPO / rel).read_bytes())
    return dest


def _isolated(layout: Path, *args: str) -> subprocess.CompletedProcess:
    """Run this Python on the layout: -S skips site, so no .pth file (an editable ktlegacy's
    finder or path entry) runs; the site-packages directories come back as plain path entries
    (the image's venv has its packages: pyyaml, setuptools...), after the layout."""
    site = [p for p in sysconfig.get_paths().values() if p.endswith("-packages")]
    for d in site:
        assert not (Path(d) / LIB).exists(), f"{d} holds a ktlegacy package: it would fill gaps in the layout"
    path = ":".join([str(layout), *dict.fromkeys(site)])
    return subprocess.run([sys.executable, "-S", *args], cwd=layout, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "PYTHONPATH": path},
                          timeout=600)


@pytest.mark.parametrize("stage", [s for s in STAGES if any(r.copied_since for r in s.runs)], ids=lambda s: s.name)
def test_each_library_run_parses_its_commands_with_only_its_copies(stage, tmp_path):
    for i, run in enumerate(stage.runs):
        scripts, commands = _scripts_and_commands(run)
        layout = _layout(run, tmp_path / f"run{i}")
        calls = [["-m", LIB, name, "--help"] for name, via_m in sorted(commands) if via_m]
        calls += [[str(layout / s), "--help"] for s in sorted(scripts) if s.endswith(".py")]
        for call in calls:
            proc = _isolated(layout, *call)
            assert proc.returncode == 0 and "usage:" in proc.stdout, (stage.name, call, proc.stderr[-2000:])


def test_the_source_stage_fetches_and_patches_with_only_its_copies(tmp_path, sdist_tree):
    (stage,) = [s for s in STAGES if s.name == "source"]
    fetch, patch = stage.runs
    src = tmp_path / "src"
    proc = _isolated(_layout(fetch, tmp_path / "fetch"), "-m", LIB, "fetch-source", "--ref", "0.2.1.post1",
                     "--dest", str(src))
    assert proc.returncode == 0, proc.stderr[-2000:]
    layout = _layout(patch, tmp_path / "patch")
    proc = _isolated(layout, "-m", LIB, "patch", "--src", str(src), "--arch", "sm75")
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = _isolated(layout, str(layout / "images/scripts/check_source.py"), "--src", str(src), "--arch", "sm75")
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_wheels_stage_builds_the_stub_with_only_its_copies(tmp_path):
    (stage,) = [s for s in STAGES if s.name == "wheels"]
    run = next(r for r in stage.runs if "build-stub" in r.text)
    proc = _isolated(_layout(run, tmp_path / "wheels"), "-m", LIB, "build-stub", "--dest", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(list((tmp_path / "out").glob("flash_attn-*.whl"))) == 1


def test_the_kernels_stage_check_starts_with_only_its_copies(tmp_path, sdist_tree):
    # finds the tree's kernels, then, given a Python without Triton, stops with its one line
    # (naming the torch pin even without build.py, which the stage does not copy)
    (stage,) = [s for s in STAGES if s.name == "kernels"]
    (run,) = stage.runs
    layout = _layout(run, tmp_path / "kernels")
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


def _import_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of ``graph`` (file -> files it imports), as a path back to its start, or []."""
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str]:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if nxt == node or nxt.endswith("__init__.py"):
                continue   # a package's __init__ comes with each of its modules: not a circle
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = "done"
        return []

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return []


def test_no_library_module_imports_itself_back():
    """Imports anywhere in a file (a function's too) count: a module that needs a late import to
    load is a circle, not a fix."""
    files = [p.relative_to(REPO).as_posix() for p in sorted((REPO / LIB).rglob("*.py"))]
    assert _import_cycle({f: imports_of(f) for f in files}) == []
    assert _import_cycle({"a.py": {"b.py"}, "b.py": {"c.py"}, "c.py": {"a.py"}}) == ["a.py", "b.py", "c.py", "a.py"]
