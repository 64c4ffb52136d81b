"""The kernel engine: stream run-chunks from the store into tiled GEMMs, with checkpoints.

Definition (``C`` classes, ``R`` runs; std is the unbiased one; 1/R as in the reference)::

    x[r,i,c] = log_softmax(float32(logits[r,i,:]))[c]
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
log-softmax, statistics and standardisation are float64; only the standardised values
z (O(1), relative rounding 6e-8) enter the float32 GEMM. The reference evaluates the
log-softmax in float32, which for confident predictions (top-class log-softmax ~1e-8)
rounds away exactly the variation the standardisation then amplifies: on simulated
confident logits (2000 runs, 1000 x 5000) the published float32 method is 6.1e-3 from
the float64 evaluation of the formula (top-3 sets 99.3% equal), this engine 1.0e-7
(100%). ``log_softmax_fp32`` reproduces the published method for comparisons with its
numbers.

Resumability: the state of a pass is (accumulators of its tiles, number of runs folded).
Chunk boundaries are fixed by the plan, so a resumed pass performs exactly the same
operations as an uninterrupted one and, on the same device and thread count, gives a
bitwise-identical kernel.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import queue
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zarr

from .atomic import atomic_open, atomic_write_json, read_json
from .errors import (
    CheckpointMismatchError,
    ConfigError,
    Interrupted,
    KernelOutputError,
    KernelscaleError,
    StoreError,
)
from .plan import Plan, Tile, plan
from .progress import progress
from .stats import RunningStats
from .store import Store

log = logging.getLogger("kernelscale.kernel")

KERNEL_SCHEMA = "kernelscale-kernel"
KERNEL_SCHEMA_VERSION = 1
PAIRS = {"test-train": ("test", "train"), "train-train": ("train", "train"),
         "test-test": ("test", "test")}
PRECISIONS = ("fp32", "tf32")
DEFAULT_CHUNKS = (1024, 4096)


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
    run_chunk: int | None = None

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
                f"read {self.bytes_read / 1e9:.3f} GB; seconds read {self.t_read:.2f} "
                f"(waited {self.t_wait:.2f}) normalise {self.t_normalise:.2f} gemm "
                f"{self.t_gemm:.2f} write {self.t_write:.2f} checkpoint {self.t_checkpoint:.2f}"
                f" total {self.seconds:.2f}; {self.bytes_read / s / 1e9:.3f} GB/s "
                f"{self.flops / s / 1e12:.3f} TFLOP/s on {self.device} {self.precision}")


# ------------------------------------------------------------------------ statistics

def split_stats(store: Store, split: str, runs: int, log_softmax: bool = True,
                show_progress: bool = False, log_softmax_fp32: bool = False) -> RunningStats:
    """Statistics of the first ``runs`` runs of ``split`` (float64, (examples, classes)).

    The store's own statistics cover all its runs of log-softmax values; any other
    request (a prefix of runs, or raw logits) streams the runs once more.
    """
    if runs == store.runs and log_softmax and not log_softmax_fp32:
        return store.stats(split)
    import torch

    st = RunningStats.empty(store.shape.examples(split), store.shape.classes)
    step = store.shape.run_chunk
    bar = progress(runs, f"stats {split}", "run", enabled=show_progress)
    for s in range(0, runs, step):
        e = min(s + step, runs)
        x = torch.from_numpy(store.read(split, s, e))
        if log_softmax and log_softmax_fp32:
            x = x.float().log_softmax(-1).double()
        elif log_softmax:
            x = x.double().log_softmax(-1)
        else:
            x = x.double()
        st = st.merge(RunningStats.from_block(x.numpy()))
        bar.update(e - s)
    bar.close()
    return st


# ------------------------------------------------------------------------ the output

class KernelOutput:
    """The output Zarr group: array ``kernel``, identity attributes, done markers, checkpoints.

    ``KERNEL/kernel``           float32 (n_rows, n_cols), chunks ``chunks``
    ``KERNEL/.done/<tile>.json`` one per finished tile (atomic), written after its data
    ``KERNEL/.checkpoints/``    accumulators of passes in flight (atomic .npz files)
    """

    def __init__(self, path: Path, group: zarr.Group):
        self.path = path
        self.group = group

    @property
    def attrs(self) -> dict:
        return dict(self.group.attrs)

    @property
    def array(self) -> zarr.Array:
        return self.group["kernel"]

    @property
    def chunks(self) -> tuple[int, int]:
        return tuple(self.array.chunks)  # type: ignore[return-value]

    @classmethod
    def open(cls, path: str | os.PathLike, mode: str = "r") -> KernelOutput:
        path = Path(path)
        try:
            g = zarr.open_group(str(path), mode=mode, zarr_format=3)
        except Exception:
            raise KernelOutputError(f"{path}: not a kernel (no readable Zarr group)") from None
        if g.attrs.get("schema") != KERNEL_SCHEMA or "kernel" not in g:
            raise KernelOutputError(f"{path}: not a kernelscale kernel")
        return cls(path, g)

    @classmethod
    def open_or_create(cls, path: Path, identity: dict, shape: tuple[int, int],
                       chunks: tuple[int, int] | None, *, overwrite: bool,
                       restart: bool) -> KernelOutput:
        if path.exists() and any(path.iterdir()):
            try:
                existing = cls.open(path, mode="r+")
            except KernelOutputError:
                if overwrite:
                    shutil.rmtree(path)
                    return cls.open_or_create(path, identity, shape, chunks,
                                              overwrite=False, restart=False)
                raise KernelOutputError(f"{path}: exists and is not a kernel; choose another "
                                        "--out or pass --overwrite") from None
            old = existing.attrs.get("identity", {})
            if old == identity and (chunks is None or existing.chunks == tuple(chunks)):
                return existing
            diff = ", ".join(f"{k}: {old.get(k)!r} -> {identity.get(k)!r}"
                             for k in sorted(set(old) | set(identity))
                             if old.get(k) != identity.get(k))
            if chunks is not None and existing.chunks != tuple(chunks):
                diff = (diff + ", " if diff else "") + f"chunks {existing.chunks} -> {chunks}"
            if existing.attrs.get("complete"):
                if not overwrite:
                    raise KernelOutputError(f"{path}: holds a finished kernel of different "
                                            f"inputs ({diff}); pass --overwrite to replace it")
            elif not (restart or overwrite):
                raise CheckpointMismatchError(
                    f"{path}: holds a partial kernel of different inputs ({diff}) -- the "
                    "store or options changed since it was started; pass --restart to "
                    "discard it and start again")
            shutil.rmtree(path)
        chunks = tuple(chunks or (min(shape[0], DEFAULT_CHUNKS[0]),
                                  min(shape[1], DEFAULT_CHUNKS[1])))
        g = zarr.open_group(str(path), mode="w", zarr_format=3)
        g.create_array("kernel", shape=shape, chunks=chunks, dtype="float32",
                       compressors=None, fill_value=0.0, dimension_names=("row", "col"))
        g.attrs.update({"schema": KERNEL_SCHEMA, "schema_version": KERNEL_SCHEMA_VERSION,
                        "identity": identity, "complete": False})
        return cls(path, g)

    # done markers -------------------------------------------------------------------
    @property
    def done_dir(self) -> Path:
        return self.path / ".done"

    @property
    def ckpt_dir(self) -> Path:
        return self.path / ".checkpoints"

    def done_tiles(self) -> list[Tile]:
        out = []
        if self.done_dir.is_dir():
            for p in sorted(self.done_dir.glob("*.json")):
                try:
                    d = read_json(p)
                except (OSError, json.JSONDecodeError):
                    continue  # a torn marker cannot exist (atomic); a foreign file is ignored
                if d.get("identity") == self.attrs.get("identity"):
                    out.append(Tile(*d["tile"]))
        return out

    def done_grid(self) -> np.ndarray:
        """bool (row chunks, col chunks): chunks covered by some finished tile."""
        (n, m), (cr, cc) = self.array.shape, self.chunks
        grid = np.zeros((-(-n // cr), -(-m // cc)), dtype=bool)
        for t in self.done_tiles():
            grid[t.r0 // cr:-(-t.r1 // cr), t.c0 // cc:-(-t.c1 // cc)] = True
        return grid

    def tile_done(self, t: Tile, grid: np.ndarray) -> bool:
        cr, cc = self.chunks
        return bool(grid[t.r0 // cr:-(-t.r1 // cr), t.c0 // cc:-(-t.c1 // cc)].all())

    def mark_done(self, t: Tile, info: dict) -> None:
        atomic_write_json(self.done_dir / f"{t.key}.json",
                          {"tile": [t.r0, t.r1, t.c0, t.c1],
                           "identity": self.attrs["identity"], **info})

    def finish_if_complete(self) -> bool:
        """Mark the kernel complete when every chunk is covered; drop checkpoints."""
        if not self.done_grid().all():
            return False
        if not self.attrs.get("complete"):
            self.group.attrs["complete"] = True
        shutil.rmtree(self.ckpt_dir, ignore_errors=True)
        return True


# ------------------------------------------------------------------------- checkpoints

def _pass_key(tiles: list[Tile]) -> str:
    return hashlib.sha256("|".join(t.key for t in tiles).encode()).hexdigest()[:16]


def save_checkpoint(path: Path, meta: dict, accs: list[np.ndarray]) -> None:
    """Write the accumulators (float64) and ``meta`` to ``path`` atomically (no pickle)."""
    arrays = {f"acc{i}": a for i, a in enumerate(accs)}
    arrays["meta"] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)
    with atomic_open(path, "wb") as fh:
        np.savez(fh, **arrays)


def load_checkpoint(path: Path) -> tuple[dict, list[np.ndarray]]:
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(z["meta"].tobytes().decode())
        accs = [z[f"acc{i}"] for i in range(len(meta["tiles"]))]
    return meta, accs


# ---------------------------------------------------------------------- signal flags

class StopFlag:
    """Set by SIGTERM/SIGUSR1 (Slurm's time-limit warning); checked at chunk boundaries."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __bool__(self) -> bool:
        return self.signum is not None


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_early: list[int] = []


def catch_signals_early() -> None:
    """Record stop signals that arrive before a computation installs its own handlers.

    Called first thing by the command line, so Slurm's time-limit warning during imports
    or statistics is not fatal: the next :func:`stop_on_signals` sees it as already set.
    """
    for s in STOP_SIGNALS:
        signal.signal(s, lambda signum, frame: _early.append(signum))


@contextlib.contextmanager
def stop_on_signals(sigs: tuple[int, ...] = STOP_SIGNALS) -> Iterator[StopFlag]:
    flag = StopFlag()
    if _early:
        flag.signum = _early[-1]
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):  # noqa: ANN001, ARG001
        flag.signum = signum

    def interrupt(signum, frame):  # noqa: ANN001, ARG001
        # Ctrl-C saves a checkpoint like SIGTERM; a second Ctrl-C stops at once.
        if flag.signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag.signum = signum
        print("kernel: interrupted; saving a checkpoint at the next run-chunk (Ctrl-C again "
              "to stop without it)", file=sys.stderr)

    old = {s: signal.signal(s, handler) for s in sigs}
    old[signal.SIGINT] = signal.signal(signal.SIGINT, interrupt)
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# ---------------------------------------------------------------------------- device

