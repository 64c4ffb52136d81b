"""NumPy files, never unpickled (``allow_pickle=False`` throughout: an object array is
refused from its header).

* ``.npz`` -- one file per chunk of runs holding both splits as members ``logits.npy``
  (runs, n_test, C) and ``logits_train.npy`` (runs, n_train, C) (``numpy.savez(f,
  logits=..., logits_train=...)``; ``--keys TEST,TRAIN`` maps other member names; other
  members are ignored). Stored members (``numpy.savez``) are memory-mapped; compressed
  ones (``numpy.savez_compressed``) are read, their size bounded by ``MAX_RATIO`` times
  their compressed size (logits hardly compress) and their CRC checked.
* ``.npy`` -- one file per split, paired by name: ``PREFIX.logits.npy`` with
  ``PREFIX.logits_train.npy``, or ``logits.npy`` with ``logits_train.npy`` in one folder
  (the key names as ``--keys`` sets them; see :mod:`kernelscale.sources.pairs`).
  Memory-mapped.

Every header is read and checked before any data: dtype float16 or float32 (either byte
order; big-endian is swapped, a copy), the declared bytes equal to what the file holds
after the header, the two arrays' shapes against each other and the store.
"""

from __future__ import annotations

import math
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ..errors import BadInputError, KernelscaleError
from .common import ArrayMeta, check_keys_present, check_meta, dtype_name, native

#: most bytes a compressed .npz member may declare per compressed byte (plus 1 MiB)
MAX_RATIO = 64
#: the longest .npy header read (numpy's own limit for a header it parses)
MAX_NPY_HEADER = 10_000


def read_npy_header(fh, label: str) -> tuple[ArrayMeta, np.dtype, bool, int]:
    """(meta, dtype, fortran_order, header bytes) of the ``.npy`` stream ``fh`` at its
    start (seekable). A header declaring more than :data:`MAX_NPY_HEADER` bytes is refused
    before it is read, an object dtype from the header, before any data."""
    from numpy.lib import format as npformat

    try:
        version = npformat.read_magic(fh)
        at = fh.tell()
        raw = fh.read(2 if version == (1, 0) else 4)
        declared = int.from_bytes(raw, "little")
        if len(raw) in (2, 4) and declared > MAX_NPY_HEADER:
            raise BadInputError(f"{label}: .npy header of {declared} bytes, more than the "
                                f"{MAX_NPY_HEADER} numpy reads")
        fh.seek(at)
        if version == (1, 0):
            shape, fortran, dtype = npformat.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, fortran, dtype = npformat.read_array_header_2_0(fh)
        else:
            raise BadInputError(f"{label}: .npy version {version[0]}.{version[1]} is not "
                                "read (numpy writes it only for structured dtypes)")
        hlen = fh.tell()
    except KernelscaleError:  # a bad file's, or a remote source's failure
        raise
    except OSError as e:
        raise BadInputError(f"{label}: cannot read ({e.strerror or e})") from None
    except Exception as e:  # numpy's header parser raises many types for bad bytes
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadInputError(f"{label}: unreadable .npy header ({text[:160]})") from None
    if dtype.hasobject:
        raise BadInputError(f"{label}: holds Python objects (dtype {dtype}); refused, a "
                            "pickle is never loaded")
    name = dtype_name(dtype) if dtype.fields is None and dtype.subdtype is None else str(dtype)
    return ArrayMeta(tuple(int(d) for d in shape), name), dtype, bool(fortran), hlen


def _check_size(label: str, meta: ArrayMeta, dtype: np.dtype, held: int) -> None:
    want = math.prod(meta.shape) * dtype.itemsize
    if held < want:
        raise BadInputError(f"{label}: the header declares {meta.shape} {meta.dtype} = {want} "
                            f"bytes, but the file holds {held} after it (truncated)")
    if held > want:
        raise BadInputError(f"{label}: the header declares {meta.shape} {meta.dtype} = {want} "
                            f"bytes, but the file holds {held} after it ({held - want} "
                            "bytes too many)")


def _map(path: Path, dtype: np.dtype, offset: int, meta: ArrayMeta,
         fortran: bool) -> np.ndarray:
    a = np.memmap(path, dtype=dtype, mode="c", offset=offset, shape=meta.shape,
                  order="F" if fortran else "C")
    return native(np.require(a, requirements=["A"]))


@dataclass(frozen=True)
class NpyHeader:
    """An ``.npy`` header: the declared array, its numpy dtype, order, and the bytes
    before the data (magic, version, length and the header dict)."""

    meta: ArrayMeta
    dtype: np.dtype
    fortran: bool
    hlen: int


def npy_header(fh: BinaryIO, size: int, label: str) -> NpyHeader:
    """The header of the ``.npy`` file ``fh`` (``size`` bytes, open at its start; a local
    file or one read by ranges), its declared bytes checked against what follows it."""
    meta, dtype, fortran, hlen = read_npy_header(fh, label)
    _check_size(label, meta, dtype, size - hlen)
    return NpyHeader(meta, dtype, fortran, hlen)


