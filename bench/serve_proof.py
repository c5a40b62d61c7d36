#!/usr/bin/env python3
"""Serve for real (issue 10): the DeepSeek-V3 rule files on 1 and 2 GPUs, through the server users start.

    KTLEGACY_EMULATE_CC=7.5 python bench/serve_proof.py --work DIR --out results.json [--gpus 1 2] [--api-key KEY]

Runs on a CUDA machine with the patched ktransformers installed (bench/gpu_run.sh does the build
and calls this with KTLEGACY_PROOF=serve). For each GPU count N (1: the ``v100`` profile's
``DeepSeek-V3-Chat.yaml``, 2: the ``2080ti-x2`` profile's ``DeepSeek-V3-Chat-multi-gpu.yaml``):

1. **Engine**: a fresh process with N GPUs visible loads the synthetic DeepSeek-V3 model
   (``invoke make-test-model --preset v3``: 46 layers, so the 2-GPU file puts layers 30-45 on the
   second GPU) with the patched rule file and generates ``--steps`` greedy tokens per prompt
   on the engine's StaticCache; the reference is upstream's own ``DeepseekV3ForCausalLM`` in fp32
   (no cache), and the pass rule is bench/gpu_proof.py's ``judge``. Per-GPU memory is recorded.
2. **Server**: ``compose/serve.sh`` (the profiles' entrypoint) with the environment that profile's
   service gets from compose/compose.yaml (defaults of an empty .env; /models/hf and /models/gguf
   point at the model), N GPUs visible. Driven with the ``openai`` and ``ollama`` packages: every
   call must parse in the client and, greedy, return the engine's tokens for the same prompt
   (text and usage counts). Then bad inputs (malformed JSON, unknown model, a prompt longer than
   ``--cache_lens``, a client that hangs up mid-stream), each followed by a normal request that
   must still match, and 1/4/8 concurrent requests (streamed and not) with time to first token
   and tokens/s. The server process's peak memory per GPU (NVML) is compared with
   ``invoke doctor``'s estimate for that rule file (ktlegacy.vram). With ``--api-key`` the server
   gets ``KTLEGACY_API_KEY`` and every client call sends it (the openai client's ``api_key``, the
   ollama client's ``Authorization`` header); the proof also records that a call without it gets
   401 and that ``/health`` showed the load progress (503 ``loading``) before it answered 200.

**Fewer cards than the rule file's GPUs** (``--gpus 4`` on a 1- or 2-GPU machine): upstream turns
each ``generate_device``/``prefill_device``/``transfer_map`` string into a torch device, so
``cuda:3`` must exist, and CUDA_VISIBLE_DEVICES cannot list one card twice. So the proof serves a
copy of the profile's rule file with every ``cuda:N`` folded onto ``cuda:(N mod cards)``
(:func:`fold_rules`; recorded under ``folded``): the same ops, the same layer split and the same
``transfer_map`` boundaries, where consecutive blocks alternate between the cards (on one card every
transfer is a same-device no-op). What it cannot show is four distinct CUDA devices in one process;
tests/test_serve_start.py keeps serve.sh's start with each profile's unfolded file as the CPU guard.

Every phase records its error instead of aborting the rest; the JSON is rewritten after each.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from ktlegacy.profiles import PROFILES as COMPOSE_PROFILES, with_defaults  # noqa: E402  (compose.yaml's services)

PROMPTS = [
    "Please write a quick sort function in python.",
    "Explain why the turing card has no bf16 tensor core.",
    "Hello world",
    "What is the second expert of the third layer?",
]
# GPU count N -> the profile whose environment (rule file) serves N GPUs (compose.yaml's first of N)
PROFILES = {n: next(p.name for p in COMPOSE_PROFILES.values() if p.gpus == n)
            for n in sorted({p.gpus for p in COMPOSE_PROFILES.values()})}
from ktlegacy.core.facts import SERVER_PORT as PORT  # noqa: E402  serve.sh's port
MAX_TOKENS = 32


def log(msg: str) -> None:
    print(f"[serve_proof {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- the profile's environment

def compose_env(profile: str) -> dict:
    """The environment compose.yaml gives the profile's service with an empty .env: every
    ``${VAR:-default}`` takes its default (what `docker compose config` resolves to)."""
    import yaml
    spec = yaml.safe_load((REPO / "compose" / "compose.yaml").read_text())
    env = spec["services"][profile]["environment"]
    return {k: with_defaults(str(v)) for k, v in env.items()}


def fold_rules(src: Path, dest: Path, cards: int) -> dict:
    """Write ``src`` with every ``cuda:N`` (N >= ``cards``) replaced by ``cuda:(N mod cards)`` to
    ``dest``; return {old: new} for the strings changed. Only whole device strings change."""
    import yaml
    changed = {}

    def fold(node):
        if isinstance(node, dict):
            return {k: fold(v) for k, v in node.items()}
        if isinstance(node, list):
            return [fold(v) for v in node]
        m = re.fullmatch(r"cuda:(\d+)", node) if isinstance(node, str) else None
        if m and int(m[1]) >= cards:
            changed[node] = f"cuda:{int(m[1]) % cards}"
            return changed[node]
        return node
    folded = fold(yaml.safe_load(src.read_text()))
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(f"# {src.name} with its devices folded onto {cards} card(s) by bench/serve_proof.py: "
                    f"{changed}\n" + yaml.safe_dump(folded, sort_keys=False))
    return dict(sorted(changed.items()))


# ---------------------------------------------------------------- GPU memory

class GpuMemory:
    """Peak NVML memory per visible GPU: of one process (its compute-process entry) and of the
    whole device above its idle level."""

    def __init__(self, visible: list[int]):
        import pynvml
        pynvml.nvmlInit()
        self.nvml = pynvml
        self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in visible]
        self.idle = [pynvml.nvmlDeviceGetMemoryInfo(h).used for h in self.handles]
        self.proc_peak = [0] * len(visible)
        self.dev_peak = [0] * len(visible)
        self.pid = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self, pid: int | None):
        self.pid = pid
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.sample()
            time.sleep(0.1)

    def sample(self):
        for i, h in enumerate(self.handles):
            used = self.nvml.nvmlDeviceGetMemoryInfo(h).used
            self.dev_peak[i] = max(self.dev_peak[i], used - self.idle[i])
            for proc in self.nvml.nvmlDeviceGetComputeRunningProcesses(h):
                if proc.pid == self.pid and proc.usedGpuMemory:
                    self.proc_peak[i] = max(self.proc_peak[i], proc.usedGpuMemory)

    def stop(self) -> dict:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        mib = 2 ** 20
        return {f"cuda:{i}": {"process_peak_mib": round(self.proc_peak[i] / mib, 1),
                              "device_peak_above_idle_mib": round(self.dev_peak[i] / mib, 1)}
                for i in range(len(self.handles))}


def doctor_estimate(model_dir: Path, rules_path: Path, cache_lens: int) -> dict:
    from ktlegacy import vram
    est = vram.estimate(vram.read_gguf(model_dir), vram.load_rules(rules_path.read_text()), cache_lens)
    return {d: {"weights_mib": round(est.weights_mib.get(d, 0.0), 1), "kv_cache_mib": round(est.kv_mib.get(d, 0.0), 1),
                "prefill_activations_mib": round(est.prefill_peak_mib(d), 1),
                "runtime_mib": vram.GPU_RUNTIME_MIB, "total_mib": round(est.need_mib(d), 1)}
            for d in est.gpu_devices}


def memory_vs_estimate(estimate: dict, measured: dict) -> dict:
    """Per GPU: the server's NVML peak against the doctor's estimate. The runs use prompts far
    shorter than cache_lens, so the comparison that the run can check leaves the long-prompt
    prefill term out (it is reported, not yet measured); pass: within 20%."""
    out = {}
    for dev, est in estimate.items():
        peak = measured.get(dev, {}).get("process_peak_mib")
        if not peak:
            continue
        exercised = est["total_mib"] - est["prefill_activations_mib"]
        out[dev] = {"measured_peak_mib": peak, "estimate_exercised_mib": round(exercised, 1),
                    "ratio": round(exercised / peak, 3), "within_20_percent": abs(exercised / peak - 1) <= 0.2,
                    "prefill_activations_mib_not_exercised": est["prefill_activations_mib"]}
    return out


# ---------------------------------------------------------------- reference + engine

def reference(model_dir: Path, out: Path, steps: int) -> dict:
    """fp32 greedy tokens and logits of upstream's modeling code, per prompt (cuda:0)."""
    import torch
    from transformers import AutoTokenizer
    import gpu_proof
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ref = gpu_proof.load_reference(model_dir, "cuda:0")
    data = {}
    for p in PROMPTS:
        ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
        tokens, logits = gpu_proof.reference_greedy(ref, ids, steps, "cuda:0")
        routes = gpu_proof.reference_routes(ref, list(ids) + tokens[:-1], "cuda:0")
        data[p] = {"ids": list(ids), "tokens": tokens, "logits": logits, "routes": routes}
    torch.save(data, out)
    del ref
    torch.cuda.empty_cache()
    return {p: {"prompt_tokens": len(v["ids"]), "tokens": v["tokens"]} for p, v in data.items()}


