"""One-pass CPU kernels of the store's log-softmax (:data:`~kernelscale.stats.LOG1P32`):
its statistics over runs, and its standardisation into the kernel's GEMM operand.

The torch form (:func:`kernelscale.stats.log_softmax_log1p32`) takes about a dozen
passes over each block (a copy to float32, the max with its index, the shift, exp, the
scatter, the sum, log1p, the subtraction, the float64 copy, the centring, the scaling,
the transposed copy). On a CPU each pass is bound by memory, not arithmetic. Here a
tile of examples is read once, transposed to classes x examples so that every loop runs
over contiguous examples and vectorises, and folded straight into the float64 sums
(statistics) or written once as float32 z-scores (standardisation).

The arithmetic is the torch form's: the float32 shift by the top class, ``exp`` of the
other classes, their sum, ``d - log1p(sum)``, and the float64 evaluation of rows whose
sum leaves float32's normal range. Three things differ, each measured in the tests:
``exp`` and ``log1p`` are polynomials with Cody-Waite reduction (Cephes' float32 ones,
within 3e-7 relative, as vectorised library ones are), written out so that the loops
vectorise (a call into libm does not); the others-sum is accumulated in float64 and
rounded once (a float32 sum of 999 terms was 1.6e-5 off); ``exp`` below -87 is 0, and
a row where such terms could reach 1e-7 of its sum is evaluated in float64. The
two forms agree to a few float32 ulps of each value, and both hold the statistics
within 1e-6 relative of a float64 evaluation.

The kernels release the GIL (``nogil``) and the callers split the examples over a thread
pool of their own: numba's parallel threading layers are not safe to enter from several
Python threads at once, which the ingest's converters do. Compiled code is cached beside
:mod:`kernelscale.fused_kernels` (or in the user's numba cache where that is
read-only); that module, and numba, are imported on the first use.

Values are float16 (read as their bits and widened exactly in the kernel: numba has no
float16 arithmetic), float32 or float64, in numpy arrays (an ingest's files, which then
needs no torch) or CPU torch tensors; other dtypes take the torch form.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

#: Bytes (at 4 per value) of the block of runs given to the threads at a time: a few MB,
#: so that a block made contiguous is still in cache when the kernel reads it.
BLOCK_BYTES = 4 << 20

#: "0": the torch form on the CPU too (the reference; e.g. to compare); "1": the kernels
#: for every call; unset: the kernels for calls of :data:`MIN_VALUES` and more.
ENV = "KERNELSCALE_FUSED"

#: Calls on fewer values take the torch form (unless ENV is "1"). Loading numba and the
#: cached kernels costs a process ~0.7 s (2 cores), which the kernels save back at ~3.6 ns
#: a value, so toy arrays (tests, notebooks, small stores) are better off without them;
#: from this size on (the kernels' own 4 MB block of float32 values; every file and
#: run-chunk of a real ensemble, e.g. 400 runs x 1,000 test examples x 10 classes) a
#: process makes enough calls to pay for them. Counted over a whole array (a file's split
#: for statistics, the store's split for z-scores), never over how a computation is cut,
#: so a resumed computation makes the same choices as an uninterrupted one.
MIN_VALUES = 1 << 20


def enabled() -> bool:
    """Whether the fused CPU kernels may be used (numba installed, not disabled by ENV)."""
    return os.environ.get(ENV, "") != "0" and importlib.util.find_spec("numba") is not None


def use(values: int) -> bool:
    """Whether an array of ``values`` values takes the kernels (see :data:`MIN_VALUES`)."""
    return enabled() and (values >= MIN_VALUES or os.environ.get(ENV, "") == "1")


def _kernels():
    from . import fused_kernels

    return fused_kernels


def _threads() -> int:
    """torch's thread count where torch is loaded; elsewhere (an ingest on the CPU never
    loads it) ``OMP_NUM_THREADS``, else the usable logical CPUs (torch counts physical
    cores: on a host with SMT this takes more threads, which changes no result, the
    threads splitting the examples)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return max(1, torch.get_num_threads())
    with contextlib.suppress(ValueError):
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "")))
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
               else os.cpu_count() or 1)


