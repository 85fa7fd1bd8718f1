"""The report: one self-contained ``report.html`` (plus its PNGs and ``examples.csv``).

The page comes from the Jinja2 template ``templates/report.html.j2`` with autoescaping on, so
every text from data or a model (questions, answers, the title) is escaped by the template
engine, never by hand. Plots are matplotlib PNGs (:mod:`.plots`) embedded as base64 data URIs and
the CSS is inline, so the single file opens offline and can be mailed around.

The page opens with the verdicts: "better than the base model / the nearest training answer /
repeating the question: yes, no or can't tell", each with its reason; a model that does not beat
the retrieval baseline is flagged. Then the paired differences with 95% intervals and win
counts, the means, the failure measures of the answers, breakdowns by question type and source,
the plots, and the best and worst examples.
"""

from __future__ import annotations

import base64
import csv
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from medassist.evaluation.plots import (
    load_metrics, plot_differences, plot_epoch_metrics, plot_f1_distribution, plot_losses,
)
from medassist.evaluation.results import BASELINE_LABELS, METRICS, EvalResult

ANSWER_ROWS = [  # AnswerStats field, label, how to show it
    ("mean_answer_words", "mean answer length (words)", "num1"),
    ("mean_reference_words", "mean reference length (words)", "num1"),
    ("length_ratio", "median answer / reference length", "num2"),
    ("cut_at_limit", "answers cut at max_new_tokens", "pct"),
    ("repetition_rate", "repeated word trigrams within an answer", "pct"),
    ("question_echo_rate", "answers that open by restating the question", "pct"),
    ("empty_answers", "empty answers", "pct"),
]
MEAN_ROWS = [  # SystemResult field, label, meaning
    *((k, METRICS[k].label, METRICS[k].meaning) for k in
      ("factual_consistency", "bertscore_f1", "bertscore_precision", "bertscore_recall", "rouge_l")),
    ("perplexity", "perplexity", "of the reference answers, teacher forced, pooled over tokens (lower is better)"),
    ("token_accuracy", "token accuracy", "reference answer tokens predicted exactly (argmax)"),
]


# ---------------------------------------------------------------------------------------
# number formatting (template filters)
def num(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) >= 100 else f"{value:.{digits}f}"
    return str(value)


def signed(value: Any, digits: int = 4) -> str:
    return "–" if value is None else f"{value:+.{digits}f}"


def pct(value: Any) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def ci(low: Any, high: Any, digits: int = 4) -> str:
    return "–" if low is None or high is None else f"[{low:+.{digits}f}, {high:+.{digits}f}]"


def show(value: Any, how: str) -> str:
    """``pct``, ``num1`` or ``num2`` formatting, chosen by name (the answer-measure rows)."""
    return pct(value) if how == "pct" else num(value, 1 if how == "num1" else 2)


