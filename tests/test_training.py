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


def test_lora_adapters_depend_on_the_seed_alone():
    """Whatever drew from the global generator before (a model converted on first use did),
    the same seed gives the same adapters: the first run after a fresh install and every later
    run train from the same start."""
    import torch

    from medassist.training import build_model

    cfg = load_config(None, {"model": "tiny-qwen3", "seed": 7})
    adapters = []
    for draws in (0, 1000):
        torch.rand(draws)
        model, _, _ = build_model(cfg)
        adapters.append({k: v.clone() for k, v in model.named_parameters() if "lora_A" in k})
    assert adapters[0] and adapters[0].keys() == adapters[1].keys()
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])
    other, _, _ = build_model(cfg.model_copy(update={"seed": 8}))
    assert not all(torch.equal(adapters[0][k], p) for k, p in other.named_parameters() if "lora_A" in k)


def test_lora_last_layers_adapts_only_the_top_layers_and_the_backward_stops_there(tmp_path, toy_csv):
    """``lora.last_layers``: adapters (every linear, as ``all-linear``) in the last N decoder
    layers only; the layers below get no gradient, so autograd runs no backward through them;
    the saved adapter reloads with the same layers."""
    from medassist.training import build_model

    model, _, _ = build_model(load_config(None, {"model": "tiny-qwen3", "lora": {"last_layers": 1}}))
    full, _, _ = build_model(load_config(None, {"model": "tiny-qwen3"}))

    def adapted(m):
        return {(n.split(".layers.")[1].split(".")[0], n.split(".")[-3]) for n, _ in m.named_parameters()
                if "lora_A" in n}

    assert {layer for layer, _ in adapted(model)} == {"1"}
    assert {name for _, name in adapted(model)} == {name for _, name in adapted(full)}  # the same linears
    needs_grad = {}
    layers = model.get_base_model().model.layers
    for i, layer in enumerate(layers):
        layer.register_forward_hook(lambda _m, _a, out, i=i: needs_grad.__setitem__(
            i, (out[0] if isinstance(out, tuple) else out).requires_grad))
    ids = torch.tensor([[5, 6, 7, 8]])
    model(input_ids=ids, labels=ids).loss.backward()
    assert needs_grad == {0: False, 1: True}

    result = _train_family("tiny-qwen3", toy_csv, tmp_path / "run", 2, 1e-3, lora={"last_layers": 1})
    loaded = load_for_inference(str(result.run_dir), merge=False)
    assert loaded.model.peft_config["default"].layers_to_transform == [1]
    assert {layer for layer, _ in adapted(loaded.model)} == {"1"}

    for bad, message in [({"model": "tiny-qwen3", "lora": {"last_layers": 3}}, "has 2 decoder layers"),
                         ({"model": "tiny-t5", "lora": {"enabled": True, "last_layers": 1}}, "decoder-only")]:
        with pytest.raises(ConfigError, match=message):
            build_model(load_config(None, bad))


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


# ---------------------------------------------------------------------------------------
# no waste on real data (issue 14 item 2): a bounded validation loss, one evaluation of the
# final weights, and where the wall time went
def test_validation_loss_subset_is_bounded_and_seeded():
    from medassist.config import EvalConfig
    from medassist.training import validation_loss_subset

    assert EvalConfig().loss_limit == 256 and "null = all rows" in EvalConfig.model_fields["loss_limit"].description
    rows = list(range(50))
    cfg = load_config(None, {"eval": {"loss_limit": 5}})
    picked = validation_loss_subset(rows, cfg)
    assert len(picked) == 5 and picked == sorted(picked) == validation_loss_subset(rows, cfg)
    assert picked != validation_loss_subset(rows, load_config(None, {"seed": 7, "eval": {"loss_limit": 5}}))
    assert validation_loss_subset(rows, load_config(None, {"eval": {"loss_limit": None}})) == rows
    assert validation_loss_subset(rows[:3], cfg) == rows[:3]


def test_final_validation_is_the_last_evaluation_when_it_measured_the_final_weights(tmp_path, sample_csv):
    run = tmp_path / "run"
    result = train(load_config(None, {
        "model": "tiny-qwen3", "max_steps": 4, "batch_size": 4, "output_dir": str(run), "eval_strategy": "steps",
        "eval_steps": 2, "save_strategy": "no", "report": False,
        "data": {"path": str(sample_csv), "validation_fraction": 0.3},
        "eval": {"generation_metrics": False, "loss_limit": 5}}))
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evaluations = [e for e in events if "eval_loss" in e]
    assert [e["step"] for e in evaluations] == [2, 4]  # no second evaluation of the step-4 weights
    summary = result.summary
    assert summary["final_validation_loss"] == evaluations[-1]["eval_loss"]
    assert summary["final_validation_perplexity"] == evaluations[-1]["eval_pooled_perplexity"]
    assert summary["validation_metrics"]["eval_pooled_answer_tokens"] == evaluations[0]["eval_pooled_answer_tokens"] > 0
    assert summary["validation_loss_examples"] == 5 < summary["validation_examples"]
    timing = summary["timing"]
    assert set(timing) == {"setup", "train", "eval", "generation", "save", "report", "total"}
    assert timing["train"] > 0 and timing["eval"] > 0 and timing["generation"] == timing["report"] == 0
    parts = sum(v for k, v in timing.items() if k != "total")
    assert parts <= timing["total"] <= parts + 5.0  # setup .. report cover the run


