"""A tree's ref comes from its content: no upstream tag is ever patched with another ref's overlays.

* Every tag from v0.2.1.post1 to v0.7.0 is decided from tests/fixtures/tag_fingerprints.json
  (hashes of the files the overlays look at, recorded from the tags; CI cannot reach GitHub):
  a supported tag is recognised as itself, a tag whose engine is byte-identical to a supported
  ref's (same git tree) as that ref, every other tag is refused.
* Where exports exist (``KTLEGACY_TAG_TREES=DIR`` holding ``DIR/<tag>``, the engine of each
  tag: its top, or ``archive/`` from v0.4.2 on), the real ``patch`` runs on each one: patched as
  the expected ref (second run a no-op) or refused in one line with the tree untouched; and the
  fixture is checked against the real files.
* On the supported tags' real trees: the post-conditions test_overlays checks on the sdist (no
  Marlin/FP8 op in any rule file, no flash_attn_func call, no flash_attention_2 assignment, one
  Triton stage, no bf16 default, gated CPU probes, no -march=native in balance_serve).
* Everywhere, on the real sdist: the refusal logic on trees built from it (its version string
  naming another ref, one overlay file edited, one scanned file added, a fetch record naming
  another ref, a repository with the engine under archive/), ``--ref`` forcing a set while drift
  is still refused, and the loopback overlay not applying there.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ktlegacy.core import fingerprint
from ktlegacy.core.errors import KtlegacyError
from ktlegacy.core.overlay import MANIFEST_NAME, detect_ref
from ktlegacy.core.refs import REFS

REPO = Path(__file__).resolve().parent.parent
FIXTURE = json.loads((REPO / "tests" / "fixtures" / "tag_fingerprints.json").read_text())
TREES_ENV = "KTLEGACY_TAG_TREES"
SDIST_TAG = "v0.2.1.post1"  # the git tag of the sdist ref 0.2.1.post1


def tree_state(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def run_patch(src: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ktlegacy", "patch", "--src", str(src), "--arch", "sm75", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


def expected_ref(tag: str) -> str | None:
    """The ref a tag must be recognised as, or None: it must be refused."""
    if tag in REFS:
        return tag
    if tag == SDIST_TAG:
        return "0.2.1.post1"
    same = [ref for ref in REFS if ref in FIXTURE["tags"]
            and FIXTURE["tags"][ref]["engine_tree"] == FIXTURE["tags"][tag]["engine_tree"]]
    return same[0] if same else None


# ---------------------------------------------------------------- every tag, from the fixture

def test_fixture_covers_every_tag_and_every_supported_ref():
    tags = list(FIXTURE["tags"])
    assert tags[0] == SDIST_TAG and tags[-1] == "v0.7.0" and len(tags) >= 30
    assert set(REFS) - {"0.2.1.post1"} <= set(tags)
    recorded = sorted({rel for fp in fingerprint.load().values() for rel in fp["files"]})
    assert FIXTURE["paths"] == recorded, "ktlegacy/core/fingerprints.json changed: regenerate the tag fixture " \
                                         "(tests/fixtures/make_tag_fingerprints.py)"


@pytest.mark.parametrize("tag", list(FIXTURE["tags"]))
def test_every_tag_is_recognised_as_itself_or_refused(tag):
    entry = FIXTURE["tags"][tag]
    n = len(next(h for h in entry["files"] if h))
    recorded = dict(zip(FIXTURE["paths"], entry["files"]))
    short = {ref: {"files": {rel: h[:n] for rel, h in fp["files"].items()},
                   "scanned": {"patterns": fp["scanned"]["patterns"], "sha256": fp["scanned"]["sha256"][:n]}}
             for ref, fp in fingerprint.load().items()}
    matches, differing = fingerprint.compare(recorded.get, lambda patterns: next(
        entry["scanned"][ref] for ref, fp in short.items() if tuple(fp["scanned"]["patterns"]) == patterns), short)
    want = expected_ref(tag)
    assert matches == ([want] if want else []), (tag, entry["version"], {r: d[:3] for r, d in differing.items()})
    # the version string alone would have named a supported ref for some of these tags
    by_version = [ref.name for ref in REFS.values() if ref.version == entry["version"]]
    if by_version and by_version != [want]:
        assert not set(by_version) & set(matches)


def test_version_strings_do_not_name_the_tags():
    """Why content decides: the tags whose __version__ is another supported ref's."""
    clashes = {tag: e["version"] for tag, e in FIXTURE["tags"].items()
               if any(r.version == e["version"] and r.name != expected_ref(tag) for r in REFS.values())}
    assert {"v0.3", "v0.4.2", "v0.6.3.post1"} <= set(clashes), clashes


