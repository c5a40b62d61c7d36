import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ktlegacy.core.errors import KtlegacyError
from ktlegacy.core.refs import REFS, get_ref
from ktlegacy.core.source import fetch_source, read_record


def test_sdist_tree_is_pristine_and_recorded(sdist_tree):
    record = read_record(sdist_tree)
    assert record["origin"] == "sdist" and record["ref"] == "0.2.1.post1"
    assert record["sha256"] == REFS["0.2.1.post1"].sha256
    # the sdist bundles third_party, which the C++ build needs
    assert (sdist_tree / "third_party" / "llama.cpp").is_dir()
    assert 'flash_attn' in (sdist_tree / "ktransformers/operators/attention.py").read_text()


def test_cached_sdist_matches_hash():
    from ktlegacy.core.source import CACHE_DIR
    ref = REFS["0.2.1.post1"]
    data = (CACHE_DIR / ref.filename).read_bytes()
    assert hashlib.sha256(data).hexdigest() == ref.sha256


def test_corrupt_cache_is_refetched(tmp_path, monkeypatch):
    import ktlegacy.core.source as source
    from ktlegacy.core.source import CACHE_DIR
    ref = REFS["0.2.1.post1"]
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / ref.filename).write_bytes(b"not the sdist")
    path = source.download_sdist(ref, cache=cache)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == ref.sha256


def test_wrong_hash_is_refused_and_nothing_written(tmp_path, monkeypatch):
    import dataclasses
    import ktlegacy.core.source as source
    bad = dataclasses.replace(REFS["0.2.1.post1"], sha256="0" * 64)
    with pytest.raises(KtlegacyError, match="sha256"):
        source.download_sdist(bad, cache=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_local_copy(sdist_tree, tmp_path):
    record = fetch_source(tmp_path / "copy", local=sdist_tree)
    assert record["origin"] == "local"
    assert (tmp_path / "copy/ktransformers/__init__.py").is_file()
    assert not (tmp_path / "copy/ktlegacy-fetch-incomplete").exists()
    (tmp_path / "copy/ktlegacy-fetch-incomplete").write_text("a killed fetch\n")  # a half tree is not copied whole
    with pytest.raises(KtlegacyError, match="is an incomplete tree"):
        fetch_source(tmp_path / "copy2", local=tmp_path / "copy")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]


