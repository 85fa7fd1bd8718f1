"""Finding and reading a question/answer table: CSV, TSV, JSONL, JSON or Parquet, or a bundled
data set, whatever the working directory.

Reading never shifts or silently drops a row: a CSV/TSV row with the wrong number of fields is
dropped as ``malformed_row`` with its file line; text that is not UTF-8 or holds NUL bytes is
refused with the line and byte offset. What the reader saw travels in ``frame.attrs`` for the
cleaning step (:mod:`medassist.data`) to count.
"""

from __future__ import annotations

import csv
import io
import json
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from medassist.errors import DataError

_READERS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}
BUNDLED = {"sample": "sample_medical_qa.csv", "medquad": "medquad.parquet"}
_LEGACY = {"data/sample_medical_qa.csv": "sample"}  # the default before the sample moved into the package
SHOWN = 5  # locations kept per drop reason
META = "medassist"  # frame.attrs key: rows read, drops made while reading, file lines


def resolve_data_path(path: str | Path) -> Path:
    """The file that ``path`` names, whatever the working directory.

    An existing file wins. Otherwise the bundled names ``sample`` (and the pre-move default
    ``data/sample_medical_qa.csv``) and ``medquad`` resolve to files inside the installed
    package (``medassist/resources``). Anything else is a one-line DataError.
    """
    candidate = Path(path).expanduser()
    if candidate.is_file():
        return candidate
    if candidate.is_dir():
        raise DataError(f"{path}: is a directory, not a data file")
    if candidate.exists():
        raise DataError(f"{path}: not a regular file")
    name = _LEGACY.get(candidate.as_posix(), str(path))
    if name in BUNDLED:
        resource = resources.files("medassist") / "resources" / BUNDLED[name]
        if resource.is_file():
            return Path(str(resource))
        todo = ("convert MedQuAD's XML with `medassist data import-medquad DIR --out medquad.csv` and set "
                "data.path to that file" if name == "medquad" else "reinstall medassist or set data.path to a file")
        raise DataError(f"{name}: the bundled data set is not installed "
                        f"(medassist/resources/{BUNDLED[name]} is missing); {todo}")
    raise DataError(
        f"{path}: file not found (relative paths start at {Path.cwd()}; bundled data: {', '.join(BUNDLED)})"
    )


