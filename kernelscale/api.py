"""The Python API: what a notebook calls, on paths or on arrays in memory.

Every function here is a thin layer over a stage module; the command line and the job
files drive the same stages (``kernelscale.cli``, ``kernelscale.pipeline``)::

    store = open_store("store")                            # Store (read-only)
    ingest("runs/", "store")                               # IngestSummary
    compute_kernel("store", "kernel", device="cpu")        # KernelSummary
    view = open_kernel("kernel")                           # KernelView
    view.numpy(); view.torch(); view.dask(); view.xarray(labels="labels.npz")
    nb = neighbours(view, 3)                               # Neighbours (n_test, 3)
    ev = evaluate("store", view, "labels.npz")             # Evaluation (accuracies, %)
    K = kernel_from_arrays(test, train)                    # float32 (n_test, n_train)

Shapes: logits are (runs, examples, classes); a kernel is (rows, cols) float32, rows and
columns the splits of its ``pairs`` (``test-train``: rows test, columns train).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .arrays import is_torch, kernel_from_arrays
from .errors import BadInputError, ConfigError, KernelscaleError
from .evaluation import Evaluation
from .evaluation import evaluate as _evaluate
from .ingestion import IngestConfig, IngestSummary
from .ingestion import ingest as _ingest
from .kernel import KernelConfig, KernelSummary
from .kernel import compute_kernel as _compute_kernel
from .kernelread import kernel_neighbours, load_kernel
from .labels import Labels, labels_from_arrays, load_labels
from .output import DIMENSION_NAMES, PAIRS, KernelOutput
from .simulation import simulate
from .store import Store
from .topk import Neighbours, top_neighbours

__all__ = ["open_store", "ingest", "compute_kernel", "KernelConfig", "kernel_from_arrays",
           "open_kernel", "KernelView", "neighbours", "evaluate", "simulate"]

PathLike = str | os.PathLike


def _options(cls: type, what: str, options: dict[str, Any], positional: set[str]) -> None:
    """Refuse keyword options that are not fields of the config dataclass ``cls``
    (``positional``: the fields the function's own arguments fill)."""
    known = {f.name for f in dataclasses.fields(cls)} - positional
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"{what}: unknown option(s) {', '.join(unknown)}; known: "
                          f"{', '.join(sorted(known))}")


def _store_path(store: Store | PathLike) -> Path:
    return store.root if isinstance(store, Store) else Path(store)


# ------------------------------------------------------------------------- the stages

def open_store(path: PathLike, mode: str = "r") -> Store:
    """Open the store at ``path`` (read-only unless ``mode="a"``).

    ``store.read(split, start, stop)`` gives the logits of runs ``[start, stop)`` of
    ``split`` (``"test"`` or ``"train"``): (runs, examples, classes) in the store dtype
    (float16 for the Hub's files); ``store.stats(split)`` the float64 statistics.
    """
    return Store.open(path, mode=mode)


def ingest(source: PathLike, store: Store | PathLike, **options: Any) -> IngestSummary:
    """Ingest the ``log.pt`` files of ``source`` (a folder or ``hf://`` spec) into ``store``.

    ``options``: fields of :class:`~kernelscale.ingestion.IngestConfig` (``glob``,
    ``max_files``, ``max_runs``, ``skip_bad``, ``workers``, ``fetch``, ...);
    ``show_progress`` defaults to False here. The store is created when absent.
    """
    _options(IngestConfig, "ingest", options, {"source", "store"})
    options.setdefault("show_progress", False)
    return _ingest(IngestConfig(source=source, store=_store_path(store), **options))


def compute_kernel(store: Store | PathLike, out: PathLike, **options: Any) -> KernelSummary:
    """Compute (or resume) the kernel of ``store`` into the Zarr group ``out``.

    ``options``: fields of :class:`KernelConfig` (``pairs``, ``runs``, ``device``,
    ``precision``, ``max_memory``, ``overwrite``, ...); ``show_progress`` defaults to
    False here. The result is float32 (rows, cols); open it with :func:`open_kernel`.
    """
    _options(KernelConfig, "compute_kernel", options, {"store", "out"})
    options.setdefault("show_progress", False)
    return _compute_kernel(KernelConfig(store=_store_path(store), out=Path(out), **options))


