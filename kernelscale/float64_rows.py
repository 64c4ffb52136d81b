"""Which rows of the float32 log-softmax (:data:`kernelscale.stats.LOG1P32`) are evaluated
in float64 instead: the one bound shared by the torch form, the CPU's one-pass kernels
and the GPU's."""

from __future__ import annotations

#: A row whose others-sum is below this is evaluated in float64: float32 ``exp`` of its
#: smaller terms is near or past the end of its normal range (1.2e-38), a margin past
#: ~69 nats. The torch form's bound (:mod:`kernelscale.stats`).
TINY32 = 1e-30

#: The one-pass kernels take ``exp`` of terms below float32's normal range as 0 (each
#: < 1.7e-38): with at most C - 1 of them, a sum under (C - 1) times this could lose
#: 1e-7 of itself, and such rows are evaluated in float64 too (:func:`tiny_sum`).
FLUSHED_TERM_BOUND = 1.7e-31


def tiny_sum(classes: int) -> float:
    """Others-sums below this are evaluated in float64 by the one-pass kernels (CPU and
    GPU) of ``classes`` classes."""
    return max(TINY32, (classes - 1) * FLUSHED_TERM_BOUND)
