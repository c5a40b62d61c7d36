"""Synthetic DeepSeek-V2 / DeepSeek-V3 checkpoints for proving the patched engine on a GPU.

``make_test_model(dest)`` writes, in seconds and without downloads:

- ``model.gguf``: seeded random weights with DeepSeek's MLA attention geometry (kv_lora_rank
  512, qk_rope 64, qk_nope 128, v 128), dense first layer(s), then MoE layers with a few routed
  experts plus shared experts, under the tensor names ktransformers' GGUF loader looks up
  (``blk.N.attn_kv_a_mqa.weight``, ``blk.N.ffn_gate_exps.weight`` ...). Two presets
  (:data:`PRESETS`): ``v2`` has DeepSeek-V2-Lite's layout (no q LoRA, softmax router, one dense
  layer); ``v3`` has DeepSeek-V3's (q LoRA, three dense layers, the sigmoid ``noaux_tc`` router
  with a score-correction bias ``blk.N.exp_probs_b.bias`` and group-limited top-k, one shared
  expert, ``routed_scaling_factor``) and 46 layers by default, so the multi-GPU rule files,
  which split DeepSeek-V3 at layer 30 (2 GPUs) and 15/30/45 (4 GPUs), place work on every GPU;
- ``config.json`` / ``generation_config.json``: a ``DeepseekV2ForCausalLM`` or
  ``DeepseekV3ForCausalLM`` config;
- ``tokenizer.json`` / ``tokenizer_config.json``: a byte-level BPE trained with ``tokenizers``
  on a fixed corpus, with a chat template in DeepSeek-V2-Chat's ``User:`` / ``Assistant:`` form;
- ``configuration_deepseek.py``: a two-line shim so ``AutoConfig(..., trust_remote_code=True)``
  (what ``local_chat`` calls) resolves the config class from the installed ktransformers;
- ``ktlegacy-testmodel.json``: the spec, seed and tensor list (what the tests check against).

Quant types (``linear_quant``, see :func:`_linear_type`): norms and the router are F32; the
routed experts and the token embeddings F16. F16 is a type both CPU expert backends accept:
llamafile's sgemm multiplies F16 weights by F16 activations (its ``vec_dot_type``), so the CPU
experts see no 8-bit activation rounding, and ``KExpertsTorch`` dequantizes F16 on the GPU. The
GPU-side matrices (attention, dense and shared-expert MLPs, the output head) come in the mix of a
Q4_K_M file (``linear_quant="q4_k_m"``, the default): input projections Q4_K, ``attn_kv_b`` and the
head Q6_K, the branch outputs (``attn_output``, ``ffn_down``, ``ffn_down_shexp``) and a q LoRA
``attn_q_b`` whose rows are not a multiple of 256 Q8_0; ``linear_quant="f16"`` keeps them F16. The
blocks are written by ``ktlegacy.testing.ggml_quant`` and the reference reads them back through
gguf-py's dequantizer, so the fp32 reference computes with exactly the weights the engine holds:
quantization changes the model, not the comparison.

Why the output head is not plain noise: the proof compares greedy tokens of an fp16 GPU run
with an fp32 reference. Random logits over a vocabulary have near-ties every few dozen steps,
and fp16 rounding flips those, so a purely random model fails such a comparison by chance.
The head therefore adds a "successor" term (token t votes for token succ(t), a fixed random
permutation, one cycle through the vocabulary) on top of a random matrix; the layers still
decide some steps (on the H100 run the successor won 91% of the reference's tokens:
``reference_successor_share`` in the proof's JSON), and the random part makes every logit
depend on every layer, so the logits' error still measures the whole forward pass. The MoE
router is built the same way for the same reason (see ``_tensors``): each token has its own
experts with a clear score margin, so fp16 does not pick other experts at near-ties.
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..core.errors import KtlegacyError
from . import require

GGUF_NAME = "model.gguf"
SPEC_NAME = "ktlegacy-testmodel.json"
# What writing a model imports (the testing extra): the BPE trainer, the weights, the GGUF writer.
MODEL_MODULES = ("tokenizers", "numpy", "gguf")
BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"

# A chat template in DeepSeek-V2-Chat's format (our own Jinja, same conversation layout).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] + '\n\n' }}"
    "{% elif m['role'] == 'user' %}{{ 'User: ' + m['content'] + '\n\n' }}"
    "{% elif m['role'] == 'assistant' %}{{ 'Assistant: ' + m['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# Words the tokenizer is trained on (and that test prompts are made of).
_WORDS = (
    "the a an of to in on for with from by at as is are was were be been it this that these "
    "those model layer expert token cache memory kernel card volta turing tensor core matrix "
    "vector attention prefill decode shared routed latent rank rope head value key query "
    "quick brown fox jumps over lazy dog write sort list number code function return loop "
    "python c++ rust go file line word time fast slow small large first second third last "
    "hello world please explain why how what when where which who answer question test run "
    "build image docker gpu cpu thread core socket numa page block warp lane stage pipeline "
    "red green blue yellow one two three four five six seven eight nine ten hundred thousand"
).split()


@dataclass(frozen=True)
class TestModelSpec:
    """Shapes of the synthetic model. MLA dims are DeepSeek-V2(-Lite)'s; the rest is small.
    The defaults are the ``v2`` preset; :data:`PRESETS` holds ``v3``."""
    __test__ = False  # not a pytest class

    variant: str = "v2"               # "v2": DeepseekV2ForCausalLM, "v3": DeepseekV3ForCausalLM
    vocab_size: int = 512             # BPE vocabulary incl. the two special tokens
    hidden_size: int = 1024
    intermediate_size: int = 2048     # the dense first layer's MLP
    moe_intermediate_size: int = 256  # per expert (a multiple of llamafile's QK_K = 256 row blocks)
    num_hidden_layers: int = 6
    first_k_dense_replace: int = 1
    num_attention_heads: int = 8
    n_routed_experts: int = 8
    num_experts_per_tok: int = 2
    n_shared_experts: int = 2
    kv_lora_rank: int = 512
    q_lora_rank: int | None = None    # V2-Lite has no q LoRA (q_proj, GGUF attn_q)
    qk_rope_head_dim: int = 64
    qk_nope_head_dim: int = 128
    v_head_dim: int = 128
    rope_theta: float = 10000.0
    max_position_embeddings: int = 163840
    rope_scaling: dict = field(default_factory=lambda: {
        "type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
        "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707,
    })
    rms_norm_eps: float = 1e-6
    seed: int = 0
    # Weight scales (see the module docstring): residual branch outputs, successor term,
    # random part of the head.
    # Measured on CPU (upstream modeling code, fp32 vs fp16, 4 chat prompts x 32 greedy steps):
    # successor 16 -> the layers decide ~15% of the tokens, but top-2 margins fall to 0.01,
    # the size of fp16 error (a coin flip per near-tie); 18 -> ~10%, margins still 0.006;
    # 19 -> the successor wins every step with margins >= 0.26, 15x the fp16 error. The layers
    # still move every logit (the logit comparison is where their correctness shows).
    branch_scale: float = 0.3
    successor_logit: float = 19.0
    head_noise: float = 3.0
    router_margin: float = 4.0  # router score of a token's own experts over the others (see _tensors)
    # DeepSeek-V3's router (v3 only): sigmoid scores, experts in n_group groups of which each
    # token may use topk_group, the chosen experts' weights normalised and scaled by
    # routed_scaling_factor; a per-expert score-correction bias steers the choice only.
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    correction_bias: float = 0.05     # |bias| bound; far below the router margin (see _router_v3)
    # Deep models (v3): every branch (attention, MLP, experts) writes only into the subspace
    # orthogonal to the token embeddings, and the MoE layers' input norms are 1, so a router
    # solved on the embeddings sees the same direction at any depth, only scaled (see _tensors).
    confine_branches: bool = False
    # GPU-side matrices: "q4_k_m" (a Q4_K/Q6_K/Q8_0 mix, see the module docstring) or "f16"
    linear_quant: str = "q4_k_m"

    @property
    def architecture(self) -> str:
        return {"v2": "DeepseekV2ForCausalLM", "v3": "DeepseekV3ForCausalLM"}[self.variant]

    def config_dict(self, bos_id: int, eos_id: int) -> dict:
        """config.json for ktransformers' DeepseekV2Config / DeepseekV3Config (and the reference model)."""
        cfg = {
            "architectures": [self.architecture],
            "model_type": "deepseek_v2",
            "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV2Config"},
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "moe_intermediate_size": self.moe_intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_attention_heads,
            "n_shared_experts": self.n_shared_experts,
            "n_routed_experts": self.n_routed_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "first_k_dense_replace": self.first_k_dense_replace,
            "moe_layer_freq": 1,
            "routed_scaling_factor": 1.0,
            "topk_method": "greedy",
            "n_group": 1,
            "topk_group": 1,
            "norm_topk_prob": False,
            "scoring_func": "softmax",
            "aux_loss_alpha": 0.001,
            "seq_aux": True,
            "ep_size": 1,
            "kv_lora_rank": self.kv_lora_rank,
            "q_lora_rank": self.q_lora_rank,
            "qk_rope_head_dim": self.qk_rope_head_dim,
            "qk_nope_head_dim": self.qk_nope_head_dim,
            "v_head_dim": self.v_head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rope_scaling": dict(self.rope_scaling),
            "rms_norm_eps": self.rms_norm_eps,
            "initializer_range": 0.02,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "tie_word_embeddings": False,
            "use_cache": True,
            "bos_token_id": bos_id,
            "eos_token_id": eos_id,
            "torch_dtype": "bfloat16",  # as the real V2-Lite ships; the overlays pick fp16 on sm7x
        }
        if self.variant == "v3":
            # what DeepSeek-V3's own config.json says about its router
            cfg.update({
                "model_type": "deepseek_v3",
                "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config"},
                "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True,
                "n_group": self.n_group, "topk_group": self.topk_group,
                "routed_scaling_factor": self.routed_scaling_factor,
                "num_nextn_predict_layers": 0,  # no multi-token-prediction layer in the file
            })
        return cfg


