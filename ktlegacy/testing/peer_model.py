"""A DeepSeek-V2-Lite-shaped GGUF that ktransformers 0.2.1.post1 and llama.cpp both load (issue 13).

``make_lite_model(dest)`` writes, without downloads or a quantizer:

- ``model.gguf``: DeepSeek-V2-Lite's real dimensions (27 layers, hidden 2048, 16 heads, MLA with
  kv_lora_rank 512 / rope 64 / nope 128 / v 128, no q LoRA, a dense first layer of 10944, then 64
  routed experts top-6 plus 2 shared experts of 1408, vocabulary 102400) in the quant mix of a
  Q4_K_M file of it: routed experts' gate/up **Q4_K**; their down projection **Q5_0**, because
  1408 is not a multiple of Q4_K's 256-value block (llama.cpp's quantizer falls back from Q4_K to
  Q5_0 for exactly these tensors); every other matrix **Q8_0**; norms and the router **F32**.
  Blocks are written directly in ggml's layouts with seeded random quants and scales chosen so a
  unit-RMS input gives a unit-RMS output (``Q4_K``: 144 bytes per 256 values, ``Q5_0``: 22 per 32,
  ``Q8_0``: 34 per 32). Attention keeps the unsplit ``attn_kv_b`` tensor (no ``*_mla`` length
  keys): the form ktransformers 0.2.1.post1 reads; llama.cpp loads it too (its "legacy" non-MLA
  path, which caches decompressed K/V per head).
- the ``deepseek2`` metadata llama.cpp needs and a GPT-2-style BPE tokenizer in the GGUF
  (``tokenizer.ggml.*``): ``ktlegacy.testing.testmodel``'s trained byte-level BPE (512 tokens) padded
  with unused tokens up to the vocabulary size, so token ids cover the embedding rows;
- ``config.json``, ``generation_config.json``, ``tokenizer.json``, ``tokenizer_config.json``,
  ``configuration_deepseek.py``: the Hugging Face side ktransformers' loader reads, as
  ``ktlegacy.testing.testmodel`` writes them;
- ``ktlegacy-peer-model.json``: the shape, the quant mix, the tensor list and the bytes a decoded
  token reads from the CPU-side weights (what ``bench/peer_bench.py`` divides by the memory
  bandwidth).

The weights are random: the model says nothing, but every kernel sees the shapes, types and
byte counts of the real one, which is what a speed comparison needs. The full model is 9.41 GiB
(10.10 GB): generate it where it runs (the GPU machine); never commit or carry it. On the 2-core
test VM it took 2 min with 0.95 GB peak RSS (one tensor in memory at a time); llama.cpp
0c1e57098 (CPU build) loads it as "deepseek2 16B Q4_K - Medium, 15.71 B parameters" (the real
V2-Lite's count) and runs it with ``-ot exps=CPU``; upstream 0.2.1.post1's GGUFLoader parses it
in 0.6 s.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..core.errors import KtlegacyError
from . import require
from .testmodel import (BOS, CHAT_TEMPLATE, EOS, MODEL_MODULES, V3_ROPE_SCALING, TestModelSpec, build_tokenizer,
                        staged_dir, write_hf_files)

GGUF_NAME = "model.gguf"
RECORD_NAME = "ktlegacy-peer-model.json"

# ggml block layouts: (values per block, bytes per block)
QK = {"Q4_K": (256, 144), "Q6_K": (256, 210), "Q5_0": (32, 22), "Q8_0": (32, 34), "F32": (1, 4), "F16": (1, 2)}
TOKENIZER_VOCAB = 512  # trained BPE tokens (testmodel's corpus fills up to ~2000)


@dataclass(frozen=True)
class LiteSpec:
    """DeepSeek-V2-Lite(-Chat)'s config.json values (the parts that set shapes and routing)."""

    vocab_size: int = 102400
    hidden_size: int = 2048
    intermediate_size: int = 10944
    moe_intermediate_size: int = 1408
    num_hidden_layers: int = 27
    first_k_dense_replace: int = 1
    num_attention_heads: int = 16
    n_routed_experts: int = 64
    num_experts_per_tok: int = 6
    n_shared_experts: int = 2
    kv_lora_rank: int = 512
    qk_rope_head_dim: int = 64
    qk_nope_head_dim: int = 128
    v_head_dim: int = 128
    seed: int = 0
    branch_scale: float = 0.3  # residual branch outputs (attention out, FFN down) relative to unit RMS
    # DeepSeek-V3 layout (``variant="v3"``, :data:`V3_DIMS`): q LoRA, sigmoid router with a
    # score-correction bias and expert groups, one shared expert
    variant: str = "v2"
    q_lora_rank: int = 0
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0

    def test_spec(self):
        """The same numbers as a ``testmodel.TestModelSpec`` (its config.json writer)."""
        v3 = {"rope_scaling": V3_ROPE_SCALING} if self.variant == "v3" else {}
        return TestModelSpec(
            variant=self.variant, vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, moe_intermediate_size=self.moe_intermediate_size,
            num_hidden_layers=self.num_hidden_layers, first_k_dense_replace=self.first_k_dense_replace,
            num_attention_heads=self.num_attention_heads, n_routed_experts=self.n_routed_experts,
            num_experts_per_tok=self.num_experts_per_tok, n_shared_experts=self.n_shared_experts,
            kv_lora_rank=self.kv_lora_rank, q_lora_rank=self.q_lora_rank or None,
            qk_rope_head_dim=self.qk_rope_head_dim, qk_nope_head_dim=self.qk_nope_head_dim,
            v_head_dim=self.v_head_dim, seed=self.seed, n_group=self.n_group, topk_group=self.topk_group,
            routed_scaling_factor=self.routed_scaling_factor, **v3,
        )


