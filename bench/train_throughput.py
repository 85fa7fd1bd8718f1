"""Training throughput: medassist's default recipe vs the original recipe, in one run.

    .venv/bin/python bench/train_throughput.py                # 10 steps, 200 rows, A B B A
    .venv/bin/python bench/train_throughput.py --steps 3 --rows 64 --repeats 1   # a quick look

Both recipes train the same model on the same rows (MedQuAD from ../shared/data/medquad.csv
when present, else the bundled sample) for the same number of optimizer steps:

- ``medassist``: ``medassist.training.train`` with ``configs/default.yaml`` (precision auto,
  i.e. bf16 autocast on a CPU with AVX512-BF16; LoRA r=16 alpha 32; length-grouped batches,
  dynamic padding; the LM head only on answer tokens).
- ``original``: TRL ``SFTTrainer`` in fp32, LoRA r=64 alpha 8 on all linear layers, batch 8,
  max length 256, group_by_length, no packing, full-vocabulary logits on every position.
  Loss on the completion only (TRL's default for prompt-completion data), the same system
  prompt, learning rate, schedule and LoRA dropout as medassist; gradient checkpointing off
  (TRL's default is on, which would only make the baseline slower).
- ``medassist-fp32``, ``medassist-lora-dropout-0`` ... (optional, ``--variants``): the default
  recipe with one setting changed, to attribute the gain. The speed and memory switches of
  issue 14: ``medassist-bf16-frozen`` (``bf16_frozen_weights``), ``medassist-head-chunks``
  (``head_chunk_size: 512``), ``medassist-mlp-recompute`` (``recompute_mlp_activation``),
  ``medassist-grad-ckpt`` (``gradient_checkpointing``), ``medassist-lean`` (the first three) and
  ``medassist-compile`` (``torch_compile``: each decoder layer compiled; step 1 pays the compilation).
  ``configs/default.yaml`` itself compiles (so ``medassist`` is compiled); ``medassist-eager`` is
  the same recipe eager. ``medassist-compile`` and ``medassist-compile-no-trim`` now run the same
  settings as ``medassist`` and ``medassist-no-trim``; they stay so that recorded commands still run.
  ``medassist-last20`` / ``-last15`` / ``-last10`` (``lora.last_layers``): adapters in the top
  layers only, so the layers below run forward only (less work, a higher loss after N steps).

Each variant runs in a fresh process (peak RSS is its own), in A B B A order. Reported:
supervised (answer) tokens/s, total (non-pad) tokens/s, padding share, peak RSS, the training
loss over the last steps, the loss on held-out rows (fp32, answer tokens only, the same for
every variant: the fair "loss after N steps"), and model FLOPs utilisation against a bf16
matmul peak measured in this run. The last line is ``ratio: X.XX``, supervised tokens/s of
medassist over the original recipe.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

ORIGINAL = dict(r=64, alpha=8, batch_size=8, max_length=256)
# medassist variants: the default recipe plus these overrides (to attribute the gain)
MEDASSIST_VARIANTS = {
    "medassist": {},
    "medassist-fp32": {"precision": "fp32"},
    "medassist-lora-dropout-0.05": {"lora": {"dropout": 0.05}},
    "medassist-lora-dropout-0": {"lora": {"dropout": 0.0}},
    # issue 14 items 1 and 3, one switch each (TrainConfig fields), then together
    "medassist-bf16-frozen": {"bf16_frozen_weights": True},
    "medassist-head-chunks": {"head_chunk_size": 512},
    "medassist-mlp-recompute": {"recompute_mlp_activation": True},
    "medassist-grad-ckpt": {"gradient_checkpointing": True},
    "medassist-lean": {"bf16_frozen_weights": True, "head_chunk_size": 512, "recompute_mlp_activation": True},
    # torch.compile of each decoder layer (inductor; the first step compiles)
    "medassist-compile": {"torch_compile": True},
    "medassist-compile-b8": {"torch_compile": True, "batch_size": 8, "grad_accum": 1},
    "medassist-compile-no-trim": {"torch_compile": True, "memory_trim_steps": None},
    "medassist-no-trim": {"memory_trim_steps": None},
    "medassist-eager": {"torch_compile": False},  # the default recipe is compiled since 2026-12-04
    # adapters only in the last N of the 30 decoder layers: the layers below run forward only
    "medassist-last20": {"lora": {"last_layers": 20}},
    "medassist-last15": {"lora": {"last_layers": 15}},
    "medassist-last10": {"lora": {"last_layers": 10}},
    # the default recipe without its memory settings (one batch of 8, no switches)
    "medassist-plain": {"batch_size": 8, "grad_accum": 1, "bf16_frozen_weights": False, "head_chunk_size": None,
                        "recompute_mlp_activation": False},
}


# ---------------------------------------------------------------------------------------
# counting what each step trains on
class CountingCollator:
    """Wraps a collator; records per sequence (tokens, supervised positions) and padded size."""

    def __init__(self, inner):
        self.inner = inner
        self.batches: list[dict] = []

    def __call__(self, features):
        batch = self.inner(features)
        mask = batch["attention_mask"] if "attention_mask" in batch else (batch["input_ids"] != -1)
        supervised = (batch["labels"][:, 1:] != -100).sum(dim=1)
        self.batches.append({
            "lengths": [int(x) for x in mask.sum(dim=1)],
            "supervised": [int(x) for x in supervised],
            "padded": int(batch["input_ids"].numel()),
        })
        return batch

    def totals(self, steps: int, accum: int = 1) -> dict:
        """Counts for the first ``steps`` optimizer steps of ``accum`` batches each (the loader
        may fetch one ahead)."""
        used = self.batches[:steps * accum]
        groups = [used[i:i + accum] for i in range(0, len(used), accum)]
        return {
            "tokens": sum(sum(b["lengths"]) for b in used),
            "supervised_tokens": sum(sum(b["supervised"]) for b in used),
            "padded_tokens": sum(b["padded"] for b in used),
            "step_sequences": [[s for b in g for s in zip(b["lengths"], b["supervised"])] for g in groups],
            # per step, to leave out step 1 (page-in of the weights, oneDNN kernel creation)
            "step_tokens": [sum(sum(b["lengths"]) for b in g) for g in groups],
            "step_supervised": [sum(sum(b["supervised"]) for b in g) for g in groups],
        }


def model_flops(model, sequences: list[tuple[int, int]]) -> float:
    """FLOPs a LoRA training step needs for these (length, supervised) sequences.

    Frozen base linears: forward + input gradient (4 per weight per token); LoRA weights:
    forward + input and weight gradients (6); causal attention scores and values (forward
    2 * 2 * d_attn per pair, backward twice that); the LM head only where a label counts (a
    recipe that projects every position does more work, not more useful work). Decoder layers
    below the lowest adapter (``lora.last_layers``) need the forward only.
    """
    import re

    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config
    body = sum(m.in_features * m.out_features for n, m in base.get_decoder().named_modules()
               if isinstance(m, torch.nn.Linear) and "lora_" not in n)
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    head = cfg.hidden_size * cfg.vocab_size
    d_attn = cfg.num_attention_heads * getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
    layers = cfg.num_hidden_layers
    adapted = [int(m.group(1)) for n, _ in model.named_parameters() if "lora_" in n
               for m in [re.search(r"\.layers\.(\d+)\.", n)] if m]
    backward = layers - min(adapted, default=0)  # layers the backward pass goes through
    total = 0.0
    for length, supervised in sequences:
        pairs = length * (length + 1) / 2
        total += (2 * body * length + 2 * d_attn * pairs * 2 * layers)  # forward, all layers
        total += backward / layers * (2 * body * length + 2 * d_attn * pairs * 4 * layers)  # backward
        total += 6 * lora * length + 4 * head * supervised
    return total


def heldout_loss(model, fmt, family, examples, batch_size: int = 8) -> float:
    """Mean loss per answer token on held-out rows, fp32, no dropout (the answer-only head in
    chunks of 512 positions: the same numbers as full logits, without building them)."""
    import torch

    from medassist.training import tokenize_examples

    model.eval()
    feats = sorted(tokenize_examples(fmt, family, examples).features, key=lambda f: len(f["input_ids"]))
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(feats), batch_size):
            nll, _ = family.answer_nll(model, fmt.collate(feats[i:i + batch_size]), chunk_size=512)
            total += float(nll.double().sum())
            count += nll.numel()
    return total / max(count, 1)


# ---------------------------------------------------------------------------------------
# the two recipes (each in its own worker process)
def _common_overrides(args, csv: Path, out: Path) -> dict:
    # the default recipe's training settings on the bench's rows: its collection split, balancing and
    # evaluation schedule are switched off, and both recipes cut examples at the same length
    return {"model": args.model, "max_steps": args.steps, "output_dir": str(out), "logging_steps": 1,
            "max_length": ORIGINAL["max_length"],
            "eval_strategy": "no", "save_strategy": "no", "report": False,
            "eval": {"generation_metrics": False},
            "data": {"path": str(csv), "validation_fraction": 0.0, "test_fraction": 0.0, "holdout_column": None,
                     "test_values": [], "validation_values": [], "balance_column": None}}


def run_medassist(args, train_rows, heldout, tmp: Path, extra: dict) -> dict:
    import torch

    from medassist.config import load_config
    from medassist.models import load_for_inference
    from medassist.training import recipe

    overrides = _common_overrides(args, common.write_csv(train_rows, tmp / "train.csv"), tmp / "run")
    overrides.update(extra)
    cfg = load_config(common.ROOT / "configs" / "default.yaml", overrides)
    counter: dict = {}
    stock = recipe.columns_collator

    def counting(fmt):
        counter["c"] = CountingCollator(stock(fmt))
        return counter["c"]

    recipe.columns_collator = counting  # what train() batches with
    torch.manual_seed(cfg.seed)
    result = recipe.train(cfg)
    rss = common.peak_rss_mib()
    summary = result.summary
    losses = [e["loss"] for e in _read_jsonl(result.run_dir / "metrics.jsonl") if "loss" in e]
    loaded = load_for_inference(str(result.run_dir), merge=False)  # the adapter counted in model_flops
    fmt = loaded.family.make_format(loaded.tokenizer, cfg)
    counts = counter["c"].totals(summary["steps"], cfg.grad_accum)
    assert counts["supervised_tokens"] == summary["supervised_tokens"], (counts, summary)
    step_ends = [e["time"] for e in _read_jsonl(result.run_dir / "metrics.jsonl") if "loss" in e]
    return {
        "precision": summary["precision"], "lora": f"r={cfg.lora.r} a={cfg.lora.alpha}",
        "steps": summary["steps"], "wall": summary["wall_time_seconds"], "peak_rss_mib": rss,
        "step_ends": step_ends,
        "losses": losses, "heldout_loss": heldout_loss(loaded.model, fmt, loaded.family, heldout),
        "step_flops": [model_flops(loaded.model, seqs) for seqs in counts.pop("step_sequences")], **counts,
    }


def run_original(args, train_rows, heldout, tmp: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from medassist.config import load_config
    from medassist.models import load_pretrained

    default = load_config(common.ROOT / "configs" / "default.yaml", {"model": args.model})
    model, tok, family = load_pretrained(args.model)
    system = [{"role": "system", "content": default.system_prompt}] if default.system_prompt else []
    dataset = Dataset.from_list([
        {"prompt": system + [{"role": "user", "content": e.question}],
         "completion": [{"role": "assistant", "content": e.answer}]} for e in train_rows
    ])
    sft = SFTConfig(
        output_dir=str(tmp / "run"), max_steps=args.steps, per_device_train_batch_size=ORIGINAL["batch_size"],
        max_length=ORIGINAL["max_length"], packing=False, train_sampling_strategy="group_by_length",
        bf16=False, fp16=False, use_cpu=not torch.cuda.is_available(), gradient_checkpointing=False,
        learning_rate=default.learning_rate, lr_scheduler_type=default.lr_scheduler,
        warmup_steps=default.warmup_ratio, weight_decay=default.weight_decay, max_grad_norm=default.max_grad_norm,
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to=[], seed=default.seed,
        data_seed=default.seed, disable_tqdm=True,
    )
    lora = LoraConfig(r=ORIGINAL["r"], lora_alpha=ORIGINAL["alpha"], lora_dropout=default.lora.dropout,
                      target_modules="all-linear", task_type="CAUSAL_LM")
    torch.manual_seed(default.seed)
    trainer = SFTTrainer(model=model, args=sft, train_dataset=dataset, processing_class=tok, peft_config=lora)
    counter = CountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    step_ends: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, *_args, **_kwargs):
            step_ends.append(time.time())

    trainer.add_callback(StepClock())
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    rss = common.peak_rss_mib()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    fmt = family.make_format(tok, default)
    counts = counter.totals(trainer.state.global_step)
    return {
        "precision": "fp32", "lora": f"r={ORIGINAL['r']} a={ORIGINAL['alpha']}",
        "steps": trainer.state.global_step, "wall": wall, "peak_rss_mib": rss, "losses": losses,
        "step_ends": step_ends,
        "heldout_loss": heldout_loss(trainer.model, fmt, family, heldout),
        "step_flops": [model_flops(trainer.model, seqs) for seqs in counts.pop("step_sequences")], **counts,
    }


def steady(result: dict, key: str) -> float:
    """Per second over steps 2..N (step 1 pays one-off costs: weights paged in from the
    memory-mapped file, oneDNN kernels created); over all steps when there is only one."""
    ends, per_step = result["step_ends"], result[key]
    if len(ends) < 2 or len(per_step) < len(ends):
        return sum(per_step) / result["wall"]
    return sum(per_step[1:len(ends)]) / (ends[-1] - ends[0])


def _read_jsonl(path: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def worker(args) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    _, train_rows, heldout = common.load_rows(args.rows, args.heldout)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        if args.worker == "original":
            result = run_original(args, train_rows, heldout, Path(tmp))
        else:
            result = run_medassist(args, train_rows, heldout, Path(tmp), MEDASSIST_VARIANTS[args.worker])
    common.emit_result(result)


# ---------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per recipe")
    parser.add_argument("--rows", type=int, default=200, help="training rows")
    parser.add_argument("--heldout", type=int, default=32, help="held-out rows for the loss after N steps")
    parser.add_argument("--repeats", type=int, default=2, help="runs per recipe, in A B B A order")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--variants", default="original,medassist",
                        help="comma list of original, " + ", ".join(MEDASSIST_VARIANTS))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    say = lambda msg: print(msg, flush=True)  # noqa: E731
    variants = args.variants.split(",")
    unknown = [v for v in variants if v != "original" and v not in MEDASSIST_VARIANTS]
    if unknown:
        parser.error(f"unknown variant {unknown[0]} (use original, {', '.join(MEDASSIST_VARIANTS)})")
    info = common.machine_info()
    path, train_rows, heldout = common.load_rows(args.rows, args.heldout)
    say(f"machine: {common.machine_line(info)}")
    say(f"data: {path} ({len(train_rows)} training rows, {len(heldout)} held-out); model {args.model}; "
        f"{args.steps} steps per run; order {' '.join(common.abba(variants, args.repeats))}")
    peaks = {d: common.matmul_peak(d) for d in ("bf16", "fp32")}
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    passthrough = ["--steps", str(args.steps), "--rows", str(args.rows), "--heldout", str(args.heldout),
                   "--model", args.model]
    for variant in common.abba(variants, args.repeats):
        t = time.perf_counter()
        result = common.run_worker(Path(__file__), ["--worker", variant, *passthrough], say)
        runs[variant].append(result)
        say(f"  {variant}: {result['supervised_tokens'] / result['wall']:.0f} supervised tokens/s "
            f"({result['wall']:.0f} s training, {time.perf_counter() - t:.0f} s with load and held-out loss)")
    for d in peaks:  # the peak is the best seen in this run, before or after the training runs
        peaks[d] = max(peaks[d], common.matmul_peak(d))
    say(f"matmul peak (2048^3): bf16 {peaks['bf16']:.0f} GFLOP/s, fp32 {peaks['fp32']:.0f} GFLOP/s")

    rows, stats = [], {}
    for variant, results in runs.items():
        sup = common.median([steady(r, "step_supervised") for r in results])
        tok = common.median([steady(r, "step_tokens") for r in results])
        flops = common.median([steady(r, "step_flops") / 1e9 for r in results])
        sup_all = common.median([r["supervised_tokens"] / r["wall"] for r in results])
        last = common.median([sum(r["losses"][-3:]) / len(r["losses"][-3:]) for r in results])
        held = common.median([r["heldout_loss"] for r in results])
        pad = common.median([1 - r["tokens"] / r["padded_tokens"] for r in results])
        first = results[0]
        stats[variant] = {"sup": sup, "held": held, "sup_all": sup_all}
        rows.append([variant, first["precision"], first["lora"], first["steps"], sup, tok, sup_all,
                     f"{100 * pad:.1f}%", common.median([r["peak_rss_mib"] for r in results]), f"{last:.4f}",
                     f"{held:.4f}",
                     f"{100 * flops / peaks['bf16']:.1f}%",
                     f"{100 * flops / peaks['bf16' if first['precision'] == 'bf16' else 'fp32']:.1f}%"])
    say("")
    say(common.table(["recipe", "precision", "LoRA", "steps", "supervised tok/s", "tokens/s",
                      "supervised tok/s incl. step 1", "padding",
                      "peak RSS MiB", "train loss (last 3)", "held-out loss", "MFU vs bf16 peak",
                      "MFU vs own-dtype peak"], rows))
    say(f"(medians of {args.repeats} run(s) each; rates over steps 2..{args.steps} unless marked; "
        f"held-out loss on {len(heldout)} rows, fp32, answer tokens only)")
    if "original" in stats:
        for variant in (v for v in stats if v not in ("original", "medassist")):
            say(f"{variant}: {stats[variant]['sup'] / stats['original']['sup']:.2f}x the original recipe, held-out "
                f"loss {stats[variant]['held']:.4f}")
    if "original" in stats and "medassist" in stats:
        ratio = stats["medassist"]["sup"] / stats["original"]["sup"]
        d = stats["medassist"]["held"] - stats["original"]["held"]
        say(f"held-out loss after {args.steps} steps: medassist {stats['medassist']['held']:.4f} vs original "
            f"{stats['original']['held']:.4f} ({'lower or equal' if d <= 0 else 'HIGHER'} by {abs(d):.4f})")
        say(f"ratio: {ratio:.2f}")


if __name__ == "__main__":
    main()
