"""What a ``torch.save`` file holds, read from its zip directory and pickle header only.

``torch.save`` writes a zip of stored (uncompressed) members: ``PREFIX/data.pkl``, the
pickled object, whose tensors name their storage by a key, and one member
``PREFIX/data/KEY`` per storage holding its bytes. The zip's central directory, at the
end of the file, gives every member's size; ``data.pkl`` is small (a few hundred bytes
plus the strings the object holds, e.g. a ``log.pt``'s ``code``). Both are read here from
any seekable binary file -- a local file, or a remote one read by ranged requests
(:class:`~kernelscale.sources.ranged.RangedFile`) -- so a ``log.pt``'s shapes and runs are
known without reading its tensors.

``data.pkl`` is never unpickled: :func:`pickle_tensors` walks its opcodes with
:func:`pickletools.genops`, which decodes them without executing anything, on a stack of
plain values. A ``GLOBAL`` is kept as its two names and never imported; an opcode outside
those ``torch.save`` writes for a dict of tensors and plain values ends the walk with
:class:`HeaderError`.
"""

from __future__ import annotations

import math
import pickletools
import zipfile
import zlib
from dataclasses import dataclass
from typing import IO

from ..errors import BadInputError

#: storage classes of the pickle -> numpy dtype names
STORAGE_DTYPES = {"HalfStorage": "float16", "FloatStorage": "float32",
                  "DoubleStorage": "float64", "BFloat16Storage": "bfloat16",
                  "ByteStorage": "uint8", "CharStorage": "int8", "ShortStorage": "int16",
                  "IntStorage": "int32", "LongStorage": "int64", "BoolStorage": "bool"}
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8, "uint8": 1, "int8": 1,
            "int16": 2, "int32": 4, "int64": 8, "bool": 1}
#: the largest ``data.pkl`` read to learn the shapes (it holds the ``code`` string too)
MAX_PICKLE_BYTES = 4 << 20
#: a zip local header's fixed part and its extra field (torch pads to 64-byte alignment)
LOCAL_HEADER_MAX = 30 + 256
REBUILDERS = {("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor")}


class HeaderError(BadInputError):
    """A file is not a ``torch.save`` zip, or its header is not one this module reads."""


@dataclass(frozen=True)
class TensorMeta:
    """A tensor of the pickle: its shape, dtype, and the storage (key, offset) it views."""

    shape: tuple[int, ...]
    dtype: str
    storage: str
    offset: int
    #: elements between neighbours along each axis (None where the header gives none)
    stride: tuple[int, ...] | None = None
    #: elements the storage declares it holds (None where the header gives none)
    storage_numel: int | None = None


@dataclass(frozen=True)
class TorchZip:
    """The members of a ``torch.save`` zip: each storage's bytes by key, and where the
    pickle lies (``pickle_name``, ``pickle_size``)."""

    storages: dict[str, int]
    pickle_name: str
    pickle_size: int


def read_directory(fh: IO[bytes], label: str) -> tuple[zipfile.ZipFile, TorchZip]:
    """The zip directory of ``fh`` (a seekable binary file): the open ZipFile (to read the
    pickle from) and its storages. Reads only the end of the file."""
    try:
        zf = zipfile.ZipFile(fh)
    except (zipfile.BadZipFile, EOFError, ValueError, NotImplementedError) as e:
        raise HeaderError(f"{label}: not a torch.save zip ({e})") from None
    pickles = [i for i in zf.infolist() if i.filename.endswith("/data.pkl")
               or i.filename == "data.pkl"]
    if len(pickles) != 1:
        raise HeaderError(f"{label}: not a torch.save zip (no single data.pkl member)")
    info = pickles[0]
    prefix = info.filename[: -len("data.pkl")]
    storages = {}
    for i in zf.infolist():
        if i.filename.startswith(prefix + "data/"):
            key = i.filename[len(prefix) + 5:]
            if key and "/" not in key:
                if i.compress_type != zipfile.ZIP_STORED:
                    raise HeaderError(f"{label}: storage {key} is compressed; torch.save "
                                      "stores them")
                storages[key] = int(i.file_size)
    return zf, TorchZip(storages, info.filename, int(info.file_size))