# DeepSeek-V3/R1's per-layer dimensions (its config.json: hidden 7168, q LoRA 1536, kv LoRA 512,
# 128 heads, dense MLP 18432, experts and the shared expert 2048, vocabulary 129280) with few layers
# (one dense, then MoE) and few routed experts: a slice of the real model for measuring the GPU
# side (memory per GPU, the speed of its linears). Weights in a Q4_K_M file's mix (see tensor_plan).
V3_DIMS = LiteSpec(
    variant="v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
    num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=128, n_routed_experts=8,
    num_experts_per_tok=4, n_shared_experts=1, q_lora_rank=1536, n_group=4, topk_group=2,
    routed_scaling_factor=2.5,
)


# DeepSeek-V3/R1 whole (671B parameters): 61 layers, 3 dense, 256 routed experts top-8 in 8 groups
V3_FULL = replace(V3_DIMS, num_hidden_layers=61, first_k_dense_replace=3, n_routed_experts=256,
                  num_experts_per_tok=8, n_group=8, topk_group=4)


def gguf_infos(spec: LiteSpec, ftype: str | None = None):
    """A ``ktlegacy.vram.GgufModel`` of ``spec``'s tensors (names, sizes, types) without a file: each
    tensor in the type llama.cpp's ``ftype`` (Q4_K_M, Q2_K; ``ktlegacy.testing.ggml_quant.llama_cpp_type``)
    gives it, or in F16 with ``ftype`` None. What the doctor estimates for a real GGUF of that size."""
    import math
    from ..vram import GgufModel, Tensor
    from .ggml_quant import llama_cpp_type, type_bytes
    tensors = []
    for name, shape, _, _ in tensor_plan(spec):
        n = math.prod(shape)
        qtype = llama_cpp_type(name, spec.num_hidden_layers, ftype) if ftype else "F16"
        tensors.append(Tensor(name, n, type_bytes(qtype, n), qtype))
    meta = {"general.architecture": "deepseek2", "deepseek2.attention.kv_lora_rank": spec.kv_lora_rank,
            "deepseek2.rope.dimension_count": spec.qk_rope_head_dim, "deepseek2.embedding_length": spec.hidden_size}
    return GgufModel([], tensors, meta, sum(t.n_bytes for t in tensors))


