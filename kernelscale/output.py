"""The kernel output format: a Zarr v3 group with the kernel, its identity, done-markers
and checkpoints.

Layout of ``KERNEL/`` (a full kernel)::

    zarr.json                  group attributes: schema, identity, complete, store, runs
    kernel                     float32 (rows, cols), dimension names from the pairs
                               (DIMENSION_NAMES: test-train -> test, train)
    .done/<tile>.json          one per finished tile (atomic), written after its data

A top-K kernel (identity key ``topk``) holds, instead of ``kernel``::

    values                     float32 (rows, K): each row's K largest kernel values,
                               largest first, equal values by column index
    indices                    int64 (rows, K): their columns
    .partial/<tile>@r<row>.npz per finished tile and grid chunk row: the top-K of those
                               rows over its columns (atomic, no pickle); merged into
                               values/indices when every tile is done, then removed

Its tiles, done-markers and regions follow the chunk grid ``grid_chunks`` of the full
kernel it stands for, so the planner, the Slurm array and the markers are the same as a
full kernel's. A square top-K kernel (train-train, test-test) never lists a row's own
column: the diagonal is excluded while each tile is reduced.
    .checkpoints/pass-*.npz    accumulators of passes in flight (atomic, no pickle)
    .lock                      shared by every writer, exclusive for a removal (flock)
    .locks/<region>.lock       exclusive per region being computed; names its holder

The identity (store fingerprint, runs, pairs, precision, transform, classes, shape) is
what a partial output, a checkpoint or a done-marker must match to be reused.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

from .atomic import atomic_open, atomic_write_json, check_output_dir, read_json
from .errors import CheckpointMismatchError, KernelOutputError
from .locks import flock_or_refuse, lock_holders
from .plan import Tile
from .rawchunks import (
    chunk_path,
    raw_layout,
    write_chunk,
)
from .topk import Neighbours, merge_neighbours

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
    """The output Zarr group: array ``kernel`` (or ``values``/``indices`` of a top-K
    kernel), identity attributes, done markers, checkpoints.

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
    def topk(self) -> int | None:
        """K of a top-K kernel; None for a full kernel."""
        k = self.attrs.get("identity", {}).get("topk")
        return int(k) if k else None

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) of the kernel (of the full kernel a top-K kernel stands for)."""
        if self.topk:
            return tuple(int(x) for x in self.attrs["identity"]["shape"])  # type: ignore
        return tuple(int(x) for x in self.array.shape)  # type: ignore[return-value]

    @property
    def array(self) -> zarr.Array:
        if self.topk:
            raise KernelOutputError(f"{self.path}: a top-{self.topk} kernel holds each row's "
                                    f"{self.topk} nearest columns, not the full matrix")
        return self.group["kernel"]

    @property
    def chunks(self) -> tuple[int, int]:
        """The chunk grid of tiles and done-markers (a top-K kernel's ``grid_chunks``)."""
        if self.topk:
            return tuple(int(x) for x in self.attrs["grid_chunks"])  # type: ignore
        return tuple(self.array.chunks)  # type: ignore[return-value]

    @classmethod
    def open(cls, path: str | os.PathLike, mode: str = "r") -> KernelOutput:
        path = Path(path)
        try:
            g = zarr.open_group(str(path), mode=mode, zarr_format=3)
        except Exception:
            raise KernelOutputError(f"{path}: not a kernel (no readable Zarr group)") from None
        topk = g.attrs.get("identity", {}).get("topk") if g.attrs.get("schema") else None
        members = ("values", "indices") if topk else ("kernel",)
        if g.attrs.get("schema") != KERNEL_SCHEMA or any(m not in g for m in members):
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
        attrs = {"schema": KERNEL_SCHEMA, "schema_version": KERNEL_SCHEMA_VERSION,
                 "identity": identity, "complete": False}
        if identity.get("topk"):
            create_topk_arrays(g, shape[0], int(identity["topk"]), chunks[0], dims[0])
            attrs["grid_chunks"] = list(chunks)
        else:
            g.create_array("kernel", shape=shape, chunks=chunks, dtype="float32",
                           compressors=[Crc32cCodec()], fill_value=0.0,
                           dimension_names=dims)
        g.attrs.update(attrs)
        return cls(path, g)

    def write_chunk_row(self, i: int, j0: int, chunks: np.ndarray, rows: int,
                        cols: int) -> None:
        """Store the float32 ``chunks`` (m, cr, cc), chunk-major: chunks ``(i, j0 + j)``
        of the kernel, whose first ``rows`` rows and ``cols`` columns (counted across the
        m chunks) are values; the rest, past the array's edge, must be zeros (the fill).

        Each chunk is already contiguous: a plain-bytes array (every kernel this module
        creates) stores it as one file with no copy; anything else goes through Zarr.
        """
        cr, cc = self.chunks
        layout = raw_layout(self.array)
        if layout is None or chunks.dtype != np.float32:
            block = chunks.transpose(1, 0, 2).reshape(cr, -1)[:rows, :cols]
            self.write_block(i * cr, i * cr + rows, j0 * cc, j0 * cc + cols, block)
            return
        for j in range(chunks.shape[0]):
            write_chunk(chunk_path(self.path / "kernel", (i, j0 + j)), chunks[j],
                        layout.checksum)

    def write_block(self, r0: int, r1: int, c0: int, c1: int, block: np.ndarray) -> None:
        """Store ``block`` (r1-r0, c1-c0) at rows ``[r0, r1)``, cols ``[c0, c1)`` through
        Zarr: any block, on the chunk grid or not, of any kernel array."""
        self.array[r0:r1, c0:c1] = block

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

    def markers(self) -> list[dict]:
        """The done-markers of this kernel's identity (an earlier kernel's at this path
        are ignored), in file name order."""
        out = []
        ident = self.attrs.get("identity")
        if self.done_dir.is_dir():
            for p in sorted(self.done_dir.glob("*.json")):
                try:
                    d = read_json(p)
                except (OSError, ValueError):
                    continue  # a torn marker cannot exist (atomic); a foreign file is ignored
                if isinstance(d, dict) and d.get("identity") == ident:
                    out.append(d)
        return out

    def done_tiles(self) -> list[Tile]:
        return [Tile(*d["tile"]) for d in self.markers()]

    def done_grid(self) -> np.ndarray:
        """bool (row chunks, col chunks): chunks covered by some finished tile."""
        (n, m), (cr, cc) = self.shape, self.chunks
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
        (n_rows, n_cols), (cr, cc) = self.shape, self.chunks
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
        """Mark the kernel complete when every chunk is covered; drop checkpoints. A
        top-K kernel first merges its tiles' partial top-Ks into ``values``/``indices``
        (one finisher at a time: Slurm tasks finishing together wait for each other)."""
        if not self.done_grid().all():
            return False
        if self.topk and not self.attrs.get("complete"):
            lock = self.path / ".locks" / "finish.lock"
            lock.parent.mkdir(parents=True, exist_ok=True)
            with open(lock, "a+") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX)  # waits: another finisher does the same work
                self.group = zarr.open_group(str(self.path), mode="r+", zarr_format=3)
                if not self.attrs.get("complete"):
                    merge_partials(self)
                    self.group.attrs["complete"] = True
        elif not self.attrs.get("complete"):
            self.group.attrs["complete"] = True
        shutil.rmtree(self.ckpt_dir, ignore_errors=True)
        # merged into values/indices, which the attribute above now vouches for
        shutil.rmtree(self.partial_dir, ignore_errors=True)
        return True

    # top-K partials -----------------------------------------------------------------
    @property
    def partial_dir(self) -> Path:
        return self.path / ".partial"

    def partial_path(self, t: Tile, r0: int) -> Path:
        """The file of tile ``t``'s partial top-K for its rows from ``r0`` (one grid chunk
        row): ``.partial/<tile>@r<r0>.npz``."""
        return self.partial_dir / f"{t.key}@r{r0}.npz"

    def partial_rows(self, t: Tile) -> list[tuple[int, int]]:
        """The row spans of tile ``t``'s partial files: its grid chunk rows."""
        step = self.chunks[0]
        return [(r, min(r + step, t.r1)) for r in range(t.r0, t.r1, step)]

    def save_partial(self, t: Tile, nb: Neighbours) -> None:
        """Store the top-K ``nb`` of tile ``t``'s rows over its columns, values float32
        and indices int64 (t.rows, <= K): one file per grid chunk row (atomic, no pickle,
        zip CRC-32 per array), so that merging a row chunk reads only its own rows."""
        for r0, r1 in self.partial_rows(t):
            with atomic_open(self.partial_path(t, r0), "wb") as fh:
                np.savez(fh, values=nb.values[r0 - t.r0:r1 - t.r0],
                         indices=nb.index[r0 - t.r0:r1 - t.r0])

    def load_partial(self, t: Tile, r0: int, r1: int) -> Neighbours:
        """Tile ``t``'s partial top-K of rows ``[r0, r1)`` (one of :meth:`partial_rows`)."""
        p = self.partial_path(t, r0)
        hint = f"`kernelscale verify {self.path} --repair` marks the tile for recomputation"
        try:
            with np.load(p, allow_pickle=False) as z:
                v, i = z["values"], z["indices"]
        except FileNotFoundError:
            raise KernelOutputError(f"{p}: the partial top-K of a finished tile is "
                                    f"missing; {hint}") from None
        except Exception as e:  # zipfile's CRC check, a torn or foreign file
            raise KernelOutputError(f"{p}: unreadable partial top-K ({_first_line(e)}); "
                                    f"{hint}") from None
        if v.shape != i.shape or v.shape[0] != r1 - r0 or v.dtype != np.float32:
            raise KernelOutputError(f"{p}: partial top-K of shape {v.shape}, not "
                                    f"({r1 - r0}, <= {self.topk}) float32; {hint}")
        return Neighbours(v, i.astype(np.int64, copy=False))


