"""Evaluation: generate answers from questions alone, then score them against the references.

Every number stands beside two baselines scored on the same examples: the untuned base
model, and a trivial answer that repeats the question. The metrics:

- **BERTScore** (Zhang et al. 2020) through the ``bert_score`` library: each candidate token
  is matched to its most similar reference token (cosine of contextual embeddings from one
  encoder layer); precision averages over candidate tokens, recall over reference tokens,
  F1 is their harmonic mean. Per example, then averaged over examples.
- **Perplexity**: ``exp(total NLL / number of answer tokens)`` of the *reference* answers under
  teacher forcing, with the training mask (answer tokens and EOS count; prompt and padding
  never do). Pooled over all answer tokens of all examples, not averaged per example.
- **Token accuracy**: the share of those answer tokens that are the model's argmax prediction.
- **ROUGE-L**: the F-measure of the longest common subsequence of words (``rouge-score``,
  Porter stemming), per example, averaged.

``make_training_evaluator`` is what the trainer calls each evaluation;
``evaluate_run_after_training`` scores the test split and writes the report at the end of a run.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from medassist.config import EvalConfig, TrainConfig
from medassist.data import QAExample
from medassist.errors import ConfigError, ModelError
from medassist.formatting import IGNORE_INDEX, Format
from medassist.generation import GenerationSettings, generate_answers, model_device

METRIC_KEYS = ("bertscore_precision", "bertscore_recall", "bertscore_f1", "perplexity", "token_accuracy", "rouge_l")
# given a phase description and its number of items, returns an update(n) callable (tqdm's update)
ProgressFactory = Callable[[str, int], Callable[[int], None]]


# ---------------------------------------------------------------------------------------
# BERTScore
class BertScorer:
    """One ``bert_score.BERTScorer`` (the encoder is loaded once), with medassist's presets.

    ``model``: a preset (``minilm-l6``, ``deberta-xlarge-mnli``), hub id or folder. ``layer``:
    the encoder layer whose embeddings are compared; None = the preset's, or bert_score's own
    default for the hub models it knows. ``idf``: weight tokens by inverse document frequency,
    computed from the references of each :meth:`score` call (as ``bert_score.score`` does).
    ``rescale``: rescale with bert_score's baseline; for an encoder it has no baseline for
    (any local folder), scores stay raw and :attr:`note` says so.

    Use :func:`get_bert_scorer` to share one scorer per process and setting.
    """

    def __init__(self, model: str = "minilm-l6", layer: int | None = None, idf: bool = False,
                 rescale: bool = False, batch_size: int = 64, device: str | None = None) -> None:
        import bert_score
        from transformers.utils import logging as hf_logging

        self.name = model
        self.model_type, default_layer, requirement = _resolve_encoder(model)
        self.layer = layer if layer is not None else default_layer
        if self.layer is None:
            raise ConfigError(
                f"eval.bertscore_layer: required for encoder '{model}' (bert_score has no default layer for it)"
            )
        self.idf = idf
        self.rescale_requested = rescale
        self.batch_size = batch_size
        self.note = ""
        baseline = Path(bert_score.__file__).parent / "rescale_baseline" / "en" / f"{self.model_type}.tsv"
        self.rescale = rescale and baseline.is_file()
        if rescale and not self.rescale:
            self.note = (f"bert_score has no rescaling baseline for '{model}' (it ships baselines only for "
                         "hub encoders it knows); scores are raw, not rescaled")
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # library code stays quiet
        try:
            self._scorer = bert_score.BERTScorer(
                model_type=self.model_type, num_layers=self.layer, idf=False,
                rescale_with_baseline=self.rescale, lang="en" if self.rescale else None, device=device,
            )
        except AssertionError as exc:  # bert_score checks the layer range with assert
            raise ConfigError(f"eval.bertscore_layer: {exc}") from None
        except (OSError, ValueError) as exc:
            raise ModelError(f"BERTScore encoder '{model}' cannot be loaded ({type(exc).__name__}); "
                             f"{requirement}") from None
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        self._scorer._idf = idf  # idf weights are set per call from that call's references

    @property
    def hash(self) -> str:
        """bert_score's own description of the settings (model, layer, idf, rescaling, versions)."""
        return self._scorer.hash

    def settings(self) -> dict[str, Any]:
        return {
            "model": self.name, "model_type": self.model_type, "layer": self.layer, "idf": self.idf,
            "rescale_with_baseline": self.rescale, "rescale_requested": self.rescale_requested,
            "hash": self.hash, "note": self.note,
            "max_tokens": int(getattr(self._scorer._tokenizer, "model_max_length", 0) or 0),
        }

    def score(self, candidates: Sequence[str], references: Sequence[str]) -> tuple[list[float], list[float], list[float]]:
        """Per-example (precision, recall, F1), equal to ``bert_score.score`` with these settings.

        An empty (or blank) text scores a raw 0, which is what bert_score means to do; its own
        empty-text path fails under transformers 5, so such pairs never reach it.
        """
        if len(candidates) != len(references):
            raise ValueError("candidates and references differ in number")
        from bert_score.utils import get_idf_dict

        filled = [i for i, (c, r) in enumerate(zip(candidates, references)) if c.strip() and r.strip()]
        zero = [0.0, 0.0, 0.0]
        if self.rescale:
            zero = [(0.0 - b) / (1.0 - b) for b in self._scorer.baseline_vals.tolist()]
        out = [list(zero) for _ in candidates]
        if filled:
            if self.idf:  # from all references of this call, as bert_score.score(idf=True) does
                self._scorer._idf_dict = get_idf_dict(list(references), self._scorer._tokenizer, nthreads=0)
            with contextlib.redirect_stdout(io.StringIO()):  # bert_score prints its warnings
                p, r, f = self._scorer.score([candidates[i] for i in filled], [references[i] for i in filled],
                                             batch_size=self.batch_size)
            for k, i in enumerate(filled):
                out[i] = [float(p[k]), float(r[k]), float(f[k])]
        return [o[0] for o in out], [o[1] for o in out], [o[2] for o in out]


