"""Background reading of run-chunks from the store for the kernel engine."""

from __future__ import annotations

import contextlib
import queue
import threading
import time

from .store import Store


class ChunkReader:
    """Background thread reading run-chunks ``[s, e)`` of two example ranges.

    Yields ``(s, e, rows, cols, seconds, slot)`` with ``rows`` (e-s, n_r, C) and ``cols``
    (e-s, n_c, C) host tensors of the store dtype, so the next chunk is read while the
    current one is normalised and multiplied. Buffers come from a pool of ``depth + 1``
    (pinned on CUDA) and go back with :meth:`release` once consumed. A full example range
    is read with :meth:`Store.read_into`, chunk files straight into the buffer on a few
    threads (no codec pipeline, no copy); a partial range goes through Zarr.
    """

    def __init__(self, store: Store, splits: tuple[str, str], row_rng: tuple[int, int],
                 col_rng: tuple[int, int], bounds: list[tuple[int, int]], pin: bool,
                 depth: int = 2, io_threads: int = 4):
        from concurrent.futures import ThreadPoolExecutor

        self.store, self.splits = store, splits
        self.row_rng, self.col_rng = row_rng, col_rng
        self.bounds, self.pin = bounds, pin
        self.max_k = max((e - s for s, e in bounds), default=0)
        # rows and columns of one split over one range (a square kernel's diagonal pass)
        self.shared = splits[0] == splits[1] and row_rng == col_rng
        self.pool = ThreadPoolExecutor(io_threads, thread_name_prefix="kernelscale-io")
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
        buf = torch.empty((self.max_k, n, self.store.shape.classes), dtype=dtype)
        return buf.pin_memory() if self.pin else buf

    def _read(self, split: str, rng: tuple[int, int], s: int, e: int, buf):
        """Runs [s, e) of examples ``rng`` into ``buf`` (allocated on first use)."""
        import torch

        if buf is None:
            buf = self._buffer(rng[1] - rng[0])
        view = buf[: e - s]
        if rng == (0, self.store.shape.examples(split)):
            self.store.read_into(split, s, e, view.numpy(), pool=self.pool)
        else:
            view.copy_(torch.from_numpy(self.store.read(split, s, e, slice(*rng))))
        return buf, view

    def _run(self) -> None:
        try:
            for s, e in self.bounds:
                slot = self.free.get()
                if self._stop.is_set():
                    return
                t0 = time.perf_counter()
                event, rbuf, cbuf = slot if slot is not None else (None, None, None)
                if event is not None:
                    event.synchronize()  # the device finished copying out of them
                rbuf, r = self._read(self.splits[0], self.row_rng, s, e, rbuf)
                if self.shared:
                    cbuf, c = rbuf, r
                else:
                    cbuf, c = self._read(self.splits[1], self.col_rng, s, e, cbuf)
                self.q.put((s, e, r, c, time.perf_counter() - t0, (rbuf, cbuf)))
        except BaseException as exc:  # surfaced in the consumer thread
            self.q.put(exc)

    def release(self, event, slot) -> None:
        """Give a chunk's buffers back; ``event`` (CUDA) marks when the device is done."""
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
