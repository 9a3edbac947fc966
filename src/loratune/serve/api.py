"""The OpenAI-compatible FastAPI app: `/v1/chat/completions`, `/v1/completions` (server-sent events when
`stream: true`), `/v1/models`, `/health`, and the chat page at `/` with `--ui`.

Every error has OpenAI's shape `{"error": {"message", "type", "param", "code"}}`, so the official clients raise
their usual exceptions: 400 bad JSON / bad field / prompt + max_tokens over the context, 401 missing or wrong
key, 404 unknown model, 413 body or prompt too large, 429 queue full or per-client rate limit. The API key is
compared in constant time and never logged or echoed.
"""

from __future__ import annotations

import hmac
import json
import time
import uuid
from collections import defaultdict, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from loratune.data.conversation import Message
from loratune.errors import LoratuneError
from loratune.serve.engine import Engine, Event, Job, QueueFull


@dataclass
class Limits:
    max_body_bytes: int = 1 << 20  # 1 MiB of JSON is far more than any prompt the context can hold
    max_prompt_tokens: int | None = None  # None: the model's context minus one answer token
    max_tokens: int = 1024  # the largest `max_tokens` a request may ask for
    rate_limit_per_minute: int = 0  # per client address; 0 = off


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


# -- request bodies (extra fields allowed: clients send options we do not use, like `user` or `logprobs: false`) --
class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    stream: bool = False
    max_tokens: int | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)  # not in OpenAI's API; vLLM and llama.cpp accept it too
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream_options: dict[str, Any] | None = None


class _ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]]


