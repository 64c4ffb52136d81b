"""Direct I/O of a store's logits chunk files, bypassing Zarr's codec pipeline.

Every store :mod:`kernelscale.store` creates has, per split, one chunk across examples
and classes, so chunk file ``c/<i>/0/0`` holds runs ``[i*run_chunk, (i+1)*run_chunk)``
as their little-endian C-order bytes followed by their CRC-32C (absent in stores from
before checksums; :mod:`kernelscale.rawchunks`). Such chunk files are read straight into
the caller's buffer and written with one copy; a split laid out otherwise
(:attr:`SplitChunks.raw` false) is read and written through Zarr by the caller.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import zarr

from .rawchunks import (
    ChunkDamaged,
    VerifiedChunks,
    chunk_path,
    raw_layout,
    read_chunk,
    read_strided,
    write_chunk,
)
from .store_layout import StoreShape


class SplitChunks:
    """The logits chunk files of one split of a store.

    ``array``: the split's Zarr array (runs, examples, classes); ``hint``: how to repair
    a damaged chunk file, appended to a :class:`~kernelscale.rawchunks.ChunkDamaged`
    message. Reads and writes take (runs, examples, classes) arrays of the store dtype,
    or their bytes as a flat uint8 view.
    """

    def __init__(self, split: str, array: zarr.Array, base: Path, shape: StoreShape,
                 hint: Callable[[Path], str]):
        self.split = split
        self.base = base  #: the array's folder, ``STORE/logits/<split>``
        self.run_chunk = shape.run_chunk
        self.run_bytes = shape.run_bytes(split)  #: bytes of one run
        self.example_bytes = shape.classes * np.dtype(shape.dtype).itemsize
        m = array.metadata
        layout = raw_layout(array)
        whole_runs = tuple(m.chunk_grid.chunk_shape[1:]) == tuple(m.shape[1:])
        self.layout = layout if layout is not None and whole_runs else None
        self._hint = hint
        self._verified = VerifiedChunks()  # chunk files read whole and verified

    @property
    def raw(self) -> bool:
        """Whether the chunk files hold the plain bytes of whole runs (with or without
        their CRC-32C)."""
        return self.layout is not None

    @property
    def checksum(self) -> bool:
        """Whether the chunk files carry a CRC-32C (stores from before do not)."""
        return self.layout is not None and self.layout.checksum

    @property
    def chunk_bytes(self) -> int:
        return self.run_chunk * self.run_bytes

    def spans(self, start: int, stop: int) -> Iterator[tuple[Path, int, int, int]]:
        """(chunk file, byte offset, first run, end run) of each chunk runs
        ``[start, stop)`` touch."""
        rc = self.run_chunk
        for ci in range(start // rc, (stop - 1) // rc + 1 if stop > start else 0):
            lo, hi = max(start, ci * rc), min(stop, (ci + 1) * rc)
            yield chunk_path(self.base, (ci, 0, 0)), (lo - ci * rc) * self.run_bytes, lo, hi

    def read_jobs(self, start: int, stop: int, out: np.ndarray,
                  examples: tuple[int, int] | None = None) -> list[Callable[[], None]]:
        """One callable per chunk file that reads its part of runs ``[start, stop)`` into
        ``out`` (stop-start, examples, classes), C-contiguous of the store dtype.

        ``examples``: only examples ``[a, b)`` of each run, ``out`` (stop-start, b-a, C):
        each chunk file is verified whole on its first read, and later reads take only
        those examples' bytes (:func:`rawchunks.read_strided`).
        """
        per_run = self.run_bytes
        if examples is not None:
            a = examples[0]
            rows = out.reshape(stop - start, -1).view(np.uint8)
            return [functools.partial(self.read_strided, path,
                                      offset + a * self.example_bytes,
                                      rows[lo - start:hi - start])
                    for path, offset, lo, hi in self.spans(start, stop)]
        dest = out.reshape(-1).view(np.uint8)
        return [functools.partial(self.read_chunk, path, offset,
                                  dest[(lo - start) * per_run:(hi - start) * per_run])
                for path, offset, lo, hi in self.spans(start, stop)]

    def read_strided(self, path: Path, offset: int, dest: np.ndarray) -> None:
        """From every run of chunk file ``path``, the bytes at ``offset`` into the rows
        of ``dest`` (runs, bytes) uint8."""
        try:
            read_strided(path, self.chunk_bytes, offset, self.run_bytes, dest,
                         self.checksum, self._verified)
        except ChunkDamaged as e:
            raise ChunkDamaged(e.path, f"{e.problem}; {self._hint(path)}") from None

    def read_chunk(self, path: Path, offset: int, dest: np.ndarray) -> None:
        """Bytes ``[offset, ...)`` of chunk file ``path`` into ``dest`` (flat uint8),
        verified when the split is checksummed; damage names the files to repair from."""
        try:
            read_chunk(path, self.chunk_bytes, offset, dest, self.checksum)
        except ChunkDamaged as e:
            raise ChunkDamaged(e.path, f"{e.problem}; {self._hint(path)}") from None

    def write_runs(self, start: int, data: np.ndarray) -> None:
        """Write runs ``[start, start + len(data))``, ``data`` (runs, examples, classes)
        C-contiguous of the store dtype, chunk file by chunk file (bytes and their
        CRC-32C), each atomically and fsynced.

        A chunk begun by an earlier commit is read and completed; the rest of a chunk
        this commit does not fill is the fill value, as Zarr writes it. Zarr would do the
        same through its codec pipeline with two more copies of every byte.
        """
        per_run, rc = self.run_bytes, self.run_chunk
        stop = start + data.shape[0]
        src = data.reshape(-1).view(np.uint8)
        for c in range(start // rc, -(-stop // rc)):
            lo, hi = max(start, c * rc), min(stop, (c + 1) * rc)
            piece = src[(lo - start) * per_run:(hi - start) * per_run]
            path = chunk_path(self.base, (c, 0, 0))
            if lo == c * rc and hi == (c + 1) * rc:
                write_chunk(path, piece, self.checksum, durable=True)
                continue
            chunk = np.zeros(rc * per_run, dtype=np.uint8)
            if lo > c * rc:  # runs an earlier commit wrote into this chunk
                self.read_chunk(path, 0, chunk[:(lo - c * rc) * per_run])
            chunk[(lo - c * rc) * per_run:(hi - c * rc) * per_run] = piece
            write_chunk(path, chunk, self.checksum, durable=True)

    def advise_willneed(self, start: int, stop: int) -> None:
        """Ask the kernel to start reading runs ``[start, stop)`` into the page cache
        (``POSIX_FADV_WILLNEED``); a no-op where unsupported."""
        if not hasattr(os, "posix_fadvise"):
            return
        for path, offset, lo, hi in self.spans(start, stop):
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, offset, (hi - lo) * self.run_bytes,
                                 os.POSIX_FADV_WILLNEED)
            except OSError:
                pass
            finally:
                os.close(fd)
