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

This module is the engine's front: :func:`compute_kernel`. Its parts: the request and its
identity (:mod:`~kernelscale.kernel_setup`), the tile plan
(:mod:`~kernelscale.kernel_plan`), and the passes that execute it
(:mod:`~kernelscale.kernel_passes`).
"""

from __future__ import annotations

import gc
import logging
import sys
import time

import numpy as np

from .accumulate import on_device
from .device import is_out_of_memory, limit_heap_arenas, matmul_precision, resolve_device
from .errors import KernelOutputError, KernelscaleError
from .kernel_passes import KernelSummary, PassContext, run_plan
from .kernel_plan import kernel_budget, plan_kernel
from .kernel_setup import (
    KernelConfig,
    KernelSetup,
    create_output,
    output_chunks,
    setup_kernel,
)
from .locks import writer_lock
from .output import PAIRS, KernelOutput
from .progress import progress
from .signals import stop_on_signals
from .stats import RunningStats, stats_of_logits
from .store import Store
from .units import format_bytes

#: the engine's public names, wherever they are defined
__all__ = ["KernelConfig", "KernelSummary", "compute_kernel", "create_output",
           "setup_kernel", "split_stats"]

log = logging.getLogger("kernelscale.kernel")


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


def compute_kernel(cfg: KernelConfig) -> KernelSummary:
    """Compute (or resume) the kernel ``cfg`` describes; see the module docstring."""
    t_start = time.monotonic()
    res = setup_kernel(cfg)
    device = resolve_device(cfg.device)
    budget = kernel_budget(cfg, res, device)
    limit_heap_arenas()  # before the reader and writer threads start

    # Plan once before the output exists: a request that cannot work (a tile over the
    # budget, a region off the chunk grid) must fail without leaving a directory behind.
    plan_kernel(cfg, res, device, budget, output_chunks(cfg, res.shape))
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
        ctx = PassContext(cfg, store, out, stats, classes, device, runs, summary, flag,
                          res.transform)
        while True:
            p = plan_kernel(cfg, res, device, budget, out.chunks)
            try:
                run_plan(p, ctx)
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
