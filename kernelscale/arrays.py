"""The kernel of ensembles held in memory (numpy, torch or any array read by run slices),
with the engine's formula and numerics and without a store."""

from __future__ import annotations

from typing import Any

import numpy as np

from .accumulate import add_product
from .device import matmul_precision, resolve_device
from .errors import BadInputError, ConfigError
from .kernel_setup import PRECISIONS
from .normalise import Normaliser
from .stats import LOG1P32, LOGITS, RunningStats, stats_of_logits


def is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


class _Logits:
    """Run-chunks of a (runs, examples, classes) array as torch tensors, never whole."""

    def __init__(self, x: Any, name: str):
        self.name = name
        self.x = x
        self.torch = is_torch(x)
        if not self.torch and not isinstance(x, np.ndarray):
            if not (hasattr(x, "shape") and hasattr(x, "dtype") and hasattr(x, "__getitem__")):
                x = np.asarray(x)  # a list or other sequence
            self.x = x
        shape = tuple(int(s) for s in self.x.shape)
        if len(shape) != 3:
            raise BadInputError(f"{name} logits must be 3-D (runs, examples, classes), got "
                                f"shape {shape}")
        if self.torch:
            floating = self.x.dtype.is_floating_point
        else:
            floating = np.issubdtype(np.dtype(self.x.dtype), np.floating)
        if not floating:
            raise BadInputError(f"{name} logits must be floating point, got {self.x.dtype}")
        self.shape = shape

    def chunk(self, start: int, stop: int):
        """Runs ``[start, stop)``: a torch tensor of the input dtype (on its device)."""
        import torch

        if self.torch:
            return self.x[start:stop].detach()
        return torch.from_numpy(np.ascontiguousarray(self.x[start:stop]))


def _stats(x: _Logits, runs: int, step: int, transform: str) -> RunningStats:
    """float64 statistics over runs of ``transform`` values, one run-chunk at a time;
    refuses non-finite values naming the first bad run."""
    import torch

    st = RunningStats.empty(x.shape[1], x.shape[2])
    for s in range(0, runs, step):
        e = min(s + step, runs)
        raw = x.chunk(s, e)
        ok = torch.isfinite(raw).all(dim=2).all(dim=1)
        if not bool(ok.all()):
            bad = s + int(torch.nonzero(~ok)[0, 0])
            raise BadInputError(f"{x.name} logits: run {bad} holds non-finite values "
                                "(NaN or inf)")
        st = st.merge(stats_of_logits(raw, transform, device=raw.device))
    return st


def kernel_from_arrays(test: Any, train: Any, *, log_softmax: bool = True,
                       device: str = "cpu", precision: str = "fp32",
                       runs_per_step: int | None = None) -> np.ndarray:
    """The kernel of two ensembles' logits held in memory: float32 ndarray (n_test, n_train).

    ``test`` (runs, n_test, C) and ``train`` (runs, n_train, C): numpy arrays, torch
    tensors (any device) or array-likes read by run slices (Zarr, h5py), of any float
    dtype, the same runs in the same order. Pass the same object twice,
    ``kernel_from_arrays(x, x)``, for a train x train (or test x test) kernel: it is
    standardised once.

    The formula and the numerics are the engine's (:mod:`kernelscale.kernel`)::

        x[r,i,c] = log_softmax(logits[r,i,:])[c]       (stats.log_softmax_log1p32)
        z[r,i,c] = (x[r,i,c] - mean_r x[.,i,c]) / std_r x[.,i,c]     (unbiased; 0 where std == 0)
        K[i,j]   = 1/(C R) * sum_{r,c} z_test[r,i,c] * z_train[r,j,c]

    statistics in float64 (Chan's merge over run-chunks), z rounded to float32 only for
    the GEMM of each run-chunk, chunk products summed in float64. Memory: the float64
    accumulator (8 * n_test * n_train bytes) plus one run-chunk of float64 and float32
    temporaries; the input is never copied whole. ``log_softmax=False``: raw logits.
    ``device``: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``; ``precision``: ``fp32`` or
    ``tf32`` (GPU). ``runs_per_step``: runs per chunk (default: ~512 GEMM reduction length on
    the CPU, ~4096 on a GPU, and at most ~64 MB of float64 per chunk).
    """
    import torch

    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, not "
                          f"{precision!r}")
    same = test is train
    a = _Logits(test, "test")
    b = a if same else _Logits(train, "train")
    (runs, n_a, c), (runs_b, n_b, c_b) = a.shape, b.shape
    if runs != runs_b:
        raise BadInputError(f"test has {runs} runs, train {runs_b}: the runs must be the same")
    if c != c_b:
        raise BadInputError(f"test has {c} classes, train {c_b}")
    if runs < 2:
        raise BadInputError(f"the kernel needs at least 2 runs, got {runs}")
    if min(n_a, n_b, c) < 1:
        raise BadInputError(f"empty logits: test {a.shape}, train {b.shape}")
    if runs_per_step is not None and runs_per_step < 1:
        raise ConfigError(f"runs_per_step must be >= 1, not {runs_per_step}")
    dev = resolve_device(device)
    if runs_per_step is None:
        target = 4096 if dev.type == "cuda" else 512
        by_memory = (64 << 20) // (8 * max(n_a, n_b) * c)
        runs_per_step = max(1, min(runs, target // c, by_memory))
    with torch.no_grad(), matmul_precision(precision):
        transform = LOG1P32 if log_softmax else LOGITS
        st_a = _stats(a, runs, runs_per_step, transform)
        st_b = st_a if same else _stats(b, runs, runs_per_step, transform)
        norm_a = Normaliser(st_a, (0, n_a), None, dev, transform)
        norm_b = norm_a if same else Normaliser(st_b, (0, n_b), None, dev, transform)
        acc = torch.zeros((n_a, n_b), dtype=torch.float64, device=dev)
        scratch = None
        for s in range(0, runs, runs_per_step):
            e = min(s + runs_per_step, runs)
            za = norm_a(a.chunk(s, e))
            zb = za if same else norm_b(b.chunk(s, e))
            # float32 GEMM per chunk, float64 sum over chunks, as in the engine
            scratch = add_product(acc, za, zb, scratch)
        acc *= 1.0 / (c * runs)
        return acc.float().cpu().numpy()
