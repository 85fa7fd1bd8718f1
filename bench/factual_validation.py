"""Validate the factual-consistency scorer on the hand-labelled set, beside BERTScore.

Reads data/eval/factual_consistency_labelled.jsonl (question, reference, answer, label
supported|unsupported, kind, split design|holdout) and prints ROC AUC (Mann-Whitney) with a seeded
bootstrap 95% CI for (a) medassist.evaluation.factual's factual_consistency and (b) BERTScore F1 with the
embedded MiniLM encoder, overall, per split, and per kind (the share of each unsupported kind
that scores below the median supported answer, since a kind holds one label only).

    .venv/bin/python bench/factual_validation.py                 # offline scorer + BERTScore
    .venv/bin/python bench/factual_validation.py --no-bertscore  # scorer only (seconds)
    .venv/bin/python bench/factual_validation.py --scorer <NLI hub id or folder>
    .venv/bin/python bench/factual_validation.py --rebuild-idf   # rewrite resources/idf.json.gz
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from medassist.evaluation.factual import build_idf, get_factual_scorer, write_idf  # noqa: E402

DATA = ROOT / "data" / "eval" / "factual_consistency_labelled.jsonl"
MEDQUAD = Path("/work/shared/data/medquad.csv")


def auc(scores: list[float], labels: list[int]) -> float:
    """ROC AUC = P(score of a positive > score of a negative), ties count half (Mann-Whitney U)."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return float("nan")
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def bootstrap_ci(scores: list[float], labels: list[int], n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile 95% CI of the AUC over rows resampled with replacement (seeded)."""
    rng = random.Random(seed)
    idx = list(range(len(scores)))
    values = []
    for _ in range(n):
        sample = [rng.choice(idx) for _ in idx]
        value = auc([scores[i] for i in sample], [labels[i] for i in sample])
        if value == value:
            values.append(value)
    values.sort()
    return values[int(0.025 * len(values))], values[int(0.975 * len(values)) - 1]


def paired_difference_ci(a: list[float], b: list[float], labels: list[int], n: int = 2000,
                         seed: int = 0) -> tuple[float, float, float]:
    """AUC(a) - AUC(b) on the same rows, with a paired percentile bootstrap 95% CI (seeded)."""
    rng = random.Random(seed)
    idx = list(range(len(a)))
    diffs = []
    for _ in range(n):
        s = [rng.choice(idx) for _ in idx]
        y = [labels[i] for i in s]
        d = auc([a[i] for i in s], y) - auc([b[i] for i in s], y)
        if d == d:
            diffs.append(d)
    diffs.sort()
    return auc(a, labels) - auc(b, labels), diffs[int(0.025 * len(diffs))], diffs[int(0.975 * len(diffs)) - 1]


def bertscore_f1(answers: list[str], references: list[str]) -> tuple[list[float], str]:
    try:
        from medassist.evaluation import get_bert_scorer

        _, _, f1 = get_bert_scorer("minilm-l6").score(answers, references)
        return [float(x) for x in f1], "medassist.evaluation.get_bert_scorer('minilm-l6')"
    except ImportError:
        from bert_score import BERTScorer

        from medassist.presets import minilm_folder

        scorer = BERTScorer(model_type=str(minilm_folder()), num_layers=6)
        _, _, f1 = scorer.score(answers, references)
        return f1.tolist(), "bert_score.BERTScorer(MiniLM folder, num_layers=6)"


def report(name: str, scores: list[float], rows: list[dict]) -> dict:
    labels = [int(r["label"] == "supported") for r in rows]
    out = {}
    print(f"\n== {name}")
    print(f"{'subset':<28}{'n':>5}{'AUC':>8}   95% CI")
    splits = list(dict.fromkeys(r["split"] for r in rows))
    for subset in ["all"] + splits:
        sel = [i for i, r in enumerate(rows) if subset in ("all", r["split"])]
        if not sel:
            continue
        s, y = [scores[i] for i in sel], [labels[i] for i in sel]
        a, (lo, hi) = auc(s, y), bootstrap_ci(s, y)
        out[subset] = (a, lo, hi, len(sel))
        print(f"{subset:<28}{len(sel):>5}{a:>8.3f}   [{lo:.3f}, {hi:.3f}]")
    # per kind: each unsupported kind against all supported answers (AUC), supported kinds against all unsupported
    by_kind = defaultdict(list)
    for i, r in enumerate(rows):
        by_kind[(r["label"], r["kind"])].append(i)
    sup = [i for i, r in enumerate(rows) if r["label"] == "supported"]
    uns = [i for i, r in enumerate(rows) if r["label"] == "unsupported"]
    print(f"{'kind (label)':<28}{'n':>5}{'AUC':>8}   mean score")
    for (label, kind), idx in sorted(by_kind.items()):
        other = uns if label == "supported" else sup
        sel = idx + other
        a = auc([scores[i] for i in sel], [labels[i] for i in sel])
        print(f"{kind + ' (' + label[0] + ')':<28}{len(idx):>5}{a:>8.3f}   {statistics.mean(scores[i] for i in idx):.3f}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scorer", default="offline")
    ap.add_argument("--no-bertscore", action="store_true")
    ap.add_argument("--rebuild-idf", action="store_true")
    ap.add_argument("--show-errors", type=int, default=0, help="print the N worst-ranked rows of each label")
    args = ap.parse_args()
    if args.rebuild_idf:
        import pandas as pd

        answers = pd.read_csv(MEDQUAD)["answer"].astype(str).drop_duplicates()
        table = build_idf(answers)
        write_idf(table)
        print(f"idf table: {table['n_docs']} documents, {len(table['df'])} words")

    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    answers, refs, questions = [r["answer"] for r in rows], [r["reference"] for r in rows], [r["question"] for r in rows]
    print(f"{len(rows)} rows ({sum(r['label'] == 'supported' for r in rows)} supported), "
          f"{sum(r['split'] != 'design' for r in rows)} held out; file {DATA.relative_to(ROOT)}")

    t0 = time.perf_counter()
    scorer = get_factual_scorer(args.scorer)
    results = scorer.score(answers, refs, questions)
    secs = time.perf_counter() - t0
    fc = [r.factual_consistency for r in results]
    print(f"factual scorer '{args.scorer}': {secs:.2f} s for {len(rows)} rows (incl. loading)")
    summary = {"factual_consistency": report(f"factual_consistency ({args.scorer})", fc, rows)}
    if args.show_errors:
        order = sorted(range(len(rows)), key=lambda i: fc[i])
        sup = [i for i in order if rows[i]["label"] == "supported"][: args.show_errors]
        uns = [i for i in reversed(order) if rows[i]["label"] == "unsupported"][: args.show_errors]
        for i in sup + uns:
            r = results[i]
            print(f"  {rows[i]['id']} {rows[i]['label'][:5]} {rows[i]['kind']:<20} fc={r.factual_consistency:.3f} "
                  f"c={r.contradictions} unsup={r.unsupported[:6]}")

    if not args.no_bertscore:
        t0 = time.perf_counter()
        f1, how = bertscore_f1(answers, refs)
        print(f"\nBERTScore via {how}: {time.perf_counter() - t0:.1f} s")
        summary["bertscore_f1"] = report("BERTScore F1 (MiniLM-L6, layer 6)", f1, rows)
        print("\n== AUC(factual_consistency) - AUC(BERTScore F1), paired bootstrap 95% CI")
        for subset in ["all"] + list(dict.fromkeys(r["split"] for r in rows)):
            sel = [i for i, r in enumerate(rows) if subset in ("all", r["split"])]
            y = [int(rows[i]["label"] == "supported") for i in sel]
            d, lo, hi = paired_difference_ci([fc[i] for i in sel], [f1[i] for i in sel], y)
            print(f"{subset:<28}{len(sel):>5}{d:>+8.3f}   [{lo:+.3f}, {hi:+.3f}]")

    print("\nsummary (AUC [95% CI], n):")
    for metric, parts in summary.items():
        print("  " + metric + ": " + "; ".join(f"{k} {a:.3f} [{lo:.3f}, {hi:.3f}] n={n}" for k, (a, lo, hi, n) in parts.items()))


if __name__ == "__main__":
    main()