def _decode(path: Path) -> str:
    """The file as text: UTF-8 (a BOM is dropped), no NUL byte; errors name line and byte offset."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        hint = " (it is UTF-16)" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise DataError(
            f"{path}: not UTF-8 text{hint}: invalid byte 0x{raw[exc.start]:02x} at line {line}, "
            f"byte offset {exc.start}; save it as UTF-8"
        ) from None
    nul = raw.find(b"\x00")
    if nul >= 0:
        line = raw.count(b"\n", 0, nul) + 1
        raise DataError(f"{path}: binary file, not text: NUL byte at line {line}, byte offset {nul}")
    return text.removeprefix("\ufeff")


def _read_delimited(path: Path, kind: str, columns: list[str], meta: dict) -> pd.DataFrame:
    """CSV/TSV rows as strings; rows with the wrong number of fields go to ``meta``, not the frame."""
    reader = csv.reader(io.StringIO(_decode(path), newline=""), delimiter="," if kind == "csv" else "\t",
                        strict=True)
    header: list[str] | None = None
    rows, numbers, lines, bad = [], [], [0], []  # lines[data row] = first line of that row
    start = 1
    try:
        for fields in reader:
            line, start = start, reader.line_num + 1
            if not fields or (len(fields) == 1 and not fields[0].strip()):
                continue  # a blank line
            if header is None:
                header = fields
                continue
            if len(fields) > len(header) and not any(f.strip() for f in fields[len(header):]):
                fields = fields[: len(header)]  # trailing empty fields: nothing is lost
            lines.append(line)
            if len(fields) != len(header):
                bad.append((line, len(fields)))
            else:
                rows.append(fields)
                numbers.append(len(lines) - 1)
    except csv.Error as exc:
        what = ("unterminated quote" if "end of data" in str(exc)
                else "text after a closing quote" if "expected after" in str(exc) else str(exc))
        raise DataError(f"{path}: cannot parse as {kind}: {what} in the row starting at line {start}") from None
    if header is None:
        raise DataError(f"{path}: no header row")
    for column in columns:
        if header.count(column) > 1:
            raise DataError(f"{path}: column '{column}' appears {header.count(column)} times in the header")
    counts: dict[str, int] = {}
    for i, name in enumerate(header):  # other repeated names: url, url.1, url.2 (as pandas names them)
        header[i] = f"{name}.{counts[name]}" if counts.get(name) else name
        counts[name] = counts.get(name, 0) + 1
    shown = [f"line {ln}: {n} field{'s' * (n != 1)}, expected {len(header)}" for ln, n in bad[:SHOWN]]
    if bad and not rows:
        raise DataError(f"{path}: no well-formed rows: all {len(bad)} have the wrong number of fields ({shown[0]})")
    meta.update(rows_read=len(lines) - 1, dropped={"malformed_row": len(bad)}, line_of_row=np.asarray(lines))
    meta["dropped_at"] = {"malformed_row": shown} if bad else {}
    return pd.DataFrame(rows, columns=header, index=numbers, dtype=object)


def _json_records(path: Path, text: str, lines_format: bool) -> tuple[list[dict], list[int] | None]:
    """Records of a JSONL file (one object a line) or a JSON list of objects / column mapping."""
    def load(chunk: str, offset: int = 0) -> Any:
        try:
            return json.loads(chunk)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}: invalid JSON at line {exc.lineno + offset}, column {exc.colno}: {exc.msg}"
            ) from None

    if lines_format:
        records, lines = [], []
        for number, line in enumerate(text.split("\n"), 1):
            if line.strip():
                record = load(line, number - 1)
                if not isinstance(record, dict):
                    raise DataError(
                        f"{path}: line {number}: expected a JSON object, got {type(record).__name__}"
                    )
                records.append(record)
                lines.append(number)
        return records, lines
    data = load(text)
    if isinstance(data, dict) and all(isinstance(v, (dict, list)) for v in data.values()):
        try:  # pandas' default "columns" orientation: {column: {index: value}}
            data = pd.DataFrame(data, dtype=object).to_dict("records")
        except ValueError as exc:
            raise DataError(f"{path}: cannot read the JSON object as columns: {exc}") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
    for i, record in enumerate(data, 1):
        if not isinstance(record, dict):
            raise DataError(f"{path}: item {i}: expected a JSON object, got {type(record).__name__}")
    return data, None


def read_table(path: str | Path, columns: Iterable[str]) -> pd.DataFrame:
    """Read CSV/TSV/JSONL/JSON/Parquet; one DataError line (file, line) per problem.

    ``path`` goes through :func:`resolve_data_path`. CSV/TSV values are strings; JSON and
    Parquet values keep their types (:func:`clean_rows` decides what is text). A CSV/TSV row
    with more or fewer fields than the header is never shifted: it is left out and counted as
    ``malformed_row`` (extra fields that are all empty are trimmed instead). The frame's index
    is the 1-based data row; ``frame.attrs["medassist"]`` holds the rows read (:func:`rows_read`),
    those drops and the file line of each data row.
    """
    path = resolve_data_path(path)
    columns = list(columns)
    kind = _READERS.get(path.suffix.lower())
    if kind is None:
        raise DataError(
            f"{path}: unknown file extension '{path.suffix}' (use .csv, .tsv, .jsonl, .json or .parquet)"
        )
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")
    meta: dict[str, Any] = {}
    if kind in ("csv", "tsv"):
        frame = _read_delimited(path, kind, columns, meta)
    elif kind in ("jsonl", "json"):
        records, lines = _json_records(path, _decode(path), kind == "jsonl")
        frame = pd.DataFrame(records, index=range(1, len(records) + 1), dtype=object)
        if lines is not None:
            meta["line_of_row"] = np.asarray([0] + lines)
    else:
        try:
            frame = pd.read_parquet(path)
        except (ValueError, OSError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DataError(f"{path}: cannot parse as parquet: {first}") from None
        frame.index = range(1, len(frame) + 1)
    n_read = meta.setdefault("rows_read", len(frame))
    if n_read == 0:
        raise DataError(f"{path}: no data rows")
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(
            f"{path}: missing column '{missing[0]}' (columns are: {', '.join(map(str, frame.columns))})"
        )
    frame.attrs[META] = meta
    return frame


def rows_read(frame: pd.DataFrame) -> int:
    """Data rows in the file behind ``frame``, malformed ones included (``len(frame)`` if unknown)."""
    return int(frame.attrs.get(META, {}).get("rows_read", len(frame)))
