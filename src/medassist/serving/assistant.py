"""The assistant: a loaded model that answers questions, in a terminal or behind HTTP.

It builds prompts with the family's formatter (the one the model was trained with, with the
system prompt of the run), keeps a conversation within the model's context, checks lengths
before anything runs, and generates through the one engine (:mod:`medassist.engine`), so an
answer here is the answer ``evaluate`` scores. With ``batch_rows``, concurrent generations
are rows of one continuous batch (:mod:`medassist.batching`). With ``sources`` (an index,
:mod:`~medassist.serving.sources`), each question's passages go into its prompt and
:meth:`Assistant.cite` lists the ones the answer used. No I/O.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Sequence

from medassist.config import GenerationSettings
from medassist.engine import Answer
from medassist.errors import MedassistError
from medassist.formatting import Passage
from medassist.models import LoadedModel
from medassist.serving.sources import Grounding, SourceFinder
from medassist.streaming import Stream

DEFAULT_SYSTEM_PROMPT = (
    "You are medassist, a careful medical information assistant. Give accurate, clear, general "
    "information, say when you are not sure, and recommend seeing a clinician for personal "
    "medical decisions such as diagnosis, treatment or medication changes."
)
MIN_TEMPERATURE = 1e-3  # below this, sampling is numerically greedy anyway (and 1e-300 overflows)


class RequestError(MedassistError):
    """A generation request that cannot be served as asked (too long, bad parameter)."""


def sampling(max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             stop: Sequence[str] = ()) -> GenerationSettings:
    """Generation settings from the OpenAI-style knobs: temperature 0 means greedy."""
    if not temperature >= 0:  # (nan too)
        raise RequestError(f"temperature: must be at least 0 (0 = greedy), not {temperature}")
    if not 0 <= top_p <= 1:
        raise RequestError(f"top_p: must be between 0 and 1, not {top_p}")
    do_sample = temperature >= MIN_TEMPERATURE
    try:
        return GenerationSettings(max_new_tokens=max_new_tokens, do_sample=do_sample,
                                  temperature=temperature if do_sample else 1.0,
                                  top_p=top_p if do_sample and top_p > 0 else 1.0, stop=list(stop))
    except ValueError as exc:  # pydantic's ValidationError
        first = exc.errors()[0] if hasattr(exc, "errors") else {"loc": (), "msg": str(exc)}
        raise RequestError(f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None


def run_decoding(loaded: LoadedModel) -> dict[str, Any]:
    """The repetition rules a run was evaluated with (``eval.repetition_penalty``,
    ``eval.no_repeat_ngram_size``) where they differ from plain decoding: served answers are
    decoded as the evaluated ones were. Empty for models medassist did not train."""
    ecfg = loaded.config.eval if loaded.config is not None else None
    if ecfg is None:
        return {}
    rules = {"repetition_penalty": ecfg.repetition_penalty, "no_repeat_ngram_size": ecfg.no_repeat_ngram_size}
    plain = GenerationSettings()
    return {k: v for k, v in rules.items() if v != getattr(plain, k)}


class Assistant:
    """Answers questions with one model.

    ``system_prompt``: None keeps exactly the prompt the model was trained with (a run's, or an
    export's, even when that is none: the template's own default then applies, as it did in
    training); a model medassist did not train (a preset or hub model with a chat template)
    gets :data:`DEFAULT_SYSTEM_PROMPT`. A string replaces it ("" removes it). Families whose chats keep no
    history (encoder-decoder) answer each question on its own, without a system prompt.
    """

    def __init__(self, loaded: LoadedModel, system_prompt: str | None = None, max_prompt_tokens: int = 1024,
                 batch_rows: int | None = None, sources: SourceFinder | None = None) -> None:
        self.loaded, self.family = loaded, loaded.family
        self.sources = sources  # with an index: each question's passages go into its prompt
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.max_prompt_tokens = max_prompt_tokens
        fmt = loaded.format(truncate_prompt=False)  # serving checks lengths itself: an error, not a cut
        if system_prompt is not None:
            fmt = fmt.with_system_prompt(system_prompt)
        elif loaded.config is None and fmt.system_prompt is None and fmt.uses_chat_template:
            fmt = fmt.with_system_prompt(DEFAULT_SYSTEM_PROMPT)
        self.fmt = fmt
        self.decoding = run_decoding(loaded)
        self.engine = loaded.engine(fmt)
        # with batch_rows, generations are rows of one shared batch (where the model allows)
        self.batched = bool(batch_rows) and self.engine.serve_batched(batch_rows)
        # fast tokenizers reconfigure themselves per call; concurrent encodes can collide
        self._encode_lock = threading.Lock()

    @property
    def keeps_history(self) -> bool:
        return self.family.keeps_history

    @property
    def system_prompt(self) -> str | None:
        return self.fmt.system_prompt

    # -- prompts ------------------------------------------------------------------------
    def prompt_ids(self, question: str, history: Sequence[tuple[str, str]] = (),
                   system_prompt: str | None = None, passages: Sequence[Passage] = ()) -> list[int]:
        """Prompt tokens, uncut; ``system_prompt`` overrides the default for this call only;
        ``passages``: the sources shown before the question."""
        fmt = self.fmt if system_prompt is None else self.fmt.with_system_prompt(system_prompt)
        with self._encode_lock:
            return fmt.prompt_ids(question, list(history) if self.keeps_history else (), passages)

    def find_sources(self, question: str, history: Sequence[tuple[str, str]], max_new_tokens: int,
                     system_prompt: str | None = None) -> list[Passage] | None:
        """The question's passages that fit the prompt with ``history`` (dropped from the last);
        None without an index, [] when none scores at least the threshold or none fits."""
        if self.sources is None:
            return None
        passages = self.sources.find(question)
        while passages:
            try:
                self.check_lengths(len(self.prompt_ids(question, history, system_prompt, passages)), max_new_tokens)
                break
            except RequestError:
                passages = passages[:-1]
        return passages

    def grounded_prompt(self, question: str, history: Sequence[tuple[str, str]] = (),
                        system_prompt: str | None = None, max_new_tokens: int = 256
                        ) -> tuple[list[int], list[Passage] | None]:
        """(prompt tokens, the passages in them): :meth:`find_sources`, then :meth:`prompt_ids`."""
        passages = self.find_sources(question, history, max_new_tokens, system_prompt)
        return self.prompt_ids(question, history, system_prompt, passages or ()), passages

    def cite(self, answer: str, question: str, passages: Sequence[Passage] | None) -> Grounding | None:
        """The sources ``answer`` used (:meth:`SourceFinder.cited`); None without an index."""
        return None if passages is None else SourceFinder.cited(answer, question, passages)

    def check_lengths(self, n_prompt: int, max_new_tokens: int) -> None:
        """Raise :class:`RequestError` when the prompt or the answer cannot fit."""
        if n_prompt > self.max_prompt_tokens:
            raise RequestError(f"the prompt is {n_prompt} tokens; this server accepts at most {self.max_prompt_tokens}")
        problem = self.family.length_problem(self.model, n_prompt, max_new_tokens)
        if problem:
            raise RequestError(problem)

    def fit_history(self, question: str, history: Sequence[tuple[str, str]], max_new_tokens: int
                    ) -> list[tuple[str, str]]:
        """The most recent turns that fit with ``question``; RequestError if it alone does not."""
        kept = list(history) if self.keeps_history else []
        while True:
            try:
                self.check_lengths(len(self.prompt_ids(question, kept)), max_new_tokens)
                return kept
            except RequestError:
                if not kept:
                    raise
                kept = kept[1:]

    # -- generation ---------------------------------------------------------------------
    def start(self, prompt_ids: list[int], settings: GenerationSettings, sink: Callable[[Any], None] | None = None,
              on_finish: Callable[[], None] | None = None) -> Stream:
        """Start generating: a row of the shared batch, or a worker thread (see
        :class:`~medassist.streaming.Stream`)."""
        if self.decoding:  # the run's evaluated decoding (repetition rules), whatever the request
            settings = settings.model_copy(update=self.decoding)
        return self.engine.stream(prompt_ids, settings, sink, on_finish)

    def close(self) -> None:
        """Stop the batch scheduler's thread, if there is one (it ends once its rows are done)."""
        if self.engine.scheduler is not None:
            self.engine.scheduler.close()

    def stream(self, question: str, history: Sequence[tuple[str, str]] = (),
               settings: GenerationSettings | None = None, passages: Sequence[Passage] = ()) -> Stream:
        """Check lengths and start; iterate the result for text pieces as they come."""
        settings = settings or sampling(256)
        ids = self.prompt_ids(question, history, passages=passages)
        self.check_lengths(len(ids), settings.max_new_tokens)
        return self.start(ids, settings)

    def generate(self, question: str, history: Sequence[tuple[str, str]] = (),
                 settings: GenerationSettings | None = None, passages: Sequence[Passage] = ()) -> Answer:
        """Answer one question (blocking)."""
        stream = self.stream(question, history, settings, passages)
        for _ in stream:
            pass
        return stream.result()
