"""Peak memory of the default recipe for a few steps, with one change (issue 14 item 3).

    .venv/bin/python bench/train_memory.py --variant plain --steps 30
    .venv/bin/python bench/train_memory.py --variant default --steps 30

Trains ``configs/default.yaml`` (MedQuAD, max length 320) for ``--steps`` optimizer steps
without evaluation or report, in this process, and prints one JSON line: the peak RSS
(``getrusage``), RSS sampled every second (the largest sample during the steps, and at the
quarters of the run), seconds per step after the first logging interval and the last
training loss. Variants: ``default`` (the recipe as shipped), ``plain`` (one batch of 8, no
memory settings: the first MedQuAD recipe), ``grad-ckpt`` (plain + gradient checkpointing),
``lean`` (plain + bf16 frozen weights, chunked head, recomputed SwiGLU), ``no-trim`` / ``trim-1`` /
``trim-5`` (the default with ``memory_trim_steps`` null / 1 / 5). Run one at a time:
RSS does not depend on the machine's load, the seconds per step do.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLAIN = {"batch_size": 8, "grad_accum": 1, "bf16_frozen_weights": False, "head_chunk_size": None,
         "recompute_mlp_activation": False}
VARIANTS = {
    "default": {},
    "plain": PLAIN,
    "grad-ckpt": {**PLAIN, "gradient_checkpointing": True},
    "lean": {**PLAIN, "bf16_frozen_weights": True, "head_chunk_size": 512, "recompute_mlp_activation": True},
    "no-trim": {"memory_trim_steps": None},
    "trim-1": {"memory_trim_steps": 1},
    "trim-5": {"memory_trim_steps": 5},
}


def rss_kib() -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=list(VARIANTS), default="default")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()

    from medassist.config import load_config
    from medassist.training import recipe

    samples: list[tuple[float, int]] = []

    def watch() -> None:
        while True:
            samples.append((time.time(), rss_kib()))
            time.sleep(1)

    threading.Thread(target=watch, daemon=True).start()
    with tempfile.TemporaryDirectory() as tmp:
        overrides = {"max_steps": args.steps, "eval_strategy": "no", "save_strategy": "no", "report": False,
                     "logging_steps": 5, "output_dir": str(Path(tmp) / "run"),
                     "eval": {"generation_metrics": False}, **VARIANTS[args.variant]}
        cfg = load_config(ROOT / "configs" / "default.yaml", overrides)
        start = time.time()
        result = recipe.train(cfg)
        wall = time.time() - start
        events = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [e for e in events if "loss" in e]
    during = [kib for t, kib in samples if steps and steps[0]["time"] <= t <= steps[-1]["time"]]
    gib = 2 ** 20
    print(json.dumps({
        "variant": args.variant, "steps": args.steps,
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / gib, 2),
        "max_rss_during_steps_gib": round(max(during, default=0) / gib, 2),
        "rss_at_quarters_gib": [round(samples[int(q * (len(samples) - 1))][1] / gib, 2) for q in (0.25, 0.5, 0.75, 1)],
        "seconds_per_step": round((steps[-1]["time"] - steps[0]["time"]) / max(1, steps[-1]["step"] - steps[0]["step"]), 2)
        if len(steps) > 1 else None,
        "last_loss": steps[-1]["loss"] if steps else None, "wall_seconds": round(wall, 1),
    }))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / gib
    print(f"ratio: {peak / 4:.2f} (peak RSS / the 4 GiB target)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
