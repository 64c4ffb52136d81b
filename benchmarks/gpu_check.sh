#!/usr/bin/env bash
# Every GPU check and benchmark in one script, for one GPU node (H100/H200), ~5 minutes.
# Prints one PASS/FAIL line per check and exits non-zero on any FAIL.
#
# The node needs Python 3.12 with torch; zarr and its pure-Python dependencies can be
# brought as wheels in .whl/ (zarr, numcodecs, donfig, google-crc32c, dask, partd, locket,
# importlib_metadata, numba, llvmlite) and installed with:
#   pip install --no-index --no-deps --target /tmp/site .whl/*.whl
#   echo /tmp/site > "$(python3 -c 'import site; print(site.getsitepackages()[0])')/ks.pth"
# (a .pth file, so that the subprocesses the checks start see them too).
#
# Usage: bash benchmarks/gpu_check.sh [OUTDIR] [gpu_check.py options, e.g. --device cpu --small]
set -uo pipefail
out="${1:-gpu-check-out}"
shift || true
mkdir -p "$out"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)" PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"
rc=0

if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
fi

# the gpu-marked tests (skipped, not failed, without CUDA)
if $py -m pytest -q -m gpu tests/test_kernel.py tests/test_api.py tests/test_topk_kernel.py \
    tests/test_fused_gpu.py 2>&1 | tee "$out/pytest-gpu.txt"; then
    echo "PASS pytest -m gpu"
else
    echo "FAIL pytest -m gpu"; rc=1
fi

# sections 0-5: device, correctness, resume, out of memory, n=500, 20,000-run speed
$py benchmarks/gpu_check.py --work "${GPU_CHECK_WORK:-/tmp/ks-gpu-check}" "$@" 2>&1 \
    | tee "$out/gpu-check.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
exit $rc
