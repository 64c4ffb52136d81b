"""One pass of the kernel engine on its device: copy, normalise, multiply, accumulate,
and the final write of the finished tiles.

The pass loop in :mod:`kernelscale.kernel_passes` is the same for every device; what one step
does is a :class:`Steps` object:

* :class:`CpuSteps`: normalise into a reused float32 operand, multiply (numpy's BLAS into
  a reused product), all synchronous.
* :class:`CudaSteps`: copies run on their own stream into two alternating device
  buffers; the compute stream waits for a copy's event, normalises straight into
  padded float32 GEMM operands and multiplies, with no host synchronisation per chunk.
  The reader refills a pinned host buffer only after the event of the copy out of it;
  the copy stream overwrites a device buffer only after the event of the normalisation
  that read it. Stage times come from CUDA events, summed once at the end.

Every call that names a stream, event or cache names the engine's device, so
``--device cuda:N`` with N != 0 never synchronises or records on device 0.
"""

from __future__ import annotations

import contextlib
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .topk import Neighbours, tile_neighbours

#: operand columns (runs x classes of one chunk) are padded with zeros to a multiple of
#: this many floats on CUDA: 128-byte rows keep the tensor-core GEMM kernels on their
#: aligned paths. The zero columns add exact zeros to every dot product.
CUDA_PAD = 32

#: Delay (GPU clock cycles) injected on the copy stream before every copy, and twice as
#: long on the compute stream before every normalisation; with
#: :data:`kernelscale.reader.POISON_RELEASED` it makes each missing wait visible (a
#: normalisation before its copy, a refill before the copy out, a copy over a buffer
#: still being normalised). 0 in normal runs; set by the GPU check.
DELAY_CYCLES = 0


def target_reductions(device) -> tuple[int, ...]:
    """GEMM reduction lengths (runs x classes) to aim for per run-chunk, preferred first.

    The float64 accumulate after each chunk reads and writes 20 bytes per output
    element, so a long reduction amortises it: 4096 on both devices (a GPU multiplies a
    10,000 x 50,000 tile so fast that it must; on 2 CPU cores, 1000 x 5000 over 4000
    runs, the accumulated GEMMs took 2.6-3.0 s at 4096 against 4.6 s at 512). A CPU's
    matrix units are busy from ~512 on, and its operands share the budget with the
    tiles, so a CPU plan also tries 512 and keeps it when it needs fewer passes over the
    store (:func:`kernelscale.kernel_plan.plan_kernel`)."""
    return (4096,) if device.type == "cuda" else (4096, 512)


def operand_padding(device) -> int:
    return CUDA_PAD if device.type == "cuda" else 1


