"""The HTTP server: an OpenAI-compatible API and a chat page in front of one generation backend.

``POST /v1/chat/completions`` (JSON, or server-sent events with ``stream: true``),
``GET /v1/models``, ``GET /health`` and a chat page at ``/`` (files in ``web/``, no CDN).
:func:`create_app` composes it: middleware (Host check, body limit), error handlers (every
error in OpenAI's shape), the ``/v1`` router (bearer key checked before the body is read),
the pages. The wire format is :mod:`~medassist.serving.openai`; admission and disconnects
are :mod:`~medassist.serving.limits`; answers come from a :class:`Backend` (the
:class:`~medassist.serving.assistant.Assistant` on the one engine).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import html
import logging
import time
import uuid
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Literal, Protocol, Sequence

from fastapi import APIRouter, Depends, FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.staticfiles import StaticFiles

import medassist
from medassist import DISCLAIMER
from medassist.config import GenerationSettings, ServeConfig
from medassist.engine import Answer
from medassist.formatting import Passage
from medassist.serving.assistant import Assistant, RequestError, sampling
from medassist.serving.limits import Admission, BodyLimit, Disconnect, allowed_hosts
from medassist.serving.sources import Grounding, SourceFinder
from medassist.serving.openai import (
    ERROR_RESPONSES, APIError, ChatCompletion, ChatCompletionRequest, Conversation, Delta, ErrorResponse,
    ModelList, Reply, ServedModel, conversation, finish_reason, parse_chat_request, validation_error,
)
from medassist.streaming import END, Stream

log = logging.getLogger("medassist.serving")


class Backend(Protocol):
    """What the server needs of a generator: the :class:`Assistant` (whose generations are
    rows of one continuous batch when ``ServeConfig.batching`` is on). ``close()``, where a
    backend has it, runs when the app shuts down."""

    def grounded_prompt(self, question: str, history: Sequence[tuple[str, str]] = (),
                        system_prompt: str | None = None, max_new_tokens: int = 256
                        ) -> tuple[list[int], list[Passage] | None]: ...

    def cite(self, answer: str, question: str, passages: Sequence[Passage] | None) -> Grounding | None: ...

    def check_lengths(self, n_prompt: int, max_new_tokens: int) -> None: ...

    def start(self, prompt_ids: list[int], settings: GenerationSettings, sink: Callable[[Any], None] | None = None,
              on_finish: Callable[[], None] | None = None) -> Stream: ...


@dataclass
class Server:
    """Everything the routes share (``app.state.server``)."""

    backend: Backend
    settings: ServeConfig
    model_id: str
    admission: Admission
    started: int = field(default_factory=lambda: int(time.time()))

    def plan(self, body: ChatCompletionRequest) -> tuple[GenerationSettings, Conversation]:
        """Generation settings and conversation of a request, or a 400 that says why not."""
        talk = conversation(body.messages)
        chars = sum(len(m.text()) for m in body.messages)
        if chars > self.settings.max_prompt_tokens * 16:  # cheap pre-check before tokenizing
            raise APIError(400, f"the prompt is {chars} characters, far over this server's limit of "
                                f"{self.settings.max_prompt_tokens} tokens", param="messages", code="prompt_too_long")
        max_tokens = body.answer_tokens or self.settings.default_max_tokens
        if max_tokens > self.settings.max_tokens_limit:
            raise APIError(400, f"max_tokens is {max_tokens}; this server allows at most "
                                f"{self.settings.max_tokens_limit}", param="max_tokens", code="max_tokens_too_large")
        try:
            params = sampling(
                max_new_tokens=max_tokens,
                temperature=self.settings.temperature if body.temperature is None else body.temperature,
                top_p=self.settings.top_p if body.top_p is None else body.top_p,
                stop=tuple(body.stop or ()))
        except RequestError as exc:
            raise APIError(400, str(exc), code="invalid_value") from None
        return params, talk


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    auth_required: bool
    active: int
    waiting: int


# ---------------------------------------------------------------------------------------
# dependencies: the server, the key, the body (in this order: no key, no body read)
def server_of(request: Request) -> Server:
    return request.app.state.server


bearer = HTTPBearer(auto_error=False, description="Needed when the server was started with an API key.")


async def require_key(server: Server = Depends(server_of),
                      credentials: HTTPAuthorizationCredentials | None = Security(bearer)) -> None:
    key = server.settings.api_key
    # headers arrive as latin-1 text: their bytes, as sent, against the key's UTF-8 bytes
    if key and not (credentials and hmac.compare_digest(credentials.credentials.encode("latin-1"), key.encode())):
        raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


async def chat_request(request: Request) -> ChatCompletionRequest:
    """The body, read (within the app's size limit) only after the key was checked."""
    return parse_chat_request(await request.body())


# ---------------------------------------------------------------------------------------
# the OpenAI API
api = APIRouter(prefix="/v1", dependencies=[Depends(require_key)], responses={401: {"model": ErrorResponse}})


@api.get("/models", response_model=ModelList)
async def list_models(server: Server = Depends(server_of)) -> ModelList:
    return ModelList(data=[ServedModel(id=server.model_id, created=server.started)])


@api.get("/models/{model}", response_model=ServedModel, responses={404: {"model": ErrorResponse}})
async def get_model(model: str, server: Server = Depends(server_of)) -> ServedModel:
    if model != server.model_id:
        raise APIError(404, f"model '{model}' is not served here; this server serves '{server.model_id}'",
                       param="model", code="model_not_found")
    return ServedModel(id=server.model_id, created=server.started)


@api.post("/chat/completions", response_model=ChatCompletion, responses={
    200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
          "description": "A completion; with `stream: true`, server-sent chunk events ending with `data: [DONE]`."},
    **ERROR_RESPONSES})
