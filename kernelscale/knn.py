"""k-NN over a kernel's top neighbours: voting, weightings and honest selection. Pure.

Every ``k`` and weighting is scored from the test rows' top-``kmax`` neighbours
(:mod:`kernelscale.topk`), ``(n, kmax)`` arrays read once from the kernel.

* k-NN: the ``k`` train examples with the largest kernel values; majority vote, ties
  between labels to the smallest label (what ``torch.mode`` returns)
* weighted k-NN: each neighbour votes with a weight computed from its kernel value ``K``:
  ``none`` (1), ``power`` (``max(K, 0) ** p``) or ``softmax`` (``exp(K / T)``); the label
  with the largest summed weight wins, ties to the smallest label. A row whose ``k``
  weights are all zero (``power`` with no positive kernel value) falls back to the
  majority vote.

Honest selection picks ``k`` and the weighting without test labels:

* ``leave-one-out``: k-NN of every train example over the train x train kernel, its own
  column excluded; the setting with the best leave-one-out accuracy is then scored on test;
* ``cross-fit`` (only a test x train kernel): the test set is split in two random halves;
  the setting chosen on one half is scored on the other, and the other way round; the
  reported accuracy is the fraction of all test examples classified correctly by the
  setting chosen on the half they are not in.

The best setting chosen with the test labels is reported too, labelled ``oracle``: it is
what a reader tuning on the test set would quote, an optimistic number.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError
from .topk import Neighbours

WEIGHTINGS = ("none", "power", "softmax")
DEFAULT_KS = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 15, 20, 25, 30, 40, 50)
DEFAULT_POWERS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
DEFAULT_TEMPERATURES = (0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001)
DEFAULT_POWER = 8.0
DEFAULT_TEMPERATURE = 0.02
#: rows scored at once, at most: bounds the (rows, kmax, min(kmax, classes)) float64 vote
#: tensor together with :data:`VOTE_BYTES`.
VOTE_ROWS = 4096
#: target bytes of one block's vote tensor (its cumulative sum takes as much again).
VOTE_BYTES = 32 << 20

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

    @classmethod
    def from_json(cls, d: dict) -> Setting:
        """The setting :meth:`as_json` wrote (its ``label`` is derived, not read)."""
        p = d.get("param")
        return cls(int(d["k"]), d.get("weighting", "none"), None if p is None else float(p))


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


def _local_labels(lab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's labels renumbered by rank among the row's distinct labels.

    ``lab`` int64 (b, k) -> ``local`` int64 (b, k) in ``[0, k)`` and ``table`` int64 (b, k)
    with ``table[r, local[r, j]] == lab[r, j]``. Ranks keep the labels' order, so the
    smallest local id among tied votes is the smallest label.
    """
    b, k = lab.shape
    order = np.argsort(lab, axis=1, kind="stable")
    srt = np.take_along_axis(lab, order, axis=1)
    rank = np.zeros((b, k), dtype=np.int64)
    np.cumsum(srt[:, 1:] != srt[:, :-1], axis=1, out=rank[:, 1:])
    local = np.empty_like(rank)
    np.put_along_axis(local, order, rank, axis=1)
    table = np.zeros((b, k), dtype=np.int64)
    np.put_along_axis(table, rank, srt, axis=1)
    return local, table


