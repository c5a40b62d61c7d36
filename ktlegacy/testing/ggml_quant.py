"""GGUF weight blocks for tests and benchmarks: quantizers for the K-quants gguf-py lacks, and
random blocks of every type KLinearGGUF decodes.

gguf-py (``gguf.quants``) dequantizes every ggml type but quantizes only the 32-value ones (Q4_0,
Q5_0, Q8_0, ...). The synthetic test models need Q4_K and Q6_K weights as real Q4_K_M files have
them, so this module writes those blocks itself, in ggml's layouts: a plain round-to-nearest
quantizer (no importance weighting, no search: llama.cpp's files are closer to their float
weights, but what a test needs is valid blocks whose dequantized values the fp32 reference then
uses, so both sides compute with the very same weights). ``dequantize`` is gguf-py's.
"""

from __future__ import annotations

import numpy as np

# ggml type name -> (id, values per block, bytes per block): the types KLinearGGUF's kernels decode
TYPES = {"Q4_0": (2, 32, 18), "Q5_0": (6, 32, 22), "Q8_0": (8, 32, 34), "Q2_K": (10, 256, 84),
         "Q3_K": (11, 256, 110), "Q4_K": (12, 256, 144), "Q5_K": (13, 256, 176), "Q6_K": (14, 256, 210),
         "IQ4_XS": (23, 256, 136)}
# byte offsets of each type's fp16 scale fields
_F16_FIELDS = {"Q4_0": (0,), "Q5_0": (0,), "Q8_0": (0,), "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2),
               "Q5_K": (0, 2), "Q6_K": (208,), "IQ4_XS": (0,)}


def row_bytes(qtype: str, cols: int) -> int:
    _, qk, nbytes = TYPES[qtype]
    if cols % qk:
        raise ValueError(f"a row of {cols} values does not split into {qtype} blocks of {qk}")
    return cols // qk * nbytes


def dequantize(blocks: np.ndarray, qtype: str) -> np.ndarray:
    """float32 values of ``blocks`` (uint8, rows x row_bytes), by gguf-py."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize
    return gguf_dequantize(blocks, GGMLQuantizationType[qtype]).astype(np.float32)


def random_blocks(rng: np.random.Generator, qtype: str, rows: int, cols: int, scale: float = 0.02) -> np.ndarray:
    """``rows`` rows of ``cols`` values of random ``qtype`` blocks: random quants and packed scales,
    fp16 scales of magnitude ~``scale`` with random signs (every bit pattern a decoder can meet,
    except non-finite scales)."""
    _, qk, nbytes = TYPES[qtype]
    n = rows * (cols // qk) if cols % qk == 0 else None
    if n is None:
        raise ValueError(f"a row of {cols} values does not split into {qtype} blocks of {qk}")
    raw = np.frombuffer(rng.bytes(n * nbytes), dtype=np.uint8).reshape(n, nbytes).copy()
    for off in _F16_FIELDS[qtype]:
        d = (rng.uniform(0.5, 1.5, n) * scale * np.where(rng.random(n) < 0.5, -1, 1)).astype(np.float16)
        raw[:, off:off + 2] = d.view(np.uint8).reshape(n, 2)
    return raw.reshape(rows, row_bytes(qtype, cols))


def _pack_k4(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """ggml's 12-byte packing of eight 6-bit (scale, min) pairs per block: (n, 8) -> (n, 12)."""
    sc, mn = sc.astype(np.uint8), mn.astype(np.uint8)
    out = np.empty((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = (sc[:, 0:4] & 63) | ((sc[:, 4:8] >> 4) << 6)
    out[:, 4:8] = (mn[:, 0:4] & 63) | ((mn[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:8] & 0xF) | ((mn[:, 4:8] & 0xF) << 4)
    return out


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).view(np.uint8).reshape(-1, 2)


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest Q4_K of a float (rows, cols) array, cols a multiple of 256."""
    rows, cols = x.shape
    b = x.astype(np.float32).reshape(-1, 8, 32)                        # blocks x sub-blocks x values
    lo = np.minimum(b.min(axis=2), 0.0)
    hi = b.max(axis=2)
    scale = (hi - lo) / 15.0                                          # value = scale * q - min
    mins = -lo
    d = (scale.max(axis=1) / 63.0).astype(np.float16).astype(np.float32)
    dmin = (mins.max(axis=1) / 63.0).astype(np.float16).astype(np.float32)
    safe_d, safe_m = np.where(d > 0, d, 1.0), np.where(dmin > 0, dmin, 1.0)
    sc = np.clip(np.rint(scale / safe_d[:, None]), 0, 63)
    mn = np.clip(np.rint(mins / safe_m[:, None]), 0, 63)
    step = d[:, None] * sc
    q = np.clip(np.rint((b + (dmin[:, None] * mn)[..., None]) / np.where(step > 0, step, 1.0)[..., None]), 0, 15)
    q = q.astype(np.uint8)
    # group g (64 values): qs[32g + l] = sub-block 2g's q[l] | sub-block 2g+1's q[l] << 4
    qs = (q[:, 0::2, :] | (q[:, 1::2, :] << 4)).reshape(-1, 128)
    out = np.concatenate([_f16(d), _f16(dmin), _pack_k4(sc, mn), qs], axis=1)
    return out.reshape(rows, row_bytes("Q4_K", cols))


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest Q6_K of a float (rows, cols) array, cols a multiple of 256."""
    rows, cols = x.shape
    b = x.astype(np.float32).reshape(-1, 16, 16)                       # blocks x 16-value groups
    amax = np.abs(b).max(axis=2)
    group = amax / 31.0                                               # q in -32..31
    d = (group.max(axis=1) / 127.0).astype(np.float16).astype(np.float32)
    sc = np.clip(np.rint(group / np.where(d > 0, d, 1.0)[:, None]), -128, 127)
    step = d[:, None] * sc
    q = np.clip(np.rint(b / np.where(step != 0, step, 1.0)[..., None]), -32, 31).astype(np.int16) + 32
    q = q.reshape(-1, 2, 4, 32).astype(np.uint8)                      # halves x quarters x l
    ql = np.empty((q.shape[0], 2, 64), dtype=np.uint8)
    ql[:, :, :32] = (q[:, :, 0] & 0xF) | ((q[:, :, 2] & 0xF) << 4)
    ql[:, :, 32:] = (q[:, :, 1] & 0xF) | ((q[:, :, 3] & 0xF) << 4)
    qh = (q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4) | ((q[:, :, 3] >> 4) << 6)
    out = np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64), sc.astype(np.int8).view(np.uint8), _f16(d)], axis=1)
    return out.reshape(rows, row_bytes("Q6_K", cols))


