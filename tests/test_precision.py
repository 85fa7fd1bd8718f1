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


# ---------------------------------------------------------------------------------------
# frozen base weights stored in bf16 (issue 14 item 1)
def _live_adapter(model) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # LoRA starts with B = 0: make the adapter path count


def _step(trainer, batch):
    model = trainer.model
    model.train()
    model.zero_grad(set_to_none=True)
    kept: dict[int, int] = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = trainer.compute_loss(model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads, sum(kept.values())


def _frozen(trainer):
    from medassist.models import load_pretrained
    from medassist.training.speed import FrozenWeights

    return FrozenWeights(trainer.model, lambda: load_pretrained("tiny-qwen3")[0])


def test_bf16_frozen_weights_give_the_autocast_loss_and_grads_bit_for_bit(tmp_path):
    # autocast would round each frozen weight to bf16 at every forward; stored rounded, the
    # matmuls see the same values; each linear input is cast once and shared, and its
    # gradients still go back to fp32 one by one
    trainer = _trainer("bf16", tmp_path)
    _live_adapter(trainer.model)
    batch = next(iter(trainer.get_train_dataloader()))
    loss, grads, kept = _step(trainer, batch)
    frozen = _frozen(trainer)
    params = dict(trainer.model.named_parameters())
    assert frozen.names and all(params[f"base_model.model.{n}.weight"].dtype == torch.bfloat16 for n in frozen.names)
    # the adapter, norms and embeddings (and the LM head tied to them) stay fp32
    assert all(p.dtype == torch.float32 for n, p in params.items() if "base_layer" not in n)
    loss2, grads2, kept2 = _step(trainer, batch)
    assert loss2 == loss
    for name in grads:
        assert torch.equal(grads2[name], grads[name]), name
    assert kept2 < kept  # no fp32 -> bf16 weight casts kept for backward, one input copy per layer input
    frozen.restore()
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    loss3, grads3, _ = _step(trainer, batch)
    assert loss3 == loss and all(torch.equal(grads3[n], grads[n]) for n in grads)


def test_bf16_frozen_weights_train_the_same_run(trained, tmp_path):
    from medassist.training.speed import bf16_frozen_weights

    from medassist.models import load_pretrained

    cfg = load_config(None, {"model": "tiny-qwen3", "bf16_frozen_weights": True})
    trainer = _trainer("bf16", tmp_path)
    frozen = bf16_frozen_weights(cfg, trainer, "bf16", True, lambda: load_pretrained("tiny-qwen3")[0])
    assert frozen is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses == pytest.approx(trained["bf16"]["losses"], rel=1e-6)
    state = [v for s in trainer.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim()]
    assert state and all(v.dtype == torch.float32 for v in state)


def test_bf16_frozen_weights_apply_only_to_lora_under_bf16(tmp_path):
    from medassist.training.speed import bf16_frozen_weights

    cfg = load_config(None, {"model": "tiny-qwen3", "bf16_frozen_weights": True})
    never = lambda: pytest.fail("no weights to restore")  # noqa: E731
    said: list[str] = []
    trainer = _trainer("fp32", tmp_path)
    assert bf16_frozen_weights(cfg, trainer, "fp32", True, never, said.append) is None
    assert bf16_frozen_weights(cfg, trainer, "bf16", False, never, said.append) is None
    assert said == ["bf16_frozen_weights ignored: precision is not bf16", "bf16_frozen_weights ignored: no LoRA"]
    off = load_config(None, {"model": "tiny-qwen3"})
    assert not off.bf16_frozen_weights and bf16_frozen_weights(off, trainer, "bf16", True, never) is None
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())


def test_bf16_frozen_weights_restore_refuses_other_weights(tmp_path):
    from medassist.models import load_pretrained
    from medassist.training.speed import FrozenWeights

    trainer = _trainer("bf16", tmp_path)

    def other_base():
        model = load_pretrained("tiny-qwen3")[0]
        with torch.no_grad():
            model.model.layers[0].mlp.up_proj.weight.add_(0.5)
        return model

    frozen = FrozenWeights(trainer.model, other_base)
    with pytest.raises(RuntimeError, match="not the one trained on"):
        frozen.restore()


def test_bf16_frozen_weights_end_to_end_score_what_final_serves(tmp_path, monkeypatch):
    """Generation metrics during training run on the exact fp32 weights; after training the
    model handed to the test-split evaluation is fp32 and computes exactly what
    ``load_for_inference(run)`` (``medassist serve``) computes."""
    import medassist.evaluation as evaluation
    from medassist.models import load_for_inference, load_pretrained
    from medassist.training import train

    fresh = {n: p.detach().clone() for n, p in load_pretrained("tiny-qwen3")[0].named_parameters()}
    seen: dict[str, object] = {"generation": []}

    def fake_training_evaluator(*_args, **_kwargs):
        def evaluate(model):
            lm = model.get_base_model()
            seen["generation"].append(all(
                p.dtype == torch.float32 and torch.equal(p, fresh[n.replace(".base_layer", "")])
                for n, p in lm.named_parameters() if "lora_" not in n))
            return {"rouge_l": 0.0}
        return evaluate

    def fake_report(run, model, fmt, family, *args, **kwargs):
        seen["model"], seen["fmt"], seen["family"] = model, fmt, family
        return {}

    monkeypatch.setattr(evaluation, "make_training_evaluator", fake_training_evaluator)
    monkeypatch.setattr(evaluation, "evaluate_run_after_training", fake_report)
    cfg = load_config(None, {"model": "tiny-qwen3", "precision": "bf16", "bf16_frozen_weights": True,
                             "head_chunk_size": 16, "recompute_mlp_activation": True, "max_steps": 4,
                             "learning_rate": LR, "batch_size": 4, "eval_strategy": "steps", "eval_steps": 2,
                             "save_strategy": "steps", "save_steps": 2, "output_dir": str(tmp_path / "run"),
                             "eval": {"subset": 2}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train(cfg)
    assert seen["generation"] == [True, True]  # both evaluations, fp32 weights as loaded
    model = seen["model"]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    from medassist.models import merge_adapter

    served = load_for_inference(str(result.run_dir))
    model = merge_adapter(model)  # as the report merges it once the base model has answered
    batch = seen["fmt"].collate([{"input_ids": ids, "labels": ids}
                                 for ids in ([5, 17, 300, 9, 44], [7, 7, 1000, 12, 13, 14, 15])])
    model.eval()
    with torch.no_grad():
        ours = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        theirs = served.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(ours, theirs)  # fp32 base + adapter merged alike, no training autocast left