def test_local_git_clone_records_commit(sdist_tree, tmp_path):
    """A git origin at a tag: cloned with submodules, the resolved commit recorded."""
    repo = tmp_path / "origin"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "ktransformers").mkdir()
    (repo / "ktransformers/__init__.py").write_text('__version__ = "0.3.1"\n')
    g = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(g + ["add", "."], check=True)
    subprocess.run(g + ["commit", "-qm", "x"], check=True)
    subprocess.run(g + ["tag", "v0.3.1"], check=True)
    head = subprocess.run(g + ["rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    record = fetch_source(tmp_path / "clone", "v0.3.1", git_url=f"file://{repo}")
    assert record == {"ref": "v0.3.1", "origin": "git", "url": f"file://{repo}", "commit": head}
    assert json.loads((tmp_path / "clone/ktlegacy-source.json").read_text())["commit"] == head
    assert not (tmp_path / "clone/ktlegacy-fetch-incomplete").exists()  # marked while cloning, whole now


def test_unreachable_upstream_git_names_the_mirror_and_local_options(tmp_path):
    """A git ref without GitHub: git's own message, then what to do instead (a mirror or a local tree)."""
    env = dict(os.environ, GIT_CONFIG_COUNT="1", GIT_CONFIG_KEY_0="url.file:///nonexistent/.insteadOf",
               GIT_CONFIG_VALUE_0="https://github.com/")
    proc = subprocess.run([sys.executable, "-m", "ktlegacy", "fetch-source", "--ref", "v0.3.2",
                           "--dest", str(tmp_path / "x")], capture_output=True, text=True, env=env)
    assert proc.returncode != 0 and proc.stderr.count("\n") == 1, proc.stderr
    assert "git fetch -q failed" in proc.stderr
    assert "pass a mirror with --git-url URL --ref v0.3.2, or a checked-out tree with --local DIR" in proc.stderr
    assert [p.name for p in tmp_path.iterdir()] == []


def test_bad_input_is_one_line_and_leaves_nothing(tmp_path):
    env_cmd = [sys.executable, "-m", "ktlegacy", "fetch-source", "--ref", "v9.9", "--dest", str(tmp_path / "x")]
    proc = subprocess.run(env_cmd, capture_output=True, text=True)
    assert proc.returncode != 0
    assert proc.stderr.count("\n") == 1 and "unknown ktransformers ref 'v9.9'" in proc.stderr
    assert not (tmp_path / "x").exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_occupied_dest_is_refused(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d/keep").write_text("mine")
    with pytest.raises(KtlegacyError, match="not empty"):
        fetch_source(tmp_path / "d", "0.2.1.post1")
    assert (tmp_path / "d/keep").read_text() == "mine"


def test_ref_table_is_consistent():
    """sdist refs carry what the download checks, git refs a full commit, the default is one CI
    can fetch (PyPI), and an unknown ref names the supported ones."""
    from ktlegacy.core.refs import DEFAULT_REF
    assert all(name == ref.name for name, ref in REFS.items())   # get_ref(name) is the ref named so
    assert REFS[DEFAULT_REF].kind == "sdist"
    for ref in REFS.values():
        assert ref.kind in ("sdist", "git")
        assert (ref.kind == "sdist") == bool(ref.sha256 and ref.filename), ref
    with pytest.raises(KtlegacyError, match="supported refs are " + ", ".join(REFS).replace(".", r"\.")):
        get_ref("main")
    for ref in REFS.values():
        assert (ref.kind == "sdist") == bool(ref.sha256) and (ref.kind == "git") == (len(ref.commit) == 40), ref
        # an engine under a subdirectory comes with the top-level submodules it builds from (git only)
        assert bool(ref.subdir) == bool(ref.submodules) and (not ref.subdir or ref.kind == "git"), ref


def _checkout_with_archive(root: Path) -> Path:
    """The layout of an upstream checkout at v0.7.0: the engine under archive/ (its third_party/
    holding llamafile only) and the llama.cpp/pybind11 submodules at the top."""
    (root / "archive" / "ktransformers").mkdir(parents=True)
    (root / "archive" / "ktransformers" / "__init__.py").write_text('__version__ = "0.4.1"\n')
    (root / "archive" / "third_party" / "llamafile").mkdir(parents=True)
    (root / "archive" / "third_party" / "llamafile" / "sgemm.cpp").write_text("// llamafile\n")
    for sub in ("llama.cpp", "pybind11"):
        (root / "third_party" / sub).mkdir(parents=True)
        (root / "third_party" / sub / "CMakeLists.txt").write_text(f"# {sub}\n")
        (root / "third_party" / sub / ".git").write_text("gitdir: ../../.git/modules/x\n")
    (root / "kt-kernel").mkdir()
    return root


def test_v070_engine_is_archive_with_the_top_level_submodules(tmp_path):
    from ktlegacy.core.source import engine_tree
    repo = _checkout_with_archive(tmp_path / "checkout")
    extra = engine_tree(repo, REFS["v0.7.0"], tmp_path / "engine")
    engine = tmp_path / "engine"
    assert extra == {"subdir": "archive", "submodules": ["third_party/llama.cpp", "third_party/pybind11"]}
    assert (engine / "ktransformers" / "__init__.py").is_file() and not (engine / "kt-kernel").exists()
    for sub in ("llama.cpp", "pybind11", "llamafile"):
        assert (engine / "third_party" / sub).is_dir(), sub
    assert not (engine / "third_party" / "llama.cpp" / ".git").exists()


def test_v070_checkout_without_its_submodules_is_refused(tmp_path):
    from ktlegacy.core.source import engine_tree
    repo = _checkout_with_archive(tmp_path / "checkout")
    shutil.rmtree(repo / "third_party" / "pybind11")
    (repo / "third_party" / "pybind11").mkdir()
    with pytest.raises(KtlegacyError, match="submodule third_party/pybind11 is empty"):
        engine_tree(repo, REFS["v0.7.0"], tmp_path / "engine")
    assert not (tmp_path / "engine").exists()


def test_local_repository_with_archive_says_where_the_engine_is(tmp_path):
    repo = _checkout_with_archive(tmp_path / "checkout")
    with pytest.raises(KtlegacyError, match=r"legacy engine is .*archive.*fetch-source --ref v0\.7\.0"):
        fetch_source(tmp_path / "dest", "v0.7.0", local=repo)
    assert not (tmp_path / "dest").exists()


def test_local_tarball_is_unpacked_and_recorded(sdist_tree, tmp_path):
    """--local FILE: a tar archive of a tree (how the GPU machine gets a git ref without network)."""
    from ktlegacy.core.source import CACHE_DIR
    archive = CACHE_DIR / REFS["0.2.1.post1"].filename
    record = fetch_source(tmp_path / "t", "0.2.1.post1", local=archive)
    assert record["origin"] == "local" and record["sha256"] == REFS["0.2.1.post1"].sha256
    assert (tmp_path / "t" / "ktransformers" / "__init__.py").read_bytes() == \
        (sdist_tree / "ktransformers" / "__init__.py").read_bytes()
    (tmp_path / "junk.txt").write_text("not a tree")
    with pytest.raises(KtlegacyError, match="neither a directory nor a tar archive"):
        fetch_source(tmp_path / "u", None, local=tmp_path / "junk.txt")
    assert not (tmp_path / "u").exists()


# -- interrupted or refused: no half tree that patch would accept (issue 21) -------------------

def _fetch(dest: Path, *args: str, kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "KTLEGACY_TEST_KILL_AT"}
    if kill_at:
        env["KTLEGACY_TEST_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-m", "ktlegacy", "fetch-source", "--ref", "0.2.1.post1",
                           "--dest", str(dest), *args], capture_output=True, text=True, env=env, timeout=300)


def _trees_under(root: Path) -> list[Path]:
    """Every directory under ``root`` (hidden ones included) that looks like a ktransformers tree."""
    return sorted(p.parent.parent for p in root.rglob("ktransformers/__init__.py"))


def _patch_check(tree: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ktlegacy", "patch", "--src", str(tree), "--arch", "sm75", "--check"],
                          capture_output=True, text=True, timeout=300)


def _state(root: Path) -> dict:
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir",
                                       p.stat().st_mode) for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def sdist_state(sdist_tree) -> dict:
    return _state(sdist_tree)


@pytest.mark.parametrize("kill_at, force, refused", [
    ("extract:1", False, 0), ("extract:800", False, 1), ("extract:1681", False, 1),  # the sdist has 1681 members
    ("rename:1", True, 0), ("rename:2", True, 0),   # the old tree aside, the new one in: whole trees only
    ("unlink:4", True, 1),                          # the old tree half removed
])
def test_a_killed_fetch_leaves_no_tree_patch_accepts_and_the_next_one_cleans_up(sdist_state, tmp_path, kill_at, force,
                                                                                  refused):
    """Killed mid-extraction (first, middle, last member), while --force moves the old tree
    aside or the new one in, or while the old one is being removed: whatever is left under the
    parent is either a whole tree or refused by patch; the next fetch-source ends with the
    pristine tree at --dest and nothing else."""
    dest = tmp_path / "parent" / "src"
    if force:
        assert _fetch(dest).returncode == 0
        (dest / "old-marker").write_text("the tree --force replaces\n")
    killed = _fetch(dest, *(["--force"] if force else []), kill_at=kill_at)
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr)
    n_refused = 0
    for tree in _trees_under(tmp_path / "parent"):
        state = _state(tree)
        state.pop("old-marker", None)
        whole = state == sdist_state
        if not whole:
            proc = _patch_check(tree)
            assert proc.returncode == 2 and proc.stderr.count("\n") == 1, (tree, proc.stdout[-500:], proc.stderr)
            assert "is an incomplete tree (ktlegacy-fetch-incomplete" in proc.stderr, proc.stderr
            n_refused += 1
    assert n_refused == refused
    again = _fetch(dest, "--force")
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in (tmp_path / "parent").iterdir()) == ["src"]  # leftovers removed
    assert _state(dest) == sdist_state


