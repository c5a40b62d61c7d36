#!/usr/bin/env python3
"""ktlegacy vs llama.cpp and ik_llama.cpp on one GPU machine, same GGUF, same CPU threads (issues 13, 26).

    python bench/peer_bench.py --model DIR --llama-bench BIN [--ik-llama-bench BIN] --out results.json \
        [--threads N] [--runs 3] [--prefill 512 2048 8192] [--decode-ctx 1024 4096] [--decode-tokens 32] \
        [--engines llama_cpp ik_llama_cpp ktlegacy ktlegacy_windows] [--deadline-s S] [--resume EARLIER.json]

MODEL is ``ktlegacy.testing.peer_model.make_lite_model``'s output (DeepSeek-V2-Lite's shapes and quant
mix, random weights). bench/peer_run.sh builds everything and runs this on the GPU machine.

Engines, all with the routed experts on the CPU and everything else on the GPU:

- ``llama_cpp`` and ``ik_llama_cpp``: ``llama-bench -ngl 99 -ot exps=CPU -fa 1 -t THREADS`` and
  each configuration of PEER_CONFIGS (below): what their users run, tuned ubatches included. The
  ratios are against the best configuration at each point (``best_peer``, ``ratio_vs_best_peer``).
- ``ktlegacy``: the patched ktransformers (built 7.5+PTX, ``KTLEGACY_EMULATE_CC=7.5``) driven as
  bench/gpu_proof.py drives it (``optimize_and_load_gguf`` with the patched
  DeepSeek-V2-Lite-Chat.yaml, its ``StaticCache``), SDPA prefill; decode is timed eager and
  through upstream's ``CUDAGraphRunner`` as local_chat's ``prefill_and_generate`` uses it (its
  default): the CUDA-graph number is the headline, the eager one is kept beside it; the CPU
  experts get ``cpu_infer = --threads - 2`` (``--cpu-infer``): the pool's workers spin, and the
  engine's CUDA-callback thread (which waits for them in decode) and its Python thread need the
  other two of the ``--threads`` cores every engine gets. The product's default
  ``KTLEGACY_GPU_PREFILL_MIN_TOKENS=auto`` calibrates on the warm-up prompt (recorded in
  ``gpu_prefill_calibration``); every prefill length is also timed with the experts forced onto
  each path, and ``gpu_prefill_auto`` says whether auto took the faster one (or one within 10%);
  ``gpu_prefill_check`` compares the two paths' logits after the same 1024-token prompt;
  ``decode_breakdown`` puts one CUDA-graph step beside one token's CPU experts alone;
- ``ktlegacy_windows``: the same loaded model with ``KTLEGACY_PREFILL=windows`` (upstream's
  ``forward_windows`` prefill).

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
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

ENGINES = ("llama_cpp", "ik_llama_cpp", "ktlegacy", "ktlegacy_windows")
PEERS = ("llama_cpp", "ik_llama_cpp")
PREFILL_MODE = {"ktlegacy": "sdpa", "ktlegacy_windows": "windows"}


@dataclass(frozen=True)
class PeerConfig:
    """One way a peer's users run it. ``flags`` come after the common ones (-ngl 99 -ot exps=CPU
    -fa 1 -t THREADS); ``above``: the prompt lengths it is measured at are those > above (a larger
    -ub only changes prompts longer than the next smaller one: at 512 tokens -ub 2048 is -ub 512);
    ``decode``: also measure decode (-b/-ub do not change a one-token step)."""
    peer: str
    name: str
    flags: tuple = ()
    above: int = 0
    decode: bool = False
    upto: int | None = None     # measured only at lengths <= upto (None: every length above ``above``)

    @property
    def key(self) -> str:
        return f"{self.peer}:{self.name}"


# ik_llama.cpp's recommended hybrid DeepSeek flags (its README / discussions: fused MoE, MLA mode 3
# with flash attention, attention compute buffer capped at 512 MiB)
IK_FLAGS = ("-fmoe", "1", "-mla", "3", "-amb", "512")
UB2048, UB4096 = ("-b", "2048", "-ub", "2048"), ("-b", "4096", "-ub", "4096")
PEER_CONFIGS = (
    PeerConfig("llama_cpp", "default", (), 0, decode=True),
    PeerConfig("llama_cpp", "ub2048", UB2048, 512),
    PeerConfig("llama_cpp", "ub4096", UB4096, 2048),
    # ik_llama.cpp "with the best -ub" (issue 26): its default ubatch at 512 tokens and for decode only
    PeerConfig("ik_llama_cpp", "fmoe-mla3", IK_FLAGS, 0, decode=True, upto=512),
    PeerConfig("ik_llama_cpp", "fmoe-mla3-ub2048", IK_FLAGS + UB2048, 512),
    PeerConfig("ik_llama_cpp", "fmoe-mla3-ub4096", IK_FLAGS + UB4096, 2048),
)
# Prompts this long are timed --long-runs times (every engine), the others --runs times.
LONG = 8192
# No warm-up run (the device's 10-minute calls): the median of --runs absorbs the first run's
# one-time costs, and the spread shows them.
NO_WARMUP = {"llama_cpp": ("--no-warmup",), "ik_llama_cpp": ("-w", "0")}

# Targets of issue 26 (benchmark targets, not tests): ktlegacy vs the best peer configuration.
TARGETS = {"prefill": {"512": 1.0, "2048": 1.5, "8192": 1.5}, "decode": {"1024": 1.2, "4096": 1.2}}
TARGET_BANDWIDTH_FRACTION = 0.6
AUTO_WITHIN = 0.10     # auto's path: the faster one, or within 10% of it

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
        elif r["n_gen"] > 0 and (r["n_prompt"] == 0 or "@pp" in (r.get("test") or "")):
            # mainline: -p 0 -n N -d D; ik_llama.cpp: -gp D,N ("tgN@ppD": timed over the N tokens only)
            s = summarize(r["samples_ts"])
            s["decode_tokens"] = r["n_gen"]
            pts["decode"][str(r["n_depth"] or r["n_prompt"])] = s
    return pts


def bandwidth_limit_tok_s(bandwidth_gb_s: float, bytes_per_token: int) -> float:
    """Decode tokens/s if every token only had to stream its CPU-side weights once."""
    return bandwidth_gb_s * 1e9 / bytes_per_token


def derive(results: dict) -> dict:
    """The issue's summary keys from the measured points: tok/s by engine (peers: by configuration),
    the best peer configuration at each point and ktlegacy's ratio to it, decode as a fraction of
    the bandwidth limit, auto's choice, and the targets."""
    out: dict = {"prefill_tok_s": {}, "decode_tok_s": {}}
    series = {}
    for peer in PEERS:
        for key, cfg in ((results.get(peer) or {}).get("configs") or {}).items():
            series[key] = cfg
    for eng in ("ktlegacy", "ktlegacy_windows"):
        if results.get(eng):
            series[eng] = results[eng]
    for key, pts in series.items():
        for kind in ("prefill", "decode"):
            got = {k: v["median"] for k, v in (pts.get(kind) or {}).items() if "median" in v}
            if got:
                out[f"{kind}_tok_s"][key] = got
    best: dict = {"prefill": {}, "decode": {}}
    for kind in ("prefill", "decode"):
        for key, got in out[f"{kind}_tok_s"].items():
            if key.startswith("ktlegacy"):
                continue
            for point, rate in got.items():
                if point not in best[kind] or rate > best[kind][point]["tok_s"]:
                    cfg = series[key]
                    best[kind][point] = {"config": key, "peer": key.split(":")[0], "flags": cfg.get("flags"),
                                         "tok_s": rate}
    if best["prefill"] or best["decode"]:
        out["best_peer"] = best
    kt = {kind: out[f"{kind}_tok_s"].get("ktlegacy", {}) for kind in ("prefill", "decode")}
    if out.get("best_peer") and (kt["prefill"] or kt["decode"]):
        out["ratio_vs_best_peer"] = {kind: {k: v / best[kind][k]["tok_s"] for k, v in kt[kind].items()
                                            if k in best[kind]} for kind in ("prefill", "decode")}
    bw = results.get("bandwidth", {}).get("best_gb_s")
    bpt = (results.get("model") or {}).get("decode_cpu_bytes_per_token", {}).get("total")
    if bw and bpt:
        limit = bandwidth_limit_tok_s(bw, bpt)
        out["bandwidth_gb_s"] = bw
        out["decode_bandwidth_limit_tok_s"] = limit
        fractions = {key: {k: v / limit for k, v in d.items()} for key, d in out["decode_tok_s"].items()}
        out["decode_fraction_of_bandwidth_limit"] = fractions.get("ktlegacy", {})
        out["decode_fraction_of_bandwidth_limit_all"] = fractions
    auto = (results.get("ktlegacy") or {}).get("gpu_prefill_auto")
    if auto:
        out["gpu_prefill_auto"] = auto
    r = out.get("ratio_vs_best_peer")
    if r:
        t = {}
        for kind, want in TARGETS.items():
            for point, target in want.items():
                if point in r[kind]:
                    t[f"{kind}_{point}_ge_{target}x_best_peer"] = {"met": r[kind][point] >= target,
                                                                  "ratio": r[kind][point],
                                                                  "shortfall": max(0.0, target - r[kind][point])}
        frac = out.get("decode_fraction_of_bandwidth_limit")
        if frac:
            t[f"decode_ge_{TARGET_BANDWIDTH_FRACTION}_of_bandwidth_limit"] = {
                "met": all(v >= TARGET_BANDWIDTH_FRACTION for v in frac.values()), "fractions": frac}
        if auto:
            t["auto_picks_faster_or_within_10pct"] = {"met": auto.get("picked_faster_or_within_10pct")}
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

