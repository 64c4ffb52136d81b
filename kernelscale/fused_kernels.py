"""The numba kernels of :mod:`kernelscale.fused` (imported on their first use, so that
a process that never computes statistics or z-scores on the CPU does not load numba).

Compiled code is cached beside this module (or in the user's numba cache where that is
read-only): a process loads it in ~0.3 s instead of compiling for several seconds.
"""

import math

import numba
import numpy as np
from numba import types as _types
from numba.extending import overload as _overload

from .float64_rows import FLUSHED_TERM_BOUND, TINY32

#: Examples per tile of the kernels' inner loops (a tile's scratch is ~15 KB: in L1).
TILE = 128

_jit = numba.njit(nogil=True, cache=True, error_model="numpy")

#: By the exponent field e of a float16: the implicit leading 1024 of the mantissa
#: (0 for the subnormals, e = 0) and the scale 2^(e - 25) (2^-24 for e = 0; inf for
#: e = 31, so that a NaN is widened to inf: non-finite either way, which is all the
#: callers check, and the loaders name the value from the file itself).
_H_LEAD = np.array([0] + [1024] * 31, np.int32)
_H_SCALE = np.array([2.0 ** -24] + [2.0 ** (e - 25) for e in range(1, 31)] + [np.inf],
                    np.float32)

@_jit
def half(h):
    """The float16 of bits ``h`` (uint16) as float32, exactly (numba has no float16
    arithmetic): table reads and a select, so that loops over it vectorise."""
    e = (h >> 10) & 0x1F
    f = np.float32(_H_LEAD[e] + (h & 0x3FF)) * _H_SCALE[e]
    return -f if h & 0x8000 else f

def _f32(a):
    """float32 of one stored value (float16 bits, float32 or float64)."""

@_overload(_f32, jit_options={"nogil": True})
def _f32_impl(a):
    if isinstance(a, _types.Integer):
        return lambda a: half(a)
    return lambda a: np.float32(a)

def _f64(a):
    """float64 of one stored value (float16 bits, float32 or float64)."""

@_overload(_f64, jit_options={"nogil": True})
def _f64_impl(a):
    if isinstance(a, _types.Integer):
        return lambda a: np.float64(half(a))
    return lambda a: np.float64(a)

#: Cephes' float32 exp: Cody-Waite reduction by ln 2 in two parts, then a degree-6
#: polynomial on [-ln2/2, ln2/2] (peak relative error ~2e-7, a few float32 ulps).
_LOG2E = np.float32(1.44269504088896341)
_LN2_HI = np.float32(0.693359375)
_LN2_LO = np.float32(-2.12194440e-4)
_P0, _P1, _P2 = np.float32(1.9875691500e-4), np.float32(1.3981999507e-3), \
    np.float32(8.3334519073e-3)
_P3, _P4, _P5 = np.float32(4.1665795894e-2), np.float32(1.6666665459e-1), \
    np.float32(5.0000001201e-1)
#: 2^n for n in [-126, 0], by n + 126: exp(d) of d in [-87, 0] is normal in float32.
_POW2 = np.array([2.0 ** n for n in range(-126, 1)], np.float32)
#: Below this d, exp(d) (< 1.7e-38) is taken as 0: :func:`tile` evaluates in float64
#: every row where those terms together could reach 1e-7 of the others-sum.
_EXP_MIN = np.float32(-87.0)

@_jit
def exp_neg(d):
    """exp(d) in float32 for d <= 0 (0 below _EXP_MIN or for NaN): arithmetic, a
    select and a table read, so that loops over it vectorise."""
    ok = d >= _EXP_MIN
    dd = d if ok else _EXP_MIN
    z = np.floor(dd * _LOG2E + np.float32(0.5))
    r = dd - z * _LN2_HI - z * _LN2_LO
    r2 = r * r
    p = ((((_P0 * r + _P1) * r + _P2) * r + _P3) * r + _P4) * r + _P5
    y = p * r2 + r + np.float32(1.0)
    return y * _POW2[np.int32(z) + 126] if ok else np.float32(0.0)

#: Cephes' float32 log(1 + f) for f in [sqrt(1/2) - 1, sqrt(2) - 1]:
#: f - f^2/2 + f^3 Q(f), Q of degree 8 (a few float32 ulps).
_Q0, _Q1, _Q2 = np.float32(7.0376836292e-2), np.float32(-1.1514610310e-1), \
    np.float32(1.1676998740e-1)
_Q3, _Q4, _Q5 = np.float32(-1.2420140846e-1), np.float32(1.4249322787e-1), \
    np.float32(-1.6668057665e-1)
_Q6, _Q7, _Q8 = np.float32(2.0000714765e-1), np.float32(-2.4999993993e-1), \
    np.float32(3.3333331174e-1)
_LN2 = np.float32(0.693147180559945)
_SQRT2 = np.float32(1.41421356237)

@_jit
def log1p_k(s, k):
    """log1p(s) in float32 for s >= 0, given ``k`` (float32) with
    ``(1 + s) * 2^-k`` in [sqrt(1/2), sqrt(2)): where k = 0, s itself is the reduced
    argument, so a small s keeps its full relative precision (the reason for log1p).
    Arithmetic, a select and a table read, so that loops over it vectorise."""
    ki = np.int32(k)
    f = s if ki == 0 else (np.float32(1.0) + s) * _POW2[126 - ki] - np.float32(1.0)
    q = (((((((_Q0 * f + _Q1) * f + _Q2) * f + _Q3) * f + _Q4) * f + _Q5) * f + _Q6)
         * f + _Q7) * f + _Q8
    f2 = f * f
    return k * _LN2 + (f - np.float32(0.5) * f2 + f2 * f * q)

