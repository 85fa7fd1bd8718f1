"""Evaluation: generate answers from questions alone, score them, and compare with baselines.

Every number stands beside baselines scored on the same examples (:mod:`.baselines`): the
untuned base model, the answer of the nearest training question, and the question repeated.
The model is compared with each by paired bootstrap intervals (:mod:`.compare`), and the result
says per baseline whether the model is better: yes, no, or can't tell. Generation goes through
the one engine (:mod:`medassist.engine`) that ``generate``, ``chat`` and ``serve`` use, so what
is scored is what users get. The metrics are in :mod:`.metrics`, the text measures (loops,
question echoes, length) in :mod:`.answers`, the result types in :mod:`.results`.
"""

from __future__ import annotations

import time
from statistics import fmean
from typing import Any, Callable, Sequence

import torch

from medassist.config import EvalConfig, GenerationSettings
from medassist.data import QAExample
from medassist.engine import Engine
from medassist.formatting import Passage
from medassist.retrieval.augment import Retrieved, passages_of
from medassist.evaluation.answers import answer_stats
from medassist.evaluation.baselines import Embed, encoder_embed, nearest_training_answers
from medassist.evaluation.cache import key_parts, open_entry, text_key_parts
from medassist.evaluation.compare import breakdowns, compare, verdict_for
from medassist.evaluation.metrics import (
    BertScorer, factual_consistency, factual_scorer_for, perplexity_and_accuracy, perplexity_dtype, rouge_l,
    scorer_for,
)
from medassist.evaluation.results import (
    BASELINE_LABELS, BaselineAnswer, DataInfo, EvalResult, ExampleRow, SourceRef, SystemResult,
)

# the means a training evaluation logs (eval_<key>)
METRIC_KEYS = ("bertscore_precision", "bertscore_recall", "bertscore_f1", "perplexity", "token_accuracy", "rouge_l",
               "factual_consistency")
TEXT_METRICS = ("bertscore_precision", "bertscore_recall", "bertscore_f1", "rouge_l", "factual_consistency")
# given a phase description and its number of items, returns an update(n) callable (tqdm's update)
ProgressFactory = Callable[[str, int], Callable[[int], None]]


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return fmean(present) if present else None


def score_texts(name: str, texts: Sequence[str], examples: Sequence[QAExample], scorer: BertScorer,
                factual=None) -> SystemResult:
    """A system that answered ``texts``: BERTScore P/R/F1, ROUGE-L, factual consistency, text measures."""
    questions = [ex.question for ex in examples]
    references = [ex.answer for ex in examples]
    p, r, f = scorer.score(texts, references)
    per = {"bertscore_precision": p, "bertscore_recall": r, "bertscore_f1": f, "rouge_l": rouge_l(texts, references)}
    if factual is not None:
        per["factual_consistency"] = factual_consistency(factual, texts, references, questions)
    return SystemResult(
        name=name, label=BASELINE_LABELS.get(name, name), n_examples=len(examples),
        **{k: _mean(v) for k, v in per.items()}, per_example=per, generated=list(texts),
        answers=answer_stats(texts, references, questions),
    )


def score_model(engine: Engine, examples: Sequence[QAExample], settings: GenerationSettings,
                scorer: BertScorer, ppl_batch_size: int = 16, progress: ProgressFactory | None = None,
                label: str = "model", factual=None, name: str = "model",
                passages: Sequence[Sequence[Passage]] | None = None, ppl_dtype=None) -> SystemResult:
    """Generate from the questions (and each one's ``passages``, with retrieval), score against
    the references, add perplexity/accuracy (of the references after the same prompts; under
    autocast to ``ppl_dtype`` when given)."""
    examples = list(examples)
    started = time.perf_counter()
    update = progress(f"generating ({label})", len(examples)) if progress else None
    answers = engine.answer([ex.question for ex in examples], settings, progress=update, passages=passages)
    generation_s = time.perf_counter() - started
    started = time.perf_counter()
    result = score_texts(name, [a.text for a in answers], examples, scorer, factual)
    ppl = perplexity_and_accuracy(engine.model, engine.fmt, engine.family, examples, ppl_batch_size,
                                  passages=passages, autocast=ppl_dtype)
    hit = [a.hit_max_new_tokens for a in answers]
    result.per_example["log_perplexity"] = ppl["log_perplexity"]
    result.answers = answer_stats(result.generated, [ex.answer for ex in examples],
                                  [ex.question for ex in examples], hit)
    for key in ("perplexity", "token_accuracy", "answer_tokens", "references_cut", "skipped_no_answer_tokens"):
        setattr(result, key, ppl[key])
    result.mean_generated_tokens = _mean([a.completion_tokens for a in answers])
    result.hit_max_new_tokens = _mean([float(h) for h in hit])
    result.generated_tokens = [a.completion_tokens for a in answers]
    result.hit_max_per_example = hit
    result.timing = {"generation_seconds": generation_s, "scoring_seconds": time.perf_counter() - started}
    return result


