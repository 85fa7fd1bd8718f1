"""Offline factual-consistency scoring: is what an answer states supported by the reference?

BERTScore rewards an answer that *sounds* like the reference, so a fluent answer on the right
disease with the wrong gene, inheritance pattern or number scores almost as high as a faithful
one. This module checks facts instead. It pulls *checkable facts* out of both texts, each in a
category where two different values are a real conflict:

- ``gene``: gene-like symbols (``SERPINA1``, ``FBN1``, ``CFTR gene``); other acronyms are
  supported when they are spelled out in the reference (``CML`` <- chronic myelogenous leukemia);
- ``inheritance``: autosomal dominant/recessive/codominant, X-linked (dominant/recessive),
  mitochondrial (maternal), paternal;
- ``number``: every value of numbers, ranges, "1 in 2,500", percentages, "one-third", "thirties";
  a number also remembers the sex/age group right after it and the inheritance pattern before
  it in its sentence, so swapping "1 in 4,000 males / 1 in 8,000 females" is a conflict;
- ``anatomy``: organs, body systems and cell types, with synonyms (cardiac -> heart);
- ``group``: males, females, children, adults, infants;
- ``drug``: drug names by pharmacological stem (-mab, -nib, -pril, -olol, -statin...) and drug
  classes; ``entity``: disease words by suffix (-itis, -oma, -emia...) and capitalised names;
- content words, weighted by idf from MedQuAD's answers (``resources/idf.json.gz``).

An answer fact is *supported* when the reference states it, *contradicted* when it is
unsupported and the reference states a different value of the same conflicting category
(gene, inheritance, number, anatomy, group, drug). Facts the answer shares with the question
(the disease name, a gene named in the question) are neither evidence nor invention and are left
out. The per-example score is ``factual_consistency = support * 0.5 ** contradictions`` where
``support`` mixes the idf-weighted share of supported facts (60%) and content words (40%).
An answer with no checkable fact falls back to its content words, discounted by
``no_fact_factor`` (0.6): a generic answer ("this condition is caused by a genetic change")
states nothing one can check, so it must not look as safe as a grounded one. An empty answer
scores 0. Lexical matching cannot see paraphrased *relations* ("the mutation comes from the
father" with every word in the reference); plug an NLI model (:mod:`medassist.evaluation.factual_nli`)
for that.
"""

from __future__ import annotations

import gzip
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

from medassist.evaluation.factual_facts import WEIGHTS, Fact, content_words, extract_facts, fact_status

IDF_PATH = Path(__file__).parent.parent / "resources" / "idf.json.gz"


@dataclass
class FactualScore:
    """Per-answer result. ``support`` is precision-like, ``coverage`` recall-like, both idf-weighted."""
    factual_consistency: float
    support: float
    coverage: float
    contradictions: int
    unsupported: list[str] = field(default_factory=list)
    supported: list[str] = field(default_factory=list)
    contradicted: list[str] = field(default_factory=list)
    n_facts: int = 0
    fact_support: float | None = None
    content_support: float = 0.0


def build_idf(texts: Iterable[str], min_df: int = 2) -> dict:
    """Document frequencies of stemmed content words; what ``resources/idf.json.gz`` holds."""
    df: Counter = Counter()
    n = 0
    for text in texts:
        n += 1
        df.update(set(content_words(text)))
    return {"n_docs": n, "df": {w: c for w, c in sorted(df.items()) if c >= min_df}}


def write_idf(table: dict, path: Path = IDF_PATH) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        json.dump(table, f, separators=(",", ":"))


@lru_cache(maxsize=4)
def load_idf(path: str = str(IDF_PATH)) -> tuple[int, dict]:
    """(n_docs, df). Without the table every word weighs the same (n_docs=1)."""
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            table = json.load(f)
        return table["n_docs"], table["df"]
    except FileNotFoundError:
        return 1, {}