def llama_bench_cmd(binary: str, model: Path, threads: int, runs: int, *, prompts=(), depths=(), n_gen=0,
                    flags=(), ik: bool = False) -> list[str]:
    """One llama-bench run. ``ik``: ik_llama.cpp's llama-bench, which has no jsonl output (json) and
    no -d (decode after a context is -gp DEPTH,TOKENS, once per depth)."""
    cmd = [binary, "-m", str(model), "-ngl", "99", "-ot", "exps=CPU", "-fa", "1", "-t", str(threads),
           "-r", str(runs), "-o", "json" if ik else "jsonl", *NO_WARMUP["ik_llama_cpp" if ik else "llama_cpp"], *flags]
    if prompts:
        cmd += ["-p", ",".join(map(str, prompts)), "-n", "0"]
    elif ik:  # -p 0 -n 0: without them ik's defaults (-p 512 -n 128) run too
        cmd += ["-p", "0", "-n", "0", *(arg for d in depths for arg in ("-gp", f"{d},{n_gen}"))]
    else:
        cmd += ["-p", "0", "-n", str(n_gen), "-d", ",".join(map(str, depths))]
    return cmd


def peer_commands(args, peer: str, binary: str, gguf: Path) -> list:
    """(config, kind, command) of every llama-bench run of ``peer``'s configurations."""
    out = []
    for cfg in PEER_CONFIGS:
        if cfg.peer != peer:
            continue
        prompts = [n for n in args.prefill if n > cfg.above and (cfg.upto is None or n <= cfg.upto)]
        for group, runs in (([n for n in prompts if n < LONG], args.runs), ([n for n in prompts if n >= LONG],
                                                                            args.long_runs)):
            if group:
                out.append((cfg, "prefill", llama_bench_cmd(binary, gguf, args.threads, runs, prompts=group,
                                                             flags=cfg.flags, ik=peer == "ik_llama_cpp")))
        if cfg.decode:
            out.append((cfg, "decode", llama_bench_cmd(binary, gguf, args.threads, args.runs, depths=args.decode_ctx,
                                                        n_gen=args.decode_tokens, flags=cfg.flags,
                                                        ik=peer == "ik_llama_cpp")))
    return out


