"""The generation engine: one way to turn prompts into answers, for every caller.

``evaluate`` uses the batch API (:meth:`Engine.generate`); ``generate``, ``chat`` and
``serve`` the streaming API (:meth:`Engine.stream`). Both share one stop rule and one sampling
rule, so an answer scored by ``evaluate`` is the answer a user of ``serve`` gets:

- **stop rule**: generation ends at the formatter's EOS and at every EOS id the model's
  ``generation_config`` declares (Qwen and Llama 3 have several), or at the first stop string
  (transformers' ``StopStringCriteria`` in ``generate``; the batcher looks for it in the newly
  decoded text of each answer); the text is cut before the stop string;
- **sampling rule**: ``do_sample`` is explicit (:class:`~medassist.config.GenerationSettings`);
  greedy decoding clears temperature and top-p, so a model's sampling defaults never leak in.

Prompts are token ids from the family's formatter: generation never sees a reference answer.
Decoder-only models decode by continuous batching (:mod:`medassist.batching`): up to
``batch_size`` answers share every forward pass, an answer leaves the batch the step it ends
and the next prompt takes its row, shared prompt prefixes are computed once; greedy answers
are those of one-at-a-time generation. Encoder-decoder models (and models the batcher does not
take, see :func:`~medassist.batching.batching_problem`) use transformers' ``generate`` on
batches sorted by prompt length and padded on the family's side. Results come back in the
caller's order. The streaming API (:mod:`medassist.streaming`) runs each answer in its own
thread, or, once :meth:`Engine.serve_batched` is on (the server), as a row of one shared batch.

``GenerationSettings.dtype = "bf16"`` (opt-in) generates with a bf16 copy of the weights
(transformers' ``generate`` under bf16 autocast where the batcher does not apply).
"""

from __future__ import annotations

import copy
import logging
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, StopStringCriteria

from medassist.config import GenerationSettings
from medassist.families import ModelFamily
from medassist.formatting import Passage, PromptFormat
from medassist.streaming import CancelCriteria, StopText, StopTextStreamer, Stream, cut_at_stop

log = logging.getLogger("medassist.engine")
FinishReason = Literal["stop", "length", "cancelled"]


