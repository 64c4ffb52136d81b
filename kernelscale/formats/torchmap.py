"""A ``torch.save`` file's tensors as numpy arrays mapped from its pages, without
importing torch.

The common ``log.pt`` is mapped here: a zip whose pickle (decoded by
:mod:`.torchzip`, never unpickled) is a dict made of the opcodes torch's weights-only
loader reads and of plain calls of no globals but torch's tensor rebuilders, its storage
classes and ``collections.OrderedDict``, whose tensors are dense, little-endian and
within storages of the declared sizes, and whose records are whole (:func:`_sound`).
Importing torch costs an ingest process ~1.5 s (2 cores) before its first file; for
every other file -- the legacy pickle format, other globals, a permuted or big-endian tensor, a
dtype numpy lacks, a header this module does not read, a damaged or short member --
:func:`map_tensors` gives None, and the caller loads it with
``torch.load(weights_only=True)``, whose verdict and messages stand for it.
"""

from __future__ import annotations

import math
import os
import pickletools
import struct
import zipfile

import numpy as np

from .torchzip import (
    MAX_PICKLE_BYTES,
    REBUILDERS,
    STORAGE_DTYPES,
    TensorMeta,
    read_directory,
    tensor_meta,
    walk,
)

#: the opcodes torch's weights-only unpickler reads, but for those building objects other
#: than by a plain call (NEWOBJ, BUILD: ``walk`` does not apply their state) and sets
PLAIN_OPCODES = frozenset({
    "PROTO", "STOP", "GLOBAL", "REDUCE", "APPEND", "APPENDS", "SETITEM", "SETITEMS", "MARK",
    "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "NONE", "NEWFALSE", "NEWTRUE", "EMPTY_TUPLE",
    "EMPTY_LIST", "EMPTY_DICT", "BININT", "BININT1", "BININT2", "BINFLOAT", "BINUNICODE",
    "SHORT_BINSTRING", "BINPERSID", "BINGET", "LONG_BINGET", "BINPUT", "LONG_BINPUT",
    "LONG1"})
#: the globals a plain ``torch.save`` of a dict of tensors names
PLAIN_GLOBALS = frozenset({*REBUILDERS, *(("torch", s) for s in STORAGE_DTYPES),
                           ("collections", "OrderedDict")})
#: a zip local header: signature, version, flags, method, time, date, CRC, sizes (2), the
#: lengths of its name and extra field
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")


def _contiguous(t: TensorMeta) -> bool:
    want, step = [], 1
    for d in reversed(t.shape):
        want.append(step)
        step *= d
    return t.stride is not None and all(
        d <= 1 or s == w for d, s, w in zip(t.shape, t.stride, reversed(want), strict=True))


def _data_offset(fh, info: zipfile.ZipInfo) -> int | None:
    """Where a stored member's bytes start: after its local header and that header's own
    name and extra field; None unless the header agrees with the directory (name, CRC,
    sizes) and its extra field is whole records, so that a damaged length is caught."""
    fh.seek(info.header_offset)
    head = fh.read(_LOCAL_HEADER.size)
    if len(head) != _LOCAL_HEADER.size:
        return None
    sig, _, flags, method, _, _, crc, csize, usize, n_name, n_extra = _LOCAL_HEADER.unpack(head)
    if sig != b"PK\x03\x04" or method != zipfile.ZIP_STORED:
        return None
    if not flags & 0x08 and (crc, csize, usize) != (info.CRC, info.file_size, info.file_size):
        return None
    rest = fh.read(n_name + n_extra)
    if len(rest) != n_name + n_extra or rest[:n_name] != info.orig_filename.encode("utf-8"):
        return None
    i = n_name
    while i + 4 <= len(rest):  # the extra field: (id, length, data) records
        i += 4 + struct.unpack_from("<H", rest, i + 2)[0]
    if i != len(rest):
        return None
    return info.header_offset + _LOCAL_HEADER.size + n_name + n_extra


_END = struct.Struct("<4s4H2LH")  # signature, disks, entries (2), directory size, offset
_END64 = struct.Struct("<4sQ2H2L4Q")  # the same, zip64, after its size and versions


