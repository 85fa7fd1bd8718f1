"""Sources for answers: retrieve passages for a question, and list the ones an answer used.

``generate``, ``chat`` and ``serve`` retrieve when the model was trained with retrieval (its
run's index, or ``retrieval.index``) or when ``--index DIR`` names one (:func:`sources_for`).
For each question, :meth:`SourceFinder.find` returns the top ``k`` passages scoring at least
the threshold (distinct pages); they go into the prompt as numbered sources, as in training.
None above the threshold: the prompt carries no source, the model answers on its own, and the
answer is followed by :data:`NO_SOURCE`.

Which sources are listed after the answer (:meth:`SourceFinder.cited`) — a clinician should
see few, relevant sources and none the answer did not use:

- only passages that reached the prompt (above the threshold, at most ``k``, not dropped to fit
  the prompt budget);
- only those whose content overlaps the answer: at least :data:`MIN_SHARED` of the answer's
  content words that the question does not already contain (stemmed, stopwords out), or half
  of them for a short answer. A cheap lexical test: it sees what an answer took from a source,
  not whether it reasoned from it. When the answer uses none, :data:`UNUSED` says so.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from medassist.errors import MedassistError
from medassist.formatting import Passage

NO_SOURCE = ("No source found: nothing in the index is relevant enough to this question, so this answer is not "
             "grounded in a vetted source.")
UNUSED = "The answer does not draw on the sources found, so it is not grounded in a vetted source."
MIN_SHARED = 3


@dataclass(frozen=True)
class Source:
    """A source an answer used: its number in the prompt, title, page and relevance score."""

    id: int
    title: str
    url: str
    score: float | None = None

    def line(self) -> str:
        return f"[{self.id}] {self.title}" + (f" - {self.url}" if self.url else "")


@dataclass(frozen=True)
class Grounding:
    """What an answer is grounded in: the sources it used, and a note when there are none."""

    sources: tuple[Source, ...] = ()
    note: str | None = None

    def lines(self) -> list[str]:
        """For a terminal: ``Sources:`` and one line each, or the note."""
        return ["Sources:", *(s.line() for s in self.sources)] if self.sources else [self.note or NO_SOURCE]


def _content(text: str) -> set[str]:
    from medassist.evaluation.factual_facts import content_words

    return set(content_words(text))


class SourceFinder:
    """An opened index with the run's ``k`` and threshold; safe to share between threads."""

    def __init__(self, retriever, k: int = 3, min_score: float | None = None) -> None:
        self.retriever, self.k = retriever, k
        self.min_score = retriever.threshold if min_score is None else min_score
        self._lock = threading.Lock()  # query embeddings: one encoder, a shared cache

    @property
    def index_dir(self) -> Path:
        return self.retriever.index_dir

    def find(self, question: str) -> list[Passage]:
        """The top ``k`` passages (distinct pages) scoring at least the threshold; [] = no source."""
        with self._lock:
            hits = self.retriever.search(question, k=self.k, min_score=self.min_score)
        return [Passage(h.text, h.title, h.url, h.score) for h in hits]

    @staticmethod
    def cited(answer: str, question: str, passages: Sequence[Passage]) -> Grounding:
        """The passages (all in the prompt) whose content the answer shares; a note when none."""
        if not passages:
            return Grounding(note=NO_SOURCE)
        said = _content(answer) - _content(question)
        used = []
        for i, p in enumerate(passages, 1):
            shared = said & _content(f"{p.title} {p.text}")
            if said and (len(shared) >= MIN_SHARED or len(shared) >= len(said) / 2):
                used.append(Source(i, p.title, p.url, p.score))
        return Grounding(tuple(used), None if used else UNUSED)


def sources_for(loaded, index: str | None = None, enabled: bool | None = None) -> SourceFinder | None:
    """The source finder of a model: ``index`` (``--index``), else the index it was trained
    with (``retrieval.index``, or its run's ``retrieval/index``); None when the model was
    trained without retrieval and no index is given, or when ``enabled`` is False (``--no-index``)."""
    from medassist.config import RetrievalConfig
    from medassist.retrieval import Retriever

    if enabled is False:
        return None
    cfg = getattr(loaded, "config", None)
    rcfg = cfg.retrieval if cfg is not None else RetrievalConfig()
    if index is None:
        if not rcfg.enabled:
            return None
        if rcfg.index:
            index = rcfg.index
        else:
            from medassist.retrieval.augment import INDEX_DIR

            index = str(Path(getattr(loaded, "source", "") or ".") / INDEX_DIR)
            if not Path(index).is_dir():
                raise MedassistError(f"this model was trained with retrieval but its index is not at {index}: pass "
                                     "--index DIR (an index of the same corpus), or --no-index to answer without "
                                     "sources")
    return SourceFinder(Retriever.load(index), rcfg.k, rcfg.min_score)