def read_pickle(zf: zipfile.ZipFile, tz: TorchZip, label: str,
                max_bytes: int = MAX_PICKLE_BYTES) -> dict[str, TensorMeta]:
    """The tensors of the top-level dict of ``tz``'s pickle, by key (see
    :func:`pickle_tensors`); reads ``data.pkl`` only, at most ``max_bytes``."""
    if tz.pickle_size > max_bytes:
        raise HeaderError(f"{label}: data.pkl is {tz.pickle_size} bytes, more than the "
                          f"{max_bytes} read for a header")
    prefetch = getattr(zf.fp, "prefetch", None)
    if prefetch is not None:  # a remote file: its local header and bytes by one request
        at = zf.getinfo(tz.pickle_name).header_offset
        prefetch(at, at + LOCAL_HEADER_MAX + len(tz.pickle_name) + tz.pickle_size)
    try:
        data = zf.read(tz.pickle_name)
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, NotImplementedError,
            RuntimeError) as e:  # a damaged member: its method, flags, bytes
        raise HeaderError(f"{label}: data.pkl unreadable ({e})") from None
    return pickle_tensors(data, label)


def log_tensors(zf: zipfile.ZipFile, tz: TorchZip, label: str,
                keys: tuple[str, str] = ("logits", "logits_train")
                ) -> tuple[TensorMeta, TensorMeta]:
    """The (test, train) tensors ``keys`` of a ``log.pt``'s pickle (:func:`read_pickle`),
    each 3-D (runs, examples, classes), within the bytes its storage holds, and agreeing
    on runs and classes; :class:`HeaderError` otherwise."""
    tensors = read_pickle(zf, tz, label)
    te, tr = (tensors.get(k) for k in keys)
    if te is None or tr is None or len(te.shape) != 3 or len(tr.shape) != 3:
        raise HeaderError(f"{label}: no 3-D tensors {keys[0]!r} and {keys[1]!r} in its "
                          "header")
    for key, t in zip(keys, (te, tr), strict=True):
        need = (t.offset + math.prod(t.shape)) * ITEMSIZE.get(t.dtype, 1)
        if tz.storages.get(t.storage, -1) < need:
            raise HeaderError(f"{label}: {key!r} declares {t.shape} = {need} bytes, more "
                              "than its storage holds")
    if te.shape[0] != tr.shape[0] or te.shape[2] != tr.shape[2]:
        raise HeaderError(f"{label}: {keys[0]!r} {te.shape} and {keys[1]!r} {tr.shape} "
                          "disagree on runs or classes")
    return te, tr


class _Global:
    """A GLOBAL opcode's names (never imported)."""

    def __init__(self, module: str, name: str) -> None:
        self.names = (module, name)


class _Persistent:
    def __init__(self, pid) -> None:
        self.pid = pid


class _Call:
    def __init__(self, func, args) -> None:
        self.func, self.args = func, args


_MARK = object()
_LITERALS = {"BININT", "BININT1", "BININT2", "LONG1", "LONG4", "INT", "LONG", "BINFLOAT",
             "FLOAT", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "UNICODE",
             "BINSTRING", "SHORT_BINSTRING", "STRING", "BINBYTES", "SHORT_BINBYTES",
             "BINBYTES8"}
_CONSTANTS = {"NONE": None, "NEWTRUE": True, "NEWFALSE": False}