def _resolve_encoder(model: str) -> tuple[str, int | None, str]:
    """(what bert_score loads, default layer, what to install or download when it fails)."""
    from bert_score.utils import model2layers

    from medassist.models import PRESETS, minilm_folder

    preset = PRESETS.get(model)
    if preset is None:
        return model, model2layers.get(model), "give a hub id (with network access) or a local encoder folder"
    if preset.family != "encoder":
        raise ConfigError(f"eval.bertscore_model: '{model}' is a {preset.family} model, not an encoder "
                          "(use minilm-l6, deberta-xlarge-mnli, a hub id or a folder)")
    if not preset.available():  # fail at once, not after the hub client's retries
        hint = f" (or give the hub id {preset.hub_id} to download it)" if preset.hub_id else ""
        raise ModelError(f"BERTScore encoder '{model}' is not available here: {preset.requirement}{hint}")
    if preset.name == "minilm-l6":
        return str(minilm_folder()), preset.bertscore_layer, preset.requirement
    return preset.hub_id or model, preset.bertscore_layer, preset.requirement


_SCORERS: dict[tuple, BertScorer] = {}


def get_bert_scorer(model: str = "minilm-l6", layer: int | None = None, idf: bool = False,
                    rescale: bool = False) -> BertScorer:
    """The process-wide scorer for these settings (built on first use, then reused)."""
    key = (model, layer, idf, rescale)
    if key not in _SCORERS:
        _SCORERS[key] = BertScorer(model, layer, idf, rescale)
    return _SCORERS[key]


def scorer_for(ecfg: EvalConfig) -> BertScorer:
    return get_bert_scorer(ecfg.bertscore_model, ecfg.bertscore_layer, ecfg.bertscore_idf, ecfg.bertscore_rescale)


# ---------------------------------------------------------------------------------------
# ROUGE-L
_ROUGE = None


def rouge_l(candidates: Sequence[str], references: Sequence[str]) -> list[float]:
    """Per-example ROUGE-L F-measure (``rouge-score``, Porter stemming); 0 for an empty candidate."""
    global _ROUGE
    if _ROUGE is None:
        from rouge_score import rouge_scorer

        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [_ROUGE.score(ref, cand)["rougeL"].fmeasure for cand, ref in zip(candidates, references)]


# ---------------------------------------------------------------------------------------
# perplexity and token accuracy (teacher forcing, the training mask)
def _can_prune_head(model) -> bool:
    """The LM head may be applied to answer positions only when logits are just head(hidden)."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not (hasattr(lm, "get_decoder") and hasattr(lm, "get_output_embeddings")):
        return False
    config = getattr(lm, "config", None)
    scaled = any(getattr(config, name, None) not in (None, 1.0) for name in ("final_logit_softcapping", "logit_scale"))
    return not scaled and lm.get_output_embeddings() is not None


def _answer_logits(model, fmt: Format, batch: dict[str, torch.Tensor], prune_head: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and targets at every supervised position of a ``fmt.collate`` batch."""
    if fmt.family == "decoder":
        targets = batch["labels"][:, 1:]
        keep = targets != IGNORE_INDEX
        if prune_head:
            lm = model.get_base_model() if hasattr(model, "get_base_model") else model
            hidden = lm.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            logits = lm.get_output_embeddings()(hidden[:, :-1][keep])
        else:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][keep]
        return logits.float(), targets[keep]
    keep = batch["labels"] != IGNORE_INDEX
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).logits
    return logits[keep].float(), batch["labels"][keep]


