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
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from cached_venv import TORCH_CPU, cached_venv
from ktlegacy.arch import get_arch
from ktlegacy.overlay import Drift, load_overlays, patch_tree
from ktlegacy.refs import get_ref

REPO = Path(__file__).resolve().parent.parent
APP = REPO / "tests" / "server_api_app.py"
NAME = "ktlegacy-test"
CACHE_LENS = 256
MAX_NEW = 200
TOKEN_DELAY = 0.02  # s per decode step (see server_api_app.py)
# ktransformers 0.2.1.post1's requirements that its server API path does not import
NOT_IMPORTED = {"torch", "langchain", "blessed", "build", "fire", "ninja", "wheel", "setuptools"}


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
    assert re.search(r"^router\.include_router\(openai_router\)", top, re.M)  # assistants API stays
    openai = (api / "openai" / "__init__.py").read_text()
    assert not re.search(r"^router\.include_router\((chat|legacy)_router\)", openai, re.M)
    assert re.search(r"^router\.include_router\(assistants_router\)", openai, re.M)
    main = (pristine_tree / "ktransformers" / "server" / "main.py").read_text()
    assert main.index("ktlegacy_api.install(mount_app)") < main.index("mount_app.include_router(router)")
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
    from ktlegacy.testing.wheelhouse import ktransformers_requirements
    reqs = [r for r in ktransformers_requirements() if re.split(r"[\s<>=!~\[;]", r, 1)[0].lower() not in NOT_IMPORTED]
    runtime = (REPO / "images" / "requirements" / "runtime.txt").read_text().split("\n")
    reqs += [r.strip() for r in runtime if r.strip() and not r.startswith("#")]
    return cached_venv("server-api-0.2.1.post1", [TORCH_CPU, *reqs, "pyyaml", "jinja2", "gguf", "tokenizers"])


@pytest.fixture(scope="module")
def live(api_python, sdist_tree, tmp_path_factory):
    root = tmp_path_factory.mktemp("server-api")
    tree = root / "tree"
    shutil.copytree(sdist_tree, tree, symlinks=True)
    patch_tree(tree, get_arch("sm75"), out=lambda line: None)
    model = root / "model"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(root / "home"), "PYTHONPATH": str(REPO)}
    subprocess.run([str(api_python), str(APP), "make-model", "--model", str(model)], check=True, env=env,
                   capture_output=True, timeout=600)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (root / "server.log").open("w")
    proc = subprocess.Popen([str(api_python), str(APP), "serve", "--tree", str(tree), "--model", str(model),
                             "--port", str(port), "--name", NAME, "--cache-lens", str(CACHE_LENS),
                             "--max-new-tokens", str(MAX_NEW), "--token-delay", str(TOKEN_DELAY)], stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited: {(root / 'server.log').read_text()[-3000:]}")
        try:
            if httpx.get(base + "/v1/models", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(1)
    else:
        proc.kill()
        pytest.fail("server did not answer within 300 s")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(model))

    def ref(ids, max_tokens):
        out = subprocess.run([str(api_python), str(APP), "reference", "--model", str(model), "--requests",
                              json.dumps([{"ids": ids, "max_tokens": max_tokens}])],
                             capture_output=True, text=True, env=env, timeout=600, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])[0]

    yield {"base": base, "tok": tok, "ref": ref, "log": root / "server.log", "proc": proc}
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


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
    client = openai.OpenAI(base_url=live["base"] + "/v1", api_key="unused", max_retries=0)
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
    client = ollama.Client(host=live["base"])
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


def _ok_after(live, expected):
    """A normal greedy request still returns the reference answer."""
    r = httpx.post(live["base"] + "/v1/chat/completions", timeout=120, json={
        "model": NAME, "messages": [{"role": "user", "content": expected["prompt"]}], "temperature": 0, "max_tokens": 16})
    return r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == _text(live, expected["chat"])


@pytest.mark.parametrize("case", ["malformed_json", "unknown_model", "too_long", "n_2", "temperature_5",
                                  "no_messages", "image_part", "ollama_unknown_model", "ollama_format",
                                  "ollama_malformed"])
