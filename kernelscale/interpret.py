"""Interpretability views of a kernel, from the test rows' top neighbours.

* :func:`most_similar` -- test examples ranked by the kernel value of their most similar
  train example: how many lie above thresholds (near-duplicates of train examples), and
  the top pairs;
* :func:`failures` -- the most confident mistakes of the nearest neighbour: test examples
  whose most similar train example carries another label, by decreasing kernel value,
  and which label pairs they confuse;
* :func:`random_examples` -- a seeded random sample of test examples with their nearest
  train examples.

Each view is a JSON-able dict of indices, labels and kernel values; images are attached
by the report when the data set's images are available (:func:`load_images`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from .labels import cifar10_root, is_labels_spec
from .topk import Neighbours

#: thresholds of the "most similar train example" table.
THRESHOLDS = (0.3, 0.5, 0.7, 0.9)


def _neighbour_list(nb: Neighbours, i: int, labels_train: np.ndarray, n: int) -> list[dict]:
    return [{"train": int(nb.index[i, j]), "label": int(labels_train[nb.index[i, j]]),
             "value": float(nb.values[i, j])} for j in range(min(n, nb.kmax))]


def _entry(nb: Neighbours, i: int, labels_train: np.ndarray, labels_test: np.ndarray,
           n: int) -> dict:
    return {"test": int(i), "label": int(labels_test[i]),
            "neighbours": _neighbour_list(nb, i, labels_train, n)}


def most_similar(nb: Neighbours, labels_train: np.ndarray, labels_test: np.ndarray,
                 threshold: float = 0.5, top: int = 8, neighbours: int = 1) -> dict:
    """Test examples by the kernel value of their most similar train example.

    Returns the fraction above ``threshold`` (and above each of :data:`THRESHOLDS`), the
    ``top`` pairs (ties to the smaller test index), and how often a pair above the
    threshold shares its label.
    """
    best = nb.values[:, 0].astype(np.float64)
    order = np.lexsort((np.arange(best.size), -best))
    above = best > threshold
    same = labels_train[nb.index[:, 0]] == labels_test
    thresholds = sorted({*THRESHOLDS, float(threshold)})
    return {"threshold": float(threshold), "count_above": int(above.sum()),
            "fraction_above": float(above.mean()) if best.size else 0.0,
            "same_label_above": float(same[above].mean()) if above.any() else None,
            "by_threshold": [{"threshold": t, "count": int((best > t).sum()),
                              "fraction": float((best > t).mean())} for t in thresholds],
            "quantiles": {str(q): float(np.quantile(best, q)) for q in (0.1, 0.5, 0.9, 0.99)},
            "top": [_entry(nb, int(i), labels_train, labels_test, neighbours)
                    for i in order[:top]]}


def failures(nb: Neighbours, labels_train: np.ndarray, labels_test: np.ndarray,
             top: int = 8, neighbours: int = 5) -> dict:
    """Test examples whose nearest train example has another label, most similar first."""
    nn_label = labels_train[nb.index[:, 0]]
    wrong = np.flatnonzero(nn_label != labels_test)
    vals = nb.values[wrong, 0].astype(np.float64)
    order = wrong[np.lexsort((wrong, -vals))]
    pairs = Counter(zip(labels_test[wrong].tolist(), nn_label[wrong].tolist(), strict=True))
    return {"count": int(wrong.size), "fraction": float(wrong.size / max(1, len(nb))),
            "top": [_entry(nb, int(i), labels_train, labels_test, neighbours)
                    for i in order[:top]],
            "confused": [{"label": a, "neighbour_label": b, "count": c}
                         for (a, b), c in pairs.most_common(8)]}


def random_examples(nb: Neighbours, labels_train: np.ndarray, labels_test: np.ndarray,
                    count: int = 8, neighbours: int = 5, seed: int = 0) -> dict:
    """``count`` test examples drawn without replacement (seeded), with their neighbours."""
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(nb), size=min(count, len(nb)), replace=False))
    return {"seed": seed,
            "examples": [_entry(nb, int(i), labels_train, labels_test, neighbours)
                         for i in pick]}


@dataclass
class Images:
    """uint8 images (n, H, W, 3) of both splits, in the store's example order."""

    train: np.ndarray
    test: np.ndarray
    class_names: tuple[str, ...]
    source: str


def load_images(spec: str | None) -> tuple[Images | None, str]:
    """Images for ``cifar10:ROOT`` from torchvision's CIFAR10 (never downloads).

    Returns ``(images, note)``; ``images`` is None (and ``note`` says why) when the spec
    is not an image data set or its files are not there.
    """
    if not spec or not is_labels_spec(spec):
        return None, "the labels name no image data set (cifar10:ROOT); views are tables"
    root = cifar10_root(spec)
    try:
        import torchvision

        tr = torchvision.datasets.CIFAR10(root, train=True, download=False)
        te = torchvision.datasets.CIFAR10(root, train=False, download=False)
    except Exception as e:  # a missing or corrupt data set only turns images off
        return None, f"{spec}: images unavailable ({type(e).__name__}: {str(e)[:120]})"
    return (Images(np.asarray(tr.data), np.asarray(te.data), tuple(tr.classes), spec),
            f"images from torchvision CIFAR10 at {root}")
