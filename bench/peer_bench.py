#!/usr/bin/env python3
"""ktlegacy vs llama.cpp on one GPU machine, same GGUF, same CPU threads (issue 13).

    python bench/peer_bench.py --model DIR --llama-bench BIN --out results.json \
        [--threads N] [--runs 3] [--prefill 512 2048 8192] [--decode-ctx 1024 4096] \
        [--decode-tokens 32] [--engines llama_cpp ktlegacy ktlegacy_windows] [--deadline-s S]

MODEL is ``ktlegacy.testing.peer_model.make_lite_model``'s output (DeepSeek-V2-Lite's shapes and quant
mix, random weights). bench/peer_run.sh builds everything and runs this on the GPU machine.

Engines, all with the routed experts on the CPU and everything else on the GPU:

- ``ktlegacy``: the patched ktransformers (built 7.5+PTX, ``KTLEGACY_EMULATE_CC=7.5``) driven as
  bench/gpu_proof.py drives it (``optimize_and_load_gguf`` with the patched
  DeepSeek-V2-Lite-Chat.yaml, its ``StaticCache``), SDPA prefill; decode is timed eager and
  through upstream's ``CUDAGraphRunner`` as local_chat's ``prefill_and_generate`` uses it (its
  default): the CUDA-graph number is the headline, the eager one is kept beside it; the CPU
  experts get ``cpu_infer = --threads - 2`` (``--cpu-infer``): the pool's workers spin, and the
  engine's CUDA-callback thread (which waits for them in decode) and its Python thread need the
  other two of the ``--threads`` cores every engine gets. Prompts of at least
  ``KTLEGACY_GPU_PREFILL_MIN_TOKENS`` tokens (default 1024, the product's) run the routed experts
  on the GPU (overlay 68); beside the headline, ``experts_path`` times the other path at one
  length each (CPU experts at 2048, GPU experts at 512) and ``gpu_prefill_check`` compares the
  two paths' logits after the same 1024-token prompt;
- ``ktlegacy_windows``: the same loaded model with ``KTLEGACY_PREFILL=windows`` (upstream's
  ``forward_windows`` prefill);
- ``llama_cpp``: ``llama-bench -ngl 99 -ot exps=CPU -fa 1 -t THREADS`` (its defaults otherwise:
  batch 2048, ubatch 512, mmap, op offload on).

Points: prefill tokens/s at each ``--prefill`` length (a fresh cache each run) and decode
tokens/s at each ``--decode-ctx`` context, ``--runs`` runs each: median, min, max and every
run are kept. llama-bench re-fills the context before each decode run; ktlegacy fills it once
and times ``--runs`` consecutive windows of ``--decode-tokens`` steps (context CTX,
CTX + tokens, ...: the recorded ``contexts``), which saves a long CPU-expert prefill per run.

Also: a STREAM-style triad (a = b + s*c, float64, three arrays of ``--triad-mib`` each, torch on
``--threads`` threads; STREAM's byte count of 24 bytes per element) for the CPU memory
bandwidth, and decode as a fraction of the bandwidth limit: bandwidth / (bytes of CPU-resident
weights a token reads: top-k routed experts of every MoE layer + its embedding row, from the
model's record). Each phase writes the partial JSON next to ``--out`` as it ends.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

ENGINES = ("llama_cpp", "ktlegacy", "ktlegacy_windows")
PREFILL_MODE = {"ktlegacy": "sdpa", "ktlegacy_windows": "windows"}
# Targets of issue 13 (benchmark targets, not tests): ktlegacy vs llama.cpp.
TARGET_DECODE_RATIO = 1.0
TARGET_PREFILL_RATIO = 1.5          # at 2048 and 8192 tokens
TARGET_PREFILL_LENGTHS = (2048, 8192)
TARGET_BANDWIDTH_FRACTION = 0.5

PARTIAL_OUT: Path | None = None


def log(msg: str) -> None:
    print(f"[peer_bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def phase(results: dict, name: str, fn):
    """Run ``fn``; store its result under ``results[name]`` or its error; write the partial JSON."""
    start = time.monotonic()
    try:
        results[name] = fn()
    except Exception as exc:  # one engine's failure must not cost the others' numbers
        traceback.print_exc()
        results.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"
    log(f"{name}: {time.monotonic() - start:.1f}s")
    if PARTIAL_OUT is not None:
        PARTIAL_OUT.write_text(json.dumps(public(results), indent=2, default=str) + "\n")


def public(results: dict) -> dict:
    return {k: v for k, v in results.items() if not k.startswith("_")}


# ---------------------------------------------------------------- small pure helpers (tested)

def summarize(samples: list[float]) -> dict:
    """Median of the runs with the spread (min, max, and the relative half-range)."""
    if not samples:
        raise ValueError("no samples")
    med = statistics.median(samples)
    lo, hi = min(samples), max(samples)
    return {"median": med, "min": lo, "max": hi, "spread": (hi - lo) / (2 * med) if med else None,
            "runs": list(samples)}


def physical_cores(cpus: set[int] | None = None, sysfs: Path = Path("/sys/devices/system/cpu")) -> int:
    """Physical cores among ``cpus`` (default: this process's affinity set): distinct
    (package, core) pairs, so SMT siblings count once. Falls back to len(cpus)."""
    cpus = set(os.sched_getaffinity(0)) if cpus is None else set(cpus)
    pairs = set()
    for c in cpus:
        topo = sysfs / f"cpu{c}" / "topology"
        try:
            pairs.add((int((topo / "physical_package_id").read_text()), int((topo / "core_id").read_text())))
        except (OSError, ValueError):
            return len(cpus)
    return len(pairs) or len(cpus)


def parse_llama_bench(text: str) -> list[dict]:
    """llama-bench ``-o json`` (one array) or ``-o jsonl`` (one object per line) output ->
    rows with the fields this benchmark uses; other lines (logs) are ignored. ik_llama.cpp's
    llama-bench has no jsonl, and its ``-o json`` array has log lines on stdout among its
    rows (before the first, at each model load): a row is read wherever a line opens an object."""
    text = text.strip()
    try:
        rows = json.loads(text) if text.startswith("[") else None
    except json.JSONDecodeError:
        rows = None
    if rows is None:
        rows, pos, dec = [], 0, json.JSONDecoder()
        for m in re.finditer(r"^[ \t]*\{", text, re.M):
            if m.start() >= pos:
                row, pos = dec.raw_decode(text, m.end() - 1)
                rows.append(row)
    out = []
    for r in rows:
        samples = r.get("samples_ts")
        if not samples:
            raise ValueError(f"llama-bench row without samples_ts: {r}")
        out.append({"n_prompt": int(r["n_prompt"]), "n_gen": int(r["n_gen"]), "n_depth": int(r.get("n_depth", 0)),
                    "samples_ts": [float(s) for s in samples], "avg_ts": float(r["avg_ts"]),
                    "n_threads": int(r.get("n_threads", 0)), "n_gpu_layers": r.get("n_gpu_layers"),
                    "flash_attn": r.get("flash_attn"), "build_commit": r.get("build_commit"),
                    "gpu_info": r.get("gpu_info"), "cpu_info": r.get("cpu_info"),
                    "n_batch": r.get("n_batch"), "n_ubatch": r.get("n_ubatch"),
                    "model_size": r.get("model_size"), "model_n_params": r.get("model_n_params"),
                    "tensor_buft_overrides": r.get("tensor_buft_overrides"),
                    # ik_llama.cpp: "pp512", "tg32", "tg32@pp1024" (-gp: decode after a prompt,
                    # timed over the generated tokens only) or "pp512+tg32" (-pg: both timed)
                    "test": r.get("test")})
    return out


def llama_points(rows: list[dict]) -> dict:
    """Rows -> {"prefill": {n_prompt: summary}, "decode": {n_depth: summary}} (pp at depth 0,
    tg at each depth)."""
    pts: dict = {"prefill": {}, "decode": {}}
    for r in rows:
        if r["n_prompt"] > 0 and r["n_gen"] == 0 and r["n_depth"] == 0:
            pts["prefill"][str(r["n_prompt"])] = summarize(r["samples_ts"])
        elif r["n_gen"] > 0 and r["n_prompt"] == 0:
            s = summarize(r["samples_ts"])
            s["decode_tokens"] = r["n_gen"]
            pts["decode"][str(r["n_depth"])] = s
    return pts


def bandwidth_limit_tok_s(bandwidth_gb_s: float, bytes_per_token: int) -> float:
    """Decode tokens/s if every token only had to stream its CPU-side weights once."""
    return bandwidth_gb_s * 1e9 / bytes_per_token


def derive(results: dict) -> dict:
    """The issue's summary keys from the measured points: tok/s by engine and length, ratios
    vs llama.cpp, decode as a fraction of the bandwidth limit, and the targets."""
    out: dict = {"prefill_tok_s": {}, "decode_tok_s": {}}
    for eng in ENGINES:
        pts = results.get(eng) or {}
        if pts.get("prefill"):
            out["prefill_tok_s"][eng] = {k: v["median"] for k, v in pts["prefill"].items() if "median" in v}
        if pts.get("decode"):
            out["decode_tok_s"][eng] = {k: v["median"] for k, v in pts["decode"].items() if "median" in v}
    ref_p = out["prefill_tok_s"].get("llama_cpp", {})
    ref_d = out["decode_tok_s"].get("llama_cpp", {})
    for eng, key in (("ktlegacy", "ratio_vs_llama_cpp"), ("ktlegacy_windows", "ratio_vs_llama_cpp_windows")):
        p, d = out["prefill_tok_s"].get(eng, {}), out["decode_tok_s"].get(eng, {})
        if (ref_p or ref_d) and (p or d):
            out[key] = {"prefill": {k: p[k] / ref_p[k] for k in p if k in ref_p},
                        "decode": {k: d[k] / ref_d[k] for k in d if k in ref_d}}
    bw = results.get("bandwidth", {}).get("best_gb_s")
    bpt = (results.get("model") or {}).get("decode_cpu_bytes_per_token", {}).get("total")
    if bw and bpt:
        limit = bandwidth_limit_tok_s(bw, bpt)
        out["bandwidth_gb_s"] = bw
        out["decode_bandwidth_limit_tok_s"] = limit
        out["decode_fraction_of_bandwidth_limit"] = {
            eng: {k: v / limit for k, v in d.items()} for eng, d in out["decode_tok_s"].items()}
    r = out.get("ratio_vs_llama_cpp")
    if r:
        t = {}
        if r["decode"]:
            t["decode_ge_1x_llama_cpp"] = all(v >= TARGET_DECODE_RATIO for v in r["decode"].values())
        lens = [str(n) for n in TARGET_PREFILL_LENGTHS if str(n) in r["prefill"]]
        if lens:
            t["prefill_ge_1.5x_llama_cpp_at_2048_8192"] = all(r["prefill"][k] >= TARGET_PREFILL_RATIO for k in lens)
        frac = out.get("decode_fraction_of_bandwidth_limit", {}).get("ktlegacy")
        if frac:
            t["decode_ge_50pct_of_bandwidth_limit"] = all(v >= TARGET_BANDWIDTH_FRACTION for v in frac.values())
        out["targets_met"] = t
    return out


# ---------------------------------------------------------------- bandwidth

def triad(n_elems: int, threads: int, reps: int = 10) -> dict:
    """STREAM-style triad a = b + s*c over float64 arrays of ``n_elems`` on ``threads`` torch
    threads; 24 bytes moved per element (STREAM's count: read b and c, write a). Returns the best
    (STREAM's convention) and the median rate of ``reps`` timed passes, in GB/s (1e9 bytes)."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = torch.empty(n_elems, dtype=torch.float64)
        b = torch.empty(n_elems, dtype=torch.float64)
        c = torch.empty(n_elems, dtype=torch.float64)
        a.fill_(0.0)   # first touch on the same threads that run the triad
        b.fill_(1.0)
        c.fill_(2.0)
        torch.add(b, c, alpha=3.0, out=a)  # warm-up
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.add(b, c, alpha=3.0, out=a)
            times.append(time.perf_counter() - t0)
        if not bool((a[:: max(1, n_elems // 1024)] == 7.0).all()):
            raise RuntimeError("triad produced wrong values")
    finally:
        torch.set_num_threads(before)
    moved = 24 * n_elems
    rates = [moved / t / 1e9 for t in times]
    return {"best_gb_s": max(rates), "median_gb_s": statistics.median(rates), "array_bytes": 8 * n_elems,
            "threads": threads, "reps": reps, "kernel": "torch.add(b, c, alpha=3.0, out=a), float64"}


# ---------------------------------------------------------------- llama.cpp

def llama_bench_cmd(binary: str, model: Path, threads: int, runs: int, *, prompts=(), depths=(), n_gen=0) -> list[str]:
    cmd = [binary, "-m", str(model), "-ngl", "99", "-ot", "exps=CPU", "-fa", "1", "-t", str(threads),
           "-r", str(runs), "-o", "jsonl"]
    if prompts:
        cmd += ["-p", ",".join(map(str, prompts)), "-n", "0"]
    else:
        cmd += ["-p", "0", "-n", str(n_gen), "-d", ",".join(map(str, depths))]
    return cmd


def run_llama(args, gguf: Path, deadline: float) -> dict:
    out: dict = {"commands": [], "logs_tail": []}
    rows = []
    for kind, cmd in (
        ("prefill", llama_bench_cmd(args.llama_bench, gguf, args.threads, args.runs, prompts=args.prefill)),
        ("decode", llama_bench_cmd(args.llama_bench, gguf, args.threads, args.runs, depths=args.decode_ctx,
                                   n_gen=args.decode_tokens)),
    ):
        left = deadline - time.monotonic()
        if left < 30:
            out.setdefault("skipped", []).append(f"{kind}: deadline")
            continue
        out["commands"].append(shlex.join(cmd))
        log(f"llama.cpp {kind}: {shlex.join(cmd)}")
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=None if left == float("inf") else left)
            stdout, stderr, rc = proc.stdout, proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as exc:  # keep the rows it finished (jsonl is flushed per test)
            stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            stderr, rc = "timeout", None
            out.setdefault("skipped", []).append(f"{kind}: timed out at the deadline")
        out["logs_tail"].append(stderr[-3000:])
        got = parse_llama_bench(stdout) if stdout.strip() else []
        rows += got
        for r in got:
            log(f"llama.cpp pp{r['n_prompt']} tg{r['n_gen']} @d{r['n_depth']}: "
                f"{statistics.median(r['samples_ts']):.1f} tok/s ({r['samples_ts']})")
        if rc not in (0, None):
            raise RuntimeError(f"llama-bench exited {rc}: {stderr[-2000:]}")
    out.update(llama_points(rows))
    out["rows"] = rows
    if rows:
        out["build_commit"], out["gpu_info"], out["cpu_info"] = (rows[0]["build_commit"], rows[0]["gpu_info"],
                                                                  rows[0]["cpu_info"])
    return out


# ---------------------------------------------------------------- ktlegacy

def set_cpu_infer(threads: int) -> None:
    """0.2.1.post1 builds KExpertsCPU's thread pool from Config().cpu_infer when
    ktransformers.operators.experts is first imported: set it before that."""
    if "ktransformers.operators.experts" in sys.modules:
        raise RuntimeError("ktransformers.operators.experts is already imported: cpu_infer can no longer be set")
    from ktransformers.server.config.config import Config
    Config().cpu_infer = threads


def load_ktlegacy(model_dir: Path, cpu_infer: int, rules: str | None = None):
    set_cpu_infer(cpu_infer)
    import torch
    from gpu_proof import RULE_FILE, load_engine
    torch.cuda.synchronize()
    t0 = time.monotonic()
    model, config, dtype, rules = load_engine(model_dir, rules or RULE_FILE)
    torch.cuda.synchronize()
    from ktransformers.server.config.config import Config
    info = {"load_s": time.monotonic() - t0, "dtype": str(dtype), "rule_file": str(rules),
            "gpu_linear": os.environ.get("KTLEGACY_GPU_LINEAR", "(default)"),
            "cpu_infer": Config().cpu_infer,
            "gpu_memory_allocated_bytes": torch.cuda.memory_allocated(),
            "linear_ops": sorted({type(m).__name__ for m in model.modules() if "Linear" in type(m).__name__}),
            "experts_ops": sorted({type(m).__name__ for m in model.modules() if "Experts" in type(m).__name__})}
    return model, config, info


class CpuExpertWait:
    """Wall time the engine's thread spends in KExpertsCPU calls: ``forward`` (prefill: the
    whole CPU MoE) and ``submit_for_one_decode`` + ``sync_for_one_decode`` (decode: the submit,
    then the wait for the CPU experts after the shared experts ran on the GPU)."""

    METHODS = ("forward", "submit_for_one_decode", "sync_for_one_decode")

    def __enter__(self):
        from ktransformers.operators.experts import KExpertsCPU
        self.cls, self.seconds, self.saved = KExpertsCPU, 0.0, {}
        for name in self.METHODS:
            original = getattr(KExpertsCPU, name)
            self.saved[name] = original

            def timed(this, *a, _orig=original, **kw):
                t = time.perf_counter()
                try:
                    return _orig(this, *a, **kw)
                finally:
                    self.seconds += time.perf_counter() - t
            setattr(KExpertsCPU, name, timed)
        return self

    def __exit__(self, *exc):
        for name, original in self.saved.items():
            setattr(self.cls, name, original)


GPU_PREFILL_ENV = "KTLEGACY_GPU_PREFILL_MIN_TOKENS"


class ExpertsPath:
    """Which path each MoE layer's prompt call took: counts the calls of the runtime's
    ``experts_prefill_on_gpu`` (overlay 68's hook in KExpertsCPU.forward) that ran on the GPU
    and those that went on to the CPU backend. ``min_tokens``: the threshold during the block
    (None: leave the environment as it is)."""

    def __init__(self, min_tokens: int | None = None):
        self.min_tokens, self.gpu, self.cpu = min_tokens, 0, 0

    def __enter__(self):
        from ktransformers import ktlegacy_runtime
        self.module, self.original = ktlegacy_runtime, ktlegacy_runtime.experts_prefill_on_gpu
        self.saved_env = os.environ.get(GPU_PREFILL_ENV)
        if self.min_tokens is not None:
            os.environ[GPU_PREFILL_ENV] = str(self.min_tokens)

        def counted(*a, **kw):
            out = self.original(*a, **kw)
            if out is None:
                self.cpu += 1
            else:
                self.gpu += 1
            return out
        ktlegacy_runtime.experts_prefill_on_gpu = counted
        return self

    def __exit__(self, *exc):
        self.module.experts_prefill_on_gpu = self.original
        if self.saved_env is None:
            os.environ.pop(GPU_PREFILL_ENV, None)
        else:
            os.environ[GPU_PREFILL_ENV] = self.saved_env


def logits_agreement(a, b) -> dict:
    """How close two logit vectors are: relative L2 difference, cosine, same argmax, top-5 overlap."""
    import torch
    a, b = a.double().flatten(), b.double().flatten()
    top = lambda t: set(torch.topk(t, 5).indices.tolist())
    return {"relative_l2": ((a - b).norm() / b.norm()).item(),
            "cosine": torch.nn.functional.cosine_similarity(a, b, dim=0).item(),
            "same_argmax": int(a.argmax()) == int(b.argmax()), "top5_overlap": len(top(a) & top(b))}


def profile_decode(sess, tok: int, steps: int = 8, rows: int = 15) -> dict:
    """torch profiler over a few decode steps: the ops with the most CPU time (and their CUDA
    time), to see where a step goes (CPU experts, attention, launches)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            tok = int(sess.decode(tok).argmax())
    table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=rows)
    print(table, flush=True)
    top = sorted(prof.key_averages(), key=lambda e: e.cpu_time_total, reverse=True)[:rows]
    return {"steps": steps, "top_ops": [
        {"name": e.key, "calls": e.count, "cpu_total_ms": e.cpu_time_total / 1000,
         "cuda_total_ms": getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0)) / 1000}
        for e in top]}


def decode_windows(sess, step, tok: int, args, deadline: float):
    """``--runs`` consecutive timed windows of ``--decode-tokens`` steps: (summary or None, tok)."""
    rates, waits, contexts = [], [], []
    for _ in range(args.runs):
        if time.monotonic() > deadline:
            break
        contexts.append(sess.pos)
        with CpuExpertWait() as timer:
            t0 = time.perf_counter()
            for _ in range(args.decode_tokens):
                tok = step(tok)
            dt = time.perf_counter() - t0
        rates.append(args.decode_tokens / dt)
        waits.append(timer.seconds)
    if not rates:
        return None, tok
    return dict(summarize(rates), decode_tokens=args.decode_tokens, contexts=contexts, cpu_experts_wait_s=waits), tok


def graph_decoder(sess, tok: int):
    """Decode through upstream's CUDAGraphRunner the way 0.2.1.post1's prefill_and_generate
    (local_chat's default, use_cuda_graph=True) does: one eager step, capture at the next
    position, then replay with the token/position copied into the graph's input buffers.
    Returns (step function, next token)."""
    import torch
    from ktransformers.util.cuda_graph_runner import CUDAGraphRunner
    tok = int(sess.decode(tok).argmax())
    cache_position = torch.tensor([sess.pos], device=sess.device, dtype=torch.int32)
    position_ids = cache_position.unsqueeze(0)  # a view: follows cache_position
    cur = torch.tensor([[tok]], device=sess.device)
    runner = CUDAGraphRunner()
    runner.capture(sess.model, cur, position_ids, cache_position, sess.cache, sess.device,
                   return_dict=False, use_cache=True)

    def step(t: int) -> int:
        cur.fill_(t)
        logits = runner(cur, position_ids, cache_position)
        sess.cache.change_seq_length(1)
        torch.cuda.synchronize()
        cache_position.add_(1)
        sess.pos += 1
        return int(logits[0, -1].argmax())
    return step, tok


def run_ktlegacy(results: dict, engine: str, args, deadline: float) -> dict:
    import torch
    from gpu_proof import EngineSession, _keep_kv_b
    model, config = results["_ktlegacy"]
    torch.set_grad_enabled(False)  # as local_chat does at import: CUDA-graph capture needs it (resize_ in KExpertsCPU)
    os.environ["KTLEGACY_PREFILL"] = PREFILL_MODE[engine]
    restore = _keep_kv_b(model)
    gen = torch.Generator().manual_seed(0)
    longest = max(list(args.prefill) + list(args.decode_ctx))
    ids = torch.randint(2, config.vocab_size, (longest,), generator=gen).tolist()
    out: dict = {"prefill_mode": PREFILL_MODE[engine], "prefill": {}, "decode": {}, "skipped": []}

    def session(max_len: int):
        for layer in model.model.layers:
            layer.self_attn.attn_mask = None  # forward_windows caches a mask sized for its first cache
        return EngineSession(model, config, max_len=max_len)

    def done(sess):
        del sess
        restore()
        torch.cuda.empty_cache()

    # warm-up (Triton/SDPA selection, allocator, CPU expert buffers): not timed
    sess = session(512 + 16)
    tok = int(sess.prefill(ids[:512]).argmax())
    for _ in range(8):
        tok = int(sess.decode(tok).argmax())
    done(sess)
    if engine == "ktlegacy":  # the GPU experts path too (its dequant kernels JIT from PTX on first use)
        sess = session(512 + 16)
        with ExpertsPath(1):
            sess.prefill(ids[:512])
        done(sess)

    def prefill_point(n: int, min_tokens: int | None = None) -> dict | None:
        """``--runs`` prefills of ``n`` tokens: tok/s, the time in KExpertsCPU.forward (the routed
        experts, on whichever path) and how many MoE layers ran them on the GPU / the CPU."""
        rates, experts_s, paths = [], [], set()
        for _ in range(args.runs):
            if time.monotonic() > deadline:
                out["skipped"].append(f"prefill {n}: deadline")
                break
            sess = session(n + 8)
            with ExpertsPath(min_tokens) as path, CpuExpertWait() as timer:
                t0 = time.perf_counter()
                sess.prefill(ids[:n])
                dt = time.perf_counter() - t0
            done(sess)
            rates.append(n / dt)
            experts_s.append(timer.seconds)
            paths.add((path.gpu, path.cpu))
        if not rates:
            return None
        (gpu, cpu), = paths if len(paths) == 1 else [(None, None)]
        return dict(summarize(rates), cpu_experts_wait_s=experts_s, moe_layers_experts_on_gpu=gpu,
                    moe_layers_experts_on_cpu=cpu)

    for n in args.prefill:
        point = prefill_point(n)
        if point:
            out["prefill"][str(n)] = point
            log(f"{engine} prefill {n}: {point['median']:.1f} tok/s ({[round(r, 1) for r in point['runs']]}); "
                f"experts {[round(s, 2) for s in point['cpu_experts_wait_s']]} s, MoE layers on GPU/CPU "
                f"{point['moe_layers_experts_on_gpu']}/{point['moe_layers_experts_on_cpu']}")

    if engine == "ktlegacy" and not args.skip_extras:
        # the other experts path beside the default one, one length each, and the two paths' logits
        out["experts_path"] = {}
        for label, n, min_tokens in (("cpu", 2048, 0), ("gpu", 512, 1)):
            if n in args.prefill and time.monotonic() < deadline:
                point = prefill_point(n, min_tokens)
                if point:
                    out["experts_path"].setdefault(label, {})[str(n)] = point
                    log(f"{engine} prefill {n}, experts forced on the {label.upper()}: {point['median']:.1f} tok/s")
        if time.monotonic() < deadline:
            logits = {}
            for label, min_tokens in (("cpu", 0), ("gpu", 1)):
                sess = session(1024 + 8)
                with ExpertsPath(min_tokens) as path:
                    logits[label] = sess.prefill(ids[:1024]).cpu()
                done(sess)
                logits[label + "_layers"] = (path.gpu, path.cpu)
            out["gpu_prefill_check"] = dict(logits_agreement(logits["gpu"], logits["cpu"]), prompt_tokens=1024,
                                            moe_layers_gpu_cpu={"gpu_path": logits["gpu_layers"],
                                                                "cpu_path": logits["cpu_layers"]})
            log(f"{engine} GPU vs CPU experts, logits after 1024 tokens: {out['gpu_prefill_check']}")

    for ctx in args.decode_ctx:
        if time.monotonic() > deadline:
            out["skipped"].append(f"decode {ctx}: deadline")
            continue
        sess = session(ctx + 2 * args.runs * args.decode_tokens + 48)
        tok = int(sess.prefill(ids[:ctx]).argmax())

        def eager_step(t):
            return int(sess.decode(t).argmax())
        eager, tok = decode_windows(sess, eager_step, tok, args, deadline)
        if engine == "ktlegacy" and not args.skip_extras and "decode_profile" not in out and time.monotonic() < deadline:
            try:  # where an eager decode step goes (not part of the timed runs)
                out["decode_profile"] = dict(profile_decode(sess, tok), context=sess.pos)
            except Exception as exc:
                out["decode_profile"] = {"error": f"{type(exc).__name__}: {exc}"}
        graph, graph_error = None, None
        if time.monotonic() < deadline:
            try:
                step, tok = graph_decoder(sess, tok)
                graph, tok = decode_windows(sess, step, tok, args, deadline)
            except Exception as exc:  # recorded: the eager number stands alone then
                traceback.print_exc()
                graph_error = f"{type(exc).__name__}: {exc}"
        done(sess)
        row = {}
        if eager:
            row["eager"] = eager
        if graph:
            row["cuda_graph"] = graph
        if graph_error:
            row["cuda_graph_error"] = graph_error
        head = graph or eager
        if head:  # the headline is what local_chat does: CUDA-graph decode (eager if that failed)
            out["decode"][str(ctx)] = dict(head, mode="cuda_graph" if graph else "eager", **row)
            log(f"{engine} decode @{ctx}: eager {eager['median'] if eager else float('nan'):.2f} tok/s, "
                f"CUDA graph {graph['median'] if graph else float('nan'):.2f} tok/s"
                + (f" (graph failed: {graph_error})" if graph_error else ""))
        else:
            out["skipped"].append(f"decode {ctx}: no run finished")
    os.environ["KTLEGACY_PREFILL"] = "sdpa"
    return out


# ---------------------------------------------------------------- main

def environment(args) -> dict:
    env = {"python": platform.python_version(), "machine": platform.machine(),
           "cpus_in_affinity": len(os.sched_getaffinity(0)), "physical_cores": physical_cores(),
           "KTLEGACY_EMULATE_CC": os.environ.get("KTLEGACY_EMULATE_CC"),
           "KTLEGACY_ARCH_LIST": os.environ.get("KTLEGACY_ARCH_LIST")}
    try:
        env["cpu_model"] = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                                if ln.startswith("model name"))
        flags = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags"))
        env["cpu_avx512"] = " avx512f " in f" {flags} "
    except (OSError, StopIteration):
        pass
    try:
        import torch
        env["torch"] = torch.__version__
        if torch.cuda.is_available():
            env["device"] = torch.cuda.get_device_name(0)
            env["device_cc"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    except ImportError:
        pass
    src = os.environ.get("PEER_LLAMA_SOURCE_JSON")
    if src and Path(src).is_file():
        env["llama_cpp_source"] = json.loads(Path(src).read_text())
    env["llama_cpp_cpu_build"] = os.environ.get("PEER_LLAMA_CPU", "native")
    return env


def main(argv=None) -> int:
    from ktlegacy.testing.peer_model import GGUF_NAME, load_record
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, type=Path, help="make_lite_model output directory")
    p.add_argument("--llama-bench", help="llama-bench binary (needed for the llama_cpp engine)")
    p.add_argument("--ik-llama-bench", help="ik_llama.cpp's llama-bench binary (bench/peer_run.sh builds it; "
                   "stored in args.ik_llama_bench: no ik_llama.cpp configuration is run from it yet)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--threads", type=int, default=None, help="CPU threads for every engine (default: physical cores)")
    p.add_argument("--cpu-infer", type=int, default=None,
                   help="ktlegacy's CPU-expert pool (default: threads - 2, as compose/.env.example advises: its "
                        "CUDA-callback thread and the Python thread take the other two)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--prefill", type=int, nargs="+", default=[512, 2048, 8192])
    p.add_argument("--decode-ctx", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    p.add_argument("--triad-mib", type=int, default=1024, help="MiB per triad array (3 arrays)")
    p.add_argument("--deadline-s", type=float, default=None, help="stop starting runs after this many seconds")
    p.add_argument("--skip-extras", action="store_true",
                   help="time only the default paths: no forced experts path, no GPU-vs-CPU logits check, no decode profile")
    p.add_argument("--rules", default=None, help="ktlegacy's rule file (default: gpu_proof's DeepSeek-V2-Lite-Chat.yaml)")
    args = p.parse_args(argv)
    if args.runs < 3:
        p.error("--runs must be at least 3 (median with a spread)")
    try:
        record = load_record(args.model)
    except Exception as exc:
        p.error(str(exc))
    if "llama_cpp" in args.engines and not (args.llama_bench and Path(args.llama_bench).is_file()):
        p.error("--llama-bench BIN is required for the llama_cpp engine (bench/peer_run.sh builds it)")
    args.threads = args.threads or physical_cores()
    args.cpu_infer = args.cpu_infer or max(1, args.threads - 2)
    start = time.monotonic()
    deadline = start + args.deadline_s if args.deadline_s else float("inf")
    global PARTIAL_OUT
    args.out.parent.mkdir(parents=True, exist_ok=True)
    PARTIAL_OUT = args.out.with_name(args.out.stem + ".partial.json")
    gguf = args.model / GGUF_NAME
    results: dict = {
        "command": shlex.join(sys.argv), "threads": args.threads, "ktlegacy_cpu_infer": args.cpu_infer, "runs": args.runs,
        "model": {k: record[k] for k in ("spec", "quant_mix", "file_bytes", "decode_cpu_bytes_per_token")},
        "points": {"prefill": args.prefill, "decode_ctx": args.decode_ctx, "decode_tokens": args.decode_tokens},
    }
    phase(results, "environment", lambda: environment(args))
    log(f"threads {args.threads}; model {record['file_bytes'] / 2**30:.2f} GiB; engines {args.engines}")
    phase(results, "bandwidth", lambda: triad(args.triad_mib * 2**20 // 8, args.threads))
    if "bandwidth" in results:
        log(f"triad: best {results['bandwidth']['best_gb_s']:.1f} GB/s, median {results['bandwidth']['median_gb_s']:.1f}")
    if "llama_cpp" in args.engines:
        phase(results, "llama_cpp", lambda: run_llama(args, gguf, deadline))
    kt = [e for e in args.engines if e != "llama_cpp"]
    if kt:
        def load():
            model, config, info = load_ktlegacy(args.model, args.cpu_infer, args.rules)
            results["_ktlegacy"] = (model, config)
            return info
        phase(results, "ktlegacy_engine", load)
        if "_ktlegacy" in results:
            for eng in kt:
                phase(results, eng, lambda eng=eng: run_ktlegacy(results, eng, args, deadline))
    results.pop("_ktlegacy", None)
    results.update(derive(results))
    results["wall_s"] = time.monotonic() - start
    args.out.write_text(json.dumps(public(results), indent=2, default=str) + "\n")
    PARTIAL_OUT.unlink(missing_ok=True)
    log(f"wrote {args.out}; errors: {list(results.get('errors', {}))}")
    for key in ("prefill_tok_s", "decode_tok_s", "ratio_vs_llama_cpp", "decode_fraction_of_bandwidth_limit",
                "targets_met"):
        if key in results:
            log(f"{key}: {json.dumps(results[key])}")
    return 1 if results.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
