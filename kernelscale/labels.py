"""Labels of a data set's examples: an ``.npz`` file or torchvision's CIFAR-10.

``LABELS.npz`` holds int64 arrays ``train`` (n_train,) and ``test`` (n_test,) and,
optionally, ``class_names`` (C,) strings; ``cifar10:ROOT`` reads torchvision's CIFAR-10
under ROOT (downloading it there on first use when allowed).
"""

from __future__ import annotations

import urllib.error
from dataclasses import dataclass

import numpy as np

from .errors import BadInputError

CIFAR10_SCHEME = "cifar10:"


def is_labels_spec(text: str) -> bool:
    """Whether ``text`` names labels by a scheme (``cifar10:ROOT``) rather than a file."""
    return text.startswith(CIFAR10_SCHEME)


def cifar10_root(spec: str) -> str:
    """The folder of torchvision's CIFAR-10 that ``cifar10:ROOT`` names (``.`` if empty)."""
    return spec.removeprefix(CIFAR10_SCHEME) or "."


@dataclass(frozen=True)
class Labels:
    """int64 label vectors ``train`` (n_train,) and ``test`` (n_test,), and class names."""

    train: np.ndarray
    test: np.ndarray
    class_names: tuple[str, ...] | None = None
    source: str = ""


def load_labels(spec: str, *, n_train: int | None = None, n_test: int | None = None,
                classes: int | None = None, download: bool = True) -> Labels:
    """Load labels from ``path.npz`` (arrays ``train``, ``test``) or ``cifar10:ROOT``.

    The lengths must match the store's split sizes and every label must lie in
    ``[0, classes)``; otherwise :class:`BadInputError` names the file and the problem.
    """
    names = None
    if is_labels_spec(spec):
        root = cifar10_root(spec)
        try:
            import torchvision
            tr = torchvision.datasets.CIFAR10(root, train=True, download=download)
            te = torchvision.datasets.CIFAR10(root, train=False, download=download)
        except Exception as e:
            text = " ".join(str(e).split())[:160]
            if isinstance(e, urllib.error.URLError | TimeoutError | ConnectionError):
                raise BadInputError(
                    f"{spec}: CIFAR-10 is not under {root} and downloading it failed "
                    f"({type(e).__name__}: {text}); run once with network access, or "
                    "pass --labels FILE.npz") from None
            raise BadInputError(f"{spec}: cannot load CIFAR-10 ({type(e).__name__}: "
                                f"{text})") from None
        train = np.asarray(tr.targets, dtype=np.int64)
        test = np.asarray(te.targets, dtype=np.int64)
        names = tuple(tr.classes)
    else:
        try:
            with open(spec, "rb") as fh:
                magic = fh.read(6)
        except OSError as e:
            raise BadInputError(f"{spec}: cannot read the labels ({e.strerror})") from None
        if magic == b"\x93NUMPY":
            raise BadInputError(f"{spec}: a single .npy array; labels are an .npz with int "
                                "arrays 'train' and 'test' (np.savez), or cifar10:ROOT")
        try:
            with np.load(spec, allow_pickle=False) as z:
                missing = [k for k in ("train", "test") if k not in z.files]
                if missing:
                    raise BadInputError(f"{spec}: labels file lacks array(s) {missing}")
                train, test = z["train"], z["test"]
                if "class_names" in z.files:
                    names = tuple(str(s) for s in z["class_names"])
        except BadInputError:
            raise
        except Exception as e:
            raise BadInputError(f"{spec}: not a readable labels .npz ({type(e).__name__}: "
                                f"{str(e)[:160]})") from None
    return labels_from_arrays(train, test, source=spec, n_train=n_train, n_test=n_test,
                              classes=classes, class_names=names)


def labels_from_arrays(train, test, *, source: str = "<arrays>",
                       n_train: int | None = None, n_test: int | None = None,
                       classes: int | None = None,
                       class_names: tuple[str, ...] | None = None) -> Labels:
    """:class:`Labels` of two integer label vectors, checked against the split sizes and
    the class count when given; raises :class:`BadInputError` naming ``source``."""
    arrays = {}
    for split, arr, n in (("train", train, n_train), ("test", test, n_test)):
        arr = np.asarray(arr)
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise BadInputError(f"{source}: {split} labels must be a 1-D integer array, got "
                                f"{arr.dtype} {arr.shape}")
        if n is not None and arr.shape[0] != n:
            raise BadInputError(f"{source}: {arr.shape[0]} {split} labels, but the store has "
                                f"{n} {split} examples")
        if classes is not None and arr.size and (arr.min() < 0 or arr.max() >= classes):
            raise BadInputError(f"{source}: {split} labels out of range [0, {classes}) "
                                f"(min {arr.min()}, max {arr.max()})")
        arrays[split] = arr.astype(np.int64)
    return Labels(arrays["train"], arrays["test"], class_names, source)