def test_a_symlinked_dest_is_refused_in_one_line(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep").write_text("mine\n")
    os.symlink(target, tmp_path / "link")
    for args in ((), ("--force",)):
        proc = _fetch(tmp_path / "link", *args)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert f"--dest {tmp_path / 'link'} is a symlink (to {target})" in proc.stderr
    assert [p.name for p in target.iterdir()] == ["keep"] and (target / "keep").read_text() == "mine\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "link"]


def test_extraction_without_tarfile_filters_gives_the_same_tree(sdist_state, tmp_path, monkeypatch):
    """Python before 3.11.4 (Debian bookworm's 3.11.2, the image build's stand-in base) has no
    extraction filters and no TarInfo.replace: the same checks by hand give the same tree."""
    import tarfile
    from ktlegacy.core.source import CACHE_DIR
    monkeypatch.delattr(tarfile, "data_filter")
    monkeypatch.delattr(tarfile.TarInfo, "replace")
    fetch_source(tmp_path / "t", "0.2.1.post1", local=CACHE_DIR / REFS["0.2.1.post1"].filename)
    state = _state(tmp_path / "t")
    assert json.loads((tmp_path / "t" / "ktlegacy-source.json").read_bytes())["origin"] == "local"
    state.pop("ktlegacy-source.json")
    # the same files and contents (modes are the archive's: the "data" filter also drops group write)
    assert {k: v[0] for k, v in state.items()} == {k: v[0] for k, v in sdist_state.items() if k != "ktlegacy-source.json"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]
