"""The streaming API's pieces: one answer generated as text pieces for ``generate``, ``chat`` and
``serve`` (:class:`Stream`, from :meth:`Engine.stream <medassist.engine.Engine.stream>`), and
the stop rule applied to text (:func:`cut_at_stop` on a whole answer, :class:`StopText` on a
stream, where a stop string may be split over two pieces).
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch
from transformers import StoppingCriteria, TextStreamer

from medassist.config import GenerationSettings

if TYPE_CHECKING:
    from medassist.engine import Answer, Engine

log = logging.getLogger("medassist.engine")


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the earliest stop string, and whether one was found."""
    hits = [i for s in stop if s and (i := text.find(s)) >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


class StopText:
    """Cuts a stream of text at the first stop string, as :func:`cut_at_stop` cuts the whole.

    Text that could be the beginning of a stop string is held back until the next piece
    shows whether it is one, so a stop string split over two pieces never leaks out.
    """

    def __init__(self, stop: Sequence[str] = ()) -> None:
        self.stop = [s for s in stop if s]
        self.stopped = False
        self._pending = ""

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        buf = self._pending + text
        cut, hit = cut_at_stop(buf, self.stop)
        if hit:
            self.stopped, self._pending = True, ""
            return cut
        hold = self._partial_suffix(buf)
        self._pending = buf[len(buf) - hold:] if hold else ""
        return buf[: len(buf) - hold]

    def flush(self) -> str:
        out, self._pending = ("" if self.stopped else self._pending), ""
        return out

    def _partial_suffix(self, buf: str) -> int:
        """Length of the longest end of ``buf`` that is a proper beginning of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:k]):
                    best = k
                    break
        return best


class CancelCriteria(StoppingCriteria):
    """Checked after every generated token: stop when the caller cancelled."""

    def __init__(self, cancelled: threading.Event) -> None:
        self.cancelled = cancelled

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.cancelled.is_set(), dtype=torch.bool, device=input_ids.device)


class StopTextStreamer(TextStreamer):
    """transformers' streamer (prompt skipped, special tokens dropped, words kept whole), with
    every finished piece cut at stop strings and handed to ``sink``."""

    def __init__(self, tokenizer, stop_text: StopText, sink: Callable[[Any], None]) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.stop_text, self.sink = stop_text, sink

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        piece = self.stop_text.feed(text) + (self.stop_text.flush() if stream_end else "")
        if piece:
            self.sink(piece)


END = object()  # what a Stream's sink receives last


class Stream:
    """One answer being generated: in a worker thread, or as a row of a shared batch.

    Text pieces (already cut at stop strings) go to ``sink`` as they are decoded, then
    :data:`END`. Without a sink they go to an internal queue: iterate the Stream to get them
    (blocking). :meth:`cancel` stops generation at the next token; :meth:`result` waits for
    the :class:`Answer`. ``on_finish`` runs when generation ends, whatever the outcome (the
    server gives its slot back there), before the sink gets :data:`END`.
    """

    def __init__(self, engine: Engine, prompt_ids: list[int], settings: GenerationSettings,
                 sink: Callable[[Any], None] | None = None, on_finish: Callable[[], None] | None = None,
                 scheduler=None) -> None:
        self.prompt_ids, self.settings = prompt_ids, settings
        self.cancelled = threading.Event()
        self.answer: Answer | None = None
        self.error: BaseException | None = None
        self._queue: queue.Queue | None = queue.Queue() if sink is None else None
        self.sink = sink or self._queue.put
        self._on_finish = on_finish
        self._engine = engine
        self._finished = threading.Event()
        self._scheduler = scheduler
        if scheduler is None:
            self._thread = threading.Thread(target=self._run, name="medassist-generate", daemon=True)
            self._thread.start()
        else:
            self._submit(scheduler)

    def _run(self) -> None:
        try:
            answer, error = self._engine._run_stream(self), None
        except Exception as exc:  # noqa: BLE001 - reported to the consumer, never kills the server
            log.exception("generation failed")
            answer, error = None, exc
        self._complete(answer, error)

    def _submit(self, scheduler) -> None:
        """A row of the scheduler's batch whose tokens go through the same streamer."""
        from medassist.batching import make_row

        engine, settings = self._engine, self.settings
        streamer = StopTextStreamer(engine.tokenizer, StopText(settings.stop), self.sink)
        streamer.put(torch.tensor(self.prompt_ids))  # the prompt (skipped), as generate() sends it first

        def on_token(token: int) -> None:
            streamer.put(torch.tensor([token]))

        def on_done(row) -> None:
            if row.error is not None:
                self._complete(None, row.error)
                return
            try:
                streamer.end()
                answer = engine.finish(row.tokens, len(row.prompt), settings, cancelled=row.was_cancelled)
            except Exception as exc:  # noqa: BLE001
                log.exception("generation failed")
                self._complete(None, exc)
                return
            self._complete(answer, None)

        scheduler.submit(make_row(engine, self.prompt_ids, settings, on_token=on_token, on_done=on_done,
                                  cancelled=self.cancelled))

    def _complete(self, answer: Answer | None, error: BaseException | None) -> None:
        self.answer, self.error = answer, error
        if self._on_finish is not None:
            try:
                self._on_finish()
            except Exception:  # noqa: BLE001
                log.exception("on_finish callback failed")
        self._finished.set()
        self.sink(END)

    def cancel(self) -> None:
        if not self.cancelled.is_set():
            self.cancelled.set()
            if self._scheduler is not None and not self._finished.is_set():
                self._scheduler.wake()

    @property
    def done(self) -> bool:
        return self._finished.is_set()

    def __iter__(self) -> Iterator[str]:
        if self._queue is None:
            raise RuntimeError("this Stream sends its text to a sink; it cannot be iterated")
        while (item := self._queue.get()) is not END:
            yield item
        if self.error is not None:
            raise self.error

    def result(self, timeout: float | None = None) -> Answer:
        self._finished.wait(timeout)
        if self.error is not None:
            raise self.error
        if self.answer is None:
            raise TimeoutError("generation still running")
        return self.answer
