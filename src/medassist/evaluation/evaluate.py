"""Evaluation: generate answers from questions alone, then score them against the references.

Every number stands beside baselines scored on the same examples: the untuned base model, and
a trivial answer that repeats the question. Generation goes through the one engine
(:mod:`medassist.engine`) that ``generate``, ``chat`` and ``serve`` use, so what is scored is
what users get. The metrics are in :mod:`medassist.evaluation.metrics`.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch

from medassist.config import EvalConfig, GenerationSettings
from medassist.data import QAExample
from medassist.engine import Engine, model_device
from medassist.evaluation.metrics import BertScorer, perplexity_and_accuracy, rouge_l, scorer_for

METRIC_KEYS = ("bertscore_precision", "bertscore_recall", "bertscore_f1", "perplexity", "token_accuracy", "rouge_l")
# given a phase description and its number of items, returns an update(n) callable (tqdm's update)
ProgressFactory = Callable[[str, int], Callable[[int], None]]


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else None


def score_texts(candidates: Sequence[str], references: Sequence[str], scorer: BertScorer) -> dict[str, Any]:
    """BERTScore P/R/F1 and ROUGE-L, means and per-example lists."""
    p, r, f = scorer.score(candidates, references)
    rl = rouge_l(candidates, references)
    return {
        "bertscore_precision": _mean(p), "bertscore_recall": _mean(r), "bertscore_f1": _mean(f),
        "rouge_l": _mean(rl), "per_example": {"bertscore_precision": p, "bertscore_recall": r,
                                               "bertscore_f1": f, "rouge_l": rl},
    }


def score_model(engine: Engine, examples: Sequence[QAExample], settings: GenerationSettings,
                scorer: BertScorer, ppl_batch_size: int = 8,
                progress: ProgressFactory | None = None, label: str = "model") -> dict[str, Any]:
    """Generate from the questions, score against the references, add perplexity/accuracy."""
    questions = [ex.question for ex in examples]
    references = [ex.answer for ex in examples]
    started = time.perf_counter()
    update = progress(f"generating ({label})", len(examples)) if progress else None
    answers = engine.answer(questions, settings, progress=update)
    generation_s = time.perf_counter() - started
    started = time.perf_counter()
    texts = [a.text for a in answers]
    result = score_texts(texts, references, scorer)
    result.update(perplexity_and_accuracy(engine.model, engine.fmt, engine.family, examples, ppl_batch_size))
    result.update({
        "n_examples": len(examples),
        "mean_generated_tokens": _mean([a.completion_tokens for a in answers]),
        "hit_max_new_tokens": _mean([float(a.hit_max_new_tokens) for a in answers]),
        "generated": texts,
        "generated_tokens": [a.completion_tokens for a in answers],
        "hit_max_per_example": [a.hit_max_new_tokens for a in answers],
        "timing": {"generation_seconds": generation_s, "scoring_seconds": time.perf_counter() - started},
    })
    return result


def repeat_question_baseline(examples: Sequence[QAExample], scorer: BertScorer) -> dict[str, Any]:
    """The trivial answer: the question itself. No model, so no perplexity or token accuracy."""
    result = score_texts([ex.question for ex in examples], [ex.answer for ex in examples], scorer)
    result.update({"perplexity": None, "token_accuracy": None, "n_examples": len(examples)})
    return result


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    keys = METRIC_KEYS + ("n_examples", "mean_generated_tokens", "hit_max_new_tokens")
    return {k: result[k] for k in keys if k in result}


def base_model_context(model, base_name: str | None) -> Callable[[], Any] | None:
    """A context manager factory yielding the untuned base model, or None when there is none.

    A PEFT model is its own base with the adapter switched off (no second load); otherwise
    ``base_name`` (a preset, hub id or folder) is loaded once for the baseline and dropped.
    """
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        PeftModel = ()
    if isinstance(model, PeftModel):
        @contextmanager
        def disabled() -> Iterator[Any]:
            with model.disable_adapter():
                yield model

        return disabled
    if not base_name:
        return None

    @contextmanager
    def loaded() -> Iterator[Any]:
        from medassist.models import load_pretrained

        base, _, _ = load_pretrained(base_name)
        base.to(model_device(model)).eval()
        try:
            yield base
        finally:
            del base

    return loaded


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
) -> dict[str, Any]:
    """Score ``model`` on ``examples`` beside the baselines; the full report dict.

    Keys: the metrics of ``METRIC_KEYS``, ``n_examples``, ``mean_generated_tokens``,
    ``hit_max_new_tokens`` (share of answers cut at ``max_new_tokens``), ``baselines``
    (``repeat_question`` always, ``base_model`` when ``base_model`` is given and
    ``ecfg.baselines``), ``settings`` and ``examples`` (question, reference, generated,
    bertscore_f1 and more, per example, in input order).
    """
    ecfg = ecfg or EvalConfig()
    scorer = scorer or scorer_for(ecfg)
    settings = ecfg.generation(seed=seed)
    examples = list(examples)
    main = score_model(engine, examples, settings, scorer, ecfg.batch_size, progress, "model")
    repeat_result = repeat_question_baseline(examples, scorer)
    baselines: dict[str, Any] = {"repeat_question": _summary(repeat_result)}
    repeat = repeat_result["per_example"]["bertscore_f1"]
    base = None
    if ecfg.baselines and base_model is not None:
        with base_model() as base_lm:
            base_engine = Engine(base_lm, engine.fmt, engine.family)
            base = score_model(base_engine, examples, settings, scorer, ecfg.batch_size, progress, "base model")
        baselines["base_model"] = _summary(base)
    elif ecfg.baselines:
        baselines["base_model"] = None
        baselines["base_model_note"] = base_model_note or "no separate base model: the evaluated model is the base"
    per = main["per_example"]
    rows = []
    for i, ex in enumerate(examples):
        row = {
            "question": ex.question, "reference": ex.answer, "generated": main["generated"][i],
            "bertscore_f1": per["bertscore_f1"][i], "bertscore_precision": per["bertscore_precision"][i],
            "bertscore_recall": per["bertscore_recall"][i], "rouge_l": per["rouge_l"][i],
            "generated_tokens": main["generated_tokens"][i], "hit_max_new_tokens": main["hit_max_per_example"][i],
            "repeat_question_bertscore_f1": repeat[i], "row": ex.row,
        }
        if base is not None:
            row["base_model_generated"] = base["generated"][i]
            row["base_model_bertscore_f1"] = base["per_example"]["bertscore_f1"][i]
        rows.append(row)
    result = _summary(main)
    result.update({
        "answer_tokens": main["answer_tokens"],
        "skipped_no_answer_tokens": main["skipped_no_answer_tokens"],
        "references_cut": main["references_cut"],
        "baselines": baselines,
        "settings": _settings(engine, ecfg, settings, scorer, source, main, base),
        "examples": rows,
    })
    return result


def _settings(engine: Engine, ecfg, settings, scorer, source, main, base) -> dict[str, Any]:
    import transformers

    import medassist

    timing = dict(main["timing"])
    if base is not None:
        timing["base_model_generation_seconds"] = base["timing"]["generation_seconds"]
    return {
        "model": source,
        "family": engine.family.name,
        "prompt_format": "chat template" if engine.fmt.uses_chat_template else "plain",
        "generation": settings.model_dump(mode="json"),
        "bertscore": scorer.settings(),
        "rouge": "ROUGE-L F-measure (rouge-score, Porter stemmer), mean over examples",
        "perplexity": "exp(total NLL / answer tokens) on the references, teacher forced; answer tokens "
                      "and EOS count, prompt and padding do not",
        "device": str(engine.device),
        "timing": timing,
        "versions": {"medassist": medassist.__version__, "transformers": transformers.__version__,
                     "torch": torch.__version__},
        "eval_config": ecfg.model_dump(mode="json"),
    }


# ---------------------------------------------------------------------------------------

def format_line(result: dict[str, Any]) -> str:
    """One line: the model's BERTScore F1 beside the baselines, perplexity and token accuracy."""
    baselines = result.get("baselines") or {}
    extra = [f"{label} {baselines[name]['bertscore_f1']:.4f}"
             for name, label in (("base_model", "base model"), ("repeat_question", "repeat question"))
             if baselines.get(name)]
    line = f"BERTScore F1 {result['bertscore_f1']:.4f}" + (f" ({', '.join(extra)})" if extra else "")
    return (f"{line}, perplexity {result['perplexity']:.2f}, token accuracy {result['token_accuracy']:.3f}, "
            f"ROUGE-L {result['rouge_l']:.4f}")

