"""cache-device-key (overlay 79): the KV cache of v0.4.1 / v0.7.0 is built from the device map
local_chat hands it.

Upstream from v0.4.1 keys ``gguf_loader.tensor_device_map`` by module name off NPU
(``model.layers.0.self_attn``) while ``StaticCache`` looks layers up as ``blk.0.self_attn``: every
DeepSeek cache construction on CUDA raised ``KeyError: 'blk.0.self_attn'`` (found by the v0.7.0
GPU proof). On the tag trees (``KTLEGACY_TAG_TREES=DIR`` with ``DIR/v0.4.1`` and ``DIR/v0.7.0``
exported, see tests/test_overlay_gpu_fixes_tags.py; CI cannot reach GitHub and skips them) the test
runs upstream's own ``gen_optimize_config`` on the V2-Lite rule file and upstream's ``StaticCache``,
in a venv with the transformers those refs need (bench/gpu_wheels-v0.7.0.txt): pristine, the
KeyError; patched, every layer's cache on the device its rule gave it. Everywhere: the overlay's
drift checks, on the sdist (which keys by GGUF name and is left alone).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cached_venv import TORCH_CPU, cached_venv
from conftest import exported_tag_tree
from ktlegacy.core.overlay import Drift, PatchContext, StagedTree, load_overlays
from ktlegacy.core.refs import REFS
from ktlegacy.core.arch import get_arch
from ktlegacy.core.facts import TRITON_VERSION

REPO = Path(__file__).resolve().parent.parent
TAGS = ("v0.4.1", "v0.7.0")
CACHE = "ktransformers/models/custom_cache.py"
RULES = "ktransformers/optimize/optimize_rules/DeepSeek-V2-Lite-Chat.yaml"

# Builds the device map the way optimize_and_load_gguf does (gen_optimize_config, then inject's
# tensor_device_map[key] = kwargs), gives the first half of the layers "cpu" and the rest "meta"
# (no GPU here; two devices show the per-layer placement), then constructs the cache as local_chat does.
PROBE = r"""
import json, sys, torch, yaml
from ktransformers.models.configuration_deepseek import DeepseekV2Config
from ktransformers.models.modeling_deepseek import DeepseekV2ForCausalLM
from ktransformers.optimize.optimize import gen_optimize_config
from ktransformers.models.custom_cache import StaticCache
config = DeepseekV2Config(vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=256,
                          num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
                          n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, kv_lora_rank=64,
                          q_lora_rank=None, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32,
                          max_position_embeddings=256, architectures=["DeepseekV2ForCausalLM"])
with torch.device("meta"):
    model = DeepseekV2ForCausalLM(config)
rules = yaml.safe_load(open(sys.argv[1]))
out = {}
gen_optimize_config(model, out, rules, default_device="cuda:0")
device_map = {}
for meta in out.values():
    kwargs = dict(meta["kwargs"])
    if "generate_device" in kwargs:
        layer = [int(p) for p in meta["key"].split(".") if p.isdigit()]
        kwargs["generate_device"] = "cpu" if (layer and layer[0] < 2) or not layer else "meta"
    device_map[meta["key"]] = kwargs
try:
    cache = StaticCache(config=config, max_batch_size=1, max_cache_len=128, device=device_map, dtype=torch.float16)
except KeyError as exc:
    print(json.dumps({"key_error": str(exc.args[0])}))
    sys.exit(0)
print(json.dumps({"kv": [str(t.device) for t in cache.key_cache],
                  "page_tables": [str(t.device) for t in cache.page_table_list],
                  "attn_keys": sorted(k for k in device_map if k.endswith("self_attn"))[:2]}))
