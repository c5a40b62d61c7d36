"""ktlegacy: KLinearGGUF, a linear layer that keeps its GGUF weight blocks on the GPU.

Written into the patched tree as ``ktransformers/operators/ktlegacy_gguf_linear.py`` by ktlegacy's
``gguf-linear`` overlay, which also registers it in ``LINEAR_MAP`` and builds its kernels
(``ktlegacy_gguf_ops``, CUDA, sm_70+) with the other extensions; the rule overlay names it where
the rules named Marlin (sm80+ only) or KLinearTorch.

Below sm80 upstream's only GPU linear is KLinearTorch, which dequantizes the GGUF weight to fp16
at load: DeepSeek-V3's non-expert weights then take ~30 GiB instead of the ~9 GiB of their blocks.
KLinearGGUF keeps the blocks (no requantization, no fp16 copy) and computes from them:

* a few rows (decode: one token; up to ``MATVEC_MAX_ROWS``): ``ktlegacy_gguf_ops.matvec``, one
  pass over the blocks, decoded in registers, fp32 accumulation;
* more rows (prefill): the weight is dequantized into one fp16 scratch buffer per device, reused by
  every layer (at most ``SCRATCH_MIB``; larger weights such as DeepSeek-V3's lm_head go through it
  in row slices), then cuBLAS multiplies.

Types: those the kernels decode (``ktlegacy_gguf_ops.supported_types()``: Q4_0, Q5_0, Q8_0,
Q2_K-Q6_K, IQ4_XS). Any other type (F16, BF16, F32 tensors, other quants), a weight handed in by
the caller, a loader without GGUF blocks (safetensors), or ``KTLEGACY_GPU_LINEAR=fp16`` take
KLinearTorch's path unchanged.
The forward allocates only through torch's caching allocator and never synchronises, so CUDA-graph
capture keeps working.
"""

from __future__ import annotations

import os
import sys

import torch

from ktransformers.operators import linear as _linear
from ktransformers.operators.linear import KLinearTorch

GPU_LINEAR_ENV = "KTLEGACY_GPU_LINEAR"
GPU_LINEAR_MODES = ("quant", "fp16")
DEFAULT_MODE = "@KTLEGACY_GPU_LINEAR_DEFAULT@"
MATVEC_MAX_ROWS = int("@KTLEGACY_GPU_LINEAR_MATVEC_MAX_ROWS@")
SCRATCH_MIB = int("@KTLEGACY_GPU_LINEAR_SCRATCH_MIB@")

_ops = None
_scratch: dict = {}  # device -> fp16 tensor, grown to the largest slice a prefill needed
_notes: set = set()


def gpu_linear_mode() -> str:
    """``quant`` (compute from the GGUF blocks) or ``fp16`` (KLinearTorch), from KTLEGACY_GPU_LINEAR."""
    value = os.environ.get(GPU_LINEAR_ENV, "").strip().lower() or DEFAULT_MODE
    if value not in GPU_LINEAR_MODES:
        raise ValueError(f"{GPU_LINEAR_ENV}={os.environ.get(GPU_LINEAR_ENV)!r}: use one of {', '.join(GPU_LINEAR_MODES)}")
    return value


def ops():
    """The compiled kernels (imported on first use: the package imports without them)."""
    global _ops
    if _ops is None:
        import ktlegacy_gguf_ops
        _ops = ktlegacy_gguf_ops
    return _ops


def _note(key: str, text: str) -> None:
    if key not in _notes:
        _notes.add(key)
        print(f"ktlegacy: {text}", file=sys.stderr, flush=True)