def run_peer(args, peer: str, binary: str, gguf: Path, deadline: float) -> dict:
    """Every configuration of ``peer`` (PEER_CONFIGS): {"configs": {key: {flags, commands, prefill,
    decode, rows}}, "logs_tail", "skipped"}."""
    out: dict = {"configs": {}, "logs_tail": []}
    for cfg, kind, cmd in peer_commands(args, peer, binary, gguf):
        rec = out["configs"].setdefault(cfg.key, {"flags": " ".join(cfg.flags) or "(defaults: -b 2048 -ub 512)",
                                                  "commands": [], "rows": []})
        left = deadline - time.monotonic()
        if left < 30:
            out.setdefault("skipped", []).append(f"{cfg.key} {kind}: deadline")
            continue
        rec["commands"].append(shlex.join(cmd))
        log(f"{cfg.key} {kind}: {shlex.join(cmd)}")
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=None if left == float("inf") else left)
            stdout, stderr, rc = proc.stdout, proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as exc:  # keep the rows it finished (jsonl is flushed per test)
            stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            stderr, rc = "timeout", None
            out.setdefault("skipped", []).append(f"{cfg.key} {kind}: timed out at the deadline")
        out["logs_tail"].append(stderr[-2000:])
        got = parse_llama_bench(stdout) if stdout.strip() else []
        rec["rows"] += got
        for r in got:
            log(f"{cfg.key} pp{r['n_prompt']} tg{r['n_gen']} @d{r['n_depth']}: "
                f"{statistics.median(r['samples_ts']):.1f} tok/s ({r['samples_ts']})")
        if rc not in (0, None):
            rec["error"] = f"llama-bench exited {rc}: {stderr[-1500:]}"
            log(f"{cfg.key} {kind}: {rec['error']}")
    for rec in out["configs"].values():
        rec.update(llama_points(rec["rows"]))
        if rec["rows"]:
            out["build_commit"], out["gpu_info"], out["cpu_info"] = (rec["rows"][0]["build_commit"],
                                                                      rec["rows"][0]["gpu_info"], rec["rows"][0]["cpu_info"])
    if not any(rec["rows"] for rec in out["configs"].values()):
        raise RuntimeError(f"{peer}: no llama-bench run finished: " + "; ".join(
            [rec["error"] for rec in out["configs"].values() if rec.get("error")] + out.get("skipped", [])))
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


