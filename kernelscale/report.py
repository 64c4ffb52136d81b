"""One self-contained HTML report of a kernel: provenance, accuracies, plots, views.

``OUT/index.html`` (inline CSS, no scripts, no external assets) links PNG figures and
JSON files beside it by relative paths: ``report.json`` holds every number shown,
``results.json`` the evaluation as ``kernelscale evaluate --json`` writes it (every run's
accuracy included), ``timings.json`` what changes from one build to the next (the
report's run times, when it was evaluated, the curve kernels' seconds; kept out of the
page and ``report.json``, so the same inputs give the same page), ``compare.json`` (and
``compare.png``) a copy of the comparison the report was given. The report is written
into a temporary directory beside ``OUT`` and renamed into place, so ``OUT`` holds either
the previous report or the new one, complete (a kill between moving the previous one
aside and renaming the new one in leaves no ``OUT`` until the next build; the previous
one is in ``.OUT.old-*`` until then). What killed builds left beside ``OUT`` is removed
by the next one: ``.OUT.old-*`` once it has published, ``.OUT.*.tmp`` once ten minutes
old (a younger one may be a build in progress). ``OUT`` and its files get the modes a plain ``mkdir``/``open`` would give them
(readable by the group under the usual umasks), not ``mkdtemp``'s 0700.

Sections (each an ``<section id=...>``), from :mod:`kernelscale.report_sections`,
:mod:`kernelscale.report_context` and :mod:`kernelscale.report_views`: ``summary`` (the
headline k-NN against the ensemble), ``provenance`` (store manifest, kernel identity,
labels, class names and where they came from), ``baselines``, ``knn`` (the headline
row first: the leave-one-out selection, unless it is a poor guide
(:func:`~kernelscale.report_data.loo_is_poor_guide`), else the cross-fitted one; how to
read a cross-fitted row; the fixed settings and the oracle), ``runs`` (accuracy against
the number of runs, from a curve of ``kernelscale curve``), ``k`` (accuracy against k),
``ablation``, ``classes`` (per-class accuracy of the ensemble and the k-NN and each one's
most frequent mistake), ``confusion`` (both confusion matrices), ``kernel-values``
(kernel values of same- and different-label pairs), ``heatmap`` (a class-sorted sample of
the kernel), ``compare``, ``interpretability`` (most similar train examples, failure
modes, random examples; image grids when the images are available, tables otherwise) and
``run`` (command, versions, devices, the times the inputs record, the JSON files).

Per-class views list every class up to :data:`CLASS_ROWS` classes; above that
(CIFAR-100, ImageNet) they show a summary, a histogram of the per-class accuracies, the
:data:`CLASS_EXTREMES` lowest classes and the most frequent confusions, never one row
per class; ``report.json`` keeps every class and every nonzero confusion cell.

The evaluation is :func:`kernelscale.evaluation.evaluate_inputs` (the one behind
``kernelscale evaluate``); the figures are drawn by :mod:`kernelscale.figures`.
``report.json``: ``provenance`` (once, for the whole report), ``evaluation`` (as in
``results.json``, without its provenance and per-run accuracies), the curve, the views;
floats rounded.
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import atomic_write_json, dir_umask, fsync_dir, remove_stale_temps
from .curve import Curve, load_curve
from .errors import KernelscaleError
from .evaluation import Evaluation, evaluate_inputs, open_inputs
from .figures import (
    BLUE,
    ORANGE,
    PURPLE,
    fig_ablation,
    fig_class_hist,
    fig_confusion,
    fig_grid,
    fig_heatmap,
    fig_k,
    fig_kernel_values,
    fig_per_run,
    fig_runs,
    fig_similar,
)
from .interpret import Images, failures, load_images, most_similar, random_examples
from .knn import Grid, make_setting, predict
from .labels import load_labels
from .report_context import (
    COMPARE_JSON,
    COMPARE_PNG,
    compare_section,
    load_compare,
    provenance_section,
    run_section,
)
from .report_data import (
    CLASS_EXTREMES,
    CLASS_ROWS,
    class_names,
    confusion_cells,
    confusion_matrix,
    ensemble_predictions,
    headline,
    ingested,
    kernel_finished,
    neighbour_same,
    per_class,
    sample_kernel,
    split_by_label,
    summary,
)
from .report_html import img, page
from .report_sections import ablation_section as _ablation_section
from .report_sections import (
    baselines_section,
    classes_section,
    confusion_section,
    knn_section,
    runs_section,
    summary_section,
)
from .report_views import heatmap_section, interpretability_section, kernel_values_section
from .store import Store
from .units import round_floats

__all__ = ["CLASS_EXTREMES", "CLASS_ROWS", "ReportConfig", "ReportError", "build_report",
           "per_class"]

#: the JSON files beside ``index.html``.
REPORT_JSON, RESULTS_JSON, TIMINGS_JSON = "report.json", "results.json", "timings.json"


class ReportError(KernelscaleError):
    """The report's output directory cannot be written or replaced."""


