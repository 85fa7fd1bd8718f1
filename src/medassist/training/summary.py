"""``train_summary.json``: what a run did, in numbers (steps, tokens, losses, where the time went)."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from medassist.config import TrainConfig
from medassist.rundir import RunDir

if TYPE_CHECKING:
    from medassist.training.examples import TokenizedSplit
    from medassist.training.recipe import Fit
    from medassist.training.trainer import MedassistTrainer


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


def run_summary(cfg: TrainConfig, trainer: MedassistTrainer, fitted: Fit, final_eval: dict[str, Any],
                precision: str, train_tok: TokenizedSplit, val_tok: TokenizedSplit,
                val_loss_rows: list[dict[str, Any]], timing: dict[str, float]) -> dict[str, Any]:
    """What ``train_summary.json`` holds (rank 0's view; counters are summed over ranks)."""
    state, wall = trainer.state, fitted.wall
    train_losses = [h["loss"] for h in state.log_history if "loss" in h]
    world = trainer.args.world_size
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    return {
        "model": cfg.model,
        "model_type": cfg.model_type,
        "precision": precision,
        "steps": state.global_step,  # in total, over every session of the run
        "steps_this_process": state.global_step - fitted.resumed_at,
        "resumed_at_step": fitted.resumed_at,
        "epochs": state.epoch,
        "train_examples": len(train_tok.features),
        "validation_examples": len(val_tok.features),
        "validation_loss_examples": len(val_loss_rows),
        "dropped_no_answer_tokens": train_tok.dropped_no_answer_tokens + val_tok.dropped_no_answer_tokens,
        "truncated_answers": train_tok.truncated,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "world_size": world,
        "examples_per_step": cfg.batch_size * cfg.grad_accum * world,
        "train_examples_seen": fitted.counters["examples_seen"],  # all ranks, all resumed sessions
        "supervised_tokens": fitted.counters["supervised_tokens_seen"],
        "tokens": fitted.counters["tokens_seen"],
        "supervised_tokens_per_second": fitted.session["supervised_tokens_seen"] / wall if wall else None,  # this process
        "tokens_per_second": fitted.session["tokens_seen"] / wall if wall else None,
        "resumed_from": fitted.checkpoint,
        "wall_time_seconds": wall,
        "train_loss_mean": _mean_train_loss(state.log_history, fitted.output.training_loss, state.global_step,
                                            fitted.resumed_at),
        "final_train_loss": train_losses[-1] if train_losses else None,
        "final_validation_loss": final_eval.get("eval_loss"),  # mean of per-batch means (the Trainer's)
        # exp(total answer-token NLL / total answer tokens) over the validation-loss rows
        "final_validation_perplexity": final_eval.get("eval_pooled_perplexity"),
        "best_checkpoint": state.best_model_checkpoint,
        "best_metric": state.best_metric,
        "validation_metrics": final_eval,
        "timing": timing,  # seconds: setup, train (steps + checkpoints), eval, generation, save, report, total
    }


def write_summary(trainer: MedassistTrainer, run: RunDir, summary: dict[str, Any], start: float) -> None:
    summary["timing"]["total"] = time.perf_counter() - start
    if trainer.is_world_process_zero():
        run.summary_file.write_text(json.dumps(summary, indent=2))


def steps_line(summary: dict[str, Any]) -> str:
    if not summary["resumed_at_step"]:
        return f"{summary['steps']} steps"
    return (f"{summary['steps_this_process']} steps in this process (steps {summary['resumed_at_step'] + 1}-"
            f"{summary['steps']}; {summary['steps']} in total)")
