"""``medassist evaluate``: score a run, a preset or a model folder on held-out questions.

Which questions: for a run directory, that run's own test split (``RUN/splits/test.jsonl``,
or recomputed from the run's saved config with the same seed), so no training row reaches
evaluation; ``--data FILE`` scores every cleaned row of another file instead (a warning
counts the *scored* questions the run trained on). For a preset or folder without ``--data``,
the configured data file is split exactly as ``medassist train`` would split it.

The output opens with one verdict per baseline ("better than the base model: yes / no /
can't tell"), then the means, the paired differences with 95% intervals and win counts, and the
failure measures of the answers.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from medassist.cli.common import Progress, say
from medassist.errors import DataError


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate", help="generate answers and score them (factual consistency, BERTScore, ...) beside baselines",
        description="Generate answers from questions alone and score them against the reference answers, "
        "beside the untuned base model, the answer of the nearest training question and 'repeat the question', "
        "with paired 95%% bootstrap intervals for every difference.",
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
                   help="override a config key, e.g. eval.factual_model=path/to/mnli; repeatable")
    p.set_defaults(func=cmd_evaluate)


def _is_run_dir(path: Path) -> bool:
    from medassist.rundir import RunDir

    return RunDir.find(path) is not None


def _load_examples(args, cfg, run_dir: Path | None):
    """(examples to score, training examples for the retrieval baseline or None, DataInfo)."""
    from medassist.data import clean_rows, prepare_data, question_key, read_split, read_table
    from medassist.evaluation.results import DataInfo

    train_file = run_dir / "splits" / "train.jsonl" if run_dir else None
    train = read_split(train_file) if train_file is not None and train_file.is_file() else None
    if args.data:
        frame = read_table(args.data, [cfg.data.question_column, cfg.data.answer_column])
        examples, _ = clean_rows(frame, cfg.data.question_column, cfg.data.answer_column)
        source, split = str(args.data), "all rows"
    else:
        split_file = run_dir / "splits" / f"{args.split}.jsonl" if run_dir else None
        if split_file is not None and split_file.is_file():
            examples, source = read_split(split_file), str(split_file)
        else:  # same file, same seed, same group split as training
            splits = prepare_data(cfg.data, cfg.seed).splits
            examples, source = splits[args.split], cfg.data.path
            train = train if train is not None else splits["train"]
        split = args.split
    if args.limit is not None:
        if args.limit < 1:
            raise DataError("--limit must be at least 1")
        examples = examples[: args.limit]
    if not examples:
        raise DataError(f"{source}: no examples to evaluate in '{split}'")
    overlap = 0
    if train is not None:  # over the scored examples only, not the whole file
        seen = {question_key(ex.question) for ex in train}
        overlap = sum(question_key(ex.question) in seen for ex in examples)
    return examples, train, DataInfo(source=source, split=split, n_examples=len(examples), limit=args.limit,
                                      train_overlap=overlap)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from medassist.config import load_config
    from medassist.evaluation import base_model_context, evaluate_examples, scorer_for
    from medassist.evaluation.report import write_report
    from medassist.models import load_for_inference

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

    examples, train, data_info = _load_examples(args, cfg, run_dir)
    scorer = scorer_for(cfg.eval)  # a missing encoder fails before the model loads
    say(f"loading {args.model}")
    loaded = load_for_inference(args.model)
    loaded.config = loaded.config or cfg
    engine = loaded.engine()
    if data_info.train_overlap:
        say(f"warning: {data_info.train_overlap} of the {len(examples)} scored questions are in the run's "
            "training split")
    # a run that fully fine-tuned has a separate base model; a LoRA run disables its adapter
    base = base_model_context(loaded.model, cfg.model if run_dir is not None else None)
    say(f"evaluating {len(examples)} examples from {data_info.source} "
        f"(max_new_tokens {cfg.eval.max_new_tokens}, BERTScore {cfg.eval.bertscore_model}, "
        f"factual consistency {cfg.eval.factual_model})")
    with Progress() as progress:
        result = evaluate_examples(engine, examples, cfg.eval, seed=cfg.seed, base_model=base,
                                   base_model_note="" if run_dir else "the evaluated model is itself the base model",
                                   scorer=scorer, progress=progress, source=loaded.source,
                                   train_examples=train, data=data_info)

    output = Path(args.output) if args.output else None
    report = Path(args.report) if args.report else None
    if run_dir is not None and not args.data:
        output = output or run_dir / f"eval_{args.split}.json"
        report = report or run_dir / ("report" if args.split == "test" else f"report_{args.split}")
    if report is not None:
        title = f"medassist evaluation: {run_dir.name if run_dir else args.model} ({data_info.split})"
        result.report_html = str(write_report(result, report, run_dir / "metrics.jsonl" if run_dir else None, title))
    if output is not None:
        result.write_json(output)

    print(format_table(result))
    if output is not None:
        print(f"results: {output}")
    if report is not None:
        print(f"report: {result.report_html}")
    return 0


def format_table(result) -> str:
    """The verdicts, the means beside the baselines, the paired differences, the answer measures."""
    from medassist.evaluation.report import ci, num, pct, retrieval_flag, signed
    from medassist.evaluation.results import BASELINE_LABELS, METRICS

    lines = [f"better than {v.label}: {v.verdict} ({v.reason})" for v in result.verdicts]
    lines += [f"better than {BASELINE_LABELS.get(n, n)}: not scored ({note})" for n, note in result.baseline_notes.items()]
    flag = retrieval_flag(result)
    if flag:
        lines.append(f"warning: {flag}")
    systems = list(result.systems().values())
    width = 17
    header = f"\n{'metric':<24}" + "".join(f"{_short(s.name):>{width}}" for s in systems)
    lines.append(header)
    for key in ("factual_consistency", "bertscore_f1", "bertscore_precision", "bertscore_recall", "rouge_l",
                "perplexity", "token_accuracy", "mean_generated_tokens", "hit_max_new_tokens"):
        digits = 2 if key in ("perplexity", "mean_generated_tokens") else 4
        lines.append(f"{key:<24}" + "".join(f"{num(s.metric(key), digits).replace('–', '-'):>{width}}" for s in systems))
    for key, label in (("repetition_rate", "repeated trigrams"), ("question_echo_rate", "question echoes"),
                       ("length_ratio", "length / reference")):
        cells = [(pct if key != "length_ratio" else lambda v: num(v, 2))(getattr(s.answers, key)) for s in systems]
        lines.append(f"{label:<24}" + "".join(f"{c.replace('–', '-'):>{width}}" for c in cells))
    lines.append(f"\n{'model minus':<18}{'metric':<22}{'difference':>11}  {'95% interval':<21}{'W/T/L':>12}  better?")
    for c in result.comparisons:
        wtl = f"{c.wins}/{c.ties}/{c.losses}"
        lines.append(f"{_short(c.baseline):<18}{METRICS[c.metric].label:<22}{signed(c.difference):>11}  "
                     f"{ci(c.ci_low, c.ci_high):<21}{wtl:>12}  {c.verdict}")
    m = result.model
    lines.append(f"\n{result.n_examples} examples; references cut at the length limit: {num(m.references_cut)}; "
                 f"BERTScore hash {result.settings['bertscore']['hash']}")
    for column, groups in result.breakdowns.items():
        shown = ", ".join(f"{g.value} {g.n}" for g in groups[:8]) + (", ..." if len(groups) > 8 else "")
        lines.append(f"by {column} ({len(groups)} groups, in the report): {shown}")
    note = result.settings["bertscore"].get("note")
    if note:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def _short(name: str) -> str:
    return {"base_model": "base model", "nearest_training_answer": "nearest train",
            "repeat_question": "repeat question"}.get(name, name)
