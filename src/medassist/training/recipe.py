"""The training recipe: one linear run for both model families.

:func:`train` reads like the run it performs:

1. **set up**: the checkpoint to continue from, the run directory, the data and its splits;
2. **model**: the base model in fp32, wrapped with LoRA when configured; the precision;
3. **data -> tensors**: the family's formatter tokenizes; a seeded subset for the validation loss;
4. **fit**: transformers' Trainer (:class:`~medassist.training.trainer.MedassistTrainer`), with the
   speed and memory switches of :mod:`~medassist.training.speed`;
5. **validate and save**: the final validation metrics, ``final/`` and ``train_summary.json``;
6. **evaluate**: the test split and the report (:mod:`medassist.evaluation.hooks`).

The helpers follow ``train`` in that order; step 3 is :mod:`~medassist.training.examples`.
"""

from __future__ import annotations

import importlib.util
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from transformers import set_seed

from medassist.config import TrainConfig
from medassist.data import PreparedData, prepare_data, write_splits
from medassist.distributed import is_main_process, run_on_main_process, world_size
from medassist.errors import ConfigError, TrainingInterrupted
from medassist.families import DECODER, ModelFamily
from medassist.formatting import PromptFormat
from medassist.models import load_pretrained
from medassist.rundir import RunDir
from medassist.training.checkpoints import (
    find_resume_checkpoint, has_checkpoints, newest_complete_checkpoint, truncate_metrics,
)
from medassist.training.examples import (
    TokenizedSplit, _test_subset, to_dataset, tokenize_examples, validation_loss_subset,
)
from medassist.training.precision import resolve_precision
from medassist.training.speed import (bf16_frozen_weights, compile_layers, recompute_swiglu, release_freed_memory,
                                      trimming)
from medassist.training.summary import run_summary, steps_line, write_summary
from medassist.training.trainer import (
    GracefulStop, JsonlMetricsCallback, MedassistTrainer, TrimMemory, columns_collator, training_arguments,
)


@dataclass
class TrainResult:
    run_dir: Path
    summary: dict[str, Any]
    report: dict[str, Any] | None = None
    events: list[str] = field(default_factory=list)


