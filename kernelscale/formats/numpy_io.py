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
from pathlib import Path

import numpy as np

from ..errors import BadInputError
from .common import ArrayMeta, check_keys_present, check_meta, dtype_name, native

#: most bytes a compressed .npz member may declare per compressed byte (plus 1 MiB)
MAX_RATIO = 64


def read_npy_header(fh, label: str) -> tuple[ArrayMeta, np.dtype, bool, int]:
    """(meta, dtype, fortran_order, header bytes) of the ``.npy`` stream ``fh`` at its
    start. An object dtype is refused here, from the header, before any data."""
    from numpy.lib import format as npformat

    try:
        version = npformat.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = npformat.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, fortran, dtype = npformat.read_array_header_2_0(fh)
        else:
            raise BadInputError(f"{label}: .npy version {version[0]}.{version[1]} is not "
                                "read (numpy writes it only for structured dtypes)")
        hlen = fh.tell()
    except BadInputError:
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
                meta, dtype, fortran, hlen = read_npy_header(fh, lab)
        except OSError as e:
            raise BadInputError(f"{lab}: cannot read ({e.strerror or e})") from None
        heads.append((meta, dtype, fortran, hlen))
        _check_size(lab, meta, dtype, size - hlen)
    check_meta(label, keys, heads[0][0], heads[1][0], expect)
    test, train = (_map(Path(p), d, h, m, f)
                   for p, (m, d, f, h) in zip(paths, heads, strict=True))
    return test, train


def _member_data_start(fh, info: zipfile.ZipInfo, label: str) -> int:
    """Where a stored member's bytes begin in the zip (after its local header)."""
    fh.seek(info.header_offset)
    local = fh.read(30)
    if len(local) < 30 or local[:4] != b"PK\x03\x04":
        raise BadInputError(f"{label}: damaged zip (no local header for {info.filename!r})")
    n, e = struct.unpack_from("<HH", local, 26)
    return info.header_offset + 30 + n + e


def load_npz(path: str | os.PathLike, label: str, keys: tuple[str, str],
             expect: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Members ``keys[0].npy`` and ``keys[1].npy`` of an ``.npz`` as (test, train)
    arrays (runs, examples, classes), float16 or float32: memory-mapped copy-on-write
    when stored, read (CRC-checked) when compressed."""
    path = Path(path)
    try:
        size = path.stat().st_size
        zf = zipfile.ZipFile(path)
    except OSError as e:
        raise BadInputError(f"{label}: cannot read ({e.strerror or e})") from None
    except Exception as e:  # zipfile raises many types for a damaged directory
        raise BadInputError(f"{label}: not a readable .npz (damaged or truncated zip: "
                            f"{type(e).__name__}: {str(e)[:160]})") from None
    with zf:
        members = {i.filename[:-4]: i for i in zf.infolist() if i.filename.endswith(".npy")}
        check_keys_present(label, keys, members)
        heads = []
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
                    meta, dtype, fortran, hlen = read_npy_header(fh, lab)
            except (zipfile.BadZipFile, zlib.error, NotImplementedError, OSError) as e:
                raise BadInputError(f"{lab}: unreadable zip member ({e})") from None
            _check_size(lab, meta, dtype, info.file_size - hlen)
            heads.append((info, lab, meta, dtype, fortran, hlen))
        check_meta(label, keys, heads[0][2], heads[1][2], expect)
        out = []
        for info, lab, meta, dtype, fortran, hlen in heads:
            if info.compress_type == zipfile.ZIP_STORED:
                with open(path, "rb") as fh:
                    start = _member_data_start(fh, info, lab)
                if start + info.file_size > size:
                    raise BadInputError(f"{lab}: member runs past the end of the file "
                                        "(truncated)")
                out.append(_map(path, dtype, start + hlen, meta, fortran))
                continue
            buf = np.empty(info.file_size - hlen, dtype=np.uint8)
            try:
                with zf.open(info) as fh:
                    fh.read(hlen)
                    view, got = memoryview(buf), 0
                    while got < len(buf):
                        n = fh.readinto(view[got:])
                        if not n:
                            raise BadInputError(f"{lab}: member shorter than declared")
                        got += n
                    fh.read(1)  # at the end: the CRC is checked
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
                raise BadInputError(f"{lab}: damaged zip member ({e})") from None
            a = buf.view(dtype).reshape(meta.shape, order="F" if fortran else "C")
            out.append(native(a))
    return out[0], out[1]
