"""The ``log.pt`` file format: safe loading and complete validation.

A source file is a ``torch.save``d dict with

* ``logits``       -- float16 or float32 tensor (runs, n_test, classes)
* ``logits_train`` -- tensor of the same dtype (runs, n_train, classes)
* ``code``         -- str, the training script (optional; not stored by ingest)

Files are untrusted. A plain one (a zip whose pickle names only tensors, storages and
dicts) is mapped by :mod:`kernelscale.formats.torchmap` from its decoded header, with no
unpickler and no torch; any other is loaded with ``torch.load(..., weights_only=True)``,
whose restricted unpickler refuses any pickle that is not plain tensors and containers.
Either way the tensors are views of the file's pages, never a copy (but for a permuted
layout), and they are checked completely
(keys, shapes and dtypes as in every format, :func:`kernelscale.formats.common.check_meta`;
dense storage; finiteness) before any byte of them reaches a store.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import BadInputError


@dataclass
class LoadedLog:
    """A validated source file.

    ``test``: (runs, n_test, classes) and ``train``: (runs, n_train, classes), both of the
    file's floating dtype (float16 for the Hub data), C-contiguous numpy arrays.
    """

    name: str
    size: int
    test: np.ndarray
    train: np.ndarray

    @property
    def runs(self) -> int:
        return int(self.test.shape[0])


def sha256_file(path: str | os.PathLike, bufsize: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def _load_object(path: Path, label: str):
    """``torch.load`` with ``weights_only`` (no pickle beyond plain tensors), memory-mapped
    when the file is in the zip format, so that no copy of its bytes is made."""
    import torch

    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as e:
        raise BadInputError(f"{label}: cannot read ({e.strerror or e})") from None
    if head[:4] != b"PK\x03\x04" and head[:1] != b"\x80":
        raise BadInputError(f"{label}: not a torch file (neither torch.save's zip format "
                            "nor its legacy pickle format)")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            # the legacy (non-zip) format cannot be mapped: load it from its bytes
            return torch.load(io.BytesIO(path.read_bytes()), map_location="cpu",
                              weights_only=True)
    except OSError as e:
        raise BadInputError(f"{label}: cannot read ({e.strerror or e})") from None
    except Exception as e:  # torch raises many types for bad bytes; all mean the same here
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise BadInputError(f"{label}: refused, the pickle holds objects other than "
                                f"plain tensors ({text[:160]})") from None
        raise BadInputError(f"{label}: not a readable torch file ({type(e).__name__}: "
                            f"{text[:160]})") from None


def first_non_finite(label: str, key: str, a: np.ndarray) -> BadInputError | None:
    """The error naming the first non-finite value of ``a`` (runs, examples, classes)."""
    finite = np.isfinite(a)
    if finite.all():
        return None
    bad = int(a.size - np.count_nonzero(finite))
    r, i, c = (int(v[0]) for v in np.nonzero(~finite))
    return BadInputError(f"{label}: {key!r} has {bad} non-finite value(s), first at "
                         f"[run {r}, example {i}, class {c}]")


def load_log(path: str | os.PathLike, name: str | None = None, *,
             expect: dict | None = None, check_finite: bool = True) -> LoadedLog:
    """Load and validate one ``log.pt``.

    ``expect`` (optional) holds the store's ``n_test``, ``n_train``, ``classes`` and
    ``dtype``; the file must agree. ``check_finite=False`` leaves the finiteness check
    to the caller (ingest finds non-finite values from the statistics it computes
    anyway, then names the first with :func:`first_non_finite`). The file's sha256 is
    the caller's to check (:func:`sha256_file`; ingest hashes while it loads and
    computes). Raises :class:`BadInputError` naming the file and the first problem.
    """
    # imported here: the package kernelscale.formats imports this module
    from .formats.common import DEFAULT_KEYS, ArrayMeta, check_meta
    from .formats.torchmap import map_tensors

    path = Path(path)
    label = name or str(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise BadInputError(f"{label}: cannot read ({e.strerror})") from None
    mapped = map_tensors(path, DEFAULT_KEYS)
    if mapped is None:
        test, train = _load_tensors(path, label, size, expect)
    else:
        test, train = mapped
        check_meta(label, DEFAULT_KEYS, *(ArrayMeta(a.shape, a.dtype.name) for a in mapped),
                   expect)
    if check_finite:
        for key, a in zip(DEFAULT_KEYS, (test, train), strict=True):
            err = first_non_finite(label, key, a)
            if err is not None:
                raise err
    return LoadedLog(label, size, test, train)


def _load_tensors(path: Path, label: str, size: int, expect: dict | None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(test, train) of a ``log.pt`` of ``size`` bytes through ``torch.load``: every file
    :func:`~kernelscale.formats.torchmap.map_tensors` does not map, checked as
    :func:`load_log` says."""
    import torch

    from .formats.common import DEFAULT_KEYS, ArrayMeta, check_meta

    obj = _load_object(path, label)
    if not isinstance(obj, dict):
        raise BadInputError(f"{label}: expected a dict with 'logits' and 'logits_train', "
                            f"got {type(obj).__name__}")
    missing = [k for k in DEFAULT_KEYS if k not in obj]
    if missing:
        raise BadInputError(f"{label}: missing key(s) {', '.join(map(repr, missing))}")
    tensors = [obj[key] for key in DEFAULT_KEYS]
    for key, t in zip(DEFAULT_KEYS, tensors, strict=True):
        if not isinstance(t, torch.Tensor):
            raise BadInputError(f"{label}: {key!r} is {type(t).__name__}, not a tensor")
    metas = [ArrayMeta(tuple(t.shape), str(t.dtype).removeprefix("torch.")) for t in tensors]
    check_meta(label, DEFAULT_KEYS, *metas, expect)
    for key, t in zip(DEFAULT_KEYS, tensors, strict=True):
        # A tensor is data of this file: dense, and no larger than the file. A view
        # declaring more values than its storage holds (a stride-0 expand of one value
        # to 100,000 x 100,000 x 10) would otherwise be materialised here.
        nbytes = t.numel() * t.element_size()
        if nbytes > t.untyped_storage().nbytes() or nbytes > size:
            raise BadInputError(f"{label}: {key!r} declares {tuple(t.shape)} = {nbytes} "
                                f"bytes, not stored densely in the file's {size} bytes")
    # a copy only for a permuted layout
    test, train = (t.detach().contiguous().numpy() for t in tensors)
    return test, train
