"""``medassist models``, ``data stats``, ``data import-medquad`` and ``tokens``: look at models,
data and the loss mask before training."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# models
def cmd_models(args: argparse.Namespace) -> int:
    from medassist.models import list_presets

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
    cfg = load_config(args.config, overrides)
    _, tok, family = load_pretrained(cfg.model, cfg.model_type)
    fmt = family.make_format(tok, cfg)
    if args.question is not None:
        question, answer = args.question, args.answer or ""
    else:
        train_rows = prepare_data(cfg.data, cfg.seed).splits["train"]
        example = train_rows[min(args.index, len(train_rows) - 1)]
        question, answer = example.question, example.answer
    color = sys.stdout.isatty() and not args.no_color
    print(render_mask(fmt, question, answer, color=color))
    enc = fmt.encode(question, answer)
    if enc is not None:
        print(f"\n{len(enc.input_ids)} input tokens, {enc.n_supervised} trained "
              f"(answer tokens{' + EOS' if enc.labels[-1] == fmt.eos_id else ', no EOS'}); "
              f"legend: {'green' if color else '[[...]]'} = trained, {'dim' if color else 'plain'} = masked"
              + ("; answer was cut to fit (EOS kept)" if enc.truncated else ""))
    return 0



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
    p.set_defaults(func=cmd_tokens)