def evaluate_examples(
    engine: Engine,
    examples: Sequence[QAExample],
    ecfg: EvalConfig | None = None,
    *,
    seed: int = 42,
    base_model: Callable[[], Any] | None = None,
    base_model_note: str = "",
    scorer: BertScorer | None = None,
    progress: ProgressFactory | None = None,
    source: str = "",
    train_examples: Sequence[QAExample] | None = None,
    embed: Embed | None = None,
    data: DataInfo | None = None,
    retrieved: Sequence[Retrieved] | None = None,
    retrieval_info: dict[str, Any] | None = None,
    merge: bool = False,
) -> EvalResult:
    """Score the model on ``examples`` beside the baselines; compare it with each.

    ``base_model``: a context-manager factory yielding the untuned model
    (:func:`~medassist.evaluation.baselines.base_model_context`). ``train_examples``: what the
    nearest-training-answer baseline searches (none: that baseline is skipped, with a note).
    ``embed``: the question encoder of that baseline (default: ``eval.retrieval_encoder``).
    ``retrieved``: each example's passages (:mod:`medassist.retrieval.augment`): the model and
    the base model answer with them in the prompt, the same model also answers without them
    (the ``no_retrieval`` system), and the result says how retrieval did
    (:mod:`.grounding`; ``retrieval_info``: index, k, min_score, blocked passages).
    ``merge``: the model's LoRA adapter is merged into its weights once the base model (the
    adapter switched off) has answered, so the model answers as ``load_for_inference`` serves
    it, 1.5x faster (:func:`~medassist.models.merge_adapter`, in place: only for a model whose
    adapter nothing needs afterwards).
    """
    ecfg = ecfg or EvalConfig()
    scorer = scorer or scorer_for(ecfg)
    factual = factual_scorer_for(ecfg)
    settings = ecfg.generation(seed=seed)
    examples = list(examples)
    passages = passages_of(retrieved)
    ppl = dict(ppl_batch_size=ecfg.perplexity_batch_size, ppl_dtype=perplexity_dtype(ecfg))
    cached: dict[str, dict[str, Any]] = {}  # what the baseline cache did, per baseline
    base = None
    if ecfg.baselines and base_model is not None:  # first: a LoRA model is its own base until merged
        with base_model() as base_lm:
            base_engine = Engine(base_lm, engine.fmt, engine.family, batching=engine.batching)
            base = _cached("base_model", ecfg.cache_baselines, cached, progress, len(examples),
                           lambda: key_parts(base_lm, base_engine, examples, settings, scorer, factual, passages, ppl),
                           lambda: score_model(base_engine, examples, settings, scorer, progress=progress,
                                               label="base model", factual=factual, name="base_model",
                                               passages=passages, **ppl))
        if passages is not None:
            base.label = "the base model with retrieval"
    if merge:
        from medassist.models import merge_adapter

        engine = Engine(merge_adapter(engine.model), engine.fmt, engine.family, batching=engine.batching)
    main = score_model(engine, examples, settings, scorer, progress=progress, factual=factual, passages=passages,
                       label="model" if passages is None else "model with retrieval", **ppl)
    baselines: dict[str, SystemResult] = {}
    notes: dict[str, str] = {}
    if passages is not None:
        baselines["no_retrieval"] = score_model(engine, examples, settings, scorer, progress=progress, factual=factual,
                                                label="model without retrieval", name="no_retrieval", **ppl)
    if base is not None:
        baselines["base_model"] = base
    elif ecfg.baselines:
        notes["base_model"] = base_model_note or "no separate base model: the evaluated model is the base"
    else:
        notes["base_model"] = "eval.baselines is false"
    if ecfg.retrieval_baseline and train_examples:
        train = list(train_examples)
        baselines["nearest_training_answer"] = _cached(
            "nearest_training_answer", ecfg.cache_baselines and embed is None, cached, progress, len(examples),
            lambda: text_key_parts("nearest_training_answer", examples, scorer, factual, train, ecfg.retrieval_encoder),
            lambda: _nearest_answers(train, examples, embed or encoder_embed(ecfg.retrieval_encoder), scorer, factual,
                                     progress))
    else:
        notes["nearest_training_answer"] = ("eval.retrieval_baseline is false" if not ecfg.retrieval_baseline
                                            else "no training split to search (evaluate a run directory for it)")
    baselines["repeat_question"] = _cached(
        "repeat_question", ecfg.cache_baselines, cached, progress, len(examples),
        lambda: text_key_parts("repeat_question", examples, scorer, factual),
        lambda: score_texts("repeat_question", [ex.question for ex in examples], examples, scorer, factual))

    data = data or DataInfo(n_examples=len(examples))
    if train_examples is not None:
        data.train_examples = len(train_examples)
    settings_used = _settings(engine, ecfg, settings, scorer, factual, source, {"model": main, **baselines}, seed)
    if cached:
        settings_used["baseline_cache"] = cached
    grounding = None
    if retrieved is not None:
        grounding = _grounding(engine, examples, retrieved, {"model": main, **baselines}, factual,
                               retrieval_info or {})
        settings_used["retrieval"] = retrieval_info or {}
    result = assemble(examples, main, baselines, notes, resamples=ecfg.bootstrap_resamples, seed=seed, data=data,
                      settings=settings_used)
    if retrieved is not None:
        result.retrieval, in_prompt = grounding
        for row, r, kept in zip(result.examples, retrieved, in_prompt):
            row.sources = [SourceRef(title=h.title, url=h.url, score=h.score, focus=h.focus, in_prompt=j < kept,
                                     relevant=_relevant(h, row.meta)) for j, h in enumerate(r.hits)]
    return result