# ---------------------------------------------------------------- every tag, on real exports

def _tag_trees() -> Path:
    root = os.environ.get(TREES_ENV)
    if not root:
        pytest.skip(f"{TREES_ENV} is not set: export every tag's engine into DIR/<tag> to run (CI cannot reach GitHub)")
    return Path(root)


@pytest.mark.parametrize("tag", list(FIXTURE["tags"]))
def test_fixture_matches_the_real_tag_tree(tag):
    src = _tag_trees() / tag
    if not (src / "ktransformers" / "__init__.py").is_file():
        pytest.skip(f"{src} holds no exported ktransformers tree")
    entry = FIXTURE["tags"][tag]
    n = len(next(h for h in entry["files"] if h))
    real = [(h or None) and h[:n] for h in (fingerprint.sha256_of(src, rel) for rel in FIXTURE["paths"])]
    assert real == entry["files"]
    assert fingerprint.version_of(src) == entry["version"]


@pytest.mark.parametrize("tag", list(FIXTURE["tags"]))
def test_real_tag_tree_is_patched_as_its_ref_or_refused_untouched(tag, tmp_path):
    src = _tag_trees() / tag
    if not (src / "ktransformers" / "__init__.py").is_file():
        pytest.skip(f"{src} holds no exported ktransformers tree")
    tree = tmp_path / tag
    shutil.copytree(src, tree, symlinks=True)
    before = tree_state(tree)
    proc = run_patch(tree)
    want = expected_ref(tag)
    if want is None:
        assert proc.returncode != 0
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "matches no supported ref" in lines[0] and "--ref" in lines[0], proc.stderr
        assert tree_state(tree) == before
        return
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tree / MANIFEST_NAME).read_text())["ref"] == want
    again = run_patch(tree)
    assert again.returncode == 0 and "changed 0 files" in again.stdout, again.stdout + again.stderr


# ---------------------------------------------------------------- everywhere: trees built from the sdist

def test_sdist_is_recognised_without_a_record(pristine_tree):
    (pristine_tree / "ktlegacy-source.json").unlink(missing_ok=True)
    assert detect_ref(pristine_tree).name == "0.2.1.post1"


def _refused(tree: Path, *args: str, match: str) -> str:
    before = tree_state(tree)
    proc = run_patch(tree, *args)
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and match in lines[0], proc.stderr
    assert tree_state(tree) == before
    return lines[0]


def test_a_version_string_naming_another_ref_is_not_trusted(pristine_tree):
    """The sdist saying v0.3.2's "0.3.1" (the old detection patched it as v0.3.2) is refused."""
    init = pristine_tree / "ktransformers" / "__init__.py"
    init.write_text(init.read_text().replace('__version__ = "0.2.1.post1"', '__version__ = "0.3.1"'))
    line = _refused(pristine_tree, match="matches no supported ref")
    assert "'0.3.1'" in line and "closest: 0.2.1.post1" in line and "ktransformers/__init__.py" in line