V3_ROPE_SCALING = {  # DeepSeek-V3's own
    "type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
    "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
}

# name -> (spec of that preset with its default layer count). ``v3``: 46 layers, so that the
# 4-GPU rule file (layers 0-14 / 15-29 / 30-44 / 45-60) has a layer on each of its GPUs.
PRESETS = {
    "v2": TestModelSpec(),
    "v3": TestModelSpec(
        variant="v3", num_hidden_layers=46, first_k_dense_replace=3, q_lora_rank=384,
        hidden_size=768, moe_intermediate_size=256,  # 46 layers in ~1.2 GB
        n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1,
        n_group=4, topk_group=2, routed_scaling_factor=2.5, rope_scaling=V3_ROPE_SCALING,
        confine_branches=True,
    ),
}


def preset(name: str, **changes) -> TestModelSpec:
    """The spec of a preset with ``changes`` (layers, seed) applied."""
    from dataclasses import replace
    if name not in PRESETS:
        raise KtlegacyError(f"unknown test model preset {name!r}: use one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **changes)


def training_corpus(lines: int = 4000, seed: int = 1234) -> list[str]:
    """A fixed pseudo-text the BPE is trained on (same lines on every machine)."""
    import random
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        n = rng.randint(4, 16)
        words = [rng.choice(_WORDS) for _ in range(n)]
        out.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ":", ","]))
    return out