class ChatBody(_Body):
    messages: list[_ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None


class CompletionBody(_Body):
    prompt: str | list[str]


def _parse(model: type[BaseModel], raw: bytes) -> Any:
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise ApiError(400, f"{param}: {first['msg']}", param=param, code="invalid_value") from None


def _text_content(content: str | list[dict[str, Any]], index: int) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ApiError(400, "only text content parts are supported", param=f"messages.{index}.content",
                           code="invalid_value")
        parts.append(part["text"])
    return "".join(parts)


# -- the app -------------------------------------------------------------------------------------------------------------
def create_app(engine: Engine, *, model_name: str, api_key: str | None = None, ui: bool = False,
               limits: Limits | None = None) -> FastAPI:
    """The app around a (not yet started) engine; the app's lifespan starts and stops the engine's worker."""
    from contextlib import asynccontextmanager

    limits = limits or Limits()
    context = engine.im.context_length
    max_prompt = limits.max_prompt_tokens or context - 1
    recent: dict[str, deque[float]] = defaultdict(deque)  # client address -> request times in the last minute

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="loratune", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(404)
    async def _not_found(request: Request, exc: Exception) -> JSONResponse:
        return ApiError(404, f"no route {request.method} {request.url.path}", code="not_found").response()

    @app.exception_handler(405)
    async def _bad_method(request: Request, exc: Exception) -> JSONResponse:
        return ApiError(405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed").response()

    def check_key(request: Request) -> None:
        if not api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise ApiError(401, "missing API key: send the header 'Authorization: Bearer KEY'", code="invalid_api_key")
        if not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise ApiError(401, "incorrect API key", code="invalid_api_key")

    def check_rate(request: Request) -> None:
        if limits.rate_limit_per_minute <= 0:
            return
        client = request.client.host if request.client else "unknown"
        now = time.monotonic()
        times = recent[client]
        while times and now - times[0] > 60:
            times.popleft()
        if len(times) >= limits.rate_limit_per_minute:
            wait = int(60 - (now - times[0])) + 1
            raise ApiError(429, f"rate limit of {limits.rate_limit_per_minute} requests per minute reached",
                           type_="rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": str(wait)})
        times.append(now)

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise ApiError(413, f"request body is {declared} bytes; the limit is {limits.max_body_bytes}",
                           code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():  # counted as it arrives: a chunked upload has no Content-Length
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise ApiError(413, f"request body is over the limit of {limits.max_body_bytes} bytes",
                               code="request_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    def settings_for(body: _Body, max_tokens: int | None) -> Any:
        if body.n != 1:
            raise ApiError(400, "only n=1 is supported", param="n", code="invalid_value")
        if max_tokens is not None and not 1 <= max_tokens <= limits.max_tokens:
            raise ApiError(400, f"max_tokens must be between 1 and {limits.max_tokens}, got {max_tokens}",
                           param="max_tokens", code="invalid_value")
        if body.model != model_name:
            raise ApiError(404, f"the model '{body.model}' does not exist; this server serves '{model_name}'",
                           param="model", code="model_not_found")
        defaults = engine.im.defaults
        return defaults.override(max_new_tokens=max_tokens or min(defaults.max_new_tokens, limits.max_tokens),
                                 temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                                 repetition_penalty=body.repetition_penalty, seed=body.seed)

    def submit(prompt: str, settings: Any, body: _Body) -> Job:
        n_prompt = engine.count_tokens(prompt)
        if n_prompt > max_prompt:
            raise ApiError(413, f"the prompt is {n_prompt} tokens; the limit is {max_prompt}",
                           param="messages" if isinstance(body, ChatBody) else "prompt", code="prompt_too_long")
        if n_prompt + settings.max_new_tokens > context:
            raise ApiError(400, f"the prompt ({n_prompt} tokens) plus max_tokens ({settings.max_new_tokens}) exceeds "
                                f"the model's context of {context} tokens", param="max_tokens",
                           code="context_length_exceeded")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        try:
            return engine.submit(prompt, settings, stops=stops, prompt_tokens=n_prompt)
        except QueueFull as e:
            raise ApiError(429, f"the server is busy: {e}; retry shortly", type_="rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"}) from None

    # -- routes --------------------------------------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, "queued": engine.queued, **engine.stats.as_dict()}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        check_key(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "loratune"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        check_key(request)
        check_rate(request)
        body: ChatBody = _parse(ChatBody, await read_body(request))
        settings = settings_for(body, body.max_completion_tokens or body.max_tokens)
        messages = [Message("system" if m.role == "developer" else m.role, _text_content(m.content, i))
                    for i, m in enumerate(body.messages)]
        try:
            prompt = engine.im.template.prompt(messages, engine.im.tokenizer)
        except LoratuneError as e:
            raise ApiError(400, e.message, param="messages", code="invalid_value") from None
        job = submit(prompt, settings, body)
        return await _respond(job, body, model_name, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        check_key(request)
        check_rate(request)
        body: CompletionBody = _parse(CompletionBody, await read_body(request))
        settings = settings_for(body, body.max_tokens)
        if isinstance(body.prompt, list):
            if len(body.prompt) != 1:
                raise ApiError(400, "give one prompt per request", param="prompt", code="invalid_value")
            body.prompt = body.prompt[0]
        job = submit(body.prompt, settings, body)  # raw text: completions do not apply the chat template
        return await _respond(job, body, model_name, chat=False)

    if ui:
        from loratune.serve.web import chat_page

        page = chat_page(model_name, needs_key=bool(api_key), defaults=engine.im.defaults,
                         max_tokens=limits.max_tokens)

        @app.get("/", response_class=HTMLResponse)
        async def index() -> HTMLResponse:
            return HTMLResponse(page)

    return app


# -- responses ------------------------------------------------------------------------------------------------------
async def _respond(job: Job, body: _Body, model_name: str, *, chat: bool) -> Any:
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    if body.stream:
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        return StreamingResponse(_sse(job, rid, created, model_name, chat, include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    text, finish, completion_tokens = [], None, 0
    try:
        while True:
            event: Event = await job.events.get()
            if event.kind == "delta":
                text.append(event.text)
            elif event.kind == "error":
                raise ApiError(500, event.text, type_="server_error", code="generation_failed")
            else:
                finish, completion_tokens = event.finish_reason, event.completion_tokens
                break
    finally:
        job.cancelled.set()  # if this handler is cancelled (shutdown), the worker stops generating for it
    answer = "".join(text)
    choice: dict[str, Any] = ({"index": 0, "message": {"role": "assistant", "content": answer},
                               "finish_reason": finish, "logprobs": None} if chat else
                              {"index": 0, "text": answer, "finish_reason": finish, "logprobs": None})
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": model_name, "choices": [choice],
            "usage": {"prompt_tokens": job.prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": job.prompt_tokens + completion_tokens}}


async def _sse(job: Job, rid: str, created: int, model_name: str, chat: bool, include_usage: bool) -> AsyncIterator[str]:
    """OpenAI's streaming format: one `data: {chunk}` event per text delta, a final chunk with the finish reason,
    an optional usage chunk, then `data: [DONE]`."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(delta: str | None, finish: str | None, role: bool = False) -> str:
        if chat:
            d: dict[str, Any] = {"role": "assistant", "content": ""} if role else ({} if delta is None else
                                                                                     {"content": delta})
            choice = {"index": 0, "delta": d, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
        return "data: " + json.dumps({"id": rid, "object": kind, "created": created, "model": model_name,
                                      "choices": [choice]}) + "\n\n"

    try:
        if chat:
            yield chunk(None, None, role=True)
        while True:
            event: Event = await job.events.get()
            if event.kind == "delta":
                yield chunk(event.text, None)
            elif event.kind == "error":
                error = {"message": event.text, "type": "server_error", "param": None, "code": "generation_failed"}
                yield "data: " + json.dumps({"error": error}) + "\n\n"
                break
            else:
                yield chunk(None, event.finish_reason)
                if include_usage:
                    usage = {"prompt_tokens": job.prompt_tokens, "completion_tokens": event.completion_tokens,
                             "total_tokens": job.prompt_tokens + event.completion_tokens}
                    yield "data: " + json.dumps({"id": rid, "object": kind, "created": created, "model": model_name,
                                                 "choices": [], "usage": usage}) + "\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()  # the client went away (or we are done): the worker stops generating this row


# -- running it -----------------------------------------------------------------------------------------------------
def build(im: Any, *, model_name: str | None = None, api_key: str | None = None, ui: bool = False,
          limits: Limits | None = None, max_batch: int = 8, max_wait_ms: float = 10.0, max_queue: int = 64) -> FastAPI:
    """Engine + app for a loaded model (`loratune.generate.load_for_inference`)."""
    engine = Engine(im, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue)
    return create_app(engine, model_name=model_name or im.name, api_key=api_key, ui=ui, limits=limits)


class BackgroundServer:
    """uvicorn in a daemon thread on a free loopback port (tests, the load test); `with` waits until it answers."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> None:
        import socket

        import uvicorn

        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.host, self.port = host, port
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
        self.thread: Any = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> BackgroundServer:
        import threading

        self.thread = threading.Thread(target=self.server.run, name="loratune-uvicorn", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
