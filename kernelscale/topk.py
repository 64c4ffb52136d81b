"""The top neighbours of every row of a kernel, read once in row blocks. Pure.

Neighbours are ordered by kernel value, largest first, and equal values by column index,
smallest first; so the top-``k`` set is well defined even with ties and the top-``k`` of
every ``k <= kmax`` is a prefix of the top-``kmax``. :func:`top_neighbours` reads any 2-D
array-like (a Zarr array, an ndarray) once, in row blocks on a thread pool, keeping only
the top-``kmax`` of each row.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError
from .progress import progress

#: target bytes of one block of rows read at once (1024 rows of a 50,000-column kernel).
BLOCK_BYTES = 205 << 20


@dataclass
class Neighbours:
    """Top-``kmax`` train neighbours of each row of a kernel.

    ``values`` float32 (n, kmax), largest first; ``index`` int64 (n, kmax), the columns;
    equal values are ordered by column, smallest first. ``kmax`` may be below the asked
    number when the kernel has fewer columns.
    """

    values: np.ndarray
    index: np.ndarray

    @property
    def kmax(self) -> int:
        return int(self.values.shape[1])

    def __len__(self) -> int:
        return int(self.values.shape[0])

    def rows(self, sel: np.ndarray | slice) -> Neighbours:
        return Neighbours(self.values[sel], self.index[sel])


def _topk_block(block, kmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``kmax`` of each row of ``block`` float32 (b, m), ties to the smaller column.

    ``block``: an ndarray, or a torch tensor on any device (the selection then runs
    there and only the (b, kmax) result and the rows with a tie come to the host).
    ``torch.topk`` finds the set fast but breaks ties arbitrarily; asking for one more
    value shows which rows have a tie across the ``kmax`` boundary, and only those rows are
    completed by a full scan. Ties inside the set are then ordered by a lexsort.
    Returns values float32 and indices int64, (b, min(kmax, m)).
    """
    import torch

    t = torch.from_numpy(block) if isinstance(block, np.ndarray) else block
    b, m = t.shape
    kmax = min(kmax, m)
    kk = min(kmax + 1, m)
    v, i = t.topk(kk, dim=1)
    v, i = v.cpu().numpy(), i.cpu().numpy()
    tied = v[:, kmax] == v[:, kmax - 1] if kk > kmax else np.zeros(b, dtype=bool)
    v, i = np.ascontiguousarray(v[:, :kmax]), np.ascontiguousarray(i[:, :kmax])
    for r in np.flatnonzero(tied):
        row, thr = t[r].cpu().numpy(), v[r, kmax - 1]
        above = np.flatnonzero(row > thr)
        sel = np.concatenate([above, np.flatnonzero(row == thr)[:kmax - above.size]])
        i[r], v[r] = sel, row[sel]
    order = np.lexsort((i, -v), axis=1)
    return (np.take_along_axis(v, order, axis=1),
            np.take_along_axis(i, order, axis=1).astype(np.int64, copy=False))


def tile_neighbours(block, kmax: int, col0: int, *, exclude_row0: int | None = None
                    ) -> Neighbours:
    """Top-``kmax`` of each row of one tile's block of kernel values.

    ``block``: float32 (b, c), an ndarray or a torch tensor on any device, holding the
    kernel's columns ``[col0, col0 + c)``; it is changed in place where the diagonal is
    excluded. ``exclude_row0``: the global index of the block's first row, for a square
    kernel whose own column must never be a neighbour (set to -inf before selecting; if
    the tile is so narrow that it is kept, it becomes an empty slot (-inf, -1)). Returns
    global column indices, ``min(kmax, c)`` per row.
    """
    b, c = block.shape
    diag = None
    if exclude_row0 is not None:
        rows = np.arange(exclude_row0, exclude_row0 + b)
        hit = (rows >= col0) & (rows < col0 + c)
        if hit.any():
            diag = (np.flatnonzero(hit), rows[hit] - col0)
            block[diag] = float("-inf")
    v, i = _topk_block(block, kmax)
    i += col0
    if diag is not None and c <= kmax:
        # every column was kept, the excluded one too (last, at -inf): it stays as an
        # empty slot (-inf, column -1), which any finite value of another tile outranks
        own = i == np.arange(exclude_row0, exclude_row0 + b)[:, None]
        v[own], i[own] = -np.inf, -1
    return Neighbours(np.ascontiguousarray(v, dtype=np.float32), i)


def merge_neighbours(a: Neighbours, b: Neighbours, kmax: int) -> Neighbours:
    """Top-``kmax`` of the union of two row-aligned neighbour sets over disjoint columns.

    The order (value descending, column ascending) is total, so the result does not
    depend on which set came first or how the columns were split: merging the tiles of a
    row in any order gives the same bytes.
    """
    v = np.concatenate([a.values, b.values], axis=1)
    i = np.concatenate([a.index, b.index], axis=1)
    order = np.lexsort((i, -v), axis=1)[:, :kmax]
    return Neighbours(np.take_along_axis(v, order, axis=1),
                      np.take_along_axis(i, order, axis=1))


def default_workers() -> int:
    """Threads reading row blocks: the cores we may use, at most 4 (the reads are I/O)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    return max(1, min(4, n))


def _block_rows(kernel, row_chunk: int | None) -> int:
    if row_chunk:
        return row_chunk
    chunk = getattr(kernel, "chunks", None)
    base = int(chunk[0]) if chunk else 1
    per_row = max(1, int(kernel.shape[1]) * 4)
    # whole storage chunks per block, so no chunk is decoded twice
    return base * max(1, BLOCK_BYTES // (per_row * base))


def top_neighbours(kernel, kmax: int, *, exclude_diagonal: bool = False,
                   row_chunk: int | None = None, workers: int | None = None,
                   show_progress: bool = False) -> Neighbours:
    """Top-``kmax`` neighbours of every row of a 2-D array-like (a Zarr array, ndarray).

    Row blocks (whole storage chunks, ~200 MB) are read and reduced on ``workers``
    threads; memory holds at most ``workers`` blocks plus the (n, kmax) result.
    ``exclude_diagonal``: column ``i`` is never a neighbour of row ``i`` (leave-one-out
    on a train x train kernel).
    """
    n, m = (int(s) for s in kernel.shape)
    if kmax < 1:
        raise ConfigError(f"k must be >= 1, not {kmax}")
    kmax = min(kmax, m - 1 if exclude_diagonal else m)
    if kmax < 1:
        raise ConfigError(f"the kernel has {m} column(s): no neighbour to choose")
    rows = _block_rows(kernel, row_chunk)
    vals = np.empty((n, kmax), dtype=np.float32)
    idx = np.empty((n, kmax), dtype=np.int64)
    # a bar only where reading takes a while: more than a few blocks
    bar = progress(n, "neighbours", "row", enabled=show_progress and n > 4 * rows)

    def work(s: int) -> int:
        e = min(s + rows, n)
        block = np.ascontiguousarray(kernel[s:e], dtype=np.float32)
        if exclude_diagonal:
            r = np.arange(s, min(e, m))
            block[r - s, r] = -np.inf
        vals[s:e], idx[s:e] = _topk_block(block, kmax)
        return e - s

    try:
        with ThreadPoolExecutor(max_workers=workers or default_workers(),
                                thread_name_prefix="kernelscale-topk") as ex:
            # map() submits every block, but a block's memory exists only while a
            # worker holds it, so at most ``workers`` blocks are alive at once.
            for done in ex.map(work, range(0, n, rows)):
                bar.update(done)
    finally:
        bar.close()
    return Neighbours(vals, idx)