"""


def _overlay(name):
    return next(o for o, _ in load_overlays() if o.name == name)


def _ref_requirements() -> list[str]:
    """transformers & co. as the GPU proof installs them for these refs (one list, bench/)."""
    lines = (REPO / "bench" / "gpu_wheels-v0.7.0.txt").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


@pytest.fixture(scope="module")
def ref_python() -> Path:
    # triton: custom_loader imports the fp8 Triton kernels' module (import only, no GPU needed)
    return cached_venv("v0.7.0-engine", [TORCH_CPU, f"triton=={TRITON_VERSION}", *_ref_requirements(), "pyyaml",
                                         "numpy", "sentencepiece"])


@pytest.fixture(params=TAGS)
def tag_tree(request, tmp_path) -> tuple[str, Path]:
    tag = request.param
    _, dest = exported_tag_tree(tag, tmp_path)
    return tag, dest


def _probe(python: Path, tree: Path, tmp_path: Path) -> dict:
    # The compiled extensions are imported at module level by custom_loader/operators but never
    # called by the code under test: empty stand-ins let the pure-Python modules import on CPU.
    stubs = tmp_path / "ext-stubs"
    stubs.mkdir(exist_ok=True)
    for mod in ("KTransformersOps", "cpuinfer_ext", "vLLMMarlin"):
        (stubs / f"{mod}.py").write_text("# import-only stand-in for the compiled extension\n")
    env = dict(os.environ, PYTHONPATH=f"{tree}{os.pathsep}{stubs}", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([str(python), "-c", PROBE, str(tree / RULES)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_tag_cache_is_built_from_the_device_map(tag_tree, ref_python, tmp_path):
    tag, tree = tag_tree
    pristine = tmp_path / "pristine"
    shutil.copytree(tree, pristine, symlinks=True)
    if tag == "v0.7.0":  # its cache imports balance_serve's sched_ext bare: overlay 78 alone first
        staged = StagedTree(pristine)
        _overlay("optional-sched-ext").apply(staged, PatchContext(get_arch("sm75"), REFS[tag]))
        staged.commit()
    before = _probe(ref_python, pristine, tmp_path)
    assert before == {"key_error": "blk.0.self_attn"}, before  # upstream's bug, as the GPU proof met it

    proc = subprocess.run([sys.executable, "-m", "ktlegacy", "patch", "--src", str(tree), "--arch", "sm75",
                           "--ref", tag], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^cache-device-key: changed ktransformers/models/custom_cache\.py: ", proc.stdout, re.M)
    after = _probe(ref_python, tree, tmp_path)
    assert after["attn_keys"][0].startswith("model.layers."), after  # the map is keyed by module name
    assert after["kv"] == ["cpu", "cpu", "meta", "meta"], after      # each layer where its rule put it
    assert after["page_tables"] == after["kv"], after

    again = subprocess.run([sys.executable, "-m", "ktlegacy", "patch", "--src", str(tree), "--arch", "sm75",
                            "--ref", tag], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "changed 0 files" in again.stdout, again.stdout + again.stderr


def test_cache_device_key_refuses_drift(tmp_path):
    """Without upstream's module-name keying (or with a cache that no longer looks up blk.N) the
    overlay refuses, and a tree that has the edit is left as it is."""
    overlay = _overlay("cache-device-key")
    ctx = PatchContext(get_arch("sm75"), REFS["v0.7.0"])
    opt = tmp_path / "ktransformers" / "optimize" / "optimize.py"
    cache = tmp_path / CACHE
    opt.parent.mkdir(parents=True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    keyed = '    x = {"key": module_name if not use_torch_npu else translated_name}\n'
    lookup = '        target_device = device[f"blk.{idx}.self_attn"]["generate_device"]\n'

    opt.write_text(keyed * 2)
    cache.write_text(lookup * 2)
    tree = StagedTree(tmp_path)
    overlay.apply(tree, ctx)
    tree.commit()
    text = cache.read_text()
    assert text.count('device.get(f"model.layers.{idx}.self_attn") or device[f"blk.{idx}.self_attn"]') == 2
    tree = StagedTree(tmp_path)
    overlay.apply(tree, ctx)  # second run: nothing to change
    assert not tree.changes

    opt.write_text('    x = {"key": translated_name}\n' * 2)  # keyed by GGUF name: the lookup is right as it is
    with pytest.raises(Drift, match="module name"):
        overlay.apply(StagedTree(tmp_path), ctx)

    opt.write_text(keyed * 2)
    cache.write_text(lookup)  # one lookup where two are expected
    with pytest.raises(Drift, match="occurrence"):
        overlay.apply(StagedTree(tmp_path), ctx)
    assert cache.read_text() == lookup


def test_sdist_keys_by_gguf_name_and_is_left_alone(sdist_tree):
    """0.2.1.post1 keys the map by GGUF name (what its cache looks up): not applicable, by content."""
    optimize = (sdist_tree / "ktransformers/optimize/optimize.py").read_text()
    assert '"key": translated_name' in optimize and "module_name if not use_torch_npu" not in optimize
    assert "0.2.1.post1" in _overlay("cache-device-key").not_applicable
