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
from .fused_math import _SQRT2, _f64, exp_neg, half, log1p_k

#: Examples per tile of the kernels' inner loops (a tile's scratch is ~15 KB: in L1).
TILE = 128

_jit = numba.njit(nogil=True, cache=True, error_model="numpy")


@_jit
def _bits(v):
    """uint16 (C, T) over the first quarter of ``v``'s memory (float64 (C, T)): rows
    T apart (rows 4T apart, v.view's, alias in L1 and cost ~10% of fold)."""
    C, T = v.shape
    return v.view(np.uint16).reshape(-1)[:C * T].reshape((C, T))


def _load(x, r, e0, n, d, v):
    """Stage 1 of reading x[r, e0 + i, c] for i < n: float values into ``d`` (C, T);
    float16 bits as bits into the memory of ``v`` (float64 (C, T) scratch)."""


@_overload(_load, jit_options={"nogil": True})
def _load_impl(x, r, e0, n, d, v):
    if isinstance(x.dtype, _types.Integer):
        def load_bits(x, r, e0, n, d, v):
            # transposed as bits (2 bytes a value, a scalar loop); :func:`_value`
            # widens them in the loop over contiguous examples that reads them first
            C = x.shape[2]
            raw = _bits(v)
            for i in range(n):
                for c in range(C):
                    raw[c, i] = x[r, e0 + i, c]
        return load_bits
    def load(x, r, e0, n, d, v):
        C = x.shape[2]
        for i in range(n):
            for c in range(C):
                d[c, i] = np.float32(x[r, e0 + i, c])
    return load


def _value(x, d, raw, c, i):
    """Stage 2: the float32 d[c, i] of x[r, e0 + i, c] (written there for float16 bits)."""


@_overload(_value, jit_options={"nogil": True})
def _value_impl(x, d, raw, c, i):
    if isinstance(x.dtype, _types.Integer):
        def value_bits(x, d, raw, c, i):
            f = half(raw[c, i])
            d[c, i] = f
            return f
        return value_bits
    return lambda x, d, raw, c, i: d[c, i]


@_jit
def _tile32(x, r, e0, n, d, s, s32, top, it, lg, v):
    """The float32 part of :func:`tile`: ``d`` = x - max, ``lg`` = log1p(others-sum),
    ``s`` the float64 others-sums; the number of rows to be evaluated in float64."""
    C = x.shape[2]
    _load(x, r, e0, n, d, v)
    raw = _bits(v)  # the float16 bits _load left there (float16 input)
    for i in range(n):
        top[i] = _value(x, d, raw, 0, i)
        it[i] = 0
        s[i] = 0.0
    for c in range(1, C):
        for i in range(n):
            # selects, not branches: the loop vectorises
            dc = _value(x, d, raw, c, i)
            g = dc > top[i]
            top[i] = dc if g else top[i]
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
    tiny = max(TINY32, (C - 1) * FLUSHED_TERM_BOUND)
    m = 0
    for i in range(n):
        m += 1 if s[i] < tiny else 0
    return m


@_jit
def _tile64(x, r, e0, n, d, s, it, lg, v):
    """The values of :func:`_tile32`'s tile into ``v``, float64 rows included."""
    C = x.shape[2]
    for c in range(C):
        dc, vc = d[c, :n], v[c, :n]
        for i in range(n):
            vc[i] = np.float64(dc[i] - lg[i])
    # Rows whose others-sum is near float32's range are evaluated in float64
    # (kernelscale.float64_rows.tiny_sum, written out: numba compiles no Python function)
    tiny = max(TINY32, (C - 1) * FLUSHED_TERM_BOUND)
    for i in range(n):
        if s[i] < tiny:
            _row64(x, r, e0 + i, it[i], v, i)


@_jit
def tile(x, r, e0, n, d, s, s32, top, it, lg, v):
    """LOG1P32 values of run ``r``, examples [e0, e0 + n), into ``v`` float64 (C, T)
    (classes outer, examples inner, so that every loop below runs over contiguous
    examples and vectorises); ``d``, ``s``, ``s32``, ``top``, ``it``, ``lg`` are
    scratch of (C, T) float32, (T,) float64, (T,) float32, (T,) float32, (T,) int32,
    (T,) float32 (as :func:`scratch` makes them).

    The others-sum is accumulated in float64 and rounded once: summed in float32,
    the rounding of 999 terms (1000 classes) reached 1.6e-5 relative."""
    _tile32(x, r, e0, n, d, s, s32, top, it, lg, v)
    _tile64(x, r, e0, n, d, s, it, lg, v)


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
def scratch(C, T=TILE):
    return (np.empty((C, T), np.float32), np.empty(T, np.float64),
            np.empty(T, np.float32), np.empty(T, np.float32),
            np.empty(T, np.int32), np.empty(T, np.float32),
            np.empty((C, T), np.float64))