def build_tokenizer(spec: TestModelSpec):
    """A byte-level BPE of ``spec.vocab_size`` tokens; BOS/EOS are ids 0 and 1."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size, special_tokens=[BOS, EOS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(training_corpus(), trainer=trainer)
    if tok.get_vocab_size() != spec.vocab_size:
        raise KtlegacyError(
            f"the test tokenizer came out with {tok.get_vocab_size()} tokens instead of "
            f"{spec.vocab_size}: pick a vocab size the fixed corpus can fill (256..2000)"
        )
    return tok


# Q4_K_M-like types of the GPU-side matrices by role (see the module docstring)
LINEAR_QUANTS = {
    "q4_k_m": {"in": "Q4_K", "kv_b": "Q6_K", "head": "Q6_K", "out": "Q8_0"},
    "f16": {"in": "F16", "kv_b": "F16", "head": "F16", "out": "F16"},
}


def _linear_type(spec: TestModelSpec, role: str, cols: int | None = None) -> str:
    """The GGUF type of a GPU-side matrix: its role's type in ``spec.linear_quant``; a K-quant
    falls back to Q8_0 where a row (``cols`` values; default the hidden size) is not a multiple
    of 256, as llama.cpp's quantizer does."""
    if spec.linear_quant not in LINEAR_QUANTS:
        raise KtlegacyError(f"unknown linear_quant {spec.linear_quant!r}: use one of {', '.join(LINEAR_QUANTS)}")
    qtype = LINEAR_QUANTS[spec.linear_quant][role]
    if qtype.endswith("_K") and (cols or spec.hidden_size) % 256:
        return "Q8_0"
    return qtype


