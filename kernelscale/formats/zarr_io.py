"""A Zarr group (v2 or v3, local) as a source: arrays ``logits`` (runs, n_test, C) and
``logits_train`` (runs, n_train, C), float16 or float32 (``--keys TEST,TRAIN`` maps
other array paths, e.g. ``logits/test,logits/train``).

It is ingested in blocks of runs, each one unit of the manifest: whole run-chunks (shards)
of the test array, as many as hold :data:`BLOCK_BYTES` of both splits' logits (at least
one chunk). A block's sha256 is that of its test then train values, C order, little
endian, in the arrays' dtype. Every chunk file a block covers must exist: Zarr reads a
missing chunk as the fill value, which would pass for data.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np

from ..errors import BadInputError
from .common import ArrayMeta, check_keys_present, check_meta, dtype_name, native

#: target bytes of logits (test + train) per ingested block
BLOCK_BYTES = 256 << 20
#: the largest array metadata document read (``zarr.json``, ``.zarray``)
MAX_METADATA_BYTES = 1 << 20


def metadata_names(key: str) -> tuple[str, str]:
    """Where an array ``key`` of a group keeps its metadata: (Zarr v3, Zarr v2) names."""
    return f"{key}/zarr.json", f"{key}/.zarray"


def array_metadata(data: bytes, label: str) -> ArrayMeta:
    """The shape and dtype an array's metadata document declares: Zarr v3 ``zarr.json``
    (``node_type`` array, ``shape``, ``data_type``) or v2 ``.zarray`` (``shape``, a numpy
    ``dtype`` string such as ``<f2``), JSON of at most :data:`MAX_METADATA_BYTES`."""
    if len(data) > MAX_METADATA_BYTES:
        raise BadInputError(f"{label}: Zarr metadata of {len(data)} bytes, more than the "
                            f"{MAX_METADATA_BYTES} read for one array")
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise BadInputError(f"{label}: unreadable Zarr metadata ({str(e)[:160]})") from None
    shape = doc.get("shape") if isinstance(doc, dict) else None
    version = doc.get("zarr_format") if isinstance(doc, dict) else None
    if version == 3 and doc.get("node_type") == "array":
        dtype = doc.get("data_type")
    elif version == 2:
        dtype = doc.get("dtype")
        if isinstance(dtype, str) and re.fullmatch(r"[<>|=]?[fiu][248]", dtype):
            dtype = dtype_name(np.dtype(dtype))  # a dtype string as numpy spells it
    else:
        raise BadInputError(f"{label}: not the metadata of a Zarr v2 or v3 array")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise BadInputError(f"{label}: Zarr shape {shape!r} is not a list of sizes")
    return ArrayMeta(tuple(shape), dtype if isinstance(dtype, str) else repr(dtype))


def _meta(arr) -> ArrayMeta:
    try:
        dt = dtype_name(np.dtype(arr.dtype))
    except TypeError:
        dt = str(arr.dtype)
    return ArrayMeta(tuple(int(d) for d in arr.shape), dt)


def open_arrays(root: str | os.PathLike, keys: tuple[str, str], label: str,
                expect: dict | None = None):
    """The test and train ``zarr.Array`` of the group at ``root``, their declared shapes
    and dtypes checked (against the store with ``expect``)."""
    import zarr

    try:
        g = zarr.open_group(Path(root), mode="r")
    except Exception as e:  # zarr raises many types for a folder that is no group
        raise BadInputError(f"{label}: not a readable Zarr group ({type(e).__name__}: "
                            f"{str(e)[:160]})") from None
    found = {}
    for key in keys:
        try:
            node = g[key]
        except KeyError:
            continue
        except Exception as e:  # damaged metadata of the node
            raise BadInputError(f"{label}: cannot open {key!r} ({type(e).__name__}: "
                                f"{str(e)[:160]})") from None
        if not isinstance(node, zarr.Array):
            raise BadInputError(f"{label}: {key!r} is a group, not an array")
        found[key] = node
    if len(found) < 2:
        try:
            present = set(g.array_keys())
        except Exception:  # noqa: BLE001 -- only for the message
            present = set()
        check_keys_present(label, keys, set(found) | present)
    test, train = found[keys[0]], found[keys[1]]
    check_meta(label, keys, _meta(test), _meta(train), expect)
    return test, train


def block_runs(test, train) -> int:
    """Runs per ingested block: whole run-chunks of ``test`` filling :data:`BLOCK_BYTES`."""
    chunk = int((test.shards or test.chunks)[0])
    per_run = (test.shape[1] + train.shape[1]) * test.shape[2] * np.dtype(test.dtype).itemsize
    return max(1, BLOCK_BYTES // max(1, per_run * chunk)) * chunk


def _check_chunks(root: Path, arr, start: int, stop: int, label: str) -> None:
    grid = arr.shards or arr.chunks
    spans = [range(start // grid[0], -(-stop // grid[0]))]
    spans += [range(-(-n // c)) for n, c in zip(arr.shape[1:], grid[1:], strict=True)]
    base = root / arr.path if arr.path else root
    for i in spans[0]:
        for j in spans[1]:
            for k in spans[2]:
                key = arr.metadata.encode_chunk_key((i, j, k))
                if not (base / key).is_file():
                    raise BadInputError(f"{label}: chunk {key} of {arr.path!r} is missing "
                                        "(it would read as the fill value, not data)")


def read_block(root: str | os.PathLike, keys: tuple[str, str], start: int, stop: int,
               label: str, expect: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Runs ``[start, stop)`` of the group's test and train arrays: (runs, examples,
    classes), float16 or float32, native byte order, in memory."""
    root = Path(root)
    test, train = open_arrays(root, keys, label, expect)
    if stop > test.shape[0] or not 0 <= start < stop:
        raise BadInputError(f"{label}: runs {start}:{stop} are not in the arrays' "
                            f"{test.shape[0]} runs (the group changed since it was listed)")
    out = []
    for key, arr in zip(keys, (test, train), strict=True):
        _check_chunks(root, arr, start, stop, label)
        try:
            out.append(native(np.asarray(arr[start:stop])))
        except Exception as e:  # a codec's or the store's error: damaged chunk data
            raise BadInputError(f"{label}: cannot read {key!r} ({type(e).__name__}: "
                                f"{str(e)[:160]})") from None
    return out[0], out[1]


def blocks(runs: int, per_block: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of each block of ``runs`` runs, ``per_block`` each (the last may
    hold fewer)."""
    return [(s, min(runs, s + per_block)) for s in range(0, runs, per_block)]


def logical_bytes(test, train, start: int, stop: int) -> int:
    """Bytes of runs ``[start, stop)`` of both arrays in their dtype."""
    per_run = math.prod(test.shape[1:]) + math.prod(train.shape[1:])
    return (stop - start) * per_run * np.dtype(test.dtype).itemsize