def resolve_device(name: str):  # noqa: ANN201
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    return torch.device(name)


def default_budget(device) -> int:  # noqa: ANN001
    """Device bytes for tiles: 80% of a GPU's total memory; 1/4 of RAM on the CPU.

    Total (not free) memory keeps the plan, and so the checkpoints, the same across
    re-runs of one command on one machine type.
    """
    import torch

    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory * 0.8)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4)


@contextlib.contextmanager
def matmul_precision(precision: str) -> Iterator[None]:
    import torch

    old_p = torch.get_float32_matmul_precision()
    old_tf = torch.backends.cuda.matmul.allow_tf32
    old_cudnn = torch.backends.cudnn.allow_tf32
    try:
        tf32 = precision == "tf32"
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
        yield
    finally:
        torch.set_float32_matmul_precision(old_p)
        torch.backends.cuda.matmul.allow_tf32 = old_tf
        torch.backends.cudnn.allow_tf32 = old_cudnn


# ---------------------------------------------------------------------------- reader

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

    def _buffer(self, n: int):  # noqa: ANN202
        import torch

        dtype = getattr(torch, self.store.shape.dtype)
        buf = torch.empty((self.max_k, n, self.store.shape.classes), dtype=dtype)
        return buf.pin_memory() if self.pin else buf

    def _read(self, split: str, rng: tuple[int, int], s: int, e: int, buf):  # noqa: ANN001, ANN202
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

    def release(self, event, slot) -> None:  # noqa: ANN001
        """Give a chunk's buffers back; ``event`` (CUDA) marks when the device is done."""
        self.free.put((event, *slot))

    def __iter__(self):  # noqa: ANN204
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