def perplexity_and_accuracy(model, fmt: Format, examples: Sequence[QAExample], batch_size: int = 8,
                            prune_head: bool | None = None) -> dict[str, float]:
    """Perplexity and token accuracy of the reference answers, teacher forced.

    ``perplexity = exp(sum of -log p(token) / n)`` and ``token_accuracy = (argmax == token) / n``
    over the n supervised tokens of ``fmt.encode`` (answer tokens and EOS; decoder-only logits
    are shifted by one). Prompt and padding positions never count. Only per-batch sums are
    kept; for decoder-only models the LM head is applied to answer positions alone
    (``prune_head``, default: where the model's logits are a plain projection).
    Examples with no answer token within the length limits are skipped and counted.
    """
    encoded = [fmt.encode(ex.question, ex.answer) for ex in examples]
    features = [{"input_ids": e.input_ids, "labels": e.labels} for e in encoded if e is not None]
    if prune_head is None:
        prune_head = fmt.family == "decoder" and _can_prune_head(model)
    total_nll, correct, count = 0.0, 0, 0
    device = model_device(model)
    order = sorted(range(len(features)), key=lambda i: -len(features[i]["input_ids"]))
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = fmt.collate([features[i] for i in order[start : start + batch_size]])
            batch = {k: v.to(device) for k, v in batch.items()}
            logits, targets = _answer_logits(model, fmt, batch, prune_head)
            total_nll += float(F.cross_entropy(logits, targets, reduction="sum"))
            correct += int((logits.argmax(-1) == targets).sum())
            count += int(targets.numel())
    return {
        "perplexity": math.exp(total_nll / count) if count else float("nan"),
        "token_accuracy": correct / count if count else float("nan"),
        "answer_tokens": count,
        "nll_sum": total_nll,
        "skipped_no_answer_tokens": len(examples) - len(features),
    }


# ---------------------------------------------------------------------------------------
# one model (or baseline) on a set of examples
def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def score_texts(candidates: Sequence[str], references: Sequence[str], scorer: BertScorer) -> dict[str, Any]:
    """BERTScore P/R/F1 and ROUGE-L, means and per-example lists."""
    p, r, f = scorer.score(candidates, references)
    rl = rouge_l(candidates, references)
    return {
        "bertscore_precision": _mean(p), "bertscore_recall": _mean(r), "bertscore_f1": _mean(f),
        "rouge_l": _mean(rl), "per_example": {"bertscore_precision": p, "bertscore_recall": r,
                                               "bertscore_f1": f, "rouge_l": rl},
    }


def score_model(model, fmt: Format, examples: Sequence[QAExample], settings: GenerationSettings,
                scorer: BertScorer, ppl_batch_size: int = 8,
                progress: ProgressFactory | None = None, label: str = "model") -> dict[str, Any]:
    """Generate from the questions, score against the references, add perplexity/accuracy."""
    questions = [ex.question for ex in examples]
    references = [ex.answer for ex in examples]
    started = time.perf_counter()
    update = progress(f"generating ({label})", len(examples)) if progress else None
    generated = generate_answers(model, fmt, questions, settings, progress=update)
    generation_s = time.perf_counter() - started
    started = time.perf_counter()
    result = score_texts(generated.texts, references, scorer)
    result.update(perplexity_and_accuracy(model, fmt, examples, ppl_batch_size))
    result.update({
        "n_examples": len(examples),
        "mean_generated_tokens": generated.mean_new_tokens,
        "hit_max_new_tokens": generated.share_hit_max_new_tokens,
        "generated": generated.texts,
        "generated_tokens": generated.new_tokens,
        "hit_max_per_example": generated.hit_max_new_tokens,
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
    model,
    fmt: Format,
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
    settings = GenerationSettings.from_eval_config(ecfg, seed=seed)
    examples = list(examples)
    main = score_model(model, fmt, examples, settings, scorer, ecfg.batch_size, progress, "model")
    repeat_result = repeat_question_baseline(examples, scorer)
    baselines: dict[str, Any] = {"repeat_question": _summary(repeat_result)}
    repeat = repeat_result["per_example"]["bertscore_f1"]
    base = None
    if ecfg.baselines and base_model is not None:
        with base_model() as base_lm:
            base = score_model(base_lm, fmt, examples, settings, scorer, ecfg.batch_size, progress, "base model")
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
        "baselines": baselines,
        "settings": _settings(model, fmt, ecfg, settings, scorer, source, main, base),
        "examples": rows,
    })
    return result


