"""Typed evaluation results: what crosses from evaluation to the report, the CLI and the JSON file.

An :class:`EvalResult` holds the evaluated model and each baseline as a :class:`SystemResult`,
the paired comparisons of the model with every baseline (:class:`MetricComparison`), one
:class:`BaselineVerdict` per baseline ("better than the base model: yes / no / can't tell"),
breakdowns by question type and source, the examples, and for a model that answers from
retrieved sources, how retrieval did (:class:`RetrievalEval`). :meth:`EvalResult.to_json` is plain
JSON (no NaN or infinity: a missing number is ``null``); :meth:`EvalResult.from_json` reads it
back.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from medassist.evaluation.answers import AnswerStats
from medassist.evaluation.stats import Verdict


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    higher_is_better: bool
    headline: bool  # part of the "better than ...?" verdict
    meaning: str


# every metric with a per-example value; the order is the report's
METRICS: dict[str, Metric] = {m.key: m for m in (
    Metric("factual_consistency", "factual consistency", True, True,
           "share of the answer's checkable facts the reference supports, contradictions penalised"),
    Metric("bertscore_f1", "BERTScore F1", True, True, "harmonic mean of BERTScore precision and recall"),
    Metric("log_perplexity", "log perplexity", False, True,
           "mean NLL per answer token of the reference, per example (lower is better)"),
    Metric("bertscore_precision", "BERTScore precision", True, False, "how much of the answer the reference supports"),
    Metric("bertscore_recall", "BERTScore recall", True, False, "how much of the reference the answer covers"),
    Metric("rouge_l", "ROUGE-L", True, False, "longest common word subsequence, F-measure"),
    Metric("source_support", "support by the sources", True, False,
           "factual consistency of the answer with the retrieved passages in its prompt (retrieval runs; "
           "questions with a source only)"),
)}
BASELINE_LABELS = {
    "base_model": "the base model",
    "no_retrieval": "the same model without retrieval",
    "nearest_training_answer": "the nearest training question's answer",
    "repeat_question": "repeating the question",
}


class _Model(BaseModel):
    model_config = {"extra": "forbid"}


class SystemResult(_Model):
    """One system's scores: the model, or a baseline. Means over examples; ``per_example`` holds
    the values the comparisons use (aligned with :attr:`EvalResult.examples`)."""

    name: str
    label: str
    n_examples: int
    bertscore_precision: float | None = None
    bertscore_recall: float | None = None
    bertscore_f1: float | None = None
    rouge_l: float | None = None
    factual_consistency: float | None = None
    source_support: float | None = None  # retrieval: mean over questions with a source
    perplexity: float | None = None  # pooled: exp(total NLL / total answer tokens)
    token_accuracy: float | None = None
    answer_tokens: int | None = None
    references_cut: int | None = None
    skipped_no_answer_tokens: int | None = None
    mean_generated_tokens: float | None = None
    hit_max_new_tokens: float | None = None
    answers: AnswerStats = Field(default_factory=AnswerStats)
    timing: dict[str, float] = Field(default_factory=dict)
    per_example: dict[str, list[float | None]] = Field(default_factory=dict)
    generated: list[str] = Field(default_factory=list)
    generated_tokens: list[int] = Field(default_factory=list)
    hit_max_per_example: list[bool] = Field(default_factory=list)
    answer_source_rows: list[int | None] = Field(default_factory=list)  # retrieval: the training row used

    def metric(self, key: str) -> float | None:
        return getattr(self, key, None)

    def summary(self) -> dict[str, Any]:
        """The means alone (what the training log and the CLI table need)."""
        return self.model_dump(exclude={"per_example", "generated", "generated_tokens", "hit_max_per_example",
                                        "answer_source_rows"})


class MetricComparison(_Model):
    """Model minus one baseline on one metric, paired over the questions both have a value for."""

    baseline: str
    metric: str
    higher_is_better: bool
    n: int
    model_mean: float | None
    baseline_mean: float | None
    difference: float | None
    ci_low: float | None
    ci_high: float | None
    confidence: float = 0.95
    wins: int
    ties: int
    losses: int
    verdict: Verdict


class BaselineVerdict(_Model):
    """"Better than <baseline>: yes / no / can't tell", from the headline metrics' verdicts."""

    baseline: str
    label: str
    verdict: Verdict
    reason: str
    metrics: dict[str, Verdict]

    def sentence(self) -> str:
        return f"better than {self.label}: {self.verdict} ({self.reason})"


class GroupScores(_Model):
    """One value of a breakdown column (a question type, a source): its size and means."""

    column: str
    value: str
    n: int
    means: dict[str, dict[str, float | None]]  # system -> metric -> mean
    vs_base_model: dict[str, MetricComparison] = Field(default_factory=dict)  # metric -> comparison


