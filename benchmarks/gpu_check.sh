#!/usr/bin/env bash
# Every GPU check and benchmark in one script, for one GPU node (H100/H200), ~5 minutes.
#
# The node needs Python 3.12 with torch; zarr and its pure-Python dependencies can be
# brought as wheels in .whl/ (zarr, numcodecs, donfig, google-crc32c, tqdm, dask, ...)
# and installed with:  pip install --no-index --no-deps --target /tmp/site .whl/*.whl
#
# Usage: bash benchmarks/gpu_check.sh [OUTDIR]
set -uo pipefail
out="${1:-gpu-check-out}"
mkdir -p "$out"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)" PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"

# 1. correctness on the device: cuda fp32 and tf32 against float64
$py -m pytest -q -m gpu tests/test_kernel.py 2>&1 | tee "$out/pytest-gpu.txt"

# 2. against the reference at the full CIFAR shape, 500 runs (target <= 0.2x its time)
$py -m kernelscale bench --out /tmp/ks-bench-full --n-test 10000 --n-train 50000 \
    --runs 500 --scaling '' --device cuda --precision fp32 2>&1 | tee "$out/bench-full-500.txt"

# 3. throughput with more runs (reading must overlap the GEMM), fp32 and tf32
$py -m kernelscale bench --out /tmp/ks-bench-4k --n-test 10000 --n-train 50000 \
    --runs 4000 --scaling '' --device cuda --precision fp32 --skip-reference --keep \
    2>&1 | tee "$out/bench-full-4000-fp32.txt"
$py -m kernelscale -q kernel --store /tmp/ks-bench-4k/store --out /tmp/ks-bench-4k/k-tf32 \
    --device cuda --precision tf32 2>&1 | tee "$out/kernel-4000-tf32.txt"
