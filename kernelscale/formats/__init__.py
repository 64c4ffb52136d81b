"""Input formats of ingest: one validated (test, train) pair of logits per unit.

==============  ==================================================================
``--format``    a unit is
==============  ==================================================================
``logpt``       a ``torch.save``d dict, ``logits``/``logits_train``
                (:mod:`kernelscale.logfile`; ``--keys`` does not apply)
``safetensors`` one file, tensors ``logits``/``logits_train``
                (:mod:`.safetensors_io`)
``npy``         an ``.npz`` with members ``logits.npy``/``logits_train.npy``, or a pair
                of ``.npy`` files ``PREFIX.logits.npy`` + ``PREFIX.logits_train.npy``
                (:mod:`.numpy_io`)
``zarr``        a block of runs of a Zarr group's arrays ``logits``/``logits_train``;
                the group is SOURCE itself (:mod:`.zarr_io`)
``auto``        each file by its first bytes (:mod:`.sniff`), whatever its name; a
                SOURCE folder that is a Zarr group is read as one
==============  ==================================================================

Every array is (runs, examples, classes), float16 or float32 -- the dtypes a ``log.pt``
may hold -- and both of a unit share runs, classes and dtype. ``--keys TEST,TRAIN``
renames the two arrays in every format but ``log.pt``. Nothing is unpickled (a plain
``log.pt`` is mapped from its decoded header, :mod:`.torchmap`; any other goes through
``torch.load(weights_only=True)``), and every header is checked -- shapes,
dtypes, declared bytes against the file's size -- before any data is read or allocated.
"""

from __future__ import annotations

import os

import numpy as np

from ..errors import BadInputError
from ..logfile import load_log
from .common import DEFAULT_KEYS, FORMATS, check_keys
from .numpy_io import load_npz
from .safetensors_io import load_safetensors
from .sniff import KIND_NAMES, is_zarr_group, sniff

__all__ = ["DEFAULT_KEYS", "FORMATS", "check_keys", "is_zarr_group", "load_file", "sniff"]


def _not(label: str, what: str, kind: str | None) -> BadInputError:
    seen = f" (it is {KIND_NAMES[kind]}; --format auto reads it)" if kind else \
        " (unrecognised content)"
    return BadInputError(f"{label}: not {what}{seen}")


def load_file(path: str | os.PathLike, label: str, fmt: str = "auto",
              keys: tuple[str, str] = DEFAULT_KEYS, expect: dict | None = None
              ) -> tuple[str, np.ndarray, np.ndarray]:
    """Load and check one file holding both splits: (kind, test, train), ``kind`` one of
    ``logpt``, ``safetensors``, ``npz``; ``test`` (runs, n_test, C) and ``train``
    (runs, n_train, C) float16 or float32 numpy arrays, memory-mapped where the format
    allows. ``fmt``: a ``--format`` value other than ``zarr``; ``expect``: the store's
    shape and dtype (see :func:`~.common.check_meta`). Finiteness is the caller's to
    check. Raises :class:`BadInputError` naming ``label`` and the first problem."""
    if fmt == "logpt":
        log = load_log(path, label, expect=expect, check_finite=False)
        return "logpt", log.test, log.train
    kind = sniff(path, label)
    if fmt == "safetensors" and kind != "safetensors":
        raise _not(label, "a safetensors file", kind)
    if fmt == "npy" and kind not in ("npz", "npy"):
        raise _not(label, "a NumPy .npz or .npy file", kind)
    if kind is None:
        raise BadInputError(f"{label}: not a torch file, safetensors or NumPy .npy/.npz "
                            "(unrecognised content)")
    if kind == "logpt":
        log = load_log(path, label, expect=expect, check_finite=False)
        return kind, log.test, log.train
    if kind == "safetensors":
        return (kind, *load_safetensors(path, label, keys, expect))
    if kind == "npz":
        return (kind, *load_npz(path, label, keys, expect))
    raise BadInputError(f"{label}: a NumPy .npy holds one array: name the two splits "
                        f"PREFIX.{keys[0]}.npy and PREFIX.{keys[1]}.npy, or save both in "
                        "an .npz")
