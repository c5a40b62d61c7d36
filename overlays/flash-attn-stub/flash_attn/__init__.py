"""ktlegacy's flash-attn stand-in: FlashAttention 2's Python API computed with PyTorch SDPA.

FlashAttention 2 has no kernels for GPUs older than Ampere (sm80), so on V100 (sm70) and
T4 / RTX 2080 Ti (sm75) the real ``flash-attn`` package cannot run. ktransformers and
transformers still import it, check its version and call ``flash_attn_func``,
``flash_attn_varlen_func`` and ``flash_attn_with_kvcache``. This package answers those
imports and calls with ``torch.nn.functional.scaled_dot_product_attention`` (SDPA),
following the semantics documented by flash-attn 2.6.3 (the API generation whose
``bert_padding.unpad_input`` returns four values, which ktransformers unpacks).

It is a compatibility layer, not an optimisation: no claim is made about its speed.
Arguments it cannot honour (dropout, ALiBi, softcapping, left-padded caches, returning
softmax statistics) raise ``NotImplementedError`` naming the argument instead of returning
a different result.

The distribution is named ``flash-attn`` and its version carries the local label
``+ktlegacy.sdpa`` so that ``pip list`` and ``importlib.metadata`` show what is installed.
"""

__version__ = "2.6.3+ktlegacy.sdpa"

from flash_attn.flash_attn_interface import (  # noqa: E402  (version first: build reads it statically)
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    flash_attn_with_kvcache,
)

__all__ = [
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
]
