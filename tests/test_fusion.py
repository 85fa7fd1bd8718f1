"""``fused_projections``: q/k/v and gate/up of a LoRA decoder as one base matmul and one
``lora_A`` matmul per group, the same numbers as PEFT's layer-by-layer path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import set_seed

from medassist.config import load_config
from medassist.models import load_pretrained
from medassist.training import build_model, recipe, speed
from medassist.training.fusion import FusedProjections


def _lora_model(dropout: float = 0.0):
    cfg = load_config(None, {"model": "tiny-qwen3", "lora": {"dropout": dropout}})
    set_seed(0)
    model = build_model(cfg)[0]
    with torch.no_grad():  # LoRA starts with B = 0: make the adapter path count
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def _frozen(model, fuse: bool):
    return speed.FrozenWeights(model, lambda: load_pretrained("tiny-qwen3")[0], cast_once=False, fuse=fuse)


def _base_calls(model) -> list[str]:
    calls: list[str] = []
    for name, module in model.named_modules():
        if name.endswith(("q_proj.base_layer", "k_proj.base_layer", "v_proj.base_layer", "gate_proj.base_layer",
                          "up_proj.base_layer", "o_proj.base_layer", "down_proj.base_layer")):
            module.register_forward_hook(lambda m, i, o, name=name: calls.append(name.split(".")[-2]))
    return calls


def _loss_and_grads(model, ids, bf16: bool = True):
    model.train()
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        hidden = model.base_model.model.model(input_ids=ids, use_cache=False).last_hidden_state
    loss = hidden.float().square().mean()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_fused_groups_give_peft_loss_and_grads_with_one_base_matmul_per_group():
    model = _lora_model()
    ids = torch.randint(10, model.config.vocab_size, (3, 17))
    _, exact = _loss_and_grads(model, ids, bf16=False)  # fp32 weights, no autocast
    frozen = _frozen(model, fuse=True)
    calls = _base_calls(model)
    groups = frozen.fused.groups
    assert len(groups) == 2 * model.config.num_hidden_layers  # q/k/v and gate/up of every layer
    for group in groups:  # one bf16 matrix per group, the members' weights are views of it: no copy
        assert group.weight.dtype == torch.bfloat16
        assert all(m.base_layer.weight.untyped_storage().data_ptr() == group.weight.untyped_storage().data_ptr()
                   for m in group.layers)
    fused_loss, fused_grads = _loss_and_grads(model, ids)
    assert set(calls) == {"o_proj", "down_proj"}  # q, k, v, gate and up ran as their groups
    frozen.fused.release()  # the same bf16 weights, PEFT's own forward for every linear
    calls.clear()
    loss, grads = _loss_and_grads(model, ids)
    assert {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"} <= set(calls)
    # the same bf16 products; only the rounding of the summed input gradients differs
    assert fused_loss == pytest.approx(loss, rel=1e-6)
    def error(got, want):  # relative error of each gradient, averaged
        return sum(((got[n] - want[n]).norm() / want[n].norm()).item() for n in want) / len(want)

    assert error(fused_grads, grads) < 1e-2  # bf16 has 8 bits of mantissa: 4e-3 relative per rounding
    assert error(fused_grads, exact) <= 1.1 * error(grads, exact)  # no further from fp32 than PEFT's path


def test_fused_path_steps_aside_for_what_it_does_not_cover():
    model = _lora_model()
    frozen = _frozen(model, fuse=True)
    attention = model.base_model.model.model.layers[0].self_attn
    x = torch.randn(2, 5, model.config.hidden_size)
    other = torch.randn(2, 5, model.config.hidden_size)
    calls = [("q_proj", x), ("k_proj", other), ("v_proj", x)]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = {name: type(getattr(attention, name)).forward(getattr(attention, name), t) for name, t in calls}
        # k comes with another input than q: it is computed for its own input
        got = {name: getattr(attention, name)(t) for name, t in calls}
        for name in plain:
            assert torch.allclose(got[name].float(), plain[name].float(), rtol=1e-2, atol=1e-2), name
        again = torch.randn(2, 5, model.config.hidden_size)  # a new round after an unfinished one
        for name in ("q_proj", "k_proj", "v_proj"):
            want = type(getattr(attention, name)).forward(getattr(attention, name), again)
            assert torch.allclose(getattr(attention, name)(again).float(), want.float(), rtol=1e-2, atol=1e-2)
        assert not attention.q_proj._medassist_group.outputs  # nothing left waiting
        with model.disable_adapter():  # the base model's baseline: no adapter in the output
            assert torch.equal(attention.q_proj(x), attention.q_proj.base_layer(x))
    frozen.restore()  # fp32 weights back (generation, the final report): PEFT's path on fp32
    assert all(g.weight is None for g in frozen.fused.groups)
    assert attention.q_proj.base_layer.weight.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(attention.q_proj(x), type(attention.q_proj).forward(attention.q_proj, x))
    frozen.cast()  # bf16 again: the groups are shared matrices again
    assert all(g.weight is not None for g in frozen.fused.groups)
    frozen.fused.remove()
    assert "forward" not in attention.q_proj.__dict__


def test_dropout_keeps_peft_forward():
    model = _lora_model(dropout=0.1)
    fused = FusedProjections(model)
    fused.share()
    group = fused.groups[0]
    assert not group.usable()  # each adapter drops its own input


def _cfg(tmp_path, name: str, **extra):
    return load_config(Path(__file__).resolve().parents[1] / "configs" / "default.yaml", {
        "model": "tiny-qwen3", "output_dir": str(tmp_path / name), "max_steps": 4, "batch_size": 4,
        "grad_accum": 1, "logging_steps": 1, "eval_strategy": "no", "save_strategy": "no", "report": False,
        "precision": "bf16", "data": {"path": "sample", "balance_column": None, "holdout_column": None,
                                      "test_values": [], "validation_values": []},
        "eval": {"loss_limit": 8}, **extra})


def _losses(run) -> list[float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [e["loss"] for e in map(json.loads, lines) if "loss" in e]


@pytest.mark.parametrize("compiled", [False, True])
def test_fused_projections_train_the_same_run(tmp_path, compiled):
    if compiled and not speed.cpp_compiler():
        pytest.skip("no C++ compiler: inductor cannot build CPU kernels here")
    torch._dynamo.reset()
    said: list[str] = []
    fused = recipe.train(_cfg(tmp_path, "fused", fused_projections=True, torch_compile=compiled), said.append)
    assert "fused_projections: 4 groups of sibling projections in one matmul each" in said
    plain = recipe.train(_cfg(tmp_path, "plain", fused_projections=False, torch_compile=False), said.append)
    assert _losses(fused.run_dir) == pytest.approx(_losses(plain.run_dir), rel=2e-2)
    assert fused.summary["final_validation_loss"] == pytest.approx(plain.summary["final_validation_loss"], rel=2e-2)


def test_fused_projections_need_bf16_frozen_weights_and_a_decoder(tmp_path):
    said: list[str] = []
    cfg = load_config(None, {"model": "tiny-qwen3", "fused_projections": True})
    assert speed.bf16_frozen_weights(cfg, None, "bf16", True, lambda: None, said.append) is None
    assert said == ["fused_projections ignored: it needs bf16_frozen_weights and a decoder-only model"]
