#!/usr/bin/env bash
# The GPU check, one script for a CUDA machine (≤ 10 minutes): the `gpu` tests, then bench/gpu_check.py
# (linear kernels at batch 1 and 16, full-depth 2B decode, three Compare columns at once).
#   bash bench/gpu.sh            # results in $OUT (when set, e.g. on a lent device machine) or bench/results
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DEST=${OUT:-bench/results}
mkdir -p "$DEST"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$DEST/gpu_smi.txt"
timeout 200 "$PY" -m pytest -q -m gpu tests 2>&1 | tail -30 | tee "$DEST/gpu_tests.txt"
timeout 380 "$PY" bench/gpu_check.py --out "$DEST/gpu.json" --budget-s 300 2>&1 | tail -60
