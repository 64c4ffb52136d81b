"""Evaluation from a saved kernel: baselines and k-NN, offline, on the CPU.

* single-model accuracy: mean over runs of each run's test accuracy (argmax of its logits)
* ensemble accuracy: argmax of the mean logits over runs, rounded to the store dtype as
  the reference's ``logits.mean(0)`` on float16 does
* k-NN accuracy: the ``k`` train examples with the largest kernel values per test row;
  majority vote with ``torch.mode`` (ties resolved exactly as the reference resolves them)

All of it streams: logits in run-chunks from the store, the kernel in row chunks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .errors import ConfigError, KernelOutputError
from .kernel import load_kernel
from .sources import Labels
from .store import Store

#: rows of the kernel read at once: 1024 x 50,000 float32 = 205 MB.
ROW_CHUNK = 1024


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


def topk_rows(kernel, k: int, rows: slice | None = None,  # noqa: ANN001
              row_chunk: int = ROW_CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` values and column indices of each row of a 2-D array-like.

    Returns float32 (n, k) values and int64 (n, k) indices, largest first, with the ties
    broken as ``torch.topk`` breaks them.
    """
    import torch

    n = kernel.shape[0]
    rows = rows or slice(0, n)
    r0, r1 = rows.start or 0, rows.stop if rows.stop is not None else n
    vals = np.empty((r1 - r0, k), dtype=np.float32)
    idx = np.empty((r1 - r0, k), dtype=np.int64)
    for s in range(r0, r1, row_chunk):
        e = min(s + row_chunk, r1)
        block = torch.from_numpy(np.ascontiguousarray(kernel[s:e], dtype=np.float32))
        v, i = block.topk(k, dim=1)
        vals[s - r0:e - r0], idx[s - r0:e - r0] = v.numpy(), i.numpy()
    return vals, idx


def knn_predict(nbr_idx: np.ndarray, labels_train: np.ndarray) -> np.ndarray:
    """Majority vote of the neighbours' labels with ``torch.mode`` (int64 (n,))."""
    import torch

    nbr_labels = torch.from_numpy(labels_train[nbr_idx])
    return nbr_labels.mode(1).values.numpy()


@dataclass
class Evaluation:
    runs: int
    k: int
    single_model_accuracy: float
    ensemble_accuracy: float
    knn_accuracy: float
    zero_variance: dict

    def as_json(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        rows = [("average single-model accuracy", self.single_model_accuracy),
                (f"ensemble accuracy ({self.runs} models)", self.ensemble_accuracy),
                (f"kernel accuracy (k-NN w/ k={self.k})", self.knn_accuracy)]
        width = max(len(r[0]) for r in rows)
        lines = [f"{name:<{width}} : {acc:6.2f}" for name, acc in rows]
        zv = self.zero_variance
        if zv and any(zv.values()):
            lines.append("zero-variance entries (contribute 0 to the kernel): "
                         + ", ".join(f"{s} {n}" for s, n in sorted(zv.items())))
        return "\n".join(lines)


def evaluate(store_path: str, kernel_path: str, labels: Labels, k: int = 3) -> Evaluation:
    """Baselines and k-NN accuracy (percent) for a finished test-by-train kernel."""
    if k < 1:
        raise ConfigError(f"--k must be >= 1, not {k}")
    store = Store.open(store_path)
    kern = load_kernel(kernel_path)
    ident = kern.attrs["identity"]
    if ident.get("pairs") != "test-train":
        raise KernelOutputError(f"{kernel_path}: is a {ident.get('pairs')} kernel; k-NN "
                                "evaluation needs a test-train kernel")
    if ident.get("store_fingerprint") != store.fingerprint():
        raise KernelOutputError(f"{kernel_path}: was computed from another state of the store "
                                f"(fingerprint {str(ident.get('store_fingerprint'))[:12]}, "
                                f"store now {store.fingerprint()[:12]})")
    s = store.shape
    if labels.test.shape[0] != s.n_test or labels.train.shape[0] != s.n_train:
        raise ConfigError(f"{labels.source}: {labels.train.shape[0]} train / "
                          f"{labels.test.shape[0]} test labels, store has {s.n_train} / "
                          f"{s.n_test}")
    if k > s.n_train:
        raise ConfigError(f"--k {k} exceeds the {s.n_train} train examples")
    runs = int(ident["runs"])
    base = baselines(store, labels.test, runs)
    _, idx = topk_rows(kern.array, k)
    pred = knn_predict(idx, labels.train)
    knn = float((pred == labels.test).mean() * 100)
    return Evaluation(runs, k, base.single_model_accuracy, base.ensemble_accuracy, knn,
                      dict(kern.attrs.get("zero_variance", {})))
