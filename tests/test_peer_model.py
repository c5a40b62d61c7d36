"""The DeepSeek-V2-Lite-shaped peer model (ktlegacy/testing/peer_model.py) at a small size.

Two layers (one dense, one MoE with all 64 routed experts of 1408) and a 1024-token vocabulary:
every per-layer shape and quant type is the full model's. Checked with real readers:

- the ``gguf`` package: llama.cpp's ``deepseek2`` metadata, the tokenizer arrays, the quant mix,
  the shapes, and the dequantized values (unit-RMS rows for unit-RMS inputs, zero mean);
- upstream ktransformers 0.2.1.post1's own ``GGUFLoader`` (in a subprocess, from the sdist):
  every parameter of its ``DeepseekV2ForCausalLM`` is found under its GGUF name, its CPU
  dequantizers give the same numbers as the ``gguf`` package's for Q8_0 / Q4_K / Q5_0, and the
  model runs a forward pass with these weights with sane activations layer by layer;
- ``transformers``' tokenizer (the HF side ktransformers reads) with the chat template.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ktlegacy.core.errors import KtlegacyError
from ktlegacy.testing.peer_model import (GGUF_NAME, LiteSpec, QK, Q6K_SCALE, _q4k_scales, decode_cpu_bytes, load_record,
                                 make_lite_model, nbytes, quant_blocks, tensor_plan)

REPO = Path(__file__).resolve().parent.parent
LAYERS, VOCAB = 2, 1024


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_lite_model(tmp_path_factory.mktemp("peer-model") / "m", layers=LAYERS, vocab=VOCAB)


@pytest.fixture(scope="module")
def reader(model_dir):
    import gguf
    return gguf.GGUFReader(str(model_dir / GGUF_NAME))


def _field(reader, key):
    f = reader.fields[key]
    if f.types and f.types[0].name == "STRING":
        return bytes(f.parts[-1]).decode()
    return f.parts[f.data[0]].tolist()[0]


def test_llama_cpp_metadata_and_tokenizer(reader):
    assert _field(reader, "general.architecture") == "deepseek2"
    expect = {"deepseek2.block_count": LAYERS, "deepseek2.embedding_length": 2048,
              "deepseek2.feed_forward_length": 10944, "deepseek2.attention.head_count": 16,
              "deepseek2.attention.kv_lora_rank": 512, "deepseek2.attention.key_length": 192,
              "deepseek2.attention.value_length": 128, "deepseek2.rope.dimension_count": 64,
              "deepseek2.expert_count": 64, "deepseek2.expert_used_count": 6,
              "deepseek2.expert_shared_count": 2, "deepseek2.expert_feed_forward_length": 1408,
              "deepseek2.leading_dense_block_count": 1, "deepseek2.vocab_size": VOCAB}
    assert {k: _field(reader, k) for k in expect} == expect
    # legacy (unsplit attn_kv_b) form: no MLA length keys (what 0.2.1.post1 reads); q LoRA rank 0
    # (llama.cpp needs it for layer counts other than V2-Lite's 27)
    assert not [k for k in reader.fields if k.endswith("_mla")]
    assert _field(reader, "deepseek2.attention.q_lora_rank") == 0
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    assert _field(reader, "tokenizer.ggml.pre") == "deepseek-llm"
    tokens = reader.fields["tokenizer.ggml.tokens"]
    types = reader.fields["tokenizer.ggml.token_type"]
    assert len(tokens.data) == VOCAB and len(types.data) == VOCAB  # one token per embedding row
    type_list = [types.parts[i].tolist()[0] for i in types.data]
    assert type_list[:2] == [3, 3] and set(type_list[2:512]) == {1} and set(type_list[512:]) == {5}
    assert len(reader.fields["tokenizer.ggml.merges"].data) > 100
    assert _field(reader, "tokenizer.ggml.bos_token_id") == 0 and _field(reader, "tokenizer.ggml.eos_token_id") == 1


def test_quant_mix_and_shapes(reader, model_dir):
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    shapes = {t.name: [int(s) for s in t.shape] for t in reader.tensors}  # GGUF order: input dim first
    plan = tensor_plan(LiteSpec(num_hidden_layers=LAYERS, vocab_size=VOCAB))
    assert list(types) == [n for n, *_ in plan]
    assert types["blk.1.ffn_gate_exps.weight"] == types["blk.1.ffn_up_exps.weight"] == "Q4_K"
    assert types["blk.1.ffn_down_exps.weight"] == "Q5_0"  # 1408 is no multiple of Q4_K's 256
    assert shapes["blk.1.ffn_gate_exps.weight"] == [2048, 1408, 64]
    assert shapes["blk.1.ffn_down_exps.weight"] == [1408, 2048, 64]
    assert shapes["blk.0.ffn_gate.weight"] == [2048, 10944] and "blk.0.ffn_gate_exps.weight" not in types
    assert shapes["blk.1.attn_q.weight"] == [2048, 16 * 192]
    assert shapes["blk.1.attn_kv_a_mqa.weight"] == [2048, 576]
    assert shapes["blk.1.attn_kv_b.weight"] == [512, 16 * 256]
    assert shapes["blk.1.ffn_gate_shexp.weight"] == [2048, 2816]
    assert shapes["token_embd.weight"] == [2048, VOCAB] and shapes["output.weight"] == [2048, VOCAB]
    f32 = {n for n, t in types.items() if t == "F32"}
    assert f32 == {n for n in types if n.endswith("norm.weight") or n.endswith("ffn_gate_inp.weight")}
    assert {t for n, t in types.items() if n not in f32 and "_exps" not in n} == {"Q8_0"}
    rec = load_record(model_dir)
    assert rec["file_bytes"] == (model_dir / GGUF_NAME).stat().st_size
    assert sum(m["bytes"] for m in rec["quant_mix"].values()) == sum(int(t.n_bytes) for t in reader.tensors)


def test_values_are_sane(reader):
    """Dequantized with the gguf package: each matrix gives unit-RMS outputs for unit-RMS inputs
    (row RMS x sqrt(fan-in) ~ the planned scale), zero mean, nothing non-finite."""
    from gguf.quants import dequantize
    plan = {n: (s, q, rms) for n, s, q, rms in tensor_plan(LiteSpec(num_hidden_layers=LAYERS, vocab_size=VOCAB))}
    for t in reader.tensors:
        shape, qtype, rms = plan[t.name]
        if qtype == "F32":
            continue
        w = dequantize(t.data, t.tensor_type).astype(np.float64)
        assert w.shape == shape, t.name
        assert np.isfinite(w).all(), t.name
        got = np.sqrt((w ** 2).mean())
        assert abs(got / rms - 1) < 0.05, (t.name, got, rms)
        assert abs(w.mean()) < 0.02 * rms, (t.name, w.mean(), rms)


def test_block_layouts_match_ggml():
    """One block per type, decoded by hand from ggml's layout (independent of both writers)."""
    import gguf
    from gguf.quants import dequantize
    rng = np.random.default_rng(3)
    for qtype, (per_block, block_bytes) in QK.items():
        if qtype in ("F32", "F16"):
            continue
        raw = quant_blocks(rng, (1, per_block), qtype, rms=0.5)
        assert raw.shape == (1, block_bytes)
        b = raw[0].tobytes()
        d = float(np.frombuffer(b[:2], np.float16)[0])
        if qtype == "Q8_0":
            expect = d * np.frombuffer(b[2:], np.int8).astype(np.float64)
        elif qtype == "Q5_0":
            qh = int.from_bytes(b[2:6], "little")
            qs = np.frombuffer(b[6:], np.uint8)
            lo = np.concatenate([qs & 0xF, qs >> 4]).astype(np.int64)
            hi = np.array([(qh >> j) & 1 for j in range(32)])
            expect = d * ((lo | hi << 4) - 16)
        elif qtype == "Q6_K":  # every int8 scale is Q6K_SCALE; d is the last field
            d = float(np.frombuffer(b[208:210], np.float16)[0])
            assert set(np.frombuffer(b[192:208], np.int8).tolist()) == {Q6K_SCALE}
            ql, qh = np.frombuffer(b[:128], np.uint8), np.frombuffer(b[128:192], np.uint8)
            q = np.empty(256, dtype=np.int64)
            for half in range(2):
                for quarter in range(4):
                    for i in range(32):
                        low = ql[64 * half + 32 * (quarter & 1) + i]
                        low = low & 0xF if quarter < 2 else low >> 4
                        q[128 * half + 32 * quarter + i] = low | ((qh[32 * half + i] >> (2 * quarter)) & 3) << 4
            expect = d * Q6K_SCALE * (q - 32)
        else:  # Q4_K: every (scale, min) pair is Q4K_SCALE, dmin = 7.5 d
            dmin = float(np.frombuffer(b[2:4], np.float16)[0])
            assert b[4:16] == _q4k_scales()
            qs = np.frombuffer(b[16:], np.uint8)
            q = np.concatenate([np.concatenate([qs[32 * j:32 * j + 32] & 0xF, qs[32 * j:32 * j + 32] >> 4])
                                for j in range(4)]).astype(np.float64)
            expect = d * 32 * q - dmin * 32
        got = dequantize(raw, getattr(gguf.GGMLQuantizationType, qtype))[0]
        np.testing.assert_allclose(got, expect, rtol=1e-6, atol=1e-7, err_msg=qtype)


