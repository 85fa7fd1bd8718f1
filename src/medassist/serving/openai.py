"""The OpenAI wire format: what ``/v1`` accepts and answers, and nothing about how it is served.

- requests: :class:`ChatCompletionRequest`, parsed strictly from the raw body by
  :func:`parse_chat_request` (JSON types as sent: ``max_tokens: "3"`` or ``true`` and
  ``stream: "yes"`` are errors, never coerced; unknown fields are ignored, since OpenAI clients
  send many this server does not use);
- responses: :class:`ChatCompletion`, :class:`ChatCompletionChunk` (server-sent events),
  :class:`ModelList`; the routes return these very models. A server with an index adds
  ``sources`` (and ``sources_note``) to a completion, and streams them in the last chunk before
  ``[DONE]``, which has no choices (with the usage when asked for; :class:`_Grounded`);
- errors: :class:`APIError`, answered as OpenAI does, ``400 {"error": {"message", "type",
  "param", "code"}}``, so OpenAI clients show the message;
- :func:`conversation`: OpenAI messages -> system prompt, history and question.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer

from medassist.engine import Answer

FinishReason = Literal["stop", "length"]


def clean_text(text: str) -> str:
    """JSON can carry lone surrogates (a browser cutting an emoji in half); no tokenizer
    accepts them, so they become U+FFFD."""
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


# ---------------------------------------------------------------------------------------
# errors
class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class APIError(Exception):
    """An error answered in OpenAI's shape (see :class:`ErrorResponse`)."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
             500: "server_error", 503: "server_overloaded"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> ErrorResponse:
        kind = self.TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return ErrorResponse(error=ErrorBody(message=self.message, type=kind, param=self.param, code=self.code))


def validation_error(errors: Sequence[dict[str, Any]]) -> APIError:
    """A 400 naming the first few fields that are wrong (pydantic's errors)."""
    parts, param = [], None
    for err in errors[:3]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        param = param or where
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    code = errors[0].get("type") if errors else None
    return APIError(400, "invalid request: " + "; ".join(parts) + more, param=param, code=code)


# ---------------------------------------------------------------------------------------
# requests
class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class ContentPart(_Strict):
    type: Literal["text"] = Field(description="Only text parts: this model reads no images or audio.")
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return clean_text(self.content)
        return "\n".join(clean_text(part.text) for part in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
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
        return [clean_text(s) for s in stops if s]

    @property
    def answer_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


def parse_chat_request(raw: bytes) -> ChatCompletionRequest:
    """The request in ``raw`` (a JSON body), or an :class:`APIError` (400) that says what is wrong."""
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise APIError(400, f"request body is not valid JSON ({exc.msg} at byte {exc.pos})", code="invalid_json") from None
    except (ValueError, RecursionError) as exc:  # not UTF-8, a 5000-digit number, nesting beyond the stack
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:120]
        raise APIError(400, f"request body is not valid JSON ({reason})", code="invalid_json") from None
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as err:
        raise validation_error(err.errors(include_url=False)) from None


@dataclass
class Conversation:
    system: str | None
    history: list[tuple[str, str]] = field(default_factory=list)
    question: str = ""


def conversation(messages: Sequence[ChatMessage]) -> Conversation:
    """OpenAI messages -> system prompt (or None), [(user, assistant), ...] and the question.

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
        raise APIError(400, "the last message (after system messages) must be from the user", param="messages")
    question = turns.pop()[1]
    if not question.strip():
        raise APIError(400, "the user's question is empty", param="messages")
    # after merging, turns alternate: the history is (user, assistant) pairs, a leading
    # assistant turn answering nothing
    history, pending = [], ""
    for role, text in turns:
        if role == "user":
            pending = text
        else:
            history.append((pending, text))
            pending = ""
    return Conversation("\n\n".join(system) if system else None, history, question)


# ---------------------------------------------------------------------------------------
# responses
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, answer: Answer) -> "Usage":
        return cls(prompt_tokens=answer.prompt_tokens, completion_tokens=answer.completion_tokens,
                   total_tokens=answer.prompt_tokens + answer.completion_tokens)


def finish_reason(answer: Answer) -> FinishReason:
    return "length" if answer.finish_reason == "length" else "stop"


class SourceItem(BaseModel):
    """A source the answer used (medassist's ``sources`` field, beside OpenAI's)."""

    index: int = Field(description="The source's number [n] in the model's prompt.")
    title: str
    url: str = Field(description="The page the passage came from (may be empty).")
    score: float | None = Field(None, description="Relevance score of the retrieval (cosine-like, 0-1).")


def _sources(grounding) -> list[SourceItem]:
    return [SourceItem(index=s.id, title=s.title, url=s.url, score=s.score) for s in grounding.sources]


class _Grounded(BaseModel):
    """``sources`` and ``sources_note``: present only when the server answers from an index.

    ``sources`` lists the retrieved passages the answer used (title, url); ``[]`` with a
    ``sources_note`` when no source was relevant enough or the answer used none. OpenAI clients
    keep unknown fields: ``completion.sources`` / ``completion.model_extra["sources"]`` in the
    official Python client.
    """

    sources: list[SourceItem] | None = Field(None, description="Sources the answer used (servers with an index).")
    sources_note: str | None = Field(None, description="Why no source is listed (servers with an index).")

    @model_serializer(mode="wrap")
    def _grounding_if_any(self, handler):  # last, and only when there is an index
        data = handler(self)
        extra = {k: data.pop(k, None) for k in ("sources", "sources_note")}
        return {**data, **{k: v for k, v in extra.items() if v is not None}}


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason


class ChatCompletion(_Grounded):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _only_set(self, handler):  # a delta carries only what changed: {"content": "..."} or {}
        return {k: v for k, v in handler(self).items() if v is not None}


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(_Grounded):
    """A streamed event; with an index, the last one before ``[DONE]`` has no choice and carries
    the ``sources`` (and the usage, when asked for: :meth:`Reply.final_chunk`)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


@dataclass(frozen=True)
class Reply:
    """What every part of one answer shares: its id, creation time and model."""

    id: str
    created: int
    model: str

    def completion(self, answer: Answer, grounding=None) -> ChatCompletion:
        """The whole answer; ``grounding`` (:class:`~medassist.serving.sources.Grounding`) adds its sources."""
        extra = {} if grounding is None else {"sources": _sources(grounding), "sources_note": grounding.note}
        return ChatCompletion(id=self.id, created=self.created, model=self.model, usage=Usage.of(answer),
                              choices=[Choice(message=AssistantMessage(content=answer.text),
                                              finish_reason=finish_reason(answer))], **extra)

    def final_chunk(self, answer: Answer, include_usage: bool, grounding=None) -> ChatCompletionChunk | None:
        """The last chunk before ``[DONE]``, without choices: the usage (when asked for) and the
        sources (with an index), in one chunk, so a client that reads the usage from the last
        chunk still finds it there; None when there is neither."""
        if not include_usage and grounding is None:
            return None
        extra = {} if grounding is None else {"sources": _sources(grounding), "sources_note": grounding.note}
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[],
                                   usage=Usage.of(answer) if include_usage else None, **extra)

    def chunk(self, delta: Delta, finish: FinishReason | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model,
                                   choices=[ChunkChoice(delta=delta, finish_reason=finish)])

    def usage_chunk(self, answer: Answer) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[],
                                   usage=Usage.of(answer))


class ServedModel(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "medassist"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ServedModel]


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 503)}
