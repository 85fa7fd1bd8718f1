#!/usr/bin/env bash
# Issue 14 item 6, for a machine with a CUDA GPU (CI never has one): about 10 minutes on one
# H200. Run from the repository root after `make setup`; paste the output into bench/RESULTS.md.
#   bash bench/gpu_run.sh
set -euo pipefail
PY=${PY:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total --format=csv
# training throughput, medassist vs the original recipe, on the GPU (MFU against the bf16 cuBLAS peak)
$PY bench/train_throughput.py --steps 20 --rows 400 --repeats 1 --variants original,medassist,medassist-plain
# the default recipe, shortened: tokens/s in train_summary.json, held-out verdicts at the end
$PY -m medassist train configs/default.yaml --set max_steps=100 --set eval.test_limit=50 --output-dir runs/gpu-default
# DDP with two processes where there are two GPUs
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  .venv/bin/torchrun --nproc_per_node=2 -m medassist train configs/default.yaml --set max_steps=100 \
      --set report=false --output-dir runs/gpu-ddp
fi
