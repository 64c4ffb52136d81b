"""The tile plan of a kernel request: its device's numbers, its output's chunks and a
memory budget, turned into a :class:`~kernelscale.plan.Plan` by the pure planner
:func:`~kernelscale.plan.plan`; the passes run it (:mod:`kernelscale.kernel_passes`).

:func:`plan_kernel` does no I/O; :func:`engine_plan` first resolves what the request
leaves open (the store's setup, the device, the budget, the output's chunks).
"""

from __future__ import annotations

import numpy as np

from .accumulate import operand_padding, target_reductions
from .device import default_budget, resolve_device
from .kernel_setup import KernelConfig, KernelSetup, output_chunks, setup_kernel
from .normalise import Normaliser
from .plan import Plan, Tile, pass_bytes, plan

#: A top-K pass is at least this many times as wide (columns) as it is tall (rows).
#: Every pass reads and normalises its rows' logits again; at 5 columns per row those
#: re-reads stay within 20% of the columns' own reads, while the pass's memory stops
#: growing with the number of columns.
TOPK_COLS_PER_ROW = 5


def topk_bytes(cfg: KernelConfig, region: Tile) -> int:
    """Bytes a top-K kernel holds beyond the tiles: the partial top-K of every row of the
    region (float32 value and int64 index, and as much again while it is sorted), which
    does not grow with the number of columns."""
    return region.rows * cfg.topk * 24 if cfg.topk else 0


def plan_kernel(cfg: KernelConfig, res: KernelSetup, device, budget: int,
                chunks: tuple[int, int]) -> Plan:
    """The plan of ``res`` (of ``cfg``) on ``device`` (a ``torch.device``: its reduction
    length, operand padding and fixed temporaries) within ``budget`` bytes, its tiles on
    the output's ``chunks``.

    Of the device's reduction lengths (:func:`~kernelscale.accumulate.target_reductions`),
    the first whose plan makes the fewest passes over the store: a longer reduction
    amortises the accumulate, but never at the price of reading the store again.
    """
    best = None
    for target in target_reductions(device):
        p = plan(res.shape, classes=res.n_classes, budget=budget, chunks=chunks,
                 store_run_chunk=res.store.shape.run_chunk, runs=res.runs, region=res.region,
                 tile=cfg.tile, in_itemsize=np.dtype(res.store.shape.dtype).itemsize,
                 runs_per_step=cfg.runs_per_step, target_reduction=target,
                 reserve=Normaliser.temp_bytes(device.type) + topk_bytes(cfg, res.region),
                 pad=operand_padding(device), raw_classes=res.store.shape.classes)
        if best is None or len(p.passes) < len(best.passes):
            best = p
    return best


def kernel_budget(cfg: KernelConfig, res: KernelSetup, device) -> int:
    """Device bytes the plan may use: ``--max-memory``, else the device's default; a
    top-K kernel asks only for passes :data:`TOPK_COLS_PER_ROW` times as wide as its
    rows (a full kernel must hold, and write, every column anyway)."""
    if cfg.max_memory:
        return cfg.max_memory
    budget = default_budget(device)
    if not cfg.topk:
        return budget
    p = plan_kernel(cfg, res, device, budget, output_chunks(cfg, res.shape))
    rows = min(res.region.rows, p.tiles[0].rows)
    width = min(res.region.cols, TOPK_COLS_PER_ROW * rows)
    need = p.reserve + pass_bytes([Tile(0, rows, 0, width)], p.runs_per_step, p.classes,
                                  p.in_itemsize, p.pad, p.raw_classes)
    return min(budget, need)


def engine_plan(cfg: KernelConfig, budget: int | None = None,
                chunks: tuple[int, int] | None = None,
                res: KernelSetup | None = None) -> Plan:
    """The tile plan :func:`~kernelscale.kernel.compute_kernel` follows for ``cfg``: its
    device's, ``budget`` (default ``--max-memory`` or the device's) and ``chunks``
    (default the output's, existing or to be)."""
    res = res or setup_kernel(cfg)
    device = resolve_device(cfg.device)
    budget = budget or kernel_budget(cfg, res, device)
    return plan_kernel(cfg, res, device, budget, chunks or output_chunks(cfg, res.shape))
