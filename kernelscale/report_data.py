"""The report's numbers beyond the evaluation's: which k-NN row is the headline, the
ensemble's predictions, per-class accuracy and confusion matrices, the kernel values of
same- and different-label pairs, a class-sorted sample of kernel entries, where the class
names came from and when the inputs were made.

Labels are int64 in ``[0, C)``: ``truth``/``labels_test`` (n_test,), ``labels_train``
(n_train,). Nothing here holds a C x C matrix above :data:`CLASS_ROWS` classes, nor more
of the kernel than the entries sampled.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import KernelOutputError
from .knn import Selection
from .labels import default_class_names, is_labels_spec, npy_pair
from .topk import Neighbours

if TYPE_CHECKING:
    from .evaluation import Evaluation
    from .interpret import Images
    from .labels import Labels
    from .output import KernelOutput
    from .store import Store

#: per-class tables and bar charts list every class up to this many classes, and the
#: confusion matrices are shown whole; above it they are summarised (a histogram, the
#: extremes, the most frequent confusions), so a 1000-class report stays readable.
CLASS_ROWS = 20
#: classes listed at each end when a per-class view is summarised.
CLASS_EXTREMES = 10
#: a leave-one-out selection whose accuracy on the train rows is at least this (percent)
#: is a poor guide: the train examples' outputs carry their own labels (they were
#: trained on), so the train x train kernel tells the settings apart poorly.
LOO_POOR_GUIDE = 99.0
#: test rows and train columns of the kernel sample (about; split evenly over classes).
SAMPLE_ROWS, SAMPLE_COLS = 200, 400
#: most frequent confusions listed when a confusion matrix is summarised.
CONFUSIONS = 10


# ------------------------------------------------------------------------ headline

def loo_is_poor_guide(sel: Selection | None) -> bool:
    """Whether ``sel`` is a leave-one-out selection at or above :data:`LOO_POOR_GUIDE`."""
    return (sel is not None and sel.method == "leave-one-out"
            and sel.selection_accuracy is not None
            and sel.selection_accuracy >= LOO_POOR_GUIDE)


@dataclass(frozen=True)
class Headline:
    """The honestly selected k-NN the report leads with, and why that one."""

    selection: Selection
    reason: str

    def as_json(self) -> dict:
        return {"method": self.selection.method, "accuracy": self.selection.accuracy,
                "setting": self.selection.label(), "reason": self.reason}


def headline(ev: Evaluation) -> Headline | None:
    """The leave-one-out selection when there is one and it is not a poor guide
    (:func:`loo_is_poor_guide`), else the cross-fitted one; None without a selection."""
    sel, cf = ev.selection, ev.crossfit
    if sel is None:
        return None
    if sel.method == "leave-one-out":
        if not loo_is_poor_guide(sel):
            return Headline(sel, f"leave-one-out on the train x train kernel "
                                 f"({sel.selection_accuracy:.2f}% there, below "
                                 f"{LOO_POOR_GUIDE:g}%: it tells the settings apart)")
        if cf is not None:
            return Headline(cf, f"cross-fitting: leave-one-out reached "
                                f"{sel.selection_accuracy:.2f}% on the train rows (at least "
                                f"{LOO_POOR_GUIDE:g}%), a poor guide")
    return Headline(cf or sel, "cross-fitting over two halves of the test set (no usable "
                               "train x train kernel)")


# ----------------------------------------------------------------- predictions, classes

def ensemble_predictions(store: Store, runs: int) -> np.ndarray:
    """int64 (n_test,): argmax of the mean test logits of the first ``runs`` runs, the
    mean rounded to the store's dtype first (as the ensemble accuracy is computed)."""
    s = store.shape
    total = np.zeros((s.n_test, s.classes), dtype=np.float64)
    for a in range(0, runs, s.run_chunk):
        total += store.read("test", a, min(a + s.run_chunk, runs)).astype(np.float64).sum(0)
    return (total / runs).astype(s.dtype).argmax(-1).astype(np.int64)


