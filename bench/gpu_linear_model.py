#!/usr/bin/env python3
"""KLinearGGUF in the whole engine: GPU memory at DeepSeek-V3's real dimensions against the
doctor's estimate, and speed against fp16 linears (issue 22, items 4 and 5).

    KTLEGACY_EMULATE_CC=7.5 python bench/gpu_linear_model.py --work DIR --out results.json \
        [--phases memory speed] [--speed-models v3-dims v2-lite] [--cache-lens 8192]

Runs where bench/gpu_run.sh installed the patched ktransformers (``KTLEGACY_PROOF=linear-model``).
Models (``ktlegacy.testing.peer_model``, random weights, generated into --work once):

* ``v3-dims``: DeepSeek-V3/R1's per-layer dimensions (hidden 7168, q LoRA 1536, kv LoRA 512, 128
  heads, dense MLP 18432, shared expert 2048, vocabulary 129280), 4 layers (1 dense, 3 MoE with 8
  routed experts), non-expert weights in a Q4_K_M file's mix;
* ``v2-lite``: DeepSeek-V2-Lite's dimensions (the llama.cpp comparison's model, Q8_0 non-expert).

**memory**: for ``KTLEGACY_GPU_LINEAR`` = quant and fp16, a fresh process loads v3-dims with the
``v100`` profile's rule file (DeepSeek-V3-Chat.yaml: every non-expert tensor on cuda:0), prefills a
``--cache-lens``-token prompt into a cache of that length (the doctor's worst case), decodes a few
tokens eagerly and through a CUDA graph (as served). NVML samples the process's GPU memory; the
doctor's estimate (``ktlegacy.vram``, the same rule file, cache length and mode) is divided by the
measured peak. Target: within 15%.

**speed**: for each model and mode, bench/peer_bench.py's ktlegacy engine in a fresh process
(prefill 512/2048/8192 tokens, decode at 1k/4k context through the CUDA graph, median of 3);
ratios quant / fp16. Targets: decode >= 1.0, prefill >= 0.9.

Result keys: ``gpu_linear`` {weights_mib, decode_ratio_vs_fp16, prefill_ratio_vs_fp16,
doctor_vs_measured} plus everything measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

MODES = ("quant", "fp16")
RULES = {"v3-dims": "DeepSeek-V3-Chat.yaml", "v2-lite": "DeepSeek-V2-Lite-Chat.yaml"}
TARGET_DECODE = 1.0
TARGET_PREFILL = 0.9
TARGET_DOCTOR = 0.15


def log(msg: str) -> None:
    print(f"[gpu_linear_model {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def make_model(work: Path, name: str) -> Path:
    dest = work / f"model-{name}"
    if (dest / "ktlegacy-peer-model.json").is_file():
        return dest
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "ktlegacy.testing.peer_model", "--dest", str(dest), "--force",
                    "--variant", name], check=True)
    log(f"model {name}: {time.monotonic() - t0:.0f} s")
    return dest


# ---------------------------------------------------------------- memory (child process)

def memory_child(args) -> int:
    """Load, prefill cache_lens tokens, decode eager and through a CUDA graph; print torch's peaks."""
    import torch
    import gpu_proof
    import peer_bench
    torch.set_grad_enabled(False)
    peer_bench.set_cpu_infer(max(1, (os.cpu_count() or 4) - 2))
    model, config, dtype, rules = gpu_proof.load_engine(args.model, args.rules)
    torch.cuda.synchronize()
    loaded = torch.cuda.memory_allocated(0)
    linear_ops = sorted({type(getattr(m, "generate_linear", None)).__name__ for m in model.modules()
                         if hasattr(m, "generate_linear")})
    quant = sum(m.generate_linear.qweight.numel() for m in model.modules()
                if getattr(getattr(m, "generate_linear", None), "qweight", None) is not None)
    sess = gpu_proof.EngineSession(model, config, max_len=args.cache_lens)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(2, config.vocab_size, (args.cache_lens - 24,), generator=gen).tolist()
    t0 = time.monotonic()
    tok = int(sess.prefill(ids).argmax())
    prefill_s = time.monotonic() - t0
    for _ in range(4):
        tok = int(sess.decode(tok).argmax())
    step, tok = peer_bench.graph_decoder(sess, tok)
    for _ in range(8):
        tok = step(tok)
    torch.cuda.synchronize()
    out = {"rule_file": str(rules), "dtype": str(dtype), "linear_ops": linear_ops,
           "quantized_weight_bytes": quant, "allocated_after_load_mib": loaded / 2**20,
           "peak_allocated_mib": torch.cuda.max_memory_allocated(0) / 2**20,
           "peak_reserved_mib": torch.cuda.max_memory_reserved(0) / 2**20,
           "prompt_tokens": len(ids), "prefill_s": prefill_s}
    print("RESULT " + json.dumps(out), flush=True)
    return 0


