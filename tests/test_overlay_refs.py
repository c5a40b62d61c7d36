"""Which overlays a ref gets: every overlay applies to every supported ref (ktlegacy/core/facts.py's
``REFS``) but those it declares ``not_applicable``, with the reason ``patch`` prints.

* The supported refs get the overlays recorded below (the set they got when each overlay still
  listed its refs by hand), on each arch; on the real trees (the sdist; the tags where
  ``KTLEGACY_TAG_TREES`` holds them) ``patch --check`` applies exactly those and prints a reason
  for each skipped one.
* A ref added to the table is applied by every overlay that does not state why not: on a tree
  whose content is v0.7.0's it is patched exactly as v0.7.0; on a tree an overlay does not
  recognise, that overlay refuses it in one line. No overlay skips it silently.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from ktlegacy.core import facts
from ktlegacy.core.arch import get_arch
from ktlegacy.core.errors import KtlegacyError
from ktlegacy.core.facts import REFS, Ref
from ktlegacy.core.overlay import MANIFEST_NAME, Drift, load_overlays, patch_tree

from conftest import TAG_TREES_ENV

ALL = ["runtime", "gguf-linear", "torch-linear-rules", "eager", "sdpa", "sdpa-kv-reuse", "prefill-kv-length",
       "last-token-logits", "triton-stages", "fp16", "cpu-experts-dtype", "moe-partial-block",
       "gpu-expert-prefill", "task-queue-start", "portable-cpu", "loopback-listeners", "serve-backend-guard", "optional-sched-ext",
       "cache-device-key", "server-api"]
# ref -> overlays skipped there (recorded before refs became data: 10 overlays listed them by hand)
SKIPPED = {
    "0.2.1.post1": ["prefill-kv-length", "loopback-listeners", "serve-backend-guard", "optional-sched-ext",
                    "cache-device-key"],
    "v0.2.4post1": ["last-token-logits", "optional-sched-ext", "cache-device-key", "server-api"],
    "v0.3.1": ["last-token-logits", "optional-sched-ext", "cache-device-key", "server-api"],
    "v0.3.2": ["last-token-logits", "optional-sched-ext", "cache-device-key", "server-api"],
    "v0.4.1": ["last-token-logits", "optional-sched-ext", "server-api"],
    "v0.7.0": ["last-token-logits", "server-api"],
}
NEW = "v9.9.9"  # a ref the table does not have yet


def source_tree(ref: str, sdist_tree: Path) -> Path:
    """The pristine tree of a supported ref, read only (patch --check writes nothing)."""
    if REFS[ref].kind == "sdist":
        return sdist_tree
    root = os.environ.get(TAG_TREES_ENV)
    if not root or not (Path(root) / ref / "ktransformers" / "__init__.py").is_file():
        pytest.skip(f"{TAG_TREES_ENV} holds no export of {ref} (CI cannot reach GitHub)")
    return Path(root) / ref


def test_supported_refs_get_the_recorded_overlays():
    assert set(SKIPPED) <= set(REFS)  # a ref added later needs no row: the new-ref tests below cover it
    overlays = load_overlays()
    assert [o.name for o, _ in overlays] == ALL
    for ref in SKIPPED:
        assert [o.name for o, _ in overlays if not o.applies_to(REFS[ref])] == SKIPPED[ref], ref
        assert [o.name for o, _ in overlays if ref in o.refs] == [n for n in ALL if n not in SKIPPED[ref]], ref


@pytest.mark.parametrize("arch", ["sm70", "sm75"])
@pytest.mark.parametrize("ref", list(SKIPPED))
def test_patch_applies_the_recorded_overlays_and_says_why_it_skips(ref, arch, sdist_tree):
    lines: list[str] = []
    result = patch_tree(source_tree(ref, sdist_tree), get_arch(arch), check=True, out=lines.append)
    assert result.ref.name == ref and not result.written
    assert result.applied == [n for n in ALL if n not in SKIPPED[ref]]
    assert result.skipped == SKIPPED[ref]
    for name in SKIPPED[ref]:
        line = next(l for l in lines if l.startswith(f"{name}: not for ref {ref}, skipped ("))
        assert len(line) > len(f"{name}: not for ref {ref}, skipped (") + 10, line


@pytest.fixture
def new_ref(monkeypatch):
    """The table with one ref more, as a new upstream tag would add it."""
    monkeypatch.setitem(facts.REFS, NEW, Ref(NEW, "9.9.9", "git", commit="9" * 40, subdir="archive"))
    return facts.REFS[NEW]


def test_a_new_ref_is_applied_by_every_overlay_that_does_not_say_why_not(new_ref):
    overlays = load_overlays()  # the overlay files are read again: declarations see the new ref
    skipped = [o for o, _ in overlays if not o.applies_to(new_ref)]
    for overlay in skipped:
        assert overlay.not_applicable[NEW].strip(), overlay.name
    # the two written for the sdist only say so for every later ref; every other overlay applies
    assert [o.name for o in skipped] == ["last-token-logits", "server-api"]
    assert all(NEW in o.refs for o, _ in overlays if o not in skipped)


def _each_overlay(tree: Path, ref: Ref) -> dict[str, str]:
    """overlay name -> "applied", its "skipped (reason)" line or its one-line refusal; each runs
    after the earlier ones that did not refuse (some build on an earlier one's edit)."""
    outcome, before = {}, []
    for overlay, path in load_overlays():
        lines: list[str] = []
        try:
            result = patch_tree(tree, get_arch("sm75"), ref=ref, check=True, overlays=before + [(overlay, path)],
                                out=lines.append)
        except Drift as exc:
            msg = str(exc)
            assert "\n" not in msg and msg.startswith(f"overlay {overlay.name}: "), msg
            outcome[overlay.name] = msg
            continue
        before.append((overlay, path))
        if overlay.name in result.applied:
            outcome[overlay.name] = "applied"
        else:
            assert overlay.name in result.skipped
            skip = next(l for l in lines if l.startswith(f"{overlay.name}: not for ref {ref.name}, skipped ("))
            outcome[overlay.name] = skip
    return outcome


def test_a_new_ref_on_a_tree_no_overlay_knows_is_refused_loudly_never_skipped(new_ref, sdist_tree, tmp_path):
    """The sdist's content under a new ref's name: the overlays that expect a git ref's code
    refuse it in one line; none skips it silently, and the whole patch is refused untouched."""
    tree = tmp_path / "tree"
    shutil.copytree(sdist_tree, tree, symlinks=True)
    outcome = _each_overlay(tree, new_ref)
    refused = sorted(n for n, o in outcome.items() if o.startswith("overlay "))
    assert refused, outcome  # e.g. prefill-kv-length, written against the git refs' prefill
    assert all(o == "applied" or o.startswith("overlay ") for n, o in outcome.items()
               if n not in ("last-token-logits", "server-api")), outcome
    with pytest.raises(Drift) as exc:
        patch_tree(tree, get_arch("sm75"), ref=new_ref, out=lambda line: None)
    assert "\n" not in str(exc.value) and not (tree / MANIFEST_NAME).exists()


def test_a_new_ref_with_v070s_content_is_patched_as_v070(new_ref, sdist_tree, tmp_path):
    src = source_tree("v0.7.0", sdist_tree)
    outcome = _each_overlay(src, new_ref)
    assert {n for n, o in outcome.items() if o != "applied"} == set(SKIPPED["v0.7.0"]), outcome
    trees = {}
    for ref in (REFS["v0.7.0"], new_ref):
        trees[ref.name] = tmp_path / ref.name
        shutil.copytree(src, trees[ref.name], symlinks=True)
        lines: list[str] = []
        result = patch_tree(trees[ref.name], get_arch("sm75"), ref=ref, out=lines.append)
        assert result.applied == [n for n in ALL if n not in SKIPPED["v0.7.0"]]
        assert all(l.endswith(")") for l in lines if ", skipped" in l), lines
    state = [{str(p.relative_to(t)): p.read_bytes() for p in sorted(t.rglob("*")) if p.is_file()
              and p.name != MANIFEST_NAME} for t in trees.values()]
    assert state[0] == state[1]


def test_not_applicable_names_supported_refs_with_a_reason(tmp_path):
    for bad in ('{"v0.9": "typo of a ref"}', '{"v0.7.0": ""}'):
        (tmp_path / "10_x.py").write_text(
            "from ktlegacy.core.overlay import Overlay\n"
            f"class X(Overlay):\n    name = 'x'\n    summary = 'x'\n    not_applicable = {bad}\n"
            "    def apply(self, tree, ctx):\n        pass\nOVERLAY = X()\n")
        with pytest.raises(KtlegacyError, match="not_applicable must map supported refs"):
            load_overlays(tmp_path)
