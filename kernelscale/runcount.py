"""The runs of input files, found from their headers without reading their arrays, and
how.

Each count says which method gave it (:data:`METHODS`):

``header``  the arrays' shapes in the file's header (:mod:`kernelscale.formats.headers`):
            a ``log.pt``'s pickle (``data.pkl``, a few hundred bytes near the start of
            the zip; its opcodes are decoded, never unpickled), a safetensors file's JSON
            header, the ``.npy`` header of each ``.npz`` member (of a compressed member,
            its first deflated block) or of each file of a ``.npy`` pair. Every file of
            those formats that is read is read so; of ``log.pt`` files, the first read of
            a group, which gives the group's shape unless one is given (a header declaring
            more bytes than its storage holds is not believed).
``zip``     a ``log.pt``'s storage sizes in its zip directory (its last KiB) divided by
            the bytes of one run of the shape: ``size(data/K) / (n x classes x
            itemsize)`` for both tensors, which must agree.
``size``    the file's size, less the bytes around the arrays that the files of its
            format (name suffix) read had, divided by the bytes of one run (files past
            the probe, or not readable), only where that leaves whole runs.
``array``   the array shape in a Zarr group's metadata (``zarr.json`` or ``.zarray`` of
            its two arrays), or of a Zarr source's block.

Which units are read: ``*.pt``, ``*.safetensors`` and ``*.npz`` files, pairs of ``.npy``
files (:func:`~kernelscale.sources.pairs.pair_npy`) and the two arrays' metadata of a
Zarr group, or every unit given (``every_file``: an ingest's files, whatever their
names); the format is then decided by the file's first bytes, as ``--format auto`` does.
Other files are left out (method ``n/a``).

A remote file is read by ranged requests (:meth:`~kernelscale.sources.Source.open_lazy`),
at most :data:`MAX_READ_BYTES` per file: about 16 KiB for a zip directory and one request
more for a ``log.pt``'s header or each ``.npz`` member; one at the start for a
safetensors or ``.npy`` header; a Zarr metadata document whole.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from .errors import BadInputError, KernelscaleError, MissingKeysError
from .formats.common import DEFAULT_KEYS
from .formats.headers import Header, logpt_header, read_header, read_pair_header, zarr_header
from .formats.torchzip import ITEMSIZE, HeaderError, read_directory
from .formats.zarr_io import MAX_METADATA_BYTES
from .sources import Source, SourceFile
from .sources.ranged import RangedFile

METHODS = {
    "header": "the arrays' shapes in the file's header (a log.pt's pickle, decoded, never "
              "unpickled; a safetensors JSON header; the .npy headers of an .npz's members "
              "or of a .npy pair)",
    "zip": "a log.pt's storage sizes in its zip directory / the bytes of one run",
    "size": "the file's size, less the overhead the files read had, / the bytes of one run",
    "array": "the array shape in a Zarr group's metadata (zarr.json, .zarray), or of a "
             "Zarr source's block",
}
#: units per folder whose headers are read by default
DEFAULT_PROBE = 100
#: bytes by which the overhead around the tensors may differ between files of a folder
#: (the pickle's integers and strings, the zip's alignment padding)
SIZE_SLACK = 256
#: the most bytes read of one remote file to learn its runs
MAX_READ_BYTES = 16 << 20
#: names of the files holding both splits that are read (others: only with every_file)
NAMES = (".pt", ".safetensors", ".npz")
_ZARR_METADATA = ("/zarr.json", "/.zarray")


@dataclass(frozen=True)
class RunShape:
    """(n_test, n_train, classes, dtype) of a folder's files; ``origin`` says where it
    came from; ``keys``: the storages of a ``log.pt``'s ``logits`` and ``logits_train``
    when a header named them."""

    n_test: int
    n_train: int
    classes: int
    dtype: str
    origin: str
    keys: tuple[str, str] | None = None
    #: the dtype is the store's, which every file must have (else: assumed until read)
    fixed_dtype: bool = False

    @property
    def dims(self) -> tuple[int, int, int]:
        return self.n_test, self.n_train, self.classes

    def per_run(self, split: str = "both") -> int:
        n = {"test": self.n_test, "train": self.n_train}.get(split,
                                                             self.n_test + self.n_train)
        return n * self.classes * ITEMSIZE.get(self.dtype, 2)

    def as_json(self) -> dict:
        return {"n_test": self.n_test, "n_train": self.n_train, "classes": self.classes,
                "dtype": self.dtype, "from": self.origin}

    def text(self) -> str:
        return (f"{self.n_test} test x {self.n_train} train x {self.classes} classes "
                f"{self.dtype} ({self.origin})")


@dataclass
class FileRuns:
    """One unit: its name, bytes, runs (None: unknown), the method that gave them, and
    its number of files (2: a pair of ``.npy`` files, a Zarr group's two metadata
    documents)."""

    name: str
    size: int
    runs: int | None = None
    method: str = ""
    note: str = ""
    files: int = 1

    def as_json(self) -> dict:
        return dataclasses.asdict(self)


def unit_kind(f: SourceFile, every_file: bool = False) -> str | None:
    """How the runs of ``f`` are read: ``logpt`` (a ``.pt``: its zip directory first),
    ``npy`` (a pair), ``zarr`` (a Zarr group's metadata), ``file`` (any other file
    holding both splits, by its first bytes); None: not read (see the module docstring)."""
    if f.parts:
        return "zarr" if f.parts[0].name.endswith(_ZARR_METADATA) else "npy"
    if f.name.endswith(".pt"):
        return "logpt"
    if f.name.endswith(NAMES) or every_file:
        return "file"
    return None


def method_counts(files: list[FileRuns]) -> dict[str, int]:
    """How many units each method gave the runs of (``unknown``: none did; units that
    are not read, ``n/a``, are left out)."""
    c = Counter(f.method if f.runs is not None else "unknown" for f in files
                if f.method != "n/a")
    return {m: c[m] for m in (*METHODS, "unknown") if c[m]}


def methods_text(files: list[FileRuns]) -> str:
    return ", ".join(f"{m} {n}" for m, n in method_counts(files).items()) or "-"


def known_runs(files: list[FileRuns]) -> int | None:
    """The runs of the files whose runs are known (None: of none)."""
    runs = [f.runs for f in files if f.runs is not None]
    return sum(runs) if runs else None


class RunCounter:
    """Counts the runs of a source's units by the methods above, reading at most
    ``probe`` units per call (None: all); remembers the files and bytes read, the
    requests made, and notes. ``keys``: the (test, train) names of every format but
    ``log.pt``; ``every_file``: read every unit given, whatever its name."""

    def __init__(self, src: Source, probe: int | None = DEFAULT_PROBE,
                 keys: tuple[str, str] = DEFAULT_KEYS, every_file: bool = False) -> None:
        self.src = src
        self.probe = probe
        self.keys = keys
        self.every_file = every_file
        self.files_read = 0
        self.candidates = 0  #: files of the units that may hold runs, read or not
        self.requests = 0
        self.bytes_read = 0
        self.notes: list[str] = []
        self._no_header = False  # a header was not readable: the storages' sizes only

    def count(self, files: list[SourceFile],
              shape: RunShape | None = None) -> tuple[list[FileRuns], RunShape | None]:
        """The runs of ``files`` (sorted; of one folder or store: one shape), and the
        shape used: ``shape`` when given, else the first header read."""
        out = [FileRuns(f.name, f.size, files=len(f.parts) or 1) for f in files]
        read = 0
        if shape is None and any(f.runs is not None for f in files) and \
                hasattr(self.src, "array_shape"):
            shape = RunShape(*self.src.array_shape(), "the group's arrays")
        by_size = []  # units past the probe, or whose header could not be read
        for f, r in zip(files, out, strict=True):
            kind = unit_kind(f, self.every_file)
            if f.runs is not None:
                r.runs, r.method = f.runs[1] - f.runs[0], "array"
                continue
            if kind is None:
                r.method = "n/a"
                continue
            self.candidates += r.files
            if self.probe is None or read < self.probe:
                read += 1
                shape, unread = self._probe(f, r, shape, kind)
                if not unread:
                    continue
            if kind == "zarr":  # its metadata's size says nothing of its runs
                r.note = r.note or f"past --probe {self.probe}: not read"
            else:
                by_size.append(r)
        if shape is not None:
            self._by_size(out, by_size, shape)
        return out, shape

    @contextlib.contextmanager
    def _opened(self, f: SourceFile) -> Iterator[BinaryIO]:
        """``f`` open lazily (a remote file: by ranged requests, at most
        :data:`MAX_READ_BYTES`), its requests and bytes counted when it is closed."""
        fh = self.src.open_lazy(f)
        if isinstance(fh, RangedFile):
            fh.limit = MAX_READ_BYTES
        self.files_read += 1
        try:
            yield fh
        finally:
            self.requests += getattr(fh, "requests", 0)
            self.bytes_read += getattr(fh, "bytes_fetched", 0)
            fh.close()

    def _probe(self, f: SourceFile, r: FileRuns, shape: RunShape | None,
               kind: str) -> tuple[RunShape | None, bool]:
        """Read ``f``'s headers; the shape, and whether the unit could not be read."""
        label = self.src.label(f.name)
        try:
            if kind == "logpt":
                return self._log(f, r, shape, label), False
            return self._use(self._header(f, kind, label), f, r, shape), False
        except NotImplementedError:
            r.note = "the source cannot read part of a file"
            return shape, True
        except (KernelscaleError, OSError) as e:
            if isinstance(e, MissingKeysError) and not self.every_file:
                r.method = "n/a"  # another file (labels, say), not logits
                r.note = f"no arrays {self.keys[0]!r} and {self.keys[1]!r}: not logits"
                return shape, False
            r.note = f"not read: {_one_line(e)}"
            self.notes.append(f"{f.name}: {r.note}")
            # a file its header refuses has no runs to guess; one the reader could not
            # reach (HTTP, ranges) or decode (a log.pt's pickle) is counted by its size
            refused = isinstance(e, BadInputError) and not isinstance(e, HeaderError)
            return shape, not refused

    def _header(self, f: SourceFile, kind: str, label: str) -> Header:
        """The header of a unit that is not a ``.pt`` file."""
        if kind == "npy":
            test, train = f.parts
            with self._opened(test) as a, self._opened(train) as b:
                return read_pair_header((a, test.size, self.src.label(test.name)),
                                        (b, train.size, self.src.label(train.name)),
                                        label, self.keys)
        if kind == "zarr":
            docs = []
            for p in f.parts:
                lab = self.src.label(p.name)
                if p.size > MAX_METADATA_BYTES:
                    raise BadInputError(f"{lab}: Zarr metadata of {p.size} bytes, more than "
                                        f"the {MAX_METADATA_BYTES} read for one array")
                with self._opened(p) as fh:
                    docs.append((fh.read(MAX_METADATA_BYTES + 1), lab))
            return zarr_header(docs[0], docs[1], label, self.keys)
        with self._opened(f) as fh:
            return read_header(fh, f.size, label, self.keys)

    def _log(self, f: SourceFile, r: FileRuns, shape: RunShape | None,
             label: str) -> RunShape | None:
        """A ``.pt`` file: its zip directory, and (until one is read) its pickle header;
        a ``.pt`` that is no torch zip by its header in whatever format it is."""
        with self._opened(f) as fh:
            try:
                zf, tz = read_directory(fh, label)
            except HeaderError:
                fh.seek(0)
                return self._use(read_header(fh, f.size, label, self.keys), f, r, shape)
            if shape is None or (shape.keys is None and not self._no_header):
                try:
                    return self._use(logpt_header(zf, tz, label), f, r, shape)
                except HeaderError as e:
                    if shape is None:
                        raise
                    self._no_header = True  # the declared shape, by the storages' sizes
                    self.notes.append(f"{f.name}: {_one_line(e)}")
            r.runs = runs_of_storages(tz.storages, shape)
            r.method = "zip" if r.runs is not None else ""
            if r.runs is None:
                r.note = (f"storages of {sorted(tz.storages.values())} bytes are not "
                          f"whole runs of {shape.dims} {shape.dtype}")
            return shape

    @staticmethod
    def _use(h: Header, f: SourceFile, r: FileRuns,
             shape: RunShape | None) -> RunShape | None:
        """``r``'s runs from the header ``h`` when it has the group's shape; the shape."""
        mine = RunShape(h.test.shape[1], h.train.shape[1], h.test.shape[2], h.test.dtype,
                        f"header of {f.name}", h.storages)
        if shape is not None and (shape.dims != mine.dims or (
                shape.fixed_dtype and shape.dtype != mine.dtype)):
            r.note = (f"(n_test, n_train, classes, dtype) = {(*mine.dims, mine.dtype)}, not "
                      f"the expected {(*shape.dims, shape.dtype)}")
            return shape
        r.runs, r.method = h.runs, "array" if h.kind == "zarr" else "header"
        if shape is None:
            return mine
        return dataclasses.replace(shape, keys=mine.keys or shape.keys, dtype=mine.dtype)

    @staticmethod
    def _by_size(out: list[FileRuns], todo: list[FileRuns], shape: RunShape) -> None:
        """Runs of the units ``todo`` of ``out`` from their sizes (``size`` above), by the
        overhead that the units read of their format (name suffix) had."""
        per = shape.per_run()
        overheads: dict[str, list[int]] = {}
        for r in out:
            if r.method in ("header", "zip") and r.runs is not None:
                overheads.setdefault(_family(r.name), []).append(r.size - r.runs * per)
        for r in todo:
            seen = overheads.get(_family(r.name))
            if not seen:
                if r.size >= per:
                    r.runs, r.method = r.size // per, "size"
                    r.note = "; ".join(x for x in (r.note, "no file read: the overhead "
                                                   "taken as under one run") if x)
                continue
            lo, hi = min(seen), max(seen)
            slack = hi - lo + SIZE_SLACK
            mid = (lo + hi) / 2
            runs = round((r.size - mid) / per)
            if per > 2 * slack and runs >= 1 and abs(r.size - mid - runs * per) <= slack:
                r.runs, r.method = runs, "size"
            else:
                r.note = "; ".join(x for x in (r.note, f"{r.size} bytes are not whole runs "
                                                          f"of {shape.dims}") if x)


def _family(name: str) -> str:
    """Units whose overhead around the arrays is alike: those of one name suffix."""
    return name.rsplit(".", 1)[-1]


def runs_of_storages(storages: dict[str, int], shape: RunShape) -> int | None:
    """Runs of a file whose storages have these sizes (bytes by key), when both tensors
    agree on one count (``zip`` above); None otherwise."""
    per_test, per_train = shape.per_run("test"), shape.per_run("train")

    def runs(pairs) -> int | None:
        found = set()
        for kt, kr in pairs:
            st, sr = storages[kt], storages[kr]
            if st % per_test == 0 and sr % per_train == 0 and \
                    st // per_test == sr // per_train > 0:
                found.add(st // per_test)
        return found.pop() if len(found) == 1 else None

    if shape.keys is not None and all(k in storages for k in shape.keys):
        got = runs([shape.keys])
        if got is not None:
            return got
    if len(storages) == 2:  # the keys of another file's header, or none: either order
        a, b = sorted(storages)
        return runs([(a, b), (b, a)])
    return None


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__
