"""Metrics of generated answers: BERTScore, ROUGE-L, factual consistency, perplexity / token accuracy.

- **BERTScore** (Zhang et al. 2020) through the ``bert_score`` library: each candidate token
  is matched to its most similar reference token (cosine of contextual embeddings from one
  encoder layer); precision averages over candidate tokens, recall over reference tokens,
  F1 is their harmonic mean. Per example, then averaged over examples.
- **ROUGE-L**: the F-measure of the longest common subsequence of words (``rouge-score``,
  Porter stemming), per example.
- **Perplexity**: ``exp(total NLL / number of answer tokens)`` of the *reference* answers under
  teacher forcing, with the training mask (answer tokens and EOS count; prompt and padding
  never do), pooled over all answer tokens of all examples. A reference too long for the
  limits is cut *without* an EOS (no made-up end is scored) and counted.
- **Token accuracy**: the share of those answer tokens that are the model's argmax prediction.
- **Factual consistency**: :mod:`medassist.evaluation.factual` (offline, no model) or an NLI
  classifier (``eval.factual_model``), per example.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
from pathlib import Path
from typing import Any, Sequence

import torch

from medassist.config import EvalConfig
from medassist.data import QAExample
from medassist.engine import model_device
from medassist.errors import ConfigError, ModelError
from medassist.families import ModelFamily
from medassist.formatting import IGNORE_INDEX, Passage, PromptFormat


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
                 rescale: bool = False, batch_size: int = 16, device: str | None = None) -> None:
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

    from medassist.presets import PRESETS, minilm_folder

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


def perplexity_dtype(ecfg: EvalConfig) -> torch.dtype | None:
    """The autocast dtype of perplexity (``eval.perplexity_precision``), None for fp32."""
    from medassist.training.precision import resolve_precision

    return torch.bfloat16 if resolve_precision(ecfg.perplexity_precision) == "bf16" else None


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
# perplexity and token accuracy (teacher forcing, the training mask, the answer-only head)
HEAD_CHUNK = 512  # answer positions scored at a time by the LM head (perplexity, token accuracy)


def perplexity_and_accuracy(model, fmt: PromptFormat, family: ModelFamily, examples: Sequence[QAExample],
                            batch_size: int = 8, prune_head: bool | None = None,
                            passages: Sequence[Sequence[Passage]] | None = None,
                            autocast: torch.dtype | None = None) -> dict[str, Any]:
    """Perplexity and token accuracy of the reference answers, teacher forced.

    ``perplexity = exp(sum of -log p(token) / n)`` and ``token_accuracy = (argmax == token) / n``
    over the n supervised tokens of ``fmt.encode`` (answer tokens, and the EOS of answers that
    fit). Prompt and padding positions never count; logits come from the family's answer-only
    head in chunks (:meth:`ModelFamily.answer_scores`). Examples with no answer token within the length
    limits are skipped and counted; references cut to fit are counted (``references_cut``).
    ``log_perplexity`` is per example (mean NLL per answer token, None where skipped), in the
    order of ``examples``: what paired comparisons of two models use. ``passages``: each
    prompt's sources (retrieval), aligned with ``examples``. ``autocast``: run the model under
    autocast to this dtype (the NLL itself is always taken in fp32).
    """
    fmt = copy.copy(fmt)
    fmt.answer_truncation = "no_eos"  # a cut reference has no end to predict
    passages = passages if passages is not None else [()] * len(examples)
    encoded = [fmt.encode(ex.question, ex.answer, p) for ex, p in zip(examples, passages)]
    kept = [i for i, e in enumerate(encoded) if e is not None]
    features = [{"input_ids": encoded[i].input_ids, "labels": encoded[i].labels} for i in kept]
    per_example: list[float | None] = [None] * len(examples)
    total_nll, correct, count = 0.0, 0, 0
    device = model_device(model)
    order = sorted(range(len(features)), key=lambda i: -len(features[i]["input_ids"]))
    cast = torch.autocast(device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch = fmt.collate([features[i] for i in chunk])
            batch = {k: v.to(device) for k, v in batch.items()}
            with cast:  # the head in chunks of positions: no answer-tokens x vocabulary tensor
                nll, hits, targets = family.answer_scores(model, batch, prune_head, chunk_size=HEAD_CHUNK)
            nll = nll.float()
            total_nll += float(nll.sum())
            correct += int(hits.sum())
            count += int(targets.numel())
            # the head keeps supervised positions in row order, so each row's count splits them
            per_row = (batch["labels"] != IGNORE_INDEX).sum(1).tolist()
            if sum(per_row) == nll.numel():
                for i, part in zip(chunk, torch.split(nll, per_row)):
                    per_example[kept[i]] = float(part.mean()) if part.numel() else None
    return {
        "perplexity": math.exp(total_nll / count) if count else None,
        "token_accuracy": correct / count if count else None,
        "answer_tokens": count,
        "nll_sum": total_nll,
        "skipped_no_answer_tokens": len(examples) - len(features),
        "references_cut": sum(1 for e in encoded if e is not None and e.truncated),
        "log_perplexity": per_example,
    }


# ---------------------------------------------------------------------------------------
# factual consistency (the offline scorer, or an NLI model)
_FACTUAL: dict[str, Any] = {}


def factual_scorer_for(ecfg: EvalConfig):
    """The process-wide factual-consistency scorer of ``eval.factual_model`` (built once)."""
    from medassist.evaluation.factual import get_factual_scorer

    name = ecfg.factual_model or "offline"
    if name not in _FACTUAL:
        _FACTUAL[name] = get_factual_scorer(name)
    return _FACTUAL[name]


def factual_consistency(scorer, answers: Sequence[str], references: Sequence[str],
                        questions: Sequence[str]) -> list[float]:
    """Per-example ``factual_consistency`` (0..1) of each answer against its reference."""
    return [float(s.factual_consistency) for s in scorer.score(list(answers), list(references), list(questions))]