def _cached(name: str, enabled: bool, infos: dict[str, dict[str, Any]], progress: ProgressFactory | None,
            n: int, parts: Callable[[], dict[str, Any]], compute: Callable[[], SystemResult]) -> SystemResult:
    """Baseline ``name`` from the cache (:mod:`.cache`) where ``enabled`` and an entry has the same
    key, else computed (and stored where ``enabled``); ``infos[name]`` says which."""
    entry = open_entry(parts, name) if enabled else None
    result = entry.load() if entry is not None else None
    if result is not None and progress:
        progress(f"{BASELINE_LABELS.get(name, name)}: scored answers from the cache", n)(n)
    if result is None:
        started = time.perf_counter()
        result = compute()
        result.timing = result.timing or {"seconds": time.perf_counter() - started}
        if entry is not None:
            entry.save(result)
    if entry is not None:
        infos[name] = entry.info
    return result


def _nearest_answers(train: list[QAExample], examples: list[QAExample], embed: Embed, scorer: BertScorer, factual,
                     progress: ProgressFactory | None) -> SystemResult:
    """The nearest-training-question baseline, scored (:func:`.baselines.nearest_training_answers`)."""
    update = progress("nearest training question", len(examples)) if progress else None
    found = nearest_training_answers(train, examples, embed)
    if update:
        update(len(examples))
    result = score_texts("nearest_training_answer", [h.answer if h else "" for h in found], examples, scorer, factual)
    result.answer_source_rows = [h.row if h else None for h in found]
    return result


def _grounding(engine: Engine, examples: list[QAExample], retrieved: Sequence[Retrieved],
               systems: dict[str, SystemResult], factual, info: dict[str, Any]):
    """Source support of each system that answered from these questions (added to its
    per-example scores), and the RetrievalEval; returns it with the passages kept per prompt."""
    from medassist.evaluation import grounding

    in_prompt = [engine.fmt.fit_passages(ex.question, passages=r.passages()) for ex, r in zip(examples, retrieved)]
    questions = [ex.question for ex in examples]
    support = {}
    for name in ("model", "no_retrieval", "base_model"):
        if name in systems:
            values = grounding.source_support(factual, systems[name].generated, in_prompt, questions)
            systems[name].per_example["source_support"] = values
            systems[name].source_support = _mean(values)
            support[name] = values
    kept = [len(p) for p in in_prompt]
    summary = grounding.summarize(examples, retrieved, kept, support, index=str(info.get("index", "")),
                                  k=int(info.get("k", 0)), min_score=float(info.get("min_score", 0.0)),
                                  blocked=int(info.get("blocked_passages", 0)),
                                  heldout_corpus=str(info.get("heldout_corpus", "blocked")))
    return summary, kept


