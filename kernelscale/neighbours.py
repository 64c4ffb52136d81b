"""``kernelscale neighbours``: the top-K kernel of an existing full kernel.

The result is the same format, and for the same inputs the same bytes, as
``kernelscale kernel --topk K``: each row's K largest values float32 and their columns
int64, largest first, equal values by column; a square kernel leaves out each row's own
column. The full kernel is read once in row blocks, its checksums verified.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError
from .kernelread import CheckedArray, load_kernel
from .locks import writer_lock
from .output import PAIRS, KernelOutput
from .plan import Tile
from .topk import top_neighbours


@dataclass
class NeighboursSummary:
    kernel: str
    out: str
    rows: int
    k: int
    seconds: float

    def line(self) -> str:
        return (f"neighbours: top-{self.k} of {self.rows} rows of {self.kernel} written to "
                f"{self.out} in {self.seconds:.2f} s")


def export_neighbours(kernel: str | os.PathLike, k: int, out: str | os.PathLike, *,
                      overwrite: bool = False, workers: int | None = None,
                      show_progress: bool = False) -> NeighboursSummary:
    """Write the top-``k`` kernel of the finished full kernel at ``kernel`` to ``out``."""
    t0 = time.monotonic()
    src = load_kernel(kernel)
    if src.topk:
        raise ConfigError(f"{kernel}: is already a top-{src.topk} kernel")
    ident = dict(src.attrs["identity"])
    rows, cols = PAIRS[ident["pairs"]]
    square = rows == cols
    n, m = src.shape
    if k < 1 or k > m - square:
        raise ConfigError(f"--k {k}: must lie in 1..{m - square} for this {n}x{m} kernel"
                          + (" (a row's own column is left out)" if square else ""))
    ident.update(topk=k, exclude_self=square)
    nb = top_neighbours(CheckedArray(src.path, src.array), k, exclude_diagonal=square,
                        workers=workers, show_progress=show_progress)
    dst = KernelOutput.open_or_create(Path(out), ident, (n, m), src.chunks,
                                      overwrite=overwrite, restart=overwrite,
                                      store=src.attrs.get("store"))
    with writer_lock(dst.path, Tile(0, n, 0, m)):
        dst.group["values"][...] = nb.values
        dst.group["indices"][...] = nb.index
        extra = {k: v for k, v in src.attrs.items()
                 if k in ("store", "runs", "precision", "pairs", "zero_variance")}
        dst.group.attrs.update({**extra, "exported_from": str(Path(kernel).resolve()),
                                "complete": True})
    return NeighboursSummary(str(kernel), str(out), n, k, time.monotonic() - t0)
