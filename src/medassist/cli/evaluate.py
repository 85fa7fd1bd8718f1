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
import json
from pathlib import Path

from medassist.cli.common import Progress, say
from medassist.errors import DataError


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate", help="generate answers and score them (factual consistency, BERTScore, ...) beside baselines",
        description="Generate answers from questions alone and score them against the reference answers, "
        "beside the untuned base model, the answer of the nearest training question and 'repeat the question', "
        "with paired 95% bootstrap intervals for every difference.",
    )
    p.add_argument("--model", required=True, metavar="RUN_DIR|PRESET|PATH",
                   help="a run directory, one of its checkpoints (RUN/checkpoints/checkpoint-N: scored on the "
                        "run's split with its prompts), a preset (medassist models), a hub id or a model folder")
    p.add_argument("--data", metavar="FILE", help="score every cleaned row of this file instead of a split")
    p.add_argument("--split", choices=["test", "validation"], default="test",
                   help="which held-out split of the run (or of the configured data) to score (default: test)")
    p.add_argument("--limit", type=int, metavar="N", help="score only the first N examples (default for a run's "
                   "test split: the eval.test_limit rows its training-end report scored; --set eval.test_limit=null for all)")
    p.add_argument("--output", metavar="OUT.json", help="write the full result as JSON "
                   "(default for a run: RUN/eval_SPLIT.json)")
    p.add_argument("--report", metavar="DIR", help="write report.html and plots here "
                   "(default for a run: RUN/report for test, RUN/report_validation)")
    p.add_argument("--max-new-tokens", type=int, help="override eval.max_new_tokens")
    p.add_argument("--no-baselines", action="store_true", help="skip the base-model baseline")
    p.add_argument("--index", metavar="INDEX_DIR",
                   help="answer with passages retrieved from this index (a run trained with retrieval uses its "
                   "own); the same model is also scored without them. Rows of the evaluated questions are "
                   "never retrieved")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key, e.g. eval.factual_model=path/to/mnli; repeatable")
    p.set_defaults(func=cmd_evaluate)

    p = subparsers.add_parser(
        "compare", help="paired comparison of two runs' evaluations (no generation)",
        description="Compare run A with run B on the questions both evaluations scored, from their eval_SPLIT.json "
        "(e.g. the retrieval-augmented recipe against the same recipe without retrieval): paired differences "
        "with 95% bootstrap intervals and a verdict, beside every baseline run A was scored with. Nothing is "
        "generated: both evaluations must exist (medassist train writes them; medassist evaluate rewrites them).",
    )
    p.add_argument("model", metavar="RUN_A|EVAL_A.json", help="the run (or evaluation file) being judged")
    p.add_argument("other", metavar="RUN_B|EVAL_B.json", help="the run (or evaluation file) to compare it with")
    p.add_argument("--split", choices=["test", "validation"], default="test",
                   help="which evaluation of a run directory (default: test)")
    p.add_argument("--output", metavar="OUT.json", help="write the comparison as JSON")
    p.add_argument("--report", metavar="DIR", help="write report.html and plots here")
    p.add_argument("--resamples", type=int, default=None, metavar="N",
                   help="paired bootstrap resamples (default: run A's eval.bootstrap_resamples)")
    p.add_argument("--seed", type=int, default=42, help="bootstrap seed (default 42)")
    p.set_defaults(func=cmd_compare)


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
    elif not args.data and split == "test":  # the rows the training-end report scored (eval.test_limit, seeded)
        from medassist.training.examples import _test_subset

        examples = _test_subset(examples, cfg)
    if not examples:
        raise DataError(f"{source}: no examples to evaluate in '{split}'")
    overlap = 0
    if train is not None:  # over the scored examples only, not the whole file
        seen = {question_key(ex.question) for ex in train}
        overlap = sum(question_key(ex.question) in seen for ex in examples)
    limit = args.limit if args.limit is not None or args.data or split != "test" else cfg.eval.test_limit
    return examples, train, DataInfo(source=source, split=split, n_examples=len(examples), limit=limit,
                                      train_overlap=overlap)


