"""How answers are generated (:class:`GenerationSettings`: evaluation, ``generate``, ``chat``
and ``serve``) and how the HTTP server runs (:class:`ServeConfig`); and :class:`Section`, the
strict base of every config class."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Section(BaseModel):
    """Strict: unknown keys and wrong types are errors, ``true`` is not 1, no float is inf or nan."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)


class GenerationSettings(Section):
    """How answers are generated: one rule for evaluation, ``generate``, ``chat`` and ``serve``.

    Greedy by default; ``temperature`` and ``top_p`` apply only with ``do_sample``. Generation
    stops at every EOS id of the model and of its tokenizer, or at the first ``stop`` string.
    """

    max_new_tokens: int = Field(128, ge=1, description="Most tokens per answer (EOS included).")
    do_sample: bool = Field(False, description="Sample instead of greedy decoding.")
    temperature: float = Field(1.0, gt=0.0, le=100.0, description="Sampling temperature (do_sample only).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass (do_sample only).")
    repetition_penalty: float = Field(
        1.0, ge=1.0, le=10.0, description="Divide the logits of tokens already in the answer (1 = off).")
    no_repeat_ngram_size: int = Field(0, ge=0, description="Never repeat an n-gram of this size (0 = off).")
    stop: list[str] = Field(default_factory=list, description="End the answer before the first of these.")
    batch_size: int = Field(32, ge=1, description="Answers decoded together (evaluation): rows of the continuous "
                            "batch, refilled as answers end (each row holds its own KV cache: lower it for big "
                            "models on small machines).")
    seed: int | None = Field(None, description="Torch seed for a sampling call (each answer draws with seed + its "
                             "index: reproducible whatever the batch).")
    dtype: Literal["fp32", "bf16"] = Field(
        "fp32", description="Precision of generation: fp32, or bf16 (opt-in: a bf16 copy of the weights; faster on "
        "CPUs with bf16 units, greedy answers may differ from fp32).")

    def generation(self, **changes) -> "GenerationSettings":
        """These settings alone (without a subclass's other fields), with ``changes`` applied."""
        values = {k: getattr(self, k) for k in GenerationSettings.model_fields}
        return GenerationSettings.model_validate({**values, **changes})



class ServeConfig(Section):
    """Options of ``medassist serve`` (the CLI reads its defaults and help from here).
    Token limits count the model's tokens."""

    host: str = Field("127.0.0.1", description="address to listen on (this machine only by default)")
    port: int = Field(8000, ge=1, le=65535, description="port")
    api_key: str | None = Field(None, description="require 'Authorization: Bearer KEY' on every /v1 route "
                                "(default: $MEDASSIST_API_KEY; unset = open)")
    allowed_hosts: list[str] | None = Field(
        None, description="Host header values accepted; default: loopback names when listening on loopback "
        "without a key (no DNS rebinding), else any")
    model_name: str | None = Field(None, description="model id reported by /v1/models (default: the --model value)")
    system_prompt: str | None = Field(
        None, description="system prompt for chat-template models; default: the run's own, else a careful "
        "medical-information prompt; '' for none (ignored by encoder-decoder models)")
    max_prompt_tokens: int = Field(1024, ge=1, description="longer prompts (system + history + question) get 400")
    max_tokens_limit: int = Field(512, ge=1, description="largest max_tokens a request may ask for; more gets 400")
    default_max_tokens: int = Field(256, ge=1, description="answer tokens when a request does not say (max_tokens)")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="sampling temperature when a request gives none; "
                               "0 = greedy, deterministic")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass when a request gives none")
    max_concurrency: int = Field(8, ge=1, description="generations admitted at once (with batching: the rows "
                                 "decoded together; without: one thread each)")
    batching: bool = Field(True, description="decode concurrent requests together (continuous batching: requests "
                           "join and leave between decoding steps); off: one generation thread per request")
    max_batch_size: int | None = Field(None, ge=1, description="rows per decoding step (default: max_concurrency); "
                                       "admitted requests beyond it wait for a row")
    max_queue: int = Field(4, ge=0, description="requests waiting for a generation slot; beyond this, 429")
    queue_timeout_s: float = Field(60.0, gt=0.0, description="a request waiting longer than this gets 503")
    max_body_bytes: int = Field(1_000_000, ge=1, description="larger request bodies get 413")

    @model_validator(mode="before")
    @classmethod
    def _default_within_limit(cls, values: Any) -> Any:
        """A default answer length over the limit is the limit (what a request could ask for)."""
        if isinstance(values, dict):
            limit = values.get("max_tokens_limit", cls.model_fields["max_tokens_limit"].default)
            default = values.get("default_max_tokens", cls.model_fields["default_max_tokens"].default)
            if isinstance(default, int) and isinstance(limit, int) and default > limit:
                values = {**values, "default_max_tokens": limit}
        return values
