"""The per-file work of an ingest: load safely, validate, compute the file's statistics.

A unit is a file in any of the formats of :mod:`kernelscale.formats`, a pair of ``.npy``
files, or a block of runs of a Zarr group; each becomes one manifest entry.

:func:`convert` is pure (it touches no store), so it can run on any worker process; the
single writer then commits its result (:meth:`kernelscale.store.Store.commit_file`) in
source order. ``convert_or_bad`` turns a bad file into a :class:`BadFile` record, so a
worker never raises across a process boundary for what is a property of the input.
"""

from __future__ import annotations

import hashlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import BadInputError
from .formats import DEFAULT_KEYS, load_file
from .formats.numpy_io import load_npy_pair
from .formats.sniff import KIND_NAMES, sniff
from .formats.zarr_io import read_block
from .logfile import first_non_finite, sha256_file
from .sources.base import SourceFile
from .stats import LOG1P32, NonFiniteValues, RunningStats, stats_of_logits


@dataclass(frozen=True)
class ConvertSpec:
    """What every file of one ingest is converted with.

    ``expect``: the store's ``n_test``, ``n_train``, ``classes``, ``dtype`` (None before
    the store exists); ``transform``: the store's log-softmax
    (:data:`~kernelscale.stats.STORE_TRANSFORMS`); ``device``: where the statistics are
    computed (``cpu``, ``cuda``, ``cuda:N``; resolved by the caller); ``format`` and
    ``keys``: how files are read (:mod:`kernelscale.formats`).
    """

    expect: dict | None = None
    transform: str = LOG1P32
    device: str = "cpu"
    format: str = "auto"
    keys: tuple[str, str] = DEFAULT_KEYS


@dataclass
class PreparedFile:
    """A validated file ready to commit: logits (runs, examples, classes) of the file's
    dtype, and its own statistics per split (float64 (examples, classes))."""

    file: SourceFile
    sha256: str
    test: np.ndarray
    train: np.ndarray
    stats: dict[str, RunningStats]
    seconds: float = 0.0  #: the conversion's wall time
    #: manifest fields of the conversion: ``format`` (the kind read) and, of a pair of
    #: .npy files, ``parts`` (name, size, sha256 of each)
    entry: dict = field(default_factory=dict)
    #: (path, inode, size, mtime) of each local file read, taken before it was read
    stamps: list[tuple] = field(default_factory=list)

    @property
    def runs(self) -> int:
        return int(self.test.shape[0])

    def check_unchanged(self) -> None:
        """Raise :class:`BadInputError` if a file read has been replaced or rewritten
        since it was read: the logits may be memory-mapped, and its sha256 was taken
        from its bytes on the side, so a file rewritten in between (a training job still
        writing it) would be stored as a mix. Called before the data is copied into the
        store and again before the commit."""
        if _stamps(p for p, *_ in self.stamps) != self.stamps:
            raise BadInputError(f"{self.file.name}: changed while it was being ingested; "
                                "ingest it again once it is complete")


@dataclass
class BadFile:
    file: SourceFile
    reason: str
    sha256: str | None = None


def _stamps(paths) -> list[tuple]:
    """(path, inode, size, mtime in ns) of each file; a missing one has no stamp."""
    out = []
    for p in paths:
        try:
            st = Path(p).stat()
        except FileNotFoundError:
            out.append((str(p), None, None, None))
            continue
        out.append((str(p), st.st_ino, st.st_size, st.st_mtime_ns))
    return out


def _hash_files(paths: list[Path]) -> tuple[str, list[str]]:
    """(sha256 of the unit, sha256 of each file): of one file its own; of a pair of
    files that of the test file's bytes followed by the train file's."""
    if len(paths) == 1:
        d = sha256_file(paths[0])
        return d, [d]
    whole, each = hashlib.sha256(), []
    for p in paths:
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
                whole.update(chunk)
        each.append(h.hexdigest())
    return whole.hexdigest(), each


