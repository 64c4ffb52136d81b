"""Direct reads and writes of uncompressed Zarr v3 chunk files, checksummed or not.

A Zarr v3 array with the ``bytes`` codec (little endian), C order, fill value 0 and the
default ``c/i/j`` chunk keys stores each chunk as its plain C-order bytes, always at the
full chunk shape (edge chunks padded with the fill value). With Zarr's ``crc32c`` codec
after it (every array kernelscale creates), the file is those bytes followed by their
CRC-32C, 4 bytes little endian. For such arrays the kernel engine reads store chunks
straight into pinned buffers, and writes kernel chunks, skipping the codec pipeline's
copies; the checksum is computed over the bytes in place (:mod:`kernelscale.crc32c`) and
a mismatch is an error naming the file. Zarr reads the files back unchanged and checks
the same checksum (tested against Zarr's own reads and writes).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import atomic_open
from .crc32c import crc32c, to_zarr
from .crc32c import extend as crc32c_extend
from .errors import StoreError

CRC_BYTES = 4


class ChunkDamaged(StoreError):
    """A chunk file is missing, short, or fails its checksum."""

    def __init__(self, path: Path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


@dataclass(frozen=True)
class RawLayout:
    """How an array's chunk files can be read and written directly."""

    checksum: bool  #: a CRC-32C follows the chunk's bytes


def raw_layout(arr) -> RawLayout | None:
    """The direct layout of ``arr`` (a ``zarr.Array``), or None when its chunks are
    encoded otherwise (compressed, big endian, other chunk keys)."""
    from zarr.codecs import BytesCodec, Crc32cCodec
    from zarr.core.chunk_key_encodings import DefaultChunkKeyEncoding

    m = arr.metadata
    codecs = tuple(getattr(m, "codecs", ()))
    if not codecs or not isinstance(codecs[0], BytesCodec):
        return None
    if codecs[0].endian is not None and codecs[0].endian.value != "little":
        return None
    rest = codecs[1:]
    if rest and not (len(rest) == 1 and isinstance(rest[0], Crc32cCodec)):
        return None
    if not (isinstance(m.chunk_key_encoding, DefaultChunkKeyEncoding)
            and m.chunk_key_encoding.separator == "/"
            and arr.order == "C" and float(m.fill_value) == 0.0):
        return None
    return RawLayout(checksum=bool(rest))


def chunk_path(array_dir: Path, index: tuple[int, ...]) -> Path:
    """The file of chunk ``index`` of the array stored in ``array_dir``."""
    return array_dir.joinpath("c", *(str(i) for i in index))


def _read_tail(fh, path: Path, tail: bytearray) -> None:
    """The CRC-32C after a chunk's data, and nothing after it."""
    _read_into(fh, path, memoryview(tail))
    if fh.read(1):
        raise ChunkDamaged(path, "chunk file longer than its array says")


def _open_chunk(path: Path):
    """An unbuffered binary file of a chunk that must exist (committed data)."""
    try:
        return open(path, "rb", buffering=0)  # noqa: SIM115
    except FileNotFoundError:
        raise ChunkDamaged(path, "chunk file missing") from None


