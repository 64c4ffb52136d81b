"""Ingest: source files -> validated, converted, folded into the store one commit each.

Work per file is split in two so it can run in parallel:

* :func:`prepare` (pure, any worker): load safely, validate completely, compute the
  file's own log-softmax statistics. Nothing touches the store.
* :meth:`Store.commit_file` (single writer, in source order): append the runs, merge the
  statistics (Chan), replace the manifest.

Because preparation is pure and commits happen in sorted source order, a parallel ingest
produces the same store as a serial one.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import BadInputError, KernelscaleError
from .progress import progress
from .sources import SourceFile, list_local, load_log
from .stats import RunningStats, stats_of_logits
from .store import Store


class DuplicateFileWarning(UserWarning):
    """A file with the same sha256 as an ingested one was skipped."""


@dataclass
class PreparedFile:
    """A validated file ready to commit: logits (runs, examples, classes) and statistics."""

    source: SourceFile
    sha256: str
    test: np.ndarray
    train: np.ndarray
    stats: dict[str, RunningStats]
    extra: dict = field(default_factory=dict)

    @property
    def runs(self) -> int:
        return int(self.test.shape[0])


@dataclass
class BadFile:
    source: SourceFile
    reason: str
    sha256: str | None = None


def prepare(src: SourceFile, expect: dict | None = None,
            sha256: str | None = None) -> PreparedFile:
    """Load, validate and summarise one file; raises :class:`BadInputError`."""
    log = load_log(src.path, src.name, expect=expect, sha256=sha256)
    st = {"test": stats_of_logits(log.test), "train": stats_of_logits(log.train)}
    return PreparedFile(src, log.sha256, log.test, log.train, st)


def prepare_or_bad(src: SourceFile, expect: dict | None = None,
                   sha256: str | None = None) -> PreparedFile | BadFile:
    try:
        return prepare(src, expect, sha256)
    except BadInputError as e:
        return BadFile(src, str(e))


@dataclass
class IngestSummary:
    files_ingested: int = 0
    files_skipped: int = 0
    files_rejected: int = 0
    runs_added: int = 0
    runs_total: int = 0
    bytes_read: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    def line(self) -> str:
        gbps = self.bytes_read / self.seconds / 1e9 if self.seconds > 0 else 0.0
        return (f"ingest: {self.files_ingested} file(s) ingested, {self.files_skipped} "
                f"skipped, {self.files_rejected} rejected; runs +{self.runs_added} = "
                f"{self.runs_total}; {self.bytes_read / 1e6:.1f} MB in {self.seconds:.1f} s "
                f"({gbps:.3f} GB/s)")


Preparer = Callable[[list[SourceFile], dict | None], Iterator[PreparedFile | BadFile]]


def serial_preparer(files: list[SourceFile], expect: dict | None) -> Iterator[PreparedFile | BadFile]:
    for f in files:
        yield prepare_or_bad(f, expect)


def _expect(store: Store | None) -> dict | None:
    if store is None:
        return None
    s = store.shape
    return {"n_test": s.n_test, "n_train": s.n_train, "classes": s.classes, "dtype": s.dtype}


def ingest_files(files: Iterable[SourceFile], store_path: str | Path, *,
                 skip_bad: bool = False, run_chunk: int | None = None,
                 max_runs: int | None = None, source_record: dict | None = None,
                 preparer: Preparer | None = None, show_progress: bool = True,
                 on_committed: Callable[[PreparedFile], None] | None = None,
                 entry_extra: Callable[[SourceFile], dict] | None = None,
                 shape: tuple[int, int, int] | None = None) -> IngestSummary:
    """Ingest ``files`` (in the given order) into the store at ``store_path``.

    ``shape``: (n_test, n_train, classes) every file must have (optional; a store that
    exists must have it too). The store is created from the first valid file when it does not exist yet. Files whose
    manifest name is already present are skipped silently; files whose sha256 is already
    present are skipped with a :class:`DuplicateFileWarning`. A bad file raises
    :class:`BadInputError` (files committed before it stay) unless ``skip_bad``, which
    records it in the manifest's rejected list and continues; the summary then carries
    the errors and the caller exits non-zero.
    """
    t0 = time.monotonic()
    store_path = Path(store_path)
    summary = IngestSummary()
    store = Store.open(store_path, mode="a") if Store.exists(store_path) else None
    expect = _expect(store)
    if shape is not None:
        want = dict(zip(("n_test", "n_train", "classes"), shape, strict=True))
        if expect is not None and any(expect[k] != v for k, v in want.items()):
            raise BadInputError(f"{store_path}: holds (n_test, n_train, classes) = "
                                f"{(expect['n_test'], expect['n_train'], expect['classes'])}, "
                                f"not the expected {tuple(shape)}")
        expect = expect or {**want, "holder": "the declared shape has"}
    files = list(files)
    known = store.known_names() if store else set()
    todo = [f for f in files if f.name not in known]
    summary.files_skipped = len(files) - len(todo)
    preparer = preparer or serial_preparer
    bar = progress(sum(f.size for f in todo), "ingest", "B", unit_scale=True,
                   enabled=show_progress)
    try:
        # Without a store yet, nothing is expected of the files: the first good one fixes
        # the shape and the rest are checked against it below.
        stream: Iterator[PreparedFile | BadFile] = preparer(todo, expect)
        early_bad: list[BadFile] = []
        for item in stream:
            bar.update(item.source.size)
            summary.bytes_read += item.source.size
            if store is not None and isinstance(item, PreparedFile):
                problem = _shape_problem(store, item)
                if problem:
                    item = BadFile(item.source, f"{item.source.name}: {problem}", item.sha256)
            if isinstance(item, BadFile):
                summary.files_rejected += 1
                summary.errors.append(item.reason)
                if not skip_bad:
                    raise BadInputError(item.reason)
                if store is None:  # recorded once a good file has created the store
                    early_bad.append(item)
                else:
                    with store.writer():
                        store.record_rejected(item.source.name, item.reason, item.sha256)
                continue
            if max_runs is not None and (store.runs if store else 0) + item.runs > max_runs:
                print(f"ingest: stopping before {item.source.name}: it would take the store "
                      f"past --max-runs {max_runs}", file=sys.stderr)
                break
            if store is None:
                store = Store.create(store_path, n_test=item.test.shape[1],
                                     n_train=item.train.shape[1], classes=item.test.shape[2],
                                     dtype=str(item.test.dtype), run_chunk=run_chunk)
                with store.writer():
                    for bad in early_bad:
                        store.record_rejected(bad.source.name, bad.reason, bad.sha256)
            with store.writer():
                dup = store.known_sha256().get(item.sha256)
                if dup is not None:
                    warnings.warn(f"{item.source.name}: same sha256 as already ingested "
                                  f"{dup}; skipped", DuplicateFileWarning, stacklevel=2)
                    summary.files_skipped += 1
                    continue
                if source_record:
                    store.record_source(source_record)
                entry = {"name": item.source.name, "sha256": item.sha256,
                         "size": item.source.size, **item.extra}
                if entry_extra:
                    entry.update(entry_extra(item.source))
                store.commit_file(entry, item.test, item.train, item.stats)
                if any(r["name"] == item.source.name for r in store.manifest["rejected"]):
                    store.manifest["rejected"] = [r for r in store.manifest["rejected"]
                                                  if r["name"] != item.source.name]
            summary.files_ingested += 1
            summary.runs_added += item.runs
            bar.set_postfix_str(f"files {summary.files_ingested}/{len(todo)} runs {store.runs}")
            if on_committed:
                on_committed(item)
    finally:
        bar.close()
    summary.runs_total = store.runs if store else 0
    summary.seconds = time.monotonic() - t0
    return summary


def _shape_problem(store: Store, item: PreparedFile) -> str | None:
    s = store.shape
    got = (item.test.shape[1], item.train.shape[1], item.test.shape[2], str(item.test.dtype))
    want = (s.n_test, s.n_train, s.classes, s.dtype)
    if got != want:
        return (f"(n_test, n_train, classes, dtype) = {got}, but the store holds {want}")
    return None


def ingest_local(source: str | Path, store_path: str | Path, *, glob: str = "**/log.pt",
                 max_files: int | None = None, **kw) -> IngestSummary:
    """Ingest every ``glob`` match under the directory ``source`` in sorted path order."""
    files = list_local(source, glob)
    if not files:
        raise KernelscaleError(f"{source}: no files match {glob!r}")
    if max_files is not None:
        files = files[:max_files]
    return ingest_files(files, store_path,
                        source_record={"kind": "local", "path": str(Path(source).resolve())},
                        **kw)
