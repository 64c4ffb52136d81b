"""Evaluation from a saved kernel: baselines, k-NN, weighted k-NN, honest selection.

* single-model accuracy: mean over runs of each run's test accuracy (argmax of its logits)
* ensemble accuracy: argmax of the mean logits over runs, rounded to the store dtype as
  the reference's ``logits.mean(0)`` on float16 does
* k-NN accuracy: the ``k`` train examples with the largest kernel values per test row;
  majority vote, ties between labels to the smallest label (what ``torch.mode`` returns)
* weighted k-NN: each neighbour votes with a weight computed from its kernel value ``K``:
  ``none`` (1), ``power`` (``max(K, 0) ** p``) or ``softmax`` (``exp(K / T)``); the label
  with the largest summed weight wins, ties to the smallest label. A row whose ``k``
  weights are all zero (``power`` with no positive kernel value) falls back to the
  majority vote.

Neighbours are ordered by kernel value, largest first, and equal values by train index,
smallest first; so the top-``k`` set is well defined even with ties and the top-``k`` of
every ``k <= kmax`` is a prefix of the top-``kmax``. The kernel is read once, in row chunks
on a thread pool, keeping only the top-``kmax`` of each row; every ``k`` and weighting is
then scored from those ``(n, kmax)`` arrays.

Honest selection picks ``k`` and the weighting without test labels:

* ``leave-one-out``: k-NN of every train example over the train x train kernel, its own
  column excluded; the setting with the best leave-one-out accuracy is then scored on test;
* ``cross-fit`` (only a test x train kernel): the test set is split in two random halves;
  the setting chosen on one half is scored on the other, and the other way round; the
  reported accuracy is the fraction of all test examples classified correctly by the
  setting chosen on the half they are not in.

The best setting chosen with the test labels is reported too, labelled ``oracle``: it is
what a reader tuning on the test set would quote, an optimistic number.

Ablations (``ablation_kernels``): the kernel of each class alone (``--class c``) and the
kernel of raw logits (``--no-log-softmax``), computed with the kernel engine into a
directory and scored like the summed kernel.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import ConfigError, KernelOutputError
from .kernel import KernelOutput, load_kernel
from .progress import progress
from .sources import Labels
from .store import Store

#: target bytes of one block of rows read at once (1024 rows of a 50,000-column kernel).
BLOCK_BYTES = 205 << 20
#: kept for callers of :func:`topk_rows`: rows per block when the array has no chunks.
ROW_CHUNK = 1024
WEIGHTINGS = ("none", "power", "softmax")
DEFAULT_KS = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 15, 20, 25, 30, 40, 50)
DEFAULT_POWERS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
DEFAULT_TEMPERATURES = (0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001)
DEFAULT_POWER = 8.0
DEFAULT_TEMPERATURE = 0.02
#: rows scored at once: bounds the (rows, kmax, classes) float64 vote tensor.
VOTE_ROWS = 4096


# ------------------------------------------------------------------------- baselines

@dataclass
class Baselines:
    """Accuracies in percent over the first ``runs`` runs."""

    runs: int
    single_model_accuracy: float
    ensemble_accuracy: float
    per_run_accuracy: np.ndarray  # float64 (runs,), percent


def baselines(store: Store, labels_test: np.ndarray, runs: int | None = None) -> Baselines:
    """Single-model and mean-logit ensemble accuracy from the store's test logits."""
    runs = store.runs if runs is None else runs
    if runs > store.runs:
        raise ConfigError(f"--runs {runs} is larger than the {store.runs} runs "
                          f"{store.root} holds")
    step = store.shape.run_chunk
    per_run = np.empty(runs, dtype=np.float64)
    total = np.zeros((store.shape.n_test, store.shape.classes), dtype=np.float64)
    for s in range(0, runs, step):
        e = min(s + step, runs)
        block = store.read("test", s, e)
        per_run[s:e] = (block.argmax(-1) == labels_test[None, :]).mean(axis=1) * 100
        total += block.astype(np.float64).sum(axis=0)
    mean = (total / runs).astype(store.shape.dtype)
    ens = float((mean.argmax(-1) == labels_test).mean() * 100)
    return Baselines(runs, float(per_run.mean()), ens, per_run)


