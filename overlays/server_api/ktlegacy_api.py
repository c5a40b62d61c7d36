"""ktlegacy's OpenAI- and Ollama-compatible HTTP API for upstream's ktransformers server.

Written into the patched tree as ``ktransformers/server/api/ktlegacy_api.py`` by
``overlays/80_server_api.py``, which mounts it in place of upstream's ``/v1/models``,
``/v1/chat/completions``, ``/v1/completions`` and ``/api/*`` routes, and starts the server
listening before the model loads (``/health`` shows the progress). What it fixes, found by
driving upstream's routes with the real ``openai`` and ``ollama`` client packages, Open WebUI
and a hostile client:

* ``/v1/models`` was a bare list; ``/api/tags`` had an unparsable ``modified_at``; ``/api/chat``
  and non-streamed ``/api/generate`` raised ``NotImplementedError``; requests' ``max_tokens``,
  ``temperature``, ``top_p``, ``stop``, ``seed`` were ignored; no ``usage``; generation ran on the
  event loop. Here each request samples with its own parameters (``temperature`` 0, or below
  1e-4, is plain argmax) on one worker thread, requests queue in arrival order, a client that
  leaves stops its generation at the next token, or before its prefill while it waits.
* Security: upstream answered any web page (CORS ``*`` with credentials) and had no
  authentication. Here a request that carries an ``Origin`` not listed in
  ``KTLEGACY_CORS_ORIGINS`` is refused (403) and no CORS header is sent; with
  ``KTLEGACY_API_KEY`` / ``KTLEGACY_API_KEY_FILE`` set, every route but ``/health`` needs
  ``Authorization: Bearer <key>`` (401 otherwise, compared in constant time).
* Bounds: the body is read before parsing, at most ``KTLEGACY_MAX_BODY_BYTES`` (413) within
  ``KTLEGACY_BODY_TIMEOUT_S`` (408); invalid UTF-8, any content type (parsed as JSON, as Ollama
  does), every numeric parameter range-checked (400 naming it), stop strings, model name and
  message count limited; parameters the server cannot honour (``response_format``, ``logprobs``,
  ``n > 1``, ...) are refused with 400 rather than ignored; the prompt is rendered and tokenized
  off the event loop. Errors use the API's shape everywhere: OpenAI's ``{"error": {...}}``,
  Ollama's ``{"error": "..."}`` under ``/api``.
* Tool calls go through the model's chat template: DeepSeek-V3/R1's call format
  (``<｜tool▁calls▁begin｜>...``) is parsed into OpenAI ``tool_calls`` (streamed as deltas) and
  Ollama ``message.tool_calls``; ``role: tool`` results go back through the template. A template
  without that format answers without tools (header ``X-Ktlegacy-Tools``), on both routes.
* ``/health`` (503 with load progress, then 200), ``/metrics`` (Prometheus), one log line per
  request (id, route, model, token counts, time to first token, duration, status).

Settings (environment; a bad value stops the server with one line): ``KTLEGACY_API_KEY`` (keys,
comma- or space-separated), ``KTLEGACY_API_KEY_FILE`` (one key per line), ``KTLEGACY_CORS_ORIGINS``
(comma-separated origins, or ``*``), ``KTLEGACY_MAX_BODY_BYTES`` (4 MiB), ``KTLEGACY_BODY_TIMEOUT_S``
(30), ``KTLEGACY_MAX_MESSAGES`` (1024), ``KTLEGACY_MAX_QUEUE`` (64), ``KTLEGACY_ASSISTANTS_API`` (0:
upstream's assistants/threads/runs routes are not mounted), ``KTLEGACY_DOCS`` (0: no /docs,
/redoc, /openapi.json), ``KTLEGACY_METRICS_PUBLIC`` (0: /metrics needs the key), ``KTLEGACY_LOG_PROMPTS``
(0: the request log has no prompt text), ``KTLEGACY_LOAD_LOG_S`` (5: seconds between load progress lines).

Token counting: ``usage.completion_tokens`` (Ollama: ``eval_count``) counts the tokens generated
for the answer, excluding an end-of-sequence token; ``prompt_tokens`` is the templated prompt.
"""

import asyncio
import copy
import hashlib
import hmac
import json
import logging
import os
import re
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, AsyncIterator, Optional, Union

import torch
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               disable_created_metrics, generate_latest)
from prometheus_client.core import GaugeMetricFamily
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("uvicorn.error")

STARTED = int(time.time())
# The Ollama API level these routes follow (Ollama 0.3.0 added tool calls); Open WebUI parses it
# as dot-separated integers. Our own version is the "ktransformers" field of /api/version.
OLLAMA_API_VERSION = "0.3.0"
MAX_MODEL_NAME = 256           # characters of a request's model name
MAX_STOP_OPENAI = 4            # stop sequences (OpenAI documents up to 4)
MAX_STOP_OLLAMA = 16
MAX_STOP_CHARS = 256           # characters of one stop sequence
MAX_TOOLS = 256
GREEDY_BELOW = 1e-4            # a temperature below this samples greedily (the limit T -> 0)
SEED_RANGE = (-(2 ** 63), 2 ** 64 - 1)


# ---------------------------------------------------------------- settings

class SettingsError(Exception):
    """A KTLEGACY_* setting the server cannot use (one line, says how to fix it)."""


_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}
_ORIGIN = re.compile(r"https?://[^/\s?#,]+")
_KEY = re.compile(r"[\x21-\x7e]+")


@dataclass(frozen=True)
class Settings:
    api_keys: tuple = ()
    cors_origins: tuple = ()
    max_body_bytes: int = 4 * 1024 * 1024
    body_timeout_s: float = 30.0
    max_messages: int = 1024
    max_queue: int = 64
    assistants_api: bool = False
    docs: bool = False
    metrics_public: bool = False
    log_prompts: bool = False
    load_log_s: float = 5.0

    @classmethod
    def from_env(cls, env=None) -> "Settings":
        env = os.environ if env is None else env
        d = cls()

        def text(name):
            return str(env.get(name, "")).strip()

        def number(name, default, kind, low, high, unit=""):
            raw = text(name)
            if not raw:
                return default
            try:
                value = kind(raw)
            except ValueError:
                value = None
            if value is None or value != value or not low <= value <= high:
                raise SettingsError(f"{name}={raw!r}: expected a {'whole ' if kind is int else ''}number from "
                                    f"{low} to {high}{unit} (fix it in compose/.env)")
            return value

        def flag(name):
            raw = text(name).lower()
            if raw in _TRUE or raw in _FALSE:
                return raw in _TRUE
            raise SettingsError(f"{name}={text(name)!r}: expected 1 or 0 (fix it in compose/.env)")

        keys = [k for k in re.split(r"[,\s]+", text("KTLEGACY_API_KEY")) if k]
        path = text("KTLEGACY_API_KEY_FILE")
        if path:
            try:
                body = Path(path).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                why = getattr(exc, "strerror", None) or type(exc).__name__
                raise SettingsError(f"KTLEGACY_API_KEY_FILE={path!r} cannot be read ({why}): point it at a "
                                    "UTF-8 file with one key per line") from None
            for line in body.splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    keys += [k for k in re.split(r"[,\s]+", line) if k]
        for k in keys:
            if not _KEY.fullmatch(k) or len(k) < 8:
                raise SettingsError("KTLEGACY_API_KEY / KTLEGACY_API_KEY_FILE: a key must be 8 or more printable "
                                    "ASCII characters without spaces or commas (e.g. `openssl rand -hex 32`)")
        origins = [o.strip().rstrip("/") for o in text("KTLEGACY_CORS_ORIGINS").split(",") if o.strip()]
        for o in origins:
            if o != "*" and not _ORIGIN.fullmatch(o):
                raise SettingsError(f"KTLEGACY_CORS_ORIGINS: {o[:80]!r} is not an origin: list scheme://host[:port] "
                                    "entries (no path), comma-separated, or * for any origin")
        return cls(
            api_keys=tuple(k.encode() for k in dict.fromkeys(keys)),
            cors_origins=tuple(o.lower() for o in origins),
            max_body_bytes=number("KTLEGACY_MAX_BODY_BYTES", d.max_body_bytes, int, 1024, 1 << 30, " bytes"),
            body_timeout_s=number("KTLEGACY_BODY_TIMEOUT_S", d.body_timeout_s, float, 0.1, 3600.0, " s"),
            max_messages=number("KTLEGACY_MAX_MESSAGES", d.max_messages, int, 1, 1_000_000),
            max_queue=number("KTLEGACY_MAX_QUEUE", d.max_queue, int, 0, 1_000_000),
            assistants_api=flag("KTLEGACY_ASSISTANTS_API"),
            docs=flag("KTLEGACY_DOCS"),
            metrics_public=flag("KTLEGACY_METRICS_PUBLIC"),
            log_prompts=flag("KTLEGACY_LOG_PROMPTS"),
            load_log_s=number("KTLEGACY_LOAD_LOG_S", d.load_log_s, float, 0.1, 3600.0, " s"),
        )


_settings: Optional[Settings] = None