def cpu_experts_alone(model, reps: int = 10) -> dict:
    """One decode token's routed experts on the CPU alone: every KExpertsCPU layer's forward for one
    row (random top-k routing, what the CPU backend does per decode step, without the GPU work
    around it), timed per token over ``reps`` tokens. Beside the CUDA-graph step time this splits a
    step into the CPU experts and the rest (GPU kernels, the callbacks, waiting)."""
    import torch
    # KExpertsCPU is not an nn.Module child: KTransformersExperts holds it as generate_experts (and
    # more than one module can reach the same one: each layer once)
    layers = list({id(e): e for m in model.modules() for e in (getattr(m, "generate_experts", None),)
                   if type(e).__name__ == "KExpertsCPU"}.values())
    if not layers:
        return {"error": "no KExpertsCPU modules"}
    first = layers[0]
    n, k = first.n_routed_experts, first.config.num_experts_per_tok
    hidden = first.config.hidden_size
    gen = torch.Generator().manual_seed(1)
    device = torch.device(object.__getattribute__(first, "out_device"))
    x = torch.randn(1, hidden, generator=gen).to(device=device, dtype=torch.float16)
    times = []
    for _ in range(reps + 1):
        ids = torch.randperm(n, generator=gen)[:k].view(1, k).to(device)
        w = torch.softmax(torch.randn(1, k, generator=gen), dim=-1).to(device)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for m in layers:
            m.forward(x, ids, w)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    per = statistics.median(times[1:])
    return {"moe_layers": len(layers), "ms_per_token": per * 1e3, "reps": reps,
            "what": "every KExpertsCPU layer's forward for one row, eager (includes its Python and copies)"}


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


def auto_check(out: dict, threshold) -> dict:
    """Per prompt length: the path the default (auto) took, both forced paths' tok/s, and whether
    auto's path was the faster one or within AUTO_WITHIN of it."""
    points, ok = {}, True
    for n, point in (out.get("prefill") or {}).items():
        cpu = ((out.get("experts_path") or {}).get("cpu") or {}).get(n)
        gpu = ((out.get("experts_path") or {}).get("gpu") or {}).get(n)
        if not (cpu and gpu):
            continue
        took = "gpu" if point.get("moe_layers_experts_on_gpu") else "cpu"
        best = max(cpu["median"], gpu["median"])
        picked = {"cpu": cpu, "gpu": gpu}[took]["median"]
        good = picked >= (1 - AUTO_WITHIN) * best
        ok = ok and good
        points[n] = {"auto_path": took, "auto_tok_s": point["median"], "cpu_tok_s": cpu["median"],
                     "gpu_tok_s": gpu["median"], "faster_path": "gpu" if gpu["median"] >= cpu["median"] else "cpu",
                     "picked_faster_or_within_10pct": good}
    return {"threshold": threshold, "points": points, "picked_faster_or_within_10pct": ok if points else None}


# Where issue 26 asks what auto would pick on a T4/V100 box: PCIe 3 x16 (~12 GB/s pinned from the
# local node) and two sockets of 14 cores, the experts on one node's 12 threads (the doctor's
# advice) or both nodes' 26.
PROJECTIONS = {"pcie3_x16_12GBs_one_node_12_threads": (12e9, 12), "pcie3_x16_12GBs_two_nodes_26_threads": (12e9, 26)}