@dataclass
class Answer:
    """One generated answer. ``token_ids``: the answer's tokens before its stop token.
    ``finish_reason``: ``stop`` (EOS or a stop string), ``length`` (``max_new_tokens`` reached
    first: the answer was cut) or ``cancelled``."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: FinishReason

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def hit_max_new_tokens(self) -> bool:
        return self.finish_reason == "length"


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # a parameterless stub
        return torch.device("cpu")


def stop_ids(model, fmt: PromptFormat) -> list[int]:
    """The formatter's EOS plus every other EOS the model's generation config declares."""
    ids = [fmt.eos_id]
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for token in extra if isinstance(extra, (list, tuple)) else [extra]:
        if token is not None and int(token) not in ids:
            ids.append(int(token))
    return ids


class Engine:
    """Generates answers with one model and formatter; holds no per-request state.

    ``batching``: decode the batch API's prompts by continuous batching where the model
    allows (:func:`~medassist.batching.batching_problem`); False: transformers' ``generate``.
    """

    def __init__(self, model, fmt: PromptFormat, family: ModelFamily, batching: bool = True) -> None:
        self.model, self.fmt, self.family = model, fmt, family
        self.tokenizer = fmt.tokenizer
        self.device = model_device(model)
        self.stop_ids = stop_ids(model, fmt)
        self.batching = batching
        self.scheduler = None  # a BatchScheduler once serve_batched() is on

    @property
    def batching_problem(self) -> str | None:
        """Why this model cannot be decoded by continuous batching (None when it can)."""
        from medassist.batching import batching_problem

        return batching_problem(self.model, self.family)

    def serve_batched(self, max_rows: int) -> bool:
        """Run :meth:`stream` requests as rows of one shared batch of ``max_rows`` rows (a
        scheduler thread); False, with streams staying one thread each, where the model does
        not allow it."""
        from medassist.batching import BatchScheduler

        problem = self.batching_problem
        if problem is not None:
            log.info("streams are not batched: %s", problem)
            return False
        if self.scheduler is None or self.scheduler.max_rows != max_rows:
            if self.scheduler is not None:
                self.scheduler.close()
            self.scheduler = BatchScheduler(self, max_rows)
        return True

    # -- the two rules ----------------------------------------------------------------
    def generation_config(self, settings: GenerationSettings):
        """transformers' GenerationConfig for ``settings`` (the sampling and stop rule)."""
        from transformers import GenerationConfig

        base = getattr(self.model, "generation_config", None)
        config = copy.deepcopy(base) if base is not None else GenerationConfig()
        config.max_new_tokens = settings.max_new_tokens
        config.max_length = None  # max_new_tokens alone bounds the answer
        config.min_length, config.min_new_tokens, config.num_beams = 0, None, 1
        config.do_sample = settings.do_sample
        # greedy ignores these; clearing them keeps a model's sampling defaults out
        config.temperature = settings.temperature if settings.do_sample else None
        config.top_p = settings.top_p if settings.do_sample else None
        config.top_k = config.top_k if settings.do_sample else None
        config.repetition_penalty = settings.repetition_penalty
        config.no_repeat_ngram_size = settings.no_repeat_ngram_size
        config.eos_token_id = list(self.stop_ids)
        config.pad_token_id = self.fmt.pad_id
        config.use_cache = True
        return config

    def stopping_criteria(self, settings: GenerationSettings, *extra: StoppingCriteria) -> StoppingCriteriaList:
        criteria = list(extra)
        if settings.stop:
            criteria.append(StopStringCriteria(self.tokenizer, list(settings.stop)))
        return StoppingCriteriaList(criteria)

    def finish(self, new_ids: list[int], prompt_tokens: int, settings: GenerationSettings,
               cancelled: bool = False) -> Answer:
        """The answer from generated token ids: cut at the first stop id, decoded, cut at stop strings."""
        end = next((k for k, t in enumerate(new_ids) if t in self.stop_ids), None)
        ids = new_ids[:end] if end is not None else list(new_ids)
        text, hit_stop = cut_at_stop(self.tokenizer.decode(ids, skip_special_tokens=True), settings.stop)
        if end is not None or hit_stop:
            reason: FinishReason = "stop"
        elif cancelled:
            reason = "cancelled"
        else:
            reason = "length" if len(ids) >= settings.max_new_tokens else "stop"
        return Answer(text.strip(), ids, prompt_tokens, reason)

    # -- batch API (evaluation) -------------------------------------------------------
    def prompts(self, questions: Sequence[str], passages: Sequence[Sequence[Passage]] | None = None) -> list[list[int]]:
        passages = passages or [()] * len(questions)
        return [self.fmt.prompt_ids(q, passages=p) for q, p in zip(questions, passages)]

    def generate(self, prompts: Sequence[Sequence[int]], settings: GenerationSettings | None = None,
                 progress: Callable[[int], None] | None = None) -> list[Answer]:
        """One answer per prompt, in input order; ``progress(n)`` as ``n`` more are done."""
        settings = settings or GenerationSettings()
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if not prompts:
            return []
        if self.batching and self.batching_problem is None:
            from medassist.batching import generate_rows, language_model

            model = None
            if settings.dtype == "bf16":  # a bf16 copy: autocast would re-cast every weight at every step
                model = copy.deepcopy(language_model(self.model)).to(torch.bfloat16)
            rows = generate_rows(self, prompts, settings, progress, model)
            return [self.finish(r.tokens, len(r.prompt), settings) for r in rows]
        return self._generate_hf(prompts, settings, progress)

    def _generate_hf(self, prompts: Sequence[Sequence[int]], settings: GenerationSettings,
                     progress: Callable[[int], None] | None = None) -> list[Answer]:
        """transformers' ``generate`` on batches of ``batch_size`` prompts sorted by length."""
        out: list[Answer | None] = [None] * len(prompts)
        config = self.generation_config(settings)
        seeded = settings.do_sample and settings.seed is not None
        with (torch.random.fork_rng(devices=[]) if seeded else nullcontext()), torch.inference_mode(), \
                self._autocast(settings):
            if seeded:
                torch.manual_seed(settings.seed)
            order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))  # longest first
            for start in range(0, len(order), settings.batch_size):
                batch = order[start : start + settings.batch_size]
                inputs = self.fmt.collate_prompts([list(prompts[i]) for i in batch])
                inputs = {k: v.to(self.device) for k, v in inputs.items()}
                sequences = self.model.generate(**inputs, generation_config=config,
                                                stopping_criteria=self.stopping_criteria(settings))
                new = self.family.new_tokens(sequences, inputs["input_ids"].shape[1]).cpu().tolist()
                for row, i in enumerate(batch):
                    out[i] = self.finish(new[row], len(prompts[i]), settings)
                if progress is not None:
                    progress(len(batch))
        return out  # type: ignore[return-value]

    def _autocast(self, settings: GenerationSettings):
        if settings.dtype != "bf16":
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def answer(self, questions: Sequence[str], settings: GenerationSettings | None = None,
               progress: Callable[[int], None] | None = None,
               passages: Sequence[Sequence[Passage]] | None = None) -> list[Answer]:
        """Answer questions: each becomes ``fmt.prompt_ids(question)``, and nothing else goes in."""
        return self.generate(self.prompts(questions, passages), settings, progress)

    # -- streaming API (generate, chat, serve) ----------------------------------------
    def stream(self, prompt_ids: list[int], settings: GenerationSettings,
               sink: Callable[[Any], None] | None = None, on_finish: Callable[[], None] | None = None) -> "Stream":
        """Start generating one answer: in a worker thread, or as a row of the shared batch
        once :meth:`serve_batched` is on (see :class:`Stream`)."""
        return Stream(self, prompt_ids, settings, sink, on_finish, scheduler=self.scheduler)

    def _run_stream(self, stream: "Stream") -> Answer:
        """Runs in the worker thread."""
        settings = stream.settings
        streamer = StopTextStreamer(self.tokenizer, StopText(settings.stop), stream.sink)
        watch = CancelCriteria(stream.cancelled)
        inputs = {k: v.to(self.device) for k, v in self.fmt.collate_prompts([stream.prompt_ids]).items()}
        with torch.inference_mode(), self._autocast(settings):
            sequences = self.model.generate(**inputs, generation_config=self.generation_config(settings),
                                            streamer=streamer, stopping_criteria=self.stopping_criteria(settings, watch))
        new = self.family.new_tokens(sequences, inputs["input_ids"].shape[1])[0].cpu().tolist()
        return self.finish(new, len(stream.prompt_ids), settings, cancelled=stream.cancelled.is_set())

