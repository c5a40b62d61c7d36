"""ktlegacy_runtime, as the runtime overlay writes it into the real sdist (overlays/runtime).

The decisions (compute capability, dtype, Triton stages, prefill path) are checked under the
environment variables the GPU runs use; ``sdpa_prefill`` is checked on CPU against a
straightforward reference of flash-attn 2.1+'s ``flash_attn_func``: per-head matmul, softmax,
and a causal mask built element by element with the bottom-right rule ``j <= i + k_len - q_len``
(a query row that sees no key gives 0). Tolerances: fp32 1e-5, fp16 5e-3 absolute (inputs
rounded to fp16 before the reference sees them).
"""

from __future__ import annotations

import importlib.util
import math
import shutil

import pytest
import torch

from ktlegacy.core.arch import get_arch
from ktlegacy.core.overlay import patch_tree


@pytest.fixture(scope="module", params=["sm70", "sm75"])
def runtime(request, sdist_tree, tmp_path_factory):
    dest = tmp_path_factory.mktemp(f"rt-{request.param}") / "tree"
    shutil.copytree(sdist_tree, dest, symlinks=True)
    patch_tree(dest, get_arch(request.param), out=lambda line: None)
    spec = importlib.util.spec_from_file_location(f"ktlegacy_runtime_{request.param}",
                                                  dest / "ktransformers" / "ktlegacy_runtime.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.ARCH = request.param
    return module


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    monkeypatch.delenv("KTLEGACY_EMULATE_CC", raising=False)
    monkeypatch.delenv("KTLEGACY_PREFILL", raising=False)


# ---------------------------------------------------------------- decisions

def test_build_arch_is_substituted(runtime):
    assert runtime.BUILD_ARCH == runtime.ARCH
    assert runtime.BUILD_CC == get_arch(runtime.ARCH).compute_capability


def test_without_a_gpu_the_build_arch_decides(runtime):
    assert not torch.cuda.is_available()  # the CI machine; on a GPU this test means nothing
    assert runtime.compute_capability() == runtime.BUILD_CC
    assert runtime.is_legacy()
    assert runtime.triton_decode_num_stages() == 1
    assert runtime.default_dtype() == torch.float16


@pytest.mark.parametrize("cc, legacy", [("7.0", True), ("7.5", True), ("8.0", False), ("9.0", False), ("7", True)])
def test_emulated_compute_capability(runtime, monkeypatch, cc, legacy):
    monkeypatch.setenv("KTLEGACY_EMULATE_CC", cc)
    major, _, minor = cc.partition(".")
    assert runtime.compute_capability() == (int(major), int(minor or 0))
    assert runtime.is_legacy() is legacy
    assert runtime.triton_decode_num_stages() == (1 if legacy else 2)
    assert runtime.default_dtype() == (torch.float16 if legacy else torch.bfloat16)
    assert runtime.default_dtype(torch.bfloat16) == (torch.float16 if legacy else torch.bfloat16)
    assert runtime.default_dtype(torch.float32) == torch.float32  # only bf16 is replaced
    assert runtime.default_dtype(torch.float16) == torch.float16


def test_bad_emulated_capability_is_a_clear_error(runtime, monkeypatch):
    monkeypatch.setenv("KTLEGACY_EMULATE_CC", "turing")
    with pytest.raises(ValueError, match="KTLEGACY_EMULATE_CC='turing'"):
        runtime.compute_capability()


@pytest.mark.parametrize("value, path", [(None, "sdpa"), ("", "sdpa"), ("sdpa", "sdpa"), (" Windows ", "windows")])
def test_prefill_path(runtime, monkeypatch, value, path):
    if value is not None:
        monkeypatch.setenv("KTLEGACY_PREFILL", value)
    assert runtime.prefill_path() == path


def test_unknown_prefill_path_is_a_clear_error(runtime, monkeypatch):
    monkeypatch.setenv("KTLEGACY_PREFILL", "flash")
    with pytest.raises(ValueError, match="KTLEGACY_PREFILL='flash': use one of sdpa, windows"):
        runtime.prefill_path()


def test_compute_dtype_where_flash_attn_ran(runtime, monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setenv("KTLEGACY_EMULATE_CC", "7.5")
    assert runtime._compute_dtype(torch.bfloat16, cuda) == torch.float16  # no bf16 below sm80
    assert runtime._compute_dtype(torch.float16, cuda) == torch.float16
    assert runtime._compute_dtype(torch.float32, cuda) == torch.float32
    assert runtime._compute_dtype(torch.bfloat16, cpu) == torch.bfloat16
    monkeypatch.setenv("KTLEGACY_EMULATE_CC", "9.0")
    assert runtime._compute_dtype(torch.bfloat16, cuda) == torch.bfloat16


# ---------------------------------------------------------------- sdpa_prefill vs flash-attn semantics

def reference(q, k, v, softmax_scale=None, causal=True):
    """flash_attn_func's result, computed the long way in fp32. (b, s, h, d) layout."""
    q, k, v = q.float(), k.float(), v.float()
    b, q_len, hq, d = q.shape
    k_len, hk = k.shape[1], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1 / math.sqrt(d)
    out = torch.zeros(b, q_len, hq, v.shape[-1])
    for bi in range(b):
        for h in range(hq):
            kv = h // (hq // hk)
            scores = q[bi, :, h] @ k[bi, :, kv].T * scale
            for i in range(q_len):
                visible = [j for j in range(k_len) if not causal or j <= i + k_len - q_len]
                if not visible:
                    continue  # flash-attn: a row with no key attends to nothing -> 0
                row = scores[i, visible]
                p = torch.softmax(row, dim=0)
                out[bi, i, h] = p @ v[bi, visible, kv]
    return out


def rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed + sum(shape))
    return torch.randn(*shape, generator=g).to(dtype)


@pytest.mark.parametrize("q_len, k_len", [(7, 7), (3, 9), (1, 6), (9, 4)])
@pytest.mark.parametrize("causal", [True, False])
def test_matches_flash_attn_fp32(runtime, q_len, k_len, causal):
    q, k, v = rand(2, q_len, 4, 64), rand(2, k_len, 4, 64, seed=1), rand(2, k_len, 4, 64, seed=2)
    out = runtime.sdpa_prefill(q, k, v, softmax_scale=0.11, causal=causal)
    assert out.shape == (2, q_len, 4, 64) and out.dtype == torch.float32 and out.is_contiguous()
    torch.testing.assert_close(out, reference(q, k, v, 0.11, causal), atol=1e-5, rtol=0)


@pytest.mark.parametrize("q_len, k_len", [(6, 6), (2, 8)])
def test_deepseek_call_site_fp16_padded_v(runtime, q_len, k_len):
    """The upstream call in KDeepseekV2Attention: q/k head dim 192, v (128) zero-padded to 192,
    fp16, causal, softmax_scale given; the caller slices the first 128 channels."""
    q = rand(1, q_len, 3, 192, dtype=torch.float16)
    k = rand(1, k_len, 3, 192, dtype=torch.float16, seed=1)
    v = rand(1, k_len, 3, 128, dtype=torch.float16, seed=2)
    v_padded = torch.nn.functional.pad(v, [0, 192 - 128], value=0)
    scale = 192 ** -0.5 * 1.3
    out = runtime.sdpa_prefill(q, k, v_padded, softmax_scale=scale, causal=True)
    assert out.dtype == torch.float16 and out.shape == (1, q_len, 3, 192)
    assert torch.count_nonzero(out[..., 128:]) == 0  # zero padding stays zero, as in flash-attn
    torch.testing.assert_close(out[..., :128].float(), reference(q, k, v, scale), atol=5e-3, rtol=0)


def test_v_head_dim_may_differ_without_padding(runtime):
    q, k, v = rand(2, 5, 2, 192), rand(2, 5, 2, 192, seed=1), rand(2, 5, 2, 128, seed=2)
    out = runtime.sdpa_prefill(q, k, v, softmax_scale=None)
    assert out.shape == (2, 5, 2, 128)
    torch.testing.assert_close(out, reference(q, k, v, None), atol=1e-5, rtol=0)


def test_grouped_query_heads(runtime):
    q, k, v = rand(1, 4, 8, 32), rand(1, 6, 2, 32, seed=1), rand(1, 6, 2, 32, seed=2)
    torch.testing.assert_close(runtime.sdpa_prefill(q, k, v), reference(q, k, v), atol=1e-5, rtol=0)


def test_bad_head_counts_are_refused(runtime):
    with pytest.raises(ValueError, match="not a multiple"):
        runtime.sdpa_prefill(rand(1, 2, 3, 8), rand(1, 2, 2, 8), rand(1, 2, 2, 8))
