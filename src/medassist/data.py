"""Data: read a question/answer table, clean it, and split it by group.

Every row that is dropped is counted by reason, and the counts travel in a manifest that the
run directory keeps (``data_manifest.json``). Splits are made *by group*: all rows whose
normalised question is the same (and, optionally, whose ``group_column`` value is the same)
land in one split, so a test question was never seen in training under another row.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

import pandas as pd

from medassist.config import DataConfig
from medassist.errors import DataError

SPLITS = ("train", "validation", "test")
_READERS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}


@dataclass
class QAExample:
    """One cleaned question/answer pair; ``row`` is its 1-based data row in the source file."""

    question: str
    answer: str
    row: int
    group: str | None = None


@dataclass
class DataManifest:
    """What was read, what was dropped (by reason) and how many rows each split got."""

    source: str
    sha256: str
    rows_read: int
    dropped: dict[str, int] = field(default_factory=dict)
    rows_kept: int = 0
    groups: int = 0
    rows_per_split: dict[str, int] = field(default_factory=dict)
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PreparedData:
    splits: dict[str, list[QAExample]]
    manifest: DataManifest


def normalize_question(text: str) -> str:
    """Collapse every run of whitespace to one space and strip the ends."""
    return re.sub(r"\s+", " ", text).strip()


def normalize_answer(text: str) -> str:
    """Strip the ends, collapse spaces/tabs inside lines, keep at most one blank line."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub(r"[ \t\f\v]+", " ", text)
    text = re.sub(r" *\n *", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def question_key(text: str) -> str:
    """The grouping key: case-folded, whitespace-collapsed, trailing punctuation removed."""
    return re.sub(r"[\s?.!]+$", "", normalize_question(text).casefold())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_table(path: str | Path, columns: Iterable[str]) -> pd.DataFrame:
    """Read CSV/TSV/JSONL/JSON/Parquet as strings; one DataError line per problem."""
    path = Path(path)
    kind = _READERS.get(path.suffix.lower())
    if kind is None:
        raise DataError(
            f"{path}: unknown file extension '{path.suffix}' (use .csv, .tsv, .jsonl, .json or .parquet)"
        )
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")
    try:
        if kind in ("csv", "tsv"):
            frame = pd.read_csv(
                path, sep="," if kind == "csv" else "\t", dtype=str, keep_default_na=False,
                encoding="utf-8",
            )
        elif kind == "jsonl":
            frame = pd.read_json(path, lines=True, dtype=False, encoding="utf-8")
        elif kind == "json":
            frame = pd.read_json(path, dtype=False, encoding="utf-8")
        else:
            frame = pd.read_parquet(path)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except (ValueError, pd.errors.ParserError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{path}: cannot parse as {kind}: {first}") from None
    if frame.empty:
        raise DataError(f"{path}: no data rows")
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(
            f"{path}: missing column '{missing[0]}' (columns are: {', '.join(map(str, frame.columns))})"
        )
    return frame


def clean_rows(
    frame: pd.DataFrame, question_column: str, answer_column: str, group_column: str | None = None
) -> tuple[list[QAExample], dict[str, int]]:
    """Normalise whitespace, drop empty rows and exact duplicate pairs; count each drop."""
    dropped = {"empty_question": 0, "empty_answer": 0, "duplicate_pair": 0}
    seen: set[tuple[str, str]] = set()
    kept: list[QAExample] = []
    for index, record in enumerate(frame.to_dict("records")):
        raw_q, raw_a = record.get(question_column), record.get(answer_column)
        question = normalize_question(raw_q) if isinstance(raw_q, str) else ""
        answer = normalize_answer(raw_a) if isinstance(raw_a, str) else ""
        if not question:
            dropped["empty_question"] += 1
            continue
        if not answer:
            dropped["empty_answer"] += 1
            continue
        pair = (question_key(question), answer)
        if pair in seen:
            dropped["duplicate_pair"] += 1
            continue
        seen.add(pair)
        group = None
        if group_column is not None:
            value = record.get(group_column)
            group = normalize_question(str(value)).casefold() if value not in (None, "") else None
        kept.append(QAExample(question=question, answer=answer, row=index + 1, group=group))
    return kept, dropped


def _group_ids(examples: list[QAExample]) -> list[int]:
    """Connected components over 'same normalised question' and 'same group value'."""
    parent = list(range(len(examples)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_by_key: dict[tuple[str, str], int] = {}
    for i, ex in enumerate(examples):
        keys = [("q", question_key(ex.question))]
        if ex.group:
            keys.append(("g", ex.group))
        for key in keys:
            j = first_by_key.setdefault(key, i)
            if j != i:
                parent[find(i)] = find(j)
    return [find(i) for i in range(len(examples))]


def group_split(
    examples: list[QAExample],
    validation_fraction: float = 0.05,
    test_fraction: float = 0.05,
    seed: int = 42,
) -> dict[str, list[QAExample]]:
    """Split whole groups into train/validation/test, seeded and deterministic.

    Groups are shuffled with ``seed`` and handed to test, then validation, until each holds
    its share of rows; the rest is train. With at least three groups and non-zero fractions,
    validation and test each get at least one group.
    """
    ids = _group_ids(examples)
    members: dict[int, list[int]] = {}
    for i, gid in enumerate(ids):
        members.setdefault(gid, []).append(i)
    order = sorted(members, key=lambda g: members[g][0])
    random.Random(seed).shuffle(order)
    n = len(examples)
    targets = {"test": test_fraction * n, "validation": validation_fraction * n}
    assigned: dict[str, list[int]] = {s: [] for s in SPLITS}
    cursor = 0
    for split in ("test", "validation"):
        while cursor < len(order) - 1 and len(assigned[split]) < targets[split]:
            size = len(members[order[cursor]])
            overshoot = len(assigned[split]) + size - targets[split]
            if assigned[split] and overshoot > targets[split] - len(assigned[split]):
                break  # closer to the target without this group
            assigned[split].extend(members[order[cursor]])
            cursor += 1
    for gid in order[cursor:]:
        assigned["train"].extend(members[gid])
    return {s: [examples[i] for i in sorted(assigned[s])] for s in SPLITS}


def prepare_data(cfg: DataConfig, seed: int) -> PreparedData:
    """Read, clean and split the configured file; the manifest records every count."""
    columns = [cfg.question_column, cfg.answer_column] + ([cfg.group_column] if cfg.group_column else [])
    frame = read_table(cfg.path, columns)
    examples, dropped = clean_rows(frame, cfg.question_column, cfg.answer_column, cfg.group_column)
    if cfg.limit is not None and len(examples) > cfg.limit:
        dropped["over_limit"] = len(examples) - cfg.limit
        examples = examples[: cfg.limit]
    if not examples:
        raise DataError(f"{cfg.path}: no usable rows (dropped: {dropped})")
    splits = group_split(examples, cfg.validation_fraction, cfg.test_fraction, seed)
    manifest = DataManifest(
        source=str(Path(cfg.path).resolve()),
        sha256=sha256_file(Path(cfg.path)),
        rows_read=len(frame),
        dropped=dropped,
        rows_kept=len(examples),
        groups=len(set(_group_ids(examples))),
        rows_per_split={s: len(v) for s, v in splits.items()},
        seed=seed,
    )
    return PreparedData(splits=splits, manifest=manifest)


def write_splits(splits: dict[str, list[QAExample]], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        with open(folder / f"{name}.jsonl", "w", encoding="utf-8") as handle:
            for ex in rows:
                handle.write(json.dumps(asdict(ex), ensure_ascii=False) + "\n")


def read_split(path: Path) -> list[QAExample]:
    if not path.is_file():
        raise DataError(f"{path}: split file not found")
    with open(path, encoding="utf-8") as handle:
        return [QAExample(**json.loads(line)) for line in handle if line.strip()]


def percentiles(values: list[int], points=(50, 90, 95, 99, 100)) -> dict[str, int]:
    if not values:
        return {f"p{p}": 0 for p in points}
    ordered = sorted(values)
    out = {}
    for p in points:
        k = min(len(ordered) - 1, max(0, int(round(p / 100 * (len(ordered) - 1)))))
        out[f"p{p}"] = ordered[k]
    return out
