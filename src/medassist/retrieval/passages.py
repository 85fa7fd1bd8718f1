"""Passages: the unit that is indexed, searched and cited.

Why passages and not questions: nearest-*question* retrieval with MiniLM matched the question
template ("What are the treatments for ...") rather than the disease, so "treatments for ARDS"
found Eales disease. A passage is the entity name (the row's ``focus``, else its question)
followed by a piece of the *answer*, so a query is compared with what a source says about a
disease, and every passage carries the ``url`` it can be cited by.

Why chunks: the encoder reads at most 256 word pieces (all-MiniLM-L6-v2 truncates beyond that)
while MedQuAD answers have a median of ~270 and a 90th percentile of ~740 word pieces; text
past the limit would be invisible to search. Chunks are cut at sentence boundaries, hold at
most ``chunk_words`` words and never more than ``max_tokens`` word pieces *including* the title
and the [CLS]/[SEP] tokens, and repeat ``overlap`` whole sentences of the previous chunk so a
fact that spans a boundary is whole in one chunk.

Each passage keeps ``group`` = :func:`medassist.data.question_key` of its row's question, so a
caller that asks an indexed question can exclude that question's own answer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import pandas as pd

from medassist.data import normalize_answer, normalize_question, question_key, read_table
from medassist.errors import DataError

Progress = Callable[[str, int, int], None]  # (stage, done, total)
OPTIONAL_COLUMNS = ("focus", "url", "source", "qtype")
MAX_TITLE_TOKENS = 48  # a question used as a title must leave room for the answer text


@dataclass(frozen=True)
class SourceRow:
    """One usable row of a QA table; ``row`` is its 1-based data row in the file."""

    row: int
    question: str
    answer: str
    focus: str = ""
    url: str = ""
    source: str = ""
    qtype: str = ""

    @property
    def group(self) -> str:
        return question_key(self.question)

    @property
    def title(self) -> str:
        return self.focus or self.question


@dataclass(frozen=True)
class Passage:
    """A chunk of one row's answer; ``text`` excludes the title, :meth:`embed_text` includes it."""

    id: int
    row: int
    chunk: int
    group: str
    title: str
    url: str
    source: str
    qtype: str
    question: str
    text: str

    def embed_text(self) -> str:
        return f"{self.title}: {self.text}"


def focus_key(text: str) -> str:
    """Case-, punctuation- and possessive-insensitive entity name ("Crohn's Disease" == "crohn disease")."""
    text = re.sub(r"(?<=\w)['\u2019]s\b", "", text.casefold())
    return " ".join(re.sub(r"[^\w]+", " ", text).split())


def _cell(record: dict, column: str) -> str:
    value = record.get(column)
    return value.strip() if isinstance(value, str) else ("" if value is None or value != value else str(value))


def rows_from_frame(frame: pd.DataFrame, name: str = "table") -> tuple[list[SourceRow], dict[str, int]]:
    """Normalise a QA frame into rows; empty questions/answers are dropped and counted."""
    for column in ("question", "answer"):
        if column not in frame.columns:
            raise DataError(f"{name}: missing column '{column}' (columns are: {', '.join(map(str, frame.columns))})")
    dropped = {"empty_question": 0, "empty_answer": 0}
    rows: list[SourceRow] = []
    for index, record in enumerate(frame.to_dict("records")):
        question = normalize_question(_cell(record, "question"))
        answer = normalize_answer(_cell(record, "answer"))
        if not question:
            dropped["empty_question"] += 1
            continue
        if not answer:
            dropped["empty_answer"] += 1
            continue
        extra = {c: normalize_question(_cell(record, c)) for c in OPTIONAL_COLUMNS}
        rows.append(SourceRow(row=index + 1, question=question, answer=answer, **extra))
    return rows, dropped


def read_rows(path: str | Path) -> tuple[list[SourceRow], dict[str, int]]:
    """Read a QA file (CSV/TSV/JSONL/JSON/Parquet) with columns question, answer [, focus, url, source, qtype]."""
    frame = read_table(path, ["question", "answer"])
    rows, dropped = rows_from_frame(frame, str(path))
    if not rows:
        raise DataError(f"{path}: no usable rows (dropped: {dropped})")
    return rows, dropped


def holdout_split(rows: Sequence[SourceRow], fraction: float, seed: int) -> tuple[list[SourceRow], list[SourceRow]]:
    """(index rows, held-out rows): whole question groups held out, seeded (medassist.data.group_split)."""
    from medassist.data import QAExample, group_split

    examples = [QAExample(question=r.question, answer=r.answer, row=i) for i, r in enumerate(rows)]
    held = {ex.row for ex in group_split(examples, 0.0, fraction, seed)["test"]}
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")