def engine_worker(args) -> int:
    """In a process of its own (N GPUs visible): load the rule file, greedy per prompt, compare."""
    import torch
    import gpu_proof
    ref = torch.load(args.reference, weights_only=False)
    torch.backends.cuda.matmul.allow_tf32 = False
    n = torch.cuda.device_count()
    model, config, dtype, rules = gpu_proof.load_engine(args.model, args.rules)
    model.eval()
    loaded = {f"cuda:{i}": torch.cuda.memory_allocated(i) / 2 ** 20 for i in range(n)}
    out = {"rule_file": str(rules), "dtype": str(dtype), "visible_gpus": n,
           "devices_used": sorted({str(p.device) for p in model.parameters()} |
                                  {str(b.device) for b in model.buffers()}),
           "prompts": {}}
    for p, r in ref.items():
        sess = gpu_proof.EngineSession(model, config, max_len=len(r["ids"]) + args.steps + 64)
        rec = gpu_proof.RouteRecorder(model)
        try:
            cmp = gpu_proof.compare(r["tokens"], r["logits"], *sess.greedy(r["ids"], args.steps))
            cmp["routing"] = gpu_proof.route_diff(r["routes"], rec.routes())
        finally:
            rec.close()
        ok, why = gpu_proof.judge(cmp)
        cmp["verdict"], cmp["pass"] = why, ok
        cmp.pop("logits_step_err", None)
        out["prompts"][p] = cmp
        log(f"engine {n} GPU(s) {p[:30]!r}: {cmp['matched_tokens']}/{args.steps}, max err "
            f"{cmp['logits_max_abs_err']:.4f} -> {why}")
    out["pass"] = all(v["pass"] for v in out["prompts"].values())
    if not out["pass"]:
        failing = next(p for p, v in out["prompts"].items() if not v["pass"])
        out["diagnosis"] = {"prompt": failing, "prefill_rel_diff": layer_diff(model, args.model, ref[failing]["ids"])}
    out["memory_mib"] = {f"cuda:{i}": {"allocated_after_load": round(loaded[f"cuda:{i}"], 1),
                                       "peak_allocated": round(torch.cuda.max_memory_allocated(i) / 2 ** 20, 1),
                                       "peak_reserved": round(torch.cuda.max_memory_reserved(i) / 2 ** 20, 1)}
                         for i in range(n)}
    Path(args.out).write_text(json.dumps(out, indent=2, default=str) + "\n")
    return 0


