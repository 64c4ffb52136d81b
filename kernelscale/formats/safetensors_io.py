"""safetensors files: tensors ``logits`` (runs, n_test, C) and ``logits_train``
(runs, n_train, C), float16 or float32, in one file (``--keys TEST,TRAIN`` maps other
tensor names; other tensors are allowed and ignored).

The layout: an 8-byte little-endian length ``N``, ``N`` bytes of JSON naming each
tensor's ``dtype``, ``shape`` and ``data_offsets`` ``[begin, end)`` within the data that
follows. The header is read and checked completely here -- every tensor's byte span equal
to its shape times its dtype's size, the spans tiling the data exactly to the end of the
file, the two tensors' shapes and dtypes -- before any tensor is touched; the
``safetensors`` library then opens the file as its reference reader (what it refuses is
refused), and the two tensors are memory-mapped, not copied.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ..errors import BadInputError
from .common import ArrayMeta, check_keys_present, check_meta, native
from .sniff import MAX_SAFETENSORS_HEADER

#: safetensors dtype -> (numpy dtype name or the type's own name, bytes per value)
DTYPES = {"F16": ("float16", 2), "F32": ("float32", 4), "BF16": ("bfloat16", 2),
          "F64": ("float64", 8), "F8_E4M3": ("float8_e4m3", 1), "F8_E5M2": ("float8_e5m2", 1),
          "I8": ("int8", 1), "U8": ("uint8", 1), "I16": ("int16", 2), "U16": ("uint16", 2),
          "I32": ("int32", 4), "U32": ("uint32", 4), "I64": ("int64", 8),
          "U64": ("uint64", 8), "BOOL": ("bool", 1)}


def _no_duplicates(pairs: list) -> dict:
    names = [k for k, _ in pairs]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate name {next(k for k in names if names.count(k) > 1)!r}")
    return dict(pairs)


def read_header(path: Path, label: str) -> tuple[int, dict[str, tuple[str, ArrayMeta, int]]]:
    """:func:`parse_header` of the local file ``path``."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            return parse_header(fh, size, label)
    except OSError as e:
        raise BadInputError(f"{label}: cannot read ({e.strerror or e})") from None


