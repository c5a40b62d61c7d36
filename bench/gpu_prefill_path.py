#!/usr/bin/env python3
"""Where the GPU experts path of a prompt (overlay 68) spends its time, one MoE layer at a time.

    python bench/gpu_prefill_path.py --out bench/results/gpu_prefill_path_<machine>.json [--tokens 512 2048]

Needs a CUDA GPU and torch; not ktransformers: ``ktlegacy_runtime.routed_experts`` is loaded from
overlays/runtime by path and run with each dequantiser it has here: the torch ones always, our
``ktlegacy_gguf_ops`` kernels where that extension is importable (the engine's choice wherever it
is built), upstream's KTransformersOps kernels with ``--upstream``. The layer has DeepSeek-V2-Lite's shapes
and the benchmark model's quant mix (64 experts, hidden 2048, intermediate 1408, top-6; gate/up
Q4_K, down Q5_0; ``ktlegacy.testing.peer_model.quant_blocks``), written to a file and read back
through ``np.memmap`` as the engine reads the GGUF (page cache warm). Timed, median of
``--runs``: the copy of the layer's raw expert bytes to the GPU from the mmap (pageable, as the
path does now) and from pinned host memory (what a staging buffer would give), the dequantisation
of all experts on the GPU, and the whole ``routed_experts`` call for each ``--tokens``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _runtime():
    spec = importlib.util.spec_from_file_location("ktlegacy_runtime_bench", REPO / "overlays" / "runtime" / "ktlegacy_runtime.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _timed(fn, runs: int) -> dict:
    import torch
    times = []
    for _ in range(runs):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "runs_s": times}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--tokens", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=1408)
    p.add_argument("--top-k", type=int, default=6)
    p.add_argument("--upstream", action="store_true",
                   help="also time upstream's KTransformersOps dequant kernels (the engine's choice for Q4_K; "
                        "needs the patched ktransformers importable, e.g. after bench/gpu_run.sh with KTLEGACY_PROOF=install)")
    args = p.parse_args(argv)
    import numpy as np
    import torch
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    from ktlegacy.testing.peer_model import quant_blocks
    rt = _runtime()
    e, h, i, k = args.experts, args.hidden, args.intermediate, args.top_k
    rng = np.random.default_rng(0)
    parts = {"gate": ("Q4_K", (e, i, h), 12, h ** -0.5), "up": ("Q4_K", (e, i, h), 12, h ** -0.5),
             "down": ("Q5_0", (e, h, i), 6, 2 * i ** -0.5)}
    with tempfile.TemporaryDirectory() as tmp:
        tensors, offset, path = {}, 0, Path(tmp) / "layer.bin"
        with open(path, "wb") as fh:
            spans = {}
            for name, (qtype, shape, _, rms) in parts.items():
                raw = quant_blocks(rng, shape, qtype, rms).reshape(-1)
                fh.write(raw.tobytes())
                spans[name] = (offset, raw.size)
                offset += raw.size
        mm = np.memmap(path, dtype=np.uint8, mode="r")
        for name, (qtype, shape, ggml_type, _) in parts.items():
            start, size = spans[name]
            tensors[name] = (mm[start:start + size], ggml_type)
        layer_bytes = sum(t[0].size for t in tensors.values())
        device = torch.device("cuda:0")
        dtype = torch.float16
        pinned = {n: torch.from_numpy(np.array(t[0])).pin_memory() for n, t in tensors.items()}
        _ = [torch.from_numpy(np.asarray(t[0])).to(device) for t in tensors.values()]  # warm page cache + CUDA

        res: dict = {"machine": {"python": platform.python_version(), "torch": torch.__version__,
                                 "device": torch.cuda.get_device_name(0), "cpus": len(os.sched_getaffinity(0))},
                     "layer": {"experts": e, "hidden": h, "intermediate": i, "top_k": k,
                               "quant": {n: v[0] for n, v in parts.items()}, "bytes": int(layer_bytes)},
                     "command": " ".join(sys.argv), "runs": args.runs}
        res["copy_pageable"] = _timed(lambda: [torch.from_numpy(np.asarray(t[0])).to(device) for t in tensors.values()],
                                      args.runs)
        res["copy_pinned"] = _timed(lambda: [t.to(device, non_blocking=True) for t in pinned.values()], args.runs)
        gpu_raw = {n: t.to(device) for n, t in pinned.items()}
        res["dequant_on_gpu"] = _timed(lambda: [rt.dequantize(gpu_raw[n], tensors[n][1], device, dtype, impl="torch")
                                                for n in tensors], args.runs)
        ways = [("torch", "torch")]
        if rt.gguf_ops()[0] is not None:
            res["dequant_on_gpu_ktlegacy_kernels"] = _timed(
                lambda: [rt.dequantize(gpu_raw[n], tensors[n][1], device, dtype, impl="ktlegacy") for n in tensors],
                args.runs)
            ways.append(("ktlegacy", "ktlegacy"))
            res["dequant_ktlegacy_vs_torch_max_abs"] = max(
                float((rt.dequantize(gpu_raw[n], tensors[n][1], device, torch.float32, impl="ktlegacy")
                       - rt.dequantize(gpu_raw[n], tensors[n][1], device, torch.float32, impl="torch")).abs().max())
                for n in tensors)
        else:
            res["dequant_on_gpu_ktlegacy_kernels"] = "ktlegacy_gguf_ops is not importable here"
        for key in ("copy_pageable", "copy_pinned"):
            res[key]["gb_s"] = layer_bytes / res[key]["median_s"] / 1e9
        if args.upstream:
            from ktransformers.util.custom_gguf import GGML_DEQUANTIZE_GPU  # noqa: F401  (fails here if not installed)
            res["dequant_on_gpu_upstream_kernels"] = _timed(
                lambda: [rt.dequantize(np.asarray(tensors[n][0]), tensors[n][1], device, dtype, impl="upstream")
                         for n in tensors], args.runs)
            ways.append(("upstream", "upstream"))
        keys = {"torch": "routed_experts", "ktlegacy": "routed_experts_ktlegacy_kernels",
                "upstream": "routed_experts_upstream_kernels"}
        for label, impl in ways:
            res[keys[label]] = {}
            for n in args.tokens:
                g = torch.Generator(device="cpu").manual_seed(n)
                x = torch.randn((n, h), generator=g).to(device, dtype)
                ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n)]).to(device)
                w = torch.rand((n, k), generator=g).to(device)
                budget = 1024 * 2**20
                deq = lambda raw, t, d, dt, u=impl: rt.dequantize(raw, t, d, dt, impl=u)  # noqa: E731
                r = _timed(lambda: rt.routed_experts(x, ids, w, tensors, e, i, budget, dequant=deq), args.runs)
                r["tok_s_per_layer"] = n / r["median_s"]
                res[keys[label]][str(n)] = r
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2) + "\n")
        print(json.dumps({k: (v if not isinstance(v, dict) else {kk: vv for kk, vv in v.items() if kk != "runs_s"})
                          for k, v in res.items() if k not in ("machine",)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
