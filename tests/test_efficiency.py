"""Less wasted work, same numbers: the answer-only LM head gives the stock loss and gradients,
loss-only evaluation builds no full logits, and batches are length-grouped and padded only to
their own longest sequence by default."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import Trainer, set_seed

from medassist.config import TrainConfig, load_config
from medassist.data import QAExample
from medassist.formatting import IGNORE_INDEX
from medassist.training import (
    EpochSeededSampler, MedassistTrainer, columns_collator, build_model, to_dataset, tokenize_examples,
    training_arguments,
)

QA = [(f"Question {i}: what does condition {c} do to a patient?", " ".join(["It causes symptoms."] * (1 + i % 5)))
      for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWX")]


def _setup(tmp_path, lora: bool, head_on_answer_only: bool = True, batch_size: int = 4, qa=QA, **extra):
    cfg = load_config(None, {"model": "tiny-qwen3", "precision": "fp32", "batch_size": batch_size,
                             "max_steps": 1, "eval_strategy": "no", "save_strategy": "no", "report": False,
                             "lora": {"enabled": lora, "dropout": 0.0}, **extra})
    set_seed(0)
    model, tok, family = build_model(cfg)
    fmt = family.make_format(tok, cfg)
    data = to_dataset(tokenize_examples(fmt, family, [QAExample(q, a, i) for i, (q, a) in enumerate(qa)]))
    args = training_arguments(cfg, tmp_path, "fp32", has_eval=False)
    args.disable_tqdm = True
    trainer = MedassistTrainer(model=model, args=args, train_dataset=data, eval_dataset=data,
                               data_collator=columns_collator(fmt), processing_class=tok,
                               family=family, prune_head=head_on_answer_only)
    return trainer, fmt, data


def _loss_and_grads(loss_fn, model):
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_answer_only_head_equals_stock_full_logit_loss_and_grads(tmp_path, lora):
    trainer, fmt, data = _setup(tmp_path, lora)
    model = trainer.model
    model.train()
    batch = fmt.collate([data[i] for i in (0, 3, 9, 14)])  # four lengths: padding on three rows
    assert (batch["attention_mask"] == 0).any()
    n_items = int((batch["labels"] != IGNORE_INDEX).sum())
    for num_items in (None, n_items):  # mean over this batch / over the accumulated items
        ours, ours_grads = _loss_and_grads(lambda: trainer._answer_only_loss(model, batch, num_items), model)
        stock, stock_grads = _loss_and_grads(
            lambda: Trainer.compute_loss(trainer, model, batch, num_items_in_batch=num_items), model)
        assert abs(ours.item() - stock.item()) <= 1e-5, (ours.item(), stock.item())
        assert ours_grads.keys() == stock_grads.keys() and ours_grads
        for name in stock_grads:
            torch.testing.assert_close(ours_grads[name], stock_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_trainer_uses_answer_only_head_by_default(tmp_path):
    assert TrainConfig().lm_head_on_answer_only
    trainer, fmt, data = _setup(tmp_path, lora=True)
    head = trainer.model.get_base_model().get_output_embeddings()
    rows: list[int] = []
    head.register_forward_hook(lambda _m, inp, _out: rows.append(inp[0].reshape(-1, inp[0].shape[-1]).shape[0]))
    batch = fmt.collate([data[i] for i in range(4)])
    trainer.model.train()
    trainer.compute_loss(trainer.model, batch)
    assert rows == [int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())]  # not batch x length


def test_loss_only_evaluation_builds_no_full_logits_and_matches_stock(tmp_path):
    results = {}
    for answer_only in (True, False):
        trainer, _, _ = _setup(tmp_path / str(answer_only), lora=True, head_on_answer_only=answer_only,
                               eval={"batch_size": 5})
        head = trainer.model.get_base_model().get_output_embeddings()
        shapes: list[tuple] = []
        head.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results[answer_only] = (trainer.evaluate()["eval_loss"], shapes)
    ours, ours_shapes = results[True]
    stock, stock_shapes = results[False]
    assert abs(ours - stock) <= 1e-5, (ours, stock)
    assert all(len(s) == 3 for s in stock_shapes)  # stock: batch x length x vocab
    assert ours_shapes and all(len(s) == 2 for s in ours_shapes)  # ours: supervised positions x vocab


def _padded_tokens(trainer) -> int:
    return sum(int(b["input_ids"].numel()) for b in trainer.get_train_dataloader())


def test_length_grouped_batches_and_dynamic_padding_by_default(tmp_path):
    # transformers' LengthGroupedSampler sorts within random "megabatches" of
    # min(n // (4 * batch), 50) batches, so it only groups once there are >= 8 batches' worth
    # of examples: 64 examples of batch 4 make megabatches of 16
    qa = [(f"Question {i}: what does it do?", " ".join(["It causes symptoms."] * (1 + (7 * i) % 12)))
          for i in range(64)]
    assert TrainConfig().group_by_length
    grouped, _, data = _setup(tmp_path / "grouped", lora=True, qa=qa)
    assert isinstance(grouped._get_train_sampler(), EpochSeededSampler)
    for batch in grouped.get_train_dataloader():  # padded to the batch's longest, never to max_length
        assert batch["input_ids"].shape[1] == int(batch["attention_mask"].sum(dim=1).max())
        assert batch["input_ids"].shape[1] < TrainConfig().max_length
    shuffled, _, _ = _setup(tmp_path / "random", lora=True, qa=qa, group_by_length=False)
    assert not isinstance(shuffled._get_train_sampler(), EpochSeededSampler)
    real = sum(len(ids) for ids in data["input_ids"])
    assert _padded_tokens(grouped) - real < 0.5 * (_padded_tokens(shuffled) - real)


def test_validation_perplexity_is_pooled_over_answer_tokens(tmp_path):
    """eval_pooled_perplexity = exp(total answer-token NLL / total answer tokens) over every row, from
    the answer-only evaluation path; unlike eval_loss (the stock mean of per-batch means) it
    does not depend on how the rows are batched."""
    import math

    import torch.nn.functional as F

    trainer, fmt, data = _setup(tmp_path, lora=True, eval={"batch_size": 5})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metrics = trainer.evaluate()
        trainer.args.per_device_eval_batch_size = 3
        rebatched = trainer.evaluate()
    model = trainer.model
    model.eval()
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for i in range(len(data)):  # one row at a time, stock full-logit loss
            batch = fmt.collate([data[i]])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            labels = batch["labels"][:, 1:]
            nll += F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum").item()
            tokens += int((labels != IGNORE_INDEX).sum())
    assert metrics["eval_pooled_answer_tokens"] == rebatched["eval_pooled_answer_tokens"] == tokens
    assert metrics["eval_pooled_perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    assert rebatched["eval_pooled_perplexity"] == pytest.approx(metrics["eval_pooled_perplexity"], rel=1e-5)


# ---------------------------------------------------------------------------------------
# memory (issue 14 item 3): the answer-only head in chunks, the MLP activation recomputed
def _vocab_projections(monkeypatch, vocab: int) -> list[int]:
    """Rows of every vocabulary projection made through F.linear from now on."""
    rows: list[int] = []
    real = torch.nn.functional.linear

    def recording(x, weight, *args, **kwargs):
        if weight.shape[0] == vocab:
            rows.append(x.reshape(-1, x.shape[-1]).shape[0])
        return real(x, weight, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "linear", recording)
    return rows


@pytest.mark.parametrize("lora", [True, False], ids=["lora-frozen-head", "full-trainable-head"])
def test_head_in_chunks_gives_the_same_loss_and_grads_without_full_logits(tmp_path, monkeypatch, lora):
    # a frozen head (LoRA) gets its gradient computed chunk by chunk in the forward; a trainable
    # one (full fine-tune) recomputes each chunk in backward: both must equal the one-shot head
    trainer, fmt, data = _setup(tmp_path, lora)
    model = trainer.model
    model.train()
    batch = fmt.collate([data[i] for i in (0, 3, 9, 14)])
    n_items = int((batch["labels"] != IGNORE_INDEX).sum())
    assert n_items > 20
    reference, reference_grads = _loss_and_grads(lambda: trainer._answer_only_loss(model, batch, n_items), model)
    vocab = model.config.vocab_size
    rows = _vocab_projections(monkeypatch, vocab)
    trainer.head_chunk_size = 7
    chunked, chunked_grads = _loss_and_grads(lambda: trainer._answer_only_loss(model, batch, n_items), model)
    assert abs(chunked.item() - reference.item()) <= 1e-5 * abs(reference.item())
    for name in reference_grads:
        torch.testing.assert_close(chunked_grads[name], reference_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert rows and max(rows) <= 7  # never positions x vocab at once (backward recomputes chunks too)


def _setup_live_lora(tmp_path):
    """``_setup`` with LoRA whose B matrices are non-zero: a live adapter path."""
    trainer, fmt, data = _setup(tmp_path, lora=True)
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return trainer, fmt, data


def test_head_in_chunks_under_bf16_autocast_tracks_the_one_shot_head(tmp_path):
    # the projection runs in bf16 as F.linear under autocast would; the gradient differs from
    # the one-shot head's only by bf16 rounding (where the incoming gradient is applied)
    trainer, fmt, data = _setup_live_lora(tmp_path)
    model = trainer.model
    batch = fmt.collate([data[i] for i in (0, 3, 9, 14)])

    def loss():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            nll, _ = trainer.family.answer_nll(model, batch, True, trainer.head_chunk_size)
        return nll.mean()

    reference, reference_grads = _loss_and_grads(loss, model)
    trainer.head_chunk_size = 5
    chunked, chunked_grads = _loss_and_grads(loss, model)
    assert abs(chunked.item() - reference.item()) <= 1e-5 * abs(reference.item())
    for name in reference_grads:
        diff = (chunked_grads[name] - reference_grads[name]).norm()
        assert diff <= 2e-2 * reference_grads[name].norm() + 1e-9, name


def test_evaluation_scores_in_chunks_match_the_full_head(tmp_path, monkeypatch):
    trainer, fmt, data = _setup(tmp_path, lora=True)
    model, family = trainer.model, trainer.family
    model.eval()
    batch = fmt.collate([data[i] for i in range(6)])
    with torch.no_grad():
        nll, correct, targets = family.answer_scores(model, batch)
        rows = _vocab_projections(monkeypatch, model.config.vocab_size)
        nll_c, correct_c, targets_c = family.answer_scores(model, batch, chunk_size=4)
        nll_t, targets_t = family.answer_nll(model, batch, chunk_size=4)
    assert torch.equal(targets, targets_c) and torch.equal(targets, targets_t) and torch.equal(correct, correct_c)
    torch.testing.assert_close(nll_c, nll, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(nll_t, nll, rtol=1e-5, atol=1e-6)
    assert rows and max(rows) <= 4


def _saved_bytes(fn) -> int:
    """Bytes of distinct storages autograd keeps for backward while ``fn`` runs."""
    kept: dict[int, int] = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(kept.values())


def test_mlp_activation_recomputed_gives_the_same_loss_and_grads_bit_for_bit_and_keeps_less(tmp_path):
    from medassist.training.speed import recompute_swiglu

    trainer, fmt, data = _setup_live_lora(tmp_path)
    model = trainer.model
    model.train()
    batch = fmt.collate([data[i] for i in (0, 3, 9, 14)])

    def loss():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, kept = _saved_bytes(lambda: trainer._answer_only_loss(model, batch, None))
        loss.kept = kept
        return out

    reference, reference_grads = _loss_and_grads(loss, model)
    reference_kept = loss.kept
    assert recompute_swiglu(model) == model.config.num_hidden_layers
    ours, ours_grads = _loss_and_grads(loss, model)
    assert ours.item() == reference.item()
    for name in reference_grads:
        assert torch.equal(ours_grads[name], reference_grads[name]), name
    # one intermediate-width activation per layer less: silu(gate)
    tokens = int(batch["input_ids"].numel())
    assert reference_kept - loss.kept >= model.config.num_hidden_layers * tokens * model.config.intermediate_size * 2


def test_recompute_swiglu_leaves_other_mlps_alone():
    from medassist.training.speed import recompute_swiglu

    class GeluMLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = (torch.nn.Linear(4, 4) for _ in range(3))
            self.act_fn = torch.nn.GELU()

    assert recompute_swiglu(torch.nn.Sequential(GeluMLP())) == 0


def test_release_freed_memory_returns_freed_heap_pages(monkeypatch):
    """Memory freed inside the heap (below a live block) stays in the process until
    malloc_trim; the release before the final evaluation hands it back (glibc, as here). It runs
    after every step and every finished answer, so it must not start a full garbage collection
    (0.5 s a call in the default recipe, for nothing freed: bench/RESULTS.md)."""
    import gc
    import re

    from medassist.training.speed import release_freed_memory

    def no_full_collection(*_args):
        raise AssertionError("release_freed_memory ran gc.collect()")

    monkeypatch.setattr(gc, "collect", no_full_collection)

    def rss_kib() -> int:
        return int(re.search(r"VmRSS:\s+(\d+)", open("/proc/self/status").read()).group(1))

    blocks = [bytearray(64 * 1024) for _ in range(3200)]  # 200 MiB in heap-sized pieces
    sentinel = bytearray(64 * 1024)  # keeps the freed pieces from sitting at the heap's top
    del blocks
    freed = rss_kib()
    release_freed_memory()
    assert rss_kib() < freed - 100 * 1024, "malloc_trim did not return the freed heap pages"
    del sentinel


@pytest.mark.parametrize("preset, expected", [(None, "128"), ("1024", "1024")])
def test_cli_bounds_the_onednn_kernel_cache_unless_the_user_set_it(monkeypatch, preset, expected):
    """oneDNN keeps a kernel per matmul shape (1,024 by default): over a training run with a new
    length every batch that cache grew RSS by about 1 GiB on an AMX machine (bench/RESULTS.md).
    The CLI caps it at 128 before the first matmul; a value the user exported wins."""
    import os

    from medassist.cli import main

    if preset is None:
        monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", preset)
    assert main(["models"]) == 0
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == expected
