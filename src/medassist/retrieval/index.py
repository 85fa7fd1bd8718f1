"""Build and open a retrieval index: passage vectors, metadata, an optional BM25 index, a manifest.

Layout of an index directory (all written into a temporary sibling, then renamed, so a reader
never sees half an index)::

    manifest.json           what was indexed and how (source sha256, encoder, chunking, counts)
    passages.parquet        one row per passage: text, title, focus, url, source, group, row, ...
    passage_vectors.npy     float16 [passages, dim], mean-pooled + L2-normalised
    title_vectors.npy       float16 [titles, dim]   (entity-aware search: query entity vs title)
    question_vectors.npy    float16 [rows, dim]     (the nearest-*question* baseline)
    titles.json             the distinct titles, in title_id order
    bm25/                   bm25s index over "title: text" (when built with bm25=True)
    heldout.csv             rows held out of the index (when built with holdout > 0)

Vectors are searched exactly (one matrix-vector product): MedQuAD's 35k x 384 vectors are 26 MB
as float16, and scoring all of them takes ~1 ms in numpy, far less than encoding the query
(~6-90 ms on 2 shared cores), so an approximate index (faiss) would add a dependency and recall
loss for no measurable gain at this size.

Idempotence: the manifest's ``key`` is a sha256 of the indexed rows' content and every setting
that changes the vectors (encoder weights, chunking, bf16, holdout, seed, bm25). Building again
with the same key *skips* the work and returns the existing manifest; ``force=True`` rebuilds.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from medassist.errors import DataError, MedassistError
from medassist.retrieval.encoder import DEFAULT_ENCODER, Encoder, model_fingerprint
from medassist.retrieval.passages import Chunker, SourceRow, build_passages, holdout_split, read_rows

Progress = Callable[[str, int, int], None]
FORMAT = "medassist-retrieval-index"
VERSION = 1
MANIFEST = "manifest.json"
REQUIRED_FILES = ("passages.parquet", "passage_vectors.npy", "title_vectors.npy", "question_vectors.npy",
                  "titles.json")
_TOKEN = re.compile(r"(?u)\b\w\w+\b")


def bm25_tokens(text: str) -> list[str]:
    """Lower-cased words of 2+ characters without English stopwords (the same for passages and queries)."""
    from bm25s.stopwords import STOPWORDS_EN

    stop = set(STOPWORDS_EN)
    return [w for w in _TOKEN.findall(text.lower()) if w not in stop]


@dataclass
class IndexSettings:
    encoder: str = DEFAULT_ENCODER
    max_tokens: int = 256
    chunk_words: int = 120
    overlap: int = 1
    bm25: bool = True
    bf16: bool | None = None  # None: use bf16 where the CPU has native bf16
    batch_size: int = 64
    holdout: float = 0.0
    seed: int = 42


@dataclass
class BuildResult:
    out_dir: Path
    manifest: dict
    skipped: bool


def rows_digest(rows: list[SourceRow]) -> str:
    digest = hashlib.sha256()
    for r in rows:
        digest.update(json.dumps(asdict(r), ensure_ascii=False, sort_keys=True).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def read_manifest(index_dir: str | Path) -> dict:
    """The manifest of an index directory, or a MedassistError that says why it is not one."""
    index_dir = Path(index_dir)
    if not index_dir.is_dir():
        raise MedassistError(f"{index_dir}: index directory not found (build one with: medassist index build)")
    path = index_dir / MANIFEST
    if not path.is_file():
        raise MedassistError(f"{index_dir}: not a retrieval index (no {MANIFEST}; build one with: medassist index build)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MedassistError(f"{path}: unreadable manifest ({exc})") from None
    if manifest.get("format") != FORMAT:
        raise MedassistError(f"{index_dir}: not a retrieval index ({MANIFEST} has format {manifest.get('format')!r})")
    if manifest.get("version") != VERSION:
        raise MedassistError(f"{index_dir}: index version {manifest.get('version')} is not {VERSION}; rebuild it")
    missing = [f for f in REQUIRED_FILES if not (index_dir / f).is_file()]
    if manifest.get("bm25", {}).get("enabled") and not (index_dir / "bm25").is_dir():
        missing.append("bm25/")
    if missing:
        raise MedassistError(f"{index_dir}: incomplete index (missing {', '.join(missing)}); rebuild it")
    return manifest


def build_index(rows: str | Path | list[SourceRow], out_dir: str | Path, settings: IndexSettings | None = None,
                force: bool = False, progress: Progress | None = None, **overrides) -> BuildResult:
    """Chunk, embed and store ``rows`` (a QA file or :class:`SourceRow` list) in ``out_dir``.

    Keyword overrides set :class:`IndexSettings` fields (``chunk_words=80, bm25=False``).
    """
    settings = settings or IndexSettings()
    for name, value in overrides.items():
        if not hasattr(settings, name):
            raise TypeError(f"unknown index setting {name!r}")
        setattr(settings, name, value)
    if not 0.0 <= settings.holdout < 1.0:
        raise DataError(f"holdout must be in [0, 1) (got {settings.holdout})")
    out_dir = Path(out_dir)
    source: dict = {}
    if isinstance(rows, (str, Path)):
        from medassist.data import sha256_file

        path = Path(rows)
        all_rows, dropped = read_rows(path)
        source = {"path": str(path.resolve()), "sha256": sha256_file(path), "dropped": dropped}
    else:
        all_rows = list(rows)
        if not all_rows:
            raise DataError("no rows to index")
    indexed, heldout = holdout_split(all_rows, settings.holdout, settings.seed) if settings.holdout else (all_rows, [])

    encoder = Encoder(settings.encoder, settings.max_tokens, settings.batch_size, settings.bf16)
    key_parts = {
        "rows": rows_digest(all_rows), "encoder": model_fingerprint(encoder.folder),
        "max_tokens": encoder.max_tokens, "chunk_words": settings.chunk_words, "overlap": settings.overlap,
        "bf16": encoder.bf16, "bm25": settings.bm25, "holdout": settings.holdout, "seed": settings.seed,
        "version": VERSION,
    }
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()
    if out_dir.exists() and not force:
        try:
            existing = read_manifest(out_dir)
        except MedassistError:
            existing = None
        if existing is not None and existing.get("key") == key:
            return BuildResult(out_dir, existing, skipped=True)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MANIFEST).is_file():
        raise DataError(f"{out_dir}: exists and is not a retrieval index; refusing to overwrite it")

    started = time.perf_counter()
    chunker = Chunker(encoder.tokenizer, encoder.max_tokens, settings.chunk_words, settings.overlap)
    passages = build_passages(indexed, chunker, progress)
    if not passages:
        raise DataError("no passages to index (every answer is empty)")
    focus_by_row = {r.row: r.focus for r in indexed}
    titles = sorted({p.title for p in passages})
    title_id = {t: i for i, t in enumerate(titles)}

    # Embed each distinct text once (MedQuAD repeats answers under different questions).
    texts = [p.embed_text() for p in passages]
    unique = sorted(set(texts))
    position = {t: i for i, t in enumerate(unique)}
    embed_started = time.perf_counter()
    unique_vectors = encoder.encode(unique, progress, "embed passages")
    embed_seconds = time.perf_counter() - embed_started
    passage_vectors = unique_vectors[[position[t] for t in texts]]
    title_vectors = encoder.encode(titles, progress, "embed titles")
    first = [p for p in passages if p.chunk == 0]
    question_vectors = encoder.encode([p.question for p in first], progress, "embed questions")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp", dir=out_dir.parent))
    try:
        frame = pd.DataFrame([asdict(p) for p in passages])
        frame["focus"] = [focus_by_row.get(p.row, "") for p in passages]
        frame["title_id"] = [title_id[p.title] for p in passages]
        frame.to_parquet(tmp / "passages.parquet", index=False)
        np.save(tmp / "passage_vectors.npy", passage_vectors.astype(np.float16))
        np.save(tmp / "title_vectors.npy", title_vectors.astype(np.float16))
        np.save(tmp / "question_vectors.npy", question_vectors.astype(np.float16))
        (tmp / "titles.json").write_text(json.dumps(titles, ensure_ascii=False), encoding="utf-8")
        if settings.bm25:
            import bm25s

            if progress:
                progress("bm25", 0, 1)
            bm25 = bm25s.BM25()
            bm25.index([bm25_tokens(t) for t in texts], show_progress=False)
            bm25.save(tmp / "bm25", show_progress=False)
            if progress:
                progress("bm25", 1, 1)
        if heldout:
            pd.DataFrame([asdict(r) for r in heldout]).to_csv(tmp / "heldout.csv", index=False)
        seconds = time.perf_counter() - started
        manifest = {
            "format": FORMAT, "version": VERSION, "key": key,
            "source": {**source, "rows": len(all_rows), "rows_indexed": len(indexed), "rows_heldout": len(heldout),
                       "holdout": settings.holdout, "seed": settings.seed, "rows_sha256": key_parts["rows"]},
            "encoder": {"name": settings.encoder, "folder": encoder.folder, "weights_sha256": key_parts["encoder"],
                        "dim": encoder.dim, "pooling": "mean", "normalized": True, "bf16": encoder.bf16,
                        "max_tokens": encoder.max_tokens},
            "chunking": {"max_tokens": encoder.max_tokens, "chunk_words": settings.chunk_words,
                         "overlap_sentences": settings.overlap, "title": "focus, else question",
                         "embedded_text": "title: chunk"},
            "counts": {"rows": len(indexed), "passages": len(passages), "distinct_passage_texts": len(unique),
                       "titles": len(titles), "groups": int(frame["group"].nunique()),
                       "urls": int(frame["url"].nunique())},
            "bm25": {"enabled": settings.bm25, "k1": 1.5, "b": 0.75, "method": "lucene",
                     "tokens": "lower-cased words, English stopwords removed, no stemming"},
            "build": {"seconds": round(seconds, 1), "embed_seconds": round(embed_seconds, 1),
                      "passages_per_s": round(len(unique) / embed_seconds, 1) if embed_seconds else None,
                      "tokens_per_s": round(encoder.stats.tokens_per_s, 1),
                      "created": datetime.now(timezone.utc).isoformat(timespec="seconds")},
        }
        manifest["build"]["bytes"] = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return BuildResult(out_dir, manifest, skipped=False)
