"""The tile planner: a pure function from shapes and a memory budget to a tile plan.

The output kernel (rows x cols, float32, stored in Zarr chunks of ``chunks``) is cut into
rectangular tiles whose edges lie on chunk edges, so no two tiles (and no two Slurm tasks
running different tiles) ever write the same chunk. Tiles are grouped into *passes*: all
tiles of a pass are resident at once and share one read of the store, so the number of
passes is the number of times the store is read.

Working set of one tile with ``r`` rows, ``c`` cols and a run-chunk of ``k`` runs of ``C``
classes (bytes)::

    r*c*8               float64 accumulator
  + r*c*4               float32 product of one chunk (before it is added to the accumulator)
  + (r + c)*k*C*(16 + in)  raw input, its float64 normalisation, float32 z and its
                           transposed copy (the GPU normalises a whole chunk at once)
  + (r + c)*C*16        float64 mean and 1/std of its rows and columns

Nothing here does I/O; the local loop and the Slurm submitter both call :func:`plan`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import ConfigError


@dataclass(frozen=True, order=True)
class Tile:
    """Output rows ``[r0, r1)`` x cols ``[c0, c1)``."""

    r0: int
    r1: int
    c0: int
    c1: int

    @property
    def rows(self) -> int:
        return self.r1 - self.r0

    @property
    def cols(self) -> int:
        return self.c1 - self.c0

    @property
    def key(self) -> str:
        return f"r{self.r0}-{self.r1}_c{self.c0}-{self.c1}"


@dataclass(frozen=True)
class Plan:
    """Tiles of a region, their grouping into passes, and the run-chunk length."""

    shape: tuple[int, int]  #: full output (rows, cols)
    chunks: tuple[int, int]  #: output Zarr chunk shape
    region: Tile  #: the part of the output this plan covers
    tiles: tuple[Tile, ...]
    passes: tuple[tuple[int, ...], ...]  #: indices into ``tiles``
    run_chunk: int  #: runs folded per step
    budget: int  #: bytes
    classes: int
    in_itemsize: int

    def tile_bytes(self, t: Tile) -> int:
        return tile_bytes(t.rows, t.cols, self.run_chunk, self.classes, self.in_itemsize)

    def pass_bytes(self, p: int) -> int:
        return pass_bytes([self.tiles[i] for i in self.passes[p]], self.run_chunk,
                          self.classes, self.in_itemsize)


def tile_bytes(rows: int, cols: int, run_chunk: int, classes: int, in_itemsize: int = 2) -> int:
    """Device bytes one tile needs (see the module docstring)."""
    return (rows * cols * 12 + (rows + cols) * run_chunk * classes * (16 + in_itemsize)
            + (rows + cols) * classes * 16)


def pass_bytes(tiles: list[Tile], run_chunk: int, classes: int, in_itemsize: int = 2) -> int:
    """Device bytes of a pass: every tile's accumulator, and the operands of the row and
    column spans the pass normalises once for all its tiles."""
    rows = max(t.r1 for t in tiles) - min(t.r0 for t in tiles)
    cols = max(t.c1 for t in tiles) - min(t.c0 for t in tiles)
    return (sum(t.rows * t.cols * 12 for t in tiles)
            + (rows + cols) * run_chunk * classes * (16 + in_itemsize)
            + (rows + cols) * classes * 16)


def _aligned(lo: int, hi: int, step: int, full: int) -> bool:
    return lo % step == 0 and (hi % step == 0 or hi == full)


def _cuts(lo: int, hi: int, chunk: int, size: int) -> list[tuple[int, int]]:
    """Split ``[lo, hi)`` into pieces of ``size`` (a multiple of ``chunk``)."""
    assert size % chunk == 0 or lo + size >= hi
    return [(a, min(a + size, hi)) for a in range(lo, hi, size)]


def plan(shape: tuple[int, int], *, classes: int, budget: int, chunks: tuple[int, int],
         store_run_chunk: int, runs: int, region: Tile | None = None,
         tile: tuple[int, int] | None = None, in_itemsize: int = 2,
         run_chunk: int | None = None, target_reduction: int = 512) -> Plan:
    """Plan the tiles of ``region`` (default: the whole ``shape``).

    ``budget``: device bytes for tiles; ``chunks``: output chunk shape; ``store_run_chunk``:
    the store's chunk length along runs (run-chunks are multiples of it so every store
    chunk is read once per pass); ``runs``: runs to fold in; ``tile``: optional
    (rows, cols) override, multiples of ``chunks``; ``target_reduction``: the GEMM
    reduction length (runs x classes) to aim for per run-chunk. Raises :class:`ConfigError` when the
    region is not chunk-aligned or no tile fits the budget.
    """
    n_rows, n_cols = shape
    cr, cc = chunks
    if n_rows <= 0 or n_cols <= 0 or cr <= 0 or cc <= 0:
        raise ConfigError(f"invalid output shape {shape} or chunks {chunks}")
    region = region or Tile(0, n_rows, 0, n_cols)
    if not (0 <= region.r0 < region.r1 <= n_rows and 0 <= region.c0 < region.c1 <= n_cols):
        raise ConfigError(f"region rows {region.r0}:{region.r1} cols {region.c0}:{region.c1} "
                          f"is empty or outside the {n_rows}x{n_cols} output")
    if not (_aligned(region.r0, region.r1, cr, n_rows)
            and _aligned(region.c0, region.c1, cc, n_cols)):
        raise ConfigError(f"region rows {region.r0}:{region.r1} cols {region.c0}:{region.c1} "
                          f"does not lie on the output chunk grid {cr}x{cc}")
    if run_chunk is None:
        # A reduction length of >= ~512 per GEMM keeps a CPU's matrix units busy; a GPU
        # wants longer reads (more store chunks in flight at once) more than longer GEMMs.
        want = max(1, math.ceil(target_reduction / classes))
        run_chunk = store_run_chunk * max(1, math.ceil(want / store_run_chunk))
    run_chunk = max(1, min(run_chunk, max(runs, 1)))

    def shrink(k: int) -> int:
        # stay a multiple of the store chunk while possible: each store chunk is then
        # read exactly once per pass
        if k > store_run_chunk:
            return max(store_run_chunk, (k // 2) // store_run_chunk * store_run_chunk)
        return max(1, k // 2)

    def fits(r: int, c: int, k: int) -> bool:
        return tile_bytes(r, c, k, classes, in_itemsize) <= budget

    if tile is not None:
        tr, tc = tile
        if tr <= 0 or tc <= 0 or tr % cr or tc % cc:
            raise ConfigError(f"--tile {tr}x{tc} must be positive multiples of the output "
                              f"chunks {cr}x{cc}")
        tr, tc = min(tr, region.rows), min(tc, region.cols)
        while not fits(tr, tc, run_chunk) and run_chunk > 1:
            run_chunk = shrink(run_chunk)
        if not fits(tr, tc, run_chunk):
            raise ConfigError(f"--tile {tr}x{tc} needs {tile_bytes(tr, tc, 1, classes)} B, "
                              f"over the memory budget of {budget} B")
    else:
        tr, tc = _best_tile(region, cr, cc, classes, in_itemsize, budget, run_chunk)
        while tr == 0 and run_chunk > 1:
            run_chunk = shrink(run_chunk)
            tr, tc = _best_tile(region, cr, cc, classes, in_itemsize, budget, run_chunk)
        if tr == 0:
            need = tile_bytes(min(cr, region.rows), min(cc, region.cols), 1, classes,
                              in_itemsize)
            raise ConfigError(f"one output chunk ({cr}x{cc}) needs {need} B, over the "
                              f"memory budget of {budget} B; raise --max-memory or use "
                              "smaller --chunks")
    tiles = tuple(Tile(a, b, c, d)
                  for a, b in _cuts(region.r0, region.r1, cr, tr)
                  for c, d in _cuts(region.c0, region.c1, cc, tc))
    # Consecutive tiles (row-major) share row spans, so greedy grouping in order keeps the
    # operand spans of a pass small.
    passes: list[tuple[int, ...]] = []
    cur: list[int] = []
    for i in range(len(tiles)):
        if cur and pass_bytes([tiles[j] for j in (*cur, i)], run_chunk, classes,
                              in_itemsize) > budget:
            passes.append(tuple(cur))
            cur = []
        cur.append(i)
    passes.append(tuple(cur))
    return Plan(shape, chunks, region, tiles, tuple(passes), run_chunk, budget, classes,
                in_itemsize)


def _best_tile(region: Tile, cr: int, cc: int, classes: int, in_itemsize: int, budget: int,
               run_chunk: int) -> tuple[int, int]:
    """Largest chunk-aligned tile under the budget; (0, 0) if not even one chunk fits.

    Among tiles of the largest area, prefer the fewest tiles; area decides the number of
    passes, which is what costs (each pass reads the store once).
    """
    best = (0, 0, 0, 0)  # (area, -n_tiles, rows, cols)
    n_rb = math.ceil(region.rows / cr)
    n_cb = math.ceil(region.cols / cc)
    for rb in range(n_rb, 0, -1):
        r = min(rb * cr, region.rows)
        lo, hi = 0, n_cb  # binary search the widest column count that fits
        while lo < hi:
            mid = (lo + hi + 1) // 2
            c = min(mid * cc, region.cols)
            if tile_bytes(r, c, run_chunk, classes, in_itemsize) <= budget:
                lo = mid
            else:
                hi = mid - 1
        if lo == 0:
            continue
        c = min(lo * cc, region.cols)
        n_tiles = math.ceil(region.rows / r) * math.ceil(region.cols / c)
        cand = (r * c, -n_tiles, r, c)
        if cand > best:
            best = cand
    return best[2], best[3]
