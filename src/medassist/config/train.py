"""One training run (:class:`TrainConfig`) and its sections: ``data:`` (:class:`DataConfig`),
``lora:`` (:class:`LoraConfig`), ``eval:`` (:class:`EvalConfig`) and ``retrieval:``
(:class:`RetrievalConfig`)."""

from __future__ import annotations

from typing import Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from medassist.config.generation import GenerationSettings, Section

ModelType = Literal["decoder", "encoder-decoder"]


class DataConfig(Section):
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


class LoraConfig(Section):
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
    last_layers: int | None = Field(
        None, ge=1, description="Adapters only in the last N decoder layers (decoder-only models; PEFT's "
        "layers_to_transform): the layers below run forward only, with no backward pass. None = every layer. "
        "Measured on the default recipe: 15 of 30 trains 1.36x faster, but with less gain over the base model "
        "(bench/RESULTS.md).")


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
    perplexity_batch_size: int = Field(16, ge=1, description="References scored together for perplexity "
                                       "(teacher forcing; sorted by length).")
    perplexity_precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="Perplexity under bf16 autocast (`auto`: where training would use bf16; measured "
        "within 2e-4 relative of fp32, bench/RESULTS.md) or fp32. Generated answers are always decoded in "
        "the generation `dtype`.")
    baselines: bool = Field(True, description="`evaluate`: also score the base model and 'repeat the question'.")
    cache_baselines: bool = Field(
        True, description="Reuse the baselines' scored answers (base model, nearest training question, repeated "
        "question) from an earlier evaluation where everything they depend on is the same: base weights, prompts, "
        "references, training rows, settings, medassist's code and libraries ($MEDASSIST_CACHE/baselines, "
        "default ~/.cache/medassist; the result's settings say when it was used).")
    factual_model: str = Field(
        "offline", description="Factual-consistency scorer: `offline` (facts + idf, no model) or an MNLI-style "
        "classifier (hub id or local folder).")
    retrieval_baseline: bool = Field(
        True, description="Also score 'answer with the answer of the nearest training question' (needs the "
        "training split).")
    retrieval_encoder: str = Field("minilm-l6", description="Encoder that finds the nearest training question.")
    bootstrap_resamples: int = Field(
        2000, ge=100, le=100_000, description="Paired bootstrap resamples for each 95% interval (seeded).")

    @model_validator(mode="before")
    @classmethod
    def _former_names(cls, values: Any) -> Any:
        """``cache_base_model`` (2026-12-07, when only the base model was cached) is ``cache_baselines``."""
        if isinstance(values, dict) and "cache_base_model" in values and "cache_baselines" not in values:
            values = {k if k != "cache_base_model" else "cache_baselines": v for k, v in values.items()}
        return values


class RetrievalConfig(Section):
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
    heldout_corpus: Literal["blocked", "open"] = Field(
        "blocked", description="With a built `index` that holds the held-out collections: `blocked` never "
        "returns their passages; `open` lets validation/test questions (never training prompts) retrieve "
        "their *other* rows, as an assistant given the whole vetted corpus would: each question's own "
        "question group and any copy of its answer text are still excluded.")


class TrainConfig(Section):
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
    head_chunk_size: int | None = Field(
        None, ge=1, description="Decoder-only answer-only head: logits and cross-entropy for at most this many "
        "answer positions at a time, so no positions x vocabulary tensor is built or kept for backward "
        "(same loss and gradients); null = all positions at once.",
    )
    bf16_frozen_weights: bool = Field(
        False, description="LoRA with bf16 precision: store the frozen base linear weights in bf16 while "
        "training (autocast casts them to bf16 at every forward anyway: same numbers, no per-step casts, half "
        "their memory). The exact fp32 weights come back for generation metrics and after training, so the "
        "final evaluation scores what final/ serves. Ignored with fp32 precision, without LoRA and under FSDP.",
    )
    recompute_mlp_activation: bool = Field(
        False, description="Decoder MLPs of the SwiGLU form (Llama, Qwen, Mistral): keep gate(x) and up(x) for "
        "backward and recompute silu(gate(x)) there instead of keeping it too (a quarter of the MLP's saved "
        "activations; the same gradients bit for bit, one SiLU per layer more in backward).",
    )
    torch_compile: bool = Field(
        False, description="Compile each repeated block (decoder layer, T5 block) with torch.compile (inductor, "
        "dynamic shapes) for the training steps; validation and generation stay eager. The first step pays the "
        "compilation (about 40 s for SmolLM2 on 2 CPU cores). On CPU it needs a C++ compiler; without one the run "
        "says so and trains eager.",
    )
    memory_trim_steps: int | None = Field(
        None, ge=1, description="Hand the heap pages that freed activations left behind back to the OS every N "
        "optimizer steps, and as the final evaluation's answers finish (glibc `malloc_trim`; a no-op "
        "elsewhere). Every batch has its own shape, so without it RSS grows with the run instead of staying "
        "at the live memory (bench/RESULTS.md, \"Memory\"). null = only once, before the final evaluation.",
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
