"""Process-group helpers: who is rank 0, and doing work there once for everybody.

Under ``torchrun`` / ``accelerate launch`` every rank runs the same code; only rank 0 writes
files, and generation metrics are computed on rank 0 for the whole evaluation set (sharding
generation would change batch composition, padding and hence greedy outputs).
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """Rank 0 (before the process group exists, from the launcher's RANK variable)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def run_on_main_process(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 only; the other ranks wait and receive its result.

    With one process this is just ``fn()``. An exception on rank 0 reaches the other ranks
    as a RuntimeError, so none waits forever.
    """
    if world_size() == 1:
        return fn()
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", fn())
        except Exception as exc:  # noqa: BLE001 - tell the waiting ranks, then re-raise
            box[0] = ("error", f"{type(exc).__name__}: {exc}")
            dist.broadcast_object_list(box, src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise RuntimeError(f"rank 0 failed: {value}")
    return value
