"""``apply_rotary_emb`` with flash-attn 2.6.3's documented semantics, in plain PyTorch.

transformers >= 4.45 imports it from ``modeling_flash_attention_utils`` whenever flash-attn
is available, so the stub must provide it; it is computed in fp32 and cast back to x's dtype.
``RotaryEmbedding`` (the nn.Module) is not provided.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

__all__ = ["apply_rotary_emb"]


def _positions(x: torch.Tensor, seqlen_offsets, cu_seqlens: Optional[torch.Tensor]) -> torch.Tensor:
    """Rotary position of every token: (batch, seqlen) for dense x, (total,) for packed x."""
    device = x.device
    if cu_seqlens is None:
        batch, seqlen = x.shape[0], x.shape[1]
        local = torch.arange(seqlen, device=device)[None, :].expand(batch, seqlen)
        if isinstance(seqlen_offsets, torch.Tensor):
            return local + seqlen_offsets.to(device=device, dtype=torch.long).reshape(batch, 1)
        return local + int(seqlen_offsets)
    starts = cu_seqlens.to(device=device, dtype=torch.long)
    lengths = starts[1:] - starts[:-1]
    total = x.shape[0]
    token = torch.arange(total, device=device)
    sequence = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths)
    if sequence.numel() != total:
        raise ValueError(f"apply_rotary_emb: cu_seqlens covers {sequence.numel()} tokens, x has {total}")
    local = token - starts[:-1][sequence]
    if isinstance(seqlen_offsets, torch.Tensor):
        return local + seqlen_offsets.to(device=device, dtype=torch.long)[sequence]
    return local + int(seqlen_offsets)


def apply_rotary_emb(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool = False,
    inplace: bool = False,
    seqlen_offsets: Union[int, torch.Tensor] = 0,
    cu_seqlens: Optional[torch.Tensor] = None,
    max_seqlen: Optional[int] = None,
) -> torch.Tensor:
    """Rotate the first ``rotary_dim = 2 * cos.shape[-1]`` channels of every head of x.

    x: (batch, seqlen, nheads, headdim), or (total, nheads, headdim) with cu_seqlens.
    cos, sin: (seqlen_rotary, rotary_dim / 2); token t of a sequence uses row
    ``seqlen_offsets (+ [b]) + t``. interleaved=False pairs channel i with i + rotary_dim/2
    (GPT-NeoX); True pairs 2i with 2i+1 (GPT-J). Channels past rotary_dim pass through.
    """
    return rotate_at(x, cos, sin, _positions(x, seqlen_offsets, cu_seqlens), interleaved, inplace)


def rotate_at(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
              interleaved: bool = False, inplace: bool = False) -> torch.Tensor:
    """Rotate every token of x by the cos/sin row given in ``positions`` (x's shape without heads, dim)."""
    half = cos.shape[-1]
    rotary_dim = 2 * half
    if rotary_dim > x.shape[-1]:
        raise ValueError(f"apply_rotary_emb: rotary_dim {rotary_dim} exceeds head dim {x.shape[-1]}")
    positions = positions.to(device=cos.device, dtype=torch.long)
    if positions.numel() and (int(positions.max()) >= cos.shape[0] or int(positions.min()) < 0):
        raise ValueError(f"apply_rotary_emb: positions {int(positions.min())}..{int(positions.max())} "
                         f"fall outside cos/sin's {cos.shape[0]} rows")
    c = cos.float()[positions].unsqueeze(-2).to(x.device)  # broadcast over heads
    s = sin.float()[positions].unsqueeze(-2).to(x.device)
    rot = x[..., :rotary_dim].float()
    if interleaved:
        first, second = rot[..., 0::2], rot[..., 1::2]
        rotated = torch.stack((first * c - second * s, second * c + first * s), dim=-1).flatten(-2)
    else:
        first, second = rot[..., :half], rot[..., half:]
        rotated = torch.cat((first * c - second * s, second * c + first * s), dim=-1)
    rotated = rotated.to(x.dtype)
    if inplace:
        x[..., :rotary_dim] = rotated
        return x
    return torch.cat((rotated, x[..., rotary_dim:]), dim=-1)