def layer_diff(model, model_dir: Path, ids: list[int]) -> dict:
    """Where engine and reference part ways: each decoder layer's attention, MLP/MoE and output
    over a prefill of ``ids``, max |engine - reference| relative to the reference's max."""
    import torch
    import gpu_proof
    dtype = torch.get_default_dtype()
    ref = gpu_proof.load_reference(model_dir, "cuda:0")  # sets the default dtype to fp32
    seen: dict = {"eng": {}, "ref": {}}
    handles = []

    def hook(store, name):
        def h(mod, inp, out):
            o = out[0] if isinstance(out, tuple) else out
            store[name] = o.detach().float().reshape(-1, o.shape[-1]).cpu()
        return h
    for tag, m in (("eng", model), ("ref", ref)):
        for i, layer in enumerate(m.model.layers):
            for sub in ("self_attn", "mlp", None):
                mod = getattr(layer, sub) if sub else layer
                handles.append(mod.register_forward_hook(hook(seen[tag], f"{i}.{sub or 'layer'}")))
            if hasattr(layer.mlp, "gate"):
                handles.append(layer.mlp.gate.register_forward_hook(
                    lambda mod, inp, out, s=seen[tag], k=f"{i}.gate_idx": s.__setitem__(k, out[0].sort(-1).values.cpu())))
    try:
        gpu_proof.reference_logits(ref, ids, "cuda:0")
        torch.set_default_dtype(dtype)
        gpu_proof.EngineSession(model, model.config, max_len=len(ids) + 8).prefill(ids)
    finally:
        torch.set_default_dtype(dtype)
        for h in handles:
            h.remove()
    out = {}
    for name, r in seen["ref"].items():
        e = seen["eng"].get(name)
        if e is None:
            out[name] = "not seen in the engine"
        elif name.endswith("gate_idx"):
            out[name] = int((e.reshape(r.shape) != r).any(-1).sum())  # positions routed differently
        else:
            out[name] = round(float((e.reshape(r.shape) - r).abs().max() / r.abs().max().clamp_min(1e-6)), 5)
    del ref
    torch.cuda.empty_cache()
    return out


