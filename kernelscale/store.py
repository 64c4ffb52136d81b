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
class names once, as an ``.npz`` (int64 ``train``, ``test``; str ``class_names`` when
known) named by the digest of its content, then points the manifest's ``labels`` entry
at it (file, sha256, digest, source, class names); a store without that entry, from
before or never given labels, opens as ever.

Logits are stored uncompressed: fp16 logits compress ~1.09x with zstd, not worth the
decode time on the kernel's read path.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec
from zarr.storage import LocalStore

from .atomic import (
    atomic_write_bytes,
    atomic_write_json,
    check_output_dir,
    dir_umask,
    fsync_dir,
    read_json,
)
from .errors import StoreError
from .rawchunks import (
    ChunkDamaged,
    RawLayout,
    VerifiedChunks,
    chunk_path,
    raw_layout,
    read_chunk,
    read_strided,
    write_chunk,
)
from .stats import FLOAT64, LOG1P32, STORE_TRANSFORMS, RunningStats
from .units import format_bytes

SCHEMA = "kernelscale-store"
SCHEMA_VERSION = 1
SPLITS = ("test", "train")
#: target bytes of one run-chunk of the larger split: large enough for sequential disk
#: reads to run at full speed, small enough to overlap reads with compute.
TARGET_CHUNK_BYTES = 32 << 20


class DurableLocalStore(LocalStore):
    """A :class:`zarr.storage.LocalStore` whose writes are fsynced before the rename.

    Zarr's own local store renames a temp file into place (atomic under ``kill -9``) but
    does not fsync; the manifest may only point at data that survives a power loss.
    """

    async def _set(self, key: str, value, exclusive: bool = False) -> None:
        import asyncio

        if not self._is_open:
            await self._open()
        self._check_writable()
        path = self.root / key
        if exclusive and path.exists():
            raise FileExistsError(path)
        await asyncio.to_thread(atomic_write_bytes, path, value.as_buffer_like())


def _sweep_creations(root: Path, max_age: float = 600.0) -> None:
    """Remove the temp folders of creations of ``root`` killed more than ``max_age``
    seconds ago (a live creation takes well under a second)."""
    now = time.time()
    for p in root.parent.glob(f".{root.name}.creating-*"):
        with contextlib.suppress(OSError):
            if p.is_dir() and not p.is_symlink() and now - p.stat().st_mtime > max_age:
                shutil.rmtree(p, ignore_errors=True)


