"""Search an index: several retrieval variants, one interface, measured against each other.

Variants (``Retriever.search(..., variant=...)``); each scores *every* passage exactly:

- ``question``: cosine of the query with the indexed *questions*; a row's passages inherit its
  question's score. The approach that matched templates instead of diseases; kept as a baseline.
- ``dense``: cosine of the query with the passage ("title: chunk") embeddings.
- ``bm25``: BM25 (bm25s, Lucene variant) over "title: chunk"; scores are unbounded.
- ``hybrid``: reciprocal rank fusion (k=60) of the top 100 of ``dense`` and ``bm25``.
- ``entity`` (default): ``(1 - w) * dense + w * title score`` with ``w`` = 0.7. The title score is
  the cosine of the query's entity (:func:`extract_entity`) with each title, raised to 1.0 for a
  title or source-defined alias found verbatim in the query (:class:`TitleMatcher`; not when a
  template shows the entity is longer, "Spinocerebellar ataxia 40" vs "Ataxia"). The disease
  decides the ranking across pages, the dense part picks the passage within a page, and the
  score stays cosine-like, so one threshold separates "no source".

Hits are deduplicated by url (a page is cited once, by its best passage), passages of
``exclude_groups`` (question keys) and :meth:`Retriever.block`-ed passages are never returned,
and hits scoring below ``min_score`` are dropped, so an empty list means "no source found".
The default variant, its weight and the thresholds (:data:`DEFAULT_VARIANT`,
:data:`ENTITY_WEIGHT`, :data:`THRESHOLDS`) were chosen on a development half of MedQuAD's
held-out questions and checked on the other half: docs/retrieval.md.
(Other variants' thresholds are their best "no source" F1 there; entity's 0.80 sits at the low
end of its F1 plateau, 0.80-0.86, because hand-written questions score lower than templated ones.)
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd

from medassist.data import question_key
from medassist.errors import MedassistError
from medassist.retrieval.entity import TitleMatcher, extract_entity, find_aliases, template_entity
from medassist.retrieval.index import bm25_tokens, read_manifest
from medassist.retrieval.passages import focus_key

Progress = Callable[[str, int, int], None]
VARIANTS = ("question", "dense", "bm25", "hybrid", "entity")
DEFAULT_VARIANT = "entity"
ENTITY_WEIGHT = 0.7
# Scores below which no passage is returned ("no source found"), per variant; see docs/retrieval.md.
THRESHOLDS: dict[str, float] = {"question": 0.75, "dense": 0.66, "bm25": 7.0, "hybrid": 0.03, "entity": 0.80}
RRF_K, RRF_DEPTH = 60, 100


@dataclass(frozen=True)
class Hit:
    """One retrieved passage. ``text`` is the chunk (the full answer in :func:`nearest_answers`)."""

    text: str
    title: str
    url: str
    score: float
    group: str
    row: int
    passage_id: int
    source: str = ""
    question: str = ""
    focus: str = ""


class Retriever:
    """An opened index; :meth:`load` it once and call :meth:`search` many times."""

    def __init__(self, index_dir: Path, manifest: dict, passages: pd.DataFrame, passage_vectors: np.ndarray,
                 title_vectors: np.ndarray, question_vectors: np.ndarray, titles: list[str], bm25=None,
                 encoder=None, entity_weight: float = ENTITY_WEIGHT):
        self.index_dir, self.manifest, self.passages = index_dir, manifest, passages
        self.P, self.T, self.Q = passage_vectors, title_vectors, question_vectors
        self.titles, self.bm25, self._encoder = titles, bm25, encoder
        self.entity_weight = entity_weight
        self.strict_templates = True
        # passages never returned by any search (held-out rows of an evaluation: block())
        self.blocked: np.ndarray | None = None
        self.title_ids = passages["title_id"].to_numpy()
        codes, uniques = pd.factorize(passages["group"])
        self.group_codes = codes
        self.group_index = {g: i for i, g in enumerate(uniques)}
        # question_vectors hold one vector per row, in passage order; a row's chunks follow its chunk 0
        self.row_slot = np.cumsum(passages["chunk"].to_numpy() == 0) - 1
        self.chunk_penalty = passages["chunk"].to_numpy().astype(np.float32) * 1e-4
        first = passages["chunk"].to_numpy() <= 1  # definitions ("Title (ALIAS) is ...") come early
        self.aliases = find_aliases(titles, self.title_ids[first].tolist(), passages["text"][first].tolist())
        self.matcher = TitleMatcher(titles, self.aliases)
        self._columns = {c: passages[c].tolist() for c in
                         ("text", "title", "url", "group", "row", "source", "question", "focus")}
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, index_dir: str | Path, encoder=None, entity_weight: float = ENTITY_WEIGHT) -> "Retriever":
        """Open an index directory; a missing or partial one is a MedassistError naming the problem."""
        index_dir = Path(index_dir)
        manifest = read_manifest(index_dir)
        try:
            passages = pd.read_parquet(index_dir / "passages.parquet")
            vectors = [np.load(index_dir / f"{n}_vectors.npy").astype(np.float32) for n in ("passage", "title", "question")]
            titles = json.loads((index_dir / "titles.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise MedassistError(f"{index_dir}: unreadable index ({str(exc).splitlines()[0]}); rebuild it") from None
        if len(vectors[0]) != len(passages) or len(vectors[1]) != len(titles):
            raise MedassistError(f"{index_dir}: index files disagree in length; rebuild it")
        bm25 = None
        if manifest.get("bm25", {}).get("enabled"):
            import bm25s

            bm25 = bm25s.BM25.load(index_dir / "bm25", show_progress=False)
        return cls(index_dir, manifest, passages, *vectors, titles, bm25, encoder, entity_weight)

    @property
    def encoder(self):
        if self._encoder is None:
            from medassist.retrieval.encoder import Encoder

            info = self.manifest["encoder"]
            self._encoder = Encoder(info["name"], info.get("max_tokens", 256), bf16=info.get("bf16"))
        return self._encoder

    @property
    def threshold(self) -> float:
        """The measured "no source" threshold of the default variant (pass it as ``min_score``)."""
        return THRESHOLDS[DEFAULT_VARIANT]

    def __len__(self) -> int:
        return len(self.passages)

    # ------------------------------------------------------------------ scoring
    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Query embeddings, cached (evaluation scores the same queries under every variant)."""
        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if missing:
            for text, vector in zip(missing, self.encoder.encode(list(missing))):
                self._cache[text] = vector
            while len(self._cache) > 20000:
                self._cache.popitem(last=False)
        return np.stack([self._cache[t] for t in texts]) if texts else np.zeros((0, self.P.shape[1]), np.float32)

    def scores(self, queries: Sequence[str], variant: str = DEFAULT_VARIANT) -> np.ndarray:
        """[len(queries), passages] scores of one variant (higher is better)."""
        if variant not in VARIANTS:
            raise MedassistError(f"unknown retrieval variant '{variant}' (choose from {', '.join(VARIANTS)})")
        queries = list(queries)
        if variant == "bm25":
            return self._bm25(queries)
        if variant == "question":
            return (self.embed(queries) @ self.Q.T)[:, self.row_slot] - self.chunk_penalty
        dense = self.embed(queries) @ self.P.T
        if variant == "dense":
            return dense
        if variant == "hybrid":
            return _rrf([(dense, -np.inf), (self._bm25(queries), 0.0)])
        return (1 - self.entity_weight) * dense + self.entity_weight * self.title_scores(queries)[:, self.title_ids]

    def title_scores(self, queries: Sequence[str]) -> np.ndarray:
        """[queries, titles]: the cosine of the query's entity with each title, raised to 1.0 for a
        title found verbatim in the query, unless a template says the entity is longer than that
        title ("Spinocerebellar ataxia 40" must not count as an exact "Ataxia")."""
        sims = self.embed([extract_entity(q) for q in queries]) @ self.T.T
        for i, q in enumerate(queries):
            entity = template_entity(q) if self.strict_templates else None
            whole = tuple(focus_key(entity).split()) if entity else None
            for words, ids in self.matcher.match_spans(q):
                if whole is None or words == whole:
                    sims[i, ids] = 1.0
        return sims

    def _bm25(self, queries: Sequence[str]) -> np.ndarray:
        if self.bm25 is None:
            raise MedassistError(f"{self.index_dir}: built without BM25 (rebuild with --bm25)")
        out = np.zeros((len(queries), len(self)), dtype=np.float32)
        vocab = self.bm25.vocab_dict
        for i, q in enumerate(queries):
            tokens = [t for t in bm25_tokens(q) if t in vocab]
            if tokens:
                out[i] = self.bm25.get_scores(tokens)
        return out

    # ------------------------------------------------------------------ search
    def block(self, mask: np.ndarray | None) -> int:
        """Never return the passages where ``mask`` is True (None lifts the block); returns how many."""
        self.blocked = None if mask is None or not mask.any() else np.asarray(mask, dtype=bool)
        return 0 if self.blocked is None else int(self.blocked.sum())

    def exclusion_mask(self, groups: Iterable[str]) -> np.ndarray | None:
        codes = [self.group_index[k] for k in {question_key(g) for g in groups} if k in self.group_index]
        return np.isin(self.group_codes, codes) if codes else None

    def search(self, query: str, k: int = 5, exclude_groups: Iterable[str] = (), min_score: float | None = None,
               variant: str = DEFAULT_VARIANT, dedupe_urls: bool = True) -> list[Hit]:
        """The ``k`` best passages for ``query``, best first; [] when none reaches ``min_score``."""
        return self.search_many([query], k, [exclude_groups], min_score, variant, dedupe_urls)[0]

    def search_many(self, queries: Sequence[str], k: int = 5, exclude_groups: Sequence[Iterable[str]] | None = None,
                    min_score: float | None = None, variant: str = DEFAULT_VARIANT, dedupe_urls: bool = True,
                    batch_size: int = 128, progress: Progress | None = None) -> list[list[Hit]]:
        """:meth:`search` for many queries at once (batched matrix products)."""
        queries = list(queries)
        exclude_groups = list(exclude_groups) if exclude_groups is not None else [()] * len(queries)
        if len(exclude_groups) != len(queries):
            raise ValueError("exclude_groups needs one entry per query")
        if variant != "bm25":
            self.embed(queries)  # one batched encoding for all queries
        out: list[list[Hit]] = []
        for start in range(0, len(queries), batch_size):
            batch = queries[start : start + batch_size]
            matrix = self.scores(batch, variant)
            for i, row in enumerate(matrix):
                out.append(self.top(row, k, exclude_groups[start + i], min_score, dedupe_urls))
            if progress:
                progress(f"search {variant}", min(start + batch_size, len(queries)), len(queries))
        return out

    def top(self, scores: np.ndarray, k: int, exclude_groups: Iterable[str] = (), min_score: float | None = None,
            dedupe_urls: bool = True) -> list[Hit]:
        """Hits from one row of :meth:`scores`: exclusion, threshold, url de-duplication, top k."""
        scores = scores.astype(np.float32, copy=True)
        mask = self.exclusion_mask(exclude_groups)
        if mask is not None:
            scores[mask] = -np.inf
        if self.blocked is not None:
            scores[self.blocked] = -np.inf
        if min_score is not None:
            scores[scores < min_score] = -np.inf
        hits: list[Hit] = []
        seen: set[str] = set()
        depth = min(len(scores), max(64, 16 * k))
        while True:
            order = _top_indices(scores, depth)
            for i in order:
                if len(hits) >= k or not np.isfinite(scores[i]):
                    break
                key = self._columns["url"][i] or f"row:{self._columns['row'][i]}"
                if dedupe_urls and key in seen:
                    continue
                seen.add(key)
                hits.append(self.hit(int(i), float(scores[i])))
            exhausted = depth >= len(scores) or (len(order) and not np.isfinite(scores[order[-1]]))
            if len(hits) >= k or exhausted:
                return hits
            hits, seen, depth = [], set(), min(len(scores), depth * 8)

    def hit(self, i: int, score: float) -> Hit:
        c = self._columns
        return Hit(text=c["text"][i], title=c["title"][i], url=c["url"][i], score=score, group=c["group"][i],
                   row=int(c["row"][i]), passage_id=i, source=c["source"][i], question=c["question"][i],
                   focus=c["focus"][i])

    def row_text(self, row: int) -> str:
        """A row's answer, re-assembled from its chunks (overlapping sentences appear once)."""
        chunks = self.passages.loc[self.passages["row"] == row, "text"].tolist()
        text = chunks[0] if chunks else ""
        for chunk in chunks[1:]:
            overlap = _longest_overlap(text, chunk)
            text += ("" if overlap else " ") + chunk[overlap:]
        return text


