"""sdpa-kv-reuse and cpu-experts-dtype at the git tags v0.2.4post1, v0.3.1, v0.3.2, v0.4.1 and v0.7.0 (archive/).

CI cannot fetch the tags (GitHub is not reachable there), so the tests on tag trees run only
when ``KTLEGACY_TAG_TREES=DIR`` names a directory holding pristine exports ``DIR/<tag>/``, e.g.
``mkdir -p DIR/v0.3.1 && git --git-dir=MIRROR archive v0.3.1 | tar -x -C DIR/v0.3.1``; without
it they skip and say so. Two tests run everywhere, on the sdist: the check that sdpa-kv-reuse
does at the tags (their prefill already reads the whole cache) must refuse 0.2.1.post1's
prefill, which ignores it; and KLinearCPUInfer gets the model dtype there too.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import exported_tag_tree
from ktlegacy.core.overlay import Drift, StagedTree, load_overlays
from ktlegacy.core.refs import REFS

REPO = Path(__file__).resolve().parent.parent
ATTENTION = "ktransformers/operators/attention.py"
EXPERTS = "ktransformers/operators/experts.py"
LINEAR = "ktransformers/operators/linear.py"
TAGS = ("v0.2.4post1", "v0.3.1", "v0.3.2", "v0.4.1", "v0.7.0")  # v0.7.0: its archive/ exported as DIR/v0.7.0


def _overlay(name):
    return next(o for o, _ in load_overlays() if o.name == name)


def _run_patch(src: Path, ref: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ktlegacy", "patch", "--src", str(src), "--arch", "sm75",
                           "--ref", ref], cwd=REPO, capture_output=True, text=True, timeout=300)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _method(text: str, name: str, cls: str | None = None) -> str:
    """Source of the first function ``name`` (inside class ``cls`` if given)."""
    scope = ast.parse(text)
    if cls:
        scope = next(n for n in ast.walk(scope) if isinstance(n, ast.ClassDef) and n.name == cls)
    for node in ast.walk(scope):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return ast.get_source_segment(text, node)
    raise AssertionError(f"no method {name}")


# ---------------------------------------------------------------- everywhere: the sdist is the negative case

def test_the_tags_cache_check_refuses_the_sdist_prefill(sdist_tree):
    """0.2.1.post1 drops what update() returns: the check must not mistake it for the tags' code."""
    tree = StagedTree(sdist_tree)
    tree.current_overlay = "sdpa-kv-reuse"
    with pytest.raises(Drift) as err:
        _overlay("sdpa-kv-reuse").check_upstream_reads_the_cache(tree)
    msg = str(err.value)
    assert msg.startswith(f"overlay sdpa-kv-reuse: {ATTENTION}: expected forward_linux_triton to hold once ")
    assert "the whole KV cache" in msg and "\n" not in msg
    assert tree.changed_paths == []


def _assert_cpu_linear_gets_the_model_dtype(root: Path):
    """KLinearCPUInfer (same hard-coded BF16 at every ref) is edited like KExpertsCPU."""
    text = (root / LINEAR).read_text()
    load = _method(text, "load", cls="KLinearCPUInfer")
    config = [line for line in load.splitlines() if "LinearConfig(" in line]
    assert len(config) == 1 and config[0].rstrip().split("  # ")[0].endswith(
        "self.weight_type, {torch.float32: 0, torch.float16: 1}.get(torch.get_default_dtype(), 30))"), config
    output = [line for line in load.splitlines() if "self.output_cpu = " in line]
    assert len(output) == 1 and "dtype=torch.get_default_dtype())" in output[0], output
    compile(text, LINEAR, "exec")


def test_cpu_linear_gets_the_model_dtype_on_the_sdist(pristine_tree):
    result = _run_patch(pristine_tree, "0.2.1.post1")
    assert result.returncode == 0, result.stderr
    assert f"cpu-experts-dtype: changed {LINEAR}: KLinearCPUInfer LinearConfig hidden type" in result.stdout
    _assert_cpu_linear_gets_the_model_dtype(pristine_tree)


# ---------------------------------------------------------------- tag trees, when exported

@pytest.fixture(params=TAGS)
def tag_tree(request, tmp_path) -> tuple[str, Path]:
    """A private copy of DIR/<tag> (pristine git-archive export), free to patch."""
    tag = request.param
    src, dest = exported_tag_tree(tag, tmp_path)
    version = re.search(r"""__version__\s*=\s*["']([^"']+)["']""",
                        (src / "ktransformers" / "__init__.py").read_text()).group(1)
    assert version == REFS[tag].version, f"{src} says __version__ {version!r}, not {tag}'s {REFS[tag].version!r}"
    return tag, dest


