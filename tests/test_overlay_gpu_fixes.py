"""The two overlays the H100 proof needed (overlays/45_sdpa_kv_reuse.py, overlays/65_cpu_experts_dtype.py).

Their effect is proven on a GPU by bench/gpu_proof.py (greedy tokens and logits vs an fp32
reference, second turn on the same KV cache); here, on the real 0.2.1.post1 sdist: what they
write, that a second run is a no-op, and that drift is refused without touching the tree.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from ktlegacy.core.arch import get_arch
from ktlegacy.core.overlay import patch_tree

REPO = Path(__file__).resolve().parent.parent
ATTENTION = "ktransformers/operators/attention.py"
EXPERTS = "ktransformers/operators/experts.py"


@pytest.fixture(scope="module")
def patched(sdist_tree, tmp_path_factory) -> Path:
    import shutil
    dest = tmp_path_factory.mktemp("h6-patched") / "tree"
    shutil.copytree(sdist_tree, dest, symlinks=True)
    patch_tree(dest, get_arch("sm75"), out=lambda line: None)
    return dest


def _function_source(path: Path, name: str) -> str:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return ast.get_source_segment(path.read_text(), node)
    raise AssertionError(f"{name} not found in {path}")


def test_prefill_paths_read_the_cache_and_expand_kv_over_kv_len(patched):
    path = patched / ATTENTION
    for fn in ("forward_linux_triton", "forward_linux_flashinfer"):
        src = _function_source(path, fn)
        prefill = src[src.index("        else:\n            if past_key_value is not None:"):]
        assert "cached_kv, _ = past_key_value.update(" in prefill
        assert "int(cache_position[0]) > 0" in prefill
        assert "k_pe[:, :q_len]" not in prefill and "compressed_kv[:, :q_len]" not in prefill
        assert ".view(bsz, kv_len, self.num_heads, self.qk_nope_head_dim + self.v_head_dim)" in prefill
        assert "k_pe.new_empty(bsz, kv_len," in prefill and "value_states.view(bsz, kv_len," in prefill
        # queries stay over the new tokens only: SDPA aligns q_len < k_len bottom-right
        assert "query_states = k_pe.new_empty(bsz, q_len," in prefill
        assert "ktlegacy_runtime.sdpa_prefill(" in prefill
    # the windows path (forward_chunck) is upstream's, untouched
    assert "kv_len" not in _function_source(path, "forward_chunck")
    compile(path.read_text(), str(path), "exec")


def test_cpu_experts_get_the_model_dtype(patched):
    text = (patched / EXPERTS).read_text()
    assert "30, # TODO: get from model.dtype" not in text
    assert "{torch.float32: 0, torch.float16: 1}.get(torch.get_default_dtype(), 30)" in text
    assert "dtype=torch.bfloat16)" not in text.split("KExpertsCPU.output_cpu = ")[1].splitlines()[0]
    # the mapping itself: ggml F32 = 0, F16 = 1, BF16 = 30
    import torch
    mapping = {torch.float32: 0, torch.float16: 1}
    assert [mapping.get(d, 30) for d in (torch.float32, torch.float16, torch.bfloat16)] == [0, 1, 30]
    compile(text, EXPERTS, "exec")


def test_second_patch_run_changes_nothing(patched):
    before = {p: (patched / p).read_text() for p in (ATTENTION, EXPERTS)}
    proc = subprocess.run([sys.executable, "-m", "ktlegacy", "patch", "--src", str(patched), "--arch", "sm75"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "sdpa-kv-reuse: already applied" in proc.stdout and "cpu-experts-dtype: already applied" in proc.stdout
    assert {p: (patched / p).read_text() for p in before} == before


@pytest.mark.parametrize("rel, anchor, overlay", [
    (ATTENTION, "            k_pe = k_pe[:, :q_len]\n", "sdpa-kv-reuse"),
    (EXPERTS, "            30, # TODO: get from model.dtype\n", "cpu-experts-dtype"),
])
def test_drift_is_refused_and_the_tree_untouched(pristine_tree, rel, anchor, overlay):
    path = pristine_tree / rel
    path.write_text(path.read_text().replace(anchor, anchor.replace("  ", " \t", 1)))
    snapshot = {p: p.read_bytes() for p in pristine_tree.rglob("*.py")}
    # forced to 0.2.1.post1: without --ref the edited file already makes the tree "no supported ref"
    proc = subprocess.run([sys.executable, "-m", "ktlegacy", "patch", "--src", str(pristine_tree), "--arch", "sm75",
                           "--ref", "0.2.1.post1"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: overlay {overlay}: {rel}: expected "), proc.stderr
    assert {p: p.read_bytes() for p in pristine_tree.rglob("*.py")} == snapshot
