"""Independent float64 implementations used as the truth in tests.

Nothing here imports kernelscale: the formula is written out again from its definition
(log-softmax, unbiased std over runs, 1/R, mean over classes).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch


def log_softmax64(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def log_softmax_exact64(x: np.ndarray) -> np.ndarray:
    """log-softmax to float64's relative precision in every class, the top one included:
    ``d - log1p(sum of exp(d) over the other classes)``, ``d = x - max(x)``."""
    x = np.asarray(x, dtype=np.float64)
    d = x - x.max(axis=-1, keepdims=True)
    e = np.exp(d)
    top = np.argmax(x, axis=-1)[..., None]
    np.put_along_axis(e, top, 0.0, axis=-1)
    return d - np.log1p(e.sum(axis=-1, keepdims=True))


def confident_logits(runs: int, n: int, classes: int, seed: int,
                     margin: tuple[float, float] = (15.0, 25.0)) -> np.ndarray:
    """float16 logits of confident predictions: the top class ahead by ``margin`` nats,
    so its log-softmax is ~1e-7..1e-11 and varies across runs only in those digits."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(runs, n, classes))
    top = rng.integers(0, classes, size=(1, n, 1)).repeat(runs, 0)
    gap = rng.uniform(*margin, size=(runs, n, 1))
    np.put_along_axis(x, top, x.max(axis=-1, keepdims=True) + gap, axis=-1)
    return x.astype(np.float16)


def normalise64(logits: np.ndarray, log_softmax: bool = True) -> np.ndarray:
    """(R, n, C) -> z (R, n, C) float64; zero-variance entries give 0."""
    x = log_softmax64(logits) if log_softmax else np.asarray(logits, dtype=np.float64)
    mean = x.mean(axis=0)
    std = x.std(axis=0, ddof=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(std > 0, (x - mean) / std, 0.0)
    return z


def reference_kernel(a_logits: np.ndarray, b_logits: np.ndarray, *, log_softmax: bool = True,
                     classes: list[int] | None = None) -> np.ndarray:
    """K[i, j] = 1/C sum_c 1/R sum_r z_a[r,i,c] z_b[r,j,c], float64."""
    za, zb = normalise64(a_logits, log_softmax), normalise64(b_logits, log_softmax)
    if classes is not None:
        za, zb = za[..., classes], zb[..., classes]
    R, _, C = za.shape
    return np.einsum("ric,rjc->ij", za, zb) / (R * C)


def write_log(path: str | os.PathLike, test: np.ndarray, train: np.ndarray,
              code: str = "synthetic", dtype=torch.float16) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"logits": torch.from_numpy(np.asarray(test)).to(dtype),
                "logits_train": torch.from_numpy(np.asarray(train)).to(dtype),
                "code": code}, path)
    return path


def random_source(root: str | os.PathLike, runs: list[int], n_test: int = 40,
                  n_train: int = 96, classes: int = 5, seed: int = 0,
                  scale: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Write files of random correlated logits; return all (test, train) as float16 arrays.

    Logits share a per-example mean and a per-run component so the kernel has structure.
    """
    rng = np.random.default_rng(seed)
    base_te = rng.normal(size=(n_test, classes)) * scale
    base_tr = rng.normal(size=(n_train, classes)) * scale
    proj = rng.normal(size=(classes, classes))
    tests, trains = [], []
    for f, r in enumerate(runs):
        w = rng.normal(size=(r, classes, classes)) * 0.5 + proj
        te = base_te @ w / classes + rng.normal(size=(r, n_test, classes))
        tr = base_tr @ w / classes + rng.normal(size=(r, n_train, classes))
        te, tr = te.astype(np.float16), tr.astype(np.float16)
        write_log(Path(root) / "logs_saveoutputs_main" / f"file{f:03d}" / "log.pt", te, tr)
        tests.append(te)
        trains.append(tr)
    return np.concatenate(tests), np.concatenate(trains)


def labels_file(path: str | os.PathLike, n_train: int, n_test: int, classes: int,
                seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    np.savez(path, train=rng.integers(0, classes, n_train), test=rng.integers(0, classes, n_test))
    return Path(path)


def top_sets(K: np.ndarray, k: int = 3) -> list[frozenset]:
    idx = np.argsort(-K, axis=1, kind="stable")[:, :k]
    return [frozenset(r) for r in idx]


def knn_predict(nbr_idx: np.ndarray, labels_train: np.ndarray) -> np.ndarray:
    """The published code's vote: ``torch.mode`` of the neighbours' labels (int64 (n,))."""
    nbr_labels = torch.from_numpy(labels_train[nbr_idx])
    return nbr_labels.mode(1).values.numpy()


def mutate(good: bytes, rng: np.random.Generator, insert_below: int | None = None
           ) -> tuple[int, bytes]:
    """(kind, damaged copy of ``good``): 1-3 bytes flipped (kind 0), cut short (1), or 1-19
    random bytes inserted (2) before position ``insert_below`` (default: anywhere)."""
    b = bytearray(good)
    op = int(rng.integers(3))
    if op == 0:
        for _ in range(rng.integers(1, 4)):
            b[rng.integers(len(b))] = rng.integers(256)
    elif op == 1:
        b = b[:rng.integers(len(b))]
    else:
        at = rng.integers(min(len(b), insert_below or len(b)))
        b[at:at] = rng.bytes(int(rng.integers(1, 20)))
    return op, bytes(b)