# ---------------------------------------------------------------------------- engine

class _Normaliser:
    """Device-resident float64 mean and 1/std for one example range and class subset."""

    #: float64 bytes of one CPU sub-block: small enough that the log-softmax, centring and
    #: scaling passes over it stay in cache (measured: 4.5x faster than whole-chunk passes
    #: at 335 runs x 5000 examples x 10 classes on 2 cores, identical results).
    CPU_BLOCK_BYTES = 4 << 20

    def __init__(self, st: RunningStats, rng: tuple[int, int], classes: list[int] | None,
                 device, log_softmax: bool, log_softmax_fp32: bool = False):  # noqa: ANN001
        import torch

        mean = st.mean[rng[0]:rng[1]]
        inv = st.inv_std()[rng[0]:rng[1]]
        if classes is not None:
            mean, inv = mean[:, classes], inv[:, classes]
        self.mean = torch.from_numpy(np.ascontiguousarray(mean, dtype=np.float64)).to(device)
        self.inv = torch.from_numpy(np.ascontiguousarray(inv, dtype=np.float64)).to(device)
        self.classes = (torch.tensor(classes, device=device) if classes is not None else None)
        self.log_softmax = log_softmax
        self.log_softmax_fp32 = log_softmax_fp32
        self.device = device
        self._out = None

    def _transform(self, x, raw=None):  # noqa: ANN001, ANN202
        """x float64 (k, n, C) -> standardised float64 (k, n, C'), in place where possible.

        ``raw``: the same block in the store dtype, for the float32 log-softmax mode.
        """
        if self.log_softmax and self.log_softmax_fp32:
            x.copy_(raw.float().log_softmax(-1))
        elif self.log_softmax:
            x = x.sub_(x.logsumexp(-1, keepdim=True))
        if self.classes is not None:
            x = x.index_select(-1, self.classes)
        return x.sub_(self.mean).mul_(self.inv)

    def __call__(self, raw):  # noqa: ANN001, ANN204
        """raw (k, n, C) -> Z (n, k*C') float32, C' the number of selected classes.

        log-softmax and standardisation run in float64 (see :func:`stats.log_softmax64`
        for why); only the standardised values, O(1) in size, are rounded to float32.
        On the CPU the work runs over cache-sized blocks of runs into a reused output
        buffer; on a GPU it is a handful of whole-chunk kernels.
        """
        import torch

        k, n, _ = raw.shape
        c = self.mean.shape[1]
        if self.device.type != "cpu":
            dev = raw.to(self.device, non_blocking=True)
            z = self._transform(dev.double(), dev).float()
            return z.permute(1, 0, 2).reshape(n, k * c)
        if self._out is None or self._out.shape[1] < k * c:
            self._out = torch.empty((n, k * c), dtype=torch.float32)
        out = self._out[:, : k * c]
        view = out.view(n, k, c)
        sb = max(1, self.CPU_BLOCK_BYTES // max(1, n * raw.shape[2] * 8))
        tmp = torch.empty((min(sb, k), n, raw.shape[2]), dtype=torch.float64)
        for r0 in range(0, k, sb):
            r1 = min(r0 + sb, k)
            t = tmp[: r1 - r0]
            t.copy_(raw[r0:r1])
            view[:, r0:r1, :].copy_(self._transform(t, raw[r0:r1]).permute(1, 0, 2))
        return out


def _parse_range(rng: tuple[int, int] | None, n: int, what: str) -> tuple[int, int]:
    if rng is None:
        return (0, n)
    a, b = rng
    if not 0 <= a < b <= n:
        raise ConfigError(f"--{what} {a}:{b} is outside 0:{n}")
    return (a, b)


@dataclass
class Resolved:
    """What a :class:`KernelConfig` means for a given store (no computation yet)."""

    store: Store
    runs: int
    classes: list[int] | None
    shape: tuple[int, int]
    region: Tile
    identity: dict

    @property
    def n_classes(self) -> int:
        return len(self.classes) if self.classes is not None else self.store.shape.classes


def resolve(cfg: KernelConfig) -> Resolved:
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
    region = Tile(*_parse_range(cfg.rows, shape[0], "rows"),
                  *_parse_range(cfg.cols, shape[1], "cols"))
    identity = {"store_fingerprint": store.fingerprint(), "runs": runs,
                "pairs": cfg.pairs, "precision": cfg.precision,
                "log_softmax": cfg.log_softmax, "log_softmax_fp32": cfg.log_softmax_fp32,
                "classes": classes, "shape": list(shape)}
    return Resolved(store, runs, classes, shape, region, identity)


def prepare_output(cfg: KernelConfig, res: Resolved | None = None) -> KernelOutput:
    """Create (or check and reopen) the output group of ``cfg`` without computing.

    Run once before many processes compute regions of the same kernel (a Slurm array),
    so that none of them races to create it.
    """
    res = res or resolve(cfg)
    out = KernelOutput.open_or_create(Path(cfg.out), res.identity, res.shape, cfg.chunks,
                                      overwrite=cfg.overwrite, restart=cfg.restart)
    want = {"store": str(Path(cfg.store).resolve()), "runs": res.runs,
            "precision": cfg.precision, "pairs": cfg.pairs}
    attrs = out.attrs
    # Only write what differs: concurrent region tasks must not rewrite zarr.json (and
    # so race with the task that marks the kernel complete) for nothing.
    if any(attrs.get(k) != v for k, v in want.items()):
        out.group.attrs.update(want)
    return out


def compute_kernel(cfg: KernelConfig) -> KernelSummary:
    """Compute (or resume) the kernel ``cfg`` describes; see the module docstring."""
    import torch

    t_start = time.monotonic()
    res = resolve(cfg)
    store, runs, classes, shape, region = (res.store, res.runs, res.classes, res.shape,
                                           res.region)
    n_cls = res.n_classes
    rsplit, csplit = PAIRS[cfg.pairs]
    device = resolve_device(cfg.device)
    out = prepare_output(cfg, res)

    summary = KernelSummary(str(cfg.out), cfg.pairs, shape, runs, str(device), cfg.precision)
    grid = out.done_grid()
    region_chunks = grid[region.r0 // out.chunks[0]:-(-region.r1 // out.chunks[0]),
                         region.c0 // out.chunks[1]:-(-region.c1 // out.chunks[1])]
    if region_chunks.all():
        summary.complete = out.finish_if_complete()
        summary.seconds = time.monotonic() - t_start
        log.info("kernel: region already complete in %s", cfg.out)
        return summary

    stats = {s: split_stats(store, s, runs, cfg.log_softmax, cfg.show_progress,
                            cfg.log_softmax_fp32)
             for s in {rsplit, csplit}}
    zv = {s: int(np.count_nonzero((st.m2 == 0)[:, classes] if classes else st.m2 == 0))
          for s, st in stats.items()}
    summary.zero_variance = zv
    if out.attrs.get("zero_variance") != zv:
        out.group.attrs["zero_variance"] = zv

    budget = cfg.max_memory or default_budget(device)
    itemsize = np.dtype(store.shape.dtype).itemsize
    attempts = 0
    with matmul_precision(cfg.precision), stop_on_signals() as flag:
        ctx = _Context(cfg, store, out, stats, classes, device, runs, summary, flag)
        while True:
            p = plan(shape, classes=n_cls, budget=budget, chunks=out.chunks,
                     store_run_chunk=store.shape.run_chunk, runs=runs, region=region,
                     tile=cfg.tile, in_itemsize=itemsize, run_chunk=cfg.run_chunk,
                     target_reduction=4096 if device.type == "cuda" else 512)
            try:
                _run_plan(p, ctx)
                break
            except torch.OutOfMemoryError:
                attempts += 1
                if attempts > 1 or cfg.tile is not None:
                    raise KernelscaleError(f"out of memory on {device} even with a budget of "
                                           f"{budget} B; lower --max-memory or --tile") from None
                budget //= 2
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                log.warning("kernel: out of memory on %s; retrying with smaller tiles "
                            "(budget %d B)", device, budget)
                print(f"kernel: out of memory on {device}; retrying once with a budget of "
                      f"{budget} B", file=sys.stderr)
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
    bounds = [(s, min(s + p.run_chunk, runs)) for s in range(0, runs, p.run_chunk)]
    if len(todo_passes) > 1:
        print(f"kernel: {len(todo_passes)} passes over the store (budget {p.budget} B "
              f"holds {max(len(t) for t in todo_passes)} tile(s) at once)", file=sys.stderr)
    bar = progress(sum(len(t) for t in todo_passes) * len(bounds), "kernel", "tile-chunk",
                   enabled=ctx.cfg.show_progress)
    try:
        for tiles in todo_passes:
            _run_pass(tiles, p, ctx, bounds, bar)
    finally:
        bar.close()


def _run_pass(tiles: list[Tile], p: Plan, ctx: _Context, bounds: list[tuple[int, int]],
              bar) -> None:  # noqa: ANN001
    """Fold every run-chunk into the accumulators of ``tiles``; write them when done.

    Accumulators are float64 (rows, cols) on the device, one per tile; the state saved in
    a checkpoint is exactly (accumulators, runs folded), at a chunk boundary.
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
    key = _pass_key(tiles)
    ckpt_path = out.ckpt_dir / f"pass-{key}.npz"
    meta = {"identity": out.attrs["identity"], "tiles": [t.key for t in tiles],
            "run_chunk": p.run_chunk, "device": str(device.type)}
    start_runs = 0
    accs = [torch.zeros((t.rows, t.cols), dtype=torch.float64, device=device) for t in tiles]
    if ckpt_path.exists():
        try:
            cmeta, carrs = load_checkpoint(ckpt_path)
        except Exception as e:
            raise CheckpointMismatchError(f"{ckpt_path}: unreadable checkpoint ({e}); pass "
                                          "--restart to discard it") from None
        same = {k: cmeta.get(k) for k in ("identity", "tiles", "run_chunk")}
        if same != {k: meta[k] for k in ("identity", "tiles", "run_chunk")}:
            raise CheckpointMismatchError(f"{ckpt_path}: checkpoint of another store, run set, "
                                          "precision or plan; pass --restart to discard it")
        if cmeta.get("device") != meta["device"]:
            print(f"kernel: resuming a {cmeta.get('device')} checkpoint on {device.type}: "
                  "the result is correct but not bitwise identical to an uninterrupted run",
                  file=sys.stderr)
        start_runs = int(cmeta["runs_done"])
        for a, c in zip(accs, carrs, strict=True):
            a.copy_(torch.from_numpy(c))
        summary.resumed_from_runs = max(summary.resumed_from_runs, start_runs)
        print(f"kernel: resuming {len(tiles)} tile(s) from {start_runs}/{runs} runs "
              f"({ckpt_path.name})", file=sys.stderr)
    todo = [(s, e) for s, e in bounds if s >= start_runs]
    bar.update((len(bounds) - len(todo)) * len(tiles))
    norm_r = _Normaliser(stats[rsplit], row_rng, classes, device, cfg.log_softmax,
                         cfg.log_softmax_fp32)
    norm_c = _Normaliser(stats[csplit], col_rng, classes, device, cfg.log_softmax,
                         cfg.log_softmax_fp32)
    itemsize = np.dtype(store.shape.dtype).itemsize
    C = store.shape.classes

    def checkpoint(done: int) -> None:
        t0 = time.perf_counter()
        save_checkpoint(ckpt_path, {**meta, "runs_done": done},
                        [a.cpu().numpy() for a in accs])
        summary.t_checkpoint += time.perf_counter() - t0

    reader = ChunkReader(store, (rsplit, csplit), row_rng, col_rng, todo, pin=is_cuda)
    last_ckpt = time.monotonic()
    try:
        it = iter(reader)
        while True:
            t0 = time.perf_counter()
            try:
                s, e, raw_r, raw_c, t_read, slot = next(it)
            except StopIteration:
                break
            summary.t_wait += time.perf_counter() - t0
            summary.t_read += t_read
            summary.bytes_read += (e - s) * ((row_rng[1] - row_rng[0])
                                             + (col_rng[1] - col_rng[0])) * C * itemsize
            t1 = time.perf_counter()
            zr = norm_r(raw_r)
            zc = zr if (rsplit == csplit and row_rng == col_rng) else norm_c(raw_c)
            event = None
            if is_cuda:
                event = torch.cuda.Event()
                event.record()
                torch.cuda.synchronize()
            reader.release(event, slot)
            t2 = time.perf_counter()
            summary.t_normalise += t2 - t1
            for t, a in zip(tiles, accs, strict=True):
                a_r = zr[t.r0 - row_rng[0]:t.r1 - row_rng[0]]
                a_c = zc[t.c0 - col_rng[0]:t.c1 - col_rng[0]]
                # float32 GEMM per chunk, float64 sum over chunks (see module docstring)
                a += a_r @ a_c.T
                summary.flops += 2.0 * t.rows * t.cols * a_r.shape[1]
                bar.update(1)
            if is_cuda:
                torch.cuda.synchronize()
            summary.t_gemm += time.perf_counter() - t2
            if flag:
                checkpoint(e)
                raise Interrupted(f"kernel: stopped by signal {flag.signum} after {e}/{runs} "
                                  f"runs; checkpoint {ckpt_path} written, re-run to resume")
            if time.monotonic() - last_ckpt >= cfg.checkpoint_every and e < runs:
                checkpoint(e)
                last_ckpt = time.monotonic()
    finally:
        reader.close()
    t0 = time.perf_counter()
    for t, a in zip(tiles, accs, strict=True):
        out.array[t.r0:t.r1, t.c0:t.c1] = (a * scale).float().cpu().numpy()
        out.mark_done(t, {"runs": runs, "device": device.type,
                          "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    with contextlib.suppress(FileNotFoundError):
        ckpt_path.unlink()
    summary.t_write += time.perf_counter() - t0


# ------------------------------------------------------------------------------ read

def load_kernel(path: str | os.PathLike, require_complete: bool = True) -> KernelOutput:
    """Open a saved kernel for reading; refuses an unfinished one by default."""
    k = KernelOutput.open(path, mode="r")
    if require_complete and not k.attrs.get("complete"):
        raise KernelOutputError(f"{path}: the kernel is not complete (re-run `kernelscale "
                                "kernel` with the same options to finish it)")
    return k


def describe_kernel(path: str | os.PathLike) -> str:
    k = KernelOutput.open(path, mode="r")
    a = k.attrs
    ident = a.get("identity", {})
    lines = [f"kernel {path}",
             f"  shape {tuple(k.array.shape)} float32 chunks {k.chunks} "
             f"complete {a.get('complete')}",
             f"  pairs {ident.get('pairs')}  runs {ident.get('runs')}  precision "
             f"{ident.get('precision')}  log_softmax {ident.get('log_softmax')}  classes "
             f"{ident.get('classes') or 'all'}",
             f"  store {a.get('store')}  fingerprint {ident.get('store_fingerprint')}"]
    if "zero_variance" in a:
        lines.append("  zero-variance entries: " + "  ".join(
            f"{s} {n}" for s, n in sorted(a["zero_variance"].items())))
    done = k.done_tiles()
    lines.append(f"  finished tiles {len(done)}; checkpoints in flight "
                 f"{len(list(k.ckpt_dir.glob('*.npz'))) if k.ckpt_dir.is_dir() else 0}")
    return "\n".join(lines)

