"""float32 primitives of the one-pass kernels (:mod:`kernelscale.fused_kernels`): the
float16 widening, ``exp`` of the non-positive and ``log1p`` of a reduced argument, each
written so that loops over it vectorise (no calls, no table gathers where the CPU has
the instructions). Compiled with the kernels, cached as they are.
"""

import numba
import numpy as np
from llvmlite import ir as _ir
from numba import types as _types
from numba.extending import intrinsic as _intrinsic
from numba.extending import overload as _overload

from .cpufeatures import numba_target_has

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
    HALF_FORM = "f16c fpext"

    @_jit
    def half(h):
        """The float16 of bits ``h`` as float32, exactly: vcvtph2ps (F16C)."""
        return _half_fpext(h)


else:
    HALF_FORM = "tables"
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
