"""Precision: `auto` picks bf16 only where it is fast; bf16 autocast really runs (also on the
answer-only loss path), keeps LoRA weights, gradients and optimizer state in fp32, and lands
on the fp32 loss within a stated tolerance after a few steps on tiny-qwen3."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from transformers import set_seed

from medassist.config import load_config
from medassist.data import QAExample
from medassist.errors import ConfigError
from medassist.training import (
    MedassistTrainer, columns_collator, build_model, cpu_supports_bf16, resolve_precision,
    to_dataset, tokenize_examples, training_arguments,
)

# bf16 keeps 8 mantissa bits (relative rounding 2^-9), so each autocast matmul differs from
# fp32 by ~0.1%; with master weights, loss and softmax in fp32 the logged loss of the same
# seeded run differs by a relative 4e-6 at step 1 and at most 2.4e-4 over 6 steps at lr 1e-2
# (tiny-qwen3, measured). The tolerance is ~4x that. It states that bf16 tracks fp32; it cannot
# tell fp32 master weights from bf16 ones over so few steps, which the dtype test checks.
LOSS_RTOL = 1e-3  # relative, per logged step
STEPS = 6
LR = 1e-2

X86_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
X86_AVX512_NO_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni\n"
X86_AMX = "flags\t\t: avx2 amx_bf16 amx_tile amx_int8\n"
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"
ARM_NO_BF16 = "processor\t: 0\nFeatures\t: fp asimd evtstrm crc32\n"


# ---------------------------------------------------------------------------------------
# `auto` resolution
@pytest.mark.parametrize("text,expected", [
    (X86_BF16, True), (X86_AMX, True), (ARM_BF16, True),
    (X86_AVX512_NO_BF16, False), (ARM_NO_BF16, False), ("", False),
    ("model name\t: Fake avx512_bf16 edition\nflags\t\t: avx2\n", False),  # only the flags line counts
])
def test_cpu_supports_bf16_reads_flags(text, expected):
    assert cpu_supports_bf16(text) is expected


def test_cpu_supports_bf16_without_proc_cpuinfo(monkeypatch):
    def missing(self, *args, **kwargs):
        raise FileNotFoundError(self)

    monkeypatch.setattr(Path, "read_text", missing)
    assert cpu_supports_bf16() is False


@pytest.mark.parametrize("cpuinfo,expected", [(X86_BF16, "bf16"), (X86_AVX512_NO_BF16, "fp32"),
                                              (ARM_BF16, "bf16"), (ARM_NO_BF16, "fp32")])
def test_auto_on_cpu_follows_cpuinfo(monkeypatch, cpuinfo, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    real_read = Path.read_text
    monkeypatch.setattr(Path, "read_text",
                        lambda self, *a, **k: cpuinfo if str(self) == "/proc/cpuinfo" else real_read(self, *a, **k))
    assert resolve_precision("auto") == expected
    assert resolve_precision("fp32") == "fp32"
    assert resolve_precision("bf16") == "bf16"  # asked for explicitly: honoured even if slow
    with pytest.raises(ConfigError, match="CUDA"):
        resolve_precision("fp16")


@pytest.mark.parametrize("bf16_ok,expected", [(True, "bf16"), (False, "fp32")])
def test_auto_on_gpu_follows_bf16_support(monkeypatch, bf16_ok, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_ok)
    assert resolve_precision("auto") == expected


# ---------------------------------------------------------------------------------------
# training in bf16 vs fp32 on tiny-qwen3
QA = [(f"What is a typical sign of condition {c}?", f"Condition {c} often shows {s} early on.")
      for c, s in zip("ABCDEFGH", ["fever", "a rash", "a cough", "joint pain", "fatigue", "thirst", "itching",
                                   "dizziness"])]


def _trainer(precision: str, tmp_path: Path, head_on_answer_only: bool = True):
    cfg = load_config(None, {"model": "tiny-qwen3", "precision": precision, "max_steps": STEPS,
                             "learning_rate": LR, "warmup_ratio": 0.0, "batch_size": 4, "logging_steps": 1,
                             "eval_strategy": "no", "save_strategy": "no", "report": False,
                             "lora": {"dropout": 0.0}})
    set_seed(cfg.seed)  # as train() does: the LoRA initialisation is drawn from the global RNG
    model, tok, family = build_model(cfg)
    fmt = family.make_format(tok, cfg)
    data = to_dataset(tokenize_examples(fmt, family, [QAExample(q, a, i) for i, (q, a) in enumerate(QA)]))
    args = training_arguments(cfg, tmp_path / precision, resolve_precision(precision), has_eval=False)
    args.disable_tqdm = True
    return MedassistTrainer(model=model, args=args, train_dataset=data, data_collator=columns_collator(fmt),
                            processing_class=tok, family=family, prune_head=head_on_answer_only)


def _record_linear_dtypes(model) -> list[torch.dtype]:
    seen: list[torch.dtype] = []
    for name, module in model.named_modules():
        if name.endswith("layers.0.mlp.down_proj.base_layer"):
            module.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    return seen


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("precision")
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for precision in ("fp32", "bf16"):
            trainer = _trainer(precision, tmp)
            dtypes = _record_linear_dtypes(trainer.model)
            trainer.train()
            losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
            out[precision] = {"trainer": trainer, "losses": losses, "matmul_dtypes": set(dtypes)}
    return out


def test_bf16_autocast_really_runs_on_the_answer_only_path(trained):
    # accelerate autocasts by wrapping model.forward; the answer-only loss calls the decoder
    # directly, so without its own autocast a "bf16" run would silently compute in fp32
    assert trained["bf16"]["trainer"].prune_head
    assert trained["bf16"]["matmul_dtypes"] == {torch.bfloat16}
    assert trained["fp32"]["matmul_dtypes"] == {torch.float32}


def test_bf16_keeps_lora_weights_grads_and_optimizer_state_fp32(trained):
    trainer = trained["bf16"]["trainer"]
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    frozen = [p for p in trainer.model.parameters() if not p.requires_grad]
    assert all(p.dtype == torch.float32 for p in frozen)  # autocast casts per op; weights stay fp32
    state = [v for s in trainer.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim()]
    assert state and all(v.dtype == torch.float32 for v in state)  # Adam's exp_avg / exp_avg_sq
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    trainer.compute_loss(trainer.model, batch).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable)


def test_bf16_loss_matches_fp32_within_tolerance(trained):
    fp32, bf16 = trained["fp32"]["losses"], trained["bf16"]["losses"]
    assert len(fp32) == len(bf16) == STEPS
    assert fp32[-1] < fp32[0] - 0.05, fp32  # it trained, so the comparison covers the updates
    for step, (a, b) in enumerate(zip(fp32, bf16), start=1):
        assert abs(a - b) <= LOSS_RTOL * abs(a), f"step {step}: fp32 {a:.5f} vs bf16 {b:.5f}"
