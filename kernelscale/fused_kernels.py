"""The numba kernels of :mod:`kernelscale.fused` (imported on their first use, so that
a process that never computes statistics or z-scores on the CPU does not load numba).

Compiled code is cached beside this module (or in the user's numba cache where that is
read-only): a process loads it in ~0.3 s instead of compiling for several seconds. The
float32 primitives (float16 widening, exp, log1p) live here too, not in a module of their
own: numba's cache checks only the source file of the function it compiled, so a kernel
would keep running an edited primitive's old code. (The bounds from
:mod:`kernelscale.float64_rows` are compiled in as constants the same way: a change there
needs the cache files ``__pycache__/fused_kernels.*.nbi``/``.nbc`` removed.)
"""

import math

import numba
import numpy as np
from llvmlite import ir as _ir
from numba import types as _types
from numba.extending import intrinsic as _intrinsic
from numba.extending import overload as _overload

from .cpufeatures import numba_target_has
from .float64_rows import FLUSHED_TERM_BOUND, TINY32

#: Examples per tile of the kernels' inner loops (a tile's scratch is ~15 KB: in L1).
TILE = 128

_jit = numba.njit(nogil=True, cache=True, error_model="numpy")

#: The table form of the float16 widening (:func:`half_table`), by the exponent field e:
#: the implicit leading 1024 of the mantissa (0 for the subnormals, e = 0) and the scale
#: 2^(e - 25) (2^-24 for e = 0; inf for e = 31, so that a NaN is widened to inf, where
#: F16C keeps it NaN: non-finite either way, which is all the callers check, and the
#: loaders name the value from the file itself).
_H_LEAD = np.array([0] + [1024] * 31, np.int32)
_H_SCALE = np.array([2.0 ** -24] + [2.0 ** (e - 25) for e in range(1, 31)] + [np.inf],
                    np.float32)


#: Whether float16 values are widened by the CPU's F16C instruction (vcvtph2ps) or by
#: the tables above (for a CPU numba compiles for without it). numba's cache is keyed
#: by the CPU, so code built with one never loads on the other.
HAS_F16C = numba_target_has("f16c")


def _bits_of_width(builder, v, bits: int):
    """The LLVM integer ``v`` cut to its low ``bits`` bits, or zero-extended to them."""
    if v.type.width > bits:
        return builder.trunc(v, _ir.IntType(bits))
    if v.type.width < bits:
        return builder.zext(v, _ir.IntType(bits))
    return v


@_intrinsic
def _half_fpext(typingctx, h):
    """float32 of the float16 bits ``h`` (an integer of 16 bits or more, upper bits
    ignored): a bitcast to LLVM ``half`` and ``fpext``, vcvtph2ps with F16C (exact;
    a NaN stays a NaN)."""
    if not isinstance(h, _types.Integer):
        return None

    def codegen(context, builder, sig, args):
        v = _bits_of_width(builder, args[0], 16)
        return builder.fpext(builder.bitcast(v, _ir.HalfType()), _ir.FloatType())
    return _types.float32(h), codegen


@_intrinsic
def _f32_of_bits(typingctx, b):
    """The float32 whose bits are the low 32 bits of the integer ``b`` (a bitcast)."""
    if not isinstance(b, _types.Integer):
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(_bits_of_width(builder, args[0], 32), _ir.FloatType())
    return _types.float32(b), codegen


@_jit
def _pow2(n):
    """2^n in float32 for an integer n (int32) in [-126, 127], built from its exponent
    bits: equal to the former table's entry, without a gather."""
    return _f32_of_bits((n + np.int32(127)) << np.int32(23))


@_jit
def half_table(h):
    """The float16 of bits ``h`` (uint16) as float32, exactly (numba has no float16
    arithmetic): table reads and a select, so that loops over it vectorise."""
    e = (h >> 10) & 0x1F
    f = np.float32(_H_LEAD[e] + (h & 0x3FF)) * _H_SCALE[e]
    return -f if h & 0x8000 else f


if HAS_F16C:
    @_jit
    def half(h):
        """The float16 of bits ``h`` as float32, exactly: vcvtph2ps (F16C)."""
        return _half_fpext(h)