def parse_header(fh: BinaryIO, size: int, label: str,
                 max_header: int = MAX_SAFETENSORS_HEADER
                 ) -> tuple[int, dict[str, tuple[str, ArrayMeta, int]]]:
    """The data offset and, per tensor, (safetensors dtype, declared meta, start offset
    in the file) of the safetensors file ``fh`` (``size`` bytes, open at its start; a
    local file or one read by ranges), after checking that the header's spans tile the
    data to the end of the file. A header longer than ``max_header`` bytes is refused
    before it is read. Raises :class:`BadInputError` naming the problem."""
    head = fh.read(8)
    if len(head) < 8:
        raise BadInputError(f"{label}: truncated safetensors file ({size} bytes, "
                            "no header length)")
    n = struct.unpack("<Q", head)[0]
    if n > max_header:
        why = ("the format allows" if max_header == MAX_SAFETENSORS_HEADER else
               "read for a header")
        raise BadInputError(f"{label}: safetensors header of {n} bytes, more than the "
                            f"{max_header} {why}")
    if n > size - 8:
        raise BadInputError(f"{label}: truncated safetensors file: the header "
                            f"declares {n} bytes, the file holds {size - 8} after "
                            "the length")
    raw = fh.read(n)
    if len(raw) < n:
        raise BadInputError(f"{label}: truncated safetensors file: the header declares "
                            f"{n} bytes, {len(raw)} could be read")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        text = str(e)[:160] or type(e).__name__
        raise BadInputError(f"{label}: unreadable safetensors header ({text})") from None
    if not isinstance(header, dict):
        raise BadInputError(f"{label}: safetensors header is not a JSON object")
    data_start, data_len = 8 + n, size - 8 - n
    out: dict[str, tuple[str, ArrayMeta, int]] = {}
    spans = []
    for name, e in header.items():
        if name == "__metadata__":
            continue
        what = f"{label}: tensor {name!r}"
        if not isinstance(e, dict) or set(e) - {"dtype", "shape", "data_offsets"}:
            raise BadInputError(f"{what}: header entry is not {{dtype, shape, data_offsets}}")
        code, shape, offs = e.get("dtype"), e.get("shape"), e.get("data_offsets")
        if code not in DTYPES:
            raise BadInputError(f"{what}: unknown dtype {code!r}")
        if (not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape)):
            raise BadInputError(f"{what}: shape {shape!r} is not a list of sizes")
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(type(o) is int for o in offs) or not 0 <= offs[0] <= offs[1]):
            raise BadInputError(f"{what}: data_offsets {offs!r} is not [begin, end]")
        dtype, itemsize = DTYPES[code]
        want = math.prod(shape) * itemsize
        if offs[1] - offs[0] != want:
            raise BadInputError(f"{what}: shape {tuple(shape)} of {dtype} is {want} bytes, "
                                f"but its data_offsets span {offs[1] - offs[0]}")
        if offs[1] > data_len:
            raise BadInputError(f"{what}: data ends at byte {offs[1]} of the data section, "
                                f"but the file holds {data_len} (truncated)")
        spans.append((offs[0], offs[1], name))
        out[name] = (code, ArrayMeta(tuple(shape), dtype), data_start + offs[0])
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            raise BadInputError(f"{label}: tensor {name!r} begins at data byte {begin}, not "
                                f"{end} (overlapping tensors or a gap)")
        end = stop
    if end != data_len:
        raise BadInputError(f"{label}: the tensors end at data byte {end}, but the file "
                            f"holds {data_len} ({data_len - end} trailing bytes)")
    return data_start, out


def _metas(label: str, keys: tuple[str, str], tensors: dict,
           expect: dict | None = None) -> tuple[ArrayMeta, ArrayMeta]:
    check_keys_present(label, keys, tensors)
    test, train = tensors[keys[0]][1], tensors[keys[1]][1]
    check_meta(label, keys, test, train, expect)
    return test, train


def header_metas(fh: BinaryIO, size: int, label: str, keys: tuple[str, str],
                 max_header: int = MAX_SAFETENSORS_HEADER) -> tuple[ArrayMeta, ArrayMeta]:
    """The declared (test, train) shapes (runs, examples, classes) and dtypes (float16
    or float32) of the safetensors file ``fh`` (see :func:`parse_header`), checked as a
    load checks them; no tensor is read."""
    _, tensors = parse_header(fh, size, label, max_header)
    return _metas(label, keys, tensors)


def load_safetensors(path: str | os.PathLike, label: str, keys: tuple[str, str],
                     expect: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The ``keys`` tensors of a safetensors file as (test, train) numpy arrays (runs,
    examples, classes), float16 or float32, memory-mapped copy-on-write (a copy only for
    data not aligned to its dtype). ``expect``: see :func:`~.common.check_meta`."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    _, tensors = read_header(path, label)
    _metas(label, keys, tensors, expect)
    try:
        with safe_open(path, framework="numpy") as f:
            names = set(f.keys())
        missing = [k for k in keys if k not in names]
    except (SafetensorError, OSError) as e:
        raise BadInputError(f"{label}: refused by the safetensors reader ({e})") from None
    if missing:
        raise BadInputError(f"{label}: the safetensors reader finds no {missing[0]!r}")
    arrays = []
    for key in keys:
        _, meta, offset = tensors[key]
        a = np.memmap(path, dtype=np.dtype(meta.dtype).newbyteorder("<"), mode="c",
                      offset=offset, shape=meta.shape)
        arrays.append(native(np.require(a, requirements=["A"])))
    return arrays[0], arrays[1]