def test_an_edited_overlay_file_is_refused_and_ref_forces_the_set(pristine_tree):
    linear = pristine_tree / "ktransformers" / "operators" / "linear.py"
    linear.write_text(linear.read_text() + "\n# a local change the overlays do not know\n")
    line = _refused(pristine_tree, match="matches no supported ref")
    checks = len(fingerprint.load()["0.2.1.post1"]["files"]) + 1  # the files + the scanned digest
    assert f"2 of {checks} checks differ: ktransformers/operators/linear.py, {fingerprint.SCANNED}" in line
    forced = run_patch(pristine_tree, "--ref", "0.2.1.post1")
    assert forced.returncode == 0, forced.stderr
    assert (f"--ref 0.2.1.post1: 2 overlay files differ from 0.2.1.post1's (ktransformers/operators/linear.py, "
            f"{fingerprint.SCANNED})") in forced.stdout


def test_an_added_rule_file_is_named_and_ref_forces_the_set(pristine_tree):
    rules = pristine_tree / "ktransformers" / "optimize" / "optimize_rules"
    shutil.copy(rules / "DeepSeek-V2-Lite-Chat.yaml", rules / "Site.yaml")
    line = _refused(pristine_tree, match="ktransformers/optimize/optimize_rules/Site.yaml is not part of 0.2.1.post1")
    assert line.endswith("if the file is yours, add --ref 0.2.1.post1"), line
    forced = run_patch(pristine_tree, "--ref", "0.2.1.post1")
    assert forced.returncode == 0, forced.stderr
    assert "(ktransformers/optimize/optimize_rules/Site.yaml (added))" in forced.stdout
    edits = [ln for ln in forced.stdout.splitlines() if "Site.yaml" in ln and not ln.startswith("--ref")]
    assert edits, forced.stdout  # the generic rule overlay edits it too


def test_two_added_files_are_not_guessed(pristine_tree):
    """No single added file explains the scanned digest: the refusal says only that it differs."""
    rules = pristine_tree / "ktransformers" / "optimize" / "optimize_rules"
    shutil.copy(rules / "DeepSeek-V2-Lite-Chat.yaml", rules / "Site.yaml")
    (pristine_tree / "ktransformers" / "site_hook.py").write_text("HOOK = 1\n")
    line = _refused(pristine_tree, match="matches no supported ref")
    assert "1 of " in line and fingerprint.SCANNED in line and "Site.yaml" not in line


def test_forcing_another_refs_set_is_refused_per_file(pristine_tree):
    """--ref v0.4.1 on 0.2.1.post1 content: the first file without its anchors stops everything."""
    line = _refused(pristine_tree, "--ref", "v0.4.1", match="error: overlay ")
    assert "upstream drifted, tree left untouched" in line


def test_a_record_naming_another_ref_is_refused(pristine_tree):
    (pristine_tree / "ktlegacy-source.json").write_text(json.dumps({"ref": "v0.3.2", "origin": "local"}))
    _refused(pristine_tree, match="fetch-source recorded ref v0.3.2 but the content is 0.2.1.post1's")


def test_a_repository_with_the_engine_under_archive_says_where_it_is(sdist_tree, tmp_path):
    repo = tmp_path / "repo"
    (repo / "archive").mkdir(parents=True)
    shutil.copytree(sdist_tree, repo / "archive" / "src", symlinks=True)
    os.rename(repo / "archive" / "src" / "ktransformers", repo / "archive" / "ktransformers")
    with pytest.raises(KtlegacyError, match=r"legacy engine is .*archive.*fetch-source --ref v0\.7\.0"):
        detect_ref(repo)


def test_supported_refs_fingerprints_are_distinct_and_complete():
    fps = fingerprint.load()
    assert set(fps) == set(REFS)
    for ref, fp in fps.items():
        assert "ktransformers/__init__.py" in fp["files"] and "setup.py" in fp["files"], ref
        assert "ktransformers/**/*.py" in fp["scanned"]["patterns"], ref
    digests = {json.dumps(fp, sort_keys=True) for fp in fps.values()}
    assert len(digests) == len(fps)


