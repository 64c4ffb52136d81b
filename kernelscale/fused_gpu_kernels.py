"""The Triton kernel of :mod:`kernelscale.fused_gpu`: a run-chunk of raw logits to the
kernel's float32 z-scores in one pass on a GPU.

Imported only by :mod:`kernelscale.fused_gpu`, when it is first used.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit
def _exp(x, ACCURATE: tl.constexpr):
    # libdevice's expf and exp are those torch's CUDA kernels call (within 2 ulps);
    # Triton's own exp is a base-2 approximation whose error grows with |x|
    if ACCURATE:
        return libdevice.exp(x)
    return tl.exp(x)


@triton.jit
def _log1p(s, ACCURATE: tl.constexpr):
    if ACCURATE:
        return libdevice.log1p(s)
    # log(u) * s / (u - 1), u = 1 + s: exact to a few ulps where the log is (Goldberg);
    # the interpreter's form, which has no libdevice
    u = 1.0 + s
    exact = u == 1.0
    return tl.where(exact, s, tl.log(u) * (s / tl.where(exact, 1.0, u - 1.0)))


@triton.jit
def standardise_kernel(raw_ptr, cls_ptr, mean_ptr, inv_ptr, out_ptr, k, n, out_stride,
                       tiny, C: tl.constexpr, CP: tl.constexpr, W: tl.constexpr,
                       WP: tl.constexpr, BN: tl.constexpr, RB: tl.constexpr,
                       ACCURATE: tl.constexpr):
    """Programs (examples / BN, runs / RB): BN examples of RB runs each.

    raw (k, n, C) float16/float32/bfloat16, C-contiguous; cls (W,) int32 selected
    classes; mean, inv (n, W) float64, C-contiguous; out float32 rows of ``out_stride``,
    value (r, i, j) at out[i, r * W + j].
    """
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    rmask = rows < n
    cols = tl.arange(0, CP)
    sel = tl.arange(0, WP)
    smask = sel < W
    cls = tl.load(cls_ptr + sel, mask=smask, other=0)
    msel = rmask[:, None] & smask[None, :]
    stat = rows.to(tl.int64)[:, None] * W + sel[None, :]  # n * W may pass 2^31
    mean = tl.load(mean_ptr + stat, mask=msel, other=0.0)
    inv = tl.load(inv_ptr + stat, mask=msel, other=0.0)
    mfull = rmask[:, None] & (cols < C)[None, :]
    out_rows = out_ptr + rows.to(tl.int64)[:, None] * out_stride
    for rr in range(RB):
        r = tl.program_id(1) * RB + rr
        live = r < k
        base = raw_ptr + r.to(tl.int64) * n * C + rows.to(tl.int64)[:, None] * C
        # padding classes are -inf (exp 0, never the top); rows past n or runs past k
        # are 0 (no NaN; nothing of them is stored)
        x = tl.load(base + cols[None, :], mask=mfull & live, other=float("-inf"))
        x = tl.where(rmask[:, None] & live, x.to(tl.float32), 0.0)
        top = tl.max(x, axis=1)
        # the first top class is left out of the sum; a tie's other top class adds
        # exp(0) = 1, as in the torch form
        first = tl.min(tl.where(x == top[:, None], cols[None, :], CP), axis=1)
        skip = cols[None, :] == first[:, None]
        d = x - top[:, None]  # exact for float16 values; float32 rounds as the torch form
        s = tl.sum(tl.where(skip, 0.0, _exp(d, ACCURATE)), axis=1)
        # rows whose dropped exp terms could reach 1e-7 of the sum: float64
        d64 = x.to(tl.float64) - top.to(tl.float64)[:, None]
        s64 = tl.sum(tl.where(skip, 0.0, _exp(d64, ACCURATE)), axis=1)
        in64 = s < tiny
        # the selected classes, read again (from cache): d - log1p(s), the top class too
        xs = tl.load(base + cls[None, :], mask=msel & live, other=0.0).to(tl.float32)
        v32 = ((xs - top[:, None]) - _log1p(s, ACCURATE)[:, None]).to(tl.float64)
        v64 = (xs.to(tl.float64) - top.to(tl.float64)[:, None]) \
            - _log1p(s64, ACCURATE)[:, None]
        v = tl.where(in64[:, None], v64, v32)
        # centred and scaled in float64, rounded once to float32
        z = ((v - mean) * inv).to(tl.float32)
        tl.store(out_rows + (r * W + sel)[None, :], z, mask=msel & live)