else:
    half = half_table


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


#: Below this d, exp(d) (< 1.7e-38) is taken as 0: :func:`tile` evaluates in float64
#: every row where those terms together could reach 1e-7 of the others-sum.
_EXP_MIN = np.float32(-87.0)


@_jit
def exp_neg(d):
    """exp(d) in float32 for d <= 0 (0 below _EXP_MIN or for NaN): arithmetic, a
    select and 2^n from its exponent bits, so that loops over it vectorise."""
    ok = d >= _EXP_MIN
    dd = d if ok else _EXP_MIN
    z = np.floor(dd * _LOG2E + np.float32(0.5))
    r = dd - z * _LN2_HI - z * _LN2_LO
    r2 = r * r
    p = ((((_P0 * r + _P1) * r + _P2) * r + _P3) * r + _P4) * r + _P5
    y = p * r2 + r + np.float32(1.0)
    return y * _pow2(np.int32(z)) if ok else np.float32(0.0)


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
    Arithmetic, a select and 2^-k from its exponent bits, so that loops over it
    vectorise."""
    ki = np.int32(k)
    f = s if ki == 0 else (np.float32(1.0) + s) * _pow2(-ki) - np.float32(1.0)
    q = (((((((_Q0 * f + _Q1) * f + _Q2) * f + _Q3) * f + _Q4) * f + _Q5) * f + _Q6)
         * f + _Q7) * f + _Q8
    f2 = f * f
    return k * _LN2 + (f - np.float32(0.5) * f2 + f2 * f * q)


# ------------------------------------------------------------------------- kernels

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
def _tiny_bound(C):
    """Rows whose others-sum is below this are evaluated in float64: near float32's
    range (kernelscale.float64_rows.tiny_sum, written out: numba compiles no Python
    function)."""
    return max(TINY32, (C - 1) * FLUSHED_TERM_BOUND)


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
    tiny = _tiny_bound(C)
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
    tiny = _tiny_bound(C)
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
def scratch(C):
    return (np.empty((C, TILE), np.float32), np.empty(TILE, np.float64),
            np.empty(TILE, np.float32), np.empty(TILE, np.float32),
            np.empty(TILE, np.int32), np.empty(TILE, np.float32),
            np.empty((C, TILE), np.float64))


@_jit
def _fold_rows(d, lg, v, f64rows, t0, n, first, shift, s1, s2):
    """Fold a tile's values into ``s1``, ``s2`` (with ``first``, set ``shift`` to them
    first): from ``v`` where ``f64rows``, else formed from ``d`` and ``lg`` here. Row
    views index from 0, so that the loops vectorise."""
    for c in range(d.shape[0]):
        sh, a1, a2 = shift[c, t0:t0 + n], s1[c, t0:t0 + n], s2[c, t0:t0 + n]
        if f64rows:
            vc = v[c, :n]
            if first:
                for i in range(n):
                    sh[i] = vc[i]
            for i in range(n):
                dv = vc[i] - sh[i]
                a1[i] += dv
                a2[i] += dv * dv
        else:
            dc = d[c, :n]
            if first:
                for i in range(n):
                    sh[i] = np.float64(dc[i] - lg[i])
            for i in range(n):
                dv = np.float64(dc[i] - lg[i]) - sh[i]
                a1[i] += dv
                a2[i] += dv * dv


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
            m = _tile32(x, r, t0, n, d, s, s32, top, it, lg, v)
            if m:
                _tile64(x, r, t0, n, d, s, it, lg, v)
            _fold_rows(d, lg, v, m > 0, t0, n, first and r == 0, shift, s1, s2)


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
    d, s, s32, top, it, lg, v = scratch(C)
    # z-scores of a group of runs are formed over contiguous examples (vectorised) in
    # zt (~32 KB), then transposed into the operand's rows (g*C' contiguous floats)
    g = max(1, min(k, STD_GROUP_FLOATS // max(1, cs * TILE)))
    zt = np.empty((g * cs, TILE), np.float32)
    for t0 in range(e0, e1, TILE):
        n = min(TILE, e1 - t0)
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
