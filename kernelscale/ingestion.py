"""Ingest: the files of a source -> validated, converted, folded into the store.

Work per file is split in two so it can run in parallel:

* :func:`~kernelscale.convert.convert` (pure, any worker): load safely, validate
  completely, compute the file's own log-softmax statistics. Nothing touches the store.
* :meth:`Store.commit_file` (single writer, in source order): append the runs, merge the
  statistics (Chan), replace the manifest.

Because conversion is pure and commits happen in sorted source order, a parallel ingest
produces the same store as a serial one. The source is any :class:`~kernelscale.sources.Source`
(:func:`~kernelscale.sources.open_source` picks it from the spec; a local Zarr group is a
:class:`~kernelscale.sources.zarrgroup.ZarrSource`, and ``.npy`` files are paired by
:class:`~kernelscale.sources.pairs.PairedSource`). Files are read in the ``--format``
asked (:mod:`kernelscale.formats`; ``auto``: by their content).
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from .convert import BadFile, ConvertSpec, PreparedFile
from .device import device_name
from .errors import BadInputError, ConfigError, KernelscaleError
from .formats import DEFAULT_KEYS, FORMATS, check_keys, is_zarr_group
from .ingestcheck import check_labels, check_unchanged, record_labels
from .parallel import Preparer, parallel_preparer
from .progress import progress
from .runcount import RunCounter
from .sources import FetchOptions, Source, SourceFile, is_local_spec, open_source
from .sources.pairs import PairedSource
from .sources.zarrgroup import ZarrSource
from .stats import LOG1P32
from .store import Store
from .units import format_bytes


class DuplicateFileWarning(UserWarning):
    """A file with the same sha256 as an ingested one was skipped."""


@dataclass
class IngestConfig:
    """Everything one ingest needs. ``source``: a directory, an ``hf://`` spec, or a
    Zarr group."""

    source: str | os.PathLike
    store: str | os.PathLike
    glob: str = "**/log.pt"  #: which files under the source (not for a Zarr group)
    format: str = "auto"  #: auto, logpt, safetensors, npy, zarr (kernelscale.formats)
    keys: tuple[str, str] = DEFAULT_KEYS  #: names of the test and train arrays
    max_files: int | None = None  #: the first N matching files
    max_runs: int | None = None  #: stop before a file taking the store past N runs
    skip_bad: bool = False  #: record bad files as rejected and go on
    run_chunk: int | None = None  #: runs per store chunk (new stores only)
    shape: tuple[int, int, int] | None = None  #: (n_test, n_train, classes) every file has
    workers: int | None = None  #: dask worker processes converting files (1: none)
    scheduler: str | None = None  #: address of a running dask scheduler instead
    converters: int = 2  #: threads converting files in this process (any source)
    device: str = "auto"  #: where statistics are computed: auto, cpu, cuda, cuda:N
    fetch: FetchOptions = field(default_factory=FetchOptions)  #: remote sources
    show_progress: bool = True
    #: labels to record in the store (a spec of :func:`kernelscale.labels.load_labels`)
    labels: str | None = None
    labels_replace: bool = False  #: replace other labels the store holds

    def validate(self) -> None:
        for key in ("max_files", "max_runs", "run_chunk", "workers", "converters"):
            v = getattr(self, key)
            if v is not None and v < 1:
                raise ConfigError(f"--{key.replace('_', '-')} must be >= 1, not {v}")
        if self.format not in FORMATS:
            raise ConfigError(f"--format {self.format!r}: expected one of "
                              f"{', '.join(FORMATS)}")
        self.keys = check_keys(self.keys)
        if self.format == "zarr" and not is_local_spec(self.source):
            raise ConfigError(f"{self.source}: --format zarr reads a local Zarr group; a Hub "
                              "source holds files (logpt, safetensors, npy)")
        g = PurePosixPath(self.glob)
        if g.is_absolute() or ".." in g.parts or not self.glob.strip():
            raise ConfigError(f"--glob {self.glob!r}: must be a pattern inside SOURCE "
                              "(relative, without '..')")
        if not is_local_spec(self.source) and (self.scheduler or (self.workers or 1) > 1):
            # dask workers would hold files downloaded ahead past the documented disk
            # bound, and a remote scheduler's workers cannot read this host's cache
            raise ConfigError(f"{self.source}: --workers/--scheduler convert local folders "
                              "only; a Hub source downloads with --download-workers")


@dataclass
class IngestSummary:
    files_ingested: int = 0
    files_skipped: int = 0
    files_rejected: int = 0
    runs_added: int = 0
    runs_total: int = 0
    bytes_read: int = 0
    seconds: float = 0.0
    t_wait: float = 0.0  #: the writer waiting for the next converted file
    t_convert: float = 0.0  #: conversion, summed over the converters
    t_commit: float = 0.0  #: the writer committing (chunk writes, statistics, manifest)
    converters: int = 1
    device: str = "cpu"
    bytes_downloaded: int = 0  #: remote sources
    labels: str = ""  #: what became of --labels: recorded, unchanged, replaced
    errors: list[str] = field(default_factory=list)

    def bottleneck(self) -> str:
        """What bounded the ingest: the commits (disk writes), the conversion (loads,
        hashes, statistics) or getting the files (the download, or reading them)."""
        if self.seconds <= 0 or self.files_ingested == 0:
            return "none"
        busy = self.t_convert / max(1, self.converters)
        if self.t_commit >= self.t_wait:
            return "commit"
        if busy >= 0.8 * (self.t_wait + self.t_commit):  # converters never idle
            return "conversion"
        return "download" if self.bytes_downloaded else "reading the files"

    def line(self) -> str:
        return (f"ingest: {self.files_ingested} file(s) ingested, {self.files_skipped} "
                f"skipped, {self.files_rejected} rejected; runs +{self.runs_added} = "
                f"{self.runs_total}; {format_bytes(self.bytes_read)} in {self.seconds:.1f} s "
                f"({_rate(self.bytes_read, self.seconds)}); "
                + (f"download {_rate(self.bytes_downloaded, self.seconds)}, "
                   if self.bytes_downloaded else "")
                + f"convert {_rate(self.bytes_read, self.t_convert / self.converters)} "
                f"x{self.converters} on {self.device}, commit "
                f"{_rate(self.bytes_read, self.t_commit)}; "
                f"bottleneck: {self.bottleneck()}"
                + (f"; labels {self.labels}" if self.labels else ""))


def _expect(store: Store | None) -> dict | None:
    if store is None:
        return None
    s = store.shape
    return {"n_test": s.n_test, "n_train": s.n_train, "classes": s.classes, "dtype": s.dtype}


def ingest(cfg: IngestConfig, *, source: Source | None = None,
           preparer: Preparer | None = None, endpoint: str | None = None,
           token: str | bool | None = None, retry_wait: float = 1.0) -> IngestSummary:
    """Ingest the files of ``cfg.source`` matching ``cfg.glob``, in sorted order.

    ``source``: an opened source to use instead of ``cfg.source``; ``preparer``: how files
    are converted (default: from ``cfg.workers``/``cfg.scheduler``); ``endpoint``,
    ``token``, ``retry_wait``: for the Hub client. Files whose manifest name is already in
    the store are neither fetched nor ingested again; see :func:`ingest_files`.
    """
    cfg.validate()
    # before any download: labels that do not fit, or conflict, fail at once
    labels = (check_labels(cfg.labels, cfg.store, shape=cfg.shape,
                           replace=cfg.labels_replace)[0] if cfg.labels else None)
    src = _paired(source, cfg) if source is not None else open_ingest_source(
        cfg, endpoint=endpoint, token=token, retry_wait=retry_wait)
    try:
        files = list_ingest_files(src, cfg)
        check_unchanged(Path(cfg.store), files, src)
        if labels is not None and cfg.shape is None and not Store.exists(cfg.store):
            # a new store: its shape is the first file's; its header tells it now
            counter = RunCounter(src, probe=1, keys=cfg.keys, every_file=True)
            _, first = counter.count(files[:1])
            if first is not None:
                check_labels(cfg.labels, cfg.store, shape=first.dims)
        if preparer is not None:
            summary = ingest_files(src, files, cfg, preparer)
        else:
            with parallel_preparer(cfg.workers, cfg.scheduler,
                                   converters=cfg.converters) as prep:
                summary = ingest_files(src, files, cfg, prep)
    finally:
        src.close()
    if labels is not None:
        summary.labels = record_labels(cfg.labels, labels, cfg.store,
                                       replace=cfg.labels_replace)
    return summary


def open_ingest_source(cfg: IngestConfig, **hub: object) -> Source:
    """The source of ``cfg``: a Zarr group for ``--format zarr`` (or ``auto`` when SOURCE
    is one), else the folder or Hub repo :func:`open_source` names, its ``.npy`` files
    paired (``auto``, ``npy``). Opening creates nothing."""
    if cfg.format == "zarr" or (cfg.format == "auto" and is_local_spec(cfg.source)
                                and is_zarr_group(cfg.source)):
        return ZarrSource(cfg.source, cfg.keys)
    return _paired(open_source(cfg.source, cfg.fetch, **hub), cfg)


def _paired(src: Source, cfg: IngestConfig) -> Source:
    """``src`` with its ``.npy`` files paired by name, for ``--format auto`` and ``npy``."""
    if cfg.format in ("auto", "npy") and not isinstance(src, ZarrSource | PairedSource):
        return PairedSource(src, cfg.keys)
    return src


def list_ingest_files(src: Source, cfg: IngestConfig) -> list[SourceFile]:
    """The files of ``src`` an ingest of ``cfg`` takes (``glob``, ``max_files``); none is
    an error."""
    files = src.list(cfg.glob)
    if not files:
        raise KernelscaleError(f"{src}: no files match {cfg.glob!r}" + (
            " (files of other names: --glob, e.g. '**/*.safetensors')"
            if cfg.glob == IngestConfig.glob else ""))
    return files[:cfg.max_files] if cfg.max_files is not None else files


def ingest_files(src: Source, files: list[SourceFile], cfg: IngestConfig,
                 preparer: Preparer) -> IngestSummary:
    """Ingest ``files`` of ``src`` (in the given order) into the store ``cfg.store``.

    ``cfg.shape``: (n_test, n_train, classes) every file must have (optional; a store that
    exists must have it too). The store is created from the first valid file when it does
    not exist yet. Files whose manifest name is already present are skipped silently;
    files whose sha256 is already present are skipped with a
    :class:`DuplicateFileWarning`. A bad file raises :class:`BadInputError` (files
    committed before it stay) unless ``cfg.skip_bad``, which records it in the manifest's
    rejected list and continues; the summary then carries the errors and the caller
    exits non-zero.
    """
    t0 = time.monotonic()
    store_path = Path(cfg.store)
    device = device_name(cfg.device)
    summary = IngestSummary(device=device, converters=(
        cfg.converters if not cfg.scheduler and (cfg.workers or 1) == 1 else
        cfg.workers or 1))
    store = Store.open(store_path, mode="a") if Store.exists(store_path) else None
    expect = _expect(store)
    if cfg.shape is not None:
        want = dict(zip(("n_test", "n_train", "classes"), cfg.shape, strict=True))
        if expect is not None and any(expect[k] != v for k, v in want.items()):
            raise BadInputError(f"{store_path}: holds (n_test, n_train, classes) = "
                                f"{(expect['n_test'], expect['n_train'], expect['classes'])}, "
                                f"not the expected {tuple(cfg.shape)}")
        expect = expect or {**want, "holder": "the declared shape has"}
    known = store.known_names() if store else set()
    todo = [f for f in files if f.name not in known]
    summary.files_skipped = len(files) - len(todo)
    # Names no file of a store may have (a Hub path with '..' segments): refused before
    # any download, recorded as rejected with --skip-bad.
    early_bad: list[BadFile] = []
    unsafe = {f.name: why for f in todo if (why := src.name_problem(f))}
    for f in [f for f in todo if f.name in unsafe]:
        reason = f"{f.name}: {unsafe[f.name]}"
        if not cfg.skip_bad:
            raise BadInputError(f"{src}: {reason}")
        todo.remove(f)
        summary.files_rejected += 1
        summary.errors.append(reason)
        if store is None:
            early_bad.append(BadFile(f, reason))
        else:
            with store.writer():
                store.record_rejected(f.name, reason)
    bar = progress(sum(f.size for f in todo), "ingest", "B", unit_scale=True,
                   enabled=cfg.show_progress)
    record = src.record(cfg.glob)
    # Without a store yet, nothing is expected of the files: the first good one fixes
    # the shape and the rest are checked against it below.
    handed: list = []

    def tracked():
        for f in src.fetch(todo):
            handed.append(f)
            yield f

    fetching = tracked()
    spec = ConvertSpec(expect, store.transform if store else LOG1P32, device, cfg.format,
                       cfg.keys)
    stream = preparer(fetching, spec)
    try:
        while True:
            t_wait = time.perf_counter()
            nxt = next(stream, None)
            summary.t_wait += time.perf_counter() - t_wait
            if nxt is None:
                break
            fetched, item = nxt
            t_commit = time.perf_counter()
            bar.update(item.file.size)
            summary.bytes_read += item.file.size
            if store is not None and isinstance(item, PreparedFile):
                problem = _shape_problem(store, item)
                if problem:
                    item = BadFile(item.file, f"{item.file.name}: {problem}", item.sha256)
            if isinstance(item, BadFile):
                src.release(fetched, bad=True)
                summary.files_rejected += 1
                summary.errors.append(item.reason)
                if not cfg.skip_bad:
                    raise BadInputError(item.reason)
                if store is None:  # recorded once a good file has created the store
                    early_bad.append(item)
                else:
                    with store.writer():
                        store.record_rejected(item.file.name, item.reason, item.sha256)
                continue
            if (cfg.max_runs is not None
                    and (store.runs if store else 0) + item.runs > cfg.max_runs):
                print(f"ingest: stopping before {item.file.name}: it would take the store "
                      f"past --max-runs {cfg.max_runs}", file=sys.stderr)
                src.release(fetched)
                break
            if store is None:
                store = Store.create(store_path, n_test=item.test.shape[1],
                                     n_train=item.train.shape[1], classes=item.test.shape[2],
                                     dtype=str(item.test.dtype), run_chunk=cfg.run_chunk,
                                     file_runs=item.runs, transform=spec.transform)
                with store.writer():
                    for bad in early_bad:
                        store.record_rejected(bad.file.name, bad.reason, bad.sha256)
            with store.writer():
                dup = store.known_sha256().get(item.sha256)
                if dup is not None:
                    warnings.warn(f"{item.file.name}: same sha256 as already ingested "
                                  f"{dup}; skipped", DuplicateFileWarning, stacklevel=2)
                    summary.files_skipped += 1
                    src.release(fetched)
                    continue
                store.record_source(record)
                entry = {"name": item.file.name, "sha256": item.sha256,
                         "size": item.file.size, **src.entry(item.file), **item.entry}
                item.check_unchanged()
                store.commit_file(entry, item.test, item.train, item.stats,
                                  before_commit=item.check_unchanged)
            src.release(fetched)
            summary.files_ingested += 1
            summary.runs_added += item.runs
            summary.t_convert += item.seconds
            summary.t_commit += time.perf_counter() - t_commit
            dl = int(getattr(src, "bytes_downloaded", 0))
            bar.set_postfix_str(
                f"files {summary.files_ingested}/{len(todo)} runs {store.runs}"
                + (f" download {_rate(dl, time.monotonic() - t0)}" if dl else "")
                + f" convert {_rate(summary.bytes_read, summary.t_convert)}/thread"
                f" commit {_rate(summary.bytes_read, summary.t_commit)}")
    finally:
        # stop fetching ahead, and delete what was fetched for nothing, now
        for gen in (stream, fetching):
            close = getattr(gen, "close", None)
            if close is not None:
                close()
        for f in handed:  # converted ahead, never committed or rejected
            if not f.released:
                src.release(f)
        bar.close()
    summary.runs_total = store.runs if store else 0
    summary.bytes_downloaded = int(getattr(src, "bytes_downloaded", 0))
    summary.seconds = time.monotonic() - t0
    return summary


def _rate(nbytes: int, seconds: float) -> str:
    return f"{format_bytes(nbytes / seconds)}/s" if seconds > 0 else "-"


def _shape_problem(store: Store, item: PreparedFile) -> str | None:
    s = store.shape
    got = (item.test.shape[1], item.train.shape[1], item.test.shape[2], str(item.test.dtype))
    want = (s.n_test, s.n_train, s.classes, s.dtype)
    if got != want:
        return (f"(n_test, n_train, classes, dtype) = {got}, but the store holds {want}")
    return None
