"""Labels of a data set's examples and the names of its classes.

A labels spec is one of:

* ``LABELS.npz`` -- integer arrays ``train`` (n_train,) and ``test`` (n_test,) and,
  optionally, ``class_names`` (C,) strings (``np.savez(path, train=..., test=...,
  class_names=np.array(names))``);
* ``LABELS.train.npy`` or ``LABELS.test.npy`` -- either names the pair
  ``LABELS.train.npy`` / ``LABELS.test.npy`` (``np.save``'d 1-D integer arrays) and,
  when it exists, ``LABELS.class_names.npy`` (C,) strings;
* ``cifar10:ROOT`` -- torchvision's CIFAR-10 under ROOT (downloaded there on first use
  when allowed), with CIFAR-10's own class names;
* ``STORE`` -- a store's own labels, recorded once by ``kernelscale ingest --labels``
  (:meth:`~kernelscale.store.Store.record_labels`); the commands that read a store use
  them when no labels are given (:func:`store_labels`).

Files are read with ``allow_pickle=False``: an object array (a pickled list of names) is
refused, never unpickled; names are stored as a NumPy string array (``np.array(names)``,
dtype ``<U…``; byte strings ``S…`` are read as UTF-8). When the store's shape is given,
the label vectors must have its split lengths, every label must lie in ``[0, C)``, and
``class_names`` must hold exactly ``C`` names; each mismatch is one
:class:`~kernelscale.errors.BadInputError` line naming the file. Without class names, a
class is called ``class 0`` .. ``class C-1`` (:func:`class_names`).
"""

from __future__ import annotations

import urllib.error
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import BadInputError

CIFAR10_SCHEME = "cifar10:"
#: classes of CIFAR-10.
CIFAR10_CLASS_COUNT = 10
#: suffixes of the two files of a ``.npy`` labels pair, and of its optional names file.
NPY_SPLITS = {"train": ".train.npy", "test": ".test.npy"}
NPY_NAMES = ".class_names.npy"
#: how the accepted label formats are described in error messages.
FORMATS = ("an .npz with integer arrays 'train' and 'test' (optional 'class_names'), a "
           "pair NAME.train.npy / NAME.test.npy (optional NAME.class_names.npy), or "
           "cifar10:ROOT")

_NPY_MAGIC = b"\x93NUMPY"


def is_labels_spec(text: str) -> bool:
    """Whether ``text`` names labels by a scheme (``cifar10:ROOT``) rather than a file."""
    return text.startswith(CIFAR10_SCHEME)


def cifar10_root(spec: str) -> str:
    """The folder of torchvision's CIFAR-10 that ``cifar10:ROOT`` names (``.`` if empty)."""
    return spec.removeprefix(CIFAR10_SCHEME) or "."


def default_class_names(classes: int) -> tuple[str, ...]:
    """``("class 0", ..., "class C-1")``: the names of classes no labels file names."""
    return tuple(f"class {c}" for c in range(classes))


@dataclass(frozen=True)
class Labels:
    """int64 label vectors ``train`` (n_train,) and ``test`` (n_test,); ``class_names``
    (C,) when the labels name their classes, else None; ``source``: the spec read."""

    train: np.ndarray
    test: np.ndarray
    class_names: tuple[str, ...] | None = None
    source: str = ""


def class_names(labels: Labels, classes: int) -> tuple[str, ...]:
    """The ``classes`` names to show: the labels' own when they have them, else
    ``class 0`` .. ``class C-1``."""
    if labels.class_names is not None and len(labels.class_names) == classes:
        return labels.class_names
    return default_class_names(classes)


def npy_pair(spec: str) -> dict[str, Path] | None:
    """The files of a ``.npy`` labels spec: ``train``, ``test`` and (when it exists)
    ``class_names`` paths; None when ``spec`` ends in neither ``.train.npy`` nor
    ``.test.npy``."""
    for suffix in NPY_SPLITS.values():
        if spec.endswith(suffix):
            stem = spec[: -len(suffix)]
            files = {split: Path(stem + sfx) for split, sfx in NPY_SPLITS.items()}
            if Path(stem + NPY_NAMES).exists():
                files["class_names"] = Path(stem + NPY_NAMES)
            return files
    return None


