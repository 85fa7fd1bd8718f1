"""``medassist train``: fine-tune a model and write a run directory."""

from __future__ import annotations

import argparse
import warnings

from medassist.cli.common import Progress, say as _say
from medassist.families import FAMILIES


def cmd_train(args: argparse.Namespace) -> int:
    from medassist.config import load_config

    overrides = list(args.set or [])
    if args.model_type:
        overrides.append(f"model_type={args.model_type}")
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    cfg = load_config(args.config, overrides)
    from medassist.distributed import is_main_process
    from medassist.training import CheckpointWarning, train

    log = _say if is_main_process() else (lambda _m: None)
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_for(CheckpointWarning, log, warnings.showwarning)
        with Progress() as progress:
            result = train(cfg, log=log, resume=args.resume, progress=progress if is_main_process() else None)
    if is_main_process():
        s = result.summary
        print(f"run: {result.run_dir}")
        print(f"final model: {result.run_dir / 'final'}")
        resumed = f" ({s['steps_this_process']} in this process)" if s.get("resumed_at_step") else ""
        print(f"steps {s['steps']}{resumed}, final train loss {s['final_train_loss']}, "
              f"validation loss {s['final_validation_loss']}")
        if result.report:
            from medassist.cli.evaluate import format_table
            from medassist.evaluation.results import EvalResult

            print(f"\nheld-out test ({cfg.data.path}, split 'test'):")
            print(format_table(EvalResult.from_json(result.report)))
            print(f"report: {result.report.get('report_html', result.run_dir / 'report')}")
    return 0


def _one_line_for(category, log, default):
    """medassist's own warnings of ``category`` as one ``medassist: warning: ...`` line."""
    def show(message, cat, filename, lineno, file=None, line=None):
        if issubclass(cat, category):
            log(f"warning: {message}")
        else:
            default(message, cat, filename, lineno, file, line)

    return show


def add_commands(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a model (decoder-only LoRA or encoder-decoder)",
                       description="Fine-tune a model on a question/answer file and write a run directory.")
    p.add_argument("config", nargs="?", help="YAML config (default: built-in defaults)")
    p.add_argument("--model-type", choices=list(FAMILIES), help="model family")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key (dotted for sections: lora.r=8); repeatable")
    p.add_argument("--output-dir", help="run directory (overrides output_dir)")
    p.add_argument("--resume", nargs="?", const="auto", metavar="auto|PATH",
                   help="continue from the newest complete checkpoint (auto; from step 0 when there is none) "
                   "or from the checkpoint or run directory given")
    p.set_defaults(func=cmd_train)
