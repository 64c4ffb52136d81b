"""The executor of a kernel plan: every pass of its tiles over the store's runs, with
checkpoints, resumption and the tiles' done-markers.

A pass folds every run-chunk of the plan into float64 accumulators (rows, cols), one per
tile, on the device, then writes them (:mod:`kernelscale.accumulate`: what one chunk
does on a CPU or a CUDA device). Its state is exactly (accumulators, runs folded), at a
chunk boundary: a checkpoint saves it, and a resumed pass performs the same operations
as an uninterrupted one. The output format (array, done-markers, checkpoints) is
:mod:`kernelscale.output`.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .accumulate import CpuSteps, CudaSteps, reduce_tiles, write_tiles
from .device import describe_device_change, device_info, release_free_memory
from .errors import CheckpointMismatchError, Interrupted
from .kernel_setup import KernelConfig
from .normalise import Normaliser
from .output import PAIRS, KernelOutput, load_checkpoint, pass_key, save_checkpoint
from .plan import Plan, Tile
from .progress import progress
from .reader import ChunkReader
from .signals import StopFlag
from .stats import RunningStats
from .store import Store
from .units import format_bytes


@dataclass
class KernelSummary:
    """What one computation did: the kernel (rows, cols), tiles and passes run or found
    done, bytes read, seconds per phase, floating-point operations."""

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


@dataclass
class PassContext:
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


def run_plan(p: Plan, ctx: PassContext) -> None:
    """Run every pass of ``p`` whose tiles are not finished yet: the one entry from a
    plan to its execution."""
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
            run_pass(tiles, p, ctx, bounds, bar)
            # the pass's buffers are freed; give their pages back, so that many passes
            # (a top-K kernel's) hold no more memory than one
            release_free_memory()
    finally:
        bar.close()


def resume_point(ckpt_path: Path, meta: dict) -> tuple[int, list | None]:
    """(runs already folded, their accumulators) from the pass's checkpoint, or (0, None).

    A checkpoint of other inputs or other tiles is refused. One written on another
    device model or library version, or with another number of runs per step (by a
    version that planned steps differently, or on a machine with another memory budget),
    is used, with a note that bitwise equality with an uninterrupted run then does not
    hold: its accumulators are exact sums of whole runs either way.
    """
    if not ckpt_path.exists():
        return 0, None
    try:
        cmeta, carrs = load_checkpoint(ckpt_path)
    except Exception as e:
        raise CheckpointMismatchError(f"{ckpt_path}: unreadable checkpoint ({e}); pass "
                                      "--restart to discard it") from None
    keys = ("identity", "tiles")
    if {k: cmeta.get(k) for k in keys} != {k: meta[k] for k in keys}:
        raise CheckpointMismatchError(f"{ckpt_path}: checkpoint of another store, run set, "
                                      "precision or plan; pass --restart to discard it")
    old = cmeta.get("device")
    if not isinstance(old, dict):  # written before device details were recorded
        old = {"type": old}
    change = describe_device_change(old, meta["device"])
    if cmeta.get("run_chunk") != meta["run_chunk"]:
        change = ", ".join([c for c in (change, f"runs per step {cmeta.get('run_chunk')} -> "
                                                 f"{meta['run_chunk']}") if c])
    if change:
        print(f"kernel: resuming a checkpoint of another device, library version or step "
              f"({change}): the result is correct but not bitwise identical to an "
              "uninterrupted run", file=sys.stderr)
    return int(cmeta["runs_done"]), carrs


def run_pass(tiles: list[Tile], p: Plan, ctx: PassContext, bounds: list[tuple[int, int]],
             bar) -> None:
    """Fold every run-chunk ``[s, e)`` of ``bounds`` into the accumulators of ``tiles``;
    write them, and mark them done, when done.

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
    start_runs, carrs = resume_point(ckpt_path, meta)
    # a checkpoint of other steps may end inside one of these: its rest comes first
    todo = [(max(s, start_runs), e) for s, e in bounds if e > start_runs]
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
        if is_cuda:
            steps = CudaSteps(norm_r, norm_c, shared, reader, summary, n_r, n_c, max_k, p.pad,
                              C, getattr(torch, store.shape.dtype))
        else:
            steps = CpuSteps(norm_r, norm_c, shared, reader, summary, n_r, n_c, max_k, p.pad)

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
                # float32 GEMM per chunk, float64 sum over chunks (see kernelscale.kernel)
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
