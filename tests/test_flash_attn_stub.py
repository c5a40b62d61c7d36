"""The flash-attn stand-in (overlays/flash-attn-stub) against flash-attn 2's documented semantics.

The stub is built into a wheel with ktlegacy.core.stub.build_stub_wheel and installed with pip into
a scratch target directory; every test imports that installed copy, so what is tested is what
the image installs. Results are compared on CPU with an explicit fp32 reference (per-head
matmul, softmax, and a causal mask built element by element with the bottom-right rule
``j <= i + seqlen_k - seqlen_q``). Tolerances: fp32 1e-5, fp16 5e-3, bf16 3e-2 (absolute, on
outputs of magnitude ~1: the inputs are rounded to the low precision before the reference sees them).
On a machine with CUDA the stub runs there (KTLEGACY_STUB_TEST_DEVICE=cpu|cuda overrides).
"""

from __future__ import annotations

import importlib
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ktlegacy.core.errors import KtlegacyError
from ktlegacy.core.stub import STUB_DIR, build_stub_wheel, stub_version

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "tests" / "smoke" / "check_flash_attn_stub.py"
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
# CI has no GPU; on a GPU machine the same tests run the stub on CUDA (reference stays on CPU).
DEVICE = torch.device(os.environ.get("KTLEGACY_STUB_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))


# ---------------------------------------------------------------- build, install, import

@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return build_stub_wheel(tmp_path_factory.mktemp("stub-wheel"))


@pytest.fixture(scope="module")
def site(wheel, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("stub-site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    "--disable-pip-version-check", "--target", str(target), str(wheel)], check=True)
    return target


@pytest.fixture(scope="module")
def fa(site):
    """The installed ``flash_attn`` package (imported from the pip target, not the source tree)."""
    for name in [m for m in sys.modules if m == "flash_attn" or m.startswith("flash_attn.")]:
        del sys.modules[name]
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    try:
        module = importlib.import_module("flash_attn")
        importlib.import_module("flash_attn.bert_padding")
        importlib.import_module("flash_attn.layers.rotary")
        assert Path(module.__file__).is_relative_to(site), module.__file__
        yield module
    finally:
        sys.path.remove(str(site))


def _env_with(site: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def test_wheel_is_named_and_versioned_as_flash_attn(wheel):
    assert wheel.name == f"flash_attn-{stub_version()}-py3-none-any.whl"
    assert stub_version() == "2.6.3+ktlegacy.sdpa"


def test_build_leaves_the_source_directory_clean(wheel):
    debris = [p.name for p in STUB_DIR.iterdir() if p.name in ("build", "dist") or p.name.endswith(".egg-info")]
    assert debris == []


def test_installed_metadata_satisfies_version_checks(fa, site):
    from importlib import metadata

    from packaging.specifiers import SpecifierSet
    from packaging.version import Version
    dist = metadata.distribution("flash-attn")
    assert Path(dist.locate_file("flash_attn")).is_relative_to(site)
    # transformers asks importlib.metadata.version("flash_attn") and compares with >= 2.1.0.
    assert metadata.version("flash_attn") == metadata.version("flash-attn") == fa.__version__
    version = Version(metadata.version("flash-attn"))
    assert version >= Version("2.1.0")
    assert version.local == "ktlegacy.sdpa"
    for requirement in (">=2.1", ">=2.1.0,<3", "==2.6.3", "~=2.6"):
        assert version in SpecifierSet(requirement), requirement
    assert dist.requires == ["torch>=2.1"]


@pytest.mark.parametrize("requirement", ["flash-attn>=2.1", "flash-attn==2.6.3", "flash_attn"])
def test_pip_resolves_flash_attn_requirements_to_the_stub(wheel, requirement):
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--no-index",
                           "--disable-pip-version-check", "--ignore-installed", "--find-links", str(wheel.parent),
                           requirement], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert f"Would install flash-attn-{stub_version()}" in proc.stdout or \
        f"Would install flash_attn-{stub_version()}" in proc.stdout, proc.stdout


def test_transformers_sees_flash_attention_2_and_imports_it(site):
    """transformers' availability checks pass and its flash-attention module imports the stub.

    The checks also require CUDA, which CI lacks: torch.cuda.is_available and torch.version.cuda
    are faked in a subprocess so that only the flash-attn side of the checks is exercised.
    """
    script = textwrap.dedent("""
        import torch
        torch.cuda.is_available = lambda: True
        torch.version.cuda = "12.4"
        from transformers.utils import import_utils as iu
        assert iu.is_flash_attn_2_available()
        assert iu.is_flash_attn_greater_or_equal_2_10()
        assert iu.is_flash_attn_greater_or_equal("2.1.0")
        import transformers.modeling_flash_attention_utils as m
        import flash_attn
        assert m.flash_attn_func is flash_attn.flash_attn_func
        assert m.flash_attn_varlen_func is flash_attn.flash_attn_varlen_func
        assert m.unpad_input.__module__ == "flash_attn.bert_padding"
        assert m._flash_supports_window_size

        # transformers' own padded-batch path: _upad_input (index_first_axis, unpad_input),
        # flash_attn_varlen_func, pad_input. Left and right padding, GQA, fp16.
        gen = torch.Generator().manual_seed(3)
        mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
        q = torch.randn(3, 6, 4, 32, generator=gen).half()
        k = torch.randn(3, 6, 2, 32, generator=gen).half()
        v = torch.randn(3, 6, 2, 32, generator=gen).half()
        out = m._flash_attention_forward(q, k, v, mask, 6, True)
        assert out.shape == (3, 6, 4, 32) and out.dtype == torch.float16
        for b in range(3):
            keep = mask[b].bool()
            qs, ks, vs = q[b, keep].float(), k[b, keep].float(), v[b, keep].float()
            n = qs.shape[0]
            for h in range(4):
                scores = qs[:, h] @ ks[:, h // 2].T / 32 ** 0.5
                scores = scores.masked_fill(torch.ones(n, n).tril() == 0, float("-inf"))
                want = torch.softmax(scores, -1) @ vs[:, h // 2]
                err = (out[b, keep, h].float() - want).abs().max().item()
                assert err < 5e-3, (b, h, err)
        print("ok", m.flash_attn_func.__module__)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_env_with(site))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ok flash_attn.flash_attn_interface" in proc.stdout


def test_module_level_imports_of_ktransformers_and_transformers(fa):
    from flash_attn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache  # noqa: F401
    from flash_attn.bert_padding import index_first_axis, pad_input, unpad_input  # noqa: F401
    from flash_attn.flash_attn_interface import flash_attn_varlen_qkvpacked_func  # noqa: F401
    from flash_attn.layers.rotary import apply_rotary_emb  # noqa: F401
    import inspect
    # transformers and ktransformers probe the signature for sliding-window support.
    assert "window_size" in inspect.signature(flash_attn_func).parameters
    assert "SDPA" in fa.__doc__ and "speed" in fa.__doc__


# ---------------------------------------------------------------- reference

def _allowed(seqlen_q, seqlen_k, causal, window=(-1, -1)):
    keep = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool)
    for i in range(seqlen_q):
        diag = i + seqlen_k - seqlen_q  # bottom-right alignment (flash-attn >= 2.1)
        for j in range(seqlen_k):
            if causal and j > diag:
                keep[i, j] = False
            if window[0] >= 0 and j < diag - window[0]:
                keep[i, j] = False
            if window[1] >= 0 and j > diag + window[1]:
                keep[i, j] = False
    return keep


def reference(q, k, v, softmax_scale=None, causal=False, window=(-1, -1), allowed=None):
    """Explicit attention in flash layout, in fp64 on CPU; rows that see no key are zero."""
    device = q.device
    q, k, v = q.cpu().double(), k.cpu().double(), v.cpu().double()
    batch, seqlen_q, heads_q, dim = q.shape
    seqlen_k, heads_k = k.shape[1], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(dim)
    if allowed is None:
        allowed = _allowed(seqlen_q, seqlen_k, causal, window)
    out = torch.zeros(batch, seqlen_q, heads_q, v.shape[-1], dtype=torch.float64)
    for h in range(heads_q):
        kv_head = h // (heads_q // heads_k)
        scores = torch.einsum("bqd,bkd->bqk", q[:, :, h], k[:, :, kv_head]) * scale
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        out[:, :, h] = torch.einsum("bqk,bkd->bqd", probs, v[:, :, kv_head])
    return out.float().to(device)


def rand(*shape, dtype=torch.float32, seed=[0]):
    seed[0] += 1
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed[0])).to(DEVICE, dtype)


def assert_close(out, expected, dtype):
    assert out.dtype == dtype
    assert out.shape == expected.shape
    err = (out.float() - expected).abs().max().item()
    assert err <= TOL[dtype], f"max abs error {err} > {TOL[dtype]}"


# ---------------------------------------------------------------- flash_attn_func

DENSE_CASES = {
    # name: (batch, seqlen_q, seqlen_k, heads_q, heads_k, dim_qk, dim_v, causal, softmax_scale)
    "square": (2, 7, 7, 4, 4, 64, 64, False, None),
    "square-causal": (2, 7, 7, 4, 4, 64, 64, True, None),
    "q-shorter-causal": (2, 3, 9, 4, 4, 64, 64, True, None),
    "q-longer-causal": (1, 6, 4, 2, 2, 32, 32, True, None),
    "decode-causal": (3, 1, 11, 4, 4, 64, 64, True, None),
    "gqa-8-2": (2, 5, 8, 8, 2, 64, 64, True, None),
    "mqa-8-1": (2, 5, 8, 8, 1, 64, 64, False, None),
    "mla-v128-qk192": (1, 6, 6, 4, 4, 192, 128, True, 0.1352),
    "scale-given": (2, 4, 6, 2, 2, 64, 64, True, 0.05),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", DENSE_CASES, ids=str)
def test_flash_attn_func_matches_reference(fa, case, dtype):
    b, sq, sk, hq, hk, d, dv, causal, scale = DENSE_CASES[case]
    q, k, v = rand(b, sq, hq, d, dtype=dtype), rand(b, sk, hk, d, dtype=dtype), rand(b, sk, hk, dv, dtype=dtype)
    out = fa.flash_attn_func(q, k, v, softmax_scale=scale, causal=causal)
    assert out.is_contiguous()
    assert_close(out, reference(q, k, v, scale, causal), dtype)


def test_causal_alignment_is_bottom_right_not_top_left(fa):
    """Guards the reference too: the top-left mask (SDPA's is_causal) gives a different answer."""
    q, k, v = rand(1, 3, 2, 32), rand(1, 8, 2, 32), rand(1, 8, 2, 32)
    out = fa.flash_attn_func(q, k, v, causal=True)
    top_left = torch.ones(3, 8, dtype=torch.bool).tril()
    assert (out - reference(q, k, v, allowed=top_left)).abs().max() > 1e-2
    assert_close(out, reference(q, k, v, causal=True), torch.float32)


def test_rows_without_keys_are_zero(fa):
    q, k, v = rand(1, 5, 2, 16), rand(1, 2, 2, 16), rand(1, 2, 2, 16)
    out = fa.flash_attn_func(q, k, v, causal=True)
    assert torch.equal(out[:, :3], torch.zeros_like(out[:, :3]))
    assert torch.isfinite(out).all()
    assert_close(out, reference(q, k, v, causal=True), torch.float32)


def test_default_scale_is_one_over_sqrt_of_q_head_dim(fa):
    q, k, v = rand(1, 4, 2, 192), rand(1, 4, 2, 192), rand(1, 4, 2, 128)
    out = fa.flash_attn_func(q, k, v)
    assert_close(out, reference(q, k, v, softmax_scale=192 ** -0.5), torch.float32)
    assert (out - reference(q, k, v, softmax_scale=128 ** -0.5)).abs().max() > 1e-3


@pytest.mark.parametrize("window,causal", [((2, 0), True), ((3, 1), False), ((1, -1), False), ((-1, 2), False)])
def test_sliding_window(fa, window, causal):
    q, k, v = rand(2, 5, 4, 32), rand(2, 8, 2, 32), rand(2, 8, 2, 32)
    out = fa.flash_attn_func(q, k, v, causal=causal, window_size=window)
    assert_close(out, reference(q, k, v, causal=causal, window=window), torch.float32)


def test_packed_variants(fa):
    qkv = rand(2, 6, 3, 4, 32)
    q, k, v = qkv.unbind(2)
    assert_close(fa.flash_attn_qkvpacked_func(qkv, causal=True), reference(q, k, v, causal=True), torch.float32)
    q2, kv = rand(2, 3, 4, 32), rand(2, 6, 2, 2, 32)
    assert_close(fa.flash_attn_kvpacked_func(q2, kv, causal=True),
                 reference(q2, kv[:, :, 0], kv[:, :, 1], causal=True), torch.float32)


def test_gradients_match_reference(fa):
    q, k, v = (rand(1, 4, 4, 16).requires_grad_() for _ in range(3))
    fa.flash_attn_func(q, k, v, causal=True).square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    reference(q, k, v, causal=True).square().sum().backward()
    for got, want in zip(grads, (q.grad, k.grad, v.grad)):
        assert (got - want).abs().max() < 1e-4


# ---------------------------------------------------------------- varlen and bert_padding

def _cu(lengths):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("causal", [True, False])
def test_varlen_three_sequences(fa, causal, dtype):
    lens_q, lens_k = [3, 1, 5], [6, 4, 5]
    hq, hk = 4, 2
    q = rand(sum(lens_q), hq, 64, dtype=dtype)
    k, v = rand(sum(lens_k), hk, 64, dtype=dtype), rand(sum(lens_k), hk, 32, dtype=dtype)
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    out = fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal)
    assert out.shape == (sum(lens_q), hq, 32) and out.dtype == dtype
    for s in range(3):
        qs, ks, vs = q[cu_q[s]:cu_q[s + 1]], k[cu_k[s]:cu_k[s + 1]], v[cu_k[s]:cu_k[s + 1]]
        expected = reference(qs[None], ks[None], vs[None], causal=causal)[0]
        assert_close(out[cu_q[s]:cu_q[s + 1]], expected, dtype)


def test_varlen_rejects_sequences_longer_than_max_seqlen(fa):
    q = rand(6, 2, 16)
    with pytest.raises(ValueError, match="max_seqlen"):
        fa.flash_attn_varlen_func(q, q, q, _cu([2, 4]), _cu([2, 4]), 3, 4)


def test_unpad_pad_and_padded_batch_through_varlen(fa):
    """The unpad -> varlen -> pad path of ktransformers' and transformers' flash-attention layers."""
    from flash_attn.bert_padding import index_first_axis, pad_input, unpad_input
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.int32, device=DEVICE)
    batch, seqlen, heads, dim = 3, 5, 2, 16
    q, k, v = rand(batch, seqlen, heads, dim), rand(batch, seqlen, heads, dim), rand(batch, seqlen, heads, dim)

    result = unpad_input(q, mask)
    assert len(result) == 4  # ktransformers unpacks exactly four values
    q_unpad, indices, cu_seqlens, max_seqlen = result
    assert indices.dtype == torch.int64 and indices.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 10, 11]
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.tolist() == [0, 5, 8, 10]
    assert max_seqlen == 5 and isinstance(max_seqlen, int)
    assert torch.equal(q_unpad, q.reshape(batch * seqlen, heads, dim)[indices])
    assert torch.equal(index_first_axis(k.reshape(batch * seqlen, heads, dim), indices),
                       k.reshape(batch * seqlen, heads, dim)[indices])
    repadded = pad_input(q_unpad, indices, batch, seqlen)
    assert torch.equal(repadded, q * mask[:, :, None, None])

    k_unpad = index_first_axis(k.reshape(batch * seqlen, heads, dim), indices)
    v_unpad = index_first_axis(v.reshape(batch * seqlen, heads, dim), indices)
    out = pad_input(fa.flash_attn_varlen_func(q_unpad, k_unpad, v_unpad, cu_seqlens, cu_seqlens, max_seqlen,
                                              max_seqlen, causal=True), indices, batch, seqlen)
    for b, n in enumerate(mask.sum(-1).tolist()):
        assert_close(out[b, :n], reference(q[b:b + 1, :n], k[b:b + 1, :n], v[b:b + 1, :n], causal=True)[0],
                     torch.float32)
        assert torch.equal(out[b, n:], torch.zeros_like(out[b, n:]))


# ---------------------------------------------------------------- kv cache

def _cache(batch, slots, heads, dim, filled):
    """A cache whose rows past `filled[b]` hold NaN: attending any of them would poison the output."""
    cache = rand(batch, slots, heads, dim)
    for b, n in enumerate(filled):
        cache[b, n:] = float("nan")
    return cache


@pytest.mark.parametrize("seqlens", [4, [2, 6]], ids=["int", "tensor"])
def test_kvcache_appends_in_place_and_attends_the_valid_prefix(fa, seqlens):
    batch, slots, hq, hk, dim, new = 2, 12, 4, 2, 32, 3
    filled = [seqlens] * batch if isinstance(seqlens, int) else seqlens
    k_cache, v_cache = _cache(batch, slots, hk, dim, filled), _cache(batch, slots, hk, dim, filled)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    q, k_new, v_new = rand(batch, new, hq, dim), rand(batch, new, hk, dim), rand(batch, new, hk, dim)
    cache_seqlens = seqlens if isinstance(seqlens, int) else torch.tensor(seqlens, dtype=torch.int32, device=DEVICE)
    cache_ptr = k_cache.data_ptr()

    out = fa.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=cache_seqlens, causal=True)

    assert k_cache.data_ptr() == cache_ptr and torch.isfinite(out).all()
    for b, n in enumerate(filled):
        assert torch.equal(k_cache[b, n:n + new], k_new[b]) and torch.equal(v_cache[b, n:n + new], v_new[b])
        assert torch.equal(k_cache[b, :n], k_before[b, :n]) and torch.equal(v_cache[b, :n], v_before[b, :n])
        assert k_cache[b, n + new:].isnan().all()  # untouched
        expected = reference(q[b:b + 1], k_cache[b:b + 1, :n + new], v_cache[b:b + 1, :n + new], causal=True)
        assert_close(out[b:b + 1], expected, torch.float32)


def test_kvcache_without_new_kv_as_ktransformers_prefill_calls_it(fa):
    """dynamic_attention.py: k/v already written, cache_seqlens = cached + q_len, causal."""
    k_cache, v_cache = _cache(1, 16, 2, 32, [9]), _cache(1, 16, 2, 32, [9])
    q = rand(1, 4, 2, 32)
    out = fa.flash_attn_with_kvcache(q=q, k_cache=k_cache, v_cache=v_cache,
                                     cache_seqlens=torch.tensor([9], dtype=torch.int32, device=DEVICE), causal=True)
    assert_close(out, reference(q, k_cache[:, :9], v_cache[:, :9], causal=True), torch.float32)


def test_kvcache_decode_fp16_mqa_and_cache_batch_idx(fa):
    k_cache = _cache(3, 10, 1, 64, [5, 7, 2]).half()
    v_cache = _cache(3, 10, 1, 64, [5, 7, 2]).half()
    q, k_new, v_new = rand(2, 1, 8, 64, dtype=torch.float16), rand(2, 1, 1, 64, dtype=torch.float16), \
        rand(2, 1, 1, 64, dtype=torch.float16)
    idx = torch.tensor([2, 0], dtype=torch.int32, device=DEVICE)
    seqlens = torch.tensor([2, 5], dtype=torch.int32, device=DEVICE)
    out = fa.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=seqlens,
                                     cache_batch_idx=idx, causal=True)
    for b, (row, n) in enumerate([(2, 2), (0, 5)]):
        assert torch.equal(k_cache[row, n], k_new[b, 0])
        assert_close(out[b:b + 1], reference(q[b:b + 1], k_cache[row:row + 1, :n + 1], v_cache[row:row + 1, :n + 1],
                                             causal=True), torch.float16)
    assert k_cache[1, 7:].isnan().all()  # the row no batch entry points at is untouched


def test_kvcache_paged_block_table(fa):
    """Paged cache (v0.3.x's flashinfer wrapper test calls it this way): same result as contiguous."""
    page, blocks_per_seq, batch, heads, dim = 4, 3, 2, 2, 16
    filled, new = [5, 9], 2
    contiguous_k = _cache(batch, page * blocks_per_seq, heads, dim, filled)
    contiguous_v = _cache(batch, page * blocks_per_seq, heads, dim, filled)
    order = torch.randperm(batch * blocks_per_seq, generator=torch.Generator().manual_seed(7))
    block_table = order.reshape(batch, blocks_per_seq).to(DEVICE, torch.int32)
    paged_k = torch.empty(batch * blocks_per_seq, page, heads, dim, device=DEVICE)
    paged_v = torch.empty_like(paged_k)
    for b in range(batch):
        for i in range(blocks_per_seq):
            paged_k[block_table[b, i]] = contiguous_k[b, i * page:(i + 1) * page]
            paged_v[block_table[b, i]] = contiguous_v[b, i * page:(i + 1) * page]
    q, k_new, v_new = rand(batch, new, 4, dim), rand(batch, new, heads, dim), rand(batch, new, heads, dim)
    seqlens = torch.tensor(filled, dtype=torch.int32, device=DEVICE)

    paged_out = fa.flash_attn_with_kvcache(q, paged_k, paged_v, k_new, v_new, cache_seqlens=seqlens,
                                           block_table=block_table, causal=True)
    flat_out = fa.flash_attn_with_kvcache(q, contiguous_k, contiguous_v, k_new, v_new, cache_seqlens=seqlens,
                                          causal=True)
    assert torch.isfinite(paged_out).all()
    assert_close(paged_out, flat_out.float(), torch.float32)
    for b in range(batch):
        gathered = paged_k[block_table[b].long()].flatten(0, 1)
        assert torch.equal(gathered[filled[b]:filled[b] + new], k_new[b])


def test_kvcache_rejects_overflow(fa):
    k_cache = v_cache = torch.zeros(1, 4, 1, 8, device=DEVICE)
    with pytest.raises(ValueError, match="cache slots"):
        fa.flash_attn_with_kvcache(rand(1, 2, 1, 8), k_cache, v_cache, rand(1, 2, 1, 8), rand(1, 2, 1, 8),
                                   cache_seqlens=3)


# ---------------------------------------------------------------- refusals

def _q():
    return rand(1, 4, 2, 16)


REFUSED = {
    "dropout_p": lambda fa: fa.flash_attn_func(_q(), _q(), _q(), dropout_p=0.1),
    "softcap": lambda fa: fa.flash_attn_func(_q(), _q(), _q(), softcap=30.0),
    "alibi_slopes": lambda fa: fa.flash_attn_func(_q(), _q(), _q(), alibi_slopes=torch.ones(2)),
    "return_attn_probs": lambda fa: fa.flash_attn_func(_q(), _q(), _q(), return_attn_probs=True),
    "deterministic": lambda fa: fa.flash_attn_func(_q().requires_grad_(), _q(), _q(), deterministic=True),
    "varlen dropout_p": lambda fa: fa.flash_attn_varlen_func(_q()[0], _q()[0], _q()[0], _cu([4]), _cu([4]), 4, 4,
                                                             dropout_p=0.5),
    "block_table": lambda fa: fa.flash_attn_varlen_func(_q()[0], _q()[0], _q()[0], _cu([4]), _cu([4]), 4, 4,
                                                        block_table=torch.zeros(1, 1, dtype=torch.int32)),
    "cache_leftpad": lambda fa: fa.flash_attn_with_kvcache(_q(), _q(), _q(), cache_seqlens=2,
                                                           cache_leftpad=torch.ones(1, dtype=torch.int32)),
    "return_softmax_lse": lambda fa: fa.flash_attn_with_kvcache(_q(), _q(), _q(), return_softmax_lse=True),
    "kvcache softcap": lambda fa: fa.flash_attn_with_kvcache(_q(), _q(), _q(), softcap=5.0),
}


@pytest.mark.parametrize("name", REFUSED)
def test_unsupported_arguments_raise_naming_the_argument(fa, name):
    with pytest.raises(NotImplementedError, match=name.split()[-1]):
        REFUSED[name](fa)


def test_supported_no_op_arguments_are_accepted(fa):
    """Values that mean 'off' in flash-attn are not refused."""
    q = _q()
    base = fa.flash_attn_func(q, q, q, causal=True)
    same = fa.flash_attn_func(q, q, q, 0.0, None, True, (-1, -1), 0.0, None, False, False)
    assert torch.equal(base, same)
    assert torch.equal(fa.flash_attn_with_kvcache(q, q.clone(), q.clone(), causal=True, num_splits=4), base)


# ---------------------------------------------------------------- rotary

def _rotary_reference(x, cos, sin, positions, interleaved):
    """Complex multiplication view: pair (a, b) -> (a + ib) * e^{i theta}; on CPU in fp64."""
    device, x, cos, sin = x.device, x.cpu(), cos.cpu(), sin.cpu()
    rot = 2 * cos.shape[-1]
    xr = x[..., :rot].double()
    if interleaved:
        pairs = torch.complex(xr[..., 0::2], xr[..., 1::2])
    else:
        pairs = torch.complex(xr[..., : rot // 2], xr[..., rot // 2:])
    angle = torch.complex(cos.double()[positions], sin.double()[positions]).unsqueeze(-2)
    turned = pairs * angle
    if interleaved:
        out = torch.stack((turned.real, turned.imag), dim=-1).flatten(-2)
    else:
        out = torch.cat((turned.real, turned.imag), dim=-1)
    return torch.cat((out.float(), x[..., rot:]), dim=-1).to(device)


@pytest.mark.parametrize("interleaved", [False, True])
def test_apply_rotary_emb(fa, interleaved):
    from flash_attn.layers.rotary import apply_rotary_emb
    theta = rand(32, 8).abs()
    cos, sin = theta.cos(), theta.sin()
    x = rand(2, 5, 3, 24)
    offsets = torch.tensor([0, 7], device=DEVICE)
    positions = torch.arange(5)[None, :] + offsets.cpu()[:, None]
    out = apply_rotary_emb(x, cos, sin, interleaved=interleaved, seqlen_offsets=offsets)
    assert_close(out, _rotary_reference(x, cos, sin, positions, interleaved), torch.float32)
    packed = apply_rotary_emb(x.reshape(10, 3, 24)[:7], cos, sin, interleaved=interleaved,
                              cu_seqlens=torch.tensor([0, 3, 7], dtype=torch.int32, device=DEVICE), max_seqlen=4)
    packed_positions = torch.tensor([0, 1, 2, 0, 1, 2, 3])
    assert_close(packed, _rotary_reference(x.reshape(10, 3, 24)[:7], cos, sin, packed_positions, interleaved),
                 torch.float32)


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("causal", [True, False])
def test_kvcache_rotary_rotates_new_k_into_the_cache_and_q(fa, causal, interleaved):
    """k at cache_seqlens + t (stored rotated); q likewise if causal, else all at cache_seqlens."""
    batch, slots, hq, hk, dim, new, rotary_dim = 2, 16, 4, 2, 32, 3, 16
    filled = [4, 9]
    k_cache, v_cache = _cache(batch, slots, hk, dim, filled), _cache(batch, slots, hk, dim, filled)
    theta = rand(32, rotary_dim // 2).abs()
    cos, sin = theta.cos(), theta.sin()
    q, k_new, v_new = rand(batch, new, hq, dim), rand(batch, new, hk, dim), rand(batch, new, hk, dim)
    out = fa.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, rotary_cos=cos, rotary_sin=sin,
                                     cache_seqlens=torch.tensor(filled, dtype=torch.int32, device=DEVICE),
                                     causal=causal, rotary_interleaved=interleaved)
    for b, n in enumerate(filled):
        k_rotated = _rotary_reference(k_new[b:b + 1], cos, sin, torch.arange(n, n + new)[None], interleaved)
        assert_close(k_cache[b:b + 1, n:n + new], k_rotated, torch.float32)
        assert torch.equal(v_cache[b, n:n + new], v_new[b])
        q_positions = torch.arange(n, n + new)[None] if causal else torch.full((1, new), n)
        q_rotated = _rotary_reference(q[b:b + 1], cos, sin, q_positions, interleaved)
        expected = reference(q_rotated, torch.cat((k_cache[b:b + 1, :n], k_rotated), 1), v_cache[b:b + 1, :n + new],
                             causal=causal)
        assert_close(out[b:b + 1], expected, torch.float32)


def test_kvcache_rotary_needs_new_k(fa):
    with pytest.raises(ValueError, match="need k and v"):
        fa.flash_attn_with_kvcache(_q(), _q(), _q(), cache_seqlens=2, rotary_cos=torch.ones(8, 4),
                                   rotary_sin=torch.zeros(8, 4))


# ---------------------------------------------------------------- library helper, CLI, smoke script

def test_cli_builds_the_wheel(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ktlegacy", "build-stub", "--dest", str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / f"flash_attn-{stub_version()}-py3-none-any.whl").is_file()
    assert proc.stdout.startswith("built ")


def _build_stub_cli(dest: Path, kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "KTLEGACY_TEST_KILL_AT"}
    if kill_at:
        env["KTLEGACY_TEST_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-m", "ktlegacy", "build-stub", "--dest", str(dest)],
                          capture_output=True, text=True, cwd=REPO, env=env)


def test_a_killed_build_leaves_no_partial_wheel_and_the_next_one_cleans_up(tmp_path):
    """Killed before the wheel's rename: no wheel (only the temp file); the next build leaves the
    wheel and nothing else, and the source directory gets no build debris."""
    name = f"flash_attn-{stub_version()}-py3-none-any.whl"
    source_before = sorted(str(p.relative_to(STUB_DIR)) for p in STUB_DIR.rglob("*") if "__pycache__" not in p.parts)
    killed = _build_stub_cli(tmp_path, kill_at="rename:1")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".{name}.tmp"]  # written, never renamed
    proc = _build_stub_cli(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]
    # the build ran on a scratch copy: nothing (build/, *.egg-info) appeared in overlays/flash-attn-stub
    assert sorted(str(p.relative_to(STUB_DIR)) for p in STUB_DIR.rglob("*")
                  if "__pycache__" not in p.parts) == source_before


def test_a_symlinked_output_path_is_refused_in_one_line(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, tmp_path / "linked-dest")
    proc = _build_stub_cli(tmp_path / "linked-dest")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"--dest {tmp_path / 'linked-dest'} is a symlink (to {outside})" in proc.stderr
    name = f"flash_attn-{stub_version()}-py3-none-any.whl"
    dest = tmp_path / "dest"
    dest.mkdir()
    (outside / name).write_bytes(b"not a wheel")
    os.symlink(outside / name, dest / name)
    proc = _build_stub_cli(dest)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"{dest / name} is a symlink (to {outside / name})" in proc.stderr
    assert [p.name for p in outside.iterdir()] == [name] and (outside / name).read_bytes() == b"not a wheel"
    assert os.readlink(dest / name) == str(outside / name)


def test_build_without_setuptools_is_a_one_line_error(tmp_path):
    venv = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    with pytest.raises(KtlegacyError, match="no setuptools"):
        build_stub_wheel(tmp_path / "out", python=str(venv / "bin" / "python"))
    assert not list((tmp_path / "out").glob("*.whl"))


def test_build_with_a_missing_python_is_a_one_line_error(tmp_path):
    with pytest.raises(KtlegacyError, match="cannot run"):
        build_stub_wheel(tmp_path, python=str(tmp_path / "no-python"))


def test_smoke_script_passes_with_the_stub(site):
    proc = subprocess.run([sys.executable, str(SMOKE)], capture_output=True, text=True, env=_env_with(site))
    assert proc.returncode == 0, proc.stderr
    assert "ok flash-attn 2.6.3+ktlegacy.sdpa" in proc.stdout
    assert proc.stdout.count("ok flash_attn_func") == 4
    assert proc.stdout.strip().splitlines()[-1].startswith("flash-attn stub ok:")  # tests/smoke/run.py shows it


def test_smoke_script_fails_clearly_without_flash_attn(tmp_path):
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, str(SMOKE)], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: flash-attn stub smoke check: import failed")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_smoke_script_catches_a_top_left_causal_mask(site, tmp_path):
    """The smoke check must fail on an implementation that gets the causal alignment wrong."""
    broken = tmp_path / "broken"
    import shutil
    shutil.copytree(site, broken)
    interface = broken / "flash_attn" / "flash_attn_interface.py"
    text = interface.read_text()
    anchor = "    elif left is None and right == 0 and seqlen_q == seqlen_k:"
    assert anchor in text
    interface.write_text(text.replace(anchor, "    elif left is None and right == 0:"))
    proc = subprocess.run([sys.executable, str(SMOKE)], capture_output=True, text=True, env=_env_with(broken))
    assert proc.returncode == 1
    assert "differs from the reference" in proc.stderr