async def chat_completions(request: Request, body: ChatCompletionRequest = Depends(chat_request),
                           server: Server = Depends(server_of)):
    params, talk = server.plan(body)
    # with an index, the question's sources go into the prompt (None: no index, no sources field)
    prompt_ids, passages = await run_in_threadpool(server.backend.grounded_prompt, talk.question, talk.history,
                                                   talk.system, params.max_new_tokens)

    def cite(answer: Answer) -> Grounding | None:
        return server.backend.cite(answer.text, talk.question, passages)

    try:
        server.backend.check_lengths(len(prompt_ids), params.max_new_tokens)
    except RequestError as exc:
        raise APIError(400, str(exc), param="messages", code="context_length_exceeded") from None
    reply = Reply("chatcmpl-" + uuid.uuid4().hex, int(time.time()), server.model_id)
    client = Disconnect(request)
    try:
        release = await server.admission.enter(client.left)
        relay = _Relay(asyncio.get_running_loop())
        try:
            generation = server.backend.start(prompt_ids, params, sink=relay.put, on_finish=release)
        except BaseException:
            release()
            raise
        if body.stream:
            client.stop()  # the event stream watches the connection itself
            # background: stops generating even if the client left before the first event
            return EventSourceResponse(_events(generation, relay, reply, body.include_usage, cite), sep="\n",
                                       headers={"Cache-Control": "no-cache"},
                                       background=BackgroundTask(generation.cancel))
        return await _answer(generation, relay, reply, client, cite)
    finally:
        client.stop()


@api.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
async def unknown_route(request: Request) -> None:
    """After the key check: without a key, no one learns which routes exist."""
    raise APIError(404, f"no route {request.method} {request.url.path} here", code="unknown_url")


