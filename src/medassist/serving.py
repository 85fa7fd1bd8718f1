"""Serving: answer questions with a loaded model, in a terminal or over HTTP.

Two layers, both for every model family (decoder-only and encoder-decoder, adapter or merged):

- :class:`Assistant` turns a question (and, for decoder-only chat models, the conversation so
  far) into prompt tokens with the family's formatter, then generates in a worker thread.
  Text streams out through a transformers streamer; stop strings and cancellation are one
  ``StoppingCriteria`` checked at every generated token. ``medassist generate``/``chat`` use it
  directly.
- :func:`create_app` puts one Assistant behind a FastAPI app: an OpenAI-compatible
  ``POST /v1/chat/completions`` (plain JSON or server-sent events), ``GET /v1/models``,
  ``GET /health`` and a single-page chat UI at ``/`` (files in ``web/``, no CDN).

Generation is CPU-bound and blocking, so it never runs on the event loop. At most
``max_concurrency`` generations run at once and ``max_queue`` more wait; anything beyond is
refused at once with 429 instead of piling up. A client that disconnects stops its generation
at the next token, so it frees its place for the others.
"""

from __future__ import annotations

import asyncio
import copy
import hmac
import json
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from importlib import resources
from typing import Any, Callable, Iterator, Literal, Sequence

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer

from medassist.errors import MedassistError
from medassist.formatting import DecoderOnlyFormat, make_format
from medassist.models import LoadedModel

log = logging.getLogger("medassist.serving")

DEFAULT_SYSTEM_PROMPT = (
    "You are medassist, a careful medical information assistant. Give accurate, clear, general "
    "information, say when you are not sure, and recommend seeing a clinician for personal "
    "medical decisions such as diagnosis, treatment or medication changes."
)
DISCLAIMER = (
    "medassist gives general medical information, not medical advice. "
    "For decisions about your health, see a clinician."
)
MIN_TEMPERATURE = 1e-3  # below this, sampling is numerically greedy anyway (and 1e-300 overflows)


class RequestError(MedassistError):
    """A generation request that cannot be served as asked (too long, bad parameter)."""


@dataclass(frozen=True)
class GenerationParams:
    """How to generate one answer. ``temperature`` 0 means greedy decoding."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()

    @property
    def sampling(self) -> bool:
        return self.temperature >= MIN_TEMPERATURE and self.top_p > 0.0

    def check(self) -> "GenerationParams":
        if self.max_new_tokens < 1:
            raise RequestError(f"max new tokens must be at least 1, not {self.max_new_tokens}")
        if not 0.0 <= self.temperature <= 100.0:
            raise RequestError(f"temperature must be between 0 (greedy) and 100, not {self.temperature}")
        if not 0.0 <= self.top_p <= 1.0:
            raise RequestError(f"top_p must be between 0 and 1, not {self.top_p}")
        return self


@dataclass
class Completion:
    """A finished answer. ``finish_reason``: ``stop`` (EOS or a stop string), ``length``
    (``max_new_tokens`` reached) or ``cancelled`` (the caller gave up)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