def _tensors(spec: TestModelSpec):
    """Yield (gguf_name, float32 array, GGUF type name) in a fixed order from a seeded RNG."""
    import numpy as np
    rng = np.random.default_rng(spec.seed)
    d, v = spec.hidden_size, spec.vocab_size

    def qt(role, cols=None):
        return _linear_type(spec, role, cols)
    h = spec.num_attention_heads
    q_head = spec.qk_nope_head_dim + spec.qk_rope_head_dim

    def linear(out_f, in_f, scale=1.0):
        # Rows of unit-RMS outputs for unit-RMS inputs, times ``scale``.
        return (rng.standard_normal((out_f, in_f), dtype=np.float32) * (scale / np.sqrt(in_f)))

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n, dtype=np.float32)).astype(np.float32)

    def router(embed, ffn_norm, n_experts):
        # Top-k routing is discontinuous: a random router has 2nd/3rd expert scores within fp16
        # error of each other for a few tokens per sequence, and the fp16 engine then picks
        # another expert than the fp32 reference (a real but uninformative difference). So each
        # token gets a fixed set of experts with a clear score margin: solve
        # router @ x_t = target_t for the post-norm embedding x_t of every token
        # (min-norm least squares; vocab < hidden, so it is exact for the bare embeddings).
        x = embed / np.sqrt((embed ** 2).mean(axis=1, keepdims=True)) * ffn_norm
        ranks = np.argsort(rng.random((v, n_experts)), axis=1)
        target = np.where(ranks < spec.num_experts_per_tok, spec.router_margin, 0.0).astype(np.float32)
        target += 0.25 * spec.router_margin * rng.random((v, n_experts), dtype=np.float32)  # unequal weights
        sol, *_ = np.linalg.lstsq(x.astype(np.float64), target.astype(np.float64), rcond=None)
        return sol.T.astype(np.float32)

    def router_v3(embed, ffn_norm, n_experts):
        # DeepSeek-V3's gate (sigmoid scores + correction bias, best topk_group of n_group
        # groups by their two best experts, then top-k inside those groups), made unambiguous
        # the same way: each token gets topk_group groups and top_k // topk_group experts in
        # each with router logits in [margin/2, margin], every other expert -margin. Sigmoid
        # then puts the chosen experts at >= 0.88 and the rest at <= 0.02, far beyond the
        # correction bias (|b| <= correction_bias) and fp16 error, at group and expert level.
        x = embed / np.sqrt((embed ** 2).mean(axis=1, keepdims=True)) * ffn_norm
        per_group = n_experts // spec.n_group
        per_chosen_group = spec.num_experts_per_tok // spec.topk_group
        target = np.full((v, n_experts), -spec.router_margin, dtype=np.float32)
        for t in range(v):
            for g in rng.permutation(spec.n_group)[:spec.topk_group]:
                for e in rng.permutation(per_group)[:per_chosen_group]:
                    target[t, g * per_group + e] = spec.router_margin * (0.5 + 0.5 * rng.random())
        sol, *_ = np.linalg.lstsq(x.astype(np.float64), target.astype(np.float64), rcond=None)
        bias = rng.uniform(-spec.correction_bias, spec.correction_bias, n_experts).astype(np.float32)
        return sol.T.astype(np.float32), bias

    embed = rng.standard_normal((v, d), dtype=np.float32)
    yield "token_embd.weight", embed, "F16"
    b = spec.branch_scale
    proj = None
    if spec.confine_branches:
        # Routing is solved on the bare embeddings; 46 layers of random branches move the
        # residual stream far from them, and on the GPU (first run: fp16 engine vs fp32
        # reference) that made near-ties and other experts from layer 15 on. So every branch
        # output is projected onto the complement of span(embeddings) (vocab < hidden), and the
        # FFN norms are 1: the router (whose rows lie in that span, see lstsq's min-norm
        # solution) then sees the token's embedding at every layer, scaled by
        # rms(embedding)/rms(residual) > 0, which keeps its order and margins.
        basis = np.linalg.qr(embed.T.astype(np.float64))[0]           # d x v, orthonormal
        proj = (np.eye(d) - basis @ basis.T).astype(np.float32)

    def out(m):
        """A branch's output matrix (or stack of them), confined when the spec says so."""
        if proj is None:
            return m
        return proj @ m if m.ndim == 2 else np.einsum("ij,ejk->eik", proj, m)
    for i in range(spec.num_hidden_layers):
        p = f"blk.{i}."
        yield p + "attn_norm.weight", norm(d), "F32"
        if spec.q_lora_rank:
            yield p + "attn_q_a.weight", linear(spec.q_lora_rank, d), qt("in")
            yield p + "attn_q_a_norm.weight", norm(spec.q_lora_rank), "F32"
            yield p + "attn_q_b.weight", linear(h * q_head, spec.q_lora_rank), qt("in", spec.q_lora_rank)
        else:
            yield p + "attn_q.weight", linear(h * q_head, d), qt("in")
        yield p + "attn_kv_a_mqa.weight", linear(spec.kv_lora_rank + spec.qk_rope_head_dim, d), qt("in")
        yield p + "attn_kv_a_norm.weight", norm(spec.kv_lora_rank), "F32"
        yield p + "attn_kv_b.weight", linear(h * (spec.qk_nope_head_dim + spec.v_head_dim),
                                             spec.kv_lora_rank), qt("kv_b", spec.kv_lora_rank)
        yield p + "attn_output.weight", out(linear(d, h * spec.v_head_dim, b)), qt("out", h * spec.v_head_dim)
        ffn_norm = norm(d)
        if spec.confine_branches:
            ffn_norm = np.ones(d, dtype=np.float32)
        yield p + "ffn_norm.weight", ffn_norm, "F32"
        if i < spec.first_k_dense_replace:
            yield p + "ffn_gate.weight", linear(spec.intermediate_size, d), qt("in")
            yield p + "ffn_up.weight", linear(spec.intermediate_size, d), qt("in")
            yield p + "ffn_down.weight", out(linear(d, spec.intermediate_size, b)), qt("out", spec.intermediate_size)
            continue
        e, inter = spec.n_routed_experts, spec.moe_intermediate_size
        if spec.variant == "v3":
            weight, bias = router_v3(embed, ffn_norm, e)
            yield p + "ffn_gate_inp.weight", weight, "F32"
            yield p + "exp_probs_b.bias", bias, "F32"
            # top_k outputs weighted ~routed_scaling_factor / top_k each: a branch of RMS ~b
            down_scale = b * np.sqrt(spec.num_experts_per_tok) / spec.routed_scaling_factor
        else:
            yield p + "ffn_gate_inp.weight", router(embed, ffn_norm, e), "F32"
            # Routed outputs are weighted by softmax scores (~1/top_k each): scale them back up.
            down_scale = b * 2
        yield p + "ffn_gate_exps.weight", np.stack([linear(inter, d) for _ in range(e)]), "F16"
        yield p + "ffn_up_exps.weight", np.stack([linear(inter, d) for _ in range(e)]), "F16"
        yield p + "ffn_down_exps.weight", out(np.stack([linear(d, inter, down_scale) for _ in range(e)])), "F16"
        shared = inter * spec.n_shared_experts
        yield p + "ffn_gate_shexp.weight", linear(shared, d), qt("in")
        yield p + "ffn_up_shexp.weight", linear(shared, d), qt("in")
        yield p + "ffn_down_shexp.weight", out(linear(d, shared, b)), qt("out", shared)
    yield "output_norm.weight", norm(d), "F32"
    # Head: successor term + noise. The final hidden state has unit RMS, so
    # E[t] . h / d ~ 1 when h points along token t's embedding.
    # One cycle through the whole vocabulary (no fixed points, no short loops):
    # token order[k] votes for order[k + 1].
    order = rng.permutation(v)
    succ = np.empty(v, dtype=np.int64)
    succ[order] = np.roll(order, -1)
    head = rng.standard_normal((v, d), dtype=np.float32) * (spec.head_noise / np.sqrt(d))
    head[succ] += embed * (spec.successor_logit / d)
    yield "output.weight", head, qt("head")


