"""What every input format shares: the key names, the dtypes a store holds, and the
checks of two arrays' shapes and dtypes made from a file's header, before any of its
data is read.

``log.pt`` validation (:func:`kernelscale.logfile.load_log`) makes the same checks with
:func:`check_meta`, so a bad file reads the same whatever its format.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import BadInputError, ConfigError, MissingKeysError

#: dtypes a store can hold; logits keep their on-disk precision (the reference casts to
#: float32 only for the computation, so widening here would only cost disk).
ALLOWED_DTYPES = ("float16", "float32")
#: the names of the test and train arrays in every format (``--keys`` maps others)
DEFAULT_KEYS = ("logits", "logits_train")
#: ``--format`` values: ``auto`` decides per file by its content
FORMATS = ("auto", "logpt", "safetensors", "npy", "zarr")


@dataclass(frozen=True)
class ArrayMeta:
    """An array as a header declares it: ``shape`` and ``dtype`` (a numpy dtype name such
    as ``float16``, or the format's own name for a type numpy lacks, e.g. ``bfloat16``)."""

    shape: tuple[int, ...]
    dtype: str


def check_keys(value: object, where: str = "--keys") -> tuple[str, str]:
    """``TEST,TRAIN`` (text, or a list of two) -> the pair of names; ConfigError otherwise."""
    parts = value.split(",") if isinstance(value, str) else value
    if (not isinstance(parts, list | tuple) or len(parts) != 2
            or not all(isinstance(p, str) and p.strip() for p in parts)):
        raise ConfigError(f"{where} {value!r}: expected two names TEST,TRAIN (e.g. "
                          "logits,logits_train)")
    test, train = (p.strip() for p in parts)
    if test == train:
        raise ConfigError(f"{where} {value!r}: the test and train names must differ")
    return test, train


def dtype_name(dt: np.dtype) -> str:
    """``float16`` for ``<f2`` and ``>f2`` alike; ``object``, ``int64``, ... otherwise."""
    return dt.newbyteorder("=").name if dt.kind in "fiuc" else str(dt)


def native(a: np.ndarray) -> np.ndarray:
    """``a`` in native byte order, C-contiguous (a copy only when it is not already)."""
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    return np.ascontiguousarray(a)


def check_meta(label: str, keys: tuple[str, str], test: ArrayMeta, train: ArrayMeta,
               expect: dict | None = None) -> None:
    """Check the declared shapes (runs, examples, classes) and dtypes of the test and
    train arrays of one file against each other and the store (``expect``: ``n_test``,
    ``n_train``, ``classes``, ``dtype``, and ``holder``, how the message names them).
    Raises :class:`BadInputError` naming ``label`` and the first problem."""
    for key, m in zip(keys, (test, train), strict=True):
        if len(m.shape) != 3:
            raise BadInputError(f"{label}: {key!r} has shape {m.shape}, expected "
                                "(runs, examples, classes)")
        if m.dtype not in ALLOWED_DTYPES:
            raise BadInputError(f"{label}: {key!r} has dtype {m.dtype}, expected one of "
                                f"{', '.join(ALLOWED_DTYPES)}")
        if 0 in m.shape:
            raise BadInputError(f"{label}: {key!r} has an empty dimension, shape {m.shape}")
    k_test, k_train = (repr(k) for k in keys)
    if test.shape[0] != train.shape[0]:
        raise BadInputError(f"{label}: {k_test} has {test.shape[0]} runs but {k_train} has "
                            f"{train.shape[0]}")
    if test.shape[2] != train.shape[2]:
        raise BadInputError(f"{label}: {k_test} has {test.shape[2]} classes but {k_train} "
                            f"has {train.shape[2]}")
    if test.shape[2] < 2:
        raise BadInputError(f"{label}: {test.shape[2]} class(es); log-softmax needs >= 2")
    if test.dtype != train.dtype:
        raise BadInputError(f"{label}: {k_test} is {test.dtype} but {k_train} is "
                            f"{train.dtype}")
    if not expect:
        return
    holder = expect.get("holder", "the store holds")
    for what, got, want in (("test examples", test.shape[1], expect.get("n_test")),
                            ("train examples", train.shape[1], expect.get("n_train")),
                            ("classes", test.shape[2], expect.get("classes"))):
        if want is not None and got != want:
            raise BadInputError(f"{label}: {got} {what}, but {holder} {want}")
    if expect.get("dtype") and test.dtype != expect["dtype"]:
        raise BadInputError(f"{label}: dtype {test.dtype}, but the store holds "
                            f"{expect['dtype']}")


def check_keys_present(label: str, keys: tuple[str, str], present) -> None:
    """``present``: the names the file holds; both of ``keys`` must be among them."""
    missing = [k for k in keys if k not in present]
    if missing:
        have = sorted(present)
        shown = ", ".join(map(repr, have[:8])) + (", ..." if len(have) > 8 else "")
        raise MissingKeysError(f"{label}: missing key(s) {', '.join(map(repr, missing))} "
                               f"(it holds {shown or 'nothing'}; --keys TEST,TRAIN maps "
                               "other names)")
