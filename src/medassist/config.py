"""Typed configuration: every field, its default and its meaning, in one place.

One style for every setting: pydantic models, strict (``batch_size: true`` is an error, not
1; no float accepts inf or nan), documented where they are defined, and read by the CLI for
its defaults and help. :class:`TrainConfig` is a run (YAML whose keys mirror the classes;
``lora:``, ``data:``, ``eval:`` and ``retrieval:`` are sections), :class:`GenerationSettings`
how answers are generated (shared by evaluation, ``generate``, ``chat`` and ``serve``),
:class:`ServeConfig` the HTTP server. ``--set key=value`` overrides any key, dotted for sections
(``--set lora.r=8``); values are parsed as YAML scalars. Unknown keys and wrong types are
a :class:`~medassist.errors.ConfigError` that names the key.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medassist.errors import ConfigError

ModelType = Literal["decoder", "encoder-decoder"]


class _YamlLoader(yaml.SafeLoader):
    """YAML 1.2 scalars: only true/false are booleans (YAML 1.1 reads `no`, `off`, `yes` as
    booleans, which would turn `eval_strategy: no` into False), and `1e-3` is a float."""


_YamlLoader.yaml_implicit_resolvers = {
    key: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
# ... and YAML 1.2 floats, so `1e-3` is a number, not a string
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"), list("-+0123456789.")
)


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)


class DataConfig(_Section):
    """Where the question/answer pairs come from and how they are split."""

    path: str = Field("sample", description="CSV, TSV, JSONL, JSON or Parquet file, or a bundled data set: `sample` (105 hand-written rows) or `medquad`.")
    question_column: str = Field("question", description="Column holding the question.")
    answer_column: str = Field("answer", description="Column holding the reference answer.")
    group_column: str | None = Field(
        None,
        description="Optional column (e.g. `focus`) whose equal values always share a split, "
        "on top of grouping by normalised question.",
    )
    validation_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    limit: int | None = Field(None, ge=1, description="Use only the first N rows (after cleaning).")
    holdout_column: str | None = Field(
        None, description="Split by this column's values instead of by fractions: rows whose value is in "
        "`test_values` form the test split and `validation_values` the validation split (e.g. `source`: "
        "whole collections the model never trains on).")
    test_values: list[str] = Field(default_factory=list, description="Held-out values for the test split.")
    validation_values: list[str] = Field(default_factory=list, description="Held-out values for validation.")
    curate: bool = Field(
        True, description="Strip questions restated at the start of answers, cut boilerplate tables, drop "
        "link lists (each counted in the manifest; see medassist.curation).")
    balance_column: str | None = Field(
        None, description="Subsample the training split so no value of this column (e.g. `source`) dominates.")
    balance_alpha: float = Field(
        1.0, ge=0.0, le=1.0, description="With balance_column: each value's share is proportional to "
        "count ** alpha (1 = as found, 0.5 = square root, 0 = equal).")

    @model_validator(mode="after")
    def _fractions(self) -> "DataConfig":
        if self.validation_fraction + self.test_fraction >= 1.0:
            raise ValueError("validation_fraction + test_fraction must be < 1")
        if self.holdout_column and not self.test_values:
            raise ValueError("holdout_column needs test_values (the held-out values of the test split)")
        return self


class LoraConfig(_Section):
    """LoRA adapter settings (PEFT). Decoder-only models use LoRA by default."""

    enabled: bool | None = Field(
        None, description="None = on for decoder-only, off (full fine-tuning) for encoder-decoder."
    )
    r: int = Field(16, ge=1, description="Adapter rank.")
    alpha: int = Field(32, ge=1, description="Scaling numerator: updates are scaled by alpha/r.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: str | list[str] = Field(
        "all-linear", description="`all-linear` or a list of module names (q_proj, v_proj, ...)."
    )


class GenerationSettings(_Section):
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
    batch_size: int = Field(16, ge=1, description="Answers decoded together (evaluation): rows of the continuous "
                            "batch, refilled as answers end.")
    seed: int | None = Field(None, description="Torch seed for a sampling call (each answer draws with seed + its "
                             "index: reproducible whatever the batch).")
    dtype: Literal["fp32", "bf16"] = Field(
        "fp32", description="Precision of generation: fp32, or bf16 (opt-in: a bf16 copy of the weights; faster on "
        "CPUs with bf16 units, greedy answers may differ from fp32).")

    def generation(self, **changes) -> "GenerationSettings":
        """These settings alone (without a subclass's other fields), with ``changes`` applied."""
        values = {k: getattr(self, k) for k in GenerationSettings.model_fields}
        return GenerationSettings.model_validate({**values, **changes})


class EvalConfig(GenerationSettings):
    """Generation-based evaluation, used during training and by `medassist evaluate`; the
    generation fields it inherits are how the evaluated answers are generated."""

    bertscore_model: str = Field("minilm-l6", description="Preset, hub id or path of the encoder.")
    bertscore_layer: int | None = Field(
        None, description="Layer whose embeddings BERTScore compares; None = the preset's default."
    )
    bertscore_idf: bool = Field(False, description="Weight tokens by idf from the references.")
    bertscore_rescale: bool = Field(
        False, description="Rescale with bert_score's baseline (only for encoders it has one for)."
    )
    subset: int = Field(
        32, ge=0, description="Validation questions scored by generation at each evaluation (seeded)."
    )
    generation_metrics: bool = Field(
        True, description="Generate and score answers at each evaluation (else loss only)."
    )
    test_limit: int | None = Field(
        200, ge=1, description="End-of-training report: score at most this many test rows (seeded subset)."
    )
    loss_limit: int | None = Field(
        256, ge=1, description="Validation loss during training: at most this many validation rows, a seeded "
        "subset that is the same at every evaluation; null = all rows.")
    baselines: bool = Field(True, description="`evaluate`: also score the base model and 'repeat the question'.")
    factual_model: str = Field(
        "offline", description="Factual-consistency scorer: `offline` (facts + idf, no model) or an MNLI-style "
        "classifier (hub id or local folder).")
    retrieval_baseline: bool = Field(
        True, description="Also score 'answer with the answer of the nearest training question' (needs the "
        "training split).")
    retrieval_encoder: str = Field("minilm-l6", description="Encoder that finds the nearest training question.")
    bootstrap_resamples: int = Field(
        2000, ge=100, le=100_000, description="Paired bootstrap resamples for each 95% interval (seeded).")


class RetrievalConfig(_Section):
    """Retrieval-augmented fine-tuning and answering (docs/retrieval.md, "Grounded answers").

    With ``enabled``, every prompt (training, validation, test, and later ``generate``/``chat``/
    ``serve``) carries the top-``k`` passages the retriever finds at or above ``min_score``; the
    loss mask still covers only the answer. The index holds the *training split only* unless
    ``index`` names a built one (whose rows of held-out questions and, with
    ``data.holdout_column``, held-out collections are then never returned).
    """

    enabled: bool = Field(False, description="Put retrieved passages into every prompt (off until it wins).")
    index: str | None = Field(
        None, description="A built index directory (`medassist index build`); null = build one from the "
        "training split into RUN/retrieval/index (once: rebuilding with the same rows is skipped).")
    k: int = Field(3, ge=1, le=20, description="Passages per prompt at most (distinct source pages); passages "
                   "that do not fit the prompt budget are dropped from the last.")
    min_score: float | None = Field(
        None, description="Relevance threshold: passages scoring below it are never shown (no passage = the "
        "model answers without sources and says so); null = the retriever's measured threshold (0.80).")
    distractor_share: float = Field(
        0.2, ge=0.0, le=1.0, description="Share of training prompts (seeded) carrying only distractors: "
        "passages about other entities, so the model learns to ignore irrelevant context (RAFT, Zhang et al. "
        "2024, used 20%).")
    exclude_own_group: bool = Field(
        True, description="Never retrieve an example's own question group or its own answer text for itself "
        "(otherwise training teaches copying the answer from the prompt).")


class TrainConfig(_Section):
    """One training run. Defaults are the laptop-CPU recipe (configs/default.yaml)."""

    model: str = Field("smollm2-135m", description="Preset name, hub id or local path.")
    model_type: ModelType | None = Field(
        None, description="`decoder` or `encoder-decoder`; None = the preset's / config's family."
    )
    output_dir: str = Field("runs/default", description="Run directory (created).")
    seed: int = 42
    precision: Literal["auto", "bf16", "fp32", "fp16"] = Field(
        "auto", description="auto = bf16 autocast where the hardware runs it fast, else fp32."
    )

    # formatting
    prompt_format: Literal["auto", "chat", "plain"] = Field(
        "auto", description="auto = the tokenizer's chat template when it has one, else plain."
    )
    system_prompt: str | None = Field(
        None, description="Optional system message for chat-template models."
    )
    source_prefix: str = Field(
        "", description="Encoder-decoder only: text put before each question (T5 style)."
    )
    max_length: int = Field(256, ge=8, description="Decoder-only: prompt + answer tokens.")
    max_source_length: int = Field(128, ge=4, description="Encoder-decoder: question tokens.")
    max_target_length: int = Field(192, ge=4, description="Encoder-decoder: answer tokens incl. EOS.")
    answer_truncation: Literal["eos", "sentence", "no_eos"] = Field(
        "eos", description="A too-long answer: cut anywhere and keep the EOS (`eos`), cut at the last "
        "sentence end that fits and keep the EOS (`sentence`), or cut anywhere without EOS (`no_eos`).",
    )
    max_prompt_fraction: float = Field(
        0.5, gt=0.0, lt=1.0,
        description="Decoder-only: a question is cut only when its prompt alone exceeds this "
        "share of max_length; otherwise the answer is cut (always keeping EOS).",
    )

    # optimisation
    epochs: float = Field(1.0, gt=0.0)
    max_steps: int = Field(-1, description="> 0 overrides epochs.")
    learning_rate: float = Field(2e-4, gt=0.0)
    lr_scheduler: str = Field("cosine", description="A transformers scheduler name (linear, cosine, constant, ...).")
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    batch_size: int = Field(8, ge=1, description="Per-device training batch size.")
    grad_accum: int = Field(1, ge=1, description="Gradient accumulation steps.")
    group_by_length: bool = Field(True, description="Batch similar lengths together (less padding).")
    gradient_checkpointing: bool = False
    lm_head_on_answer_only: bool = Field(
        True, description="Decoder-only: project to the vocabulary only where labels count."
    )

    # bookkeeping
    logging_steps: int = Field(5, ge=1)
    eval_strategy: Literal["no", "steps", "epoch"] = "epoch"
    eval_steps: int | None = Field(None, ge=1)
    save_strategy: Literal["no", "steps", "epoch"] = "epoch"
    save_steps: int | None = Field(None, ge=1)
    save_total_limit: int | None = Field(2, ge=1)
    metric_for_best_model: Literal["eval_loss", "bertscore_f1"] = "eval_loss"
    report_to: Literal["none", "tensorboard", "mlflow", "wandb"] = "none"
    report: bool = Field(True, description="Evaluate the test split and write report/ at the end.")
    num_workers: int = Field(0, ge=0)

    data: DataConfig = Field(default_factory=DataConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)

    @field_validator("lr_scheduler")
    @classmethod
    def _known_scheduler(cls, value: str) -> str:
        from transformers.trainer_utils import SchedulerType

        known = [s.value for s in SchedulerType]
        if value not in known:
            raise ValueError(f"'{value}' is not a transformers scheduler ({', '.join(known)})")
        return value

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.eval_strategy == "steps" and not self.eval_steps:
            raise ValueError("eval_strategy: steps needs eval_steps")
        if self.save_strategy == "steps" and not self.save_steps:
            raise ValueError("save_strategy: steps needs save_steps")
        if self.metric_for_best_model == "bertscore_f1" and not (
            self.eval.generation_metrics and self.eval.subset > 0
        ):
            raise ValueError("metric_for_best_model: bertscore_f1 needs eval.generation_metrics and eval.subset > 0")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _format_error(err: ValidationError, origin: str) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "(top level)"
    if first["type"] == "extra_forbidden":
        return f"{origin}: unknown config key '{key}'"
    return f"{origin}: config key '{key}': {first['msg']}"


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Turn ``["lora.r=8", "model=tiny-qwen3"]`` into a nested dict (values as YAML scalars)."""
    tree: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set '{pair}': expected key=value")
        try:
            value = yaml_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
) -> TrainConfig:
    """Load a YAML config (or the defaults), apply overrides and validate."""
    tree: dict[str, Any] = {}
    origin = "defaults"
    if path is not None:
        origin = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except IsADirectoryError:
            raise ConfigError(f"{path}: is a directory, not a config file") from None
        except UnicodeDecodeError as exc:
            line = Path(path).read_bytes()[: exc.start].count(b"\n") + 1
            raise ConfigError(f"{path}: not UTF-8 text (line {line}, byte {exc.start})") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
        if "\x00" in text:
            raise ConfigError(f"{path}: binary file (NUL bytes), not a YAML config")
        try:
            loaded = yaml_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc.__class__.__name__})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a config must be a mapping of keys to values")
        tree = loaded or {}
    if overrides:
        extra = parse_overrides(overrides) if isinstance(overrides, list) else overrides
        tree = _merge(tree, extra)
        origin = f"{origin} + --set"
    try:
        return TrainConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_error(err, origin)) from None


class ServeConfig(_Section):
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


def field_help(model: type[BaseModel], name: str) -> str:
    """A field's description and default, for argparse help."""
    field = model.model_fields[name]
    default = field.default if field.default_factory is None else field.default_factory()
    return f"{field.description} (default: {default})"


def check_settings(model: type[BaseModel], origin: str, **values: Any):
    """Validate settings given as keyword arguments (CLI options); one line naming the option."""
    try:
        return model.model_validate(values)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise ConfigError(f"{origin}: --{key.replace('_', '-')}: {first['msg']}") from None
