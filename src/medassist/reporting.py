"""Reporting: an evaluation result as PNG plots and one self-contained ``report.html``.

The HTML embeds its plots as base64 data URIs and carries its own CSS, so the single file
opens offline and can be mailed around. All text from data and models is HTML-escaped.
Plots: train and validation loss per step and the generation metrics per epoch (both from a
run's ``metrics.jsonl``, when there is one), and the distribution of per-example BERTScore F1
beside the baselines' means.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

METRIC_ROWS = [
    ("bertscore_f1", "BERTScore F1", "harmonic mean of precision and recall (higher is better)"),
    ("bertscore_precision", "BERTScore precision", "how much of the answer is supported by the reference"),
    ("bertscore_recall", "BERTScore recall", "how much of the reference the answer covers"),
    ("rouge_l", "ROUGE-L", "longest common word subsequence, F-measure"),
    ("perplexity", "perplexity", "of the reference answers, teacher forced (lower is better)"),
    ("token_accuracy", "token accuracy", "reference answer tokens predicted exactly (argmax)"),
]
EPOCH_METRICS = [("eval_bertscore_f1", "BERTScore F1"), ("eval_perplexity", "perplexity"),
                 ("eval_token_accuracy", "token accuracy"), ("eval_rouge_l", "ROUGE-L")]


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


# ---------------------------------------------------------------------------------------
# plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


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
    """Train loss and validation loss against the optimizer step; False when there is none."""
    train = [(r["step"], r["loss"]) for r in records if "loss" in r and "step" in r]
    val = [(r["step"], r["eval_loss"]) for r in _first_per_step(records, "eval_loss")]
    if not train and not val:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", color="#1f77b4", linewidth=1.5)
    if val:
        ax.plot(*zip(*val), label="validation loss", color="#d62728", marker="o", linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean NLL per answer token)")
    ax.set_title("Loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_epoch_metrics(records: list[dict[str, Any]], path: Path) -> bool:
    """Validation generation metrics against the epoch, one panel each; False when none."""
    panels = []
    for key, label in EPOCH_METRICS:
        points = [(r.get("epoch") or 0.0, r[key]) for r in _first_per_step(records, key)]
        if points:
            panels.append((label, points))
    if not panels:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.2), dpi=110, squeeze=False)
    for ax, (label, points) in zip(axes[0], panels):
        ax.plot(*zip(*points), marker="o", color="#2ca02c")
        ax.set_title(label)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.suptitle("Validation subset, per evaluation")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_f1_distribution(result: dict[str, Any], path: Path) -> bool:
    """Histogram of per-example BERTScore F1 (model, and base model when scored) with means."""
    rows = result.get("examples") or []
    f1 = [r["bertscore_f1"] for r in rows if r.get("bertscore_f1") is not None]
    if not f1:
        return False
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    base = [r["base_model_bertscore_f1"] for r in rows if r.get("base_model_bertscore_f1") is not None]
    everything = f1 + base
    low, high = min(everything), max(everything)
    if high - low < 1e-6:
        low, high = low - 0.05, high + 0.05
    bins = [low + (high - low) * i / 20 for i in range(21)]
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    ax.hist(f1, bins=bins, color="#1f77b4", alpha=0.75, label=f"model (mean {sum(f1) / len(f1):.3f})")
    if base:
        ax.hist(base, bins=bins, histtype="step", color="#ff7f0e", linewidth=2,
                label=f"base model (mean {sum(base) / len(base):.3f})")
    repeat = (result.get("baselines") or {}).get("repeat_question")
    if repeat:
        ax.axvline(repeat["bertscore_f1"], color="#7f7f7f", linestyle="--",
                   label=f"repeat the question (mean {repeat['bertscore_f1']:.3f})")
    ax.set_xlabel("BERTScore F1 per example")
    ax.set_ylabel("examples")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"Distribution of per-example BERTScore F1 (n={len(f1)})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------
# HTML
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1200px;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
.sub{color:#666;margin-top:0}table{border-collapse:collapse;width:100%;margin:.6em 0;font-size:.92em}
th,td{border:1px solid #ddd;padding:.35em .55em;vertical-align:top;text-align:left}
th{background:#f4f6f8}td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.text div{white-space:pre-wrap;max-height:11em;overflow:auto}
tr.best td.num.f1{background:#e6f4ea}tr.worst td.num.f1{background:#fdecea}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:.5em .8em;margin:.8em 0}
.muted{color:#777}img{max-width:100%;border:1px solid #eee;margin:.4em 0}
pre{background:#f6f8fa;padding:.8em;overflow:auto;font-size:.85em}summary{cursor:pointer;font-weight:600}
"""


