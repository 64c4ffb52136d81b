"""The kernel engine: stream run-chunks from the store into tiled GEMMs, with checkpoints.

Definition (``C`` classes, ``R`` runs; std is the unbiased one; 1/R as in the reference)::

    x[r,i,c] = log_softmax(logits[r,i,:])[c]                     (the store's transform)
    z[r,i,c] = (x[r,i,c] - mean_r x[.,i,c]) / std_r x[.,i,c]     (0 where std == 0)
    K[i,j]   = 1/(C R) * sum_{r,c} z_rows[r,i,c] * z_cols[r,j,c]

With the classes folded into the reduction dimension, ``K`` is one GEMM of
``Z_rows (n_rows, R*C)`` by ``Z_cols^T``; the engine folds it in run-chunks of ``k`` runs:
``acc_tile += Z_rows[tile, chunk] @ Z_cols[tile, chunk]^T``.

Numerics: each chunk's GEMM runs in float32 (reduction length ``k*C``, a few hundred to a
few thousand), and chunk results are summed into a float64 accumulator. The rounding error
of a chunk product is bounded by ``~k*C*u32*sum|z z|`` and the sum over chunks adds only
``~(R/k)*u64`` relative error, so the total stays at the level of one chunk's float32 GEMM
no matter how many runs are folded in -- with float32 accumulation it would grow with R.
The log-softmax keeps every class's relative precision (float32 with the top class through
``log1p`` of the others' sum, :func:`~kernelscale.stats.log_softmax_log1p32`; float64
``log_softmax`` in stores from before it); statistics and standardisation are float64;
only the standardised values z (O(1), relative rounding 6e-8) enter the float32 GEMM. The
published code's float32 ``log_softmax`` rounds the top class of a confident prediction
(log-softmax ~1e-8) through ``log(1 + s)``, losing exactly the variation the
standardisation then amplifies: on simulated
confident logits (2000 runs, 1000 x 5000) the published float32 method is 6.1e-3 from
the float64 evaluation of the formula (top-3 sets 99.3% equal), this engine 1.0e-7
(100%). ``log_softmax_fp32`` reproduces the published method for comparisons with its
numbers.

Resumability: the state of a pass is (accumulators of its tiles, number of runs folded).
Chunk boundaries are fixed by the plan, so a resumed pass performs exactly the same
operations as an uninterrupted one and, on the same device and thread count, gives a
bitwise-identical kernel. The output format (array, done-markers, checkpoints) is
:mod:`kernelscale.output`.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .accumulate import (
    CpuSteps,
    CudaSteps,
    on_device,
    operand_padding,
    reduce_tiles,
    target_reduction,
    write_tiles,
)
from .device import (
    default_budget,
    describe_device_change,
    device_info,
    is_out_of_memory,
    limit_heap_arenas,
    matmul_precision,
    release_free_memory,
    resolve_device,
)
from .errors import (
    CheckpointMismatchError,
    ConfigError,
    Interrupted,
    KernelOutputError,
    KernelscaleError,
    StoreError,
)
from .locks import writer_lock
from .normalise import Normaliser
from .output import (
    DEFAULT_CHUNKS,
    PAIRS,
    KernelOutput,
    load_checkpoint,
    pass_key,
    save_checkpoint,
)
from .plan import Plan, Tile, pass_bytes, plan
from .progress import progress
from .reader import ChunkReader
from .signals import StopFlag, stop_on_signals
from .stats import FLOAT64, RunningStats, stats_of_logits, value_transform
from .store import Store
from .units import format_bytes

log = logging.getLogger("kernelscale.kernel")

PRECISIONS = ("fp32", "tf32")


@dataclass
class KernelConfig:
    """Everything one kernel computation needs; validated by :meth:`validate`."""

    store: Path
    out: Path
    runs: int | None = None
    pairs: str = "test-train"
    device: str = "auto"
    precision: str = "fp32"
    max_memory: int | None = None
    tile: tuple[int, int] | None = None
    chunks: tuple[int, int] | None = None
    rows: tuple[int, int] | None = None
    cols: tuple[int, int] | None = None
    checkpoint_every: float = 600.0
    log_softmax: bool = True
    #: evaluate the log-softmax in float32 as the published code does (reproduces its
    #: numbers; see the module docstring for the error this costs)
    log_softmax_fp32: bool = False
    classes: tuple[int, ...] | None = None
    overwrite: bool = False
    restart: bool = False
    show_progress: bool = True
    runs_per_step: int | None = None  #: runs folded per GEMM step (default: planned)
    #: keep each row's K largest values (a top-K kernel) instead of the full matrix
    topk: int | None = None

    def validate(self) -> None:
        if self.pairs not in PAIRS:
            raise ConfigError(f"--pairs must be one of {', '.join(PAIRS)}, not {self.pairs!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, not "
                              f"{self.precision!r} (bf16 changes ~11% of top-3 neighbour "
                              "sets and is not offered)")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"--device must be auto, cpu or cuda, not {self.device!r}")
        if self.runs is not None and self.runs < 2:
            raise ConfigError(f"--runs {self.runs}: the kernel needs at least 2 runs")
        if self.checkpoint_every <= 0:
            raise ConfigError("--checkpoint-every must be positive")
        if self.max_memory is not None and self.max_memory <= 0:
            raise ConfigError("--max-memory must be positive")
        if self.topk is not None and self.topk < 1:
            raise ConfigError(f"--topk {self.topk}: must be at least 1")


@dataclass
class KernelSummary:
    out: str
    pairs: str
    shape: tuple[int, int]
    runs: int
    device: str
    precision: str
    tiles: int = 0
    tiles_skipped: int = 0
    passes: int = 0
    bytes_read: int = 0
    t_read: float = 0.0
    t_wait: float = 0.0
    t_normalise: float = 0.0
    t_gemm: float = 0.0
    t_write: float = 0.0
    t_checkpoint: float = 0.0
    seconds: float = 0.0
    flops: float = 0.0
    complete: bool = False
    resumed_from_runs: int = 0
    zero_variance: dict = field(default_factory=dict)

    def line(self) -> str:
        s = max(self.seconds, 1e-9)
        return (f"kernel: {self.pairs} {self.shape[0]}x{self.shape[1]} runs {self.runs} "
                f"tiles {self.tiles} (skipped {self.tiles_skipped}) passes {self.passes} "
                f"read {format_bytes(self.bytes_read)}; seconds read {self.t_read:.2f} "
                f"(waited {self.t_wait:.2f}) normalise {self.t_normalise:.2f} gemm "
                f"{self.t_gemm:.2f} write {self.t_write:.2f} checkpoint {self.t_checkpoint:.2f}"
                f" total {self.seconds:.2f}; {format_bytes(self.bytes_read / s)}/s "
                f"{self.flops / s / 1e12:.3f} TFLOP/s on {self.device} {self.precision}")


# ------------------------------------------------------------------------ statistics

def split_stats(store: Store, split: str, runs: int, transform: str,
                show_progress: bool = False) -> RunningStats:
    """Statistics of ``transform`` values of the first ``runs`` runs of ``split``
    (float64, (examples, classes)).

    The store's own statistics cover all its runs of its own transform; any other
    request (a prefix of runs, or an ablation) streams the runs once more.
    """
    if runs == store.runs and transform == store.transform:
        return store.stats(split)
    st = RunningStats.empty(store.shape.examples(split), store.shape.classes)
    step = store.shape.run_chunk
    bar = progress(runs, f"stats {split}", "run", enabled=show_progress)
    for s in range(0, runs, step):
        e = min(s + step, runs)
        st = st.merge(stats_of_logits(store.read(split, s, e), transform))
        bar.update(e - s)
    bar.close()
    return st


# ------------------------------------------------------------------ what a config means

def _check_range(rng: tuple[int, int] | None, n: int, what: str) -> tuple[int, int]:
    if rng is None:
        return (0, n)
    a, b = rng
    if not 0 <= a < b <= n:
        raise ConfigError(f"--{what} {a}:{b} is outside 0:{n}")
    return (a, b)


@dataclass
class KernelSetup:
    """What a :class:`KernelConfig` means for a given store (no computation yet)."""

    store: Store
    runs: int
    classes: list[int] | None
    shape: tuple[int, int]
    region: Tile
    identity: dict
    transform: str  #: the value transform (:mod:`kernelscale.stats`)

    @property
    def n_classes(self) -> int:
        return len(self.classes) if self.classes is not None else self.store.shape.classes


def setup_kernel(cfg: KernelConfig) -> KernelSetup:
    """Validate ``cfg`` against its store: runs, classes, output shape, region, identity.

    The identity (store fingerprint, runs, pairs, precision, transform, classes, shape)
    is what a partial output, a checkpoint or a done-marker must match to be reused.
    """
    cfg.validate()
    store = Store.open(cfg.store, mode="r")
    if store.runs < 2:
        raise StoreError(f"{cfg.store}: holds {store.runs} run(s); the kernel needs >= 2")
    runs = cfg.runs if cfg.runs is not None else store.runs
    if runs > store.runs:
        raise ConfigError(f"--runs {runs} is larger than the {store.runs} runs "
                          f"{cfg.store} holds")
    C = store.shape.classes
    classes = sorted(set(cfg.classes)) if cfg.classes is not None else None
    if classes is not None and (not classes or classes[0] < 0 or classes[-1] >= C):
        raise ConfigError(f"--class must lie in [0, {C})")
    rsplit, csplit = PAIRS[cfg.pairs]
    shape = (store.shape.examples(rsplit), store.shape.examples(csplit))
    region = Tile(*_check_range(cfg.rows, shape[0], "rows"),
                  *_check_range(cfg.cols, shape[1], "cols"))
    identity = {"store_fingerprint": store.fingerprint(), "runs": runs,
                "pairs": cfg.pairs, "precision": cfg.precision,
                "log_softmax": cfg.log_softmax, "log_softmax_fp32": cfg.log_softmax_fp32,
                "classes": classes, "shape": list(shape)}
    transform = value_transform(store.transform, cfg.log_softmax, cfg.log_softmax_fp32)
    if cfg.log_softmax and not cfg.log_softmax_fp32 and transform != FLOAT64:
        # kernels of stores from before the float32 log1p transform keep their identity
        identity["transform"] = transform
    if cfg.topk is not None:
        square = rsplit == csplit
        if cfg.topk > shape[1] - square:
            raise ConfigError(f"--topk {cfg.topk}: the kernel has {shape[1]} columns"
                              + (" and a row's own column is excluded" if square else ""))
        # a square top-K kernel never lists a row's own column
        identity.update(topk=cfg.topk, exclude_self=square)
    return KernelSetup(store, runs, classes, shape, region, identity, transform)


def _output_chunks(cfg: KernelConfig, shape: tuple[int, int]) -> tuple[int, int]:
    """The chunks the output has or will have: its own when it exists (and is kept)."""
    if cfg.chunks is not None:
        return tuple(cfg.chunks)
    with contextlib.suppress(Exception):
        return KernelOutput.open(cfg.out).chunks
    return (min(shape[0], DEFAULT_CHUNKS[0]), min(shape[1], DEFAULT_CHUNKS[1]))


def create_output(cfg: KernelConfig, res: KernelSetup | None = None) -> KernelOutput:
    """Create (or check and reopen) the output group of ``cfg`` without computing.

    Run once before many processes compute regions of the same kernel (a Slurm array),
    so that none of them races to create it.
    """
    res = res or setup_kernel(cfg)
    out = KernelOutput.open_or_create(Path(cfg.out), res.identity, res.shape, cfg.chunks,
                                      overwrite=cfg.overwrite, restart=cfg.restart,
                                      store=str(cfg.store))
    want = {"store": str(Path(cfg.store).resolve()), "runs": res.runs,
            "precision": cfg.precision, "pairs": cfg.pairs}
    attrs = out.attrs
    # Only write what differs: concurrent region tasks must not rewrite zarr.json (and
    # so race with the task that marks the kernel complete) for nothing.
    if any(attrs.get(k) != v for k, v in want.items()):
        out.group.attrs.update(want)
    return out


def engine_plan(cfg: KernelConfig, budget: int | None = None,
                chunks: tuple[int, int] | None = None,
                res: KernelSetup | None = None) -> Plan:
    """The tile plan :func:`compute_kernel` follows for ``cfg``: its device's reduction
    length, operand padding and fixed temporaries, the output's chunks, and ``budget``
    (default ``--max-memory`` or the device's)."""
    res = res or setup_kernel(cfg)
    device = resolve_device(cfg.device)
    budget = budget or kernel_budget(cfg, res, device)
    return _plan(cfg, res, device, budget, chunks)


def _plan(cfg: KernelConfig, res: KernelSetup, device, budget: int,
          chunks: tuple[int, int] | None = None) -> Plan:
    return plan(res.shape, classes=res.n_classes, budget=budget,
                chunks=chunks or _output_chunks(cfg, res.shape),
                store_run_chunk=res.store.shape.run_chunk, runs=res.runs, region=res.region,
                tile=cfg.tile, in_itemsize=np.dtype(res.store.shape.dtype).itemsize,
                runs_per_step=cfg.runs_per_step, target_reduction=target_reduction(device),
                reserve=Normaliser.temp_bytes(device.type) + topk_bytes(cfg, res.region),
                pad=operand_padding(device), raw_classes=res.store.shape.classes)


#: A top-K pass is at least this many times as wide (columns) as it is tall (rows).
#: Every pass reads and normalises its rows' logits again; at 5 columns per row those
#: re-reads stay within 20% of the columns' own reads, while the pass's memory stops
#: growing with the number of columns.
TOPK_COLS_PER_ROW = 5


def kernel_budget(cfg: KernelConfig, res: KernelSetup, device) -> int:
    """Device bytes the plan may use: ``--max-memory``, else the device's default; a
    top-K kernel asks only for passes :data:`TOPK_COLS_PER_ROW` times as wide as its
    rows (a full kernel must hold, and write, every column anyway)."""
    if cfg.max_memory:
        return cfg.max_memory
    budget = default_budget(device)
    if not cfg.topk:
        return budget
    p = _plan(cfg, res, device, budget)
    rows = min(res.region.rows, p.tiles[0].rows)
    width = min(res.region.cols, TOPK_COLS_PER_ROW * rows)
    need = p.reserve + pass_bytes([Tile(0, rows, 0, width)], p.runs_per_step, p.classes,
                                  p.in_itemsize, p.pad, p.raw_classes)
    return min(budget, need)


def topk_bytes(cfg: KernelConfig, region: Tile) -> int:
    """Bytes a top-K kernel holds beyond the tiles: the partial top-K of every row of the
    region (float32 value and int64 index, and as much again while it is sorted), which
    does not grow with the number of columns."""
    return region.rows * cfg.topk * 24 if cfg.topk else 0


def compute_kernel(cfg: KernelConfig) -> KernelSummary:
    """Compute (or resume) the kernel ``cfg`` describes; see the module docstring."""
    t_start = time.monotonic()
    res = setup_kernel(cfg)
    device = resolve_device(cfg.device)
    budget = kernel_budget(cfg, res, device)
    limit_heap_arenas()  # before the reader and writer threads start

    # Plan once before the output exists: a request that cannot work (a tile over the
    # budget, a region off the chunk grid) must fail without leaving a directory behind.
    engine_plan(cfg, budget, res=res)
    out = create_output(cfg, res)
    with writer_lock(out.path, res.region):
        # a --restart of another process may have replaced the kernel before the lock
        out = KernelOutput.open(out.path, mode="r+")
        if out.attrs.get("identity") != res.identity:
            raise KernelOutputError(f"{out.path}: replaced by another process (--restart or "
                                    "--overwrite) while this one started; re-run")
        return _compute(cfg, res, out, device, budget, t_start)


def _compute(cfg: KernelConfig, res: KernelSetup, out: KernelOutput, device, budget: int,
             t_start: float) -> KernelSummary:
    """The body of :func:`compute_kernel`, under the region's writer lock."""
    import torch

    store, runs, classes, shape, region = (res.store, res.runs, res.classes, res.shape,
                                           res.region)
    rsplit, csplit = PAIRS[cfg.pairs]
    summary = KernelSummary(str(cfg.out), cfg.pairs, shape, runs, str(device), cfg.precision)
    grid = out.done_grid()
    region_chunks = grid[region.r0 // out.chunks[0]:-(-region.r1 // out.chunks[0]),
                         region.c0 // out.chunks[1]:-(-region.c1 // out.chunks[1])]
    if region_chunks.all():
        summary.complete = out.finish_if_complete()
        summary.seconds = time.monotonic() - t_start
        log.info("kernel: region already complete in %s", cfg.out)
        return summary

    stats = {s: split_stats(store, s, runs, res.transform, cfg.show_progress)
             for s in {rsplit, csplit}}
    zv = {s: int(np.count_nonzero((st.m2 == 0)[:, classes] if classes else st.m2 == 0))
          for s, st in stats.items()}
    summary.zero_variance = zv
    if out.attrs.get("zero_variance") != zv:
        out.group.attrs["zero_variance"] = zv

    attempts = 0
    with matmul_precision(cfg.precision), stop_on_signals() as flag, on_device(device):
        ctx = _Context(cfg, store, out, stats, classes, device, runs, summary, flag,
                       res.transform)
        while True:
            p = engine_plan(cfg, budget, out.chunks, res)
            try:
                _run_plan(p, ctx)
                break
            except (torch.OutOfMemoryError, RuntimeError) as e:
                if not is_out_of_memory(e):
                    raise
                attempts += 1
                if attempts > 1 or cfg.tile is not None:
                    raise KernelscaleError(f"out of memory on {device} even with a budget of "
                                           f"{format_bytes(budget)}; lower --max-memory or "
                                           "--tile") from None
            # Outside the except block: the traceback, and with it the failed pass's
            # tensors, is gone only now, so collecting and emptying the cache frees them.
            budget //= 2
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            log.warning("kernel: out of memory on %s; retrying with smaller tiles "
                        "(budget %d B)", device, budget)
            print(f"kernel: out of memory on {device}; retrying once with a budget of "
                  f"{format_bytes(budget)}", file=sys.stderr)
    summary.complete = out.finish_if_complete()
    summary.seconds = time.monotonic() - t_start
    return summary


@dataclass
class _Context:
    """What every pass of one kernel computation shares."""

    cfg: KernelConfig
    store: Store
    out: KernelOutput
    stats: dict[str, RunningStats]
    classes: list[int] | None
    device: object  # torch.device
    runs: int
    summary: KernelSummary
    flag: StopFlag
    transform: str

    @property
    def splits(self) -> tuple[str, str]:
        return PAIRS[self.cfg.pairs]


def _run_plan(p: Plan, ctx: _Context) -> None:
    """Run every pass of ``p`` whose tiles are not finished yet."""
    out, summary, runs = ctx.out, ctx.summary, ctx.runs
    grid = out.done_grid()
    todo_passes = []
    for pidx in p.passes:
        tiles = [p.tiles[i] for i in pidx]
        left = [t for t in tiles if not out.tile_done(t, grid)]
        summary.tiles_skipped += len(tiles) - len(left)
        if left:
            todo_passes.append(left)
    summary.tiles += sum(len(t) for t in todo_passes)
    summary.passes += len(todo_passes)
    bounds = [(s, min(s + p.runs_per_step, runs)) for s in range(0, runs, p.runs_per_step)]
    if len(todo_passes) > 1:
        print(f"kernel: {len(todo_passes)} passes over the store (budget {format_bytes(p.budget)} "
              f"holds {max(len(t) for t in todo_passes)} tile(s) at once)", file=sys.stderr)
    # counted in runs folded into the kernel: each pass folds every run once
    bar = progress(len(todo_passes) * runs, "kernel", "run",
                   enabled=ctx.cfg.show_progress)
    try:
        for tiles in todo_passes:
            _run_pass(tiles, p, ctx, bounds, bar)
            # the pass's buffers are freed; give their pages back, so that many passes
            # (a top-K kernel's) hold no more memory than one
            release_free_memory()
    finally:
        bar.close()


def _resume_point(ckpt_path: Path, meta: dict) -> tuple[int, list | None]:
    """(runs already folded, their accumulators) from the pass's checkpoint, or (0, None).

    A checkpoint of other inputs or another plan is refused; one written on another
    device model or library version is used, with a note that bitwise equality with an
    uninterrupted run then does not hold.
    """
    if not ckpt_path.exists():
        return 0, None
    try:
        cmeta, carrs = load_checkpoint(ckpt_path)
    except Exception as e:
        raise CheckpointMismatchError(f"{ckpt_path}: unreadable checkpoint ({e}); pass "
                                      "--restart to discard it") from None
    keys = ("identity", "tiles", "run_chunk")
    if {k: cmeta.get(k) for k in keys} != {k: meta[k] for k in keys}:
        raise CheckpointMismatchError(f"{ckpt_path}: checkpoint of another store, run set, "
                                      "precision or plan; pass --restart to discard it")
    old = cmeta.get("device")
    if not isinstance(old, dict):  # written before device details were recorded
        old = {"type": old}
    change = describe_device_change(old, meta["device"])
    if change:
        print(f"kernel: resuming a checkpoint from another device or library version "
              f"({change}): the result is correct but not bitwise identical to an "
              "uninterrupted run", file=sys.stderr)
    return int(cmeta["runs_done"]), carrs


def _run_pass(tiles: list[Tile], p: Plan, ctx: _Context, bounds: list[tuple[int, int]],
              bar) -> None:
    """Fold every run-chunk into the accumulators of ``tiles``; write them when done.

    Accumulators are float64 (rows, cols) on the device, one per tile; the state saved in
    a checkpoint is exactly (accumulators, runs folded), at a chunk boundary. What one
    chunk does on the device is :mod:`kernelscale.accumulate`.
    """
    import torch

    cfg, store, out, stats, classes = ctx.cfg, ctx.store, ctx.out, ctx.stats, ctx.classes
    device, runs, summary, flag = ctx.device, ctx.runs, ctx.summary, ctx.flag
    rsplit, csplit = ctx.splits
    is_cuda = device.type == "cuda"
    n_cls = len(classes) if classes is not None else store.shape.classes
    scale = 1.0 / (n_cls * runs)

    row_rng = (min(t.r0 for t in tiles), max(t.r1 for t in tiles))
    col_rng = (min(t.c0 for t in tiles), max(t.c1 for t in tiles))
    shared = rsplit == csplit and row_rng == col_rng
    key = pass_key(tiles)
    ckpt_path = out.ckpt_dir / f"pass-{key}.npz"
    meta = {"identity": out.attrs["identity"], "tiles": [t.key for t in tiles],
            "run_chunk": p.runs_per_step, "device": device_info(device)}
    start_runs, carrs = _resume_point(ckpt_path, meta)
    todo = [(s, e) for s, e in bounds if s >= start_runs]
    # Reading starts first, so that it overlaps the device's start-up and allocations.
    reader = ChunkReader(store, (rsplit, csplit), row_rng, col_rng, todo, pin=is_cuda)
    itemsize = np.dtype(store.shape.dtype).itemsize
    C = store.shape.classes
    steps = None
    try:
        accs = [torch.zeros((t.rows, t.cols), dtype=torch.float64, device=device)
                for t in tiles]
        if carrs is not None:
            for a, c in zip(accs, carrs, strict=True):
                a.copy_(torch.from_numpy(c))
            summary.resumed_from_runs = max(summary.resumed_from_runs, start_runs)
            print(f"kernel: resuming {len(tiles)} tile(s) from {start_runs}/{runs} runs "
                  f"({ckpt_path.name})", file=sys.stderr)
        del carrs
        bar.update(start_runs)
        norm_r = Normaliser(stats[rsplit], row_rng, classes, device, ctx.transform)
        norm_c = norm_r if shared else Normaliser(stats[csplit], col_rng, classes, device,
                                                  ctx.transform)
        n_r, n_c = row_rng[1] - row_rng[0], col_rng[1] - col_rng[0]
        max_k = max((e - s for s, e in todo), default=1)
        pad = operand_padding(device)
        if is_cuda:
            steps = CudaSteps(norm_r, norm_c, shared, reader, summary, n_r, n_c, max_k, pad,
                              C, getattr(torch, store.shape.dtype))
        else:
            steps = CpuSteps(norm_r, norm_c, shared, reader, summary, n_r, n_c, max_k, pad)

        def checkpoint(done: int) -> None:
            t0 = time.perf_counter()
            # a.cpu() waits for the compute stream, so the saved state is complete
            save_checkpoint(ckpt_path, {**meta, "runs_done": done},
                            [a.cpu().numpy() for a in accs])
            summary.t_checkpoint += time.perf_counter() - t0

        last_ckpt = time.monotonic()
        it = iter(reader)
        while True:
            t0 = time.perf_counter()
            try:
                s, e, raw_r, raw_c, t_read, slot = next(it)
            except StopIteration:
                break
            summary.t_wait += time.perf_counter() - t0
            summary.t_read += t_read
            summary.bytes_read += (e - s) * (n_r + (0 if shared else n_c)) * C * itemsize
            zr, zc = steps.operands(raw_r, raw_c, slot)
            for t, a in zip(tiles, accs, strict=True):
                a_r = zr[t.r0 - row_rng[0]:t.r1 - row_rng[0]]
                a_c = zc[t.c0 - col_rng[0]:t.c1 - col_rng[0]]
                # float32 GEMM per chunk, float64 sum over chunks (see module docstring)
                steps.gemm(a, a_r, a_c)
                summary.flops += 2.0 * t.rows * t.cols * (e - s) * n_cls
            steps.chunk_done()
            del zr, zc, a_r, a_c  # views of the operands, which the final write frees
            bar.update(e - s)
            if flag:
                checkpoint(e)
                raise Interrupted(f"kernel: stopped by signal {flag.signum} after {e}/{runs} "
                                  f"runs; checkpoint {ckpt_path} written, re-run to resume")
            if time.monotonic() - last_ckpt >= cfg.checkpoint_every and e < runs:
                checkpoint(e)
                last_ckpt = time.monotonic()
        steps.finish()
    finally:
        reader.close()
        if steps is not None:
            steps.close()
    t0 = time.perf_counter()

    def written(t: Tile) -> None:
        out.mark_done(t, {"runs": runs, "device": device.type,
                          "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})

    if out.topk:
        reduce_tiles(out, tiles, accs, scale, written)
    else:
        write_tiles(out, tiles, accs, scale, device, written)
    with contextlib.suppress(FileNotFoundError):
        ckpt_path.unlink()
    summary.t_write += time.perf_counter() - t0
