"""The synthetic DeepSeek-V2 checkpoint (ktlegacy/testing/testmodel.py) against upstream's own code.

The GPU proof (bench/gpu_proof.py) only means something if ktransformers loads this file the
way it loads a real DeepSeek GGUF and the reference model is upstream's modeling code. So the
checks here run the real upstream 0.2.1.post1 sdist's code on CPU, in a subprocess (its
``ktransformers`` package must not leak into this test session):

- every parameter of upstream's ``DeepseekV2ForCausalLM`` maps through upstream's
  ``translate_name_to_gguf`` to a tensor in our GGUF with the shape upstream's ``GGUFLoader``
  reads back, and the loader's bytes equal what the ``gguf`` package reads (offsets, alignment,
  F16/F32 handling);
- the routed experts are where ``KExpertsCPU`` looks (``blk.N.ffn_{gate,up,down}_exps.weight``)
  with the type the CPU backend gets (F16);
- the reference model takes the state dict with ``strict=True`` and runs a forward pass.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ktlegacy.core.errors import KtlegacyError
from ktlegacy.testing.testmodel import GGUF_NAME, PRESETS, TestModelSpec, load_spec, make_test_model, preset

REPO = Path(__file__).resolve().parent.parent
SMALL = TestModelSpec(num_hidden_layers=3)  # one dense + two MoE layers: same shapes per layer
SMALL_V3 = preset("v3", num_hidden_layers=5)  # three dense + two MoE layers

UPSTREAM_CHECK = r'''
import json, sys, types, re, ast
from pathlib import Path
import torch
model_dir, sdist = Path(sys.argv[1]), Path(sys.argv[2])
# custom_gguf imports the CUDA extension at the top; only its *_gpu dequantizers use it.
sys.modules["KTransformersOps"] = types.ModuleType("KTransformersOps")
sys.path.insert(0, str(sdist))
from ktransformers.util.custom_gguf import GGUFLoader, translate_name_to_gguf
from ktlegacy.testing.testmodel import reference_state_dict
arch = json.loads((model_dir / "config.json").read_text())["architectures"][0]
if arch == "DeepseekV3ForCausalLM":
    from ktransformers.models.configuration_deepseek_v3 import DeepseekV3Config as Config
    from ktransformers.models.modeling_deepseek_v3 import DeepseekV3ForCausalLM as Model
else:
    from ktransformers.models.configuration_deepseek import DeepseekV2Config as Config
    from ktransformers.models.modeling_deepseek import DeepseekV2ForCausalLM as Model
report = {}
cfg = Config.from_pretrained(str(model_dir))
cfg._attn_implementation = "eager"
torch.manual_seed(0)
model = Model(cfg).eval()
loader = GGUFLoader(str(model_dir))
report["architecture"] = loader.gguf_file_meta["general.architecture"]
ref = reference_state_dict(model_dir)
missing, mismatched, checked = [], [], 0
expert_re = re.compile(r"^(model\.layers\.\d+\.mlp)\.experts\.\d+\.")
for name, param in model.state_dict().items():
    m = expert_re.match(name)
    if m:
        continue  # experts are loaded per layer as one stacked tensor (below)
    key = translate_name_to_gguf(name)
    if name.endswith("mlp.gate.e_score_correction_bias"):
        key = key.replace("ffn_gate_inp.e_score_correction_bias", "exp_probs_b.bias")  # as KMoEGate loads it
    if key not in loader.tensor_info:
        missing.append((name, key)); continue
    got = loader.load_gguf_tensor(key, device="cpu").float()
    if tuple(got.shape) != tuple(param.shape):
        mismatched.append((name, list(got.shape), list(param.shape))); continue
    if not torch.equal(got, ref[name]):
        mismatched.append((name, "values differ from the gguf package's read")); continue
    checked += 1
experts = {}
for layer in range(cfg.first_k_dense_replace, cfg.num_hidden_layers):
    key = translate_name_to_gguf(f"model.layers.{layer}.mlp.experts")
    for part, hf in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
        gname = f"{key}.ffn_{part}_exps.weight"
        if gname not in loader.tensor_info:
            missing.append((f"layer {layer} {part} experts", gname)); continue
        experts[gname] = int(loader.tensor_info[gname]["ggml_type"])
        stacked = loader.load_gguf_tensor(gname, device="cpu").float()
        for e in range(cfg.n_routed_experts):
            if not torch.equal(stacked[e], ref[f"model.layers.{layer}.mlp.experts.{e}.{hf}.weight"]):
                mismatched.append((gname, e))
        raw = loader.get_mmap_tensor(gname)  # what KExpertsCPU hands to the C++ backend
        per_expert = raw.nbytes // cfg.n_routed_experts
        if per_expert != cfg.moe_intermediate_size * cfg.hidden_size * 2:
            mismatched.append((gname, "raw bytes per expert", per_expert))
report.update(missing=missing, mismatched=mismatched, checked=checked, expert_types=experts)
res = model.load_state_dict(ref, strict=True)
def last_logits(tokens):
    ids = torch.tensor([tokens])
    with torch.no_grad():
        out = model(inputs_embeds=model.model.embed_tokens(ids), attention_mask=torch.ones_like(ids), use_cache=False)
    return out.logits
a, b = last_logits([0, 5, 17, 99, 200, 311]), last_logits([0, 5, 17, 98, 200, 311])
report["logits_shape"] = list(a.shape)  # upstream's head returns the last position only
report["logits_finite"] = bool(torch.isfinite(a).all() and torch.isfinite(b).all())
report["logits_std"] = float(a.std())
# one earlier token changed: attention must carry it to the last position's logits
report["context_effect"] = float((a - b).abs().max())
if arch == "DeepseekV3ForCausalLM":
    # the router as built: every token's chosen experts win by a wide margin at group and expert
    # level (the gate's own forward, on the embeddings through the first MoE layer's norm)
    layer = model.model.layers[cfg.first_k_dense_replace]
    x = layer.post_attention_layernorm(model.model.embed_tokens.weight.unsqueeze(0))
    gate = layer.mlp.gate
    scores = torch.sigmoid(x[0].float() @ gate.weight.float().T) + gate.e_score_correction_bias
    idx, w = gate(x)
    chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, idx, True)
    report["router_min_gap"] = float(scores[chosen].view(len(scores), -1).min(1).values.min()
                                     - scores[~chosen].view(len(scores), -1).max(1).values.max())
    groups = idx // (cfg.n_routed_experts // cfg.n_group)
    report["router_groups_used"] = int(max(len(set(g.tolist())) for g in groups))
    report["router_weight_sum"] = float(w.sum(-1).mean())
print("REPORT " + json.dumps(report))
'''


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_test_model(tmp_path_factory.mktemp("h6-model") / "m", SMALL)


def test_files_and_config_agree(model_dir):
    record = load_spec(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["architectures"] == ["DeepseekV2ForCausalLM"]
    assert (cfg["kv_lora_rank"], cfg["qk_rope_head_dim"], cfg["qk_nope_head_dim"], cfg["v_head_dim"]) == (512, 64, 128, 128)
    assert cfg["q_lora_rank"] is None and cfg["first_k_dense_replace"] == 1
    assert cfg["num_hidden_layers"] == 3 and cfg["n_routed_experts"] > cfg["num_experts_per_tok"] >= 1
    assert cfg["bos_token_id"] == record["bos_token_id"] and cfg["eos_token_id"] == record["eos_token_id"]
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "configuration_deepseek.py", GGUF_NAME):
        assert (model_dir / name).is_file(), name
    assert not model_dir.with_name(model_dir.name + ".partial").exists()


def test_gguf_header_and_tensors(model_dir):
    import gguf
    reader = gguf.GGUFReader(str(model_dir / GGUF_NAME))
    fields = {name: f for name, f in reader.fields.items()}

    def scalar(key):
        f = fields[key]
        return f.parts[f.data[0]].tolist()[0]

    assert bytes(fields["general.architecture"].parts[-1]).decode() == "deepseek2"
    assert scalar("deepseek2.block_count") == 3
    assert scalar("deepseek2.attention.kv_lora_rank") == 512
    assert scalar("deepseek2.expert_count") == SMALL.n_routed_experts
    assert scalar("deepseek2.leading_dense_block_count") == 1
    listed = {t["name"]: t for t in load_spec(model_dir)["tensors"]}
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert set(types) == set(listed)
    assert types["blk.1.ffn_gate_exps.weight"] == "F16" and types["blk.1.ffn_gate_inp.weight"] == "F32"
    assert types["blk.0.attn_kv_a_norm.weight"] == "F32" and types["token_embd.weight"] == "F16"
    # the GPU-side matrices in a Q4_K_M file's mix (testmodel.LINEAR_QUANTS)
    assert types["output.weight"] == "Q6_K" and types["blk.0.attn_kv_b.weight"] == "Q6_K"
    assert types["blk.0.attn_q.weight"] == types["blk.1.ffn_gate_shexp.weight"] == "Q4_K"
    assert types["blk.0.attn_output.weight"] == types["blk.0.ffn_down.weight"] == "Q8_0"
    assert {listed[n]["type"] for n in listed} == {"F16", "F32", "Q4_K", "Q6_K", "Q8_0"}
    # numpy layout (reversed GGUF dims), as both loaders see it
    by_name = {t.name: t for t in reader.tensors}
    assert list(by_name["blk.1.ffn_down_exps.weight"].data.shape) == [SMALL.n_routed_experts, SMALL.hidden_size,
                                                                     SMALL.moe_intermediate_size]
    assert [int(n) for n in reversed(by_name["blk.0.attn_kv_b.weight"].shape)] == [SMALL.num_attention_heads * 256, 512]
    assert "blk.0.ffn_gate_exps.weight" not in types and "blk.0.ffn_gate.weight" in types  # dense first layer


def test_tokenizer_and_chat_template(model_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    assert len(tok) == SMALL.vocab_size
    text = "Please write a quick sort function in python."
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == f"User: {text}\n\nAssistant:"
    assert max(ids) < SMALL.vocab_size


def test_same_seed_same_bytes_other_seed_differs(model_dir, tmp_path):
    def digest(d):
        return hashlib.sha256((d / GGUF_NAME).read_bytes()).hexdigest()
    again = make_test_model(tmp_path / "again", SMALL)
    other = make_test_model(tmp_path / "other", TestModelSpec(num_hidden_layers=3, seed=1))
    assert digest(again) == digest(model_dir)
    assert (again / "tokenizer.json").read_bytes() == (model_dir / "tokenizer.json").read_bytes()
    assert digest(other) != digest(model_dir)


def test_upstream_loader_and_reference_model_accept_it(model_dir, sdist_tree):
    report = _upstream_report(model_dir, sdist_tree)
    assert report["architecture"] == "deepseek2"
    assert report["missing"] == [] and report["mismatched"] == []
    # embed, head, final norm + per layer: 2 norms, 5 attention tensors, dense MLP 3 / MoE router + 3 shared
    assert report["checked"] == 3 + 3 * 7 + 3 + 2 * 4
    assert set(report["expert_types"].values()) == {1}  # GGML F16 for KExpertsCPU's llamafile sgemm
    assert len(report["expert_types"]) == 2 * 3
    assert report["logits_shape"] == [1, 1, SMALL.vocab_size] and report["logits_finite"]
    assert report["logits_std"] > 1.0  # the head is not degenerate
    assert report["context_effect"] > 0.1


def _upstream_report(model_dir: Path, sdist_tree: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", UPSTREAM_CHECK, str(model_dir), str(sdist_tree)],
                          capture_output=True, text=True, env=env, timeout=600)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT ")]
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    return json.loads(line[0][len("REPORT "):])


@pytest.fixture(scope="module")
def v3_dir(tmp_path_factory) -> Path:
    return make_test_model(tmp_path_factory.mktemp("v3-model") / "m", SMALL_V3)


def test_v3_preset_config_and_tensors(v3_dir):
    import gguf
    cfg = json.loads((v3_dir / "config.json").read_text())
    assert cfg["architectures"] == ["DeepseekV3ForCausalLM"] and cfg["model_type"] == "deepseek_v3"
    assert (cfg["topk_method"], cfg["scoring_func"], cfg["norm_topk_prob"]) == ("noaux_tc", "sigmoid", True)
    assert cfg["n_routed_experts"] % cfg["n_group"] == 0 and cfg["topk_group"] < cfg["n_group"]
    assert cfg["q_lora_rank"] == SMALL_V3.q_lora_rank and cfg["first_k_dense_replace"] == 3
    assert "DeepseekV3Config" in (v3_dir / "configuration_deepseek.py").read_text()
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(v3_dir / GGUF_NAME)).tensors}
    assert types["blk.3.exp_probs_b.bias"] == "F32" and "blk.2.exp_probs_b.bias" not in types
    assert "blk.0.attn_q_a.weight" in types and "blk.0.attn_q.weight" not in types
    # the default layer count reaches the last GPU of the 4-GPU V3 rule file (layers 45-60)
    assert PRESETS["v3"].num_hidden_layers >= 46 and PRESETS["v2"] == TestModelSpec()


def test_v3_routing_cannot_drift_with_depth(v3_dir):
    """Every branch writes outside span(embeddings) and the router reads only inside it, with
    unit FFN norms: a deep residual stream cannot move a token's experts (see confine_branches).
    The branch outputs are quantized (Q8_0): what leaks into the span is their rounding, checked
    on the dequantized values the engine and the reference use."""
    import gguf
    import numpy as np
    from gguf.quants import dequantize
    t = {x.name: dequantize(x.data, x.tensor_type).astype(np.float64)
         for x in gguf.GGUFReader(str(v3_dir / GGUF_NAME)).tensors}
    q = np.linalg.qr(t["token_embd.weight"].T)[0]                     # hidden x vocab
    outputs = [n for n in t if n.endswith(("attn_output.weight", "ffn_down.weight", "ffn_down_shexp.weight"))]
    assert len(outputs) == 2 * SMALL_V3.num_hidden_layers
    for name in outputs:  # GGUF numpy layout: (out, in) here
        assert np.abs(q.T @ t[name]).max() < 1e-2 * np.abs(t[name]).max(), name
    for layer in range(3, SMALL_V3.num_hidden_layers):
        down = t[f"blk.{layer}.ffn_down_exps.weight"]                 # experts x out x in
        assert np.abs(np.einsum("dv,edk->evk", q, down)).max() < 1e-2 * np.abs(down).max()
        gate = t[f"blk.{layer}.ffn_gate_inp.weight"]                  # experts x hidden
        assert np.abs(gate - (gate @ q) @ q.T).max() < 1e-3 * np.abs(gate).max()
        assert np.all(t[f"blk.{layer}.ffn_norm.weight"] == 1.0)


def test_v3_upstream_loader_and_reference_model_accept_it(v3_dir, sdist_tree):
    report = _upstream_report(v3_dir, sdist_tree)
    assert report["missing"] == [] and report["mismatched"] == []
    # embed, head, final norm + per layer: 2 norms, 7 attention tensors (q LoRA) + dense MLP 3 /
    # MoE router weight, correction bias, 3 shared-expert tensors
    assert report["checked"] == 3 + 5 * 9 + 3 * 3 + 2 * 5
    assert set(report["expert_types"].values()) == {1} and len(report["expert_types"]) == 2 * 3
    assert report["logits_shape"][-1] == SMALL_V3.vocab_size and report["logits_finite"]
    assert report["logits_std"] > 1.0 and report["context_effect"] > 0.1
    # upstream's noaux_tc gate on the built router: chosen experts win by far more than fp16
    # error or the correction bias, in exactly topk_group groups, weights sum to the scaling
    assert report["router_min_gap"] > 0.5
    assert report["router_groups_used"] == SMALL_V3.topk_group
    assert report["router_weight_sum"] == pytest.approx(SMALL_V3.routed_scaling_factor, rel=1e-4)


def test_refuses_non_empty_dest_and_too_few_layers(tmp_path):
    dest = tmp_path / "busy"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(KtlegacyError, match="not empty"):
        make_test_model(dest, SMALL)
    assert (dest / "keep.txt").read_text() == "mine"
    with pytest.raises(KtlegacyError, match="MoE layer"):
        make_test_model(tmp_path / "one", TestModelSpec(num_hidden_layers=1))
    proc = subprocess.run([sys.executable, "-m", "ktlegacy", "make-test-model", "--dest", str(tmp_path / "x"),
                           "--layers", "1"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == ["error: --layers must be at least 2 for preset v2 "
                                                "(1 dense layer, then MoE layers)"]
    proc = subprocess.run([sys.executable, "-m", "ktlegacy", "make-test-model", "--preset", "v3", "--dest",
                           str(tmp_path / "y"), "--layers", "3"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode != 0 and not (tmp_path / "y").exists()
    assert proc.stderr.strip().splitlines() == ["error: --layers must be at least 4 for preset v3 "
                                                "(3 dense layers, then MoE layers)"]
