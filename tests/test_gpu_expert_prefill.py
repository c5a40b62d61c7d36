"""gpu-expert-prefill (overlay 68): long prompts' routed experts on the GPU, weights streamed from the GGUF.

On this CPU machine, with the runtime module as the overlays write it into the real sdist:

* every torch dequantiser equals gguf-py's (llama.cpp's Python reference) on the same blocks:
  Q4_0/Q5_0/Q8_0 blocks from gguf-py's quantiser, K-quant blocks of random bytes with sane scales;
* the dequantiser is the fastest the build has: our ktlegacy_gguf_ops kernels where importable
  (CUDA only: not on this machine), else torch's, else upstream's;
* ``routed_experts`` (run here on the CPU device) equals an fp32 reference of the MoE layer for the
  benchmark model's quant mix (Q4_K gate/up, Q5_0 down at intermediate 1408), whatever the memory
  budget (one expert at a time or all at once), and leaves unrouted experts alone;
* ``experts_prefill_on_gpu`` says no (None: the CPU path runs) below the threshold, with the
  threshold 0, on a CPU output device, and for weight types it has no GPU dequantiser for; a bad
  threshold is one clear error;
* the overlay hooks the prompt branch of KExpertsCPU.forward only, re-applies as a no-op, and
  refuses drift leaving the tree untouched.

tests/test_moe_partial_block.py checks the same function against the real C++ backend
(cpuinfer_ext built from the sdist); the GPU run (bench/peer_run.sh) checks it on CUDA, against
the CPU backend, and times it; bench/gpu_prefill_path.py compares our kernels with torch's there.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ktlegacy.core.arch import get_arch
from ktlegacy.core.overlay import patch_tree
from ktlegacy.testing.moe_reference import moe_reference

REPO = Path(__file__).resolve().parent.parent
EXPERTS = "ktransformers/operators/experts.py"


@pytest.fixture(scope="module")
def patched(sdist_tree, tmp_path_factory):
    dest = tmp_path_factory.mktemp("gpu-prefill") / "tree"
    shutil.copytree(sdist_tree, dest, symlinks=True)
    patch_tree(dest, get_arch("sm75"), out=lambda line: None)
    return dest


@pytest.fixture(scope="module")
def rt(patched):
    spec = importlib.util.spec_from_file_location("ktlegacy_runtime_gpu_prefill", patched / "ktransformers" / "ktlegacy_runtime.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ("KTLEGACY_GPU_PREFILL_MIN_TOKENS", "KTLEGACY_GPU_PREFILL_MIB", "KTLEGACY_EMULATE_CC"):
        monkeypatch.delenv(name, raising=False)


# ---------------------------------------------------------------- dequantisers

def _k_blocks(rng, n: int, block_bytes: int, halves: dict[int, float]) -> np.ndarray:
    """Random bytes, with the fp16 fields at the given byte offsets set to sane values."""
    raw = np.frombuffer(rng.bytes(n * block_bytes), dtype=np.uint8).reshape(n, block_bytes).copy()
    for offset, scale in halves.items():
        raw[:, offset:offset + 2] = (rng.uniform(0.5, 1.5, (n, 1)) * scale).astype("<f2").view(np.uint8)
    return raw


def _blocks(rng, name: str, n: int) -> np.ndarray:
    from gguf.quants import quantize
    from gguf import GGMLQuantizationType as T
    values = rng.standard_normal((n, 256)).astype(np.float32)
    if name in ("Q4_0", "Q5_0", "Q8_0"):
        return quantize(values, T[name])
    if name == "F32":
        return values.view(np.uint8)
    if name in ("F16", "BF16"):
        return quantize(values, T[name]).view(np.uint8) if name == "BF16" else values.astype("<f2").view(np.uint8)
    layout = {"Q4_K": (144, {0: 1e-2, 2: 1e-2}), "Q5_K": (176, {0: 1e-2, 2: 1e-2}), "Q6_K": (210, {208: 1e-2})}
    block_bytes, halves = layout[name]
    return _k_blocks(rng, n, block_bytes, halves)


@pytest.mark.parametrize("name", ["Q4_0", "Q5_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "F16", "BF16", "F32"])
def test_torch_dequantisers_match_gguf_py(rt, name):
    from gguf.quants import dequantize as reference
    from gguf import GGMLQuantizationType as T
    raw = np.ascontiguousarray(_blocks(np.random.default_rng(7), name, 64))
    want = reference(raw, T[name]).reshape(-1).astype(np.float32)
    ggml_type = next(t for t, (n, _, _) in rt.GGML_BLOCKS.items() if n == name)
    got = rt.dequantize(raw, ggml_type, "cpu", torch.float32).numpy()
    assert got.shape == want.shape
    assert np.isfinite(want).all()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_block_table_is_ggmls():
    import gguf
    spec = importlib.util.spec_from_file_location("rt_table", REPO / "overlays" / "runtime" / "ktlegacy_runtime.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for ggml_type, (name, per_block, block_bytes) in module.GGML_BLOCKS.items():
        qtype = gguf.GGMLQuantizationType[name]
        assert int(qtype) == ggml_type, name
        assert gguf.GGML_QUANT_SIZES[qtype] == (per_block, block_bytes), name


def test_the_fastest_gpu_dequantiser_this_build_has_is_chosen(rt, monkeypatch):
    """Our kernels (ktlegacy_gguf_ops) where built, then torch's, then upstream's; a CPU tensor takes torch's."""
    try:
        import ktlegacy_gguf_ops  # noqa: F401
        pytest.skip("ktlegacy_gguf_ops is importable here: this checks a build without it")
    except ImportError:
        pass
    assert rt.gguf_ops() == (None, set())
    assert [rt.gpu_dequant_impl(t) for t in (12, 6, 10, 23, 3, None)] == ["torch", "torch", "upstream", "upstream",
                                                                           None, None]
    monkeypatch.setattr(rt, "_GGUF_OPS", [(SimpleNamespace(), {2, 6, 8, 10, 11, 12, 13, 14, 23})])
    assert [rt.gpu_dequant_impl(t) for t in (12, 6, 10, 23, 3, 1)] == ["ktlegacy"] * 4 + [None, "torch"]
    raw = np.ascontiguousarray(_blocks(np.random.default_rng(3), "Q4_K", 8))
    want = rt.dequantize(raw, 12, "cpu", torch.float32, impl="torch")
    for impl in (None, "ktlegacy"):   # the kernels are CUDA's: on the CPU torch's compute it
        assert torch.equal(rt.dequantize(raw, 12, "cpu", torch.float32, impl=impl), want)
    with pytest.raises(ValueError, match=r"dequantiser 'fast': use one of ktlegacy, torch, upstream"):
        rt.dequantize(raw, 12, "cpu", torch.float32, impl="fast")


