"""kernelscale: the ensemble-correlation kernel of large ensembles, from logits to k-NN.

The Python API (:mod:`kernelscale.api`, loaded on first use: ``import kernelscale``
imports neither torch nor zarr)::

    open_store(path)                          -> Store
    ingest(source, store, **options)          -> IngestSummary
    compute_kernel(store, out, **options)     -> KernelSummary    (options: KernelConfig)
    open_kernel(path)                         -> KernelView  .numpy() .torch() .dask() .xarray()
    neighbours(kernel, k)                     -> Neighbours  values float32, index int64 (n, k)
    evaluate(store, kernel, labels, **opts)   -> Evaluation  accuracies in percent
    kernel_from_arrays(test, train)           -> float32 ndarray (n_test, n_train)
    simulate(out, runs=..., ...)              -> SimulationSummary
    KernelscaleError, BadInputError, __version__

Modules, bottom to top (each imports only from the rows above it):

* foundations   -- ``errors``, ``atomic``, ``progress``, ``units``, ``signals``, ``device``,
  ``version``, ``bundled``
* pure logic    -- ``stats`` (running statistics), ``plan`` (tiles), ``topk``, ``knn``,
  ``normalise``
* formats       -- ``store`` (logits Zarr store), ``output`` (kernel Zarr group), ``labels``, ``logfile``
* sources       -- ``sources/`` (local folders, the Hugging Face Hub)
* stages        -- ``convert``, ``parallel``, ``ingestion``, ``reader``, ``kernel``, ``arrays``,
  ``evaluation``, ``provenance``, ``curve``, ``interpret``, ``figures``, ``report``,
  ``simulation``, ``bench``
* orchestration -- ``config`` (job files), ``pipeline``, ``slurm/``, ``api``
* command line  -- ``cli``
"""

from __future__ import annotations

from typing import Any

from .errors import BadInputError, KernelscaleError
from .version import __version__

#: names loaded from :mod:`kernelscale.api` on first use
_API = ("open_store", "ingest", "compute_kernel", "KernelConfig", "kernel_from_arrays",
        "open_kernel", "KernelView", "neighbours", "evaluate", "simulate")

__all__ = [*_API, "KernelscaleError", "BadInputError", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _API:
        from . import api

        value = getattr(api, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
