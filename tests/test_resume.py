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
    checkpoint_problem,
    find_resume_checkpoint,
    publish_checkpoint,
    truncate_metrics,
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


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"training ended (rc {proc.returncode}) before {path} appeared:\n"
                                 + proc.stderr.read()[-3000:])
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout} s"
        time.sleep(0.05)


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


def _events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _losses(run: Path) -> list[tuple[int, float]]:
    return [(e["step"], e["loss"]) for e in _events(run) if "loss" in e]


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    reference, run = tmp_path / "reference", tmp_path / "run"
    uninterrupted = _train(reference)
    proc = _train(run)
    _wait_for(run / "checkpoints" / "checkpoint-8", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    code, err = _finish(uninterrupted)
    assert code == 0, err[-3000:]
    killed_at = max(int(p.name.split("-")[-1]) for p in (run / "checkpoints").glob("checkpoint-*"))
    assert killed_at < STEPS and not (run / "train_summary.json").exists()

    code, err = _finish(_train(run, "--resume"))
    assert code == 0, err[-3000:]
    assert "resuming from" in err

    ref = json.loads((reference / "train_summary.json").read_text())
    got = json.loads((run / "train_summary.json").read_text())
    assert got["steps"] == ref["steps"] == STEPS
    assert got["resumed_from"].endswith(f"checkpoint-{killed_at}")
    assert got["train_examples_seen"] == ref["train_examples_seen"]
    assert got["final_train_loss"] == pytest.approx(ref["final_train_loss"], rel=1e-4)
    assert got["train_loss_mean"] == pytest.approx(ref["train_loss_mean"], rel=1e-4)
    assert got["final_validation_loss"] == pytest.approx(ref["final_validation_loss"], rel=1e-4)
    # the whole loss curve, one event per step: nothing lost, nothing logged twice
    ref_losses, got_losses = _losses(reference), _losses(run)
    assert [s for s, _ in got_losses] == list(range(1, STEPS + 1))
    assert [s for s, _ in ref_losses] == list(range(1, STEPS + 1))
    for (_, a), (_, b) in zip(ref_losses, got_losses):
        assert b == pytest.approx(a, rel=1e-4)
    assert len(_events(run)) == len(_events(reference))


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
def _fake_checkpoint(folder: Path, step: int, log_events: int = 2) -> Path:
    staging = folder.parent / f"tmp-checkpoint-{step}"
    staging.mkdir(parents=True)
    (staging / "trainer_state.json").write_text(json.dumps({"global_step": step,
                                                            "log_history": [{"step": i} for i in range(log_events)]}))
    (staging / "adapter_model.safetensors").write_bytes(b"x" * 100)
    return publish_checkpoint(staging, folder, step)


def test_incomplete_checkpoints_are_skipped_with_a_warning(tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    _fake_checkpoint(ckpts / "checkpoint-2", 2)
    good = _fake_checkpoint(ckpts / "checkpoint-4", 4)
    (ckpts / "tmp-checkpoint-6").mkdir()  # a save that was killed before its rename
    cut = _fake_checkpoint(ckpts / "checkpoint-8", 8)
    (cut / "adapter_model.safetensors").write_bytes(b"x" * 10)  # e.g. a partial copy
    nomarker = _fake_checkpoint(ckpts / "checkpoint-10", 10)
    (nomarker / COMPLETE_MARKER).unlink()  # e.g. a non-atomic rename on a FUSE mount
    with pytest.warns(UserWarning) as caught:
        assert find_resume_checkpoint(tmp_path / "run", "auto") == str(good)
    text = " ".join(str(w.message) for w in caught)
    assert "tmp-checkpoint-6" in text and "checkpoint-8: adapter_model.safetensors has 10 bytes" in text
    assert "checkpoint-10: no .complete marker" in text
    # PATH: a run directory or a checkpoint folder
    with pytest.warns(UserWarning):
        assert find_resume_checkpoint(tmp_path / "elsewhere", str(tmp_path / "run")) == str(good)
    assert find_resume_checkpoint(tmp_path / "elsewhere", str(good)) == str(good)
    with pytest.raises(ConfigError, match="incomplete checkpoint: no .complete marker"):
        find_resume_checkpoint(tmp_path / "run", str(nomarker))
    with pytest.raises(ConfigError, match="no such checkpoint folder"):
        find_resume_checkpoint(tmp_path / "run", str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="not a training checkpoint"):
        find_resume_checkpoint(tmp_path / "run", str(tmp_path))


def test_auto_without_checkpoints_starts_from_scratch(tmp_path):
    with pytest.warns(UserWarning, match="training starts from step 0"):
        assert find_resume_checkpoint(tmp_path / "new-run", "auto") is None


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
