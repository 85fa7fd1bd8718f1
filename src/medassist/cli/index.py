"""``medassist index``: build, evaluate and query a retrieval index of a vetted QA corpus.

    medassist index build DATA --out INDEX_DIR [--chunk-words N] [--bm25/--no-bm25] [--holdout F]
    medassist index eval INDEX_DIR [--data FILE] [--limit N] [--k 1,3,5]
    medassist index search INDEX_DIR "question" [--k N] [--variant V] [--min-score S]

The library (``medassist.retrieval``) never prints; this module turns its progress callbacks into
tqdm bars on stderr and its results into tables on stdout. User errors are MedassistErrors,
which the main CLI prints as one ``error: ...`` line (exit 2).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from medassist.errors import DataError, MedassistError


class _Bars:
    """A progress callback (stage, done, total) that keeps one tqdm bar per stage on stderr."""

    def __init__(self, enabled: bool = True):
        self.enabled, self.bars = enabled, {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        bar = self.bars.get(stage)
        if bar is None:
            bar = self.bars[stage] = tqdm(total=total, desc=stage, file=sys.stderr, leave=False, dynamic_ncols=True)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def _k_values(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise MedassistError(f"--k must be comma-separated positive integers (got '{text}')") from None
    if not values or min(values) < 1:
        raise MedassistError(f"--k must be comma-separated positive integers (got '{text}')")
    return values


def add_commands(subparsers) -> None:
    """Register ``index build|eval|search`` on the main parser's subparsers."""
    from medassist.retrieval.search import DEFAULT_VARIANT, VARIANTS

    index = subparsers.add_parser("index", help="build, evaluate and query a retrieval index of a QA corpus",
                                  description="Index a vetted QA corpus (passages of answers, MiniLM vectors, "
                                  "BM25) and measure whether held-out questions find the right disease.")
    sub = index.add_subparsers(dest="index_command", required=True, metavar="SUBCOMMAND")

    p = sub.add_parser("build", help="chunk, embed and store a QA file as an index",
                       description="Chunk every answer into passages that fit the encoder, embed them with "
                       "all-MiniLM-L6-v2 and save vectors, metadata, BM25 and a manifest. Skips the work when "
                       "INDEX_DIR already holds an index of the same data with the same settings.")
    p.add_argument("data", metavar="DATA", help="CSV/TSV/JSONL/JSON/Parquet with question, answer "
                   "[, focus, url, source, qtype]")
    p.add_argument("--out", required=True, metavar="INDEX_DIR", help="index directory to write")
    p.add_argument("--chunk-words", type=int, default=120, metavar="N",
                   help="at most N words per passage (default 120; never more than --max-tokens word pieces)")
    p.add_argument("--max-tokens", type=int, default=256, metavar="N",
                   help="encoder word pieces per passage incl. title and special tokens (default 256)")
    p.add_argument("--overlap", type=int, default=1, metavar="N", help="sentences repeated between chunks (default 1)")
    p.add_argument("--bm25", action=argparse.BooleanOptionalAction, default=True, help="also build a BM25 index")
    p.add_argument("--holdout", type=float, default=0.0, metavar="F",
                   help="hold out this share of question groups (written to INDEX_DIR/heldout.csv) for `index eval`")
    p.add_argument("--seed", type=int, default=42, help="seed of the --holdout split (default 42)")
    p.add_argument("--encoder", default="minilm-l6", help="encoder preset or folder (default minilm-l6)")
    p.add_argument("--force", action="store_true", help="rebuild even if an identical index exists")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_index_build)

    p = sub.add_parser("eval", help="recall@k / MRR of each retrieval variant on held-out questions",
                       description="Search with every variant for each query row (its own question group "
                       "excluded) and count a hit as relevant when its focus (or, strictly, its url) equals "
                       "the query row's.")
    p.add_argument("index_dir", metavar="INDEX_DIR")
    p.add_argument("--data", metavar="FILE", help="query rows (default: INDEX_DIR/heldout.csv)")
    p.add_argument("--limit", type=int, metavar="N", help="evaluate a seeded sample of N query rows")
    p.add_argument("--k", default="1,3,5", metavar="K,K,..", help="recall cut-offs (default 1,3,5)")
    p.add_argument("--variants", default=",".join(VARIANTS), metavar="V,V,..",
                   help=f"variants to compare (default {','.join(VARIANTS)})")
    p.add_argument("--styles", default="original,rewritten", metavar="S,S",
                   help="query wordings: original (the file's) and/or rewritten (free-form)")
    p.add_argument("--seed", type=int, default=0, help="seed of --limit sampling and the bootstrap")
    p.add_argument("--json", metavar="OUT.json", help="also write the full report as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_index_eval)

    p = sub.add_parser("search", help="show the passages a question retrieves")
    p.add_argument("index_dir", metavar="INDEX_DIR")
    p.add_argument("question")
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--variant", default=DEFAULT_VARIANT, choices=VARIANTS)
    p.add_argument("--min-score", type=float, help="threshold (default: the variant's measured threshold)")
    p.add_argument("--no-threshold", action="store_true", help="return hits whatever their score")
    p.set_defaults(func=cmd_index_search)


def cmd_index_build(args: argparse.Namespace) -> int:
    from medassist.retrieval.index import build_index

    from medassist.tables import resolve_data_path

    args.data = str(resolve_data_path(args.data))  # a file, or a bundled name (medquad, sample)
    bars = _Bars(not args.quiet)
    try:
        result = build_index(args.data, args.out, force=args.force, progress=bars, encoder=args.encoder,
                             max_tokens=args.max_tokens, chunk_words=args.chunk_words, overlap=args.overlap,
                             bm25=args.bm25, holdout=args.holdout, seed=args.seed)
    finally:
        bars.close()
    m = result.manifest
    c, b = m["counts"], m["build"]
    verb = "unchanged (same data and settings; use --force to rebuild)" if result.skipped else "built"
    print(f"index {result.out_dir}: {verb}")
    print(f"rows {c['rows']}, passages {c['passages']}, titles {c['titles']}, urls {c['urls']}; "
          f"held out {m['source']['rows_heldout']} rows")
    print(f"build {b['seconds']} s (embedding {b['embed_seconds']} s, {b['passages_per_s']} passages/s), "
          f"{b['bytes'] / 1e6:.1f} MB")
    return 0


def cmd_index_eval(args: argparse.Namespace) -> int:
    from medassist.retrieval.evaluate import evaluate_retrieval, format_report
    from medassist.retrieval.passages import read_rows
    from medassist.retrieval.search import VARIANTS, Retriever

    retriever = Retriever.load(args.index_dir)
    data = args.data or Path(args.index_dir) / "heldout.csv"
    if not args.data and not Path(data).is_file():
        raise DataError(f"{args.index_dir}: no heldout.csv (build with --holdout) and no --data FILE given")
    rows, _ = read_rows(data)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise MedassistError(f"--variants: unknown variant '{unknown[0] if unknown else ''}' "
                             f"(choose from {', '.join(VARIANTS)})")
    if "bm25" in variants or "hybrid" in variants:
        if retriever.bm25 is None:
            variants = [v for v in variants if v not in ("bm25", "hybrid")]
    styles = [s.strip() for s in args.styles.split(",") if s.strip()]
    if not styles or any(s not in ("original", "rewritten") for s in styles):
        raise MedassistError(f"--styles must be original and/or rewritten (got '{args.styles}')")
    bars = _Bars(not args.quiet)
    try:
        report = evaluate_retrieval(retriever, rows, _k_values(args.k), variants, styles, args.limit, args.seed,
                                    progress=bars)
    finally:
        bars.close()
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        print(f"report: {args.json}")
    return 0


def cmd_index_search(args: argparse.Namespace) -> int:
    from medassist.retrieval.search import THRESHOLDS, Retriever

    retriever = Retriever.load(args.index_dir)
    threshold = None if args.no_threshold else (args.min_score if args.min_score is not None
                                                else THRESHOLDS[args.variant])
    hits = retriever.search(args.question, k=args.k, min_score=threshold, variant=args.variant)
    if not hits:
        print(f"no source found (no passage scores >= {threshold})")
    for rank, h in enumerate(hits, 1):
        snippet = " ".join(h.text.split())[:160]
        print(f"{rank}. [{h.score:.3f}] {h.title} <{h.url}>\n   {snippet}")
    return 0