def evaluate(store: Store | PathLike, kernel: KernelView | PathLike,
             labels: Labels | PathLike | Mapping, **options: Any) -> Evaluation:
    """Baselines and k-NN accuracies (percent) of a finished test-train kernel of ``store``.

    ``labels``: a :class:`~kernelscale.labels.Labels`, a labels path (``.npz``, or a
    ``.train.npy``/``.test.npy`` pair) or ``cifar10:ROOT`` (checked against the store's
    sizes and classes), or a mapping with int arrays ``train`` (n_train,) and ``test``
    (n_test,) and optionally ``class_names`` (C,) strings. ``options``: keyword arguments of
    :func:`kernelscale.evaluation.evaluate` (``k``, ``weighting``, ``power``,
    ``temperature``, ``select``, ``train_kernel``, ...).
    """
    from .hubkernel import is_hub_kernel

    path = _store_path(store)
    st = store if isinstance(store, Store) else Store.open(path)
    if is_hub_kernel(kernel):  # hf://datasets/...: downloaded and verified
        kernel = open_kernel(kernel)
    kpath = kernel.path if isinstance(kernel, KernelView) else Path(kernel)
    lab = _labels(labels, n_train=st.shape.n_train, n_test=st.shape.n_test,
                  classes=st.shape.classes)
    return _evaluate(str(path), str(kpath), lab, **options)


def _labels(labels: Labels | PathLike | Mapping, *, n_train: int | None,
            n_test: int | None, classes: int | None = None) -> Labels:
    if isinstance(labels, Labels):
        return labels
    if isinstance(labels, Mapping):
        missing = [s for s in ("train", "test") if s not in labels]
        if missing:
            raise BadInputError(f"labels mapping lacks {', '.join(map(repr, missing))} (it "
                                "needs int arrays "
                                "'train' and 'test')")
        return labels_from_arrays(labels["train"], labels["test"], n_train=n_train,
                                  n_test=n_test, classes=classes,
                                  class_names=labels.get("class_names"))
    if isinstance(labels, str | os.PathLike):
        return load_labels(os.fspath(labels), n_train=n_train, n_test=n_test, classes=classes)
    raise BadInputError(f"labels must be a Labels, a path or a mapping, not "
                        f"{type(labels).__name__}")


# ---------------------------------------------------------------------- a saved kernel