class FactualScorer:
    """The offline default: fact extraction + idf-weighted lexical support (no model)."""

    name = "offline"

    def __init__(self, idf_path: str | Path = IDF_PATH, fact_share: float = 0.6, no_fact_factor: float = 0.6,
                 contradiction_penalty: float = 0.5):
        self.n_docs, self.df = load_idf(str(idf_path))
        self.fact_share, self.no_fact_factor, self.penalty = fact_share, no_fact_factor, contradiction_penalty

    def idf(self, stemmed: str) -> float:
        return math.log((self.n_docs + 1) / (self.df.get(stemmed, 1) + 1)) + 1.0

    def score(self, answers: Sequence[str], references: Sequence[str],
              questions: Sequence[str] | None = None) -> list[FactualScore]:
        if len(answers) != len(references) or (questions is not None and len(questions) != len(answers)):
            raise ValueError("answers, references (and questions) must have the same length")
        questions = questions if questions is not None else [""] * len(answers)
        return [self.score_one(a or "", r or "", q or "") for a, r, q in zip(answers, references, questions)]

    def score_one(self, answer: str, reference: str, question: str = "") -> FactualScore:
        if not answer.strip():
            return FactualScore(0.0, 0.0, 0.0, 0)
        ref_facts, ans_facts = extract_facts(reference), extract_facts(answer)
        q_keys = {(f.category, f.key) for f in extract_facts(question)}
        q_stems = set(content_words(question))
        ref_stems = set(content_words(reference))
        supported, unsupported, contradicted = [], [], []
        w_sup = w_all = 0.0
        seen = set()
        for fact in ans_facts:
            ident = (fact.category, fact.key, fact.qualifiers)
            if ident in seen or (fact.category, fact.key) in q_keys or (fact.category == "entity" and fact.key in q_stems):
                continue
            seen.add(ident)
            status = fact_status(fact, ref_facts, reference, ref_stems)
            w = WEIGHTS.get(fact.category, 1.5)
            w_all += w
            label = f"{fact.category}:{fact.text}"
            if status == "supported":
                w_sup += w
                supported.append(label)
            else:
                (contradicted if status == "contradicted" else unsupported).append(label)
        # content words: idf-weighted share of the answer's words (not the question's) that the reference uses
        c_sup = c_all = 0.0
        for w in set(content_words(answer)) - q_stems:
            weight = self.idf(w)
            c_all += weight
            if w in ref_stems:
                c_sup += weight
        content_support = c_sup / c_all if c_all else 0.0
        if w_all:
            fact_support = w_sup / w_all
            support = self.fact_share * fact_support + (1 - self.fact_share) * content_support
        else:
            fact_support = None
            support = self.no_fact_factor * content_support
        n_contra = len(contradicted)
        consistency = support * self.penalty ** n_contra
        coverage = self._coverage(ref_facts, reference, answer, q_keys, q_stems)
        return FactualScore(round(consistency, 4), round(support, 4), round(coverage, 4), n_contra,
                            unsupported=unsupported + contradicted, supported=supported, contradicted=contradicted,
                            n_facts=len(seen), fact_support=fact_support,
                            content_support=round(content_support, 4))

    def _coverage(self, ref_facts: list[Fact], reference: str, answer: str, q_keys: set, q_stems: set) -> float:
        """Recall-like: weighted share of the reference's facts and content words the answer states."""
        ans_facts = extract_facts(answer)
        ans_stems = set(content_words(answer))
        got = total = 0.0
        for f in {(f.category, f.key): f for f in ref_facts}.values():
            if (f.category, f.key) in q_keys:
                continue
            w = WEIGHTS.get(f.category, 1.5)
            total += w
            if fact_status(f, ans_facts, answer, ans_stems) == "supported":
                got += w
        for w in set(content_words(reference)) - q_stems:
            total += self.idf(w) * (1 - self.fact_share)
            got += self.idf(w) * (1 - self.fact_share) if w in ans_stems else 0.0
        return got / total if total else 0.0


def get_factual_scorer(name: str = "offline", **kwargs):
    """``offline`` (default, no model) or an MNLI-style classifier: hub id or local folder."""
    if name in ("", "offline", "lexical", "default", None):
        return FactualScorer(**kwargs)
    from medassist.evaluation.factual_nli import NLIScorer
    return NLIScorer(name, **kwargs)