def run_engine(work: Path, model_dir: Path, n: int, rules: str, steps: int, env: dict) -> dict:
    out = work / f"engine-{n}.json"
    out.unlink(missing_ok=True)
    mem = GpuMemory(list(range(n)))
    proc = subprocess.Popen([sys.executable, __file__, "engine-worker", "--model", str(model_dir), "--rules", rules,
                             "--reference", str(work / "reference.pt"), "--steps", str(steps), "--out", str(out)],
                            env={**env, "CUDA_VISIBLE_DEVICES": ",".join(map(str, range(n)))})
    mem.start(proc.pid)
    rc = proc.wait(timeout=600)
    nvml = mem.stop()
    if rc != 0 or not out.is_file():
        raise RuntimeError(f"engine worker for {n} GPU(s) exited {rc}")
    result = json.loads(out.read_text())
    for dev, m in nvml.items():
        result["memory_mib"].setdefault(dev, {}).update(m)
    return result


# ---------------------------------------------------------------- the server

class Server:
    def __init__(self, work: Path, model_dir: Path, n: int, env: dict, cards: int | None = None,
                 rules: str | None = None, api_key: str | None = None):
        """The profile of ``n`` GPUs on ``cards`` visible cards (default ``n``); ``rules``: a rule
        file (absolute path) instead of the profile's; ``api_key``: KTLEGACY_API_KEY, sent on every call."""
        self.n = cards or n
        self.profile = PROFILES[n]
        self.env_profile = compose_env(self.profile)
        if rules:
            self.env_profile["KTLEGACY_RULES"] = rules
        for link in ("/models/hf", "/models/gguf"):   # the compose mounts, as links
            Path(link).parent.mkdir(parents=True, exist_ok=True)
            if Path(link).is_symlink() or Path(link).exists():
                Path(link).unlink()
            Path(link).symlink_to(model_dir)
        self.env = {**env, **self.env_profile, "CUDA_VISIBLE_DEVICES": ",".join(map(str, range(self.n)))}
        # compose mounts the secret ktlegacy_api_key there (its default source: /dev/null, no key)
        if self.env.get("KTLEGACY_API_KEY_FILE", "").startswith("/run/secrets/"):
            self.env["KTLEGACY_API_KEY_FILE"] = "/dev/null"
        self.key = api_key
        self.auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        if api_key:
            self.env["KTLEGACY_API_KEY"] = api_key
        self.health_seen: list = []
        Path(self.env["KTLEGACY_STATE_DIR"]).mkdir(parents=True, exist_ok=True)
        self.log_path = work / f"server-{n}.log"
        self.base = f"http://127.0.0.1:{PORT}"
        self.proc = None
        self.mem = None

    def start(self, timeout: float = 420):
        import httpx
        self.mem = GpuMemory(list(range(self.n)))
        self.logf = self.log_path.open("w")
        self.proc = subprocess.Popen(["/bin/sh", str(REPO / "compose" / "serve.sh")], env=self.env,
                                     stdout=self.logf, stderr=subprocess.STDOUT, start_new_session=True)
        self.mem.start(self.proc.pid)
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve.sh exited {self.proc.returncode}: {self.tail()}")
            try:
                r = httpx.get(self.base + "/health", timeout=2)  # 503 + progress while loading, no key needed
                if not self.health_seen or self.health_seen[-1][1] != r.json():
                    self.health_seen.append((r.status_code, r.json()))
                if r.status_code == 200:
                    return time.monotonic() - t0
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(1)
        raise RuntimeError(f"the server did not answer /health with 200 within {timeout} s: {self.tail()}")

    def tail(self, n: int = 15) -> str:
        return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> dict:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.logf.close()
        return self.mem.stop() if self.mem else {}


