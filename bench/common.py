"""Shared pieces of the benchmarks: the machine, a matmul peak, the data rows, tables, workers.

Each benchmark runs every variant in a fresh worker process (so peak RSS belongs to one
variant) and interleaves them (A B B A ...), because these machines are shared and noisy:
only ratios measured in one run mean anything.
"""

from __future__ import annotations

import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MEDQUAD = ROOT.parent / "shared" / "data" / "medquad.csv"
SAMPLE = ROOT / "src" / "medassist" / "resources" / "sample_medical_qa.csv"
FLAGS_THAT_MATTER = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni", "fma")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


# ---------------------------------------------------------------------------------------
# the machine
def machine_info() -> dict:
    import torch

    flags: set[str] = set()
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            elif line.startswith("model name") and model in ("", platform.machine()):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return {
        "cpu": model,
        "cores": cores,
        "flags": [f for f in FLAGS_THAT_MATTER if f in flags],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def machine_line(info: dict) -> str:
    line = (f"{info['cpu']}, {info['cores']} cores, flags {' '.join(info['flags']) or '-'}, "
            f"torch {info['torch']} ({info['threads']} threads), load average {info['load_avg_1m']}")
    if info["load_avg_1m"] >= info["cores"]:
        # two processes each running torch's thread pool on the same cores slow each other
        # down far more than 2x (threads spin waiting for each other): ratios become noise
        line += "\nWARNING: the machine is busy (load average >= cores); numbers from this run are unreliable"
    return line


def matmul_peak(dtype_name: str, n: int = 2048, seconds: float = 2.0) -> float:
    """Best GFLOP/s of an n x n x n matmul in this dtype (the peak MFU is measured against)."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    device = "cuda" if torch.cuda.is_available() else "cpu"  # where training runs: its peak
    n = 8192 if device == "cuda" else n
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.mm(a, b)  # warm up (oneDNN / cuBLAS pick their kernel on the first call)
    sync()
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def peak_rss_mib() -> float:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------
# data
def data_path() -> Path:
    return MEDQUAD if MEDQUAD.is_file() else SAMPLE


def load_rows(n_train: int, n_heldout: int, seed: int = 0):
    """``n_train`` cleaned rows (shuffled, seeded) and up to ``n_heldout`` rows whose question
    never occurs among them: MedQuAD when ``../shared/data/medquad.csv`` is present, else the sample."""
    from medassist.data import clean_rows, question_key, read_table

    path = data_path()
    examples, _ = clean_rows(read_table(path, ["question", "answer"]), "question", "answer")
    random.Random(seed).shuffle(examples)
    train = examples[:n_train]
    seen = {question_key(e.question) for e in train}
    heldout = [e for e in examples[n_train:] if question_key(e.question) not in seen][:n_heldout]
    return path, train, heldout


def write_csv(examples, path: Path) -> Path:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["question", "answer"])
        writer.writerows((e.question, e.answer) for e in examples)
    return path


# ---------------------------------------------------------------------------------------
# output
def table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(h) for h in headers]] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return "-" if value is None else str(value)


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


# ---------------------------------------------------------------------------------------
# workers: one variant per fresh process, result as the last line of stdout (JSON)
RESULT_PREFIX = "BENCH-RESULT "


def emit_result(result: dict) -> None:
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_worker(script: Path, args: list[str], log) -> dict:
    cmd = [sys.executable, str(script), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    log(proc.stdout[-3000:] + proc.stderr[-3000:])
    raise SystemExit(f"worker {' '.join(args)} failed (exit {proc.returncode})")


def abba(variants: list[str], repeats: int) -> list[str]:
    """A B, B A, A B, ...: each variant runs first as often as last, so drift in the
    machine's load does not favour one of them."""
    order = []
    for i in range(repeats):
        order += variants if i % 2 == 0 else list(reversed(variants))
    return order
