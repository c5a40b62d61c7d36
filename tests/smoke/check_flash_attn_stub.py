#!/usr/bin/env python3
"""Smoke check of the installed flash-attn stand-in; runs inside the images (no pytest).

    python tests/smoke/check_flash_attn_stub.py

Checks that ``import flash_attn`` works, that the ``flash-attn`` distribution's version is
>= 2.1 (what transformers and ktransformers test for), and that ``flash_attn_func`` agrees
with an explicit fp32 softmax(QK^T)V on small random tensors: causal with q shorter than k
(bottom-right alignment), grouped K/V heads and a V head dim unlike Q's. Uses CUDA when
available, else CPU. Prints one line per check and a summary line last; exits 1 with a
one-line reason on failure (the convention of tests/smoke/run.py).
"""

from __future__ import annotations

import math
import re
import sys

MIN_VERSION = (2, 1)


class SmokeFailure(Exception):
    pass


def _release(version: str) -> tuple:
    """(major, minor) of a PEP 440 version such as 2.6.3+ktlegacy.sdpa; () if unparsable."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else ()


def _reference(q, k, v, scale, causal):
    """fp32 softmax(q k^T * scale) v per head, causal aligned bottom-right, empty rows -> 0."""
    import torch
    q, k, v = q.float(), k.float(), v.float()
    batch, seqlen_q, heads_q, _ = q.shape
    seqlen_k, heads_k = k.shape[1], k.shape[2]
    group = heads_q // heads_k
    out = torch.zeros(batch, seqlen_q, heads_q, v.shape[-1], device=q.device)
    allowed = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=q.device)
    if causal:
        for i in range(seqlen_q):
            for j in range(seqlen_k):
                allowed[i, j] = j <= i + seqlen_k - seqlen_q
    for h in range(heads_q):
        scores = q[:, :, h] @ k[:, :, h // group].transpose(1, 2) * scale
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        out[:, :, h] = probs @ v[:, :, h // group]
    return out


def check_stub() -> list:
    """Run the checks; return the lines to print, raise SmokeFailure on the first failure."""
    lines = []
    try:
        import torch
    except ImportError as exc:
        raise SmokeFailure(f"torch is not importable: {exc}")
    try:
        import flash_attn
        # What ktransformers' and transformers' modules import at load time.
        from flash_attn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache  # noqa: F401
        from flash_attn.bert_padding import index_first_axis, pad_input, unpad_input  # noqa: F401
        from flash_attn.layers.rotary import apply_rotary_emb  # noqa: F401
    except ImportError as exc:
        raise SmokeFailure(f"import failed ({exc}); install the stub wheel built by: python -m ktlegacy build-stub --dest DIR")
    from importlib import metadata
    try:
        version = metadata.version("flash-attn")
    except metadata.PackageNotFoundError:
        raise SmokeFailure("flash_attn imports but no flash-attn distribution metadata is installed")
    if _release(version) < MIN_VERSION:
        raise SmokeFailure(f"flash-attn version {version} is below 2.1 (transformers wants >= 2.1.0)")
    lines.append(f"ok flash-attn {version} at {flash_attn.__file__}")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device="cpu").manual_seed(0)
    for dtype in (torch.float16, torch.bfloat16):
        q = torch.randn(2, 5, 8, 64, generator=gen).to(device, dtype)
        k = torch.randn(2, 9, 2, 64, generator=gen).to(device, dtype)
        v = torch.randn(2, 9, 2, 32, generator=gen).to(device, dtype)
        for causal in (True, False):
            try:
                out = flash_attn_func(q, k, v, causal=causal)
            except Exception as exc:  # report, don't traceback: this runs at the end of an image build
                raise SmokeFailure(f"flash_attn_func raised {type(exc).__name__}: {exc}")
            expected = _reference(q, k, v, 1.0 / math.sqrt(64), causal)
            if out.dtype != dtype or tuple(out.shape) != (2, 5, 8, 32):
                raise SmokeFailure(f"flash_attn_func returned {out.dtype} {tuple(out.shape)}, want {dtype} (2, 5, 8, 32)")
            err = (out.float() - expected).abs().max().item()
            tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
            if not err <= tol:
                raise SmokeFailure(f"flash_attn_func {dtype} causal={causal} differs from the reference by {err:.3g} (> {tol})")
            lines.append(f"ok flash_attn_func {device} {str(dtype).replace('torch.', '')} causal={causal} max|err|={err:.2g}")
    lines.append(f"flash-attn stub ok: {version} matches an explicit softmax reference on {device} (fp16, bf16)")
    return lines


def main() -> int:
    try:
        for line in check_stub():
            print(line)
    except SmokeFailure as exc:
        print(f"error: flash-attn stub smoke check: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