def expected_answers(engine: dict, tok) -> dict:
    """What the server must return greedily for each prompt: the engine's tokens up to EOS."""
    out = {}
    for p, r in engine["prompts"].items():
        toks = []
        for t in r["engine_tokens"][:MAX_TOKENS]:
            if t == tok.eos_token_id:
                break
            toks.append(t)
        out[p] = {"tokens": toks, "text": tok.decode(toks, skip_special_tokens=True, clean_up_tokenization_spaces=False),
                  "finish": "length" if len(toks) == MAX_TOKENS else "stop"}
    return out


def client_checks(srv: Server, name: str, expect: dict, prompt_ids: dict) -> tuple[dict, bool]:
    """Every call of item 3 with the real client packages: name -> "ok" or the error."""
    import ollama
    import openai
    oa = openai.OpenAI(base_url=srv.base + "/v1", api_key=srv.key or "none", max_retries=0, timeout=300)
    ol = ollama.Client(host=srv.base, timeout=300, headers=srv.auth)
    results, match = {}, True

    def check(label, fn):
        nonlocal match
        try:
            fn()
            results[label] = "ok"
        except AssertionError as exc:
            results[label] = f"mismatch: {exc}"
            match = False
        except Exception as exc:  # noqa: BLE001 - a failing call is the finding
            results[label] = f"{type(exc).__name__}: {exc}"
            match = False

    def greedy(p):
        return [{"role": "user", "content": p}]

    def models_list():
        ids = [m.id for m in oa.models.list()]
        assert ids == [name], ids

    def chat(p):
        def run():
            e = expect[p]
            r = oa.chat.completions.create(model=name, messages=greedy(p), temperature=0, max_tokens=MAX_TOKENS)
            assert r.choices[0].message.content == e["text"], (r.choices[0].message.content, e["text"])
            assert r.usage.completion_tokens == len(e["tokens"]), (r.usage.completion_tokens, len(e["tokens"]))
            assert r.usage.prompt_tokens == len(prompt_ids[p]), (r.usage.prompt_tokens, len(prompt_ids[p]))
            assert r.choices[0].finish_reason == e["finish"] and r.object == "chat.completion"
        return run

    def chat_stream(p):
        def run():
            e = expect[p]
            chunks = list(oa.chat.completions.create(model=name, messages=greedy(p), temperature=0,
                                                     max_tokens=MAX_TOKENS, stream=True,
                                                     stream_options={"include_usage": True}))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert text == e["text"], (text, e["text"])
            assert chunks[-1].usage.completion_tokens == len(e["tokens"])
        return run

    def max_tokens_and_stop():
        p = PROMPTS[0]
        e = expect[p]
        r = oa.chat.completions.create(model=name, messages=greedy(p), temperature=0, max_tokens=5)
        want5 = srv.tok.decode(e["tokens"][:5], skip_special_tokens=True, clean_up_tokenization_spaces=False)
        assert r.choices[0].message.content == want5 and r.usage.completion_tokens == min(5, len(e["tokens"]))
        text = e["text"]
        cut = text.strip()[len(text.strip()) // 2:][:3] or text[:1]
        r = oa.chat.completions.create(model=name, messages=greedy(p), temperature=0, max_tokens=MAX_TOKENS, stop=[cut])
        assert r.choices[0].message.content == text[:text.index(cut)], (r.choices[0].message.content, cut)
        assert r.choices[0].finish_reason == "stop"

    def ollama_tags():
        names = [m.model for m in ol.list().models]
        assert names == [name], names

    def ollama_generate(stream):
        def run():
            p = PROMPTS[1]
            e = expect[p]
            opts = {"temperature": 0, "num_predict": MAX_TOKENS}
            if stream:
                parts = list(ol.generate(model=name, prompt=p, stream=True, options=opts))
                text, last = "".join(x.response for x in parts), parts[-1]
            else:
                last = ol.generate(model=name, prompt=p, stream=False, options=opts)
                text = last.response
            assert text == e["text"], (text, e["text"])
            assert last.done and last.eval_count == len(e["tokens"]) and last.prompt_eval_count == len(prompt_ids[p])
        return run

    def ollama_chat(stream):
        def run():
            p = PROMPTS[2]
            e = expect[p]
            opts = {"temperature": 0, "num_predict": MAX_TOKENS}
            if stream:
                parts = list(ol.chat(model=name, messages=greedy(p), stream=True, options=opts))
                text, last = "".join(x.message.content for x in parts), parts[-1]
            else:
                last = ol.chat(model=name, messages=greedy(p), stream=False, options=opts)
                text = last.message.content
            assert text == e["text"], (text, e["text"])
            assert last.done and last.eval_count == len(e["tokens"])
        return run

    check("openai.models.list", models_list)
    for i, p in enumerate(PROMPTS):
        check(f"openai.chat.completions[{i}]", chat(p))
    check("openai.chat.completions.stream", chat_stream(PROMPTS[3]))
    check("openai.chat.completions.max_tokens_stop", max_tokens_and_stop)
    check("ollama.list (/api/tags)", ollama_tags)
    check("ollama.generate (/api/generate)", ollama_generate(False))
    check("ollama.generate.stream", ollama_generate(True))
    check("ollama.chat (/api/chat)", ollama_chat(False))
    check("ollama.chat.stream", ollama_chat(True))
    return results, match


def greedy_ok(srv: Server, name: str, expect: dict) -> bool:
    import httpx
    p = PROMPTS[0]
    r = httpx.post(srv.base + "/v1/chat/completions", timeout=300, headers=srv.auth, json={
        "model": name, "messages": [{"role": "user", "content": p}], "temperature": 0, "max_tokens": MAX_TOKENS})
    return r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == expect[p]["text"]


def bad_inputs(srv: Server, name: str, expect: dict, cache_lens: int) -> dict:
    import httpx
    out = {}
    url = srv.base + "/v1/chat/completions"
    long_prompt = "the quick brown fox " * (cache_lens // 2 + 100)
    cases = {
        "malformed_json": lambda: httpx.post(url, content='{"model": "x", "messages": [',
                                             headers={"content-type": "application/json", **srv.auth}, timeout=60),
        "unknown_model": lambda: httpx.post(url, json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
                                            headers=srv.auth, timeout=60),
        "prompt_longer_than_cache_lens": lambda: httpx.post(url, json={"model": name, "messages": [
            {"role": "user", "content": long_prompt}]}, headers=srv.auth, timeout=120),
        "ollama_unknown_model": lambda: httpx.post(srv.base + "/api/chat", json={
            "model": "llama3", "messages": [{"role": "user", "content": "hi"}]}, headers=srv.auth, timeout=60),
    }
    if srv.key:  # with a key set, nothing but /health answers without it
        cases["no_api_key_openai"] = lambda: httpx.post(url, json={"model": name, "messages": [
            {"role": "user", "content": "hi"}]}, timeout=60)
        cases["no_api_key_ollama"] = lambda: httpx.get(srv.base + "/api/tags", timeout=60)
    for case, call in cases.items():
        try:
            r = call()
            body = r.json()
            err = body.get("error")
            msg = err if isinstance(err, str) else (err or {}).get("message")
            out[case] = {"status": r.status_code, "error": msg, "next_request_matches": greedy_ok(srv, name, expect)}
        except Exception as exc:  # noqa: BLE001
            out[case] = {"status": None, "error": f"{type(exc).__name__}: {exc}",
                         "next_request_matches": greedy_ok(srv, name, expect)}
    # a client that hangs up after the first token: the server logs the cancellation and goes on
    before = srv.log_path.read_text(errors="replace").count("finish cancelled")
    try:
        with httpx.stream("POST", url, timeout=120, headers=srv.auth, json={
                "model": name, "messages": [{"role": "user", "content": PROMPTS[1]}], "max_tokens": 1000,
                "temperature": 0.7, "stream": True}) as r:
            for line in r.iter_lines():
                if '"content"' in line and '"role"' not in line:
                    break
        deadline = time.monotonic() + 30
        while (srv.log_path.read_text(errors="replace").count("finish cancelled") == before
               and time.monotonic() < deadline):
            time.sleep(0.2)
        cancelled = srv.log_path.read_text(errors="replace").count("finish cancelled") > before
        out["client_disconnects_mid_stream"] = {"status": r.status_code, "cancelled_in_server": cancelled,
                                                "next_request_matches": greedy_ok(srv, name, expect)}
    except Exception as exc:  # noqa: BLE001
        out["client_disconnects_mid_stream"] = {"status": None, "error": f"{type(exc).__name__}: {exc}",
                                                "next_request_matches": greedy_ok(srv, name, expect)}
    return out


def concurrency(srv: Server, name: str, expect: dict, levels=(1, 4, 8)) -> dict:
    import openai
    oa = openai.OpenAI(base_url=srv.base + "/v1", api_key=srv.key or "none", max_retries=0, timeout=600)
    out = {}
    for level in levels:
        def one(i):
            p = PROMPTS[i % len(PROMPTS)]
            t0 = time.monotonic()
            if i % 2 == 0:   # streamed: time to first token from the first content chunk
                first, text, usage = None, "", None
                for c in oa.chat.completions.create(model=name, messages=[{"role": "user", "content": p}],
                                                    temperature=0, max_tokens=MAX_TOKENS, stream=True,
                                                    stream_options={"include_usage": True}):
                    if c.choices and c.choices[0].delta.content:
                        first = first or time.monotonic()
                        text += c.choices[0].delta.content
                    if c.usage:
                        usage = c.usage
                n_tok = usage.completion_tokens
            else:            # not streamed: the whole answer at once
                r = oa.chat.completions.create(model=name, messages=[{"role": "user", "content": p}],
                                               temperature=0, max_tokens=MAX_TOKENS)
                first, text, n_tok = None, r.choices[0].message.content, r.usage.completion_tokens
            t1 = time.monotonic()
            return {"streamed": i % 2 == 0, "ttft_s": (first - t0) if first else None, "latency_s": t1 - t0,
                    "tokens": n_tok, "decode_tok_s": ((n_tok - 1) / (t1 - first)) if first and n_tok > 1 else None,
                    "matches": text == expect[p]["text"]}
        t0 = time.monotonic()
        with ThreadPoolExecutor(level) as pool:
            reqs = list(pool.map(one, range(level)))
        wall = time.monotonic() - t0
        ttft = [r["ttft_s"] for r in reqs if r["ttft_s"] is not None]
        dec = [r["decode_tok_s"] for r in reqs if r["decode_tok_s"]]
        out[str(level)] = {
            "requests": level, "wall_s": round(wall, 3), "all_match": all(r["matches"] for r in reqs),
            "aggregate_tok_s": round(sum(r["tokens"] for r in reqs) / wall, 2),
            "ttft_s": {"median": round(statistics.median(ttft), 3), "max": round(max(ttft), 3)} if ttft else None,
            "per_request_decode_tok_s": {"median": round(statistics.median(dec), 2)} if dec else None,
            "latency_s": {"median": round(statistics.median(r["latency_s"] for r in reqs), 3),
                          "max": round(max(r["latency_s"] for r in reqs), 3)},
        }
        log(f"concurrency {level}: {out[str(level)]}")
    return out


# ---------------------------------------------------------------- main

def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "engine-worker":
        w = argparse.ArgumentParser()
        for a in ("--model", "--rules", "--reference", "--out"):
            w.add_argument(a, required=True)
        w.add_argument("--steps", type=int, required=True)
        args = w.parse_args(sys.argv[2:])
        args.model = Path(args.model)
        return engine_worker(args)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True, type=Path, help="scratch directory (model, logs)")
    p.add_argument("--out", required=True, type=Path, help="results JSON")
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 2], choices=sorted(PROFILES),
                   help="GPU counts to prove: " + ", ".join(f"{n} ({PROFILES[n]}{' profile' if i == 0 else ''})"
                                                            for i, n in enumerate(sorted(PROFILES)))
                        + "; on fewer cards the rule file's devices are folded onto them (see the module's doc)")
    p.add_argument("--steps", type=int, default=32, help="greedy steps per prompt (>= 32)")
    p.add_argument("--skip", nargs="*", default=[], help="phases to skip: serve concurrency")
    p.add_argument("--api-key", default=os.environ.get("KTLEGACY_PROOF_API_KEY"),
                   help="serve with KTLEGACY_API_KEY=KEY and send it on every call (default: $KTLEGACY_PROOF_API_KEY)")
    args = p.parse_args(argv)
    import torch
    cards = torch.cuda.device_count()
    if cards == 0:
        n = max(args.gpus)
        print(f"error: --gpus {n} proves the {PROFILES[n]} profile's rule file on {n} GPUs, but no CUDA GPU is "
              f"visible: run it on a machine with 1 to {n} GPUs (fewer than {n}: the rule file's devices are "
              "folded onto them)", file=sys.stderr)
        return 2
    args.work.mkdir(parents=True, exist_ok=True)
    results: dict = {"command": " ".join(sys.argv), "device": torch.cuda.get_device_name(0),
                     "emulated_cc": os.environ.get("KTLEGACY_EMULATE_CC"),
                     "arch_list": os.environ.get("KTLEGACY_ARCH_LIST", ""),
                     "serve_token_match": {}, "engine_token_match_v3": {}, "clients": {}, "bad_inputs": {},
                     "concurrency": {}, "per_gpu_peak_mib": {}, "doctor_estimate_mib": {}, "folded": {},
                     "errors": {}}

    def save():
        args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")

    def phase(name, fn):
        t0 = time.monotonic()
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - a phase's failure is a finding
            traceback.print_exc()
            results["errors"][name] = f"{type(exc).__name__}: {exc}"
        finally:
            log(f"{name}: {time.monotonic() - t0:.1f}s")
            save()

    model_dir = args.work / "model-v3"
    from dataclasses import asdict
    from ktlegacy.testing.testmodel import SPEC_NAME, preset
    record = model_dir / SPEC_NAME
    if not record.is_file() or json.loads(record.read_text())["spec"] != json.loads(json.dumps(asdict(preset("v3")))):
        subprocess.run([sys.executable, "-m", "ktlegacy", "make-test-model", "--preset", "v3", "--dest",
                        str(model_dir), "--force"], check=True, cwd=REPO)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    results["model"] = json.loads((model_dir / "config.json").read_text())
    ref = phase("reference", lambda: reference(model_dir, args.work / "reference.pt", args.steps))
    if ref is None:
        return 1
    prompt_ids = {p: tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
                  for p in PROMPTS}
    import ktransformers
    rules_dir = Path(ktransformers.__file__).parent / "optimize" / "optimize_rules"
    env = dict(os.environ)
    for n in args.gpus:
        key = f"gpus{n}"
        profile_env = compose_env(PROFILES[n])
        rules = profile_env["KTLEGACY_RULES"]
        cache_lens = int(profile_env["KTLEGACY_CACHE_LENS"])
        used = min(n, cards)
        rules_path = rules_dir / rules
        if used < n:   # the rule file's GPUs folded onto the cards there are
            rules_path = args.work / f"folded-{used}" / rules
            results["folded"][key] = {"cards": used, "rule_file": str(rules_path),
                                      "devices": fold_rules(rules_dir / rules, rules_path, used)}
            log(f"{rules} on {used} card(s): {results['folded'][key]['devices']}")
        results["doctor_estimate_mib"][key] = phase(f"doctor_{key}",
                                                    lambda: doctor_estimate(model_dir, rules_path, cache_lens))
        eng = phase(f"engine_{key}", lambda: run_engine(args.work, model_dir, used, str(rules_path), args.steps, env))
        results.setdefault("engine", {})[key] = eng
        results["engine_token_match_v3"][key] = bool(eng and eng["pass"])
        if not eng or "serve" in args.skip:
            continue
        expect = expected_answers(eng, tok)
        srv = Server(args.work, model_dir, n, env, cards=used, rules=str(rules_path) if used < n else None,
                     api_key=args.api_key)
        srv.tok = tok
        name = srv.env_profile["KTLEGACY_MODEL_NAME"]
        results.setdefault("server", {})[key] = {"profile": srv.profile, "rules": srv.env_profile["KTLEGACY_RULES"],
                                                 "environment": srv.env_profile, "api_key": bool(args.api_key)}
        try:
            load_s = phase(f"server_start_{key}", srv.start)
            results["server"][key]["load_s"] = load_s
            if load_s is not None:
                checked = phase(f"clients_{key}", lambda: client_checks(srv, name, expect, prompt_ids))
                if checked:
                    results["clients"][key], results["serve_token_match"][key] = checked
                results["bad_inputs"][key] = phase(f"bad_inputs_{key}", lambda: bad_inputs(srv, name, expect, cache_lens))
                if "concurrency" not in args.skip:
                    results["concurrency"][key] = phase(f"concurrency_{key}", lambda: concurrency(srv, name, expect))
        finally:
            results["per_gpu_peak_mib"][key] = srv.stop()
            results["server"][key]["log_tail"] = srv.tail(40)
            results["server"][key]["health_seen"] = srv.health_seen[:3] + srv.health_seen[-2:]
            if results["doctor_estimate_mib"].get(key):
                results.setdefault("memory_vs_doctor", {})[key] = memory_vs_estimate(
                    results["doctor_estimate_mib"][key], results["per_gpu_peak_mib"][key])
            save()
        results["serve_token_match"].setdefault(key, False)
    results["pass"] = (all(results["engine_token_match_v3"].get(f"gpus{n}") for n in args.gpus)
                       and all(results["serve_token_match"].get(f"gpus{n}") for n in args.gpus)
                       and not results["errors"])
    save()
    log(f"wrote {args.out}: pass={results['pass']} errors={list(results['errors'])}")
    return 0 if results["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