class BaselineAnswer(_Model):
    text: str
    scores: dict[str, float | None]
    source_row: int | None = None  # retrieval baseline: the training row whose answer this is


class SourceRef(_Model):
    """A retrieved passage that an evaluated prompt carried (or would have, before the length budget)."""

    title: str
    url: str = ""
    score: float | None = None
    focus: str = ""
    in_prompt: bool = True  # False: dropped to fit the prompt budget
    relevant: bool | None = None  # shares the question's focus or url (None: the question has neither)


class RetrievalEval(_Model):
    """How retrieval did on the evaluated questions, and how far answers follow their sources.

    ``recall_at_k``: share of the questions with focus/url metadata (``n_labelled``) whose
    prompt carried a passage about the same focus or from the same url (``_focus``/``_url``:
    each alone). ``source_support``/``supported_share``: per system, the mean factual
    consistency of its answers with the passages in the prompt, and the share at or above
    ``support_threshold``, over the ``with_source`` questions that had a passage.
    ``own_reference_hits`` counts prompts that carried the question's own row (its question
    group or its reference text): it must be 0.
    """

    index: str
    k: int
    min_score: float
    variant: str
    n_examples: int
    with_source: int
    mean_passages: float
    mean_passages_in_prompt: float
    n_labelled: int
    recall_at_k: float | None = None
    recall_focus_at_k: float | None = None
    recall_url_at_k: float | None = None
    support_threshold: float
    source_support: dict[str, float | None] = Field(default_factory=dict)
    supported_share: dict[str, float | None] = Field(default_factory=dict)
    blocked_passages: int = 0
    heldout_corpus: str = "blocked"  # "open": held-out collections' other rows were citable
    reference_overlap: float | None = None  # mean share of the reference's 8-grams in its prompt's passages
    own_reference_hits: int = 0


class ExampleRow(_Model):
    index: int
    row: int
    question: str
    reference: str
    meta: dict[str, str] = Field(default_factory=dict)
    generated: str
    generated_tokens: int | None = None
    hit_max_new_tokens: bool | None = None
    scores: dict[str, float | None]
    baselines: dict[str, BaselineAnswer] = Field(default_factory=dict)
    sources: list[SourceRef] = Field(default_factory=list)  # retrieval: the passages of its prompt


class DataInfo(_Model):
    source: str = ""
    split: str = ""
    n_examples: int = 0
    limit: int | None = None
    train_overlap: int = 0  # scored questions that are also in the run's training split
    train_examples: int | None = None  # rows the retrieval baseline searched


class EvalResult(_Model):
    n_examples: int
    model: SystemResult
    baselines: dict[str, SystemResult] = Field(default_factory=dict)
    baseline_notes: dict[str, str] = Field(default_factory=dict)  # baseline -> why it was not scored
    verdicts: list[BaselineVerdict] = Field(default_factory=list)
    comparisons: list[MetricComparison] = Field(default_factory=list)
    breakdowns: dict[str, list[GroupScores]] = Field(default_factory=dict)
    data: DataInfo = Field(default_factory=DataInfo)
    settings: dict[str, Any] = Field(default_factory=dict)
    examples: list[ExampleRow] = Field(default_factory=list)
    retrieval: RetrievalEval | None = None
    report_html: str | None = None

    def systems(self) -> dict[str, SystemResult]:
        return {"model": self.model, **self.baselines}

    def verdict(self, baseline: str) -> BaselineVerdict | None:
        return next((v for v in self.verdicts if v.baseline == baseline), None)

    def comparison(self, baseline: str, metric: str) -> MetricComparison | None:
        return next((c for c in self.comparisons if c.baseline == baseline and c.metric == metric), None)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON: per-example lists live in ``examples``, not again in each system; NaN -> null.

        The model's means are also at the top level (``bertscore_f1``, ``perplexity``, ...), where
        files written before typed results kept them, so their readers keep working.
        """
        skip = {"per_example", "generated", "generated_tokens", "hit_max_per_example", "answer_source_rows"}
        data = self.model_dump(mode="json", exclude={"model": skip, "baselines": {"__all__": skip}})
        top = {k: data["model"][k] for k in TOP_LEVEL}
        return _finite({"n_examples": data.pop("n_examples"), **top, **data})

    def write_json(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2, ensure_ascii=False, allow_nan=False), encoding="utf-8")

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "EvalResult":
        return cls.model_validate({k: v for k, v in data.items() if k not in TOP_LEVEL})


TOP_LEVEL = ("bertscore_precision", "bertscore_recall", "bertscore_f1", "rouge_l", "factual_consistency", "perplexity",
             "token_accuracy", "mean_generated_tokens", "hit_max_new_tokens", "references_cut")


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