def _retrieve(args, cfg, run_dir: Path | None, examples, train):
    """Each example's passages from the run's (or --index) index; its own rows never come back."""
    from medassist.cli.index import _Bars
    from medassist.data import read_split
    from medassist.retrieval.augment import RunSources, cached_retrieve, describe, open_book, open_index

    heldout = list(examples)
    if run_dir is not None:  # the run's held-out splits too: a built corpus may contain them
        heldout += [ex for split in ("validation", "test") if (run_dir / "splits" / f"{split}.jsonl").is_file()
                    for ex in read_split(run_dir / "splits" / f"{split}.jsonl")]
    bars = _Bars()
    try:
        retriever = open_index(cfg.retrieval, run_dir, train or [], heldout, None if args.data else cfg.data,
                               bars, say)
        open_book(retriever, cfg.retrieval)
        rcfg = cfg.retrieval.model_copy(update={"exclude_own_group": True})
        cache = run_dir / "retrieval" / f"eval_{args.split}.jsonl" if run_dir is not None and not args.data else None
        retrieved, _ = cached_retrieve(cache, retriever, examples, rcfg, progress=bars)
    finally:
        bars.close()
    say(f"retrieval: {describe(retrieved)}")
    return retrieved, RunSources(retriever, rcfg).info()


def cmd_evaluate(args: argparse.Namespace) -> int:
    from medassist.config import load_config
    from medassist.evaluation import base_model_context, evaluate_examples, scorer_for
    from medassist.evaluation.cache import reuse_line
    from medassist.evaluation.report import write_report
    from medassist.models import load_for_inference

    from medassist.rundir import RunDir

    ref = Path(args.model)
    checkpoint = RunDir.of_checkpoint(ref)  # a checkpoint is scored on its run's split, like the run
    run_dir = ref if _is_run_dir(ref) else (checkpoint.path if checkpoint is not None else None)
    suffix = f"_{ref.name}" if checkpoint is not None else ""
    overrides = list(args.set or [])
    if args.max_new_tokens is not None:
        overrides.append(f"eval.max_new_tokens={args.max_new_tokens}")
    if args.no_baselines:
        overrides.append("eval.baselines=false")
    if args.index:
        overrides += ["retrieval.enabled=true", f"retrieval.index={Path(args.index).resolve()}"]
    if run_dir is not None:
        cfg = load_config(run_dir / "config.yaml", overrides)
    else:
        cfg = load_config(None, overrides + [f"model={args.model}"])

    examples, train, data_info = _load_examples(args, cfg, run_dir)
    scorer = scorer_for(cfg.eval)  # a missing encoder fails before the model loads
    retrieved = retrieval_info = None
    if cfg.retrieval.enabled:
        retrieved, retrieval_info = _retrieve(args, cfg, run_dir, examples, train)
    say(f"loading {args.model}")
    loaded = load_for_inference(args.model, merge=False)  # merged once the base model has answered
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
                                   train_examples=train, data=data_info, retrieved=retrieved,
                                   retrieval_info=retrieval_info, merge=True)

    if line := reuse_line(result.settings):
        say(line)
    output = Path(args.output) if args.output else None
    report = Path(args.report) if args.report else None
    if run_dir is not None and not args.data:
        output = output or run_dir / f"eval_{args.split}{suffix}.json"
        report = report or run_dir / (("report" if args.split == "test" else f"report_{args.split}") + suffix)
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


