"""KLinearGGUF (overlay gguf-linear, issue 22): the parts a CPU can check.

* **the kernels' block decoding**: overlays/gguf_linear/ktlegacy_gguf.cuh is the code the CUDA
  kernels run; compiled here with g++ (tests/gguf_host/ktl_host.cpp), every type's decoder must
  equal gguf-py's ``gguf.quants.dequantize`` bit for bit, and the matvec's lane order must sum to
  the fp64 product. The types it decodes are the ones the doctor counts as blocks.
* **the operator's forward** (KLinearGGUF.forward: matvec for few rows, scratch + slices for
  more) on that host decoder instead of the CUDA extension, against an fp64 reference.
* **the overlays** on the real sdist: sources written, setup.py's extension, LINEAR_MAP, the rule
  files (the patched files parse to exactly what ktlegacy.core.gpu_linear.patched_rules says, which is
  what the doctor estimates from), lm_head on the last position, no-op re-runs, drift refused.
* **the test-model quantizers** (Q4_K, Q6_K) give valid blocks close to their input.

The kernels themselves run on the GPU machine (bench/gpu_linear.py, bench/gpu_run.sh); the CUDA
11.8 lane compiles them for sm70 and sm75 and checks their SASS (tests/test_cuda118_compile.py).
"""

from __future__ import annotations

import ctypes
import importlib.util
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import yaml

from ktlegacy.core import facts, gpu_linear
from ktlegacy.core.arch import get_arch
from ktlegacy.core.overlay import Drift, patch_tree
from ktlegacy.core.refs import REFS
from ktlegacy.testing import ggml_quant