# ---------------------------------------------------------------- the MoE layer

def _layer(seed=0, experts=8, hidden=256, inter=1408, tokens=40, top_k=2, unrouted=(3,)):
    from ktlegacy.testing.peer_model import quant_blocks
    rng = np.random.default_rng(seed)
    gate = quant_blocks(rng, (experts, inter, hidden), "Q4_K", hidden ** -0.5)
    up = quant_blocks(rng, (experts, inter, hidden), "Q4_K", hidden ** -0.5)
    down = quant_blocks(rng, (experts, hidden, inter), "Q5_0", 2 * inter ** -0.5)
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([e for e in range(experts) if e not in unrouted])
    ids = torch.stack([allowed[torch.randperm(len(allowed), generator=g)[:top_k]] for _ in range(tokens)])
    weights = torch.rand((tokens, top_k), generator=g)
    x = torch.randn((tokens, hidden), generator=g)
    tensors = {"gate": (gate.reshape(-1), 12), "up": (up.reshape(-1), 12), "down": (down.reshape(-1), 6)}
    return x, ids, weights, tensors, dict(experts=experts, hidden=hidden, inter=inter)


def _reference(x, ids, weights, tensors, shape):
    from gguf.quants import dequantize
    from gguf import GGMLQuantizationType as T
    e, h, i = shape["experts"], shape["hidden"], shape["inter"]
    gate = torch.from_numpy(dequantize(tensors["gate"][0], T.Q4_K).reshape(e, i, h).copy())
    up = torch.from_numpy(dequantize(tensors["up"][0], T.Q4_K).reshape(e, i, h).copy())
    down = torch.from_numpy(dequantize(tensors["down"][0], T.Q5_0).reshape(e, h, i).copy())
    return moe_reference(x, ids, weights, gate, up, down)


