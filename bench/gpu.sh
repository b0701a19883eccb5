#!/usr/bin/env bash
# One prepared run for a borrowed GPU machine (budget: under 8 minutes).
# Installs what is missing, runs the CUDA tests and the serving benchmarks with
# AMP + channels_last, without and with torch.compile, and the training benchmark.
# Usage: bash bench/gpu.sh OUT_DIR      (writes *.json and *.txt there)
set -euo pipefail
out=${1:?usage: bash bench/gpu.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3.11 -m venv .venv
.venv/bin/pip install --quiet -e '.[test]'
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
.venv/bin/python -m pytest -q tests/test_gpu.py 2>&1 | tee "$out/gpu-tests.txt"
.venv/bin/python bench/serving.py --device cuda:0 --studies 2048 --clients 16 --runs 1 --batch 64 \
  --json "$out/serving.json" 2>&1 | tail -n 40 | tee "$out/serving.txt"
.venv/bin/python bench/serving.py --device cuda:0 --studies 2048 --clients 16 --runs 1 --batch 64 --compile \
  --json "$out/serving-compiled.json" 2>&1 | tail -n 40 | tee "$out/serving-compiled.txt"
if [ -f bench/train.py ]; then
  .venv/bin/python bench/train.py 2>&1 | tail -n 40 | tee "$out/train.txt"
fi