def _read_into(fh, path: Path, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = fh.readinto(view[got:])
        if not n:
            raise ChunkDamaged(path, "chunk file shorter than its array says")
        got += n


def read_exact(path: Path, offset: int, dest: np.ndarray) -> None:
    """Fill the uint8 buffer ``dest`` from the plain chunk file ``path`` at ``offset``.

    A missing file is :class:`ChunkDamaged`: it is only ever read for committed data.
    """
    fh = _open_chunk(path)
    with fh:
        fh.seek(offset)
        _read_into(fh, path, memoryview(dest))


def read_checked(path: Path, chunk_bytes: int, offset: int, dest: np.ndarray) -> None:
    """Fill the uint8 buffer ``dest`` with bytes ``[offset, offset + len(dest))`` of the
    checksummed chunk file ``path`` (``chunk_bytes`` of data and their CRC-32C), after
    verifying the whole chunk. A whole-chunk request is read straight into ``dest``;
    a part goes through a temporary chunk-sized buffer, as the checksum covers all."""
    whole = offset == 0 and len(dest) == chunk_bytes
    buf = dest if whole else np.empty(chunk_bytes, dtype=np.uint8)
    tail = bytearray(CRC_BYTES)
    fh = _open_chunk(path)
    with fh:
        _read_into(fh, path, memoryview(buf))
        _read_tail(fh, path, tail)
    if crc32c(buf) != bytes(tail):
        raise ChunkDamaged(path, "checksum mismatch (the file is corrupt)")
    if not whole:
        dest[...] = buf[offset:offset + len(dest)]


class VerifiedChunks:
    """Chunk files whose CRC-32C this process has verified, each known by (path, inode,
    size, modification time): a file replaced or rewritten since is verified again.
    Thread-safe."""

    def __init__(self) -> None:
        self._seen: set[tuple] = set()
        self._lock = threading.Lock()

    @staticmethod
    def key(path: Path) -> tuple:
        st = os.stat(path)
        return (str(path), st.st_ino, st.st_size, st.st_mtime_ns)

    def __contains__(self, key: tuple) -> bool:
        with self._lock:
            return key in self._seen

    def add(self, key: tuple) -> None:
        with self._lock:
            self._seen.add(key)


#: bytes read at once while a chunk file is verified in a strided read
STRIDED_BLOCK_BYTES = 4 << 20


_local = threading.local()


def _thread_buffer(nbytes: int) -> np.ndarray:
    """A uint8 buffer of ``nbytes`` kept by the calling thread: the reader threads verify
    one chunk after another, and a fresh block each time leaves the freed ones resident
    in the allocator's per-thread arenas."""
    buf = getattr(_local, "buf", None)
    if buf is None or buf.size < nbytes:
        buf = _local.buf = np.empty(nbytes, dtype=np.uint8)
    return buf[:nbytes]


def _read_strided_verified(path: Path, chunk_bytes: int, offset: int, stride: int,
                           dest: np.ndarray) -> None:
    """:func:`read_strided` of a file read whole once: block by block of whole runs
    (``stride`` bytes each), the CRC-32C extended over every block and the wanted rows
    copied out, so memory stays one block whatever the chunk size."""
    n, width = dest.shape
    first, inner = divmod(offset, stride)
    per_block = max(1, STRIDED_BLOCK_BYTES // stride)
    buf = _thread_buffer(per_block * stride)
    crc = 0
    tail = bytearray(CRC_BYTES)
    fh = _open_chunk(path)
    with fh:
        for j0 in range(0, chunk_bytes // stride, per_block):
            k = min(per_block, chunk_bytes // stride - j0)
            block = buf[:k * stride]
            _read_into(fh, path, memoryview(block))
            crc = crc32c_extend(crc, block)
            lo, hi = max(j0, first), min(j0 + k, first + n)
            if lo < hi:
                runs = block.reshape(k, stride)[lo - j0:hi - j0, inner:inner + width]
                dest[lo - first:hi - first] = runs
        _read_tail(fh, path, tail)
    if to_zarr(crc) != bytes(tail):
        raise ChunkDamaged(path, "checksum mismatch (the file is corrupt)")


def read_strided(path: Path, chunk_bytes: int, offset: int, stride: int, dest: np.ndarray,
                 checksum: bool, verified: VerifiedChunks) -> None:
    """Fill the C-contiguous uint8 ``dest`` (n, width), row ``i`` from bytes
    ``[offset + i*stride, + width)`` of a chunk file of ``chunk_bytes`` data bytes: the
    same part of each run's examples (a column range of a kernel pass).

    A checksummed file is verified whole the first time this process reads it (in blocks
    of :data:`STRIDED_BLOCK_BYTES`, the rows copied out of each); later reads of the
    unchanged file read only the rows' bytes, so passes over a few columns at a time do
    not read the whole store each.
    """
    n, width = dest.shape
    if checksum:
        try:
            key = verified.key(path)
        except FileNotFoundError:
            raise ChunkDamaged(path, "chunk file missing") from None
        if key not in verified:
            _read_strided_verified(path, chunk_bytes, offset, stride, dest)
            verified.add(key)
            return
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise ChunkDamaged(path, "chunk file missing") from None
    try:
        for i in range(n):
            view, at = memoryview(dest[i]), offset + i * stride
            got = 0
            while got < width:
                k = os.preadv(fd, [view[got:]], at + got)
                if not k:
                    raise ChunkDamaged(path, "chunk file shorter than its array says")
                got += k
    finally:
        os.close(fd)


def read_chunk(path: Path, chunk_bytes: int, offset: int, dest: np.ndarray,
               checksum: bool) -> None:
    """Fill ``dest`` from bytes ``[offset, ...)`` of a chunk file of ``chunk_bytes`` data
    bytes: verified against its CRC-32C when ``checksum``, else read as it is."""
    if checksum:
        read_checked(path, chunk_bytes, offset, dest)
    else:
        read_exact(path, offset, dest)


def verify_chunk(path: Path, chunk_bytes: int, checksum: bool) -> str | None:
    """The problem with one chunk file, or None: missing, wrong size, bad checksum."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "chunk file missing"
    want = chunk_bytes + (CRC_BYTES if checksum else 0)
    if size != want:
        return f"chunk file has {size} bytes, its array says {want}"
    if checksum:
        try:
            read_checked(path, chunk_bytes, 0, np.empty(chunk_bytes, dtype=np.uint8))
        except ChunkDamaged as e:
            return e.problem
    return None


def write_chunk(path: Path, data: np.ndarray, checksum: bool, durable: bool = False) -> None:
    """Write one full chunk (C-contiguous, little endian) as the file ``path``, its
    CRC-32C after it when ``checksum``.

    ``durable``: through a temp file, fsynced and renamed (a store's commit). Otherwise
    in place: a kernel tile's done-marker, written after all its chunks, is what commits
    them, and a tile without one is recomputed and rewritten.
    """
    flat = np.ascontiguousarray(data).reshape(-1).view(np.uint8)  # one copy of a part
    view = memoryview(flat)
    tail = crc32c(flat) if checksum else b""
    if durable:
        with atomic_open(path, "wb") as fh:
            fh.write(view)
            fh.write(tail)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        for part in (view, memoryview(tail)):
            done = 0
            while done < len(part):
                done += os.write(fd, part[done:])
    finally:
        os.close(fd)