def auto_run_chunk(n_examples: int, classes: int, itemsize: int,
                   file_runs: int | None = None) -> int:
    """Runs per store chunk so that one chunk of the larger split is ~32 MB.

    With ``file_runs`` (the runs of the files to come), the largest divisor of it not
    above that size, when one is at least half of it: every file then fills whole chunks
    and a commit never rewrites a chunk an earlier file began.
    """
    per_run = max(1, n_examples * classes * itemsize)
    target = int(max(1, min(4096, TARGET_CHUNK_BYTES // per_run)))
    if file_runs:
        if file_runs <= target:
            return file_runs
        best = max(d for d in range(1, target + 1) if file_runs % d == 0)
        if 2 * best >= target:
            return best
    return target


@dataclass(frozen=True)
class StoreShape:
    n_test: int
    n_train: int
    classes: int
    dtype: str
    run_chunk: int

    def examples(self, split: str) -> int:
        return self.n_test if split == "test" else self.n_train


#: the name :meth:`Store.record_labels` gives a labels file
_LABELS_FILE = re.compile(r"labels-[0-9a-f]{16}\.npz")


def labels_digest(train: np.ndarray, test: np.ndarray,
                  class_names: Sequence[str] | None) -> str:
    """sha256 of label vectors (as int64) and class names: equal for the same labels,
    whatever file they were read from."""
    h = hashlib.sha256()
    for a in (train, test):
        v = np.ascontiguousarray(np.asarray(a, dtype="<i8"))
        h.update(f"{v.shape[0]}:".encode())
        h.update(v.tobytes())
    h.update(json.dumps(None if class_names is None else [str(n) for n in class_names]
                        ).encode())
    return h.hexdigest()


def _empty_manifest() -> dict:
    return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "runs": 0,
            "stats_generation": 0, "stats_sha256": None, "files": [], "rejected": [],
            "sources": []}


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
        self._raw: dict[str, RawLayout | None] = {}
        self._verified = VerifiedChunks()  # chunk files read whole and verified

    # ------------------------------------------------------------------ open / create
    @staticmethod
    def exists(path: str | os.PathLike) -> bool:
        return (Path(path) / "manifest.json").is_file()

    @classmethod
    def create(cls, path: str | os.PathLike, *, n_test: int, n_train: int, classes: int,
               dtype: str, run_chunk: int | None = None, file_runs: int | None = None,
               transform: str = LOG1P32) -> Store:
        """A new empty store; ``run_chunk`` by default from the shape and ``file_runs``
        (:func:`auto_run_chunk`); ``transform``: the log-softmax of its statistics."""
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
        # Built in a temp folder beside it and renamed into place: a creation killed
        # half-way leaves no half-store at the path (only a temp folder, swept by the
        # next creation), and of two racing creations exactly one rename succeeds.
        root.parent.mkdir(parents=True, exist_ok=True)
        _sweep_creations(root)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.creating-", dir=root.parent))
        tmp.chmod(0o777 & ~dir_umask())
        try:
            cls._build(tmp, n_test, n_train, classes, dtype, run_chunk, transform)
            try:
                os.rename(tmp, root)  # over an empty folder too; fails over a non-empty one
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise StoreError(f"{root}: cannot be created there ({e.strerror}); give "
                                     "a path that is not a link or a mount point") from None
                raise StoreError(f"{root}: created by another process at the same time (a "
                                 "concurrent first ingest); re-run to ingest into it"
                                 ) from None
            fsync_dir(root.parent)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return cls.open(root, mode="a")

    @staticmethod
    def _build(root: Path, n_test: int, n_train: int, classes: int, dtype: str,
               run_chunk: int, transform: str) -> None:
        zs = DurableLocalStore(root)
        g = zarr.open_group(store=zs, mode="w", zarr_format=3)
        g.attrs.update({"schema": SCHEMA, "schema_version": SCHEMA_VERSION,
                        "n_test": n_test, "n_train": n_train, "classes": classes,
                        "dtype": dtype, "run_chunk": run_chunk, "transform": transform})
        lg = g.create_group("logits")
        for split, n in (("test", n_test), ("train", n_train)):
            lg.create_array(split, shape=(0, n, classes), chunks=(run_chunk, n, classes),
                            dtype=dtype, compressors=[Crc32cCodec()], fill_value=0,
                            dimension_names=("run", split, "class"))
        g.create_group("stats")
        # The manifest is written last: its presence is what makes the directory a store.
        atomic_write_json(root / "manifest.json", _empty_manifest())

    @classmethod
    def open(cls, path: str | os.PathLike, mode: str = "r") -> Store:
        root = Path(path)
        if not cls.exists(root):
            raise StoreError(f"{root}: not a kernelscale store (no manifest.json)")
        try:
            manifest = read_json(root / "manifest.json")
        except (OSError, json.JSONDecodeError) as e:
            raise StoreError(f"{root}/manifest.json: unreadable ({e})") from None
        if manifest.get("schema") != SCHEMA or manifest.get("schema_version") != SCHEMA_VERSION:
            raise StoreError(f"{root}: store schema {manifest.get('schema')}/"
                             f"{manifest.get('schema_version')} is not {SCHEMA}/{SCHEMA_VERSION}")
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

    def read(self, split: str, start: int, stop: int,
             examples: slice | None = None) -> np.ndarray:
        """Logits of runs ``[start, stop)``: (stop - start, examples, classes), store dtype."""
        if not 0 <= start <= stop <= self.runs:
            raise StoreError(f"{self.root}: runs [{start}, {stop}) outside the "
                             f"{self.runs} committed runs")
        sel = examples if examples is not None else slice(None)
        return self.array(split)[start:stop, sel, :]

    def _raw_chunks(self, split: str) -> bool:
        """Whether ``split``'s chunk files hold the little-endian C-order bytes of whole
        runs (:func:`rawchunks.raw_layout`, one chunk across examples and classes),
        with or without their CRC-32C.

        True for every store this module creates; then :meth:`read_into` reads chunk
        files straight into the caller's buffer instead of through Zarr's codec pipeline.
        """
        if split not in self._raw:
            arr = self.array(split)
            m = arr.metadata
            layout = raw_layout(arr)
            ok = layout is not None and tuple(m.chunk_grid.chunk_shape[1:]) == tuple(m.shape[1:])
            self._raw[split] = layout if ok else None
        return self._raw[split] is not None

    def checksummed(self, split: str) -> bool:
        """Whether ``split``'s chunk files carry a CRC-32C (stores from before do not)."""
        return self._raw_chunks(split) and self._raw[split].checksum

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
        if not 0 <= start <= stop <= self.runs:
            raise StoreError(f"{self.root}: runs [{start}, {stop}) outside the "
                             f"{self.runs} committed runs")
        if not out.flags.c_contiguous or out.dtype != np.dtype(self.shape.dtype):
            raise ValueError("out must be C-contiguous of the store dtype")
        if not self._raw_chunks(split):
            return None
        per_run = self._run_bytes(split)
        n = self.shape.examples(split)
        if examples is not None and tuple(examples) != (0, n):
            a, b = examples
            if not 0 <= a < b <= n:
                raise StoreError(f"{self.root}: examples [{a}, {b}) outside 0:{n}")
            item = self.shape.classes * np.dtype(self.shape.dtype).itemsize
            rows = out.reshape(stop - start, -1).view(np.uint8)
            return [functools.partial(self._read_strided, split, path, offset + a * item,
                                      rows[lo - start:hi - start])
                    for path, offset, lo, hi in self._chunk_spans(split, start, stop,
                                                                  per_run)]
        dest = out.reshape(-1).view(np.uint8)
        return [functools.partial(self._read_chunk, split, path, offset,
                                  dest[(lo - start) * per_run:(hi - start) * per_run])
                for path, offset, lo, hi in self._chunk_spans(split, start, stop, per_run)]

    def _read_strided(self, split: str, path: Path, offset: int, dest: np.ndarray) -> None:
        try:
            read_strided(path, self.shape.run_chunk * self._run_bytes(split), offset,
                         self._run_bytes(split), dest, self.checksummed(split),
                         self._verified)
        except ChunkDamaged as e:
            raise ChunkDamaged(e.path, f"{e.problem}; {self.repair_hint(path)}") from None

    def _read_chunk(self, split: str, path: Path, offset: int, dest: np.ndarray) -> None:
        """Bytes ``[offset, ...)`` of the logits chunk file ``path`` into ``dest``,
        verified when the store is checksummed; damage names the files to repair from."""
        try:
            read_chunk(path, self.shape.run_chunk * self._run_bytes(split), offset, dest,
                       self.checksummed(split))
        except ChunkDamaged as e:
            raise ChunkDamaged(e.path, f"{e.problem}; {self.repair_hint(path)}") from None

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

    def _run_bytes(self, split: str) -> int:
        """Bytes of one run of ``split`` (examples x classes in the store dtype)."""
        return (self.shape.examples(split) * self.shape.classes
                * np.dtype(self.shape.dtype).itemsize)

    def _chunk_spans(self, split: str, start: int, stop: int, per_run: int):
        """(chunk file, byte offset, first run, end run) of each chunk runs
        ``[start, stop)`` touch."""
        rc = self.shape.run_chunk
        base = self.root / "logits" / split
        for ci in range(start // rc, (stop - 1) // rc + 1 if stop > start else 0):
            lo, hi = max(start, ci * rc), min(stop, (ci + 1) * rc)
            yield chunk_path(base, (ci, 0, 0)), (lo - ci * rc) * per_run, lo, hi

    def advise_willneed(self, split: str, start: int, stop: int) -> None:
        """Ask the kernel to start reading runs ``[start, stop)`` of ``split`` into the
        page cache (``POSIX_FADV_WILLNEED``), so a later :meth:`read_into` finds them
        there; a no-op where unsupported or when the chunks are not plain bytes."""
        if not hasattr(os, "posix_fadvise") or not self._raw_chunks(split):
            return
        per_run = self._run_bytes(split)
        for path, offset, lo, hi in self._chunk_spans(split, start, min(stop, self.runs),
                                                      per_run):
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, offset, (hi - lo) * per_run, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass
            finally:
                os.close(fd)

    def stats(self, split: str) -> RunningStats:
        """Statistics of all committed runs for ``split`` (float64, (examples, classes))."""
        gen = int(self.manifest["stats_generation"])
        key = (split, gen)
        if key not in self._stats_cache:
            n = self.shape.examples(split)
            if gen == 0:
                st = RunningStats.empty(n, self.shape.classes)
            else:
                try:
                    sg = self.group["stats"][f"g{gen}"]
                    st = RunningStats(self.runs, sg[f"{split}_mean"][...],
                                      sg[f"{split}_m2"][...])
                except (KeyError, ValueError) as e:  # a missing array, a bad checksum
                    if not (self.root / "stats" / f"g{gen}").is_dir():
                        raise StoreError(f"{self.root}: changed while being read (a "
                                         "concurrent ingest committed twice); re-run"
                                         ) from None
                    raise StoreError(f"{self.root}/stats/g{gen}/{split}_*: unreadable "
                                     f"({str(e).splitlines()[0][:100]}); recompute with "
                                     f"`kernelscale verify {self.root} --repair SOURCE`"
                                     ) from None
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
            self._cleanup()
            yield self
        finally:
            fh.close()

    def _cleanup(self) -> None:
        """Remove what a crashed writer may have left: stray generations, temp files."""
        gen = int(self.manifest["stats_generation"])
        keep = {f"g{gen}", f"g{gen - 1}"}  # the previous one: see commit_file
        sdir = self.root / "stats"
        if sdir.is_dir():
            for child in sdir.iterdir():
                if child.is_dir() and child.name not in keep:
                    shutil.rmtree(child, ignore_errors=True)
        for tmp in self.root.rglob(".*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

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
        for split, data in (("test", test), ("train", train)):
            arr = self.array(split)
            # Shrinking first drops whatever a crashed writer left past the committed runs.
            arr.resize((stop, *arr.shape[1:]))
            if self._raw_chunks(split) and data.dtype == np.dtype(self.shape.dtype):
                self._write_runs(split, start, np.ascontiguousarray(data))
            else:
                arr[start:stop] = data
        if before_commit is not None:
            before_commit()
        gen = int(self.manifest["stats_generation"]) + 1
        sg = self.group["stats"].create_group(f"g{gen}", overwrite=True)
        digest = hashlib.sha256()
        for split in SPLITS:
            merged = self.stats(split).merge(file_stats[split])
            for name, val in (("mean", merged.mean), ("m2", merged.m2)):
                sg.create_array(f"{split}_{name}", data=val, chunks=val.shape,
                                compressors=[Crc32cCodec()],
                                dimension_names=(split, "class"))
                digest.update(val.tobytes())
        m = json.loads(json.dumps(self.manifest))
        rec = dict(entry, runs=runs, run_start=start, run_stop=stop,
                   ingested_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        m["files"].append(rec)
        m["runs"] = stop
        m["stats_generation"] = gen
        m["stats_sha256"] = digest.hexdigest()
        atomic_write_json(self.root / "manifest.json", m)  # the commit point
        self.manifest = m
        self._stats_cache.clear()
        # The generation before the previous one goes: a reader that opened the store
        # before this commit still finds its generation (it reads it right after
        # opening; a reader two commits behind is told the store changed).
        shutil.rmtree(self.root / "stats" / f"g{gen - 2}", ignore_errors=True)
        return rec

    def _write_runs(self, split: str, start: int, data: np.ndarray) -> None:
        """Write runs ``[start, start + len(data))`` of ``split`` chunk file by chunk file
        (bytes and their CRC-32C, see :mod:`kernelscale.rawchunks`), each atomically
        and fsynced.

        A chunk begun by an earlier commit is read and completed; the rest of a chunk
        this commit does not fill is the fill value, as Zarr writes it. Zarr would do the
        same through its codec pipeline with two more copies of every byte.
        """
        per_run = self._run_bytes(split)
        rc = self.shape.run_chunk
        checksum = self.checksummed(split)
        stop = start + data.shape[0]
        src = data.reshape(-1).view(np.uint8)
        base = self.root / "logits" / split
        for c in range(start // rc, -(-stop // rc)):
            lo, hi = max(start, c * rc), min(stop, (c + 1) * rc)
            piece = src[(lo - start) * per_run:(hi - start) * per_run]
            path = chunk_path(base, (c, 0, 0))
            if lo == c * rc and hi == (c + 1) * rc:
                write_chunk(path, piece, checksum, durable=True)
                continue
            chunk = np.zeros(rc * per_run, dtype=np.uint8)
            if lo > c * rc:  # runs an earlier commit wrote into this chunk
                self._read_chunk(split, path, 0, chunk[:(lo - c * rc) * per_run])
            chunk[(lo - c * rc) * per_run:(hi - c * rc) * per_run] = piece
            write_chunk(path, chunk, checksum, durable=True)

    def record_rejected(self, name: str, reason: str, sha256: str | None = None) -> None:
        m = json.loads(json.dumps(self.manifest))
        m["rejected"] = [r for r in m["rejected"] if r["name"] != name]
        m["rejected"].append({"name": name, "sha256": sha256, "reason": reason})
        atomic_write_json(self.root / "manifest.json", m)
        self.manifest = m

    def labels_record(self) -> dict | None:
        """The manifest's record of the store's labels (see :meth:`record_labels`)."""
        return self.manifest.get("labels")

    def record_labels(self, train: np.ndarray, test: np.ndarray,
                      class_names: Sequence[str] | None, source: str, *,
                      replace: bool = False) -> str:
        """Record label vectors (int, (n_train,), (n_test,), in ``[0, classes)``) and
        class names; return ``recorded``, ``unchanged`` (the same labels are recorded) or
        ``replaced``. Other labels than the recorded ones are an error unless ``replace``.
        The file is written first, the manifest then points at it (the commit), and a
        replaced file is removed. Must be called under :meth:`writer`."""
        s = self.shape
        train, test = np.asarray(train, np.int64), np.asarray(test, np.int64)
        if train.shape != (s.n_train,) or test.shape != (s.n_test,) or (
                class_names is not None and len(class_names) != s.classes) or any(
                a.size and (a.min() < 0 or a.max() >= s.classes) for a in (train, test)):
            raise StoreError(f"{self.root}: labels do not fit the store's (n_test, n_train, "
                             f"classes) = {(s.n_test, s.n_train, s.classes)}")
        digest = labels_digest(train, test, class_names)
        old = self.labels_record()
        if old is not None and old.get("digest") == digest:
            return "unchanged"
        if old is not None and not replace:
            raise StoreError(f"{self.root}: holds other labels (recorded from "
                             f"{old.get('source')}, digest {str(old.get('digest'))[:12]}) than "
                             f"{source} (digest {digest[:12]}); a store's labels are replaced "
                             "only with --labels-replace")
        arrays = {"train": train, "test": test}
        if class_names is not None:
            arrays["class_names"] = np.array([str(n) for n in class_names])
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        data = buf.getvalue()
        name = f"labels-{digest[:16]}.npz"
        atomic_write_bytes(self.root / name, data)
        m = json.loads(json.dumps(self.manifest))
        m["labels"] = {"file": name, "sha256": hashlib.sha256(data).hexdigest(),
                       "digest": digest, "source": source,
                       "class_names": None if class_names is None else
                       [str(n) for n in class_names],
                       "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        atomic_write_json(self.root / "manifest.json", m)  # the commit point
        self.manifest = m
        # the replaced file, and any a writer killed before its commit left
        for p in self.root.glob("labels-*.npz"):
            if p.name != name and _LABELS_FILE.fullmatch(p.name):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
        return "recorded" if old is None else "replaced"

    def record_source(self, source: dict) -> None:
        """Remember a source (and e.g. its pinned commit) once, in the manifest."""
        m = json.loads(json.dumps(self.manifest))
        if source not in m["sources"]:
            m["sources"].append(source)
            atomic_write_json(self.root / "manifest.json", m)
            self.manifest = m

    # -------------------------------------------------------------------------- info
    def describe(self) -> str:
        s = self.shape
        lines = [f"store {self.root}",
                 f"  runs {self.runs}  test {s.n_test}  train {s.n_train}  classes {s.classes}"
                 f"  dtype {s.dtype}  run_chunk {s.run_chunk}  statistics of {self.transform}",
                 f"  fingerprint {self.fingerprint()}"]
        if self.runs >= 2:
            zt, zr = self.stats("test").zero_variance(), self.stats("train").zero_variance()
            lines.append(f"  zero-variance entries: test {zt}  train {zr}")
        lab = self.labels_record()
        if lab is not None:
            names = ", ".join(lab["class_names"]) if lab.get("class_names") else "unnamed"
            lines.append(f"  labels from {lab['source']} (classes: {names}; {lab['file']})")
        for src in self.manifest["sources"]:
            lines.append("  source " + "  ".join(f"{k}={v}" for k, v in sorted(src.items())))
        lines.append(f"  files {len(self.manifest['files'])}:")
        for f in self.manifest["files"]:
            extra = f"  commit {f['commit']}" if f.get("commit") else ""
            lines.append(f"    {f['sha256']}  runs {f['run_start']}:{f['run_stop']}  "
                         f"{format_bytes(f['size'])}  {f['name']}{extra}")
        if self.manifest["rejected"]:
            lines.append(f"  rejected {len(self.manifest['rejected'])}:")
            for r in self.manifest["rejected"]:
                lines.append(f"    {r['name']}: {r['reason']}")
        return "\n".join(lines)
