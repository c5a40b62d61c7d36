"""FlashAttention 2's attention functions, computed with ``scaled_dot_product_attention``.

Semantics follow flash-attn 2.6.3's docstrings:

* tensors are laid out (batch, seqlen, nheads, headdim), or (total_tokens, nheads, headdim)
  with ``cu_seqlens`` for the varlen functions;
* ``softmax_scale`` defaults to ``1 / sqrt(q.shape[-1])``;
* ``causal=True`` aligns the mask to the bottom-right corner when seqlen_q != seqlen_k
  (query row i sees key j iff ``j <= i + seqlen_k - seqlen_q``), as flash-attn >= 2.1 does,
  whereas SDPA's own ``is_causal`` aligns top-left; a query row that sees no key returns zeros;
* ``window_size=(left, right)`` keeps keys in
  ``[i + seqlen_k - seqlen_q - left, i + seqlen_k - seqlen_q + right]``, -1 meaning unbounded;
* K/V may have fewer heads than Q (GQA/MQA): Q head h reads K/V head ``h // (hq // hk)``;
* V's head dim may differ from Q/K's; the output has V's head dim and Q's dtype.

What SDPA cannot express with the same result raises ``NotImplementedError`` naming the
argument. The autograd graph is SDPA's own, so the non-kv-cache functions are differentiable.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from flash_attn.layers.rotary import rotate_at

__all__ = [
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
]


def _refuse(argument: str, hint: str) -> None:
    raise NotImplementedError(
        f"flash_attn (ktlegacy SDPA stand-in): {argument} is not supported; {hint}"
    )


def _refuse_unsupported(
    dropout_p: float = 0.0,
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    return_attn_probs: bool = False,
    deterministic: bool = False,
    tensors: Tuple[torch.Tensor, ...] = (),
) -> None:
    if dropout_p and dropout_p > 0.0:
        _refuse(f"dropout_p={dropout_p}", "pass dropout_p=0.0 (inference), or use eager/sdpa attention to train")
    if softcap and softcap > 0.0:
        _refuse(f"softcap={softcap}", "use eager attention for models with logit softcapping")
    if alibi_slopes is not None:
        _refuse("alibi_slopes", "use eager attention for ALiBi models")
    if return_attn_probs:
        _refuse("return_attn_probs=True", "SDPA does not return the softmax statistics")
    if deterministic and any(t.requires_grad for t in tensors):
        _refuse("deterministic=True with autograd", "SDPA's GPU backward is not guaranteed deterministic")


def _window_bounds(window_size, causal: bool) -> Tuple[Optional[int], Optional[int]]:
    """(left, right) reach of each query in keys; None means unbounded. Causal caps right at 0."""
    left, right = int(window_size[0]), int(window_size[1])
    left_bound = left if left >= 0 else None
    right_bound = right if right >= 0 else None
    if causal:
        right_bound = 0
    return left_bound, right_bound


def _keep_mask(seqlen_q: int, seqlen_k: int, left: Optional[int], right: Optional[int],
               device: torch.device) -> torch.Tensor:
    """Boolean (seqlen_q, seqlen_k) mask, True where query i may attend key j (bottom-right aligned)."""
    diagonal = torch.arange(seqlen_q, device=device)[:, None] + (seqlen_k - seqlen_q)
    key = torch.arange(seqlen_k, device=device)[None, :]
    keep = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if right is not None:
        keep &= key <= diagonal + right
    if left is not None:
        keep &= key >= diagonal - left
    return keep


def _check_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"flash_attn: q, k, v must be (batch, seqlen, nheads, headdim); got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0]:
        raise ValueError(
            f"flash_attn: batch/seqlen/heads of k {tuple(k.shape)} and v {tuple(v.shape)} must match, "
            f"and batch of q {tuple(q.shape)}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"flash_attn: q and k head dims differ ({q.shape[-1]} vs {k.shape[-1]})")
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(
            f"flash_attn: number of q heads ({q.shape[2]}) must be divisible by number of k/v heads ({k.shape[2]})"
        )


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: Optional[float],
               causal: bool, window_size) -> torch.Tensor:
    """Dense attention in flash layout (batch, seqlen, heads, dim) -> (batch, seqlen_q, heads_q, dim_v)."""
    _check_dense(q, k, v)
    batch, seqlen_q, heads_q, head_dim = q.shape
    seqlen_k, heads_k, head_dim_v = k.shape[1], k.shape[2], v.shape[3]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    if seqlen_q == 0 or seqlen_k == 0:
        # No key at all: flash-attn defines a row without keys as zeros.
        return q.new_zeros((batch, seqlen_q, heads_q, head_dim_v))

    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if heads_k != heads_q:
        # GQA/MQA: q head h uses kv head h // group, i.e. each kv head repeated group times in order.
        group = heads_q // heads_k
        kt = kt.repeat_interleave(group, dim=1)
        vt = vt.repeat_interleave(group, dim=1)

    left, right = _window_bounds(window_size, causal)
    mask = None
    is_causal = False
    empty_rows = None
    if left is None and right is None:
        pass
    elif left is None and right == 0 and seqlen_q == seqlen_k:
        is_causal = True  # square causal: SDPA's top-left and flash's bottom-right coincide
    elif left is None and right >= seqlen_q - 1:
        pass  # every query already reaches the last key (e.g. one decode token): nothing to mask
    else:
        mask = _keep_mask(seqlen_q, seqlen_k, left, right, q.device)
        empty_rows = ~mask.any(dim=-1)
        if bool(empty_rows.any()):
            # Give fully masked rows something to attend so SDPA yields no NaN; zeroed below.
            mask = mask | empty_rows[:, None]
        else:
            empty_rows = None

    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, is_causal=is_causal, scale=scale)
    if empty_rows is not None:
        out = out.masked_fill(empty_rows[:, None], 0.0)
    return out.transpose(1, 2).contiguous()


def flash_attn_func(
    q,
    k,
    v,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads_k, headdim[_v]).

    Returns (batch, seqlen_q, nheads, headdim_v). See the module docstring for the semantics.
    """
    _refuse_unsupported(dropout_p, softcap, alibi_slopes, return_attn_probs, deterministic, (q, k, v))
    return _attention(q, k, v, softmax_scale, causal, window_size)