def _settings(model, fmt, ecfg, settings, scorer, source, main, base) -> dict[str, Any]:
    import transformers

    import medassist

    timing = dict(main["timing"])
    if base is not None:
        timing["base_model_generation_seconds"] = base["timing"]["generation_seconds"]
    return {
        "model": source,
        "family": fmt.family,
        "prompt_format": "chat template" if fmt.uses_chat_template else "plain",
        "generation": asdict(settings),
        "bertscore": scorer.settings(),
        "rouge": "ROUGE-L F-measure (rouge-score, Porter stemmer), mean over examples",
        "perplexity": "exp(total NLL / answer tokens) on the references, teacher forced; answer tokens "
                      "and EOS count, prompt and padding do not",
        "device": str(model_device(model)),
        "timing": timing,
        "versions": {"medassist": medassist.__version__, "transformers": transformers.__version__,
                     "torch": torch.__version__},
        "eval_config": ecfg.model_dump(mode="json"),
    }


# ---------------------------------------------------------------------------------------
# training hooks
def seeded_subset(examples: Sequence[QAExample], size: int, seed: int) -> list[QAExample]:
    """``size`` examples drawn with ``seed`` (all when there are fewer), in their original order."""
    if size >= len(examples):
        return list(examples)
    chosen = sorted(random.Random(seed).sample(range(len(examples)), size))
    return [examples[i] for i in chosen]


def make_training_evaluator(fmt: Format, validation_examples: list[QAExample], cfg: TrainConfig
                            ) -> Callable[[Any], dict[str, float]]:
    """The generation metrics the trainer logs at each evaluation, on a fixed seeded subset.

    The subset (``cfg.eval.subset`` questions, seed ``cfg.seed``) is drawn once, so every
    evaluation scores the same questions. The returned function switches the model to eval
    mode, generates and scores without gradients, and restores the mode it found.
    """
    subset = seeded_subset(validation_examples, cfg.eval.subset, cfg.seed)
    settings = GenerationSettings.from_eval_config(cfg.eval, seed=cfg.seed)

    def evaluate(model) -> dict[str, float]:
        scorer = scorer_for(cfg.eval)  # built on the first call, reused afterwards
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                result = score_model(model, fmt, subset, settings, scorer, cfg.eval.batch_size)
        finally:
            if was_training:
                model.train()
        return {k: float(result[k]) for k in METRIC_KEYS + ("mean_generated_tokens", "hit_max_new_tokens")}

    return evaluate


def evaluate_run_after_training(run_dir: Path, model, fmt: Format, test_examples: list[QAExample],
                                cfg: TrainConfig, log: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    """Score the final (best) model on the test split; write eval_test.json and report/."""
    from medassist.reporting import write_report
    from medassist.training import is_main_process, uses_lora

    if not is_main_process():
        return {}
    run_dir = Path(run_dir)
    log(f"evaluating the final model on {len(test_examples)} test examples "
        f"(max_new_tokens {cfg.eval.max_new_tokens}{', with baselines' if cfg.eval.baselines else ''})")
    base = base_model_context(model, None if uses_lora(cfg, fmt.family) else cfg.model)
    was_training = model.training
    model.eval()
    try:
        result = evaluate_examples(model, fmt, test_examples, cfg.eval, seed=cfg.seed, base_model=base,
                                   source=str(run_dir))
    finally:
        if was_training:
            model.train()
    result["settings"]["data"] = {"source": cfg.data.path, "split": "test", "n_examples": len(test_examples)}
    html = write_report(result, run_dir / "report", metrics_path=run_dir / "metrics.jsonl",
                        title=f"medassist evaluation: {run_dir.name} (test split)")
    result["report_html"] = str(html)
    (run_dir / "eval_test.json").write_text(json.dumps(result, indent=2, ensure_ascii=False), encoding="utf-8")
    log(f"test: {format_line(result)}; report {html}")
    return result


def format_line(result: dict[str, Any]) -> str:
    """One line: the model's BERTScore F1 beside the baselines, perplexity and token accuracy."""
    baselines = result.get("baselines") or {}
    extra = [f"{label} {baselines[name]['bertscore_f1']:.4f}"
             for name, label in (("base_model", "base model"), ("repeat_question", "repeat question"))
             if baselines.get(name)]
    line = f"BERTScore F1 {result['bertscore_f1']:.4f}" + (f" ({', '.join(extra)})" if extra else "")
    return (f"{line}, perplexity {result['perplexity']:.2f}, token accuracy {result['token_accuracy']:.3f}, "
            f"ROUGE-L {result['rouge_l']:.4f}")
