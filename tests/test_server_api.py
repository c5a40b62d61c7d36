"""overlays/80_server_api.py: upstream's server answers the real ``openai`` and ``ollama`` clients.

Two parts:

* the overlay on the real 0.2.1.post1 sdist: upstream's chat/completion/model/Ollama routers are
  unmounted, ``main.py`` mounts ``ktlegacy_api`` first, ``logits_to_token`` asks the request's
  sampler; a second patch is a no-op; drift is refused with the tree untouched;
* the API live, on CPU: the patched tree's ``ktlegacy_api`` in front of upstream's own
  ``TransformersInterface`` (the Hugging Face backend that ``KTransformersInterface``, the GPU
  backend, subclasses; tests/server_api_app.py) with a small random Llama, in a venv with
  0.2.1.post1's requirements, driven by the real client packages. Greedy answers must equal an
  fp32 no-cache reference's tokens; bad requests get clear HTTP errors and the server keeps
  serving. The same API on the GPU backend: bench/serve_proof.py.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

import hostile_cases
import server_harness
from ktlegacy.core.arch import get_arch
from ktlegacy.core.overlay import Drift, load_overlays, patch_tree
from ktlegacy.core.refs import get_ref

REPO = Path(__file__).resolve().parent.parent
APP = server_harness.APP
NAME = "ktlegacy-test"
CACHE_LENS = 256
MAX_NEW = 200
TOKEN_DELAY = 0.02  # s per decode step (see server_api_app.py)
LOAD_DELAY = 0.1    # s per GGUF tensor at start-up: /health shows the load progress for ~2 s
KEYS = ("test-key-0123456789", "second-key-9876543210")


# ---------------------------------------------------------------- the overlay

def _server_api():
    return [(o, p) for o, p in load_overlays() if o.name in ("runtime", "server-api")]


def test_overlay_edits_and_is_idempotent(pristine_tree):
    lines = []
    patch_tree(pristine_tree, get_arch("sm75"), overlays=_server_api(), out=lines.append)
    api = pristine_tree / "ktransformers" / "server" / "api"
    assert (api / "ktlegacy_api.py").read_text() == (REPO / "overlays" / "server_api" / "ktlegacy_api.py").read_text()
    top = (api / "__init__.py").read_text()
    assert not re.search(r"^router\.include_router\(ollama_router\)", top, re.M)
    assert re.search(r"^router\.include_router\(openai_router\)", top, re.M)  # its assistants part: below
    assert not re.search(r"^router\.include_router\(web_router\)", top, re.M)  # /system-info only raised
    openai = (api / "openai" / "__init__.py").read_text()
    assert not re.search(r"^router\.include_router\((chat|legacy)_router\)", openai, re.M)
    # the assistants/threads/runs API: only when a setting asks for it
    assert not re.search(r"^router\.include_router\(assistants_router\)", openai, re.M)
    assert re.search(r"^if _ktlegacy_api\.assistants_enabled\(\):.*\n    router\.include_router\(assistants_router\)",
                     openai, re.M)
    main = (pristine_tree / "ktransformers" / "server" / "main.py").read_text()
    assert main.index("ktlegacy_api.install(mount_app)") < main.index("mount_app.include_router(router)")
    assert "allow_origins" not in main and "CORSMiddleware,\n" not in main  # upstream's CORS for any origin
    load = main.index("ktlegacy_api.load_in_background(lambda: create_interface(config=cfg, default_args=cfg))")
    assert load < main.index("    run_api(") and "\n    create_interface(config=cfg" not in main
    args = (pristine_tree / "ktransformers" / "server" / "args.py").read_text()
    assert "type=bool," not in args and args.count("type=_ktlegacy_bool,") == 18
    gguf = (pristine_tree / "ktransformers" / "util" / "custom_gguf.py").read_text()
    body = gguf.split("    def get_mmap_tensor(self, name):\n", 1)[1]
    assert body.lstrip().startswith('hook = getattr(GGUFLoader, "ktlegacy_on_tensor", None)')
    sampler = (pristine_tree / "ktransformers/server/backend/interfaces/transformers.py").read_text()
    body = sampler.split("def logits_to_token(self, logits: torch.Tensor):\n", 1)[1]
    assert body.lstrip().startswith('sampler = getattr(self, "ktlegacy_sampler", None)')
    assert any(line.startswith("server-api: changed") for line in lines)
    snapshot = {p: p.read_bytes() for p in pristine_tree.rglob("*.py")}
    again = []
    patch_tree(pristine_tree, get_arch("sm75"), overlays=_server_api(), out=again.append)
    assert "server-api: already applied, nothing to change" in again
    assert {p: p.read_bytes() for p in pristine_tree.rglob("*.py")} == snapshot


def test_overlay_refuses_drift_and_leaves_the_tree(pristine_tree):
    target = pristine_tree / "ktransformers" / "server" / "main.py"
    target.write_text(target.read_text().replace("mount_app.include_router(router)", "mount_app.include_router(api)"))
    before = {p: p.read_bytes() for p in pristine_tree.rglob("*") if p.is_file()}
    with pytest.raises(Drift) as exc:  # the set forced: content identity alone already refuses an edited tree
        patch_tree(pristine_tree, get_arch("sm75"), ref=get_ref("0.2.1.post1"), overlays=_server_api(),
                   out=lambda line: None)
    assert "overlay server-api: ktransformers/server/main.py: expected" in str(exc.value)
    assert "\n" not in str(exc.value)
    assert {p: p.read_bytes() for p in pristine_tree.rglob("*") if p.is_file()} == before


# ---------------------------------------------------------------- the API, live on CPU

@pytest.fixture(scope="module")
def api_python():
    return server_harness.api_python()


@pytest.fixture(scope="module")
def served(api_python, sdist_tree, tmp_path_factory):
    """A patched tree and the two test models (the test chat template; DeepSeek-V3's, with tools)."""
    return server_harness.prepare(tmp_path_factory.mktemp("server-api"), api_python, sdist_tree)


def _start(served, label: str, model: Path, settings: dict, *args: str) -> dict:
    try:
        return server_harness.start(served, label, model, settings, *args, name=NAME)
    except server_harness.HarnessError as exc:
        pytest.fail(str(exc))


_stop = server_harness.stop


@pytest.fixture(scope="module")
def live(served):
    """The test model behind two API keys, default settings otherwise (no CORS origin, 4 MiB bodies)."""
    model = served["models"]["default"]
    server = _start(served, "default", model, {"KTLEGACY_API_KEY": f"{KEYS[0]}, {KEYS[1]}", "KTLEGACY_LOAD_LOG_S": "0.3"},
                    "--cache-lens", str(CACHE_LENS), "--max-new-tokens", str(MAX_NEW),
                    "--token-delay", str(TOKEN_DELAY), "--load-delay", str(LOAD_DELAY))
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(model))

    def ref(ids, max_tokens):
        out = subprocess.run([str(served["python"]), str(APP), "reference", "--model", str(model), "--requests",
                              json.dumps([{"ids": ids, "max_tokens": max_tokens}])],
                             capture_output=True, text=True, env=served["env"], timeout=600, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])[0]

    yield {**server, "tok": tok, "ref": ref, "key": KEYS[0], "auth": {"Authorization": f"Bearer {KEYS[0]}"}}
    _stop(server)


