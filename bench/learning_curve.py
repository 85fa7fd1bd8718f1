"""Learning curve of the held-out metrics against training steps, from stored evaluations.

    .venv/bin/python bench/learning_curve.py \\
        0=runs/exp/r200/eval_test.json:base_model \\
        100=runs/exp/r200/eval_test_checkpoint-100.json \\
        200=runs/exp/r200/eval_test.json \\
        300=runs/exp/e1-base300/eval_test_checkpoint-300.json --out docs/recipe_curve.png

Each point is ``[LABEL@]STEP=EVAL.json[:SYSTEM]`` (SYSTEM: ``model`` by default, or a baseline
stored in that file such as ``base_model``, the untuned model = step 0; LABEL: one curve per
label, e.g. ``with retrieval@100=...`` beside ``without@100=...``). All files must score the same
questions (``medassist evaluate`` of a run and of its checkpoints does). Prints a Markdown
table of each metric's mean with its 95% bootstrap interval and writes the plot.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

METRICS = (("factual_consistency", "factual consistency"), ("bertscore_f1", "BERTScore F1"),
           ("log_perplexity", "log perplexity of the reference"))


def per_example(path: Path, system: str) -> tuple[list[str], dict[str, list[float]], dict]:
    result = json.loads(path.read_text())
    rows = result["examples"]
    scores = [r["scores"] if system == "model" else r["baselines"][system]["scores"] for r in rows]
    values = {key: [s[key] for s in scores if s.get(key) is not None] for key, _ in METRICS}
    stats = result["model"] if system == "model" else result["baselines"][system]
    return [r["question"] for r in rows], values, stats


def main() -> int:
    from medassist.evaluation.stats import mean_ci

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("points", nargs="+", metavar="[LABEL@]STEP=EVAL.json[:SYSTEM]")
    parser.add_argument("--out", type=Path, help="write the plot here (PNG)")
    args = parser.parse_args()
    curves: dict[str, list] = {}
    questions = None
    for point in args.points:
        label, _, point_ref = point.rpartition("@")
        step, _, ref = point_ref.partition("=")
        path, _, system = ref.partition(":")
        asked, values, stats = per_example(Path(path), system or "model")
        if questions is not None and asked != questions:
            raise SystemExit(f"{path}: scores other questions than {args.points[0]}; curves need the same questions")
        questions = asked
        curves.setdefault(label, []).append((int(step), {k: (sum(v) / len(v), *mean_ci(v)) for k, v in values.items()},
                                             stats))
    labelled = any(curves)
    print(f"|{' curve |' if labelled else ''} step | {' | '.join(label for _, label in METRICS)} | "
          "mean answer tokens | cut at the limit | repeated trigrams |")
    print("|---" * (len(METRICS) + 4 + labelled) + "|")
    for label, curve in curves.items():
        curve.sort(key=lambda c: c[0])
        for step, cis, stats in curve:
            cells = [f"{m:.3f} [{lo:.3f}, {hi:.3f}]" for m, lo, hi in (cis[k] for k, _ in METRICS)]
            answers = stats.get("answers") or {}
            print(f"|{f' {label} |' if labelled else ''} {step} | {' | '.join(cells)} | "
                  f"{stats.get('mean_generated_tokens', 0):.0f} | "
                  f"{100 * (stats.get('hit_max_new_tokens') or 0):.0f}% | "
                  f"{100 * (answers.get('repetition_rate') or 0):.1f}% |")
    if args.out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.2))
        for ax, (key, title) in zip(axes, METRICS):
            for label, curve in curves.items():
                steps = [c[0] for c in curve]
                ax.plot(steps, [c[1][key][0] for c in curve], marker="o", label=label or None)
                ax.fill_between(steps, [c[1][key][1] for c in curve], [c[1][key][2] for c in curve], alpha=0.2)
            ax.set_xlabel("training steps (0 = untuned base)")
            ax.set_title(title, fontsize=10)
            ax.grid(alpha=0.3)
        if labelled:
            axes[0].legend(fontsize=8)
        fig.suptitle(f"{len(questions)} held-out questions from an unseen collection, 95% bootstrap intervals",
                     fontsize=10)
        fig.tight_layout()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.out, dpi=110)
        print(f"plot: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