def test_routed_experts_match_the_fp32_reference_at_any_budget(rt):
    x, ids, weights, tensors, shape = _layer()
    want = _reference(x, ids, weights, tensors, shape)
    per_expert = shape["inter"] * shape["hidden"] * (3 * 4 + 4)
    seen = []

    def counting(raw, ggml_type, device, dtype):
        seen.append(len(raw))
        return rt.dequantize(raw, ggml_type, device, dtype)

    results = {}
    for label, budget in (("one expert at a time", 1), ("three at a time", 3 * per_expert), ("all", 1 << 40)):
        seen.clear()
        got = rt.routed_experts(x, ids, weights, tensors, shape["experts"], shape["inter"], budget, dequant=counting)
        results[label] = got
        err = ((got.double() - want).abs().mean() / want.abs().mean()).item()
        assert err < 1e-5, (label, err)
        if label == "one expert at a time":  # expert 3 has no token: its weights never move
            per = len(tensors["gate"][0]) // shape["experts"]
            assert len(seen) == 3 * (shape["experts"] - 1)
            assert set(seen) == {per, len(tensors["down"][0]) // shape["experts"]}
    assert torch.allclose(results["all"], results["three at a time"], rtol=1e-5, atol=1e-6)


def test_padded_slots_place_each_assignment_in_its_runs_batch(rt):
    # experts 0..3 with 2, 0, 3, 1 assignments; runs (0, 2) and (2, 4): batches of 2 x 2 and 2 x 3 rows
    assert rt._padded_slots([2, 0, 3, 1], [(0, 2), (2, 4)]).tolist() == [0, 1, 0, 1, 2, 3]
    # one run of all four: 4 x 3 rows; expert 3's row is the first of its block of three
    assert rt._padded_slots([2, 0, 3, 1], [(0, 4)]).tolist() == [0, 1, 6, 7, 8, 9]


class _InlineStaging:
    """The real Staging's bookkeeping (slots, the next layer's prefetch) with the copy done inline
    on the CPU: what routed_experts does with runs, futures and prefetches, checkable here."""

    def __init__(self):
        self.submitted = []
        self.prefetched = None

    def submit(self, parts, device):
        from concurrent.futures import Future
        self.submitted.append(tuple((name, len(array)) for name, array, _ in parts))
        done = Future()
        done.set_result({name: (torch.from_numpy(np.array(array)), t) for name, array, t in parts})
        return done

    @staticmethod
    def take(future, device):
        return future.result()


def test_staged_runs_and_the_next_layers_prefetch(rt):
    x, ids, weights, tensors, shape = _layer()
    want = _reference(x, ids, weights, tensors, shape)
    staging = _InlineStaging()
    nxt = _layer(seed=1)
    got = rt.routed_experts(x, ids, weights, tensors, shape["experts"], shape["inter"], 1 << 40, staging=staging,
                            layer_key=3, next_layer=(4, nxt[3], torch.device("cpu")))
    assert ((got.double() - want).abs().mean() / want.abs().mean()).item() < 1e-5
    # 8 experts, staged: four runs of two; expert 3 has no token but shares run (2, 3) with expert 2;
    # after the last run, the next layer's first run
    per = {n: len(t[0]) // shape["experts"] for n, t in tensors.items()}
    run = tuple((n, 2 * per[n]) for n in ("gate", "up", "down"))
    assert staging.submitted == [run] * 5
    assert staging.prefetched[0] == (4, "cpu", (0, 2))
    # layer 4 takes its prefetched first run instead of copying it again
    x4, ids4, w4, t4, _ = nxt
    got4 = rt.routed_experts(x4, ids4, w4, t4, shape["experts"], shape["inter"], 1 << 40, staging=staging, layer_key=4)
    assert len(staging.submitted) == 5 + 3 and staging.prefetched is None
    assert torch.allclose(got4, rt.routed_experts(x4, ids4, w4, t4, shape["experts"], shape["inter"], 1 << 40))
    # a prefetch for another layer (or device) is dropped and the run copied again
    staging.prefetched = ((9, "cpu", (0, 2)), staging.submit([(n, a[:2 * per[n]], t) for n, (a, t) in t4.items()], "cpu"))
    rt.routed_experts(x4, ids4, w4, t4, shape["experts"], shape["inter"], 1 << 40, staging=staging, layer_key=4)
    assert len(staging.submitted) == 8 + 1 + 4


def test_routed_experts_keep_the_activation_dtype(rt):
    x, ids, weights, tensors, shape = _layer(tokens=12)
    got = rt.routed_experts(x.half(), ids, weights, tensors, shape["experts"], shape["inter"], 1 << 30)
    assert got.dtype == torch.float16 and got.shape == x.shape
    want = _reference(x.half().float(), ids, weights, tensors, shape)
    assert ((got.double() - want).abs().mean() / want.abs().mean()).item() < 5e-3


# ---------------------------------------------------------------- when the GPU path runs

def _experts(tensors, shape, out_device="cuda:0", gate_type=12):
    return SimpleNamespace(out_device=out_device, gate=tensors["gate"][0], up=tensors["up"][0], down=tensors["down"][0],
                           gate_type=gate_type, up_type=12, down_type=6, n_routed_experts=shape["experts"],
                           config=SimpleNamespace(moe_intermediate_size=shape["inter"]))


def test_short_prompts_cpu_devices_and_zero_stay_on_the_cpu(rt, monkeypatch):
    x, ids, weights, tensors, shape = _layer(tokens=16)
    monkeypatch.setenv("KTLEGACY_GPU_PREFILL_MIN_TOKENS", "1024")
    assert rt.experts_prefill_on_gpu(_experts(tensors, shape), x, ids, weights) is None  # 16 < 1024
    monkeypatch.setenv("KTLEGACY_GPU_PREFILL_MIN_TOKENS", "8")
    assert rt.experts_prefill_on_gpu(_experts(tensors, shape, out_device="cpu"), x, ids, weights) is None
    # padded batch (v0.2.4post1+): 16 rows, 4 real
    assert rt.experts_prefill_on_gpu(_experts(tensors, shape), x, ids, weights, torch.tensor([4])) is None
    monkeypatch.setenv("KTLEGACY_GPU_PREFILL_MIN_TOKENS", "0")
    assert rt.experts_prefill_on_gpu(_experts(tensors, shape), x, ids, weights) is None


def test_a_bad_threshold_is_one_clear_error(rt, monkeypatch):
    monkeypatch.setenv("KTLEGACY_GPU_PREFILL_MIN_TOKENS", "lots")
    with pytest.raises(ValueError, match=r"KTLEGACY_GPU_PREFILL_MIN_TOKENS='lots': expected auto or a whole number >= 0"):
        rt.gpu_prefill_min_tokens()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal before any CUDA call on a machine without one")
def test_a_type_without_a_gpu_dequantiser_stays_on_the_cpu(rt, monkeypatch, capsys):
    x, ids, weights, tensors, shape = _layer(tokens=16)
    monkeypatch.setenv("KTLEGACY_GPU_PREFILL_MIN_TOKENS", "8")
    assert rt.experts_prefill_on_gpu(_experts(tensors, shape, gate_type=3), x, ids, weights) is None  # Q4_1
    assert "routed experts in type 3 have no GPU dequantiser" in capsys.readouterr().err


# ---------------------------------------------------------------- the experts in page-locked memory

def _loaded(tmp_path, tensors):
    """KExpertsCPU.load's ``w`` as upstream builds it: 1-D views of a read-only np.memmap of the file."""
    names = ("gate", "up", "down")
    blob = b"".join(np.asarray(tensors[n][0]).tobytes() for n in names)
    (tmp_path / "model.gguf").write_bytes(b"\0" * 64 + blob)
    mm = np.memmap(tmp_path / "model.gguf", mode="r")
    w, offset = {}, 64
    for n in names:
        size = np.asarray(tensors[n][0]).nbytes
        w[n], w[f"{n}_type"], offset = mm[offset:offset + size], tensors[n][1], offset + size
    return w


def test_pin_experts_moves_a_layer_into_one_registered_buffer(rt, tmp_path, monkeypatch):
    x, ids, weights, tensors, shape = _layer()
    w = _loaded(tmp_path, tensors)
    calls = []
    monkeypatch.setattr(rt, "_PINNED", [])
    monkeypatch.setattr(rt, "_PIN_REFUSED", [])
    got = rt.pin_experts(_experts(tensors, shape), w, register=lambda address, n: calls.append((address, n)) or 0)
    total = sum(w[n].nbytes for n in ("gate", "up", "down"))
    assert len(calls) == 1 and calls[0][1] == total
    for n in ("gate", "up", "down"):
        assert np.array_equal(got[n], w[n]) and got[n].dtype == w[n].dtype and got[n].ndim == 1
        assert rt.is_pinned(got[n]) and not rt.is_pinned(w[n])       # the backend gets the copy, not the mmap
        assert got[f"{n}_type"] == w[f"{n}_type"]
    assert rt.is_pinned(got["up"][7:19]) and not rt.is_pinned(np.zeros(4, np.uint8))
    # one buffer, registered from its first byte, the three projections back to back
    assert calls[0][0] == got["gate"].ctypes.data == got["down"].ctypes.data - got["gate"].nbytes - got["up"].nbytes
    # the pinned copy computes what the mmap does
    assert torch.equal(rt.routed_experts(x, ids, weights, {n: (got[n], got[f"{n}_type"]) for n in ("gate", "up", "down")},
                                         shape["experts"], shape["inter"], 1 << 40),
                       rt.routed_experts(x, ids, weights, tensors, shape["experts"], shape["inter"], 1 << 40))


def test_pin_experts_leaves_the_mmap_where_it_does_not_apply(rt, tmp_path, monkeypatch, capsys):
    _, _, _, tensors, shape = _layer()
    w = _loaded(tmp_path, tensors)
    monkeypatch.setattr(rt, "_PINNED", [])
    monkeypatch.setattr(rt, "_PIN_REFUSED", [])
    never = lambda address, n: pytest.fail("registered where it should not")  # noqa: E731
    monkeypatch.setenv("KTLEGACY_GPU_PREFILL_MIN_TOKENS", "0")                 # the GPU path is off
    assert rt.pin_experts(_experts(tensors, shape), w, register=never) is w
    monkeypatch.setenv("KTLEGACY_GPU_PREFILL_MIN_TOKENS", "auto")
    assert rt.pin_experts(_experts(tensors, shape, out_device="cpu"), w, register=never) is w
    assert rt.pin_experts(_experts(tensors, shape, gate_type=3), dict(w, gate_type=3), register=never)["gate_type"] == 3
    amx = SimpleNamespace(**vars(_experts(tensors, shape)), backend="AMXInt8")
    assert rt.pin_experts(amx, w, register=never) is w
    assert rt.pin_experts(_experts(tensors, shape), dict(w, gate=[w["gate"]]), register=never)["gate"][0] is w["gate"]
    # memory short: said once, in one line, with the numbers
    monkeypatch.setattr(rt, "_mem_available", lambda: (rt.PIN_RESERVE_MIB << 20) + 1024)
    assert rt.pin_experts(_experts(tensors, shape), w, register=never) is w
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "would leave less than 4096 MiB of MemAvailable" in err
    # CUDA refuses: said once; later layers do not try again
    monkeypatch.setattr(rt, "_mem_available", lambda: None)
    assert rt.pin_experts(_experts(tensors, shape), w, register=lambda address, n: 712) is w
    assert "cudaHostRegister: 712" in capsys.readouterr().err
    assert rt.pin_experts(_experts(tensors, shape), w, register=never) is w and not rt._PINNED
    # a cudart that raises instead of answering: the same, never an error at load
    monkeypatch.setattr(rt, "_PIN_REFUSED", [])
    monkeypatch.setattr(rt, "_gpu_prefill_notes", set())

    def raising(address, n):
        raise RuntimeError("CUDA driver initialization failed")
    assert rt.pin_experts(_experts(tensors, shape), w, register=raising) is w
    assert "cudaHostRegister: RuntimeError: CUDA driver initialization failed" in capsys.readouterr().err


# ---------------------------------------------------------------- the overlay

def test_the_hook_is_in_the_prompt_branch_only(patched):
    text = (patched / EXPERTS).read_text()
    assert text.count("ktlegacy_runtime.experts_prefill_on_gpu(") == 1
    forward = text.split("class KExpertsCPU(KExpertsBase):", 1)[1].split("    def forward(", 1)[1].split("    def unload", 1)[0]
    capture, prompt = forward.split("        else:\n", 1)
    assert "experts_prefill_on_gpu" not in capture and "is_current_stream_capturing()" in capture
    assert prompt.lstrip().startswith("on_gpu = ktlegacy_runtime.experts_prefill_on_gpu(self, input_tensor, expert_ids, weights)")
    assert prompt.index("return on_gpu") < prompt.index("input_tensor = input_tensor.contiguous().cpu()")
    assert "from ktransformers import ktlegacy_runtime  # ktlegacy" in text
    # KExpertsCPU.load pins the weights before the backend takes their addresses (gate_ptr)
    load = text.split("class KExpertsCPU(KExpertsBase):", 1)[1].split("    def load(", 1)[1].split("    def ", 1)[0]
    assert text.count("ktlegacy_runtime.pin_experts(") == 1
    assert load.index("w = self.load_weights()") < load.index("w = ktlegacy_runtime.pin_experts(self, w)") \
        < load.index('self.gate = w["gate"]') < load.index("gate_ptr")
    compile(text, EXPERTS, "exec")


def test_reapply_is_a_no_op_and_drift_is_refused(patched, pristine_tree):
    again = subprocess.run([sys.executable, "-m", "ktlegacy", "patch", "--src", str(patched), "--arch", "sm75"],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "gpu-expert-prefill: already applied, nothing to change" in again.stdout
    path = pristine_tree / EXPERTS
    path.write_text(path.read_text().replace("input_tensor = input_tensor.contiguous().cpu()",
                                             "input_tensor = input_tensor.cpu()"))
    before = {p: p.read_bytes() for p in pristine_tree.rglob("*.py")}
    refused = subprocess.run([sys.executable, "-m", "ktlegacy", "patch", "--src", str(pristine_tree), "--arch", "sm75",
                              "--ref", "0.2.1.post1"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0
    assert "overlay gpu-expert-prefill: ktransformers/operators/experts.py: expected 1 occurrence(s)" in refused.stderr
    assert {p: p.read_bytes() for p in pristine_tree.rglob("*.py")} == before


# ---------------------------------------------------------------- KTLEGACY_GPU_PREFILL_MIN_TOKENS=auto

def test_auto_is_the_default_and_any_case_reads(rt, monkeypatch):
    assert rt.GPU_PREFILL_MIN_TOKENS == "auto" and rt.gpu_prefill_min_tokens() == "auto"
    monkeypatch.setenv("KTLEGACY_GPU_PREFILL_MIN_TOKENS", " AUTO ")
    assert rt.gpu_prefill_min_tokens() == "auto"
    monkeypatch.setenv("KTLEGACY_GPU_PREFILL_MIN_TOKENS", "512")
    assert rt.gpu_prefill_min_tokens() == 512
    monkeypatch.setenv("KTLEGACY_GPU_PREFILL_MIN_TOKENS", "-3")
    with pytest.raises(ValueError, match=r"KTLEGACY_GPU_PREFILL_MIN_TOKENS='-3': expected auto or a whole number >= 0"):
        rt.gpu_prefill_min_tokens()


def test_auto_threshold_is_the_crossover_of_the_measured_costs(rt):
    # per layer at 1024 tokens: CPU 100 ms; copy 20 ms of 240 MB; GPU path 30 ms (10 ms beyond the copy)
    warm_up = (1024, 0.5, 0.2, 0.5, 240e6)     # the first sample (cold page cache) is dropped
    threshold, detail = rt.AutoThreshold.decide([warm_up, (1024, 0.1, 0.02, 0.03, 240e6)] * 1)
    # CPU 97.7 us/token, GPU 9.8 us/token beyond the 20 ms copy: 0.02 / (97.66e-6 - 9.77e-6) = 227.6
    assert threshold == 228
    t_cpu = lambda n: n * 0.1 / 1024
    t_gpu = lambda n: 0.02 + n * 0.01 / 1024
    assert t_gpu(threshold) <= t_cpu(threshold) and t_gpu(threshold - 1) > t_cpu(threshold - 1)
    assert "12.0 GB/s" in detail and "100.0 ms" in detail
    # a GPU path that costs more per token than the CPU never wins
    assert rt.AutoThreshold.decide([(1024, 0.01, 0.02, 0.05, 1e6)])[0] == 0


def test_auto_runs_short_prompts_on_the_cpu_before_and_after_calibrating(rt, monkeypatch):
    x, ids, weights, tensors, shape = _layer(tokens=16)
    assert rt.AUTO_STATE.threshold is None
    assert rt.experts_prefill_on_gpu(_experts(tensors, shape), x, ids, weights) is None  # 16 < 256: no calibration
    assert rt.AUTO_STATE.samples == []
    monkeypatch.setattr(rt.AUTO_STATE, "threshold", 8)
    assert rt.experts_prefill_on_gpu(_experts(tensors, shape, out_device="cpu"), x, ids, weights) is None
    monkeypatch.setattr(rt.AUTO_STATE, "threshold", 0)   # measured: the CPU is faster at any length
    assert rt.experts_prefill_on_gpu(_experts(tensors, shape), x, ids, weights) is None


def test_run_plan_skips_unrouted_runs_and_staging_makes_four(rt):
    # the benchmark model's experts (64 x 1408 x 2048, fp16): 37 fit 1 GiB; staged, four runs a layer
    assert rt.run_size(64, 1408, 2048, torch.float16, 2**30, staged=False) == 37
    assert rt.run_size(64, 1408, 2048, torch.float16, 2**30, staged=True) == 16
    assert rt.run_size(64, 1408, 2048, torch.float16, 2**20, staged=True) == 1
    counts = [0] * 64
    counts[5] = counts[40] = 3
    assert rt._runs(counts, 64, 16) == [(0, 16), (32, 48)]