#: Examples per tile of fold and standardise (any size gives the same values).
FOLD_TILE = TILE
STD_TILE = TILE


@_jit
def fold(x, e0, e1, first, shift, s1, s2):
    """Fold runs ``x`` (R, E, C) of examples [e0, e1) into the shifted sums ``s1``,
    ``s2`` (float64 (C, E)); with ``first``, run 0's values become ``shift`` (C, E)."""
    R, _, C = x.shape
    d, s, s32, top, it, lg, v = scratch(C, FOLD_TILE)
    # Examples outer: a tile's sums stay in cache while its runs are folded.
    for t0 in range(e0, e1, FOLD_TILE):
        n = min(FOLD_TILE, e1 - t0)
        for r in range(R):
            if _tile32(x, r, t0, n, d, s, s32, top, it, lg, v) == 0:
                # no float64 rows: the values are formed where they are folded
                if first and r == 0:
                    for c in range(C):
                        dc, sh = d[c, :n], shift[c, t0:t0 + n]
                        for i in range(n):
                            sh[i] = np.float64(dc[i] - lg[i])
                for c in range(C):
                    # row views: indices from 0, so that the loop vectorises
                    dc, sh = d[c, :n], shift[c, t0:t0 + n]
                    a1, a2 = s1[c, t0:t0 + n], s2[c, t0:t0 + n]
                    for i in range(n):
                        dv = np.float64(dc[i] - lg[i]) - sh[i]
                        a1[i] += dv
                        a2[i] += dv * dv
                continue
            _tile64(x, r, t0, n, d, s, it, lg, v)
            if first and r == 0:
                for c in range(C):
                    vc, sh = v[c, :n], shift[c, t0:t0 + n]
                    for i in range(n):
                        sh[i] = vc[i]
            for c in range(C):
                vc, sh = v[c, :n], shift[c, t0:t0 + n]
                a1, a2 = s1[c, t0:t0 + n], s2[c, t0:t0 + n]
                for i in range(n):
                    dv = vc[i] - sh[i]
                    a1[i] += dv
                    a2[i] += dv * dv


#: Floats of z-scores standardise gathers (a group of runs of a tile) before it
#: transposes them into the operand: 32 KB.
STD_GROUP_FLOATS = 8192


@_jit
def _z_rows(d, lg, v, f64rows, classes, mean, inv, t0, n, zt, q0):
    """zt[q0 + j, i] = float32 z-score of class classes[j], example t0 + i: the values
    from ``v`` where ``f64rows``, else formed from ``d`` and ``lg`` here."""
    cs = classes.shape[0]
    for j in range(cs):
        cj = classes[j]
        zr, mr, ir = zt[q0 + j, :n], mean[j, t0:t0 + n], inv[j, t0:t0 + n]
        if f64rows:
            vr = v[cj, :n]
            for i in range(n):
                zr[i] = np.float32((vr[i] - mr[i]) * ir[i])
        else:
            dr = d[cj, :n]
            for i in range(n):
                zr[i] = np.float32((np.float64(dr[i] - lg[i]) - mr[i]) * ir[i])


@_jit
def standardise(x, e0, e1, classes, mean, inv, out, col0):
    """z-scores of runs ``x`` (k, n, C) of examples [e0, e1), classes ``classes``
    (int64 (C',)), with ``mean``, ``inv`` float64 (C', n), into
    ``out[e, col0 + r*C' + j]`` (float32 (n, >= col0 + k*C'))."""
    k, _, C = x.shape
    cs = classes.shape[0]
    d, s, s32, top, it, lg, v = scratch(C, STD_TILE)
    # z-scores of a group of runs are formed over contiguous examples (vectorised) in
    # zt (~32 KB), then transposed into the operand's rows (g*C' contiguous floats)
    g = max(1, min(k, STD_GROUP_FLOATS // max(1, cs * STD_TILE)))
    zt = np.empty((g * cs, STD_TILE), np.float32)
    for t0 in range(e0, e1, STD_TILE):
        n = min(STD_TILE, e1 - t0)
        for r0 in range(0, k, g):
            r1 = min(k, r0 + g)
            for r in range(r0, r1):
                m = _tile32(x, r, t0, n, d, s, s32, top, it, lg, v)
                if m:
                    _tile64(x, r, t0, n, d, s, it, lg, v)
                _z_rows(d, lg, v, m > 0, classes, mean, inv, t0, n, zt, (r - r0) * cs)
            w = (r1 - r0) * cs
            c0 = col0 + r0 * cs
            for i in range(n):
                orow = out[t0 + i, c0:c0 + w]
                for q in range(w):
                    orow[q] = zt[q, i]