# ---------------------------------------------------------------------------------------
# generation in a worker thread
class StopText:
    """Cuts a stream of text at the first stop string, as generation would meet it.

    The answer ends with the shortest beginning of the text that contains a stop string,
    cut where the first stop string in it starts, however the text is split into pieces.
    Text that could be the beginning of a stop string is held back until the next piece
    shows whether it is one, so a stop string split over two pieces never leaks out.
    """

    def __init__(self, stop: Sequence[str] = ()) -> None:
        self.stop = [s for s in stop if s]
        self.stopped = False
        self._pending = ""

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        buf = self._pending + text
        ends = [i + len(s) for s in self.stop if (i := buf.find(s)) >= 0]
        if ends:
            met = buf[: min(ends)]  # generation stops as soon as a stop string is complete
            self.stopped, self._pending = True, ""
            return buf[: min(i for s in self.stop if (i := met.find(s)) >= 0)]
        hold = self._partial_suffix(buf)
        self._pending = buf[len(buf) - hold:] if hold else ""
        return buf[: len(buf) - hold]

    def flush(self) -> str:
        out, self._pending = ("" if self.stopped else self._pending), ""
        return out

    def _partial_suffix(self, buf: str) -> int:
        """Length of the longest end of ``buf`` that is a proper beginning of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:k]):
                    best = k
                    break
        return best


class _Watch(StoppingCriteria):
    """Checked after every generated token: stop when cancelled or a stop string appeared.

    Also counts the generated tokens (the first call sees exactly one), for usage and for
    telling ``length`` from ``stop``.
    """

    def __init__(self, tokenizer, stop: Sequence[str], cancelled: threading.Event) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.cancelled = cancelled
        self.start: int | None = None
        self.generated = 0
        self.last_token: int | None = None
        self.hit_stop = False

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        if self.start is None:
            self.start = input_ids.shape[1] - 1
        self.generated = input_ids.shape[1] - self.start
        self.last_token = int(input_ids[0, -1])
        done = self.cancelled.is_set()
        if self.stop and not done:
            text = self.tokenizer.decode(input_ids[0, self.start:], skip_special_tokens=True)
            self.hit_stop = done = any(s in text for s in self.stop)
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class _Streamer(TextStreamer):
    """transformers' streamer (prompt skipped, special tokens dropped, words kept whole),
    with every finished piece cut at stop strings and handed to ``sink``."""

    def __init__(self, tokenizer, stop_text: StopText, sink: Callable[[Any], None]) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.stop_text = stop_text
        self.sink = sink
        self.pieces: list[str] = []

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        piece = self.stop_text.feed(text)
        if stream_end:
            piece += self.stop_text.flush()
        if piece:
            self.pieces.append(piece)
            self.sink(piece)


END = object()  # what a Generation's sink receives last


class Generation:
    """One answer being generated in a worker thread.

    Text pieces (already cut at stop strings) go to ``sink`` as they are decoded, then
    :data:`END`. Without a sink they go to an internal queue: iterate the Generation to get
    them (blocking). :meth:`cancel` stops generation at the next token; :meth:`result` waits
    for the :class:`Completion`.
    """

    def __init__(
        self,
        assistant: "Assistant",
        prompt_ids: list[int],
        params: GenerationParams,
        sink: Callable[[Any], None] | None = None,
        on_finish: Callable[[], None] | None = None,
    ) -> None:
        self.prompt_ids = prompt_ids
        self.params = params
        self.cancelled = threading.Event()
        self.completion: Completion | None = None
        self.error: BaseException | None = None
        self._queue: queue.Queue | None = queue.Queue() if sink is None else None
        self._sink = sink or self._queue.put
        self._on_finish = on_finish
        self._assistant = assistant
        self._thread = threading.Thread(target=self._run, name="medassist-generate", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.completion = self._assistant._generate(self, self._sink)
        except Exception as exc:  # noqa: BLE001 - reported to the consumer, never kills the server
            log.exception("generation failed")
            self.error = exc
        finally:
            if self._on_finish is not None:
                try:
                    self._on_finish()
                except Exception:  # noqa: BLE001
                    log.exception("on_finish callback failed")
            self._sink(END)

    def cancel(self) -> None:
        self.cancelled.set()

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def __iter__(self) -> Iterator[str]:
        if self._queue is None:
            raise RuntimeError("this Generation sends its text to a sink; it cannot be iterated")
        while (item := self._queue.get()) is not END:
            yield item
        if self.error is not None:
            raise self.error

    def result(self, timeout: float | None = None) -> Completion:
        self._thread.join(timeout)
        if self.error is not None:
            raise self.error
        if self.completion is None:
            raise TimeoutError("generation still running")
        return self.completion


def _position_limit(config) -> int | None:
    value = getattr(config, "max_position_embeddings", None) if config is not None else None
    return int(value) if isinstance(value, int) and value > 0 else None


class Assistant:
    """A loaded model that answers questions: prompt building and generation, no I/O.

    ``system_prompt``: None keeps the run's own system prompt, or, when it has none and the
    model uses a chat template, :data:`DEFAULT_SYSTEM_PROMPT` (plain-template runs keep none,
    as they were trained); a string replaces it ("" removes it). Encoder-decoder models have
    no system prompt and no conversation memory: each question is answered on its own.
    """

    def __init__(self, loaded: LoadedModel, system_prompt: str | None = None, max_prompt_tokens: int = 1024) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.family = loaded.family
        self.max_prompt_tokens = max_prompt_tokens
        fmt = make_format(loaded.family, loaded.tokenizer, loaded.config)
        # Serving checks lengths itself: a clear error beats a silently cut question.
        if isinstance(fmt, DecoderOnlyFormat):
            fmt.max_prompt_tokens = 1 << 30
            if system_prompt is not None:
                fmt.system_prompt = system_prompt or None
            elif fmt.system_prompt is None and fmt.uses_chat_template:
                fmt.system_prompt = DEFAULT_SYSTEM_PROMPT
        else:
            fmt.max_source_length = 1 << 30
        self.fmt = fmt
        # fast tokenizers reconfigure themselves per call; concurrent encodes can collide
        self._encode_lock = threading.Lock()
        config = getattr(self.model, "config", None)
        if self.family == "encoder-decoder":
            self.source_limit = _position_limit(getattr(config, "encoder", config))
            self.target_limit = _position_limit(getattr(config, "decoder", None))
        else:
            self.source_limit, self.target_limit = None, _position_limit(config)
        try:
            self.device = next(self.model.parameters()).device
        except (StopIteration, AttributeError):
            self.device = torch.device("cpu")

    @property
    def keeps_history(self) -> bool:
        return self.family == "decoder"

    @property
    def system_prompt(self) -> str | None:
        return self.fmt.system_prompt if self.family == "decoder" else None

    # -- prompts ------------------------------------------------------------------------
    def prompt_ids(
        self, question: str, history: Sequence[tuple[str, str]] = (), system_prompt: str | None = None
    ) -> list[int]:
        """Prompt tokens, uncut; ``system_prompt`` overrides the default for this call only."""
        fmt = self.fmt
        if system_prompt is not None and self.family == "decoder" and system_prompt != fmt.system_prompt:
            fmt = copy.copy(fmt)
            fmt.system_prompt = system_prompt or None
        with self._encode_lock:
            return fmt.prompt_ids(question, list(history) if self.keeps_history else ())

    def check_lengths(self, n_prompt: int, max_new_tokens: int) -> None:
        """Raise :class:`RequestError` when the prompt or the answer cannot fit."""
        if n_prompt > self.max_prompt_tokens:
            raise RequestError(
                f"the prompt is {n_prompt} tokens; this server accepts at most {self.max_prompt_tokens}"
            )
        if self.source_limit and n_prompt > self.source_limit:
            raise RequestError(f"the prompt is {n_prompt} tokens; the model reads at most {self.source_limit}")
        if self.family == "decoder" and self.target_limit and n_prompt + max_new_tokens > self.target_limit:
            raise RequestError(
                f"prompt ({n_prompt} tokens) + max tokens ({max_new_tokens}) exceed the model's "
                f"context of {self.target_limit} tokens"
            )
        if self.family == "encoder-decoder" and self.target_limit and max_new_tokens >= self.target_limit:
            raise RequestError(f"max tokens ({max_new_tokens}) must be below the model's {self.target_limit}")

    def fit_history(
        self, question: str, history: Sequence[tuple[str, str]], max_new_tokens: int
    ) -> list[tuple[str, str]]:
        """The most recent turns that fit with ``question``; RequestError if it alone does not."""
        kept = list(history) if self.keeps_history else []
        while True:
            n = len(self.prompt_ids(question, kept))
            try:
                self.check_lengths(n, max_new_tokens)
                return kept
            except RequestError:
                if not kept:
                    raise
                kept = kept[1:]

    # -- generation ---------------------------------------------------------------------
    def start(
        self,
        prompt_ids: list[int],
        params: GenerationParams,
        sink: Callable[[Any], None] | None = None,
        on_finish: Callable[[], None] | None = None,
    ) -> Generation:
        """Start generating in a worker thread (see :class:`Generation`)."""
        return Generation(self, prompt_ids, params.check(), sink, on_finish)

    def stream(
        self, question: str, history: Sequence[tuple[str, str]] = (), params: GenerationParams = GenerationParams()
    ) -> Generation:
        """Check lengths and start; iterate the result for text pieces as they come."""
        params.check()
        ids = self.prompt_ids(question, history)
        self.check_lengths(len(ids), params.max_new_tokens)
        return self.start(ids, params)

    def generate(
        self, question: str, history: Sequence[tuple[str, str]] = (), params: GenerationParams = GenerationParams()
    ) -> Completion:
        """Answer one question (blocking)."""
        generation = self.stream(question, history, params)
        for _ in generation:
            pass
        return generation.result()

    def _generate(self, generation: Generation, sink: Callable[[Any], None]) -> Completion:
        """Runs in the worker thread."""
        params = generation.params
        stop_text = StopText(params.stop)
        streamer = _Streamer(self.tokenizer, stop_text, sink)
        watch = _Watch(self.tokenizer, params.stop, generation.cancelled)
        batch = {k: v.to(self.device) for k, v in self.fmt.collate_prompts([generation.prompt_ids]).items()}
        kwargs: dict[str, Any] = dict(
            max_new_tokens=params.max_new_tokens, do_sample=params.sampling,
            eos_token_id=self.fmt.eos_id, pad_token_id=self.fmt.pad_id,
            streamer=streamer, stopping_criteria=StoppingCriteriaList([watch]),
        )
        if params.sampling:
            kwargs.update(temperature=params.temperature, top_p=params.top_p)
        else:  # neutral values, so a sampling generation_config does not warn about greedy decoding
            kwargs.update(temperature=1.0, top_p=1.0, top_k=None)
        with torch.inference_mode():
            self.model.generate(**batch, **kwargs)
        if watch.hit_stop or stop_text.stopped:
            reason = "stop"
        elif generation.cancelled.is_set():
            reason = "cancelled"
        elif watch.generated >= params.max_new_tokens and watch.last_token != self.fmt.eos_id:
            reason = "length"
        else:
            reason = "stop"
        return Completion("".join(streamer.pieces), len(generation.prompt_ids), watch.generated, reason)


# ---------------------------------------------------------------------------------------
# HTTP: settings, request/response schemas
@dataclass
class ServeSettings:
    """Options of ``medassist serve``. Token limits count the model's tokens."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # bearer key for every /v1 route; None = open
    model_name: str | None = None  # id shown by /v1/models; default: the model reference
    system_prompt: str | None = None  # see Assistant
    max_prompt_tokens: int = 1024  # longer prompts (system + history + question) get 400
    max_tokens_limit: int = 512  # a larger max_tokens gets 400
    default_max_tokens: int = 256  # when a request gives no max_tokens
    temperature: float = 0.0  # when a request gives none; 0 = greedy
    top_p: float = 1.0
    max_concurrency: int = 1  # generations running at once
    max_queue: int = 4  # requests waiting for a slot; more get 429 at once
    queue_timeout_s: float = 60.0  # a request waiting longer gets 503
    max_body_bytes: int = 1_000_000  # larger request bodies get 413

    def check(self) -> "ServeSettings":
        for name in ("max_prompt_tokens", "max_tokens_limit", "default_max_tokens", "max_concurrency"):
            if getattr(self, name) < 1:
                raise MedassistError(f"serve: {name.replace('_', '-')} must be at least 1")
        if self.max_queue < 0:
            raise MedassistError("serve: max-queue must be 0 or more")
        if self.queue_timeout_s <= 0:
            raise MedassistError("serve: queue-timeout must be positive")
        GenerationParams(self.default_max_tokens, self.temperature, self.top_p).check()
        return self


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
    loaded: LoadedModel, settings: ServeSettings | None = None, assistant: Assistant | None = None
) -> FastAPI:
    """The FastAPI app serving ``loaded`` (or a ready ``assistant`` for the same model)."""
    settings = (settings or ServeSettings()).check()
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

    def parse(body: ChatCompletionRequest) -> tuple[GenerationParams, str | None, list, str]:
        system, history, question = _conversation(body.messages)
        chars = sum(len(m.text()) for m in body.messages)
        if chars > max_prompt_chars:
            raise _APIError(400, f"the prompt is {chars} characters, far over this server's limit of "
                                 f"{settings.max_prompt_tokens} tokens", param="messages", code="prompt_too_long")
        max_tokens = body.max_completion_tokens or body.max_tokens or settings.default_max_tokens
        if max_tokens > settings.max_tokens_limit:
            raise _APIError(400, f"max_tokens is {max_tokens}; this server allows at most {settings.max_tokens_limit}",
                            param="max_tokens", code="max_tokens_too_large")
        params = GenerationParams(
            max_new_tokens=min(max_tokens, settings.max_tokens_limit),
            temperature=settings.temperature if body.temperature is None else body.temperature,
            top_p=settings.top_p if body.top_p is None else body.top_p,
            stop=tuple(body.stop or ()),
        )
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
            params.check()
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
        if generation.error is not None or generation.completion is None:
            raise _APIError(500, f"generation failed ({type(generation.error).__name__})")
        c = generation.completion
        return JSONResponse({
            "id": completion_id, "object": "chat.completion", "created": created, "model": model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text},
                         "finish_reason": _finish(c.finish_reason)}],
            "usage": _usage(c),
        })

    return app


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def _usage(c: Completion) -> dict:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens}


def _event(payload: Any) -> str:
    return "data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")) + "\n\n"


async def _sse(generation: Generation, pieces: asyncio.Queue, completion_id: str, created: int,
               model_id: str, include_usage: bool):
    """Server-sent events in OpenAI's chunk format; cancels the generation if the client leaves."""

    def chunk(delta: dict, finish_reason: str | None = None) -> str:
        return _event({"id": completion_id, "object": "chat.completion.chunk", "created": created,
                       "model": model_id, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]})

    try:
        yield chunk({"role": "assistant", "content": ""})
        while (item := await pieces.get()) is not END:
            yield chunk({"content": item})
        c = generation.completion
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