@dataclass
class ReportConfig:
    store: Path
    kernel: Path
    labels: str
    out: Path
    train_kernel: Path | None = None
    curve: Path | None = None
    ablations: Path | None = None
    images: str | None = None
    #: a compare.json of ``kernelscale compare`` (or the folder holding it)
    compare: Path | None = None
    k: int = 3
    weighting: str = "none"
    power: float | None = None
    temperature: float | None = None
    threshold: float = 0.5
    examples: int = 8
    neighbours: int = 5
    seed: int = 0
    device: str = "auto"
    workers: int | None = None
    show_progress: bool = False


# ------------------------------------------------------------------------ publishing

def _temp_dir(out: Path) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ReportError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "report.json").exists():
        raise ReportError(f"{out}: exists and is not a kernelscale report; choose another "
                          "--out")
    out.parent.mkdir(parents=True, exist_ok=True)
    # the temp folders of builds killed before they published (a Slurm gather that hit its
    # time limit or lost its node): each holds a half-drawn report
    remove_stale_temps(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    # mkdtemp makes 0700 folders; the published report must be readable as a plain
    # mkdir would have made it (by the group, on a shared file system)
    tmp.chmod(0o777 & ~dir_umask())
    return tmp


def _publish(tmp: Path, out: Path) -> None:
    """Replace ``out`` by ``tmp``: two renames, so ``out`` is never half-written."""
    for p in tmp.iterdir():
        with open(p, "rb") as fh:
            os.fsync(fh.fileno())
    fsync_dir(tmp)
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        os.replace(out, old)
    os.replace(tmp, out)
    fsync_dir(out.parent)
    # ours, and those a build killed between the two renames (or while deleting) left: a
    # previous report is needed only until a new one is in place, as now
    for p in out.parent.glob(f".{glob.escape(out.name)}.old-*"):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)


def build_report(cfg: ReportConfig) -> Path:
    """Evaluate, render and publish the report ``cfg`` describes; returns ``index.html``."""
    t0 = time.monotonic()
    setting = make_setting(cfg.k, cfg.weighting, cfg.power, cfg.temperature)
    store = Store.open(cfg.store)
    s = store.shape
    labels = load_labels(cfg.labels, n_train=s.n_train, n_test=s.n_test, classes=s.classes,
                         download=False)
    curve = load_curve(cfg.curve) if cfg.curve else None
    compare = load_compare(cfg.compare) if cfg.compare else None
    inputs = open_inputs(cfg.store, cfg.kernel, labels)
    ev = evaluate_inputs(inputs, setting, select=True, train_kernel=cfg.train_kernel,
                         grid=Grid(), seed=cfg.seed, ablations_dir=cfg.ablations,
                         device=cfg.device, workers=cfg.workers,
                         show_progress=cfg.show_progress)
    seconds = {"evaluation": time.monotonic() - t0}
    images, images_note = load_images(cfg.images or labels.source)
    if images is not None and (len(images.train) != s.n_train or len(images.test) != s.n_test):
        images_note = (f"{images.source}: {len(images.train)} train / {len(images.test)} "
                       f"test images, the store has {s.n_train} / {s.n_test}; views are "
                       "tables")
        images = None
    tmp = _temp_dir(cfg.out)
    try:
        if compare is not None:
            shutil.copyfile(compare[1], tmp / COMPARE_JSON)
            if compare[2] is not None:
                shutil.copyfile(compare[2], tmp / COMPARE_PNG)
        atomic_write_json(tmp / RESULTS_JSON, ev.as_json(per_run=True))
        html_text, data = _render(tmp, cfg, store, inputs, ev, curve, images, images_note,
                                  labels, compare, seconds)
        (tmp / "index.html").write_text(html_text, encoding="utf-8")
        atomic_write_json(tmp / REPORT_JSON, data)
        seconds["total"] = time.monotonic() - t0
        atomic_write_json(tmp / TIMINGS_JSON, _timings(ev, curve, seconds))
        _publish(tmp, Path(cfg.out))
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        # a figure's write names no file (or the temp folder, gone now): name the report
        if e.filename is None or str(tmp) in str(e.filename):
            raise OSError(e.errno, e.strerror, str(cfg.out)) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Path(cfg.out) / "index.html"


