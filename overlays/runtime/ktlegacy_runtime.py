"""ktlegacy runtime: the decisions the patched ktransformers code makes at run time.

The ktlegacy overlays write this module into the tree as ``ktransformers/ktlegacy_runtime.py``
and rewrite upstream call sites to ask it (``from ktransformers import ktlegacy_runtime``).
Every sm80-only choice upstream hard-codes (bf16, two Triton stages, FlashAttention 2) is
decided here from the compute capability of the GPU in use, so one patched tree runs on a
V100/T4 and still takes the upstream fast path on an Ampere+ card.

Environment:
  KTLEGACY_EMULATE_CC=7.5   pretend the GPU has this compute capability (exercise the
                            legacy branches on an H100)
  KTLEGACY_PREFILL=sdpa     prefill attention through SDPA (default)
  KTLEGACY_PREFILL=windows  route to upstream's forward_windows instead, for comparison
"""

from __future__ import annotations

import math
import os

import torch

# The --arch given to `ktlegacy patch` (substituted when the overlay writes this file). The tree
# has no ktlegacy: _ARCH_CC copies ktlegacy/facts.py's ARCHES (tests/test_facts.py checks it).
BUILD_ARCH = "@KTLEGACY_BUILD_ARCH@"
_ARCH_CC = {"sm70": (7, 0), "sm75": (7, 5)}
BUILD_CC = _ARCH_CC.get(BUILD_ARCH, (7, 5))

EMULATE_CC_ENV = "KTLEGACY_EMULATE_CC"
PREFILL_ENV = "KTLEGACY_PREFILL"
PREFILL_PATHS = ("sdpa", "windows")

_device_cc: dict = {}


def _parse_cc(text: str) -> tuple:
    try:
        major, _, minor = text.strip().partition(".")
        return int(major), int(minor or 0)
    except ValueError:
        raise ValueError(f"{EMULATE_CC_ENV}={text!r}: expected a compute capability such as 7.0 or 7.5") from None


def compute_capability() -> tuple:
    """(major, minor) of the current CUDA device; KTLEGACY_EMULATE_CC overrides it; without
    CUDA, the capability of the arch this tree was patched for."""
    emulated = os.environ.get(EMULATE_CC_ENV, "").strip()
    if emulated:
        return _parse_cc(emulated)
    if not torch.cuda.is_available():
        return BUILD_CC
    index = torch.cuda.current_device()
    if index not in _device_cc:  # cached: the decode launch asks on every step
        _device_cc[index] = tuple(torch.cuda.get_device_capability(index))
    return _device_cc[index]


def is_legacy() -> bool:
    """True below Ampere (sm80): no FlashAttention 2, no Marlin, no native bf16."""
    return compute_capability() < (8, 0)


def triton_decode_num_stages() -> int:
    """Software-pipelining stages of the Triton MLA decode kernel: 1 below sm80, 2 on sm80+.

    Below sm80 Triton has no async-copy pipelining, so a second stage buys nothing there; with
    Triton 3.1.0 both counts compile to the same 52,224 B of shared memory on sm70/sm75
    (docs/torch-pin.md), and the community recipe that runs on real T4s/V100s uses 1, so we
    keep the configuration that is known to work. On sm80+ two stages pipeline the K/V loads:
    on an H100 the kernel takes 49.5 us with 2 stages and 85.2 us with 1."""
    return 1 if is_legacy() else 2


def default_dtype(preferred: torch.dtype = torch.bfloat16) -> torch.dtype:
    """The dtype the model runs in: ``preferred`` (upstream's choice, bf16 by default),
    except that bf16 becomes fp16 below sm80 (Volta has no bf16, Turing only emulates it)."""
    if preferred == torch.bfloat16 and is_legacy():
        return torch.float16
    return preferred


# Architectures the legacy engine serves only through its balance_serve backend: local_chat's
# custom_models (what the ktransformers backend loads) has no entry for them, and their only rule
# files are the *-serve.yaml ones (balance_serve attention on flashinfer). Read at v0.3.x-v0.7.0.
BALANCE_SERVE_ONLY = ("Qwen3MoeForCausalLM", "Glm4MoeForCausalLM", "SmallThinkerForCausalLM", "Qwen3NextForCausalLM")


def _architecture(model_dir) -> str | None:
    import json
    try:
        with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as fh:
            return (json.load(fh).get("architectures") or [None])[0]
    except (OSError, TypeError, ValueError):
        return None


