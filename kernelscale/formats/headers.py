"""One unit's two arrays as its headers declare them, in any input format, read from
seekable binary files -- local files, or remote ones read by byte ranges
(:class:`~kernelscale.sources.ranged.RangedFile`) -- without reading the arrays.

=============  ======================================================================
kind           what is read
=============  ======================================================================
``logpt``      the zip directory (the file's end) and ``data.pkl``, whose opcodes are
               decoded, never unpickled (:mod:`.torchzip`)
``safetensors`` the 8-byte length and the JSON header (:mod:`.safetensors_io`)
``npz``        the zip directory, then each member's local header and ``.npy`` header;
               of a compressed member only its first deflated block (:mod:`.numpy_io`)
``npy``        a pair of files: each one's ``.npy`` header (:mod:`.numpy_io`)
``zarr``       the two arrays' metadata documents, ``zarr.json`` or ``.zarray``
               (:mod:`.zarr_io`)
=============  ======================================================================

The kind of a file is decided by its first bytes (:func:`.sniff.sniff_stream`), as
``--format auto`` decides it. These are the parsers the loaders use, and the same
checks (:func:`.common.check_meta`): shapes (runs, examples, classes), float16 or
float32, the bytes a header declares against what the file holds. Every read is bounded:
a header (a safetensors JSON, a ``data.pkl``) longer than :data:`MAX_HEADER_BYTES` is
refused with one line naming the file, an ``.npy`` header is at most numpy's 10,000
bytes, and a Zarr metadata document at most :data:`~.zarr_io.MAX_METADATA_BYTES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import BinaryIO

from ..errors import BadInputError
from .common import DEFAULT_KEYS, ArrayMeta, check_meta
from .numpy_io import npy_header, npz_members, open_npz
from .safetensors_io import header_metas
from .sniff import sniff_stream
from .torchzip import MAX_PICKLE_BYTES, TorchZip, log_tensors, read_directory
from .zarr_io import array_metadata

#: the longest header read to learn a file's shapes (a safetensors JSON, a data.pkl)
MAX_HEADER_BYTES = MAX_PICKLE_BYTES


@dataclass(frozen=True)
class Header:
    """What a unit's headers declare: its ``kind`` (see the table above) and its
    (test, train) arrays, each (runs, examples, classes), float16 or float32;
    ``storages``: a ``log.pt``'s storage keys of the two tensors."""

    kind: str
    test: ArrayMeta
    train: ArrayMeta
    storages: tuple[str, str] | None = None

    @property
    def runs(self) -> int:
        return self.test.shape[0]


def logpt_header(zf, tz: TorchZip, label: str) -> Header:
    """The header of a ``log.pt`` whose zip directory was read
    (:func:`.torchzip.read_directory`): its tensors ``logits`` and ``logits_train``
    (``--keys`` does not apply to ``log.pt``)."""
    te, tr = log_tensors(zf, tz, label, DEFAULT_KEYS)
    test, train = ArrayMeta(te.shape, te.dtype), ArrayMeta(tr.shape, tr.dtype)
    check_meta(label, DEFAULT_KEYS, test, train)
    return Header("logpt", test, train, (te.storage, tr.storage))


def read_header(fh: BinaryIO, size: int, label: str,
                keys: tuple[str, str] = DEFAULT_KEYS) -> Header:
    """The header of the one file holding both arrays, ``fh`` (``size`` bytes, open at
    its start): a ``log.pt``, a safetensors file or an ``.npz``, told apart by its first
    bytes. Raises :class:`~kernelscale.errors.BadInputError` naming ``label`` and the
    problem; a remote reader's own failure (HTTP, ranges) passes through."""
    kind = sniff_stream(fh)
    fh.seek(0)
    if kind == "logpt":
        zf, tz = read_directory(fh, label)
        return logpt_header(zf, tz, label)
    if kind == "safetensors":
        return Header(kind, *header_metas(fh, size, label, keys, MAX_HEADER_BYTES))
    if kind == "npz":
        with open_npz(fh, label) as zf:
            test, train = npz_members(zf, label, keys)
        return Header(kind, test.head.meta, train.head.meta)
    if kind == "npy":
        raise BadInputError(f"{label}: a NumPy .npy holds one array: name the two splits "
                            f"PREFIX.{keys[0]}.npy and PREFIX.{keys[1]}.npy")
    raise BadInputError(f"{label}: not a torch file, safetensors or NumPy .npy/.npz "
                        "(unrecognised content)")


def read_pair_header(test: tuple[BinaryIO, int, str], train: tuple[BinaryIO, int, str],
                     label: str, keys: tuple[str, str] = DEFAULT_KEYS) -> Header:
    """The header of a pair of ``.npy`` files, each given as (file open at its start,
    size, label); ``label`` names the pair."""
    heads = [npy_header(fh, size, lab) for fh, size, lab in (test, train)]
    check_meta(label, keys, heads[0].meta, heads[1].meta)
    return Header("npy", heads[0].meta, heads[1].meta)


def zarr_header(test: tuple[bytes, str], train: tuple[bytes, str], label: str,
                keys: tuple[str, str] = DEFAULT_KEYS) -> Header:
    """The header of a Zarr group from its two arrays' metadata documents, each given as
    (bytes, label); ``label`` names the group."""
    metas = [array_metadata(data, lab) for data, lab in (test, train)]
    check_meta(label, keys, metas[0], metas[1])
    return Header("zarr", metas[0], metas[1])
