#!/usr/bin/env python3
"""The compiled extensions import, and cpuinfer_ext computes a small fp16 linear on the CPU.

KTransformersOps' kernels need a GPU: check_gpu.py runs them. On the no-CUDA stand-in build
there is nothing to import: reported as skipped, never as a pass.
"""

import importlib

from smokelib import expected_extensions, fail, missing_cpu_flags, skip, standin

if standin():
    skip("stand-in build, no CUDA: the C++/CUDA extensions were not compiled")

import torch  # noqa: E402,F401  first: the extensions link torch's libraries (libc10.so...), which
#               are on the loader path only once torch is loaded

names = expected_extensions()
modules = {}
for name in names:
    try:
        modules[name] = importlib.import_module(name)
    except Exception as exc:
        fail(f"import {name}: {type(exc).__name__}: {exc}")

lacking = missing_cpu_flags()
if "cpuinfer_ext" in modules and lacking:
    # e.g. an AVX512 image smoke-tested on a build host without AVX512: running would be SIGILL
    print(f"imported {', '.join(names)}; cpuinfer_ext linear not run: this CPU lacks {' '.join(lacking)} "
          "that the image's CPU set needs")
elif "cpuinfer_ext" in modules:
    ext = modules["cpuinfer_ext"]
    torch.manual_seed(0)
    n_in, n_out, qlen = 256, 128, 4
    weight = (torch.randn(n_out, n_in) / 16).to(torch.float16).contiguous()
    x = (torch.randn(qlen, n_in) / 16).to(torch.float16).contiguous()
    y = torch.empty(qlen, n_out, dtype=torch.float16)
    f16 = 1  # ggml_type GGML_TYPE_F16
    try:
        config = ext.linear.LinearConfig(n_in, n_out, 32, 64, weight.data_ptr(), f16, f16)
        linear = ext.linear.Linear(config)
        cpu = ext.CPUInfer(2)
        cpu.submit(linear.forward(qlen, x.data_ptr(), y.data_ptr()))
        cpu.sync()
    except Exception as exc:
        fail(f"cpuinfer_ext linear forward: {type(exc).__name__}: {exc}")
    ref = x.float() @ weight.float().t()
    rel = ((y.float() - ref).abs().mean() / ref.abs().mean()).item()
    if not rel < 1e-2:
        fail(f"cpuinfer_ext linear differs from torch: mean relative error {rel:.3g}")
    print(f"imported {', '.join(names)}; cpuinfer_ext fp16 linear matches torch (rel. error {rel:.1e})")
else:
    print(f"imported {', '.join(names)}")