def test_decode_bytes_per_token():
    spec = LiteSpec()
    plan = tensor_plan(spec)
    got = decode_cpu_bytes(spec, plan)
    per_expert = 2 * (1408 * 2048 // 256 * 144) + 2048 * 1408 // 32 * 22  # gate+up Q4_K, down Q5_0
    assert got["per_expert"] == per_expert
    assert got["routed_experts"] == 26 * 6 * per_expert
    assert got["embedding_row"] == 2048 // 32 * 34
    assert got["total"] == got["routed_experts"] + got["embedding_row"]
    total = sum(nbytes(s, q) for _, s, q, _ in plan)
    assert 9.0 * 2**30 < total < 10.0 * 2**30  # a real V2-Lite Q4_K_M GGUF is ~9.7 GiB


def test_hf_side(model_dir):
    from transformers import AutoTokenizer
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["architectures"] == ["DeepseekV2ForCausalLM"]
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["moe_intermediate_size"]) == (2048, 10944, 1408)
    assert (cfg["n_routed_experts"], cfg["num_experts_per_tok"], cfg["n_shared_experts"]) == (64, 6, 2)
    assert (cfg["kv_lora_rank"], cfg["qk_rope_head_dim"], cfg["qk_nope_head_dim"], cfg["v_head_dim"]) == (512, 64, 128, 128)
    assert cfg["q_lora_rank"] is None and cfg["num_attention_heads"] == 16 and cfg["vocab_size"] == VOCAB
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    assert len(tok) == VOCAB
    text = "Please write a quick sort function in python."
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    assert ids[0] == tok.bos_token_id == 0
    assert tok.decode(ids, skip_special_tokens=True) == f"User: {text}\n\nAssistant:"


