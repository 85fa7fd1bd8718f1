"""``torch_compile``: repeated blocks compiled by inductor for the training steps only."""

from __future__ import annotations

import json

import pytest
import torch

from medassist.config import load_config
from medassist.models import load_pretrained
from medassist.training import recipe, speed


def _cfg(tmp_path, name: str, **extra):
    # the default recipe's switches (bf16 frozen weights, chunked head, recomputed SwiGLU) on
    # tiny-qwen3, with validation loss and generation metrics during training
    return load_config(recipe_defaults(), {
        "model": "tiny-qwen3", "output_dir": str(tmp_path / name), "max_steps": 4, "batch_size": 4,
        "grad_accum": 1, "logging_steps": 1, "eval_strategy": "steps", "eval_steps": 2, "save_strategy": "no",
        "report": False, "data": {"path": "sample", "balance_column": None, "holdout_column": None,
                                  "test_values": [], "validation_values": []},
        "eval": {"subset": 2, "max_new_tokens": 3, "loss_limit": 8, "bertscore_model": "minilm-l6"}, **extra})


def recipe_defaults():
    from pathlib import Path

    return Path(__file__).resolve().parents[1] / "configs" / "default.yaml"


def _losses(run) -> list[float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [e["loss"] for e in map(json.loads, lines) if "loss" in e]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_torch_compile_trains_the_same_run_with_compiled_blocks_and_evaluates_eager(tmp_path, monkeypatch, precision):
    if not speed.cpp_compiler():
        pytest.skip("no C++ compiler: inductor cannot build CPU kernels here")
    seen: dict = {}
    stock = speed.CompiledLayers.remove

    def remove(self):  # the blocks as training ends, and what compiled them
        seen["compiled"] = [b._compiled_call_impl is not None for b in self.blocks]
        stock(self)
        seen["after"] = [b._compiled_call_impl is not None for b in self.blocks]

    monkeypatch.setattr(speed.CompiledLayers, "remove", remove)
    frames = []
    stock_eval = recipe.MedassistTrainer._evaluate_with_metrics

    def evaluate(self, *a, **k):  # evaluation runs with compiled code forced eager
        frames.append(_stance())
        return stock_eval(self, *a, **k)

    monkeypatch.setattr(recipe.MedassistTrainer, "_evaluate_with_metrics", evaluate)
    said: list[str] = []
    torch._dynamo.reset()
    compiled = recipe.train(_cfg(tmp_path, "compiled", precision=precision, torch_compile=True), said.append)
    assert "torch_compile: 2 blocks compiled with inductor (the first step compiles them)" in said
    assert seen == {"compiled": [True, True], "after": [False, False]}
    assert frames == ["force_eager", "force_eager"]  # the validations at steps 2 and 4
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    eager = recipe.train(_cfg(tmp_path, "eager", precision=precision, torch_compile=False), said.append)
    # inductor fuses and reorders elementwise work: the same run to rounding, not bit for bit
    tolerance = 1e-4 if precision == "fp32" else 2e-2
    assert _losses(compiled.run_dir) == pytest.approx(_losses(eager.run_dir), rel=tolerance)
    assert compiled.summary["final_validation_loss"] == pytest.approx(eager.summary["final_validation_loss"],
                                                                        rel=tolerance)


def _stance() -> str:
    from torch._dynamo.eval_frame import _stance as stance

    return stance.stance


def test_torch_compile_without_a_cpp_compiler_trains_eager_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setattr(speed, "cpp_compiler", lambda: None)
    said: list[str] = []
    result = recipe.train(_cfg(tmp_path, "run", torch_compile=True, max_steps=1, eval_strategy="no"), said.append)
    assert "torch_compile ignored: inductor needs a C++ compiler on CPU (g++ or clang++ on PATH, or $CXX)" in said
    assert result.summary["steps"] == 1


def test_repeated_blocks_are_the_layers_of_a_decoder_and_the_blocks_of_t5():
    qwen = load_pretrained("tiny-qwen3")[0]
    assert speed.repeated_blocks(qwen) == list(qwen.model.layers)
    t5 = load_pretrained("tiny-t5")[0]
    assert speed.repeated_blocks(t5) == [*t5.encoder.block, *t5.decoder.block]


def test_cpp_compiler_follows_cxx(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    assert speed.cpp_compiler() is None
    monkeypatch.delenv("CXX")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert speed.cpp_compiler() is None
