"""Tracking: report_to reaches the Trainer, tensorboard writes RUN/logs, nothing phones home by default."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from medassist.config import load_config
from medassist.errors import ConfigError
from medassist.training import check_tracker, train, training_arguments

ROOT = Path(__file__).resolve().parents[1]


def test_tensorboard_event_files_are_written_to_run_logs(tmp_path, sample_csv, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    cfg = load_config(None, {
        "model": "tiny-qwen3", "max_steps": 2, "batch_size": 4, "logging_steps": 1, "report_to": "tensorboard",
        "eval_strategy": "no", "save_strategy": "no", "report": False, "eval": {"generation_metrics": False},
        "output_dir": str(tmp_path / "run"), "data": {"path": str(sample_csv), "limit": 30}})
    run = train(cfg).run_dir
    events = list((run / "logs").glob("events.out.tfevents.*"))
    assert events, f"no event file in {run / 'logs'}: {list(run.rglob('*tfevents*'))}"
    assert not list((run / "checkpoints").rglob("*tfevents*")), "event files must not land in checkpoints/"
    acc = EventAccumulator(str(run / "logs"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2]


def test_default_reports_to_nothing():
    cfg = load_config(None, {})
    assert cfg.report_to == "none"
    args = training_arguments(cfg, Path("/tmp/unused"), "fp32", has_eval=True)
    assert args.report_to == []
    for recipe in sorted((ROOT / "configs").glob("*.yaml")):
        assert load_config(recipe).report_to == "none", f"{recipe.name} reports somewhere by default"


def test_trainer_gets_no_tracking_callback_by_default(tmp_path):
    from transformers import Trainer
    from transformers.trainer_callback import DefaultFlowCallback, PrinterCallback, ProgressCallback

    from medassist.training import build_model

    cfg = load_config(None, {"model": "tiny-qwen3"})
    model, _, _ = build_model(cfg)
    trainer = Trainer(model=model, args=training_arguments(cfg, tmp_path, "fp32", has_eval=False))
    kinds = {type(cb) for cb in trainer.callback_handler.callbacks}
    assert kinds <= {DefaultFlowCallback, ProgressCallback, PrinterCallback}, kinds


def test_cli_disables_hub_telemetry(monkeypatch, capsys):
    from medassist.cli import main

    monkeypatch.delenv("HF_HUB_DISABLE_TELEMETRY", raising=False)
    assert main(["models"]) == 0
    assert os.environ["HF_HUB_DISABLE_TELEMETRY"] == "1"


@pytest.mark.parametrize("tracker", ["mlflow", "wandb"])
def test_missing_tracker_package_is_a_config_error(tracker):
    if importlib.util.find_spec(tracker) is not None:
        pytest.skip(f"{tracker} is installed here")
    with pytest.raises(ConfigError, match=f"report_to: {tracker} needs its package: pip install {tracker}"):
        check_tracker(tracker)
    check_tracker("none")
    check_tracker("tensorboard")