def settings() -> Settings:
    """The settings, read once from the environment; a bad one ends the process with one line."""
    global _settings
    if _settings is None:
        try:
            _settings = Settings.from_env()
        except SettingsError as exc:
            print(f"ktlegacy api: error: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
    return _settings


def assistants_enabled() -> bool:
    """Whether upstream's assistants/threads/runs routes are mounted (patched api/openai/__init__.py)."""
    return settings().assistants_api


def note_web_cross_domain() -> None:
    """Upstream's --web_cross_domain / web.open_cross_domain (patched main.py): not used."""
    log.info("ktlegacy api: upstream's cross-domain setting is not used; cross-origin requests are "
             "allowed only from KTLEGACY_CORS_ORIGINS (%s)", ", ".join(settings().cors_origins) or "none")


# ---------------------------------------------------------------- metrics

disable_created_metrics()  # no *_created series beside each counter
REGISTRY = CollectorRegistry(auto_describe=True)
M_REQUESTS = Counter("ktlegacy_requests", "HTTP requests by route and status", ["route", "status"], registry=REGISTRY)
M_DURATION = Histogram("ktlegacy_request_duration_seconds", "HTTP request duration", ["route"], registry=REGISTRY,
                       buckets=(0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600))
M_PROMPT = Counter("ktlegacy_prompt_tokens", "prompt tokens prefilled", registry=REGISTRY)
M_GENERATED = Counter("ktlegacy_generated_tokens", "tokens generated", registry=REGISTRY)
M_TTFT = Histogram("ktlegacy_time_to_first_token_seconds", "request start to first generated token (queue included)",
                   registry=REGISTRY, buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 60, 120, 300))
M_DECODE = Histogram("ktlegacy_decode_tokens_per_second", "decode speed of a request (tokens after the first)",
                     registry=REGISTRY, buckets=(0.5, 1, 2, 5, 10, 15, 20, 30, 50, 100, 200, 500))
M_QUEUE = Gauge("ktlegacy_queue_depth", "requests waiting for the engine", registry=REGISTRY)
M_RUNNING = Gauge("ktlegacy_requests_generating", "requests the engine is working on (0 or 1)", registry=REGISTRY)
M_DROPPED = Counter("ktlegacy_dropped_before_prefill", "queued requests whose client left before their turn",
                    registry=REGISTRY)
M_LOAD = Gauge("ktlegacy_load_progress", "fraction of the GGUF's tensor bytes loaded (1 once serving)",
               registry=REGISTRY)


class _GpuMemory:
    """ktlegacy_gpu_memory_bytes{device, kind}: torch's allocated/reserved and the card's total."""

    def collect(self):
        g = GaugeMetricFamily("ktlegacy_gpu_memory_bytes", "GPU memory per device", labels=["device", "kind"])
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            for i in range(torch.cuda.device_count()):
                dev = f"cuda:{i}"
                g.add_metric([dev, "allocated"], float(torch.cuda.memory_allocated(i)))
                g.add_metric([dev, "reserved"], float(torch.cuda.memory_reserved(i)))
                g.add_metric([dev, "total"], float(torch.cuda.get_device_properties(i).total_memory))
        yield g


REGISTRY.register(_GpuMemory())


# ---------------------------------------------------------------- errors

class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str = "invalid_request_error", param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.headers = status, message, code, param, headers


def _short(value, limit: int = 60) -> str:
    """repr of a client's value for an error message, cut (a 1 MB name is not echoed back)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...'"


def _error_response(path: str, status: int, message: str, code: str, param: str | None = None,
                    headers: dict | None = None) -> JSONResponse:
    if path.startswith("/api/"):
        return JSONResponse({"error": message}, status_code=status, headers=headers)
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    _note_error(request, exc.message)
    return _error_response(request.url.path, exc.status, exc.message, exc.code, exc.param, exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    if first.get("type") == "json_invalid":
        detail = str(first.get("ctx", {}).get("error", first.get("msg")))[:200]
        message = f"the request body is not valid JSON ({detail})"
        code, where = "invalid_json", ""
    else:
        message = f"{where or 'body'}: {str(first.get('msg', 'invalid value'))[:200]}"
        code = "invalid_value"
    _note_error(request, message)
    return _error_response(request.url.path, 400, message, code, where or None)


def _note_error(request: Request, message: str) -> None:
    rec = request.scope.get("state", {}).get("ktlegacy")
    if rec is not None:
        rec.error = message


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    detail = exc.detail if isinstance(exc.detail, str) else "request refused"
    if exc.status_code == 404:
        detail = f"no route {request.method} {request.url.path[:100]}"
    elif exc.status_code == 405:
        detail = f"{request.method} is not allowed on {request.url.path[:100]}"
    elif exc.status_code == 400 and "parsing the body" in detail:
        detail = "the request body is not valid JSON (it could not be parsed)"
    _note_error(request, detail)
    return _error_response(request.url.path, exc.status_code, detail, "invalid_request_error",
                           headers=getattr(exc, "headers", None))


# ---------------------------------------------------------------- the guard: origin, key, body, request log

# POST routes whose body is JSON: parsed as JSON whatever the content type (Ollama's curl examples
# send -d without a type, i.e. application/x-www-form-urlencoded), checked for UTF-8 first
JSON_ROUTES = ("/api/", "/v1/chat/completions", "/v1/completions")
ROUTE_LABELS = ("/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions", "/api/generate",
                "/api/chat", "/api/tags", "/api/ps", "/api/show", "/api/version")


def _route_label(path: str) -> str:
    if path in ROUTE_LABELS:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    if path.startswith("/v1/assistants") or path.startswith("/v1/threads"):
        return "/v1/assistants"
    return "other"


class _RequestRecord:
    def __init__(self, method: str, path: str):
        self.id = uuid.uuid4().hex[:16]
        self.method, self.path, self.route = method, path, _route_label(path)
        self.t0 = time.monotonic()
        self.status = None
        self.started = False
        self.error = None
        self.model = None
        self.gen = None
        self.prompt_text = None


def _json_error(status: int, path: str, message: str, code: str, headers: dict | None = None,
                rec: Optional["_RequestRecord"] = None) -> JSONResponse:
    if rec is not None:
        rec.error = message
    return _error_response(path, status, message, code, None, headers)


def _key_ok(token: bytes, keys: tuple) -> bool:
    ok = False
    for key in keys:  # every key compared, in constant time each
        ok |= hmac.compare_digest(token, key)
    return ok


class _Guard:
    """Pure ASGI middleware in front of every route (see the module docstring)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        s = settings()
        path, method = scope.get("path", ""), scope.get("method", "GET")
        headers = Headers(scope=scope)
        rec = _RequestRecord(method, path)
        scope.setdefault("state", {})["ktlegacy"] = rec
        cors: Optional[str] = None

        async def send_wrapped(message):
            if message["type"] == "http.response.start":
                rec.status = message["status"]
                rec.started = True
                out = MutableHeaders(scope=message)
                out["x-request-id"] = rec.id
                if cors is not None:
                    out["access-control-allow-origin"] = cors
                    out["access-control-expose-headers"] = "x-request-id, x-ktlegacy-tools"
                    out.add_vary_header("Origin")
            await send(message)

        try:
            origin = headers.get("origin")
            preflight = method == "OPTIONS" and "access-control-request-method" in headers
            if origin is not None:
                allowed = "*" in s.cors_origins or origin.rstrip("/").lower() in s.cors_origins
                if not allowed:
                    await _json_error(403, path, f"cross-origin request from {_short(origin)} refused: this server "
                                      "answers web pages only from the origins in KTLEGACY_CORS_ORIGINS",
                                      "origin_not_allowed", rec=rec)(scope, receive, send_wrapped)
                    return
                cors = "*" if "*" in s.cors_origins else origin
                if preflight:
                    await Response(status_code=204, headers={
                        "access-control-allow-methods": "GET, POST, OPTIONS",
                        "access-control-allow-headers": "authorization, content-type",
                        "access-control-max-age": "600"})(scope, receive, send_wrapped)
                    return
            public = path == "/health" or (path == "/metrics" and s.metrics_public)
            if s.api_keys and not public:
                auth = headers.get("authorization", "")
                scheme, _, token = auth.partition(" ")
                if scheme.lower() != "bearer" or not token.strip():
                    why = "missing API key: send the header Authorization: Bearer <key> (KTLEGACY_API_KEY)"
                elif not _key_ok(token.strip().encode("utf-8", "surrogateescape"), s.api_keys):
                    why = "invalid API key"
                else:
                    why = None
                if why:
                    await _json_error(401, path, why, "invalid_api_key", {"www-authenticate": "Bearer"},
                                      rec=rec)(scope, receive, send_wrapped)
                    return
            if method in ("POST", "PUT", "PATCH", "DELETE"):
                refused, receive = await self._read_body(scope, receive, headers, s, path, rec)
                if refused is not None:
                    await refused(scope, receive, send_wrapped)
                    return
                if receive is None:  # the client left while sending
                    rec.status = 499
                    return
            await self.app(scope, receive, send_wrapped)
        except Exception as exc:  # noqa: BLE001 - a bug: logged, answered 500 in the API's shape
            log.exception("ktlegacy api: %s %s failed", method, path)
            if rec.started:
                raise
            await _json_error(500, path, f"internal error: {type(exc).__name__}", "internal_error",
                              rec=rec)(scope, receive, send_wrapped)
        finally:
            _request_done(rec)

    async def _read_body(self, scope, receive, headers, s: Settings, path: str, rec: "_RequestRecord"):
        limit = s.max_body_bytes
        length = headers.get("content-length")
        if length is not None:
            if not length.strip().isdigit():
                return _json_error(400, path, "Content-Length is not a number", "invalid_request_error",
                                   rec=rec), receive
            if int(length) > limit:
                return _json_error(413, path, f"the request body is {int(length)} bytes; this server takes at most "
                                   f"{limit} (KTLEGACY_MAX_BODY_BYTES)", "request_too_large",
                                   {"connection": "close"}, rec=rec), receive
        chunks, size = [], 0
        deadline = time.monotonic() + s.body_timeout_s
        while True:
            left = deadline - time.monotonic()
            try:
                message = await asyncio.wait_for(receive(), timeout=max(left, 0.001))
            except asyncio.TimeoutError:
                return _json_error(408, path, f"the request body did not arrive within {s.body_timeout_s:g} s "
                                   "(KTLEGACY_BODY_TIMEOUT_S)", "request_timeout", {"connection": "close"},
                                   rec=rec), receive
            if message["type"] == "http.disconnect":
                return None, None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return _json_error(413, path, f"the request body is over {limit} bytes, the most this server takes "
                                   "(KTLEGACY_MAX_BODY_BYTES)", "request_too_large", {"connection": "close"},
                                   rec=rec), receive
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if path.startswith(JSON_ROUTES):
            try:
                body.decode("utf-8")
            except UnicodeDecodeError as exc:
                return _json_error(400, path, f"the request body is not valid UTF-8 (byte {exc.start})",
                                   "invalid_json", rec=rec), receive
            too_long = _list_bounds(body, s)
            if too_long:
                return _json_error(400, path, too_long, "invalid_value", rec=rec), receive
            raw = [(k, v) for k, v in scope.get("headers", ()) if k.lower() != b"content-type"]
            scope["headers"] = raw + [(b"content-type", b"application/json")]
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()
        return None, replay


