"""Paired statistics: is the model better than a baseline on the same questions, or can't we tell?

Every comparison is *paired*: the model and the baseline answered the same questions, so the
question-to-question spread cancels and only the per-question difference ``d = model - baseline``
matters. The interval is the seeded bootstrap (``scipy.stats.bootstrap``, BCa, resampling
questions) of the mean of ``d``; resampling ``d`` is the same as ``paired=True`` resampling of
both columns for a difference of means. The verdict reads the interval:

- ``yes``: the whole interval is on the better side of 0 (above 0 for higher-is-better metrics,
  below 0 for lower-is-better ones such as perplexity);
- ``no``: the whole interval is on the worse side;
- ``can't tell``: it covers 0, or fewer than :data:`MIN_N` questions were compared (a bootstrap
  of a handful of values gives intervals far too narrow to trust).

Wins, ties and losses count questions where the model is better, equal (within ``tie``), or
worse: the mean can hide that a model wins often by a little and loses rarely by a lot.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

Verdict = Literal["yes", "no", "can't tell"]
CONFIDENCE = 0.95
TIE = 1e-6  # differences this small are ties (BERTScore of two identical texts differs by float noise)
MIN_N = 10  # fewer paired questions than this: the interval is shown, the verdict is "can't tell"


@dataclass(frozen=True)
class PairedDifference:
    """Mean paired difference (model - baseline) with its bootstrap interval and the win count."""

    n: int
    mean_model: float | None
    mean_baseline: float | None
    difference: float | None
    low: float | None
    high: float | None
    wins: int
    ties: int
    losses: int
    verdict: Verdict


def verdict_of(low: float | None, high: float | None, higher_is_better: bool = True) -> Verdict:
    """``yes`` when the interval lies on the better side of 0, ``no`` on the worse side."""
    if low is None or high is None:
        return "can't tell"
    if not higher_is_better:
        low, high = -high, -low
    if low > 0:
        return "yes"
    if high < 0:
        return "no"
    return "can't tell"


def mean_ci(values: Sequence[float], resamples: int = 2000, seed: int = 0,
            confidence: float = CONFIDENCE) -> tuple[float | None, float | None]:
    """Seeded bootstrap interval (BCa, percentile where BCa is undefined) of the mean of ``values``."""
    from scipy.stats import bootstrap

    x = np.asarray(values, dtype=float)
    if len(x) == 0:
        return None, None
    if len(x) == 1 or np.ptp(x) == 0:  # one value, or all equal: every resample has the same mean
        return float(x.mean()), float(x.mean())
    out = (math.nan, math.nan)
    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scipy warns about degenerate BCa; we fall back instead
            res = bootstrap((x,), np.mean, n_resamples=resamples, confidence_level=confidence, method=method,
                            vectorized=True, axis=-1, rng=np.random.default_rng(seed))
        out = (float(res.confidence_interval.low), float(res.confidence_interval.high))
        if all(math.isfinite(v) for v in out):
            return out
    return None, None


def paired_difference(model: Sequence[float | None], baseline: Sequence[float | None], *,
                      higher_is_better: bool = True, resamples: int = 2000, seed: int = 0,
                      confidence: float = CONFIDENCE, tie: float = TIE, min_n: int = MIN_N) -> PairedDifference:
    """Compare per-question values; a question where either value is missing is left out."""
    if len(model) != len(baseline):
        raise ValueError("model and baseline values differ in number")
    pairs = [(float(a), float(b)) for a, b in zip(model, baseline)
             if a is not None and b is not None and math.isfinite(a) and math.isfinite(b)]
    if not pairs:
        return PairedDifference(0, None, None, None, None, None, 0, 0, 0, "can't tell")
    a = np.array([p[0] for p in pairs])
    b = np.array([p[1] for p in pairs])
    d = a - b
    low, high = mean_ci(d, resamples, seed, confidence) if len(d) > 1 else (None, None)
    better = d if higher_is_better else -d
    wins, losses = int((better > tie).sum()), int((better < -tie).sum())
    return PairedDifference(
        n=len(d), mean_model=float(a.mean()), mean_baseline=float(b.mean()), difference=float(d.mean()),
        low=low, high=high, wins=wins, ties=len(d) - wins - losses, losses=losses,
        verdict=verdict_of(low, high, higher_is_better) if len(d) >= min_n else "can't tell",
    )


ANSWER_METRICS = ("factual consistency", "BERTScore F1")  # metrics of the generated answers


def overall_verdict(verdicts: dict[str, Verdict]) -> tuple[Verdict, str]:
    """One answer from several metrics' verdicts, and why.

    ``yes`` when at least one metric says yes and none says no, and, where answer metrics
    (:data:`ANSWER_METRICS`) were compared, one of them is among the better ones; ``no`` when at least one says no
    and none says yes; otherwise ``can't tell`` (no clear difference, or better on some metrics
    and worse on others, which the reason names).
    """
    better = [m for m, v in verdicts.items() if v == "yes"]
    worse = [m for m, v in verdicts.items() if v == "no"]
    answers_judged = [m for m in verdicts if m in ANSWER_METRICS]
    if better and not worse and answers_judged and not set(better) & set(ANSWER_METRICS):
        # perplexity scores the reference answers, not what the model says: alone it is no win
        return "can't tell", (f"only {', '.join(better)} improved; the generated answers are not measurably "
                              f"better ({', '.join(answers_judged)})")
    if better and not worse:
        return "yes", f"better on {', '.join(better)}; worse on none"
    if worse and not better:
        return "no", f"worse on {', '.join(worse)}; better on none"
    if better and worse:
        return "can't tell", f"mixed: better on {', '.join(better)}, worse on {', '.join(worse)}"
    return "can't tell", "no interval excludes zero" if verdicts else "no metric to compare"