def quantize(x: np.ndarray, qtype: str) -> np.ndarray:
    """``x`` (rows, cols) as ``qtype`` blocks (uint8, rows x row_bytes)."""
    x = np.asarray(x, dtype=np.float32)
    if qtype == "Q4_K":
        return quantize_q4_k(x)
    if qtype == "Q6_K":
        return quantize_q6_k(x)
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize as gguf_quantize
    return gguf_quantize(x, GGMLQuantizationType[qtype])


# ---- the type llama.cpp's quantizer gives a DeepSeek-V2/V3 tensor ---------------------------------
# llama-quant.cpp's llama_tensor_get_type for the two file types DeepSeek-V3/R1 users run most, as
# it treats DeepSeek's tensor names: the default type, except ffn_down (dense, shared and routed
# experts) which gets more bits in "use_more_bits" layers (the first and last eighth and every
# third layer between) for Q4_K_M, always Q3_K for Q2_K, and the output head Q6_K. DeepSeek's
# attention tensors (attn_q_a, attn_kv_b, ...) match none of its attention heuristics, so they
# take the default type. Norms, the router and its bias stay F32. An approximation for estimates,
# not a quantizer: it ignores importance matrices and per-file overrides.
LLAMA_CPP_FTYPES = {"Q4_K_M": {"default": "Q4_K", "ffn_down_more": "Q6_K", "ffn_down": "Q4_K"},
                    "Q2_K": {"default": "Q2_K", "ffn_down_more": "Q3_K", "ffn_down": "Q3_K"}}


def llama_cpp_type(name: str, n_layers: int, ftype: str) -> str:
    """The GGUF type llama.cpp's ``ftype`` (Q4_K_M or Q2_K) gives tensor ``name`` of an ``n_layers`` model."""
    rules = LLAMA_CPP_FTYPES[ftype]
    if name.endswith(("norm.weight", "ffn_gate_inp.weight", ".bias")) or "exp_probs_b" in name:
        return "F32"
    if name == "output.weight":
        return "Q6_K"
    if "ffn_down" in name:
        layer = int(name.split(".")[1])
        more = layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2
        return rules["ffn_down_more"] if more else rules["ffn_down"]
    return rules["default"]


def type_bytes(qtype: str, n_elements: int) -> int:
    """Bytes ``n_elements`` values of ``qtype`` take in a GGUF file."""
    if qtype in ("F32", "F16", "BF16"):
        return n_elements * {"F32": 4, "F16": 2, "BF16": 2}[qtype]
    _, qk, nbytes = TYPES[qtype]
    return n_elements // qk * nbytes
