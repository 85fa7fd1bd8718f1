"""The model against each baseline: paired intervals per metric, one verdict per baseline, breakdowns.

Every metric with per-example values for both systems is compared (:data:`METRICS`); the
headline metrics (factual consistency, BERTScore F1, log perplexity where both have one) make
the verdict (:func:`medassist.evaluation.stats.overall_verdict`). Breakdowns group the examples
by a metadata column (``qtype``, ``source``) and give each group's size, means per system and
the model-vs-base-model difference with its interval.
"""

from __future__ import annotations

from collections import defaultdict
from statistics import fmean
from typing import Sequence

from medassist.evaluation.results import (
    BASELINE_LABELS, METRICS, BaselineVerdict, GroupScores, MetricComparison, SystemResult,
)
from medassist.evaluation.stats import MIN_N, overall_verdict, paired_difference

BREAKDOWN_COLUMNS = ("qtype", "source")


def compare(model: SystemResult, baseline: SystemResult, *, resamples: int = 2000, seed: int = 0,
            indices: Sequence[int] | None = None, metrics: Sequence[str] | None = None) -> list[MetricComparison]:
    """One :class:`MetricComparison` per metric both systems have per-example values for."""
    out = []
    for key in metrics or METRICS:
        mine, theirs = model.per_example.get(key), baseline.per_example.get(key)
        if mine is None or theirs is None or all(v is None for v in theirs):
            continue
        if indices is not None:
            mine, theirs = [mine[i] for i in indices], [theirs[i] for i in indices]
        metric = METRICS[key]
        d = paired_difference(mine, theirs, higher_is_better=metric.higher_is_better, resamples=resamples, seed=seed)
        out.append(MetricComparison(
            baseline=baseline.name, metric=key, higher_is_better=metric.higher_is_better, n=d.n,
            model_mean=d.mean_model, baseline_mean=d.mean_baseline, difference=d.difference, ci_low=d.low,
            ci_high=d.high, wins=d.wins, ties=d.ties, losses=d.losses, verdict=d.verdict,
        ))
    return out


def verdict_for(baseline: str, comparisons: Sequence[MetricComparison], label: str | None = None
                ) -> BaselineVerdict:
    """The answer to "better than this baseline?" from its headline metrics."""
    mine = [c for c in comparisons if c.baseline == baseline and METRICS[c.metric].headline and c.n > 0]
    verdicts = {METRICS[c.metric].label: c.verdict for c in mine}
    verdict, reason = overall_verdict(verdicts)
    if mine and max(c.n for c in mine) < MIN_N:
        reason = f"only {max(c.n for c in mine)} questions; at least {MIN_N} are needed for a verdict"
    return BaselineVerdict(baseline=baseline, label=label or BASELINE_LABELS.get(baseline, baseline),
                           verdict=verdict, reason=reason, metrics=verdicts)


def breakdowns(metas: Sequence[dict[str, str]], systems: dict[str, SystemResult], *, resamples: int = 2000,
               seed: int = 0, columns: Sequence[str] = BREAKDOWN_COLUMNS,
               metrics: Sequence[str] = ("factual_consistency", "bertscore_f1")) -> dict[str, list[GroupScores]]:
    """Per column present in the examples' metadata: groups (largest first), each with its means.

    Examples without a value for the column form the group ``(none)``, so the group sizes of a
    column always add up to the number of examples.
    """
    out: dict[str, list[GroupScores]] = {}
    for column in columns:
        if not any(column in m for m in metas):
            continue
        members: dict[str, list[int]] = defaultdict(list)
        for i, meta in enumerate(metas):
            members[meta.get(column) or "(none)"].append(i)
        groups = []
        for value, idx in sorted(members.items(), key=lambda kv: (-len(kv[1]), kv[0])):
            means = {name: {key: _mean([s.per_example[key][i] for i in idx]) for key in metrics if key in s.per_example}
                     for name, s in systems.items()}
            vs_base = {}
            if "base_model" in systems and "model" in systems:
                vs_base = {c.metric: c for c in compare(systems["model"], systems["base_model"], resamples=resamples,
                                                         seed=seed, indices=idx, metrics=metrics)}
            groups.append(GroupScores(column=column, value=value, n=len(idx), means=means, vs_base_model=vs_base))
        out[column] = groups
    return out


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return fmean(present) if present else None
