"""How alike two kernels' rows are, and the typed results of ``kernelscale compare``. Pure.

* :func:`rank_rows`, :func:`spearman_rows`: Spearman correlation of row pairs (Pearson
  correlation of average ranks, ties sharing the mean of their ranks), NaN entries left
  out;
* :func:`jaccard_rows`: Jaccard index of two rows' neighbour sets;
* the results (:class:`Comparison` and its parts), each with ``as_json``, and the
  printed table (:meth:`Comparison.table`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .units import round_floats

# ----------------------------------------------------------------------- row metrics

def rank_rows(x: np.ndarray) -> np.ndarray:
    """Average ranks float64 (b, m) within each row of ``x`` (b, m): 1 for the smallest,
    equal values share the mean of their ranks; NaN entries are left out (rank NaN) and
    the others are ranked 1..(their count)."""
    x = np.asarray(x, dtype=np.float64)
    b, m = x.shape
    order = np.argsort(x, axis=1, kind="stable")  # NaN last
    s = np.take_along_axis(x, order, axis=1)
    start = np.ones((b, m), dtype=bool)
    start[:, 1:] = s[:, 1:] != s[:, :-1]  # NaN != NaN: each NaN is a group of its own
    flat = start.ravel()
    gid = np.cumsum(flat) - 1
    first = np.tile(np.arange(m), b)[flat]
    last = first + np.bincount(gid) - 1
    ranked = ((first + last) / 2 + 1)[gid].reshape(b, m)
    ranked[np.isnan(s)] = np.nan
    out = np.empty((b, m), dtype=np.float64)
    np.put_along_axis(out, order, ranked, axis=1)
    return out


def spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman correlation float64 (b,) of each row of ``x`` with the same row of ``y``
    (both (b, m)) over the entries where neither is NaN; NaN for a row with fewer than
    two such entries or a constant side."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    ok = ~(np.isnan(x) | np.isnan(y))
    rx = rank_rows(np.where(ok, x, np.nan))
    ry = rank_rows(np.where(ok, y, np.nan))
    cnt = ok.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        dx = np.where(ok, rx - np.nansum(rx, axis=1, keepdims=True) / cnt[:, None], 0.0)
        dy = np.where(ok, ry - np.nansum(ry, axis=1, keepdims=True) / cnt[:, None], 0.0)
        den = np.sqrt((dx * dx).sum(axis=1) * (dy * dy).sum(axis=1))
        rho = (dx * dy).sum(axis=1) / den
    rho[(cnt < 2) | ~(den > 0)] = np.nan
    return rho


def jaccard_rows(ia: np.ndarray, ib: np.ndarray) -> np.ndarray:
    """Jaccard index float64 (n,) of the column sets ``ia`` and ``ib``, int (n, k) each,
    every row of each holding k distinct columns."""
    k = ia.shape[1]
    both = np.sort(np.concatenate([ia, ib], axis=1), axis=1)
    inter = (both[:, 1:] == both[:, :-1]).sum(axis=1)
    return inter / (2 * k - inter)


# ------------------------------------------------------------------------- results

def _num(x: float | None) -> float | None:
    """JSON has no NaN: None instead."""
    return None if x is None or math.isnan(x) else float(x)


@dataclass(frozen=True)
class KernelSide:
    """One of the two kernels: where it is, its kind (``full`` or ``top-K``) and inputs."""

    path: str
    topk: int | None
    runs: int | None
    precision: str | None
    store: str | None
    store_fingerprint: str | None
    fingerprint: str

    @property
    def kind(self) -> str:
        return f"top-{self.topk}" if self.topk else "full"

    def as_json(self) -> dict:
        return {"path": self.path, "kind": self.kind, "topk": self.topk, "runs": self.runs,
                "precision": self.precision, "store": self.store,
                "store_fingerprint": self.store_fingerprint,
                "fingerprint": self.fingerprint}


@dataclass(frozen=True)
class Overlap:
    """Top-``k`` neighbour overlap over all rows: mean and median Jaccard index, and the
    percent of rows whose two top-``k`` sets are equal."""

    k: int
    mean_jaccard: float
    median_jaccard: float
    identical_rows: float

    def as_json(self) -> dict:
        return {"k": self.k, "mean_jaccard": self.mean_jaccard,
                "median_jaccard": self.median_jaccard, "identical_rows": self.identical_rows}


@dataclass(frozen=True)
class RankCorrelation:
    """Spearman correlation of rows, by ``method`` (see the module docstring), as
    ``description`` says: ``rows`` rows of ``entries`` values each; ``mean``, ``median``
    and 10th percentile over the rows where it is defined (``undefined`` rows: a side
    constant); ``sample``/``seed``: the sampled rows and their seed."""

    method: str
    description: str
    rows: int = 0
    entries: int = 0
    mean: float = float("nan")
    median: float = float("nan")
    p10: float = float("nan")
    undefined: int = 0
    sample: int | None = None
    seed: int | None = None

    def as_json(self) -> dict:
        return {"method": self.method, "description": self.description, "rows": self.rows,
                "entries": self.entries, "mean": _num(self.mean),
                "median": _num(self.median), "p10": _num(self.p10),
                "undefined": self.undefined, "sample": self.sample, "seed": self.seed}


@dataclass(frozen=True)
class KnnAgreement:
    """Majority-vote k-NN of both kernels at ``k``: accuracies and agreement (percent),
    the rows each way right or wrong, and accuracy at each of ``ks`` for A and B."""

    k: int
    accuracy_a: float
    accuracy_b: float
    agreement: float
    both_right: int
    only_a_right: int
    only_b_right: int
    both_wrong: int
    ks: tuple[int, ...]
    by_k_a: tuple[float, ...]
    by_k_b: tuple[float, ...]

    def as_json(self) -> dict:
        return {"k": self.k, "accuracy_a": self.accuracy_a, "accuracy_b": self.accuracy_b,
                "agreement": self.agreement, "both_right": self.both_right,
                "only_a_right": self.only_a_right, "only_b_right": self.only_b_right,
                "both_wrong": self.both_wrong,
                "accuracy_by_k": {"ks": list(self.ks), "a": list(self.by_k_a),
                                  "b": list(self.by_k_b)}}


@dataclass(frozen=True)
class Disagreement:
    """A row where the two kernels' k-NN predictions differ: its label, both predictions
    (class indices and names) and the Jaccard index of its two top-``k`` sets."""

    row: int
    label: int
    pred_a: int
    pred_b: int
    jaccard: float
    names: tuple[str, str, str]

    def as_json(self) -> dict:
        return {"row": self.row, "label": self.label, "pred_a": self.pred_a,
                "pred_b": self.pred_b, "jaccard": self.jaccard,
                "label_name": self.names[0], "pred_a_name": self.names[1],
                "pred_b_name": self.names[2]}


@dataclass
class Comparison:
    """The comparison of kernels ``a`` and ``b`` (``pairs``, ``shape`` (rows, cols)).

    ``overlap``: per ``k``; ``same_nearest``: percent of rows with the same nearest
    neighbour; ``rank``: the rank correlation; ``knn``/``disagreements``: with labels
    (``labels``: their source). ``jaccard``: float64 (rows,) per-row Jaccard at ``k``,
    not serialised.
    """

    a: KernelSide
    b: KernelSide
    pairs: str
    shape: tuple[int, int]
    k: int
    overlap: list[Overlap]
    same_nearest: float
    rank: RankCorrelation
    knn: KnnAgreement | None = None
    disagreements: list[Disagreement] = field(default_factory=list)
    labels: str | None = None
    jaccard: np.ndarray | None = field(default=None, repr=False, compare=False)

    def as_json(self) -> dict:
        """A JSON-able dict, floats rounded (NaN as null)."""
        return round_floats({
            "a": self.a.as_json(), "b": self.b.as_json(), "pairs": self.pairs,
            "shape": list(self.shape), "k": self.k,
            "overlap": [o.as_json() for o in self.overlap],
            "same_nearest": self.same_nearest, "rank_correlation": self.rank.as_json(),
            "labels": self.labels, "knn": None if self.knn is None else self.knn.as_json(),
            "disagreements": [d.as_json() for d in self.disagreements]})

    def table(self, rows: int = 10) -> str:
        """The printed summary; ``rows``: disagreements listed."""
        r, c = self.pairs.split("-")  # test-train: rows test, columns train
        lines = [f"A: {self.a.path} ({self.a.kind}, {self.a.runs} runs)",
                 f"B: {self.b.path} ({self.b.kind}, {self.b.runs} runs)",
                 f"{self.shape[0]} {r} x {self.shape[1]} {c} ({self.pairs})"
                 + ("; a row's own column is never its neighbour" if r == c else ""),
                 "", "top-k neighbour overlap (Jaccard of the two top-k sets, over rows)",
                 "  k              " + "".join(f"{o.k:>8}" for o in self.overlap),
                 "  mean Jaccard   " + "".join(f"{o.mean_jaccard:8.3f}" for o in self.overlap),
                 "  identical sets " + "".join(f"{o.identical_rows:7.1f}%"
                                               for o in self.overlap),
                 f"  same nearest neighbour: {self.same_nearest:.2f}% of rows", ""]
        rk = self.rank
        if rk.method == "none":
            lines.append(f"rank correlation: {rk.description}")
        else:
            lines += [f"rank correlation (Spearman per row): mean {rk.mean:.4f}, median "
                      f"{rk.median:.4f}, 10th percentile {rk.p10:.4f}"
                      + (f"; undefined in {rk.undefined} rows" if rk.undefined else ""),
                      f"  {rk.description}"]
        kn = self.knn
        if kn is None:
            return "\n".join(lines)
        lines += ["", f"k-NN, majority vote (labels {self.labels})",
                  "  k          " + "".join(f"{k:>8}" for k in kn.ks),
                  "  accuracy A " + "".join(f"{x:8.2f}" for x in kn.by_k_a),
                  "  accuracy B " + "".join(f"{x:8.2f}" for x in kn.by_k_b),
                  f"  at k={kn.k}: predictions agree on {kn.agreement:.2f}% of rows; both "
                  f"right {kn.both_right}, only A {kn.only_a_right}, only B "
                  f"{kn.only_b_right}, both wrong {kn.both_wrong}"]
        if self.disagreements:
            lines += ["", f"where they disagree most (predictions differ; lowest top-{self.k} "
                      "overlap first)",
                      f"  {'row':>7}  {'label':<14}{'A predicts':<14}{'B predicts':<14}"
                      f"Jaccard@{self.k}"]
            for d in self.disagreements[:rows]:
                lines.append(f"  {d.row:>7}  {d.names[0][:13]:<14}{d.names[1][:13]:<14}"
                             f"{d.names[2][:13]:<14}{d.jaccard:.3f}")
        return "\n".join(lines)