def load_labels(spec: str, *, n_train: int | None = None, n_test: int | None = None,
                classes: int | None = None, download: bool = True) -> Labels:
    """Load the labels ``spec`` names (see the module docstring for the formats).

    ``n_train``, ``n_test``, ``classes``: the store's shape, checked when given.
    ``download``: whether ``cifar10:ROOT`` may download CIFAR-10. Raises
    :class:`BadInputError` (one line naming the file and the problem) on an unreadable
    file, a missing array, or labels that disagree with the store.
    """
    if is_labels_spec(spec):
        train, test, names = _load_cifar10(spec, classes, download)
    elif _is_store(spec):
        return store_labels(spec, n_train=n_train, n_test=n_test, classes=classes)
    elif (files := npy_pair(spec)) is not None:
        train, test = (_read_npy(files[s], spec, s) for s in ("train", "test"))
        names = (_read_npy(files["class_names"], spec, "class_names")
                 if "class_names" in files else None)
    else:
        train, test, names = _load_npz(spec)
    return labels_from_arrays(train, test, source=spec, n_train=n_train, n_test=n_test,
                              classes=classes, class_names=names)


def _load_cifar10(spec: str, classes: int | None, download: bool):
    root = cifar10_root(spec)
    if classes is not None and classes != CIFAR10_CLASS_COUNT:
        raise BadInputError(f"{spec}: CIFAR-10 has {CIFAR10_CLASS_COUNT} classes, but the "
                            f"store has {classes}; pass the store's own labels (.npz or "
                            ".npy pair)")
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
    return (np.asarray(tr.targets, dtype=np.int64), np.asarray(te.targets, dtype=np.int64),
            list(tr.classes))


def _magic(path: str | Path) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(6)
    except OSError as e:
        raise BadInputError(f"{path}: cannot read the labels ({e.strerror})") from None


def _load_npz(spec: str):
    if _magic(spec) == _NPY_MAGIC:
        raise BadInputError(f"{spec}: a single .npy array; labels are {FORMATS}")
    try:
        with np.load(spec, allow_pickle=False) as z:
            missing = [k for k in ("train", "test") if k not in z.files]
            if missing:
                raise BadInputError(f"{spec}: labels file lacks array(s) {missing}; labels "
                                    f"are {FORMATS}")
            train, test = z["train"], z["test"]
            names = _member(z, "class_names", spec) if "class_names" in z.files else None
    except BadInputError:
        raise
    except Exception as e:
        raise BadInputError(f"{spec}: not a readable labels .npz ({type(e).__name__}: "
                            f"{str(e)[:160]}); labels are {FORMATS}") from None
    return train, test, names


def _member(z, key: str, spec: str) -> np.ndarray:
    try:
        return z[key]
    except ValueError as e:  # an object array: np.load refuses to unpickle it
        raise BadInputError(f"{spec}: '{key}' is not a plain array ({str(e)[:80]}); store "
                            "names as a string array, np.array(names)") from None


def _read_npy(path: Path, spec: str, what: str) -> np.ndarray:
    if not path.exists():
        raise BadInputError(f"{path}: no such file (the {what} labels of {spec}); labels "
                            f"are {FORMATS}")
    if _magic(path) != _NPY_MAGIC:
        raise BadInputError(f"{path}: not an .npy array (np.save); labels are {FORMATS}")
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as e:
        raise BadInputError(f"{path}: not a plain array ({str(e)[:80]}); store names as a "
                            "string array, np.array(names)") from None
    except Exception as e:
        raise BadInputError(f"{path}: not a readable .npy ({type(e).__name__}: "
                            f"{str(e)[:160]})") from None