def _list_bounds(body: bytes, s: Settings) -> Optional[str]:
    """The lists whose validation costs per item (messages, stop, tools, prompts), bounded on the
    parsed body before FastAPI validates it on the event loop: 100k messages in a 4 MiB body
    took a second to validate, during which nothing else was answered."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None  # FastAPI's parse says what is wrong
    if not isinstance(data, dict):
        return None
    options = data.get("options") if isinstance(data.get("options"), dict) else {}
    bounds = (("messages", data.get("messages"), s.max_messages, "messages, this server takes at most",
               " (KTLEGACY_MAX_MESSAGES)"),
              ("tools", data.get("tools"), MAX_TOOLS, "tools, this server takes at most", ""),
              ("stop", data.get("stop"), MAX_STOP_OLLAMA, "stop sequences, this server takes at most", ""),
              ("options.stop", options.get("stop"), MAX_STOP_OLLAMA, "stop sequences, this server takes at most", ""),
              ("prompt", data.get("prompt"), 1, "prompts, one per request: at most", ""))
    for name, value, limit, what, hint in bounds:
        if isinstance(value, list) and len(value) > limit:
            return f"{name}: {len(value)} {what} {limit}{hint}"
    return None


def _request_done(rec: _RequestRecord) -> None:
    status = rec.status or 499
    duration = time.monotonic() - rec.t0
    M_REQUESTS.labels(route=rec.route, status=str(status)).inc()
    M_DURATION.labels(route=rec.route).observe(duration)
    if rec.path in ("/health", "/metrics"):
        return  # polled every few seconds: counted, not logged
    gen = rec.gen
    fields = [f"id={rec.id}", f"{rec.method} {rec.route}", f"status={status}", f"model={rec.model or '-'}"]
    if gen is not None:
        ttft = (gen.t_first - gen.t_start) if gen.t_first else None
        fields += [f"prompt_tokens={gen.prompt_tokens}", f"completion_tokens={gen.completion_tokens}",
                   f"ttft_s={ttft:.3f}" if ttft is not None else "ttft_s=-", f"finish={gen.finish_reason}"]
    fields.append(f"duration_s={duration:.3f}")
    if rec.error:
        fields.append(f"error={json.dumps(rec.error[:200], ensure_ascii=False)}")
    if rec.prompt_text is not None and settings().log_prompts:
        fields.append(f"prompt={json.dumps(rec.prompt_text[-2000:], ensure_ascii=False)}")
    log.info("ktlegacy request %s", " ".join(fields))


def _record(request: Request) -> _RequestRecord:
    rec = request.scope.get("state", {}).get("ktlegacy")
    return rec if rec is not None else _RequestRecord(request.method, request.url.path)


def install(app: FastAPI) -> None:
    """Mount the routes, the error handlers and the guard (called by upstream's main.py, patched).
    Upstream's /docs, /redoc and /openapi.json come off unless KTLEGACY_DOCS=1."""
    s = settings()
    if not s.docs:
        hidden = {p for p in (app.openapi_url, app.docs_url, app.redoc_url) if p}
        if app.docs_url:
            hidden.add(app.docs_url + "/oauth2-redirect")
        app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) not in hidden]
        app.openapi_url = app.docs_url = app.redoc_url = None
    app.include_router(router)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_middleware(_Guard)
    log.info("ktlegacy api: %s; cross-origin: %s; body limit %d bytes", (
        f"{len(s.api_keys)} API key(s) required on every route but /health" if s.api_keys else
        "no API key (set KTLEGACY_API_KEY before exposing the port)"),
        ", ".join(s.cors_origins) or "refused", s.max_body_bytes)


# ---------------------------------------------------------------- loading, behind /health

class LoadProgress:
    """Bytes of the GGUF's tensors handed to the model so far (upstream's ``GGUFLoader`` reports
    each tensor it maps, see overlays/80_server_api.py): /health's ``progress`` and a log line at
    most every KTLEGACY_LOAD_LOG_S seconds (percent, GiB, rate, ETA). A CPU-experts tensor counts
    when its operator takes it; its pages are read right after, by the operator's warm-up."""

    def __init__(self):
        self.lock = threading.Lock()
        self.state = "idle"            # idle -> loading -> ok | error
        self.error = ""
        self.total = self.done = 0
        self.seen: set = set()
        self.loaders: set = set()
        self.t_start = self.t_logged = 0.0

    def begin(self) -> None:
        with self.lock:
            self.state, self.t_start, self.t_logged = "loading", time.monotonic(), time.monotonic()
        M_LOAD.set(0.0)

    def on_tensor(self, loader, name: str) -> None:
        with self.lock:
            if self.state != "loading":
                return
            if id(loader) not in self.loaders:
                self.loaders.add(id(loader))
                self.total += sum(_tensor_bytes(t) for t in getattr(loader, "tensor_info", {}).values())
            key = (id(loader), name)
            if key in self.seen:
                return
            self.seen.add(key)
            self.done += _tensor_bytes(loader.tensor_info.get(name, {}))
            M_LOAD.set(self.fraction())
            now = time.monotonic()
            if now - self.t_logged < settings().load_log_s:
                return
            self.t_logged = now
            line = self.line()
        log.info("ktlegacy load: %s", line)

    def fraction(self) -> float:
        return min(self.done / self.total, 1.0) if self.total else 0.0

    def rate(self) -> float:
        elapsed = time.monotonic() - self.t_start
        return self.done / elapsed if elapsed > 0 else 0.0

    def eta(self) -> Optional[float]:
        rate = self.rate()
        return (self.total - self.done) / rate if rate > 0 and self.total else None

    def line(self) -> str:
        unit, size = ("GiB", 1024 ** 3) if self.total >= 1024 ** 3 else ("MiB", 1024 ** 2)
        eta = self.eta()
        return (f"{100 * self.fraction():.1f}% of the GGUF, {self.done / size:.2f} of {self.total / size:.2f} {unit}, "
                f"{self.rate() / size:.2f} {unit}/s, ETA {'-' if eta is None else f'{eta:.0f} s'}")

    def finish(self, error: str = "") -> None:
        with self.lock:
            self.state, self.error = ("error", error) if error else ("ok", "")
            line = self.line()
        if not error:
            M_LOAD.set(1.0)
            log.info("ktlegacy load: done in %.1f s (%s)", time.monotonic() - self.t_start, line)

    def health(self) -> dict:
        with self.lock:
            eta = self.eta()
            return {"status": "loading", "progress": round(self.fraction(), 4),
                    "loaded_gib": round(self.done / 1024 ** 3, 3), "total_gib": round(self.total / 1024 ** 3, 3),
                    "elapsed_s": round(time.monotonic() - self.t_start, 1) if self.t_start else 0.0,
                    "eta_s": None if eta is None else round(eta, 1)}


def _tensor_bytes(t: dict) -> int:
    try:
        import numpy as np
        return int(t["item_count"]) * int(np.dtype(t["item_type"]).itemsize)
    except (KeyError, TypeError, ValueError):
        return 0


LOAD = LoadProgress()


def load_in_background(load) -> threading.Thread:
    """Run ``load()`` (upstream's create_interface, or a test's loader returning the interface) on
    a thread while the server already answers: /health is 503 with the progress until it
    returns. A failed load ends the process (exit 1), as a failed start did upstream."""
    try:
        from ktransformers.util.custom_gguf import GGUFLoader
        GGUFLoader.ktlegacy_on_tensor = staticmethod(LOAD.on_tensor)
    except ImportError as exc:  # no GGUF loader (a backend without it): progress stays 0
        log.warning("ktlegacy load: no GGUF progress (%s)", exc)
    LOAD.begin()

    def run():
        try:
            itf = load()
            if itf is not None:
                set_interface(itf)
        except BaseException as exc:  # noqa: BLE001 - reported, then the process ends
            log.exception("ktlegacy load: failed")
            LOAD.finish(f"{type(exc).__name__}: {exc}")
            print(f"ktlegacy load: error: the model did not load: {type(exc).__name__}: {exc}", file=sys.stderr,
                  flush=True)
            sys.stdout.flush()
            os._exit(1)
        LOAD.finish()

    thread = threading.Thread(target=run, name="ktlegacy-load", daemon=True)
    thread.start()
    return thread