def _write_gguf(path: Path, spec: TestModelSpec, bos_id: int, eos_id: int) -> list[dict]:
    import gguf
    import numpy as np
    w = gguf.GGUFWriter(str(path), "deepseek2")  # llama.cpp's arch name for V2 and V3
    w.add_name(f"ktlegacy synthetic DeepSeek-{spec.variant.upper()}")
    w.add_block_count(spec.num_hidden_layers)
    w.add_context_length(spec.max_position_embeddings)
    w.add_embedding_length(spec.hidden_size)
    w.add_feed_forward_length(spec.intermediate_size)
    w.add_head_count(spec.num_attention_heads)
    w.add_head_count_kv(spec.num_attention_heads)
    w.add_rope_freq_base(spec.rope_theta)
    w.add_layer_norm_rms_eps(spec.rms_norm_eps)
    w.add_leading_dense_block_count(spec.first_k_dense_replace)
    w.add_vocab_size(spec.vocab_size)
    w.add_kv_lora_rank(spec.kv_lora_rank)
    w.add_key_length(spec.qk_nope_head_dim + spec.qk_rope_head_dim)
    w.add_value_length(spec.v_head_dim)
    w.add_expert_feed_forward_length(spec.moe_intermediate_size)
    w.add_expert_count(spec.n_routed_experts)
    w.add_expert_used_count(spec.num_experts_per_tok)
    w.add_expert_shared_count(spec.n_shared_experts)
    w.add_expert_weights_scale(spec.routed_scaling_factor)
    if spec.q_lora_rank:
        w.add_q_lora_rank(spec.q_lora_rank)
    if spec.variant == "v3":
        w.add_expert_weights_norm(True)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    w.add_rope_dimension_count(spec.qk_rope_head_dim)
    rs = spec.rope_scaling
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(float(rs["factor"]))
    w.add_rope_scaling_orig_ctx_len(int(rs["original_max_position_embeddings"]))
    w.add_rope_scaling_yarn_log_mul(0.1 * float(rs["mscale_all_dim"]))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_K_M if spec.linear_quant == "q4_k_m" else gguf.LlamaFileType.MOSTLY_F16)
    w.add_bos_token_id(bos_id)
    w.add_eos_token_id(eos_id)
    listing = []
    for name, arr, qtype in _tensors(spec):
        if qtype in ("F16", "F32"):
            w.add_tensor(name, arr.astype(np.float16 if qtype == "F16" else np.float32))
        else:
            from .ggml_quant import quantize
            w.add_tensor(name, quantize(arr, qtype), raw_dtype=gguf.GGMLQuantizationType[qtype])
        listing.append({"name": name, "type": qtype, "shape": list(arr.shape)})
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return listing