def _ranges(n: int, parts: int) -> list[tuple[int, int]]:
    """[0, n) in at most ``parts`` contiguous ranges (none for n = 0)."""
    step = max(1, -(-n // max(1, parts)))
    return [(a, min(n, a + step)) for a in range(0, n, step)]


def supports(dtype) -> bool:
    """Whether the kernels read values of this torch or numpy dtype directly."""
    return str(dtype).removeprefix("torch.") in ("float16", "float32", "float64")


def _blocks(x, rows_per_block: int):
    """(start, block) over axis 0 of ``x``, a torch tensor or numpy array (float16,
    float32 or float64): C-contiguous numpy arrays, float16 ones as their uint16 bits."""
    if not isinstance(x, np.ndarray):
        x = x.numpy()  # a CPU tensor: a view of its memory
    for s in range(0, x.shape[0], rows_per_block):
        b = np.ascontiguousarray(x[s:s + rows_per_block])
        yield s, b.view(np.uint16) if b.dtype == np.float16 else b


def _drive(x, kernel, args_of) -> None:
    """``kernel(block, e0, e1, *args_of(start))`` for every block of runs of ``x`` (runs,
    examples, classes), ``start`` its first run, and every thread's range of examples
    [e0, e1): the threads split the examples, so no two write the same memory."""
    _, n, c = x.shape
    threads = min(_threads(), max(1, n // 64))
    ranges = _ranges(n, threads)
    rows = max(1, BLOCK_BYTES // max(1, n * c * 4))
    with _pool(threads) as pool:
        for start, block in _blocks(x, rows):
            args = args_of(start)
            if pool is None:
                for e0, e1 in ranges:
                    kernel(block, e0, e1, *args)
                continue
            for f in [pool.submit(kernel, block, e0, e1, *args) for e0, e1 in ranges]:
                f.result()


def shifted_sums(x) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(shift, S1, S2) of the LOG1P32 values of ``x`` (runs >= 1, examples, classes),
    a numpy array or CPU torch tensor of a :func:`supported <supports>` dtype (native
    byte order): ``shift`` the first
    run's values, ``S1 = sum(v - shift)``, ``S2 = sum((v - shift)^2)`` over the runs,
    each float64 (examples, classes), C-contiguous. See :func:`kernelscale.stats.stats_of_logits` for the sums."""
    runs, examples, classes = x.shape
    shift = np.empty((classes, examples))
    s1 = np.zeros((classes, examples))
    s2 = np.zeros((classes, examples))
    _drive(x, _kernels().fold, lambda start: (start == 0, shift, s1, s2))
    return (np.ascontiguousarray(shift.T), np.ascontiguousarray(s1.T),
            np.ascontiguousarray(s2.T))


def standardise(x, classes: np.ndarray, mean_t: np.ndarray, inv_t: np.ndarray,
                out: np.ndarray) -> None:
    """Write the z-scores ``(v - mean) * inv`` of the LOG1P32 values ``v`` of ``x``
    (k, n, C), a CPU torch tensor of a :func:`supported <supports>` dtype, into
    ``out[:, :k*C']`` (float32 (n, >= k*C'), C-contiguous), columns ordered (run,
    class); ``classes`` int64 (C',) selects the classes; ``mean_t`` and ``inv_t`` are
    float64 (C', n), C-contiguous (the transposes of the statistics). Raises
    ValueError when they do not fit together (the kernel does not check its indices)."""
    k, n, c_in = x.shape
    cs = int(classes.shape[0])
    fits = (mean_t.shape == inv_t.shape == (cs, n) and out.dtype == np.float32
            and out.ndim == 2 and out.shape[0] == n and out.shape[1] >= k * cs
            and out.flags.c_contiguous
            and (cs == 0 or 0 <= classes.min() <= classes.max() < c_in))
    if not fits:
        raise ValueError(f"standardise: runs {tuple(x.shape)}, classes {cs} of {c_in}, "
                         f"statistics {mean_t.shape}, operand {out.shape} {out.dtype} "
                         "do not fit")
    _drive(x, _kernels().standardise, lambda start: (classes, mean_t, inv_t, out, start * cs))


@contextlib.contextmanager
def _pool(n: int) -> Iterator[ThreadPoolExecutor | None]:
    """A thread pool of ``n`` threads, or None for one thread (the work runs inline)."""
    if n <= 1:
        yield None
        return
    with ThreadPoolExecutor(n, thread_name_prefix="kernelscale-fused") as pool:
        yield pool