REPO = Path(__file__).resolve().parent.parent
HEADER_DIR = REPO / "overlays" / "gguf_linear"
RULES = "ktransformers/optimize/optimize_rules"
ALL_TYPES = list(ggml_quant.TYPES)


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    """The kernels' decoders built for this CPU."""
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.fail("g++ is needed to build the kernels' decoders for the CPU (tests/host-setup installs it)")
    lib = tmp_path_factory.mktemp("ktl-host") / "ktl_host.so"
    proc = subprocess.run([cxx, "-O2", "-std=c++17", "-Wall", "-Werror", "-shared", "-fPIC", f"-I{HEADER_DIR}",
                           str(REPO / "tests" / "gguf_host" / "ktl_host.cpp"), "-o", str(lib)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    so = ctypes.CDLL(str(lib))
    so.ktl_dequant.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_longlong, ctypes.c_void_p]
    so.ktl_matvec.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    return so


def host_dequant(host, qtype: str, blocks: np.ndarray) -> np.ndarray:
    tid, qk, _ = ggml_quant.TYPES[qtype]
    rows = blocks.shape[0]
    cols = blocks.shape[1] // ggml_quant.TYPES[qtype][2] * qk
    out = np.full((rows, cols), np.nan, dtype=np.float32)
    blocks = np.ascontiguousarray(blocks)
    assert host.ktl_dequant(tid, blocks.ctypes.data, rows * cols // qk, out.ctypes.data) == 0
    return out


# ---------------------------------------------------------------- the kernels' decoders

@pytest.mark.parametrize("qtype", ALL_TYPES)
@pytest.mark.parametrize("cols", [1024, 7168])
def test_decoders_equal_gguf_py(host, qtype, cols):
    rng = np.random.default_rng(hash((qtype, cols)) % 2**32)
    blocks = ggml_quant.random_blocks(rng, qtype, 8, cols)
    ours = host_dequant(host, qtype, blocks)
    assert not np.isnan(ours).any()  # every value written: the chunks cover each block once
    np.testing.assert_array_equal(ours, ggml_quant.dequantize(blocks, qtype))


@pytest.mark.parametrize("qtype", ALL_TYPES)
def test_matvec_lane_sums_equal_fp64(host, qtype):
    """The kernel's summation (each lane's chunks in fp32, then the 32 lanes) against fp64."""
    tid, _, _ = ggml_quant.TYPES[qtype]
    rng = np.random.default_rng(7)
    rows, cols = 64, 2048
    blocks = ggml_quant.random_blocks(rng, qtype, rows, cols)
    x = rng.standard_normal(cols).astype(np.float32)
    y = np.zeros(rows, dtype=np.float32)
    assert host.ktl_matvec(tid, np.ascontiguousarray(blocks).ctypes.data, rows, cols, x.ctypes.data, y.ctypes.data) == 0
    w = ggml_quant.dequantize(blocks, qtype).astype(np.float64)
    ref = w @ x.astype(np.float64)
    bound = 1e-5 * np.sqrt(((w * x) ** 2).sum(axis=1)) * np.sqrt(cols)   # fp32 accumulation of `cols` terms
    assert (np.abs(y - ref) <= bound).all(), (np.abs(y - ref) / bound).max()


def test_the_kernels_decode_exactly_the_types_the_doctor_counts_as_blocks(host):
    decoded = {name for name, (tid, qk, nbytes) in ggml_quant.TYPES.items()
               if (host.ktl_values_per_block(tid), host.ktl_bytes_per_block(tid)) == (qk, nbytes)}
    assert decoded == set(gpu_linear.DECODED_TYPES) == set(ggml_quant.TYPES)
    from gguf import GGMLQuantizationType
    for name, (tid, _, _) in ggml_quant.TYPES.items():
        assert GGMLQuantizationType[name].value == tid
    for tid in (0, 1, 3, 7, 9, 15, 16, 30):   # F32, F16, Q4_1, Q5_1, Q8_1, Q8_K, IQ2_XXS, BF16
        assert host.ktl_values_per_block(tid) == 0


# ---------------------------------------------------------------- the operator's forward on CPU

@pytest.fixture(scope="module")
def operator(host, tmp_path_factory):
    """overlays/gguf_linear/ktlegacy_gguf_linear.py as the overlay writes it, with its kernels
    replaced by the host decoder (a CPU stand-in for ktlegacy_gguf_ops) and KLinearTorch by a
    stand-in base (the real one imports upstream's CUDA extensions)."""
    import torch
    src = (HEADER_DIR / "ktlegacy_gguf_linear.py").read_text()
    src = (src.replace("@KTLEGACY_GPU_LINEAR_DEFAULT@", facts.GPU_LINEAR)
              .replace("@KTLEGACY_GPU_LINEAR_MATVEC_MAX_ROWS@", str(facts.GPU_LINEAR_MATVEC_MAX_ROWS))
              .replace("@KTLEGACY_GPU_LINEAR_SCRATCH_MIB@", str(facts.GPU_LINEAR_SCRATCH_MIB)))
    linear = types.ModuleType("ktransformers.operators.linear")

    class KLinearTorch:  # noqa: D401 - only what KLinearGGUF reaches for
        def forward(self, x, *args, **kwargs):
            raise AssertionError("the fp16 path ran where the GGUF path should")
    linear.KLinearTorch = KLinearTorch
    linear.LINEAR_MAP = {}
    saved = {k: sys.modules.get(k) for k in ("ktransformers", "ktransformers.operators", "ktransformers.operators.linear")}
    sys.modules.update({"ktransformers": types.ModuleType("ktransformers"),
                        "ktransformers.operators": types.ModuleType("ktransformers.operators"),
                        "ktransformers.operators.linear": linear})
    try:
        path = tmp_path_factory.mktemp("op") / "ktlegacy_gguf_linear.py"
        path.write_text(src)
        spec = importlib.util.spec_from_file_location("ktlegacy_gguf_linear_cpu", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        assert linear.LINEAR_MAP == {"KLinearGGUF": mod.KLinearGGUF}   # the module registers itself
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v

    class HostOps:
        """ktlegacy_gguf_ops's interface on the host decoder (CPU tensors)."""
        max_rows = facts.GPU_LINEAR_MATVEC_MAX_ROWS
        calls = []

        def matvec(self, w, tid, n, k, x, y):
            assert x.shape[0] <= self.max_rows
            self.calls.append(("matvec", x.shape[0]))
            wb = w.numpy()
            for r in range(x.shape[0]):
                xr = np.ascontiguousarray(x[r].float().numpy())
                yr = np.zeros(n, dtype=np.float32)
                host.ktl_matvec(tid, wb.ctypes.data, n, k, xr.ctypes.data, yr.ctypes.data)
                y[r] = torch.from_numpy(yr).to(y.dtype)

        def dequantize(self, w, tid, n, k, row0, rows, out):
            self.calls.append(("dequantize", row0, rows))
            name = next(q for q, (t, _, _) in ggml_quant.TYPES.items() if t == tid)
            row_bytes = w.numel() // n
            blocks = w.numpy().reshape(n, row_bytes)[row0:row0 + rows]
            out[:rows * k] = torch.from_numpy(host_dequant(host, name, blocks).reshape(-1)).to(out.dtype)

    mod._ops = HostOps()
    return mod


class FakeLayer:
    def __init__(self, op_mod, blocks, qtype, n, k):
        import torch
        self.qweight = torch.from_numpy(np.ascontiguousarray(blocks).reshape(-1))
        self.ggml_type, self.out_features, self.in_features = ggml_quant.TYPES[qtype][0], n, k
        self.dtype, self.has_bias = torch.float32, False


@pytest.mark.parametrize("tokens", [1, 4, 5, 37])
def test_operator_forward_matvec_and_sliced_prefill(operator, monkeypatch, tokens):
    """1-4 rows: the matvec; more: dequantize into the scratch and multiply, in row slices when the
    weight exceeds the scratch (as DeepSeek-V3's lm_head does): the slices cover every row once."""
    import torch
    rng = np.random.default_rng(tokens)
    n, k = 300, 512
    blocks = ggml_quant.random_blocks(rng, "Q6_K", n, k)
    layer = FakeLayer(operator, blocks, "Q6_K", n, k)
    monkeypatch.setattr(operator, "SCRATCH_MIB", 0)           # force slices...
    monkeypatch.setattr(operator, "slice_rows", lambda rows, cols, itemsize=2: 64)   # ...of 64 rows
    operator._ops.calls.clear()
    x = torch.from_numpy(rng.standard_normal((2, tokens, k)).astype(np.float32))
    y = operator.KLinearGGUF.forward(layer, x)
    assert y.shape == (2, tokens, n) and y.dtype == x.dtype
    ref = x.double().reshape(-1, k) @ torch.from_numpy(ggml_quant.dequantize(blocks, "Q6_K")).double().T
    torch.testing.assert_close(y.reshape(-1, n).double(), ref, rtol=1e-4, atol=1e-3)
    kinds = {c[0] for c in operator._ops.calls}
    if 2 * tokens <= facts.GPU_LINEAR_MATVEC_MAX_ROWS:
        assert kinds == {"matvec"}
    else:
        assert kinds == {"dequantize"}
        assert [c[1:] for c in operator._ops.calls] == [(r, min(64, n - r)) for r in range(0, n, 64)]


def test_scratch_is_one_buffer_per_device_grown_not_reallocated(operator):
    import torch
    a = operator.scratch(torch.device("cpu"), 100, torch.float16)
    b = operator.scratch(torch.device("cpu"), 50, torch.float16)
    assert b.data_ptr() == a.data_ptr()
    c = operator.scratch(torch.device("cpu"), 200, torch.float16)
    assert c.numel() == 200 and operator.scratch(torch.device("cpu"), 10, torch.float16).data_ptr() == c.data_ptr()


def test_mode_setting(operator, monkeypatch):
    """The operator reads KTLEGACY_GPU_LINEAR at load; the doctor and serve.sh refuse a bad value
    first, by the settings table (ktlegacy.serving), in one line."""
    monkeypatch.delenv("KTLEGACY_GPU_LINEAR", raising=False)
    assert operator.gpu_linear_mode() == facts.GPU_LINEAR == "quant"
    monkeypatch.setenv("KTLEGACY_GPU_LINEAR", "fp16")
    assert operator.gpu_linear_mode() == "fp16"
    monkeypatch.setenv("KTLEGACY_GPU_LINEAR", "int4")
    with pytest.raises(ValueError, match=r"KTLEGACY_GPU_LINEAR='int4': use one of quant, fp16"):
        operator.gpu_linear_mode()
    from ktlegacy.core.errors import KtlegacyError
    from ktlegacy.profiles import setting
    assert setting({}, "KTLEGACY_GPU_LINEAR") == "quant" and setting({"KTLEGACY_GPU_LINEAR": "fp16"}, "KTLEGACY_GPU_LINEAR") == "fp16"
    with pytest.raises(KtlegacyError, match=r"KTLEGACY_GPU_LINEAR='int4' is not one of quant \| fp16"):
        setting({"KTLEGACY_GPU_LINEAR": "int4"}, "KTLEGACY_GPU_LINEAR")


# ---------------------------------------------------------------- the overlays on the sdist

@pytest.fixture(scope="module")
def patched(sdist_tree, tmp_path_factory):
    dest = tmp_path_factory.mktemp("gguf-linear") / "tree"
    shutil.copytree(sdist_tree, dest, symlinks=True)
    patch_tree(dest, get_arch("sm75"), out=lambda line: None)
    return dest


def test_overlay_writes_the_operator_the_kernels_and_the_extension(patched):
    cuda = patched / "ktransformers/ktransformers_ext/cuda/ktlegacy_gguf"
    assert (cuda / "ktlegacy_gguf.cu").read_text() == (HEADER_DIR / "ktlegacy_gguf.cu").read_text()
    assert (cuda / "ktlegacy_gguf.cuh").read_text() == (HEADER_DIR / "ktlegacy_gguf.cuh").read_text()
    op = (patched / "ktransformers/operators/ktlegacy_gguf_linear.py").read_text()
    assert "@KTLEGACY" not in op
    assert f'DEFAULT_MODE = "{facts.GPU_LINEAR}"' in op
    assert f'MATVEC_MAX_ROWS = int("{facts.GPU_LINEAR_MATVEC_MAX_ROWS}")' in op
    setup = (patched / "setup.py").read_text()
    lines = setup.splitlines()
    i = next(n for n, line in enumerate(lines) if 'CMakeExtension("cpuinfer_ext")' in line)
    assert "CUDAExtension('ktlegacy_gguf_ops', ['ktransformers/ktransformers_ext/cuda/ktlegacy_gguf/ktlegacy_gguf.cu']" in lines[i + 1]
    assert setup.count("ktlegacy_gguf_ops") == 1
    compile(setup, "setup.py", "exec")
    linear = (patched / "ktransformers/operators/linear.py").read_text()
    assert re.search(r'^LINEAR_MAP = \{\n(?:    .*\n)+\}\nimport ktransformers\.operators\.ktlegacy_gguf_linear  # ktlegacy',
                     linear, re.M)
    assert 'generate_op: str| None = "KLinearGGUF"' in linear and 'prefill_op: str| None = "KLinearGGUF"' in linear


def test_patched_rule_files_are_what_the_doctor_estimates_from(sdist_tree, patched):
    """Every rule file: no sm80-only op left, every GPU linear KLinearGGUF, and the file parses to
    exactly gpu_linear.patched_rules(the pristine file) (so the doctor's view and the image's
    files agree, whichever one it reads); the DeepSeek files get lm_head on its devices."""
    files = sorted(p.relative_to(sdist_tree) for p in (sdist_tree / RULES).glob("*.yaml"))
    assert len(files) >= 10
    for rel in files:
        before = yaml.safe_load((sdist_tree / rel).read_text())
        after = yaml.safe_load((patched / rel).read_text())
        assert after == gpu_linear.patched_rules(before), rel
        assert not any(op in str(after) for op in gpu_linear.SM80_ONLY), rel
        for rule in after:
            kwargs = (rule.get("replace") or {}).get("kwargs") or {}
            if rule.get("replace", {}).get("class") == gpu_linear.LINEAR_CLASS:
                assert kwargs.get("generate_op") == kwargs.get("prefill_op") == gpu_linear.GPU_LINEAR_OP, rel
    v3_4 = yaml.safe_load((patched / RULES / "DeepSeek-V3-Chat-multi-gpu-4.yaml").read_text())
    assert v3_4[0] == gpu_linear.lm_head_rule("cuda:3", "cuda:3")
    v3_1 = yaml.safe_load((patched / RULES / "DeepSeek-V3-Chat.yaml").read_text())
    assert v3_1[0] == gpu_linear.lm_head_rule("cuda:0", "cuda:0")
    assert gpu_linear.patched_rules(v3_1) == v3_1   # a patched file stays as it is


def test_lm_head_devices_follow_upstreams_first_match():
    default = {"match": {"name": "(^lm_head)"}, "replace": {"class": "default",
                                                            "kwargs": {"generate_device": "cuda:2", "prefill_device": "cuda:1"}}}
    injected = {"match": {"name": "^lm_head$", "class": "torch.nn.Linear"},
                "replace": {"class": gpu_linear.LINEAR_CLASS, "kwargs": {"generate_op": "KLinearCPUInfer"}}}
    other_class = {"match": {"name": "lm_head", "class": "ktransformers.models.modeling_deepseek_v3.DeepseekV3MoE"},
                   "replace": {"class": "x.Y"}}
    on_cpu = {"match": {"name": "^lm_head"}, "replace": {"class": "default", "kwargs": {"generate_device": "cpu"}}}
    assert gpu_linear.lm_head_devices([]) == ("cuda:0", "cuda:0")
    assert gpu_linear.lm_head_devices([other_class, default]) == ("cuda:2", "cuda:1")
    assert gpu_linear.lm_head_devices([injected, default]) is None
    assert gpu_linear.lm_head_devices([on_cpu]) is None


def test_overlays_reapply_as_no_ops_and_refuse_drift(sdist_tree, patched, tmp_path):
    lines = []
    again = patch_tree(patched, get_arch("sm75"), out=lines.append)
    assert not again.written and "gguf-linear: already applied, nothing to change" in lines
    assert "last-token-logits: already applied, nothing to change" in lines
    drifted = tmp_path / "drifted"
    shutil.copytree(sdist_tree, drifted, symlinks=True)
    setup = drifted / "setup.py"
    setup.write_text(setup.read_text().replace('        CMakeExtension("cpuinfer_ext"),\n', ""))
    before = {p: p.read_bytes() for p in drifted.rglob("*") if p.is_file()}
    with pytest.raises(Drift, match=r'overlay gguf-linear: setup.py: expected one ext_modules entry CMakeExtension\("cpuinfer_ext"'):
        patch_tree(drifted, get_arch("sm75"), ref=REFS["0.2.1.post1"], out=lambda line: None)
    assert {p: p.read_bytes() for p in drifted.rglob("*") if p.is_file()} == before


def test_last_token_logits(patched):
    v3 = (patched / "ktransformers/models/modeling_deepseek_v3.py").read_text()
    assert "logits = self.lm_head(hidden_states[:,-1:,:].to(self.lm_head.weight.device))" in v3
    v2 = (patched / "ktransformers/models/modeling_deepseek.py").read_text()
    assert "logits = self.lm_head(hidden_states[:,-1:,:])" in v2


# ---------------------------------------------------------------- test-model quantizers

@pytest.mark.parametrize("qtype, max_rel_rmse", [("Q4_K", 0.12), ("Q6_K", 0.03), ("Q8_0", 0.01)])
def test_quantizers_write_valid_blocks_close_to_their_input(qtype, max_rel_rmse):
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((32, 512)) * rng.uniform(0.01, 2.0, (32, 1))).astype(np.float32)
    blocks = ggml_quant.quantize(x, qtype)
    assert blocks.dtype == np.uint8 and blocks.shape == (32, ggml_quant.row_bytes(qtype, 512))
    y = ggml_quant.dequantize(blocks, qtype)
    rel = np.sqrt(((y - x) ** 2).mean(axis=1) / (x ** 2).mean(axis=1))
    assert rel.max() < max_rel_rmse
    np.testing.assert_array_equal(ggml_quant.dequantize(ggml_quant.quantize(np.zeros((2, 256), np.float32), qtype), qtype), 0)
