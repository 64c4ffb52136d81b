"""One-pass GPU standardisation of the store's log-softmax (:data:`~kernelscale.stats.LOG1P32`)
into the kernel's float32 GEMM operand (a Triton kernel).

The torch form on a GPU runs about twenty kernels per block of runs over float64
temporaries and asks the host whether any row needs its float64 evaluation, which
waits for the device to drain: on an H200, normalising the 20,000 CIFAR-10 runs took
1.25 s of a 6.2 s kernel, and with TF32 products the host's gaps between launches made
it 4.3 s. Here one kernel per run-chunk reads each raw value once (plus the selected
classes again, from cache) and writes each z-score once, with no host synchronisation.

The arithmetic is the torch form's: the float32 shift by the top class, libdevice's
``exp`` (the function torch's CUDA kernels call) of the other classes, their float32
sum, ``d - log1p(sum)``, and the float64 evaluation of rows whose sum is small; then
float64 centring and scaling, rounded once to float32. Three things differ: the sum's
order; libdevice is built with subnormals flushed to zero, so ``exp`` terms below
1.2e-38 are 0 (torch keeps them as subnormals); and the float64 rows are those whose
sum is below :func:`kernelscale.float64_rows.tiny_sum` (the CPU kernels' bound, where the
flushed terms could reach 1e-7 of the sum; the torch form's is 1e-30). The values agree
with the torch form to a few float32 ulps (checked on the GPU by
``benchmarks/gpu_check.py`` and the ``gpu`` tests). Triton's interpreter
(``TRITON_INTERPRET=1``) runs the same kernel on the CPU, with Triton's own ``exp`` and
a ``log1p`` from ``log``, for the tests.

``KERNELSCALE_FUSED=0`` selects the torch form here too.
"""

from __future__ import annotations

import importlib.util
import os
import sys

from .float64_rows import tiny_sum
from .fused import ENV

#: values of one program's tile (examples x classes, classes padded to a power of two):
#: 64 examples of CIFAR-10's 10 classes, 2 of ImageNet's 1000, so that the float64
#: copy of the tile stays in registers
TILE_VALUES = 2048
#: examples per program at most, and runs per program (the statistics are loaded once
#: for them)
BLOCK_EXAMPLES = 64
BLOCK_RUNS = 8


#: Triton compiles for GPUs of compute capability 7.0 (Volta) and later
MIN_CAPABILITY = (7, 0)

#: Why the kernel could not be built in this process, once it failed (then the torch
#: form is used for the rest of the process)
_failed: str | None = None


def enabled(device=None) -> bool:
    """Whether the GPU kernel is used on ``device`` (Triton installed, a GPU it compiles
    for, not disabled by ENV, not failed to build in this process)."""
    if os.environ.get(ENV, "") == "0" or importlib.util.find_spec("triton") is None:
        return False
    if _failed is not None:
        return False
    if device is not None:
        import torch

        if torch.cuda.get_device_capability(device) < MIN_CAPABILITY:
            return False
    return True


def unavailable(err: BaseException) -> None:
    """Record that the kernel could not be built here (a missing C compiler, say) and
    say so once: the torch form takes over."""
    global _failed
    _failed = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    print(f"kernel: the GPU's one-pass z-scores are unavailable ({_failed}); using the "
          f"torch form (set {ENV}=0 to choose it)", file=sys.stderr)


def supports(dtype) -> bool:
    import torch

    return dtype in (torch.float16, torch.bfloat16, torch.float32)


def standardise(raw, classes, mean, inv, out) -> None:
    """z-scores of ``raw`` into ``out``.

    ``raw`` (k, n, C) float16/bfloat16/float32, C-contiguous; ``classes`` (C',) int32,
    the selected classes; ``mean``, ``inv`` (n, C') float64, C-contiguous; ``out``
    float32 (n, >= k*C') with unit column stride: ``out[i, r*C' + j]`` = the z-score of
    run r, example i, class ``classes[j]``; its other columns are left as they are. All
    on one CUDA device (or CPU tensors under Triton's interpreter).
    """
    import triton

    from . import fused_gpu_kernels as kern

    k, n, c = raw.shape
    w = int(classes.shape[0])
    if (not raw.is_contiguous() or mean.shape != (n, w) or inv.shape != (n, w)
            or not mean.is_contiguous() or not inv.is_contiguous()
            or out.shape[0] != n or out.shape[1] < k * w or out.stride(1) != 1
            or not supports(raw.dtype)):
        raise ValueError("fused_gpu.standardise: arguments of other shapes, layouts or "
                         "dtypes than it takes")
    if k == 0 or n == 0 or w == 0:
        return
    accurate = raw.device.type == "cuda"
    cp = triton.next_power_of_2(c)
    bn = max(1, min(BLOCK_EXAMPLES, TILE_VALUES // cp))  # both powers of two
    grid = (triton.cdiv(n, bn), triton.cdiv(k, BLOCK_RUNS))
    with _on(raw.device):  # Triton launches on the current device's current stream
        kern.standardise_kernel[grid](
            raw, classes, mean, inv, out, k, n, out.stride(0), tiny_sum(c),
            C=c, CP=cp, W=w, WP=triton.next_power_of_2(w), BN=bn, RB=BLOCK_RUNS,
            ACCURATE=accurate)


def _on(device):
    import contextlib

    import torch

    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