UPSTREAM_CHECK = r'''
import json, sys, types, re
from pathlib import Path
import numpy as np, torch
model_dir, sdist = Path(sys.argv[1]), Path(sys.argv[2])
sys.modules["KTransformersOps"] = types.ModuleType("KTransformersOps")  # only the *_gpu dequantizers use it
sys.path.insert(0, str(sdist))
from ktransformers.util.custom_gguf import GGUFLoader, translate_name_to_gguf
from ktransformers.models.configuration_deepseek import DeepseekV2Config
from ktransformers.models.modeling_deepseek import DeepseekV2ForCausalLM
import gguf
from gguf.quants import dequantize
report = {}
cfg = DeepseekV2Config.from_pretrained(str(model_dir))
cfg._attn_implementation = "eager"
loader = GGUFLoader(str(model_dir))
report["architecture"] = loader.gguf_file_meta["general.architecture"]
ours = {t.name: t for t in gguf.GGUFReader(str(model_dir / "model.gguf")).tensors}
from transformers.modeling_utils import no_init_weights
# on the CPU, not on "meta": the rotary embeddings' non-persistent buffers (inv_freq) are not in the
# state dict, and left on meta they gave NaN hidden states in some runs; no_init_weights skips the
# random init of what load_state_dict replaces anyway
with no_init_weights():
    model = DeepseekV2ForCausalLM(cfg)
state, missing, same_as_gguf = {}, [], {}
expert_re = re.compile(r"^(model\.layers\.(\d+)\.mlp)\.experts\.(\d+)\.(\w+)_proj\.weight$")
stacked = {}
for name, param in model.state_dict().items():
    m = expert_re.match(name)
    if m:
        key = f"blk.{m.group(2)}.ffn_{m.group(4)}_exps.weight"
        if key not in loader.tensor_info:
            missing.append((name, key)); continue
        if key not in stacked:
            stacked[key] = loader.load_gguf_tensor(key, device="cpu").float()
        state[name] = stacked[key][int(m.group(3))]
        continue
    key = translate_name_to_gguf(name)
    if key not in loader.tensor_info:
        missing.append((name, key)); continue
    state[name] = loader.load_gguf_tensor(key, device="cpu").float().reshape(param.shape)
for key, t in ours.items():  # upstream's CPU dequantizers vs the gguf package's, one tensor per type
    qt = t.tensor_type.name
    if qt in same_as_gguf:
        continue
    up = (stacked[key] if key in stacked else loader.load_gguf_tensor(key, device="cpu").float()).numpy()
    ref = dequantize(t.data, t.tensor_type)
    same_as_gguf[qt] = float(np.abs(up.reshape(ref.shape) - ref).max())
report["missing"] = missing
report["upstream_vs_gguf_max_diff"] = same_as_gguf
report["expert_types"] = {k: int(loader.tensor_info[k]["ggml_type"]) for k in stacked}
model.load_state_dict(state, strict=True, assign=True)
model.eval()
rms = []
hooks = [layer.register_forward_hook(lambda mod, inp, out: rms.append(float(out[0].pow(2).mean().sqrt())))
         for layer in model.model.layers]
ids = torch.tensor([[0, 5, 17, 99, 200, 311, 700, 1000]])
with torch.no_grad():
    out = model(inputs_embeds=model.model.embed_tokens(ids), attention_mask=torch.ones_like(ids), use_cache=False)
report["hidden_rms_per_layer"] = rms
report["logits_finite"] = bool(torch.isfinite(out.logits).all())
report["logits_std"] = float(out.logits.std())
print("REPORT " + json.dumps(report))
'''