def _relevant(hit, meta: dict[str, str]) -> bool | None:
    from medassist.evaluation.grounding import relevance

    if not (meta.get("focus") or meta.get("url")):
        return None
    return any(relevance(hit, meta))


def assemble(examples: Sequence[QAExample], main: SystemResult, baselines: dict[str, SystemResult],
             notes: dict[str, str] | None = None, *, resamples: int = 2000, seed: int = 42,
             data: DataInfo | None = None, settings: dict[str, Any] | None = None) -> EvalResult:
    """The result from scored systems: paired comparisons with every baseline, one verdict per
    baseline, breakdowns by the examples' metadata, and the per-example rows."""
    comparisons = [c for b in baselines.values() for c in compare(main, b, resamples=resamples, seed=seed)]
    labels = {name: b.label if b.label and b.label != name else None for name, b in baselines.items()}
    sources = (baselines["nearest_training_answer"].answer_source_rows if "nearest_training_answer" in baselines
               else [])
    return EvalResult(
        n_examples=len(examples), model=main, baselines=baselines, baseline_notes=notes or {},
        verdicts=[verdict_for(name, comparisons, labels[name]) for name in baselines],
        comparisons=comparisons,
        breakdowns=breakdowns([ex.meta for ex in examples], {"model": main, **baselines}, resamples=resamples,
                              seed=seed),
        data=data or DataInfo(n_examples=len(examples)), settings=settings or {},
        examples=_rows(examples, main, baselines, sources),
    )


def _rows(examples, main: SystemResult, baselines: dict[str, SystemResult], sources) -> list[ExampleRow]:
    def scores(system: SystemResult, i: int) -> dict[str, float | None]:
        return {k: v[i] for k, v in system.per_example.items()}

    def at(values: list, i: int):
        return values[i] if values else None

    rows = []
    for i, ex in enumerate(examples):
        others = {name: BaselineAnswer(text=b.generated[i], scores=scores(b, i),
                                       source_row=sources[i] if sources and name == "nearest_training_answer"
                                       else None)
                  for name, b in baselines.items()}
        rows.append(ExampleRow(
            index=i, row=ex.row, question=ex.question, reference=ex.answer, meta=dict(ex.meta),
            generated=main.generated[i], generated_tokens=at(main.generated_tokens, i),
            hit_max_new_tokens=at(main.hit_max_per_example, i), scores=scores(main, i), baselines=others,
        ))
    return rows


def _settings(engine: Engine, ecfg, settings, scorer, factual, source, systems, seed) -> dict[str, Any]:
    import transformers

    import medassist

    timing = {f"{name}_{k}": v for name, s in systems.items() for k, v in s.timing.items()}
    return {
        "model": source,
        "family": engine.family.name,
        "prompt_format": "chat template" if engine.fmt.uses_chat_template else "plain",
        "generation": settings.model_dump(mode="json"),
        "bertscore": scorer.settings(),
        "factual_consistency": getattr(factual, "name", str(factual)),
        "rouge": "ROUGE-L F-measure (rouge-score, Porter stemmer), mean over examples",
        "perplexity": "exp(total NLL / answer tokens) on the references, teacher forced; answer tokens "
                      "and EOS count, prompt and padding do not; log perplexity is per example",
        "statistics": f"paired bootstrap (scipy.stats.bootstrap, BCa), {ecfg.bootstrap_resamples} resamples, "
                      f"seed {seed}, 95% intervals of the mean per-question difference",
        "device": str(engine.device),
        "timing": timing,
        "versions": {"medassist": medassist.__version__, "transformers": transformers.__version__,
                     "torch": torch.__version__},
        "eval_config": ecfg.model_dump(mode="json"),
    }


# ---------------------------------------------------------------------------------------
def format_line(result: EvalResult) -> str:
    """One line: the verdicts, then the model's BERTScore F1, factual consistency and perplexity."""
    m = result.model
    verdicts = "; ".join(f"better than {v.label}: {v.verdict}" for v in result.verdicts)

    def num(value, fmt):
        return "-" if value is None else format(value, fmt)

    return (f"{verdicts}. BERTScore F1 {num(m.bertscore_f1, '.4f')}, factual consistency "
            f"{num(m.factual_consistency, '.4f')}, perplexity {num(m.perplexity, '.2f')}, "
            f"ROUGE-L {num(m.rouge_l, '.4f')}")
