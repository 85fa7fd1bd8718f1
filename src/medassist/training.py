"""Training: one linear recipe for both model families.

``train(cfg)`` reads like the run it performs: set up the run directory and data -> load the
model (LoRA or full) -> tokenize with the family's formatter -> fit with a Trainer -> save
``final/`` and the summary -> evaluate the test split and write the report.

Why transformers' ``Trainer`` rather than TRL's ``SFTTrainer``: medassist tokenizes itself
(``formatting``) so that both families share one code path and the EOS is never cut (TRL's
truncation cuts from the right and drops it); what is left for a trainer is the loop,
checkpoints, schedules, precision and distributed launch, which ``Trainer`` does for both
families alike. ``MedassistTrainer`` adds two things: the LM head applied only where labels
count (decoder-only), and generation metrics inside ``evaluate`` so ``bertscore_f1`` can pick
the best checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

from medassist.config import TrainConfig
from medassist.data import PreparedData, QAExample, prepare_data, write_splits
from medassist.errors import ConfigError
from medassist.formatting import IGNORE_INDEX, Format, make_format
from medassist.models import load_pretrained


# ---------------------------------------------------------------------------------------
# precision
def cpu_supports_bf16() -> bool:
    """True where the CPU has native bf16 matmul (AVX512-BF16 or AMX), so autocast is fast."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, family: str = "decoder", model_name: str = "") -> str:
    """Turn ``auto`` into bf16 or fp32 for this hardware; refuse fp16 for T5-family models."""
    if precision == "fp16":
        if "t5" in model_name.lower():
            raise ConfigError("precision: fp16 is refused for T5-family models (they overflow in fp16); use bf16 or fp32")
        if not torch.cuda.is_available():
            raise ConfigError("precision: fp16 needs a CUDA GPU; use bf16 or fp32 on CPU")
        return "fp16"
    if precision == "bf16":
        if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
            raise ConfigError("precision: bf16 is not supported by this GPU; use fp16 or fp32")
        return "bf16"
    if precision == "auto":
        if torch.cuda.is_available():
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return "bf16" if cpu_supports_bf16() else "fp32"
    return "fp32"


# ---------------------------------------------------------------------------------------
# model
def uses_lora(cfg: TrainConfig, family: str) -> bool:
    return cfg.lora.enabled if cfg.lora.enabled is not None else family == "decoder"


def build_model(cfg: TrainConfig):
    """Load the base model in fp32 and wrap it with LoRA when configured."""
    model, tokenizer, family = load_pretrained(cfg.model, cfg.model_type)
    if family == "encoder":
        raise ConfigError(f"model '{cfg.model}' is an encoder only; pick a decoder or encoder-decoder model")
    if cfg.model_type and cfg.model_type != family:
        raise ConfigError(f"model_type: {cfg.model_type}, but '{cfg.model}' is a {family} model")
    if uses_lora(cfg, family):
        from peft import LoraConfig, TaskType, get_peft_model

        lora = LoraConfig(
            r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
            target_modules=cfg.lora.target_modules,
            task_type=TaskType.SEQ_2_SEQ_LM if family == "encoder-decoder" else TaskType.CAUSAL_LM,
        )
        model = get_peft_model(model, lora)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if uses_lora(cfg, family):
            model.enable_input_require_grads()
    return model, tokenizer, family


