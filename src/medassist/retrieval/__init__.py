"""Retrieval over a vetted QA corpus: passages, an embedding (+BM25) index, search, evaluation.

Typical use::

    from medassist.retrieval import build_index, Retriever
    build_index("medquad.csv", "index/")            # skips if already built with the same settings
    r = Retriever.load("index/")
    hits = r.search("What are the treatments for ARDS?", k=3, min_score=r.threshold)
    if not hits: ...                                  # "no source found"

What is indexed, the measured comparison of variants and the chosen default:
docs/retrieval.md.
"""

from medassist.retrieval.evaluate import evaluate_retrieval, format_report, rewrite_question
from medassist.retrieval.index import BuildResult, IndexSettings, build_index, read_manifest
from medassist.retrieval.passages import Chunker, Passage, SourceRow, build_passages, holdout_split, read_rows
from medassist.retrieval.search import DEFAULT_VARIANT, THRESHOLDS, VARIANTS, Hit, Retriever, nearest_answers

__all__ = [
    "BuildResult", "Chunker", "DEFAULT_VARIANT", "Hit", "IndexSettings", "Passage", "Retriever", "SourceRow",
    "THRESHOLDS", "VARIANTS", "build_index", "build_passages", "evaluate_retrieval", "format_report",
    "holdout_split", "nearest_answers", "read_manifest", "read_rows", "rewrite_question",
]
