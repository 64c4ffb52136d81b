"""Accuracy against the number of runs: the ensemble and the kernel k-NN on run prefixes.

For each ``n`` of a list, the kernel of the first ``n`` runs is computed with the kernel
engine (which standardises with the statistics of those ``n`` runs), and scored next to
the single-model and mean-logit ensemble accuracies of the same runs. The curve is written
to ``OUT/curve.json`` after every point, so an interrupted curve resumes at the next
``n`` (points of an earlier call with the same store, labels and options are kept);
each point's kernel (``OUT/kernel-runs-<n>``) is deleted once scored unless asked to
be kept (what a killed call left of it is deleted by the next one).

The crossover is the first ``n`` from which the k-NN accuracy (majority vote at ``k``)
exceeds the ensemble's at that ``n`` and at every larger ``n`` measured; ``None`` when the
kernel is not ahead at the largest ``n``.

Each point is :func:`kernelscale.evaluation.evaluate_inputs` of that point's kernel, the
same evaluation as ``kernelscale evaluate --select``. :func:`compute_curve` returns a
:class:`Curve` of :class:`CurvePoint`; ``curve.json`` is its ``as_json()``: floats
rounded, with the provenance of the last call.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .atomic import atomic_write_json, check_output_dir, read_json, remove_stale_temps
from .errors import ConfigError
from .evaluation import evaluate_inputs, open_inputs
from .knn import Choice, Grid, Selection, Setting
from .labels import Labels, load_labels
from .provenance import Provenance, make_provenance
from .store import Store
from .units import parse_run_counts, round_floats

CURVE_SCHEMA = "kernelscale-curve"
CURVE_SCHEMA_VERSION = 1


def run_counts(counts: str | Sequence[int | str], store_runs: int) -> list[int]:
    """``"10,20,50,all"`` (or a parsed sequence) -> sorted distinct run counts in
    [2, store_runs]; ``all`` is the store's run count."""
    out = set()
    for item in parse_run_counts(counts, "--runs"):
        n = store_runs if item == "all" else int(item)
        if not 2 <= n <= store_runs:
            raise ConfigError(f"--runs: {n} is outside [2, {store_runs}] (the store holds "
                              f"{store_runs} runs)")
        out.add(n)
    return sorted(out)


@dataclass(frozen=True)
class CurvePoint:
    """Accuracies (percent) of the first ``runs`` runs: the baselines, the kernel k-NN
    (majority vote at the curve's ``k``), the setting selected by cross-fitting and the
    oracle; ``kernel_seconds``: the time the point's kernel took; ``device``: where it
    was computed (from its done-markers)."""

    runs: int
    single_model_accuracy: float
    ensemble_accuracy: float
    knn_accuracy: float
    selected: Selection
    oracle: Choice
    kernel_seconds: float | None = None
    device: str | None = None

    def as_json(self) -> dict:
        return {"runs": self.runs, "single_model_accuracy": self.single_model_accuracy,
                "ensemble_accuracy": self.ensemble_accuracy,
                "knn_accuracy": self.knn_accuracy, "selected": self.selected.as_json(),
                "oracle": self.oracle.as_json(), "kernel_seconds": self.kernel_seconds,
                "device": self.device}

    @classmethod
    def from_json(cls, d: dict) -> CurvePoint:
        return cls(int(d["runs"]), float(d["single_model_accuracy"]),
                   float(d["ensemble_accuracy"]), float(d["knn_accuracy"]),
                   Selection.from_json(d["selected"]), Choice.from_json(d["oracle"]),
                   d.get("kernel_seconds"), d.get("device"))


def crossover(points: Sequence[CurvePoint]) -> int | None:
    """First ``runs`` from which ``knn_accuracy > ensemble_accuracy`` at every later point."""
    best = None
    for p in sorted(points, key=lambda p: p.runs, reverse=True):
        if p.knn_accuracy > p.ensemble_accuracy:
            best = p.runs
        else:
            break
    return best