def _environment():
    from jinja2 import Environment, PackageLoader, StrictUndefined

    env = Environment(loader=PackageLoader("medassist.evaluation", "templates"), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(num=num, signed=signed, pct=pct, ci=ci, show=show)
    return env


# ---------------------------------------------------------------------------------------
def retrieval_flag(result: EvalResult) -> str | None:
    """The warning for a model that does not beat the nearest-training-answer baseline."""
    verdict = result.verdict("nearest_training_answer")
    if verdict is None or verdict.verdict == "yes":
        return None
    return (f"The model is not shown to beat answering with the answer of the nearest training question "
            f"(verdict: {verdict.verdict}; {verdict.reason}). A tuned model that does not beat looking the "
            "answer up in its training data adds no measured value.")


def notes(result: EvalResult) -> list[str]:
    """Everything a reader must know before trusting the numbers."""
    out = []
    bert = result.settings.get("bertscore") or {}
    gen = result.settings.get("generation") or {}
    if bert.get("note"):
        out.append(bert["note"])
    cut = result.model.hit_max_new_tokens or 0
    if cut > 0.2:
        out.append(f"{pct(cut)} of the answers ran into max_new_tokens ({gen.get('max_new_tokens')}) and were cut: "
                   "scores understate full answers; raise eval.max_new_tokens for a fairer picture.")
    if result.model.references_cut:
        out.append(f"{result.model.references_cut} of {result.n_examples} reference answers were longer than the "
                   "length limit and were cut for perplexity (the cut part and no made-up end are scored).")
    r = result.retrieval
    if r is not None and r.mean_passages - r.mean_passages_in_prompt > 0.05:
        out.append(f"Prompts carried {r.mean_passages_in_prompt:.2f} of the {r.mean_passages:.2f} passages retrieved "
                   "per question: the rest did not fit max_length * max_prompt_fraction (raise them to give the "
                   "model its sources).")
    if r is not None and r.own_reference_hits:
        out.append(f"{r.own_reference_hits} prompts carried the question's own row: its reference leaked into "
                   "its prompt, and these scores overstate the model.")
    if result.data.train_overlap:
        out.append(f"{result.data.train_overlap} of the {result.n_examples} evaluated questions also occur in the "
                   "run's training split: those are not unseen questions.")
    return out


def _png(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def write_examples_csv(result: EvalResult, path: Path) -> None:
    """Every example: question, reference, each system's answer and scores, one row each."""
    names = list(result.baselines)
    metrics = [k for k in METRICS if any(k in r.scores for r in result.examples)]
    columns = ["row", "question", "reference", *result_meta_columns(result), "generated", "generated_tokens",
               "hit_max_new_tokens", *metrics] + (["sources"] if result.retrieval is not None else [])
    for name in names:
        columns += [f"{name}_answer", *(f"{name}_{k}" for k in metrics)]
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for r in result.examples:
            line = {"row": r.row, "question": r.question, "reference": r.reference, **r.meta,
                    "generated": r.generated, "generated_tokens": r.generated_tokens,
                    "hit_max_new_tokens": r.hit_max_new_tokens, **r.scores,
                    "sources": "; ".join(f"{s.title} ({s.url})" if s.url else s.title for s in r.sources)}
            for name, b in r.baselines.items():
                line[f"{name}_answer"] = b.text
                line.update({f"{name}_{k}": v for k, v in b.scores.items()})
            writer.writerow(line)


def result_meta_columns(result: EvalResult) -> list[str]:
    return sorted({k for r in result.examples for k in r.meta})


def write_report(result: EvalResult, out_dir: Path, metrics_path: Path | None = None,
                 title: str | None = None, n_extremes: int = 10) -> Path:
    """Write the PNGs, ``examples.csv`` and ``report.html`` into ``out_dir``; return the HTML path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = load_metrics(metrics_path)
    plots = []
    for name, draw, caption in (
        ("differences.png", lambda p: plot_differences(result, p), "Model minus each baseline, 95% intervals"),
        ("loss.png", lambda p: plot_losses(records, p), "Train and validation loss per step"),
        ("epoch_metrics.png", lambda p: plot_epoch_metrics(records, p), "Generation metrics per evaluation"),
        ("f1_distribution.png", lambda p: plot_f1_distribution(result, p), "Per-example BERTScore F1"),
    ):
        if draw(out_dir / name):
            plots.append({"src": _png(out_dir / name), "caption": caption})
    write_examples_csv(result, out_dir / "examples.csv")

    rows = result.examples
    ranked = sorted(rows, key=lambda r: r.scores.get("bertscore_f1") or 0.0)
    k = min(n_extremes, max(1, len(rows) // 2))  # best and worst never share an example when n > 1
    systems = list(result.systems().values())
    page = _environment().get_template("report.html.j2").render(
        title=title or "medassist evaluation",
        created=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        result=result, settings=result.settings, bert=result.settings.get("bertscore") or {},
        gen=result.settings.get("generation") or {}, data=result.data,
        flag=retrieval_flag(result), notes=notes(result), metrics=METRICS,
        labels={**BASELINE_LABELS, **{v.baseline: v.label for v in result.verdicts}},
        systems=systems, mean_rows=[row for row in MEAN_ROWS if any(s.metric(row[0]) is not None for s in systems)],
        answer_rows=ANSWER_ROWS, plots=plots, k=k,
        best=list(reversed(ranked[-k:])) if rows else [], worst=ranked[:k] if rows else [], rows=rows,
        example_baselines=[n for n in ("no_retrieval", "base_model", "nearest_training_answer", "other_run")
                           if n in result.baselines],
        settings_json=_json(result.settings),
    )
    path = out_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


def _json(value: Any) -> str:
    import json

    return json.dumps(value, indent=2, ensure_ascii=False, default=str)
