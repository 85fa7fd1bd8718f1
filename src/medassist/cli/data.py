"""``medassist models``, ``data stats``, ``data import-medquad`` and ``tokens``: look at models,
data and the loss mask before training."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# models
def cmd_models(args: argparse.Namespace) -> int:
    from medassist.presets import list_presets

    rows = list_presets()
    width = max(len(p.name) for p, _ in rows)
    for preset, ok in rows:
        status = "available" if ok else f"missing: {preset.requirement}"
        print(f"{preset.name:<{width}}  {preset.family:<15}  {status}\n{'':<{width}}  {preset.description}")
    print("Any hub id or local folder also works (e.g. Qwen/Qwen3-0.6B-Base, google/flan-t5-small).")
    return 0


def cmd_data_stats(args: argparse.Namespace) -> int:
    from medassist.config import DataConfig
    from medassist.data import clean_rows, percentiles, read_table, rows_read

    cfg = DataConfig(path=args.file, question_column=args.question_column, answer_column=args.answer_column)
    frame = read_table(cfg.path, [cfg.question_column, cfg.answer_column])
    rows, dropped = clean_rows(frame, cfg.question_column, cfg.answer_column)
    from medassist.data import question_key

    print(f"file: {args.file}")
    print(f"rows read: {rows_read(frame)}; kept: {len(rows)}; dropped: "
          + ", ".join(f"{k} {v}" for k, v in dropped.items()))
    print(f"unique questions: {len({question_key(r.question) for r in rows})}")
    if args.model:
        from medassist.config import load_config
        from medassist.models import load_pretrained

        _, tok, family = load_pretrained(args.model)
        overrides = {"max_length": args.max_length, "max_target_length": args.max_length}
        fmt = family.make_format(tok, load_config(None, overrides))
        q_len = [len(fmt.prompt_ids(r.question)) for r in rows]
        a_len = [len(tok(r.answer, add_special_tokens=False).input_ids) for r in rows]
        enc = [fmt.encode(r.question, r.answer) for r in rows]
        cut = sum(1 for e in enc if e is None or e.truncated)
        print(f"tokens ({args.model}, {family.name}, max length {args.max_length}):")
        print("  prompt  " + "  ".join(f"{k} {v}" for k, v in percentiles(q_len).items()))
        print("  answer  " + "  ".join(f"{k} {v}" for k, v in percentiles(a_len).items()))
        print(f"  answers that would be truncated: {cut} of {len(rows)} ({100 * cut / max(1, len(rows)):.1f}%)")
    else:
        q_len = [len(r.question.split()) for r in rows]
        a_len = [len(r.answer.split()) for r in rows]
        print("words (pass --model for tokens):")
        print("  question  " + "  ".join(f"{k} {v}" for k, v in percentiles(q_len).items()))
        print("  answer    " + "  ".join(f"{k} {v}" for k, v in percentiles(a_len).items()))
    return 0


def cmd_data_import_medquad(args: argparse.Namespace) -> int:
    from medassist.medquad import import_medquad, write_csv

    rows, stats = import_medquad(Path(args.dir))
    write_csv(rows, Path(args.out))
    print(f"wrote {len(rows)} pairs to {args.out} from {stats.files_read} files; "
          f"skipped {stats.skipped_no_answer} pairs without an answer; "
          f"{len(stats.files_unparseable)} files could not be parsed")
    for path in stats.files_unparseable[:10]:
        print(f"  unparseable: {path}")
    return 0


def cmd_tokens(args: argparse.Namespace) -> int:
    from medassist.config import load_config
    from medassist.data import prepare_data
    from medassist.formatting import render_mask
    from medassist.models import load_pretrained

    overrides = list(args.set or [])
    if args.model:
        overrides.append(f"model={args.model}")
    if args.retrieval_index:
        overrides += ["retrieval.enabled=true", f"retrieval.index={Path(args.retrieval_index).resolve()}"]
    cfg = load_config(args.config, overrides)
    _, tok, family = load_pretrained(cfg.model, cfg.model_type)
    fmt = family.make_format(tok, cfg)
    splits = prepare_data(cfg.data, cfg.seed).splits if args.question is None or cfg.retrieval.enabled else None
    if args.question is not None:
        from medassist.data import QAExample

        question, answer = args.question, args.answer or ""
        examples, position = [QAExample(question, answer, row=0)], 0
    else:
        examples = splits["train"]
        position = min(args.index, len(examples) - 1)
        question, answer = examples[position].question, examples[position].answer
    passages, note = [], ""
    if cfg.retrieval.enabled:  # the passages this prompt carries in training
        passages, note = _training_passages(cfg, splits, examples, position, training=args.question is None)
    color = sys.stdout.isatty() and not args.no_color
    print(render_mask(fmt, question, answer, color=color, passages=passages))
    enc = fmt.encode(question, answer, passages)
    if enc is not None:
        print(f"\n{len(enc.input_ids)} input tokens, {enc.n_supervised} trained "
              f"(answer tokens{' + EOS' if enc.labels[-1] == fmt.eos_id else ', no EOS'}); "
              f"legend: {'green' if color else '[[...]]'} = trained, {'dim' if color else 'plain'} = masked"
              + ("; answer was cut to fit (EOS kept)" if enc.truncated else ""))
    if cfg.retrieval.enabled:
        kept = len(fmt.fit_passages(question, passages=passages))
        print(f"retrieval: {note}; {kept} of {len(passages)} passages fit the prompt budget")
        for i, p in enumerate(passages, 1):
            print(f"  [{i}] {p.title} ({p.url or 'no url'}){'' if p.score is None else f', score {p.score:.3f}'}"
                  + ("" if i <= kept else " (dropped to fit)"))
    return 0


def _training_passages(cfg, splits, examples, position: int, training: bool):
    """(passages, a note) for ``examples[position]``: as training gives them (own group excluded,
    the seeded distractor share), or for a typed question, the top ``k`` above the threshold."""
    from medassist.cli.common import say
    from medassist.cli.index import _Bars
    from medassist.retrieval.augment import open_index, retrieve_one

    bars = _Bars()
    try:
        heldout = [*splits["validation"], *splits["test"]]
        retriever = open_index(cfg.retrieval, Path(cfg.output_dir), splits["train"], heldout, cfg.data, bars, say)
    finally:
        bars.close()
    rcfg = cfg.retrieval if training else cfg.retrieval.model_copy(update={"exclude_own_group": False})
    found = retrieve_one(retriever, examples, position, rcfg, cfg.seed, distractors=training)
    if found.distractor:
        note = f"a distractor-only prompt (share {cfg.retrieval.distractor_share:g}): passages about other entities"
    elif not found.hits:
        note = "no passage scores at least the threshold: the prompt carries no sources"
    else:
        note = f"top {len(found.hits)} passages" + (", own question group excluded" if rcfg.exclude_own_group else "")
    return found.passages(), note



def add_commands(sub) -> None:
    p = sub.add_parser("models", help="list model presets and whether each is available here")
    p.set_defaults(func=cmd_models)

    data = sub.add_parser("data", help="inspect and import data").add_subparsers(
        dest="data_command", required=True, metavar="SUBCOMMAND")
    p = data.add_parser("stats", help="rows, duplicates, length percentiles, truncation share")
    p.add_argument("file")
    p.add_argument("--model", help="measure lengths in this model's tokens")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--question-column", default="question")
    p.add_argument("--answer-column", default="answer")
    p.set_defaults(func=cmd_data_stats)
    p = data.add_parser("import-medquad", help="convert a MedQuAD XML tree to CSV")
    p.add_argument("dir", help="MedQuAD root folder (folders of <Document> XML files)")
    p.add_argument("--out", required=True, help="CSV file to write")
    p.set_defaults(func=cmd_data_import_medquad)

    p = sub.add_parser("tokens", help="show one formatted example with its loss mask",
                       description="Print one example token by token, marked as trained or masked.")
    p.add_argument("config", nargs="?", help="YAML config (default: built-in defaults)")
    p.add_argument("--model", help="model preset, hub id or path (overrides the config)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.add_argument("--index", type=int, default=0, help="which training example (default 0)")
    p.add_argument("--question", help="format this question instead of a training row")
    p.add_argument("--answer", help="answer for --question")
    p.add_argument("--no-color", action="store_true", help="mark trained tokens as [[...]]")
    p.add_argument("--retrieval-index", dest="retrieval_index", metavar="INDEX_DIR",
                   help="show the passages retrieved from this index in the prompt (as retrieval.enabled does "
                   "with the config's index, or the training split indexed in OUTPUT_DIR/retrieval/index)")
    p.set_defaults(func=cmd_tokens)