def flash_attn_qkvpacked_func(
    qkv,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """qkv: (batch, seqlen, 3, nheads, headdim)."""
    return flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dropout_p, softmax_scale, causal,
                           window_size, softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_kvpacked_func(
    q,
    kv,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """q: (batch, seqlen_q, nheads, headdim); kv: (batch, seqlen_k, 2, nheads_k, headdim)."""
    return flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], dropout_p, softmax_scale, causal,
                           window_size, softcap, alibi_slopes, deterministic, return_attn_probs)


def _offsets(cu_seqlens: torch.Tensor, name: str, total: int, max_seqlen) -> List[int]:
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"flash_attn: {name} must be (batch_size + 1,); got {tuple(cu_seqlens.shape)}")
    offsets = [int(x) for x in cu_seqlens.tolist()]
    if offsets[0] != 0 or any(b < a for a, b in zip(offsets, offsets[1:])) or offsets[-1] > total:
        raise ValueError(f"flash_attn: {name} must start at 0, not decrease and end <= {total}; got {offsets}")
    longest = max(b - a for a, b in zip(offsets, offsets[1:]))
    if max_seqlen is not None and longest > int(max_seqlen):
        # flash-attn sizes its grid from max_seqlen and would leave the excess rows uncomputed.
        raise ValueError(f"flash_attn: a sequence in {name} has {longest} tokens, more than max_seqlen={max_seqlen}")
    return offsets