def per_class(pred: np.ndarray, truth: np.ndarray, classes: int,
              names: list[str] | tuple[str, ...]) -> list[dict]:
    """Each class's test examples, accuracy of ``pred`` and most frequent mistake.

    ``pred``, ``truth``: int64 (n_test,) in ``[0, classes)``. One JSON-able dict per
    class: ``class``, ``name``, ``test_examples``, ``correct``, ``accuracy`` (percent;
    None without test examples) and ``mistake`` (the most frequent wrong prediction,
    ties to the smaller label: ``{"label", "name", "count"}``, or None). Memory O(n_test +
    classes): mistakes are counted over the (truth, prediction) pairs that occur.
    """
    n = np.bincount(truth, minlength=classes)
    hit = np.bincount(truth[pred == truth], minlength=classes)
    mistake: dict[int, tuple[int, int]] = {}
    for t, p, cnt in confusion_cells(pred, truth, classes).tolist():
        if t != p and (t not in mistake or cnt > mistake[t][1]):  # ascending: ties keep
            mistake[t] = (p, cnt)                                  # the smaller label
    out = []
    for c in range(classes):
        m = mistake.get(c)
        out.append({"class": c, "name": names[c], "test_examples": int(n[c]),
                    "correct": int(hit[c]),
                    "accuracy": float(hit[c] / n[c] * 100) if n[c] else None,
                    "mistake": ({"label": m[0], "name": names[m[0]], "count": m[1]}
                                if m else None)})
    return out


