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
the best checkpoint; for production runs it also writes checkpoints atomically and keeps the
data order reproducible across a resume (section "checkpoints"; docs/distributed.md).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_callback import ExportableState
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy, rotate_checkpoints

from medassist.config import TrainConfig
from medassist.data import PreparedData, QAExample, prepare_data, write_splits
from medassist.errors import ConfigError, TrainingInterrupted
from medassist.distributed import is_main_process, run_on_main_process, world_size
from medassist.families import ModelFamily, can_prune_head
from medassist.formatting import IGNORE_INDEX, PromptFormat
from medassist.models import load_pretrained
from medassist.rundir import RunDir


# ---------------------------------------------------------------------------------------
# precision
def cpu_supports_bf16(cpuinfo: str | None = None) -> bool:
    """True where the CPU has native bf16 matmul (x86 AVX512-BF16 or AMX-BF16, Arm BF16), so
    autocast is fast; elsewhere torch emulates bf16 and it is slower than fp32.

    ``cpuinfo``: the text of ``/proc/cpuinfo`` (read when None; no such file means False).
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86 / Arm
            flags.update(value.split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def resolve_precision(precision: str, model_name: str = "") -> str:
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
def uses_lora(cfg: TrainConfig, family: ModelFamily) -> bool:
    return cfg.lora.enabled if cfg.lora.enabled is not None else family.lora_by_default


def build_model(cfg: TrainConfig):
    """Load the base model in fp32 and wrap it with LoRA when configured."""
    model, tokenizer, family = load_pretrained(cfg.model, cfg.model_type)
    if uses_lora(cfg, family):
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
            target_modules=cfg.lora.target_modules, task_type=family.peft_task(),
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


def tokenize_examples(fmt: PromptFormat, family: ModelFamily, examples: list[QAExample]) -> TokenizedSplit:
    out = TokenizedSplit(features=[])
    for ex in examples:
        enc = fmt.encode(ex.question, ex.answer)
        if enc is None:
            out.dropped_no_answer_tokens += 1
            continue
        out.truncated += int(enc.truncated)
        out.features.append({
            "input_ids": enc.input_ids, "labels": enc.labels,
            "length": family.sample_length(enc),
            "n_supervised": enc.n_supervised,
        })
    return out


def to_dataset(split: TokenizedSplit):
    from datasets import Dataset

    return Dataset.from_list(split.features) if split.features else None


# ---------------------------------------------------------------------------------------
# checkpoints: atomic save, completeness, resume
STAGING_PREFIX = "tmp-checkpoint-"  # not matched by transformers' `checkpoint-*` globs
COMPLETE_MARKER = ".complete"
STATE_FILE = "medassist_state.json"  # counters that transformers' TrainerState does not keep


def _fsync(path: Path) -> None:
    """Flush a file or a folder entry to disk; a no-op where the OS or filesystem refuses."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish_checkpoint(staging: Path, final: Path, step: int) -> Path:
    """Mark a fully written staging folder complete, then rename it to its final name.

    Two guards, because each covers a failure the other does not:

    - *temporary folder + rename*: everything is written to ``tmp-checkpoint-N`` and renamed to
      ``checkpoint-N`` (one atomic ``rename`` on POSIX) only when complete, so a crash mid-save
      never leaves a folder that transformers or medassist take for a checkpoint;
    - *a ``.complete`` marker written last*, listing every file and its size: on filesystems
      where a folder rename is not atomic (cloud FUSE mounts copy then delete) or after a
      partial copy of a run directory, a ``checkpoint-N`` without a matching marker is still
      recognised as incomplete, and resume skips it.

    Files are fsynced before the marker and the marker before the rename, so after a power
    loss the marker never exists without the data it describes.
    """
    files = {}
    for path in sorted(staging.rglob("*")):
        if path.is_file():
            _fsync(path)
            files[path.relative_to(staging).as_posix()] = path.stat().st_size
    marker = staging / COMPLETE_MARKER
    with open(marker, "w", encoding="utf-8") as handle:
        json.dump({"step": step, "files": files}, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    _fsync(staging)
    if final.exists():  # this step saved again, after resuming from an older checkpoint
        shutil.rmtree(final)
    os.replace(staging, final)
    _fsync(final.parent)
    return final


def checkpoint_problem(folder: Path) -> str | None:
    """Why ``folder`` cannot be resumed from, or None when it is a complete checkpoint."""
    marker = folder / COMPLETE_MARKER
    if not marker.is_file():
        return f"no {COMPLETE_MARKER} marker (the save was interrupted)"
    try:
        files = json.loads(marker.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, TypeError):
        return f"unreadable {COMPLETE_MARKER} marker"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} expected"
    return None