def projected_thresholds(rt, samples: list, threads: int) -> dict:
    """The runtime's own crossover model (AutoThreshold.decide) on this run's calibration samples,
    with the copy at another link speed and the CPU experts' time scaled by thread count (linear:
    prefill's expert GEMMs are compute-bound; a far-node read would make the CPU slower still)."""
    out = {}
    for name, (link, cores) in PROJECTIONS.items():
        moved = [(n, cpu * threads / cores, nbytes / link, gpu - copy + nbytes / link, nbytes)
                 for n, cpu, copy, gpu, nbytes in samples]
        if moved:
            threshold, detail = rt.AutoThreshold.decide(moved)
            out[name] = {"threshold": threshold, "detail": detail}
    return out


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

    # warm-up (Triton/SDPA selection, allocator, CPU expert buffers): not timed. With the default
    # KTLEGACY_GPU_PREFILL_MIN_TOKENS=auto this first 512-token prompt is also where the engine
    # measures its crossover (three MoE layers timed both ways), as a server's first prompt would.
    from ktransformers import ktlegacy_runtime as rt
    sess = session(512 + 16)
    t0 = time.perf_counter()
    tok = int(sess.prefill(ids[:512]).argmax())
    first_prompt_s = time.perf_counter() - t0
    for _ in range(8):
        tok = int(sess.decode(tok).argmax())
    done(sess)
    if engine == "ktlegacy":  # the GPU experts path too (its kernels JIT from PTX on first use)
        out["gpu_prefill_setting"] = os.environ.get(GPU_PREFILL_ENV, "(default: %s)" % rt.GPU_PREFILL_MIN_TOKENS)
        out["gpu_prefill_calibration"] = {"threshold": rt.AUTO_STATE.threshold, "detail": rt.AUTO_STATE.detail,
                                          "samples_tokens_cpu_copy_gpu_s_bytes": rt.AUTO_STATE.samples,
                                          "first_prompt_s": first_prompt_s}
        log(f"{engine}: auto threshold {rt.AUTO_STATE.threshold} ({rt.AUTO_STATE.detail})")
        sess = session(512 + 16)
        with ExpertsPath(1):
            sess.prefill(ids[:512])
        done(sess)

    def prefill_point(n: int, min_tokens: int | None = None, runs: int | None = None) -> dict | None:
        """``--runs`` prefills of ``n`` tokens: tok/s, the time in KExpertsCPU.forward (the routed
        experts, on whichever path) and how many MoE layers ran them on the GPU / the CPU."""
        rates, experts_s, paths = [], [], set()
        for _ in range(runs or args.runs):
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
        point = prefill_point(n, runs=args.long_runs if n >= LONG else None)
        if point:
            out["prefill"][str(n)] = point
            log(f"{engine} prefill {n}: {point['median']:.1f} tok/s ({[round(r, 1) for r in point['runs']]}); "
                f"experts {[round(s, 2) for s in point['cpu_experts_wait_s']]} s, MoE layers on GPU/CPU "
                f"{point['moe_layers_experts_on_gpu']}/{point['moe_layers_experts_on_cpu']}")

    if engine == "ktlegacy" and not args.skip_extras:
        # both experts paths forced beside the default (auto) at every length: did auto pick the
        # faster one (or one within 10% of it)? Past 512 tokens the paths differ by 2x+: one run each.
        out["experts_path"] = {}
        for n in args.prefill:
            for label, min_tokens in (("cpu", 0), ("gpu", 1)):
                if time.monotonic() > deadline:
                    break
                point = prefill_point(n, min_tokens, runs=args.runs if n <= 512 else 1)
                if point:
                    out["experts_path"].setdefault(label, {})[str(n)] = point
                    log(f"{engine} prefill {n}, experts forced on the {label.upper()}: {point['median']:.1f} tok/s")
        out["gpu_prefill_auto"] = auto_check(out, rt.AUTO_STATE.threshold)
        out["gpu_prefill_auto"]["projected"] = projected_thresholds(rt, rt.AUTO_STATE.samples, args.cpu_infer)
        log(f"{engine} auto: {out['gpu_prefill_auto']}")
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
        if engine == "ktlegacy" and not args.skip_extras and "decode_breakdown" not in out and graph:
            try:
                alone = cpu_experts_alone(sess.model)
                step_ms = 1e3 / graph["median"]
                out["decode_breakdown"] = dict(
                    context=ctx, cuda_graph_step_ms=step_ms, eager_step_ms=1e3 / eager["median"] if eager else None,
                    eager_cpu_experts_wait_ms=(statistics.median(eager["cpu_experts_wait_s"]) * 1e3 / args.decode_tokens
                                               if eager else None),
                    cpu_experts_alone=alone,
                    rest_of_step_ms=step_ms - alone.get("ms_per_token", float("nan")))
                log(f"{engine} decode @{ctx}: step {step_ms:.2f} ms (CUDA graph), CPU experts alone "
                    f"{alone.get('ms_per_token', float('nan')):.2f} ms/token")
            except Exception as exc:
                out["decode_breakdown"] = {"error": f"{type(exc).__name__}: {exc}"}
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
    for var, key in (("PEER_LLAMA_SOURCE_JSON", "llama_cpp_source"), ("PEER_IK_SOURCE_JSON", "ik_llama_cpp_source")):
        src = os.environ.get(var)
        if src and Path(src).is_file():
            env[key] = json.loads(Path(src).read_text())
    env["llama_cpp_cpu_build"] = os.environ.get("PEER_LLAMA_CPU", "native")
    return env