def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    block_table=None,
):
    """Packed sequences: q (total_q, nheads, headdim), k/v (total_k, nheads_k, headdim[_v]).

    Sequence b owns rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` of q and
    ``cu_seqlens_k[b]:cu_seqlens_k[b+1]`` of k/v; masks (causal, window) align bottom-right
    per sequence. Returns (total_q, nheads, headdim_v); rows after the last sequence are zeros.
    """
    _refuse_unsupported(dropout_p, softcap, alibi_slopes, return_attn_probs, deterministic, (q, k, v))
    if block_table is not None:
        _refuse("block_table in flash_attn_varlen_func", "gather the paged cache into contiguous k/v first")
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            f"flash_attn_varlen_func: q, k, v must be (total_tokens, nheads, headdim); got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    starts_q = _offsets(cu_seqlens_q, "cu_seqlens_q", q.shape[0], max_seqlen_q)
    starts_k = _offsets(cu_seqlens_k, "cu_seqlens_k", k.shape[0], max_seqlen_k)
    if len(starts_q) != len(starts_k):
        raise ValueError(
            f"flash_attn_varlen_func: cu_seqlens_q has {len(starts_q) - 1} sequences, cu_seqlens_k {len(starts_k) - 1}"
        )
    pieces = []
    for b in range(len(starts_q) - 1):
        qs = q[starts_q[b]:starts_q[b + 1]].unsqueeze(0)
        ks = k[starts_k[b]:starts_k[b + 1]].unsqueeze(0)
        vs = v[starts_k[b]:starts_k[b + 1]].unsqueeze(0)
        pieces.append(_attention(qs, ks, vs, softmax_scale, causal, window_size)[0])
    tail = q.shape[0] - starts_q[-1]
    if tail:
        pieces.append(q.new_zeros((tail, q.shape[1], v.shape[-1])))
    return torch.cat(pieces, dim=0)