def padded(width: int, pad: int) -> int:
    return -(-width // pad) * pad


def fill_operand(norm, raw, op, pad: int):
    """Normalise ``raw`` (k, n, C) with ``norm`` into the float32 operand ``op`` (n, >=
    padded k*C'); returns the (n, padded k*C') view the GEMM multiplies, whose padding
    columns hold zeros."""
    width = raw.shape[0] * norm.width
    full = padded(width, pad)
    norm(raw, out=op)
    if full > width:
        op[:, width:full].zero_()  # a shorter last chunk leaves the old values there
    return op[:, :full]


@contextlib.contextmanager
def on_device(device):
    """Make ``device`` the current CUDA device inside the block (a no-op on the CPU)."""
    if device.type != "cuda":
        yield
        return
    import torch

    with torch.cuda.device(device):
        yield


def add_product(acc, x, y, scratch: np.ndarray | None = None) -> np.ndarray | None:
    """``acc`` += ``x @ y.T``: a float32 GEMM summed into the float64 accumulator.

    ``acc``: float64 (rows, cols); ``x``: float32 (rows, k); ``y``: float32 (cols, k),
    torch tensors on one device. On a GPU, torch's GEMM. On the CPU, numpy's BLAS
    (OpenBLAS) into ``scratch`` (float32, at least rows * cols values; allocated when
    None or smaller), which is returned for the next call: the same float32 products,
    measured faster than torch's MKL on this project's 2-core AMD host (0.28 s against
    0.32-0.40 s per (1000, 5000) x (5000, 5000) step, 11.3-12.1 s against 13.0-14.1 s
    for a 20,000-run kernel). OpenBLAS threads spin ~0.1 s after each call, on the cores
    the next chunk's normalisation needs; the command line makes them sleep at once
    (:data:`kernelscale.cli.BLAS_ENV`).
    """
    if acc.device.type != "cpu":
        acc += x @ y.T
        return scratch
    import torch

    rows, cols = acc.shape
    if scratch is None or scratch.size < rows * cols:
        scratch = np.empty(rows * cols, dtype=np.float32)
    prod = scratch[:rows * cols].reshape(rows, cols)
    xa, ya = x.numpy(), y.numpy()
    if xa.shape == ya.shape and xa.ctypes.data == ya.ctypes.data:
        # numpy multiplies a matrix by its own transpose with SYRK, which rounds otherwise
        # than a GEMM of the same values in two buffers (the same tile in a pass whose
        # rows and columns differ): a copy gives every tile the same bits in any pass
        ya = ya.copy()
    np.matmul(xa, ya.T, out=prod)
    acc.add_(torch.from_numpy(prod))
    return scratch


class Steps:
    """What one run-chunk of a pass does on a device (see the module docstring)."""

    def __init__(self, norm_r, norm_c, shared: bool, reader, summary, n_r: int, n_c: int,
                 max_k: int, pad: int):
        import torch

        self.norm_r, self.norm_c, self.shared = norm_r, norm_c, shared
        self.reader, self.summary = reader, summary
        width = padded(max_k * norm_r.width, pad)
        self.pad = pad
        dev = norm_r.device
        # zeros: padding columns must hold exact zeros
        self.op_r = torch.zeros((n_r, width), dtype=torch.float32, device=dev)
        self.op_c = (self.op_r if shared
                     else torch.zeros((n_c, width), dtype=torch.float32, device=dev))

    def _fill(self, norm, raw, op):
        return fill_operand(norm, raw, op, self.pad)

    def gemm(self, acc, x, y) -> None:
        """``acc`` float64 += ``x @ y.T`` (float32 GEMM, float64 sum over chunks)."""
        add_product(acc, x, y)

    def close(self) -> None:
        """Free the operands (before the final write needs the memory)."""
        self.op_r = self.op_c = None


class CpuSteps(Steps):
    """Synchronous steps on the CPU, each chunk's products through :func:`add_product`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.product = None  # float32 scratch of one tile's product, reused by every GEMM

    def gemm(self, acc, x, y) -> None:
        self.product = add_product(acc, x, y, self.product)

    def close(self) -> None:
        super().close()
        self.product = None

    def operands(self, raw_r, raw_c, slot):
        t1 = time.perf_counter()
        zr = self._fill(self.norm_r, raw_r, self.op_r)
        zc = zr if self.shared else self._fill(self.norm_c, raw_c, self.op_c)
        self.reader.release(None, slot)
        self._t2 = time.perf_counter()
        self.summary.t_normalise += self._t2 - t1
        return zr, zc

    def chunk_done(self) -> None:
        self.summary.t_gemm += time.perf_counter() - self._t2

    def finish(self) -> None:
        pass


class CudaSteps(Steps):
    def __init__(self, norm_r, norm_c, shared, reader, summary, n_r, n_c, max_k, pad,
                 classes: int, dtype):
        import torch

        super().__init__(norm_r, norm_c, shared, reader, summary, n_r, n_c, max_k, pad)
        dev = norm_r.device
        self.device = dev
        self.compute = torch.cuda.current_stream(dev)
        self.copy = torch.cuda.Stream(dev)
        self.bufs = []
        for _ in range(2):
            r = torch.empty((max_k, n_r, classes), dtype=dtype, device=dev)
            c = None if shared else torch.empty((max_k, n_c, classes), dtype=dtype, device=dev)
            for b in (r, c):
                if b is not None:
                    b.record_stream(self.copy)  # written on the copy stream
            self.bufs.append((r, c))
        self.normalised = [None, None]  # event: the normalisation reading buffer i is done
        # the buffers and operands were allocated in the compute stream's order: the
        # first copies into them come after that
        self.copy.wait_stream(self.compute)
        self.timings: list = []
        self.i = 0

    def operands(self, raw_r, raw_c, slot):
        import torch

        b = self.i % 2
        self.i += 1
        k = raw_r.shape[0]
        dr_buf, dc_buf = self.bufs[b]
        with torch.cuda.stream(self.copy):
            if self.normalised[b] is not None:
                self.copy.wait_event(self.normalised[b])
            if DELAY_CYCLES:
                torch.cuda._sleep(DELAY_CYCLES)
            dr = dr_buf[:k]
            dr.copy_(raw_r, non_blocking=True)
            dc = dr
            if not self.shared:
                dc = dc_buf[:k]
                dc.copy_(raw_c, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self.copy)
        self.reader.release(copied, slot)
        self.compute.wait_event(copied)
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        ev[0].record(self.compute)
        if DELAY_CYCLES:
            torch.cuda._sleep(2 * DELAY_CYCLES)
        zr = self._fill(self.norm_r, dr, self.op_r)
        zc = zr if self.shared else self._fill(self.norm_c, dc, self.op_c)
        ev[1].record(self.compute)
        self.normalised[b] = ev[1]
        self.timings.append(ev)
        return zr, zc

    def chunk_done(self) -> None:
        self.timings[-1][2].record(self.compute)

    def finish(self) -> None:
        """Wait for the compute stream; add the stage times its events measured."""
        self.compute.synchronize()
        for e0, e1, e2 in self.timings:
            self.summary.t_normalise += e0.elapsed_time(e1) / 1e3
            self.summary.t_gemm += e1.elapsed_time(e2) / 1e3
        self.timings.clear()

    def close(self) -> None:
        super().close()
        self.bufs = []


#: Bytes of one pinned staging buffer of the final write (four of them): a whole output
#: chunk row of CIFAR-10 (1024 x 50,000 float32, 205 MB), fewer and larger copies, which
#: measured faster in a warm process (H200: 0.30 s for the 2 GB kernel against 0.43 s
#: with 64 MB blocks), while a wider kernel (ImageNet's 1.28M columns: 5 GB per chunk
#: row) is staged in blocks of whole chunks instead of pinning 4 x 5 GB. Pinning costs
#: about 0.5 ms per MB once per process (H200 node).
STAGE_BYTES = 256 * 2**20


def write_tiles(out, tiles, accs, scale: float, device, on_tile_written) -> None:
    """Scale each float64 accumulator in place and write it as float32 into ``out``.

    Each tile goes out in blocks of one output chunk row by as many whole output chunks
    as fit ``STAGE_BYTES``. A block is converted on the tile's device straight into
    chunk-major order (m, chunk rows, chunk columns), zero past the array's edges, so
    that every chunk file is written from contiguous bytes with no copy on the host (a
    device buffer of at most :data:`STAGE_BYTES`, whole chunks of the block's chunk row);
    on CUDA it is copied into one of four pinned host buffers, while writer threads store the blocks before
    it. No full-size float32 copy of a tile ever exists. ``on_tile_written(tile)`` runs
    once all of a tile's blocks are stored.
    """
    import torch

    step, chunk_cols = out.chunks
    width = max(1, STAGE_BYTES // (4 * step * chunk_cols)) * chunk_cols
    is_cuda = device.type == "cuda"
    nbuf = 4
    staging = None
    if is_cuda and tiles:
        cols = min(width, padded(max(t.cols for t in tiles), chunk_cols))
        staging = [torch.empty(step * cols, dtype=torch.float32, pin_memory=True)
                   for _ in range(nbuf)]
    pending: list = [None] * nbuf
    i = 0
    with ThreadPoolExecutor(nbuf, thread_name_prefix="kernelscale-write") as pool:
        for t, a in zip(tiles, accs, strict=True):
            a.mul_(scale)
            for r in range(0, t.rows, step):
                r1 = min(r + step, t.rows)
                for c in range(0, t.cols, width):
                    c1 = min(c + width, t.cols)
                    j = i % nbuf
                    i += 1
                    if pending[j] is not None:
                        pending[j].result()  # its staging buffer is free again
                    chunks = chunk_major(a[r:r1, c:c1], step, chunk_cols)
                    if staging is not None:
                        host = staging[j][:chunks.numel()].view(chunks.shape)
                        host.copy_(chunks, non_blocking=True)
                        ev = torch.cuda.Event()
                        ev.record(torch.cuda.current_stream(device))
                    else:
                        host, ev = chunks, None
                    del chunks
                    pending[j] = pool.submit(_store_chunks, out, (t.r0 + r) // step,
                                             (t.c0 + c) // chunk_cols, host, r1 - r, c1 - c,
                                             ev)
            for j, f in enumerate(pending):
                if f is not None:
                    f.result()
                    pending[j] = None
            on_tile_written(t)


def chunk_major(block, chunk_rows: int, chunk_cols: int):
    """float64 ``block`` (rows <= chunk_rows, cols) -> float32 (m, chunk_rows, chunk_cols)
    on its device, m = ceil(cols / chunk_cols): chunk j holds columns ``[j * chunk_cols,
    (j + 1) * chunk_cols)``, zeros past the block's rows and columns."""
    import torch

    rows, cols = block.shape
    m = -(-cols // chunk_cols)
    whole = cols // chunk_cols
    edge = rows < chunk_rows or whole < m
    out = (torch.zeros if edge else torch.empty)((m, chunk_rows, chunk_cols),
                                                  dtype=torch.float32, device=block.device)
    if whole:
        out[:whole, :rows].copy_(block[:, :whole * chunk_cols]
                                 .unflatten(1, (whole, chunk_cols)).transpose(0, 1))
    if whole < m:
        out[whole, :rows, :cols - whole * chunk_cols].copy_(block[:, whole * chunk_cols:])
    return out


#: bytes of one float32 block of rows reduced to its top-K at once
TOPK_BLOCK_BYTES = 8 * 2**20


def reduce_tiles(out, tiles, accs, scale: float, on_tile_written) -> None:
    """Scale each float64 accumulator in place and keep only its rows' top-K (a top-K
    kernel): the values are the float32 values a full kernel would store, bit for bit.

    Row blocks of :data:`TOPK_BLOCK_BYTES` are converted to float32 on the device and
    reduced there; only (rows, K) comes back. The tile's partial top-K is stored atomically before ``on_tile_written(tile)``
    marks it done.
    """
    k, square = out.topk, bool(out.attrs["identity"].get("exclude_self"))
    for t, a in zip(tiles, accs, strict=True):
        a.mul_(scale)
        vals, idx = [], []
        # float32 blocks of a few MB: a top-K kernel holds no more than a full one
        step = max(1, min(t.rows, TOPK_BLOCK_BYTES // (4 * t.cols)))
        for r in range(0, t.rows, step):
            r1 = min(r + step, t.rows)
            nb = tile_neighbours(a[r:r1].float(), k, t.c0,
                                 exclude_row0=t.r0 + r if square else None)
            vals.append(nb.values)
            idx.append(nb.index)
        out.save_partial(t, Neighbours(np.concatenate(vals), np.concatenate(idx)))
        on_tile_written(t)


def _store_chunks(out, i: int, j0: int, host, rows: int, cols: int, event) -> None:
    if event is not None:
        event.synchronize()
    out.write_chunk_row(i, j0, host.numpy(), rows, cols)
