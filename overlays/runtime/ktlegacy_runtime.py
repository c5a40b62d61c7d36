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

# The --arch given to `ktlegacy patch` and its compute capability. The tree has no ktlegacy: the
# runtime overlay (overlays/10_runtime.py) writes these "@...@" values in from ktlegacy/core/facts.py.
BUILD_ARCH = "@KTLEGACY_BUILD_ARCH@"
BUILD_CC = "@KTLEGACY_BUILD_CC@"

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


# ---------------------------------------------------------------- routed experts of long prompts on the GPU
# The CPU experts (KExpertsCPU) compute a prompt's routed experts on the CPU: for every MoE layer
# the whole prompt goes through llamafile GEMMs, which is nearly all of a prefill's time. For a long
# prompt it is cheaper to send the layer's quantised expert weights to the GPU once (they stay where
# they are: the GGUF's mmap on the host) and compute there: the copy costs the layer's expert bytes
# over PCIe, the CPU path costs tokens x top_k expert GEMMs. Prompts of at least
# KTLEGACY_GPU_PREFILL_MIN_TOKENS tokens take the GPU path (0: never); the dequantised weights of
# at most KTLEGACY_GPU_PREFILL_MIB MiB of experts are on the GPU at a time. Decode (one token) and
# shorter prompts stay on the CPU. On any CUDA out-of-memory the call falls back to the CPU path.
GPU_PREFILL_MIN_TOKENS_ENV = "KTLEGACY_GPU_PREFILL_MIN_TOKENS"
GPU_PREFILL_MIB_ENV = "KTLEGACY_GPU_PREFILL_MIB"
GPU_PREFILL_MIN_TOKENS = "@KTLEGACY_GPU_PREFILL_MIN_TOKENS@"   # facts.GPU_PREFILL_MIN_TOKENS, written in at patch time
GPU_PREFILL_MIB = "@KTLEGACY_GPU_PREFILL_MIB@"                 # facts.GPU_PREFILL_MIB, the same

# ggml type id -> (name, values per block, bytes per block): the types GGUF experts come in.
GGML_BLOCKS = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 6: ("Q5_0", 32, 22), 8: ("Q8_0", 32, 34),
               10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176),
               14: ("Q6_K", 256, 210), 23: ("IQ4_XS", 256, 136), 30: ("BF16", 1, 2)}

_gpu_prefill_notes: set = set()


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"{name}={text!r}: expected a whole number >= 0")
    return value


def gpu_prefill_min_tokens():
    """Prompt length from which the routed experts run on the GPU (0: never), or "auto": measured
    on the first prompt of >= AUTO_CALIBRATE_TOKENS tokens (see AutoThreshold)."""
    text = os.environ.get(GPU_PREFILL_MIN_TOKENS_ENV, "").strip().lower()
    if text == AUTO or (not text and GPU_PREFILL_MIN_TOKENS == AUTO):
        return AUTO
    try:
        return _env_int(GPU_PREFILL_MIN_TOKENS_ENV, GPU_PREFILL_MIN_TOKENS)
    except ValueError:
        raise ValueError(f"{GPU_PREFILL_MIN_TOKENS_ENV}={text!r}: expected auto or a whole number >= 0") from None


def _note_once(key: str, text: str) -> None:
    if key not in _gpu_prefill_notes:
        _gpu_prefill_notes.add(key)
        import sys
        print(f"ktlegacy: {text}", file=sys.stderr, flush=True)