def _fig_ablation(ev: Evaluation, names: Sequence[str], path: Path) -> str:
    """Bars of every ablation kernel; a histogram of the single-class kernels' accuracies
    when there are more than :data:`CLASS_ROWS` of them."""
    single = [a.accuracy for a in ev.ablations if a.class_index is not None]
    if len(single) <= CLASS_ROWS:
        return fig_ablation(ev, names, path)
    lines = [("summed kernel", ev.weighted_accuracy, BLUE),
             ("ensemble", ev.ensemble_accuracy, ORANGE)]
    lines += [("no log-softmax", a.accuracy, PURPLE) for a in ev.ablations
              if a.class_index is None]
    return fig_class_hist(np.array(single), lines, f"test accuracy (%) of a single-class "
                          f"kernel, k-NN with {ev.setting.label()}", path)


def _fig_classes(ev: Evaluation, knn: list[dict], ens: list[dict], path: Path) -> str | None:
    """Histogram of the per-class k-NN accuracies, the ensemble's as an outline, for more
    than :data:`CLASS_ROWS` classes (below that the table shows every class)."""
    acc = np.array([r["accuracy"] for r in knn if r["accuracy"] is not None])
    if len(knn) <= CLASS_ROWS or not acc.size:
        return None
    other = np.array([r["accuracy"] for r in ens if r["accuracy"] is not None])
    return fig_class_hist(acc, [("all classes, k-NN", ev.weighted_accuracy, BLUE),
                                ("all classes, ensemble", ev.ensemble_accuracy, ORANGE)],
                          f"per-class test accuracy (%); bars: k-NN with "
                          f"{ev.setting.label()}", path, other=("ensemble", other))


