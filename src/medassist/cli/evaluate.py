"""``medassist evaluate``: score a run, a preset or a model folder on held-out questions.

Which questions: for a run directory, that run's own test split (``RUN/splits/test.jsonl``,
or recomputed from the run's saved config with the same seed), so no training row reaches
evaluation; ``--data FILE`` scores every cleaned row of another file instead (a warning
counts any question the run trained on). For a preset or folder without ``--data``, the
configured data file is split exactly as ``medassist train`` would split it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from medassist.errors import DataError


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate", help="generate answers and score them (BERTScore, perplexity, ...) beside baselines",
        description="Generate answers from questions alone and score them against the reference answers, "
        "beside the untuned base model and a 'repeat the question' answer.",
    )
    p.add_argument("--model", required=True, metavar="RUN_DIR|PRESET|PATH",
                   help="a run directory, a preset (medassist models), a hub id or a model folder")
    p.add_argument("--data", metavar="FILE", help="score every cleaned row of this file instead of a split")
    p.add_argument("--split", choices=["test", "validation"], default="test",
                   help="which held-out split of the run (or of the configured data) to score (default: test)")
    p.add_argument("--limit", type=int, metavar="N", help="score only the first N examples")
    p.add_argument("--output", metavar="OUT.json", help="write the full result as JSON "
                   "(default for a run: RUN/eval_SPLIT.json)")
    p.add_argument("--report", metavar="DIR", help="write report.html and plots here "
                   "(default for a run: RUN/report for test, RUN/report_validation)")
    p.add_argument("--max-new-tokens", type=int, help="override eval.max_new_tokens")
    p.add_argument("--no-baselines", action="store_true", help="skip the base-model baseline")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key, e.g. eval.bertscore_model=deberta-xlarge-mnli; repeatable")
    p.set_defaults(func=cmd_evaluate)


def _is_run_dir(path: Path) -> bool:
    from medassist.rundir import RunDir

    return RunDir.find(path) is not None


def _load_examples(args, cfg, run_dir: Path | None):
    from medassist.data import clean_rows, prepare_data, question_key, read_split, read_table

    overlap = 0
    if args.data:
        frame = read_table(args.data, [cfg.data.question_column, cfg.data.answer_column])
        examples, _ = clean_rows(frame, cfg.data.question_column, cfg.data.answer_column)
        source, split = str(args.data), "all rows"
        train_file = run_dir / "splits" / "train.jsonl" if run_dir else None
        if train_file is not None and train_file.is_file():
            seen = {question_key(ex.question) for ex in read_split(train_file)}
            overlap = sum(question_key(ex.question) in seen for ex in examples)
    else:
        split_file = run_dir / "splits" / f"{args.split}.jsonl" if run_dir else None
        if split_file is not None and split_file.is_file():
            examples, source = read_split(split_file), str(split_file)
        else:  # same file, same seed, same group split as training
            examples, source = prepare_data(cfg.data, cfg.seed).splits[args.split], cfg.data.path
        split = args.split
    if args.limit is not None:
        if args.limit < 1:
            raise DataError("--limit must be at least 1")
        examples = examples[: args.limit]
    if not examples:
        raise DataError(f"{source}: no examples to evaluate in '{split}'")
    return examples, {"source": source, "split": split, "n_examples": len(examples), "limit": args.limit,
                      "train_overlap": overlap}


def cmd_evaluate(args: argparse.Namespace) -> int:
    from medassist.config import load_config
    from medassist.evaluation import base_model_context, evaluate_examples, scorer_for
    from medassist.models import load_for_inference
    from medassist.reporting import write_report

    ref = Path(args.model)
    run_dir = ref if _is_run_dir(ref) else None
    overrides = list(args.set or [])
    if args.max_new_tokens is not None:
        overrides.append(f"eval.max_new_tokens={args.max_new_tokens}")
    if args.no_baselines:
        overrides.append("eval.baselines=false")
    if run_dir is not None:
        cfg = load_config(run_dir / "config.yaml", overrides)
    else:
        cfg = load_config(None, overrides + [f"model={args.model}"])

    examples, data_info = _load_examples(args, cfg, run_dir)
    scorer = scorer_for(cfg.eval)  # a missing encoder fails before the model loads
    _say(f"loading {args.model}")
    loaded = load_for_inference(args.model)
    loaded.config = loaded.config or cfg
    engine = loaded.engine()
    if data_info["train_overlap"]:
        _say(f"warning: {data_info['train_overlap']} of these questions are in the run's training split")
    # a run that fully fine-tuned has a separate base model; a LoRA run disables its adapter
    base_name = cfg.model if run_dir is not None else None
    base = base_model_context(loaded.model, base_name)
    _say(f"evaluating {len(examples)} examples from {data_info['source']} "
         f"(max_new_tokens {cfg.eval.max_new_tokens}, BERTScore {cfg.eval.bertscore_model})")
    with _Progress() as progress:
        result = evaluate_examples(engine, examples, cfg.eval, seed=cfg.seed, base_model=base,
                                   base_model_note="" if run_dir else "the evaluated model is itself the base model",
                                   scorer=scorer, progress=progress, source=loaded.source)
    result["settings"]["data"] = data_info

    output = Path(args.output) if args.output else None
    report = Path(args.report) if args.report else None
    if run_dir is not None and not args.data:
        output = output or run_dir / f"eval_{args.split}.json"
        report = report or run_dir / ("report" if args.split == "test" else f"report_{args.split}")
    if report is not None:
        title = f"medassist evaluation: {run_dir.name if run_dir else args.model} ({data_info['split']})"
        result["report_html"] = str(write_report(result, report, run_dir / "metrics.jsonl" if run_dir else None, title))
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(result, indent=2, ensure_ascii=False), encoding="utf-8")

    print(format_table(result))
    if output is not None:
        print(f"results: {output}")
    if report is not None:
        print(f"report: {result['report_html']}")
    return 0


def format_table(result: dict[str, Any]) -> str:
    """The metrics beside the baselines, as a fixed-width table."""
    baselines = result.get("baselines") or {}
    columns = [("model", result), ("base model", baselines.get("base_model")),
               ("repeat question", baselines.get("repeat_question"))]
    keys = ["bertscore_f1", "bertscore_precision", "bertscore_recall", "rouge_l", "perplexity", "token_accuracy",
            "mean_generated_tokens", "hit_max_new_tokens"]

    def cell(source, key):
        value = source.get(key) if source else None
        if value is None:
            return "-"
        return f"{value:.2f}" if key in ("perplexity", "mean_generated_tokens") else f"{value:.4f}"

    lines = [f"{'metric':<22}" + "".join(f"{name:>17}" for name, _ in columns)]
    for key in keys:
        lines.append(f"{key:<22}" + "".join(f"{cell(src, key):>17}" for _, src in columns))
    lines.append(f"{result['n_examples']} examples; BERTScore hash {result['settings']['bertscore']['hash']}")
    note = result["settings"]["bertscore"].get("note")
    if note:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def _say(message: str) -> None:
    print(f"medassist: {message}", file=sys.stderr, flush=True)


class _Progress:
    """A tqdm bar per phase on stderr (the library only calls back)."""

    def __init__(self) -> None:
        self.bar = None

    def __call__(self, description: str, total: int):
        from tqdm import tqdm

        self.close()
        self.bar = tqdm(total=total, desc=description, unit="q", file=sys.stderr, leave=True)
        return self.bar.update

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
