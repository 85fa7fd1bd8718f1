"""Data: clean a question/answer table (read by :mod:`medassist.tables`) and split it by group.

Every row that is dropped is counted by reason, and the counts travel in a manifest that the
run directory keeps (``data_manifest.json``) with the first few file lines of each reason.
Drop reasons: ``malformed_row`` (CSV/TSV row with the wrong number of fields),
``non_text_value`` (a list, object or boolean where text belongs), ``control_characters``
(NUL or another C0 control other than tab/newline/carriage return in the question or answer),
``empty_question``, ``empty_answer``, ``duplicate_pair`` and ``over_limit`` (``data.limit``).
Splits are made *by group* (:mod:`medassist.splits`): all rows whose normalised question is
the same (and, optionally, whose ``group_column`` value is the same) land in one split.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medassist.config import DataConfig
from medassist.curation import balance, curate
from medassist.errors import DataError
from medassist.tables import BUNDLED, META, SHOWN, read_table, resolve_data_path, rows_read  # noqa: F401
from medassist.splits import (  # noqa: F401  (re-exported: ``from medassist.data import ...``)
    SPLITS, compact_key, cross_split_near_duplicates, group_ids, group_split, holdout_split, normalize_question,
    question_key,
)

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")


@dataclass
class QAExample:
    """One cleaned question/answer pair; ``row`` is its 1-based data row in the source file.

    ``meta``: the row's descriptive columns among :data:`META_COLUMNS` (qtype, source, focus,
    url) when the file has them and the cell is text; evaluation breaks its metrics down by
    them. Empty for files without them (and for split files written before it existed).
    """

    question: str
    answer: str
    row: int
    group: str | None = None
    meta: dict[str, str] = field(default_factory=dict)


META_COLUMNS = ("qtype", "source", "focus", "url")  # kept per row in QAExample.meta when present


@dataclass
class DataManifest:
    """What was read, what was dropped (by reason, with the first few lines) and the split sizes.

    ``dropped_at`` holds the first few locations per reason ("line N", or "row N" for JSON and
    Parquet). ``near_duplicates_across_splits`` counts pairs of distinct questions in different
    splits that still match under a stronger normalisation (:func:`cross_split_near_duplicates`).
    """

    source: str
    sha256: str
    rows_read: int
    dropped: dict[str, int] = field(default_factory=dict)
    rows_kept: int = 0
    groups: int = 0
    rows_per_split: dict[str, int] = field(default_factory=dict)
    seed: int = 0
    dropped_at: dict[str, list[str]] = field(default_factory=dict)
    near_duplicates_across_splits: int = 0
    near_duplicate_examples: list[list[str]] = field(default_factory=list)
    modified: dict[str, int] = field(default_factory=dict)  # rows kept but changed, by curation step

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PreparedData:
    splits: dict[str, list[QAExample]]
    manifest: DataManifest


def normalize_answer(text: str) -> str:
    """Strip the ends, collapse spaces/tabs inside lines, keep at most one blank line."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub(r"[ \t\f\v]+", " ", text)
    text = re.sub(r" *\n *", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------
# cleaning
def _as_text(value: Any) -> str | None:
    """Text for a cell: strings as they are; missing -> ""; integers and finite floats -> their
    string form (``42`` -> "42", ``0.5`` -> "0.5"); anything else (lists, objects, booleans,
    infinities, dates) -> None, which :func:`clean_rows` counts as ``non_text_value``."""
    if isinstance(value, str):
        return value
    if value is None or value is pd.NA or value is pd.NaT:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return ""
        return str(float(value)) if math.isfinite(value) else None
    return None


def clean_rows(
    frame: pd.DataFrame,
    question_column: str,
    answer_column: str,
    group_column: str | None = None,
    dropped_at: dict[str, list[str]] | None = None,
) -> tuple[list[QAExample], dict[str, int]]:
    """Normalise whitespace and drop unusable rows, counting every drop by reason.

    Non-string cells are converted deliberately: integers and finite floats become their string
    form (an answer of ``42`` is "42"); lists, objects, booleans and other types are dropped as
    ``non_text_value``; missing cells are empty. Rows whose question or answer holds NUL or
    another C0 control character (other than tab, newline, carriage return) are dropped as
    ``control_characters``. Drops made by :func:`read_table` (``malformed_row``) are included.
    If ``dropped_at`` is given it receives the first few locations ("line N" or "row N") per reason.
    """
    meta = frame.attrs.get(META, {})
    dropped = {"malformed_row": 0, "non_text_value": 0, "control_characters": 0,
               "empty_question": 0, "empty_answer": 0, "duplicate_pair": 0}
    dropped.update(meta.get("dropped", {}))
    where: dict[str, list[str]] = {k: list(v) for k, v in meta.get("dropped_at", {}).items()}
    line_of_row = meta.get("line_of_row")
    rows = [int(r) for r in frame.index] if meta else list(range(1, len(frame) + 1))

    def drop(reason: str, i: int) -> None:
        dropped[reason] += 1
        shown = where.setdefault(reason, [])
        if len(shown) < SHOWN:
            shown.append(f"line {line_of_row[rows[i]]}" if line_of_row is not None else f"row {rows[i]}")

    seen: set[tuple[str, str]] = set()
    kept: list[QAExample] = []
    meta_columns = [c for c in META_COLUMNS if c in frame.columns and c not in (question_column, answer_column)]
    for i, record in enumerate(frame.to_dict("records")):
        raw_q, raw_a = _as_text(record.get(question_column)), _as_text(record.get(answer_column))
        if raw_q is None or raw_a is None:
            drop("non_text_value", i)
            continue
        if _CONTROL.search(raw_q) or _CONTROL.search(raw_a):
            drop("control_characters", i)
            continue
        question, answer = normalize_question(raw_q), normalize_answer(raw_a)
        if not question:
            drop("empty_question", i)
            continue
        if not answer:
            drop("empty_answer", i)
            continue
        pair = (question_key(question), answer)
        if pair in seen:
            drop("duplicate_pair", i)
            continue
        seen.add(pair)
        group = None
        if group_column is not None:
            value = _as_text(record.get(group_column))
            group = (question_key(value) or None) if value else None
        meta = {c: " ".join(text.split()) for c in meta_columns if (text := _as_text(record.get(c)))}
        kept.append(QAExample(question=question, answer=answer, row=rows[i], group=group,
                              meta={c: v for c, v in meta.items() if v}))
    if dropped_at is not None:
        dropped_at.update(where)
    return kept, dropped


# ---------------------------------------------------------------------------------------
# the whole stage, and the split files
def prepare_data(cfg: DataConfig, seed: int) -> PreparedData:
    """Read, clean and split the configured file; the manifest records every count."""
    path = resolve_data_path(cfg.path)
    columns = [cfg.question_column, cfg.answer_column] + ([cfg.group_column] if cfg.group_column else [])
    frame = read_table(path, columns)
    where: dict[str, list[str]] = {}
    examples, dropped = clean_rows(frame, cfg.question_column, cfg.answer_column, cfg.group_column, where)
    if cfg.limit is not None and len(examples) > cfg.limit:
        dropped["over_limit"] = len(examples) - cfg.limit
        examples = examples[: cfg.limit]
    modified: dict[str, int] = {}
    if cfg.curate:
        examples, counts = curate(examples)
        modified = {k: v for k, v in counts.items() if k.endswith(("_stripped", "_cut"))}
        dropped.update({k: v for k, v in counts.items() if k not in modified})
    if not examples:
        counts = ", ".join(f"{k} {v}" for k, v in dropped.items() if v)
        raise DataError(f"{cfg.path}: no usable rows (dropped: {counts or 'none'})")
    if cfg.holdout_column:
        _check_holdout(cfg, examples)
        splits, dropped["same_group_as_held_out"] = holdout_split(
            examples, cfg.holdout_column, cfg.test_values, cfg.validation_values)
    else:
        splits = group_split(examples, cfg.validation_fraction, cfg.test_fraction, seed)
    if cfg.balance_column:
        splits["train"], balanced_out = balance(splits["train"], cfg.balance_column, cfg.balance_alpha, seed)
        dropped["balanced_out"] = sum(balanced_out.values())
    near, near_examples = cross_split_near_duplicates(splits)
    manifest = DataManifest(
        source=str(path.resolve()),
        sha256=sha256_file(path),
        rows_read=rows_read(frame),
        dropped=dropped,
        rows_kept=len(examples),
        groups=len(set(group_ids(examples))),
        rows_per_split={s: len(v) for s, v in splits.items()},
        seed=seed,
        dropped_at=where,
        near_duplicates_across_splits=near,
        near_duplicate_examples=near_examples,
        modified=modified,
    )
    return PreparedData(splits=splits, manifest=manifest)


def _check_holdout(cfg: DataConfig, examples: list[QAExample]) -> None:
    """Held-out values must exist in the data: a typo would silently hold out nothing."""
    found = {ex.meta.get(cfg.holdout_column) for ex in examples}
    if found == {None}:
        raise DataError(f"{cfg.path}: data.holdout_column '{cfg.holdout_column}' is not a column of this file "
                        f"(kept per row: {', '.join(META_COLUMNS)})")
    missing = [v for v in [*cfg.test_values, *cfg.validation_values] if v not in found]
    if missing:
        raise DataError(f"{cfg.path}: data.holdout_column '{cfg.holdout_column}' has no value '{missing[0]}' "
                        f"(values: {', '.join(sorted(v for v in found if v))})")


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
