"""Which format a file is in, from its first bytes (never from its name alone).

=============  ==============================================================
kind           first bytes
=============  ==============================================================
``logpt``      a zip (``PK\\x03\\x04``) whose first member is not an ``.npy``
               (torch.save's zip: ``<archive>/data.pkl``), or a pickle
               (``\\x80``, torch.save's legacy format)
``npz``        a zip whose first member is an ``.npy`` (``numpy.savez``)
``npy``        ``\\x93NUMPY``
``safetensors`` an 8-byte little-endian header length, then ``{``
=============  ==============================================================

Only the first local zip header is read, so a truncated zip is still told apart (its
central directory, at the end, may be gone). Zarr groups are folders, recognised by
:func:`is_zarr_group`.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import BinaryIO

from ..errors import BadInputError

#: what each kind is called in messages
KIND_NAMES = {"logpt": "a torch.save file (log.pt)", "npz": "a NumPy .npz",
              "npy": "a NumPy .npy", "safetensors": "a safetensors file"}
#: the header a safetensors file may declare (the format's own limit)
MAX_SAFETENSORS_HEADER = 100_000_000


def sniff(path: str | os.PathLike, label: str) -> str | None:
    """The kind of the file at ``path`` (see the table above), or None when its first
    bytes are none of them. Raises :class:`BadInputError` when it cannot be read."""
    try:
        with open(path, "rb") as fh:
            return sniff_stream(fh)
    except OSError as e:
        raise BadInputError(f"{label}: cannot read ({e.strerror or e})") from None


def sniff_stream(fh: BinaryIO) -> str | None:
    """:func:`sniff` of a binary file open at its start (a local file, or a remote one
    read by ranges): reads at most its first 30 bytes and the first zip member's name."""
    head = fh.read(30)
    if head[:4] == b"PK\x03\x04" and len(head) == 30:
        n = struct.unpack_from("<H", head, 26)[0]
        first = fh.read(n)
        return "npz" if first.endswith(b".npy") else "logpt"
    if head[:4] == b"PK\x03\x04":
        return "logpt"
    if head[:6] == b"\x93NUMPY":
        return "npy"
    # before the pickle test: a header length's low byte may be 0x80 ('{' is no opcode
    # a pickle begins with)
    if len(head) >= 9 and head[8:9] == b"{":
        n = struct.unpack_from("<Q", head)[0]
        if 0 < n <= MAX_SAFETENSORS_HEADER:
            return "safetensors"
    if head[:1] == b"\x80":
        return "logpt"
    return None


def is_zarr_group(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding a Zarr group (v3 ``zarr.json``, v2 ``.zgroup``)."""
    p = Path(path)
    return p.is_dir() and ((p / "zarr.json").is_file() or (p / ".zgroup").is_file())