def test_upstream_loader_reads_it_and_runs_it(model_dir, sdist_tree):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", UPSTREAM_CHECK, str(model_dir), str(sdist_tree)],
                          capture_output=True, text=True, env=env, timeout=900)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT ")]
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    report = json.loads(line[0][len("REPORT "):])
    assert report["architecture"] == "deepseek2"
    assert report["missing"] == []
    diffs = report["upstream_vs_gguf_max_diff"]
    assert set(diffs) == {"Q8_0", "Q4_K", "Q5_0", "F32"} and max(diffs.values()) < 1e-6, diffs
    # KExpertsCPU gets GGML Q4_K (12) for gate/up and Q5_0 (6) for down
    assert sorted(report["expert_types"].values()) == [6, 12, 12]
    # unit-RMS embeddings through the layers: residual stream stays O(1), no blow-up or collapse
    assert len(report["hidden_rms_per_layer"]) == LAYERS
    assert all(0.8 < r < 3.0 for r in report["hidden_rms_per_layer"]), report["hidden_rms_per_layer"]
    assert report["logits_finite"] and 0.3 < report["logits_std"] < 30


def test_refuses_busy_dest_and_bad_sizes(tmp_path, model_dir):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(KtlegacyError, match="not empty"):
        make_lite_model(busy, layers=2, vocab=VOCAB)
    assert (busy / "keep.txt").read_text() == "mine"
    with pytest.raises(KtlegacyError, match="at least 2"):
        make_lite_model(tmp_path / "one", layers=1, vocab=VOCAB)
    with pytest.raises(KtlegacyError, match="vocab must be at least"):
        make_lite_model(tmp_path / "small", layers=2, vocab=100)
    assert not (tmp_path / "small").exists() and not (tmp_path / "small.partial").exists()
    proc = subprocess.run([sys.executable, "-m", "ktlegacy.testing.peer_model", "--dest", str(busy), "--layers", "2"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {busy} is not empty: pass --force to replace it, or another --dest"]


def test_v3_dims_plan_has_the_v3_test_models_tensors_at_deepseek_v3s_sizes():
    """The V3-dims slice (memory and speed of the GPU side at DeepSeek-V3's real sizes) names
    exactly the tensors the synthetic V3 test model has, which the engine and the reference load,
    with DeepSeek-V3's shapes; its GPU-side matrices are in a Q4_K_M file's types."""
    from dataclasses import replace
    from ktlegacy.testing.peer_model import V3_DIMS
    from ktlegacy.testing.testmodel import _tensors, preset
    layers = 3
    spec = replace(V3_DIMS, num_hidden_layers=layers)
    plan = {name: (shape, qtype) for name, shape, qtype, _ in tensor_plan(spec)}
    small = preset("v3", num_hidden_layers=layers, first_k_dense_replace=V3_DIMS.first_k_dense_replace,
                   hidden_size=256, vocab_size=512, n_routed_experts=8, num_experts_per_tok=4)
    assert set(plan) == {name for name, _, _ in _tensors(small)}
    assert plan["blk.0.attn_q_a.weight"] == ((1536, 7168), "Q4_K")
    assert plan["blk.0.attn_q_b.weight"] == ((128 * 192, 1536), "Q4_K")
    assert plan["blk.0.attn_kv_a_mqa.weight"] == ((576, 7168), "Q4_K")
    assert plan["blk.0.attn_kv_b.weight"] == ((128 * 256, 512), "Q6_K")
    assert plan["blk.0.attn_output.weight"] == ((7168, 16384), "Q4_K")
    assert plan["blk.0.ffn_down.weight"] == ((7168, 18432), "Q6_K")
    assert plan["blk.1.ffn_gate_shexp.weight"] == ((2048, 7168), "Q4_K")
    assert plan["blk.1.ffn_gate_exps.weight"] == ((8, 2048, 7168), "Q4_K")
    assert plan["output.weight"] == ((129280, 7168), "Q6_K")
    cfg = spec.test_spec().config_dict(0, 1)
    assert cfg["architectures"] == ["DeepseekV3ForCausalLM"] and cfg["q_lora_rank"] == 1536
    assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["intermediate_size"], cfg["vocab_size"]) == \
        (7168, 128, 18432, 129280)
