"""ktlegacy's OpenAI- and Ollama-compatible HTTP API for upstream's ktransformers server.

Written into the patched tree as ``ktransformers/server/api/ktlegacy_api.py`` by
``overlays/80_server_api.py``, which mounts it in place of upstream's ``/v1/models``,
``/v1/chat/completions``, ``/v1/completions`` and ``/api/*`` routes (upstream's assistants API
stays). What it fixes, found by driving upstream's routes with the real ``openai`` and
``ollama`` client packages:

* ``/v1/models`` was a bare list (the openai client wants ``{"object": "list", "data": [...]}``);
  ``/api/tags`` had ``modified_at: "123"`` (the ollama client parses a timestamp); ``/api/chat``
  and non-streamed ``/api/generate`` raised ``NotImplementedError`` (HTTP 500).
* Requests' ``max_tokens``, ``temperature``, ``top_p``, ``stop``, ``seed`` (and Ollama's
  ``options``) were ignored: every request sampled at the server's start-up temperature with a
  repetition penalty, so ``temperature=0`` was not greedy. Here each request samples with its own
  parameters; ``temperature`` 0 is plain argmax.
* No ``usage``; non-streamed chat answers said ``object: chat.completion.chunk``; the request's
  model name was not checked; a prompt longer than the KV cache (``--cache_lens``) ran off its end.
* Generation ran on the event loop: while one answer was generated the server answered nothing
  else (health checks included), and a client that went away kept the GPU busy.

Generation runs on one worker thread (the engine has one KV cache): requests queue in arrival
order, the event loop stays free, a client that disconnects cancels its generation at the next
token. Errors are JSON with a status code: OpenAI's ``{"error": {...}}`` shape under ``/v1``,
Ollama's ``{"error": "..."}`` under ``/api``.

Token counting: ``usage.completion_tokens`` (Ollama: ``eval_count``) counts the tokens generated
for the answer, excluding an end-of-sequence token; ``prompt_tokens`` is the templated prompt.
"""

import asyncio
import hashlib
import json
import logging
import os
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, AsyncIterator, Optional, Union

import torch
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger("uvicorn.error")

# Requests waiting for the engine beyond this are answered 503 at once (KTLEGACY_MAX_QUEUE).
MAX_WAITING = int(os.environ.get("KTLEGACY_MAX_QUEUE", "64"))
STARTED = int(time.time())
_EXECUTOR = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ktlegacy-engine")
_waiting = 0                      # requests queued for the engine (changed on two threads: under the lock)
_waiting_lock = threading.Lock()


# ---------------------------------------------------------------- errors

class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


def _error_response(path: str, status: int, message: str, code: str, param: str | None = None) -> JSONResponse:
    if path.startswith("/api/"):
        return JSONResponse({"error": message}, status_code=status)
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status)


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return _error_response(request.url.path, exc.status, exc.message, exc.code, exc.param)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    if first.get("type") == "json_invalid":
        message = f"the request body is not valid JSON ({first.get('ctx', {}).get('error', first.get('msg'))})"
        code, where = "invalid_json", ""
    else:
        message = f"{where or 'body'}: {first.get('msg', 'invalid value')}"
        code = "invalid_value"
    return _error_response(request.url.path, 400, message, code, where or None)


