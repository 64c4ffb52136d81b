"""Accuracy against the number of runs: the ensemble and the kernel k-NN on run prefixes.

For each ``n`` of a list, the kernel of the first ``n`` runs is computed with the kernel
engine (which standardises with the statistics of those ``n`` runs), and scored next to
the single-model and mean-logit ensemble accuracies of the same runs. The curve is written
to ``OUT/curve.json`` after every point, so an interrupted curve resumes at the next
``n`` (points of an earlier call with the same store, labels and options are kept);
each point's kernel (``OUT/kernel-runs-<n>``) is deleted once scored unless asked to
be kept.

The crossover is the first ``n`` from which the k-NN accuracy (majority vote at ``k``)
exceeds the ensemble's at that ``n`` and at every larger ``n`` measured; ``None`` when the
kernel is not ahead at the largest ``n``.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .atomic import atomic_write_json, read_json
from .errors import ConfigError
from .evaluate import (
    Grid,
    Setting,
    accuracy,
    baselines,
    candidates,
    crossfit,
    oracle,
    predict,
    prepare,
    top_neighbours,
)
from .sources import Labels, load_labels
from .store import Store

CURVE_SCHEMA = "kernelscale-curve"
CURVE_SCHEMA_VERSION = 1


def parse_runs(text: str | Sequence[int], store_runs: int) -> list[int]:
    """``"10,20,50,all"`` (or a list of ints) -> sorted distinct run counts in [2, store]."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out = set()
    for item in items:
        s = str(item).strip()
        if not s:
            continue
        if s == "all":
            n = store_runs
        else:
            try:
                n = int(s)
            except ValueError:
                raise ConfigError(f"--runs: {s!r} is not a number of runs") from None
        if not 2 <= n <= store_runs:
            raise ConfigError(f"--runs: {n} is outside [2, {store_runs}] (the store holds "
                              f"{store_runs} runs)")
        out.add(n)
    if not out:
        raise ConfigError("--runs: no run counts given")
    return sorted(out)


def crossover(points: Sequence[dict]) -> int | None:
    """First ``runs`` from which ``knn_accuracy > ensemble_accuracy`` at every later point."""
    best = None
    for p in sorted(points, key=lambda p: p["runs"], reverse=True):
        if p["knn_accuracy"] > p["ensemble_accuracy"]:
            best = p["runs"]
        else:
            break
    return best


@dataclass
class CurveConfig:
    store: Path
    labels: str
    runs: str | Sequence[int]
    out: Path
    k: int = 3
    device: str = "auto"
    precision: str = "fp32"
    max_memory: int | None = None
    keep_kernels: bool = False
    seed: int = 0
    workers: int | None = None
    show_progress: bool = True


def _point(store: Store, kernel: Path, labels: Labels, n: int, k: int, grid: Grid,
           seed: int, workers: int | None, show_progress: bool) -> dict:
    inputs = prepare(store.root, kernel, labels)
    nb = top_neighbours(inputs.kernel.array, max(k, max(grid.ks)), workers=workers,
                        show_progress=show_progress)
    base = baselines(store, labels.test, n)
    table = candidates(nb, labels.train, labels.test, grid, store.shape.classes)
    return {"runs": n, "single_model_accuracy": base.single_model_accuracy,
            "ensemble_accuracy": base.ensemble_accuracy,
            "knn_accuracy": accuracy(predict(nb, labels.train, Setting(k), inputs.classes),
                                     labels.test),
            "selected": crossfit(table, seed), "oracle": oracle(table)}


def compute_curve(cfg: CurveConfig) -> dict:
    """Compute (or resume) the curve ``cfg`` describes; returns the JSON document."""
    from .kernel import KernelConfig, compute_kernel

    if cfg.k < 1:
        raise ConfigError(f"--k must be >= 1, not {cfg.k}")
    store = Store.open(cfg.store)
    runs = parse_runs(cfg.runs, store.runs)
    s = store.shape
    labels = load_labels(cfg.labels, n_train=s.n_train, n_test=s.n_test, classes=s.classes)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "curve.json"
    key = {"store_fingerprint": store.fingerprint(), "labels": cfg.labels, "k": cfg.k,
           "precision": cfg.precision, "seed": cfg.seed}
    doc = {"schema": CURVE_SCHEMA, "schema_version": CURVE_SCHEMA_VERSION,
           "store": str(Path(cfg.store).resolve()), **key, "points": []}
    if path.exists():
        try:
            old = read_json(path)
        except (OSError, ValueError):
            old = {}
        if old.get("schema") == CURVE_SCHEMA and all(old.get(a) == b for a, b in key.items()):
            doc["points"] = [p for p in old.get("points", []) if p["runs"] <= store.runs]
    done = {p["runs"] for p in doc["points"]}
    grid = Grid()
    for n in runs:
        if n in done:
            continue
        kpath = out / f"kernel-runs-{n}"
        summary = compute_kernel(KernelConfig(
            store=Path(cfg.store), out=kpath, runs=n, pairs="test-train", device=cfg.device,
            precision=cfg.precision, max_memory=cfg.max_memory, overwrite=True,
            show_progress=cfg.show_progress))
        point = _point(store, kpath, labels, n, cfg.k, grid, cfg.seed, cfg.workers,
                       cfg.show_progress)
        point["kernel_seconds"] = summary.seconds
        doc["points"] = sorted([*doc["points"], point], key=lambda p: p["runs"])
        doc["crossover"] = crossover(doc["points"])
        atomic_write_json(path, doc)
        if not cfg.keep_kernels:
            shutil.rmtree(kpath, ignore_errors=True)
        if cfg.show_progress:
            print(f"curve: runs {n}: ensemble {point['ensemble_accuracy']:.2f} k-NN "
                  f"{point['knn_accuracy']:.2f}", file=sys.stderr)
    doc["crossover"] = crossover(doc["points"])
    doc["path"] = str(path)
    atomic_write_json(path, {k: v for k, v in doc.items() if k != "path"})
    return doc


def curve_table(doc: dict) -> str:
    k = doc["k"]
    head = (f"{'runs':>6}  {'single':>7}  {'ensemble':>8}  {f'{k}-NN':>7}  "
            f"{'selected':>8}  {'oracle':>7}")
    lines = [head]
    for p in doc["points"]:
        lines.append(f"{p['runs']:>6}  {p['single_model_accuracy']:7.2f}  "
                     f"{p['ensemble_accuracy']:8.2f}  {p['knn_accuracy']:7.2f}  "
                     f"{p['selected']['accuracy']:8.2f}  {p['oracle']['accuracy']:7.2f}")
    c = doc.get("crossover")
    lines.append(f"crossover: {k}-NN ahead of the ensemble from {c} runs on" if c is not None
                 else f"crossover: {k}-NN is not ahead of the ensemble at the largest run count")
    return "\n".join(lines)


def load_curve(path: str | Path) -> dict:
    """Read a curve written by :func:`compute_curve`; raises ConfigError if it is not one."""
    try:
        doc = read_json(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not a readable curve ({e})") from None
    if not isinstance(doc, dict) or doc.get("schema") != CURVE_SCHEMA:
        raise ConfigError(f"{path}: not a kernelscale curve (written by `kernelscale curve`)")
    return doc
