"""The tile planner: a pure function from shapes and a memory budget to a tile plan.

The output kernel (rows x cols, float32, stored in Zarr chunks of ``chunks``) is cut into
rectangular tiles whose edges lie on chunk edges, so no two tiles (and no two Slurm tasks
running different tiles) ever write the same chunk. Tiles are grouped into *passes*: all
tiles of a pass are resident at once and share one read of the store, so the number of
passes is the number of times the store is read.

Working set of one tile with ``r`` rows, ``c`` cols and a run-chunk of ``k`` runs of ``C``
classes (bytes)::

    r*c*8               float64 accumulator
  + r*c*4               float32 product of one chunk (before it is added to the
                        accumulator); the final write reuses these 4 bytes per element
                        for one block of rows at a time in float32
  + (r + c)*kp*4        float32 GEMM operands, kp = k*C padded to the device's multiple
  + (r + c)*k*C*3*in    raw input in the store dtype: two device buffers (one being
                        copied while the other is normalised) and the one being read
  + (r + c)*C*16        float64 mean and 1/std of its rows and columns
  + reserve             fixed temporaries (the float64 normalisation blocks)

Nothing here does I/O; the local loop and the Slurm submitter both call :func:`plan`.
:class:`ArrayPlan` groups a plan's tiles into rectangular *regions* of whole tiles
(:func:`group_regions`), one per Slurm array task: each task computes its region with
the plan's tile shape, so its tiles are exactly the tiles of a single-process run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import ConfigError
from .units import format_bytes


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
    runs_per_step: int  #: runs folded per step
    budget: int  #: bytes
    classes: int
    in_itemsize: int
    pad: int = 1  #: operand columns padded to a multiple of this
    reserve: int = 0  #: bytes of fixed temporaries, within the budget
    raw_classes: int | None = None  #: classes of the raw input (default ``classes``)

    def tile_bytes(self, t: Tile) -> int:
        return tile_bytes(t.rows, t.cols, self.runs_per_step, self.classes, self.in_itemsize,
                          self.pad, self.raw_classes)

    def pass_bytes(self, p: int) -> int:
        """Device bytes of pass ``p``, fixed temporaries included."""
        return pass_bytes([self.tiles[i] for i in self.passes[p]], self.runs_per_step,
                          self.classes, self.in_itemsize, self.pad,
                          self.raw_classes) + self.reserve


def _operand_bytes(examples: int, runs_per_step: int, classes: int, in_itemsize: int,
                   pad: int, raw_classes: int | None = None) -> int:
    width = -(-runs_per_step * classes // pad) * pad
    raw = runs_per_step * (raw_classes or classes) * 3 * in_itemsize
    return examples * (width * 4 + raw + classes * 16)


def tile_bytes(rows: int, cols: int, runs_per_step: int, classes: int, in_itemsize: int = 2,
               pad: int = 1, raw_classes: int | None = None) -> int:
    """Device bytes one tile needs, fixed temporaries aside (see the module docstring).
    ``raw_classes``: classes of the raw input when only ``classes`` of them are used."""
    return rows * cols * 12 + _operand_bytes(rows + cols, runs_per_step, classes,
                                             in_itemsize, pad, raw_classes)


def pass_bytes(tiles: list[Tile], runs_per_step: int, classes: int, in_itemsize: int = 2,
               pad: int = 1, raw_classes: int | None = None) -> int:
    """Device bytes of a pass: every tile's accumulator, and the operands of the row and
    column spans the pass normalises once for all its tiles."""
    rows = max(t.r1 for t in tiles) - min(t.r0 for t in tiles)
    cols = max(t.c1 for t in tiles) - min(t.c0 for t in tiles)
    return (sum(t.rows * t.cols * 12 for t in tiles)
            + _operand_bytes(rows + cols, runs_per_step, classes, in_itemsize, pad,
                             raw_classes))


def _aligned(lo: int, hi: int, step: int, full: int) -> bool:
    return lo % step == 0 and (hi % step == 0 or hi == full)


def _cuts(lo: int, hi: int, chunk: int, size: int) -> list[tuple[int, int]]:
    """Split ``[lo, hi)`` into pieces of ``size`` (a multiple of ``chunk``)."""
    assert size % chunk == 0 or lo + size >= hi
    return [(a, min(a + size, hi)) for a in range(lo, hi, size)]


def plan(shape: tuple[int, int], *, classes: int, budget: int, chunks: tuple[int, int],
         store_run_chunk: int, runs: int, region: Tile | None = None,
         tile: tuple[int, int] | None = None, in_itemsize: int = 2,
         runs_per_step: int | None = None, target_reduction: int = 512, pad: int = 1,
         reserve: int = 0, raw_classes: int | None = None) -> Plan:
    """Plan the tiles of ``region`` (default: the whole ``shape``).

    ``budget``: device bytes for tiles; ``chunks``: output chunk shape; ``store_run_chunk``:
    the store's chunk length along runs (run-chunks are multiples of it so every store
    chunk is read once per pass); ``runs``: runs to fold in; ``tile``: optional
    (rows, cols) override, multiples of ``chunks``; ``target_reduction``: the GEMM
    reduction length (runs x classes) to aim for per run-chunk; ``pad``: operand columns
    are padded to a multiple of it; ``reserve``: bytes of the budget taken by fixed
    temporaries; ``raw_classes``: classes of the raw input when only ``classes`` of them
    enter the kernel (the raw buffers, and so the run-chunk length, follow them). Raises :class:`ConfigError` when the
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
    room = budget - reserve
    if room <= 0:
        raise ConfigError(f"the memory budget of {format_bytes(budget)} does not hold the "
                          f"engine's fixed temporaries ({format_bytes(reserve)}); raise "
                          "--max-memory")
    if runs_per_step is None:
        # enough runs for the target reduction, in whole store chunks
        want = max(1, math.ceil(target_reduction / max(classes, raw_classes or 0)))
        runs_per_step = store_run_chunk * max(1, math.ceil(want / store_run_chunk))
    runs_per_step = max(1, min(runs_per_step, max(runs, 1)))

    def shrink(k: int) -> int:
        # stay a multiple of the store chunk while possible: each store chunk is then
        # read exactly once per pass
        if k > store_run_chunk:
            return max(store_run_chunk, (k // 2) // store_run_chunk * store_run_chunk)
        return max(1, k // 2)

    def fits(r: int, c: int, k: int) -> bool:
        return tile_bytes(r, c, k, classes, in_itemsize, pad, raw_classes) <= room

    if tile is not None:
        tr, tc = tile
        if tr <= 0 or tc <= 0 or tr % cr or tc % cc:
            raise ConfigError(f"--tile {tr}x{tc} must be positive multiples of the output "
                              f"chunks {cr}x{cc}")
        tr, tc = min(tr, region.rows), min(tc, region.cols)
        while not fits(tr, tc, runs_per_step) and runs_per_step > 1:
            runs_per_step = shrink(runs_per_step)
        if not fits(tr, tc, runs_per_step):
            raise ConfigError(f"--tile {tr}x{tc} needs "
                              f"{format_bytes(tile_bytes(tr, tc, 1, classes) + reserve)}, "
                              "over the "
                              f"memory budget of {format_bytes(budget)}")
    else:
        tr, tc = _best_tile(region, cr, cc, classes, in_itemsize, room, runs_per_step, pad,
                            raw_classes)
        while tr == 0 and runs_per_step > 1:
            runs_per_step = shrink(runs_per_step)
            tr, tc = _best_tile(region, cr, cc, classes, in_itemsize, room, runs_per_step, pad,
                                raw_classes)
        if tr == 0:
            need = tile_bytes(min(cr, region.rows), min(cc, region.cols), 1, classes,
                              in_itemsize, pad, raw_classes) + reserve
            raise ConfigError(f"one output chunk ({cr}x{cc}) needs {format_bytes(need)}, over "
                              f"the memory budget of {format_bytes(budget)}; raise --max-memory or use "
                              "smaller --chunks")
    tiles = tuple(Tile(a, b, c, d)
                  for a, b in _cuts(region.r0, region.r1, cr, tr)
                  for c, d in _cuts(region.c0, region.c1, cc, tc))
    # Consecutive tiles (row-major) share row spans, so greedy grouping in order keeps the
    # operand spans of a pass small.
    passes: list[tuple[int, ...]] = []
    cur: list[int] = []
    for i in range(len(tiles)):
        if cur and pass_bytes([tiles[j] for j in (*cur, i)], runs_per_step, classes,
                              in_itemsize, pad, raw_classes) > room:
            passes.append(tuple(cur))
            cur = []
        cur.append(i)
    passes.append(tuple(cur))
    return Plan(shape, chunks, region, tiles, tuple(passes), runs_per_step, budget, classes,
                in_itemsize, pad, reserve, raw_classes)


def _best_tile(region: Tile, cr: int, cc: int, classes: int, in_itemsize: int, budget: int,
               runs_per_step: int, pad: int = 1,
               raw_classes: int | None = None) -> tuple[int, int]:
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
            if tile_bytes(r, c, runs_per_step, classes, in_itemsize, pad,
                          raw_classes) <= budget:
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


# ------------------------------------------------------------------ regions

@dataclass
class ArrayPlan:
    """The tiles of the whole output and their grouping into regions, one per array task
    (or any other worker): no two regions share an output chunk."""

    shape: tuple[int, int]
    chunks: tuple[int, int]
    tile: tuple[int, int]
    budget: int
    tiles: list[Tile]
    regions: list[Tile]  #: region i is computed by array index i
    geometry_from: str  #: where the output shape was learnt (store, simulate, source)

    def tiles_in(self, r: Tile) -> list[Tile]:
        return [t for t in self.tiles
                if r.r0 <= t.r0 and t.r1 <= r.r1 and r.c0 <= t.c0 and t.c1 <= r.c1]

    def as_json(self) -> dict:
        return {"shape": list(self.shape), "chunks": list(self.chunks),
                "tile": list(self.tile), "budget": self.budget,
                "tiles": [[t.r0, t.r1, t.c0, t.c1] for t in self.tiles],
                "regions": [[t.r0, t.r1, t.c0, t.c1] for t in self.regions],
                "geometry_from": self.geometry_from}

    @classmethod
    def from_json(cls, d: dict) -> ArrayPlan:
        return cls(tuple(d["shape"]), tuple(d["chunks"]), tuple(d["tile"]), int(d["budget"]),
                   [Tile(*t) for t in d["tiles"]], [Tile(*t) for t in d["regions"]],
                   d.get("geometry_from", ""))


def split_tile(rows: int, cols: int, chunks: tuple[int, int], tile: tuple[int, int],
               tasks: int) -> tuple[int, int]:
    """A tile no larger than ``tile``, on the chunk grid, giving >= ``tasks`` tiles if it can.

    Among the tiles that do: the one giving the fewest tiles, then the smallest (tiles at
    the edges are cut short, so for a given count the smallest tile spreads the work most
    evenly), then the squarest (a task reads ``rows + cols`` examples of every run, so for
    a given area a square tile reads least).
    """
    cr, cc = chunks
    best = None
    for tr in range(cr, min(tile[0], round_up(rows, cr)) + 1, cr):
        for tc in range(cc, min(tile[1], round_up(cols, cc)) + 1, cc):
            n = math.ceil(rows / tr) * math.ceil(cols / tc)
            key = (n < tasks, n if n >= tasks else -n, tr * tc, tr + tc)
            if best is None or key < best[0]:
                best = (key, (tr, tc))
    return best[1] if best is not None else tile


def round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def group_regions(tiles: list[Tile], tasks: int) -> list[Tile]:
    """Group the tile grid into at most ``tasks`` rectangles of whole tiles (row-major).

    Of the groupings with at most ``tasks`` groups, the one with the most groups, then
    with the smallest largest group perimeter (what one task reads).
    """
    rows = sorted({(t.r0, t.r1) for t in tiles})
    cols = sorted({(t.c0, t.c1) for t in tiles})
    nr, nc = len(rows), len(cols)
    if nr * nc <= tasks:
        return sorted(tiles)
    best = None
    for gr in range(1, nr + 1):
        for gc in range(1, nc + 1):
            n = math.ceil(nr / gr) * math.ceil(nc / gc)
            if n > tasks:
                continue
            key = (-n, gr + gc)
            if best is None or key < best[0]:
                best = (key, gr, gc)
    _, gr, gc = best
    out = []
    for i in range(0, nr, gr):
        for j in range(0, nc, gc):
            r = rows[i:i + gr]
            c = cols[j:j + gc]
            out.append(Tile(r[0][0], r[-1][1], c[0][0], c[-1][1]))
    return out
