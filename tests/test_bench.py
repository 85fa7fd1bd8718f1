"""The benchmark scripts under bench/ (they run by hand, not in CI, so CI checks that each still
starts and that the arithmetic they report is right)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if p.name != "common.py")


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_bench_script_starts_and_parses_its_arguments(script):
    proc = subprocess.run([sys.executable, str(BENCH / script), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage:")


@pytest.mark.parametrize("script,args,message", [
    ("real_data_run.py", ["--variants", "default,nope"],
     "unknown variant nope (use default, all-rows, fp32-perplexity, warm-cache)"),
    ("real_data_run.py", ["--variants", "warm-cache,default"], "warm-cache reuses what default cached: list default "
     "before it"),
    ("real_data_run.py", ["--steps", "0"], "--steps must be at least 1 (0 would train a whole epoch)"),
    ("train_profile.py", ["--profile", "0"], "--warmup must be >= 0, --profile and --rows >= 1"),
])
def test_bad_arguments_are_one_line_and_exit_2_before_any_training(script, args, message):
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].endswith(message)


def test_the_profile_prices_each_matmul_from_its_recorded_shapes(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    from train_profile import matmul_flops

    assert matmul_flops("aten::mm", [[4, 3], [3, 5]]) == 2 * 4 * 3 * 5
    assert matmul_flops("aten::addmm", [[5], [4, 3], [3, 5]]) == 2 * 4 * 3 * 5  # addmm(bias, a, b)
    assert matmul_flops("aten::bmm", [[2, 4, 3], [2, 3, 5]]) == 2 * 2 * 4 * 3 * 5
