"""Padding helpers of flash-attn's ``bert_padding`` module (2.6.3 semantics).

They convert between padded (batch, seqlen, ...) tensors and the packed
(total_tokens, ...) layout that ``flash_attn_varlen_func`` consumes. ``unpad_input``
returns four values, as flash-attn < 2.7 did and as ktransformers' models unpack it.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

__all__ = ["index_first_axis", "index_put_first_axis", "pad_input", "unpad_input"]


def index_first_axis(input: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Rows ``indices`` of ``input`` along its first axis: ``input[indices]`` (differentiable)."""
    return input.index_select(0, indices)


def index_put_first_axis(values: torch.Tensor, indices: torch.Tensor, first_axis_dim: int) -> torch.Tensor:
    """A zero tensor of first dimension ``first_axis_dim`` with ``values`` placed at rows ``indices``."""
    output = values.new_zeros((first_axis_dim, *values.shape[1:]))
    return output.index_copy(0, indices, values)


def unpad_input(hidden_states: torch.Tensor, attention_mask: torch.Tensor
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Drop padded positions.

    hidden_states: (batch, seqlen, ...); attention_mask: (batch, seqlen), nonzero/True = keep.
    Returns (hidden_states of kept tokens (total, ...), their indices in the flattened
    (batch * seqlen) axis (int64), cu_seqlens (batch + 1,) int32, longest sequence as int).
    """
    seqlens = attention_mask.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(attention_mask.flatten(), as_tuple=False).flatten()
    max_seqlen_in_batch = int(seqlens.max().item()) if seqlens.numel() else 0
    cu_seqlens = F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    flat = hidden_states.reshape(-1, *hidden_states.shape[2:])
    return index_first_axis(flat, indices), indices, cu_seqlens, max_seqlen_in_batch


def pad_input(hidden_states: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Inverse of :func:`unpad_input`: (total, ...) -> (batch, seqlen, ...) with zeros at padding."""
    output = index_put_first_axis(hidden_states, indices, batch * seqlen)
    return output.reshape(batch, seqlen, *hidden_states.shape[1:])