def check_server_backend(backend_type: str, model_dir=None) -> None:
    """Stop the server in one line, before it loads anything, when below sm80 it would start a
    backend or a model that only runs on sm80+: the balance_serve backend (flashinfer's batch
    MLA kernels, its C++ scheduler), and the models only that backend serves."""
    if not is_legacy():
        return
    cc = "%d.%d" % compute_capability()
    arch = _architecture(model_dir)
    model = arch or "the model"
    if backend_type == "balance_serve":
        raise SystemExit(
            f"ktlegacy: cannot serve {model} with --backend_type balance_serve on compute capability {cc}: "
            "that backend runs on flashinfer's batch kernels and a scheduler built for sm80+ only; "
            "use --backend_type ktransformers with a rule file without -serve")
    if backend_type == "ktransformers" and arch in BALANCE_SERVE_ONLY:
        raise SystemExit(
            f"ktlegacy: cannot serve {arch} on compute capability {cc}: upstream runs this model only "
            "through the balance_serve backend (flashinfer, sm80+), so there is no sm<80 path for it; "
            "serve a DeepSeek-V2/V3, Qwen2-MoE, Llama or Mixtral model instead")


def prefill_path() -> str:
    """Which prefill attention runs: ``sdpa`` (default) or upstream's ``windows`` path."""
    value = os.environ.get(PREFILL_ENV, "").strip().lower() or "sdpa"
    if value not in PREFILL_PATHS:
        raise ValueError(f"{PREFILL_ENV}={os.environ.get(PREFILL_ENV)!r}: use one of {', '.join(PREFILL_PATHS)}")
    return value


def _compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype SDPA runs in where upstream called flash_attn_func (which takes only fp16/bf16):
    half-precision inputs run in fp16 on a legacy GPU (bf16 is emulated or absent there) and
    keep their dtype elsewhere; fp32 inputs (CPU, tests) stay fp32."""
    if dtype in (torch.float16, torch.bfloat16) and device.type == "cuda" and is_legacy():
        return torch.float16
    return dtype


def _bottom_right_causal_mask(q_len: int, k_len: int, device) -> torch.Tensor:
    """Boolean mask, True where query i may attend key j: j <= i + (k_len - q_len).
    flash-attn >= 2.1 aligns the causal diagonal to the bottom-right corner."""
    rows = torch.arange(q_len, device=device).unsqueeze(1)
    cols = torch.arange(k_len, device=device).unsqueeze(0)
    return cols <= rows + (k_len - q_len)


def sdpa_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float | None = None,
                 causal: bool = True) -> torch.Tensor:
    """``flash_attn_func(q, k, v, softmax_scale=..., causal=...)`` on SDPA.

    Layout (batch, seq, heads, head_dim) in and out, like flash-attn. k/v may have fewer heads
    than q (GQA/MQA); v's head dim may differ from q/k's (the output has v's). The result has
    q's dtype.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("sdpa_prefill expects (batch, seq, heads, head_dim) tensors")
    batch, q_len, q_heads, head_dim = q.shape
    k_len, kv_heads = k.shape[1], k.shape[2]
    if q_heads % kv_heads:
        raise ValueError(f"sdpa_prefill: {q_heads} query heads are not a multiple of {kv_heads} key/value heads")
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(head_dim)
    out_dtype = q.dtype
    dtype = _compute_dtype(q.dtype, q.device)

    # (b, s, h, d) -> (b, h, s, d)
    qt, kt, vt = (t.to(dtype).transpose(1, 2) for t in (q, k, v))
    if kv_heads != q_heads:  # flash-attn maps query head i to kv head i // (q_heads // kv_heads)
        group = q_heads // kv_heads
        kt = kt.repeat_interleave(group, dim=1)
        vt = vt.repeat_interleave(group, dim=1)

    mask = None
    fully_masked = None
    if causal and q_len == k_len:
        out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=softmax_scale)
    else:
        if causal:
            mask = _bottom_right_causal_mask(q_len, k_len, q.device)
            if q_len > k_len:  # the first q_len - k_len queries see no key: flash-attn returns 0
                fully_masked = ~mask.any(dim=-1)
                mask = mask | fully_masked.unsqueeze(-1)
        out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=softmax_scale)
    if fully_masked is not None:
        out = out.masked_fill(fully_masked.view(1, 1, q_len, 1), 0)
    return out.transpose(1, 2).contiguous().to(out_dtype)
