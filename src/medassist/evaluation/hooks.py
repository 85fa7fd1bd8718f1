"""Evaluation inside a training run: the generation metrics logged at each evaluation, and the
test report written when training ends."""

from __future__ import annotations

import random
from typing import Any, Callable, Sequence

import torch

from medassist.config import TrainConfig
from medassist.data import QAExample, read_split
from medassist.distributed import is_main_process
from medassist.engine import Engine
from medassist.evaluation.baselines import base_model_context
from medassist.evaluation.cache import reuse_line
from medassist.evaluation.evaluate import METRIC_KEYS, evaluate_examples, format_line, score_model
from medassist.evaluation.metrics import factual_scorer_for, perplexity_dtype, scorer_for
from medassist.evaluation.results import DataInfo
from medassist.families import ModelFamily
from medassist.formatting import Passage, PromptFormat
from medassist.rundir import RunDir


def seeded_subset(examples: Sequence[QAExample], size: int, seed: int) -> list[QAExample]:
    """``size`` examples drawn with ``seed`` (all when there are fewer), in their original order."""
    if size >= len(examples):
        return list(examples)
    chosen = sorted(random.Random(seed).sample(range(len(examples)), size))
    return [examples[i] for i in chosen]


class _EvalMode:
    """Switch a model to eval mode (no gradients) and back to the mode it was in."""

    def __init__(self, model) -> None:
        self.model, self.was_training = model, model.training

    def __enter__(self):
        self.model.eval()
        self._grad = torch.no_grad()
        self._grad.__enter__()
        return self.model

    def __exit__(self, *exc) -> None:
        self._grad.__exit__(*exc)
        if self.was_training:
            self.model.train()


def make_training_evaluator(fmt: PromptFormat, family: ModelFamily, validation_examples: list[QAExample],
                            cfg: TrainConfig, passages: Sequence[Sequence[Passage]] | None = None
                            ) -> Callable[[Any], dict[str, float]]:
    """The generation metrics the trainer logs at each evaluation, on a fixed seeded subset.

    The subset (``cfg.eval.subset`` questions, seed ``cfg.seed``) is drawn once, so every
    evaluation scores the same questions. ``passages``: each validation prompt's sources
    (retrieval), aligned with ``validation_examples``.
    """
    pairs = seeded_subset(list(zip(validation_examples, passages or [()] * len(validation_examples))),
                          cfg.eval.subset, cfg.seed)
    subset = [ex for ex, _ in pairs]
    subset_passages = [list(p) for _, p in pairs] if passages is not None else None
    settings = cfg.eval.generation(seed=cfg.seed)

    def evaluate(model) -> dict[str, float]:
        scorer = scorer_for(cfg.eval)  # built on the first call, reused afterwards
        with _EvalMode(model):
            result = score_model(Engine(model, fmt, family), subset, settings, scorer, cfg.eval.perplexity_batch_size,
                                 factual=factual_scorer_for(cfg.eval), passages=subset_passages,
                                 ppl_dtype=perplexity_dtype(cfg.eval))
        keys = METRIC_KEYS + ("mean_generated_tokens", "hit_max_new_tokens")
        return {k: float(v) for k in keys if (v := result.metric(k)) is not None}

    return evaluate


def evaluate_run_after_training(run: RunDir, model, fmt: PromptFormat, family: ModelFamily,
                                test_examples: list[QAExample], cfg: TrainConfig, base_model_name: str | None,
                                log: Callable[[str], None] = lambda _m: None,
                                train_examples: Sequence[QAExample] | None = None,
                                sources=None, progress=None) -> dict[str, Any]:
    """Score the final (best) model on the test split; write eval_test.json and report/.

    ``base_model_name``: what to load as the untuned baseline for a full fine-tune (a LoRA
    model is its own baseline with the adapter switched off). ``train_examples``: what the
    nearest-training-answer baseline searches; by default the run's ``splits/train.jsonl``.
    ``sources``: the run's :class:`~medassist.retrieval.augment.RunSources` (retrieval runs):
    the model answers with its passages, and also without them, for the comparison.
    ``progress``: the bars' factory (:data:`~medassist.evaluation.evaluate.ProgressFactory`).
    Returns the JSON form of the :class:`~medassist.evaluation.results.EvalResult` (what
    eval_test.json holds; ``EvalResult.from_json`` makes it typed again).
    """
    from medassist.evaluation.report import write_report

    if not is_main_process():
        return {}
    if train_examples is None and run.split_file("train").is_file():
        train_examples = read_split(run.split_file("train"))
    log(f"evaluating the final model on {len(test_examples)} test examples "
        f"(max_new_tokens {cfg.eval.max_new_tokens}{', with baselines' if cfg.eval.baselines else ''})")
    base = base_model_context(model, base_model_name)
    data = DataInfo(source=cfg.data.path, split="test", n_examples=len(test_examples))
    retrieved = sources.lookup(test_examples) if sources is not None else None
    with _EvalMode(model):
        result = evaluate_examples(Engine(model, fmt, family), test_examples, cfg.eval, seed=cfg.seed,
                                   base_model=base, source=str(run.path), train_examples=train_examples, data=data,
                                   retrieved=retrieved, retrieval_info=sources.info() if sources is not None else None,
                                   progress=progress, merge=True)  # final/ is saved; scored merged, as served
    if line := reuse_line(result.settings):
        log(line)
    html = write_report(result, run.report_dir("test"), metrics_path=run.metrics_file,
                        title=f"medassist evaluation: {run.name} (test split)")
    result.report_html = str(html)
    result.write_json(run.eval_file("test"))
    log(f"test: {format_line(result)}; report {html}")
    return result.to_json()
