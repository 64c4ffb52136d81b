"""The store's identity on disk: its schema, shape and chunking, and the creation of an
empty store (the layout is described in :mod:`kernelscale.store`).

A store is created in a temp folder beside its path and renamed into place
(:func:`create_layout`): a creation killed half-way leaves no half-store at the path
(only a temp folder, swept by the next creation), and of two racing creations exactly
one rename succeeds.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec
from zarr.storage import LocalStore

from .atomic import atomic_write_bytes, atomic_write_json, dir_umask, fsync_dir, fsync_files
from .errors import StoreError

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

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._batch: list[Path] | None = None
        self._batch_lock = threading.Lock()

    @contextlib.contextmanager
    def synced_together(self) -> Iterator[None]:
        """Writes inside the block are atomic (temp file, rename) and become durable
        together when it ends cleanly (:func:`~kernelscale.atomic.fsync_files`): a commit's
        ~11 metadata files then share the journal's commits rather than force ~22, while
        the chunk bytes go to disk beside them. What an exception leaves is atomic but
        not synced, and not named by any manifest."""
        self._batch = []
        try:
            yield
            written = self._batch
        finally:
            self._batch = None
        fsync_files(written)

    async def _set(self, key: str, value, exclusive: bool = False) -> None:
        import asyncio

        if not self._is_open:
            await self._open()
        self._check_writable()
        path = self.root / key
        if exclusive and path.exists():
            raise FileExistsError(path)
        batch = self._batch
        await asyncio.to_thread(atomic_write_bytes, path, value.as_buffer_like(),
                                batch is None)
        if batch is not None:
            with self._batch_lock:
                batch.append(path)


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
    """Examples of each split, classes, the logits' dtype name (``float16`` or
    ``float32``) and the runs per chunk, as the store's group attributes hold them."""

    n_test: int
    n_train: int
    classes: int
    dtype: str
    run_chunk: int

    def examples(self, split: str) -> int:
        return self.n_test if split == "test" else self.n_train

    def run_bytes(self, split: str) -> int:
        """Bytes of one run of ``split``: examples x classes in the store dtype."""
        return self.examples(split) * self.classes * np.dtype(self.dtype).itemsize


def empty_manifest() -> dict:
    """The manifest of a store that holds no run yet."""
    return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "runs": 0,
            "stats_generation": 0, "stats_sha256": None, "files": [], "rejected": [],
            "sources": []}


def check_schema(root: Path, manifest: dict) -> None:
    """Refuse a manifest of another schema or schema version."""
    if manifest.get("schema") != SCHEMA or manifest.get("schema_version") != SCHEMA_VERSION:
        raise StoreError(f"{root}: store schema {manifest.get('schema')}/"
                         f"{manifest.get('schema_version')} is not {SCHEMA}/{SCHEMA_VERSION}")


def sweep_creations(root: Path, max_age: float = 600.0) -> None:
    """Remove the temp folders of creations of ``root`` killed more than ``max_age``
    seconds ago (a live creation takes well under a second)."""
    now = time.time()
    for p in root.parent.glob(f".{root.name}.creating-*"):
        with contextlib.suppress(OSError):
            if p.is_dir() and not p.is_symlink() and now - p.stat().st_mtime > max_age:
                shutil.rmtree(p, ignore_errors=True)


def build_store(root: Path, n_test: int, n_train: int, classes: int, dtype: str,
                run_chunk: int, transform: str) -> None:
    """Write an empty store into the folder ``root``: the group and its attributes, the
    logits arrays (0, examples, classes) of ``dtype``, the statistics group, and last
    the manifest, whose presence is what makes the folder a store."""
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
    atomic_write_json(root / "manifest.json", empty_manifest())


def create_layout(root: Path, n_test: int, n_train: int, classes: int, dtype: str,
                  run_chunk: int, transform: str) -> None:
    """Build an empty store (:func:`build_store`) in a temp folder beside ``root`` and
    rename it to ``root`` (absent or an empty folder)."""
    root.parent.mkdir(parents=True, exist_ok=True)
    sweep_creations(root)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.creating-", dir=root.parent))
    tmp.chmod(0o777 & ~dir_umask())
    try:
        build_store(tmp, n_test, n_train, classes, dtype, run_chunk, transform)
        try:
            os.rename(tmp, root)  # over an empty folder too; fails over a non-empty one
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise StoreError(f"{root}: cannot be created there ({e.strerror}); give "
                                 "a path that is not a link or a mount point") from None
            raise StoreError(f"{root}: created by another process at the same time (a "
                             "concurrent first ingest); re-run to ingest into it") from None
        fsync_dir(root.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