@_jit
def tile(x, r, e0, n, d, s, s32, top, it, lg, v):
    """LOG1P32 values of run ``r``, examples [e0, e0 + n), into ``v`` float64 (C, T)
    (classes outer, examples inner, so that every loop below runs over contiguous
    examples and vectorises); ``d``, ``s``, ``s32``, ``top``, ``it``, ``lg`` are
    scratch of (C, T) float32, (T,) float64, (T,) float32, (T,) float32, (T,) int64,
    (T,) float32.

    The others-sum is accumulated in float64 and rounded once: summed in float32,
    the rounding of 999 terms (1000 classes) reached 1.6e-5 relative."""
    C = x.shape[2]
    for i in range(n):
        for c in range(C):
            d[c, i] = _f32(x[r, e0 + i, c])
    for i in range(n):
        top[i] = d[0, i]
        it[i] = 0
        s[i] = 0.0
    for c in range(1, C):
        for i in range(n):
            # selects, not branches: the loop vectorises
            g = d[c, i] > top[i]
            top[i] = d[c, i] if g else top[i]
            it[i] = c if g else it[i]
    for c in range(C):
        for i in range(n):
            dc = d[c, i] - top[i]
            d[c, i] = dc
            ex = exp_neg(dc)
            s[i] += np.float64(ex) if it[i] != c else 0.0
    # log1p(s): k, the halvings that take 1 + s below sqrt(2), counted into lg
    # (1 + s <= C: each other term is at most 1), then the reduced polynomial.
    for i in range(n):
        lg[i] = np.float32(0.0)
        s32[i] = np.float32(s[i])
    b = _SQRT2
    while b <= C:
        for i in range(n):
            lg[i] += np.float32(1.0) if np.float32(1.0) + s32[i] >= b else np.float32(0.0)
        b = b * np.float32(2.0)
    for i in range(n):
        lg[i] = log1p_k(s32[i], lg[i])
    for c in range(C):
        for i in range(n):
            v[c, i] = np.float64(d[c, i] - lg[i])
    # Rows whose others-sum is near float32's range are evaluated in float64
    # (kernelscale.float64_rows.tiny_sum, written out: numba compiles no Python function)
    tiny = max(TINY32, (C - 1) * FLUSHED_TERM_BOUND)
    for i in range(n):
        if s[i] < tiny:
            _row64(x, r, e0 + i, it[i], v, i)

@_jit
def _row64(x, r, e, it, v, i):
    """The float64 evaluation of a row whose others-sum is below TINY32 (a margin
    past ~69 nats), where float32 exp of its terms leaves the normal range (or below the
    bound of :func:`tile` for many classes): into ``v[:, i]``."""
    C = x.shape[2]
    top = _f64(x[r, e, it])
    s = 0.0
    for c in range(C):
        if c != it:
            s += math.exp(_f64(x[r, e, c]) - top)
    lg = math.log1p(s)
    for c in range(C):
        v[c, i] = (_f64(x[r, e, c]) - top) - lg

@_jit
def scratch(C):
    return (np.empty((C, TILE), np.float32), np.empty(TILE, np.float64),
            np.empty(TILE, np.float32), np.empty(TILE, np.float32),
            np.empty(TILE, np.int64), np.empty(TILE, np.float32),
            np.empty((C, TILE), np.float64))

@_jit
def fold(x, e0, e1, first, shift, s1, s2):
    """Fold runs ``x`` (R, E, C) of examples [e0, e1) into the shifted sums ``s1``,
    ``s2`` (float64 (C, E)); with ``first``, run 0's values become ``shift`` (C, E)."""
    R, _, C = x.shape
    d, s, s32, top, it, lg, v = scratch(C)
    # Examples outer: a tile's sums stay in cache while its runs are folded.
    for t0 in range(e0, e1, TILE):
        n = min(TILE, e1 - t0)
        for r in range(R):
            tile(x, r, t0, n, d, s, s32, top, it, lg, v)
            if first and r == 0:
                for c in range(C):
                    for i in range(n):
                        shift[c, t0 + i] = v[c, i]
            for c in range(C):
                for i in range(n):
                    dv = v[c, i] - shift[c, t0 + i]
                    s1[c, t0 + i] += dv
                    s2[c, t0 + i] += dv * dv

@_jit
def standardise(x, e0, e1, classes, mean, inv, out, col0):
    """z-scores of runs ``x`` (k, n, C) of examples [e0, e1), classes ``classes``
    (int64 (C',)), with ``mean``, ``inv`` float64 (C', n), into
    ``out[e, col0 + r*C' + j]`` (float32 (n, >= col0 + k*C'))."""
    k, _, C = x.shape
    cs = classes.shape[0]
    d, s, s32, top, it, lg, v = scratch(C)
    # A tile's rows of the operand are gathered here, then written whole: k*C'
    # contiguous floats per example, not C' scattered ones per run.
    z = np.empty((TILE, k * cs), np.float32)
    for t0 in range(e0, e1, TILE):
        n = min(TILE, e1 - t0)
        for r in range(k):
            tile(x, r, t0, n, d, s, s32, top, it, lg, v)
            for j in range(cs):
                cj = classes[j]
                col = r * cs + j
                for i in range(n):
                    z[i, col] = np.float32((v[cj, i] - mean[j, t0 + i]) * inv[j, t0 + i])
        for i in range(n):
            out[t0 + i, col0:col0 + k * cs] = z[i]
