#!/usr/bin/env python3
"""On a GPU: its compute capability is the one the image was built for, and a CUDA kernel from
each extension runs (KTransformersOps' q8_0 dequantize; ktlegacy_gguf_ops' matvec and
dequantize, KLinearGGUF's kernels; cpuinfer_ext's linear synchronised with a CUDA stream) and
agrees with torch.

No GPU visible: skipped. Set the expected arch with KTLEGACY_IMAGE_ARCH (the image sets it) or
KTLEGACY_ARCH (outside an image). Every GPU visible to the process is checked.
"""

import sys

from smokelib import ARCH_CC, fail, image_arch, missing_cpu_flags, skip, standin

import torch

if not torch.cuda.is_available():
    skip("no GPU visible to this container/process (torch.cuda.is_available() is False)", gpu=True)

arch = image_arch()
if arch not in ARCH_CC:
    fail(f"expected arch unknown ({arch!r}): set KTLEGACY_ARCH={' or '.join(ARCH_CC)} outside an image")
want = ARCH_CC[arch]
for i in range(torch.cuda.device_count()):
    cc = torch.cuda.get_device_capability(i)
    if tuple(cc) != want:
        name = torch.cuda.get_device_name(i)
        fail(f"GPU {i} is {name} (compute capability {cc[0]}.{cc[1]}) but this build targets {arch} "
             f"({want[0]}.{want[1]}): its kernels hold no code for this GPU; use the "
             + next((name for name, arch_cc in ARCH_CC.items() if arch_cc == tuple(cc)), "upstream ktransformers")
             + " image")
names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]

if standin():
    skip(f"{len(names)} GPU(s) of cc {want[0]}.{want[1]} ({names[0]}) but stand-in build: no extension kernels to run")

import numpy as np  # noqa: E402  (ktransformers depends on it)

import KTransformersOps  # noqa: E402
import cpuinfer_ext  # noqa: E402

# q8_0 blocks: fp16 scale, then 32 int8
rng = np.random.default_rng(0)
blocks = 64
scales = rng.uniform(0.01, 0.1, blocks).astype(np.float16)
qs = rng.integers(-127, 128, (blocks, 32), dtype=np.int8)
raw = np.concatenate([scales.view(np.int8).reshape(blocks, 2), qs], axis=1).reshape(-1).copy()
try:
    got = KTransformersOps.dequantize_q8_0(torch.from_numpy(raw), 34, torch.device("cuda:0"))
    torch.cuda.synchronize()
except Exception as exc:
    fail(f"KTransformersOps.dequantize_q8_0 on {names[0]}: {type(exc).__name__}: {exc}")
ref = torch.from_numpy(scales.astype(np.float32)[:, None] * qs.astype(np.float32))
if not torch.allclose(got.float().cpu().reshape(ref.shape), ref, rtol=1e-3, atol=1e-3):
    fail("KTransformersOps.dequantize_q8_0 result differs from the reference")

# KLinearGGUF's kernels on the same blocks, as an 8 x 256 Q8_0 weight (ggml type 8)
import ktlegacy_gguf_ops  # noqa: E402

w = torch.from_numpy(raw).to("cuda:0")
x = (torch.randn(1, 256) / 16).half().to("cuda:0")
y = torch.empty(1, 8, dtype=torch.float16, device="cuda:0")
dense = torch.empty(8, 256, dtype=torch.float32, device="cuda:0")
try:
    ktlegacy_gguf_ops.matvec(w, 8, 8, 256, x, y)
    ktlegacy_gguf_ops.dequantize(w, 8, 8, 256, 0, 8, dense)
    torch.cuda.synchronize()
except Exception as exc:
    fail(f"ktlegacy_gguf_ops on {names[0]}: {type(exc).__name__}: {exc}")
if not torch.equal(dense.cpu(), ref.reshape(8, 256)):
    fail("ktlegacy_gguf_ops.dequantize result differs from the reference")
want_y = x.float().cpu() @ ref.reshape(8, 256).T
if not torch.allclose(y.float().cpu(), want_y, rtol=2e-3, atol=2e-3):
    fail(f"ktlegacy_gguf_ops.matvec differs from torch: {(y.float().cpu() - want_y).abs().max().item():.3g}")

lacking = missing_cpu_flags()
if lacking:
    print(f"{len(names)} GPU(s) {names[0]} cc {want[0]}.{want[1]} = {arch}; KTransformersOps q8_0 dequant and "
          f"ktlegacy_gguf_ops agree with numpy; cpuinfer_ext not run: this CPU lacks {' '.join(lacking)}")
    sys.exit(0)

n_in, n_out, qlen = 256, 128, 4
weight = (torch.randn(n_out, n_in) / 16).to(torch.float16).contiguous()
x = (torch.randn(qlen, n_in) / 16).to(torch.float16).contiguous()
y = torch.empty(qlen, n_out, dtype=torch.float16).pin_memory()
try:
    linear = cpuinfer_ext.linear.Linear(cpuinfer_ext.linear.LinearConfig(n_in, n_out, 32, 64, weight.data_ptr(), 1, 1))
    cpu = cpuinfer_ext.CPUInfer(2)
    stream = torch.cuda.current_stream().cuda_stream
    cpu.submit_with_cuda_stream(stream, linear.forward(qlen, x.data_ptr(), y.data_ptr()))
    cpu.sync_with_cuda_stream(stream)
    torch.cuda.synchronize()
except Exception as exc:
    fail(f"cpuinfer_ext with a CUDA stream: {type(exc).__name__}: {exc}")
ref = x.float() @ weight.float().t()
rel = ((y.float() - ref).abs().mean() / ref.abs().mean()).item()
if not rel < 1e-2:
    fail(f"cpuinfer_ext linear (CUDA stream) differs from torch: mean relative error {rel:.3g}")
print(f"{len(names)} GPU(s) {names[0]} cc {want[0]}.{want[1]} = {arch}; KTransformersOps q8_0 dequant, "
      f"ktlegacy_gguf_ops matvec/dequantize and cpuinfer_ext linear on a CUDA stream agree with torch")