# ---------------------------------------------------------------- the engine

class SamplingParams(BaseModel):
    max_tokens: Optional[int] = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = []
    seed: Optional[int] = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0


class Sampler:
    """Turns one position's logits into a token with a request's parameters (upstream's
    ``logits_to_token`` asks it first, see overlays/80_server_api.py). ``temperature`` below
    GREEDY_BELOW is argmax; penalties apply to the tokens this request generated. The routes
    bound every parameter, so the arithmetic stays finite; a distribution that is not (a model
    gone wrong) falls back to argmax instead of failing the request."""

    def __init__(self, params: SamplingParams):
        self.p = params
        self.counts: dict[int, int] = {}
        self.generator: torch.Generator | None = None

    def __call__(self, logits: torch.Tensor) -> int:
        p = self.p
        logits = logits.reshape(-1).float()
        if self.counts and (p.repetition_penalty != 1.0 or p.frequency_penalty or p.presence_penalty):
            logits = logits.clone()
            idx = torch.tensor(list(self.counts), device=logits.device)
            cnt = torch.tensor(list(self.counts.values()), device=logits.device, dtype=logits.dtype)
            sel = logits[idx]
            if p.repetition_penalty != 1.0:
                sel = torch.where(sel > 0, sel / p.repetition_penalty, sel * p.repetition_penalty)
            logits[idx] = sel - p.frequency_penalty * cnt - p.presence_penalty
        token = None
        if p.temperature >= GREEDY_BELOW:
            scaled = logits / p.temperature
            if p.top_k > 0 and p.top_k < scaled.numel():
                kth = torch.topk(scaled, p.top_k).values[-1]
                scaled = scaled.masked_fill(scaled < kth, float("-inf"))
            probs = torch.softmax(scaled, dim=-1)
            if p.top_p < 1.0:
                sorted_probs, order = torch.sort(probs, descending=True)
                drop = sorted_probs.cumsum(-1) - sorted_probs > p.top_p  # keeps at least the best one
                sorted_probs = sorted_probs.masked_fill(drop, 0.0)
                probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
            if p.seed is not None and self.generator is None:
                self.generator = torch.Generator(device=probs.device).manual_seed(p.seed % 2 ** 64)
            if bool(torch.isfinite(probs).all()) and float(probs.sum()) > 0:
                token = int(torch.multinomial(probs, 1, generator=self.generator))
        if token is None:
            token = int(torch.argmax(torch.nan_to_num(logits, nan=float("-inf"))))
        self.counts[token] = self.counts.get(token, 0) + 1
        return token


def _sdpa_math():
    # upstream's generate() decodes inside this context (torch 2.5's spelling)
    sdp_kernel = getattr(torch.backends.cuda, "sdp_kernel", None)
    if sdp_kernel is None:
        return nullcontext()
    return sdp_kernel(enable_flash=False, enable_mem_efficient=False, enable_math=True)


# DeepSeek-V3/R1's tool-call format (their chat template renders calls and results with these)
TC_CALLS_BEGIN, TC_CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
TC_BEGIN, TC_END, TC_SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
TC_MARKERS = (TC_CALLS_BEGIN, TC_CALLS_END, TC_BEGIN, TC_END, TC_SEP)


class Engine:
    """The loaded upstream backend interface (0.2.1.post1's ``KTransformersInterface`` or its
    base ``TransformersInterface``), driven token by token with upstream's own ``prefill`` and
    ``decode_one_tokens`` (CUDA graphs, device placement and cache handling stay upstream's)."""

    def __init__(self, interface):
        self.itf = interface
        self.tokenizer = interface.tokenizer
        eos = set()
        for source in (getattr(self.tokenizer, "eos_token_id", None),
                       getattr(getattr(getattr(interface, "model", None), "generation_config", None), "eos_token_id", None)):
            if isinstance(source, int):
                eos.add(source)
            elif isinstance(source, (list, tuple)):
                eos.update(int(t) for t in source)
        self.eos_ids = eos
        template = getattr(self.tokenizer, "chat_template", None)
        template = template if isinstance(template, str) else ""
        # the template can render DeepSeek's tool calls and tool results
        self.tool_format = TC_CALLS_BEGIN in template and TC_SEP in template
        # the template renders the request's tool definitions itself (else they go in a system message)
        self.template_renders_tools = bool(re.search(r"\btools\b", template))
        specials = set(getattr(self.tokenizer, "all_special_tokens", []) or [])
        self.strip_specials = sorted((specials - set(TC_MARKERS)) - {""}, key=len, reverse=True)
        try:  # prompt work runs on its own thread, with its own tokenizer
            self.prompt_tokenizer = copy.deepcopy(self.tokenizer)
        except Exception:  # noqa: BLE001 - then the shared one (encode and decode only borrow it)
            self.prompt_tokenizer = self.tokenizer
        self._max_token_chars = None

    @property
    def cache_lens(self) -> int:
        return int(self.itf.args.cache_lens)

    @property
    def max_new_tokens(self) -> int:
        return int(self.itf.args.max_new_tokens)

    @property
    def max_token_chars(self) -> int:
        """An upper bound of the characters one token stands for (the longest vocabulary entry)."""
        if self._max_token_chars is None:
            vocab = self.prompt_tokenizer.get_vocab()
            self._max_token_chars = max([len(t) for t in vocab] + [1])
        return self._max_token_chars

    def check_length(self, chars: int, field: str) -> None:
        """Refuse a prompt that cannot fit the KV cache before rendering or tokenizing it."""
        if chars > self.cache_lens * self.max_token_chars:
            raise ApiError(400, f"the prompt is {chars} characters, more than a {self.cache_lens}-token KV cache can "
                                "hold (--cache_lens, KTLEGACY_CACHE_LENS): shorten it", "context_length_exceeded",
                           field)

    def chat_ids(self, messages: list[dict], tools: Optional[list] = None) -> list[int]:
        kwargs = {"tools": tools} if tools and self.template_renders_tools else {}
        try:
            ids = self.prompt_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                            **kwargs)
        except Exception as exc:  # jinja's TemplateError: e.g. roles that must alternate
            log.info("ktlegacy api: the chat template refused a request", exc_info=True)
            raise ApiError(400, f"messages: the model's chat template refused them: {str(exc)[:200]}",
                           "invalid_value", "messages") from exc
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return [int(t) for t in ids]

    def text_ids(self, text: str) -> list[int]:
        return [int(t) for t in self.prompt_tokenizer.encode(text)]

    def decode(self, ids: list[int], keep_tool_markers: bool = False) -> str:
        if not keep_tool_markers:
            return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        text = self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        for special in self.strip_specials:
            text = text.replace(special, "")
        return text

    def generate(self, ids: list[int], sampler: Sampler, cancel: threading.Event):
        """Yield token ids: the prefill's, then one per decode step until the caller stops."""
        itf = self.itf
        itf.ktlegacy_sampler = sampler
        try:
            from ktransformers.server.backend.interfaces import transformers as upstream
            input_ids = torch.tensor([ids], dtype=torch.long, device=itf.args.device)
            itf.last_request_id = None  # never continue another request's cache
            with torch.no_grad():
                for _ in itf.prefill(input_ids, True):
                    pass
                yield int(itf.generated_ids[0, itf.seq_length - 1])
                step = 0
                while not cancel.is_set():
                    step += 1
                    with _sdpa_math():
                        if step > 1 and getattr(upstream, "flashinfer_enabled", False):
                            cfg = itf.model.config
                            upstream.MLAWrapperSingleton.plan_all(
                                None, None, None, itf.active_cache_position.to(torch.int32) + 1,
                                num_heads=cfg.num_attention_heads, head_dim_ckv=cfg.kv_lora_rank,
                                head_dim_kpe=cfg.qk_rope_head_dim, page_size=itf.cache.page_size,
                                sm_scale=(cfg.qk_rope_head_dim + cfg.qk_nope_head_dim) ** (-0.5),
                                q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)
                        token = int(itf.decode_one_tokens())
                    itf.append_new_tokens(token)
                    yield token
        finally:
            itf.ktlegacy_sampler = None
            itf.streamer.reset()


_engine: Engine | None = None
_interface = None
_ENGINE_EXECUTOR = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ktlegacy-engine")
_PROMPT_EXECUTOR = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ktlegacy-prompt")
_waiting = 0                      # requests queued for the engine (changed on two threads: under the lock)
_waiting_lock = threading.Lock()
M_QUEUE.set_function(lambda: _waiting)


def set_interface(interface) -> None:
    """Serve this backend interface (for an embedding app; upstream's main.py sets
    ``GlobalInterface.interface``, which is used otherwise)."""
    global _interface
    _interface = interface


def _current_interface():
    itf = _interface
    if itf is None:
        # imported by main.py before it serves; not imported here, since it pulls in every backend
        upstream = sys.modules.get("ktransformers.server.utils.create_interface")
        itf = getattr(getattr(upstream, "GlobalInterface", None), "interface", None)
    return itf


def engine() -> Engine:
    global _engine
    itf = _current_interface()
    if itf is None:
        raise ApiError(503, "the model is still loading: retry in a moment (GET /health shows the progress)",
                       "model_loading", headers={"retry-after": "10"})
    if _engine is None or _engine.itf is not itf:
        _engine = Engine(itf)
    return _engine


async def in_prompt_thread(fn, *args):
    """Template rendering and tokenization: on their own thread, never on the event loop."""
    return await asyncio.get_running_loop().run_in_executor(_PROMPT_EXECUTOR, lambda: fn(*args))


