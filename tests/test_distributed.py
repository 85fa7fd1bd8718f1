"""Distributed: `torchrun` and `accelerate launch` run DDP with 2 CPU processes (gloo).

What is tested here is DDP on CPU with the gloo backend; NCCL on GPUs, FSDP and multi-node
launches are not (see docs/distributed.md). The shipped accelerate config files are at least
loaded by accelerate's own parser, and the DDP one is launched on CPU.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BATCH = 4
STEPS = 6
# 24 rows -> 21 train examples: 3 optimizer steps per epoch at 2 x 4 examples per step, so
# checkpoint-4 is one step into the second epoch
TRAIN = ["-m", "medassist", "train", "--set", "model=tiny-qwen3", "--set", f"max_steps={STEPS}",
         "--set", f"batch_size={BATCH}", "--set", "data.limit=24", "--set", "data.validation_fraction=0.1",
         "--set", "precision=fp32", "--set", "learning_rate=1e-2", "--set", "warmup_ratio=0",
         "--set", "logging_steps=1", "--set", "save_strategy=steps", "--set", "save_steps=2",
         "--set", "eval_strategy=steps", "--set", "eval_steps=2",
         "--set", "eval.generation_metrics=false", "--set", "report=false"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict[str, str]:
    # one thread per process: 2 processes on 2 cores
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1"}


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=400, cwd=ROOT)


def _check_ddp_run(run: Path, proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["steps"] == STEPS
    # each optimizer step saw one batch per rank, each rank its own shard
    assert summary["examples_per_step"] == 2 * BATCH
    assert summary["train_examples_seen"] == STEPS * 2 * BATCH
    assert (run / "final" / "adapter_model.safetensors").exists()
    # one metrics file, each event once (not once per rank)
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if "loss" in e] == list(range(1, STEPS + 1))
    # evaluated in training x3; the final metrics are step 6's unless an earlier best checkpoint
    # was reloaded, which is evaluated once more
    evaluated = [2, 4, 6] if summary["best_checkpoint"].endswith("checkpoint-6") else [2, 4, 6, 6]
    assert [e["step"] for e in events if "eval_loss" in e] == evaluated
    # pooled over the answer tokens of the whole validation set (each row once, across both ranks)
    final = [e for e in events if "eval_loss" in e][-1]
    assert summary["final_validation_perplexity"] == final["eval_pooled_perplexity"]
    assert summary["validation_metrics"]["eval_pooled_answer_tokens"] == _validation_answer_tokens(run)
    assert sum("train_runtime" in e for e in events) == 1
    # checkpoints: complete, with both ranks' RNG state (save_total_limit 2 keeps the last two)
    for step in (4, 6):
        ckpt = run / "checkpoints" / f"checkpoint-{step}"
        assert (ckpt / ".complete").exists() and (ckpt / "rng_state_0.pth").exists() and (ckpt / "rng_state_1.pth").exists()
    assert not list((run / "checkpoints").glob("tmp-*"))
    # only rank 0 talks
    assert proc.stderr.count("medassist: trained ") == 1
    assert proc.stdout.count("run: ") == 1


def _validation_answer_tokens(run: Path) -> int:
    """Answer tokens of the run's validation split, as one process tokenizes them."""
    from medassist.config import load_config
    from medassist.data import read_split
    from medassist.models import load_pretrained
    from medassist.training import tokenize_examples

    cfg = load_config(run / "config.yaml")
    _, tokenizer, family = load_pretrained(cfg.model)
    fmt = family.make_format(tokenizer, cfg)
    return tokenize_examples(fmt, family, read_split(run / "splits" / "validation.jsonl")).supervised_tokens


def _losses(run: Path) -> list[tuple[int, float]]:
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(e["step"], e["loss"]) for e in events if "loss" in e]