@dataclass(kw_only=True)
class Curve:
    """Accuracy against the number of runs of one store, labels and options.

    ``store_fingerprint``, ``labels``, ``k``, ``precision`` and ``seed`` are the key a
    resumed curve must match; ``points`` sorted by runs; ``crossover``: see the module
    docstring; ``path``: where it was read or written (not serialised).
    """

    schema: str = CURVE_SCHEMA
    schema_version: int = CURVE_SCHEMA_VERSION
    store: str
    store_fingerprint: str
    labels: str
    k: int
    precision: str
    seed: int
    #: each point's kernel kept only each row's top-K (None: full kernels)
    topk: int | None = None
    points: list[CurvePoint] = field(default_factory=list)
    crossover: int | None = None
    provenance: Provenance | None = None
    path: Path | None = field(default=None, compare=False)

    def key(self) -> dict:
        key = {"store_fingerprint": self.store_fingerprint, "labels": self.labels,
               "k": self.k, "precision": self.precision, "seed": self.seed}
        if self.topk is not None:  # curves of full kernels keep the key they had
            key["topk"] = self.topk
        return key

    def as_json(self) -> dict:
        """The ``curve.json`` document, floats rounded (``path`` is not part of it)."""
        return round_floats({
            "schema": self.schema, "schema_version": self.schema_version,
            "store": self.store, **self.key(), "points": [p.as_json() for p in self.points],
            "crossover": self.crossover,
            "provenance": None if self.provenance is None else self.provenance.as_json()})

    @classmethod
    def from_json(cls, d: dict, path: str | Path | None = None) -> Curve:
        prov = d.get("provenance")
        return cls(schema=d["schema"], schema_version=int(d.get("schema_version", 1)),
                   store=d["store"], store_fingerprint=d["store_fingerprint"],
                   labels=d["labels"], k=int(d["k"]), precision=d["precision"],
                   seed=int(d["seed"]), topk=d.get("topk"),
                   points=[CurvePoint.from_json(p) for p in d.get("points", [])],
                   crossover=d.get("crossover"),
                   provenance=Provenance.from_json(prov) if prov else None,
                   path=Path(path) if path is not None else None)


@dataclass
class CurveConfig:
    store: Path
    labels: str
    runs: str | Sequence[int | str]
    out: Path
    k: int = 3
    device: str = "auto"
    precision: str = "fp32"
    max_memory: int | None = None
    keep_kernels: bool = False
    seed: int = 0
    workers: int | None = None
    show_progress: bool = True
    #: compute each point's kernel as a top-K kernel (memory and disk independent of the
    #: number of train examples); the oracle's grid of k is then cut to K
    topk: int | None = None


def _point(store: Store, kernel: Path, labels: Labels, n: int, k: int, grid: Grid,
           seed: int, workers: int | None, show_progress: bool,
           kernel_seconds: float | None) -> CurvePoint:
    ev = evaluate_inputs(open_inputs(store.root, kernel, labels), Setting(k), select=True,
                         grid=grid, seed=seed, workers=workers, show_progress=show_progress)
    return CurvePoint(n, ev.single_model_accuracy, ev.ensemble_accuracy, ev.knn_accuracy,
                      ev.selection, ev.oracle, kernel_seconds,
                      ev.provenance.device if ev.provenance else None)


def _earlier_points(path: Path, curve: Curve, store_runs: int) -> list[CurvePoint]:
    """The points of an earlier curve at ``path`` with ``curve``'s key; none if it has
    another key or cannot be read."""
    try:
        old = read_json(path)
    except (OSError, ValueError):
        return []
    if not (isinstance(old, dict) and old.get("schema") == CURVE_SCHEMA
            and all(old.get(a) == b for a, b in curve.key().items())):
        return []
    try:
        points = [CurvePoint.from_json(p) for p in old.get("points", [])]
    except (KeyError, TypeError, ValueError, ConfigError):
        return []
    return [p for p in points if p.runs <= store_runs]


def _provenance(store: Store, labels: Labels, points: Sequence[CurvePoint]) -> Provenance:
    devices = sorted({d for p in points if p.device for d in p.device.split(",")})
    return make_provenance(store, labels, device=",".join(devices) or None)