def walk(data: bytes, label: str, names: set | None = None):
    """The object ``data`` pickles, as plain values and the stand-ins above; the (module,
    name) of every global it names are added to ``names``."""
    stack: list = []
    memo: dict = {}

    def pop_mark() -> list:
        for i in range(len(stack) - 1, -1, -1):
            if stack[i] is _MARK:
                items = stack[i + 1:]
                del stack[i:]
                return items
        raise HeaderError(f"{label}: data.pkl: MARK missing")

    try:
        for op, arg, _pos in pickletools.genops(data):
            name = op.name
            if name in ("PROTO", "FRAME"):
                continue
            if name == "STOP":
                if len(stack) != 1:
                    break
                return stack[0]
            if name in _LITERALS:
                stack.append(arg)
            elif name in _CONSTANTS:
                stack.append(_CONSTANTS[name])
            elif name == "MARK":
                stack.append(_MARK)
            elif name == "EMPTY_DICT":
                stack.append({})
            elif name == "EMPTY_LIST":
                stack.append([])
            elif name == "EMPTY_TUPLE":
                stack.append(())
            elif name == "TUPLE":
                stack.append(tuple(pop_mark()))
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                n = int(name[-1])
                items = tuple(stack[-n:])
                del stack[-n:]
                stack.append(items)
            elif name == "LIST":
                stack.append(pop_mark())
            elif name == "DICT":
                items = pop_mark()
                stack.append(dict(zip(items[::2], items[1::2], strict=True)))
            elif name == "APPEND":
                v = stack.pop()
                stack[-1].append(v)
            elif name == "APPENDS":
                items = pop_mark()
                stack[-1].extend(items)
            elif name == "SETITEM":
                v, k = stack.pop(), stack.pop()
                stack[-1][k] = v
            elif name == "SETITEMS":
                items = pop_mark()
                stack[-1].update(zip(items[::2], items[1::2], strict=True))
            elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
                memo[arg] = stack[-1]
            elif name == "MEMOIZE":
                memo[len(memo)] = stack[-1]
            elif name in ("BINGET", "LONG_BINGET", "GET"):
                stack.append(memo[arg])
            elif name in ("GLOBAL", "STACK_GLOBAL"):
                if name == "GLOBAL":
                    module, _, attr = str(arg).partition(" ")
                else:
                    attr, module = str(stack.pop()), str(stack.pop())
                stack.append(_Global(module, attr))
                if names is not None:
                    names.add((module, attr))
            elif name == "BINPERSID":
                stack.append(_Persistent(stack.pop()))
            elif name == "PERSID":
                stack.append(_Persistent(arg))
            elif name in ("REDUCE", "NEWOBJ"):
                args = stack.pop()
                stack.append(_Call(stack.pop(), args))
            elif name == "BUILD":
                stack.pop()  # the state of the object below; its shape is all we need
            else:
                raise HeaderError(f"{label}: data.pkl holds opcode {name}, not read here")
    except HeaderError:
        raise
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        raise HeaderError(f"{label}: data.pkl is not a pickle read here ({type(e).__name__}"
                          f": {str(e)[:80]})") from None
    raise HeaderError(f"{label}: data.pkl does not end with one object")


def tensor_meta(value, label: str, key: str) -> TensorMeta | None:
    """The tensor a rebuild call describes, or None when ``value`` is not one."""
    if not (isinstance(value, _Call) and isinstance(value.func, _Global)
            and value.func.names in REBUILDERS and isinstance(value.args, tuple)
            and len(value.args) >= 3 and isinstance(value.args[0], _Persistent)):
        return None
    pid = value.args[0].pid
    if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"
            and isinstance(pid[1], _Global)):
        raise HeaderError(f"{label}: {key!r}: storage reference not read here")
    dtype = STORAGE_DTYPES.get(pid[1].names[1])
    offset, shape = value.args[1], value.args[2]
    if dtype is None or not isinstance(offset, int) or offset < 0 \
            or not isinstance(shape, tuple) \
            or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise HeaderError(f"{label}: {key!r}: tensor header not read here")
    stride = value.args[3] if len(value.args) > 3 else None
    if not (isinstance(stride, tuple) and len(stride) == len(shape)
            and all(isinstance(d, int) for d in stride)):
        stride = None
    numel = pid[4] if len(pid) > 4 and isinstance(pid[4], int) else None
    return TensorMeta(tuple(shape), dtype, str(pid[2]), offset, stride, numel)


def pickle_tensors(data: bytes, label: str) -> dict[str, TensorMeta]:
    """The tensors of the top-level dict ``data`` (a ``torch.save`` pickle) holds, by key;
    other values (e.g. ``code``) are left out. Nothing is unpickled or imported."""
    obj = walk(data, label)
    if not isinstance(obj, dict):
        raise HeaderError(f"{label}: data.pkl holds {type(obj).__name__}, not a dict")
    out = {}
    for k, v in obj.items():
        t = tensor_meta(v, label, str(k))
        if t is not None:
            out[str(k)] = t
    return out
