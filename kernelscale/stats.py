"""Running per-(example, class) statistics of log-softmax values, merged exactly.

For one split, the statistics of ``count`` runs are ``mean`` and ``m2`` (sum of squared
deviations), both float64 arrays of shape (examples, classes). Blocks of runs are combined
with the pairwise update of Chan, Golub & LeVeque (1979), which is exact in real arithmetic
for any split of the runs and numerically stable in float64, unlike sum / sum-of-squares.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import fused as _fused
from .float64_rows import TINY32


@dataclass
class RunningStats:
    """``count`` runs; ``mean`` and ``m2`` float64 of shape (examples, classes)."""

    count: int
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def empty(cls, examples: int, classes: int) -> RunningStats:
        z = np.zeros((examples, classes), dtype=np.float64)
        return cls(0, z, z.copy())

    def merge(self, other: RunningStats) -> RunningStats:
        """Statistics of the union of the two run sets (``self`` first)."""
        if other.count == 0:
            return RunningStats(self.count, self.mean.copy(), self.m2.copy())
        if self.count == 0:
            return RunningStats(other.count, other.mean.copy(), other.m2.copy())
        na, nb = self.count, other.count
        n = na + nb
        delta = other.mean - self.mean
        mean = self.mean + delta * (nb / n)
        m2 = self.m2 + other.m2 + delta * delta * (na * nb / n)
        return RunningStats(n, mean, m2)

    def std(self) -> np.ndarray:
        """Unbiased (n - 1) standard deviation, float64 (examples, classes)."""
        if self.count < 2:
            raise ValueError("standard deviation needs at least 2 runs")
        return np.sqrt(self.m2 / (self.count - 1))

    def inv_std(self) -> np.ndarray:
        """1/std with 0 where std is 0, so zero-variance entries contribute 0, not NaN."""
        s = self.std()
        out = np.zeros_like(s)
        np.divide(1.0, s, out=out, where=s > 0)
        return out

    def zero_variance(self) -> int:
        """Number of (example, class) entries with zero variance across runs."""
        return int(np.count_nonzero(self.m2 == 0)) if self.count >= 2 else 0


#: The value transforms. A store's statistics are of one of the first two (recorded in
#: its manifest; stores without the field predate the first); the kernel's ablations
#: take the other two.
LOG1P32 = "log_softmax_log1p32"  #: float32 log-softmax, the top class through log1p
FLOAT64 = "log_softmax64"  #: torch.log_softmax of the float64 values
PUBLISHED32 = "log_softmax32"  #: the published code's float32 log_softmax (ablation)
LOGITS = "logits"  #: the raw logits (ablation)
TRANSFORMS = (LOG1P32, FLOAT64, PUBLISHED32, LOGITS)
STORE_TRANSFORMS = (LOG1P32, FLOAT64)



def value_transform(store_transform: str, log_softmax: bool = True,
                    log_softmax_fp32: bool = False) -> str:
    """The transform a kernel applies: the store's own, or one of the two ablations."""
    if not log_softmax:
        return LOGITS
    return PUBLISHED32 if log_softmax_fp32 else store_transform


def _log1p_form(x):
    """In place on ``x`` (..., C): ``d - log1p(s)``; returns (x, s) with ``s`` (..., 1)."""
    top, idx = x.max(-1, keepdim=True)
    x.sub_(top)
    e = x.exp()
    e.scatter_(-1, idx, 0.0)  # ties: the other top class stays, exp(0) = 1, exactly right
    others = e.sum(-1, keepdim=True)
    del e
    return x.sub_(others.log1p()), others


def log_softmax_log1p32(raw):
    """log-softmax over the last axis, computed in float32 to every class's relative
    precision; returned as float64.

    ``raw``: torch tensor (..., C), any float dtype and device -> float64, same shape.

    With ``d = x - max(x)`` (exact for float16 logits) and ``s`` the sum of ``exp(d)``
    over all classes but the top one, the values are ``d - log1p(s)``. The top class's
    value ``-log1p(s)`` is ~1e-8 for a confident prediction: ``log_softmax`` in float32
    rounds it through ``log(1 + s)`` to 0 or a few ulps, and its tiny std across runs
    turns that into O(1) z-scores; summing the others apart and ``log1p`` keep it to
    float32's relative precision (measured: 1.8e-6 relative against float64, where
    float32 ``log_softmax`` is off by 4.9e-3). Rows whose ``s`` leaves float32's normal
    range (margins past ~69 nats) are evaluated the same way in float64, which also
    keeps top-class values float32 cannot hold (below 1e-38); float64 ``log_softmax``
    would round those to 0.
    """
    import torch

    v, others = _log1p_form(raw.to(torch.float32, copy=True))
    out = v.double()
    del v
    tiny = (others < TINY32).squeeze(-1)
    if bool(tiny.any()):
        out[tiny] = _log1p_form(raw[tiny].double())[0]
    return out