def served_name() -> str:
    from ktransformers.server.config.config import Config
    return str(Config().model_name)


def check_model(name: str) -> str:
    if len(name) > MAX_MODEL_NAME:
        raise ApiError(400, f"model: a model name has at most {MAX_MODEL_NAME} characters", "invalid_value", "model")
    served = served_name()
    if name not in (served, f"{served}:latest"):
        raise ApiError(404, f"model {_short(name, 80)} is not served here: this server serves {served!r} "
                            "(see /v1/models or /api/tags)", "model_not_found", "model")
    return served


class StopMatcher:
    """Cuts the text at the first stop string; holds back a tail that may begin one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.buf = ""

    def feed(self, text: str) -> tuple[str, bool]:
        self.buf += text
        hits = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buf = self.buf[:min(hits)], ""
            return out, True
        hold = _held_prefix(self.buf, self.stops)
        out, self.buf = self.buf[:len(self.buf) - hold], self.buf[len(self.buf) - hold:]
        return out, False

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out


def _held_prefix(buf: str, words) -> int:
    """Length of the longest tail of ``buf`` that is a proper prefix of one of ``words``."""
    hold = 0
    for w in words:
        for n in range(min(len(w) - 1, len(buf)), hold, -1):
            if buf.endswith(w[:n]):
                hold = n
                break
    return hold


class ToolCall:
    def __init__(self, index: int, name: str):
        self.index, self.name = index, name
        self.id = f"call_{uuid.uuid4().hex[:24]}"
        self.arguments = ""

    def openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}

    def parsed_arguments(self) -> Optional[dict]:
        try:
            value = json.loads(self.arguments) if self.arguments.strip() else {}
        except ValueError:
            return None
        return value if isinstance(value, dict) else None

    def as_text(self) -> str:
        """The call in the model's own format (Ollama's answer when the arguments are no JSON object)."""
        return f"{TC_BEGIN}function{TC_SEP}{self.name}\n```json\n{self.arguments}\n```{TC_END}"


class ToolCallParser:
    """DeepSeek-V3/R1 tool calls in the generated text, incrementally:

        <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\nARGS\\n```<｜tool▁call▁end｜>
        [\\n<｜tool▁call▁begin｜>...<｜tool▁call▁end｜>]<｜tool▁calls▁end｜>

    ``feed(text)`` returns events: ("text", str) outside calls, ("call_begin", ToolCall) once the
    name is known, ("call_args", (ToolCall, str)) as the arguments arrive (a possible closing
    fence held back), ("call_end", ToolCall). Streamed and collected answers use the same events,
    so both carry the same bytes."""

    ARG_ENDS = ("\n```" + TC_END, "```" + TC_END, TC_END)

    def __init__(self):
        self.buf = ""
        self.mode = "text"
        self.calls: list[ToolCall] = []
        self.cur: Optional[ToolCall] = None
        self.fence_checked = False

    def feed(self, text: str) -> list:
        self.buf += text
        events: list = []
        while True:
            before = (self.mode, len(self.buf))
            getattr(self, "_" + self.mode)(events)
            if (self.mode, len(self.buf)) == before:
                return events

    def finish(self) -> list:
        """The end of the generation: what is held back is text (or the unfinished call's arguments)."""
        events: list = []
        if self.mode == "text" and self.buf:
            events.append(("text", self.buf))
        elif self.mode == "args" and self.cur is not None:
            if self.buf:
                self.cur.arguments += self.buf
                events.append(("call_args", (self.cur, self.buf)))
            events.append(("call_end", self.cur))
        self.buf = ""
        return events

    def _text(self, events):
        hits = [(i, m) for m in (TC_CALLS_BEGIN, TC_BEGIN) for i in [self.buf.find(m)] if i >= 0]
        if hits:
            i, marker = min(hits)
            if i:
                events.append(("text", self.buf[:i]))
            self.buf = self.buf[i + len(marker):]
            self.mode = "calls" if marker == TC_CALLS_BEGIN else "head"
            return
        hold = _held_prefix(self.buf, (TC_CALLS_BEGIN, TC_BEGIN))
        if len(self.buf) > hold:
            events.append(("text", self.buf[:len(self.buf) - hold]))
            self.buf = self.buf[len(self.buf) - hold:]

    def _calls(self, events):
        rest = self.buf.lstrip()
        if rest.startswith(TC_BEGIN):
            self.buf, self.mode = rest[len(TC_BEGIN):], "head"
        elif rest.startswith(TC_CALLS_END):
            self.buf, self.mode = rest[len(TC_CALLS_END):], "text"
        elif rest and not (TC_BEGIN.startswith(rest) or TC_CALLS_END.startswith(rest)):
            self.mode = "text"  # not a call after all: the rest is text

    def _head(self, events):
        i = self.buf.find(TC_SEP)
        if i >= 0:
            self.buf, self.mode = self.buf[i + len(TC_SEP):], "name"

    def _name(self, events):
        cut = [i for i in (self.buf.find("\n"), self.buf.find(TC_END)) if i >= 0]
        if not cut:
            return
        i = min(cut)
        self.cur = ToolCall(len(self.calls), self.buf[:i].strip())
        self.calls.append(self.cur)
        events.append(("call_begin", self.cur))
        self.buf = self.buf[i + 1:] if self.buf[i] == "\n" else self.buf[i:]
        self.mode, self.fence_checked = "args", False

    def _args(self, events):
        cur = self.cur
        if not self.fence_checked:
            fence = "```json\n"
            if not self.buf:
                return
            if self.buf.startswith(fence):
                self.buf = self.buf[len(fence):]
            elif fence.startswith(self.buf):
                return  # wait: maybe the fence
            self.fence_checked = True
        ends = [(i, e) for e in self.ARG_ENDS for i in [self.buf.find(e)] if i >= 0]
        if ends:
            i, end = min(ends)
            body = self.buf[:i]
            if body:
                cur.arguments += body
                events.append(("call_args", (cur, body)))
            events.append(("call_end", cur))
            self.buf = self.buf[i + len(end):]
            self.mode, self.cur = "calls", None
            return
        hold = _held_prefix(self.buf, self.ARG_ENDS)
        if len(self.buf) > hold:
            body = self.buf[:len(self.buf) - hold]
            cur.arguments += body
            events.append(("call_args", (cur, body)))
            self.buf = self.buf[len(self.buf) - hold:]


class Generation:
    """One request's generation: events from :meth:`stream` ("text", "call_begin", "call_args",
    "call_end"), then the counts. ``tools`` turns on the tool-call parser."""

    def __init__(self, ids: list[int], params: SamplingParams, tools: bool = False):
        eng = engine()
        self.engine = eng
        self.ids = ids
        self.tools = tools
        self.prompt_tokens = len(ids)
        if self.prompt_tokens >= eng.cache_lens:
            raise ApiError(400, f"the prompt is {self.prompt_tokens} tokens but this server's KV cache holds "
                                f"{eng.cache_lens} (--cache_lens, KTLEGACY_CACHE_LENS): shorten the prompt or "
                                "restart the server with a longer cache", "context_length_exceeded", "messages")
        room = eng.cache_lens - self.prompt_tokens
        self.max_tokens = min(params.max_tokens or eng.max_new_tokens, eng.max_new_tokens, room)
        self.params = params
        self.completion_tokens = 0
        self.finish_reason = "stop"
        self.calls: list[ToolCall] = []
        self.created = time.time()
        self.t_start = time.monotonic()
        self.t_first = self.t_end = None
        self._cancel = threading.Event()

    def cancel(self) -> None:
        """Stop generating at the next token, or before the prefill if still queued (the client left)."""
        self._cancel.set()

    async def stream(self) -> AsyncIterator[tuple]:
        global _waiting
        if _waiting >= settings().max_queue:
            raise ApiError(503, f"the server is busy: {_waiting} requests are waiting for the model; retry later "
                                "(KTLEGACY_MAX_QUEUE)", "server_busy", headers={"retry-after": "5"})
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = self._cancel

        def put(kind, value=None):
            loop.call_soon_threadsafe(queue.put_nowait, (kind, value))

        def work():
            global _waiting
            with _waiting_lock:
                _waiting -= 1
            if cancel.is_set():
                self.finish_reason = "dropped"
                M_DROPPED.inc()
                log.info("ktlegacy api: a queued request was dropped before its prefill: its client left")
                put("end")
                return
            M_RUNNING.set(1)
            try:
                self._run(put, cancel)
                put("end")
            except BaseException as exc:  # reported to this request; the next one starts afresh
                log.exception("ktlegacy api: generation failed")
                put("error", exc)
            finally:
                M_RUNNING.set(0)

        with _waiting_lock:
            _waiting += 1
        loop.run_in_executor(_ENGINE_EXECUTOR, work)
        try:
            while True:
                kind, value = await queue.get()
                if kind == "error":
                    raise ApiError(500, f"generation failed: {type(value).__name__}: {str(value)[:200]}",
                                   "engine_error")
                if kind == "end":
                    return
                yield kind, value
        finally:
            cancel.set()

    def _run(self, put, cancel: threading.Event) -> None:
        eng, p = self.engine, self.params
        stops = StopMatcher(p.stop)
        parser = ToolCallParser() if self.tools else None
        out_ids: list[int] = []
        emitted = ""  # text decoded so far (held back while it ends in an incomplete character)
        self.finish_reason = "cancelled"

        def text_out(piece: str) -> bool:
            """Send text through the stop strings; True once one matched."""
            out, hit = stops.feed(piece)
            if out:
                put("text", out)
            return hit

        def handle(events) -> bool:
            for kind, value in events:
                if kind == "text":
                    if text_out(value):
                        return True
                else:
                    if kind == "call_begin":
                        self.calls.append(value)
                    put(kind, value)
            return False

        def feed(delta: str) -> bool:
            return handle(parser.feed(delta)) if parser is not None else text_out(delta)

        hit_stop = False
        for token in eng.generate(self.ids, Sampler(p), cancel):
            if self.t_first is None:
                self.t_first = time.monotonic()
            if token in eng.eos_ids:
                self.finish_reason = "stop"
                break
            out_ids.append(token)
            self.completion_tokens += 1
            text = eng.decode(out_ids, keep_tool_markers=parser is not None)
            if not text.endswith("\ufffd") and text.startswith(emitted):
                delta, emitted = text[len(emitted):], text
                if feed(delta):
                    self.finish_reason, hit_stop = "stop", True
                    break
            if self.completion_tokens >= self.max_tokens:
                self.finish_reason = "length"
                break
            if cancel.is_set():
                break
        if self.finish_reason in ("length", "stop") and not hit_stop:
            # what is still held back: an incomplete character, a possible stop or marker start
            rest = eng.decode(out_ids, keep_tool_markers=parser is not None)[len(emitted):] if out_ids else ""
            hit_stop = feed(rest) if rest else False
            if not hit_stop and parser is not None:
                hit_stop = handle(parser.finish())
            if hit_stop:
                self.finish_reason = "stop"
            else:
                tail = stops.flush()
                if tail:
                    put("text", tail)
        if self.calls and self.finish_reason == "stop":
            self.finish_reason = "tool_calls"
        self.t_end = time.monotonic()
        M_PROMPT.inc(self.prompt_tokens)
        M_GENERATED.inc(self.completion_tokens)
        if self.t_first is not None:
            M_TTFT.observe(self.t_first - self.t_start)
        if self.decode_tok_s:
            M_DECODE.observe(self.decode_tok_s)
        log.info("ktlegacy api: %d prompt + %d completion tokens, finish %s, first token %.3fs, %.2f tok/s",
                 self.prompt_tokens, self.completion_tokens, self.finish_reason,
                 (self.t_first or self.t_end) - self.t_start, self.decode_tok_s)

    @property
    def decode_tok_s(self) -> float:
        if self.t_first is None or self.t_end is None or self.completion_tokens < 2:
            return 0.0
        return (self.completion_tokens - 1) / max(self.t_end - self.t_first, 1e-9)

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