class _JsonByDefault:
    """A POST to our routes without a Content-Type is read as JSON, as Ollama does
    (its documentation's examples are ``curl URL -d '{...}'``)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if (scope["type"] == "http" and scope.get("method") == "POST" and scope.get("path", "").startswith(OUR_PATHS)
                and not any(k.lower() == b"content-type" for k, _ in scope.get("headers", ()))):
            scope = dict(scope, headers=list(scope.get("headers", ())) + [(b"content-type", b"application/json")])
        await self.app(scope, receive, send)


OUR_PATHS = ("/api/", "/v1/chat/completions", "/v1/completions")


def install(app: FastAPI) -> None:
    """Mount the routes and the error handlers (called by upstream's main.py, patched)."""
    app.include_router(router)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_middleware(_JsonByDefault)


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
    ``logits_to_token`` asks it first, see overlays/80_server_api.py). ``temperature`` 0 is
    argmax; penalties apply to the tokens this request generated."""

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
        if p.temperature <= 0:
            token = int(torch.argmax(logits))
        else:
            logits = logits / p.temperature
            if p.top_k > 0 and p.top_k < logits.numel():
                kth = torch.topk(logits, p.top_k).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            if p.top_p < 1.0:
                sorted_probs, order = torch.sort(probs, descending=True)
                drop = sorted_probs.cumsum(-1) - sorted_probs > p.top_p  # keeps at least the best one
                sorted_probs = sorted_probs.masked_fill(drop, 0.0)
                probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
            if p.seed is not None and self.generator is None:
                self.generator = torch.Generator(device=probs.device).manual_seed(p.seed)
            token = int(torch.multinomial(probs, 1, generator=self.generator))
        self.counts[token] = self.counts.get(token, 0) + 1
        return token


def _sdpa_math():
    # upstream's generate() decodes inside this context (torch 2.5's spelling)
    sdp_kernel = getattr(torch.backends.cuda, "sdp_kernel", None)
    if sdp_kernel is None:
        return nullcontext()
    return sdp_kernel(enable_flash=False, enable_mem_efficient=False, enable_math=True)


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

    @property
    def cache_lens(self) -> int:
        return int(self.itf.args.cache_lens)

    @property
    def max_new_tokens(self) -> int:
        return int(self.itf.args.max_new_tokens)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        try:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as exc:  # jinja's TemplateError: e.g. roles that must alternate
            raise ApiError(400, f"messages: the model's chat template refused them: {exc}", "invalid_value",
                           "messages") from exc
        return [int(t) for t in ids]

    def text_ids(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text)]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

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


def set_interface(interface) -> None:
    """Serve this backend interface (for an embedding app; upstream's main.py sets
    ``GlobalInterface.interface``, which is used otherwise)."""
    global _interface
    _interface = interface


def engine() -> Engine:
    global _engine
    itf = _interface
    if itf is None:
        # imported by main.py before it serves; not imported here, since it pulls in every backend
        upstream = sys.modules.get("ktransformers.server.utils.create_interface")
        itf = getattr(getattr(upstream, "GlobalInterface", None), "interface", None)
    if itf is None:
        raise ApiError(503, "the model is still loading: retry in a moment", "model_loading")
    if _engine is None or _engine.itf is not itf:
        _engine = Engine(itf)
    return _engine


def served_name() -> str:
    from ktransformers.server.config.config import Config
    return str(Config().model_name)


def check_model(name: str) -> str:
    served = served_name()
    if name not in (served, f"{served}:latest"):
        raise ApiError(404, f"model {name!r} is not served here: this server serves {served!r} "
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
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.buf)), 0, -1):
                if self.buf.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        out, self.buf = self.buf[:len(self.buf) - hold], self.buf[len(self.buf) - hold:]
        return out, False

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out


class Generation:
    """One request's generation: text deltas from :meth:`stream`, then the counts."""

    def __init__(self, ids: list[int], params: SamplingParams):
        eng = engine()
        self.engine = eng
        self.ids = ids
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
        self.created = time.time()
        self.t_start = time.monotonic()
        self.t_first = self.t_end = None
        self._cancel = threading.Event()

    def cancel(self) -> None:
        """Stop generating at the next token (the client went away)."""
        self._cancel.set()

    async def stream(self) -> AsyncIterator[str]:
        global _waiting
        if _waiting >= MAX_WAITING:
            raise ApiError(503, f"the server is busy: {_waiting} requests are waiting for the model; retry later "
                                "(KTLEGACY_MAX_QUEUE)", "server_busy")
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
                put("end")
                return
            try:
                self._run(put, cancel)
                put("end")
            except BaseException as exc:  # reported to this request; the next one starts afresh
                log.exception("ktlegacy api: generation failed")
                put("error", exc)

        with _waiting_lock:
            _waiting += 1
        loop.run_in_executor(_EXECUTOR, work)
        try:
            while True:
                kind, value = await queue.get()
                if kind == "text":
                    yield value
                elif kind == "error":
                    raise ApiError(500, f"generation failed: {type(value).__name__}: {value}", "engine_error")
                else:
                    return
        finally:
            cancel.set()

    def _run(self, put, cancel: threading.Event) -> None:
        eng, p = self.engine, self.params
        stops = StopMatcher(p.stop)
        out_ids: list[int] = []
        emitted = ""  # text sent so far (held back while it ends in an incomplete character)
        self.finish_reason = "cancelled"
        hit_stop = False
        for token in eng.generate(self.ids, Sampler(p), cancel):
            if self.t_first is None:
                self.t_first = time.monotonic()
            if token in eng.eos_ids:
                self.finish_reason = "stop"
                break
            out_ids.append(token)
            self.completion_tokens += 1
            text = eng.decode(out_ids)
            if not text.endswith("\ufffd") and text.startswith(emitted):
                piece, hit = stops.feed(text[len(emitted):])
                emitted = text
                if piece:
                    put("text", piece)
                if hit:
                    self.finish_reason, hit_stop = "stop", True
                    break
            if self.completion_tokens >= self.max_tokens:
                self.finish_reason = "length"
                break
            if cancel.is_set():
                break
        if self.finish_reason in ("length", "stop") and not hit_stop:
            # what is still held back: an incomplete character, a possible stop-string start
            rest = eng.decode(out_ids)[len(emitted):] if out_ids else ""
            piece, hit = stops.feed(rest)
            if hit:
                self.finish_reason = "stop"
            tail = piece if hit else piece + stops.flush()
            if tail:
                put("text", tail)
        self.t_end = time.monotonic()
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


