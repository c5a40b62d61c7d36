import hashlib
import json
import subprocess
import sys

import pytest

from ktlegacy.errors import KtlegacyError
from ktlegacy.refs import REFS, get_ref
from ktlegacy.source import fetch_source, read_record


def test_sdist_tree_is_pristine_and_recorded(sdist_tree):
    record = read_record(sdist_tree)
    assert record["origin"] == "sdist" and record["ref"] == "0.2.1.post1"
    assert record["sha256"] == REFS["0.2.1.post1"].sha256
    # the sdist bundles third_party, which the C++ build needs
    assert (sdist_tree / "third_party" / "llama.cpp").is_dir()
    assert 'flash_attn' in (sdist_tree / "ktransformers/operators/attention.py").read_text()


def test_cached_sdist_matches_hash():
    from ktlegacy.source import CACHE_DIR
    ref = REFS["0.2.1.post1"]
    data = (CACHE_DIR / ref.filename).read_bytes()
    assert hashlib.sha256(data).hexdigest() == ref.sha256


def test_corrupt_cache_is_refetched(tmp_path, monkeypatch):
    import ktlegacy.source as source
    from ktlegacy.source import CACHE_DIR
    ref = REFS["0.2.1.post1"]
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / ref.filename).write_bytes(b"not the sdist")
    path = source.download_sdist(ref, cache=cache)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == ref.sha256


def test_wrong_hash_is_refused_and_nothing_written(tmp_path, monkeypatch):
    import dataclasses
    import ktlegacy.source as source
    bad = dataclasses.replace(REFS["0.2.1.post1"], sha256="0" * 64)
    with pytest.raises(KtlegacyError, match="sha256"):
        source.download_sdist(bad, cache=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_local_copy(sdist_tree, tmp_path):
    record = fetch_source(tmp_path / "copy", local=sdist_tree)
    assert record["origin"] == "local"
    assert (tmp_path / "copy/ktransformers/__init__.py").is_file()


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


def test_every_ref_in_table():
    assert set(REFS) == {"0.2.1.post1", "v0.2.4post1", "v0.3.1", "v0.3.2", "v0.4.1", "v0.7.0"}
    with pytest.raises(KtlegacyError):
        get_ref("main")
    for ref in REFS.values():
        assert (ref.kind == "sdist") == bool(ref.sha256) and (ref.kind == "git") == (len(ref.commit) == 40), ref
    assert REFS["v0.7.0"].subdir == "archive" and "third_party/llama.cpp" in REFS["v0.7.0"].submodules
