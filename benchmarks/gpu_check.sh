#!/usr/bin/env bash
# GPU check (see benchmarks/README.md): ResNet-18, batch 1024, 100 classes, 512-d features —
# SCAR step time, a full SCAR unlearning run, one retraining epoch, peak GPU memory.
# Results go to ${OUT:-benchmarks/out}/gpu_check.{md,json}. Extra arguments are passed on,
# e.g. `--small` (tiny sizes on the CPU, for the CI smoke test) or `--no-record`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
OUT="${OUT:-benchmarks/out}"
export OUT
mkdir -p "$OUT"
exec "$PYTHON" benchmarks/gpu_check.py --out "$OUT" "$@"