def _f16_column(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The little-endian fp16 at byte ``start`` of every block, as float32 (n_blocks, 1)."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()


def _dequant_q4_0(b: torch.Tensor) -> torch.Tensor:
    d, qs = _f16_column(b, 0), b[:, 2:18]
    q = torch.cat([qs & 0xF, qs >> 4], dim=1).float() - 8
    return d * q


def _dequant_q5_0(b: torch.Tensor) -> torch.Tensor:
    d, qs = _f16_column(b, 0), b[:, 6:22]
    qh = b[:, 2:6].long()
    qh = qh[:, 0] | qh[:, 1] << 8 | qh[:, 2] << 16 | qh[:, 3] << 24
    high = (qh.unsqueeze(1) >> torch.arange(32, device=b.device)) & 1
    q = torch.cat([qs & 0xF, qs >> 4], dim=1).long() | high << 4
    return d * (q - 16).float()


def _dequant_q8_0(b: torch.Tensor) -> torch.Tensor:
    return _f16_column(b, 0) * b[:, 2:34].contiguous().view(torch.int8).float()


def _k_scales(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's get_scale_min_k4 over the 12 packed bytes of a Q4_K/Q5_K block: (scales, mins), (n, 8)."""
    q = packed.long()
    sc = torch.cat([q[:, 0:4] & 63, (q[:, 8:12] & 0xF) | (q[:, 0:4] >> 6) << 4], dim=1)
    mn = torch.cat([q[:, 4:8] & 63, (q[:, 8:12] >> 4) | (q[:, 4:8] >> 6) << 4], dim=1)
    return sc.float(), mn.float()


def _dequant_q4_k(b: torch.Tensor) -> torch.Tensor:
    d, dmin = _f16_column(b, 0), _f16_column(b, 2)
    sc, mn = _k_scales(b[:, 4:16])
    qs = b[:, 16:144].view(-1, 4, 32)
    q = torch.stack([qs & 0xF, qs >> 4], dim=2).view(-1, 8, 32).float()
    return ((d * sc).unsqueeze(-1) * q - (dmin * mn).unsqueeze(-1)).view(-1, 256)


def _dequant_q5_k(b: torch.Tensor) -> torch.Tensor:
    d, dmin = _f16_column(b, 0), _f16_column(b, 2)
    sc, mn = _k_scales(b[:, 4:16])
    qh, qs = b[:, 16:48], b[:, 48:176].view(-1, 4, 32)
    high = (qh.unsqueeze(1) >> torch.arange(8, device=b.device, dtype=torch.uint8).view(1, 8, 1)) & 1
    q = torch.stack([qs & 0xF, qs >> 4], dim=2).view(-1, 8, 32) | high << 4
    return ((d * sc).unsqueeze(-1) * q.float() - (dmin * mn).unsqueeze(-1)).view(-1, 256)


def _dequant_q6_k(b: torch.Tensor) -> torch.Tensor:
    ql, qh = b[:, 0:128].view(-1, 2, 64), b[:, 128:192].view(-1, 2, 32)
    sc = b[:, 192:208].contiguous().view(torch.int8).float().view(-1, 2, 4, 2, 1)
    d = _f16_column(b, 208).view(-1, 1, 1, 1, 1)
    lo, hi = ql[:, :, :32], ql[:, :, 32:]
    q = torch.stack([lo & 0xF, hi & 0xF, lo >> 4, hi >> 4], dim=2)
    h = torch.stack([qh & 3, (qh >> 2) & 3, (qh >> 4) & 3, (qh >> 6) & 3], dim=2)
    q = (q | h << 4).float().view(-1, 2, 4, 2, 16) - 32
    return (d * sc * q).view(-1, 256)


def _dequant_float(name: str):
    dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[name]
    return lambda b: b.contiguous().view(dtype).float()


# Dequantisers in torch (any device): the fallback for the types below where our kernels are not
# built, and the CPU's (tests).
TORCH_DEQUANT = {"Q4_0": _dequant_q4_0, "Q5_0": _dequant_q5_0, "Q8_0": _dequant_q8_0, "Q4_K": _dequant_q4_k,
                 "Q5_K": _dequant_q5_k, "Q6_K": _dequant_q6_k,
                 **{n: _dequant_float(n) for n in ("F32", "F16", "BF16")}}
UPSTREAM_GPU_DEQUANT = ("Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS")
DEQUANT_IMPLS = ("ktlegacy", "torch", "upstream")
_GGUF_OPS: list = []    # [(ktlegacy_gguf_ops or None, ggml type ids it decodes)], imported once


def gguf_ops():
    """(ktlegacy_gguf_ops, the ggml type ids it decodes): the CUDA kernels the gguf-linear overlay
    builds beside the other extensions (one pass over the blocks, decoded in registers, fp16 or
    fp32 out), or (None, set()) where this build has none (a CPU-only install)."""
    if not _GGUF_OPS:
        try:
            import ktlegacy_gguf_ops as ops
            found = (ops, {int(t) for t in ops.supported_types()})
        except (ImportError, OSError, AttributeError):
            found = (None, set())
        _GGUF_OPS.append(found)
    return _GGUF_OPS[0]


def gpu_dequant_impl(ggml_type: int) -> str | None:
    """Which dequantiser a CUDA tensor of ``ggml_type`` blocks gets (None: none), fastest first:
    our kernels (one pass; bench/results/gpu_linear_kernels_h100.json's prefill rows minus its fp16
    matmul imply ~1.5 TB/s of fp16 written for Q4_K: not timed on their own, nor in this path yet), the torch ones (~15 element-wise passes in fp32: 12.5 ms for a V2-Lite
    layer's 334 MB of experts, bench/results/gpu_prefill_path_h200.json), upstream's
    KTransformersOps kernels (115 ms for the same layer; they serve the types only they decode)."""
    name = GGML_BLOCKS.get(ggml_type, ("",))[0]
    if ggml_type in gguf_ops()[1]:
        return "ktlegacy"
    if name in TORCH_DEQUANT:
        return "torch"
    return "upstream" if name in UPSTREAM_GPU_DEQUANT else None


def dequantize(raw, ggml_type: int, device, dtype: torch.dtype, impl: str | None = None) -> torch.Tensor:
    """The values of ``raw`` (uint8 numpy or tensor: whole ggml blocks of ``ggml_type``) as a flat
    ``dtype`` tensor on ``device``. ``impl`` (one of DEQUANT_IMPLS): force one dequantiser; None
    (default): on CUDA the fastest this build has for the type (gpu_dequant_impl), elsewhere torch's.
    Our kernels read 4-byte words: a tensor that starts elsewhere is copied to an aligned one first."""
    if ggml_type not in GGML_BLOCKS:
        raise NotImplementedError(f"ggml type {ggml_type}")
    name, per_block, block_bytes = GGML_BLOCKS[ggml_type]
    device = torch.device(device)
    if impl is None:
        impl = gpu_dequant_impl(ggml_type) if device.type == "cuda" else "torch"
    if impl not in DEQUANT_IMPLS:
        raise ValueError(f"dequantiser {impl!r}: use one of {', '.join(DEQUANT_IMPLS)}")
    if impl == "upstream" and device.type == "cuda" and name in UPSTREAM_GPU_DEQUANT:
        import numpy as np
        from ktransformers.util.custom_gguf import GGML_DEQUANTIZE_GPU
        data = raw.cpu().numpy() if isinstance(raw, torch.Tensor) else np.asarray(raw)
        return GGML_DEQUANTIZE_GPU[name](data, device).view(-1).to(dtype)
    data = raw if isinstance(raw, torch.Tensor) else torch.from_numpy(raw)
    data = data.to(device, non_blocking=False).reshape(-1)
    ops, types = gguf_ops()
    if impl == "ktlegacy" and device.type == "cuda" and ggml_type in types:
        if data.data_ptr() % 4:
            data = data.clone()     # e.g. a Q3_K part (110-byte blocks) at an odd offset of a staged run
        blocks = data.numel() // block_bytes
        out = torch.empty(blocks * per_block, dtype=dtype if dtype in (torch.float16, torch.float32) else torch.float32,
                          device=device)
        ops.dequantize(data, ggml_type, blocks, per_block, 0, blocks, out)   # one block a row: any layout
        return out.to(dtype)
    if name not in TORCH_DEQUANT:
        raise NotImplementedError(f"{name} without a GPU dequantiser (ktlegacy_gguf_ops or upstream's) here")
    return TORCH_DEQUANT[name](data.view(-1, block_bytes)).view(-1).to(dtype)


def _runs(counts: list, n_experts: int, run: int) -> list:
    """(first, last) expert runs of ``run`` consecutive experts that some token routes to."""
    out = []
    for first in range(0, n_experts, run):
        last = min(n_experts, first + run)
        if sum(counts[first:last]):
            out.append((first, last))
    return out


def run_size(n_experts: int, intermediate: int, hidden: int, dtype, budget_bytes: int, staged: bool) -> int:
    """Experts per run: as many as fit ``budget_bytes`` dequantised (three projections + one fp32
    transient); staged, at least four runs a layer, so copies overlap compute."""
    run = max(1, budget_bytes // (intermediate * hidden * (3 * dtype.itemsize + 4)))
    return min(run, -(-n_experts // 4)) if staged else run


# ---------------------------------------------------------------- the experts in page-locked memory
# A prompt on the GPU path copies every MoE layer's quantised experts to the GPU. From the GGUF's
# mmap that is a CPU copy into a pinned buffer first (bench/results/peer_h100.json: 23 of 32 ms a
# layer at 512 tokens, 14.4 GB/s); from page-locked memory the GPU reads them directly at the
# link's speed. So, where the GPU path can run, KExpertsCPU.load (overlay 68) hands its weights to
# pin_experts: one anonymous buffer per layer, filled from the mmap and registered with CUDA
# (cudaHostRegister: no power-of-two rounding, unlike torch's pinned allocator). The CPU backend
# is built on these copies, so the experts are in RAM once, as before (the GGUF's page cache is
# clean and can be dropped), only not pageable. A layer is not pinned, and keeps reading the mmap,
# where it would leave less than PIN_RESERVE_MIB of MemAvailable, or CUDA refuses the
# registration; either is said once.
PIN_RESERVE_MIB = 4096
_PINNED: list = []          # (first address, end address, buffer) of every registered buffer
_PIN_REFUSED: list = []     # cudaHostRegister's error, once it refused: later layers do not try


def is_pinned(array) -> bool:
    """Whether a numpy array lies in a buffer pin_experts registered."""
    try:
        start = int(array.ctypes.data)
    except AttributeError:
        return False
    return any(lo <= start and start + int(array.nbytes) <= hi for lo, hi, _ in _PINNED)


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def pin_experts(experts, w: dict, register=None) -> dict:
    """KExpertsCPU.load's weights ``w`` with gate/up/down moved into one page-locked buffer (see
    above), or ``w`` itself where that does not apply: the GPU path is off or has no GPU, the
    experts are per-expert tensors or of a type without a GPU dequantiser, the backend is not
    llamafile (AMX repacks its own copy), memory is short, or the registration fails.
    ``register(address, nbytes)`` -> error code (0: done); default cudaHostRegister."""
    import warnings
    import numpy as np
    try:
        if gpu_prefill_min_tokens() == 0:
            return w
    except ValueError:
        return w                    # a bad setting is reported by the first prompt, in one line
    if not isinstance(w, dict):
        return w
    names = ("gate", "up", "down")
    arrays = [w.get(n) for n in names]
    if (getattr(experts, "backend", "llamafile") != "llamafile"
            or any(not isinstance(a, np.ndarray) or a.ndim != 1 for a in arrays)
            or any(gpu_dequant_impl(w.get(f"{n}_type")) is None for n in names)):
        return w
    try:
        device = torch.device(object.__getattribute__(experts, "out_device"))
    except (AttributeError, RuntimeError):
        return w
    if device.type != "cuda" or _PIN_REFUSED or (register is None and not torch.cuda.is_available()):
        return w
    total = sum(int(a.nbytes) for a in arrays)
    available = _mem_available()
    if available is not None and total + (PIN_RESERVE_MIB << 20) > available:
        _note_once("pin-memory", f"experts of {getattr(experts, 'key', 'a layer')} and later stay pageable: pinning "
                                 f"{total >> 20} MiB would leave less than {PIN_RESERVE_MIB} MiB of MemAvailable "
                                 f"({available >> 20} MiB); prompts copy them through pinned buffers (slower)")
        return w
    if register is None:
        def register(address, nbytes):
            return int(torch.cuda.cudart().cudaHostRegister(address, nbytes, 0))
    buf = np.empty(total, dtype=np.uint8)
    try:
        code = register(int(buf.ctypes.data), total)
    except (RuntimeError, AttributeError, OSError) as exc:    # no usable cudart: the same as a refusal
        code = f"{type(exc).__name__}: {exc}"
    if code != 0:
        _PIN_REFUSED.append(code)
        _note_once("pin-refused", f"CUDA refused to page-lock the experts (cudaHostRegister: {code}): "
                                  "prompts copy them through pinned buffers (slower)")
        return w
    _PINNED.append((int(buf.ctypes.data), int(buf.ctypes.data) + total, buf))   # never freed: the backend reads it
    out, offset = dict(w), 0
    with warnings.catch_warnings():     # the GGUF mmap is read-only; it is only read
        warnings.simplefilter("ignore", UserWarning)
        for name, array in zip(names, arrays):
            n = int(array.nbytes)
            view = buf[offset:offset + n]
            torch.from_numpy(view).copy_(torch.from_numpy(array.view(np.uint8)))
            out[name] = view.view(array.dtype)
            offset += n
    return out


class Staging:
    """Raw GGUF expert bytes to a GPU on a side stream, while the GPU computes on the run before.
    Experts that ``pin_experts`` put in page-locked memory at load are copied straight from there
    (DMA at the link's speed); others go through two pinned host buffers: a worker thread copies a
    run of experts from the mmap into pinned buffer k (torch's multi-threaded CPU copy) and queues
    its host-to-device copy. A pageable ``.to(device)`` of the same bytes goes through the driver's
    own staging at a fraction of the link's speed (bench/results/gpu_prefill_path_h200.json: 5.3
    vs 54 GB/s)."""

    def __init__(self):
        self._pool = None
        self._pinned = [None, None]
        self._done = [None, None]
        self._slot = 0
        self._streams: dict = {}
        self.prefetched = None          # (key, Future) of the next layer's first run
        self.failed = ""                # why staging was turned off (then runs are copied unstaged)

    def submit(self, parts: list, device):
        """parts: [(name, uint8 numpy array, ggml type)]; a Future of (gpu bytes, {name: (view, type)}, event)."""
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="ktlegacy-staging")
        slot, self._slot = self._slot, self._slot ^ 1
        return self._pool.submit(self._copy, slot, parts, torch.device(device))

    def _copy(self, slot: int, parts: list, device):
        import warnings
        total = sum(int(a.nbytes) for _, a, _ in parts)
        staged = sum(int(a.nbytes) for _, a, _ in parts if not is_pinned(a))
        buf = None
        if staged:
            if self._done[slot] is not None:
                self._done[slot].synchronize()      # the buffer's last host-to-device copy has read it
            buf = self._pinned[slot]
            if buf is None or buf.numel() < staged:
                self._pinned[slot] = buf = None
                buf = self._pinned[slot] = torch.empty(staged, dtype=torch.uint8, pin_memory=True)
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device)
        views, offset, at = {}, 0, 0
        with torch.cuda.device(device), torch.cuda.stream(stream):
            gpu = torch.empty(total, dtype=torch.uint8, device=device)
            for name, array, ggml_type in parts:
                n = int(array.nbytes)
                with warnings.catch_warnings():   # the GGUF mmap is read-only; it is only read
                    warnings.simplefilter("ignore", UserWarning)
                    source = torch.from_numpy(array.reshape(-1))
                if buf is not None and not is_pinned(array):
                    buf[at:at + n].copy_(source)
                    source, at = buf[at:at + n], at + n
                gpu[offset:offset + n].copy_(source, non_blocking=True)
                views[name] = (gpu[offset:offset + n], ggml_type)
                offset += n
            event = torch.cuda.Event()
            event.record(stream)
        self._done[slot] = event
        return gpu, views, event

    @staticmethod
    def take(future, device):
        """The run's {name: (bytes on the GPU, type)}, ordered after its copy on the current stream."""
        gpu, views, event = future.result()
        current = torch.cuda.current_stream(device)
        current.wait_event(event)
        gpu.record_stream(current)
        return views


STAGING = Staging()


def routed_experts(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, tensors: dict,
                   n_experts: int, intermediate: int, budget_bytes: int, dequant=dequantize,
                   staging: Staging | None = None, layer_key=None, next_layer=None) -> torch.Tensor:
    """One MoE layer's routed experts on ``x``'s device: sum over k of weights[t, k] * down(silu(gate(x))
    * up(x)) of expert expert_ids[t, k], as KExpertsCPU's backend computes it.

    ``tensors``: {"gate"|"up"|"down": (raw uint8 bytes of all experts, ggml type)} in GGUF order
    (gate/up: experts x intermediate x hidden; down: experts x hidden x intermediate). Experts go to
    the device in runs of consecutive ones whose dequantised projection fits ``budget_bytes``;
    runs no token routes to are skipped. ``staging`` (CUDA, dequantisers that read GPU bytes): runs are copied
    through it, run i + 1 while run i computes, in at least four runs per layer; ``next_layer``
    ((key, tensors, device)): the next MoE layer's first run is copied to its GPU while this layer
    finishes (used there if that layer's first run is the same; the same size: same model).
    Returns (tokens, hidden) in ``x``'s dtype."""
    tokens, hidden = x.shape
    top_k = expert_ids.shape[1]
    device, dtype = x.device, x.dtype
    flat = expert_ids.reshape(-1).to(device=device, dtype=torch.long)
    order = torch.argsort(flat, stable=True)
    token_of = order // top_k
    weight_of = weights.reshape(-1).to(device=device, dtype=torch.float32)[order]
    counts = torch.bincount(flat, minlength=n_experts).tolist()
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    out = torch.zeros((tokens, hidden), dtype=torch.float32, device=device)
    run = run_size(n_experts, intermediate, hidden, dtype, budget_bytes, staging is not None)

    def parts(raw: dict, first: int, last: int) -> list:
        out_parts = []
        for name, (data, ggml_type) in raw.items():
            data = data.reshape(-1)
            per = data.shape[0] // n_experts
            out_parts.append((name, data[first * per:last * per], ggml_type))
        return out_parts

    plan = _runs(counts, n_experts, run)
    slots = _padded_slots(counts, plan).to(device)   # one small copy a layer, where counts.tolist() waited anyway
    futures = {}
    if staging is not None:
        pre, staging.prefetched = staging.prefetched, None
        if pre is not None:
            if plan and pre[0] == (layer_key, str(device), plan[0]):
                futures[plan[0]] = pre[1]
            else:
                pre[1].result()          # not this run: let its copy finish, drop it
        if plan and plan[0] not in futures:
            futures[plan[0]] = staging.submit(parts(tensors, *plan[0]), device)
    for i, (first, last) in enumerate(plan):
        if staging is not None:
            if i + 1 < len(plan):
                futures[plan[i + 1]] = staging.submit(parts(tensors, *plan[i + 1]), device)
            elif next_layer is not None:
                key, next_tensors, next_device = next_layer
                staging.prefetched = ((key, str(next_device), (0, run)),
                                      staging.submit(parts(next_tensors, 0, run), next_device))
            got = staging.take(futures.pop((first, last)), device)
            w = {name: dequant(data, ggml_type, device, dtype) for name, (data, ggml_type) in got.items()}
            del got             # the raw bytes: freed once the dequantisers have read them
        else:
            w = {name: dequant(data, ggml_type, device, dtype) for name, data, ggml_type in parts(tensors, first, last)}
        gate = w["gate"].view(last - first, intermediate, hidden)
        up = w["up"].view(last - first, intermediate, hidden)
        down = w["down"].view(last - first, hidden, intermediate)
        lo, hi = starts[first], starts[last]
        _run_mlp(x, out, token_of[lo:hi], weight_of[lo:hi], slots[lo:hi], max(counts[first:last]), gate, up, down)
        del w, gate, up, down
    return out.to(dtype)


def _padded_slots(counts: list, plan: list) -> torch.Tensor:
    """For every (token, expert) assignment, sorted by expert: its row in its run's zero-padded
    (experts of the run x most rows of one of them) batch (see _run_mlp), i.e. its rank within its
    expert + the expert's place in the run x the run's most rows."""
    import numpy as np
    offset = np.zeros(len(counts), dtype=np.int64)
    for first, last in plan:
        most = max(counts[first:last])
        offset[first:last] = np.arange(last - first) * most
    starts = np.cumsum([0] + counts[:-1])
    return torch.from_numpy(np.arange(sum(counts)) + np.repeat(offset - starts, counts))


def _run_mlp(x, out, rows, weight, slot, most: int, gate, up, down) -> None:
    """One run's experts on their tokens, added into ``out``: the rows of the run's experts are
    gathered into one zero-padded (experts, most rows, hidden) batch, so each projection is one
    batched GEMM (a few launches a run, where one GEMM chain per expert costs ~10 launches per
    expert: most of a 512-token layer's GPU time). Padding rows compute zeros and are dropped.
    ``rows``/``weight``/``slot``: the run's assignments' tokens, routing weights and padded rows
    (on the device: nothing here waits for the GPU)."""
    if rows.numel() == 0:
        return
    experts = gate.shape[0]
    padded = x.new_zeros((experts * most, x.shape[1]))
    padded.index_copy_(0, slot, x.index_select(0, rows))
    padded = padded.view(experts, most, x.shape[1])
    h = torch.bmm(padded, gate.transpose(1, 2))
    h = torch.nn.functional.silu(h).mul_(torch.bmm(padded, up.transpose(1, 2)))
    y = torch.bmm(h, down.transpose(1, 2)).view(experts * most, -1).index_select(0, slot)
    out.index_add_(0, rows, y.float() * weight.unsqueeze(1))


# ---------------------------------------------------------------- KTLEGACY_GPU_PREFILL_MIN_TOKENS=auto
AUTO = "auto"
AUTO_CALIBRATE_TOKENS = 256     # the shortest prompt the calibration runs on (shorter ones: CPU until then)
AUTO_LAYERS = 3                 # MoE layers timed both ways; the first is a warm-up (page cache, kernels)


class AutoThreshold:
    """The prompt length from which the GPU path is faster, measured on this host.

    On the first prompt of >= AUTO_CALIBRATE_TOKENS tokens, its first AUTO_LAYERS MoE layers run
    both paths: the CPU backend (timed), a copy-only pass of the layer's experts through the
    staging (timed: the link and the mmap), then the GPU path (timed; its output is used). Per
    layer, the CPU costs ``c`` seconds a token; the GPU path costs the copy ``F`` plus ``g`` a token
    (whatever the overlapped copy did not hide is counted in ``F``: conservative). The GPU path wins
    from ``n* = F / (c - g)`` tokens (never, where c <= g). Layers after the warm-up one are
    averaged. The chosen threshold and its inputs are printed once."""

    def __init__(self):
        self.threshold = None
        self.samples: list = []     # (tokens, cpu_s, copy_s, gpu_s, bytes)
        self.calibrating = False
        self.detail = ""

    @staticmethod
    def decide(samples: list) -> tuple:
        """(threshold, detail) from (tokens, cpu_s, copy_s, gpu_s, bytes) samples (the first dropped
        when there are more than one)."""
        use = samples[1:] if len(samples) > 1 else samples
        n = sum(s[0] for s in use) / len(use)
        cpu = sum(s[1] for s in use) / len(use)
        copy = sum(s[2] for s in use) / len(use)
        gpu = sum(s[3] for s in use) / len(use)
        nbytes = sum(s[4] for s in use) / len(use)
        c, g = cpu / n, max(0.0, gpu - copy) / n
        threshold = math.ceil(copy / (c - g)) if c > g else 0
        detail = (f"per MoE layer at {n:.0f} tokens: CPU experts {cpu * 1e3:.1f} ms ({c * 1e6:.1f} us/token); "
                  f"GPU path {gpu * 1e3:.1f} ms, of which copying {nbytes / 1e6:.0f} MB of experts "
                  f"{copy * 1e3:.1f} ms ({nbytes / copy / 1e9:.1f} GB/s) and {g * 1e6:.1f} us/token")
        return threshold, detail


AUTO_STATE = AutoThreshold()


def _sync(device) -> float:
    import time
    torch.cuda.synchronize(device)
    return time.perf_counter()


def _calibrate(experts, input_tensor, expert_ids, weights, bsz_tensor, run_gpu, tensors, device, run: int):
    """One layer of the calibration (see AutoThreshold): the CPU backend's output is discarded."""
    state = AUTO_STATE
    t0 = _sync(device)
    state.calibrating = True
    try:
        kwargs = {} if bsz_tensor is None else {"bsz_tensor": bsz_tensor}
        experts.forward(input_tensor, expert_ids, weights, **kwargs)
    finally:
        state.calibrating = False
    t1 = _sync(device)
    # copy-only: the first ``run`` experts (one staging run's worth), scaled to the whole layer
    n_experts = experts.n_routed_experts
    run = min(n_experts, run)
    nbytes = sum(int(d.nbytes) for d, _ in tensors.values())
    parts = [(n, d.reshape(-1)[: d.reshape(-1).shape[0] // n_experts * run], t) for n, (d, t) in tensors.items()]
    Staging.take(STAGING.submit(parts, device), device)
    t2 = _sync(device)
    out = run_gpu()
    t3 = _sync(device)
    rows = input_tensor.size(0) if bsz_tensor is None else int(bsz_tensor.reshape(-1)[0])
    state.samples.append((rows, t1 - t0, (t2 - t1) * n_experts / run, t3 - t2, nbytes))
    if len(state.samples) >= AUTO_LAYERS:
        state.threshold, state.detail = AutoThreshold.decide(state.samples)
        _note_once("auto", f"{GPU_PREFILL_MIN_TOKENS_ENV}=auto: " + (
            f"prompts of >= {state.threshold} tokens run the routed experts on the GPU" if state.threshold
            else "the CPU experts are faster at any length: prompts keep them on the CPU")
            + f" ({state.detail}; a number in {GPU_PREFILL_MIN_TOKENS_ENV} forces a threshold)")
    return out


_LAYERS: dict = {}     # MoE layer number -> experts module seen on the GPU path (for the next-layer prefetch)


def _layer_number(experts):
    import re
    m = re.search(r"blk\.(\d+)", str(getattr(experts, "key", "") or ""))
    return int(m.group(1)) if m else None


def experts_prefill_on_gpu(experts, input_tensor: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
                           bsz_tensor: torch.Tensor | None = None):
    """KExpertsCPU.forward's prompt path on the GPU (see above), or None to run it on the CPU:
    the prompt is shorter than KTLEGACY_GPU_PREFILL_MIN_TOKENS (auto: the measured crossover),
    the output device is not a GPU, a weight type has no GPU dequantiser, or the GPU ran out of
    memory (then the CPU path runs). ``bsz_tensor`` (v0.2.4post1+): the number of real rows; the
    rows after it are padding and get zeros (the CPU backend leaves them unwritten)."""
    if AUTO_STATE.calibrating:
        return None                  # the calibration's own CPU run
    setting = gpu_prefill_min_tokens()
    device = torch.device(object.__getattribute__(experts, "out_device"))
    if setting == 0 or device.type != "cuda":
        return None
    rows = input_tensor.size(0) if bsz_tensor is None else int(bsz_tensor.reshape(-1)[0])
    calibrate = setting == AUTO and AUTO_STATE.threshold is None
    if calibrate:
        if rows < AUTO_CALIBRATE_TOKENS:
            return None
    else:
        minimum = AUTO_STATE.threshold if setting == AUTO else setting
        if minimum == 0 or rows < minimum:
            return None
    types = {n: getattr(experts, f"{n}_type") for n in ("gate", "up", "down")}
    missing = sorted({GGML_BLOCKS.get(t, (f"type {t}",))[0] for t in types.values() if gpu_dequant_impl(t) is None})
    if missing:
        _note_once("types", f"routed experts in {', '.join(missing)} have no GPU dequantiser: prompts run them on the CPU")
        return None
    if isinstance(experts.gate, list) or getattr(experts.gate, "ndim", 1) != 1:
        _note_once("layout", "routed experts stored per expert (not one GGUF tensor): prompts run them on the CPU")
        return None
    budget = _env_int(GPU_PREFILL_MIB_ENV, GPU_PREFILL_MIB) * 2**20
    if not calibrate:
        _note_once("on", f"prompts of >= {AUTO_STATE.threshold if setting == AUTO else setting} tokens run the routed "
                         f"experts on {device} ({GPU_PREFILL_MIB_ENV}={budget >> 20} MiB at a time; "
                         f"{GPU_PREFILL_MIN_TOKENS_ENV}=0 turns this off)")
    config = experts.config
    dtype = input_tensor.dtype if input_tensor.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float16
    tensors = {n: (getattr(experts, n), types[n]) for n in ("gate", "up", "down")}
    # staged: every type is dequantised from the GPU copy (upstream's kernels take host bytes)
    staged = not STAGING.failed and all(gpu_dequant_impl(t) in ("ktlegacy", "torch") for t in types.values())
    number = _layer_number(experts)
    next_layer = None
    if staged and number is not None:
        _LAYERS[number] = experts
        later = [k for k in _LAYERS if k > number]
        if later:
            nxt = _LAYERS[min(later)]
            next_layer = (min(later), {n: (getattr(nxt, n), getattr(nxt, f"{n}_type")) for n in ("gate", "up", "down")},
                          torch.device(object.__getattribute__(nxt, "out_device")))

    def run_gpu():
        x = input_tensor[:rows].to(device=device, dtype=dtype).contiguous()
        out = routed_experts(x, expert_ids[:rows], weights[:rows], tensors, experts.n_routed_experts,
                             config.moe_intermediate_size, budget, staging=STAGING if staged else None,
                             layer_key=number, next_layer=next_layer)
        if rows < input_tensor.size(0):
            out = torch.cat([out, out.new_zeros((input_tensor.size(0) - rows, out.size(1)))])
        return out

    try:
        with torch.cuda.device(device):
            if calibrate:
                return _calibrate(experts, input_tensor, expert_ids, weights, bsz_tensor, run_gpu, tensors, device,
                                  run_size(experts.n_routed_experts, config.moe_intermediate_size,
                                           input_tensor.size(1), dtype, budget, staged))
            return run_gpu()
    except torch.cuda.OutOfMemoryError:
        STAGING.prefetched = None
        torch.cuda.empty_cache()
        _note_once("oom", f"the GPU had no room for {budget >> 20} MiB of experts: this prompt runs them on the CPU "
                          f"(set {GPU_PREFILL_MIB_ENV} lower)")
        return None
    except (RuntimeError, OSError) as exc:
        if not staged:
            raise
        # pinned memory refused (a container's memlock limit) or a copy-stream failure: say so once
        # and copy the way the unstaged path does from now on
        STAGING.failed, STAGING.prefetched = f"{type(exc).__name__}: {exc}", None
        _note_once("staging", f"pinned staging of the experts failed ({STAGING.failed}): copying them unstaged")
        return experts_prefill_on_gpu(experts, input_tensor, expert_ids, weights, bsz_tensor)