# ------------------------------------------------------------------------- neighbours

@dataclass
class Neighbours:
    """Top-``kmax`` train neighbours of each row of a kernel.

    ``values`` float32 (n, kmax), largest first; ``index`` int64 (n, kmax), the columns;
    equal values are ordered by column, smallest first. ``kmax`` may be below the asked
    number when the kernel has fewer columns.
    """

    values: np.ndarray
    index: np.ndarray

    @property
    def kmax(self) -> int:
        return int(self.values.shape[1])

    def __len__(self) -> int:
        return int(self.values.shape[0])

    def rows(self, sel: np.ndarray | slice) -> Neighbours:
        return Neighbours(self.values[sel], self.index[sel])


def _topk_block(block: np.ndarray, kmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``kmax`` of each row of ``block`` float32 (b, m), ties to the smaller column.

    ``torch.topk`` finds the set fast but breaks ties arbitrarily; asking for one more
    value shows which rows have a tie across the ``kmax`` boundary, and only those rows are
    completed by a full scan. Ties inside the set are then ordered by a lexsort.
    """
    import torch

    b, m = block.shape
    kk = min(kmax + 1, m)
    v, i = torch.from_numpy(block).topk(kk, dim=1)
    v, i = v.numpy(), i.numpy()
    tied = v[:, kmax] == v[:, kmax - 1] if kk > kmax else np.zeros(b, dtype=bool)
    v, i = np.ascontiguousarray(v[:, :kmax]), np.ascontiguousarray(i[:, :kmax])
    for r in np.flatnonzero(tied):
        row, thr = block[r], v[r, kmax - 1]
        above = np.flatnonzero(row > thr)
        sel = np.concatenate([above, np.flatnonzero(row == thr)[:kmax - above.size]])
        i[r], v[r] = sel, row[sel]
    order = np.lexsort((i, -v), axis=1)
    return (np.take_along_axis(v, order, axis=1),
            np.take_along_axis(i, order, axis=1).astype(np.int64, copy=False))


def default_workers() -> int:
    """Threads reading row blocks: the cores we may use, at most 4 (the reads are I/O)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    return max(1, min(4, n))


def _block_rows(kernel, row_chunk: int | None) -> int:  # noqa: ANN001
    if row_chunk:
        return row_chunk
    chunk = getattr(kernel, "chunks", None)
    base = int(chunk[0]) if chunk else 1
    per_row = max(1, int(kernel.shape[1]) * 4)
    # whole storage chunks per block, so no chunk is decoded twice
    return base * max(1, BLOCK_BYTES // (per_row * base))


def top_neighbours(kernel, kmax: int, *, exclude_diagonal: bool = False,  # noqa: ANN001
                   row_chunk: int | None = None, workers: int | None = None,
                   show_progress: bool = False) -> Neighbours:
    """Top-``kmax`` neighbours of every row of a 2-D array-like (a Zarr array, ndarray).

    Row blocks (whole storage chunks, ~200 MB) are read and reduced on ``workers``
    threads; memory holds at most ``workers`` blocks plus the (n, kmax) result.
    ``exclude_diagonal``: column ``i`` is never a neighbour of row ``i`` (leave-one-out
    on a train x train kernel).
    """
    n, m = (int(s) for s in kernel.shape)
    if kmax < 1:
        raise ConfigError(f"k must be >= 1, not {kmax}")
    kmax = min(kmax, m - 1 if exclude_diagonal else m)
    if kmax < 1:
        raise ConfigError(f"the kernel has {m} column(s): no neighbour to choose")
    rows = _block_rows(kernel, row_chunk)
    vals = np.empty((n, kmax), dtype=np.float32)
    idx = np.empty((n, kmax), dtype=np.int64)
    # a bar only where reading takes a while: more than a few blocks
    bar = progress(n, "neighbours", "row", enabled=show_progress and n > 4 * rows)

    def work(s: int) -> int:
        e = min(s + rows, n)
        block = np.ascontiguousarray(kernel[s:e], dtype=np.float32)
        if exclude_diagonal:
            r = np.arange(s, min(e, m))
            block[r - s, r] = -np.inf
        vals[s:e], idx[s:e] = _topk_block(block, kmax)
        return e - s

    try:
        with ThreadPoolExecutor(max_workers=workers or default_workers(),
                                thread_name_prefix="kernelscale-topk") as ex:
            # map() submits every block, but a block's memory exists only while a
            # worker holds it, so at most ``workers`` blocks are alive at once.
            for done in ex.map(work, range(0, n, rows)):
                bar.update(done)
    finally:
        bar.close()
    return Neighbours(vals, idx)


def topk_rows(kernel, k: int, rows: slice | None = None,  # noqa: ANN001
              row_chunk: int = ROW_CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` values and column indices of each row of a 2-D array-like.

    Returns float32 (n, k) values and int64 (n, k) indices, largest first, equal values
    ordered by column (see :func:`top_neighbours`, which this reads in parallel).
    """
    if rows is not None:
        n = kernel.shape[0]
        r0, r1 = rows.start or 0, rows.stop if rows.stop is not None else n
        nb = top_neighbours(np.asarray(kernel[r0:r1], dtype=np.float32), k,
                            row_chunk=row_chunk)
    else:
        nb = top_neighbours(kernel, k, row_chunk=row_chunk)
    return nb.values, nb.index


def knn_predict(nbr_idx: np.ndarray, labels_train: np.ndarray) -> np.ndarray:
    """Majority vote of the neighbours' labels with ``torch.mode`` (int64 (n,))."""
    import torch

    nbr_labels = torch.from_numpy(labels_train[nbr_idx])
    return nbr_labels.mode(1).values.numpy()


# --------------------------------------------------------------------------- voting

@dataclass(frozen=True)
class Setting:
    """One k-NN classifier: ``k`` neighbours and a weighting (``param`` = p or T)."""

    k: int
    weighting: str = "none"
    param: float | None = None

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(f"--weighting must be one of {', '.join(WEIGHTINGS)}, not "
                              f"{self.weighting!r}")
        if self.k < 1:
            raise ConfigError(f"--k must be >= 1, not {self.k}")
        if self.weighting == "power" and (self.param is None or self.param < 0):
            raise ConfigError(f"--power must be >= 0, not {self.param}")
        if self.weighting == "softmax" and (self.param is None or not self.param > 0):
            raise ConfigError(f"--temperature must be > 0, not {self.param}")

    @property
    def family(self) -> str:
        if self.weighting == "none":
            return "majority vote"
        return f"{self.weighting} {'p' if self.weighting == 'power' else 'T'}={self.param:g}"

    def label(self) -> str:
        return f"k={self.k}, {self.family}"

    def as_json(self) -> dict:
        return {"k": self.k, "weighting": self.weighting, "param": self.param,
                "label": self.label()}


def neighbour_weights(values: np.ndarray, weighting: str, param: float | None) -> np.ndarray:
    """Vote weights float64 (n, k) of neighbours with kernel values ``values`` (n, k).

    ``softmax`` weights are divided by ``exp(max_row K / T)``, which leaves every vote's
    winner unchanged and keeps ``exp`` from overflowing at small temperatures.
    """
    v = values.astype(np.float64)
    if weighting == "none":
        return np.ones_like(v)
    if weighting == "power":
        return np.maximum(v, 0.0) ** float(param)
    if weighting == "softmax":
        return np.exp((v - v[:, :1].max(axis=1, keepdims=True)) / float(param))
    raise ConfigError(f"unknown weighting {weighting!r}")


def predictions_by_k(nb: Neighbours, labels_train: np.ndarray, weighting: str,
                     param: float | None, ks: Sequence[int], classes: int) -> np.ndarray:
    """Predicted labels int64 (len(ks), n) for every ``k`` in ``ks`` at once.

    Votes are summed neighbour by neighbour (largest kernel value first) with a cumulative
    sum along the neighbours, so the prediction for every ``k`` costs one pass.
    """
    ks = [int(k) for k in ks]
    if not ks:
        return np.empty((0, len(nb)), dtype=np.int64)
    if max(ks) > nb.kmax or min(ks) < 1:
        raise ConfigError(f"k must lie in [1, {nb.kmax}], got {min(ks)}..{max(ks)}")
    kk = max(ks)
    n = len(nb)
    out = np.empty((len(ks), n), dtype=np.int64)
    cols = np.asarray(ks) - 1
    for s in range(0, n, VOTE_ROWS):
        e = min(s + VOTE_ROWS, n)
        lab = labels_train[nb.index[s:e, :kk]]
        w = neighbour_weights(nb.values[s:e, :kk], weighting, param)
        b = e - s
        onehot = np.zeros((b, kk, classes), dtype=np.float64)
        rr, jj = np.meshgrid(np.arange(b), np.arange(kk), indexing="ij")
        onehot[rr, jj, lab] = w
        scores = np.cumsum(onehot, axis=1)[:, cols]  # (b, len(ks), C)
        if weighting == "power":
            dead = scores.sum(axis=2) == 0  # no positive kernel value among the k
            if dead.any():
                onehot[rr, jj, lab] = 1.0
                counts = np.cumsum(onehot, axis=1)[:, cols]
                scores[dead] = counts[dead]
        out[:, s:e] = scores.argmax(axis=2).T
    return out


def predict(nb: Neighbours, labels_train: np.ndarray, setting: Setting,
            classes: int) -> np.ndarray:
    """Predicted labels int64 (n,) of one k-NN setting."""
    return predictions_by_k(nb, labels_train, setting.weighting, setting.param,
                            [setting.k], classes)[0]


def accuracy(pred: np.ndarray, truth: np.ndarray) -> float:
    return float((pred == truth).mean() * 100) if truth.size else float("nan")


# ------------------------------------------------------------------------ selection

@dataclass
class Grid:
    """The settings selection chooses from, in preference order for equal accuracy:
    majority vote before power before softmax, then parameters as listed, then small k."""

    ks: tuple[int, ...] = DEFAULT_KS
    powers: tuple[float, ...] = DEFAULT_POWERS
    temperatures: tuple[float, ...] = DEFAULT_TEMPERATURES

    def families(self) -> list[tuple[str, float | None]]:
        return ([("none", None)] + [("power", float(p)) for p in self.powers]
                + [("softmax", float(t)) for t in self.temperatures])

    def limited(self, kmax: int) -> Grid:
        ks = tuple(k for k in self.ks if k <= kmax) or (kmax,)
        return Grid(ks, self.powers, self.temperatures)

    def settings(self) -> list[Setting]:
        return [Setting(k, w, p) for w, p in self.families() for k in self.ks]


@dataclass
class Candidates:
    """Which rows each setting of a grid classifies correctly.

    ``settings`` in grid order; ``correct`` bool (len(settings), n).
    """

    settings: list[Setting]
    correct: np.ndarray

    def accuracy(self, i: int, rows: np.ndarray | None = None) -> float:
        c = self.correct[i] if rows is None else self.correct[i, rows]
        return float(c.mean() * 100) if c.size else float("nan")


def candidates(nb: Neighbours, labels_train: np.ndarray, truth: np.ndarray, grid: Grid,
               classes: int) -> Candidates:
    """Score every setting of ``grid`` on the rows of ``nb`` against ``truth`` (n,)."""
    grid = grid.limited(nb.kmax)
    settings, rows = [], []
    for w, p in grid.families():
        pred = predictions_by_k(nb, labels_train, w, p, grid.ks, classes)
        rows.append(pred == truth[None, :])
        settings += [Setting(k, w, p) for k in grid.ks]
    return Candidates(settings, np.concatenate(rows, axis=0))


def _choose(table: Candidates, rows: np.ndarray | None) -> int:
    """Index of the setting with the most correct ``rows``; the first one on ties."""
    c = table.correct if rows is None else table.correct[:, rows]
    return int(np.argmax(c.sum(axis=1)))


def _score(table: Candidates, i: int, rows: np.ndarray) -> int:
    """Number of ``rows`` the setting ``i`` classifies correctly."""
    return int(table.correct[i, rows].sum())


def crossfit(table: Candidates, seed: int = 0) -> dict:
    """Two-fold cross-fitting over random halves of the rows of ``table``.

    Each half is scored only with the setting chosen on the other half; returns a JSON
    dict with the pooled accuracy (percent of all rows) and each fold's choice.
    """
    n = table.correct.shape[1]
    if n < 2:
        raise ConfigError("cross-fitting needs at least 2 test examples")
    perm = np.random.default_rng(seed).permutation(n)
    halves = (np.sort(perm[: n // 2]), np.sort(perm[n // 2:]))
    folds, correct = [], 0
    for chosen_on, scored_on in (halves, halves[::-1]):
        i = _choose(table, chosen_on)
        hits = _score(table, i, scored_on)
        correct += hits
        folds.append({"setting": table.settings[i].as_json(),
                      "chosen_on_rows": int(chosen_on.size),
                      "accuracy_where_chosen": table.accuracy(i, chosen_on),
                      "scored_on_rows": int(scored_on.size),
                      "accuracy": hits / scored_on.size * 100})
    return {"method": "cross-fit", "seed": seed, "accuracy": correct / n * 100,
            "folds": folds,
            "description": "two random halves of the test set; each half scored with the "
                           "setting chosen on the other half"}


def oracle(table: Candidates) -> dict:
    i = _choose(table, None)
    return {"setting": table.settings[i].as_json(), "accuracy": table.accuracy(i),
            "description": "best setting chosen with the test labels (optimistic)"}


def family_best(table: Candidates) -> list[dict]:
    """For each weighting family (none / power p / softmax T): its best k on these rows."""
    out = []
    seen: dict[tuple, list[int]] = {}
    for i, s in enumerate(table.settings):
        seen.setdefault((s.weighting, s.param), []).append(i)
    for (w, p), ids in seen.items():
        hits = table.correct[ids].sum(axis=1)
        j = ids[int(np.argmax(hits))]
        out.append({"weighting": w, "param": p, "setting": table.settings[j].as_json(),
                    "accuracy": table.accuracy(j)})
    return out


# ----------------------------------------------------------------------- the inputs

@dataclass
class KernelInputs:
    """A store, a finished test x train kernel of it and matching labels, checked."""

    store: Store
    kernel: KernelOutput
    labels: Labels
    runs: int

    @property
    def identity(self) -> dict:
        return dict(self.kernel.attrs["identity"])

    @property
    def classes(self) -> int:
        return self.store.shape.classes


def _check_kernel(kern: KernelOutput, path: str | os.PathLike, store: Store,
                  pairs: str) -> dict:
    ident = kern.attrs["identity"]
    if ident.get("pairs") != pairs:
        raise KernelOutputError(f"{path}: is a {ident.get('pairs')} kernel; this needs a "
                                f"{pairs} kernel")
    if ident.get("store_fingerprint") != store.fingerprint():
        raise KernelOutputError(f"{path}: was computed from another state of the store "
                                f"(fingerprint {str(ident.get('store_fingerprint'))[:12]}, "
                                f"store now {store.fingerprint()[:12]})")
    return ident


def prepare(store_path: str | os.PathLike, kernel_path: str | os.PathLike,
            labels: Labels) -> KernelInputs:
    """Open and cross-check a store, a finished test-train kernel and labels."""
    store = Store.open(store_path)
    kern = load_kernel(kernel_path)
    ident = _check_kernel(kern, kernel_path, store, "test-train")
    s = store.shape
    if labels.test.shape[0] != s.n_test or labels.train.shape[0] != s.n_train:
        raise ConfigError(f"{labels.source}: {labels.train.shape[0]} train / "
                          f"{labels.test.shape[0]} test labels, store has {s.n_train} / "
                          f"{s.n_test}")
    return KernelInputs(store, kern, labels, int(ident["runs"]))


def open_train_kernel(path: str | os.PathLike, inputs: KernelInputs) -> KernelOutput:
    """A finished train x train kernel of the same store, runs and kernel options."""
    kern = load_kernel(path)
    ident = _check_kernel(kern, path, inputs.store, "train-train")
    main = inputs.identity
    for key in ("runs", "log_softmax", "log_softmax_fp32", "classes"):
        if ident.get(key) != main.get(key):
            raise KernelOutputError(f"{path}: {key} {ident.get(key)!r} differs from the "
                                    f"test kernel's {main.get(key)!r}")
    return kern


# ------------------------------------------------------------------------ ablations

def ablation_names(inputs: KernelInputs) -> list[str]:
    """``class-<c>`` for each class, and ``no-log-softmax`` when the kernel uses it."""
    ident = inputs.identity
    if ident.get("classes"):
        return []  # the kernel is itself a class ablation
    names = [f"class-{c}" for c in range(inputs.classes)]
    if ident.get("log_softmax", True):
        names.append("no-log-softmax")
    return names


def ablation_kernels(inputs: KernelInputs, directory: str | os.PathLike, *,
                     names: Sequence[str] | None = None, device: str = "auto",
                     show_progress: bool = False) -> list[tuple[str, Path]]:
    """Compute (or reuse) the ablation kernels of ``inputs``' kernel under ``directory``.

    ``DIR/class-<c>``: the kernel of class ``c`` alone; ``DIR/no-log-softmax``: the kernel
    of raw logits; both with the test kernel's store, runs and precision. A finished
    kernel of the same inputs is reused as it is (the engine checks its identity); one of
    other inputs is replaced.
    """
    from .kernel import KernelConfig, compute_kernel

    ident = inputs.identity
    directory = Path(directory)
    out = []
    for name in names if names is not None else ablation_names(inputs):
        if name.startswith("class-"):
            cfg = dict(classes=(int(name.split("-", 1)[1]),),
                       log_softmax=bool(ident.get("log_softmax", True)),
                       log_softmax_fp32=bool(ident.get("log_softmax_fp32", False)))
        elif name == "no-log-softmax":
            cfg = dict(classes=None, log_softmax=False)
        else:
            raise ConfigError(f"unknown ablation {name!r} (class-<c> or no-log-softmax)")
        path = directory / name
        compute_kernel(KernelConfig(store=Path(inputs.store.root), out=path,
                                    runs=inputs.runs, pairs="test-train", device=device,
                                    precision=ident.get("precision", "fp32"),
                                    overwrite=True, show_progress=show_progress, **cfg))
        out.append((name, path))
    return out


def score_ablations(inputs: KernelInputs, kernels: Sequence[tuple[str, Path]],
                    setting: Setting, grid: Grid, *, workers: int | None = None,
                    show_progress: bool = False) -> list[dict]:
    """k-NN accuracy of each ablation kernel at ``setting`` and at its best (oracle) one."""
    lab = inputs.labels
    kmax = max(max(grid.ks), setting.k)
    rows = []
    for name, path in kernels:
        kern = load_kernel(path)
        ident = _check_kernel(kern, path, inputs.store, "test-train")
        if ident.get("runs") != inputs.runs:
            raise KernelOutputError(f"{path}: runs {ident.get('runs')} differ from the test "
                                    f"kernel's {inputs.runs}")
        nb = top_neighbours(kern.array, kmax, workers=workers, show_progress=show_progress)
        table = candidates(nb, lab.train, lab.test, grid, inputs.classes)
        cls = ident.get("classes")
        rows.append({"name": name, "path": str(path),
                     "class": cls[0] if cls and len(cls) == 1 else None,
                     "log_softmax": ident.get("log_softmax", True),
                     "accuracy": accuracy(predict(nb, lab.train, setting, inputs.classes),
                                          lab.test),
                     "oracle": oracle(table)})
    return rows


# ----------------------------------------------------------------------- evaluation

@dataclass
class Evaluation:
    """Accuracies in percent. ``knn_accuracy`` is the majority vote at ``k``.

    ``setting``/``weighted_accuracy``: the requested k-NN setting and its accuracy;
    ``selection``: the honestly selected setting (see the module docstring), by
    leave-one-out when a train kernel is given, else by cross-fitting; ``crossfit``: the
    cross-fitted accuracy as well, whenever a selection ran; ``oracle``:
    the best setting on the test labels; ``accuracy_by_k``: test accuracy against k for
    the majority vote and each weighting family's best parameter; ``ablations``: per
    ablation kernel, accuracy at ``setting`` and its own oracle.
    """

    runs: int
    k: int
    single_model_accuracy: float
    ensemble_accuracy: float
    knn_accuracy: float
    zero_variance: dict
    setting: dict | None = None
    weighted_accuracy: float | None = None
    selection: dict | None = None
    crossfit: dict | None = None
    oracle: dict | None = None
    families: list | None = None
    accuracy_by_k: dict | None = None
    ablations: list | None = None
    per_run_accuracy: list = field(default_factory=list)

    def as_json(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        rows = [("average single-model accuracy", self.single_model_accuracy),
                (f"ensemble accuracy ({self.runs} models)", self.ensemble_accuracy),
                (f"kernel accuracy (k-NN w/ k={self.k})", self.knn_accuracy)]
        extra = []
        if self.setting and self.setting["weighting"] != "none":
            extra.append((f"weighted k-NN ({self.setting['label']})", self.weighted_accuracy,
                          ""))
        sel = self.selection
        if sel:
            if sel["method"] == "leave-one-out":
                note = (f"{sel['setting']['label']}; leave-one-out on train "
                        f"{sel['selection_accuracy']:.2f}")
            else:
                note = "; ".join(f"half {i + 1}: {f['setting']['label']}"
                                 for i, f in enumerate(sel["folds"]))
            extra.append((f"selected k-NN ({sel['method']})", sel["accuracy"], note))
        cf = self.crossfit
        if cf and cf is not sel and cf != sel:
            extra.append(("selected k-NN (cross-fit)", cf["accuracy"],
                          "; ".join(f"half {i + 1}: {f['setting']['label']}"
                                    for i, f in enumerate(cf["folds"]))))
        if self.oracle and sel:
            extra.append(("oracle k-NN (chosen with test labels)", self.oracle["accuracy"],
                          self.oracle["setting"]["label"]))
        for a in self.ablations or []:
            extra.append((f"ablation {a['name']} (k-NN w/ {self.setting['label']})",
                          a["accuracy"], ""))
        width = max(len(r[0]) for r in rows + extra)
        lines = [f"{name:<{width}} : {acc:6.2f}" for name, acc in rows]
        lines += [f"{name:<{width}} : {acc:6.2f}" + (f"  ({note})" if note else "")
                  for name, acc, note in extra]
        zv = self.zero_variance
        if zv and any(zv.values()):
            lines.append("zero-variance entries (contribute 0 to the kernel): "
                         + ", ".join(f"{s} {n}" for s, n in sorted(zv.items())))
        return "\n".join(lines)


def make_setting(k: int, weighting: str = "none", power: float | None = None,
                 temperature: float | None = None) -> Setting:
    param = {"none": None, "power": DEFAULT_POWER if power is None else power,
             "softmax": DEFAULT_TEMPERATURE if temperature is None else temperature
             }.get(weighting)
    return Setting(k, weighting, param)


def accuracy_by_k(table: Candidates) -> dict:
    """Test accuracy against k: majority vote and each family's best parameter (oracle)."""
    ks = sorted({s.k for s in table.settings})
    curves: dict[str, dict] = {}
    best: dict[str, tuple[int, tuple]] = {}
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(table.settings):
        groups.setdefault((s.weighting, s.param), []).append(i)
    for (w, p), ids in groups.items():
        top = int(table.correct[ids].sum(axis=1).max())
        if w == "none" or top > best.get(w, (-1, ()))[0]:
            best[w] = (top, (w, p))
    for w in WEIGHTINGS:
        if w not in best:
            continue
        key = best[w][1]
        ids = groups[key]
        label = Setting(1, *key).family
        curves[w] = {"label": label, "param": key[1],
                     "accuracy": [table.accuracy(i) for i in ids]}
    return {"ks": ks, "curves": curves,
            "note": "weighted curves use the parameter with the best test accuracy"}


def evaluate_neighbours(inputs: KernelInputs, nb: Neighbours, setting: Setting, *,
                        select: bool = False, train_kernel: str | os.PathLike | None = None,
                        grid: Grid | None = None, seed: int = 0,
                        ablations: Sequence[tuple[str, Path]] = (),
                        workers: int | None = None, show_progress: bool = False
                        ) -> Evaluation:
    """Everything :func:`evaluate` reports, from the test rows' top neighbours ``nb``."""
    lab, C = inputs.labels, inputs.classes
    if setting.k > nb.kmax:
        raise ConfigError(f"--k {setting.k} exceeds the {nb.kmax} neighbours available")
    grid = (grid or Grid()).limited(nb.kmax)
    base = baselines(inputs.store, lab.test, inputs.runs)
    knn = accuracy(predict(nb, lab.train, Setting(setting.k), C), lab.test)
    weighted = accuracy(predict(nb, lab.train, setting, C), lab.test)
    table = candidates(nb, lab.train, lab.test, grid, C)
    ev = Evaluation(inputs.runs, setting.k, base.single_model_accuracy,
                    base.ensemble_accuracy, knn,
                    dict(inputs.kernel.attrs.get("zero_variance", {})),
                    setting=setting.as_json(), weighted_accuracy=weighted,
                    oracle=oracle(table), families=family_best(table),
                    accuracy_by_k=accuracy_by_k(table),
                    per_run_accuracy=[float(a) for a in base.per_run_accuracy])
    if train_kernel is not None:
        tk = open_train_kernel(train_kernel, inputs)
        tnb = top_neighbours(tk.array, nb.kmax, exclude_diagonal=True, workers=workers,
                             show_progress=show_progress)
        ev.selection = leave_one_out(tnb, lab.train, table, grid, C)
        ev.selection["train_kernel"] = str(train_kernel)
        ev.crossfit = crossfit(table, seed)
    elif select:
        ev.selection = ev.crossfit = crossfit(table, seed)
    if ablations:
        ev.ablations = score_ablations(inputs, ablations, setting, grid, workers=workers,
                                       show_progress=show_progress)
    return ev


def leave_one_out(train_nb: Neighbours, labels_train: np.ndarray, test_table: Candidates,
                  grid: Grid, classes: int) -> dict:
    """Choose the setting by leave-one-out k-NN on the train rows, score it on test.

    ``train_nb`` must come from a train x train kernel with the diagonal excluded.
    """
    kmax = min(train_nb.kmax, max(s.k for s in test_table.settings))
    grid = grid.limited(kmax)
    table = candidates(train_nb, labels_train, labels_train, grid, classes)
    i = _choose(table, None)
    chosen = table.settings[i]
    j = test_table.settings.index(chosen)
    return {"method": "leave-one-out", "setting": chosen.as_json(),
            "selection_accuracy": table.accuracy(i), "selection_rows": len(train_nb),
            "accuracy": test_table.accuracy(j),
            "description": "setting with the best leave-one-out k-NN accuracy on the train "
                           "x train kernel (own column excluded), scored on test"}


def evaluate(store_path: str, kernel_path: str, labels: Labels, k: int = 3, *,
             weighting: str = "none", power: float | None = None,
             temperature: float | None = None, select: bool = False,
             train_kernel: str | os.PathLike | None = None, grid: Grid | None = None,
             seed: int = 0, ablations_dir: str | os.PathLike | None = None,
             device: str = "auto", workers: int | None = None,
             show_progress: bool = False) -> Evaluation:
    """Baselines and k-NN accuracies (percent) for a finished test-by-train kernel.

    ``train_kernel`` (a train x train kernel of the same store and runs) selects the
    setting by leave-one-out; else ``select`` selects it by cross-fitting on the test
    halves. ``ablations_dir``: compute (or reuse) the ablation kernels there and score them.
    """
    setting = make_setting(k, weighting, power, temperature)
    inputs = prepare(store_path, kernel_path, labels)
    s = inputs.store.shape
    if k > s.n_train:
        raise ConfigError(f"--k {k} exceeds the {s.n_train} train examples")
    grid = grid or Grid()
    kmax = max(k, max(grid.ks))
    nb = top_neighbours(inputs.kernel.array, kmax, workers=workers,
                        show_progress=show_progress)
    abl = []
    if ablations_dir is not None:
        abl = ablation_kernels(inputs, ablations_dir, device=device,
                               show_progress=show_progress)
    return evaluate_neighbours(inputs, nb, setting, select=select, train_kernel=train_kernel,
                               grid=grid, seed=seed, ablations=abl, workers=workers,
                               show_progress=show_progress)
