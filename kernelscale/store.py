"""The Zarr v3 store: logits of both splits, a manifest, and running statistics.

Layout of ``STORE/`` (a Zarr v3 group)::

    zarr.json                 group attributes: schema, n_test, n_train, classes, dtype,
                              run_chunk, transform (of the statistics; absent: float64)
    logits/test               (runs, n_test, classes)  source dtype, chunks (run_chunk, n_test, C)
    logits/train              (runs, n_train, classes) source dtype, chunks (run_chunk, n_train, C)
    stats/g<k>/<split>_mean   (examples, classes) float64
    stats/g<k>/<split>_m2     (examples, classes) float64
    manifest.json             the commit record (see below)
    labels-<digest>.npz       labels and class names, when recorded (manifest "labels")
    .lock                     held by the single writer

The Zarr dimension names are ``run``, ``test``/``train`` and ``class`` for the logits and
``<split>``, ``class`` for the statistics, so ``xarray.open_zarr(STORE, group="logits")``
gives labelled arrays.

``manifest.json`` is the only source of truth for what the store holds: the number of
committed runs, the files (name, sha256, size, runs, run range, source), the rejected
files, and which statistics generation ``g<k>`` belongs to those runs. Ingesting a file
writes its logits, then a new statistics generation, then replaces the manifest
atomically; a crash at any point leaves the previous manifest, which still describes
consistent data (runs past ``manifest.runs`` and unreferenced generations are ignored and
cleaned up by the next writer).

Labels travel with the data: :meth:`Store.record_labels` writes the label vectors and
class names once (:mod:`kernelscale.store_labelfile`), then points the manifest's
``labels`` entry at them (file, sha256, digest, source, class names); a store without
that entry, from before or never given labels, opens as ever.

Logits are stored uncompressed: fp16 logits compress ~1.09x with zstd, not worth the
decode time on the kernel's read path. :class:`Store` is the front of the store's parts:
``store_layout`` (schema, shape, creation), ``store_chunks`` (chunk file I/O),
``store_stats`` (statistics generations), ``store_labelfile`` (the labels file);
and ``store_info`` builds the ``info`` text on it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import zarr

from .atomic import atomic_write_json, check_output_dir, read_json
from .errors import StoreError
from .stats import FLOAT64, LOG1P32, STORE_TRANSFORMS, RunningStats
from .store_chunks import SplitChunks
from .store_labelfile import (
    fitted_labels,
    labels_digest,
    remove_other_labels_files,
    write_labels_file,
)
from .store_layout import (
    SPLITS,
    DurableLocalStore,
    StoreShape,
    auto_run_chunk,
    check_schema,
    create_layout,
)
from .store_stats import drop_generation, read_generation, sweep_generations, write_generation


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Store:
    """An opened store. Use :meth:`create` or :meth:`open`; write only under :meth:`writer`."""

    def __init__(self, root: Path, group: zarr.Group, manifest: dict, read_only: bool):
        self.root = root
        self.group = group
        self.manifest = manifest
        self.read_only = read_only
        a = group.attrs
        self.shape = StoreShape(int(a["n_test"]), int(a["n_train"]), int(a["classes"]),
                                str(a["dtype"]), int(a["run_chunk"]))
        #: the log-softmax the statistics are of (:data:`~kernelscale.stats.FLOAT64`
        #: in stores from before the float32 log1p form)
        self.transform = str(a.get("transform", FLOAT64))
        self._stats_cache: dict[tuple[str, int], RunningStats] = {}
        self._chunks: dict[str, SplitChunks] = {}
        #: what this object's writes leave in the lock file; the logits arrays it resized
        #: last, valid while no other writer has held the lock since (see :meth:`writer`)
        self._token = f"{os.getpid()} {id(self)} {time.time_ns()}"
        self._resized: dict[str, zarr.Array] = {}

    # ------------------------------------------------------------------ open / create
    @staticmethod
    def exists(path: str | os.PathLike) -> bool:
        return (Path(path) / "manifest.json").is_file()

    @classmethod
    def create(cls, path: str | os.PathLike, *, n_test: int, n_train: int, classes: int,
               dtype: str, run_chunk: int | None = None, file_runs: int | None = None,
               transform: str = LOG1P32) -> Store:
        """A new empty store; ``run_chunk`` by default from the shape and ``file_runs``
        (:func:`~kernelscale.store_layout.auto_run_chunk`); ``transform``: the
        log-softmax of its statistics."""
        root = check_output_dir(path, "--store")
        if cls.exists(root):
            raise StoreError(f"{root}: a store already exists here")
        if root.exists() and any(root.iterdir()):
            raise StoreError(f"{root}: exists and is not an empty directory or a store")
        if transform not in STORE_TRANSFORMS:
            raise StoreError(f"{root}: unknown transform {transform!r}")
        itemsize = np.dtype(dtype).itemsize
        run_chunk = run_chunk or auto_run_chunk(max(n_test, n_train), classes, itemsize,
                                                file_runs)
        create_layout(root, n_test, n_train, classes, dtype, run_chunk, transform)
        return cls.open(root, mode="a")

    @classmethod
    def open(cls, path: str | os.PathLike, mode: str = "r") -> Store:
        root = Path(path)
        if not cls.exists(root):
            raise StoreError(f"{root}: not a kernelscale store (no manifest.json)")
        try:
            manifest = read_json(root / "manifest.json")
        except (OSError, json.JSONDecodeError) as e:
            raise StoreError(f"{root}/manifest.json: unreadable ({e})") from None
        check_schema(root, manifest)
        read_only = mode == "r"
        zs = DurableLocalStore(root, read_only=read_only)
        g = zarr.open_group(store=zs, mode="r" if read_only else "r+", zarr_format=3)
        return cls(root, g, manifest, read_only)

    # ------------------------------------------------------------------------- reads
    @property
    def runs(self) -> int:
        return int(self.manifest["runs"])

    def array(self, split: str) -> zarr.Array:
        return self.group["logits"][split]

    def _check_runs(self, start: int, stop: int) -> None:
        if not 0 <= start <= stop <= self.runs:
            raise StoreError(f"{self.root}: runs [{start}, {stop}) outside the "
                             f"{self.runs} committed runs")

    def read(self, split: str, start: int, stop: int,
             examples: slice | None = None) -> np.ndarray:
        """Logits of runs ``[start, stop)``: (stop - start, examples, classes), store dtype."""
        self._check_runs(start, stop)
        sel = examples if examples is not None else slice(None)
        return self.array(split)[start:stop, sel, :]

    def chunks(self, split: str) -> SplitChunks:
        """The chunk files of ``split``'s logits; plain bytes (``raw``) in every store
        this module creates, read straight into the caller's buffer by :meth:`read_into`."""
        if split not in self._chunks:
            self._chunks[split] = SplitChunks(split, self.array(split),
                                              self.root / "logits" / split, self.shape,
                                              self.repair_hint)
        return self._chunks[split]

    def checksummed(self, split: str) -> bool:
        """Whether ``split``'s chunk files carry a CRC-32C (stores from before do not)."""
        return self.chunks(split).checksum

    def read_into(self, split: str, start: int, stop: int, out: np.ndarray,
                  pool=None) -> None:
        """Read runs ``[start, stop)`` of ``split`` into ``out`` (stop-start, examples, C).

        ``out`` must be C-contiguous of the store dtype (e.g. the numpy view of a pinned
        host tensor). Chunk files are read with ``readinto`` straight into ``out``, on the
        threads of ``pool`` when given (one chunk file each); a chunk that was never
        written (all fill value) reads as zeros, as Zarr would return it.
        """
        jobs = self.read_jobs(split, start, stop, out)
        if jobs is None:
            out[...] = self.read(split, start, stop)
        elif pool is not None and len(jobs) > 1:
            list(pool.map(lambda j: j(), jobs))
        else:
            for j in jobs:
                j()

    def read_jobs(self, split: str, start: int, stop: int, out: np.ndarray,
                  examples: tuple[int, int] | None = None):
        """The reads :meth:`read_into` performs, one callable per chunk file, to run on
        any threads; ``None`` when the chunks are not plain bytes (read through Zarr).

        ``examples``: only examples ``[a, b)`` of each run, ``out`` (stop-start, b-a, C):
        each chunk file is verified whole on its first read in this store object, and
        later reads take only those examples' bytes (:func:`rawchunks.read_strided`).
        """
        self._check_runs(start, stop)
        if not out.flags.c_contiguous or out.dtype != np.dtype(self.shape.dtype):
            raise ValueError("out must be C-contiguous of the store dtype")
        chunks = self.chunks(split)
        if not chunks.raw:
            return None
        n = self.shape.examples(split)
        if examples is not None and tuple(examples) != (0, n):
            a, b = examples
            if not 0 <= a < b <= n:
                raise StoreError(f"{self.root}: examples [{a}, {b}) outside 0:{n}")
            return chunks.read_jobs(start, stop, out, (a, b))
        return chunks.read_jobs(start, stop, out)

    def advise_willneed(self, split: str, start: int, stop: int) -> None:
        """Ask the kernel to start reading runs ``[start, stop)`` of ``split`` into the
        page cache (``POSIX_FADV_WILLNEED``), so a later :meth:`read_into` finds them
        there; a no-op where unsupported or when the chunks are not plain bytes."""
        chunks = self.chunks(split)
        if chunks.raw:
            chunks.advise_willneed(start, min(stop, self.runs))

    def chunk_runs(self, chunk: Path) -> tuple[str, int, int] | None:
        """(split, first run, end run) the logits chunk file ``chunk`` holds of the
        committed runs; None for a path that is not one."""
        try:
            split, _, ci, *_ = chunk.relative_to(self.root / "logits").parts
            lo = int(ci) * self.shape.run_chunk
        except ValueError:
            return None
        return split, lo, min(lo + self.shape.run_chunk, self.runs)

    def repair_hint(self, chunk: Path) -> str:
        """How to repair a damaged logits chunk file: the source files of its runs."""
        where = self.chunk_runs(chunk)
        if where is None:
            return "re-create the store"
        split, lo, hi = where
        names = [f["name"] for f in self.manifest["files"]
                 if f["run_start"] < hi and f["run_stop"] > lo]
        return (f"runs {lo}:{hi} of {split} come from "
                f"{', '.join(names) or 'no ingested file'}; repair with `kernelscale "
                f"verify {self.root} --repair SOURCE`")

    def stats(self, split: str) -> RunningStats:
        """Statistics of all committed runs for ``split`` (float64, (examples, classes))."""
        gen = int(self.manifest["stats_generation"])
        key = (split, gen)
        if key not in self._stats_cache:
            if gen == 0:
                st = RunningStats.empty(self.shape.examples(split), self.shape.classes)
            else:
                st = read_generation(self.root, self.group, gen, split, self.runs)
            self._stats_cache[key] = st
        return self._stats_cache[key]

    def fingerprint(self) -> str:
        """sha256 over the committed file list, run count and statistics digest."""
        m = self.manifest
        core = {"runs": m["runs"], "stats_sha256": m["stats_sha256"],
                "files": [[f["name"], f["sha256"], f["run_start"], f["run_stop"]]
                          for f in m["files"]], "shape": self.shape.__dict__}
        return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()

    def known_sha256(self) -> dict[str, str]:
        return {f["sha256"]: f["name"] for f in self.manifest["files"]}

    def known_names(self) -> set[str]:
        return {f["name"] for f in self.manifest["files"]}

    def labels_record(self) -> dict | None:
        """The manifest's record of the store's labels (see :meth:`record_labels`)."""
        return self.manifest.get("labels")

    # ------------------------------------------------------------------------ writes
    @contextlib.contextmanager
    def writer(self) -> Iterator[Store]:
        """Hold the store's exclusive lock; reload the manifest; clean crash leftovers."""
        if self.read_only:
            raise StoreError(f"{self.root}: opened read-only")
        fh = open(self.root / ".lock", "a+")  # noqa: SIM115 -- held for the whole block
        try:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StoreError(f"{self.root}: another process is writing this store") from None
            self.manifest = read_json(self.root / "manifest.json")
            fh.seek(0)
            if fh.read() != self._token:
                # this object's first write, or another writer held the lock since its
                # last (committed, failed or killed): sweep what a crash may have left,
                # forget what this object knew of the store, and leave this one's token
                self._cleanup()
                self._stats_cache.clear()
                self._resized.clear()
                fh.seek(0)
                fh.truncate()
                fh.write(self._token)
                fh.flush()
            yield self
        finally:
            fh.close()

    def _cleanup(self) -> None:
        """Remove what a crashed writer may have left: stray generations (the previous
        one stays, see :meth:`commit_file`), temp files."""
        sweep_generations(self.root, int(self.manifest["stats_generation"]))
        for tmp in self.root.rglob(".*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def _edit_manifest(self) -> dict:
        """A deep copy of the manifest, to change and :meth:`_commit`."""
        return json.loads(json.dumps(self.manifest))

    def _write_metadata(self, stop: int, gen: int, file_stats: dict[str, RunningStats]
                        ) -> tuple[dict[str, RunningStats], str]:
        """Resize the logits arrays to ``stop`` runs and write statistics generation
        ``gen``, the current one merged with ``file_stats``; return the merged statistics
        and their digest. Nothing here is committed until the manifest names it; all of
        it is durable when this returns, synced together."""
        zs = self.group.store
        with zs.synced_together() if isinstance(zs, DurableLocalStore) else \
                contextlib.nullcontext():
            for split in SPLITS:
                if split not in self._resized:
                    self._resized[split] = self.array(split)
                arr = self._resized[split]
                # Shrinking first drops whatever a crashed writer left past the committed
                # runs.
                arr.resize((stop, *arr.shape[1:]))
            merged = {split: self.stats(split).merge(file_stats[split]) for split in SPLITS}
            return merged, write_generation(self.group, gen, merged)

    def _commit(self, m: dict) -> None:
        """Replace the manifest with ``m`` atomically: the commit point of every write."""
        atomic_write_json(self.root / "manifest.json", m)
        self.manifest = m

    def commit_file(self, entry: dict, test: np.ndarray, train: np.ndarray,
                    file_stats: dict[str, RunningStats], before_commit=None) -> dict:
        """Append one validated file's runs and fold in its statistics; then commit.

        ``test`` (runs, n_test, C) and ``train`` (runs, n_train, C) of the store dtype;
        ``file_stats`` maps split to the file's own :class:`RunningStats`. ``entry`` holds
        the manifest fields of the file (name, sha256, size, source, ...); the run range
        is filled in here. ``before_commit``: called once the runs are written, before
        anything is committed (an exception there leaves the store as it was: runs past
        the committed ones are dropped by the next writer). Must be called under
        :meth:`writer`.
        """
        runs = int(test.shape[0])
        start = self.runs
        stop = start + runs
        gen = int(self.manifest["stats_generation"]) + 1
        data = {"test": test, "train": train}
        raw = all(self.chunks(split).raw and data[split].dtype == np.dtype(self.shape.dtype)
                  for split in SPLITS)
        with ThreadPoolExecutor(1, thread_name_prefix="kernelscale-commit") as pool:
            # The arrays' new extent and the next statistics generation are written while
            # the runs go to disk (which bounds a commit): all before the manifest names
            # them. The Zarr path writes into the resized arrays, so after.
            meta = pool.submit(self._write_metadata, stop, gen, file_stats)
            if raw:
                for split in SPLITS:
                    self.chunks(split).write_runs(start, np.ascontiguousarray(data[split]))
            merged, digest = meta.result()
            if not raw:
                for split in SPLITS:
                    self._resized[split][start:stop] = data[split]
        if before_commit is not None:
            before_commit()
        m = self._edit_manifest()
        rec = dict(entry, runs=runs, run_start=start, run_stop=stop, ingested_at=_now())
        m["files"].append(rec)
        # a file rejected before and good now is no longer a rejected one
        m["rejected"] = [r for r in m["rejected"] if r["name"] != rec["name"]]
        m["runs"] = stop
        m["stats_generation"] = gen
        m["stats_sha256"] = digest
        self._commit(m)
        self._stats_cache = {(split, gen): merged[split] for split in SPLITS}
        # The generation before the previous one goes: a reader that opened the store
        # before this commit still finds its generation (it reads it right after
        # opening; a reader two commits behind is told the store changed).
        drop_generation(self.root, gen - 2)
        return rec

    def record_rejected(self, name: str, reason: str, sha256: str | None = None) -> None:
        m = self._edit_manifest()
        m["rejected"] = [r for r in m["rejected"] if r["name"] != name]
        m["rejected"].append({"name": name, "sha256": sha256, "reason": reason})
        self._commit(m)

    def record_labels(self, train: np.ndarray, test: np.ndarray,
                      class_names: Sequence[str] | None, source: str, *,
                      replace: bool = False) -> str:
        """Record label vectors (int, (n_train,), (n_test,), in ``[0, classes)``) and
        class names; return ``recorded``, ``unchanged`` (the same labels are recorded) or
        ``replaced``. Other labels than the recorded ones are an error unless ``replace``.
        The file is written first, the manifest then points at it (the commit), and a
        replaced file is removed. Must be called under :meth:`writer`."""
        train, test = fitted_labels(self.root, self.shape, train, test, class_names)
        digest = labels_digest(train, test, class_names)
        old = self.labels_record()
        if old is not None and old.get("digest") == digest:
            return "unchanged"
        if old is not None and not replace:
            raise StoreError(f"{self.root}: holds other labels (recorded from "
                             f"{old.get('source')}, digest {str(old.get('digest'))[:12]}) than "
                             f"{source} (digest {digest[:12]}); a store's labels are replaced "
                             "only with --labels-replace")
        name, sha256 = write_labels_file(self.root, train, test, class_names, digest)
        m = self._edit_manifest()
        m["labels"] = {"file": name, "sha256": sha256, "digest": digest, "source": source,
                       "class_names": None if class_names is None else
                       [str(n) for n in class_names], "recorded_at": _now()}
        self._commit(m)
        remove_other_labels_files(self.root, name)
        return "recorded" if old is None else "replaced"

    def record_source(self, source: dict) -> None:
        """Remember a source (and e.g. its pinned commit) once, in the manifest."""
        m = self._edit_manifest()
        if source not in m["sources"]:
            m["sources"].append(source)
            self._commit(m)
