"""What feeds a :class:`~medassist.batching.batcher.Batcher`: the server's thread, which takes
requests as they arrive (:class:`BatchScheduler`), and the batch API's loop, which feeds prompts
as rows free up (:func:`generate_rows`)."""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from medassist.batching.batcher import Batcher
from medassist.batching.rows import Row, make_row
from medassist.config import GenerationSettings

if TYPE_CHECKING:
    from medassist.engine import Engine

log = logging.getLogger("medassist.batching")


class BatchScheduler:
    """Runs a :class:`Batcher` in a daemon thread; :meth:`submit` adds rows from any thread.

    Rows join at the next step; a cancelled row leaves at the next step. A failing forward
    ends the rows of that batch with the error and the thread carries on.
    """

    def __init__(self, engine: "Engine", max_rows: int, gather_s: float = 0.015) -> None:
        self.batcher = Batcher(engine, max_rows)
        self.gather_s = gather_s  # an idle batcher waits this long for requests arriving together
        self._incoming: list[Row] = []
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def max_rows(self) -> int:
        return self.batcher.max_rows

    def submit(self, row: Row) -> None:
        with self._wake:
            self._incoming.append(row)
            self._closed = False
            if self._thread is None:  # (again, after close())
                self._thread = threading.Thread(target=self._loop, name="medassist-batcher", daemon=True)
                self._thread.start()
            self._wake.notify()

    def wake(self) -> None:
        """Look at cancellations now (a waiting thread would otherwise see them at the next request)."""
        with self._wake:
            self._wake.notify()

    def close(self) -> None:
        """Let the thread end once its rows are done (a later :meth:`submit` starts a new one)."""
        with self._wake:
            self._closed = True
            self._wake.notify()

    def _loop(self) -> None:
        batcher = self.batcher
        with torch.inference_mode():
            while True:
                with self._wake:
                    idle = not batcher.busy
                    while not self._incoming and not batcher.busy and not self._closed:
                        self._wake.wait()
                    if self._closed and not self._incoming and not batcher.busy:
                        self._thread = None
                        return
                    if idle and self.gather_s:  # clients that send together share the first prefill
                        deadline = time.monotonic() + self.gather_s
                        while len(self._incoming) < batcher.max_rows and not self._closed \
                                and (left := deadline - time.monotonic()) > 0:
                            self._wake.wait(left)
                    for row in self._incoming:
                        batcher.add(row)
                    self._incoming = []
                try:
                    batcher.step()
                except Exception as exc:  # noqa: BLE001 - reported to the rows, never kills the server
                    log.exception("batched generation failed")
                    batcher.fail_all(exc)



def generate_rows(engine: "Engine", prompts: Sequence[Sequence[int]], settings: GenerationSettings,
                  progress: Callable[[int], None] | None = None, model=None) -> list[Row]:
    """The batch API's path: every prompt through one :class:`Batcher` of ``settings.batch_size``
    rows, fed as rows free up; rows in input order."""
    seeded = settings.do_sample and settings.seed is not None
    done: list[Row] = []

    def finished(row: Row) -> None:
        done.append(row)
        if progress is not None:
            progress(1)

    batcher = Batcher(engine, settings.batch_size, model)
    rows = [make_row(engine, p, settings, seed=settings.seed + i if seeded else None, on_done=finished)
            for i, p in enumerate(prompts)]
    for row in rows:
        batcher.add(row)
    with torch.inference_mode():
        while batcher.busy:
            batcher.step()
    return rows

