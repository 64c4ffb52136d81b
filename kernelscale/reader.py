"""Background reading of run-chunks from the store for the kernel engine."""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time

from .store import Store

#: Fill every buffer handed back with :meth:`ChunkReader.release` with NaN before it is
#: refilled. A consumer that released a buffer too early (a device copy still reading
#: it) then computes on NaN, which the GPU check makes visible; off in normal runs.
POISON_RELEASED = False


def default_io_threads(pin: bool) -> int:
    """Reader threads: a GPU node must feed a device that multiplies far faster than one
    thread reads, so up to 12; a CPU engine shares its cores with the GEMM, so 4."""
    return max(2, min(12, os.cpu_count() or 4)) if pin else 4


class ChunkReader:
    """Background thread reading run-chunks ``[s, e)`` of two example ranges.

    Yields ``(s, e, rows, cols, seconds, slot)`` with ``rows`` (e-s, n_r, C) and ``cols``
    (e-s, n_c, C) host tensors of the store dtype, so the next chunk is read while the
    current one is normalised and multiplied. Buffers come from a pool of ``depth + 1``
    (allocated pinned for a CUDA consumer) and go back with :meth:`release` once
    consumed. Example ranges are read with :meth:`Store.read_jobs`: the chunk files of
    both splits straight into the buffer (a partial range: only its bytes of each run,
    once each file has been verified whole), all submitted at once to ``io_threads``
    threads (no codec pipeline), while the page cache is asked to load the chunks
    ``depth`` steps ahead. A store without plain chunks goes through Zarr.
    """

    def __init__(self, store: Store, splits: tuple[str, str], row_rng: tuple[int, int],
                 col_rng: tuple[int, int], bounds: list[tuple[int, int]], pin: bool,
                 depth: int = 2, io_threads: int | None = None):
        from concurrent.futures import ThreadPoolExecutor

        self.store, self.splits = store, splits
        self.row_rng, self.col_rng = row_rng, col_rng
        self.bounds, self.pin, self.depth = bounds, pin, depth
        self.max_k = max((e - s for s, e in bounds), default=0)
        # rows and columns of one split over one range (a square kernel's diagonal pass)
        self.shared = splits[0] == splits[1] and row_rng == col_rng
        self.pool = ThreadPoolExecutor(io_threads or default_io_threads(pin),
                                       thread_name_prefix="kernelscale-io")
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.free: queue.Queue = queue.Queue()
        for _ in range(depth + 1):
            self.free.put(None)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="kernelscale-reader", daemon=True)
        self.thread.start()

    def _buffer(self, n: int):
        import torch

        dtype = getattr(torch, self.store.shape.dtype)
        # allocated pinned: pinning a pageable buffer afterwards would copy it once more
        return torch.empty((self.max_k, n, self.store.shape.classes), dtype=dtype,
                           pin_memory=self.pin)

    def _read(self, jobs: list, split: str, rng: tuple[int, int], s: int, e: int, buf):
        """Runs [s, e) of examples ``rng`` into ``buf`` (allocated on first use): append
        the chunk-file reads to ``jobs``, or read through Zarr now for a partial range."""
        import torch

        if buf is None:
            buf = self._buffer(rng[1] - rng[0])
        view = buf[: e - s]
        own = self.store.read_jobs(split, s, e, view.numpy(), examples=rng)
        if own is None:
            view.copy_(torch.from_numpy(self.store.read(split, s, e, slice(*rng))))
        else:
            jobs.extend(own)
        return buf, view

    def _advise(self, i: int) -> None:
        if i < len(self.bounds):
            s, e = self.bounds[i]
            for split in set(self.splits):
                self.store.advise_willneed(split, s, e)

    def _run(self) -> None:
        try:
            for i in range(min(self.depth, len(self.bounds))):
                self._advise(i)
            for i, (s, e) in enumerate(self.bounds):
                slot = self.free.get()
                if self._stop.is_set():
                    return
                self._advise(i + self.depth)
                t0 = time.perf_counter()
                event, rbuf, cbuf = slot if slot is not None else (None, None, None)
                if event is not None:
                    event.synchronize()  # the device finished copying out of them
                if POISON_RELEASED:
                    for b in (rbuf, cbuf):
                        if b is not None:
                            b.fill_(float("nan"))
                jobs: list = []
                rbuf, r = self._read(jobs, self.splits[0], self.row_rng, s, e, rbuf)
                if self.shared:
                    cbuf, c = rbuf, r
                else:
                    cbuf, c = self._read(jobs, self.splits[1], self.col_rng, s, e, cbuf)
                for f in [self.pool.submit(j) for j in jobs]:
                    f.result()
                self.q.put((s, e, r, c, time.perf_counter() - t0, (rbuf, cbuf)))
        except BaseException as exc:  # surfaced in the consumer thread
            self.q.put(exc)

    def release(self, event, slot) -> None:
        """Give a chunk's buffers back; ``event`` (CUDA) marks when the device is done
        reading them (the reader waits for it before refilling)."""
        self.free.put((event, *slot))

    def __iter__(self):
        for _ in self.bounds:
            item = self.q.get()
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        """Stop the thread, also when it is blocked on a full queue (stopping early)."""
        self._stop.set()
        self.free.put(None)
        while self.thread.is_alive():
            with contextlib.suppress(queue.Empty):
                self.q.get_nowait()
            self.thread.join(timeout=0.05)
        self.pool.shutdown(wait=True)