async def collect(gen: Generation, request: Request) -> str:
    """The whole answer of a non-streamed request; stops generating if the client goes away."""
    parts: list[str] = []

    async def consume():
        async for piece in gen.stream():
            parts.append(piece)

    task = asyncio.ensure_future(consume())
    while not task.done():
        await asyncio.wait({task}, timeout=0.5)
        if not task.done() and await request.is_disconnected():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            gen.finish_reason = "cancelled"
            break
    if not task.cancelled():
        task.result()  # re-raise an ApiError from the generation
    return "".join(parts)


async def _first_then_rest(agen: AsyncIterator[str]):
    """Start a generation before the response headers go out, so that errors found before the
    first token (queue full, engine failure) are HTTP errors, not a broken stream."""
    try:
        first = await agen.__anext__()
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
                raise ApiError(400, f"{where}: only text content is supported by this model (got {kind!r})",
                               "unsupported_content", where)
        return "".join(texts)
    raise ApiError(400, f"{where}: content must be a string or a list of text parts", "invalid_value", where)


ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _messages(messages: list, field: str = "messages") -> list[dict]:
    if not messages:
        raise ApiError(400, f"{field}: at least one message is required", "invalid_value", field)
    out = []
    for i, m in enumerate(messages):
        role = ROLES.get(m.role)
        if role is None:
            raise ApiError(400, f"{field}.{i}.role: {m.role!r} is not supported (use system, user or assistant)",
                           "invalid_value", f"{field}.{i}.role")
        out.append({"role": role, "content": _flatten_content(m.content, f"{field}.{i}.content")})
    return out


def _stop_list(stop) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def _server_default(name: str, fallback: float) -> float:
    try:
        from ktransformers.server.config.config import Config
        value = getattr(Config(), name, None)
        return fallback if value is None else float(value)
    except Exception:  # noqa: BLE001 - a default, never an error
        return fallback


# ---------------------------------------------------------------- OpenAI

class OAIMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: Any = None


class OAISampling(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    stream: bool = False
    stream_options: Optional[dict] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=0)
    stop: Optional[Union[str, list[str]]] = None
    n: Optional[int] = 1
    seed: Optional[int] = None
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    repetition_penalty: Optional[float] = Field(None, gt=0)
    logprobs: Optional[bool] = None

    def sampling(self) -> SamplingParams:
        if (self.n or 1) != 1:
            raise ApiError(400, "n: only n=1 is supported (one KV cache)", "invalid_value", "n")
        if self.logprobs:
            raise ApiError(400, "logprobs: not supported by this server", "invalid_value", "logprobs")
        stops = _stop_list(self.stop)
        if len(stops) > 4:
            raise ApiError(400, "stop: at most 4 stop sequences", "invalid_value", "stop")
        return SamplingParams(
            max_tokens=self.max_completion_tokens or self.max_tokens,
            temperature=_server_default("temperature", 1.0) if self.temperature is None else self.temperature,
            top_p=_server_default("top_p", 1.0) if self.top_p is None else self.top_p,
            top_k=self.top_k or 0, stop=stops, seed=self.seed,
            frequency_penalty=self.frequency_penalty or 0.0, presence_penalty=self.presence_penalty or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0)

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class OAIChatRequest(OAISampling):
    messages: list[OAIMessage]