class _Relay:
    """Text pieces from the generation thread to the event loop, then :data:`END`."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.pieces, self.finished = loop, asyncio.Queue(), asyncio.Event()

    def put(self, item: Any) -> None:  # called from the generation thread
        def deliver() -> None:
            self.pieces.put_nowait(item)
            if item is END:
                self.finished.set()

        try:
            self.loop.call_soon_threadsafe(deliver)
        except RuntimeError:  # event loop gone (server shutting down)
            pass


async def _answer(generation: Stream, relay: _Relay, reply: Reply, client: Disconnect,
                  cite: Callable[[Answer], Grounding | None]) -> ChatCompletion | Response:
    """Wait for the whole answer; a client that leaves stops it at the next token."""
    done, left = asyncio.ensure_future(relay.finished.wait()), asyncio.ensure_future(client.left.wait())
    try:
        await asyncio.wait({done, left}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        generation.cancel()  # no-op when finished
        done.cancel()
        left.cancel()
    if not relay.finished.is_set():
        return Response(status_code=499)  # nginx's "client closed request": no one reads it
    if generation.error is not None or generation.answer is None:
        raise APIError(500, f"generation failed ({type(generation.error).__name__})")
    return reply.completion(generation.answer, cite(generation.answer))


def _event(model: BaseModel | str) -> ServerSentEvent:
    data = model if isinstance(model, str) else model.model_dump_json()
    return ServerSentEvent(data=data, sep="\n")  # "data: ...\n\n", as OpenAI sends


class _Stripped:
    """Streamed text that adds up to the answer's text (stripped, as the engine gives it):
    leading whitespace is dropped, trailing whitespace held until more text follows."""

    def __init__(self) -> None:
        self.started, self.held = False, ""

    def feed(self, piece: str) -> str:
        if not self.started:
            piece = piece.lstrip()
            self.started = bool(piece)
        text = self.held + piece
        body = text.rstrip()
        self.held = text[len(body):]
        return body


async def _events(generation: Stream, relay: _Relay, reply: Reply, include_usage: bool,
                  cite: Callable[[Answer], Grounding | None]):
    """OpenAI's chunk events, the last one with the usage and the sources (when asked for / with
    an index); a client that leaves stops the generation (``finally``)."""
    text = _Stripped()
    try:
        yield _event(reply.chunk(Delta(role="assistant", content="")))
        while (item := await relay.pieces.get()) is not END:
            if piece := text.feed(item):
                yield _event(reply.chunk(Delta(content=piece)))
        answer = generation.answer
        if generation.error is not None or answer is None:
            yield _event(APIError(500, f"generation failed ({type(generation.error).__name__})").body())
        else:
            yield _event(reply.chunk(Delta(), finish_reason(answer)))
            if (final := reply.final_chunk(answer, include_usage, cite(answer))) is not None:
                yield _event(final)
        yield _event("[DONE]")
    finally:
        generation.cancel()


# ---------------------------------------------------------------------------------------
# errors: every one in OpenAI's shape
def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body().model_dump(), status_code=error.status, headers=error.headers)


async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return _error_response(exc)


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    return _error_response(validation_error(exc.errors()))


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return _error_response(APIError(exc.status_code, str(exc.detail), headers=exc.headers))


async def _crash(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s", request.url.path)
    return _error_response(APIError(500, f"internal error ({type(exc).__name__})"))


# ---------------------------------------------------------------------------------------
# the page
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}
WEB = Path(str(resources.files("medassist") / "web"))


class _Pages(StaticFiles):
    async def get_response(self, path: str, scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(PAGE_HEADERS)
        return response


def _add_pages(app: FastAPI) -> None:
    # the disclaimer comes from medassist.DISCLAIMER: one wording everywhere
    page = (WEB / "index.html").read_text(encoding="utf-8").replace("{{ disclaimer }}", html.escape(DISCLAIMER))

    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers=PAGE_HEADERS)

    async def health(server: Server = Depends(server_of)) -> Health:
        return Health(auth_required=bool(server.settings.api_key), active=server.admission.active,
                      waiting=server.admission.waiting)

    app.add_api_route("/", index, methods=["GET", "HEAD"], include_in_schema=False)
    app.add_api_route("/health", health, response_model=Health)
    app.mount("/static", _Pages(directory=WEB), name="static")


# ---------------------------------------------------------------------------------------
def _document_chat_body(app: FastAPI) -> None:
    """The chat body is read by a dependency (after the key check), so FastAPI cannot see it:
    put its schema in the OpenAPI document by hand."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            body = ChatCompletionRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(body.pop("$defs", {}))
            components["ChatCompletionRequest"] = body
            schema["paths"]["/v1/chat/completions"]["post"]["requestBody"] = {"required": True, "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}}}}
        return app.openapi_schema

    app.openapi = openapi


def create_app(loaded=None, settings: ServeConfig | None = None, assistant: Backend | None = None,
               sources: SourceFinder | None = None) -> FastAPI:
    """The FastAPI app serving ``loaded`` (a :class:`~medassist.models.LoadedModel`), or a ready
    ``assistant`` (any :class:`Backend`); ``sources``: answer from this index and list the
    sources used (:mod:`~medassist.serving.sources`)."""
    settings = settings or ServeConfig()
    # with batching, every admitted generation (max_concurrency) is a row of one batch
    rows = (settings.max_batch_size or settings.max_concurrency) if settings.batching else None
    backend = assistant or Assistant(loaded, settings.system_prompt, settings.max_prompt_tokens, batch_rows=rows,
                                     sources=sources)
    model_id = settings.model_name or getattr(loaded, "source", "") or "medassist"

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        try:
            yield
        finally:
            close = getattr(backend, "close", None)
            if callable(close):
                close()

    app = FastAPI(
        title="medassist", version=medassist.__version__,
        description="OpenAI-compatible chat completions for a medical question-answering model. " + DISCLAIMER,
        docs_url=None, redoc_url=None,  # their pages load scripts from a CDN; the schema stays at /openapi.json
        lifespan=lifespan,
    )
    app.state.server = Server(backend, settings, model_id,
                              Admission(settings.max_concurrency, settings.max_queue, settings.queue_timeout_s))
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts(settings), www_redirect=False)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _crash)
    app.include_router(api)
    _add_pages(app)
    _document_chat_body(app)
    return app
