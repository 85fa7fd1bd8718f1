"""Typed run configuration: every field, its default and its meaning, in one place.

A config is YAML whose keys mirror these classes (``lora:``, ``data:`` and ``eval:`` are
sections). ``--set key=value`` overrides any key, dotted for sections
(``--set lora.r=8``); values are parsed as YAML scalars. Unknown keys and wrong types are
a :class:`~medassist.errors.ConfigError` that names the key.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

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
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    """Where the question/answer pairs come from and how they are split."""

    path: str = Field("data/sample_medical_qa.csv", description="CSV, JSONL or Parquet file.")
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

    @model_validator(mode="after")
    def _fractions(self) -> "DataConfig":
        if self.validation_fraction + self.test_fraction >= 1.0:
            raise ValueError("validation_fraction + test_fraction must be < 1")
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


class EvalConfig(_Section):
    """Generation-based evaluation, used during training and by `medassist evaluate`."""

    bertscore_model: str = Field("minilm-l6", description="Preset, hub id or path of the encoder.")
    bertscore_layer: int | None = Field(
        None, description="Layer whose embeddings BERTScore compares; None = the preset's default."
    )
    bertscore_idf: bool = Field(False, description="Weight tokens by idf from the references.")
    bertscore_rescale: bool = Field(
        False, description="Rescale with bert_score's baseline (only for encoders it has one for)."
    )
    max_new_tokens: int = Field(128, ge=1)
    batch_size: int = Field(16, ge=1, description="Generation batch size.")
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    subset: int = Field(
        32, ge=0, description="Validation questions scored by generation at each evaluation (seeded)."
    )
    generation_metrics: bool = Field(
        True, description="Generate and score answers at each evaluation (else loss only)."
    )
    test_limit: int | None = Field(
        200, ge=1, description="End-of-training report: score at most this many test rows (seeded subset)."
    )
    baselines: bool = Field(True, description="`evaluate`: also score the base model and 'repeat the question'.")


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
    max_prompt_fraction: float = Field(
        0.5, gt=0.0, lt=1.0,
        description="Decoder-only: a question is cut only when its prompt alone exceeds this "
        "share of max_length; otherwise the answer is cut (always keeping EOS).",
    )

    # optimisation
    epochs: float = Field(1.0, gt=0.0)
    max_steps: int = Field(-1, description="> 0 overrides epochs.")
    learning_rate: float = Field(2e-4, gt=0.0)
    lr_scheduler: str = Field("cosine", description="Any transformers scheduler name.")
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