def _stored(ref: str, split: str):
    """(path, EvalResult) of a run directory's eval_SPLIT.json, or of an evaluation file."""
    from medassist.evaluation.results import EvalResult
    from medassist.rundir import RunDir

    path = Path(ref)
    if path.is_dir():
        path = RunDir(path).eval_file(split)
    try:
        return path, EvalResult.from_json(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise DataError(f"{path}: not found (evaluate the run first: medassist evaluate --model RUN)") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not an evaluation result ({str(exc).splitlines()[0][:120]})") from None


def _system(rows, name: str, label: str, baseline: str | None = None):
    """A SystemResult from stored per-example rows: the model's (baseline None) or a baseline's."""
    from medassist.evaluation.answers import answer_stats
    from medassist.evaluation.evaluate import _mean
    from medassist.evaluation.results import SystemResult

    parts = [r if baseline is None else r.baselines[baseline] for r in rows]
    texts = [p.generated if baseline is None else p.text for p in parts]
    keys = sorted({k for p in parts for k in p.scores})
    per = {k: [p.scores.get(k) for p in parts] for k in keys}
    stats = answer_stats(texts, [r.reference for r in rows], [r.question for r in rows])
    return SystemResult(name=name, label=label, n_examples=len(rows), per_example=per, generated=texts, answers=stats,
                        **{k: _mean(v) for k, v in per.items() if k in SystemResult.model_fields})


def cmd_compare(args: argparse.Namespace) -> int:
    from medassist.data import QAExample
    from medassist.evaluation.evaluate import assemble
    from medassist.evaluation.report import write_report

    path_a, a = _stored(args.model, args.split)
    path_b, b = _stored(args.other, args.split)
    for what in ("bertscore", "factual_consistency"):
        mine, theirs = a.settings.get(what), b.settings.get(what)
        mine, theirs = (mine.get("hash"), theirs.get("hash")) if isinstance(mine, dict) and isinstance(
            theirs, dict) else (mine, theirs)
        if mine and theirs and mine != theirs:
            raise DataError(f"{path_a} and {path_b} were scored differently ({what}: {mine} vs {theirs}); "
                            "evaluate both with the same settings")
    theirs = {(r.row, r.question): r for r in b.examples}
    rows = [r for r in a.examples if (r.row, r.question) in theirs]
    if not rows:
        raise DataError(f"{path_a} and {path_b} scored no question in common (same data, split and seed?)")
    if len(rows) < len(a.examples) or len(rows) < len(b.examples):
        say(f"comparing on the {len(rows)} questions both scored ({len(a.examples)} and {len(b.examples)} scored)")
    main_ = _system(rows, "model", a.model.label)
    baselines = {name: _system(rows, name, s.label, name) for name, s in a.baselines.items()
                 if all(name in r.baselines for r in rows)}
    other_label = f"run {Path(args.other).name}" if Path(args.other).is_dir() else str(path_b)
    baselines["other_run"] = _system([theirs[(r.row, r.question)] for r in rows], "other_run", other_label)
    examples = [QAExample(r.question, r.reference, r.row, meta=dict(r.meta)) for r in rows]
    resamples = args.resamples or int((a.settings.get("eval_config") or {}).get("bootstrap_resamples", 2000))
    data = a.data.model_copy(update={"n_examples": len(rows)})
    result = assemble(examples, main_, baselines, a.baseline_notes, resamples=resamples, seed=args.seed, data=data,
                      settings={**a.settings, "compared_with": str(path_b)})
    result.retrieval = a.retrieval if len(rows) == len(a.examples) else None
    for new, old in zip(result.examples, rows):
        new.sources = old.sources
    if args.report:
        result.report_html = str(write_report(result, Path(args.report), None, f"medassist: {path_a} vs {path_b}"))
    if args.output:
        result.write_json(Path(args.output))
    print(format_table(result))
    for what, where in (("results", args.output), ("report", result.report_html)):
        if where:
            print(f"{what}: {where}")
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
    if result.retrieval is not None:
        lines.append(retrieval_lines(result.retrieval))
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


def retrieval_lines(r) -> str:
    """Retrieval recall and how far each system's answers follow the sources."""
    from medassist.evaluation.report import num, pct

    support = ", ".join(f"{_short(name)} {num(v, 3)} ({pct(r.supported_share.get(name))} supported)"
                        for name, v in r.source_support.items())
    return (f"\nretrieval ({r.variant}, k {r.k}, threshold {r.min_score:g}, index {r.index}): "
            f"{r.with_source} of {r.n_examples} questions had a source; {r.mean_passages_in_prompt:.2f} passages "
            f"per prompt; recall@{r.k} {pct(r.recall_at_k)} (same focus {pct(r.recall_focus_at_k)}, same page "
            f"{pct(r.recall_url_at_k)}; {r.n_labelled} questions with focus/url); own rows in prompts: "
            f"{r.own_reference_hits}; reference 8-grams in the passages {pct(r.reference_overlap)}"
            f"{'; held-out collections open' if r.heldout_corpus == 'open' else ''}"
            f"\nsupport by the sources (factual consistency with the passages; supported "
            f">= {r.support_threshold:g}): {support or '-'}")


def _short(name: str) -> str:
    return {"base_model": "base model", "nearest_training_answer": "nearest train",
            "repeat_question": "repeat question", "no_retrieval": "no retrieval",
            "other_run": "other run"}.get(name, name)