# GPU-side matrix types by role: V2-Lite's benchmark model keeps Q8_0 (as it was measured against
# llama.cpp); the V3-dims slice takes a Q4_K_M file's mix (input projections Q4_K, the down
# projections and the head Q6_K, like llama.cpp's Q4_K_M for DeepSeek-V3)
GPU_TYPES = {
    "v2": {"embd": "Q8_0", "in": "Q8_0", "kv_b": "Q8_0", "out": "Q8_0", "down": "Q8_0", "head": "Q8_0"},
    "v3": {"embd": "Q4_K", "in": "Q4_K", "kv_b": "Q6_K", "out": "Q4_K", "down": "Q6_K", "head": "Q6_K"},
}


def tensor_plan(spec: LiteSpec) -> list[tuple[str, tuple[int, ...], str, float]]:
    """(GGUF name, numpy shape (rows last = input dim), type, target RMS of the values) in file order."""
    d, v, h = spec.hidden_size, spec.vocab_size, spec.num_attention_heads
    q_head = spec.qk_nope_head_dim + spec.qk_rope_head_dim
    b = spec.branch_scale
    t = GPU_TYPES[spec.variant]

    plan = [("token_embd.weight", (v, d), t["embd"], 1.0)]
    for i in range(spec.num_hidden_layers):
        p = f"blk.{i}."
        plan.append((p + "attn_norm.weight", (d,), "F32", 1.0))
        if spec.q_lora_rank:
            r = spec.q_lora_rank
            plan += [
                (p + "attn_q_a.weight", (r, d), t["in"], d ** -0.5),
                (p + "attn_q_a_norm.weight", (r,), "F32", 1.0),
                (p + "attn_q_b.weight", (h * q_head, r), t["in"], r ** -0.5),
            ]
        else:
            plan.append((p + "attn_q.weight", (h * q_head, d), t["in"], d ** -0.5))
        plan += [
            (p + "attn_kv_a_mqa.weight", (spec.kv_lora_rank + spec.qk_rope_head_dim, d), t["in"], d ** -0.5),
            (p + "attn_kv_a_norm.weight", (spec.kv_lora_rank,), "F32", 1.0),
            (p + "attn_kv_b.weight", (h * (spec.qk_nope_head_dim + spec.v_head_dim), spec.kv_lora_rank),
             t["kv_b"], spec.kv_lora_rank ** -0.5),
            (p + "attn_output.weight", (d, h * spec.v_head_dim), t["out"], b * (h * spec.v_head_dim) ** -0.5),
            (p + "ffn_norm.weight", (d,), "F32", 1.0),
        ]
        if i < spec.first_k_dense_replace:
            n = spec.intermediate_size
            plan += [
                (p + "ffn_gate.weight", (n, d), t["in"], d ** -0.5),
                (p + "ffn_up.weight", (n, d), t["in"], d ** -0.5),
                (p + "ffn_down.weight", (d, n), t["down"], b * n ** -0.5),
            ]
            continue
        e, n = spec.n_routed_experts, spec.moe_intermediate_size
        s = n * spec.n_shared_experts
        plan.append((p + "ffn_gate_inp.weight", (e, d), "F32", d ** -0.5))
        if spec.variant == "v3":
            plan.append((p + "exp_probs_b.bias", (e,), "F32", 0.01))
        plan += [
            (p + "ffn_gate_exps.weight", (e, n, d), "Q4_K", d ** -0.5),
            (p + "ffn_up_exps.weight", (e, n, d), "Q4_K", d ** -0.5),
            # routed outputs are weighted by softmax scores (~1/top_k each): scaled back up
            (p + "ffn_down_exps.weight", (e, d, n), "Q5_0" if n % 256 else "Q4_K", 2 * b * n ** -0.5),
            (p + "ffn_gate_shexp.weight", (s, d), t["in"], d ** -0.5),
            (p + "ffn_up_shexp.weight", (s, d), t["in"], d ** -0.5),
            (p + "ffn_down_shexp.weight", (d, s), t["down"], b * s ** -0.5),
        ]
    plan += [("output_norm.weight", (d,), "F32", 1.0), ("output.weight", (v, d), t["head"], d ** -0.5)]
    return plan


