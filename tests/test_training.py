"""End-to-end training through the one pipeline, both families."""

import json
from pathlib import Path

import pytest
import torch

from medassist.cli import main
from medassist.config import load_config
from medassist.data import question_key, read_split
from medassist.errors import ConfigError
from medassist.models import load_for_inference
from medassist.training import resolve_precision, train

QUIET = {"eval": {"generation_metrics": False}, "report": False}
TOY_QA = [(f"What is the main sign of condition {c}?", f"Condition {c} mainly causes {s}.")
          for c, s in zip("ABCDEFGHIJKL", ["fever", "rash", "cough", "pain", "fatigue", "thirst",
                                           "itching", "dizziness", "nausea", "swelling", "chills", "headache"])]


@pytest.fixture(scope="module")
def toy_csv(tmp_path_factory) -> Path:
    import csv

    path = tmp_path_factory.mktemp("data") / "toy.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["question", "answer"])
        writer.writerows(TOY_QA)
    return path


def _losses(run_dir: Path) -> list[float]:
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [e["loss"] for e in events if "loss" in e]


def test_cli_train_tiny_qwen3_lowers_loss_and_writes_run_dir(tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["train", "--set", "model=tiny-qwen3", "--set", "max_steps=24", "--set", "learning_rate=1e-2",
                 "--set", "logging_steps=1", "--set", "eval.generation_metrics=false", "--set", "report=false",
                 "--set", "save_strategy=steps", "--set", "save_steps=12", "--set", "eval_strategy=no",
                 "--output-dir", str(run)])
    assert code == 0
    assert f"run: {run}" in capsys.readouterr().out
    losses = _losses(run)
    assert len(losses) >= 20
    assert sum(losses[-5:]) / 5 < losses[0] - 0.05, losses
    for name in ["config.yaml", "final/adapter_config.json", "final/tokenizer_config.json", "metrics.jsonl",
                 "train_summary.json", "data_manifest.json", "splits/train.jsonl", "splits/validation.jsonl",
                 "splits/test.jsonl", "checkpoints/checkpoint-24"]:
        assert (run / name).exists(), name
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["steps"] == 24 and summary["supervised_tokens"] > 0 and summary["tokens_per_second"] > 0
    assert summary["tokens"] > summary["supervised_tokens"]
    for key in ("wall_time_seconds", "final_train_loss", "final_validation_loss", "supervised_tokens_per_second"):
        assert summary[key] is not None
    manifest = json.loads((run / "data_manifest.json").read_text())
    assert manifest["rows_per_split"]["train"] == len(read_split(run / "splits/train.jsonl"))
    assert load_config(run / "config.yaml").model_type == "decoder"
    train_q = {question_key(e.question) for e in read_split(run / "splits/train.jsonl")}
    assert not train_q & {question_key(e.question) for e in read_split(run / "splits/test.jsonl")}


def test_lora_defaults_and_trainable_count(tmp_path):
    from medassist.training import build_model, parameter_counts

    model, _, family = build_model(load_config(None, {"model": "tiny-qwen3"}))
    trainable, total = parameter_counts(model)
    assert family.name == "decoder" and 0 < trainable < total / 10
    assert model.peft_config["default"].r == 16 and model.peft_config["default"].lora_alpha == 32


def _train_family(model: str, toy_csv: Path, out: Path, steps: int, lr: float, **extra):
    cfg = load_config(None, {"model": model, "max_steps": steps, "learning_rate": lr, "logging_steps": 1,
                             "batch_size": 4, "output_dir": str(out), "eval_strategy": "no",
                             "save_strategy": "no", "warmup_ratio": 0.0, "precision": "fp32",
                             "data": {"path": str(toy_csv), "validation_fraction": 0.0, "test_fraction": 0.0},
                             **QUIET, **extra})
    return train(cfg)


@pytest.mark.parametrize("model,steps,lr", [("tiny-t5", 150, 3e-3), ("minilm-bert2bert", 40, 2e-4)])
def test_encoder_decoder_trains_saves_reloads_and_stops_at_eos(tmp_path, toy_csv, model, steps, lr):
    result = _train_family(model, toy_csv, tmp_path / "run", steps, lr)
    losses = _losses(result.run_dir)
    assert sum(losses[-3:]) / 3 < losses[0] * 0.7, losses
    assert (result.run_dir / "final" / "model.safetensors").exists()
    loaded = load_for_inference(str(result.run_dir))
    assert loaded.family.name == "encoder-decoder"
    fmt = loaded.format()
    question, answer = TOY_QA[0]
    batch = fmt.collate_prompts([fmt.prompt_ids(question)])
    with torch.no_grad():
        out = loaded.model.generate(**batch, max_new_tokens=40, do_sample=False)[0].tolist()
    assert fmt.eos_id in out[1:], "generation never produced EOS"
    text = loaded.tokenizer.decode(out, skip_special_tokens=True).strip()
    assert text, "empty generation"
    assert len(out) < 40


def test_both_families_share_one_entry_point(tmp_path, toy_csv):
    """Only `model`/`model_type` differ; data, split and run-directory files are the same code."""
    runs = {}
    for model, family in [("tiny-qwen3", "decoder"), ("tiny-t5", "encoder-decoder")]:
        out = tmp_path / family
        assert main(["train", "--model-type", family, "--set", f"model={model}", "--set", "max_steps=2",
                     "--set", f"data.path={toy_csv}", "--set", "eval.generation_metrics=false",
                     "--set", "report=false", "--output-dir", str(out)]) == 0
        runs[family] = out
    dec, enc = runs["decoder"], runs["encoder-decoder"]
    for split in ("train", "validation", "test"):
        assert (dec / f"splits/{split}.jsonl").read_text() == (enc / f"splits/{split}.jsonl").read_text()
    assert sorted(p.name for p in dec.iterdir()) == sorted(p.name for p in enc.iterdir())
    assert json.loads((dec / "data_manifest.json").read_text()) == json.loads((enc / "data_manifest.json").read_text())


def test_model_type_mismatch_is_one_line(tmp_path, capsys):
    code = main(["train", "--model-type", "encoder-decoder", "--set", "model=tiny-qwen3",
                 "--output-dir", str(tmp_path / "r")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: model_type: encoder-decoder, but 'tiny-qwen3' is a decoder model")


def test_fp16_refused_for_t5():
    with pytest.raises(ConfigError, match="T5"):
        resolve_precision("fp16", "google/flan-t5-small")
    assert resolve_precision("fp32") == "fp32"
    assert resolve_precision("auto") in {"bf16", "fp32"}


def test_missing_model_is_one_line(tmp_path, capsys):
    code = main(["train", "--set", "model=no-such-org/no-such-model", "--output-dir", str(tmp_path / "r")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: model 'no-such-org/no-such-model' is not a preset")


@pytest.mark.integration
def test_smollm2_few_steps_lowers_loss(tmp_path, toy_csv):
    result = _train_family("smollm2-135m", toy_csv, tmp_path / "run", 8, 1e-3, precision="auto")
    losses = _losses(result.run_dir)
    assert losses[-1] < losses[0], losses
    assert (result.run_dir / "final" / "adapter_model.safetensors").exists()
