"""The kernel output format: a Zarr v3 group with the kernel, its identity, done-markers
and checkpoints.

Layout of ``KERNEL/``::

    zarr.json                  group attributes: schema, identity, complete, store, runs
    kernel                     float32 (rows, cols), dimension names from the pairs
                               (DIMENSION_NAMES: test-train -> test, train)
    .done/<tile>.json          one per finished tile (atomic), written after its data
    .checkpoints/pass-*.npz    accumulators of passes in flight (atomic, no pickle)
    .lock                      shared by every writer, exclusive for a removal (flock)
    .locks/<region>.lock       exclusive per region being computed; names its holder

The identity (store fingerprint, runs, pairs, precision, transform, classes, shape) is
what a partial output, a checkpoint or a done-marker must match to be reused.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

from .atomic import atomic_open, atomic_write_json, check_output_dir, read_json
from .errors import CheckpointMismatchError, KernelOutputError
from .plan import Tile
from .rawchunks import (
    CRC_BYTES,
    ChunkDamaged,
    chunk_path,
    raw_layout,
    read_chunk,
    write_chunk,
)

KERNEL_SCHEMA = "kernelscale-kernel"
KERNEL_SCHEMA_VERSION = 1
PAIRS = {"test-train": ("test", "train"), "train-train": ("train", "train"),
         "test-test": ("test", "test")}
DEFAULT_CHUNKS = (1024, 4096)
#: Zarr dimension names of the kernel array, per pairs: the rows' split, then the
#: columns'. A square kernel's columns are ``<split>_col``: xarray needs distinct names.
DIMENSION_NAMES = {"test-train": ("test", "train"), "train-train": ("train", "train_col"),
                   "test-test": ("test", "test_col")}


class KernelOutput:
    """The output Zarr group: array ``kernel``, identity attributes, done markers, checkpoints.

    ``KERNEL/kernel``           float32 (n_rows, n_cols), chunks ``chunks``
    ``KERNEL/.done/<tile>.json`` one per finished tile (atomic), written after its data
    ``KERNEL/.checkpoints/``    accumulators of passes in flight (atomic .npz files)
    """

    def __init__(self, path: Path, group: zarr.Group):
        self.path = path
        self.group = group

    @property
    def attrs(self) -> dict:
        return dict(self.group.attrs)

    @property
    def array(self) -> zarr.Array:
        return self.group["kernel"]

    @property
    def reader(self) -> CheckedArray:
        """The kernel array for reading, with checksum failures as one-line errors."""
        return CheckedArray(self.path, self.array)

    @property
    def chunks(self) -> tuple[int, int]:
        return tuple(self.array.chunks)  # type: ignore[return-value]

    @classmethod
    def open(cls, path: str | os.PathLike, mode: str = "r") -> KernelOutput:
        path = Path(path)
        try:
            g = zarr.open_group(str(path), mode=mode, zarr_format=3)
        except Exception:
            raise KernelOutputError(f"{path}: not a kernel (no readable Zarr group)") from None
        if g.attrs.get("schema") != KERNEL_SCHEMA or "kernel" not in g:
            raise KernelOutputError(f"{path}: not a kernelscale kernel")
        return cls(path, g)

    @classmethod
    def open_or_create(cls, path: Path, identity: dict, shape: tuple[int, int],
                       chunks: tuple[int, int] | None, *, overwrite: bool,
                       restart: bool, store: str | None = None) -> KernelOutput:
        """The kernel at ``path`` if it has this ``identity`` (and ``chunks``), else a new
        one there. A kernel of other inputs is replaced only with ``overwrite`` (a
        finished one) or ``restart`` (a partial one); a directory that is not a
        kernelscale kernel is never removed. ``store``: the store's path, for messages."""
        check_output_dir(path, "--out")
        if store is not None:
            st, out = Path(store).resolve(), path.resolve()
            if out == st or out in st.parents or st in out.parents:
                raise KernelOutputError(f"{path}: is the store {store}, a folder inside it "
                                        "or one holding it; choose another --out")
        if path.is_symlink():
            raise KernelOutputError(f"{path}: is a symbolic link; give the folder it points "
                                    f"to ({os.path.realpath(path)}) as --out")
        names = {p.name for p in path.iterdir()} if path.is_dir() else set()
        if ".lock" in names and names <= {*KERNEL_MEMBERS, ".lock"}:
            try:
                cls.open(path, mode="r")
            except KernelOutputError:
                # what a replace killed half-way leaves: our lock and a kernel's own
                # members only (a folder without our .lock is never taken for this)
                _remove_kernel(path)
        if path.exists() and any(p.name != ".lock" for p in path.iterdir()):
            try:
                existing = cls.open(path, mode="r+")
            except KernelOutputError:
                raise KernelOutputError(f"{path}: exists and is not a kernelscale kernel; "
                                        "choose another --out (--overwrite replaces only a "
                                        "kernel)") from None
            old = existing.attrs.get("identity", {})
            if old == identity and (chunks is None or existing.chunks == tuple(chunks)):
                return existing
            diff = ", ".join(f"{k}: {old.get(k)!r} -> {identity.get(k)!r}"
                             for k in sorted(set(old) | set(identity))
                             if old.get(k) != identity.get(k))
            if chunks is not None and existing.chunks != tuple(chunks):
                diff = (diff + ", " if diff else "") + f"chunks {existing.chunks} -> {chunks}"
            if (old.get("store_fingerprint") != identity.get("store_fingerprint") and store
                    and existing.attrs.get("store")):
                diff = f"computed {existing.computed_from(store)}; " + diff
            if existing.attrs.get("complete"):
                if not overwrite:
                    raise KernelOutputError(f"{path}: holds a finished kernel of different "
                                            f"inputs ({diff}); pass --overwrite to replace it")
            elif not (restart or overwrite):
                raise CheckpointMismatchError(
                    f"{path}: holds a partial kernel of different inputs ({diff}) -- the "
                    "store or options changed since it was started; pass --restart to "
                    "discard it and start again")
            _remove_kernel(path)
        chunks = tuple(chunks or (min(shape[0], DEFAULT_CHUNKS[0]),
                                  min(shape[1], DEFAULT_CHUNKS[1])))
        g = zarr.open_group(str(path), mode="a", zarr_format=3)  # never clears the folder
        dims = DIMENSION_NAMES.get(identity.get("pairs"), ("row", "col"))
        g.create_array("kernel", shape=shape, chunks=chunks, dtype="float32",
                       compressors=[Crc32cCodec()], fill_value=0.0, dimension_names=dims)
        g.attrs.update({"schema": KERNEL_SCHEMA, "schema_version": KERNEL_SCHEMA_VERSION,
                        "identity": identity, "complete": False})
        return cls(path, g)

    def write_block(self, r0: int, r1: int, c0: int, c1: int, block: np.ndarray) -> None:
        """Store ``block`` float32 (r1-r0, c1-c0) at rows ``[r0, r1)``, cols ``[c0, c1)``.

        A block on the chunk grid of a plain-bytes array (every kernel this module
        creates) is written chunk file by chunk file without Zarr's codec pipeline;
        anything else goes through Zarr.
        """
        arr = self.array
        (n, m), (cr, cc) = arr.shape, self.chunks
        on_grid = (r0 % cr == 0 and c0 % cc == 0 and (r1 % cr == 0 or r1 == n)
                   and (c1 % cc == 0 or c1 == m))
        layout = raw_layout(arr)
        if not (on_grid and block.dtype == np.float32 and layout is not None):
            arr[r0:r1, c0:c1] = block
            return
        for i in range(r0 // cr, -(-r1 // cr)):
            for j in range(c0 // cc, -(-c1 // cc)):
                sub = block[i * cr - r0:min((i + 1) * cr, r1) - r0,
                            j * cc - c0:min((j + 1) * cc, c1) - c0]
                if sub.shape != (cr, cc):  # an edge chunk: stored at full shape, zeros
                    full = np.zeros((cr, cc), dtype=np.float32)
                    full[:sub.shape[0], :sub.shape[1]] = sub
                    sub = full
                write_chunk(chunk_path(self.path / "kernel", (i, j)), sub, layout.checksum)

    def computed_from(self, store: str | os.PathLike) -> str:
        """Which store this kernel was computed from, said against ``store``: the kernel
        of another store, or of an earlier state of this one."""
        origin = self.attrs.get("store")
        if not origin:
            return f"from another store than {store}"
        if Path(origin).resolve() == Path(store).resolve():
            return f"from another state of {store} (it has changed since)"
        return f"from the store {origin}, not {store}"

    def fingerprint(self) -> str:
        """sha256 of the kernel's identity: the same for every kernel of the same store
        state, runs, pairs, precision, transform, classes and shape."""
        ident = json.dumps(self.attrs.get("identity", {}), sort_keys=True)
        return hashlib.sha256(ident.encode()).hexdigest()

    # done markers -------------------------------------------------------------------
    @property
    def done_dir(self) -> Path:
        return self.path / ".done"

    @property
    def ckpt_dir(self) -> Path:
        return self.path / ".checkpoints"

    def done_tiles(self) -> list[Tile]:
        out = []
        if self.done_dir.is_dir():
            for p in sorted(self.done_dir.glob("*.json")):
                try:
                    d = read_json(p)
                except (OSError, json.JSONDecodeError):
                    continue  # a torn marker cannot exist (atomic); a foreign file is ignored
                if d.get("identity") == self.attrs.get("identity"):
                    out.append(Tile(*d["tile"]))
        return out

    def done_grid(self) -> np.ndarray:
        """bool (row chunks, col chunks): chunks covered by some finished tile."""
        (n, m), (cr, cc) = self.array.shape, self.chunks
        grid = np.zeros((-(-n // cr), -(-m // cc)), dtype=bool)
        for t in self.done_tiles():
            grid[t.r0 // cr:-(-t.r1 // cr), t.c0 // cc:-(-t.c1 // cc)] = True
        return grid

    def tile_done(self, t: Tile, grid: np.ndarray) -> bool:
        cr, cc = self.chunks
        return bool(grid[t.r0 // cr:-(-t.r1 // cr), t.c0 // cc:-(-t.c1 // cc)].all())

    def mark_done(self, t: Tile, info: dict) -> None:
        atomic_write_json(self.done_dir / f"{t.key}.json",
                          {"tile": [t.r0, t.r1, t.c0, t.c1],
                           "identity": self.attrs["identity"], **info})

    def check_markers(self) -> None:
        """Every done-marker of this kernel's identity lies on the chunk grid and counts
        the kernel's runs; raises :class:`KernelOutputError` naming the first that does
        not (markers of an earlier kernel at this path are ignored, as by
        :meth:`done_grid`)."""
        ident = self.attrs.get("identity", {})
        (n_rows, n_cols), (cr, cc) = self.array.shape, self.chunks
        for m in sorted(self.done_dir.glob("*.json")) if self.done_dir.is_dir() else []:
            try:
                info = read_json(m)
            except (OSError, json.JSONDecodeError):
                continue
            if info.get("identity") != ident:
                continue
            r0, r1, c0, c1 = info["tile"]
            on_grid = (r0 % cr == 0 and c0 % cc == 0 and (r1 % cr == 0 or r1 == n_rows)
                       and (c1 % cc == 0 or c1 == n_cols))
            if not on_grid or info.get("runs") != ident.get("runs"):
                raise KernelOutputError(f"{m}: done-marker off the chunk grid or of another "
                                        f"run count (tile {info['tile']}, runs "
                                        f"{info.get('runs')})")

    def finish_if_complete(self) -> bool:
        """Mark the kernel complete when every chunk is covered; drop checkpoints."""
        if not self.done_grid().all():
            return False
        if not self.attrs.get("complete"):
            self.group.attrs["complete"] = True
        shutil.rmtree(self.ckpt_dir, ignore_errors=True)
        return True


#: What a kernel folder holds; removing a kernel removes these and nothing else (its
#: ``.lock`` stays: the lock a removal holds must stay the one the next writer takes).
KERNEL_MEMBERS = ("kernel", ".done", ".checkpoints", "zarr.json", ".locks")


def _holders(path: Path, lock: Path | None = None) -> str:
    """Who holds the region lock ``lock``, or every region lock of the kernel at
    ``path`` (a holder's note is cleared when it lets go)."""
    if lock is not None:
        files = [lock]
    else:
        files = (sorted((path / ".locks").glob("*.lock")) if (path / ".locks").is_dir()
                 else [])
    notes = []
    for f in files:
        with contextlib.suppress(OSError):
            text = f.read_text().strip()
            if text:
                notes.append(text)
    return "; ".join(notes) or "another process"


@contextlib.contextmanager
def _flock(path: Path, mode: int, refusal: str):
    """Hold ``flock(mode)`` on ``path`` (created) for the block; ``refusal`` is the
    error when another process holds a conflicting lock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+")  # noqa: SIM115 -- held for the whole block
    try:
        try:
            fcntl.flock(fh, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            raise KernelOutputError(refusal) from None
        yield fh
    finally:
        fh.close()


@contextlib.contextmanager
def writer_lock(path: Path, region: Tile):
    """Held while a process computes ``region`` of the kernel at ``path``: a shared lock
    on the kernel (many Slurm tasks write disjoint regions at once) and an exclusive one
    on the region, so a second writer of the same region, or a ``--restart`` or
    ``--overwrite`` of the kernel, is refused with one line naming the holder."""
    with _flock(path / ".lock", fcntl.LOCK_SH,
                f"{path}: being removed or replaced by another process (--restart or "
                "--overwrite)"):
        lock = path / ".locks" / f"{region.key}.lock"
        with _flock(lock, fcntl.LOCK_EX,
                    f"{path}: rows {region.r0}:{region.r1}, cols {region.c0}:{region.c1} are "
                    f"being computed by {_holders(path, lock)}") as fh:
            fh.seek(0)
            fh.truncate()
            fh.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                     f"{time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
            fh.flush()
            try:
                yield
            finally:
                fh.seek(0)
                fh.truncate()  # the note names a live holder only


def _remove_kernel(path: Path) -> None:
    """Remove the kernel at ``path``: its own members only, so a file a user keeps in
    the folder stays (and the folder with it). Refused while any process writes it."""
    with _flock(path / ".lock", fcntl.LOCK_EX,
                f"{path}: being computed by {_holders(path)}; --restart/--overwrite "
                "waits until it has stopped"):
        _remove_members(path)


def _remove_members(path: Path) -> None:
    for name in KERNEL_MEMBERS:
        p = path / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


# ------------------------------------------------------------------------- checkpoints

def pass_key(tiles: list[Tile]) -> str:
    return hashlib.sha256("|".join(t.key for t in tiles).encode()).hexdigest()[:16]


def save_checkpoint(path: Path, meta: dict, accs: list[np.ndarray]) -> None:
    """Write the accumulators (float64) and ``meta`` to ``path`` atomically (no pickle)."""
    arrays = {f"acc{i}": a for i, a in enumerate(accs)}
    arrays["meta"] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)
    with atomic_open(path, "wb") as fh:
        np.savez(fh, **arrays)


def load_checkpoint(path: Path) -> tuple[dict, list[np.ndarray]]:
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(z["meta"].tobytes().decode())
        accs = [z[f"acc{i}"] for i in range(len(meta["tiles"]))]
    return meta, accs


class CheckedArray:
    """A kernel array for readers (``top_neighbours`` and the like): row blocks
    ``[a:b]`` of whole chunk rows are read chunk file by chunk file with their checksums
    verified (no codec pipeline, no copy beyond the block); a damaged chunk is one
    line naming its file. Other selections go through Zarr, whose checksum error is
    turned into the same kind of line."""

    def __init__(self, path: Path, array):
        self.path, self.array = Path(path), array
        self.shape, self.chunks, self.dtype = array.shape, array.chunks, array.dtype
        self.layout = raw_layout(array)

    def _damaged(self, where: str) -> KernelOutputError:
        return KernelOutputError(f"{where}: a chunk fails its checksum (the file is "
                                 f"corrupt); `kernelscale verify {self.path} --repair` "
                                 "marks its tile for recomputation")

    def __getitem__(self, sel):
        rows = sel if isinstance(sel, slice) else None
        n, cr = self.shape[0], self.chunks[0]
        if (rows is not None and self.layout is not None and rows.step in (None, 1)):
            a, b, _ = rows.indices(n)
            if a % cr == 0 and (b % cr == 0 or b == n) and a < b:
                return self._rows(a, b)
        try:
            return self.array[sel]
        except ValueError as e:
            if "checksum" not in str(e).lower():
                raise
            raise self._damaged(str(self.path)) from None

    def _rows(self, a: int, b: int) -> np.ndarray:
        (n, m), (cr, cc) = self.shape, self.chunks
        out = np.empty((b - a, m), dtype=np.float32)
        buf = np.empty(cr * cc * 4, dtype=np.uint8)
        chunk = buf.view(np.float32).reshape(cr, cc)
        for i in range(a // cr, -(-b // cr)):
            for j in range(-(-m // cc)):
                path = chunk_path(self.path / "kernel", (i, j))
                try:
                    read_chunk(path, buf.size, 0, buf, self.layout.checksum)
                except ChunkDamaged as e:
                    raise KernelOutputError(f"{e.path}: {e.problem}; `kernelscale verify "
                                            f"{self.path} --repair` marks its tile for "
                                            "recomputation") from None
                r0, c0 = i * cr, j * cc
                rows, cols = min(cr, n - r0), min(cc, m - c0)
                out[r0 - a:r0 - a + rows, c0:c0 + cols] = chunk[:rows, :cols]
        return out


def load_kernel(path: str | os.PathLike, require_complete: bool = True) -> KernelOutput:
    """Open a saved kernel for reading; refuses an unfinished one by default, and one
    whose finished chunks are not all on disk at their size (Zarr would read a missing
    chunk as zeros). Read it through :meth:`KernelOutput.reader`, which turns a checksum
    failure into one line."""
    k = KernelOutput.open(path, mode="r")
    if require_complete and not k.attrs.get("complete"):
        raise KernelOutputError(f"{path}: the kernel is not complete (re-run `kernelscale "
                                "kernel` with the same options to finish it)")
    layout = raw_layout(k.array)
    if layout is not None:
        cr, cc = k.chunks
        want = cr * cc * 4 + (CRC_BYTES if layout.checksum else 0)
        for i, j in zip(*np.nonzero(k.done_grid()), strict=True):
            chunk = chunk_path(Path(path) / "kernel", (int(i), int(j)))
            size = chunk.stat().st_size if chunk.is_file() else None
            if size != want:
                what = "missing" if size is None else f"{size} bytes, not {want}"
                raise KernelOutputError(f"{chunk}: chunk file {what}; `kernelscale verify "
                                        f"{path} --repair` marks its tile for recomputation")
    return k


def describe_kernel(path: str | os.PathLike) -> str:
    k = KernelOutput.open(path, mode="r")
    a = k.attrs
    ident = a.get("identity", {})
    lines = [f"kernel {path}",
             f"  shape {tuple(k.array.shape)} float32 chunks {k.chunks} "
             f"complete {a.get('complete')}",
             f"  pairs {ident.get('pairs')}  runs {ident.get('runs')}  precision "
             f"{ident.get('precision')}  log_softmax {ident.get('log_softmax')}  classes "
             f"{ident.get('classes') or 'all'}",
             f"  store {a.get('store')}  fingerprint {ident.get('store_fingerprint')}",
             f"  kernel fingerprint {k.fingerprint()}"]
    if "zero_variance" in a:
        lines.append("  zero-variance entries: " + "  ".join(
            f"{s} {n}" for s, n in sorted(a["zero_variance"].items())))
    done = k.done_tiles()
    lines.append(f"  finished tiles {len(done)}; checkpoints in flight "
                 f"{len(list(k.ckpt_dir.glob('*.npz'))) if k.ckpt_dir.is_dir() else 0}")
    return "\n".join(lines)
