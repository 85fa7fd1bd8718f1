"""Resume: a run killed with SIGKILL and resumed ends where an uninterrupted run ends.

The training runs are subprocesses (`python -m medassist train`), as a user runs them, so
SIGKILL and SIGTERM hit a real process. fp32 and a fixed seed make the runs comparable.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medassist.errors import ConfigError
from medassist.training import (
    COMPLETE_MARKER,
    CheckpointCompletion,
    checkpoint_problem,
    find_resume_checkpoint,
    truncate_metrics,
    write_complete_marker,
)

# 20 rows -> 18 train examples, batch 4 -> 5 steps per epoch: 12 steps cross two epoch
# boundaries, and the kill lands in the second epoch (after checkpoint-8), so the resumed
# run must rebuild the data order of a later epoch, not only skip batches of the first.
STEPS = 12
ARGS = ["--set", "model=tiny-qwen3", "--set", f"max_steps={STEPS}", "--set", "batch_size=4",
        "--set", "data.limit=20", "--set", "save_strategy=steps", "--set", "save_steps=4",
        "--set", "save_total_limit=2", "--set", "eval_strategy=no", "--set", "eval.generation_metrics=false",
        "--set", "report=false", "--set", "precision=fp32", "--set", "logging_steps=1",
        "--set", "learning_rate=1e-2", "--set", "warmup_ratio=0", "--set", "lora.dropout=0.1"]


def _env() -> dict[str, str]:
    # one thread per run: the reference and the interrupted run go side by side on 2 cores, and
    # every run does its float reductions in the same order
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1"}


def _train(run: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "medassist", "train", *ARGS, "--output-dir", str(run), *extra],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240, poll: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"training ended (rc {proc.returncode}) before {path} appeared:\n"
                                 + proc.stderr.read()[-3000:])
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout} s"
        time.sleep(poll)


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


def _events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _losses(run: Path) -> list[tuple[int, float]]:
    return [(e["step"], e["loss"]) for e in _events(run) if "loss" in e]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, started once and finished when a test first needs it (it runs
    beside the first interrupted run)."""
    run = tmp_path_factory.mktemp("reference") / "run"
    proc = _train(run)
    done: list = []

    def finished() -> Path:
        if not done:
            code, err = _finish(proc)
            assert code == 0, err[-3000:]
            done.append(run)
        return run

    yield finished
    if proc.poll() is None:
        proc.kill()