def train(
    cfg: TrainConfig,
    log: Callable[[str], None] = lambda _msg: None,
    resume: str | bool | None = None,
    progress=None,
) -> TrainResult:
    """Run one training job end to end; ``log`` receives short progress lines for the CLI.

    ``resume``: ``"auto"`` (or True) for the newest complete checkpoint of the run directory,
    or a checkpoint folder or run directory (:func:`find_resume_checkpoint`). Model or adapter,
    optimizer, scheduler, RNG and data order continue from it, and ``metrics.jsonl`` is cut back
    to the events the checkpoint had logged. ``progress``: a ``(description, total) -> update``
    factory for the bars of the final test evaluation (the CLI's tqdm). With ``auto`` and no complete checkpoint, the run
    starts from step 0 (one warning). SIGTERM or Ctrl-C saves a checkpoint and raises
    :class:`TrainingInterrupted`.

    Under ``torchrun`` / ``accelerate launch`` every rank runs this function; only rank 0
    writes files, and generation metrics are computed on rank 0 (:func:`run_on_main_process`).
    """
    start = time.perf_counter()
    # 1. set up
    check_tracker(cfg.report_to)
    run = RunDir(Path(cfg.output_dir))
    checkpoint = checkpoint_to_resume(run, resume)
    set_seed(cfg.seed)
    _, data = setup_run(cfg, resuming=checkpoint is not None)
    if checkpoint is None and is_main_process():
        run.metrics_file.unlink(missing_ok=True)  # a fresh run's events only

    # 2. model
    model, tokenizer, family = build_model(cfg)
    cfg = cfg.model_copy(update={"model_type": family.name})
    if is_main_process():
        run.config_file.write_text(cfg.to_yaml(), encoding="utf-8")
    precision = resolve_precision(cfg.precision, cfg.model)
    trainable, total = parameter_counts(model)
    log(f"model {cfg.model} ({family.name}), {total / 1e6:.1f}M parameters, {trainable / 1e6:.2f}M trainable "
        f"({100 * trainable / total:.2f}%), precision {precision}")
    m = data.manifest
    log(f"data {m.source}: {m.rows_read} rows read, {m.rows_kept} kept, dropped {m.dropped}; "
        f"splits {m.rows_per_split}")

    # 3. data -> tensors (with retrieval: each prompt carries its retrieved passages)
    fmt = family.make_format(tokenizer, cfg)
    sources = retrieval_sources(cfg, run, data, log)
    train_tok = tokenize_examples(fmt, family, data.splits["train"], sources and sources.passages("train"))
    val_tok = tokenize_examples(fmt, family, data.splits["validation"], sources and sources.passages("validation"))
    if not train_tok.features:
        raise ConfigError("no training example has an answer token within the length limits")
    val_loss_rows = validation_loss_subset(val_tok.features, cfg)
    log(f"tokenized: {len(train_tok.features)} train examples ({train_tok.supervised_tokens} answer tokens), "
        f"{train_tok.truncated} answers cut to fit, {train_tok.dropped_no_answer_tokens} dropped with no answer "
        f"token; validation loss on {len(val_loss_rows)} of {len(val_tok.features)} validation examples")

    # 4. fit
    if sources is not None:
        log(f"passages in training prompts after the length budget: {train_tok.passages_line()}")
    trainer = build_trainer(cfg, run, model, tokenizer, family, fmt, precision, train_tok, val_loss_rows, data,
                            sources)
    compiled = compile_layers(cfg, trainer, log)
    frozen = bf16_frozen_weights(cfg, trainer, precision, uses_lora(cfg, family),
                                 lambda: load_pretrained(cfg.model, cfg.model_type)[0], log, compiled is not None)
    setup_seconds = time.perf_counter() - start
    fitted = fit(trainer, checkpoint, run, log)
    if compiled is not None:
        compiled.remove()  # what follows (validation, the report) runs eager, as final/ is served

    # 5. validate and save
    in_fit = dict(trainer.seconds)
    final_eval = final_validation(trainer) if val_loss_rows else {}
    saving = time.perf_counter()
    if frozen is not None:
        frozen.restore()  # the exact fp32 base again: the test split scores what final/ serves
    trainer.save_model(str(run.final))  # every rank (FSDP gathers); only rank 0 writes
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(run.final))
    timing = {"setup": setup_seconds, "train": fitted.wall - in_fit["eval"] - in_fit["generation"],
              "eval": trainer.seconds["eval"], "generation": trainer.seconds["generation"],
              "save": time.perf_counter() - saving, "report": 0.0}
    summary = run_summary(cfg, trainer, fitted, final_eval, precision, train_tok, val_tok, val_loss_rows, timing)
    if sources is not None:
        summary["retrieval"] = sources.summary(train_tok)
    write_summary(trainer, run, summary, start)

    # 6. evaluate the test split
    result = TrainResult(run_dir=run.path, summary=summary)
    if cfg.report and data.splits["test"]:
        from medassist.evaluation import evaluate_run_after_training

        release_freed_memory()
        reporting = time.perf_counter()
        # rank 0 evaluates the whole test split (same numbers as one process); the others wait
        base_name = None if uses_lora(cfg, family) else cfg.model
        model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)  # as served: no autocast
        result.report = run_on_main_process(lambda: evaluate_run_after_training(
            run, model, fmt, family, _test_subset(data.splits["test"], cfg), cfg, base_name, log, sources=sources,
            progress=trimming(progress) if cfg.memory_trim_steps else progress))
        timing["report"] = time.perf_counter() - reporting
        write_summary(trainer, run, summary, start)
    log(f"trained {steps_line(summary)} in {fitted.wall:.1f} s "
        f"({summary['supervised_tokens_per_second'] or 0:.0f} answer tokens/s); final model in {run.final}")
    return result


# ---------------------------------------------------------------------------------------
# 1. set up
_TRACKER_MODULES = {"tensorboard": ("tensorboard", "tensorboardX"), "mlflow": ("mlflow",), "wandb": ("wandb",)}


def check_tracker(report_to: str) -> None:
    """``report_to: none`` (the default) sends metrics nowhere but ``metrics.jsonl``; the
    others need their package. tensorboard writes event files to ``RUN/logs``; mlflow logs
    to ``./mlruns`` unless ``MLFLOW_TRACKING_URI`` names a server; wandb uploads unless
    ``WANDB_MODE=offline``."""
    if report_to != "none" and not any(importlib.util.find_spec(m) for m in _TRACKER_MODULES[report_to]):
        raise ConfigError(f"report_to: {report_to} needs its package: pip install {report_to}")


def checkpoint_to_resume(run: RunDir, resume: str | bool | None) -> str | None:
    """The checkpoint this run continues from, or None for a run from step 0.

    Without ``resume`` a run must not start among another run's checkpoints (a later
    ``--resume`` would pick the old run's newest one). With ``resume="auto"`` and no complete
    checkpoint the run starts from step 0: incomplete ones are overwritten as their steps are
    saved again."""
    if resume:
        return find_resume_checkpoint(run.path, resume)
    if has_checkpoints(run.path):
        raise ConfigError(f"{run.path} already holds checkpoints of a run: pass --resume to continue it, "
                          "or choose another --output-dir")
    return None


