#!/usr/bin/env bash
# One prepared run for a borrowed GPU machine (budget: under 8 minutes).
# Runs the CUDA tests, the serving benchmarks with AMP + channels_last without and with
# torch.compile, and the training benchmark; writes *.json and *.txt to OUT_DIR.
#
#   here:   bash bench/gpu_wheels.sh           (the wheels the GPU image lacks, into .whl/)
#   there:  bash bench/gpu.sh OUT_DIR          (device run with carry [".whl"])
#
# With .whl/ present (the lent machines: Python 3.12 with torch, no network) the wheels
# go to /tmp/site and the image's python3 and torch are used; the torch version is
# recorded with the results. Without it (a GPU box with the registries) a .venv is built
# from pyproject.toml's pins.
set -euo pipefail
out=${1:?usage: bash bench/gpu.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD"
  python=python3
else
  [ -x .venv/bin/python ] || python3.11 -m venv .venv
  .venv/bin/pip install --quiet -e '.[test]'
  python=.venv/bin/python
fi
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
"$python" -c 'import sys, torch, timm; print(sys.version.split()[0], torch.__version__, timm.__version__, torch.cuda.get_device_name(0))' \
  | tee "$out/versions.txt"
"$python" -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/models/test_inference.py 2>&1 | tee "$out/gpu-tests.txt"
"$python" bench/serving.py --device cuda:0 --studies 2048 --clients 16 --runs 1 --batch 64 \
  --json "$out/serving.json" 2>&1 | tail -n 40 | tee "$out/serving.txt"
"$python" bench/serving.py --device cuda:0 --studies 2048 --clients 16 --runs 1 --batch 64 --compile \
  --json "$out/serving-compiled.json" 2>&1 | tail -n 40 | tee "$out/serving-compiled.txt"
"$python" bench/train.py 2>&1 | tail -n 40 | tee "$out/train.txt"
