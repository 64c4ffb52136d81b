"""CRC-32C (Castagnoli) of buffers, as Zarr's ``crc32c`` codec stores it.

google-crc32c computes it at ~11 GiB/s, but holds Python's GIL over any buffer that is
not ``bytes``: a kernel engine reading 32 MB chunk files with a dozen threads then
checks one chunk at a time, and the thread that launches the device's work waits for
each check (measured on an H200 node: 20,000 runs of CIFAR-10 read at 5.1 GiB/s by 12
threads). Buffers of at least :data:`NOGIL_BYTES` therefore go through the CPU's own
CRC-32C instruction (x86-64 SSE4.2, one 8-byte step per instruction) in a numba kernel
that releases the GIL, where numba and the instruction are there; smaller ones, and every
buffer elsewhere, through google-crc32c. Both give the same values (tested against each
other and the standard's check value).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import platform

import numpy as np

from .cpufeatures import numba_target_has

#: Buffers from this size on are checked without the GIL (where possible). Smaller ones
#: hold it under ~0.1 ms; the threshold also keeps numba (~0.6 s to load) out of
#: processes that only ever check small chunks.
NOGIL_BYTES = 1 << 20

#: ``KERNELSCALE_CRC32C=google`` selects google-crc32c for every buffer.
ENV = "KERNELSCALE_CRC32C"


@functools.cache
def _kernel():
    """The numba kernel module, or None where it cannot run here."""
    if os.environ.get(ENV, "").lower() == "google":
        return None
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    if importlib.util.find_spec("numba") is None or not numba_target_has("sse4.2"):
        return None
    from . import crc32c_kernel

    return crc32c_kernel


def _bytes_view(data) -> np.ndarray:
    """A flat uint8 view of a buffer's bytes in C order (a numpy array that is not
    C-contiguous is copied; a memoryview or ``bytes`` is used as it is)."""
    a = np.ascontiguousarray(data) if isinstance(data, np.ndarray) \
        else np.frombuffer(data, np.uint8)
    return a.reshape(-1).view(np.uint8)


def extend(crc: int, data) -> int:
    """The CRC-32C of (the bytes whose CRC-32C is ``crc``) + ``data``; ``crc`` = 0 for
    the start. ``data``: a numpy array (its bytes in C order), memoryview or bytes."""
    view = _bytes_view(data)
    kernel = _kernel() if view.size >= NOGIL_BYTES else None
    if kernel is not None:
        return int(kernel.extend(np.uint32(crc), view))
    import google_crc32c

    return int(google_crc32c.extend(crc, view))


def to_zarr(crc: int) -> bytes:
    """The 4 bytes Zarr's codec appends to a chunk: the CRC-32C, little endian."""
    return int(crc).to_bytes(4, "little")


def crc32c(data) -> bytes:
    """CRC-32C of a buffer's bytes (see :func:`extend`), as Zarr's codec stores it (4
    bytes, little endian)."""
    return to_zarr(extend(0, data))