def test_torchrun_two_cpu_processes_generation_metrics_and_resume(tmp_path):
    run = tmp_path / "run"
    generation = ["--set", "eval.generation_metrics=true", "--set", "eval.subset=2", "--set", "eval.max_new_tokens=8"]
    torchrun = [str(BIN / "torchrun"), "--nproc_per_node=2", "--master_addr=127.0.0.1"]
    proc = _run([*torchrun, f"--master_port={_free_port()}", *TRAIN, *generation, "--output-dir", str(run)])
    _check_ddp_run(run, proc)

    # rank 0 generated for the whole subset and the other rank waited: one event per
    # evaluation, with the numbers one process gets from the same weights
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    scored = [e for e in events if "eval_bertscore_f1" in e]
    summary = json.loads((run / "train_summary.json").read_text())
    assert [e["step"] for e in scored] == ([2, 4, 6] if summary["best_checkpoint"].endswith("checkpoint-6") else [2, 4, 6, 6])
    logged = scored[1]
    single = _single_process_generation_metrics(run, run / "checkpoints" / "checkpoint-4")
    assert set(single) <= {k.removeprefix("eval_") for k in logged}
    for key, value in single.items():
        assert logged[f"eval_{key}"] == pytest.approx(value, rel=1e-5, abs=1e-6), key

    # resume the DDP run from checkpoint-4 (one step into epoch 2): steps 5-6 repeat exactly
    uninterrupted = _losses(run)
    proc = _run([*torchrun, f"--master_port={_free_port()}", *TRAIN, *generation, "--output-dir", str(run),
                 "--resume", str(run / "checkpoints" / "checkpoint-4")])
    assert proc.returncode == 0, proc.stderr[-4000:]
    resumed = _losses(run)
    assert [s for s, _ in resumed] == list(range(1, STEPS + 1))
    for (_, a), (_, b) in zip(uninterrupted, resumed):
        assert b == pytest.approx(a, rel=1e-5)
    assert json.loads((run / "train_summary.json").read_text())["train_examples_seen"] == STEPS * 2 * BATCH


def _single_process_generation_metrics(run: Path, checkpoint: Path) -> dict[str, float]:
    from peft import PeftModel

    from medassist.config import load_config
    from medassist.data import read_split
    from medassist.evaluation import make_training_evaluator
    from medassist.models import load_pretrained

    cfg = load_config(run / "config.yaml")
    base, tokenizer, family = load_pretrained(cfg.model)
    model = PeftModel.from_pretrained(base, str(checkpoint))
    evaluate = make_training_evaluator(family.make_format(tokenizer, cfg), family, read_split(run / "splits/validation.jsonl"), cfg)
    return evaluate(model)


def test_accelerate_launch_with_the_shipped_ddp_config(tmp_path):
    """`accelerate launch --cpu --num_processes 2` needs MPI for several CPU processes; the
    torchrun-based launcher of the shipped MULTI_GPU config runs DDP on CPU (gloo) as well."""
    run = tmp_path / "run"
    short = ["--set", "max_steps=2", "--set", "save_strategy=no", "--set", "eval_strategy=no"]
    proc = _run([str(BIN / "accelerate"), "launch", "--config_file", str(ROOT / "configs/accelerate/ddp_multi_gpu.yaml"),
                 "--num_processes", "2", "--main_process_port", str(_free_port()), *TRAIN, *short,
                 "--output-dir", str(run)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["train_examples_seen"] == 2 * 2 * BATCH
    assert [s for s, _ in _losses(run)] == [1, 2]
    assert (run / "final" / "adapter_model.safetensors").exists()
    assert proc.stderr.count("medassist: trained ") == 1


@pytest.mark.parametrize("name", ["ddp_multi_gpu", "fsdp_multi_gpu", "multi_node"])
def test_shipped_accelerate_configs_load(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ROOT / "configs" / "accelerate" / f"{name}.yaml"))
    assert config.mixed_precision == "no"  # precision comes from medassist's config
    assert str(config.distributed_type) in {"DistributedType.MULTI_GPU", "DistributedType.FSDP", "MULTI_GPU", "FSDP"}


def _rank_main(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from medassist.distributed import run_on_main_process

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    calls = []
    value = run_on_main_process(lambda: calls.append(rank) or {"bertscore_f1": 0.5 + rank})
    try:
        run_on_main_process(lambda: 1 / 0)
        error = None
    except Exception as exc:  # noqa: BLE001
        error = f"{type(exc).__name__}: {exc}"
    Path(out, f"{rank}.json").write_text(json.dumps({"value": value, "calls": calls, "error": error}))
    dist.destroy_process_group()


def test_generation_metrics_run_on_rank_0_and_reach_every_rank(tmp_path):
    """What keeps DDP generation metrics equal to a single process: rank 0 scores the whole
    subset and broadcasts; a failure on rank 0 fails every rank instead of hanging them."""
    import torch.multiprocessing as mp

    import medassist.training  # noqa: F401 - imported once here; the forked ranks inherit it

    port = _free_port()
    mp.start_processes(_rank_main, args=(port, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    r0, r1 = (json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1))
    assert r0["value"] == r1["value"] == {"bertscore_f1": 0.5}
    assert r0["calls"] == [0] and r1["calls"] == []
    assert r0["error"] == "ZeroDivisionError: division by zero"
    assert r1["error"] == "RuntimeError: rank 0 failed: ZeroDivisionError: division by zero"
