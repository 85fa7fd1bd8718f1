"""Summarise recipe experiments: one row per run directory, from its stored evaluation.

    .venv/bin/python bench/recipe_table.py runs/exp/*            # test split (eval_test.json)
    .venv/bin/python bench/recipe_table.py runs/exp/e1 --eval eval_test_nrng3.json

For each run: steps, training wall time, and for the model against the base model, the
retrieval baseline ("nearest training answer") and, for retrieval runs, the same model without
retrieval: the paired difference of factual consistency, BERTScore F1 and log perplexity with
its 95% bootstrap interval (as stored by ``medassist evaluate``), the verdict, and the answers'
mean length, share cut at max_new_tokens and repetition. Prints a Markdown table (docs/recipe.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

METRICS = (("factual_consistency", "factual"), ("bertscore_f1", "BERTScore F1"), ("log_perplexity", "log ppl"))


def _cell(c: dict | None) -> str:
    if not c:
        return "–"
    return f"{c['difference']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}]"


def row(run: Path, eval_name: str, baseline: str) -> list[str] | None:
    path = run / eval_name
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    summary = json.loads((run / "train_summary.json").read_text()) if (run / "train_summary.json").is_file() else {}
    comps = {(c["baseline"], c["metric"]): c for c in result.get("comparisons", [])}
    verdict = next((v for v in result.get("verdicts", []) if v["baseline"] == baseline), None)
    if verdict is None:
        return None
    timing = summary.get("timing") or {}
    failures = (result.get("model") or {}).get("answers") or {}
    cells = [run.name, baseline, str(summary.get("steps", "?")), f"{(timing.get('train') or 0) / 60:.0f}",
             str(result.get("n_examples"))]
    cells += [_cell(comps.get((baseline, key))) for key, _ in METRICS]
    cells += [verdict["verdict"], f"{result.get('mean_generated_tokens') or 0:.0f}",
              f"{100 * (result.get('hit_max_new_tokens') or 0):.0f}%",
              f"{failures.get('repetition_rate', float('nan')):.3f}" if failures else "–",
              f"{100 * failures.get('question_echo_rate', 0):.0f}%" if failures else "–"]
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--eval", default="eval_test.json", help="evaluation file inside each run")
    parser.add_argument("--baselines", default="base_model,nearest_training_answer,no_retrieval")
    args = parser.parse_args()
    head = ["run", "vs", "steps", "train min", "n"] + [f"Δ {label} [95% CI]" for _, label in METRICS] + \
           ["verdict", "tokens", "cut", "repetition", "echo"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for run in args.runs:
        for baseline in args.baselines.split(","):
            cells = row(run, args.eval, baseline)
            if cells:
                print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
