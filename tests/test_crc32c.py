"""CRC-32C: the GIL-free instruction kernel against google-crc32c and the definition."""

import google_crc32c
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernelscale import crc32c

kernel = crc32c._kernel()
needs_kernel = pytest.mark.skipif(kernel is None, reason="no SSE4.2 CRC-32C instruction here")


def _bitwise(data: bytes, crc: int = 0) -> int:
    """The definition: reflected polynomial 0x82F63B78, initial and final inversion."""
    c = crc ^ 0xFFFFFFFF
    for byte in data:
        c ^= byte
        for _ in range(8):
            c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)
    return c ^ 0xFFFFFFFF


def test_check_value_of_the_standard():
    # RFC 3720 (iSCSI) B.4 and the CRC catalogue's check value of "123456789"
    assert crc32c.extend(0, b"123456789") == 0xE3069283 == _bitwise(b"123456789")
    assert crc32c.crc32c(np.frombuffer(b"123456789", np.uint8)) == (0xE3069283).to_bytes(4,
                                                                                         "little")


@needs_kernel
@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=300), st.integers(0, 2**32 - 1))
def test_kernel_matches_the_definition(data, start):
    assert int(kernel.extend(np.uint32(start), np.frombuffer(data, np.uint8))) \
        == _bitwise(data, start)


@needs_kernel
@pytest.mark.parametrize("n", [8 * 3 * 1000, 8 * 3 * 1000 + 5, 8 * 3 * 1000 + 17,
                               (1 << 20) + 13, 3 << 20])
def test_kernel_matches_google_on_large_buffers(n):
    data = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)
    for start in (0, 0x1234ABCD, 0xFFFFFFFF):
        assert int(kernel.extend(np.uint32(start), data)) == google_crc32c.extend(start, data)


@needs_kernel
def test_kernel_releases_the_gil():
    assert kernel.extend.targetoptions.get("nogil") is True


def test_extend_is_the_crc_of_the_concatenation():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, crc32c.NOGIL_BYTES + 3, dtype=np.uint8)  # the kernel's size
    b = rng.integers(0, 256, 1000, dtype=np.uint8)  # google-crc32c's size
    whole = np.concatenate([a, b, a])
    assert crc32c.extend(crc32c.extend(crc32c.extend(0, a), b), a) \
        == google_crc32c.extend(0, whole.tobytes())


def test_buffers_of_every_kind_and_shape():
    x = np.arange(24, dtype=np.float16).reshape(2, 3, 4)
    want = _bitwise(x.tobytes())
    assert crc32c.extend(0, x) == crc32c.extend(0, memoryview(x.tobytes())) == want
    assert crc32c.extend(0, x.tobytes()) == want
    part = x[:, :, ::2]  # its bytes in C order
    assert crc32c.extend(0, part) == _bitwise(np.ascontiguousarray(part).tobytes())


def test_large_buffers_take_the_kernel_and_small_ones_google(monkeypatch):
    calls = []

    class Spy:
        @staticmethod
        def extend(crc, view):
            calls.append(view.size)
            return np.uint32(7)

    monkeypatch.setattr(crc32c, "_kernel", lambda: Spy)
    assert crc32c.extend(0, np.zeros(crc32c.NOGIL_BYTES, np.uint8)) == 7
    small = np.zeros(crc32c.NOGIL_BYTES - 1, np.uint8)
    assert crc32c.extend(0, small) == google_crc32c.extend(0, small.tobytes())
    assert calls == [crc32c.NOGIL_BYTES]


def test_environment_selects_google(monkeypatch):
    crc32c._kernel.cache_clear()
    monkeypatch.setenv(crc32c.ENV, "google")
    try:
        assert crc32c._kernel() is None
    finally:
        crc32c._kernel.cache_clear()