def test_tag_cpu_experts_get_the_model_dtype_and_kv_reuse_is_upstreams(tag_tree):
    tag, tree = tag_tree
    attention_before = (tree / ATTENTION).read_text()
    first = _run_patch(tree, tag)
    assert first.returncode == 0, first.stderr
    assert "sdpa-kv-reuse: already applied, nothing to change" in first.stdout  # upstream's code, checked
    assert "sdpa-kv-reuse: changed" not in first.stdout
    assert re.search(r"^cpu-experts-dtype: changed ktransformers/operators/experts\.py: ", first.stdout, re.M)

    # attention.py is edited by the sdpa overlay only; its prefills still slice the cache to kv_seq_len
    attention = (tree / ATTENTION).read_text()
    assert "kv reuse" not in attention and attention != attention_before
    assert "prefill-kv-length: changed ktransformers/operators/attention.py: " in first.stdout
    fix = ("            kv_seq_len += past_key_value.get_usable_length(kv_seq_len, self.layer_idx)\n"
           "            if q_len > 1 and cache_position is not None:  # ktlegacy: the cached positions, not a counter\n"
           "                kv_seq_len = int(cache_position[-1]) + 1\n")
    for fn in ("forward_linux_triton", "forward_linux_flashinfer"):
        body = _method(attention, fn)
        assert "k_pe = k_pe[:, :kv_seq_len]" in body and "ktlegacy_runtime.sdpa_prefill(" in body
        # the prompt's key count is the cache positions, set before the cache is read and sliced
        assert body.count(fix) == 1 and body.index(fix) < body.index("k_pe = k_pe[:, :kv_seq_len]"), fn
    assert attention.count("kv_seq_len = int(cache_position[-1]) + 1") == 2  # not in forward_chunck / forward_xpu

    experts = (tree / EXPERTS).read_text()
    load = _method(experts, "load", cls="KExpertsCPU")
    # v0.4.1+ add an Ascend NPU branch (`if use_torch_npu:`, nested lists `[[...]]`): not CUDA, left as is
    outputs = [line for line in load.splitlines() if "KExpertsCPU.output_cpu = " in line
               and "KExpertsCPU.output_cpu = [[" not in line]
    assert outputs and not [line for line in outputs if "torch.bfloat16" in line], outputs
    assert "{torch.float32: 0, torch.float16: 1}.get(" in load
    assert "30, # TODO" not in load and "hidden_type = 30 # bf16" not in load
    forward = _method(experts, "forward", cls="KExpertsCPU")
    hook = ("on_gpu = ktlegacy_runtime.experts_prefill_on_gpu(self, input_tensor, expert_ids, weights, bsz_tensor)")
    assert forward.count(hook) == 1 and forward.index(hook) < forward.index("bsz_tensor = bsz_tensor.contiguous().cpu()")
    if tag != "v0.2.4post1":  # v0.3.x and later: AMX backends
        guard = load.index('if self.backend != "llamafile" and model_dtype != torch.bfloat16:')
        assert guard < load.index('if self.backend == "llamafile":') < load.index('elif self.backend == "AMXBF16":')
    compile(experts, EXPERTS, "exec")
    compile(attention, ATTENTION, "exec")
    _assert_cpu_linear_gets_the_model_dtype(tree)

    state = _files(tree)
    second = _run_patch(tree, tag)
    assert second.returncode == 0, second.stderr
    assert "sdpa-kv-reuse: already applied" in second.stdout and "cpu-experts-dtype: already applied" in second.stdout
    assert "prefill-kv-length: already applied" in second.stdout and "gpu-expert-prefill: already applied" in second.stdout
    assert "changed 0 files" in second.stdout
    assert _files(tree) == state


@pytest.mark.parametrize("rel, old, new, overlay", [
    # a prefill that keys on the new tokens only, as 0.2.1.post1 did: not the tags' fixed code
    (ATTENTION, "            k_pe = k_pe[:, :kv_seq_len]\n", "            k_pe = k_pe[:, :q_len]\n", "sdpa-kv-reuse"),
    (EXPERTS, "dtype=torch.bfloat16) for i in range(len(cuda_graphs))]",
     "dtype=torch.float16) for i in range(len(cuda_graphs))]", "cpu-experts-dtype"),
    # the prefills no longer start their key count from q_len
    (ATTENTION, "        kv_seq_len = q_len\n        if past_key_value is not None:\n",
     "        kv_seq_len = int(q_len)\n        if past_key_value is not None:\n", "prefill-kv-length"),
    (EXPERTS, "            input_tensor = input_tensor.contiguous().cpu()\n",
     "            input_tensor = input_tensor.cpu()\n", "gpu-expert-prefill"),
])
def test_tag_drift_is_refused_and_the_tree_untouched(tag_tree, rel, old, new, overlay):
    tag, tree = tag_tree
    path = tree / rel
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    state = _files(tree)
    proc = _run_patch(tree, tag)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: overlay {overlay}: {rel}: expected "), proc.stderr
    assert _files(tree) == state
