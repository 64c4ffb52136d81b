"""Evaluation of a saved kernel: baselines from the store, k-NN from the kernel, ablations.

* single-model accuracy: mean over runs of each run's test accuracy (argmax of its logits)
* ensemble accuracy: argmax of the mean logits over runs, rounded to the store dtype as
  the reference's ``logits.mean(0)`` on float16 does
* k-NN, weighted k-NN, honest selection and the oracle: :mod:`kernelscale.knn`, from the
  test rows' top neighbours read once from the kernel
* ablations (``ablation_kernels``): the kernel of each class alone (``--class c``) and
  the kernel of raw logits (``--no-log-softmax``), computed with the kernel engine into a
  directory and scored like the summed kernel.

:func:`evaluate_inputs` is the one evaluation: ``kernelscale evaluate``, the report and
each point of the curve call it. Its :class:`Evaluation` holds typed results
(:mod:`kernelscale.knn`'s :class:`~kernelscale.knn.Selection`,
:class:`~kernelscale.knn.Choice`, ...) and a :class:`Provenance` (store and kernel
fingerprints, labels, versions, device, command); ``Evaluation.as_json`` is
``results.json``: floats rounded, every run's accuracy only when asked.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .errors import ConfigError, KernelOutputError
from .kernelread import kernel_neighbours, load_kernel
from .knn import (
    AccuracyByK,
    Choice,
    FamilyBest,
    Grid,
    Selection,
    Setting,
    accuracy,
    accuracy_by_k,
    candidates,
    crossfit,
    family_best,
    leave_one_out,
    make_setting,
    oracle,
    predict,
)
from .labels import Labels
from .output import KernelOutput
from .provenance import Provenance, make_provenance
from .store import Store
from .topk import Neighbours
from .units import round_floats

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
        raise KernelOutputError(f"{path}: was computed {kern.computed_from(store.root)} "
                                f"(fingerprint "
                                f"{str(ident.get('store_fingerprint'))[:12]}, "
                                f"{store.root} now {store.fingerprint()[:12]}); recompute it "
                                f"with `kernelscale kernel --store {store.root} --out {path} "
                                "--overwrite`")
    return ident


def open_inputs(store_path: str | os.PathLike, kernel_path: str | os.PathLike,
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
    from .kernel import KernelConfig, compute_kernel  # the kernel engine is a sibling stage

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


@dataclass(frozen=True)
class Ablation:
    """One ablation kernel's k-NN accuracy (percent) at the requested setting, and its own
    oracle. ``class_index``: the class of a one-class kernel (None for the others)."""

    name: str
    path: str
    class_index: int | None
    log_softmax: bool
    accuracy: float
    oracle: Choice

    def as_json(self) -> dict:
        return {"name": self.name, "path": self.path, "class": self.class_index,
                "log_softmax": self.log_softmax, "accuracy": self.accuracy,
                "oracle": self.oracle.as_json()}


def score_ablations(inputs: KernelInputs, kernels: Sequence[tuple[str, Path]],
                    setting: Setting, grid: Grid, *, workers: int | None = None,
                    show_progress: bool = False) -> list[Ablation]:
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
        nb = kernel_neighbours(kern, kmax, workers=workers, show_progress=show_progress,
                               need=setting.k)
        table = candidates(nb, lab.train, lab.test, grid, inputs.classes)
        cls = ident.get("classes")
        rows.append(Ablation(name, str(path), cls[0] if cls and len(cls) == 1 else None,
                             bool(ident.get("log_softmax", True)),
                             accuracy(predict(nb, lab.train, setting, inputs.classes),
                                      lab.test),
                             oracle(table)))
    return rows


# ----------------------------------------------------------------------- evaluation

def _opt(x):
    return None if x is None else x.as_json()


@dataclass
class Evaluation:
    """Accuracies in percent. ``knn_accuracy`` is the majority vote at ``k``.

    ``setting``/``weighted_accuracy``: the requested k-NN setting and its accuracy;
    ``selection``: the honestly selected setting (see :mod:`kernelscale.knn`), by
    leave-one-out when a train kernel is given, else by cross-fitting; ``crossfit``: the
    cross-fitted accuracy as well, whenever a selection ran (the selection itself when
    that is a cross-fit); ``oracle``: the best setting on the test labels;
    ``families``: each weighting family's best k; ``accuracy_by_k``: test accuracy
    against k for the majority vote and each weighting family's best parameter;
    ``ablations``: per ablation kernel, accuracy at ``setting`` and its own oracle;
    ``provenance``: the inputs, versions and command. ``neighbours``: the test rows' top
    neighbours the numbers come from (not serialised).
    """

    runs: int
    k: int
    single_model_accuracy: float
    ensemble_accuracy: float
    knn_accuracy: float
    zero_variance: dict
    setting: Setting | None = None
    weighted_accuracy: float | None = None
    selection: Selection | None = None
    crossfit: Selection | None = None
    oracle: Choice | None = None
    families: list[FamilyBest] | None = None
    accuracy_by_k: AccuracyByK | None = None
    ablations: list[Ablation] | None = None
    per_run_accuracy: list[float] = field(default_factory=list)
    provenance: Provenance | None = None
    neighbours: Neighbours | None = field(default=None, repr=False, compare=False)

    def as_json(self, per_run: bool = False) -> dict:
        """A JSON-able dict, floats rounded; every run's accuracy only when ``per_run``;
        ``crossfit`` only when it is not the ``selection`` itself."""
        d = {"runs": self.runs, "k": self.k,
             "single_model_accuracy": self.single_model_accuracy,
             "ensemble_accuracy": self.ensemble_accuracy, "knn_accuracy": self.knn_accuracy,
             "zero_variance": dict(self.zero_variance), "setting": _opt(self.setting),
             "weighted_accuracy": self.weighted_accuracy, "selection": _opt(self.selection),
             "oracle": _opt(self.oracle),
             "families": (None if self.families is None
                          else [f.as_json() for f in self.families]),
             "accuracy_by_k": _opt(self.accuracy_by_k),
             "ablations": (None if self.ablations is None
                           else [a.as_json() for a in self.ablations]),
             "provenance": _opt(self.provenance)}
        if self.crossfit is not None and self.crossfit != self.selection:
            d["crossfit"] = self.crossfit.as_json()
        if per_run:
            d["per_run_accuracy"] = [float(a) for a in self.per_run_accuracy]
        return round_floats(d)

    def table(self) -> str:
        rows = [("average single-model accuracy", self.single_model_accuracy),
                (f"ensemble accuracy ({self.runs} models)", self.ensemble_accuracy),
                (f"kernel accuracy (k-NN w/ k={self.k})", self.knn_accuracy)]
        extra = []
        if self.setting and self.setting.weighting != "none":
            extra.append((f"weighted k-NN ({self.setting.label()})", self.weighted_accuracy,
                          ""))
        sel = self.selection
        if sel:
            if sel.method == "leave-one-out":
                note = (f"{sel.setting.label()}; leave-one-out on train "
                        f"{sel.selection_accuracy:.2f}")
            else:
                note = "; ".join(f"half {i + 1}: {f.setting.label()}"
                                 for i, f in enumerate(sel.folds))
            extra.append((f"selected k-NN ({sel.method})", sel.accuracy, note))
        cf = self.crossfit
        if cf is not None and cf != sel:
            extra.append(("selected k-NN (cross-fit)", cf.accuracy,
                          "; ".join(f"half {i + 1}: {f.setting.label()}"
                                    for i, f in enumerate(cf.folds))))
        if self.oracle and sel:
            extra.append(("oracle k-NN (chosen with test labels)", self.oracle.accuracy,
                          self.oracle.setting.label()))
        for a in self.ablations or []:
            extra.append((f"ablation {a.name} (k-NN w/ {self.setting.label()})",
                          a.accuracy, ""))
        width = max(len(r[0]) for r in rows + extra)
        lines = [f"{name:<{width}} : {acc:6.2f}" for name, acc in rows]
        lines += [f"{name:<{width}} : {acc:6.2f}" + (f"  ({note})" if note else "")
                  for name, acc, note in extra]
        zv = self.zero_variance
        if zv and any(zv.values()):
            lines.append("zero-variance entries (contribute 0 to the kernel): "
                         + ", ".join(f"{s} {n}" for s, n in sorted(zv.items())))
        return "\n".join(lines)


def evaluate_inputs(inputs: KernelInputs, setting: Setting, *, select: bool = False,
                    train_kernel: str | os.PathLike | None = None, grid: Grid | None = None,
                    seed: int = 0, ablations_dir: str | os.PathLike | None = None,
                    device: str = "auto", workers: int | None = None,
                    show_progress: bool = False, command: str | None = None) -> Evaluation:
    """The one evaluation of opened, checked inputs; :func:`evaluate`, the report and
    every point of the curve call it.

    Reads the test rows' top neighbours once, computes the baselines of the kernel's runs,
    the majority vote at ``setting.k``, ``setting`` itself and every setting of ``grid``
    (oracle, families, accuracy against k). ``train_kernel`` (a train x train kernel of
    the same store and runs) selects the setting by leave-one-out, and cross-fitting runs
    as well; else ``select`` selects it by cross-fitting on the test halves.
    ``ablations_dir``: compute (or reuse) the ablation kernels there and score them.
    ``command``: recorded in the provenance (default: this process's command line).
    """
    lab, C = inputs.labels, inputs.classes
    n_train = inputs.store.shape.n_train
    if setting.k > n_train:
        raise ConfigError(f"--k {setting.k} exceeds the {n_train} train examples")
    grid = grid or Grid()
    # a top-K kernel gives what it holds, at least setting.k; the grid is cut to it
    kmax = max(setting.k, max(grid.ks))
    tk = open_train_kernel(train_kernel, inputs) if train_kernel is not None else None
    for kern in (inputs.kernel, tk):
        if kern is not None and kern.topk:
            kmax = max(setting.k, min(kmax, kern.topk))
    nb = kernel_neighbours(inputs.kernel, kmax, workers=workers, show_progress=show_progress,
                           need=setting.k)
    abl = []
    if ablations_dir is not None:
        abl = ablation_kernels(inputs, ablations_dir, device=device,
                               show_progress=show_progress)
    if setting.k > nb.kmax:
        raise ConfigError(f"--k {setting.k} exceeds the {nb.kmax} neighbours available")
    grid = grid.limited(nb.kmax)
    base = baselines(inputs.store, lab.test, inputs.runs)
    knn = accuracy(predict(nb, lab.train, Setting(setting.k), C), lab.test)
    weighted = accuracy(predict(nb, lab.train, setting, C), lab.test)
    table = candidates(nb, lab.train, lab.test, grid, C)
    ev = Evaluation(inputs.runs, setting.k, base.single_model_accuracy,
                    base.ensemble_accuracy, knn,
                    dict(inputs.kernel.attrs.get("zero_variance", {})),
                    setting=setting, weighted_accuracy=weighted,
                    oracle=oracle(table), families=family_best(table),
                    accuracy_by_k=accuracy_by_k(table),
                    per_run_accuracy=[float(a) for a in base.per_run_accuracy],
                    provenance=make_provenance(inputs.store, lab, inputs.kernel,
                                               command=command),
                    neighbours=nb)
    if tk is not None:
        tnb = kernel_neighbours(tk, nb.kmax, exclude_diagonal=True, workers=workers,
                                show_progress=show_progress)
        ev.selection = replace(leave_one_out(tnb, lab.train, table, grid, C),
                               train_kernel=str(train_kernel))
        ev.crossfit = crossfit(table, seed)
    elif select:
        ev.selection = ev.crossfit = crossfit(table, seed)
    if abl:
        ev.ablations = score_ablations(inputs, abl, setting, grid, workers=workers,
                                       show_progress=show_progress)
    return ev


def evaluate(store_path: str, kernel_path: str, labels: Labels, k: int = 3, *,
             weighting: str = "none", power: float | None = None,
             temperature: float | None = None, select: bool = False,
             train_kernel: str | os.PathLike | None = None, grid: Grid | None = None,
             seed: int = 0, ablations_dir: str | os.PathLike | None = None,
             device: str = "auto", workers: int | None = None,
             show_progress: bool = False) -> Evaluation:
    """Baselines and k-NN accuracies (percent) for a finished test-by-train kernel:
    :func:`evaluate_inputs` of the opened and checked store, kernel and labels."""
    setting = make_setting(k, weighting, power, temperature)
    inputs = open_inputs(store_path, kernel_path, labels)
    return evaluate_inputs(inputs, setting, select=select, train_kernel=train_kernel,
                           grid=grid, seed=seed, ablations_dir=ablations_dir, device=device,
                           workers=workers, show_progress=show_progress)