class _ClientLeft(Exception):
    pass


async def _first_then_rest(gen: Generation, request: Request):
    """Start a generation before the response headers go out, so that errors found before the
    first event (queue full, engine failure) are HTTP errors, not a broken stream. While the
    request waits for the engine, a client that leaves has it dropped before its prefill."""
    agen = gen.stream()
    task = asyncio.ensure_future(agen.__anext__())
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.25)
        if done:
            break
        if await request.is_disconnected():
            gen.cancel()
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, StopAsyncIteration):
                pass
            raise _ClientLeft()
    try:
        first = task.result()
    except StopAsyncIteration:
        first = None
    return first, agen


# ---------------------------------------------------------------- request parsing

def _flatten_content(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ApiError(400, f"{where}: only text content is supported by this model (got {_short(kind)})",
                               "unsupported_content", where)
        return "".join(texts)
    raise ApiError(400, f"{where}: content must be a string or a list of text parts", "invalid_value", where)


ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


def _tool_call_for_template(call: Any, where: str) -> dict:
    """An OpenAI or Ollama tool call of the history as the chat template takes it (arguments: a string)."""
    fn = call.get("function") if isinstance(call, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str) or not name or len(name) > MAX_MODEL_NAME:
        raise ApiError(400, f"{where}.function.name: a tool call needs a function name", "invalid_value", where)
    args = fn.get("arguments", "")
    if isinstance(args, (dict, list)):
        args = json.dumps(args, ensure_ascii=False)
    elif args is None:
        args = ""
    elif not isinstance(args, str):
        raise ApiError(400, f"{where}.function.arguments: a JSON string or object", "invalid_value", where)
    return {"type": "function", "function": {"name": name, "arguments": args}}


def _messages(messages: list, eng: Engine, field: str = "messages") -> list[dict]:
    if not messages:
        raise ApiError(400, f"{field}: at least one message is required", "invalid_value", field)
    limit = settings().max_messages
    if len(messages) > limit:
        raise ApiError(400, f"{field}: {len(messages)} messages, this server takes at most {limit} "
                            "(KTLEGACY_MAX_MESSAGES)", "invalid_value", field)
    out = []
    for i, m in enumerate(messages):
        where = f"{field}.{i}"
        role = ROLES.get(m.role) if isinstance(m.role, str) else None
        if role is None:
            raise ApiError(400, f"{where}.role: {_short(m.role)} is not supported (use system, user, assistant or "
                                "tool)", "invalid_value", f"{where}.role")
        item: dict = {"role": role, "content": _flatten_content(m.content, f"{where}.content")}
        calls = m.tool_calls
        if (role == "tool" or calls) and not eng.tool_format:
            raise ApiError(400, f"{where}: tool calls and tool results need a model whose chat template has a "
                                "tool-call format; this one has none", "invalid_value", where)
        if calls:
            if role != "assistant" or not isinstance(calls, list):
                raise ApiError(400, f"{where}.tool_calls: only an assistant message has a list of tool calls",
                               "invalid_value", f"{where}.tool_calls")
            item["tool_calls"] = [_tool_call_for_template(c, f"{where}.tool_calls.{j}") for j, c in enumerate(calls)]
            if not item["content"]:
                item["content"] = None  # DeepSeek's template renders the calls of a message without content
        out.append(item)
    return out


def _tools(tools: Optional[list], field: str = "tools") -> list[dict]:
    """Validated function tools, as {"type": "function", "function": {...}}."""
    if tools is None:
        return []
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise ApiError(400, f"{field}: a list of at most {MAX_TOOLS} tools", "invalid_value", field)
    out = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict) \
                or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ApiError(400, f"{field}.{i}: a tool is {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                                "\"parameters\": {...}}}", "invalid_value", f"{field}.{i}")
        out.append({"type": "function", "function": fn})
    return out


def _tools_system_text(tools: list[dict]) -> str:
    """The tool definitions for a DeepSeek template that does not render them (V3's and R1's do not)."""
    lines = [json.dumps(t["function"], ensure_ascii=False) for t in tools]
    return ("## Tools\n\nYou can call these functions (JSON schemas):\n" + "\n".join(lines) +
            f"\n\nTo call functions, answer with {TC_CALLS_BEGIN}, then for each call {TC_BEGIN}function{TC_SEP}"
            f"NAME\n```json\nARGUMENTS\n```{TC_END}, and end with {TC_CALLS_END}.")


def _with_tools(messages: list[dict], tools: list[dict], eng: Engine) -> list[dict]:
    if not tools or eng.template_renders_tools:
        return messages
    system = {"role": "system", "content": _tools_system_text(tools)}
    first = 1 if messages and messages[0]["role"] == "system" else 0
    return messages[:first] + [system] + messages[first:]


def _stop_list(stop, limit: int) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > limit:
        raise ApiError(400, f"stop: at most {limit} stop sequences", "invalid_value", "stop")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise ApiError(400, f"stop: a stop sequence has at most {MAX_STOP_CHARS} characters", "invalid_value", "stop")
    return stops


def _server_default(name: str, fallback: float) -> float:
    try:
        from ktransformers.server.config.config import Config
        value = getattr(Config(), name, None)
        return fallback if value is None else float(value)
    except Exception:  # noqa: BLE001 - a default, never an error
        return fallback


def _chars(messages: list[dict], tools: list[dict]) -> int:
    n = sum(len(m.get("content") or "") for m in messages)
    n += sum(len(c["function"]["arguments"]) for m in messages for c in m.get("tool_calls") or ())
    return n + sum(len(json.dumps(t)) for t in tools)


def _tool_plan(eng: Engine, tools: list[dict], choice) -> tuple[list[dict], dict]:
    """(tools to offer the model, response headers). Tools are offered through a template with
    DeepSeek's tool-call format; without one they are left out (the same on both routes)."""
    if choice not in (None, "auto", "none"):
        shown = choice if isinstance(choice, str) else "a named function"
        raise ApiError(400, f"tool_choice: {_short(shown)} is not supported: this server cannot force a call "
                            "(use \"auto\" or \"none\")", "invalid_value", "tool_choice")
    if not tools or choice == "none":
        return [], {}
    if not eng.tool_format:
        return [], {"x-ktlegacy-tools": "ignored; the model's chat template has no tool-call format"}
    return tools, {}


async def collect_events(gen: Generation, request: Request) -> list:
    """Every event of a non-streamed request, in order; stops generating (or drops the queued
    request) if the client goes away."""
    events: list = []

    async def consume():
        async for event in gen.stream():
            events.append(event)

    task = asyncio.ensure_future(consume())
    while not task.done():
        await asyncio.wait({task}, timeout=0.25)
        if not task.done() and await request.is_disconnected():
            gen.cancel()
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            if gen.finish_reason != "dropped":
                gen.finish_reason = "cancelled"
            break
    if not task.cancelled():
        task.result()  # re-raise an ApiError from the generation
    return events


def _text_of(events: list) -> str:
    return "".join(v for k, v in events if k == "text")


# ---------------------------------------------------------------- OpenAI

_STRICT = ConfigDict(extra="allow", allow_inf_nan=False)