def setup_run(cfg: TrainConfig, resuming: bool = False) -> tuple[Path, PreparedData]:
    """Create the run directory; write the resolved config, the data manifest and the splits."""
    run = RunDir(Path(cfg.output_dir))
    data = prepare_data(cfg.data, cfg.seed)
    if resuming:
        _check_same_data(run.manifest(), data)
    if is_main_process():
        run.path.mkdir(parents=True, exist_ok=True)
        run.config_file.write_text(cfg.to_yaml(), encoding="utf-8")
        run.manifest_file.write_text(json.dumps(data.manifest.to_dict(), indent=2))
        write_splits(data.splits, run.splits)
    return run.path, data


def retrieval_sources(cfg: TrainConfig, run: RunDir, data: PreparedData, log: Callable[[str], None]):
    """With ``retrieval.enabled``: the run's index and every split's passages
    (:mod:`medassist.retrieval.augment`, cached in ``RUN/retrieval/``); else None."""
    if not cfg.retrieval.enabled:
        return None
    from medassist.retrieval.augment import run_sources

    progress = _quarters(log)
    if world_size() == 1:
        return run_sources(cfg, run.path, data.splits, log, progress)
    run_on_main_process(lambda: run_sources(cfg, run.path, data.splits, log, progress) and None)  # rank 0 builds
    return run_sources(cfg, run.path, data.splits)  # every rank opens the index and the cache rank 0 wrote


def _quarters(log: Callable[[str], None]) -> Callable[[str, int, int], None]:
    """A progress callback that logs each stage of the index build at 25, 50, 75 and 100%."""
    shown: dict[str, int] = {}

    def progress(stage: str, done: int, total: int) -> None:
        quarter = 4 * done // max(1, total)
        if total >= 1000 and quarter > shown.get(stage, 0):
            shown[stage] = quarter
            log(f"retrieval: {stage} {done}/{total}")

    return progress


def _check_same_data(old: dict[str, Any] | None, new: PreparedData) -> None:
    """A resumed run must see the data it started with, or the skipped batches are others."""
    if old is None:
        return
    if old.get("sha256") != new.manifest.sha256 or old.get("rows_per_split") != new.manifest.rows_per_split:
        raise ConfigError(f"--resume: the data differs from the run's ({old.get('source')}, splits "
                          f"{old.get('rows_per_split')}); resume with the same data settings, or start a new run")


# ---------------------------------------------------------------------------------------
# 2. model
def uses_lora(cfg: TrainConfig, family: ModelFamily) -> bool:
    return cfg.lora.enabled if cfg.lora.enabled is not None else family.lora_by_default


def build_model(cfg: TrainConfig):
    """Load the base model in fp32 and wrap it with LoRA when configured. The adapters are
    initialised from ``cfg.seed`` alone: loading may draw from the global generator (a model
    converted on first use did, so the first run after a fresh install trained from other
    adapters than every later run of the same seed)."""
    model, tokenizer, family = load_pretrained(cfg.model, cfg.model_type)
    if uses_lora(cfg, family):
        from peft import LoraConfig, get_peft_model

        set_seed(cfg.seed)

        layers, targets = adapted_layers(cfg, model, family), cfg.lora.target_modules
        if layers is not None and targets == "all-linear":  # PEFT takes layer indexes only with a list of names
            targets = linear_names(model)
        lora = LoraConfig(
            r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
            target_modules=targets, task_type=family.peft_task(), layers_to_transform=layers,
        )
        model = get_peft_model(model, lora)
    if cfg.recompute_mlp_activation:
        recompute_swiglu(model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if uses_lora(cfg, family):
            model.enable_input_require_grads()
    return model, tokenizer, family


def adapted_layers(cfg: TrainConfig, model, family: ModelFamily) -> list[int] | None:
    """The decoder layers ``lora.last_layers`` puts adapters in (None = all)."""
    last = cfg.lora.last_layers
    if last is None:
        return None
    if family.name != DECODER:
        raise ConfigError(f"lora.last_layers: only for decoder-only models ({cfg.model} is {family.name})")
    total = model.config.get_text_config().num_hidden_layers
    if last > total:
        raise ConfigError(f"lora.last_layers: {last}, but {cfg.model} has {total} decoder layers")
    return list(range(total - last, total))


def linear_names(model) -> list[str]:
    """What PEFT's ``all-linear`` targets, as a list of module names: every linear (and GPT-2's
    ``Conv1D``) but the LM head."""
    import torch
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not head})


