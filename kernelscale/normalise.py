"""Standardisation of raw logits into the z-scores the kernel GEMM multiplies."""

from __future__ import annotations

import numpy as np

from . import fused as _fused
from . import fused_gpu as _fused_gpu
from .stats import LOG1P32, RunningStats, transform64


class Normaliser:
    """Device-resident float64 mean and 1/std for one example range and class subset."""

    #: float64 bytes of one sub-block of runs. CPU: small enough that the log-softmax,
    #: centring and scaling passes stay in cache (measured: 4.5x faster than whole-chunk
    #: passes at 335 runs x 5000 examples x 10 classes on 2 cores, identical results).
    #: GPU: large enough that each of the few kernels per block fills the device, while
    #: the float64 temporaries stay a fixed size (:meth:`temp_bytes`) however long the
    #: run-chunk is.
    BLOCK_BYTES = {"cpu": 4 << 20, "cuda": 256 << 20}

    def __init__(self, st: RunningStats, rng: tuple[int, int], classes: list[int] | None,
                 device, transform: str):
        import torch

        mean = st.mean[rng[0]:rng[1]]
        inv = st.inv_std()[rng[0]:rng[1]]
        if classes is not None:
            mean, inv = mean[:, classes], inv[:, classes]
        self.classes = (torch.tensor(classes, device=device) if classes is not None else None)
        self.transform = transform
        self.device = device
        self._out = None
        #: (classes, mean, inv) numpy arguments of the one-pass CPU kernel, when it applies
        self._fused = None
        #: (classes, mean, inv) device tensors of the one-pass GPU kernel, when it applies
        self._fused_gpu = None
        # the CPU kernels by the size of the whole split (runs x examples x classes), not
        # of a call: a pass's calls shrink with the tiles left to do, and a resumed
        # computation must make the choices an uninterrupted one made
        if (torch.device(device).type == "cpu" and transform == LOG1P32 and mean.shape[1]
                and _fused.use(st.count * st.mean.size)):
            # The kernel reads them transposed; the torch form's (n, C') tensors are views
            # of the same copies, so the statistics are held once, as the plan counts.
            cls = np.arange(st.mean.shape[1]) if classes is None else np.asarray(classes)
            mean_t = np.ascontiguousarray(mean.T, np.float64)
            inv_t = np.ascontiguousarray(inv.T, np.float64)
            self._fused = (cls.astype(np.int64), mean_t, inv_t)
            self.mean, self.inv = torch.from_numpy(mean_t).T, torch.from_numpy(inv_t).T
        else:
            self.mean = torch.from_numpy(np.ascontiguousarray(mean, np.float64)).to(device)
            self.inv = torch.from_numpy(np.ascontiguousarray(inv, np.float64)).to(device)
            if (torch.device(device).type == "cuda" and transform == LOG1P32
                    and mean.shape[1] and _fused_gpu.enabled(device)):
                cls = np.arange(st.mean.shape[1]) if classes is None else np.asarray(classes)
                self._fused_gpu = (torch.from_numpy(cls.astype(np.int32)).to(device),
                                   self.mean, self.inv)

    @property
    def width(self) -> int:
        """Classes per run in the output (all, or the selected ones)."""
        return int(self.mean.shape[1])

    @classmethod
    def temp_bytes(cls, device_type: str) -> int:
        """Device bytes of the float64 temporaries of one call (a block's values, its
        log-softmax and the standardised copy) that a GPU's budget must hold; on the CPU
        they are cache-sized (12 MB) and not counted against a share of RAM."""
        if device_type == "cpu":
            return 0
        return 3 * cls.BLOCK_BYTES.get(device_type, cls.BLOCK_BYTES["cuda"])

    def _standardise(self, raw):
        """raw (b, n, C) store dtype -> standardised float64 (b, n, C')."""
        x = transform64(raw, self.transform)
        if self.classes is not None:
            x = x.index_select(-1, self.classes)
        return x.sub_(self.mean).mul_(self.inv)

    def __call__(self, raw, out=None):
        """raw (k, n, C) -> Z (n, k*C') float32, C' the number of selected classes.

        ``raw``: on this normaliser's device, or moved there first.
        ``out``: a float32 (n, >= k*C') operand to write into (columns past k*C' are left
        as they are, e.g. zero padding); by default a buffer reused across calls.
        The transform's values (see :func:`stats.log_softmax_log1p32` for why their
        precision matters) are standardised in float64 over sub-blocks of runs; only
        the standardised values, O(1) in size, are rounded to float32, written straight
        into the GEMM operand. The store's :data:`~kernelscale.stats.LOG1P32` values
        are standardised by a one-pass kernel with the same float64 centring and
        scaling: :mod:`kernelscale.fused`'s on the CPU (for splits of
        :data:`~kernelscale.fused.MIN_VALUES` values and more), :mod:`kernelscale.fused_gpu`'s
        on a GPU.
        """
        import torch

        if raw.device != self.device:  # e.g. host arrays for a GPU normaliser
            raw = raw.to(self.device, non_blocking=True)
        k, n, c_in = raw.shape
        c = self.width
        if out is None:
            if self._out is None or self._out.shape[1] < k * c or self._out.shape[0] != n:
                self._out = torch.empty((n, k * c), dtype=torch.float32, device=self.device)
            out = self._out
        z = out[:, : k * c]
        if self._fused is not None and out.is_contiguous() and raw.device.type == "cpu" \
                and _fused.supports(raw.dtype):
            _fused.standardise(raw, *self._fused, out.numpy())
            return z
        if self._fused_gpu is not None and raw.is_contiguous() and out.stride(1) == 1 \
                and _fused_gpu.supports(raw.dtype) and _fused_gpu.enabled():
            try:
                _fused_gpu.standardise(raw, *self._fused_gpu, out)
                return z
            except ValueError:
                raise
            except Exception as e:  # not built (no C compiler, an unsupported GPU...):
                # the first call fails before anything runs, so the torch form takes over
                _fused_gpu.unavailable(e)
        view = z.unflatten(1, (k, c))  # a view also of a padded operand's columns
        block = self.BLOCK_BYTES.get(self.device.type, self.BLOCK_BYTES["cuda"])
        sb = max(1, block // max(1, n * c_in * 8))
        for r0 in range(0, k, sb):
            r1 = min(r0 + sb, k)
            view[:, r0:r1, :].copy_(self._standardise(raw[r0:r1]).permute(1, 0, 2))
        return z
