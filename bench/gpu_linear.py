#!/usr/bin/env python3
"""KLinearGGUF's kernels on a GPU at DeepSeek-V3's shapes: correctness per type, and speed vs fp16 (issue 22).

    KTLEGACY_EMULATE_CC=7.5 python bench/gpu_linear.py --out results.json [--types Q4_K Q6_K ...]

Runs where the patched ktransformers is installed with its extensions (bench/gpu_run.sh builds
them for 7.5+PTX: the H100/H200 JIT-compiles the Turing PTX a T4 would run as SASS) and imports
``ktlegacy_gguf_ops`` and ``ktransformers.operators.ktlegacy_gguf_linear``.

For every type the kernels decode and every weight shape of a DeepSeek-V3 layer ((rows, cols):
q_a 1536x7168, q_b 24576x1536, kv_a 576x7168, kv_b 32768x512, o 7168x16384, shared expert
2048x7168 / 7168x2048, dense MLP 18432x7168 / 7168x18432, lm_head 129280x7168), random blocks
(``ktlegacy.testing.ggml_quant.random_blocks``: every quant value, random packed scales):

* **dequantization**: ``dequantize`` into fp32 equals gguf-py's ``gguf.quants.dequantize`` of the
  same blocks on sampled rows (the first, the last, and rows at scratch-slice boundaries), within
  2**-22 of the row's largest value: the kernel may fuse d*scale*q - min into one FMA where numpy
  rounds twice (off by an ulp of the terms, not of their possibly cancelling difference);
* **matvec** (decode, 1 and 4 input rows) and **prefill** (KLinearGGUF.forward with 64 rows:
  dequantize into the fp16 scratch, slice by slice for lm_head, then cuBLAS): against an fp64
  product of gguf-py's values with the same fp16 inputs, on the sampled rows. Tolerance, per output
  element y = sum_k w_k x_k: ``TOL_MULT * 2**-11 * sqrt(sum_k (w_k x_k)^2) + 2**-11 * |y|``. Why:
  the matvec accumulates exact products in fp32 (error ~ sqrt(K) * 2**-24 |w x|, far below this);
  the prefill path rounds every weight to fp16 once (relative 2**-11 each, random signs: the sum's
  error has standard deviation 2**-11 * sqrt(sum (w x)^2) / sqrt(3)) and cuBLAS accumulates in fp32;
  both round the result to fp16 (2**-11 |y|). TOL_MULT = 4 leaves room for cuBLAS's split
  reductions; a wrong block layout or a missed slice is off by the size of y itself.

Speed (same call, CUDA events, median of ``--reps``): per shape and type, the matvec for one row
vs cuBLAS's fp16 product with the dequantized weight (what KTLEGACY_GPU_LINEAR=fp16 runs), with
the bytes each reads; and the prefill path at 512/2048/8192 rows vs the fp16 GEMM. The JSON keeps
every number; ``summary`` gives the worst error/tolerance ratio per type and the geometric mean of
the speed ratios.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SHAPES = {  # DeepSeek-V3's GPU-side linears: rows (out features) x cols (in features)
    "q_a": (1536, 7168), "q_b": (24576, 1536), "kv_a": (576, 7168), "kv_b": (32768, 512),
    "o": (7168, 16384), "shexp_gate_up": (2048, 7168), "shexp_down": (7168, 2048),
    "dense_gate_up": (18432, 7168), "dense_down": (7168, 18432), "lm_head": (129280, 7168),
}
TYPES = ("Q4_0", "Q5_0", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS")
TOL_MULT = 4.0
SAMPLE_ROWS = 48
PREFILL_ROWS = 64


def log(msg: str) -> None:
    print(f"[gpu_linear {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sample_rows(n: int, step: int) -> list[int]:
    """Rows to check: first, last, each side of every scratch-slice boundary (up to 8), spread."""
    rows = {0, n - 1}
    for b in range(step, n, step)[:8]:
        rows.update({b - 1, b})
    rows.update(range(0, n, max(1, n // (SAMPLE_ROWS - len(rows)))))
    return sorted(r for r in rows if 0 <= r < n)[:SAMPLE_ROWS + 18]


def tolerance(w_rows, x) -> tuple:
    """(fp64 reference y, tolerance) for weight rows (fp64, r x K) and inputs x (fp64, m x K)."""
    import torch
    y = x @ w_rows.T
    spread = torch.sqrt((x.unsqueeze(1) * w_rows.unsqueeze(0)).pow(2).sum(-1))
    return y, TOL_MULT * 2.0 ** -11 * spread + 2.0 ** -11 * y.abs()


def gpu_blocks(qtype: str, n: int, k: int, gen, scale: float = 0.02):
    """Random ``qtype`` blocks for an n x k weight, made on the GPU (what random_blocks makes on
    the CPU, in a fraction of the time for lm_head's 926M values): (n, row_bytes) uint8."""
    import torch
    from ktlegacy.testing import ggml_quant
    _, qk, nbytes = ggml_quant.TYPES[qtype]
    count = n * (k // qk)
    raw = torch.randint(0, 256, (count, nbytes), dtype=torch.uint8, device="cuda", generator=gen)
    for off in ggml_quant._F16_FIELDS[qtype]:
        sign = torch.where(torch.rand(count, device="cuda", generator=gen) < 0.5, -1.0, 1.0)
        d = ((torch.rand(count, device="cuda", generator=gen) + 0.5) * scale * sign).half()
        raw[:, off:off + 2] = d.view(torch.uint8).view(count, 2)
    return raw.view(n, -1)


def check_type(qtype: str, shape: tuple[int, int], ops, linear_mod, seed: int) -> dict:
    import torch
    from ktlegacy.testing import ggml_quant
    tid, qk, _ = ggml_quant.TYPES[qtype]
    n, k = shape
    if k % qk:
        return {"skipped": f"{k} columns are not whole {qk}-value blocks"}
    gen = torch.Generator(device="cuda").manual_seed(seed)
    blocks = gpu_blocks(qtype, n, k, gen)
    w = blocks.view(-1)
    step = linear_mod.slice_rows(n, k)
    rows = sample_rows(n, step)
    ref_w = torch.from_numpy(ggml_quant.dequantize(blocks[rows].cpu().numpy(), qtype)).double().cuda()   # r x K
    out: dict = {"rows_checked": len(rows), "slice_rows": step}
    # dequantization: each sampled row through the kernel's row0/rows interface (fp32 out); the
    # kernel may fuse d*sc*q - min into one FMA (numpy rounds twice): within 2 ulp of the row's scale
    got = torch.empty((len(rows), k), dtype=torch.float32, device="cuda")
    for i, r in enumerate(rows):
        ops.dequantize(w, tid, n, k, r, 1, got[i])
    err = (got.double() - ref_w).abs() / ref_w.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
    out["dequant_max_err_over_row_max"] = float(err.max())
    out["dequant_exact_fraction"] = float((got.double() == ref_w).double().mean())
    out["dequant_pass"] = out["dequant_max_err_over_row_max"] <= 2.0 ** -22
    # matvec, 1 and 4 rows
    gen = torch.Generator(device="cuda").manual_seed(seed)
    for m in (1, 4):
        x = torch.randn((m, k), generator=gen, device="cuda").half()
        y = torch.empty((m, n), dtype=torch.float16, device="cuda")
        ops.matvec(w, tid, n, k, x, y)
        ref, tol = tolerance(ref_w, x.double())
        err = (y[:, rows].double() - ref).abs()
        out[f"matvec{m}_max_err_over_tol"] = float((err / tol).max())
    # prefill path through the operator's own code (scratch, slices)
    x = torch.randn((PREFILL_ROWS, k), generator=gen, device="cuda").half()
    y = prefill(linear_mod, ops, w, tid, n, k, x)
    ref, tol = tolerance(ref_w, x.double())
    err = (y[:, rows].double() - ref).abs()
    out["prefill_max_err_over_tol"] = float((err / tol).max())
    out["pass"] = bool(out["dequant_pass"] and out["matvec1_max_err_over_tol"] <= 1
                       and out["matvec4_max_err_over_tol"] <= 1 and out["prefill_max_err_over_tol"] <= 1)
    del w
    return out


class _Layer:
    """The parts of a loaded KLinearGGUF its forward reads (no GGUF file needed)."""

    def __init__(self, linear_mod, ops, w, tid, n, k):
        import torch
        self.qweight, self.ggml_type, self.out_features, self.in_features = w, tid, n, k
        self.dtype, self.has_bias = torch.float16, False


def prefill(linear_mod, ops, w, tid, n, k, x):
    """KLinearGGUF.forward's own code on ``x`` (more rows than the matvec takes)."""
    layer = _Layer(linear_mod, ops, w, tid, n, k)
    return linear_mod.KLinearGGUF.forward(layer, x)


def timed(fn, reps: int) -> float:
    """Median milliseconds of ``fn`` over ``reps`` CUDA-event-timed calls (after 3 warm-ups)."""
    import torch
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def speed(qtype: str, shape: tuple[int, int], ops, linear_mod, seed: int, reps: int, prefill_rows) -> dict:
    import torch
    from ktlegacy.testing import ggml_quant
    tid, qk, nbytes = ggml_quant.TYPES[qtype]
    n, k = shape
    if k % qk:
        return {"skipped": f"{k} columns are not whole {qk}-value blocks"}
    w = gpu_blocks(qtype, n, k, torch.Generator(device="cuda").manual_seed(seed)).view(-1)
    dense = torch.empty((n, k), dtype=torch.float16, device="cuda")
    ops.dequantize(w, tid, n, k, 0, n, dense)
    x = torch.randn((1, k), device="cuda").half()
    y = torch.empty((1, n), dtype=torch.float16, device="cuda")
    out = {"weight_bytes_quant": int(w.numel()), "weight_bytes_fp16": n * k * 2}
    out["decode_ms_quant"] = timed(lambda: ops.matvec(w, tid, n, k, x, y), reps)
    out["decode_ms_fp16"] = timed(lambda: torch.mm(x, dense.t()), reps)
    out["decode_gb_s_quant"] = w.numel() / out["decode_ms_quant"] / 1e6
    out["decode_gb_s_fp16"] = n * k * 2 / out["decode_ms_fp16"] / 1e6
    out["decode_speedup"] = out["decode_ms_fp16"] / out["decode_ms_quant"]
    for m in prefill_rows:
        xm = torch.randn((m, k), device="cuda").half()
        q = timed(lambda: prefill(linear_mod, ops, w, tid, n, k, xm), max(3, reps // 4))
        f = timed(lambda: torch.mm(xm, dense.t()), max(3, reps // 4))
        out[f"prefill{m}_ms_quant"], out[f"prefill{m}_ms_fp16"], out[f"prefill{m}_ratio"] = q, f, f / q
    del w, dense
    torch.cuda.empty_cache()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--types", nargs="+", default=list(TYPES), choices=TYPES)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--speed-types", nargs="+", default=["Q4_K", "Q6_K", "Q8_0"], choices=TYPES)
    p.add_argument("--prefill-rows", type=int, nargs="+", default=[512, 2048, 8192])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    import torch
    import ktlegacy_gguf_ops as ops
    from ktransformers.operators import ktlegacy_gguf_linear as linear_mod
    results: dict = {"command": " ".join(sys.argv), "device": torch.cuda.get_device_name(0),
                     "capability": list(torch.cuda.get_device_capability(0)),
                     "emulated_cc": os.environ.get("KTLEGACY_EMULATE_CC"), "torch": torch.__version__,
                     "kernel_types": list(ops.supported_types()), "tol_mult": TOL_MULT,
                     "matvec_max_rows": linear_mod.MATVEC_MAX_ROWS, "scratch_mib": linear_mod.SCRATCH_MIB,
                     "correctness": {}, "speed": {}}
    t0 = time.monotonic()
    for qtype in args.types:
        for name in args.shapes:
            try:
                r = check_type(qtype, SHAPES[name], ops, linear_mod, args.seed)
            except Exception as exc:
                traceback.print_exc()
                r = {"error": f"{type(exc).__name__}: {exc}", "pass": False}
            results["correctness"].setdefault(qtype, {})[name] = r
            log(f"{qtype} {name} {SHAPES[name]}: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                                               for k, v in r.items() if k != "rows_checked"))
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    log(f"correctness: {time.monotonic() - t0:.0f} s")
    for qtype in args.speed_types:
        for name in args.shapes:
            try:
                r = speed(qtype, SHAPES[name], ops, linear_mod, args.seed, args.reps, args.prefill_rows)
            except Exception as exc:
                traceback.print_exc()
                r = {"error": f"{type(exc).__name__}: {exc}"}
            results["speed"].setdefault(qtype, {})[name] = r
            if "decode_speedup" in r:
                log(f"speed {qtype} {name}: decode {r['decode_ms_quant']:.3f} ms ({r['decode_gb_s_quant']:.0f} GB/s) "
                    f"vs fp16 {r['decode_ms_fp16']:.3f} ms ({r['decode_gb_s_fp16']:.0f} GB/s) -> x{r['decode_speedup']:.2f}; "
                    + ", ".join(f"prefill {m}: x{r[f'prefill{m}_ratio']:.2f}" for m in args.prefill_rows))
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    summary = {"correctness_pass": all(r.get("pass", True) for t in results["correctness"].values() for r in t.values()
                                       if "skipped" not in r)}
    for qtype, rows in results["correctness"].items():
        vals = [v for r in rows.values() for k2, v in r.items() if k2.endswith("_over_tol")]
        summary[f"{qtype}_worst_err_over_tol"] = max(vals) if vals else None
    for qtype, rows in results["speed"].items():
        ratios = [r["decode_speedup"] for r in rows.values() if "decode_speedup" in r]
        if ratios:
            summary[f"{qtype}_decode_speedup_geomean"] = math.exp(sum(map(math.log, ratios)) / len(ratios))
        for m in args.prefill_rows:
            pr = [r[f"prefill{m}_ratio"] for r in rows.values() if f"prefill{m}_ratio" in r]
            if pr:
                summary[f"{qtype}_prefill{m}_ratio_geomean"] = math.exp(sum(map(math.log, pr)) / len(pr))
    results["summary"] = summary
    results["wall_s"] = time.monotonic() - t0
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    log(f"summary: {json.dumps(summary)}")
    return 0 if summary["correctness_pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
