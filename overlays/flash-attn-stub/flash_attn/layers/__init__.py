"""flash-attn's ``layers`` package: only the rotary helper exists here (transformers imports it)."""