class OAICompletionRequest(OAISampling):
    prompt: Union[str, list[str]]
    echo: Optional[bool] = None
    suffix: Optional[str] = None


router = APIRouter()


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


async def _openai_stream(request: Request, gen: Generation, make_chunk, include_usage: bool):
    first, rest = await _first_then_rest(gen.stream())

    async def body():
        try:
            yield _sse(make_chunk(None, None, start=True))
            if first is not None:
                yield _sse(make_chunk(first, None))
                async for piece in rest:
                    yield _sse(make_chunk(piece, None))
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
    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@router.post("/v1/chat/completions", tags=["openai"])
async def chat_completions(request: Request, body: OAIChatRequest):
    model = check_model(body.model)
    params = body.sampling()
    eng = engine()
    gen = Generation(eng.chat_ids(_messages(body.messages)), params)
    cid = f"chatcmpl-{uuid.uuid4().hex}"
    base = {"id": cid, "created": int(gen.created), "model": model, "system_fingerprint": "ktlegacy"}
    if body.stream:
        def chunk(text, finish, start=False):
            delta = {"role": "assistant", "content": ""} if start else ({"content": text} if text else {})
            return {**base, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        return await _openai_stream(request, gen, chunk, body.include_usage)
    text = await collect(gen, request)
    return {**base, "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": gen.finish_reason}],
            "usage": gen.usage()}


@router.post("/v1/completions", tags=["openai"])
async def completions(request: Request, body: OAICompletionRequest):
    model = check_model(body.model)
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
    gen = Generation(engine().text_ids(prompt), params)
    base = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(gen.created),
            "model": model, "system_fingerprint": "ktlegacy"}
    if body.stream:
        def chunk(text, finish, start=False):
            if start:
                return {**base, "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": None}]}
            return {**base, "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]}
        return await _openai_stream(request, gen, chunk, body.include_usage)
    text = await collect(gen, request)
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
    except ApiError:
        pass
    return {"name": name, "model": name, "modified_at": datetime.fromtimestamp(mtime, timezone.utc).isoformat(),
            "size": size, "digest": h.hexdigest(),
            "details": {"parent_model": "", "format": "gguf", "family": family, "families": [family] if family else [],
                        "parameter_size": "", "quantization_level": ""}}


class OllamaMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: Any = ""
    images: Optional[list] = None


class OllamaOptions(BaseModel):
    model_config = ConfigDict(extra="allow")  # num_ctx, num_thread, ...: the server's own settings win
    num_predict: Optional[int] = None
    temperature: Optional[float] = Field(None, ge=0)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=0)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    repeat_penalty: Optional[float] = Field(None, gt=0)
    frequency_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None

    def sampling(self) -> SamplingParams:
        n = self.num_predict
        return SamplingParams(
            max_tokens=None if n is None or n < 0 else max(n, 1),
            temperature=_server_default("temperature", 0.8) if self.temperature is None else self.temperature,
            top_p=_server_default("top_p", 0.9) if self.top_p is None else self.top_p,
            top_k=self.top_k or 0, stop=_stop_list(self.stop), seed=self.seed,
            frequency_penalty=self.frequency_penalty or 0.0, presence_penalty=self.presence_penalty or 0.0,
            repetition_penalty=self.repeat_penalty or 1.0)


class OllamaBase(BaseModel):
    model_config = ConfigDict(extra="allow")
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
    tools: Optional[list] = None