def parameter_counts(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------
# data -> tensors
@dataclass
class TokenizedSplit:
    features: list[dict[str, Any]]
    dropped_no_answer_tokens: int = 0
    truncated: int = 0

    @property
    def supervised_tokens(self) -> int:
        return sum(f["n_supervised"] for f in self.features)


def tokenize_examples(fmt: Format, examples: list[QAExample]) -> TokenizedSplit:
    out = TokenizedSplit(features=[])
    for ex in examples:
        enc = fmt.encode(ex.question, ex.answer)
        if enc is None:
            out.dropped_no_answer_tokens += 1
            continue
        out.truncated += int(enc.truncated)
        out.features.append({
            "input_ids": enc.input_ids, "labels": enc.labels,
            "length": len(enc.input_ids) + len(enc.labels) * (fmt.family == "encoder-decoder"),
            "n_supervised": enc.n_supervised,
        })
    return out


def to_dataset(split: TokenizedSplit):
    from datasets import Dataset

    return Dataset.from_list(split.features) if split.features else None


# ---------------------------------------------------------------------------------------
# trainer
class MedassistTrainer(Trainer):
    """``Trainer`` with a pruned LM head and generation metrics in ``evaluate``."""

    def __init__(self, *args, head_on_answer_only: bool = False,
                 generation_eval: Callable[[Any], dict[str, float]] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.head_on_answer_only = head_on_answer_only
        self.generation_eval = generation_eval
        self.tokens_seen = 0
        self.supervised_tokens_seen = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self.tokens_seen += int(inputs["attention_mask"].sum())
            self.supervised_tokens_seen += int((inputs["labels"] != IGNORE_INDEX).sum())
        # Under DDP the wrapper's forward must run (gradient sync hooks): use the stock path.
        if not self.head_on_answer_only or return_outputs or self.accelerator.num_processes > 1:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        return self._answer_only_loss(model, inputs, num_items_in_batch)

    def _answer_only_loss(self, model, inputs, num_items_in_batch):
        """Causal LM loss with the vocabulary projection applied to supervised positions only.

        The full-logit tensor (batch x length x vocab) is never built: for SmolLM2 (49k vocab)
        the head is ~20% of the forward FLOPs and its logits the largest activation.
        """
        causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        body, head = causal_lm.get_decoder(), causal_lm.get_output_embeddings()
        hidden = body(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
        labels = inputs["labels"][:, 1:]
        keep = labels != IGNORE_INDEX
        logits = head(hidden[:, :-1][keep]).float()
        loss = F.cross_entropy(logits, labels[keep], reduction="sum")
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            return loss / num_items_in_batch
        return loss / keep.sum().clamp(min=1)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        if self.generation_eval is not None:
            extra = {f"{metric_key_prefix}_{k}": v for k, v in self.generation_eval(self.model).items()}
            self.log(extra)
            metrics.update(extra)
        return metrics


class JsonlMetricsCallback(TrainerCallback):
    """Appends every log event (train loss, eval metrics) as one JSON line; main process only."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": state.epoch, "time": time.time(), **logs}
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


def training_arguments(cfg: TrainConfig, run_dir: Path, precision: str, has_eval: bool) -> TrainingArguments:
    eval_strategy = cfg.eval_strategy if has_eval else "no"
    save_strategy = cfg.save_strategy
    best = eval_strategy != "no" and save_strategy == eval_strategy
    if best and save_strategy == "steps" and cfg.save_steps % (cfg.eval_steps or 1):
        raise ConfigError("save_steps must be a multiple of eval_steps to keep the best checkpoint")
    return TrainingArguments(
        output_dir=str(run_dir / "checkpoints"),
        seed=cfg.seed,
        data_seed=cfg.seed,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # a float < 1 is a ratio of the total steps
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.eval.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        length_column_name="length",
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
        logging_strategy="steps",
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        eval_strategy=eval_strategy,
        eval_steps=cfg.eval_steps,
        save_strategy=save_strategy,
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        load_best_model_at_end=best,
        metric_for_best_model=cfg.metric_for_best_model if best else None,
        report_to=[] if cfg.report_to == "none" else [cfg.report_to],
        remove_unused_columns=False,
        dataloader_num_workers=cfg.num_workers,
        ddp_find_unused_parameters=False,
        disable_tqdm=False,
    )


def _columns_collator(fmt: Format):
    def collate(features):
        return fmt.collate([{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features])

    return collate


# ---------------------------------------------------------------------------------------
# the run
@dataclass
class TrainResult:
    run_dir: Path
    summary: dict[str, Any]
    report: dict[str, Any] | None = None
    events: list[str] = field(default_factory=list)


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def setup_run(cfg: TrainConfig) -> tuple[Path, PreparedData]:
    """Create the run directory; write the resolved config, the data manifest and the splits."""
    run_dir = Path(cfg.output_dir)
    data = prepare_data(cfg.data, cfg.seed)
    if is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
        (run_dir / "data_manifest.json").write_text(json.dumps(data.manifest.to_dict(), indent=2))
        write_splits(data.splits, run_dir / "splits")
    return run_dir, data


def train(
    cfg: TrainConfig,
    log: Callable[[str], None] = lambda _msg: None,
    resume: str | bool | None = None,
) -> TrainResult:
    """Run one training job end to end; ``log`` receives short progress lines for the CLI.

    ``resume``: a checkpoint folder, or True for the newest checkpoint of the run directory.
    """
    set_seed(cfg.seed)
    run_dir, data = setup_run(cfg)
    model, tokenizer, family = build_model(cfg)
    cfg = cfg.model_copy(update={"model_type": family})
    if is_main_process():
        (run_dir / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
    precision = resolve_precision(cfg.precision, family, cfg.model)
    trainable, total = parameter_counts(model)
    log(f"model {cfg.model} ({family}), {total / 1e6:.1f}M parameters, {trainable / 1e6:.2f}M trainable "
        f"({100 * trainable / total:.2f}%), precision {precision}")
    m = data.manifest
    log(f"data {m.source}: {m.rows_read} rows read, {m.rows_kept} kept, dropped {m.dropped}; "
        f"splits {m.rows_per_split}")

    fmt = make_format(family, tokenizer, cfg)
    train_tok = tokenize_examples(fmt, data.splits["train"])
    val_tok = tokenize_examples(fmt, data.splits["validation"])
    if not train_tok.features:
        raise ConfigError("no training example has an answer token within the length limits")
    log(f"tokenized: {len(train_tok.features)} train examples ({train_tok.supervised_tokens} answer tokens), "
        f"{train_tok.truncated} answers cut to fit, {train_tok.dropped_no_answer_tokens} dropped with no answer token")

    generation_eval = None
    if cfg.eval.generation_metrics and cfg.eval.subset > 0 and data.splits["validation"]:
        from medassist.evaluation import make_training_evaluator

        generation_eval = make_training_evaluator(fmt, data.splits["validation"], cfg)

    args = training_arguments(cfg, run_dir, precision, has_eval=bool(val_tok.features))
    trainer = MedassistTrainer(
        model=model,
        args=args,
        train_dataset=to_dataset(train_tok),
        eval_dataset=to_dataset(val_tok),
        data_collator=_columns_collator(fmt),
        processing_class=tokenizer,
        callbacks=[JsonlMetricsCallback(run_dir / "metrics.jsonl")],
        head_on_answer_only=cfg.lm_head_on_answer_only and family == "decoder",
        generation_eval=generation_eval,
    )
    start = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=resume)
    wall = time.perf_counter() - start

    final_eval = trainer.evaluate() if val_tok.features else {}
    history = trainer.state.log_history
    train_losses = [h["loss"] for h in history if "loss" in h]
    summary = {
        "model": cfg.model,
        "model_type": family,
        "precision": precision,
        "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "train_examples": len(train_tok.features),
        "validation_examples": len(val_tok.features),
        "dropped_no_answer_tokens": train_tok.dropped_no_answer_tokens + val_tok.dropped_no_answer_tokens,
        "truncated_answers": train_tok.truncated,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "supervised_tokens": trainer.supervised_tokens_seen,
        "tokens": trainer.tokens_seen,
        "supervised_tokens_per_second": trainer.supervised_tokens_seen / wall if wall else None,
        "tokens_per_second": trainer.tokens_seen / wall if wall else None,
        "wall_time_seconds": wall,
        "train_loss_mean": output.training_loss,
        "final_train_loss": train_losses[-1] if train_losses else None,
        "final_validation_loss": final_eval.get("eval_loss"),
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "best_metric": trainer.state.best_metric,
        "validation_metrics": {k: v for k, v in final_eval.items() if not k.endswith(("runtime", "per_second"))},
    }
    if summary["final_validation_loss"] is not None:
        summary["final_validation_perplexity"] = math.exp(min(50.0, summary["final_validation_loss"]))
    if trainer.is_world_process_zero():
        trainer.save_model(str(run_dir / "final"))
        tokenizer.save_pretrained(str(run_dir / "final"))
        (run_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
    result = TrainResult(run_dir=run_dir, summary=summary)
    if cfg.report and data.splits["test"]:
        from medassist.evaluation import evaluate_run_after_training

        result.report = evaluate_run_after_training(run_dir, trainer.model, fmt, data.splits["test"], cfg, log)
    log(f"trained {summary['steps']} steps in {wall:.1f} s "
        f"({summary['supervised_tokens_per_second'] or 0:.0f} answer tokens/s); final model in {run_dir / 'final'}")
    return result