def jit_warmup(args, gguf: Path) -> int:
    """--jit-warmup: every peer configuration once with a 512-token prompt and 4 decode steps after a
    16-token context. Both peers are built as sm75 PTX only, which the driver JIT-compiles for the
    GPU on a binary's first runs (ik_llama.cpp's first 512-token run took over 90 s on the H100);
    later runs read the compiled code from the JIT cache (CUDA_CACHE_MAXSIZE, bench/peer_run.sh)."""
    rc = 0
    for peer, binary in (("llama_cpp", args.llama_bench), ("ik_llama_cpp", args.ik_llama_bench)):
        if peer not in args.engines:
            continue
        ik = peer == "ik_llama_cpp"
        for cfg in (c for c in PEER_CONFIGS if c.peer == peer):
            for cmd in (llama_bench_cmd(binary, gguf, args.threads, 1, prompts=[512], flags=cfg.flags, ik=ik),
                        llama_bench_cmd(binary, gguf, args.threads, 1, depths=[16], n_gen=4, flags=cfg.flags, ik=ik)):
                t0 = time.monotonic()
                proc = subprocess.run(cmd, capture_output=True, text=True)
                log(f"jit warm-up {cfg.key}: exit {proc.returncode} in {time.monotonic() - t0:.1f}s: {shlex.join(cmd)}")
                if proc.returncode != 0:
                    log(proc.stderr[-1500:])
                    rc = 1
    return rc


