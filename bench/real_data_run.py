"""A real-data run, timed phase by phase (issue 14 item 2): the default recipe for 100 steps.

    .venv/bin/python bench/real_data_run.py                     # default vs all validation rows
    .venv/bin/python bench/real_data_run.py --variants default --steps 20 --set eval.test_limit=32

Each variant is one ``medassist train configs/default.yaml --set max_steps=N`` in a fresh
process, on the shared MedQuAD file (``../shared/data/medquad.csv``; the bundled copy of the
same rows where it is absent), one after the other. Reported per variant, from the run's
``train_summary.json`` ("timing") and the process's own resource usage (``wait4``): wall time
split into setup / train / eval (validation loss) / generation (validation answers during
training) / save / report (the end-of-run test report), peak RSS, user and system CPU seconds,
the validation rows the loss covered, and the final validation loss and perplexity.

Variants: ``default`` (the recipe as shipped: the validation loss over a seeded subset of
``eval.loss_limit`` rows, perplexity under the run's precision), ``all-rows``
(``eval.loss_limit: null``, every validation row, as every run did before issue 14) and
``fp32-perplexity`` (``eval.perplexity_precision: fp32``). Each starts with an empty cache of
baseline results (``MEDASSIST_BASELINE_CACHE``), so every report scores every baseline, except
``warm-cache``: the default recipe again, after ``default``, with the entries ``default`` left
(what a user's second run finds: the base model's, the nearest training question's and the
repeated question's answers and scores reused). The last line is
``ratio: X.XX``, the wall time of ``all-rows`` over ``default`` where both ran.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

VARIANTS = {
    "default": [],
    "all-rows": ["eval.loss_limit=null"],
    "fp32-perplexity": ["eval.perplexity_precision=fp32"],
    "warm-cache": [],  # the default recipe, with the baseline cache that ``default`` filled
}
PHASES = ("setup", "train", "eval", "generation", "save", "report")


def _baselines_cached(eval_file: Path) -> list[str] | None:
    """The baselines whose results the run's report reused from the cache (None: no report)."""
    if not eval_file.is_file():
        return None
    cached = json.loads(eval_file.read_text()).get("settings", {}).get("baseline_cache") or {}
    return [name for name, info in cached.items() if info.get("hit")]


def run_variant(name: str, args, out: Path, log) -> dict:
    """One training run in a child process; its progress goes to this terminal."""
    data = common.MEDQUAD if common.MEDQUAD.is_file() else "medquad"
    sets = [f"max_steps={args.steps}", f"data.path={data}", *VARIANTS[name], *args.set]
    cmd = [sys.executable, "-m", "medassist", "train", str(common.ROOT / "configs" / "default.yaml"),
           "--output-dir", str(out)]
    for item in sets:
        cmd += ["--set", item]
    cache = out.parent / f"baselines-{'default' if name == 'warm-cache' else name}"
    log(f"[{name}] MEDASSIST_BASELINE_CACHE={cache} {' '.join(cmd)}")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=common.ROOT, env={**os.environ, "MEDASSIST_BASELINE_CACHE": str(cache)})
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS and CPU time
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"variant {name} failed (exit {code}): {' '.join(cmd)}")
    summary = json.loads((out / "train_summary.json").read_text())
    timing = summary["timing"]
    return {
        "variant": name, "wall": wall, "timing": {k: timing.get(k, 0.0) for k in (*PHASES, "total")},
        "peak_rss_mib": usage.ru_maxrss / 1024, "user_s": usage.ru_utime, "sys_s": usage.ru_stime,
        "validation_examples": summary["validation_examples"],
        "validation_loss_examples": summary["validation_loss_examples"],
        "final_validation_loss": summary["final_validation_loss"],
        "final_validation_perplexity": summary["final_validation_perplexity"],
        "steps": summary["steps"], "precision": summary["precision"], "sets": sets,
        "baselines_cached": _baselines_cached(out / "eval_test.json"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per run")
    parser.add_argument("--variants", default="default,all-rows", help="comma list of " + ", ".join(VARIANTS))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a further config override for every variant (repeatable)")
    parser.add_argument("--keep", type=Path, help="keep the run directories under this folder")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be at least 1 (0 would train a whole epoch)")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant {unknown[0]} (use {', '.join(VARIANTS)})")
    if "warm-cache" in variants and "default" not in variants[: variants.index("warm-cache")]:
        parser.error("warm-cache reuses what default cached: list default before it")

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    info = common.machine_info()
    log(common.machine_line(info))
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-real-") as tmp:
        root = args.keep or Path(tmp)
        for name in variants:
            results.append(run_variant(name, args, root / name, log))

    print(common.machine_line(info))
    print(f"{args.steps} steps of configs/default.yaml, one run at a time; phases in seconds (train_summary.json)")
    rows = [[r["variant"], r["wall"], *(r["timing"][p] for p in PHASES), r["peak_rss_mib"], r["user_s"], r["sys_s"],
             f"{r['validation_loss_examples']}/{r['validation_examples']}", r["final_validation_loss"],
             r["final_validation_perplexity"]] for r in results]
    print(common.table(["variant", "wall s", *PHASES, "peak RSS MiB", "user s", "sys s", "val rows",
                        "val loss", "val ppl"], rows))
    for r in results:
        print(json.dumps(r))
    walls = {r["variant"]: r["wall"] for r in results}
    if "warm-cache" in walls:
        report = {r["variant"]: r["timing"]["report"] for r in results}
        print(f"warm cache: report {report['warm-cache']:.0f} s vs {report['default']:.0f} s, run "
              f"{walls['warm-cache']:.0f} s vs {walls['default']:.0f} s ({walls['default'] / walls['warm-cache']:.2f}x)")
    if "default" in walls and "all-rows" in walls:
        print(f"ratio: {walls['all-rows'] / walls['default']:.2f}")


if __name__ == "__main__":
    main()
