"""The runs of ``log.pt`` files, found without reading their tensors, and how.

Each count says which method gave it (:data:`METHODS`):

``header``  the tensors' shapes in the file's pickle header (``data.pkl``, a few
            hundred bytes near the start of the zip; its opcodes are decoded, never
            unpickled: :mod:`kernelscale.formats.torchzip`). The first file read of a
            group is read so and gives the group's shape, unless one is given; a header
            declaring more bytes than its storage holds is not believed.
``zip``     the storage sizes in the file's zip directory (its last KiB) divided by the
            bytes of one run of the shape: ``size(data/K) / (n x classes x itemsize)`` for
            both tensors, which must agree.
``size``    the file's size, less the bytes around the tensors that the files read had,
            divided by the bytes of one run (files past the probe, or not readable), only
            where that leaves whole runs.
``array``   the array shape of a Zarr group's block.

A remote file is read by ranged requests (:meth:`~kernelscale.sources.Source.open_lazy`):
about 16 KiB for the zip directory and one request more for a header. Files that are not
``.pt`` are left out (method ``n/a``); ``.pt`` files not in the zip format are unknown.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import dataclass

from .errors import KernelscaleError
from .formats.torchzip import ITEMSIZE, HeaderError, read_directory, read_pickle
from .sources import Source, SourceFile

METHODS = {
    "header": "the tensors' shapes in the file's pickle header (decoded, never unpickled)",
    "zip": "the storage sizes in the file's zip directory / the bytes of one run",
    "size": "the file's size, less the overhead the files read had, / the bytes of one run",
    "array": "the array shape of a Zarr group's block",
}
#: files per folder whose zip directory is read by default
DEFAULT_PROBE = 100
#: bytes by which the overhead around the tensors may differ between files of a folder
#: (the pickle's integers and strings, the zip's alignment padding)
SIZE_SLACK = 256


@dataclass(frozen=True)
class RunShape:
    """(n_test, n_train, classes, dtype) of a folder's files; ``origin`` says where it
    came from; ``keys``: the storages of ``logits`` and ``logits_train`` when a header
    named them."""

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
    """One file: its name, bytes, runs (None: unknown) and the method that gave them."""

    name: str
    size: int
    runs: int | None = None
    method: str = ""
    note: str = ""

    def as_json(self) -> dict:
        return dataclasses.asdict(self)


def is_log(f: SourceFile) -> bool:
    """Whether ``f`` may be a ``log.pt`` (a ``.pt`` file, not a pair of ``.npy`` files)."""
    return f.name.endswith(".pt") and not f.parts


def method_counts(files: list[FileRuns]) -> dict[str, int]:
    """How many files each method gave the runs of (``unknown``: none did; files that
    are not ``log.pt`` are left out)."""
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
    """Counts the runs of a source's files by the methods above, reading at most
    ``probe`` files per call (None: all); remembers the requests made and notes."""

    def __init__(self, src: Source, probe: int | None = DEFAULT_PROBE,
                 keys: tuple[str, str] = ("logits", "logits_train")) -> None:
        self.src = src
        self.probe = probe
        self.keys = keys
        self.files_read = 0
        self.requests = 0
        self.bytes_read = 0
        self.notes: list[str] = []
        self._no_header = False  # a header was not readable: the storages' sizes only

    def count(self, files: list[SourceFile],
              shape: RunShape | None = None) -> tuple[list[FileRuns], RunShape | None]:
        """The runs of ``files`` (sorted; of one folder or store: one shape), and the
        shape used: ``shape`` when given, else the first header read."""
        out = [FileRuns(f.name, f.size) for f in files]
        read = 0
        if shape is None and any(f.runs is not None for f in files) and \
                hasattr(self.src, "array_shape"):
            shape = RunShape(*self.src.array_shape(), "the group's arrays")
        by_size = []  # files past the probe, or whose header could not be read
        for f, r in zip(files, out, strict=True):
            if f.runs is not None:
                r.runs, r.method = f.runs[1] - f.runs[0], "array"
            elif not is_log(f):
                r.method = "n/a"
            elif self.probe is None or read < self.probe:
                read += 1
                shape, unread = self._probe(f, r, shape)
                if unread:
                    by_size.append(r)
            else:
                by_size.append(r)
        if shape is not None:
            self._by_size(out, by_size, shape)
        return out, shape

    def _probe(self, f: SourceFile, r: FileRuns,
               shape: RunShape | None) -> tuple[RunShape | None, bool]:
        """Read ``f``'s zip directory (and, until one is read, its pickle header); the
        shape, and whether the file could not be read."""
        label = self.src.label(f.name)
        try:
            fh = self.src.open_lazy(f)
        except NotImplementedError:
            r.note = "the source cannot read part of a file"
            return shape, True
        self.files_read += 1
        try:
            zf, tz = read_directory(fh, label)
            if shape is None or (shape.keys is None and not self._no_header):
                try:
                    return self._header(f, r, shape, zf, tz, label), False
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
            return shape, False
        except (KernelscaleError, OSError) as e:
            r.note = f"not read: {_one_line(e)}"
            self.notes.append(f"{f.name}: {r.note}")
            return shape, True
        finally:
            self.requests += getattr(fh, "requests", 0)
            self.bytes_read += getattr(fh, "bytes_fetched", 0)
            fh.close()

    def _header(self, f: SourceFile, r: FileRuns, shape: RunShape | None, zf, tz,
                label: str) -> RunShape | None:
        tensors = read_pickle(zf, tz, label)
        te, tr = (tensors.get(k) for k in self.keys)
        if te is None or tr is None or len(te.shape) != 3 or len(tr.shape) != 3:
            raise HeaderError(f"{label}: no 3-D tensors {self.keys[0]!r} and "
                              f"{self.keys[1]!r} in its header")
        for key, t in zip(self.keys, (te, tr), strict=True):
            need = (t.offset + math.prod(t.shape)) * ITEMSIZE.get(t.dtype, 1)
            if tz.storages.get(t.storage, -1) < need:
                raise HeaderError(f"{label}: {key!r} declares {t.shape} = {need} bytes, "
                                  f"more than its storage holds")
        if te.shape[0] != tr.shape[0] or te.shape[2] != tr.shape[2]:
            raise HeaderError(f"{label}: {self.keys[0]!r} {te.shape} and {self.keys[1]!r} "
                              f"{tr.shape} disagree on runs or classes")
        mine = RunShape(te.shape[1], tr.shape[1], te.shape[2], te.dtype,
                        f"header of {f.name}", (te.storage, tr.storage))
        if shape is not None and (shape.dims != mine.dims or (
                shape.fixed_dtype and shape.dtype != mine.dtype)):
            r.note = (f"(n_test, n_train, classes, dtype) = {(*mine.dims, mine.dtype)}, not "
                      f"the expected {(*shape.dims, shape.dtype)}")
            return shape
        r.runs, r.method = te.shape[0], "header"
        if shape is None:
            return mine
        return dataclasses.replace(shape, keys=mine.keys, dtype=mine.dtype)

    @staticmethod
    def _by_size(out: list[FileRuns], todo: list[FileRuns], shape: RunShape) -> None:
        """Runs of the files ``todo`` of ``out`` from their sizes (``size`` above)."""
        per = shape.per_run()
        overheads = [r.size - r.runs * per for r in out
                     if r.method in ("header", "zip") and r.runs is not None]
        for r in todo:
            if not overheads:
                if r.size >= per:
                    r.runs, r.method = r.size // per, "size"
                    r.note = "; ".join(x for x in (r.note, "no file read: the overhead "
                                                   "taken as under one run") if x)
                continue
            lo, hi = min(overheads), max(overheads)
            slack = hi - lo + SIZE_SLACK
            mid = (lo + hi) / 2
            runs = round((r.size - mid) / per)
            if per > 2 * slack and runs >= 1 and abs(r.size - mid - runs * per) <= slack:
                r.runs, r.method = runs, "size"
            else:
                r.note = "; ".join(x for x in (r.note, f"{r.size} bytes are not whole runs "
                                                          f"of {shape.dims}") if x)


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