def _corrupt_in_place(path: Path) -> None:
    """Change bytes in the middle of a file, keeping its size (what a size check cannot see)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("when", ["after_checkpoint_8", "during_a_save", "checkpoint_8_corrupted"])
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, reference, when):
    """Killed after checkpoint-8 is complete, or while a save is under way (the stock save
    writes checkpoint-8 in place; without its marker it is skipped), or with checkpoint-8
    damaged in place afterwards (resume falls back to checkpoint-4): the resumed run ends where
    the uninterrupted one ends, with the same loss at every step."""
    run = tmp_path / "run"
    proc = _train(run)
    checkpoint_8 = run / "checkpoints" / "checkpoint-8"
    _wait_for(checkpoint_8 if when == "during_a_save" else checkpoint_8 / COMPLETE_MARKER, proc, poll=0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "train_summary.json").exists()
    killed_at = 8 if (checkpoint_8 / COMPLETE_MARKER).exists() else 4
    if when == "checkpoint_8_corrupted":
        _corrupt_in_place(checkpoint_8 / "adapter_model.safetensors")
        killed_at = 4

    code, err = _finish(_train(run, "--resume"))
    assert code == 0, err[-3000:]
    assert f"resuming from {run / 'checkpoints' / f'checkpoint-{killed_at}'} (step {killed_at})" in err
    warned = [line for line in err.splitlines() if "checkpoint-8" in line and "warning" in line]
    if when == "checkpoint_8_corrupted":
        assert warned == [f"medassist: warning: --resume: skipped checkpoint-8: adapter_model.safetensors does not "
                          f"match its sha256 (changed or damaged since it was saved); resuming from "
                          f"{run / 'checkpoints' / 'checkpoint-4'}"]
    elif killed_at == 8:
        assert warned == []
    else:  # killed before checkpoint-8 had its marker
        assert warned == [f"medassist: warning: --resume: skipped checkpoint-8: no .complete marker (the save was "
                          f"interrupted); resuming from {run / 'checkpoints' / 'checkpoint-4'}"]
    # how many steps ran here, and in total (issue 11 item 13)
    assert (f"trained {STEPS - killed_at} steps in this process (steps {killed_at + 1}-{STEPS}; {STEPS} in total)"
            in err)

    reference_run = reference()
    ref = json.loads((reference_run / "train_summary.json").read_text())
    got = json.loads((run / "train_summary.json").read_text())
    assert got["steps"] == ref["steps"] == STEPS
    assert (got["resumed_at_step"], got["steps_this_process"]) == (killed_at, STEPS - killed_at)
    assert (ref["resumed_at_step"], ref["steps_this_process"]) == (0, STEPS)
    assert got["resumed_from"].endswith(f"checkpoint-{killed_at}")
    assert got["train_examples_seen"] == ref["train_examples_seen"]
    assert got["final_train_loss"] == pytest.approx(ref["final_train_loss"], rel=1e-4)
    assert got["train_loss_mean"] == pytest.approx(ref["train_loss_mean"], rel=1e-4)
    assert got["final_validation_loss"] == pytest.approx(ref["final_validation_loss"], rel=1e-4)
    # the whole loss curve, one event per step: nothing lost, nothing logged twice
    ref_losses, got_losses = _losses(reference_run), _losses(run)
    assert [s for s, _ in got_losses] == list(range(1, STEPS + 1))
    assert [s for s, _ in ref_losses] == list(range(1, STEPS + 1))
    for (_, a), (_, b) in zip(ref_losses, got_losses):
        assert b == pytest.approx(a, rel=1e-4)
    assert len(_events(run)) == len(_events(reference_run))
    # every checkpoint left is complete and intact (checkpoint-8 was saved again)
    assert [checkpoint_problem(f) for f in sorted((run / "checkpoints").iterdir())] == [None, None]


def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(tmp_path):
    run = tmp_path / "run"
    proc = _train(run, "--set", "save_steps=100")  # only the signal makes a checkpoint
    _wait_for(run / "metrics.jsonl", proc)  # training has started
    proc.send_signal(signal.SIGTERM)
    code, err = _finish(proc)
    assert code == 2, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: training stopped by SIGTERM at step ")
    assert "resume with: medassist train <same arguments> --resume" in last
    step = int(last.split("at step ")[1].split(";")[0])
    assert 0 < step < STEPS
    assert checkpoint_problem(run / "checkpoints" / f"checkpoint-{step}") is None
    assert find_resume_checkpoint(run, "auto") == str(run / "checkpoints" / f"checkpoint-{step}")
    assert not (run / "final").exists()
    # (that resuming from such a checkpoint continues exactly is the SIGKILL test's job)


# --- checkpoint completeness, without training -----------------------------------------
def _fake_checkpoint(folder: Path, step: int, log_events: int = 2, marker: bool = True) -> Path:
    """A checkpoint folder as the stock save leaves it, then marked complete (as on_save does)."""
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step,
                                                           "log_history": [{"step": i} for i in range(log_events)]}))
    (folder / "adapter_model.safetensors").write_bytes(b"x" * 100)
    (folder / "rng_state.pth").write_bytes(b"r" * 10)
    if marker:
        write_complete_marker(folder, step)
    return folder


def test_incomplete_and_damaged_checkpoints_are_skipped_with_one_warning(tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    _fake_checkpoint(ckpts / "checkpoint-2", 2)
    good = _fake_checkpoint(ckpts / "checkpoint-4", 4)
    _fake_checkpoint(ckpts / "checkpoint-6", 6, marker=False)  # a save killed before its marker
    cut = _fake_checkpoint(ckpts / "checkpoint-8", 8)
    (cut / "adapter_model.safetensors").write_bytes(b"x" * 10)  # e.g. a partial copy
    nomarker = _fake_checkpoint(ckpts / "checkpoint-10", 10)
    (nomarker / COMPLETE_MARKER).unlink()  # e.g. a non-atomic copy of the run directory
    damaged = _fake_checkpoint(ckpts / "checkpoint-12", 12)
    (damaged / "trainer_state.json").write_text("X" + (damaged / "trainer_state.json").read_text()[1:])  # same size
    with pytest.warns(UserWarning) as caught:
        assert find_resume_checkpoint(tmp_path / "run", "auto") == str(good)
    assert len(caught) == 1
    text = str(caught[0].message)
    assert "checkpoint-6: no .complete marker" in text and "checkpoint-8: adapter_model.safetensors has 10 bytes" in text
    assert "checkpoint-10: no .complete marker" in text
    assert "checkpoint-12: trainer_state.json does not match its sha256" in text
    assert text.endswith(f"resuming from {good}")
    # PATH: a run directory or a checkpoint folder
    with pytest.warns(UserWarning):
        assert find_resume_checkpoint(tmp_path / "elsewhere", str(tmp_path / "run")) == str(good)
    assert find_resume_checkpoint(tmp_path / "elsewhere", str(good)) == str(good)
    with pytest.raises(ConfigError, match="incomplete checkpoint: no .complete marker"):
        find_resume_checkpoint(tmp_path / "run", str(nomarker))
    with pytest.raises(ConfigError, match="incomplete checkpoint: trainer_state.json does not match its sha256"):
        find_resume_checkpoint(tmp_path / "run", str(damaged))
    with pytest.raises(ConfigError, match="no such checkpoint folder"):
        find_resume_checkpoint(tmp_path / "run", str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="not a training checkpoint"):
        find_resume_checkpoint(tmp_path / "run", str(tmp_path))


def test_marker_records_size_and_sha256_of_every_file(tmp_path):
    import hashlib

    folder = _fake_checkpoint(tmp_path / "checkpoint-3", 3)
    marker = json.loads((folder / COMPLETE_MARKER).read_text())
    assert marker["step"] == 3
    assert marker["files"] == {p.name: {"bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
                               for p in folder.iterdir() if p.name != COMPLETE_MARKER}
    assert checkpoint_problem(folder) is None
    # a marker of medassist 0.2 (sizes only) is still read
    (folder / COMPLETE_MARKER).write_text(json.dumps({"step": 3, "files": {k: v["bytes"] for k, v in marker["files"].items()}}))
    assert checkpoint_problem(folder) is None


def test_rotation_waits_for_the_new_checkpoints_marker(tmp_path, monkeypatch):
    """save_total_limit 1: the previous complete checkpoint is deleted only after the new one
    is marked complete, so a crash during a save still leaves one to resume from."""
    from types import SimpleNamespace

    from medassist.training import checkpoints

    ckpts = tmp_path / "checkpoints"
    previous = _fake_checkpoint(ckpts / "checkpoint-4", 4)
    args = SimpleNamespace(output_dir=str(ckpts), should_save=True, save_only_model=False, world_size=1)
    state = SimpleNamespace(global_step=8, best_model_checkpoint=None)
    _fake_checkpoint(ckpts / "checkpoint-8", 8, marker=False)  # what the stock save has written

    def crash(*_a, **_k):
        raise KeyboardInterrupt("killed while writing the marker")

    monkeypatch.setattr(checkpoints, "write_complete_marker", crash)
    with pytest.raises(KeyboardInterrupt):
        CheckpointCompletion(save_total_limit=1).on_save(args, state, None)
    assert checkpoint_problem(previous) is None
    monkeypatch.undo()
    CheckpointCompletion(save_total_limit=1).on_save(args, state, None)
    assert [p.name for p in ckpts.iterdir()] == ["checkpoint-8"] and checkpoint_problem(ckpts / "checkpoint-8") is None


def test_auto_without_checkpoints_starts_from_scratch(tmp_path):
    with pytest.warns(UserWarning, match="training starts from step 0"):
        assert find_resume_checkpoint(tmp_path / "new-run", "auto") is None


def test_resume_without_a_complete_checkpoint_starts_from_step_0_and_says_so_once(tmp_path, capsys):
    """Issue 11 item 12: `--resume` with only incomplete checkpoints starts from step 0 (a job
    that always passes --resume starts the same way the first time), in one line, instead of
    warning so and then refusing with "already holds checkpoints... pass --resume"."""
    from medassist.cli import main

    run = tmp_path / "run"
    _fake_checkpoint(run / "checkpoints" / "checkpoint-2", 2, marker=False)  # the first attempt died saving
    code = main(["train", "--set", "model=tiny-qwen3", "--set", "max_steps=2", "--set", "data.limit=20",
                 "--set", "save_strategy=steps", "--set", "save_steps=2", "--set", "eval_strategy=no",
                 "--set", "eval.generation_metrics=false", "--set", "report=false",
                 "--output-dir", str(run), "--resume"])
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    said = [line for line in err.splitlines() if "checkpoint" in line]
    assert said[:1] == [f"medassist: warning: --resume: no complete checkpoint in {run / 'checkpoints'} (skipped "
                        "checkpoint-2: no .complete marker (the save was interrupted)); training starts from step 0"]
    assert len([line for line in said if "step 0" in line or "already holds" in line]) == 1
    assert "resuming from" not in err
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["steps"] == 2 and summary["resumed_from"] is None
    assert checkpoint_problem(run / "checkpoints" / "checkpoint-2") is None  # saved again, complete


def test_bad_resume_path_is_one_line(tmp_path, capsys):
    from medassist.cli import main

    code = main(["train", "--set", "model=tiny-qwen3", "--output-dir", str(tmp_path / "r"),
                 "--resume", str(tmp_path / "missing")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --resume ") and "no such checkpoint folder" in err[0]


def test_truncate_metrics_keeps_the_checkpoints_events(tmp_path):
    ckpt = _fake_checkpoint(tmp_path / "checkpoints" / "checkpoint-2", 2, log_events=2)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')  # last line cut by a kill
    assert truncate_metrics(metrics, ckpt) == 2
    assert metrics.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_resume_with_other_data_is_refused(tmp_path, sample_csv):
    import shutil

    from medassist.config import load_config
    from medassist.training import setup_run

    data = tmp_path / "data.csv"
    shutil.copy(sample_csv, data)
    cfg = load_config(None, {"output_dir": str(tmp_path / "run"), "data": {"path": str(data)}})
    setup_run(cfg)
    setup_run(cfg, resuming=True)  # same data: fine
    data.write_text(data.read_text() + '"What is new?","Something new."\n')
    with pytest.raises(ConfigError, match="the data differs"):
        setup_run(cfg, resuming=True)


def test_a_fresh_run_refuses_a_directory_with_checkpoints(tmp_path, capsys):
    from medassist.cli import main

    _fake_checkpoint(tmp_path / "run" / "checkpoints" / "checkpoint-500", 500)
    code = main(["train", "--set", "model=tiny-qwen3", "--output-dir", str(tmp_path / "run")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {tmp_path / 'run'} already holds checkpoints of a run: pass --resume to continue it, "
                   "or choose another --output-dir"]