def parameter_counts(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


# (3. data -> tensors: medassist.training.examples)
# ---------------------------------------------------------------------------------------
# 4. fit
def build_trainer(cfg: TrainConfig, run: RunDir, model, tokenizer, family: ModelFamily, fmt: PromptFormat,
                  precision: str, train_tok: TokenizedSplit, val_loss_rows: list[dict[str, Any]],
                  data: PreparedData, sources=None) -> MedassistTrainer:
    generation_eval = None
    if cfg.eval.generation_metrics and cfg.eval.subset > 0 and data.splits["validation"]:
        from medassist.evaluation import make_training_evaluator

        generation_eval = make_training_evaluator(fmt, family, data.splits["validation"], cfg,
                                                  sources and sources.passages("validation"))
    trainer = MedassistTrainer(
        model=model,
        args=training_arguments(cfg, run.path, precision, has_eval=bool(val_loss_rows)),
        train_dataset=to_dataset(train_tok),
        eval_dataset=to_dataset(val_loss_rows),
        data_collator=columns_collator(fmt),
        processing_class=tokenizer,
        callbacks=[JsonlMetricsCallback(run.metrics_file),
                   *([TrimMemory(cfg.memory_trim_steps, release_freed_memory)] if cfg.memory_trim_steps else [])],
        family=family,
        prune_head=cfg.lm_head_on_answer_only,
        generation_eval=generation_eval,
        save_total_limit=cfg.save_total_limit,
        head_chunk_size=cfg.head_chunk_size,
    )
    if cfg.report_to == "tensorboard":
        from transformers.integrations import TensorBoardCallback

        for cb in trainer.callback_handler.callbacks:  # transformers 5 has no logging_dir argument
            if isinstance(cb, TensorBoardCallback) and cb.logging_dir is None:  # TENSORBOARD_LOGGING_DIR wins
                cb.logging_dir = str(run.logs)
    if trainer.is_fsdp_enabled and (generation_eval is not None or (cfg.report and data.splits["test"])):
        raise ConfigError("under FSDP, rank 0 cannot generate alone (parameters are sharded): set "
                          "eval.generation_metrics=false and report=false, then run `medassist evaluate` on the run")
    return trainer


@dataclass
class Fit:
    output: Any  # transformers' TrainOutput
    checkpoint: str | None  # resumed from
    resumed_at: int  # its step; 0 for a run from step 0
    wall: float  # seconds in trainer.train, evaluations during training included
    counters: dict[str, int]  # all ranks, all sessions
    session: dict[str, int]  # all ranks, this process only


def fit(trainer: MedassistTrainer, checkpoint: str | None, run: RunDir, log: Callable[[str], None]) -> Fit:
    resumed_at = 0
    if checkpoint:
        resumed_at = json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))["global_step"]
        log(f"resuming from {checkpoint} (step {resumed_at})")
        if trainer.is_world_process_zero():
            truncate_metrics(run.metrics_file, Path(checkpoint))
        trainer.restore_counters(checkpoint)
    before = trainer.global_counters()
    start = time.perf_counter()
    with GracefulStop(log) as stop:
        trainer.add_callback(stop)
        output = trainer.train(resume_from_checkpoint=checkpoint)
    wall = time.perf_counter() - start
    if stop.received:
        newest, _ = newest_complete_checkpoint(run.checkpoints)
        saved = f"checkpoint saved in {newest}" if newest else "no checkpoint was saved"
        raise TrainingInterrupted(f"training stopped by {stop.received} at step {trainer.state.global_step}; "
                                  f"{saved}; resume with: medassist train <same arguments> --resume")
    counters = trainer.global_counters()
    return Fit(output, checkpoint, resumed_at, wall, counters, {k: counters[k] - before[k] for k in counters})


# ---------------------------------------------------------------------------------------
# 5. validate and save
def final_validation(trainer: MedassistTrainer) -> dict[str, Any]:
    """Validation metrics of the model training ends with (the best checkpoint when
    ``load_best_model_at_end``), without evaluating the same weights twice.

    When the last evaluation during training was of these very weights (the last step, and the
    best checkpoint is that step or none is reloaded), its logged metrics are the answer. When
    an earlier best checkpoint was reloaded, or the last step was not evaluated, the model is
    evaluated once more: the numbers then describe the weights in ``final/`` as measured.
    """
    state = trainer.state
    reloaded = trainer.args.load_best_model_at_end and state.best_model_checkpoint
    if not reloaded or state.best_global_step == state.global_step:
        logged = {}
        for event in state.log_history:  # the loss and the generation metrics are separate events
            if event.get("step") == state.global_step:
                logged.update({k: v for k, v in event.items() if k.startswith("eval_")})
        if "eval_loss" in logged:
            return _metrics_only(logged)
    return _metrics_only(trainer.evaluate())


def _metrics_only(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if k.startswith("eval_") and not k.endswith(("runtime", "per_second"))}