def _first_line(e: Exception) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text[:160]


def create_topk_arrays(g: zarr.Group, rows: int, k: int, row_chunk: int, dim: str) -> None:
    """Arrays ``values`` float32 and ``indices`` int64 (rows, k), chunks (row_chunk, k),
    checksummed like every array kernelscale writes."""
    for name, dtype, fill in (("values", "float32", 0.0), ("indices", "int64", -1)):
        g.create_array(name, shape=(rows, k), chunks=(min(row_chunk, rows), k), dtype=dtype,
                       compressors=[Crc32cCodec()], fill_value=fill,
                       dimension_names=(dim, "neighbour"))


def merge_partials(out: KernelOutput) -> None:
    """Write ``values``/``indices`` of a top-K kernel from its tiles' partial top-Ks.

    Row chunk by row chunk, each finished tile's partial of those rows is merged into a
    running top-K (memory: the rows' running top-K and one partial, whatever the number
    of columns). The top-K of a union under the total order (value descending, column
    ascending) does not depend on the order of the merges, so region tasks and resumed
    runs give the same bytes. A row chunk none of whose tiles has a partial was merged by
    an earlier finish (its partials are removed once the kernel is complete; a repair
    recomputes every tile of the rows it rebuilds), and is kept as it is.
    """
    k = out.topk
    n = out.shape[0]
    step = int(out.group["values"].chunks[0])
    tiles = sorted(out.done_tiles())
    for r0 in range(0, n, step):
        r1 = min(r0 + step, n)
        # tile edges lie on the grid, whose row chunks are the values' row chunks: a tile
        # holds either all of these rows or none
        cover = [t for t in tiles if t.r0 < r1 and t.r1 > r0]
        have = [out.partial_path(t, r0).is_file() for t in cover]
        if cover and not any(have):
            continue
        run = None
        for t in cover:
            part = out.load_partial(t, r0, r1)
            run = part if run is None else merge_neighbours(run, part, k)
        if run is None or len(run) != r1 - r0:
            raise KernelOutputError(f"{out.path}: rows {r0}:{r1} are not covered by finished "
                                    "tiles")
        out.group["values"][r0:r1] = run.values
        out.group["indices"][r0:r1] = run.index


#: What a kernel folder holds; removing a kernel removes these and nothing else (its
#: ``.lock`` stays: the lock a removal holds must stay the one the next writer takes).
KERNEL_MEMBERS = ("kernel", "values", "indices", ".partial", ".done", ".checkpoints",
                  "zarr.json", ".locks")


def _remove_kernel(path: Path) -> None:
    """Remove the kernel at ``path``: its own members only, so a file a user keeps in
    the folder stays (and the folder with it). Refused while any process writes it."""
    with flock_or_refuse(path / ".lock", fcntl.LOCK_EX,
                f"{path}: being computed by {lock_holders(path)}; --restart/--overwrite "
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
