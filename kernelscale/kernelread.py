"""Reading a kernel of either kind: open a finished one with its chunk files checked,
its rows with checksums verified, each row's top neighbours, and a description.

A full kernel's rows are read chunk file by chunk file (:class:`CheckedArray`); a top-K
kernel's neighbours are its ``values``/``indices`` arrays (:mod:`kernelscale.output`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import KernelOutputError
from .output import KernelOutput
from .rawchunks import CRC_BYTES, ChunkDamaged, chunk_path, raw_layout, read_chunk
from .topk import Neighbours, top_neighbours


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


def topk_chunk_files(k: KernelOutput):
    """(chunk file, data bytes, checksummed) of every chunk of a top-K kernel's
    ``values`` and ``indices`` (plain-bytes arrays: every one kernelscale writes)."""
    for name in ("values", "indices"):
        arr = k.group[name]
        layout = raw_layout(arr)
        if layout is None:
            continue
        nbytes = int(np.prod(arr.chunks)) * arr.dtype.itemsize
        for i in range(-(-arr.shape[0] // arr.chunks[0])):
            yield chunk_path(k.path / name, (i, 0)), nbytes, layout.checksum


def _check_topk_chunks(k: KernelOutput, path: Path) -> None:
    """Every chunk of a complete top-K kernel's ``values``/``indices`` is on disk at its
    size (a missing one would read as its fill value)."""
    if not k.attrs.get("complete"):
        return
    for chunk, nbytes, checksum in topk_chunk_files(k):
        want = nbytes + (CRC_BYTES if checksum else 0)
        size = chunk.stat().st_size if chunk.is_file() else None
        if size != want:
            what = "missing" if size is None else f"{size} bytes, not {want}"
            raise KernelOutputError(f"{chunk}: chunk file {what}; `kernelscale verify "
                                    f"{path} --repair` rebuilds it from the tiles' "
                                    "partial top-Ks")


def load_kernel(path: str | os.PathLike, require_complete: bool = True) -> KernelOutput:
    """Open a saved kernel for reading; refuses an unfinished one by default, and one
    whose finished chunks are not all on disk at their size (Zarr would read a missing
    chunk as zeros). Read it through :class:`CheckedArray`, which turns a checksum
    failure into one line."""
    k = KernelOutput.open(path, mode="r")
    if require_complete and not k.attrs.get("complete"):
        raise KernelOutputError(f"{path}: the kernel is not complete (re-run `kernelscale "
                                "kernel` with the same options to finish it)")
    if k.topk:
        _check_topk_chunks(k, Path(path))
        return k
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


def kernel_neighbours(kern: KernelOutput, kmax: int, *, exclude_diagonal: bool = False,
                      workers: int | None = None, show_progress: bool = False,
                      need: int | None = None) -> Neighbours:
    """Top-``kmax`` neighbours of every row of a kernel of either kind.

    A full kernel is read once in row blocks (:func:`~kernelscale.topk.top_neighbours`);
    a top-K kernel gives its stored ``values``/``indices`` (checksums verified), cut to
    ``kmax`` when it holds more. ``exclude_diagonal`` (leave-one-out on a square kernel)
    is what a square top-K kernel already is. ``need``: the number of neighbours the
    caller cannot do without (default ``kmax``): a top-K kernel holding fewer is refused
    with one line; above ``need``, fewer are returned as from a narrow full kernel.
    """
    if not kern.topk:
        return top_neighbours(CheckedArray(kern.path, kern.array), kmax, exclude_diagonal=exclude_diagonal,
                              workers=workers, show_progress=show_progress)
    ident = kern.attrs.get("identity", {})
    if exclude_diagonal and not ident.get("exclude_self"):
        raise KernelOutputError(f"{kern.path}: a {ident.get('pairs')} top-K kernel; leave-one-"
                                "out needs a square (train-train) one")
    if not exclude_diagonal and ident.get("exclude_self"):
        raise KernelOutputError(f"{kern.path}: a square top-K kernel without each row's own "
                                "column; this needs one with it (a full kernel)")
    if (need or kmax) > kern.topk:
        raise KernelOutputError(f"{kern.path}: a top-{kern.topk} kernel holds {kern.topk} "
                                f"neighbours per row; this needs {need or kmax} (recompute "
                                f"it with --topk {need or kmax}, or use the full kernel)")
    k = min(kmax, kern.topk)
    out = []
    for name in ("values", "indices"):
        arr = kern.group[name]
        try:
            out.append(np.ascontiguousarray(arr[:, :k]))
        except ValueError as e:
            if "checksum" not in str(e).lower():
                raise
            raise KernelOutputError(f"{kern.path / name}: a chunk fails its checksum (the "
                                    f"file is corrupt); `kernelscale verify {kern.path} "
                                    "--repair` rebuilds it from the tiles' partial top-Ks"
                                    ) from None
    return Neighbours(out[0], out[1].astype(np.int64, copy=False))


def describe_kernel(path: str | os.PathLike) -> str:
    k = KernelOutput.open(path, mode="r")
    a = k.attrs
    ident = a.get("identity", {})
    kind = (f"top-{k.topk} kernel (values float32, indices int64: {k.shape[0]} x {k.topk}"
            f"{'; own column excluded' if ident.get('exclude_self') else ''}) of a "
            if k.topk else "")
    lines = [f"kernel {path}",
             f"  {kind}shape {k.shape} float32 chunks {k.chunks} "
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