def _one_disk(fh, entries: int) -> bool:
    """Whether the end records (the classic one, and the zip64 one where the file has it)
    name one disk and ``entries`` entries on it, as torch's reader requires."""
    fh.seek(-_END.size, os.SEEK_END)
    sig, disk, cd_disk, here, total, _, _, comment = _END.unpack(fh.read(_END.size))
    if sig != b"PK\x05\x06" or comment:
        return False
    if 0xFFFF not in (here, total):
        return disk == cd_disk == 0 and here == total == entries
    fh.seek(-_END.size - 20, os.SEEK_END)  # the zip64 locator: its record's offset
    loc = fh.read(20)
    if loc[:4] != b"PK\x06\x07":
        return False
    fh.seek(struct.unpack_from("<Q", loc, 8)[0])
    sig, _, _, _, disk, cd_disk, here, total, _, _ = _END64.unpack(fh.read(_END64.size))
    return sig == b"PK\x06\x06" and disk == cd_disk == 0 and here == total == entries


def _sound(fh, zf: zipfile.ZipFile, prefix: str, storages: set[str]) -> dict[str, int] | None:
    """Where each member's bytes start, when the zip is whole the way torch's own reader
    checks one, before any of it is trusted: one archive starting at the file's first
    byte, every member in the pickle's folder with its local header where the directory
    says, and every member but the storages (a few small records) matching its CRC; else
    None. A storage's bytes are not read here, as torch's memory-mapped load does not
    read them either."""
    infos = zf.infolist()
    if not infos or infos[0].header_offset != 0 or zf.comment or not _one_disk(fh, len(infos)) \
            or len({i.filename for i in infos}) != len(infos):  # a name twice: which one?
        return None
    starts = {}
    for info in infos:
        start = _data_offset(fh, info)
        if not info.filename.startswith(prefix) or info.volume != 0 or info.flag_bits & 1 \
                or info.compress_size != info.file_size or start is None:
            return None
        if info.filename not in storages:
            zf.read(info)  # raises BadZipFile on a CRC mismatch
        starts[info.filename] = start
    return starts


def map_tensors(path: str | os.PathLike, keys: tuple[str, ...]
                ) -> tuple[np.ndarray, ...] | None:
    """The tensors ``keys`` of the ``torch.save`` file ``path`` as C-contiguous numpy
    arrays of their own dtype and shape, mapped copy-on-write from the file (a write to
    one never reaches it); None when the file is not one mapped here (see the module
    docstring)."""
    try:
        with open(path, "rb") as fh:
            if fh.read(4) != b"PK\x03\x04":
                return None
            zf, tz = read_directory(fh, str(path))
            if tz.pickle_size > MAX_PICKLE_BYTES:
                return None
            prefix = tz.pickle_name[: -len("data.pkl")]
            starts = _sound(fh, zf, prefix, {f"{prefix}data/{k}" for k in tz.storages})
            if starts is None:
                return None
            data = zf.read(tz.pickle_name)
            if not {op.name for op, _, _ in pickletools.genops(data)} <= PLAIN_OPCODES:
                return None
            names: set = set()
            obj = walk(data, str(path), names)
            if not isinstance(obj, dict) or not names <= PLAIN_GLOBALS:
                return None
            try:
                if zf.read(prefix + "byteorder") != b"little":
                    return None
            except KeyError:  # written before torch recorded it: little-endian
                pass
            size = os.fstat(fh.fileno()).st_size
            arrays, dtypes = [], {}
            for key in keys:
                t = tensor_meta(obj.get(key), str(path), key)
                if t is None or not _contiguous(t) or t.dtype == "bfloat16" \
                        or 0 in t.shape or dtypes.setdefault(t.storage, t.dtype) != t.dtype:
                    return None  # torch views a storage shared by two dtypes as its first
                dt = np.dtype(t.dtype).newbyteorder("<")
                info = zf.getinfo(f"{prefix}data/{t.storage}")
                start = starts[info.filename]
                if start + info.file_size > size \
                        or t.storage_numel is None \
                        or t.storage_numel * dt.itemsize != info.file_size \
                        or (t.offset + math.prod(t.shape)) * dt.itemsize > info.file_size:
                    return None
                # copy-on-write, as torch maps them: writable arrays (torch warns about
                # read-only ones) whose writes never reach the file
                a = np.asarray(np.memmap(fh, dtype=dt, mode="c",
                                         offset=start + t.offset * dt.itemsize, shape=t.shape))
                arrays.append(a if dt.isnative else a.astype(dt.newbyteorder("=")))
            return tuple(arrays)
    except Exception:  # noqa: BLE001 -- damaged or unusual in any way: torch.load judges
        return None
