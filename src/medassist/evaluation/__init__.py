"""Evaluation: generated answers scored against references, beside baselines, with intervals.

Read in this order:

- :mod:`~medassist.evaluation.evaluate`: one model and its baselines on a set of examples;
- :mod:`~medassist.evaluation.metrics`: BERTScore, ROUGE-L, perplexity, token accuracy;
- :mod:`~medassist.evaluation.factual` (+ ``factual_facts``, ``factual_nli``): factual consistency;
- :mod:`~medassist.evaluation.answers`: loops, question echoes, answer length;
- :mod:`~medassist.evaluation.baselines`: base model, nearest training answer, repeat the question;
- :mod:`~medassist.evaluation.stats` and :mod:`~medassist.evaluation.compare`: paired bootstrap
  intervals, win counts, "better than ...: yes / no / can't tell", breakdowns;
- :mod:`~medassist.evaluation.results`: the typed result; :mod:`~medassist.evaluation.report`
  (+ ``plots``, ``templates/report.html.j2``): the self-contained HTML report;
- :mod:`~medassist.evaluation.hooks`: what a training run evaluates during and after training.

Names are imported on first use, so ``medassist.evaluation.factual`` or ``.stats`` load without
torch and transformers.
"""

from __future__ import annotations

from importlib import import_module

_EXPORTS = {
    "evaluate": ("METRIC_KEYS", "ProgressFactory", "assemble", "evaluate_examples", "format_line", "score_model", "score_texts"),
    "baselines": ("base_model_context", "nearest_training_answers"),
    "hooks": ("evaluate_run_after_training", "make_training_evaluator", "seeded_subset"),
    "metrics": ("BertScorer", "factual_scorer_for", "get_bert_scorer", "perplexity_and_accuracy", "rouge_l",
                "scorer_for"),
    "results": ("EvalResult", "SystemResult", "MetricComparison", "BaselineVerdict", "METRICS"),
    "stats": ("paired_difference",),
    "report": ("write_report",),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'medassist.evaluation' has no attribute '{name}'")
    value = getattr(import_module(f"medassist.evaluation.{_WHERE[name]}"), name)
    globals()[name] = value
    return value
