"""The CRC-32C instruction of x86-64 (SSE4.2) in a numba kernel that releases the GIL.

Imported only by :mod:`kernelscale.crc32c`, once it has checked that the host CPU has the
instruction and numba compiles for it.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic


def _llvm_crc(name: str, acc_bits: int, data_bits: int):
    def typer(typingctx, crc, data):
        acc_t, data_t = getattr(types, f"uint{acc_bits}"), getattr(types, f"uint{data_bits}")
        sig = acc_t(acc_t, data_t)

        def codegen(context, builder, signature, args):
            fnty = ir.FunctionType(ir.IntType(acc_bits),
                                   [ir.IntType(acc_bits), ir.IntType(data_bits)])
            fn = cgutils.get_or_insert_function(builder.module, fnty, name)
            return builder.call(fn, list(args))

        return sig, codegen

    return intrinsic(typer)


#: one step of 8 bytes and one of 1 byte: the register holds the CRC without the
#: standard's inversions, which :func:`extend` applies once
_crc64 = _llvm_crc("llvm.x86.sse42.crc32.64.64", 64, 64)
_crc8 = _llvm_crc("llvm.x86.sse42.crc32.32.8", 32, 8)


#: the CRC-32C polynomial, bit-reflected
POLY = np.uint32(0x82F63B78)


@njit(nogil=True, cache=True)
def _mulmod(a, b):
    """a * b modulo the polynomial, both bit-reflected uint32 (bit 31 is x^0)."""
    p = np.uint32(0)
    m = np.uint32(1 << 31)
    while m:
        if a & m:
            p ^= b
        b = (b >> np.uint32(1)) ^ POLY if b & np.uint32(1) else b >> np.uint32(1)
        m >>= np.uint32(1)
    return p


@njit(nogil=True, cache=True)
def _shift(crc, nbytes):
    """The raw CRC register ``crc`` advanced over ``nbytes`` zero bytes: crc * x^(8n)."""
    x = np.uint32(1 << 30)  # x^1
    p = np.uint32(1 << 31)  # x^0
    e = nbytes * 8
    while e:
        if e & 1:
            p = _mulmod(p, x)
        x = _mulmod(x, x)
        e >>= 1
    return _mulmod(crc, p)


#: three independent chains: the instruction's latency is three cycles and its
#: throughput one per cycle
_WAYS = 3


@njit(nogil=True, cache=True)
def extend(crc, data):
    """CRC-32C of (bytes whose CRC-32C is ``crc``) + ``data``.

    ``crc``: uint32; ``data``: C-contiguous uint8 (n,) -> uint32.

    The words are split into three equal runs computed side by side, then joined:
    R(c, A + B) = R(c, A) * x^(8|B|) + R(0, B) for the raw register R.
    """
    n = data.size
    words = n // 8
    lane = words // _WAYS
    w = data[: words * 8].view(np.uint64)
    c0 = np.uint64(crc ^ np.uint32(0xFFFFFFFF))
    c1 = np.uint64(0)
    c2 = np.uint64(0)
    for i in range(lane):
        c0 = _crc64(c0, w[i])
        c1 = _crc64(c1, w[lane + i])
        c2 = _crc64(c2, w[2 * lane + i])
    if lane:
        c0 = np.uint64(_shift(np.uint32(c0), lane * 8) ^ np.uint32(c1))
        c0 = np.uint64(_shift(np.uint32(c0), lane * 8) ^ np.uint32(c2))
    for i in range(_WAYS * lane, words):
        c0 = _crc64(c0, w[i])
    c32 = np.uint32(c0)
    for i in range(words * 8, n):
        c32 = _crc8(c32, data[i])
    return c32 ^ np.uint32(0xFFFFFFFF)