def _ollama_stats(gen: Generation) -> dict:
    end = gen.t_end or time.monotonic()
    first = gen.t_first or end
    return {"total_duration": int((end - gen.t_start) * 1e9), "load_duration": 0,
            "prompt_eval_count": gen.prompt_tokens, "prompt_eval_duration": int((first - gen.t_start) * 1e9),
            "eval_count": gen.completion_tokens, "eval_duration": int((end - first) * 1e9)}


def _ndjson(obj) -> str:
    return json.dumps(obj, ensure_ascii=False) + "\n"


async def _ollama_answer(request: Request, gen: Generation, stream: bool, make):
    if not stream:
        text = await collect(gen, request)
        return {**make(text, True), "done_reason": gen.finish_reason, **_ollama_stats(gen)}
    first, rest = await _first_then_rest(gen.stream())

    async def body():
        try:
            if first is not None:
                yield _ndjson(make(first, False))
                async for piece in rest:
                    yield _ndjson(make(piece, False))
            yield _ndjson({**make("", True), "done_reason": gen.finish_reason, **_ollama_stats(gen)})
        except ApiError as exc:
            yield _ndjson({"error": exc.message})
        finally:
            gen.cancel()
    return StreamingResponse(body(), media_type="application/x-ndjson")


@router.post("/api/generate", tags=["ollama"])
async def ollama_generate(request: Request, body: OllamaGenerateRequest):
    model = check_model(body.model)
    params = body.sampling()
    for field in ("suffix", "template", "context", "images"):
        if getattr(body, field):
            raise ApiError(400, f"{field}: not supported by this server", "invalid_value", field)
    if not body.prompt:  # Ollama's "load the model" request: it is loaded
        return {"model": model, "created_at": _now(), "response": "", "done": True, "done_reason": "load"}
    eng = engine()
    if body.raw:
        ids = eng.text_ids(body.prompt)
    else:
        messages = ([{"role": "system", "content": body.system}] if body.system else []) + \
                   [{"role": "user", "content": body.prompt}]
        ids = eng.chat_ids(messages)
    gen = Generation(ids, params)
    return await _ollama_answer(request, gen, body.stream,
                                lambda text, done: {"model": model, "created_at": _now(), "response": text, "done": done})


@router.post("/api/chat", tags=["ollama"])
async def ollama_chat(request: Request, body: OllamaChatRequest):
    model = check_model(body.model)
    params = body.sampling()
    if body.tools:
        raise ApiError(400, "tools: tool calling is not supported by this server", "invalid_value", "tools")
    for i, m in enumerate(body.messages):
        if m.images:
            raise ApiError(400, f"messages.{i}.images: this model takes text only", "invalid_value", "images")
    if not body.messages:
        return {"model": model, "created_at": _now(), "message": {"role": "assistant", "content": ""},
                "done": True, "done_reason": "load"}
    gen = Generation(engine().chat_ids(_messages(body.messages)), params)
    return await _ollama_answer(request, gen, body.stream,
                                lambda text, done: {"model": model, "created_at": _now(),
                                                    "message": {"role": "assistant", "content": text}, "done": done})


@router.get("/api/tags", tags=["ollama"])
async def ollama_tags():
    return {"models": [_model_entry()]}


@router.get("/api/ps", tags=["ollama"])
async def ollama_ps():
    entry = _model_entry()
    return {"models": [{**entry, "expires_at": "9999-12-31T23:59:59Z", "size_vram": 0}]}


class OllamaShowRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: Optional[str] = None
    name: Optional[str] = None


@router.post("/api/show", tags=["ollama"])
async def ollama_show(body: OllamaShowRequest):
    name = body.model or body.name
    if not name:
        raise ApiError(400, "model: required", "invalid_value", "model")
    check_model(name)
    entry = _model_entry()
    template = getattr(engine().tokenizer, "chat_template", None) or ""
    return {"modelfile": "", "parameters": "", "template": template, "details": entry["details"],
            "model_info": {"general.architecture": entry["details"]["family"]},
            "capabilities": ["completion"], "modified_at": entry["modified_at"]}


@router.get("/api/version", tags=["ollama"])
async def ollama_version():
    try:
        import ktransformers
        version = str(ktransformers.__version__)
    except Exception:  # noqa: BLE001
        version = "unknown"
    return {"version": version}
