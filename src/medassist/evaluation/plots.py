"""The report's plots, as PNG files (matplotlib, no display).

- ``loss.png``: train and validation loss per step (a run's ``metrics.jsonl``);
- ``epoch_metrics.png``: the generation metrics of each evaluation during training;
- ``differences.png``: model minus each baseline, mean and 95% interval, per metric;
- ``f1_distribution.png``: per-example BERTScore F1 of the model and the base model.
Each function returns False (and writes nothing) when it has nothing to draw.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medassist.evaluation.results import BASELINE_LABELS, METRICS, EvalResult

EPOCH_METRICS = [("eval_bertscore_f1", "BERTScore F1"), ("eval_factual_consistency", "factual consistency"),
                 ("eval_perplexity", "perplexity"), ("eval_token_accuracy", "token accuracy"),
                 ("eval_rouge_l", "ROUGE-L")]
COLORS = {"base_model": "#ff7f0e", "nearest_training_answer": "#9467bd", "repeat_question": "#7f7f7f"}
SHORT = {"base_model": "base model", "nearest_training_answer": "nearest training answer",
         "repeat_question": "repeat the question"}


def load_metrics(path: Path | None) -> list[dict[str, Any]]:
    """The records of a run's ``metrics.jsonl`` (empty when there is none; bad lines skipped)."""
    if path is None or not Path(path).is_file():
        return []
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> bool:
    plt = _pyplot()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _first_per_step(records: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """Records holding ``key``, one per step: a run's closing evaluation (of the best checkpoint,
    logged at the last step again) would otherwise draw a misleading last point."""
    seen, out = set(), []
    for r in records:
        if isinstance(r.get(key), (int, float)) and r.get("step") not in seen:
            seen.add(r.get("step"))
            out.append(r)
    return out


def plot_losses(records: list[dict[str, Any]], path: Path) -> bool:
    """Train loss and validation loss against the optimizer step."""
    train = [(r["step"], r["loss"]) for r in records if "loss" in r and "step" in r]
    val = [(r["step"], r["eval_loss"]) for r in _first_per_step(records, "eval_loss")]
    if not train and not val:
        return False
    fig, ax = _pyplot().subplots(figsize=(7, 3.6), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", color="#1f77b4", linewidth=1.5)
    if val:
        ax.plot(*zip(*val), label="validation loss", color="#d62728", marker="o", linewidth=1.5)
    ax.set(xlabel="step", ylabel="loss (mean NLL per answer token)", title="Loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_epoch_metrics(records: list[dict[str, Any]], path: Path) -> bool:
    """Validation generation metrics against the epoch, one panel each."""
    panels = []
    for key, label in EPOCH_METRICS:
        points = [(r.get("epoch") or 0.0, r[key]) for r in _first_per_step(records, key)]
        if points:
            panels.append((label, points))
    if not panels:
        return False
    fig, axes = _pyplot().subplots(1, len(panels), figsize=(3.4 * len(panels), 3.2), dpi=110, squeeze=False)
    for ax, (label, points) in zip(axes[0], panels):
        ax.plot(*zip(*points), marker="o", color="#2ca02c")
        ax.set(title=label, xlabel="epoch")
        ax.grid(alpha=0.3)
    fig.suptitle("Validation subset, per evaluation")
    return _save(fig, path)


def plot_differences(result: EvalResult, path: Path) -> bool:
    """Model minus each baseline per headline metric: mean and 95% interval (a forest plot)."""
    rows = [c for c in result.comparisons if METRICS[c.metric].headline and c.difference is not None]
    if not rows:
        return False
    from matplotlib.ticker import MaxNLocator

    metrics = [m for m in METRICS if any(c.metric == m for c in rows)]
    names = [n for n in result.baselines if any(c.baseline == n for c in rows)]
    fig, axes = _pyplot().subplots(1, len(metrics), figsize=(3.2 * len(metrics) + 1.6, 1.2 + 0.45 * len(names)),
                                   dpi=110, squeeze=False, sharey=True)
    for ax, metric in zip(axes[0], metrics):
        for c in (c for c in rows if c.metric == metric):
            y = names.index(c.baseline)
            low = c.ci_low if c.ci_low is not None else c.difference
            high = c.ci_high if c.ci_high is not None else c.difference
            ax.errorbar(c.difference, y, xerr=[[c.difference - low], [high - c.difference]], fmt="o", capsize=4,
                        color=COLORS.get(c.baseline, "#1f77b4"))
        ax.axvline(0, color="#444", linewidth=1)
        better = "higher" if METRICS[metric].higher_is_better else "lower"
        ax.set_title(f"{METRICS[metric].label}\n({better} is better)", fontsize=9)
        ax.grid(alpha=0.3, axis="x")
        ax.xaxis.set_major_locator(MaxNLocator(5))
    axes[0][0].set_yticks(range(len(names)), [SHORT.get(n, n) for n in names], fontsize=8)
    axes[0][0].set_ylim(-0.6, len(names) - 0.4)
    fig.suptitle("Model minus baseline on the same questions: mean and 95% interval", fontsize=10)
    return _save(fig, path)


def plot_f1_distribution(result: EvalResult, path: Path) -> bool:
    """Histogram of per-example BERTScore F1 (model, and base model when scored) with means."""
    f1 = [v for r in result.examples if (v := r.scores.get("bertscore_f1")) is not None]
    if not f1:
        return False
    from matplotlib.ticker import MaxNLocator

    base = [v for r in result.examples if "base_model" in r.baselines
            and (v := r.baselines["base_model"].scores.get("bertscore_f1")) is not None]
    low, high = min(f1 + base), max(f1 + base)
    if high - low < 1e-6:
        low, high = low - 0.05, high + 0.05
    bins = [low + (high - low) * i / 20 for i in range(21)]
    fig, ax = _pyplot().subplots(figsize=(7, 3.6), dpi=110)
    ax.hist(f1, bins=bins, color="#1f77b4", alpha=0.75, label=f"model (mean {sum(f1) / len(f1):.3f})")
    if base:
        ax.hist(base, bins=bins, histtype="step", color=COLORS["base_model"], linewidth=2,
                label=f"base model (mean {sum(base) / len(base):.3f})")
    for name in ("nearest_training_answer", "repeat_question"):
        other = result.baselines.get(name)
        if other is not None and other.bertscore_f1 is not None:
            ax.axvline(other.bertscore_f1, color=COLORS[name], linestyle="--",
                       label=f"{BASELINE_LABELS[name]} (mean {other.bertscore_f1:.3f})")
    ax.set(xlabel="BERTScore F1 per example", ylabel="examples",
           title=f"Distribution of per-example BERTScore F1 (n={len(f1)})")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