def _chat_ids(live, text):
    return live["tok"].apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)


def _text(live, tokens):
    return live["tok"].decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)


@pytest.fixture(scope="module")
def expected(live):
    """Reference answers for the prompts the client tests use."""
    prompt = "Please write a quick sort function in python."
    chat = live["ref"](_chat_ids(live, prompt), 16)
    raw = live["ref"](live["tok"].encode("the quick brown fox"), 12)
    assert len(chat) >= 4, "the reference answer is too short to test max_tokens and stop"
    return {"prompt": prompt, "chat": chat, "raw": raw}


def test_openai_client(live, expected):
    import openai
    client = openai.OpenAI(base_url=live["base"] + "/v1", api_key=live["key"], max_retries=0)
    assert [m.id for m in client.models.list()] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    msgs = [{"role": "user", "content": expected["prompt"]}]
    want = _text(live, expected["chat"])
    r = client.chat.completions.create(model=NAME, messages=msgs, temperature=0, max_tokens=16)
    assert r.object == "chat.completion" and r.choices[0].message.content == want
    assert r.choices[0].finish_reason == ("length" if len(expected["chat"]) == 16 else "stop")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(_chat_ids(live, expected["prompt"])),
                                                                   len(expected["chat"]))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    chunks = list(client.chat.completions.create(model=NAME, messages=msgs, temperature=0, max_tokens=16,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].usage.completion_tokens == len(expected["chat"])
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason
    # max_tokens counts tokens; stop cuts the text before the stop string
    short = client.chat.completions.create(model=NAME, messages=msgs, temperature=0, max_tokens=3)
    assert short.choices[0].message.content == _text(live, expected["chat"][:3])
    assert (short.usage.completion_tokens, short.choices[0].finish_reason) == (3, "length")
    cut = want[len(want) // 2:len(want) // 2 + 2]
    stopped = client.chat.completions.create(model=NAME, messages=msgs, temperature=0, max_tokens=16, stop=[cut])
    assert stopped.choices[0].message.content == want[:want.index(cut)]
    assert stopped.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=NAME, messages=msgs, temperature=0, max_tokens=16, stop=cut, stream=True) if c.choices)
    assert streamed == want[:want.index(cut)]
    # legacy completions: the raw prompt, no template
    c = client.completions.create(model=NAME, prompt="the quick brown fox", temperature=0, max_tokens=12)
    assert c.choices[0].text == _text(live, expected["raw"]) and c.usage.completion_tokens == len(expected["raw"])
    # sampling with a seed is reproducible and differs from greedy somewhere over a few tries
    a = client.chat.completions.create(model=NAME, messages=msgs, temperature=1.5, seed=7, max_tokens=16)
    b = client.chat.completions.create(model=NAME, messages=msgs, temperature=1.5, seed=7, max_tokens=16)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_ollama_client(live, expected):
    import ollama
    client = ollama.Client(host=live["base"], headers=live["auth"])
    listed = client.list()
    assert [m.model for m in listed.models] == [NAME] and listed.models[0].modified_at is not None
    assert client.show(NAME).template
    want = _text(live, expected["chat"])
    g = client.generate(model=NAME, prompt=expected["prompt"], stream=False, options={"temperature": 0, "num_predict": 16})
    assert g.response == want and g.done and g.eval_count == len(expected["chat"])
    assert g.prompt_eval_count == len(_chat_ids(live, expected["prompt"]))
    parts = list(client.generate(model=NAME, prompt=expected["prompt"], stream=True,
                                 options={"temperature": 0, "num_predict": 16}))
    assert "".join(p.response for p in parts) == want and parts[-1].done and not any(p.done for p in parts[:-1])
    msgs = [{"role": "user", "content": expected["prompt"]}]
    c = client.chat(model=NAME, messages=msgs, stream=False, options={"temperature": 0, "num_predict": 16})
    assert c.message.role == "assistant" and c.message.content == want
    parts = list(client.chat(model=NAME, messages=msgs, stream=True, options={"temperature": 0, "num_predict": 16}))
    assert "".join(p.message.content for p in parts) == want and parts[-1].done
    raw = client.generate(model=NAME, prompt="the quick brown fox", raw=True, stream=False,
                          options={"temperature": 0, "num_predict": 12})
    assert raw.response == _text(live, expected["raw"])
    assert [m.model for m in client.ps().models] == [NAME]