def _number(value):
    if isinstance(value, (bool, str)):
        raise ValueError("expected a number")
    return value


def _whole(value):
    if isinstance(value, (bool, str, float)):
        raise ValueError("expected a whole number")
    return value


Num = Annotated[float, BeforeValidator(_number)]    # JSON numbers only (no true, no "0.5")
Whole = Annotated[int, BeforeValidator(_whole)]     # JSON integers only (no 2.0, no 1e308)


class OAIMessage(BaseModel):
    model_config = _STRICT
    role: Any
    content: Any = None
    tool_calls: Optional[Any] = None
    tool_call_id: Optional[Any] = None


# accepted by OpenAI, impossible here: refused by name instead of ignored
OAI_UNSUPPORTED = {"functions": "the deprecated functions API is not supported (use tools)",
                   "function_call": "the deprecated functions API is not supported (use tool_choice)",
                   "audio": "audio output is not supported by this model",
                   "prediction": "predicted outputs are not supported by this server",
                   "web_search_options": "web search is not supported by this server"}


class OAISampling(BaseModel):
    model_config = _STRICT
    model: str
    stream: bool = False
    stream_options: Optional[dict] = None
    max_tokens: Optional[Whole] = Field(None, ge=1)
    max_completion_tokens: Optional[Whole] = Field(None, ge=1)
    temperature: Optional[Num] = Field(None, ge=0, le=2)
    top_p: Optional[Num] = Field(None, ge=0, le=1)
    top_k: Optional[Whole] = Field(None, ge=0)
    stop: Optional[Union[str, list[str]]] = None
    n: Optional[Whole] = None
    seed: Optional[Whole] = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    frequency_penalty: Optional[Num] = Field(None, ge=-2, le=2)
    presence_penalty: Optional[Num] = Field(None, ge=-2, le=2)
    repetition_penalty: Optional[Num] = Field(None, ge=0.01, le=10)
    logprobs: Optional[Union[bool, int]] = None
    top_logprobs: Optional[Whole] = None
    logit_bias: Optional[dict] = None
    response_format: Optional[Any] = None
    modalities: Optional[list] = None

    def sampling(self) -> SamplingParams:
        if self.n is not None and self.n != 1:
            raise ApiError(400, "n: only n=1 is supported (one KV cache)", "invalid_value", "n")
        if self.logprobs:
            raise ApiError(400, "logprobs: not supported by this server", "invalid_value", "logprobs")
        if self.top_logprobs is not None:
            raise ApiError(400, "top_logprobs: not supported by this server", "invalid_value", "top_logprobs")
        if self.logit_bias:
            raise ApiError(400, "logit_bias: not supported by this server", "invalid_value", "logit_bias")
        rf = self.response_format
        if rf is not None and not (isinstance(rf, dict) and rf.get("type") == "text"):
            raise ApiError(400, "response_format: structured output (json_object, json_schema) is not supported by "
                                "this server", "invalid_value", "response_format")
        if self.modalities is not None and set(self.modalities) - {"text"}:
            raise ApiError(400, "modalities: this model answers text only", "invalid_value", "modalities")
        for name, why in OAI_UNSUPPORTED.items():
            if (self.model_extra or {}).get(name) is not None:
                raise ApiError(400, f"{name}: {why}", "invalid_value", name)
        return SamplingParams(
            max_tokens=self.max_completion_tokens or self.max_tokens,
            temperature=_server_default("temperature", 1.0) if self.temperature is None else self.temperature,
            top_p=_server_default("top_p", 1.0) if self.top_p is None else self.top_p,
            top_k=self.top_k or 0, stop=_stop_list(self.stop, MAX_STOP_OPENAI), seed=self.seed,
            frequency_penalty=self.frequency_penalty or 0.0, presence_penalty=self.presence_penalty or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0)

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class OAIChatRequest(OAISampling):
    messages: list[OAIMessage]
    tools: Optional[Any] = None
    tool_choice: Optional[Any] = None


class OAICompletionRequest(OAISampling):
    prompt: Union[str, list[str]]
    echo: Optional[bool] = None
    suffix: Optional[str] = None
    best_of: Optional[Whole] = None


router = APIRouter()


@router.get("/health", tags=["ktlegacy"])
async def health():
    if _current_interface() is not None:
        return {"status": "ok", "model": served_name()}
    if LOAD.state == "error":
        return JSONResponse({"status": "error", "error": LOAD.error}, status_code=503)
    return JSONResponse(LOAD.health(), status_code=503)


@router.get("/metrics", tags=["ktlegacy"])
async def metrics():
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


def _model_card(name: str) -> dict:
    return {"id": name, "object": "model", "created": STARTED, "owned_by": "ktransformers"}


@router.get("/v1/models", tags=["openai"])
async def list_models():
    return {"object": "list", "data": [_model_card(served_name())]}


@router.get("/v1/models/{model_id:path}", tags=["openai"])
async def get_model(model_id: str):
    return _model_card(check_model(model_id))


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _openai_stream(request: Request, gen: Generation, make_chunk, include_usage: bool, headers: dict):
    try:
        first, rest = await _first_then_rest(gen, request)
    except _ClientLeft:
        return Response(status_code=499)

    async def body():
        try:
            yield _sse(make_chunk(None, None, start=True))
            if first is not None:
                for event in [first]:
                    chunk = make_chunk(event, None)
                    if chunk is not None:
                        yield _sse(chunk)
                async for event in rest:
                    chunk = make_chunk(event, None)
                    if chunk is not None:
                        yield _sse(chunk)
            yield _sse(make_chunk(None, gen.finish_reason))
            if include_usage:
                final = make_chunk(None, None)
                final["choices"] = []
                final["usage"] = gen.usage()
                yield _sse(final)
        except ApiError as exc:
            yield _sse({"error": {"message": exc.message, "type": "server_error", "param": None, "code": exc.code}})
        finally:
            gen.cancel()  # a client that went away stops the generation
        yield "data: [DONE]\n\n"
    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", **headers})


def _chat_delta(event) -> Optional[dict]:
    kind, value = event
    if kind == "text":
        return {"content": value}
    if kind == "call_begin":
        return {"tool_calls": [{"index": value.index, "id": value.id, "type": "function",
                                "function": {"name": value.name, "arguments": ""}}]}
    if kind == "call_args":
        call, text = value
        return {"tool_calls": [{"index": call.index, "function": {"arguments": text}}]}
    return None


def _last_user_text(messages: list[dict]) -> str:
    return next((m.get("content") or "" for m in reversed(messages) if m["role"] == "user"), "")