def main(argv=None) -> int:
    from ktlegacy.testing.peer_model import GGUF_NAME, load_record
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, type=Path, help="make_lite_model output directory")
    p.add_argument("--llama-bench", help="llama-bench binary (needed for the llama_cpp engine)")
    p.add_argument("--ik-llama-bench", help="ik_llama.cpp's llama-bench binary (needed for the ik_llama_cpp engine)")
    p.add_argument("--resume", type=Path, default=None,
                   help="results of an earlier call on this machine (same model, threads and points): its engines "
                        "that this call does not run are kept, so one benchmark can span calls of the device's "
                        "10-minute limit")
    p.add_argument("--out", type=Path, help="the results JSON (required unless --jit-warmup)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for every engine (default: physical cores)")
    p.add_argument("--cpu-infer", type=int, default=None,
                   help="ktlegacy's CPU-expert pool (default: threads - 2, as compose/.env.example advises: its "
                        "CUDA-callback thread and the Python thread take the other two)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--long-runs", type=int, default=None,
                   help=f"runs of prompts of {LONG}+ tokens, every engine (default: --runs; 1 fits the device's calls: "
                        "there the engines differ several-fold)")
    p.add_argument("--prefill", type=int, nargs="+", default=[512, 2048, 8192])
    p.add_argument("--decode-ctx", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    p.add_argument("--triad-mib", type=int, default=1024, help="MiB per triad array (3 arrays)")
    p.add_argument("--deadline-s", type=float, default=None, help="stop starting runs after this many seconds")
    p.add_argument("--skip-extras", action="store_true",
                   help="time only the default paths: no forced experts path, no GPU-vs-CPU logits check, no decode profile")
    p.add_argument("--rules", default=None, help="ktlegacy's rule file (default: gpu_proof's DeepSeek-V2-Lite-Chat.yaml)")
    p.add_argument("--jit-warmup", action="store_true",
                   help="only run each peer configuration once, untimed (a short prompt and a few decode steps), so "
                        "that the driver's JIT cache holds their sm75 PTX compiled before a timed call (no --out)")
    args = p.parse_args(argv)
    if args.runs < 3:
        p.error("--runs must be at least 3 (median with a spread)")
    if args.out is None and not args.jit_warmup:
        p.error("--out FILE is required (the results JSON)")
    args.long_runs = args.long_runs or args.runs
    if args.long_runs < 1:
        p.error("--long-runs must be at least 1")
    try:
        record = load_record(args.model)
    except Exception as exc:
        p.error(str(exc))
    for eng, binary, flag in (("llama_cpp", args.llama_bench, "--llama-bench"),
                              ("ik_llama_cpp", args.ik_llama_bench, "--ik-llama-bench")):
        if eng in args.engines and not (binary and Path(binary).is_file()):
            p.error(f"{flag} BIN is required for the {eng} engine (bench/peer_run.sh builds it)")
    earlier = None
    if args.resume is not None and args.resume.is_file():
        try:
            earlier = json.loads(args.resume.read_text())
        except ValueError as exc:
            p.error(f"--resume {args.resume}: not JSON ({exc})")
    args.threads = args.threads or physical_cores()
    args.cpu_infer = args.cpu_infer or max(1, args.threads - 2)
    if args.jit_warmup:
        return jit_warmup(args, args.model / GGUF_NAME)
    start = time.monotonic()
    deadline = start + args.deadline_s if args.deadline_s else float("inf")
    global PARTIAL_OUT
    args.out.parent.mkdir(parents=True, exist_ok=True)
    PARTIAL_OUT = args.out.with_name(args.out.stem + ".partial.json")
    gguf = args.model / GGUF_NAME
    results: dict = {
        "command": shlex.join(sys.argv), "threads": args.threads, "ktlegacy_cpu_infer": args.cpu_infer, "runs": args.runs,
        "long_runs": {"from_tokens": LONG, "runs": args.long_runs},
        "model": {k: record[k] for k in ("spec", "quant_mix", "file_bytes", "decode_cpu_bytes_per_token")},
        "points": {"prefill": args.prefill, "decode_ctx": args.decode_ctx, "decode_tokens": args.decode_tokens},
    }
    if earlier is not None:
        same = all(earlier.get(k) == results[k] for k in ("threads", "ktlegacy_cpu_infer", "runs", "model", "points"))
        if not same:
            p.error(f"--resume {args.resume}: another model, thread count or set of points; run without it")
        kept = [e for e in ENGINES if e in earlier and e not in args.engines]
        for key in ("bandwidth", "environment", *kept):
            if key in earlier:
                results[key] = earlier[key]
        results["calls"] = earlier.get("calls", [earlier.get("command")])
        log(f"resumed from {args.resume}: kept {kept}")
    phase(results, "environment", lambda: environment(args))
    log(f"threads {args.threads}; model {record['file_bytes'] / 2**30:.2f} GiB; engines {args.engines}")
    if "bandwidth" not in results:
        phase(results, "bandwidth", lambda: triad(args.triad_mib * 2**20 // 8, args.threads))
    if "bandwidth" in results:
        log(f"triad: best {results['bandwidth']['best_gb_s']:.1f} GB/s, median {results['bandwidth']['median_gb_s']:.1f}")
    for peer, binary in (("llama_cpp", args.llama_bench), ("ik_llama_cpp", args.ik_llama_bench)):
        if peer in args.engines:
            phase(results, peer, lambda peer=peer, binary=binary: run_peer(args, peer, binary, gguf, deadline))
    kt = [e for e in args.engines if e not in PEERS]
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
    if earlier is not None:
        results["calls"] = results.get("calls", []) + [results["command"]]
    for key in ("prefill_tok_s", "decode_tok_s", "best_peer", "ratio_vs_best_peer", "decode_fraction_of_bandwidth_limit",
                "gpu_prefill_auto", "targets_met"):
        if key in results:
            log(f"{key}: {json.dumps(results[key])}")
    return 1 if results.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
