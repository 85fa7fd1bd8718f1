"""Grounding: did retrieval find the right sources, and do the answers say what they say?

For a model that answers from retrieved passages (``retrieval.enabled``, or ``evaluate --index``):

- **recall@k**: the share of questions whose prompt carried a passage about the question's
  entity (same ``focus``, case-, punctuation- and possessive-insensitive) or from its source page
  (same ``url``), over the questions that have either in their metadata. The passages counted
  are those above the threshold, at most ``k``: what the prompt was given.
- **source support**: the factual-consistency scorer (:mod:`.factual`) with the passages that
  reached the prompt as the reference: how much of what an answer states its sources support.
  Per answer, None for a question without a source; an answer is *supported* at
  :data:`SUPPORTED` or more. Scored for every system that generated from the same questions
  (the model, the same model without retrieval, the base model), so the difference says
  whether the sources in the prompt, not the topic, made the answer agree with them.
- **reference overlap**: the share of each reference's word 8-grams found in its prompt's
  passages (mean): near 0 unless a source restates the answer being scored (a leak).
"""

from __future__ import annotations

from statistics import fmean
from typing import Sequence

from medassist.data import QAExample, question_key
from medassist.formatting import Passage
from medassist.retrieval.augment import Retrieved, own_text
from medassist.retrieval.passages import focus_key
from medassist.retrieval.search import DEFAULT_VARIANT, Hit

SUPPORTED = 0.5  # source support at which an answer counts as supported by its sources


def source_support(factual, answers: Sequence[str], passages: Sequence[Sequence[Passage]],
                   questions: Sequence[str]) -> list[float | None]:
    """Per answer: factual consistency with its prompt's passages as the reference (None: no passage)."""
    idx = [i for i, p in enumerate(passages) if p]
    out: list[float | None] = [None] * len(answers)
    if idx:
        refs = ["\n".join(f"{p.title}: {p.text}" for p in passages[i]) for i in idx]
        scores = factual.score([answers[i] for i in idx], refs, [questions[i] for i in idx])
        for i, s in zip(idx, scores):
            out[i] = float(s.factual_consistency)
    return out


def relevance(hit: Hit, meta: dict[str, str]) -> tuple[bool, bool]:
    """(same focus, same url) of a hit and a question's metadata."""
    focus, url = focus_key(meta.get("focus", "")), meta.get("url", "")
    return bool(focus) and focus_key(hit.focus or hit.title) == focus, bool(url) and hit.url == url


def own_reference(hit: Hit, example: QAExample) -> bool:
    """Whether ``hit`` is the example's own row: its question group, or a piece of its reference."""
    return hit.group == question_key(example.question) or own_text(hit, " ".join(example.answer.split()).casefold())


def reference_overlap(example: QAExample, hits: Sequence[Hit], n: int = 8) -> float:
    """The share of the reference's word ``n``-grams that the prompt's passages contain: a leak
    check (passages that restate the reference would make a retrieval win meaningless)."""
    def grams(text: str) -> set[tuple[str, ...]]:
        words = text.casefold().split()
        return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}

    reference = grams(example.answer)
    if not reference or not hits:
        return 0.0
    return len(reference & set().union(*(grams(h.text) for h in hits))) / len(reference)


def _share(values: list[bool]) -> float | None:
    return fmean(values) if values else None


def summarize(examples: Sequence[QAExample], retrieved: Sequence[Retrieved], in_prompt: Sequence[int],
              support: dict[str, list[float | None]], *, index: str, k: int, min_score: float,
              blocked: int = 0, heldout_corpus: str = "blocked"):
    """The :class:`~medassist.evaluation.results.RetrievalEval` of one evaluation."""
    from medassist.evaluation.results import RetrievalEval

    focus_hits, url_hits, any_hits = [], [], []
    for ex, r in zip(examples, retrieved):
        if not (ex.meta.get("focus") or ex.meta.get("url")):
            continue
        marks = [relevance(h, ex.meta) for h in r.hits]
        if ex.meta.get("focus"):
            focus_hits.append(any(f for f, _ in marks))
        if ex.meta.get("url"):
            url_hits.append(any(u for _, u in marks))
        any_hits.append(any(f or u for f, u in marks))
    with_source = [i for i, r in enumerate(retrieved) if r.hits]
    n = max(1, len(retrieved))
    return RetrievalEval(
        index=index, k=k, min_score=min_score, variant=DEFAULT_VARIANT, n_examples=len(retrieved),
        with_source=len(with_source), mean_passages=sum(len(r.hits) for r in retrieved) / n,
        mean_passages_in_prompt=sum(in_prompt) / n, n_labelled=len(any_hits), recall_at_k=_share(any_hits),
        recall_focus_at_k=_share(focus_hits), recall_url_at_k=_share(url_hits), support_threshold=SUPPORTED,
        source_support={name: _mean(values) for name, values in support.items()},
        supported_share={name: _share([v >= SUPPORTED for v in values if v is not None])
                          for name, values in support.items()},
        blocked_passages=blocked, heldout_corpus=heldout_corpus,
        reference_overlap=_mean([reference_overlap(ex, r.hits[:kept])
                                 for ex, r, kept in zip(examples, retrieved, in_prompt)]),
        own_reference_hits=sum(own_reference(h, ex) for ex, r in zip(examples, retrieved) for h in r.hits),
    )


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return fmean(present) if present else None
