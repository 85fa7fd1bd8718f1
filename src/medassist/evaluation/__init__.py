"""Evaluation: generated answers scored against references, beside baselines.

- :mod:`~medassist.evaluation.metrics`: BERTScore, ROUGE-L, perplexity and token accuracy;
- :mod:`~medassist.evaluation.evaluate`: one model (and its baselines) on a set of examples;
- :mod:`~medassist.evaluation.hooks`: what a training run evaluates during and after training.
"""

from medassist.evaluation.evaluate import (
    METRIC_KEYS,
    ProgressFactory,
    base_model_context,
    evaluate_examples,
    format_line,
    repeat_question_baseline,
    score_model,
    score_texts,
)
from medassist.evaluation.hooks import evaluate_run_after_training, make_training_evaluator, seeded_subset
from medassist.evaluation.metrics import BertScorer, get_bert_scorer, perplexity_and_accuracy, rouge_l, scorer_for

__all__ = [
    "METRIC_KEYS", "ProgressFactory", "BertScorer", "base_model_context", "evaluate_examples", "evaluate_run_after_training",
    "format_line", "get_bert_scorer", "make_training_evaluator", "perplexity_and_accuracy", "repeat_question_baseline",
    "rouge_l", "score_model", "score_texts", "scorer_for", "seeded_subset",
]