def memory(args, model_dir: Path) -> dict:
    from serve_proof import GpuMemory
    from ktlegacy import vram
    import ktransformers
    rules = Path(ktransformers.__file__).parent / "optimize" / "optimize_rules" / RULES["v3-dims"]
    gguf = vram.read_gguf(model_dir)
    out = {"model": "v3-dims", "rule_file": rules.name, "cache_lens": args.cache_lens, "modes": {}}
    for mode in MODES:
        env = dict(os.environ, KTLEGACY_GPU_LINEAR=mode, CUDA_VISIBLE_DEVICES=os.environ.get("CUDA_VISIBLE_DEVICES", "0"))
        mon = GpuMemory([0])
        proc = subprocess.Popen([sys.executable, __file__, "--memory-child", "--model", str(model_dir), "--rules",
                                 rules.name, "--cache-lens", str(args.cache_lens)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        mon.start(proc.pid)
        text, _ = proc.communicate(timeout=args.child_timeout)
        measured = mon.stop()["cuda:0"]
        lines = [ln for ln in text.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(text[-6000:], flush=True)
            out["modes"][mode] = {"error": f"exit {proc.returncode}", "tail": text[-2000:]}
            continue
        child = json.loads(lines[-1][len("RESULT "):])
        est = vram.estimate(gguf, vram.load_rules(rules.read_text()), args.cache_lens, linear_mode=mode)
        d = "cuda:0"
        estimate = {"weights_mib": est.weights_mib.get(d, 0.0), "scratch_mib": est.scratch_mib.get(d, 0.0),
                    "kv_cache_mib": est.kv_mib.get(d, 0.0), "prefill_peak_mib": est.prefill_peak_mib(d),
                    "runtime_mib": vram.GPU_RUNTIME_MIB, "total_mib": est.need_mib(d)}
        peak = measured["process_peak_mib"] or measured["device_peak_above_idle_mib"]
        out["modes"][mode] = dict(child, nvml=measured, doctor=estimate, measured_peak_mib=peak,
                                  doctor_vs_measured=estimate["total_mib"] / peak if peak else None)
        log(f"memory {mode}: peak {peak:.0f} MiB (torch reserved {child['peak_reserved_mib']:.0f}), doctor "
            f"{estimate['total_mib']:.0f} MiB -> {estimate['total_mib'] / peak:.3f}; weights after load "
            f"{child['allocated_after_load_mib']:.0f} MiB")
    return out


# ---------------------------------------------------------------- speed

def speed(args, model_dir: Path, name: str) -> dict:
    out = {}
    for mode in MODES:
        dest = Path(args.work) / f"peer-{name}-{mode}.json"
        env = dict(os.environ, KTLEGACY_GPU_LINEAR=mode)
        cmd = [sys.executable, str(REPO / "bench" / "peer_bench.py"), "--model", str(model_dir), "--out", str(dest),
               "--engines", "ktlegacy", "--rules", RULES[name], "--runs", "3", "--skip-extras",
               "--prefill", *map(str, args.prefill), "--decode-ctx", *map(str, args.decode_ctx),
               "--decode-tokens", str(args.decode_tokens)]
        t0 = time.monotonic()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.child_timeout)
        print("\n".join(ln for ln in proc.stdout.splitlines() if ln.startswith("[peer_bench")), flush=True)
        if not dest.is_file():
            out[mode] = {"error": f"exit {proc.returncode}", "tail": (proc.stdout + proc.stderr)[-3000:]}
            continue
        out[mode] = json.loads(dest.read_text())
        out[mode]["wall_s"] = time.monotonic() - t0
    return out


def ratios(speed_out: dict) -> dict:
    """quant / fp16 per point (median tok/s)."""
    q, f = (speed_out.get(m, {}).get("ktlegacy", {}) for m in MODES)
    r = {"prefill": {}, "decode": {}}
    for kind in r:
        for point, val in (q.get(kind) or {}).items():
            other = (f.get(kind) or {}).get(point)
            if other and other.get("median"):
                r[kind][point] = val["median"] / other["median"]
    return r


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/ktlegacy-gpu/linear-model"))
    p.add_argument("--out", type=Path)
    p.add_argument("--phases", nargs="+", default=["memory", "speed"], choices=["memory", "speed"])
    p.add_argument("--speed-models", nargs="+", default=["v3-dims", "v2-lite"], choices=list(RULES))
    p.add_argument("--cache-lens", type=int, default=8192)
    p.add_argument("--prefill", type=int, nargs="+", default=[512, 2048, 8192])
    p.add_argument("--decode-ctx", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--child-timeout", type=float, default=900)
    p.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--rules", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_child:
        return memory_child(args)
    if args.out is None:
        p.error("--out is required")
    args.work.mkdir(parents=True, exist_ok=True)
    results: dict = {"command": " ".join(sys.argv), "emulated_cc": os.environ.get("KTLEGACY_EMULATE_CC")}
    t0 = time.monotonic()

    def save():
        results["wall_s"] = time.monotonic() - t0
        args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")

    try:
        import torch
        results["device"] = torch.cuda.get_device_name(0)
        models = {}
        if "memory" in args.phases:
            models["v3-dims"] = make_model(args.work, "v3-dims")
            results["memory"] = memory(args, models["v3-dims"])
            save()
        if "speed" in args.phases:
            results["speed"] = {}
            for name in args.speed_models:
                models.setdefault(name, make_model(args.work, name))
                results["speed"][name] = speed(args, models[name], name)
                results["speed"][name]["ratio_quant_vs_fp16"] = ratios(results["speed"][name])
                log(f"speed {name}: {json.dumps(results['speed'][name]['ratio_quant_vs_fp16'])}")
                save()
    except Exception as exc:
        traceback.print_exc()
        results["error"] = f"{type(exc).__name__}: {exc}"
    summary: dict = {}
    mem = results.get("memory", {}).get("modes", {})
    if mem:
        summary["weights_mib"] = {m: round(v["allocated_after_load_mib"], 1) for m, v in mem.items() if "error" not in v}
        summary["doctor_vs_measured"] = {m: round(v["doctor_vs_measured"], 3) for m, v in mem.items()
                                         if v.get("doctor_vs_measured")}
    sp = results.get("speed", {})
    if sp:
        summary["decode_ratio_vs_fp16"] = {n: {c: round(r, 3) for c, r in v["ratio_quant_vs_fp16"]["decode"].items()}
                                           for n, v in sp.items()}
        summary["prefill_ratio_vs_fp16"] = {n: {c: round(r, 3) for c, r in v["ratio_quant_vs_fp16"]["prefill"].items()}
                                            for n, v in sp.items()}
    results["gpu_linear"] = summary
    save()
    log(f"gpu_linear: {json.dumps(summary)}")
    return 1 if "error" in results else 0


if __name__ == "__main__":
    sys.exit(main())
