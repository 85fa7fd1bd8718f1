"""Generation with a LoRA adapter beside every linear vs merged into the base weights.

    .venv/bin/python bench/adapter_generation.py --run runs/default     # a trained run's adapter
    .venv/bin/python bench/adapter_generation.py                        # the default recipe's LoRA, random
    .venv/bin/python bench/adapter_generation.py --examples 8 --max-new-tokens 16   # a quick look

``load_for_inference`` (``generate``, ``chat``, ``serve``) and the evaluation after training
merge a run's LoRA adapter into the base weights (``medassist.models.merge_adapter``) instead
of running PEFT's layers, which add two small matmuls and their Python to every adapted linear
at every decoding step. Both variants answer the same seeded validation questions of MedQuAD
through the same engine (continuous batching, ``--batch-size`` rows, greedy, fp32), in the
order adapter, merged, adapter, merged (best of two each); the greedy answers are compared
text for text. Without ``--run`` the adapter is the default recipe's LoRA config on
smollm2-135m with its B matrices drawn at random (seeded; PEFT starts them at zero, which
would make the two models the same), so the speed is a trained adapter's and the agreement
only indicative. The last line is ``ratio: X.XX``, generated tokens/s merged over adapter.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from eval_throughput import validation_questions  # noqa: E402


def adapter_model(run: str | None, seed: int):
    """(PEFT model, prompt format, family): ``run``'s adapter on its base, or the default
    recipe's LoRA on smollm2-135m with seeded random B matrices."""
    import torch
    from peft import LoraConfig, get_peft_model

    from medassist.config import load_config
    from medassist.models import load_for_inference, load_pretrained

    if run:
        from medassist.errors import MedassistError

        try:
            loaded = load_for_inference(run, merge=False)
        except MedassistError as exc:
            sys.exit(f"adapter_generation: {exc}")
        if not hasattr(loaded.model, "merge_and_unload"):
            sys.exit(f"adapter_generation: {run} has no LoRA adapter to merge (a full fine-tune, or not a run)")
        return loaded.model, loaded.format(), loaded.family
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "default.yaml", {})
    model, tok, family = load_pretrained(cfg.model, cfg.model_type)
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, target_modules=cfg.lora.target_modules,
                      task_type=family.peft_task())
    model = get_peft_model(model, lora).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    return model, family.make_format(tok, cfg), family


def answers(engine, questions, settings) -> tuple[list[str], int, float]:
    start = time.perf_counter()
    out = engine.answer(questions, settings)
    return [a.text for a in out], sum(a.completion_tokens for a in out), time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", help="a run directory with a LoRA adapter in final/ (default: a random adapter)")
    p.add_argument("--examples", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    import torch

    from medassist.config import GenerationSettings
    from medassist.engine import Engine
    from medassist.models import merge_adapter

    torch.manual_seed(args.seed)
    info = common.machine_info()
    print(common.machine_line(info), flush=True)
    path, examples = validation_questions(args.examples, args.seed)
    questions = [ex.question for ex in examples]
    model, fmt, family = adapter_model(args.run, args.seed)
    adapter = Engine(model, fmt, family)
    merged = Engine(merge_adapter(copy.deepcopy(model)), fmt, family)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    runs: dict[str, list[tuple[list[str], int, float]]] = {"adapter": [], "merged": []}
    for name in ("adapter", "merged", "adapter", "merged"):
        runs[name].append(answers(adapter if name == "adapter" else merged, questions, settings))
        texts, tokens, seconds = runs[name][-1]
        print(f"{name}: {len(texts)} answers, {tokens} tokens in {seconds:.1f} s", flush=True)
    rows, rates = [], {}
    for name, done in runs.items():
        texts, tokens, seconds = min(done, key=lambda r: r[2])
        rates[name] = tokens / seconds
        rows.append([name, len(texts), tokens, f"{seconds:.1f}", f"{rates[name]:.1f}"])
    same = sum(a == b for a, b in zip(runs["adapter"][0][0], runs["merged"][0][0]))
    print(f"data {path}, {len(questions)} questions, max_new_tokens {args.max_new_tokens}, "
          f"{args.batch_size} rows, adapter {args.run or 'random (default recipe LoRA)'}")
    print(common.table(["variant", "answers", "tokens", "seconds (best of 2)", "tokens/s"], rows))
    print(f"greedy answers identical: {same}/{len(questions)}")
    common.emit_result({"variant": "merged-vs-adapter", "rates": rates, "identical": same, "n": len(questions),
                        "machine": info})
    print(f"ratio: {rates['merged'] / rates['adapter']:.2f}")


if __name__ == "__main__":
    main()