def _names(raw, source: str, classes: int | None) -> tuple[str, ...]:
    """``raw`` class names (a 1-D string array or a sequence of str) as a tuple of str."""
    arr = np.asarray(raw) if not isinstance(raw, np.ndarray) else raw
    if arr.ndim != 1 or arr.dtype.kind not in "US":
        raise BadInputError(f"{source}: class_names must be a 1-D array of strings, got "
                            f"{arr.dtype} {arr.shape}")
    try:
        names = tuple(s.decode("utf-8") if isinstance(s, bytes) else str(s)
                      for s in arr.tolist())
    except UnicodeDecodeError:
        raise BadInputError(f"{source}: class_names are byte strings that are not "
                            "UTF-8") from None
    if classes is not None and len(names) != classes:
        raise BadInputError(f"{source}: {len(names)} class_names, but the store has "
                            f"{classes} classes")
    return names


def labels_from_arrays(train, test, *, source: str = "<arrays>",
                       n_train: int | None = None, n_test: int | None = None,
                       classes: int | None = None,
                       class_names=None) -> Labels:
    """:class:`Labels` of two integer label vectors (any integer dtype, 1-D), checked
    against the split sizes and the class count when given.

    ``class_names``: None, or C strings (a sequence or a 1-D string array); without
    ``classes``, their number is the class count the labels are checked against. Raises
    :class:`BadInputError` naming ``source``.
    """
    names = None if class_names is None else _names(class_names, source, classes)
    limit = classes if classes is not None else (len(names) if names is not None else None)
    arrays = {}
    for split, arr, n in (("train", train, n_train), ("test", test, n_test)):
        arr = np.asarray(arr)
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise BadInputError(f"{source}: {split} labels must be a 1-D integer array, got "
                                f"{arr.dtype} {arr.shape}")
        if n is not None and arr.shape[0] != n:
            raise BadInputError(f"{source}: {arr.shape[0]} {split} labels, but the store has "
                                f"{n} {split} examples")
        bad = (arr < 0) | (arr >= limit) if limit is not None else arr < 0
        if bad.any():
            top = "C" if limit is None else limit
            whose = ("" if limit is None else f"; the store has {limit} classes"
                     if classes is not None else f"; class_names name {limit} classes")
            raise BadInputError(f"{source}: {split} labels out of range [0, {top}): "
                                f"{int(bad.sum())} of {arr.size} (min {arr.min()}, max "
                                f"{arr.max()}){whose}")
        arrays[split] = arr.astype(np.int64)
    return Labels(arrays["train"], arrays["test"], names, source)


def _is_store(spec: str) -> bool:
    return (Path(spec) / "manifest.json").is_file()


def store_labels(path: str | Path, *, n_train: int | None = None, n_test: int | None = None,
                 classes: int | None = None) -> Labels:
    """The labels and class names recorded in the store at ``path``, checked against its
    file's sha256 and against the shape given; one :class:`BadInputError` line when the
    store holds none."""
    from .logfile import sha256_file
    from .store import Store

    st = Store.open(path)
    rec = st.labels_record()
    if rec is None:
        raise BadInputError(f"{path}: no labels: the store holds none and none were given; "
                            "pass --labels LABELS, or record them in the store once with "
                            f"`kernelscale ingest SOURCE --store {path} --labels LABELS` "
                            f"(LABELS: {FORMATS})")
    f = st.root / rec["file"]
    if not f.is_file() or sha256_file(f) != rec.get("sha256"):
        raise BadInputError(f"{f}: the store's labels file is missing or damaged (sha256 "
                            "differs from the manifest's); record them again with "
                            "`kernelscale ingest SOURCE --store STORE --labels LABELS "
                            "--labels-replace`")
    train, test, names = _load_npz(str(f))
    s = st.shape
    return labels_from_arrays(
        train, test, source=str(path),
        n_train=s.n_train if n_train is None else n_train,
        n_test=s.n_test if n_test is None else n_test,
        classes=s.classes if classes is None else classes, class_names=names)
