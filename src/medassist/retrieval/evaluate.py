"""Measure retrieval: does a held-out question find a passage about the *same disease*?

Protocol (docs/retrieval.md): the index holds a training split made by question group
(:func:`holdout_split`); queries are held-out rows, so a query's own answer is not in the index,
and each query's own group is excluded from the results anyway (belt and braces for indexes
that do contain it). A hit is relevant when its passage's ``focus`` equals the query row's focus
(case- and punctuation-insensitive); the stricter measure asks for the same source ``url``.

- *seen* queries (their focus is indexed: a new question about a known disease): recall@k and
  MRR@10, with bootstrap 95% confidence intervals over queries.
- *unseen* queries (focus not indexed): nothing relevant exists, so the right answer is "no
  source found". For thresholds on the top hit's score we report precision/recall of that
  "no source" decision, and how many seen queries are still answered with a relevant top hit.

Two query styles: ``original`` (MedQuAD's templated wording, which always contains the focus
verbatim) and ``rewritten`` (the same intent in free-form wording, :func:`rewrite_question`),
because real users do not ask in templates and an exact-title trick must not be over-credited.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from medassist.data import question_key
from medassist.errors import DataError
from medassist.retrieval.passages import SourceRow, focus_key, holdout_split  # noqa: F401 (re-export)
from medassist.retrieval.search import THRESHOLDS, VARIANTS, Retriever

Progress = Callable[[str, int, int], None]
MRR_DEPTH = 10

_REWRITES = {
    "information": "tell me about {e}",
    "symptoms": "how would I notice {e}",
    "treatment": "how do doctors manage {e}",
    "inheritance": "can {e} be passed from parents to children",
    "frequency": "how common is {e}",
    "genetic changes": "which mutations lead to {e}",
    "causes": "why do people develop {e}",
    "exams and tests": "which tests confirm {e}",
    "research": "are there new studies on {e}",
    "outlook": "what happens long term with {e}",
    "susceptibility": "who tends to get {e}",
    "considerations": "anything I should keep in mind with {e}",
    "prevention": "can {e} be avoided",
    "stages": "how does {e} progress",
    "complications": "what problems can {e} lead to",
}


def rewrite_question(row: SourceRow) -> str:
    """A free-form wording of a templated question: same entity (lower-cased), no template."""
    entity = (row.focus or row.question).lower()
    return _REWRITES.get(row.qtype.lower(), "what should I know about {e}").format(e=entity)


@dataclass
class _Outcome:
    focus_rank: int | None  # 1-based rank of the first hit with the query's focus
    url_rank: int | None
    top_score: float | None


def _ci(values: np.ndarray, rng: np.random.Generator, n: int) -> tuple[float, float]:
    if len(values) == 0 or n <= 0:
        return (float("nan"), float("nan"))
    means = values[rng.integers(0, len(values), size=(n, len(values)))].mean(axis=1)
    return (float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5)))


def _rank_metrics(ranks: list[int | None], k_values, rng, bootstrap: int) -> dict:
    out: dict = {"n": len(ranks)}
    if not ranks:
        return out
    for k in k_values:
        hits = np.array([r is not None and r <= k for r in ranks], dtype=float)
        out[f"recall@{k}"] = float(hits.mean())
        out[f"recall@{k}_ci"] = _ci(hits, rng, bootstrap)
    rr = np.array([1.0 / r if r is not None and r <= MRR_DEPTH else 0.0 for r in ranks])
    out["mrr"] = float(rr.mean())
    out["mrr_ci"] = _ci(rr, rng, bootstrap)
    return out


def threshold_table(outcomes: list[_Outcome], seen: list[bool], thresholds: Sequence[float]) -> list[dict]:
    """For each threshold: precision/recall/F1 of "no source" (unseen = positive) and answered-correctly rate."""
    top = np.array([o.top_score if o.top_score is not None else -np.inf for o in outcomes])
    seen_arr = np.array(seen)
    correct1 = np.array([o.focus_rank == 1 for o in outcomes])
    rows = []
    for t in thresholds:
        refused = top < t
        tp = int((refused & ~seen_arr).sum())
        precision = tp / refused.sum() if refused.sum() else float("nan")
        recall = tp / (~seen_arr).sum() if (~seen_arr).sum() else float("nan")
        f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
        rows.append({"threshold": float(t), "refused": int(refused.sum()), "no_source_precision": precision,
                     "no_source_recall": recall, "no_source_f1": f1,
                     "seen_answered_correct": float((correct1 & ~refused & seen_arr).sum() / max(1, seen_arr.sum())),
                     "seen_refused": float((refused & seen_arr).sum() / max(1, seen_arr.sum()))})
    return rows


def best_threshold(table: list[dict]) -> dict:
    """The row with the highest "no source" F1 (ties: the lower threshold, which refuses less)."""
    return max(table, key=lambda r: (r["no_source_f1"] if r["no_source_f1"] == r["no_source_f1"] else -1,
                                     -r["threshold"]))


def evaluate_retrieval(index: Retriever, queries_rows: Sequence[SourceRow], k_values=(1, 3, 5),
                       variants: Sequence[str] = VARIANTS, styles: Sequence[str] = ("original", "rewritten"),
                       limit: int | None = None, seed: int = 0, bootstrap: int = 1000,
                       thresholds: dict[str, float] | None = None, progress: Progress | None = None) -> dict:
    """Recall@k/MRR per variant and query style, plus the "no source" threshold analysis."""
    rows = list(queries_rows)
    if not rows:
        raise DataError("no query rows to evaluate")
    has_focus = any(r.focus for r in rows) and bool(index.passages["focus"].astype(bool).any())
    has_url = any(r.url for r in rows) and bool(index.passages["url"].astype(bool).any())
    if not (has_focus or has_url):
        raise DataError("evaluation needs a 'focus' or 'url' column in both the index and the queries")
    if limit is not None and len(rows) > limit:
        rows = random.Random(seed).sample(rows, limit)
    k_values = tuple(sorted(set(int(k) for k in k_values)))
    depth = max(MRR_DEPTH, max(k_values))
    thresholds = {**THRESHOLDS, **(thresholds or {})}
    indexed_foci = set(index.passages["focus"].map(focus_key))
    indexed_urls = set(index.passages["url"])
    # Rows without a focus count as seen/unseen by url.
    seen = [focus_key(r.focus) in indexed_foci if (has_focus and r.focus) else r.url in indexed_urls for r in rows]
    url_seen = [bool(r.url) and r.url in indexed_urls for r in rows]
    excludes = [(question_key(r.question),) for r in rows]
    report: dict = {"queries": {"total": len(rows), "seen_focus": int(sum(seen)), "unseen_focus": len(rows) - int(sum(seen)),
                                "seen_url": int(sum(url_seen))},
                    "k_values": list(k_values), "relevance": "focus" if has_focus else "url", "variants": {}}
    for variant in variants:
        report["variants"][variant] = {}
        for style in styles:
            texts = [r.question if style == "original" else rewrite_question(r) for r in rows]
            outcomes = []
            for start in range(0, len(texts), 128):
                matrix = index.scores(texts[start : start + 128], variant)
                for j, scores in enumerate(matrix):
                    r = rows[start + j]
                    hits = index.top(scores, depth, excludes[start + j])
                    fk, focus_rank, url_rank = focus_key(r.focus), None, None
                    for rank, h in enumerate(hits, 1):
                        if focus_rank is None and ((fk and focus_key(h.focus) == fk) if has_focus else h.url == r.url):
                            focus_rank = rank
                        if url_rank is None and r.url and h.url == r.url:
                            url_rank = rank
                    outcomes.append(_Outcome(focus_rank, url_rank, hits[0].score if hits else None))
                if progress:
                    progress(f"eval {variant}/{style}", min(start + 128, len(texts)), len(texts))
            rng = np.random.default_rng(seed)
            # Every distinct top score is a candidate threshold (refuse whatever scores below it).
            grid = sorted({round(o.top_score, 4) for o in outcomes if o.top_score is not None})
            table = threshold_table(outcomes, seen, grid + [thresholds[variant]])
            report["variants"][variant][style] = {
                "focus": _rank_metrics([o.focus_rank for o, s in zip(outcomes, seen) if s], k_values, rng, bootstrap),
                "url": _rank_metrics([o.url_rank for o, s in zip(outcomes, url_seen) if s], k_values, rng, bootstrap),
                "threshold_default": table[-1],
                "threshold_best_f1": best_threshold(table[:-1]) if len(table) > 1 else None,
                "top_scores": [o.top_score for o in outcomes],
                "seen": seen,
            }
    return report


def format_report(report: dict) -> str:
    """A plain-text table: one line per variant and style (seen-focus recall@k, MRR, url recall@1, no-source)."""
    ks = report["k_values"]
    q = report["queries"]
    lines = [f"queries: {q['total']} ({q['seen_focus']} about an indexed focus, {q['unseen_focus']} about an "
             f"unseen focus; {q['seen_url']} with an indexed url); relevance = same {report['relevance']}",
             ""]
    head = f"{'variant':<10} {'style':<10} " + " ".join(f"{'R@' + str(k):>6}" for k in ks) + \
        f" {'MRR':>6} {'95% CI R@' + str(ks[0]):>14} {'url R@' + str(ks[0]):>8} {'thr':>7} {'nosrc P/R':>11} {'ans ok':>7}"
    lines += [head, "-" * len(head)]
    for variant, styles in report["variants"].items():
        for style, m in styles.items():
            f, u, t = m["focus"], m["url"], m["threshold_default"]
            if f.get("n"):
                ci = f[f"recall@{ks[0]}_ci"]
                cells = " ".join(f"{f[f'recall@{k}']:6.3f}" for k in ks) + f" {f['mrr']:6.3f} [{ci[0]:.3f},{ci[1]:.3f}]"
            else:
                cells = "no seen queries"
            url = f"{u[f'recall@{ks[0]}']:8.3f}" if u.get("n") else f"{'-':>8}"
            pr = f"{t['no_source_precision']:.2f}/{t['no_source_recall']:.2f}"
            lines.append(f"{variant:<10} {style:<10} {cells} {url} {t['threshold']:7.3g} {pr:>11} "
                         f"{t['seen_answered_correct']:7.3f}")
    lines += ["", "R@k/MRR: seen-focus queries (MRR@10); url R@k: same source page; thr: the variant's default "
              "threshold; nosrc P/R: precision/recall of 'no source' on unseen-focus queries at thr; "
              "ans ok: share of seen queries answered with a same-focus top hit at thr."]
    return "\n".join(lines)
