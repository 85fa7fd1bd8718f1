"""Checkpoints: which ones are complete, which one ``--resume`` continues from.

transformers' stock ``Trainer._save_checkpoint`` writes ``checkpoints/checkpoint-N`` (model or
adapter, optimizer, scheduler, per-rank RNG state, ``trainer_state.json``); medassist adds
``medassist_state.json`` (token counters) and, in :class:`CheckpointCompletion` (an ``on_save``
callback), a ``.complete`` marker written last:

- **The marker makes a folder a checkpoint.** It lists every file with its size and sha256,
  and is written (fsynced, then renamed into place) only after every file is on disk and,
  under DDP, after a barrier and after every rank's ``rng_state_<rank>.pth`` exists. A save
  killed half-way leaves ``checkpoint-N`` without a marker, and resume skips it; when step N
  is saved again, the trainer first empties that folder (``MedassistTrainer._save_checkpoint``,
  which otherwise calls the stock save).
- **Checksums catch what sizes miss.** A file changed in place (same size: a bad disk, a
  partial overwrite, a copy tool) no longer matches its sha256; ``--resume`` skips such a
  checkpoint with a warning and continues from the newest one that verifies, instead of dying
  in ``json``/``torch`` while loading (and picking the same checkpoint on every retry).
- **Rotation runs after the marker** (``save_total_limit``, here rather than in the stock
  save, which rotates before any callback runs): an older complete checkpoint is deleted only
  once the new one is complete, so with ``save_total_limit: 1`` a crash during a save still
  leaves one to resume from.

What the stock save gives up compared with medassist's former copy of ``_save_checkpoint``
(write ``tmp-checkpoint-N``, rename when complete): a half-written ``checkpoint-N`` can now
exist, and transformers' own ``get_last_checkpoint`` would take it. medassist never asks it;
every medassist entry point goes through :func:`find_resume_checkpoint`, which trusts the
marker only. In exchange, the save is transformers' own and follows its changes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import warnings
from pathlib import Path

import torch.distributed as dist
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from medassist.distributed import is_main_process, world_size
from medassist.errors import ConfigError

COMPLETE_MARKER = ".complete"
STATE_FILE = "medassist_state.json"  # counters that transformers' TrainerState does not keep
RANK_FILES_WAIT_S = 30.0  # a shared filesystem may show another node's file late


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped, or a save is missing a rank's file."""


def _warn(message: str) -> None:
    if is_main_process():  # every rank searches; one says so
        warnings.warn(message, CheckpointWarning, stacklevel=3)


def _fsync(path: Path) -> None:
    """Flush a file or a folder entry to disk; a no-op where the OS or filesystem refuses."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------
# the marker
def write_complete_marker(folder: Path, step: int) -> Path:
    """Mark a fully written checkpoint folder complete: every file's size and sha256, in
    ``.complete``. Files are fsynced before the marker, the marker before it is renamed into
    place, so after a power loss the marker never exists without the data it describes."""
    folder = Path(folder)
    files = {}
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if path.is_file() and name not in (COMPLETE_MARKER, COMPLETE_MARKER + ".tmp"):
            _fsync(path)
            files[name] = {"bytes": path.stat().st_size, "sha256": sha256_of(path)}
    tmp = folder / (COMPLETE_MARKER + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump({"step": step, "files": files}, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, folder / COMPLETE_MARKER)
    _fsync(folder)
    return folder / COMPLETE_MARKER


def checkpoint_problem(folder: Path, verify: bool = True) -> str | None:
    """Why ``folder`` cannot be resumed from, or None when it is complete and intact.

    ``verify``: also compare each file's sha256 with the marker's (reads every byte).
    Markers of medassist 0.2 list sizes only; those are checked by size.
    """
    folder = Path(folder)
    marker = folder / COMPLETE_MARKER
    if not marker.is_file():
        return f"no {COMPLETE_MARKER} marker (the save was interrupted)"
    try:
        files = json.loads(marker.read_text(encoding="utf-8"))["files"]
        expected = {name: (entry, None) if isinstance(entry, int) else (int(entry["bytes"]), entry.get("sha256"))
                    for name, entry in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"unreadable {COMPLETE_MARKER} marker"
    for name, (size, _) in expected.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} expected"
    if verify:
        for name, (_, digest) in expected.items():
            if digest is not None and sha256_of(folder / name) != digest:
                return f"{name} does not match its sha256 (changed or damaged since it was saved)"
    return None


# ---------------------------------------------------------------------------------------
# resume
def checkpoint_folders(checkpoints_dir: Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every ``checkpoint-N`` folder, complete or not, oldest first."""
    found = []
    if Path(checkpoints_dir).is_dir():
        for folder in Path(checkpoints_dir).iterdir():
            match = re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", folder.name)
            if match and folder.is_dir():
                found.append((int(match.group(1)), folder))
    return sorted(found)