def confusion_cells(pred: np.ndarray, truth: np.ndarray, classes: int) -> np.ndarray:
    """Every nonzero cell of the confusion matrix as int64 (cells, 3) rows ``(true,
    predicted, count)``, by true then predicted label; at most n_test cells."""
    codes, counts = np.unique(truth * classes + pred, return_counts=True)
    return np.stack([codes // classes, codes % classes, counts], axis=1).astype(np.int64)


def confusion_matrix(cells: np.ndarray, classes: int) -> np.ndarray:
    """The dense int64 (classes, classes) matrix of ``cells`` (rows: true label, columns:
    predicted); for up to :data:`CLASS_ROWS` classes."""
    m = np.zeros((classes, classes), dtype=np.int64)
    m[cells[:, 0], cells[:, 1]] = cells[:, 2]
    return m


def top_confusions(cells: np.ndarray, n: int = CONFUSIONS) -> np.ndarray:
    """The ``n`` off-diagonal ``cells`` with the largest counts (ties: smaller true, then
    predicted label first), int64 (<= n, 3)."""
    off = cells[cells[:, 0] != cells[:, 1]]
    return off[np.lexsort((off[:, 1], off[:, 0], -off[:, 2]))][:n]


def class_names(labels: Labels, images: Images | None,
                classes: int) -> tuple[list[str], str]:
    """The class names and where they came from: the labels' own (a labels file's
    ``class_names``, the store's recorded labels, CIFAR-10's), else the images' (when they
    name ``classes``), else ``class 0`` .. ``class C-1``."""
    src = labels.source
    if labels.class_names and len(labels.class_names) == classes:
        if is_labels_spec(src):
            where = f"CIFAR-10's own class names ({src})"
        elif (Path(src) / "manifest.json").is_file():
            where = (f"the labels recorded in the store {src} (`kernelscale ingest "
                     "--labels`), their class_names")
        elif npy_pair(src) is not None:
            where = f"the labels' names file {npy_pair(src).get('class_names')}"
        else:
            where = f"the class_names array of the labels file {src}"
        return list(labels.class_names), where
    if images is not None and len(images.class_names) == classes:
        return list(images.class_names), f"the images' data set ({images.source})"
    return list(default_class_names(classes)), (
        f"none given: the labels ({src}) carry no class names, so the classes are "
        f"numbered class 0 .. class {classes - 1}")


# ------------------------------------------------------------------- kernel values

def summary(values: np.ndarray) -> dict:
    """Count, mean and quantiles (10, 50, 90 %) of float ``values`` (any shape); None for
    each statistic when empty."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if not v.size:
        return {"count": 0, "mean": None, "p10": None, "median": None, "p90": None}
    p10, med, p90 = np.quantile(v, [0.1, 0.5, 0.9])
    return {"count": int(v.size), "mean": float(v.mean()), "p10": float(p10),
            "median": float(med), "p90": float(p90)}


def split_by_label(values: np.ndarray, same: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Kernel ``values`` float (any shape) split by the bool mask ``same`` (same shape):
    (values of same-label pairs, values of different-label pairs), each 1-D."""
    return values[same], values[~same]


def neighbour_same(nb: Neighbours, labels_train: np.ndarray,
                   labels_test: np.ndarray) -> np.ndarray:
    """bool (n_test, kmax): whether each of a test example's top neighbours shares its
    label."""
    return labels_train[nb.index] == labels_test[:, None]


@dataclass
class KernelSample:
    """A seeded, class-stratified sample of a test x train kernel.

    ``rows`` int64 (r,) test and ``cols`` int64 (m,) train examples, each sorted by
    (label, index); ``shown`` int64 (s,) the classes sampled; ``values`` float32 (r, m)
    the kernel entries ``K[rows][:, cols]``; ``seed`` of the draw.
    """

    rows: np.ndarray
    cols: np.ndarray
    shown: np.ndarray
    values: np.ndarray
    seed: int

    def same(self, labels_train: np.ndarray, labels_test: np.ndarray) -> np.ndarray:
        """bool (r, m): whether an entry's test and train example share their label."""
        return labels_test[self.rows][:, None] == labels_train[self.cols][None, :]


def sample_indices(labels_train: np.ndarray, labels_test: np.ndarray, classes: int,
                   seed: int, rows: int = SAMPLE_ROWS,
                   cols: int = SAMPLE_COLS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, cols, shown) of a class-sorted sample: the classes with test and train
    examples, all of them up to :data:`CLASS_ROWS`, else :data:`CLASS_ROWS` drawn at
    random; from each, ``rows // s`` test and ``cols // s`` train examples (at least one;
    fewer when it has fewer) drawn without replacement. ``rng =
    np.random.default_rng(seed)`` draws the classes, then per class its test rows and its
    train columns."""
    rng = np.random.default_rng(seed)
    both = np.flatnonzero((np.bincount(labels_test, minlength=classes) > 0)
                          & (np.bincount(labels_train, minlength=classes) > 0))
    shown = both if both.size <= CLASS_ROWS else np.sort(
        rng.choice(both, CLASS_ROWS, replace=False))
    per_r, per_c = max(1, rows // max(1, shown.size)), max(1, cols // max(1, shown.size))
    r_out, c_out = [], []
    for c in shown.tolist():
        te, tr = np.flatnonzero(labels_test == c), np.flatnonzero(labels_train == c)
        r_out.append(np.sort(rng.choice(te, min(per_r, te.size), replace=False)))
        c_out.append(np.sort(rng.choice(tr, min(per_c, tr.size), replace=False)))
    def cat(xs: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(xs).astype(np.int64) if xs else np.zeros(0, np.int64)

    return cat(r_out), cat(c_out), shown.astype(np.int64)


def read_entries(kern: KernelOutput, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """float32 (len(rows), len(cols)): the full kernel's entries ``K[rows][:, cols]``.

    Read one chunk row at a time through Zarr's orthogonal selection: only the chunks
    that hold a sampled entry are read (checksums verified), and only the sampled entries
    are kept. A damaged chunk is one :class:`KernelOutputError` line."""
    if kern.topk:
        raise KernelOutputError(f"{kern.path}: a top-{kern.topk} kernel holds no full rows")
    arr = kern.array
    out = np.empty((rows.size, cols.size), dtype=np.float32)
    ucols, cinv = np.unique(cols, return_inverse=True)
    cr = int(arr.chunks[0])
    order = np.argsort(rows, kind="stable")
    srows = rows[order]
    bounds = np.searchsorted(srows, np.arange(0, arr.shape[0] + cr, cr))
    try:
        for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
            if a == b:
                continue
            urows, rinv = np.unique(srows[a:b], return_inverse=True)
            block = np.asarray(arr.get_orthogonal_selection((urows, ucols)), np.float32)
            out[order[a:b]] = block[rinv][:, cinv]
    except ValueError as e:
        if "checksum" not in str(e).lower():
            raise
        raise KernelOutputError(f"{kern.path}: a chunk fails its checksum (the file is "
                                f"corrupt); `kernelscale verify {kern.path} --repair` marks "
                                "its tile for recomputation") from None
    return out


def sample_kernel(kern: KernelOutput, labels_train: np.ndarray, labels_test: np.ndarray,
                  classes: int, seed: int) -> KernelSample | None:
    """The :func:`sample_indices` sample of a full kernel, read with
    :func:`read_entries`; None for a top-K kernel (it has no full rows)."""
    if kern.topk:
        return None
    rows, cols, shown = sample_indices(labels_train, labels_test, classes, seed)
    return KernelSample(rows, cols, shown, read_entries(kern, rows, cols), seed)


# --------------------------------------------------------------------------- times

def kernel_finished(kern: KernelOutput) -> tuple[str, str] | None:
    """(first, last) ``finished_at`` UTC times of the kernel's tiles, from its
    done-markers of its own identity; None when none records one."""
    times = [str(d["finished_at"]) for d in kern.markers() if d.get("finished_at")]
    return (min(times), max(times)) if times else None


def ingested(manifest: dict) -> tuple[str, str] | None:
    """(first, last) ``ingested_at`` UTC times of a store manifest's files; None if none."""
    times = [str(f["ingested_at"]) for f in manifest.get("files") or []
             if f.get("ingested_at")]
    return (min(times), max(times)) if times else None
