"""Where a training step's time goes: torch.profiler over the default recipe's steps.

    .venv/bin/python bench/train_profile.py                        # configs/default.yaml, 200 MedQuAD rows
    .venv/bin/python bench/train_profile.py --variant medassist-eager --top 15

Trains the variant of ``bench/train_throughput.py`` (same rows, same overrides) in this process,
lets ``--warmup`` micro-batches pass (the first compiles), profiles the next ``--profile`` ones
and prints: the operators by share of the profiled wall time; every matmul shape with its
achieved GFLOP/s against the bf16 matmul peak measured first (a matmul that already runs near
the peak cannot get faster); the CPU time the process spent in user and system mode
(``getrusage``: cores kept busy, page faults). The last line is ``ratio: X.XX``: profiled wall
time over the time in matmuls, i.e. how much faster a step could get at most if everything but
the matmuls cost nothing. Beyond that only fewer FLOPs help.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import train_throughput  # noqa: E402

MATMULS = ("aten::mm", "aten::addmm", "aten::bmm")


def matmul_flops(name: str, shapes: list) -> float:
    """2 M K N (times the batch for bmm) from the recorded input shapes."""
    a, b = shapes[1:3] if name == "aten::addmm" else shapes[:2]  # addmm(bias, a, b)
    if name == "aten::bmm":
        return 2.0 * a[0] * a[1] * a[2] * b[2]
    return 2.0 * a[0] * a[1] * b[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="medassist", choices=list(train_throughput.MEDASSIST_VARIANTS))
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10, help="micro-batches before the profile (compilation)")
    parser.add_argument("--profile", type=int, default=6, help="micro-batches profiled")
    parser.add_argument("--top", type=int, default=20, help="rows of each table")
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()
    if args.warmup < 0 or args.profile < 1 or args.rows < 1:
        parser.error("--warmup must be >= 0, --profile and --rows >= 1")

    import warnings

    import torch
    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    from medassist.config import load_config
    from medassist.training import recipe
    from medassist.training.trainer import MedassistTrainer

    info = common.machine_info()
    peak = common.matmul_peak("bf16")
    _, rows, _ = common.load_rows(args.rows, 0)
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True)
    seen = {"n": 0, "wall": 0.0}
    usage: list = []
    stock = MedassistTrainer.training_step

    def training_step(self, *a, **k):  # micro-batch n: profiled when warmup < n <= warmup + profile
        seen["n"] += 1
        inside = args.warmup < seen["n"] <= args.warmup + args.profile
        if seen["n"] == args.warmup + 1:
            usage.append(resource.getrusage(resource.RUSAGE_SELF))
            profiler.__enter__()
        start = time.perf_counter()
        out = stock(self, *a, **k)
        seen["wall"] += (time.perf_counter() - start) if inside else 0.0
        if seen["n"] == args.warmup + args.profile:
            profiler.__exit__(None, None, None)
            usage.append(resource.getrusage(resource.RUSAGE_SELF))
        return out

    MedassistTrainer.training_step = training_step
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as tmp:
        csv = common.write_csv(rows, Path(tmp) / "train.csv")

        def config(steps: int):
            ns = argparse.Namespace(model=args.model, steps=steps)
            overrides = train_throughput._common_overrides(ns, csv, Path(tmp) / "run")
            overrides.update(train_throughput.MEDASSIST_VARIANTS[args.variant])
            return load_config(common.ROOT / "configs" / "default.yaml", overrides)

        accum = config(1).grad_accum
        cfg = config(-(-(args.warmup + args.profile) // accum) + 1)  # optimizer steps covering the micro-batches
        torch.manual_seed(cfg.seed)
        recipe.train(cfg)
    if len(usage) < 2:
        raise SystemExit(f"only {seen['n']} micro-batches ran; lower --warmup/--profile")

    events = profiler.key_averages()
    wall_us = seen["wall"] * 1e6
    print(common.machine_line(info))
    print(f"{args.variant}: micro-batches {args.warmup + 1}-{args.warmup + args.profile} profiled, "
          f"{seen['wall']:.2f} s; bf16 matmul peak {peak:.0f} GFLOP/s")
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:args.top]
    print(common.table(["operator", "share of wall", "ms", "calls"],
                       [[e.key[:70], f"{e.self_cpu_time_total / wall_us:.1%}", e.self_cpu_time_total / 1e3, e.count]
                        for e in top]))
    shapes = [e for e in profiler.key_averages(group_by_input_shape=True) if e.key in MATMULS and e.input_shapes]
    mm_us = sum(e.self_cpu_time_total for e in shapes)
    mm_flops = sum(matmul_flops(e.key, e.input_shapes) * e.count for e in shapes)
    rows_out = []
    for e in sorted(shapes, key=lambda e: -e.self_cpu_time_total)[:args.top]:
        rate = matmul_flops(e.key, e.input_shapes) * e.count / (e.self_cpu_time_total * 1e-6) / 1e9
        rows_out.append([e.key, " x ".join(str(s) for s in e.input_shapes[:2]), f"{e.self_cpu_time_total / mm_us:.1%}",
                         e.count, rate, f"{rate / peak:.0%}"])
    print(common.table(["matmul", "shapes", "share of matmul time", "calls", "GFLOP/s", "of peak"], rows_out))
    overall = mm_flops / (mm_us * 1e-6) / 1e9
    print(f"matmuls: {mm_us / wall_us:.1%} of the wall time, {overall:.0f} GFLOP/s ({overall / peak:.0%} of the peak)")
    before, after = usage
    user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    print(f"CPU: user {user:.1f} s + system {system:.1f} s over {seen['wall']:.1f} s wall "
          f"({(user + system) / seen['wall']:.2f} of {info['threads']} threads busy); "
          f"{after.ru_minflt - before.ru_minflt:,} minor page faults (profiler overhead included)")
    print(f"ratio: {wall_us / mm_us:.2f}")


if __name__ == "__main__":
    main()