def load_npy_pair(paths: tuple[Path, Path], labels: tuple[str, str], label: str,
                  keys: tuple[str, str], expect: dict | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The test and train ``.npy`` files ``paths`` (named ``labels``; ``label``: the
    pair) as (test, train) arrays (runs, examples, classes), float16 or float32,
    memory-mapped copy-on-write."""
    heads = []
    for path, lab in zip(paths, labels, strict=True):
        try:
            size = Path(path).stat().st_size
            with open(path, "rb") as fh:
                heads.append(npy_header(fh, size, lab))
        except OSError as e:
            raise BadInputError(f"{lab}: cannot read ({e.strerror or e})") from None
    check_meta(label, keys, heads[0].meta, heads[1].meta, expect)
    test, train = (_map(Path(p), h.dtype, h.hlen, h.meta, h.fortran)
                   for p, h in zip(paths, heads, strict=True))
    return test, train


def _member_data_start(fh, info: zipfile.ZipInfo, label: str) -> int:
    """Where a stored member's bytes begin in the zip (after its local header)."""
    fh.seek(info.header_offset)
    local = fh.read(30)
    if len(local) < 30 or local[:4] != b"PK\x03\x04":
        raise BadInputError(f"{label}: damaged zip (no local header for {info.filename!r})")
    n, e = struct.unpack_from("<HH", local, 26)
    return info.header_offset + 30 + n + e


@dataclass(frozen=True)
class NpzMember:
    """A member of an ``.npz`` (``info``: its zip entry, ``label``: how it is named) and
    its ``.npy`` header."""

    info: zipfile.ZipInfo
    label: str
    head: NpyHeader


def open_npz(src: str | os.PathLike | BinaryIO, label: str) -> zipfile.ZipFile:
    """The zip directory of an ``.npz``: a local path, or a seekable binary file (a
    remote one read by ranges: only its end is read)."""
    try:
        return zipfile.ZipFile(src)
    except OSError as e:
        if not isinstance(src, str | os.PathLike):
            raise  # the reader's own failure (a remote source's), not the file's
        raise BadInputError(f"{label}: cannot read ({e.strerror or e})") from None
    except KernelscaleError:
        raise
    except Exception as e:  # zipfile raises many types for a damaged directory
        raise BadInputError(f"{label}: not a readable .npz (damaged or truncated zip: "
                            f"{type(e).__name__}: {str(e)[:160]})") from None


def npz_members(zf: zipfile.ZipFile, label: str, keys: tuple[str, str],
                expect: dict | None = None) -> tuple[NpzMember, NpzMember]:
    """The members ``keys[0].npy`` and ``keys[1].npy`` of the ``.npz`` ``zf`` with their
    headers, checked as a load checks them (each header's bytes against the member's
    size, the pair's shapes and dtypes); reads each member's local header and the start
    of its data only (of a compressed member, the first deflated block)."""
    members = {i.filename[:-4]: i for i in zf.infolist() if i.filename.endswith(".npy")}
    check_keys_present(label, keys, members)
    out = []
    for key in keys:
        info, lab = members[key], f"{label} ({key}.npy)"
        if info.flag_bits & 0x1:
            raise BadInputError(f"{lab}: encrypted zip member")
        stored = info.compress_type == zipfile.ZIP_STORED
        if not stored and info.file_size > MAX_RATIO * info.compress_size + (1 << 20):
            raise BadInputError(f"{lab}: declares {info.file_size} bytes from "
                                f"{info.compress_size} compressed, more than logits "
                                f"compress (at most {MAX_RATIO}x)")
        try:
            with zf.open(info) as fh:
                head = npy_header(fh, info.file_size, lab)
        except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, NotImplementedError,
                RuntimeError, OSError) as e:
            raise BadInputError(f"{lab}: unreadable zip member ({e})") from None
        out.append(NpzMember(info, lab, head))
    check_meta(label, keys, out[0].head.meta, out[1].head.meta, expect)
    return out[0], out[1]


def load_npz(path: str | os.PathLike, label: str, keys: tuple[str, str],
             expect: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Members ``keys[0].npy`` and ``keys[1].npy`` of an ``.npz`` as (test, train)
    arrays (runs, examples, classes), float16 or float32: memory-mapped copy-on-write
    when stored, read (CRC-checked) when compressed."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise BadInputError(f"{label}: cannot read ({e.strerror or e})") from None
    with open_npz(path, label) as zf:
        out = []
        for m in npz_members(zf, label, keys, expect):
            info, lab, h = m.info, m.label, m.head
            if info.compress_type == zipfile.ZIP_STORED:
                with open(path, "rb") as fh:
                    start = _member_data_start(fh, info, lab)
                if start + info.file_size > size:
                    raise BadInputError(f"{lab}: member runs past the end of the file "
                                        "(truncated)")
                out.append(_map(path, h.dtype, start + h.hlen, h.meta, h.fortran))
                continue
            buf = np.empty(info.file_size - h.hlen, dtype=np.uint8)
            try:
                with zf.open(info) as fh:
                    fh.read(h.hlen)
                    view, got = memoryview(buf), 0
                    while got < len(buf):
                        n = fh.readinto(view[got:])
                        if not n:
                            raise BadInputError(f"{lab}: member shorter than declared")
                        got += n
                    fh.read(1)  # at the end: the CRC is checked
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
                raise BadInputError(f"{lab}: damaged zip member ({e})") from None
            a = buf.view(h.dtype).reshape(h.meta.shape, order="F" if h.fortran else "C")
            out.append(native(a))
    return out[0], out[1]