def _ok_after(live, expected, max_tokens=4):
    """A normal greedy request still returns the reference answer (its first ``max_tokens`` tokens)."""
    r = httpx.post(live["base"] + "/v1/chat/completions", timeout=120, headers=live["auth"], json={
        "model": NAME, "messages": [{"role": "user", "content": expected["prompt"]}], "temperature": 0,
        "max_tokens": max_tokens})
    return r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == _text(live, expected["chat"][:max_tokens])


@pytest.mark.parametrize("case", hostile_cases.all_cases(), ids=lambda c: c.name)
def test_hostile_requests(live, expected, case):
    """Each case gets a clear 4xx in the API's shape, or the documented 200; the server keeps serving."""
    out = hostile_cases.run_case(live["base"], live["key"], case)
    assert out.problems == [], out.problems
    assert _ok_after(live, expected), "the reference answer did not come back after this case"


def test_client_errors_raise_in_the_clients(live):
    import ollama
    import openai
    client = openai.OpenAI(base_url=live["base"] + "/v1", api_key=live["key"], max_retries=0)
    with pytest.raises(openai.NotFoundError, match="not served"):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="context_length_exceeded|KV cache"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "fox " * CACHE_LENS}])
    with pytest.raises(ollama.ResponseError) as exc:
        ollama.Client(host=live["base"], headers=live["auth"]).chat(model="llama3", messages=[{"role": "user", "content": "hi"}])
    assert exc.value.status_code == 404


def test_concurrent_requests_queue_and_all_answer(live, expected):
    want = _text(live, expected["chat"])
    results, errors = [], []

    def one(i):
        try:
            body = {"model": NAME, "messages": [{"role": "user", "content": expected["prompt"]}],
                    "temperature": 0, "max_tokens": 16, "stream": bool(i % 2)}
            if i % 2:
                with httpx.stream("POST", live["base"] + "/v1/chat/completions", json=body, timeout=300,
                                  headers=live["auth"]) as r:
                    text = ""
                    for line in r.iter_lines():
                        if line.startswith("data: ") and line != "data: [DONE]":
                            choices = json.loads(line[6:])["choices"]
                            text += (choices[0]["delta"].get("content") or "") if choices else ""
                results.append(text)
            else:
                r = httpx.post(live["base"] + "/v1/chat/completions", json=body, timeout=300, headers=live["auth"])
                results.append(r.json()["choices"][0]["message"]["content"])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    # the event loop stays free while the engine works: the model list answers at once
    t0 = time.monotonic()
    assert httpx.get(live["base"] + "/v1/models", timeout=10, headers=live["auth"]).status_code == 200
    assert time.monotonic() - t0 < 5
    for t in threads:
        t.join(timeout=600)
    assert errors == [] and results == [want] * 6