def compute_curve(cfg: CurveConfig) -> Curve:
    """Compute (or resume) the curve ``cfg`` describes; ``curve.json`` is written after
    every point."""
    from .kernel import KernelConfig, compute_kernel

    if cfg.k < 1:
        raise ConfigError(f"--k must be >= 1, not {cfg.k}")
    if cfg.topk is not None and cfg.topk < cfg.k:
        raise ConfigError(f"--topk {cfg.topk} keeps fewer neighbours than --k {cfg.k}")
    store = Store.open(cfg.store)
    runs = run_counts(cfg.runs, store.runs)
    s = store.shape
    labels = load_labels(cfg.labels, n_train=s.n_train, n_test=s.n_test, classes=s.classes)
    out = check_output_dir(cfg.out, "--out")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "curve.json"
    curve = Curve(store=str(Path(cfg.store).resolve()), store_fingerprint=store.fingerprint(),
                  labels=cfg.labels, k=cfg.k, precision=cfg.precision, seed=cfg.seed,
                  topk=cfg.topk, path=path)
    if path.exists():
        curve.points = _earlier_points(path, curve, store.runs)
    # what a call killed while recording a point left: the point's kernel already moved
    # aside for deletion (below), and the temp of curve.json
    for trash in out.glob(".kernel-runs-*.deleted"):
        if trash.is_dir() and not trash.is_symlink():
            shutil.rmtree(trash, ignore_errors=True)
    remove_stale_temps(path)
    done = {p.runs for p in curve.points}
    grid = Grid()
    for n in runs:
        if n in done:
            continue
        kpath = out / f"kernel-runs-{n}"
        summary = compute_kernel(KernelConfig(
            store=Path(cfg.store), out=kpath, runs=n, pairs="test-train", device=cfg.device,
            precision=cfg.precision, max_memory=cfg.max_memory, overwrite=True,
            show_progress=cfg.show_progress, topk=cfg.topk))
        point = _point(store, kpath, labels, n, cfg.k, grid, cfg.seed, cfg.workers,
                       cfg.show_progress, summary.seconds)
        curve.points = sorted([*curve.points, point], key=lambda p: p.runs)
        curve.crossover = crossover(curve.points)
        curve.provenance = _provenance(store, labels, curve.points)
        # The kernel is moved aside before the point is recorded and deleted after: a
        # kill in between leaves a name that is garbage by construction (removed by the
        # next call), not a scored point's kernel that no later call would delete (it
        # could not tell it from one kept with keep_kernels).
        trash = out / f".kernel-runs-{n}.deleted"
        if not cfg.keep_kernels:
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(kpath, trash)
        atomic_write_json(path, curve.as_json())
        if not cfg.keep_kernels:
            shutil.rmtree(trash, ignore_errors=True)
        if cfg.show_progress:
            print(f"curve: runs {n}: ensemble {point.ensemble_accuracy:.2f} k-NN "
                  f"{point.knn_accuracy:.2f}", file=sys.stderr)
    curve.crossover = crossover(curve.points)
    curve.provenance = _provenance(store, labels, curve.points)
    atomic_write_json(path, curve.as_json())
    return curve


def curve_table(curve: Curve) -> str:
    k = curve.k
    head = (f"{'runs':>6}  {'single':>7}  {'ensemble':>8}  {f'{k}-NN':>7}  "
            f"{'selected':>8}  {'oracle':>7}")
    lines = [head]
    for p in curve.points:
        lines.append(f"{p.runs:>6}  {p.single_model_accuracy:7.2f}  "
                     f"{p.ensemble_accuracy:8.2f}  {p.knn_accuracy:7.2f}  "
                     f"{p.selected.accuracy:8.2f}  {p.oracle.accuracy:7.2f}")
    c = curve.crossover
    lines.append(f"crossover: {k}-NN ahead of the ensemble from {c} runs on" if c is not None
                 else f"crossover: {k}-NN is not ahead of the ensemble at the largest run count")
    return "\n".join(lines)


def load_curve(path: str | Path) -> Curve:
    """Read a curve written by :func:`compute_curve`; raises ConfigError if it is not one."""
    try:
        doc = read_json(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not a readable curve ({e})") from None
    if not isinstance(doc, dict) or doc.get("schema") != CURVE_SCHEMA:
        raise ConfigError(f"{path}: not a kernelscale curve (written by `kernelscale curve`)")
    try:
        return Curve.from_json(doc, path)
    except (KeyError, TypeError, ValueError, ConfigError) as e:
        raise ConfigError(f"{path}: a malformed kernelscale curve ({type(e).__name__}: "
                          f"{e})") from None