def _num(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) >= 100 else f"{value:.{digits}f}"
    return html.escape(str(value))


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _summary_table(result: dict[str, Any]) -> str:
    baselines = result.get("baselines") or {}
    base, repeat = baselines.get("base_model"), baselines.get("repeat_question")
    head = ("<tr><th>metric</th><th class=num>model</th><th class=num>base model</th>"
            "<th class=num>repeat the question</th><th>meaning</th></tr>")
    rows = []
    for key, label, meaning in METRIC_ROWS:
        digits = 2 if key == "perplexity" else 4
        rows.append(
            f"<tr><td>{label}</td><td class=num><b>{_num(result.get(key), digits)}</b></td>"
            f"<td class=num>{_num(base.get(key) if base else None, digits)}</td>"
            f"<td class=num>{_num(repeat.get(key) if repeat else None, digits)}</td>"
            f"<td class=muted>{html.escape(meaning)}</td></tr>"
        )
    rows.append(
        f"<tr><td>mean generated tokens</td><td class=num>{_num(result.get('mean_generated_tokens'), 1)}</td>"
        f"<td class=num>{_num(base.get('mean_generated_tokens') if base else None, 1)}</td><td class=num>–</td>"
        "<td class=muted>answer length, EOS excluded</td></tr>"
    )
    rows.append(
        f"<tr><td>answers cut at max_new_tokens</td><td class=num>{_pct(result.get('hit_max_new_tokens'))}</td>"
        f"<td class=num>{_pct(base.get('hit_max_new_tokens') if base else None)}</td><td class=num>–</td>"
        "<td class=muted>share that produced no EOS in time</td></tr>"
    )
    return f"<table>{head}{''.join(rows)}</table>"


def _pct(value: Any) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _examples_table(rows: list[dict[str, Any]], css_class: str = "") -> str:
    has_base = any("base_model_generated" in r for r in rows)
    head = ("<tr><th class=num>#</th><th>question</th><th>reference</th><th>generated</th>"
            + ("<th>base model</th>" if has_base else "")
            + "<th class=num>F1</th><th class=num>P</th><th class=num>R</th><th class=num>tokens</th></tr>")
    body = []
    for r in rows:
        cut = " (cut)" if r.get("hit_max_new_tokens") else ""
        base = ""
        if has_base:
            base = (f"<td class=text><div>{html.escape(r.get('base_model_generated', ''))}</div>"
                    f"<span class=muted>F1 {_num(r.get('base_model_bertscore_f1'))}</span></td>")
        generated = html.escape(r.get("generated", "")) or '<span class="muted">(empty)</span>'
        body.append(
            f"<tr class='{css_class}'><td class=num>{r['_index'] + 1}</td>"
            f"<td class=text><div>{html.escape(r.get('question', ''))}</div></td>"
            f"<td class=text><div>{html.escape(r.get('reference', ''))}</div></td>"
            f"<td class=text><div>{generated}</div></td>{base}"
            f"<td class='num f1'>{_num(r.get('bertscore_f1'))}</td>"
            f"<td class=num>{_num(r.get('bertscore_precision'))}</td>"
            f"<td class=num>{_num(r.get('bertscore_recall'))}</td>"
            f"<td class=num>{_num(r.get('generated_tokens'))}{cut}</td></tr>"
        )
    return f"<table>{head}{''.join(body)}</table>"