def test_v070_model_cache_imports_without_balance_serve(tmp_path):
    """optional-sched-ext: v0.7.0's custom_cache.py imports sched_ext bare; patched, it imports without it."""
    src = _tag_trees() / "v0.7.0"
    if not (src / "ktransformers" / "__init__.py").is_file():
        pytest.skip(f"{src} holds no exported ktransformers tree")
    tree = tmp_path / "v0.7.0"
    shutil.copytree(src, tree, symlinks=True)
    probe = ["-c", "import ktransformers.models.custom_cache as c; print('sched_ext', c.sched_ext)"]
    env = dict(os.environ, PYTHONPATH=str(tree))
    before = subprocess.run([sys.executable, *probe], env=env, capture_output=True, text=True, timeout=300)
    assert before.returncode != 0 and "No module named 'sched_ext'" in before.stderr
    assert run_patch(tree).returncode == 0
    after = subprocess.run([sys.executable, *probe], env=env, capture_output=True, text=True, timeout=300)
    assert after.returncode == 0 and "sched_ext None" in after.stdout, after.stderr[-2000:]


@pytest.mark.parametrize("tag", [r for r in REFS if r != "0.2.1.post1"])
def test_post_conditions_hold_at_every_git_ref(tag, tmp_path):
    """What test_overlays checks on the sdist, on each supported tag's real tree."""
    import re

    from ktlegacy.serving import check_rules
    src = _tag_trees() / tag
    if not (src / "ktransformers" / "__init__.py").is_file():
        pytest.skip(f"{src} holds no exported ktransformers tree")
    tree = tmp_path / tag
    shutil.copytree(src, tree, symlinks=True)
    assert run_patch(tree).returncode == 0
    pkg = tree / "ktransformers"
    for rule in sorted((pkg / "optimize" / "optimize_rules").rglob("*.y*ml")):
        check_rules(rule.read_text(), str(rule))  # parses as a rule list and selects no sm80+ op (serve.sh's check)
    attention = (pkg / "operators" / "attention.py").read_text()
    assert not re.search(r"(?<![\w.])flash_attn_func\(", attention)
    for rel in ("local_chat.py", "server/backend/interfaces/ktransformers.py"):
        assert not re.search(r"(?<![=!<>])=\s*[\"']flash_attention_2[\"']",
                             "\n".join(l for l in (pkg / rel).read_text().splitlines() if not l.lstrip().startswith("#")))
    assert "num_stages=2," not in (pkg / "operators" / "triton_attention.py").read_text()
    for py in pkg.rglob("*.py"):
        rel = py.relative_to(tree).as_posix()
        if rel.startswith(("ktransformers/tests/", "ktransformers/ktransformers_ext/")):
            continue
        text = py.read_text(encoding="utf-8", errors="replace")
        assert "set_default_dtype(torch.bfloat16)" not in text.replace(" ", ""), rel
        compile(text, rel, "exec")
    cmake = (tree / "csrc" / "ktransformers_ext" / "CMakeLists.txt").read_text()
    if "lscpu" in cmake:
        assert "ktlegacy: the host probe decides only for a NATIVE build" in cmake
    for cm in (tree / "csrc" / "balance_serve").rglob("CMakeLists.txt"):
        active = [l for l in cm.read_text().splitlines() if "-march=native" in l and not l.lstrip().startswith("#")]
        assert all("KTLEGACY_MARCH" in l for l in active), (cm, active)


def test_the_recorded_fingerprint_is_what_the_overlays_read_now(pristine_tree):
    """ktlegacy/core/fingerprints.json's sdist entry is what ``fingerprint`` records from the real tree
    today: an overlay that reads another file makes this fail until it is regenerated."""
    from ktlegacy.core.arch import get_arch
    from ktlegacy.core.overlay import record_fingerprint
    assert record_fingerprint(pristine_tree, REFS["0.2.1.post1"], get_arch("sm75")) == fingerprint.load()["0.2.1.post1"]