def test_disconnect_mid_stream_cancels_and_the_next_request_matches(live, expected):
    body = {"model": NAME, "messages": [{"role": "user", "content": expected["prompt"]}], "temperature": 0.8,
            "max_tokens": MAX_NEW, "stream": True}
    before = live["log"].read_text().count("finish cancelled")
    with httpx.stream("POST", live["base"] + "/v1/chat/completions", json=body, timeout=60, headers=live["auth"]) as r:
        for line in r.iter_lines():
            if '"content"' in line and '"role"' not in line:
                break  # one token arrived: hang up
    deadline = time.monotonic() + 60
    while live["log"].read_text().count("finish cancelled") == before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert live["log"].read_text().count("finish cancelled") == before + 1
    assert _ok_after(live, expected)


# ---------------------------------------------------------------- hardening (issue 25)

def test_patched_flags_parse_real_booleans(served):
    """Upstream's argparse type=bool made --web_cross_domain False (any text) True."""
    script = ("import sys; from ktransformers.server.config.config import Config; "
              "from ktransformers.server.args import ArgumentParser; "
              "sys.argv = ['x', '--web_cross_domain', sys.argv[1], '--web', 'True']; "
              "a = ArgumentParser(Config()).parse_args(); print(a.web_cross_domain, a.web)")
    env = {**served["env"], "PYTHONPATH": str(served["tree"])}
    for text, want in (("False", "False True"), ("0", "False True"), ("true", "True True")):
        out = subprocess.run([str(served["python"]), "-c", script, text], capture_output=True, text=True, env=env,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip().splitlines()[-1] == want
    bad = subprocess.run([str(served["python"]), "-c", script, "maybe"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert bad.returncode == 2 and "expected True or False, got 'maybe'" in bad.stderr


@pytest.mark.parametrize("setting, value, message", [
    ("KTLEGACY_MAX_BODY_BYTES", "4MB", "KTLEGACY_MAX_BODY_BYTES='4MB': expected a whole number"),
    ("KTLEGACY_API_KEY_FILE", "/nonexistent/key", "KTLEGACY_API_KEY_FILE='/nonexistent/key' cannot be read"),
    ("KTLEGACY_API_KEY", "short", "a key must be 8 or more printable ASCII characters"),
    ("KTLEGACY_CORS_ORIGINS", "evil.example/path", "is not an origin"),
])
def test_a_bad_setting_stops_the_server_in_one_line(served, setting, value, message):
    proc = subprocess.run([str(served["python"]), str(APP), "serve", "--tree", str(served["tree"]), "--model",
                           str(served["models"]["default"]), "--port", "9"], capture_output=True, text=True,
                          env={**served["env"], setting: value}, timeout=300)
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("ktlegacy api: error: ") and message in line, proc.stderr[-2000:]


def test_health_shows_the_load_progress(live):
    """While the GGUF loads: 503 {"status": "loading", "progress": ...} rising; then 200 {"status": "ok"}."""
    seen = live["health_seen"]
    loading = [body for status, body in seen if status == 503]
    assert seen[-1] == (200, {"status": "ok", "model": NAME})
    assert all(b["status"] == "loading" for b in loading)
    progress = [b["progress"] for b in loading]
    assert any(0 < p < 1 for p in progress), progress
    assert progress == sorted(progress) and loading[-1]["total_gib"] > 0
    log = live["log"].read_text()
    lines = [line for line in log.splitlines() if "ktlegacy load: " in line]
    assert any(re.search(r"\d+\.\d% of the GGUF, [\d.]+ of [\d.]+ MiB, [\d.]+ MiB/s, ETA", line) for line in lines)
    assert any("ktlegacy load: done in" in line for line in lines)
    # with a key set, /health alone answers without it
    assert httpx.get(live["base"] + "/health", timeout=10).status_code == 200
    assert httpx.get(live["base"] + "/v1/models", timeout=10).status_code == 401


def test_keys_with_each_client(live, expected):
    import ollama
    import openai
    msgs = [{"role": "user", "content": expected["prompt"]}]
    want = _text(live, expected["chat"][:4])
    for key in KEYS:  # either key of KTLEGACY_API_KEY
        client = openai.OpenAI(base_url=live["base"] + "/v1", api_key=key, max_retries=0)
        r = client.chat.completions.create(model=NAME, messages=msgs, temperature=0, max_tokens=4)
        assert r.choices[0].message.content == want
    bad = openai.OpenAI(base_url=live["base"] + "/v1", api_key="not-a-key-of-this-server", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="invalid API key"):
        bad.chat.completions.create(model=NAME, messages=msgs, max_tokens=4)
    with pytest.raises(openai.AuthenticationError):
        list(bad.chat.completions.create(model=NAME, messages=msgs, max_tokens=4, stream=True))
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    good = ollama.Client(host=live["base"], headers={"Authorization": f"Bearer {KEYS[1]}"})
    assert "".join(p.message.content for p in good.chat(model=NAME, messages=msgs, stream=True, options={
        "temperature": 0, "num_predict": 4})) == want
    for client in (ollama.Client(host=live["base"]),
                   ollama.Client(host=live["base"], headers={"Authorization": "Bearer not-a-key-of-this-server"})):
        for call in (lambda c: c.list(), lambda c: list(c.generate(model=NAME, prompt="hi", stream=True))):
            with pytest.raises(ollama.ResponseError) as exc:
                call(client)
            assert exc.value.status_code == 401
    # curl, as Ollama's documentation sends it (-d: form content type)
    body = json.dumps({"model": NAME, "prompt": expected["prompt"], "stream": False,
                       "options": {"temperature": 0, "num_predict": 4}})
    ok = subprocess.run(["curl", "-s", "-w", "\n%{http_code}", "-H", f"Authorization: Bearer {KEYS[0]}",
                         live["base"] + "/api/generate", "-d", body], capture_output=True, text=True, timeout=60)
    text, status = ok.stdout.rsplit("\n", 1)
    assert status == "200" and json.loads(text)["response"] == want
    no = subprocess.run(["curl", "-s", "-w", "\n%{http_code}", live["base"] + "/api/generate", "-d", body],
                        capture_output=True, text=True, timeout=60)
    text, status = no.stdout.rsplit("\n", 1)
    assert status == "401" and "API key" in json.loads(text)["error"]


def _metrics(base: str, headers: dict) -> dict:
    from prometheus_client.parser import text_string_to_metric_families
    r = httpx.get(base + "/metrics", headers=headers, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(r.text)}


def _sample(families: dict, family: str, name: str, **labels) -> float:
    return sum(s.value for s in families[family].samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_metrics_and_the_request_log(live, expected):
    before = _metrics(live["base"], live["auth"])
    assert _ok_after(live, expected)
    after = _metrics(live["base"], live["auth"])
    route = {"route": "/v1/chat/completions", "status": "200"}
    assert _sample(after, "ktlegacy_requests", "ktlegacy_requests_total", **route) == \
        _sample(before, "ktlegacy_requests", "ktlegacy_requests_total", **route) + 1
    assert _sample(after, "ktlegacy_generated_tokens", "ktlegacy_generated_tokens_total") == \
        _sample(before, "ktlegacy_generated_tokens", "ktlegacy_generated_tokens_total") + 4
    prompt = len(_chat_ids(live, expected["prompt"]))
    assert _sample(after, "ktlegacy_prompt_tokens", "ktlegacy_prompt_tokens_total") == \
        _sample(before, "ktlegacy_prompt_tokens", "ktlegacy_prompt_tokens_total") + prompt
    for hist in ("ktlegacy_time_to_first_token_seconds", "ktlegacy_decode_tokens_per_second"):
        assert _sample(after, hist, hist + "_count") == _sample(before, hist, hist + "_count") + 1
    assert _sample(after, "ktlegacy_queue_depth", "ktlegacy_queue_depth") == 0
    assert _sample(after, "ktlegacy_load_progress", "ktlegacy_load_progress") == 1
    assert "ktlegacy_gpu_memory_bytes" in after  # per device; no samples on a CPU
    # one log line per request: id, route, model, token counts, time to first token, duration, status
    line = [x for x in live["log"].read_text().splitlines() if "ktlegacy request " in x and "/v1/chat" in x][-1]
    assert re.search(rf"id=[0-9a-f]{{16}} POST /v1/chat/completions status=200 model={NAME} prompt_tokens={prompt} "
                     r"completion_tokens=4 ttft_s=\d+\.\d{3} finish=length duration_s=\d+\.\d{3}$", line), line
    assert expected["prompt"] not in live["log"].read_text()  # no prompt text unless KTLEGACY_LOG_PROMPTS=1


def test_health_answers_while_a_maximum_size_request_is_handled(live, expected):
    """The event loop stays free: /health answers while 4 MiB bodies are read, parsed and refused.
    (The speed target lives in bench/server_hardening.py; this bound only says it is not blocked.)"""
    probe = hostile_cases.event_loop_probe(live["base"], live["key"],
                                           hostile_cases.maximum_size_bodies(4 * 1024 * 1024))
    assert {name: b["status"] for name, b in probe["bodies"].items()} == dict.fromkeys(probe["bodies"], 400)
    assert probe["health_probes"] > 0
    assert probe["max_s"] < 2.0, probe
    assert _ok_after(live, expected)


def test_queued_clients_that_leave_are_dropped_before_prefill(live, expected):
    before = _metrics(live["base"], live["auth"])
    dropped = live["log"].read_text().count("dropped before its prefill")
    long_body = {"model": NAME, "messages": [{"role": "user", "content": expected["prompt"]}], "temperature": 0.8,
                 "max_tokens": MAX_NEW, "stop": ["\x00never"]}
    busy = threading.Thread(target=lambda: httpx.post(live["base"] + "/v1/chat/completions", json=long_body,
                                                      headers=live["auth"], timeout=300))
    busy.start()
    time.sleep(0.5)  # the long one holds the engine

    def leave(stream: bool, path: str, body: dict):
        try:
            if stream:
                with httpx.stream("POST", live["base"] + path, json={**body, "stream": True}, headers=live["auth"],
                                  timeout=1.0) as r:
                    r.read()
            else:
                httpx.post(live["base"] + path, json=body, headers=live["auth"], timeout=1.0)
        except httpx.TimeoutException:
            pass  # hung up while queued
    quick = {"model": NAME, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}
    leavers = [threading.Thread(target=leave, args=args) for args in (
        (True, "/v1/chat/completions", quick), (False, "/v1/chat/completions", quick),
        (True, "/api/chat", {**quick, "options": {"num_predict": 2}}))]
    for t in leavers:
        t.start()
    for t in leavers:
        t.join()
    busy.join(timeout=300)
    deadline = time.monotonic() + 30
    while live["log"].read_text().count("dropped before its prefill") < dropped + 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert live["log"].read_text().count("dropped before its prefill") == dropped + 3
    after = _metrics(live["base"], live["auth"])
    assert _sample(after, "ktlegacy_dropped_before_prefill", "ktlegacy_dropped_before_prefill_total") == \
        _sample(before, "ktlegacy_dropped_before_prefill", "ktlegacy_dropped_before_prefill_total") + 3
    assert _ok_after(live, expected)


# ---------------------------------------------------------------- a DeepSeek-V3 template: tool calls

ORIGIN = "http://127.0.0.1:9"  # a web page's origin the tools server lists in KTLEGACY_CORS_ORIGINS
TOOLS = [{"type": "function", "function": {
    "name": "get_time", "description": "The time now in a time zone (ZEBRA-TOOL-DESCRIPTION)",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}}]
ARGS = '{"zone": "Europe/Zürich", "note": "déjà vu 🙂"}'
CALLS_REPLY = ("Let me check.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time\n```json\n"
               f"{ARGS}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_date\n```json\n"
               "{}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>")
AFTER_TOOL = "It is 12:00 in Zürich — déjà vu 🙂."
MULTIBYTE = "naïve café — 東京 🙂 done"


@pytest.fixture(scope="module")
def tools_live(served):
    """DeepSeek-V3's chat template with forced replies (server_api_app.py --script); a key from a
    file, one listed web origin, /metrics without the key, a small body limit and body timeout,
    /docs on, prompts in the request log."""
    model = served["models"]["deepseek-v3"]
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(model))
    byte_ids = _byte_token_ids(tok, MULTIBYTE)
    script = served["root"] / "script.json"
    script.write_text(json.dumps([
        {"when": "<｜tool▁output▁begin｜>12:00", "reply": AFTER_TOOL},   # only if the template rendered the tool result
        {"when": "ZEBRA-TOOL-DESCRIPTION", "reply": CALLS_REPLY},        # only if the tool definitions reached the prompt
        {"when": "split the bytes", "reply_ids": byte_ids}]), encoding="utf-8")
    keyfile = served["root"] / "keys"
    keyfile.write_text("# the tools server's key\n\nfile-key-0123456789\n")
    server = _start(served, "tools", model, {"KTLEGACY_API_KEY_FILE": str(keyfile), "KTLEGACY_CORS_ORIGINS": ORIGIN,
                                             "KTLEGACY_METRICS_PUBLIC": "1", "KTLEGACY_MAX_BODY_BYTES": "65536",
                                             "KTLEGACY_BODY_TIMEOUT_S": "2", "KTLEGACY_DOCS": "1",
                                             "KTLEGACY_LOG_PROMPTS": "1"},
                    "--cache-lens", "1024", "--max-new-tokens", "256", "--script", str(script))
    yield {**server, "tok": tok, "key": "file-key-0123456789",
           "auth": {"Authorization": "Bearer file-key-0123456789"}}
    _stop(server)


def _byte_token_ids(tok, text: str) -> list[int]:
    """``text`` as one byte-level token per UTF-8 byte: multi-byte characters arrive over several tokens."""
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode
    table, vocab = bytes_to_unicode(), tok.get_vocab()
    return [vocab[table[b]] for b in text.encode("utf-8")]


def _openai_stream(base: str, headers: dict, body: dict) -> tuple[str, dict, str]:
    """(content, {index: (name, arguments)}, finish_reason) reassembled from the streamed deltas."""
    content, calls, finish = "", {}, None
    with httpx.stream("POST", base + "/v1/chat/completions", json={**body, "stream": True}, headers=headers,
                      timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            delta = choice["delta"]
            content += delta.get("content") or ""
            for tc in delta.get("tool_calls") or ():
                name, args = calls.get(tc["index"], ("", ""))
                fn = tc.get("function", {})
                calls[tc["index"]] = (name + (fn.get("name") or ""), args + (fn.get("arguments") or ""))
            finish = choice["finish_reason"] or finish
    return content, calls, finish


def test_tool_calls_through_the_deepseek_template(tools_live):
    import ollama
    import openai
    base, auth = tools_live["base"], tools_live["auth"]
    msgs = [{"role": "user", "content": "what time is it?"}]
    client = openai.OpenAI(base_url=base + "/v1", api_key=tools_live["key"], max_retries=0)
    r = client.chat.completions.create(model=NAME, messages=msgs, tools=TOOLS)
    m = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and m.content == "Let me check."
    assert [(c.function.name, c.function.arguments) for c in m.tool_calls] == [("get_time", ARGS), ("get_date", "{}")]
    assert len({c.id for c in m.tool_calls}) == 2
    # streamed: the same bytes, as deltas
    content, calls, finish = _openai_stream(base, auth, {"model": NAME, "messages": msgs, "tools": TOOLS})
    assert (content, calls, finish) == ("Let me check.", {0: ("get_time", ARGS), 1: ("get_date", "{}")}, "tool_calls")
    # Ollama: message.tool_calls with parsed arguments, streamed and not
    ol = ollama.Client(host=base, headers=auth)
    c = ol.chat(model=NAME, messages=msgs, tools=TOOLS, stream=False)
    assert c.message.content == "Let me check."
    assert [(t.function.name, dict(t.function.arguments)) for t in c.message.tool_calls] == \
        [("get_time", json.loads(ARGS)), ("get_date", {})]
    parts = list(ol.chat(model=NAME, messages=msgs, tools=TOOLS, stream=True))
    assert "".join(p.message.content for p in parts) == "Let me check."
    assert [(t.function.name, dict(t.function.arguments)) for p in parts for t in p.message.tool_calls or ()] == \
        [("get_time", json.loads(ARGS)), ("get_date", {})]
    # tool_choice none: no tools offered, no definitions in the prompt (the model answers freely)
    plain = client.chat.completions.create(model=NAME, messages=msgs, tools=TOOLS, tool_choice="none", max_tokens=4)
    assert plain.choices[0].message.tool_calls is None
    # the results go back through the template (role: tool), OpenAI's and Ollama's shapes
    history = msgs + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": m.tool_calls[0].id, "type": "function", "function": {"name": "get_time", "arguments": ARGS}}]},
        {"role": "tool", "tool_call_id": m.tool_calls[0].id, "content": "12:00"}]
    final = client.chat.completions.create(model=NAME, messages=history, tools=TOOLS)
    assert final.choices[0].message.content == AFTER_TOOL and final.choices[0].finish_reason == "stop"
    assert _openai_stream(base, auth, {"model": NAME, "messages": history, "tools": TOOLS})[0] == AFTER_TOOL
    ol_history = msgs + [{"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "get_time", "arguments": json.loads(ARGS)}}]}, {"role": "tool", "content": "12:00"}]
    assert ol.chat(model=NAME, messages=ol_history, tools=TOOLS, stream=False).message.content == AFTER_TOOL
    assert "".join(p.message.content for p in ol.chat(model=NAME, messages=ol_history, stream=True)) == AFTER_TOOL
    show = httpx.post(base + "/api/show", json={"model": NAME}, headers=auth, timeout=30).json()
    assert "tools" in show["capabilities"]


PARSER_CHECK = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("api", sys.argv[1])
api = importlib.util.module_from_spec(spec)
spec.loader.exec_module(api)
text = sys.argv[2]

def run(pieces):
    p, out = api.ToolCallParser(), []
    for piece in pieces:
        out += p.feed(piece)
    out += p.finish()
    return ["".join(v for k, v in out if k == "text"), [[c.name, c.arguments] for c in p.calls],
            "".join(v[1] for k, v in out if k == "call_args")]
whole = run([text])
splits = [run([text[:i], text[i:]]) for i in range(1, len(text))] + [run(list(text))]
print(json.dumps({"whole": whole, "all_equal": all(s == whole for s in splits)}))
"""


def test_tool_call_parser_on_every_split(served):
    """The parser fed DeepSeek's call text cut at every point (markers, fences, multi-byte characters
    split across pieces) gives what it gives fed whole."""
    out = subprocess.run([str(served["python"]), "-c", PARSER_CHECK, str(served["tree"] / "ktransformers" / "server" /
                          "api" / "ktlegacy_api.py"), CALLS_REPLY + " tail"], capture_output=True, text=True,
                         env=served["env"], timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["whole"] == ["Let me check. tail", [["get_time", ARGS], ["get_date", "{}"]], ARGS + "{}"]
    assert result["all_equal"]


def test_streamed_equals_non_streamed_with_split_multibyte_characters(tools_live):
    """Each UTF-8 byte of the answer in its own token: both routes, streamed or not, give the same text."""
    base, auth = tools_live["base"], tools_live["auth"]
    msgs = [{"role": "user", "content": "split the bytes"}]
    r = httpx.post(base + "/v1/chat/completions", json={"model": NAME, "messages": msgs}, headers=auth, timeout=120)
    assert r.json()["choices"][0]["message"]["content"] == MULTIBYTE
    assert r.json()["usage"]["completion_tokens"] == len(MULTIBYTE.encode("utf-8"))
    assert _openai_stream(base, auth, {"model": NAME, "messages": msgs})[0] == MULTIBYTE
    import ollama
    ol = ollama.Client(host=base, headers=auth)
    assert ol.chat(model=NAME, messages=msgs, stream=False).message.content == MULTIBYTE
    pieces = [p.message.content for p in ol.chat(model=NAME, messages=msgs, stream=True)]
    assert "".join(pieces) == MULTIBYTE and "\ufffd" not in "".join(pieces)


def test_cross_origin_only_from_the_listed_origin(tools_live):
    """A browser's preflight (Origin + OPTIONS): the listed origin gets CORS headers, no credentials;
    any other origin gets 403 and no CORS header, so the browser blocks it."""
    base = tools_live["base"]
    pre = {"access-control-request-method": "POST", "access-control-request-headers": "authorization, content-type"}
    ok = httpx.options(base + "/v1/chat/completions", headers={"origin": ORIGIN, **pre}, timeout=30)
    assert ok.status_code == 204 and ok.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in ok.headers["access-control-allow-headers"]
    assert "access-control-allow-credentials" not in ok.headers
    get = httpx.get(base + "/v1/models", headers={"origin": ORIGIN, **tools_live["auth"]}, timeout=30)
    assert get.status_code == 200 and get.headers["access-control-allow-origin"] == ORIGIN
    for origin in ("http://evil.example", "http://127.0.0.1:10", "null"):
        bad = httpx.options(base + "/v1/chat/completions", headers={"origin": origin, **pre}, timeout=30)
        assert bad.status_code == 403 and "access-control-allow-origin" not in bad.headers
    # /metrics without the key (KTLEGACY_METRICS_PUBLIC=1); everything else still needs it
    assert httpx.get(base + "/metrics", timeout=30).status_code == 200
    assert httpx.get(base + "/api/tags", timeout=30).status_code == 401


def test_body_limit_and_slow_bodies(tools_live):
    base, key = tools_live["base"], tools_live["key"]
    small = hostile_cases.Case("body over a 64 KiB limit", "/api/chat", b"x" * 70000, (413,), text="65536")
    assert hostile_cases.run_case(base, key, small).problems == []
    chunked = httpx.post(base + "/api/chat", content=iter([b"x" * 40000, b"y" * 40000]), headers=tools_live["auth"],
                         timeout=30)  # no Content-Length: counted while read
    assert chunked.status_code == 413
    line, seconds = hostile_cases.slow_body(base, key, "/v1/chat/completions", b'{"model": ', 1000, hold_s=10)
    assert line is not None and " 408 " in line and 1.5 < seconds < 6, (line, seconds)
    # a body cut short by a client that leaves: nothing to answer, the server goes on
    line, _ = hostile_cases.slow_body(base, key, "/api/chat", b'{"mo', 1000, hold_s=0.3)
    assert line is None
    r = httpx.post(base + "/api/chat", headers=tools_live["auth"], timeout=60, json={
        "model": NAME, "messages": [{"role": "user", "content": "split the bytes"}], "stream": False})
    assert r.json()["message"]["content"] == MULTIBYTE


def test_docs_and_prompt_logging_when_enabled(tools_live):
    """KTLEGACY_DOCS=1 serves /docs and /openapi.json (behind the key); KTLEGACY_LOG_PROMPTS=1 puts the
    last user message in the request's log line."""
    base, auth = tools_live["base"], tools_live["auth"]
    assert httpx.get(base + "/docs", timeout=30).status_code == 401
    assert httpx.get(base + "/docs", headers=auth, timeout=30).status_code == 200
    spec = httpx.get(base + "/openapi.json", headers=auth, timeout=30).json()
    assert "/v1/chat/completions" in spec["paths"] and "/api/chat" in spec["paths"]
    r = httpx.post(base + "/v1/chat/completions", headers=auth, timeout=60, json={
        "model": NAME, "messages": [{"role": "user", "content": "split the bytes, LOGGED-PROMPT"}]})
    assert r.status_code == 200
    line = [x for x in tools_live["log"].read_text().splitlines() if "ktlegacy request " in x][-1]
    assert 'prompt="split the bytes, LOGGED-PROMPT"' in line, line