@dataclass(frozen=True, eq=False)
class KernelView:
    """A finished kernel on disk (see :func:`open_kernel`); nothing is read until asked.

    ``view[rows, cols]`` reads a region (float32 ndarray); the array methods read it all
    (``numpy``, ``torch``, ``xarray``) or lazily (``dask``, ``xarray(lazy=True)``).
    Dimension names (:attr:`dims`) are the splits of the pairs; a square kernel's columns
    are ``<split>_col``: ``test-train`` -> ``("test", "train")``, ``train-train`` ->
    ``("train", "train_col")``, ``test-test`` -> ``("test", "test_col")``.

    A top-K kernel (:attr:`topk` is K) has no full matrix: :meth:`neighbours` gives its
    ``values`` float32 and ``indices`` int64 (rows, K); the array methods refuse it.
    """

    path: Path
    output: KernelOutput = dataclasses.field(repr=False)

    @property
    def array(self):
        """The Zarr array ``kernel``: float32 (rows, cols), chunked like :attr:`chunks`."""
        return self.output.array

    @property
    def attrs(self) -> dict:
        return self.output.attrs

    @property
    def identity(self) -> dict:
        """What the kernel was computed from: store fingerprint, runs, pairs, precision,
        log_softmax, log_softmax_fp32, classes, shape."""
        return dict(self.attrs.get("identity", {}))

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) of the kernel (of the full matrix a top-K kernel stands for)."""
        return self.output.shape

    @property
    def topk(self) -> int | None:
        """K of a top-K kernel, None for a full one."""
        return self.output.topk

    def neighbours(self, k: int | None = None, *, exclude_diagonal: bool = False,
                   workers: int | None = None) -> Neighbours:
        """Top-``k`` neighbours of every row (default: all K of a top-K kernel)."""
        if k is None:
            if not self.topk:
                raise ConfigError("neighbours of a full kernel need k")
            k = self.topk
        return kernel_neighbours(self.output, k, exclude_diagonal=exclude_diagonal,
                                 workers=workers)

    @property
    def chunks(self) -> tuple[int, int]:
        return self.output.chunks

    @property
    def pairs(self) -> str:
        return str(self.identity.get("pairs", "test-train"))

    @property
    def runs(self) -> int:
        return int(self.identity["runs"])

    @property
    def dims(self) -> tuple[str, str]:
        return DIMENSION_NAMES[self.pairs]

    @property
    def store_path(self) -> Path | None:
        """The store the kernel was computed from (as recorded, absolute), if recorded."""
        s = self.attrs.get("store")
        return Path(s) if s else None

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float32)

    def __getitem__(self, key: Any) -> np.ndarray:
        return self.array[key]

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        a = self.numpy()
        return a if dtype is None else a.astype(dtype, copy=False)

    def numpy(self) -> np.ndarray:
        """The whole kernel, float32 (rows, cols), read into memory."""
        return np.ascontiguousarray(self.array[...], dtype=np.float32)

    def torch(self):
        """The whole kernel as a CPU ``torch.float32`` tensor (rows, cols)."""
        import torch

        return torch.from_numpy(self.numpy())

    def dask(self):
        """A lazy ``dask.array`` float32 (rows, cols) over the Zarr array, its chunks."""
        import dask.array as da

        return da.from_zarr(self.array)

    def xarray(self, labels: Labels | PathLike | Mapping | None = None, *,
               lazy: bool = False):
        """A ``xarray.DataArray`` float32 with dims :attr:`dims` and attrs from the identity.

        Each dim has an integer coordinate of the same name (the example index). With
        ``labels`` (a :class:`~kernelscale.labels.Labels`, an ``.npz`` path, ``cifar10:ROOT``
        or a mapping of ``train``/``test`` arrays), each dim also gets the coordinate
        ``<dim>_label`` (int64). ``lazy``: back it by :meth:`dask` instead of reading it.
        Needs xarray (``pip install kernelscale[xarray]``).
        """
        try:
            import xarray as xr
        except ImportError:
            raise KernelscaleError("KernelView.xarray needs xarray: pip install "
                                   "kernelscale[xarray]") from None
        rows, cols = PAIRS[self.pairs]
        dims = self.dims
        n, m = self.shape
        coords: dict[str, Any] = {dims[0]: np.arange(n), dims[1]: np.arange(m)}
        if labels is not None:
            sizes = {rows: n, cols: m}
            lab = _labels(labels, n_train=sizes.get("train"), n_test=sizes.get("test"))
            coords[f"{dims[0]}_label"] = (dims[0], getattr(lab, rows))
            coords[f"{dims[1]}_label"] = (dims[1], getattr(lab, cols))
        ident = self.identity
        attrs = {k: ident[k] for k in ("pairs", "runs", "precision", "store_fingerprint")
                 if ident.get(k) is not None}
        attrs.update({k: int(ident[k]) for k in ("log_softmax", "log_softmax_fp32")
                      if k in ident})
        if ident.get("classes") is not None:
            attrs["classes"] = list(ident["classes"])
        if self.store_path is not None:
            attrs["store"] = str(self.store_path)
        if labels is not None and lab.class_names:
            attrs["class_names"] = list(lab.class_names)
        data = self.dask() if lazy else self.numpy()
        return xr.DataArray(data, dims=dims, coords=coords, name="kernel", attrs=attrs)


def open_kernel(path: PathLike, *, require_complete: bool = True) -> KernelView:
    """Open the kernel saved at ``path`` (refuses an unfinished one unless told).

    ``path`` may be ``hf://datasets/OWNER/NAME[@REVISION][/PATH]``: a published kernel,
    downloaded into the Hub cache and verified first (:mod:`kernelscale.hubkernel`)."""
    from .hubkernel import fetch_kernel, is_hub_kernel

    if is_hub_kernel(path):
        path = fetch_kernel(str(path))
    return KernelView(Path(path), load_kernel(path, require_complete=require_complete))


def neighbours(kernel: KernelView | PathLike | Any, k: int, *,
               exclude_diagonal: bool = False, workers: int | None = None) -> Neighbours:
    """Top-``k`` columns of every row of ``kernel``, largest value first.

    ``kernel``: a path, a :class:`KernelView` or a 2-D array (numpy, torch, Zarr; read
    in row blocks). Returns :class:`~kernelscale.knn.Neighbours`: ``values`` float32
    (rows, k) and ``index`` int64 (rows, k); equal values by column, smallest first.
    ``exclude_diagonal``: row ``i`` never has column ``i`` (leave-one-out on a square
    kernel).
    """
    if isinstance(kernel, str | os.PathLike):
        kernel = open_kernel(kernel)
    if isinstance(kernel, KernelView):
        return kernel.neighbours(k, exclude_diagonal=exclude_diagonal, workers=workers)
    arr = kernel
    if is_torch(arr):
        arr = arr.detach().cpu().numpy()
    if not hasattr(arr, "__getitem__") or not hasattr(arr, "shape"):
        arr = np.asarray(arr)
    if len(arr.shape) != 2:
        raise BadInputError(f"neighbours needs a 2-D kernel, got shape {tuple(arr.shape)}")
    chunks = getattr(arr, "chunks", None)
    # a dask array's chunks are tuples of sizes: read one row chunk per block
    row_chunk = int(chunks[0][0]) if chunks and isinstance(chunks[0], tuple) else None
    return top_neighbours(arr, k, exclude_diagonal=exclude_diagonal, workers=workers,
                          row_chunk=row_chunk)