def write_examples_csv(rows: list[dict[str, Any]], path: Path) -> None:
    columns = ["question", "reference", "generated", "bertscore_f1", "bertscore_precision", "bertscore_recall",
               "rouge_l", "generated_tokens", "hit_max_new_tokens", "base_model_generated", "base_model_bertscore_f1"]
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def write_report(result: dict[str, Any], out_dir: Path, metrics_path: Path | None = None,
                 title: str | None = None, n_extremes: int = 10) -> Path:
    """Write the PNGs, ``examples.csv`` and ``report.html`` into ``out_dir``; return the HTML path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = load_metrics(metrics_path)
    plots = []
    for name, draw, caption in (
        ("loss.png", lambda p: plot_losses(records, p), "Train and validation loss per step"),
        ("epoch_metrics.png", lambda p: plot_epoch_metrics(records, p), "Generation metrics per evaluation"),
        ("f1_distribution.png", lambda p: plot_f1_distribution(result, p), "Per-example BERTScore F1"),
    ):
        if draw(out_dir / name):
            plots.append((out_dir / name, caption))

    rows = [dict(r, _index=i) for i, r in enumerate(result.get("examples") or [])]
    write_examples_csv(rows, out_dir / "examples.csv")
    ranked = sorted(rows, key=lambda r: r.get("bertscore_f1") or 0.0)
    k = min(n_extremes, max(1, len(rows) // 2))  # best and worst never share an example when n > 1
    best, worst = list(reversed(ranked[-k:])) if k else [], ranked[:k]
    settings = result.get("settings") or {}
    bert = settings.get("bertscore") or {}
    gen = settings.get("generation") or {}
    data = settings.get("data") or {}
    title = title or "medassist evaluation"

    notes = []
    if bert.get("note"):
        notes.append(bert["note"])
    if (result.get("hit_max_new_tokens") or 0) > 0.2:
        notes.append(f"{_pct(result['hit_max_new_tokens'])} of the answers ran into max_new_tokens "
                     f"({gen.get('max_new_tokens')}) and were cut: scores understate full answers; "
                     "raise eval.max_new_tokens for a fairer picture.")
    base_note = (result.get("baselines") or {}).get("base_model_note")
    if base_note:
        notes.append(base_note)
    if data.get("train_overlap"):
        notes.append(f"{data['train_overlap']} evaluated questions also occur in the run's training split.")

    parts = [
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p class=sub>model <b>{html.escape(str(settings.get('model', '')))}</b> ({html.escape(str(settings.get('family', '')))}, "
        f"{html.escape(str(settings.get('prompt_format', '')))}) · {result.get('n_examples', 0)} examples"
        + (f" · data {html.escape(str(data.get('source', '')))} ({html.escape(str(data.get('split', '')))})" if data else "")
        + f" · {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}</p>",
        "".join(f"<div class=note>{html.escape(n)}</div>" for n in notes),
        "<h2>Scores</h2>",
        _summary_table(result),
        f"<p class=muted>BERTScore: encoder {html.escape(str(bert.get('model', '')))}, layer {bert.get('layer')}, "
        f"idf {bert.get('idf')}, rescaled {bert.get('rescale_with_baseline')}; bert_score hash "
        f"<code>{html.escape(str(bert.get('hash', '')))}</code>. Generation: "
        f"{'sampling (temperature ' + str(gen.get('temperature')) + ', top_p ' + str(gen.get('top_p')) + ')' if gen.get('do_sample') else 'greedy'}, "
        f"max_new_tokens {gen.get('max_new_tokens')}. Inputs to generation are the prompts only.</p>",
    ]
    if plots:
        parts.append("<h2>Plots</h2>")
        for path, caption in plots:
            parts.append(f"<figure>{_img(path, caption)}<figcaption class=muted>{html.escape(caption)}</figcaption></figure>")
    if rows:
        parts += [f"<h2>{k} best examples (by BERTScore F1)</h2>", _examples_table(best, "best"),
                  f"<h2>{k} worst examples</h2>", _examples_table(worst, "worst"),
                  f"<h2>All {len(rows)} examples</h2><details><summary>show the table (input order)</summary>",
                  _examples_table(rows), "</details>"]
    parts += ["<h2>Settings</h2><details><summary>everything this evaluation used</summary><pre>",
              html.escape(json.dumps(settings, indent=2, ensure_ascii=False, default=str)),
              "</pre></details></body></html>"]
    path = out_dir / "report.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
