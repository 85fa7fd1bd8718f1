"""Baselines: what a tuned model has to beat to be worth anything.

- ``base_model``: the untuned model it started from (a LoRA model is its own base with the
  adapter switched off; a full fine-tune loads the base once) — did training help?
- ``nearest_training_answer``: the answer of the training question most similar to the asked
  one (cosine of mean-pooled MiniLM embeddings, :mod:`medassist.retrieval.encoder`) — does the
  model add anything over looking the answer up in its own training data?
- ``repeat_question``: the question itself as the answer — how much of a metric is free?

The retrieval baseline needs only the training examples; it builds its small index in memory.
A question is never answered with its own row: training rows with the same question key
(:func:`medassist.data.question_key`) or the same group as the asked question are excluded,
which matters when ``evaluate --data`` scores questions the run also trained on.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from medassist.data import QAExample, question_key
from medassist.engine import model_device

Embed = Callable[[list[str]], np.ndarray]  # texts -> L2-normalised rows


@dataclass(frozen=True)
class NearestAnswer:
    answer: str
    row: int  # the training example's row
    question: str
    similarity: float


_ENCODERS: dict[str, Any] = {}


def encoder_embed(name: str = "minilm-l6") -> Embed:
    """Mean-pooled, normalised sentence embeddings of encoder ``name`` (loaded once per process)."""
    if name not in _ENCODERS:
        from medassist.retrieval.encoder import Encoder

        _ENCODERS[name] = Encoder(name, max_tokens=128)
    return _ENCODERS[name].encode


def nearest_training_answers(train: Sequence[QAExample], asked: Sequence[QAExample],
                             embed: Embed | None = None, batch: int = 256) -> list[NearestAnswer | None]:
    """For each asked example, the answer of the most similar training question (None if none is left).

    Training rows sharing the asked question's key or group are never candidates. Ties go to
    the earlier training row, so the result is deterministic.
    """
    if not train or not asked:
        return [None] * len(asked)
    embed = embed or encoder_embed()
    train_vectors = np.asarray(embed([ex.question for ex in train]), dtype=np.float32)
    asked_vectors = np.asarray(embed([ex.question for ex in asked]), dtype=np.float32)
    train_keys = np.array([question_key(ex.question) for ex in train], dtype=object)
    train_groups = np.array([ex.group or "" for ex in train], dtype=object)
    out: list[NearestAnswer | None] = []
    for start in range(0, len(asked), batch):
        sims = asked_vectors[start : start + batch] @ train_vectors.T
        for k, ex in enumerate(asked[start : start + batch]):
            row = sims[k]
            banned = train_keys == question_key(ex.question)
            if ex.group:
                banned |= train_groups == ex.group
            row = np.where(banned, -np.inf, row)
            best = int(np.argmax(row))  # first of equals
            if not np.isfinite(row[best]):
                out.append(None)
                continue
            hit = train[best]
            out.append(NearestAnswer(hit.answer, hit.row, hit.question, float(row[best])))
    return out


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
