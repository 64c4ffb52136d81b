"""Direct reads and writes of uncompressed Zarr v3 chunk files.

A Zarr v3 array with the single ``bytes`` codec (little endian), C order, fill value 0
and the default ``c/i/j`` chunk keys stores each chunk as its plain C-order bytes, always
at the full chunk shape (edge chunks padded with the fill value). For such arrays the
kernel engine reads store chunks straight into pinned buffers and writes kernel chunks
from them, skipping the codec pipeline's copies; Zarr reads the files back unchanged
(tested against Zarr's own reads and writes).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import StoreError


def plain_chunks(arr) -> bool:
    """Whether ``arr`` (a ``zarr.Array``) stores its chunks as plain bytes (see above)."""
    from zarr.codecs import BytesCodec
    from zarr.core.chunk_key_encodings import DefaultChunkKeyEncoding

    m = arr.metadata
    codecs = getattr(m, "codecs", ())
    return (len(codecs) == 1 and isinstance(codecs[0], BytesCodec)
            and (codecs[0].endian is None or codecs[0].endian.value == "little")
            and isinstance(m.chunk_key_encoding, DefaultChunkKeyEncoding)
            and m.chunk_key_encoding.separator == "/"
            and arr.order == "C" and float(m.fill_value) == 0.0)


def chunk_path(array_dir: Path, index: tuple[int, ...]) -> Path:
    """The file of chunk ``index`` of the array stored in ``array_dir``."""
    return array_dir.joinpath("c", *(str(i) for i in index))


def read_exact(path: Path, offset: int, dest: np.ndarray) -> None:
    """Fill the uint8 buffer ``dest`` from ``path`` at ``offset`` (zeros if no file)."""
    try:
        fh = open(path, "rb", buffering=0)  # noqa: SIM115
    except FileNotFoundError:
        dest[...] = 0
        return
    with fh:
        fh.seek(offset)
        view = memoryview(dest)
        got = 0
        while got < len(view):
            n = fh.readinto(view[got:])
            if not n:
                raise StoreError(f"{path}: chunk file shorter than its array says")
            got += n


def write_chunk(path: Path, data: np.ndarray) -> None:
    """Write one full chunk (C-contiguous, little endian) as the file ``path``.

    Not atomic by itself: a kernel tile's done-marker, written after all its chunks, is
    what commits them, and a tile without one is recomputed and rewritten.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        view = memoryview(np.ascontiguousarray(data)).cast("B")
        done = 0
        while done < len(view):
            done += os.write(fd, view[done:])
    finally:
        os.close(fd)