def split_sentences(text: str) -> list[tuple[int, str]]:
    """(paragraph index, sentence) pairs: lines (lists, paragraphs) first, then sentence ends."""
    out: list[tuple[int, str]] = []
    for para, line in enumerate(l for l in text.split("\n") if l.strip()):
        out.extend((para, s.strip()) for s in _SENTENCE_END.split(line.strip()) if s.strip())
    return out


class Chunker:
    """Packs sentences into chunks that fit the encoder; counts word pieces with its tokenizer."""

    def __init__(self, tokenizer, max_tokens: int = 256, chunk_words: int = 120, overlap: int = 1):
        if max_tokens < 32:
            raise DataError(f"max_tokens must be at least 32 (got {max_tokens})")
        if chunk_words < 8:
            raise DataError(f"chunk_words must be at least 8 (got {chunk_words})")
        if overlap < 0:
            raise DataError(f"overlap must be >= 0 (got {overlap})")
        self.tokenizer = tokenizer
        self.max_tokens, self.chunk_words, self.overlap = max_tokens, chunk_words, overlap

    def count(self, texts: list[str]) -> list[int]:
        if not texts:
            return []
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]]

    def fit_title(self, title: str) -> tuple[str, int]:
        """The title (cut to MAX_TITLE_TOKENS word pieces by whole words) and its cost with ': '."""
        words = title.split()
        while True:
            cost = self.count([title + ":"])[0]
            if cost <= MAX_TITLE_TOKENS or len(words) <= 1:
                return title, cost
            words = words[: max(1, int(len(words) * 0.8))]
            title = " ".join(words)

    def _units(self, text: str, budget: int) -> list[tuple[int, str, int, int]]:
        """(paragraph, text, tokens, words) units; a sentence over budget/chunk_words is cut by words."""
        sentences = split_sentences(text)
        counts = self.count([s for _, s in sentences])
        units = []
        for (para, sentence), n in zip(sentences, counts):
            words = sentence.split()
            if n <= budget and len(words) <= self.chunk_words:
                units.append((para, sentence, n, len(words)))
                continue
            # Split an over-long sentence into word windows; cut absurdly long "words" (URLs) by chars.
            pieces = [w[i : i + 40] for w in words for i in range(0, len(w), 40)]
            piece_counts = self.count(pieces)
            current, tokens = [], 0
            for piece, c in zip(pieces, piece_counts):
                if current and (tokens + c > budget or len(current) >= self.chunk_words):
                    units.append((para, " ".join(current), tokens, len(current)))
                    current, tokens = [], 0
                current.append(piece)
                tokens += c
            if current:
                units.append((para, " ".join(current), tokens, len(current)))
        return units

    def chunks(self, title: str, text: str) -> tuple[str, list[str]]:
        """The (possibly shortened) title and the chunk texts of one answer."""
        title, title_cost = self.fit_title(title)
        budget = self.max_tokens - 2 - title_cost  # [CLS] and [SEP]
        units = self._units(text, budget)
        out: list[str] = []
        start = 0
        while start < len(units):
            end, tokens, words = start, 0, 0
            while end < len(units) and (
                end == start or (tokens + units[end][2] <= budget and words + units[end][3] <= self.chunk_words)
            ):
                tokens += units[end][2]
                words += units[end][3]
                end += 1
            out.append(_join(units[start:end]))
            if end >= len(units):
                break
            back = 0
            while back < self.overlap and end - back - 1 > start and units[end - back - 1][2] <= budget // 2:
                back += 1
            start = end - back
        return title, out


def _join(units: list[tuple[int, str, int, int]]) -> str:
    parts: list[str] = []
    for i, (para, sentence, _, _) in enumerate(units):
        if i:
            parts.append("\n" if para != units[i - 1][0] else " ")
        parts.append(sentence)
    return "".join(parts)


def build_passages(rows: Iterable[SourceRow], chunker: Chunker, progress: Progress | None = None) -> list[Passage]:
    """Every row's answer as chunks, in row order; ids are consecutive from 0."""
    rows = list(rows)
    passages: list[Passage] = []
    for i, row in enumerate(rows):
        title, chunks = chunker.chunks(row.title, row.answer)
        for c, chunk in enumerate(chunks):
            passages.append(Passage(
                id=len(passages), row=row.row, chunk=c, group=row.group, title=title, url=row.url,
                source=row.source, qtype=row.qtype, question=row.question, text=chunk,
            ))
        if progress and (i % 500 == 0 or i == len(rows) - 1):
            progress("chunk", i + 1, len(rows))
    return passages