def _render(tmp: Path, cfg: ReportConfig, store: Store, inputs, ev: Evaluation,
            curve: Curve | None, images: Images | None, images_note: str, labels,
            compare: tuple[dict, Path, Path | None] | None,
            seconds: dict[str, float]) -> tuple[str, dict]:
    """(index.html, report.json) of the report, its figures drawn into ``tmp``; the
    seconds of its phases added to ``seconds``."""
    nb = ev.neighbours
    lab_tr, lab_te = labels.train, labels.test
    classes = store.shape.classes
    names, names_source = class_names(labels, images, classes)
    nn = cfg.neighbours
    t1 = time.monotonic()
    sim = most_similar(nb, lab_tr, lab_te, cfg.threshold, top=cfg.examples, neighbours=nn)
    fail = failures(nb, lab_tr, lab_te, top=cfg.examples, neighbours=nn)
    rand = random_examples(nb, lab_tr, lab_te, count=cfg.examples, neighbours=nn,
                           seed=cfg.seed)
    knn_pred = predict(nb, lab_tr, ev.setting, classes)
    ens_pred = ensemble_predictions(store, ev.runs)
    by_class = per_class(knn_pred, lab_te, classes, names)
    by_class_ens = per_class(ens_pred, lab_te, classes, names)
    cells = {"ensemble": confusion_cells(ens_pred, lab_te, classes),
             "knn": confusion_cells(knn_pred, lab_te, classes)}
    titles = {"ensemble": f"Ensemble of {ev.runs} runs",
              "knn": f"Kernel k-NN, {ev.setting.label()}"}
    sample = sample_kernel(inputs.kernel, lab_tr, lab_te, classes, cfg.seed)
    nb_same = split_by_label(nb.values, neighbour_same(nb, lab_tr, lab_te))
    value_sets = {"neighbours": nb_same}
    if sample is not None:
        value_sets["sample"] = split_by_label(sample.values, sample.same(lab_tr, lab_te))
    values = {src: {"same": summary(a), "different": summary(b)}
              for src, (a, b) in value_sets.items()}
    seconds["views and kernel sample"] = time.monotonic() - t1

    t2 = time.monotonic()
    panels = {"neighbours": f"top {nb.kmax} neighbours of every test example",
              "sample": "seeded sample of kernel entries"}
    figs: dict[str, str | None] = {
        "per_run": fig_per_run(ev, tmp / "baselines-runs.png") if ev.per_run_accuracy
        else None,
        "runs": fig_runs(curve, tmp / "accuracy-vs-runs.png") if curve else None,
        "k": fig_k(ev, tmp / "accuracy-vs-k.png"),
        "ablation": _fig_ablation(ev, names, tmp / "ablation.png") if ev.ablations else None,
        "classes": _fig_classes(ev, by_class, by_class_ens, tmp / "per-class.png"),
        "kernel_values": fig_kernel_values([(panels[src], a, b) for src, (a, b)
                                            in value_sets.items()], tmp / "kernel-values.png"),
        "heatmap": fig_heatmap(sample.values, lab_te[sample.rows], lab_tr[sample.cols],
                               names, tmp / "kernel-heatmap.png") if sample is not None
        else None,
        "similar": fig_similar(nb.values[:, 0].astype(np.float64), cfg.threshold,
                               tmp / "most-similar.png"),
        "compare": COMPARE_PNG if compare is not None and compare[2] is not None else None,
    }
    for key, title in titles.items():
        figs[f"confusion_{key}"] = (fig_confusion(confusion_matrix(cells[key], classes), names,
                                                  title, tmp / f"confusion-{key}.png")
                                    if classes <= CLASS_ROWS else None)
    for key, view in (("similar_grid", sim["top"]), ("failures_grid", fail["top"]),
                      ("random_grid", rand["examples"])):
        figs[key] = (fig_grid(view, images, names, tmp / f"{key.replace('_', '-')}.png", nn)
                     if images is not None and view else None)
    seconds["figures"] = time.monotonic() - t2

    head = headline(ev)
    files = [REPORT_JSON, RESULTS_JSON, TIMINGS_JSON] + ([COMPARE_JSON] if compare else [])
    prov = ev.provenance
    kt = inputs.kernel.topk
    sections = [
        ("summary", "Summary", summary_section(ev, head)),
        ("provenance", "Data provenance",
         provenance_section(store, prov, inputs.kernel.attrs, images_note, names,
                            names_source)),
        ("baselines", "Baselines", baselines_section(ev, figs["per_run"])),
        ("knn", "k-NN and weighted k-NN", knn_section(ev, head)),
        ("runs", "Accuracy against the number of runs", runs_section(curve, figs["runs"])),
        ("k", "Accuracy against k",
         img(figs["k"], "accuracy against k")
         + "<p class='note'>Test accuracy of the majority vote and of each weighting at its "
           "best parameter (chosen with the test labels), against the number of "
           "neighbours.</p>"),
        ("ablation", "Kernel ablations", _ablation_section(ev, figs["ablation"], names)),
        ("classes", "Per-class accuracy",
         classes_section(by_class, by_class_ens, ev.setting.label(), figs["classes"])),
        ("confusion", "Confusion matrices",
         confusion_section(cells, titles, names, {k: figs[f"confusion_{k}"] for k in titles})),
        ("kernel-values", "Kernel values of same- and different-label pairs",
         kernel_values_section(values, nb.kmax, len(nb), sample, figs["kernel_values"])),
        ("heatmap", "Kernel heatmap of a class-sorted sample",
         heatmap_section(sample, classes, kt, figs["heatmap"], names)),
        ("compare", "Comparison with another kernel",
         compare_section(compare[0] if compare else None, figs["compare"])),
        ("interpretability", "Interpretability",
         interpretability_section(sim, fail, rand, figs, names, images_note, cfg.threshold,
                                  len(nb), nn)),
        ("run", "How this report was made",
         run_section(prov, ingested=ingested(store.manifest),
                     kernel_done=kernel_finished(inputs.kernel),
                     ablation_device=cfg.device if cfg.ablations else None,
                     curve_points=curve.points if curve else None, files=files)),
    ]
    doc = page(f"kernelscale report — {store.runs}-run ensemble", sections, files)
    evaluation = ev.as_json()
    provenance = evaluation.pop("provenance")  # once, for the whole report
    data = round_floats({
        "provenance": provenance, "evaluation": evaluation,
        "headline": head.as_json() if head else None, "most_similar": sim,
        "failures": fail, "random": rand, "curve": curve.as_json() if curve else None,
        "figures": {k: v for k, v in figs.items() if v}, "images": images_note,
        "class_names": list(names), "class_names_source": names_source,
        "per_class": {"setting": ev.setting.as_json(), "classes": by_class},
        "per_class_ensemble": {"runs": ev.runs, "classes": by_class_ens},
        "confusion": {"cells": "rows [true, predicted, count], every nonzero cell",
                      "ensemble": cells["ensemble"].tolist(), "knn": cells["knn"].tolist(),
                      "knn_setting": ev.setting.as_json()},
        "kernel_values": {"neighbours_k": nb.kmax, **values},
        "kernel_sample": None if sample is None else {
            "seed": sample.seed, "rows": sample.rows.tolist(), "cols": sample.cols.tolist(),
            "classes": sample.shown.tolist()},
        "compare": None if compare is None else {"source": str(compare[1]),
                                                 "file": COMPARE_JSON},
        "files": files})
    return doc, data


def _timings(ev: Evaluation, curve: Curve | None, seconds: dict[str, float]) -> dict:
    """``timings.json``: what differs between two builds of the same report, kept out of
    the page and ``report.json`` (the same inputs give the same page): the seconds of the
    report's phases, when it was evaluated, the seconds of the curve's kernels."""
    return round_floats({
        "report_seconds": seconds,
        "evaluated_at": ev.provenance.created_at if ev.provenance else None,
        "curve_kernels": [{"runs": p.runs, "seconds": p.kernel_seconds, "device": p.device}
                          for p in (curve.points if curve else [])]})