def nearest_answers(index: Retriever | str | Path, questions: Sequence[str],
                    exclude_groups_per_question: Sequence[Iterable[str]] | None = None,
                    variant: str = DEFAULT_VARIANT, min_score: float | None = None) -> list[Hit | None]:
    """Retrieval baseline: each question's best hit with ``text`` = that row's whole answer, or None.

    Pass each question's own group (its question text works: keys are normalised) in
    ``exclude_groups_per_question`` so a question is never answered with its own answer.
    """
    retriever = index if isinstance(index, Retriever) else Retriever.load(index)
    results = retriever.search_many(questions, 1, exclude_groups_per_question, min_score, variant)
    return [replace(h[0], text=retriever.row_text(h[0].row)) if h else None for h in results]


def _top_indices(scores: np.ndarray, depth: int) -> np.ndarray:
    if depth >= len(scores):
        return np.argsort(-scores, kind="stable")
    part = np.argpartition(-scores, depth - 1)[:depth]
    return part[np.argsort(-scores[part], kind="stable")]


def _rrf(rankings: list[tuple[np.ndarray, float]]) -> np.ndarray:
    """Reciprocal rank fusion of each matrix's top RRF_DEPTH; scores <= its floor do not count
    (a BM25 score of 0 means no shared word, not a rank)."""
    out = np.zeros_like(rankings[0][0])
    depth = min(RRF_DEPTH, out.shape[1])
    rows = np.arange(out.shape[0])[:, None]
    for m, floor in rankings:
        top = np.argpartition(-m, depth - 1, axis=1)[:, :depth]
        ranks = np.argsort(np.argsort(-m[rows, top], axis=1, kind="stable"), axis=1)
        valid = m[rows, top] > floor
        out[rows, top] += np.where(valid, 1.0 / (RRF_K + 1 + ranks), 0.0)
    return out


def _longest_overlap(text: str, chunk: str) -> int:
    """Length of the longest prefix of ``chunk`` that ``text`` ends with (the repeated sentences)."""
    for n in range(min(len(text), len(chunk)), 0, -1):
        if text.endswith(chunk[:n]) and (n == len(chunk) or chunk[n] in " \n"):
            return n
    return 0