def scratch(device: torch.device, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A (numel,) view of the device's reused dequantization buffer (grown when a prefill needs more)."""
    key = (str(device), dtype)
    buf = _scratch.get(key)
    if buf is None or buf.numel() < numel:
        _scratch.pop(key, None)
        del buf
        buf = _scratch[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def slice_rows(rows: int, cols: int, itemsize: int = 2, budget_mib: int | None = None) -> int:
    """How many weight rows one scratch slice holds (at least one)."""
    budget = (SCRATCH_MIB if budget_mib is None else budget_mib) * 2**20
    return max(1, min(rows, budget // (cols * itemsize)))


class KLinearGGUF(KLinearTorch):
    """A GPU linear on GGUF blocks (see the module docstring); KLinearTorch otherwise."""

    def __init__(self, key, gguf_loader, config, orig_module=None, device: str = "cuda", **kwargs):
        super().__init__(key, gguf_loader, config, orig_module, device, **kwargs)
        self.qweight = None
        self.ggml_type = None

    def _blocks(self):
        """(raw uint8 bytes, ggml type, values per block, bytes per block) of this layer's weight, or
        None where the blocks cannot be used (the kernels say which types they decode)."""
        loader, name = self.gguf_loader, self.key + ".weight"
        info = getattr(loader, "tensor_info", {}).get(name)
        if info is None or not hasattr(loader, "get_mmap_tensor"):
            return None  # a safetensors loader, or a fused/renamed tensor: KLinearTorch's loader knows it
        ggml_type = int(info["ggml_type"])
        per_block, block_bytes = ops().block_layout(ggml_type)
        if not per_block:
            return None
        return loader.get_mmap_tensor(name), ggml_type, per_block, block_bytes

    def load(self, w=None, device=None):
        if getattr(self, "loaded", False):
            return
        if device is None:
            device = self.device
        found = None
        if w is None and torch.device(device).type == "cuda" and gpu_linear_mode() == "quant":
            found = self._blocks()
        if found is None:
            self.qweight = None
            return super().load(w, device)
        import numpy as np
        raw, ggml_type, qk, block_bytes = found
        if self.in_features % qk or len(raw) != self.out_features * self.in_features // qk * block_bytes:
            raise ValueError(f"ktlegacy: {self.key}.weight: {len(raw)} bytes of ggml type {ggml_type} are not a "
                             f"{self.out_features} x {self.in_features} weight")
        self.qweight = torch.from_numpy(np.ascontiguousarray(raw)).to(device)
        self.ggml_type = ggml_type
        self.weight = self.qweight  # what modeling code reads (lm_head.weight.device)
        self.has_bias = self.key + ".bias" in getattr(self.gguf_loader, "tensor_file_map", {})
        if self.has_bias:
            self.bias = self.gguf_loader.load_gguf_tensor(self.key + ".bias", device=str(device)).to(self.dtype)
        if ops().max_rows < MATVEC_MAX_ROWS:  # fail at load, not in the first request, if the kernels do not fit
            raise RuntimeError(f"ktlegacy_gguf_ops handles {ops().max_rows} rows per matvec, KLinearGGUF sends "
                               f"up to {MATVEC_MAX_ROWS}: the extension and the operator come from different builds")
        _note("on", f"{GPU_LINEAR_ENV}=quant: GPU linears compute from their GGUF blocks ({GPU_LINEAR_ENV}=fp16 "
                    "dequantizes them at load instead)")
        if hasattr(self, "loaded"):
            self.loaded = True

    def unload(self):
        self.qweight = None
        super().unload()
        if hasattr(self, "loaded"):
            self.loaded = False

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.qweight is None:
            return super().forward(x, *args, **kwargs)
        dtype, out_device = x.dtype, x.device
        # fp16 where the model runs in fp16 (every GPU below sm80); fp32 otherwise (bf16 has no kernel
        # here, and fp16 could overflow a bf16 model's activations)
        compute = torch.float16 if self.dtype == torch.float16 else torch.float32
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]).to(device=self.qweight.device, dtype=compute)
        if not x2.is_contiguous() or x2.data_ptr() % 16:
            x2 = x2.clone(memory_format=torch.contiguous_format)
        rows, n, k = x2.shape[0], self.out_features, self.in_features
        if rows <= MATVEC_MAX_ROWS:
            y = torch.empty((rows, n), dtype=compute, device=x2.device)
            ops().matvec(self.qweight, self.ggml_type, n, k, x2, y)
        else:
            step = slice_rows(n, k, torch.finfo(compute).bits // 8)
            buf = scratch(x2.device, step * k, compute)
            if step >= n:
                ops().dequantize(self.qweight, self.ggml_type, n, k, 0, n, buf)
                y = x2 @ buf.view(n, k).t()
            else:
                y = torch.empty((rows, n), dtype=compute, device=x2.device)
                for row0 in range(0, n, step):
                    take = min(step, n - row0)
                    ops().dequantize(self.qweight, self.ggml_type, n, k, row0, take, buf)
                    y[:, row0:row0 + take] = x2 @ buf[:take * k].view(take, k).t()
        if self.has_bias:
            y = y + self.bias
        return y.view(*lead, n).to(dtype=dtype, device=out_device)


# Registered here, not by linear.py's map literal: linear.py imports this module right after its
# LINEAR_MAP, and whichever of the two is imported first, the op is in the map once both are loaded.
_linear.LINEAR_MAP[KLinearGGUF.__name__] = KLinearGGUF