def newest_complete_checkpoint(checkpoints_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint that verifies, and why each newer one was skipped."""
    skipped = []
    for _, folder in reversed(checkpoint_folders(checkpoints_dir)):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder, skipped
        skipped.append(f"skipped {folder.name}: {problem}")
    return None, skipped


def find_resume_checkpoint(run_dir: Path, value: str | bool = "auto") -> str | None:
    """The checkpoint ``--resume [auto|PATH]`` means, as a folder path.

    ``auto`` (or True): the newest complete, intact checkpoint in ``RUN/checkpoints``; newer
    ones that are incomplete or fail their checksums are skipped with one warning. None when
    there is none: the run starts from step 0, and one warning says so (a job that always
    passes ``--resume`` starts the same way the first time and every time after). PATH: a
    checkpoint folder, or a run directory (its newest complete checkpoint); anything else, or
    an incomplete or damaged checkpoint, is a :class:`ConfigError`.
    """
    run_dir = Path(run_dir)
    if value is True or value == "auto":
        found, skipped = newest_complete_checkpoint(run_dir / "checkpoints")
        if found is None:
            why = f" ({'; '.join(skipped)})" if skipped else ""
            _warn(f"--resume: no complete checkpoint in {run_dir / 'checkpoints'}{why}; training starts from step 0")
            return None
        if skipped:
            _warn(f"--resume: {'; '.join(skipped)}; resuming from {found}")
        return str(found)
    path = Path(value)
    if (path / "checkpoints").is_dir():
        found, skipped = newest_complete_checkpoint(path / "checkpoints")
        if found is None:
            raise ConfigError(f"--resume {value}: this run directory has no complete checkpoint")
        if skipped:
            _warn(f"--resume: {'; '.join(skipped)}; resuming from {found}")
        return str(found)
    if not path.is_dir():
        raise ConfigError(f"--resume {value}: no such checkpoint folder (expected RUN/checkpoints/checkpoint-N)")
    if not (path / "trainer_state.json").is_file():
        raise ConfigError(f"--resume {value}: not a training checkpoint (no trainer_state.json)")
    problem = checkpoint_problem(path)
    if problem:
        raise ConfigError(f"--resume {value}: incomplete checkpoint: {problem}")
    return str(path)


def has_checkpoints(run_dir: Path) -> bool:
    return bool(checkpoint_folders(Path(run_dir) / "checkpoints"))


def truncate_metrics(path: Path, checkpoint: Path) -> int:
    """Cut ``metrics.jsonl`` back to the events the checkpoint had logged; returns how many stay.

    Each line is one ``Trainer.log`` call, as is each entry of the checkpoint's
    ``log_history``, so after a resume the file holds exactly the events of the resumed
    trajectory: those logged after the checkpoint by the crashed process are dropped (they are
    logged again, with the same steps, as training continues) and none is written twice.
    """
    if not path.is_file():
        return 0
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))
    keep = len(state.get("log_history", []))
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if len(kept) == keep:
            break
        try:
            json.loads(line)
        except ValueError:  # a line cut by the crash
            break
        kept.append(line)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)
    return len(kept)


# ---------------------------------------------------------------------------------------
# after each save
def rotate_checkpoints(checkpoints_dir: Path, keep: int, current_step: int, best: str | None = None) -> None:
    """transformers' rule on complete checkpoints only: at most ``keep`` (more only to keep
    both the current and the best one), newest first. Incomplete ones older than the current
    step (saves that never finished and will not be repeated) go too."""
    kept = {f"{PREFIX_CHECKPOINT_DIR}-{current_step}"} | ({Path(best).name} if best else set())
    budget = max(keep, len(kept))
    folders = checkpoint_folders(checkpoints_dir)
    complete = [f for _, f in folders if (f / COMPLETE_MARKER).is_file()]
    for folder in reversed(complete):
        if len(kept) >= budget:
            break
        kept.add(folder.name)
    for step, folder in folders:
        if folder.name not in kept and (folder in complete or step < current_step):
            shutil.rmtree(folder, ignore_errors=True)


def _barrier() -> None:
    if world_size() > 1:
        dist.barrier()


class CheckpointCompletion(TrainerCallback):
    """Marks each saved checkpoint complete (``on_save``), then rotates.

    Under DDP every rank calls ``on_save`` after the stock save returned on that rank: after a
    barrier all ranks' files are written, rank 0 checks that every rank's RNG file is visible,
    writes the marker and rotates; a second barrier keeps every rank from going on before
    the checkpoint is complete.

    ``save_total_limit``: complete checkpoints kept (None: all); the trainer's own
    ``save_total_limit`` must be None, or it would delete before the marker exists.
    """

    def __init__(self, save_total_limit: int | None = None):
        self.save_total_limit = save_total_limit

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        _barrier()
        if args.should_save:
            if not args.save_only_model:
                self._wait_for_rank_files(folder, args.world_size)
            write_complete_marker(folder, state.global_step)
            if self.save_total_limit:
                rotate_checkpoints(folder.parent, self.save_total_limit, state.global_step,
                                   state.best_model_checkpoint)
        _barrier()
        return control

    def on_train_end(self, args, state, control, **kwargs):
        # as the stock Trainer does with save_total_limit 1: once training ended, only the best stays
        if args.should_save and self.save_total_limit == 1 and state.best_model_checkpoint:
            best = Path(state.best_model_checkpoint).name
            for _, folder in checkpoint_folders(Path(args.output_dir)):
                if folder.name != best:
                    shutil.rmtree(folder, ignore_errors=True)
        return control

    @staticmethod
    def _wait_for_rank_files(folder: Path, processes: int) -> None:
        names = ["rng_state.pth"] if processes <= 1 else [f"rng_state_{r}.pth" for r in range(processes)]
        deadline = time.monotonic() + RANK_FILES_WAIT_S
        missing = [n for n in names if not (folder / n).is_file()]
        while missing and time.monotonic() < deadline:
            time.sleep(0.2)
            missing = [n for n in missing if not (folder / n).is_file()]
        if missing:  # resumable, but those ranks' dropout would not repeat
            warnings.warn(f"{folder.name} lacks {', '.join(missing)} (not visible after {RANK_FILES_WAIT_S:.0f} s); "
                          "a resume from it will not repeat the same random draws", CheckpointWarning, stacklevel=2)