def flash_attn_varlen_qkvpacked_func(
    qkv,
    cu_seqlens,
    max_seqlen,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """qkv: (total, 3, nheads, headdim)."""
    return flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, cu_seqlens, max_seqlen,
                                  max_seqlen, dropout_p, softmax_scale, causal, window_size, softcap,
                                  alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_kvpacked_func(
    q,
    kv,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """q: (total_q, nheads, headdim); kv: (total_k, 2, nheads_k, headdim)."""
    return flash_attn_varlen_func(q, kv[:, 0], kv[:, 1], cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                  max_seqlen_k, dropout_p, softmax_scale, causal, window_size, softcap,
                                  alibi_slopes, deterministic, return_attn_probs)


def _cache_lengths(cache_seqlens, batch: int, default: int) -> List[int]:
    if cache_seqlens is None:
        return [default] * batch
    if isinstance(cache_seqlens, int):
        return [cache_seqlens] * batch
    lengths = [int(x) for x in cache_seqlens.reshape(-1).tolist()]
    if len(lengths) != batch:
        raise ValueError(f"flash_attn_with_kvcache: cache_seqlens has {len(lengths)} entries for batch {batch}")
    return lengths


def _rotary_for_kvcache(q, k, cos, sin, lengths: List[int], interleaved: bool, causal_or_local: bool):
    """Rotate new k at positions cache_seqlens + t; q likewise if causal/local, else all at cache_seqlens."""
    start = torch.tensor(lengths, dtype=torch.long, device=cos.device)[:, None]
    k_positions = start + torch.arange(k.shape[1], device=cos.device)[None, :]
    if causal_or_local:
        q_positions = start + torch.arange(q.shape[1], device=cos.device)[None, :]
    else:
        q_positions = start.expand(q.shape[0], q.shape[1])
    return (rotate_at(q, cos, sin, q_positions, interleaved),
            rotate_at(k, cos, sin, k_positions, interleaved))


def flash_attn_with_kvcache(
    q,
    k_cache,
    v_cache,
    k=None,
    v=None,
    rotary_cos=None,
    rotary_sin=None,
    cache_seqlens: Optional[Union[int, torch.Tensor]] = None,
    cache_batch_idx: Optional[torch.Tensor] = None,
    cache_leftpad: Optional[torch.Tensor] = None,
    block_table: Optional[torch.Tensor] = None,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    rotary_interleaved=True,
    alibi_slopes=None,
    num_splits=0,
    return_softmax_lse=False,
):
    """Attention of q over a KV cache, appending new k/v into the cache in place first.

    q: (batch, seqlen_q, nheads, headdim). k_cache/v_cache: (batch_cache, seqlen_cache,
    nheads_k, headdim[_v]), or (num_blocks, page_block_size, nheads_k, headdim[_v]) with
    ``block_table`` (batch, max_blocks_per_seq) for a paged cache. ``cache_seqlens`` (int or
    (batch,)) is how many cached tokens each sequence has; new ``k``/``v`` (batch, seqlen_new,
    ...) are written at positions ``cache_seqlens ...`` and attention covers the first
    ``cache_seqlens + seqlen_new`` tokens (causal bottom-right aligned). Without
    ``cache_seqlens`` the whole cache is attended. With ``rotary_cos``/``rotary_sin``
    ((seqlen_ro, rotary_dim / 2)) the new k is rotated at positions ``cache_seqlens + t`` before
    it is stored, and q at the same positions if causal or windowed, else all of q at
    ``cache_seqlens``; ``rotary_interleaved`` pairs channels 2i/2i+1 (True) or i/i+rotary_dim/2.
    ``cache_batch_idx`` picks the cache row of each batch entry. ``num_splits`` only tunes the
    CUDA kernel's work split and is ignored.
    Returns (batch, seqlen_q, nheads, headdim_v). Not differentiable (neither is flash-attn's).
    """
    _refuse_unsupported(softcap=softcap, alibi_slopes=alibi_slopes)
    if cache_leftpad is not None:
        _refuse("cache_leftpad", "keep cached tokens at the start of each cache row")
    if return_softmax_lse:
        _refuse("return_softmax_lse=True", "SDPA does not return the softmax statistics")
    if (k is None) != (v is None):
        raise ValueError("flash_attn_with_kvcache: pass both k and v, or neither")
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("flash_attn_with_kvcache: pass both rotary_cos and rotary_sin, or neither")
    if rotary_cos is not None and k is None:
        raise ValueError("flash_attn_with_kvcache: rotary_cos/rotary_sin rotate the new k, so they need k and v")
    if q.dim() != 4 or k_cache.dim() != 4 or v_cache.dim() != 4:
        raise ValueError("flash_attn_with_kvcache: q, k_cache and v_cache must be 4-D")
    paged = block_table is not None
    if paged and cache_batch_idx is not None:
        raise ValueError("flash_attn_with_kvcache: cache_batch_idx cannot be combined with block_table")
    if k is not None and cache_seqlens is None:
        raise ValueError("flash_attn_with_kvcache: k/v need cache_seqlens (where to append them)")
    if paged and cache_seqlens is None:
        raise ValueError("flash_attn_with_kvcache: a paged cache (block_table) needs cache_seqlens")

    batch = q.shape[0]
    lengths = _cache_lengths(cache_seqlens, batch, k_cache.shape[1])
    new = 0 if k is None else k.shape[1]
    rows = list(range(batch)) if cache_batch_idx is None else [int(x) for x in cache_batch_idx.tolist()]
    if len(rows) != batch:
        raise ValueError(f"flash_attn_with_kvcache: cache_batch_idx has {len(rows)} entries for batch {batch}")
    if rotary_cos is not None:
        q, k = _rotary_for_kvcache(q, k, rotary_cos, rotary_sin, lengths, rotary_interleaved,
                                   causal or any(int(w) >= 0 for w in window_size))

    outputs = []
    with torch.no_grad():
        for b in range(batch):
            total = lengths[b] + new
            if paged:
                page = k_cache.shape[1]
                blocks = block_table[b].long()
                used = -(-total // page)
                if used > blocks.numel():
                    raise ValueError(
                        f"flash_attn_with_kvcache: sequence {b} needs {used} blocks of {page}, block_table has {blocks.numel()}"
                    )
                if new:
                    positions = torch.arange(lengths[b], total, device=k_cache.device)
                    block_of, slot_of = blocks.to(k_cache.device)[positions // page], positions % page
                    k_cache[block_of, slot_of] = k[b].to(k_cache.dtype)
                    v_cache[block_of, slot_of] = v[b].to(v_cache.dtype)
                keys = k_cache[blocks[:used].to(k_cache.device)].flatten(0, 1)[:total]
                values = v_cache[blocks[:used].to(v_cache.device)].flatten(0, 1)[:total]
            else:
                if total > k_cache.shape[1] or lengths[b] < 0:
                    raise ValueError(
                        f"flash_attn_with_kvcache: sequence {b} needs {total} cache slots, cache holds {k_cache.shape[1]}"
                    )
                row = rows[b]
                if new:
                    k_cache[row, lengths[b]:total] = k[b].to(k_cache.dtype)
                    v_cache[row, lengths[b]:total] = v[b].to(v_cache.dtype)
                keys, values = k_cache[row, :total], v_cache[row, :total]
            outputs.append(_attention(q[b:b + 1], keys.unsqueeze(0), values.unsqueeze(0), softmax_scale,
                                      causal, window_size))
    return torch.cat(outputs, dim=0)