@contextmanager
def staged_dir(dest: Path, force: bool):
    """Write a model directory all or nothing: yields ``DEST.partial``; on success it replaces
    ``dest``, on any failure it is removed and ``dest`` is left as it was."""
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()) and not force:
        raise KtlegacyError(f"{dest} is not empty: pass --force to replace it, or another --dest")
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)


def write_hf_files(directory: Path, spec: TestModelSpec, bos_id: int, eos_id: int) -> None:
    """What ``local_chat`` and the server read beside the GGUF: tokenizer config (with the chat
    template), special tokens, config.json, generation config, and the AutoConfig shim."""
    directory = Path(directory)
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "pad_token": EOS,
        "add_bos_token": True, "add_eos_token": False,
        "model_max_length": spec.max_position_embeddings,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }, indent=2))
    (directory / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS}, indent=2))
    (directory / "config.json").write_text(json.dumps(spec.config_dict(bos_id, eos_id), indent=2))
    (directory / "generation_config.json").write_text(json.dumps({
        "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": eos_id,
        "do_sample": False,
    }, indent=2))
    module, cls = {"v2": ("configuration_deepseek", "DeepseekV2Config"),
                   "v3": ("configuration_deepseek_v3", "DeepseekV3Config")}[spec.variant]
    (directory / "configuration_deepseek.py").write_text(
        '"""Resolve the config class from the installed ktransformers (ktlegacy test model)."""\n'
        f"from ktransformers.models.{module} import {cls}  # noqa: F401\n"
    )


