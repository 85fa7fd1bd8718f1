"""The Trainer and what plugs into it: a thin ``Trainer`` subclass, its callbacks, its arguments.

Why transformers' ``Trainer`` rather than TRL's ``SFTTrainer``: medassist tokenizes itself
(:mod:`medassist.formatting`) so that both families share one code path and the EOS is never
cut (TRL's truncation cuts from the right and drops it); what is left for a trainer is the
loop, checkpoints, schedules, precision and distributed launch, which ``Trainer`` does for both
families alike. :class:`MedassistTrainer` adds:

- the loss through the family's answer-only head (:meth:`ModelFamily.answer_logits`), in
  training and in loss-only evaluation, with the pooled validation perplexity;
- generation metrics inside ``evaluate`` (so ``bertscore_f1`` can pick the best checkpoint);
- a data order that survives a resume (:class:`EpochSeededSampler`), token counters, and the
  completeness marker of each checkpoint (:mod:`medassist.training.checkpoints`).
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from medassist.config import TrainConfig
from medassist.distributed import run_on_main_process, world_size
from medassist.errors import ConfigError
from medassist.families import ModelFamily, can_prune_head
from medassist.formatting import IGNORE_INDEX, PromptFormat
from medassist.training.checkpoints import STATE_FILE, CheckpointCompletion


class MedassistTrainer(Trainer):
    """``Trainer`` with the answer-only head, generation metrics in ``evaluate``, marked
    checkpoints and a data order that survives a resume.

    ``save_total_limit``: complete checkpoints kept; rotation happens after each marker
    (:class:`~medassist.training.checkpoints.CheckpointCompletion`), so ``args.save_total_limit``
    stays None. ``head_chunk_size``: answer positions the head scores at a time (None = all).
    """

    def __init__(self, *args, family: ModelFamily, prune_head: bool = True,
                 generation_eval: Callable[[Any], dict[str, float]] | None = None,
                 save_total_limit: int | None = None, head_chunk_size: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.family = family
        self.prune_head = prune_head and can_prune_head(self.model)
        self.head_chunk_size = head_chunk_size
        self.generation_eval = generation_eval
        self.eval_context: Callable[[], Any] = contextlib.nullcontext  # eager evaluation of a compiled model
        self.tokens_seen = 0
        self.supervised_tokens_seen = 0
        self.examples_seen = 0
        self.seconds = {"eval": 0.0, "generation": 0.0}  # wall time spent in evaluate(), this process
        self.add_callback(CheckpointCompletion(save_total_limit))

    # -- loss ------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self.examples_seen += int(inputs["input_ids"].shape[0])
            self.tokens_seen += int(inputs["attention_mask"].sum())
            self.supervised_tokens_seen += int((inputs["labels"] != IGNORE_INDEX).sum())
        # Under DDP the wrapper's forward must run (gradient sync hooks): use the stock path.
        if return_outputs or self.accelerator.num_processes > 1:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        return self._answer_only_loss(model, inputs, num_items_in_batch)

    def _answer_token_nll(self, model, inputs) -> torch.Tensor:
        """Negative log-likelihood of each answer token (fp32), through the family's
        answer-only head: for decoder-only models the vocabulary projection runs on supervised
        positions only, so the batch x length x vocab logit tensor is never built (for
        SmolLM2's 49k vocabulary the head is ~20% of the forward FLOPs and its logits the
        largest activation). With ``head_chunk_size`` the head scores that many positions at a
        time (:func:`~medassist.families.chunked_head_nll`): no positions x vocab tensor either."""
        # accelerate applies bf16/fp16 autocast by wrapping model.forward; the head calls parts
        # of the model directly, so enter the same autocast (else a bf16 run computes in fp32)
        with self.accelerator.autocast():
            nll, _ = self.family.answer_nll(model, inputs, self.prune_head, self.head_chunk_size)
        return nll

    def _answer_only_loss(self, model, inputs, num_items_in_batch):
        nll = self._answer_token_nll(model, inputs)
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            return nll.sum() / num_items_in_batch
        return nll.sum() / max(1, nll.numel())

    # -- evaluation --------------------------------------------------------------------
    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Loss-only evaluation through the same answer-only head, so evaluation never builds
        a batch x length x vocab logit tensor either. Returns, in place of logits, each row's
        (answer-token NLL sum, answer tokens): the Trainer gathers them across ranks (without
        the rows DDP repeats to even out the last batch) for :meth:`evaluation_loop`."""
        wrapped = isinstance(model, torch.nn.parallel.DistributedDataParallel) or self.is_fsdp_enabled
        if not prediction_loss_only or wrapped:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            nll = self._answer_token_nll(model, inputs)
        loss = nll.sum() / max(1, nll.numel())  # the batch mean, as the stock eval_loss
        # both families predict every supervised label (a decoder's first label is prompt)
        per_row = (inputs["labels"] != IGNORE_INDEX).sum(dim=1)
        if int(per_row.sum()) != nll.numel():
            return loss.detach(), None, None
        rows = torch.repeat_interleave(torch.arange(len(per_row), device=nll.device), per_row)
        sums = torch.zeros(len(per_row), dtype=torch.float64, device=nll.device).index_add_(0, rows, nll.double())
        return loss.detach(), torch.stack([sums, per_row.double()], dim=1), None

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix: str = "eval"):
        """Adds ``eval_pooled_perplexity``: exp(total answer-token NLL / total answer tokens)
        over the evaluated rows, under the run's precision (``eval_loss`` is the stock Trainer's
        mean of per-batch means, which depends on how rows fall into batches; the generation
        metrics' ``eval_perplexity`` covers only their subset of questions)."""
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                         metric_key_prefix)
        stats = output.predictions
        if isinstance(stats, np.ndarray) and stats.ndim == 2 and stats.shape == (output.num_samples, 2):
            nll, tokens = stats.sum(axis=0)
            if tokens:
                output.metrics[f"{metric_key_prefix}_pooled_perplexity"] = math.exp(min(50.0, nll / tokens))
                output.metrics[f"{metric_key_prefix}_pooled_answer_tokens"] = int(tokens)
        return output

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        with self.eval_context():
            return self._evaluate_with_metrics(eval_dataset, ignore_keys, metric_key_prefix)

    def _evaluate_with_metrics(self, eval_dataset, ignore_keys, metric_key_prefix):
        start = time.perf_counter()
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        self.seconds["eval"] += time.perf_counter() - start
        if self.generation_eval is not None:
            start = time.perf_counter()
            scores = run_on_main_process(lambda: self.generation_eval(self.model))
            self.seconds["generation"] += time.perf_counter() - start
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

    # -- checkpoints -----------------------------------------------------------------
    def _save_checkpoint(self, model, trial) -> None:
        """The stock save into an empty folder, plus the token counters; the ``.complete``
        marker follows in ``on_save`` (:class:`CheckpointCompletion`)."""
        folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save and folder.exists():  # this step's save from before a resume, maybe half-written
            shutil.rmtree(folder)
        self.accelerator.wait_for_everyone()
        super()._save_checkpoint(model, trial)
        counters = self.global_counters()  # a collective: every rank
        if self.args.should_save:
            (folder / STATE_FILE).write_text(json.dumps(counters), encoding="utf-8")


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


class TrimMemory(TrainerCallback):
    """:func:`~medassist.training.speed.release_freed_memory` every ``every`` optimizer steps (and
    after each evaluation): RSS stays near what is alive instead of keeping every freed batch."""

    def __init__(self, every: int, release: Callable[[], None]):
        self.every, self.release = every, release

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            self.release()

    def on_evaluate(self, args, state, control, **kwargs):
        self.release()


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


def columns_collator(fmt: PromptFormat):
    """Batches of the tokenized columns, padded by the family's formatter."""
    def collate(features):
        return fmt.collate([{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features])

    return collate


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
        save_total_limit=None,  # cfg.save_total_limit is applied after each marker (MedassistTrainer)
        load_best_model_at_end=best,
        metric_for_best_model=cfg.metric_for_best_model if best else None,
        greater_is_better=cfg.metric_for_best_model != "eval_loss",
        report_to=[] if cfg.report_to == "none" else [cfg.report_to],
        remove_unused_columns=False,
        dataloader_num_workers=cfg.num_workers,
        ddp_find_unused_parameters=False,
        disable_tqdm=False,
    )