def _trainer_after(global_step: int, best_step: int | None, load_best: bool, evaluated_steps: list[int]):
    from types import SimpleNamespace

    history = []
    for step in evaluated_steps:  # a loss event, then the generation metrics' own event
        history += [{"step": step, "eval_loss": 1.0 / step, "eval_runtime": 0.5, "epoch": 1.0},
                    {"step": step, "eval_bertscore_f1": 0.1 * step}]
    calls: list[int] = []
    state = SimpleNamespace(global_step=global_step, best_global_step=best_step, log_history=history,
                            best_model_checkpoint=f"run/checkpoints/checkpoint-{best_step}" if best_step else None)
    trainer = SimpleNamespace(state=state, args=SimpleNamespace(load_best_model_at_end=load_best),
                              evaluate=lambda: calls.append(global_step) or {"eval_loss": 9.0, "eval_runtime": 2.0})
    return trainer, calls


@pytest.mark.parametrize("global_step,best,load_best,evaluated,reused", [
    (4, 4, True, [2, 4], True),  # best = last: its metrics are the final weights'
    (4, None, False, [2, 4], True),  # no best checkpoint reloaded: the last step's weights
    (4, 2, True, [2, 4], False),  # an earlier best was reloaded: measured once more
    (5, None, False, [2, 4], False),  # the last step was not evaluated
    (4, None, False, [], False),  # no evaluation during training
])
def test_final_validation_reuses_an_evaluation_only_of_the_same_weights(global_step, best, load_best, evaluated,
                                                                        reused):
    from medassist.training.recipe import final_validation

    trainer, calls = _trainer_after(global_step, best, load_best, evaluated)
    metrics = final_validation(trainer)
    if reused:
        assert calls == [] and metrics == {"eval_loss": 1.0 / global_step, "eval_bertscore_f1": 0.1 * global_step}
    else:
        assert calls == [global_step] and metrics == {"eval_loss": 9.0}


def test_cli_train_ends_with_the_verdicts_and_shows_progress_of_the_final_evaluation(tmp_path, capsys):
    """`make train`'s last lines: whether the tuned model beats the base model (with an
    interval), then the report; the final evaluation's generation shows a progress bar."""
    run = tmp_path / "run"
    assert main(["train", "--set", "model=tiny-qwen3", "--set", "max_steps=2", "--set", "eval_strategy=no",
                 "--set", "save_strategy=no", "--set", "eval.generation_metrics=false", "--set", "eval.test_limit=4",
                 "--set", "eval.max_new_tokens=2", "--set", "eval.retrieval_baseline=false",
                 "--output-dir", str(run)]) == 0
    captured = capsys.readouterr()
    out = captured.out[captured.out.index("held-out test"):]
    assert out.splitlines()[1].startswith("better than the base model: ")
    assert "model minus" in out and "95% interval" in out and f"report: {run / 'report' / 'report.html'}" in out
    assert "generating (model)" in captured.err and "generating (base model)" in captured.err


def test_memory_trim_every_n_steps_and_as_each_answer_of_the_final_evaluation_finishes(tmp_path, monkeypatch):
    """`memory_trim_steps: 2` over 4 steps trims after steps 2 and 4, after the final validation
    loss, once before the report and each time its generation reports progress (once per finished
    answer: 4 test questions for the model, 4 for the base model); without the setting only the
    one before the report runs."""
    from medassist.training import recipe, speed

    steps = []
    monkeypatch.setattr(recipe, "release_freed_memory", lambda: steps.append("recipe"))
    monkeypatch.setattr(speed, "release_freed_memory", lambda: steps.append("eval"))
    argv = ["train", "--set", "model=tiny-qwen3", "--set", "max_steps=4", "--set", "eval_strategy=no",
            "--set", "save_strategy=no", "--set", "eval.generation_metrics=false", "--set", "eval.test_limit=4",
            "--set", "eval.batch_size=2", "--set", "eval.max_new_tokens=2", "--set", "eval.retrieval_baseline=false"]
    assert main([*argv, "--set", "memory_trim_steps=2", "--output-dir", str(tmp_path / "trim")]) == 0
    assert steps == ["recipe"] * 4 + ["eval"] * 8, steps
    steps.clear()
    assert main([*argv, "--output-dir", str(tmp_path / "plain")]) == 0
    assert steps == ["recipe"]
