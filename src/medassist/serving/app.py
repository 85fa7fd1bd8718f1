"""The HTTP server: an OpenAI-compatible API and a chat page in front of one Assistant.

``POST /v1/chat/completions`` (plain JSON or server-sent events), ``GET /v1/models``,
``GET /health`` and a single-page chat UI at ``/`` (files in ``web/``, no CDN).

Generation is CPU-bound and blocking, so it never runs on the event loop. At most
``max_concurrency`` generations run at once and ``max_queue`` more wait; anything beyond is
refused at once with 429 instead of piling up. A client that disconnects stops its generation
at the next token, so it frees its place for the others.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from importlib import resources
from typing import Any, Callable, Literal, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from medassist.config import GenerationSettings, ServeConfig
from medassist.engine import END, Answer, Stream
from medassist.models import LoadedModel
from medassist.serving.assistant import DISCLAIMER, Assistant, RequestError, sampling

log = logging.getLogger("medassist.serving")


def _clean_text(text: str) -> str:
    """JSON can carry lone surrogates, which no tokenizer accepts: replace them."""
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields this server does not use


class ContentPart(_Lenient):
    type: Literal["text"] = Field(description="Only text parts: this model reads no images or audio.")
    text: str


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return _clean_text(self.content)
        return "\n".join(_clean_text(part.text) for part in self.content)


class StreamOptions(_Lenient):
    include_usage: bool = False


class ChatCompletionRequest(_Lenient):
    """The subset of OpenAI's chat completion request this server honours."""

    model: str | None = Field(None, description="Ignored: this server serves one model.")
    messages: list[ChatMessage] = Field(min_length=1, max_length=512)
    max_tokens: int | None = Field(None, ge=1, description="Answer tokens at most (the server has a limit).")
    max_completion_tokens: int | None = Field(None, ge=1, description="Newer name of max_tokens; wins.")
    temperature: float | None = Field(None, ge=0.0, le=2.0, allow_inf_nan=False, description="0 = greedy.")
    top_p: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False)
    stop: str | list[str] | None = Field(None, description="Up to 4 strings; the answer ends before the first.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="Only one choice is supported.")

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        if value is None:
            return value
        stops = [value] if isinstance(value, str) else value
        if len(stops) > 4:
            raise ValueError("at most 4 stop strings")
        if any(len(s) > 256 for s in stops):
            raise ValueError("a stop string is at most 256 characters")
        return [_clean_text(s) for s in stops if s]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class _Message(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class _Choice(BaseModel):
    index: int
    message: _Message
    finish_reason: str | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[_Choice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class _ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: _ErrorBody


class Health(BaseModel):
    status: Literal["ok"]
    auth_required: bool
    active: int
    waiting: int


class _APIError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
             503: "server_overloaded", 500: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.TYPES.get(self.status, "error"),
                          "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 413, 422, 429, 503)}


# ---------------------------------------------------------------------------------------
# HTTP: admission (bounded concurrency) and the gate (API key, body size)
class _Admission:
    """At most ``active`` generations at once and ``waiting`` requests queued for a slot.

    A slot is released by the generation thread when it ends (not when the response ends),
    so the limit is on real CPU work; a disconnected client's generation is cancelled and
    releases its slot at its next token.
    """

    def __init__(self, active: int, waiting: int, timeout_s: float) -> None:
        self.max_active, self.max_waiting, self.timeout_s = active, waiting, timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self.active = self.waiting = 0

    def _bind(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a new event loop (tests start several): start afresh
            self._loop, self._sem = loop, asyncio.Semaphore(self.max_active)
            self.active = self.waiting = 0
        return loop

    async def enter(self, request) -> Callable[[], None]:
        """Wait for a slot; returns the thread-safe function that gives it back."""
        loop = self._bind()
        if self.active + self.waiting >= self.max_active + self.max_waiting:
            raise _APIError(429, "the server is busy (all generation and queue slots are taken); retry shortly",
                            code="overloaded", headers={"Retry-After": "1"})
        sem, deadline = self._sem, loop.time() + self.timeout_s
        self.waiting += 1
        acquire = asyncio.ensure_future(sem.acquire())
        try:
            while not acquire.done():
                await asyncio.wait({acquire}, timeout=0.25)
                if acquire.done():
                    break
                if await request.is_disconnected():
                    raise _APIError(503, "client disconnected while waiting", code="client_gone")
                if loop.time() > deadline:
                    raise _APIError(503, f"no generation slot became free within {self.timeout_s:g} s; retry later",
                                    code="queue_timeout", headers={"Retry-After": "5"})
        except BaseException:
            if acquire.done() and not acquire.cancelled():
                sem.release()
            else:
                acquire.cancel()
            raise
        finally:
            self.waiting -= 1
        self.active += 1
        released = False

        def release() -> None:
            def give_back() -> None:
                nonlocal released
                if not released and self._sem is sem:
                    released = True
                    self.active -= 1
                    sem.release()

            try:
                loop.call_soon_threadsafe(give_back)
            except RuntimeError:  # loop closed: nothing left to release
                pass

        return release


def _bearer(headers: list[tuple[bytes, bytes]]) -> bytes:
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" else b""
    return b""


class _Gate:
    """Pure ASGI middleware (streaming-safe): API key on /v1, request body size.

    It runs before the body is parsed, so a request without the right key gets 401 whatever
    its body is.
    """

    def __init__(self, app, api_key: str | None, max_body_bytes: int) -> None:
        self.app, self.max_body_bytes = app, max_body_bytes
        self.api_key = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            error = self._check(scope)
            if error is not None:
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _check(self, scope) -> _APIError | None:
        path = scope.get("path", "")
        headers = scope.get("headers", [])
        if self.api_key and (path == "/v1" or path.startswith("/v1/")):
            if not hmac.compare_digest(_bearer(headers), self.api_key):
                return _APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                 code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        for name, value in headers:
            if name == b"content-length":
                try:
                    size = int(value)
                except ValueError:
                    return _APIError(400, "invalid Content-Length header")
                if size > self.max_body_bytes:
                    return _APIError(413, f"request body is {size} bytes; the limit is {self.max_body_bytes}")
        return None


# ---------------------------------------------------------------------------------------
# HTTP: the app
def _web_file(name: str) -> bytes:
    return (resources.files("medassist") / "web" / name).read_bytes()


_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def _validation_message(errors: Sequence[dict]) -> tuple[str, str | None]:
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return f"request body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})", None
    parts, param = [], None
    for err in errors[:3]:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        where = ".".join(loc) or "body"
        param = param or where
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return "invalid request: " + "; ".join(parts) + more, param


def _conversation(messages: Sequence[ChatMessage]) -> tuple[str | None, list[tuple[str, str]], str]:
    """OpenAI messages -> (system prompt or None, [(user, assistant), ...], question).

    System/developer messages (anywhere) join into the system prompt; consecutive messages of
    one role join; the last message must be the user's question.
    """
    system = [m.text() for m in messages if m.role in ("system", "developer")]
    turns: list[list[str]] = []  # [role, text]
    for m in messages:
        if m.role in ("user", "assistant"):
            if turns and turns[-1][0] == m.role:
                turns[-1][1] += "\n\n" + m.text()
            else:
                turns.append([m.role, m.text()])
    if not turns or turns[-1][0] != "user":
        raise _APIError(400, "the last message (after system messages) must be from the user", param="messages")
    question = turns.pop()[1]
    if not question.strip():
        raise _APIError(400, "the user's question is empty", param="messages")
    history, pending_user = [], ""
    for role, text in turns:
        if role == "user":
            pending_user = text
        else:
            history.append((pending_user, text))
            pending_user = ""
    if pending_user:  # cannot happen after merging, kept for safety
        question = pending_user + "\n\n" + question
    return ("\n\n".join(system) if system else None), history, question


def create_app(
    loaded: LoadedModel, settings: ServeConfig | None = None, assistant: Assistant | None = None
) -> FastAPI:
    """The FastAPI app serving ``loaded`` (or a ready ``assistant`` for the same model)."""
    settings = settings or ServeConfig()
    assistant = assistant or Assistant(loaded, settings.system_prompt, settings.max_prompt_tokens)
    model_id = settings.model_name or loaded.source or "medassist"
    started = int(time.time())
    admission = _Admission(settings.max_concurrency, settings.max_queue, settings.queue_timeout_s)
    pages = {name: _web_file(name) for name in ("index.html", "app.js", "style.css")}
    max_prompt_chars = settings.max_prompt_tokens * 16  # cheap pre-check before tokenizing

    app = FastAPI(
        title="medassist",
        version="0.1.0",
        description="OpenAI-compatible chat completions for a medical question-answering model. " + DISCLAIMER,
        docs_url=None, redoc_url=None,  # their pages load scripts from a CDN; the schema stays at /openapi.json
    )
    app.state.assistant, app.state.settings, app.state.admission = assistant, settings, admission
    app.add_middleware(_Gate, api_key=settings.api_key, max_body_bytes=settings.max_body_bytes)

    @app.exception_handler(_APIError)
    async def _api_error(request: Request, exc: _APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc.errors())
        return _APIError(422, message, param=param, code="invalid_value").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return _APIError(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return _APIError(500, f"internal error ({type(exc).__name__})").response()

    # -- pages -------------------------------------------------------------------------
    page_headers = {"Content-Security-Policy": _CSP, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return Response(pages["index.html"], media_type="text/html; charset=utf-8", headers=page_headers)

    @app.get("/static/app.js", include_in_schema=False)
    async def app_js() -> Response:
        return Response(pages["app.js"], media_type="text/javascript; charset=utf-8", headers=page_headers)

    @app.get("/static/style.css", include_in_schema=False)
    async def style_css() -> Response:
        return Response(pages["style.css"], media_type="text/css; charset=utf-8", headers=page_headers)

    @app.get("/health", response_model=Health)
    async def health() -> dict:
        return {"status": "ok", "auth_required": bool(settings.api_key),
                "active": admission.active, "waiting": admission.waiting}

    # -- OpenAI API --------------------------------------------------------------------
    def model_card() -> dict:
        return {"id": model_id, "object": "model", "created": started, "owned_by": "medassist"}

    @app.get("/v1/models", response_model=ModelList, responses={401: {"model": ErrorResponse}})
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model}", response_model=ModelCard,
             responses={401: {"model": ErrorResponse}, 404: {"model": ErrorResponse}})
    async def get_model(model: str) -> dict:
        if model != model_id:
            raise _APIError(404, f"model '{model}' is not served here; this server serves '{model_id}'",
                            param="model", code="model_not_found")
        return model_card()

    def parse(body: ChatCompletionRequest) -> tuple[GenerationSettings, str | None, list, str]:
        system, history, question = _conversation(body.messages)
        chars = sum(len(m.text()) for m in body.messages)
        if chars > max_prompt_chars:
            raise _APIError(400, f"the prompt is {chars} characters, far over this server's limit of "
                                 f"{settings.max_prompt_tokens} tokens", param="messages", code="prompt_too_long")
        max_tokens = body.max_completion_tokens or body.max_tokens or settings.default_max_tokens
        if max_tokens > settings.max_tokens_limit:
            raise _APIError(400, f"max_tokens is {max_tokens}; this server allows at most {settings.max_tokens_limit}",
                            param="max_tokens", code="max_tokens_too_large")
        try:
            params = sampling(
                max_new_tokens=min(max_tokens, settings.max_tokens_limit),
                temperature=settings.temperature if body.temperature is None else body.temperature,
                top_p=settings.top_p if body.top_p is None else body.top_p,
                stop=tuple(body.stop or ()),
            )
        except RequestError as exc:
            raise _APIError(400, str(exc), code="invalid_value") from None
        return params, system, history, question

    @app.post(
        "/v1/chat/completions",
        response_model=None,
        responses={200: {"model": ChatCompletion,
                         "content": {"text/event-stream": {"schema": {"type": "string"}}},
                         "description": "A completion; with `stream: true`, server-sent chunk events "
                                        "ending with `data: [DONE]`."},
                   **_ERRORS},
    )
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        params, system, history, question = parse(body)
        prompt_ids = await run_in_threadpool(assistant.prompt_ids, question, history, system)
        try:
            assistant.check_lengths(len(prompt_ids), params.max_new_tokens)
        except RequestError as exc:
            raise _APIError(400, str(exc), param="messages", code="context_length_exceeded") from None

        release = await admission.enter(request)
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()

        def sink(item: Any) -> None:  # called from the generation thread
            try:
                loop.call_soon_threadsafe(pieces.put_nowait, item)
            except RuntimeError:  # event loop gone (server shutting down)
                pass

        try:
            generation = assistant.start(prompt_ids, params, sink=sink, on_finish=release)
        except BaseException:
            release()
            raise
        completion_id = "chatcmpl-" + uuid.uuid4().hex
        created = int(time.time())

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                _sse(generation, pieces, completion_id, created, model_id, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )

        text = []
        try:
            while True:
                try:
                    item = await asyncio.wait_for(pieces.get(), timeout=0.5)
                except TimeoutError:
                    if await request.is_disconnected():
                        generation.cancel()
                        raise _APIError(503, "client disconnected", code="client_gone") from None
                    continue
                if item is END:
                    break
                text.append(item)
        finally:
            generation.cancel()  # no-op when finished; stops the thread if this task was cancelled
        if generation.error is not None or generation.answer is None:
            raise _APIError(500, f"generation failed ({type(generation.error).__name__})")
        c = generation.answer
        return JSONResponse({
            "id": completion_id, "object": "chat.completion", "created": created, "model": model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text},
                         "finish_reason": _finish(c.finish_reason)}],
            "usage": _usage(c),
        })

    return app


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def _usage(c: Answer) -> dict:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens}


def _event(payload: Any) -> str:
    return "data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")) + "\n\n"


async def _sse(generation: Stream, pieces: asyncio.Queue, completion_id: str, created: int,
               model_id: str, include_usage: bool):
    """Server-sent events in OpenAI's chunk format; cancels the generation if the client leaves."""

    def chunk(delta: dict, finish_reason: str | None = None) -> str:
        return _event({"id": completion_id, "object": "chat.completion.chunk", "created": created,
                       "model": model_id, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]})

    try:
        yield chunk({"role": "assistant", "content": ""})
        while (item := await pieces.get()) is not END:
            yield chunk({"content": item})
        c = generation.answer
        if generation.error is not None or c is None:
            yield _event({"error": {"message": f"generation failed ({type(generation.error).__name__})",
                                    "type": "server_error", "param": None, "code": None}})
        else:
            yield chunk({}, _finish(c.finish_reason))
            if include_usage:
                yield _event({"id": completion_id, "object": "chat.completion.chunk", "created": created,
                              "model": model_id, "choices": [], "usage": _usage(c)})
        yield "data: [DONE]\n\n"
    finally:
        generation.cancel()  # no-op when finished; a disconnected client stops its generation here