def transform64(raw, transform: str = LOG1P32):
    """``raw`` torch tensor (..., classes), any float dtype and device -> float64 values.

    The one definition of each transform: the reference that the one-pass kernels
    (:mod:`kernelscale.fused` on the CPU, :mod:`kernelscale.fused_gpu` for a GPU's
    z-scores) reproduce to a few float32 ulps, and the form taken where they are not
    (small arrays on the CPU, a GPU's ingest statistics). :data:`FLOAT64` is ``torch.log_softmax`` of the float64 values, not
    ``x - logsumexp(x)``: torch's single-kernel form keeps the top class of a confident
    prediction to full relative precision, where the subtraction loses about one ulp of
    it.
    """
    import torch

    if transform == LOG1P32:
        return log_softmax_log1p32(raw)
    if transform == FLOAT64:
        return torch.log_softmax(raw.double(), -1)
    if transform == PUBLISHED32:
        return raw.float().log_softmax(-1).double()
    if transform == LOGITS:
        return raw.to(torch.float64, copy=True)  # callers work in place on the result
    raise ValueError(f"unknown transform {transform!r}; one of {', '.join(TRANSFORMS)}")


class NonFiniteValues(ValueError):
    """The values of a block are not all finite (a non-finite logit, or an overflow)."""


#: float32 bytes of one block of :func:`stats_of_logits` per device: the CPU's stay in
#: cache (measured fastest at 2-8 MB on 2 cores); a GPU's fill the device.
STATS_BLOCK_BYTES = {"cpu": 4 << 20, "cuda": 512 << 20}


def stats_of_logits(logits, transform: str = LOG1P32, device=None) -> RunningStats:
    """Statistics of ``transform64(logits)`` over axis 0 (runs), in bounded memory.

    ``logits``: (runs, examples, classes) numpy array or torch tensor of any float dtype;
    ``device``: where to compute (default: the CPU). Returns float64 (examples, classes).

    One pass of shifted sums in float64: with ``v0`` the first run's values,
    ``S1 = sum(v - v0)`` and ``S2 = sum((v - v0)^2)`` give ``mean = v0 + S1/n`` and
    ``m2 = S2 - S1^2/n``. The shift keeps the cancellation at ``eps64 * z0^2`` relative
    (``z0`` the first run's z-score), and an entry constant over the runs gets ``m2``
    exactly 0 and its mean exactly that value, so it is a zero-variance entry, not noise.
    Raises :class:`NonFiniteValues` when any value is not finite (found from the sums,
    without a pass of its own). On the CPU, :data:`LOG1P32` values of large calls are
    summed by the one-pass kernel of :mod:`kernelscale.fused`
    (:data:`~kernelscale.fused.MIN_VALUES`); others by the torch form below.
    """
    runs, examples, classes = logits.shape
    on_cpu = str(device or "cpu") == "cpu" and str(getattr(logits, "device", "cpu")) == "cpu"
    native = isinstance(logits, np.ndarray) and logits.dtype.isnative
    if on_cpu and transform == LOG1P32 and runs and classes and _fused.supports(logits.dtype) \
            and (native or not isinstance(logits, np.ndarray)) \
            and _fused.use(math.prod(logits.shape)):
        # numpy in, numpy out: an ingest on the CPU never loads torch
        return _from_sums(runs, *_fused.shifted_sums(logits))
    import torch

    x = torch.as_tensor(logits)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    per_run = max(1, examples * classes * 4)
    block = max(1, STATS_BLOCK_BYTES.get(dev.type, STATS_BLOCK_BYTES["cuda"]) // per_run)
    v0 = s1 = s2 = None
    for s in range(0, runs, block):
        v = transform64(x[s:s + block].to(dev, non_blocking=True), transform)
        if v0 is None:
            v0 = v[0].clone()
            s1 = torch.zeros_like(v0)
            s2 = torch.zeros_like(v0)
        v.sub_(v0)
        s1 += v.sum(0)
        s2 += v.square_().sum(0)
    if v0 is None:
        return RunningStats.empty(examples, classes)
    return _from_sums(runs, v0, s1, s2)


def _from_sums(runs: int, v0, s1, s2) -> RunningStats:
    """The statistics of ``runs`` runs from their shifted sums: float64 (examples,
    classes) numpy arrays, or torch tensors on the device that summed them (computed
    there, as before numpy arrays were taken: a GPU divides by the run count through its
    reciprocal, so moving this to the host would change a GPU store's last bits)."""
    mean = v0 + s1 / runs
    m2 = s2 - s1 * s1 / runs
    if isinstance(m2, np.ndarray):
        m2 = np.maximum(m2, 0.0)  # rounding can take a ~0 m2 below 0
        finite = bool(np.isfinite(mean).all() and np.isfinite(m2).all())
    else:
        import torch

        m2 = m2.clamp_(min=0.0)
        finite = bool(torch.isfinite(mean).all() and torch.isfinite(m2).all())
        mean, m2 = mean.cpu().numpy(), m2.cpu().numpy()
    if not finite:
        raise NonFiniteValues("non-finite values")
    return RunningStats(runs, mean, m2)