def test_bad_requests_get_clear_errors(live, expected, case):
    base, msgs = live["base"], [{"role": "user", "content": "hello"}]
    long_text = " ".join(["the quick brown fox"] * CACHE_LENS)
    calls = {
        "malformed_json": ("/v1/chat/completions", '{"model": "x", "messages": [', 400, "not valid JSON"),
        "unknown_model": ("/v1/chat/completions", {"model": "gpt-4", "messages": msgs}, 404, "'gpt-4' is not served"),
        "too_long": ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": long_text}]},
                     400, "KV cache holds 256"),
        "n_2": ("/v1/chat/completions", {"model": NAME, "messages": msgs, "n": 2}, 400, "n=1"),
        "temperature_5": ("/v1/chat/completions", {"model": NAME, "messages": msgs, "temperature": 5}, 400, "temperature"),
        "no_messages": ("/v1/chat/completions", {"model": NAME}, 400, "messages"),
        "image_part": ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:,"}}]}]}, 400, "only text"),
        "ollama_unknown_model": ("/api/chat", {"model": "llama3", "messages": msgs}, 404, "'llama3' is not served"),
        "ollama_format": ("/api/generate", {"model": NAME, "prompt": "hi", "format": "json"}, 400, "format"),
        "ollama_malformed": ("/api/generate", "{nope", 400, "not valid JSON"),
    }
    path, body, status, text = calls[case]
    if isinstance(body, str):
        r = httpx.post(base + path, content=body, headers={"content-type": "application/json"}, timeout=60)
    else:
        r = httpx.post(base + path, json=body, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    message = err if path.startswith("/api/") else err["message"]
    assert text in message and "\n" not in message
    assert _ok_after(live, expected)


def test_client_errors_raise_in_the_clients(live):
    import ollama
    import openai
    client = openai.OpenAI(base_url=live["base"] + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError, match="not served"):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="context_length_exceeded|KV cache"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "fox " * CACHE_LENS}])
    with pytest.raises(ollama.ResponseError) as exc:
        ollama.Client(host=live["base"]).chat(model="llama3", messages=[{"role": "user", "content": "hi"}])
    assert exc.value.status_code == 404


def test_concurrent_requests_queue_and_all_answer(live, expected):
    want = _text(live, expected["chat"])
    results, errors = [], []

    def one(i):
        try:
            body = {"model": NAME, "messages": [{"role": "user", "content": expected["prompt"]}],
                    "temperature": 0, "max_tokens": 16, "stream": bool(i % 2)}
            if i % 2:
                with httpx.stream("POST", live["base"] + "/v1/chat/completions", json=body, timeout=300) as r:
                    text = ""
                    for line in r.iter_lines():
                        if line.startswith("data: ") and line != "data: [DONE]":
                            choices = json.loads(line[6:])["choices"]
                            text += (choices[0]["delta"].get("content") or "") if choices else ""
                results.append(text)
            else:
                r = httpx.post(live["base"] + "/v1/chat/completions", json=body, timeout=300)
                results.append(r.json()["choices"][0]["message"]["content"])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    # the event loop stays free while the engine works: the model list answers at once
    t0 = time.monotonic()
    assert httpx.get(live["base"] + "/v1/models", timeout=10).status_code == 200
    assert time.monotonic() - t0 < 5
    for t in threads:
        t.join(timeout=600)
    assert errors == [] and results == [want] * 6


def test_disconnect_mid_stream_cancels_and_the_next_request_matches(live, expected):
    body = {"model": NAME, "messages": [{"role": "user", "content": expected["prompt"]}], "temperature": 0.8,
            "max_tokens": MAX_NEW, "stream": True}
    before = live["log"].read_text().count("finish cancelled")
    with httpx.stream("POST", live["base"] + "/v1/chat/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if '"content"' in line and '"role"' not in line:
                break  # one token arrived: hang up
    deadline = time.monotonic() + 60
    while live["log"].read_text().count("finish cancelled") == before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert live["log"].read_text().count("finish cancelled") == before + 1
    assert _ok_after(live, expected)