@router.post("/v1/chat/completions", tags=["openai"])
async def chat_completions(request: Request, body: OAIChatRequest):
    rec = _record(request)
    rec.model = model = check_model(body.model)
    params = body.sampling()
    eng = engine()
    offered, headers = _tool_plan(eng, _tools(body.tools), body.tool_choice)
    messages = _messages(body.messages, eng)
    eng.check_length(_chars(messages, offered), "messages")
    rec.prompt_text = _last_user_text(messages)
    ids = await in_prompt_thread(eng.chat_ids, _with_tools(messages, offered, eng), offered or None)
    rec.gen = gen = Generation(ids, params, tools=bool(offered))
    cid = f"chatcmpl-{uuid.uuid4().hex}"
    base = {"id": cid, "created": int(gen.created), "model": model, "system_fingerprint": "ktlegacy"}
    if body.stream:
        def chunk(event, finish, start=False):
            if start:
                delta = {"role": "assistant", "content": ""}
            elif event is not None:
                delta = _chat_delta(event)
                if delta is None:
                    return None
            else:
                delta = {}
            return {**base, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        return await _openai_stream(request, gen, chunk, body.include_usage, headers)
    events = await collect_events(gen, request)
    text = _text_of(events)
    message: dict = {"role": "assistant", "content": text if text or not gen.calls else None}
    if gen.calls:
        message["tool_calls"] = [c.openai() for c in gen.calls]
    return JSONResponse({**base, "object": "chat.completion",
                         "choices": [{"index": 0, "message": message, "logprobs": None,
                                      "finish_reason": gen.finish_reason}],
                         "usage": gen.usage()}, headers=headers)


@router.post("/v1/completions", tags=["openai"])
async def completions(request: Request, body: OAICompletionRequest):
    rec = _record(request)
    rec.model = model = check_model(body.model)
    params = body.sampling()
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise ApiError(400, "prompt: one prompt per request (a string or a list of one string)",
                           "invalid_value", "prompt")
        prompt = prompt[0]
    if body.echo or body.suffix:
        raise ApiError(400, "echo and suffix are not supported by this server", "invalid_value",
                       "echo" if body.echo else "suffix")
    if body.best_of is not None and body.best_of != 1:
        raise ApiError(400, "best_of: only best_of=1 is supported", "invalid_value", "best_of")
    eng = engine()
    eng.check_length(len(prompt), "prompt")
    rec.prompt_text = prompt
    rec.gen = gen = Generation(await in_prompt_thread(eng.text_ids, prompt), params)
    base = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(gen.created),
            "model": model, "system_fingerprint": "ktlegacy"}
    if body.stream:
        def chunk(event, finish, start=False):
            text = event[1] if event is not None and event[0] == "text" else ""
            if event is not None and event[0] != "text":
                return None
            return {**base, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
        return await _openai_stream(request, gen, chunk, body.include_usage, {})
    text = _text_of(await collect_events(gen, request))
    return {**base, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": gen.finish_reason}],
            "usage": gen.usage()}


# ---------------------------------------------------------------- Ollama

def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def _gguf_files() -> list[Path]:
    from ktransformers.server.config.config import Config
    path = Path(str(getattr(Config(), "gguf_path", "") or ""))
    files = [path] if path.is_file() else sorted(path.glob("*.gguf")) if path.is_dir() else []
    return files


def _model_entry() -> dict:
    name = served_name()
    files = _gguf_files()
    h = hashlib.sha256(name.encode())  # an identifier of the served files, not of their bytes
    size, mtimes = 0, []
    for f in files:
        st = f.stat()
        size += st.st_size
        mtimes.append(int(st.st_mtime))
        h.update(f"\0{f.name}\0{st.st_size}\0{int(st.st_mtime)}".encode())
    mtime = max(mtimes) if mtimes else STARTED
    family = ""
    try:
        family = str(engine().itf.model.config.model_type)
    except (ApiError, AttributeError):
        pass
    return {"name": name, "model": name, "modified_at": datetime.fromtimestamp(mtime, timezone.utc).isoformat(),
            "size": size, "digest": h.hexdigest(),
            "details": {"parent_model": "", "format": "gguf", "family": family, "families": [family] if family else [],
                        "parameter_size": "", "quantization_level": ""}}


class OllamaMessage(BaseModel):
    model_config = _STRICT
    role: Any
    content: Any = ""
    images: Optional[list] = None
    tool_calls: Optional[Any] = None


class OllamaOptions(BaseModel):
    model_config = _STRICT  # num_ctx, num_thread, ...: the server's own settings win
    num_predict: Optional[Whole] = None
    temperature: Optional[Num] = Field(None, ge=0, le=2)
    top_p: Optional[Num] = Field(None, ge=0, le=1)
    top_k: Optional[Whole] = Field(None, ge=0)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[Whole] = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    repeat_penalty: Optional[Num] = Field(None, ge=0.01, le=10)
    frequency_penalty: Optional[Num] = Field(None, ge=-2, le=2)
    presence_penalty: Optional[Num] = Field(None, ge=-2, le=2)

    def sampling(self) -> SamplingParams:
        n = self.num_predict
        return SamplingParams(
            max_tokens=None if n is None or n < 0 else max(n, 1),
            temperature=_server_default("temperature", 0.8) if self.temperature is None else self.temperature,
            top_p=_server_default("top_p", 0.9) if self.top_p is None else self.top_p,
            top_k=self.top_k or 0, stop=_stop_list(self.stop, MAX_STOP_OLLAMA), seed=self.seed,
            frequency_penalty=self.frequency_penalty or 0.0, presence_penalty=self.presence_penalty or 0.0,
            repetition_penalty=self.repeat_penalty or 1.0)


class OllamaBase(BaseModel):
    model_config = _STRICT
    model: str
    stream: bool = True
    format: Optional[Any] = None
    options: Optional[OllamaOptions] = None
    keep_alive: Optional[Union[str, int, float]] = None  # the model stays loaded: ignored

    def sampling(self) -> SamplingParams:
        if self.format:
            raise ApiError(400, "format: structured output is not supported by this server", "invalid_value", "format")
        return (self.options or OllamaOptions()).sampling()


class OllamaGenerateRequest(OllamaBase):
    prompt: Optional[str] = ""
    suffix: Optional[str] = None
    system: Optional[str] = None
    template: Optional[str] = None
    context: Optional[list[int]] = None
    raw: Optional[bool] = False
    images: Optional[list] = None


class OllamaChatRequest(OllamaBase):
    messages: list[OllamaMessage] = []
    tools: Optional[Any] = None


def _ollama_stats(gen: Generation) -> dict:
    end = gen.t_end or time.monotonic()
    first = gen.t_first or end
    return {"total_duration": int((end - gen.t_start) * 1e9), "load_duration": 0,
            "prompt_eval_count": gen.prompt_tokens, "prompt_eval_duration": int((first - gen.t_start) * 1e9),
            "eval_count": gen.completion_tokens, "eval_duration": int((end - first) * 1e9)}


def _ndjson(obj) -> str:
    return json.dumps(obj, ensure_ascii=False) + "\n"


def _ollama_piece(event) -> Optional[tuple[str, Optional[dict]]]:
    """(content, tool call) of an event in an Ollama answer: calls come whole, at their end."""
    kind, value = event
    if kind == "text":
        return value, None
    if kind == "call_end":
        args = value.parsed_arguments()
        if args is None:  # not a JSON object: the call as the model wrote it
            return value.as_text(), None
        return "", {"function": {"name": value.name, "arguments": args}}
    return None


def _done_reason(gen: Generation) -> str:
    return "stop" if gen.finish_reason == "tool_calls" else gen.finish_reason


async def _ollama_answer(request: Request, gen: Generation, stream: bool, make, headers: dict):
    if not stream:
        content, calls = "", []
        for event in await collect_events(gen, request):
            piece = _ollama_piece(event)
            if piece is not None:
                content += piece[0]
                calls += [piece[1]] if piece[1] else []
        return JSONResponse({**make(content, True, calls), "done_reason": _done_reason(gen), **_ollama_stats(gen)},
                            headers=headers)
    try:
        first, rest = await _first_then_rest(gen, request)
    except _ClientLeft:
        return Response(status_code=499)

    async def events():
        if first is not None:
            yield first
            async for event in rest:
                yield event

    async def body():
        try:
            async for event in events():
                piece = _ollama_piece(event)
                if piece is not None:
                    yield _ndjson(make(piece[0], False, [piece[1]] if piece[1] else []))
            yield _ndjson({**make("", True, []), "done_reason": _done_reason(gen), **_ollama_stats(gen)})
        except ApiError as exc:
            yield _ndjson({"error": exc.message})
        finally:
            gen.cancel()
    return StreamingResponse(body(), media_type="application/x-ndjson", headers=headers)


@router.post("/api/generate", tags=["ollama"])
async def ollama_generate(request: Request, body: OllamaGenerateRequest):
    rec = _record(request)
    rec.model = model = check_model(body.model)
    params = body.sampling()
    for field in ("suffix", "template", "context", "images"):
        if getattr(body, field):
            raise ApiError(400, f"{field}: not supported by this server", "invalid_value", field)
    if not body.prompt:  # Ollama's "load the model" request: it is loaded
        engine()
        return {"model": model, "created_at": _now(), "response": "", "done": True, "done_reason": "load"}
    eng = engine()
    eng.check_length(len(body.prompt) + len(body.system or ""), "prompt")
    rec.prompt_text = body.prompt
    if body.raw:
        ids = await in_prompt_thread(eng.text_ids, body.prompt)
    else:
        messages = ([{"role": "system", "content": body.system}] if body.system else []) + \
                   [{"role": "user", "content": body.prompt}]
        ids = await in_prompt_thread(eng.chat_ids, messages)
    rec.gen = gen = Generation(ids, params)
    return await _ollama_answer(request, gen, body.stream,
                                lambda text, done, calls: {"model": model, "created_at": _now(), "response": text,
                                                           "done": done}, {})


@router.post("/api/chat", tags=["ollama"])
async def ollama_chat(request: Request, body: OllamaChatRequest):
    rec = _record(request)
    rec.model = model = check_model(body.model)
    params = body.sampling()
    for i, m in enumerate(body.messages):
        if m.images:
            raise ApiError(400, f"messages.{i}.images: this model takes text only", "invalid_value", "images")
    if not body.messages:
        engine()
        return {"model": model, "created_at": _now(), "message": {"role": "assistant", "content": ""},
                "done": True, "done_reason": "load"}
    eng = engine()
    offered, headers = _tool_plan(eng, _tools(body.tools), None)
    messages = _messages(body.messages, eng)
    eng.check_length(_chars(messages, offered), "messages")
    rec.prompt_text = _last_user_text(messages)
    ids = await in_prompt_thread(eng.chat_ids, _with_tools(messages, offered, eng), offered or None)
    rec.gen = gen = Generation(ids, params, tools=bool(offered))

    def make(text, done, calls):
        message = {"role": "assistant", "content": text}
        if calls:
            message["tool_calls"] = calls
        return {"model": model, "created_at": _now(), "message": message, "done": done}
    return await _ollama_answer(request, gen, body.stream, make, headers)


@router.get("/api/tags", tags=["ollama"])
async def ollama_tags():
    return {"models": [_model_entry()]}


@router.get("/api/ps", tags=["ollama"])
async def ollama_ps():
    entry = _model_entry()
    return {"models": [{**entry, "expires_at": "9999-12-31T23:59:59Z", "size_vram": 0}]}


class OllamaShowRequest(BaseModel):
    model_config = _STRICT
    model: Optional[str] = None
    name: Optional[str] = None


@router.post("/api/show", tags=["ollama"])
async def ollama_show(body: OllamaShowRequest):
    name = body.model or body.name
    if not name:
        raise ApiError(400, "model: required", "invalid_value", "model")
    check_model(name)
    entry = _model_entry()
    eng = engine()
    template = getattr(eng.tokenizer, "chat_template", None) or ""
    return {"modelfile": "", "parameters": "", "template": template if isinstance(template, str) else "",
            "details": entry["details"], "model_info": {"general.architecture": entry["details"]["family"]},
            "capabilities": ["completion"] + (["tools"] if eng.tool_format else []),
            "modified_at": entry["modified_at"]}


@router.get("/api/version", tags=["ollama"])
async def ollama_version():
    try:
        import ktransformers
        ours = str(ktransformers.__version__)
    except Exception:  # noqa: BLE001
        ours = "unknown"
    return {"version": OLLAMA_API_VERSION, "ktransformers": ours, "server": "ktlegacy"}