def nbytes(shape: tuple[int, ...], qtype: str) -> int:
    per_block, block_bytes = QK[qtype]
    if shape[-1] % per_block:
        raise KtlegacyError(f"a row of {shape[-1]} values does not split into {qtype} blocks of {per_block}")
    n = 1
    for s in shape:
        n *= s
    return n // per_block * block_bytes


# ---- ggml blocks ---------------------------------------------------------------------------
# Uniform random quants q; the scales make d * (q - centre) have the target RMS.
Q4K_STD = (255 / 12) ** 0.5    # std of a uniform 4-bit quant
Q5_STD = (1023 / 12) ** 0.5    # 5-bit
Q8_STD = (254 * 256 / 12) ** 0.5  # uniform int8 in [-127, 127]
Q4K_SCALE = 32                 # every 6-bit sub-block scale and min (see _q4k_scales)
Q6_STD = (4095 / 12) ** 0.5    # 6-bit
Q6K_SCALE = 16                 # every int8 sub-block scale of a Q6_K block


def _q4k_scales() -> bytes:
    """ggml's 12-byte packing of eight 6-bit (scale, min) pairs, all equal to Q4K_SCALE:
    pairs 0-3 in the low 6 bits of bytes 0-3 / 4-7, pairs 4-7 split into a low nibble in bytes
    8-11 and their top 2 bits in bits 6-7 of bytes 0-3 (scales) / 4-7 (mins)."""
    sc = [Q4K_SCALE] * 8
    mn = [Q4K_SCALE] * 8
    q = [0] * 12
    for j in range(4):
        q[j] = sc[j] & 63 | (sc[j + 4] >> 4) << 6
        q[j + 4] = mn[j] & 63 | (mn[j + 4] >> 4) << 6
        q[j + 8] = sc[j + 4] & 0xF | (mn[j + 4] & 0xF) << 4
    return bytes(q)