def predictions_by_k(nb: Neighbours, labels_train: np.ndarray, weighting: str,
                     param: float | None, ks: Sequence[int], classes: int) -> np.ndarray:
    """Predicted labels int64 (len(ks), n) for every ``k`` in ``ks`` at once.

    ``labels_train`` int (n_train,) in ``[0, classes)``. Votes are summed neighbour by
    neighbour (largest kernel value first) with a cumulative sum along the neighbours, so
    the prediction for every ``k`` costs one pass. Only the labels among a row's
    neighbours can win, so when ``classes`` exceeds ``max(ks)`` the votes are counted per
    distinct neighbour label (renumbered in label order, so ties still go to the smallest
    label): the vote tensor is (rows, kmax, min(kmax, classes)) whatever the class count.
    """
    ks = [int(k) for k in ks]
    if not ks:
        return np.empty((0, len(nb)), dtype=np.int64)
    if max(ks) > nb.kmax or min(ks) < 1:
        raise ConfigError(f"k must lie in [1, {nb.kmax}], got {min(ks)}..{max(ks)}")
    kk = max(ks)
    n = len(nb)
    width = min(kk, classes)
    compact = width < classes
    out = np.empty((len(ks), n), dtype=np.int64)
    cols = np.asarray(ks) - 1
    step = max(1, min(VOTE_ROWS, VOTE_BYTES // (kk * width * 8)))
    for s in range(0, n, step):
        e = min(s + step, n)
        lab = labels_train[nb.index[s:e, :kk]]
        if compact:
            lab, table = _local_labels(lab)
        w = neighbour_weights(nb.values[s:e, :kk], weighting, param)
        b = e - s
        onehot = np.zeros((b, kk, width), dtype=np.float64)
        rr, jj = np.meshgrid(np.arange(b), np.arange(kk), indexing="ij")
        onehot[rr, jj, lab] = w
        scores = np.cumsum(onehot, axis=1)[:, cols]  # (b, len(ks), width)
        if weighting == "power":
            dead = scores.sum(axis=2) == 0  # no positive kernel value among the k
            if dead.any():
                onehot[rr, jj, lab] = 1.0
                counts = np.cumsum(onehot, axis=1)[:, cols]
                scores[dead] = counts[dead]
        best = scores.argmax(axis=2)  # (b, len(ks))
        out[:, s:e] = (np.take_along_axis(table, best, axis=1) if compact else best).T
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


# -------------------------------------------------------------------------- results

ORACLE_DESCRIPTION = "best setting chosen with the test labels (optimistic)"
CROSSFIT_DESCRIPTION = ("two random halves of the test set; each half scored with the "
                        "setting chosen on the other half")
LOO_DESCRIPTION = ("setting with the best leave-one-out k-NN accuracy on the train x train "
                   "kernel (own column excluded), scored on test")
ACCURACY_BY_K_NOTE = "weighted curves use the parameter with the best test accuracy"


@dataclass(frozen=True)
class Choice:
    """One setting and its test accuracy (percent): the oracle, or a family's best k."""

    setting: Setting
    accuracy: float
    description: str = ORACLE_DESCRIPTION

    def as_json(self) -> dict:
        return {"setting": self.setting.as_json(), "accuracy": self.accuracy,
                "description": self.description}

    @classmethod
    def from_json(cls, d: dict) -> Choice:
        return cls(Setting.from_json(d["setting"]), float(d["accuracy"]),
                   d.get("description", ORACLE_DESCRIPTION))


@dataclass(frozen=True)
class Fold:
    """One half of a cross-fit: the setting chosen on ``chosen_on_rows`` rows (accuracy
    ``accuracy_where_chosen`` there), scored on the other ``scored_on_rows`` rows."""

    setting: Setting
    chosen_on_rows: int
    accuracy_where_chosen: float
    scored_on_rows: int
    accuracy: float

    def as_json(self) -> dict:
        return {"setting": self.setting.as_json(), "chosen_on_rows": self.chosen_on_rows,
                "accuracy_where_chosen": self.accuracy_where_chosen,
                "scored_on_rows": self.scored_on_rows, "accuracy": self.accuracy}

    @classmethod
    def from_json(cls, d: dict) -> Fold:
        return cls(Setting.from_json(d["setting"]), int(d["chosen_on_rows"]),
                   float(d["accuracy_where_chosen"]), int(d["scored_on_rows"]),
                   float(d["accuracy"]))


@dataclass(frozen=True)
class Selection:
    """An honestly selected setting and its test accuracy (percent).

    ``leave-one-out``: ``setting`` chosen on the train rows, where its accuracy is
    ``selection_accuracy`` over ``selection_rows`` rows (``train_kernel``: that kernel);
    ``cross-fit``: no single setting, one per fold (``folds``), halves drawn with ``seed``.
    """

    method: str
    setting: Setting | None
    accuracy: float
    folds: tuple[Fold, ...] = ()
    selection_accuracy: float | None = None
    selection_rows: int | None = None
    seed: int | None = None
    train_kernel: str | None = None
    description: str = ""

    def label(self) -> str:
        """The chosen setting, or each fold's joined by `` / ``."""
        if self.setting is not None:
            return self.setting.label()
        return " / ".join(f.setting.label() for f in self.folds)

    def as_json(self) -> dict:
        """JSON dict; the fields a method does not have (None, no folds) are left out."""
        d = {"method": self.method, "accuracy": self.accuracy,
             "description": self.description}
        if self.setting is not None:
            d["setting"] = self.setting.as_json()
        if self.folds:
            d["folds"] = [f.as_json() for f in self.folds]
        for key in ("selection_accuracy", "selection_rows", "seed", "train_kernel"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        return d

    @classmethod
    def from_json(cls, d: dict) -> Selection:
        s = d.get("setting")
        return cls(d["method"], Setting.from_json(s) if s else None, float(d["accuracy"]),
                   tuple(Fold.from_json(f) for f in d.get("folds", ())),
                   d.get("selection_accuracy"), d.get("selection_rows"), d.get("seed"),
                   d.get("train_kernel"), d.get("description", ""))


@dataclass(frozen=True)
class FamilyBest:
    """A weighting family's (majority vote, power p, softmax T) best k on the test rows."""

    setting: Setting
    accuracy: float

    @property
    def weighting(self) -> str:
        return self.setting.weighting

    @property
    def param(self) -> float | None:
        return self.setting.param

    def as_json(self) -> dict:
        return {"weighting": self.weighting, "param": self.param,
                "setting": self.setting.as_json(), "accuracy": self.accuracy}


@dataclass(frozen=True)
class KCurve:
    """Test accuracy (percent) of one weighting at each ``k`` of :class:`AccuracyByK`."""

    label: str
    param: float | None
    accuracy: tuple[float, ...]

    def as_json(self) -> dict:
        return {"label": self.label, "param": self.param, "accuracy": list(self.accuracy)}


@dataclass(frozen=True)
class AccuracyByK:
    """Test accuracy against ``ks``: the majority vote and each weighting (``none``,
    ``power``, ``softmax``) at its parameter with the best test accuracy (oracle)."""

    ks: tuple[int, ...]
    curves: dict[str, KCurve]
    note: str = ACCURACY_BY_K_NOTE

    def as_json(self) -> dict:
        return {"ks": list(self.ks), "curves": {w: c.as_json() for w, c in self.curves.items()},
                "note": self.note}


# ------------------------------------------------------------- choosing a setting

def crossfit(table: Candidates, seed: int = 0) -> Selection:
    """Two-fold cross-fitting over random halves of the rows of ``table``.

    Each half is scored only with the setting chosen on the other half; the accuracy is
    the percent of all rows classified correctly that way; ``folds`` has each choice.
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
        folds.append(Fold(table.settings[i], int(chosen_on.size),
                          table.accuracy(i, chosen_on), int(scored_on.size),
                          hits / scored_on.size * 100))
    return Selection("cross-fit", None, correct / n * 100, tuple(folds), seed=seed,
                     description=CROSSFIT_DESCRIPTION)


def oracle(table: Candidates) -> Choice:
    """The setting with the best test accuracy (the first one on ties): optimistic."""
    i = _choose(table, None)
    return Choice(table.settings[i], table.accuracy(i))


def family_best(table: Candidates) -> list[FamilyBest]:
    """For each weighting family (none / power p / softmax T): its best k on these rows."""
    out = []
    seen: dict[tuple, list[int]] = {}
    for i, s in enumerate(table.settings):
        seen.setdefault((s.weighting, s.param), []).append(i)
    for ids in seen.values():
        hits = table.correct[ids].sum(axis=1)
        j = ids[int(np.argmax(hits))]
        out.append(FamilyBest(table.settings[j], table.accuracy(j)))
    return out


def make_setting(k: int, weighting: str = "none", power: float | None = None,
                 temperature: float | None = None) -> Setting:
    param = {"none": None, "power": DEFAULT_POWER if power is None else power,
             "softmax": DEFAULT_TEMPERATURE if temperature is None else temperature
             }.get(weighting)
    return Setting(k, weighting, param)


def accuracy_by_k(table: Candidates) -> AccuracyByK:
    """Test accuracy against k: majority vote and each family's best parameter (oracle)."""
    ks = sorted({s.k for s in table.settings})
    curves: dict[str, KCurve] = {}
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
        curves[w] = KCurve(Setting(1, *key).family, key[1],
                           tuple(table.accuracy(i) for i in ids))
    return AccuracyByK(tuple(ks), curves)


def leave_one_out(train_nb: Neighbours, labels_train: np.ndarray, test_table: Candidates,
                  grid: Grid, classes: int) -> Selection:
    """Choose the setting by leave-one-out k-NN on the train rows, score it on test.

    ``train_nb`` must come from a train x train kernel with the diagonal excluded.
    """
    kmax = min(train_nb.kmax, max(s.k for s in test_table.settings))
    grid = grid.limited(kmax)
    table = candidates(train_nb, labels_train, labels_train, grid, classes)
    i = _choose(table, None)
    chosen = table.settings[i]
    j = test_table.settings.index(chosen)
    return Selection("leave-one-out", chosen, test_table.accuracy(j),
                     selection_accuracy=table.accuracy(i), selection_rows=len(train_nb),
                     description=LOO_DESCRIPTION)
