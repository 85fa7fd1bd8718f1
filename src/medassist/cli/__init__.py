"""The ``medassist`` command: a thin layer over the library; the only place that prints.

User errors (:class:`~medassist.errors.MedassistError`) become one line on stderr and exit
status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from medassist.errors import MedassistError
from medassist.families import FAMILIES


def _say(message: str) -> None:
    print(f"medassist: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------
# train
def cmd_train(args: argparse.Namespace) -> int:
    from medassist.config import load_config

    overrides = list(args.set or [])
    if args.model_type:
        overrides.append(f"model_type={args.model_type}")
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    cfg = load_config(args.config, overrides)
    from medassist.training import is_main_process, train

    result = train(cfg, log=_say if is_main_process() else (lambda _m: None), resume=_resume_arg(args, cfg))
    if is_main_process():
        s = result.summary
        print(f"run: {result.run_dir}")
        print(f"final model: {result.run_dir / 'final'}")
        print(f"steps {s['steps']}, final train loss {s['final_train_loss']}, "
              f"validation loss {s['final_validation_loss']}")
        if result.report:
            print(f"report: {result.report.get('report_html', result.run_dir / 'report')}")
    return 0


def _resume_arg(args, cfg):
    if not getattr(args, "resume", None):
        return None
    from medassist.training import find_resume_checkpoint

    return find_resume_checkpoint(Path(cfg.output_dir), args.resume)


# ---------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------
# data
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


# ---------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medassist",
        description="Fine-tune, evaluate and serve small language models as medical QA assistants.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="fine-tune a model (decoder-only LoRA or encoder-decoder)",
                       description="Fine-tune a model on a question/answer file and write a run directory.")
    p.add_argument("config", nargs="?", help="YAML config (default: built-in defaults)")
    p.add_argument("--model-type", choices=list(FAMILIES), help="model family")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key (dotted for sections: lora.r=8); repeatable")
    p.add_argument("--output-dir", help="run directory (overrides output_dir)")
    p.add_argument("--resume", nargs="?", const="auto", metavar="auto|PATH",
                   help="continue from the newest complete checkpoint (auto) or the one given")
    p.set_defaults(func=cmd_train)

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

    for register in _extra_commands():
        register(sub)
    return parser


def _extra_commands():
    """Subcommands defined beside the stage they drive (evaluation, serving, export)."""
    from medassist import export
    from medassist.cli import evaluate, serve

    return [evaluate.add_commands, serve.add_serving_commands, export.add_commands]


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")  # nothing phones home unless asked
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MedassistError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