def quant_blocks(rng, shape: tuple[int, ...], qtype: str, rms: float):
    """Random ggml blocks of ``qtype`` for a ``shape`` tensor as uint8 (..., row_bytes)."""
    import numpy as np
    per_block, block_bytes = QK[qtype]
    n_blocks = nbytes(shape, qtype) // block_bytes
    # per-block scale jitter (+-20%) so blocks are not all alike
    jitter = rng.uniform(0.8, 1.2, n_blocks).astype(np.float32)
    sign = np.where(rng.random(n_blocks) < 0.5, -1.0, 1.0).astype(np.float32)
    if qtype == "Q4_K":
        dt = np.dtype([("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", 12), ("qs", "u1", 128)])
        blocks = np.empty(n_blocks, dtype=dt)
        d = jitter * (rms / (Q4K_SCALE * Q4K_STD))
        blocks["d"] = d
        blocks["dmin"] = d * 7.5  # value = d*32*q - dmin*32 = 32 d (q - 7.5): zero mean
        blocks["scales"] = np.frombuffer(_q4k_scales(), dtype=np.uint8)
        blocks["qs"] = np.frombuffer(rng.bytes(n_blocks * 128), dtype=np.uint8).reshape(n_blocks, 128)
    elif qtype == "Q5_0":
        dt = np.dtype([("d", "<f2"), ("qh", "u1", 4), ("qs", "u1", 16)])
        blocks = np.empty(n_blocks, dtype=dt)
        # value = d * (q - 16), q uniform in 0..31: mean -d/2, so d gets a random sign
        blocks["d"] = sign * jitter * (rms / Q5_STD)
        raw = np.frombuffer(rng.bytes(n_blocks * 20), dtype=np.uint8).reshape(n_blocks, 20)
        blocks["qh"], blocks["qs"] = raw[:, :4], raw[:, 4:]
    elif qtype == "Q6_K":
        dt = np.dtype([("ql", "u1", 128), ("qh", "u1", 64), ("scales", "i1", 16), ("d", "<f2")])
        blocks = np.empty(n_blocks, dtype=dt)
        raw = np.frombuffer(rng.bytes(n_blocks * 192), dtype=np.uint8).reshape(n_blocks, 192)
        blocks["ql"], blocks["qh"] = raw[:, :128], raw[:, 128:]
        blocks["scales"] = Q6K_SCALE
        # value = d * 16 * (q - 32), q uniform in 0..63: mean -8d, so d gets a random sign
        blocks["d"] = sign * jitter * (rms / (Q6K_SCALE * Q6_STD))
    elif qtype == "Q8_0":
        dt = np.dtype([("d", "<f2"), ("qs", "i1", 32)])
        blocks = np.empty(n_blocks, dtype=dt)
        blocks["d"] = sign * jitter * (rms / Q8_STD)
        q = np.frombuffer(rng.bytes(n_blocks * 32), dtype=np.int8).reshape(n_blocks, 32)
        blocks["qs"] = np.where(q == -128, np.int8(0), q)  # ggml's Q8_0 range is -127..127
    else:
        raise KtlegacyError(f"no block writer for {qtype}")
    assert dt.itemsize == block_bytes, (qtype, dt.itemsize)
    return blocks.view(np.uint8).reshape(*shape[:-1], shape[-1] // per_block * block_bytes)


def _float_tensor(rng, name: str, shape: tuple[int, ...], rms: float):
    import numpy as np
    if name.endswith("norm.weight"):
        return (1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
    return (rng.standard_normal(shape, dtype=np.float32) * rms).astype(np.float32)


# ---- tokenizer -----------------------------------------------------------------------------

def padded_tokenizer(vocab_size: int):
    """testmodel's trained byte-level BPE (512 tokens, BOS/EOS ids 0/1) with unused tokens
    appended up to ``vocab_size``; returns (tokenizer.json text, tokens, token types, merges)."""
    if vocab_size < TOKENIZER_VOCAB:
        raise KtlegacyError(f"vocab must be at least {TOKENIZER_VOCAB} (the trained tokenizer's size)")
    tok = build_tokenizer(TestModelSpec(vocab_size=TOKENIZER_VOCAB))
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    for i in range(len(vocab), vocab_size):
        vocab[f"<|ktlegacy_unused_{i}|>"] = i
    tokens = [None] * vocab_size
    for t, i in vocab.items():
        tokens[i] = t
    if any(t is None for t in tokens):
        raise KtlegacyError("the padded tokenizer has holes in its id range")
    special = {a["id"] for a in data.get("added_tokens", [])}
    # gguf TokenType: 1 normal, 3 control, 5 unused
    types = [3 if i in special else (1 if i < TOKENIZER_VOCAB else 5) for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    return json.dumps(data, ensure_ascii=False), tokens, types, merges


# ---- the model -----------------------------------------------------------------------------

def _write_gguf(path: Path, spec: LiteSpec, plan, tokens, types, merges, bos_id: int, eos_id: int) -> None:
    import gguf
    import numpy as np
    ts = spec.test_spec()
    rs = ts.rope_scaling
    w = gguf.GGUFWriter(str(path), "deepseek2")
    w.add_name(f"ktlegacy synthetic DeepSeek-{'V3 slice' if spec.variant == 'v3' else 'V2-Lite'} (random weights)")
    w.add_block_count(spec.num_hidden_layers)
    w.add_context_length(ts.max_position_embeddings)
    w.add_embedding_length(spec.hidden_size)
    w.add_feed_forward_length(spec.intermediate_size)
    w.add_head_count(spec.num_attention_heads)
    w.add_head_count_kv(spec.num_attention_heads)
    w.add_rope_freq_base(ts.rope_theta)
    w.add_layer_norm_rms_eps(ts.rms_norm_eps)
    w.add_leading_dense_block_count(spec.first_k_dense_replace)
    w.add_vocab_size(spec.vocab_size)
    w.add_kv_lora_rank(spec.kv_lora_rank)
    # V2-Lite has no q LoRA. Real V2-Lite files omit the key; llama.cpp then recognises "lite" by the
    # layer count (26/27) alone and demands the key for any other count: 0 says it for every size.
    w.add_q_lora_rank(spec.q_lora_rank)
    w.add_key_length(spec.qk_nope_head_dim + spec.qk_rope_head_dim)
    w.add_value_length(spec.v_head_dim)
    w.add_expert_feed_forward_length(spec.moe_intermediate_size)
    w.add_expert_count(spec.n_routed_experts)
    w.add_expert_used_count(spec.num_experts_per_tok)
    w.add_expert_shared_count(spec.n_shared_experts)
    w.add_expert_weights_scale(spec.routed_scaling_factor)
    if spec.variant == "v3":
        w.add_expert_weights_norm(True)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    w.add_rope_dimension_count(spec.qk_rope_head_dim)
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(float(rs["factor"]))
    w.add_rope_scaling_orig_ctx_len(int(rs["original_max_position_embeddings"]))
    w.add_rope_scaling_yarn_log_mul(0.1 * float(rs["mscale_all_dim"]))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("deepseek-llm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(bos_id)
    w.add_eos_token_id(eos_id)
    w.add_pad_token_id(eos_id)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    raw = {name: gguf.GGMLQuantizationType[name] for name in QK if name not in ("F32", "F16")}
    for name, shape, qtype, _rms in plan:
        if qtype == "F32":
            w.add_tensor_info(name, shape, np.dtype(np.float32), nbytes(shape, qtype))
        else:
            per_block, block_bytes = QK[qtype]
            byte_shape = (*shape[:-1], shape[-1] // per_block * block_bytes)
            w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), nbytes(shape, qtype), raw_dtype=raw[qtype])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(spec.seed)
    for name, shape, qtype, rms in plan:  # one tensor in memory at a time
        if qtype == "F32":
            w.write_tensor_data(_float_tensor(rng, name, shape, rms))
        else:
            w.write_tensor_data(quant_blocks(rng, shape, qtype, rms))
    w.close()


def decode_cpu_bytes(spec: LiteSpec, plan) -> dict:
    """Bytes of CPU-resident weights one decoded token reads when the routed experts live on
    the CPU and everything else on the GPU: top-k experts' gate/up/down rows of every MoE layer,
    plus the token's embedding row (both engines keep token_embd on the CPU)."""
    per_layer = {}
    for name, shape, qtype, _ in plan:
        if "_exps." in name:
            layer = int(name.split(".")[1])
            per_layer[layer] = per_layer.get(layer, 0) + nbytes(shape, qtype) // spec.n_routed_experts
    experts = sum(per_layer.values()) * spec.num_experts_per_tok
    embd = next(nbytes(s[1:], q) for n, s, q, _ in plan if n == "token_embd.weight")
    return {"routed_experts": experts, "embedding_row": embd, "total": experts + embd,
            "per_expert": next(iter(per_layer.values())) if per_layer else 0}


def make_lite_model(dest: Path, *, seed: int = 0, force: bool = False, layers: int = 27,
                    vocab: int = 102400, base: LiteSpec = LiteSpec()) -> Path:
    """Write the V2-Lite-shaped checkpoint (``base``: another :class:`LiteSpec`, e.g. :data:`V3_DIMS`)
    into ``dest`` (all files, or nothing on failure)."""
    spec = replace(base, num_hidden_layers=layers, vocab_size=vocab, seed=seed)
    dest = Path(dest)
    if layers <= spec.first_k_dense_replace:
        raise KtlegacyError(f"layers must be at least {spec.first_k_dense_replace + 1} "
                            f"({spec.first_k_dense_replace} dense layer(s), then MoE layers)")
    require("make-test-model --preset v2-lite", *MODEL_MODULES)
    plan = tensor_plan(spec)
    with staged_dir(dest, force) as tmp:
        tok_json, tokens, types, merges = padded_tokenizer(vocab)
        bos_id, eos_id = tokens.index(BOS), tokens.index(EOS)
        (tmp / "tokenizer.json").write_text(tok_json)
        write_hf_files(tmp, spec.test_spec(), bos_id, eos_id)
        _write_gguf(tmp / GGUF_NAME, spec, plan, tokens, types, merges, bos_id, eos_id)
        mix: dict = {}
        for _name, shape, qtype, _ in plan:
            m = mix.setdefault(qtype, {"tensors": 0, "bytes": 0})
            m["tensors"] += 1
            m["bytes"] += nbytes(shape, qtype)
        (tmp / RECORD_NAME).write_text(json.dumps({
            "spec": asdict(spec), "bos_token_id": bos_id, "eos_token_id": eos_id, "gguf": GGUF_NAME,
            "file_bytes": (tmp / GGUF_NAME).stat().st_size, "quant_mix": mix,
            "decode_cpu_bytes_per_token": decode_cpu_bytes(spec, plan),
            "tensors": [{"name": n, "shape": list(s), "type": q} for n, s, q, _ in plan],
        }, indent=2))
    return dest


def load_record(model_dir: Path) -> dict:
    path = Path(model_dir) / RECORD_NAME
    if not path.is_file():
        raise KtlegacyError(f"{model_dir} holds no {RECORD_NAME}: make it with ktlegacy.testing.peer_model.make_lite_model")
    return json.loads(path.read_text())


def main(argv=None) -> int:
    """``python -m ktlegacy.testing.peer_model --dest DIR [--layers N] [--vocab V] [--seed S] [--force]``
    (until ``invoke make-test-model --preset v2-lite`` calls make_lite_model)."""
    import argparse
    import sys
    p = argparse.ArgumentParser(description="write a DeepSeek-V2-Lite-shaped GGUF (random weights)")
    p.add_argument("--dest", required=True, type=Path)
    p.add_argument("--variant", choices=("v2-lite", "v3-dims"), default="v2-lite",
                   help="v2-lite: DeepSeek-V2-Lite's dimensions; v3-dims: DeepSeek-V3's per-layer ones (V3_DIMS)")
    p.add_argument("--layers", type=int, default=None, help="default: the variant's")
    p.add_argument("--vocab", type=int, default=None, help="default: the variant's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true")
    a = p.parse_args(argv)
    base = V3_DIMS if a.variant == "v3-dims" else LiteSpec()
    a.layers = base.num_hidden_layers if a.layers is None else a.layers
    a.vocab = base.vocab_size if a.vocab is None else a.vocab
    try:
        out = make_lite_model(a.dest, seed=a.seed, force=a.force, layers=a.layers, vocab=a.vocab, base=base)
    except KtlegacyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rec = load_record(out)
    mix = ", ".join(f"{k} {v['tensors']}" for k, v in rec["quant_mix"].items())
    print(f"wrote {out}: {a.layers} layers, vocab {a.vocab}, {rec['file_bytes'] / 2**30:.2f} GiB GGUF ({mix} tensors)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
