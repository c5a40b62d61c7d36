"""Requests a hostile or careless client sends, and what the served API must answer (issue 25).

Shared by tests/test_server_api.py (every case, against the CPU harness) and
bench/server_hardening.py (which records the counts). Each :class:`Case` is one HTTP request with
the statuses it may get: a clear 4xx naming what was wrong, or the documented behaviour (200).
:func:`run_case` sends it and judges the answer: the status, the API's error shape (OpenAI's
``{"error": {"message": ...}}``, Ollama's ``{"error": "..."}`` under /api), a one-line message of
bounded length, no echo of a huge value. Everything goes to 127.0.0.1 only, one request at a
time, each with a timeout.
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx

NAME = "ktlegacy-test"
MB = 1024 * 1024
EVIL = "http://evil.example"


@dataclass
class Case:
    name: str
    path: str
    body: object = None              # dict/list (JSON), bytes (raw), or None
    want: tuple = (400,)
    method: str = "POST"
    headers: dict = field(default_factory=dict)
    auth: bool = True                # send the server's key
    text: str = ""                   # expected in the error message
    header: tuple | None = None      # (name, expected value substring) in the response


def _chat(**extra) -> dict:
    return {"model": NAME, "messages": [{"role": "user", "content": "hello world"}], "max_tokens": 2, **extra}


def _ollama(options: dict | None = None, **extra) -> dict:
    body = {"model": NAME, "messages": [{"role": "user", "content": "hello world"}], "stream": False,
            "options": {"num_predict": 2, **(options or {})}, **extra}
    return body


# Numbers at the edges: (JSON text, is it a finite number, value)
EDGES = [("-1e308", -1e308), ("0", 0), ("1e-300", 1e-300), ("1.5", 1.5), ("1e308", 1e308),
         ("18446744073709551616", 2 ** 64), ("10000000000000000000", 10 ** 19), ("NaN", None), ("true", None),
         ('"0.5"', None)]

# parameter -> (accepted range, whole numbers only); anything else must be a 400 naming it
OPENAI_RANGES = {"temperature": ((0, 2), False), "top_p": ((0, 1), False), "top_k": ((0, float("inf")), True),
                 "frequency_penalty": ((-2, 2), False), "presence_penalty": ((-2, 2), False),
                 "repetition_penalty": ((0.01, 10), False), "seed": ((-2 ** 63, 2 ** 64 - 1), True),
                 "max_tokens": ((1, float("inf")), True), "max_completion_tokens": ((1, float("inf")), True),
                 "n": ((1, 1), True)}
OLLAMA_RANGES = {"temperature": ((0, 2), False), "top_p": ((0, 1), False), "top_k": ((0, float("inf")), True),
                 "frequency_penalty": ((-2, 2), False), "presence_penalty": ((-2, 2), False),
                 "repeat_penalty": ((0.01, 10), False), "seed": ((-2 ** 63, 2 ** 64 - 1), True),
                 "num_predict": ((-float("inf"), float("inf")), True)}


def _accepted(value, rng, whole) -> bool:
    """JSON numbers only (no true, no "0.5"); whole-number parameters take JSON integers only."""
    if value is None or isinstance(value, bool) or (whole and not isinstance(value, int)):
        return False
    return rng[0] <= value <= rng[1]


def _raw_json(obj: dict, key: str, text: str, where: str | None = None) -> bytes:
    """obj as JSON with ``key`` (inside ``where`` if given) set to the literal JSON ``text``."""
    marker = "__KTLEGACY_EDGE__"
    target = obj[where] if where else obj
    target[key] = marker
    return json.dumps(obj).replace(f'"{marker}"', text).encode()


def numeric_cases() -> list[Case]:
    cases = []
    for param, (rng, whole) in OPENAI_RANGES.items():
        for text, value in EDGES:
            if param in ("max_tokens", "max_completion_tokens", "top_k") and _accepted(value, rng, whole) and value > 64:
                continue  # accepted and capped by the server: covered by one case below
            ok = _accepted(value, rng, whole)
            cases.append(Case(f"openai.{param}={text}", "/v1/chat/completions", _raw_json(_chat(), param, text),
                              (200,) if ok else (400,), text="" if ok else param))
    for param, (rng, whole) in OLLAMA_RANGES.items():
        for text, value in EDGES:
            if param in ("num_predict", "top_k") and _accepted(value, rng, whole) and value > 64:
                continue  # capped by the server: covered by one case below
            ok = _accepted(value, rng, whole)
            cases.append(Case(f"ollama.options.{param}={text}", "/api/chat",
                              _raw_json(_ollama(), param, text, where="options"),
                              (200,) if ok else (400,), text="" if ok else param))
    cases += [Case("openai.max_tokens=1e19 (capped)", "/v1/chat/completions",
                   _chat(max_tokens=10 ** 19, stop=["\n", "."]), (200,)),
              Case("ollama.num_predict=-1 (unlimited, capped)", "/api/chat",
                   _ollama({"num_predict": -1, "stop": ["\n", "."]}), (200,))]
    return cases


def request_cases() -> list[Case]:
    long = "x" * MB
    msgs = [{"role": "user", "content": "hi"}]
    c = [
        # the body itself
        Case("malformed JSON", "/v1/chat/completions", b'{"model": "x", "messages": [', text="not valid JSON"),
        Case("ollama malformed JSON", "/api/generate", b"{nope", text="not valid JSON"),
        Case("empty body", "/v1/chat/completions", b"", text="body"),
        Case("JSON null", "/v1/chat/completions", b"null"),
        Case("JSON array", "/api/chat", b"[1, 2, 3]"),
        Case("nested 100000 deep", "/v1/chat/completions", b"[" * 100000 + b"]" * 100000),
        Case("5000-digit number", "/v1/chat/completions", b'{"model": "x", "seed": ' + b"9" * 5000 + b"}"),
        Case("invalid UTF-8", "/v1/chat/completions", b'{"model": "\xff\xfe"}', text="UTF-8"),
        Case("ollama invalid UTF-8", "/api/chat", b'{"model": "\xc3"}', text="UTF-8"),
        Case("form content type (curl -d), JSON body", "/api/generate",
             json.dumps({"model": NAME, "prompt": "hello", "stream": False, "options": {"num_predict": 2}}).encode(),
             (200,), headers={"content-type": "application/x-www-form-urlencoded"}),
        Case("text/plain content type, JSON body", "/v1/chat/completions", json.dumps(_chat()).encode(), (200,),
             headers={"content-type": "text/plain"}),
        Case("no content type, JSON body", "/api/chat", json.dumps(_ollama()).encode(), (200,),
             headers={"content-type": ""}),
        Case("multipart body", "/v1/chat/completions", b"--x\r\nContent-Disposition: form-data; name=a\r\n\r\n1\r\n--x--",
             headers={"content-type": "multipart/form-data; boundary=x"}),
        Case("body over the limit (Content-Length)", "/v1/chat/completions", b"x" * (5 * MB), (413,),
             text="KTLEGACY_MAX_BODY_BYTES"),
        Case("ollama body over the limit", "/api/chat", b"x" * (5 * MB), (413,), text="KTLEGACY_MAX_BODY_BYTES"),
        # sizes inside the body
        Case("1 MB model name", "/v1/chat/completions", {"model": long, "messages": msgs}, text="model"),
        Case("ollama 1 MB model name", "/api/chat", {"model": long, "messages": msgs}, text="model"),
        Case("1 MB stop string", "/v1/chat/completions", _chat(stop=long[:MB // 2]), text="stop"),
        Case("5 stop strings", "/v1/chat/completions", _chat(stop=["a", "b", "c", "d", "e"]), text="stop"),
        Case("ollama 1000 stop strings", "/api/chat", _ollama({"stop": ["s"] * 1000}), text="stop"),
        Case("ollama 1 MB stop string", "/api/chat", _ollama({"stop": [long[:MB // 2]]}), text="stop"),
        Case("2000 messages", "/v1/chat/completions", {"model": NAME, "messages": msgs * 2000}, text="messages"),
        Case("ollama 2000 messages", "/api/chat", {"model": NAME, "messages": msgs * 2000, "stream": False},
             text="messages"),
        Case("prompt longer than the cache", "/v1/chat/completions",
             {"model": NAME, "messages": [{"role": "user", "content": "fox " * 300}]}, text="KV cache"),
        Case("3 MB prompt", "/v1/chat/completions",
             {"model": NAME, "messages": [{"role": "user", "content": "a" * (3 * MB)}]}, text="KV cache"),
        Case("ollama 3 MB prompt", "/api/generate", {"model": NAME, "prompt": "a" * (3 * MB)}, text="KV cache"),
        Case("completions 3 MB prompt", "/v1/completions", {"model": NAME, "prompt": "a" * (3 * MB)}, text="KV cache"),
        # messages
        Case("no messages field", "/v1/chat/completions", {"model": NAME}, text="messages"),
        Case("empty messages", "/v1/chat/completions", {"model": NAME, "messages": []}, text="messages"),
        Case("unknown role", "/v1/chat/completions", {"model": NAME, "messages": [{"role": "root", "content": "x"}]},
             text="role"),
        Case("1 MB role", "/v1/chat/completions", {"model": NAME, "messages": [{"role": long, "content": "x"}]},
             text="role"),
        Case("role is a number", "/api/chat", {"model": NAME, "messages": [{"role": 5, "content": "x"}]}, text="role"),
        Case("image part", "/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:,"}}]}]}, text="only text"),
        Case("content is an object", "/v1/chat/completions",
             {"model": NAME, "messages": [{"role": "user", "content": {"a": 1}}]}, text="content"),
        Case("content is a number", "/api/chat", {"model": NAME, "messages": [{"role": "user", "content": 5}]},
             text="content"),
        Case("ollama image", "/api/chat", {"model": NAME, "messages": [{"role": "user", "content": "x",
                                                                        "images": ["aGk="]}]}, text="images"),
        Case("messages is a string", "/v1/chat/completions", {"model": NAME, "messages": "hello"}, text="messages"),
        # models
        Case("unknown model", "/v1/chat/completions", {"model": "gpt-4", "messages": msgs}, (404,),
             text="is not served"),
        Case("ollama unknown model", "/api/chat", {"model": "llama3", "messages": msgs}, (404,), text="is not served"),
        Case("model is a number", "/v1/chat/completions", {"model": 5, "messages": msgs}, text="model"),
        Case("ollama show unknown model", "/api/show", {"model": "llama3"}, (404,)),
        Case("get unknown model", "/v1/models/gpt-4", None, (404,), method="GET"),
        # what the server cannot honour: refused by name, not ignored
        Case("n=2", "/v1/chat/completions", _chat(n=2), text="n"),
        Case("logprobs", "/v1/chat/completions", _chat(logprobs=True), text="logprobs"),
        Case("top_logprobs", "/v1/chat/completions", _chat(top_logprobs=5), text="top_logprobs"),
        Case("logit_bias", "/v1/chat/completions", _chat(logit_bias={"5": 10}), text="logit_bias"),
        Case("response_format json_object", "/v1/chat/completions", _chat(response_format={"type": "json_object"}),
             text="response_format"),
        Case("response_format json_schema", "/v1/chat/completions",
             _chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}),
             text="response_format"),
        Case("response_format text", "/v1/chat/completions", _chat(response_format={"type": "text"}), (200,)),
        Case("functions", "/v1/chat/completions", _chat(functions=[{"name": "f", "parameters": {}}]), text="functions"),
        Case("function_call", "/v1/chat/completions", _chat(function_call="auto"), text="function_call"),
        Case("audio", "/v1/chat/completions", _chat(audio={"voice": "x", "format": "wav"}), text="audio"),
        Case("modalities audio", "/v1/chat/completions", _chat(modalities=["text", "audio"]), text="modalities"),
        Case("completions best_of=2", "/v1/completions", {"model": NAME, "prompt": "hi", "best_of": 2, "max_tokens": 2},
             text="best_of"),
        Case("completions echo", "/v1/completions", {"model": NAME, "prompt": "hi", "echo": True}, text="echo"),
        Case("completions logprobs=5", "/v1/completions", {"model": NAME, "prompt": "hi", "logprobs": 5},
             text="logprobs"),
        Case("completions two prompts", "/v1/completions", {"model": NAME, "prompt": ["a", "b"]}, text="prompt"),
        Case("ollama format json", "/api/generate", {"model": NAME, "prompt": "hi", "format": "json"}, text="format"),
        Case("ollama format schema", "/api/chat", _ollama(format={"type": "object"}), text="format"),
        Case("ollama options is a list", "/api/chat", _ollama(options=None) | {"options": [1]}, text="options"),
        Case("ollama raw template", "/api/generate", {"model": NAME, "prompt": "hi", "template": "{{ .Prompt }}"},
             text="template"),
        # tools on a template without a tool-call format: answered without them, said in a header
        Case("tools, no tool format (openai)", "/v1/chat/completions", _chat(tools=[
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]), (200,),
             header=("x-ktlegacy-tools", "ignored")),
        Case("tools, no tool format (ollama)", "/api/chat", _ollama(tools=[
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]), (200,),
             header=("x-ktlegacy-tools", "ignored")),
        Case("tool_choice required", "/v1/chat/completions", _chat(tools=[
            {"type": "function", "function": {"name": "f"}}], tool_choice="required"), text="tool_choice"),
        Case("tool_choice named", "/v1/chat/completions", _chat(tools=[
            {"type": "function", "function": {"name": "f"}}], tool_choice={"type": "function", "function": {
                "name": "f"}}), text="tool_choice"),
        Case("tool is not a function", "/v1/chat/completions", _chat(tools=[{"type": "code_interpreter"}]),
             text="tools"),
        Case("tools is a string", "/api/chat", _ollama(tools="all"), text="tools"),
        Case("tool result, no tool format", "/v1/chat/completions", {"model": NAME, "messages": [
            {"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "c", "content": "1"}]},
             text="tool-call format"),
        # routes that are not there
        Case("GET /docs", "/docs", None, (404,), method="GET"),
        Case("GET /redoc", "/redoc", None, (404,), method="GET"),
        Case("GET /openapi.json", "/openapi.json", None, (404,), method="GET"),
        Case("POST /v1/assistants", "/v1/assistants", {"model": NAME}, (404,)),
        Case("GET /v1/threads", "/v1/threads/x", None, (404,), method="GET"),
        Case("GET /system-info", "/system-info", None, (404,), method="GET"),
        Case("unknown route", "/v2/everything", {"a": 1}, (404,)),
        Case("GET on a POST route", "/v1/chat/completions", None, (405,), method="GET"),
        Case("DELETE /api/tags", "/api/tags", None, (405,), method="DELETE"),
        # keys
        Case("no key", "/v1/models", None, (401,), method="GET", auth=False, text="API key",
             header=("www-authenticate", "Bearer")),
        Case("ollama no key", "/api/tags", None, (401,), method="GET", auth=False, text="API key"),
        Case("wrong key", "/v1/chat/completions", _chat(), (401,), auth=False,
             headers={"authorization": "Bearer not-the-key-at-all"}, text="invalid API key"),
        Case("basic auth", "/api/chat", _ollama(), (401,), auth=False, headers={"authorization": "Basic a2V5OmtleQ=="}),
        Case("empty bearer", "/v1/models", None, (401,), method="GET", auth=False, headers={"authorization": "Bearer"}),
        Case("key on /metrics", "/metrics", None, (401,), method="GET", auth=False),
        Case("health needs no key", "/health", None, (200,), method="GET", auth=False),
        # web pages of other origins
        Case("preflight from a foreign origin", "/v1/chat/completions", None, (403,), method="OPTIONS",
             headers={"origin": EVIL, "access-control-request-method": "POST",
                      "access-control-request-headers": "content-type"}, text="cross-origin"),
        Case("foreign origin GET", "/v1/models", None, (403,), method="GET", headers={"origin": EVIL},
             text="cross-origin"),
        Case("foreign origin simple POST (text/plain)", "/api/generate",
             json.dumps({"model": NAME, "prompt": "hi"}).encode(), (403,),
             headers={"origin": EVIL, "content-type": "text/plain"}, text="cross-origin"),
        Case("origin null", "/api/chat", _ollama(), (403,), headers={"origin": "null"}),
        Case("foreign origin, no key sent", "/v1/models", None, (403,), method="GET", auth=False,
             headers={"origin": EVIL}),
    ]
    return c


def all_cases() -> list[Case]:
    return request_cases() + numeric_cases()


@dataclass
class Outcome:
    status: int | None
    seconds: float
    problems: list
    headers: dict


def run_case(base: str, key: str | None, case: Case, timeout: float = 60.0) -> Outcome:
    """Send one case; ``problems`` lists what was wrong with the answer (empty: as documented)."""
    headers = dict(case.headers)
    if case.auth and key:
        headers.setdefault("authorization", f"Bearer {key}")
    content = None
    if isinstance(case.body, bytes):
        content = case.body
        headers.setdefault("content-type", "application/json")
    elif case.body is not None:
        content = json.dumps(case.body).encode()
        headers.setdefault("content-type", "application/json")
    headers = {k: v for k, v in headers.items() if v != ""}
    t0 = time.monotonic()
    try:
        with httpx.Client(timeout=timeout) as client:
            r = client.request(case.method, base + case.path, content=content, headers=headers)
    except httpx.TimeoutException:
        return Outcome(None, time.monotonic() - t0, ["no answer within the timeout (hang)"], {})
    except httpx.HTTPError as exc:
        return Outcome(None, time.monotonic() - t0, [f"connection error: {type(exc).__name__}: {exc}"], {})
    elapsed = time.monotonic() - t0
    problems = []
    if r.status_code not in case.want:
        problems.append(f"status {r.status_code}, want {case.want}: {r.text[:300]}")
    if case.header:
        name, value = case.header
        if value not in r.headers.get(name, ""):
            problems.append(f"header {name}: {r.headers.get(name)!r}, want {value!r}")
    if r.status_code >= 400 and case.method != "OPTIONS" or r.status_code == 403:
        problems += _error_shape(case.path, r, case.text)
    if len(r.content) > 20000 and r.status_code >= 400:
        problems.append(f"a {len(r.content)}-byte error answer (an echo of the input?)")
    return Outcome(r.status_code, elapsed, problems, dict(r.headers))


def _error_shape(path: str, r: httpx.Response, text: str) -> list:
    try:
        body = r.json()
    except ValueError:
        return [f"error answer is not JSON: {r.text[:200]!r}"]
    err = body.get("error") if isinstance(body, dict) else None
    if path.startswith("/api/"):
        if not isinstance(err, str):
            return [f"not Ollama's error shape: {r.text[:200]}"]
        message = err
    else:
        if not isinstance(err, dict) or not isinstance(err.get("message"), str):
            return [f"not OpenAI's error shape: {r.text[:200]}"]
        message = err["message"]
    problems = []
    if "\n" in message or len(message) > 400:
        problems.append(f"error message not one short line: {message[:200]!r}")
    if text and text not in message:
        problems.append(f"error message {message!r} does not name {text!r}")
    return problems


def slow_body(base: str, key: str | None, path: str, send: bytes, declared: int, hold_s: float) -> tuple:
    """Declare ``declared`` body bytes, send ``send``, keep the connection open: (status line, seconds)."""
    u = urlsplit(base)
    t0 = time.monotonic()
    with socket.create_connection((u.hostname, u.port), timeout=hold_s) as s:
        head = (f"POST {path} HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {declared}\r\n" + (f"Authorization: Bearer {key}\r\n" if key else "") + "\r\n")
        s.sendall(head.encode() + send)
        try:
            data = s.recv(4096)
        except socket.timeout:
            return None, time.monotonic() - t0
    line = data.split(b"\r\n", 1)[0].decode(errors="replace")
    return line, time.monotonic() - t0


def maximum_size_bodies(limit: int) -> dict:
    """Bodies of at most ``limit`` bytes that cost the most to read, parse and refuse: one huge
    message, as many tiny messages as fit, the most messages allowed (1024) of 4 KB each, a huge
    stop list."""
    bodies = {
        "one_huge_message": {"model": NAME, "messages": [{"role": "user", "content": "a" * (limit - 200)}]},
        "tiny_messages": {"model": NAME, "messages": [{"role": "user", "content": "x"}] * ((limit - 100) // 34)},
        "1024_messages_of_4k": {"model": NAME, "messages": [{"role": "user", "content": "x" * 4000}] * 1024},
        "huge_stop_list": {"model": NAME, "messages": [{"role": "user", "content": "x"}],
                           "stop": ["a"] * ((limit - 100) // 5)},
    }
    out = {name: json.dumps(body).encode() for name, body in bodies.items()}
    assert all(len(b) <= limit for b in out.values())
    return out


def event_loop_probe(base: str, key: str | None, bodies: dict, path: str = "/v1/chat/completions") -> dict:
    """Each body sent by curl (another process: this one's GIL does not slow the probe) while this
    process polls /health: the slowest /health answer, and what each body got."""
    import subprocess
    import tempfile
    out: dict = {"bodies": {}, "health_probes": 0, "max_s": 0.0}
    with tempfile.TemporaryDirectory() as tmp:
        for name, body in bodies.items():
            f = Path(tmp) / name
            f.write_bytes(body)
            cmd = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-H", "content-type: application/json",
                   "--data-binary", f"@{f}", "--max-time", "120", base + path]
            if key:
                cmd[1:1] = ["-H", f"Authorization: Bearer {key}"]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
            worst = 0.0
            with httpx.Client(timeout=60) as client:
                while proc.poll() is None:
                    t0 = time.monotonic()
                    client.get(base + "/health")
                    worst = max(worst, time.monotonic() - t0)
                    out["health_probes"] += 1
                    time.sleep(0.005)
            out["bodies"][name] = {"bytes": len(body), "status": int(proc.stdout.read() or 0),
                                   "health_max_s": round(worst, 4)}
            out["max_s"] = max(out["max_s"], round(worst, 4))
    return out