def complete_checkpoints(checkpoints_dir: Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every complete checkpoint, oldest first; warns about the others."""
    found = []
    if not checkpoints_dir.is_dir():
        return found
    for folder in sorted(checkpoints_dir.iterdir()):
        if not folder.is_dir():
            continue
        if folder.name.startswith(STAGING_PREFIX):
            warnings.warn(f"skipping incomplete checkpoint {folder} (a save was interrupted)", stacklevel=2)
            continue
        match = re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", folder.name)
        if not match:
            continue
        problem = checkpoint_problem(folder)
        if problem:
            warnings.warn(f"skipping incomplete checkpoint {folder}: {problem}", stacklevel=2)
            continue
        found.append((int(match.group(1)), folder))
    return sorted(found)


def find_resume_checkpoint(run_dir: Path, value: str | bool = "auto") -> str | None:
    """The checkpoint ``--resume [auto|PATH]`` means, as a folder path.

    ``auto`` (or True): the newest complete checkpoint in ``RUN/checkpoints``, or None when
    there is none yet (the run starts from step 0; a warning says so). PATH: a checkpoint
    folder, or a run directory (its newest complete checkpoint); anything else, or an
    incomplete checkpoint, is a :class:`ConfigError`. Incomplete checkpoints met on the way
    are skipped with a warning.
    """
    run_dir = Path(run_dir)
    if value is True or value == "auto":
        found = complete_checkpoints(run_dir / "checkpoints")
        if not found:
            warnings.warn(f"--resume: no complete checkpoint in {run_dir / 'checkpoints'} yet; "
                          "training starts from step 0", stacklevel=2)
            return None
        return str(found[-1][1])
    path = Path(value)
    if (path / "checkpoints").is_dir():
        found = complete_checkpoints(path / "checkpoints")
        if not found:
            raise ConfigError(f"--resume {value}: this run directory has no complete checkpoint")
        return str(found[-1][1])
    if not path.is_dir():
        raise ConfigError(f"--resume {value}: no such checkpoint folder (expected RUN/checkpoints/checkpoint-N)")
    if not (path / "trainer_state.json").is_file():
        raise ConfigError(f"--resume {value}: not a training checkpoint (no trainer_state.json)")
    problem = checkpoint_problem(path)
    if problem:
        raise ConfigError(f"--resume {value}: incomplete checkpoint: {problem}")
    return str(path)


def truncate_metrics(path: Path, checkpoint: Path) -> int:
    """Cut ``metrics.jsonl`` back to the events the checkpoint had logged; returns how many stay.

    Each line is one ``Trainer.log`` call, as is each entry of the checkpoint's
    ``log_history``, so after a resume the file holds exactly the events of the resumed
    trajectory: those logged after the checkpoint by the crashed process are dropped (they are
    logged again, with the same steps, as training continues) and none is written twice.
    """
    if not path.is_file():
        return 0
    state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    keep = len(state.get("log_history", []))
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if len(kept) == keep:
            break
        try:
            json.loads(line)
        except ValueError:  # a line cut by the crash
            break
        kept.append(line)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)
    return len(kept)


class EpochSeededSampler(torch.utils.data.Sampler):
    """``LengthGroupedSampler`` with its shuffle seeded by ``seed + epoch``.

    transformers' length-grouped sampler draws from the global RNG, whose state at the start of
    an epoch differs between an uninterrupted run and one resumed mid-way; seeding each epoch
    makes the data order a function of (seed, epoch) only, so a resumed run sees the same
    batches. Every DDP rank computes the same order and accelerate gives each its shard.
    """

    def __init__(self, inner: LengthGroupedSampler, seed: int):
        self.inner, self.seed, self.epoch = inner, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self):
        self.inner.generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(self.inner)


class GracefulStop(TrainerCallback):
    """SIGTERM / Ctrl-C: finish the current optimizer step, save a checkpoint, stop.

    A second signal aborts at once (KeyboardInterrupt). Under DDP every rank receives the
    signal from its launcher, possibly at different steps, so the flag is all-reduced at
    each step end and all ranks stop at the same step (else one would wait forever in the
    checkpoint's barrier).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, log: Callable[[str], None] = lambda _m: None):
        self.log = log
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, _frame):
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        self.log(f"received {self.received}: saving a checkpoint after this step, then stopping "
                 "(send it again to stop at once without saving)")

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *_exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def on_step_end(self, args, state, control, **kwargs):
        stop = self.received is not None
        if world_size() > 1:
            flag = torch.tensor([int(stop)], device=args.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item())
            if stop and self.received is None:
                self.received = "a signal on another rank"
        if stop:
            control.should_save = True
            control.should_training_stop = True
        return control


# ---------------------------------------------------------------------------------------
# trainer
class MedassistTrainer(Trainer):
    """``Trainer`` with a pruned LM head, generation metrics in ``evaluate``, atomic
    checkpoints (:func:`publish_checkpoint`) and a data order that survives a resume."""

    def __init__(self, *args, family: ModelFamily, prune_head: bool = True,
                 generation_eval: Callable[[Any], dict[str, float]] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.family = family
        self.prune_head = prune_head and can_prune_head(self.model)
        self.generation_eval = generation_eval
        self.tokens_seen = 0
        self.supervised_tokens_seen = 0
        self.examples_seen = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self.examples_seen += int(inputs["input_ids"].shape[0])
            self.tokens_seen += int(inputs["attention_mask"].sum())
            self.supervised_tokens_seen += int((inputs["labels"] != IGNORE_INDEX).sum())
        # Under DDP the wrapper's forward must run (gradient sync hooks): use the stock path.
        if return_outputs or self.accelerator.num_processes > 1:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        return self._answer_only_loss(model, inputs, num_items_in_batch)

    def _answer_only_loss(self, model, inputs, num_items_in_batch):
        """The loss through the family's answer-only head (:meth:`ModelFamily.answer_logits`):
        for decoder-only models the vocabulary projection runs on supervised positions only, so
        the batch x length x vocab logit tensor is never built (for SmolLM2's 49k vocabulary the
        head is ~20% of the forward FLOPs and its logits the largest activation)."""
        # accelerate applies bf16/fp16 autocast by wrapping model.forward; the head calls parts
        # of the model directly, so enter the same autocast (else a bf16 run computes in fp32)
        with self.accelerator.autocast():
            logits, targets = self.family.answer_logits(model, inputs, self.prune_head)
        loss = F.cross_entropy(logits, targets, reduction="sum")
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            return loss / num_items_in_batch
        return loss / max(1, targets.numel())

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Loss-only evaluation (no ``compute_metrics``) through the same answer-only head, so
        evaluation never builds a batch x length x vocab logit tensor either."""
        if not (prediction_loss_only and self.accelerator.num_processes == 1):
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self._answer_only_loss(model, inputs, None)
        return loss.detach(), None, None

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        if self.generation_eval is not None:
            scores = run_on_main_process(lambda: self.generation_eval(self.model))
            extra = {f"{metric_key_prefix}_{k}": v for k, v in scores.items()}
            self.log(extra)  # on every rank, so all keep the same log_history and best metric
            metrics.update(extra)
        return metrics

    # -- counters across ranks and resumes -------------------------------------------
    def global_counters(self) -> dict[str, int]:
        """Examples and tokens trained on, summed over ranks (a collective under DDP)."""
        values = torch.tensor([self.examples_seen, self.tokens_seen, self.supervised_tokens_seen],
                              dtype=torch.int64, device=self.args.device)
        if world_size() > 1:
            dist.all_reduce(values)
        examples, tokens, supervised = (int(v) for v in values.tolist())
        return {"examples_seen": examples, "tokens_seen": tokens, "supervised_tokens_seen": supervised}

    def restore_counters(self, checkpoint: str | Path) -> None:
        """Continue the counters of a resumed run (kept by rank 0; the others start at 0)."""
        path = Path(checkpoint) / STATE_FILE
        if path.is_file() and self.is_world_process_zero():
            saved = json.loads(path.read_text(encoding="utf-8"))
            self.examples_seen = saved.get("examples_seen", 0)
            self.tokens_seen = saved.get("tokens_seen", 0)
            self.supervised_tokens_seen = saved.get("supervised_tokens_seen", 0)

    # -- data order ----------------------------------------------------------------
    def _get_train_sampler(self, train_dataset=None):
        sampler = super()._get_train_sampler(train_dataset)
        if isinstance(sampler, LengthGroupedSampler):
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            sampler = self._epoch_sampler = EpochSeededSampler(sampler, seed)
        return sampler

    def _run_epoch(self, *args, **kwargs):
        # accelerate's set_epoch does not reach a sampler under skip_first_batches +
        # BatchSamplerShard (a DDP resume mid-epoch): tell it the epoch directly
        if getattr(self, "_epoch_sampler", None) is not None and "epoch" in kwargs:
            self._epoch_sampler.set_epoch(kwargs["epoch"])
        return super()._run_epoch(*args, **kwargs)

    # -- atomic checkpoints --------------------------------------------------------
    def _save_checkpoint(self, model, trial) -> None:
        """transformers 5's ``Trainer._save_checkpoint``, written to ``tmp-checkpoint-N`` and
        published by :func:`publish_checkpoint` once every rank has written its part.

        The pieces (model, optimizer, scheduler, scaler, per-rank RNG, trainer state) are
        saved by the same Trainer methods as upstream; only the folder and the order differ.
        """
        step = self.state.global_step
        run_dir = Path(self._get_output_dir(trial=trial))
        final = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{step}"
        staging = run_dir / f"{STAGING_PREFIX}{step}"
        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        if self.args.should_save and staging.exists():  # left by a crash during this step's save
            shutil.rmtree(staging)
        self.accelerator.wait_for_everyone()

        self.save_model(str(staging), _internal_call=True)
        if not self.args.save_only_model:
            self._save_optimizer_and_scheduler(str(staging))
            self._save_scaler(str(staging))
            self._save_rng_state(str(staging))
        counters = self.global_counters()

        if self.args.save_strategy in (SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST) \
                and self.state.best_global_step:
            best = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{self.state.best_global_step}"
            if self.state.best_global_step == step or best.exists():
                self.state.best_model_checkpoint = str(best)

        if self.args.should_save:
            for cb in [c for c in self.callback_handler.callbacks + [self.control] if isinstance(c, ExportableState)]:
                name = cb.__class__.__name__
                if isinstance(self.state.stateful_callbacks[name], list):
                    self.state.stateful_callbacks[name].append(cb.state())
                else:
                    self.state.stateful_callbacks[name] = cb.state()
            self.state.save_to_json(str(staging / "trainer_state.json"))
            (staging / STATE_FILE).write_text(json.dumps(counters), encoding="utf-8")
        self.accelerator.wait_for_everyone()  # every rank's files (rng_state_<rank>.pth) are in

        if self.args.should_save:
            publish_checkpoint(staging, final, step)
            if self.args.push_to_hub:
                self._push_from_checkpoint(str(final))
            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()  # nobody reads checkpoint-N before it exists


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
        greater_is_better=cfg.metric_for_best_model != "eval_loss",
        report_to=[] if cfg.report_to == "none" else [cfg.report_to],
        remove_unused_columns=False,
        dataloader_num_workers=cfg.num_workers,
        ddp_find_unused_parameters=False,
        disable_tqdm=False,
    )


def _columns_collator(fmt: PromptFormat):
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


def _test_subset(rows: list[QAExample], cfg: TrainConfig) -> list[QAExample]:
    """At most ``eval.test_limit`` test rows, a seeded subset, so the final report stays bounded."""
    limit = cfg.eval.test_limit
    if limit is None or len(rows) <= limit:
        return rows
    import random

    keep = sorted(random.Random(cfg.seed).sample(range(len(rows)), limit))
    return [rows[i] for i in keep]


_TRACKER_MODULES = {"tensorboard": ("tensorboard", "tensorboardX"), "mlflow": ("mlflow",), "wandb": ("wandb",)}


def check_tracker(report_to: str) -> None:
    """``report_to: none`` (the default) sends metrics nowhere but ``metrics.jsonl``; the
    others need their package. tensorboard writes event files to ``RUN/logs``; mlflow logs
    to ``./mlruns`` unless ``MLFLOW_TRACKING_URI`` names a server; wandb uploads unless
    ``WANDB_MODE=offline``."""
    if report_to != "none" and not any(importlib.util.find_spec(m) for m in _TRACKER_MODULES[report_to]):
        raise ConfigError(f"report_to: {report_to} needs its package: pip install {report_to}")


def _check_fresh_run(run_dir: Path) -> None:
    """A new run must not start among another run's checkpoints: a later ``--resume`` would
    pick the old run's newest one."""
    folder = run_dir / "checkpoints"
    if folder.is_dir() and any(p.name.startswith((f"{PREFIX_CHECKPOINT_DIR}-", STAGING_PREFIX))
                               for p in folder.iterdir()):
        raise ConfigError(f"{run_dir} already holds checkpoints of a run: pass --resume to continue it, "
                          "or choose another --output-dir")


def _read_manifest(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "data_manifest.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _check_same_data(old: dict[str, Any] | None, new: PreparedData) -> None:
    """A resumed run must see the data it started with, or the skipped batches are others."""
    if old is None:
        return
    if old.get("sha256") != new.manifest.sha256 or old.get("rows_per_split") != new.manifest.rows_per_split:
        raise ConfigError(f"--resume: the data differs from the run's ({old.get('source')}, splits "
                          f"{old.get('rows_per_split')}); resume with the same data settings, or start a new run")


def setup_run(cfg: TrainConfig, resuming: bool = False) -> tuple[Path, PreparedData]:
    """Create the run directory; write the resolved config, the data manifest and the splits."""
    run_dir = Path(cfg.output_dir)
    data = prepare_data(cfg.data, cfg.seed)
    if resuming:
        _check_same_data(_read_manifest(run_dir), data)
    if is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
        (run_dir / "data_manifest.json").write_text(json.dumps(data.manifest.to_dict(), indent=2))
        write_splits(data.splits, run_dir / "splits")
    return run_dir, data


def _mean_train_loss(history: list[dict], session_mean: float, steps: int, resumed_at: int) -> float:
    """Mean train loss over all steps; Trainer's ``training_loss`` covers this session only.
    The resumed part comes from the logged losses (each weighted by the steps it spans)."""
    if not resumed_at:
        return session_mean
    total, last = 0.0, 0
    for event in history:
        if "loss" in event and event["step"] <= resumed_at:
            total, last = total + event["loss"] * (event["step"] - last), event["step"]
    session = steps - resumed_at
    return (total + session_mean * session) / max(1, last + session)


def train(
    cfg: TrainConfig,
    log: Callable[[str], None] = lambda _msg: None,
    resume: str | bool | None = None,
) -> TrainResult:
    """Run one training job end to end; ``log`` receives short progress lines for the CLI.

    ``resume``: a checkpoint folder, or True / ``"auto"`` for the newest complete checkpoint of
    the run directory (:func:`find_resume_checkpoint`). Model or adapter, optimizer, scheduler,
    RNG and data order continue from it, and ``metrics.jsonl`` is cut back to the events the
    checkpoint had logged (:func:`truncate_metrics`). SIGTERM or Ctrl-C saves a checkpoint and
    raises :class:`TrainingInterrupted`.

    Under ``torchrun`` / ``accelerate launch`` every rank runs this function; only rank 0
    writes files, and generation metrics are computed on rank 0 (:func:`run_on_main_process`).
    """
    check_tracker(cfg.report_to)
    if resume is True or resume == "auto":
        resume = find_resume_checkpoint(Path(cfg.output_dir), "auto")
    if not resume:
        _check_fresh_run(Path(cfg.output_dir))
    set_seed(cfg.seed)
    run_dir, data = setup_run(cfg, resuming=bool(resume))
    if not resume and is_main_process():
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)  # a fresh run's events only
    model, tokenizer, family = build_model(cfg)
    cfg = cfg.model_copy(update={"model_type": family.name})
    if is_main_process():
        (run_dir / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
    precision = resolve_precision(cfg.precision, cfg.model)
    trainable, total = parameter_counts(model)
    log(f"model {cfg.model} ({family.name}), {total / 1e6:.1f}M parameters, {trainable / 1e6:.2f}M trainable "
        f"({100 * trainable / total:.2f}%), precision {precision}")
    m = data.manifest
    log(f"data {m.source}: {m.rows_read} rows read, {m.rows_kept} kept, dropped {m.dropped}; "
        f"splits {m.rows_per_split}")

    fmt = family.make_format(tokenizer, cfg)
    train_tok = tokenize_examples(fmt, family, data.splits["train"])
    val_tok = tokenize_examples(fmt, family, data.splits["validation"])
    if not train_tok.features:
        raise ConfigError("no training example has an answer token within the length limits")
    log(f"tokenized: {len(train_tok.features)} train examples ({train_tok.supervised_tokens} answer tokens), "
        f"{train_tok.truncated} answers cut to fit, {train_tok.dropped_no_answer_tokens} dropped with no answer token")

    generation_eval = None
    if cfg.eval.generation_metrics and cfg.eval.subset > 0 and data.splits["validation"]:
        from medassist.evaluation import make_training_evaluator

        generation_eval = make_training_evaluator(fmt, family, data.splits["validation"], cfg)

    args = training_arguments(cfg, run_dir, precision, has_eval=bool(val_tok.features))
    trainer = MedassistTrainer(
        model=model,
        args=args,
        train_dataset=to_dataset(train_tok),
        eval_dataset=to_dataset(val_tok),
        data_collator=_columns_collator(fmt),
        processing_class=tokenizer,
        callbacks=[JsonlMetricsCallback(run_dir / "metrics.jsonl")],
        family=family,
        prune_head=cfg.lm_head_on_answer_only,
        generation_eval=generation_eval,
    )
    if cfg.report_to == "tensorboard":
        from transformers.integrations import TensorBoardCallback

        for cb in trainer.callback_handler.callbacks:  # transformers 5 has no logging_dir argument
            if isinstance(cb, TensorBoardCallback) and cb.logging_dir is None:  # TENSORBOARD_LOGGING_DIR wins
                cb.logging_dir = str(run_dir / "logs")
    if trainer.is_fsdp_enabled and (generation_eval is not None or (cfg.report and data.splits["test"])):
        raise ConfigError("under FSDP, rank 0 cannot generate alone (parameters are sharded): set "
                          "eval.generation_metrics=false and report=false, then run `medassist evaluate` on the run")
    resumed_at = 0
    if resume:
        resumed_at = json.loads((Path(resume) / "trainer_state.json").read_text(encoding="utf-8"))["global_step"]
        log(f"resuming from {resume} (step {resumed_at})")
        if trainer.is_world_process_zero():
            truncate_metrics(run_dir / "metrics.jsonl", Path(resume))
        trainer.restore_counters(resume)
    before = trainer.global_counters()
    start = time.perf_counter()
    with GracefulStop(log) as stop:
        trainer.add_callback(stop)
        output = trainer.train(resume_from_checkpoint=resume)
    wall = time.perf_counter() - start
    if stop.received:
        newest = find_resume_checkpoint(run_dir, "auto")
        saved = f"checkpoint saved in {newest}" if newest else "no checkpoint was saved"
        raise TrainingInterrupted(f"training stopped by {stop.received} at step {trainer.state.global_step}; "
                                  f"{saved}; resume with: medassist train <same arguments> --resume")
    counters = trainer.global_counters()
    session_tokens = counters["tokens_seen"] - before["tokens_seen"]
    session_supervised = counters["supervised_tokens_seen"] - before["supervised_tokens_seen"]

    final_eval = trainer.evaluate() if val_tok.features else {}
    history = trainer.state.log_history
    train_losses = [h["loss"] for h in history if "loss" in h]
    summary = {
        "model": cfg.model,
        "model_type": family.name,
        "precision": precision,
        "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "train_examples": len(train_tok.features),
        "validation_examples": len(val_tok.features),
        "dropped_no_answer_tokens": train_tok.dropped_no_answer_tokens + val_tok.dropped_no_answer_tokens,
        "truncated_answers": train_tok.truncated,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "world_size": trainer.args.world_size,
        "examples_per_step": cfg.batch_size * cfg.grad_accum * trainer.args.world_size,
        "train_examples_seen": counters["examples_seen"],  # all ranks, all resumed sessions
        "supervised_tokens": counters["supervised_tokens_seen"],
        "tokens": counters["tokens_seen"],
        "supervised_tokens_per_second": session_supervised / wall if wall else None,  # this session
        "tokens_per_second": session_tokens / wall if wall else None,
        "resumed_from": str(resume) if resume else None,
        "wall_time_seconds": wall,
        "train_loss_mean": _mean_train_loss(history, output.training_loss, trainer.state.global_step, resumed_at),
        "final_train_loss": train_losses[-1] if train_losses else None,
        "final_validation_loss": final_eval.get("eval_loss"),
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "best_metric": trainer.state.best_metric,
        "validation_metrics": {k: v for k, v in final_eval.items() if not k.endswith(("runtime", "per_second"))},
    }
    if summary["final_validation_loss"] is not None:
        summary["final_validation_perplexity"] = math.exp(min(50.0, summary["final_validation_loss"]))
    trainer.save_model(str(run_dir / "final"))  # every rank (FSDP gathers); only rank 0 writes
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(run_dir / "final"))
        (run_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
    result = TrainResult(run_dir=run_dir, summary=summary)
    if cfg.report and data.splits["test"]:
        from medassist.evaluation import evaluate_run_after_training

        # rank 0 evaluates the whole test split (same numbers as one process); the others wait
        base_name = None if uses_lora(cfg, family) else cfg.model
        result.report = run_on_main_process(lambda: evaluate_run_after_training(
            RunDir(run_dir), trainer.model, fmt, family, _test_subset(data.splits["test"], cfg), cfg, base_name, log))
    log(f"trained {summary['steps']} steps in {wall:.1f} s "
        f"({summary['supervised_tokens_per_second'] or 0:.0f} answer tokens/s); final model in {run_dir / 'final'}")
    return result