def _hash_arrays(*arrays: np.ndarray) -> tuple[str, list[str]]:
    """sha256 of the arrays' values in turn, C order, little endian (a Zarr block)."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).reshape(-1)
                 .view(np.uint8))
    return h.hexdigest(), []


def _load(path: Path, file: SourceFile, spec: ConvertSpec
          ) -> tuple[str, tuple[str, str], np.ndarray, np.ndarray]:
    """(kind, key names, test, train) of one unit, checked but for finiteness."""
    if file.runs is not None:
        test, train = read_block(path, spec.keys, *file.runs, file.name, spec.expect)
        return "zarr", spec.keys, test, train
    if file.parts:
        for p in file.parts:
            kind = sniff(p.path, p.name)
            if kind != "npy":
                what = f"; it is {KIND_NAMES[kind]}" if kind else ""
                raise BadInputError(f"{p.name}: not a NumPy .npy file{what}")
        test, train = load_npy_pair(tuple(p.path for p in file.parts),
                                    tuple(p.name for p in file.parts), file.name,
                                    spec.keys, spec.expect)
        return "npy", spec.keys, test, train
    kind, test, train = load_file(path, file.name, spec.format, spec.keys, spec.expect)
    return kind, (DEFAULT_KEYS if kind == "logpt" else spec.keys), test, train


def convert(path: Path, file: SourceFile, spec: ConvertSpec | None = None) -> PreparedFile:
    """Load, validate and summarise the local copy ``path`` of ``file`` (of a pair of
    ``.npy`` files, ``file.parts`` hold the two local paths; of a Zarr block,
    ``path`` is the group and ``file.runs`` the runs).

    ``file.sha256`` (of a pair, each part's), when the source knows it, must match the
    bytes (hashed beside the load and the statistics). Non-finite logits
    are found from the statistics (a non-finite value makes its entry's sums
    non-finite), so the common, valid file costs no pass of its own for them. Raises
    :class:`BadInputError` naming the file and the problem.
    """
    t0 = time.perf_counter()
    spec = spec or ConvertSpec()
    # The hash runs beside the load and the statistics (hashlib and torch release the
    # GIL). A file whose bytes are not the listed ones is reported as that, whatever
    # else is wrong with it.
    problem: BadInputError | None = None
    st: dict[str, RunningStats] = {}
    kind, test, train = "", None, None
    paths = [p.path for p in file.parts] if file.parts else [path]
    stamps = _stamps(paths) if file.runs is None else []
    with ThreadPoolExecutor(1, thread_name_prefix="kernelscale-sha256") as pool:
        hashing = pool.submit(_hash_files, paths) if file.runs is None else None
        try:
            kind, keys, test, train = _load(path, file, spec)
            if hashing is None:  # a Zarr block: the hash of its values
                hashing = pool.submit(_hash_arrays, test, train)
            for split, key, a in (("test", keys[0], test), ("train", keys[1], train)):
                try:
                    st[split] = stats_of_logits(a, spec.transform, spec.device)
                except NonFiniteValues:
                    err = first_non_finite(file.name, key, a)
                    raise err or BadInputError(f"{file.name}: {key!r} overflows the "
                                               "log-softmax (logits too large for float32)"
                                               ) from None
        except BadInputError as e:
            problem = e
        digest, each = None, []
        if hashing is not None:
            try:
                digest, each = hashing.result()
            except OSError as e:
                raise BadInputError(f"{file.name}: cannot read ({e.strerror})") from None
    for part, d in zip(file.parts, each, strict=False):
        if part.sha256 is not None and d != part.sha256:
            raise BadInputError(f"{part.name}: sha256 mismatch (expected {part.sha256}, got "
                                f"{d}); the file is corrupt or was changed")
    if file.sha256 is not None and digest is not None and digest != file.sha256:
        raise BadInputError(f"{file.name}: sha256 mismatch (expected {file.sha256}, got "
                            f"{digest}); the file is corrupt or was changed")
    if problem is not None:
        raise problem
    entry: dict = {"format": kind}
    if file.parts:
        entry["parts"] = [{"name": p.name, "size": p.size, "sha256": d}
                          for p, d in zip(file.parts, each, strict=True)]
    prepared = PreparedFile(file, digest, test, train, st, time.perf_counter() - t0, entry,
                            stamps)
    prepared.check_unchanged()
    return prepared


def convert_or_bad(path: Path, file: SourceFile,
                   spec: ConvertSpec | None = None) -> PreparedFile | BadFile:
    try:
        return convert(path, file, spec)
    except BadInputError as e:
        return BadFile(file, str(e))
