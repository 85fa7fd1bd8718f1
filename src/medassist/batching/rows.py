"""One answer being generated in the continuous batch (:class:`Row`) and how it picks its next
token (:class:`Picker`: transformers' logits processors, in ``generate``'s order)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from medassist.config import GenerationSettings

if TYPE_CHECKING:
    from medassist.engine import Engine


class Picker:
    """The next token of one row: transformers' logits processors for its settings, in
    ``generate``'s order, then argmax (greedy) or a draw (with the row's own generator when
    it has a seed)."""

    def __init__(self, config, seed: int | None = None, device: torch.device | None = None) -> None:
        from transformers.generation.logits_process import (
            LogitsProcessorList, MinPLogitsWarper, NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor,
            TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
        )

        self.sample = bool(config.do_sample)
        processors = LogitsProcessorList()
        if config.repetition_penalty is not None and config.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(config.repetition_penalty))
        if config.no_repeat_ngram_size:
            processors.append(NoRepeatNGramLogitsProcessor(config.no_repeat_ngram_size))
        if self.sample:
            if config.temperature is not None and config.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(config.temperature))
            if config.top_k:
                processors.append(TopKLogitsWarper(top_k=config.top_k))
            if config.top_p is not None and config.top_p < 1.0:
                processors.append(TopPLogitsWarper(top_p=config.top_p))
            if getattr(config, "min_p", None) is not None:
                processors.append(MinPLogitsWarper(min_p=config.min_p))
        self.processors = processors
        self.plain = not self.sample and not processors  # argmax of the raw logits: batched
        self.generator = None
        if self.sample and seed is not None:
            self.generator = torch.Generator(device=device or "cpu")
            self.generator.manual_seed(int(seed))

    def __call__(self, logits: torch.Tensor, history: list[int]) -> int:
        scores = logits[None]
        if self.processors:
            ids = torch.tensor([history], device=logits.device)
            scores = self.processors(ids, scores)
        if not self.sample:
            return int(scores.argmax(-1))
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))


@dataclass(eq=False)
class Row:
    """One answer being generated. ``on_token(id)`` after each new token, ``on_done(row)``
    once, when it ends (``error`` set if generation failed)."""

    prompt: list[int]
    settings: GenerationSettings
    picker: Picker
    on_token: Callable[[int], None] | None = None
    on_done: Callable[["Row"], None] | None = None
    cancelled: threading.Event | None = None
    tokens: list[int] = field(default_factory=list)
    stopped: bool = False  # ended by a stop id or a stop string
    was_cancelled: bool = False
    done: bool = False
    error: BaseException | None = None
    slot: int = -1
    length: int = 0  # tokens in the cache

    @property
    def is_cancelled(self) -> bool:
        return self.cancelled is not None and self.cancelled.is_set()



def make_row(engine: "Engine", prompt_ids: Sequence[int], settings: GenerationSettings, *, seed: int | None = None,
             on_token: Callable[[int], None] | None = None, on_done: Callable[[Row], None] | None = None,
             cancelled: threading.Event | None = None) -> Row:
    config = engine.generation_config(settings)
    return Row(list(prompt_ids), settings, Picker(config, seed, engine.device), on_token, on_done, cancelled)