def make_test_model(dest: Path, spec: TestModelSpec | None = None, force: bool = False) -> Path:
    """Write the synthetic checkpoint into ``dest`` (all files, or nothing on failure)."""
    spec = spec or TestModelSpec()
    dest = Path(dest)
    if spec.first_k_dense_replace >= spec.num_hidden_layers:
        raise KtlegacyError("the test model needs at least one MoE layer: "
                            f"use --layers > {spec.first_k_dense_replace}")
    if (spec.n_routed_experts % spec.n_group or spec.num_experts_per_tok % spec.topk_group
            or spec.topk_group > spec.n_group
            or spec.num_experts_per_tok // spec.topk_group > spec.n_routed_experts // spec.n_group):
        raise KtlegacyError("the router groups do not fit: n_routed_experts must split into n_group groups "
                            "and num_experts_per_tok into topk_group groups of at most a group's size")
    if spec.moe_intermediate_size % 256 or spec.hidden_size % 256:
        # KExpertsCPU's llamafile MoE splits rows in QK_K = 256 blocks on its multi-token path
        # (moe.cpp forward_many): a smaller size divides by zero there (SIGFPE)
        raise KtlegacyError("hidden and expert sizes must be multiples of 256 (llamafile's QK_K row blocks)")
    require("make-test-model", *MODEL_MODULES)
    with staged_dir(dest, force) as tmp:
        tok = build_tokenizer(spec)
        bos_id, eos_id = tok.token_to_id(BOS), tok.token_to_id(EOS)
        tok.save(str(tmp / "tokenizer.json"))
        write_hf_files(tmp, spec, bos_id, eos_id)
        listing = _write_gguf(tmp / GGUF_NAME, spec, bos_id, eos_id)
        (tmp / SPEC_NAME).write_text(json.dumps(
            {"spec": asdict(spec), "bos_token_id": bos_id, "eos_token_id": eos_id,
             "gguf": GGUF_NAME, "tensors": listing}, indent=2))
    return dest


def load_spec(model_dir: Path) -> dict:
    """The record ``make_test_model`` wrote (spec, special ids, tensor list)."""
    path = Path(model_dir) / SPEC_NAME
    if not path.is_file():
        raise KtlegacyError(f"{model_dir} holds no {SPEC_NAME}: make it with `invoke make-test-model --dest DIR`")
    return json.loads(path.read_text())


def reference_state_dict(model_dir: Path) -> dict:
    """The GGUF's tensors under the Hugging Face names DeepseekV2ForCausalLM uses (float32).

    Read with the ``gguf`` package (not ktransformers' loader), so the reference forward pass
    shares no loading code with the engine under test. Needs torch besides the testing extra
    (the test extra has it; the GPU machine has the engine's).
    """
    require("reference_state_dict", "gguf", "numpy", "torch", extra="test")
    import gguf
    import numpy as np
    import torch
    from gguf.quants import dequantize
    reader = gguf.GGUFReader(str(Path(model_dir) / GGUF_NAME))
    out = {}
    for t in reader.tensors:
        # F16/F32 data is already in numpy layout (reversed dims); quantized blocks dequantize to it
        arr = dequantize(t.data, t.tensor_type).astype(np.float32)
        for hf_name, tensor in _hf_names(t.name, torch.from_numpy(arr)):
            out[hf_name] = tensor
    return out


_SIMPLE = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa",
    "attn_kv_a_norm": "self_attn.kv_a_layernorm", "attn_kv_b": "self_attn.kv_b_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "ffn_gate_inp": "mlp.gate",
    "ffn_gate_shexp": "mlp.shared_experts.gate_proj", "ffn_up_shexp": "mlp.shared_experts.up_proj",
    "ffn_down_shexp": "mlp.shared_experts.down_proj",
    "attn_q_a": "self_attn.q_a_proj", "attn_q_a_norm": "self_attn.q_a_layernorm", "attn_q_b": "self_attn.q_b_proj",
}
_EXPERTS = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}


def _hf_names(name: str, tensor):
    if name == "token_embd.weight":
        yield "model.embed_tokens.weight", tensor
        return
    if name == "output_norm.weight":
        yield "model.norm.weight", tensor
        return
    if name == "output.weight":
        yield "lm_head.weight", tensor
        return
    _blk, layer, kind, _w = name.split(".")
    prefix = f"model.layers.{layer}."
    if kind == "exp_probs_b":  # V3's score-correction bias
        yield f"{prefix}mlp.gate.e_score_correction_bias", tensor
        return
    if kind in _EXPERTS:
        for e in range(tensor.shape[0]):
            yield f"{prefix}mlp.experts.{e}.{_EXPERTS[kind]}.weight", tensor[e].clone()
        return
    if kind not in _SIMPLE:
        raise KtlegacyError(f"unexpected tensor {name} in the test model GGUF")
    yield f"{prefix}{_SIMPLE[kind]}.weight", tensor
