"""The labels file a store records: ``labels-<digest>.npz`` beside the manifest, holding
int64 ``train`` (n_train,) and ``test`` (n_test,) and, when known, str ``class_names``
(classes,); named by the digest of its content, so equal labels give the same file
whatever they were read from. The manifest's ``labels`` entry points at it
(:meth:`kernelscale.store.Store.record_labels`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .atomic import atomic_write_bytes
from .errors import StoreError
from .store_layout import StoreShape

#: the name :func:`write_labels_file` gives a labels file
LABELS_FILE = re.compile(r"labels-[0-9a-f]{16}\.npz")


def labels_digest(train: np.ndarray, test: np.ndarray,
                  class_names: Sequence[str] | None) -> str:
    """sha256 of label vectors (as int64) and class names: equal for the same labels,
    whatever file they were read from."""
    h = hashlib.sha256()
    for a in (train, test):
        v = np.ascontiguousarray(np.asarray(a, dtype="<i8"))
        h.update(f"{v.shape[0]}:".encode())
        h.update(v.tobytes())
    h.update(json.dumps(None if class_names is None else [str(n) for n in class_names]
                        ).encode())
    return h.hexdigest()


def fitted_labels(root: Path, shape: StoreShape, train: np.ndarray, test: np.ndarray,
                  class_names: Sequence[str] | None) -> tuple[np.ndarray, np.ndarray]:
    """``train`` (n_train,) and ``test`` (n_test,) as int64, once checked to fit the
    store: its example counts, and values (and as many ``class_names``) in
    ``[0, classes)``; a :class:`StoreError` otherwise."""
    s = shape
    train, test = np.asarray(train, np.int64), np.asarray(test, np.int64)
    if train.shape != (s.n_train,) or test.shape != (s.n_test,) or (
            class_names is not None and len(class_names) != s.classes) or any(
            a.size and (a.min() < 0 or a.max() >= s.classes) for a in (train, test)):
        raise StoreError(f"{root}: labels do not fit the store's (n_test, n_train, "
                         f"classes) = {(s.n_test, s.n_train, s.classes)}")
    return train, test


def write_labels_file(root: Path, train: np.ndarray, test: np.ndarray,
                      class_names: Sequence[str] | None, digest: str) -> tuple[str, str]:
    """Write the labels file of ``digest`` (:func:`labels_digest` of the same labels)
    into ``root`` atomically; return its name and the sha256 of its bytes."""
    arrays = {"train": train, "test": test}
    if class_names is not None:
        arrays["class_names"] = np.array([str(n) for n in class_names])
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    data = buf.getvalue()
    name = f"labels-{digest[:16]}.npz"
    atomic_write_bytes(root / name, data)
    return name, hashlib.sha256(data).hexdigest()


def remove_other_labels_files(root: Path, keep: str) -> None:
    """Remove every labels file in ``root`` but ``keep``: a replaced one, and any that a
    recording killed before its commit left."""
    for p in root.glob("labels-*.npz"):
        if p.name != keep and LABELS_FILE.fullmatch(p.name):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
