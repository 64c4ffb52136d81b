"""``kernelscale ingest --dry-run``: what an ingest would download and store, and the
disk it needs, worked out without doing any of it.

The source is opened, pinned and listed as the ingest would (a Hub repo at one commit),
the files the store already holds are left out, and the same checks run (a file changed
under an ingested name, labels that do not fit or conflict), so a dry run fails where
the ingest would. Runs come from the files' headers in any format and a ``log.pt``'s zip
directory, read by ranged requests (:mod:`kernelscale.runcount`); nothing is downloaded,
created or deleted.

Disk needed, once the files are in:

* the store: its logits chunks (whole chunks of ``run_chunk`` runs, each with its
  CRC-32C), two generations of statistics (float64 mean and M2 per split), and about
  a few KiB of metadata (Zarr metadata, the manifest, the labels);
* the download cache (Hub sources): at most ``(download workers + converters + 2) x``
  the largest file at a time, or every file with ``--keep-downloads``.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BadInputError
from .formats.torchzip import ITEMSIZE
from .ingestcheck import check_labels, check_unchanged
from .ingestion import IngestConfig, list_ingest_files, open_ingest_source
from .runcount import FileRuns, RunCounter, RunShape, known_runs, method_counts, methods_text
from .store import Store
from .store_layout import auto_run_chunk
from .units import format_bytes

#: units whose headers a dry run reads (the rest: by their sizes)
DRY_RUN_PROBE = 256
#: bytes of a store's metadata: the group's and arrays' zarr.json, the empty manifest
META_STORE = 4 << 10
#: bytes of one statistics generation's zarr.json files
META_GENERATION = 3 << 10
#: bytes of one file's manifest entry
META_FILE = 512
CRC_BYTES = 4


@dataclass
class IngestPlan:
    """What ``ingest`` would do; see the module docstring."""

    source: str
    record: dict
    store: str
    store_exists: bool
    listed: int  #: files matching the glob (after --max-files)
    skipped: int  #: of those, already in the store
    duplicates: int  #: same sha256 as a file in the store: downloaded, then skipped
    files: list[FileRuns]  #: to ingest, in order
    shape: RunShape | None
    runs_before: int
    remote: bool
    download_bytes: int
    run_chunk: int | None = None
    store_bytes: dict[str, int] | None = None
    cache_peak: int = 0
    cache_rule: str = ""
    free: dict[str, int | None] = field(default_factory=dict)
    labels: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def runs(self) -> int | None:
        """Runs the ingest adds (None unless known for every file)."""
        if any(f.runs is None for f in self.files):
            return None
        return known_runs(self.files) or 0

    def as_json(self) -> dict:
        return {"dry_run": True, "source": self.source, **self.record, "store": self.store,
                "store_exists": self.store_exists,
                "files": {"listed": self.listed, "skipped": self.skipped,
                          "duplicates": self.duplicates, "to_ingest": len(self.files),
                          "bytes": sum(f.size for f in self.files)},
                "download_bytes": self.download_bytes,
                "runs": {"to_add": self.runs, "known": known_runs(self.files),
                         "methods": method_counts(self.files), "before": self.runs_before,
                         "after": None if self.runs is None else self.runs_before + self.runs},
                "shape": self.shape.as_json() if self.shape else None,
                "run_chunk": self.run_chunk,
                "disk": {"store": self.store_bytes, "cache_peak": self.cache_peak,
                         "cache_rule": self.cache_rule, "free": self.free},
                "labels": self.labels, "notes": self.notes,
                "entries": [f.as_json() for f in self.files]}

    def text(self) -> str:
        r = self.record
        at = (f" revision {r['revision']} = commit {r['commit']}" if r.get("kind") == "hub"
              else "")
        n = len(self.files)
        size = sum(f.size for f in self.files)
        got = (f"{format_bytes(self.download_bytes)} to download" if self.remote
               else f"{format_bytes(size)} to read in place")
        lines = ["ingest --dry-run: nothing downloaded, nothing written",
                 f"  source  {self.source}{at}",
                 f"  files   {n} to ingest of {self.listed} listed ({self.skipped} already "
                 f"in the store" + (f", {self.duplicates} duplicate(s) of ingested content"
                                    if self.duplicates else "") + f"); {got}"]
        runs = self.runs
        known = known_runs(self.files)
        total = (f"{runs}" if runs is not None else
                 f"at least {known or 0} ({sum(f.runs is None for f in self.files)} file(s) "
                 "unknown)")
        after = f" -> the store will hold {self.runs_before + runs}" if runs is not None else ""
        how = f" (from {methods_text(self.files)})" if self.files else ""
        lines.append(f"  runs    {total}{how}{after}")
        state = "exists" if self.store_exists else "new"
        shape = f", {self.shape.text()}" if self.shape else ""
        chunk = f", run_chunk {self.run_chunk}" if self.run_chunk else ""
        lines.append(f"  store   {self.store} ({state}{shape}{chunk})")
        if self.store_bytes is not None:
            b = self.store_bytes
            lines.append(f"  disk    store +{format_bytes(b['total'])} (logits "
                         f"{format_bytes(b['logits'])}, statistics "
                         f"{format_bytes(b['statistics'])}, metadata about "
                         f"{format_bytes(b['metadata'])}); free there "
                         f"{_free(self.free.get('store'))}")
        else:
            lines.append("  disk    store: unknown (runs or shape unknown)")
        if self.remote:
            lines.append(f"  cache   up to {format_bytes(self.cache_peak)} at a time "
                         f"({self.cache_rule}); free there {_free(self.free.get('cache'))}")
        if self.labels:
            lines.append(f"  labels  {self.labels}")
        lines += [f"  note    {x}" for x in self.notes]
        return "\n".join(lines)


def _free(n: int | None) -> str:
    return "unknown" if n is None else format_bytes(n)


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free bytes on the file system that holds ``path`` or would (its nearest existing
    folder)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def plan_ingest(cfg: IngestConfig, *, endpoint: str | None = None,
                token: str | bool | None = None, retry_wait: float = 1.0,
                probe: int | None = DRY_RUN_PROBE) -> IngestPlan:
    """What :func:`~kernelscale.ingestion.ingest` of ``cfg`` would do; nothing is done."""
    cfg.validate()
    store = Store.open(cfg.store) if Store.exists(cfg.store) else None
    shape: RunShape | None = None
    if store is not None:
        s = store.shape
        shape = RunShape(s.n_test, s.n_train, s.classes, s.dtype, "the store's",
                         fixed_dtype=True)
        if cfg.shape is not None and tuple(cfg.shape) != shape.dims:
            raise BadInputError(f"{cfg.store}: holds (n_test, n_train, classes) = "
                                f"{shape.dims}, not the expected {tuple(cfg.shape)}")
    elif cfg.shape is not None:
        shape = RunShape(*cfg.shape, "float16", "--shape")
    src = open_ingest_source(cfg, endpoint=endpoint, token=token, retry_wait=retry_wait)
    try:
        files = list_ingest_files(src, cfg)
        check_unchanged(Path(cfg.store), files, src)
        known = store.known_names() if store else set()
        todo = [f for f in files if f.name not in known]
        seen = dict(store.known_sha256()) if store else {}
        fresh, dups = [], 0
        for f in todo:
            if f.sha256 is not None and f.sha256 in seen:
                dups += 1
                continue
            if f.sha256 is not None:
                seen[f.sha256] = f.name
            fresh.append(f)
        counter = RunCounter(src, probe, cfg.keys, every_file=True)
        runs, shape = counter.count(fresh, shape)
        remote = not is_local_record(src.record(cfg.glob))
        plan = IngestPlan(str(src), src.record(cfg.glob), str(cfg.store), store is not None,
                          len(files), len(files) - len(todo), dups, runs, shape,
                          store.runs if store else 0, remote,
                          sum(f.size for f in todo) if remote else 0, notes=counter.notes)
    finally:
        src.close()
    _apply_max_runs(plan, cfg)
    new_labels = False
    if cfg.labels:
        labels, what = check_labels(cfg.labels, cfg.store, replace=cfg.labels_replace,
                                    shape=shape.dims if shape else cfg.shape)
        names = ", ".join(labels.class_names) if labels.class_names else "unnamed"
        plan.labels = {"new": "would be recorded", "same": "already recorded (unchanged)",
                       "replace": "would replace the store's labels"}[what] + \
            f" from {cfg.labels} (classes: {names})"
        new_labels = what != "same"
    _disk(plan, cfg, store, new_labels)
    return plan


def is_local_record(record: dict) -> bool:
    return record.get("kind") != "hub"


def _apply_max_runs(plan: IngestPlan, cfg: IngestConfig) -> None:
    """Leave out the files past ``--max-runs``, as the ingest stops before them."""
    if cfg.max_runs is None:
        return
    total = plan.runs_before
    for i, f in enumerate(plan.files):
        if f.runs is None:
            plan.notes.append(f"--max-runs {cfg.max_runs}: the runs of {f.name} are "
                              "unknown; the ingest may stop before it or later")
            return
        if total + f.runs > cfg.max_runs:
            plan.notes.append(f"--max-runs {cfg.max_runs}: stops before {f.name} "
                              f"({len(plan.files) - i} file(s) left out)")
            plan.files = plan.files[:i]
            return
        total += f.runs


def _disk(plan: IngestPlan, cfg: IngestConfig, store: Store | None, labels: bool) -> None:
    """The store's growth and the download cache's peak (see the module docstring)."""
    plan.free = {"store": free_bytes(cfg.store)}
    if plan.remote:
        cache = cfg.fetch.cache_dir or _hub_cache()
        plan.free["cache"] = free_bytes(cache)
        sizes = [f.size for f in plan.files]
        total = sum(sizes)
        if cfg.fetch.keep_downloads:
            plan.cache_peak, plan.cache_rule = total, "--keep-downloads: every file stays"
        else:
            k = cfg.fetch.download_workers + cfg.converters + 2
            plan.cache_peak = min(total, k * max(sizes, default=0))
            plan.cache_rule = (f"(download workers {cfg.fetch.download_workers} + "
                               f"converters {cfg.converters} + 2) x largest file "
                               f"{format_bytes(max(sizes, default=0))}")
    runs, shape = plan.runs, plan.shape
    if runs is None or shape is None:
        return
    item = ITEMSIZE.get(shape.dtype, 2)
    if store is not None:
        rc = store.shape.run_chunk
        crc = {sp: CRC_BYTES if store.checksummed(sp) else 0 for sp in ("test", "train")}
        commits = len(store.manifest["files"])
    else:
        first = plan.files[0].runs if plan.files else None
        rc = cfg.run_chunk or auto_run_chunk(max(shape.n_test, shape.n_train),
                                             shape.classes, item, first)
        crc = {"test": CRC_BYTES, "train": CRC_BYTES}
        commits = 0
    r0 = plan.runs_before
    chunks = -(-(r0 + runs) // rc) - (-(-r0 // rc))
    logits = chunks * sum(rc * n * shape.classes * item + crc[sp]
                          for sp, n in (("test", shape.n_test), ("train", shape.n_train)))
    generation = sum(2 * (n * shape.classes * 8 + CRC_BYTES)
                     for n in (shape.n_test, shape.n_train))
    gens = min(2, commits + len(plan.files)) - min(2, commits)
    meta = ((0 if store is not None else META_STORE) + gens * META_GENERATION
            + META_FILE * len(plan.files))
    if labels:
        meta += (shape.n_test + shape.n_train) * 8 + 1024
    plan.run_chunk = rc
    plan.store_bytes = {"logits": logits, "statistics": gens * generation,
                        "metadata": meta, "total": logits + gens * generation + meta}


def _hub_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE

