"""One self-contained HTML report of a kernel: provenance, accuracies, plots, views.

``OUT/index.html`` (inline CSS, no scripts, no external assets) links PNG figures beside
it by relative paths; ``OUT/report.json`` holds every number shown. The report is written
into a temporary directory beside ``OUT`` and renamed into place, so ``OUT`` holds either
the previous report or the new one, complete (a kill between moving the previous one
aside and renaming the new one in leaves no ``OUT`` until the next build; the previous
one is in ``.OUT.old-*`` until then). What killed builds left beside ``OUT`` is removed
by the next one: ``.OUT.old-*`` once it has published, ``.OUT.*.tmp`` once ten minutes
old (a younger one may be a build in progress).

Sections (each an ``<section id=...>``): ``provenance`` (store manifest, kernel identity,
labels), ``baselines``, ``knn`` (majority vote, weighted, selected, oracle), ``runs``
(accuracy against the number of runs, from a curve of ``kernelscale curve``), ``k``
(accuracy against k), ``ablation`` (per-class and no-log-softmax kernels),
``classes`` (k-NN accuracy of each class and its most frequent mistake),
``interpretability`` (most similar train examples, failure modes, random examples; image
grids when the images are available, tables otherwise).

Class names are the labels' own (``class_names``), else the images' (CIFAR-10's), else
``class 0`` .. ``class C-1``. Per-class views list every class up to
:data:`CLASS_ROWS` classes; above that (CIFAR-100, ImageNet) they show a summary, a
histogram of the per-class accuracies and the :data:`CLASS_EXTREMES` lowest (and, for
the single-class ablation kernels, highest) classes, never one row per class;
``report.json`` keeps every class.

The evaluation is :func:`kernelscale.evaluation.evaluate_inputs` (the one behind
``kernelscale evaluate``); the figures are drawn by :mod:`kernelscale.figures`.
``report.json``: ``provenance`` (once, for the whole report), ``evaluation`` (as in
``results.json``, without its provenance), the curve, the views; floats rounded.
"""

from __future__ import annotations

import glob
import html
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
    fig_grid,
    fig_k,
    fig_per_run,
    fig_runs,
    fig_similar,
)
from .interpret import Images, failures, load_images, most_similar, random_examples
from .knn import Grid, make_setting, predict
from .labels import default_class_names, load_labels
from .provenance import Provenance
from .store import Store
from .units import format_bytes, round_floats
from .version import __version__

#: per-class tables and bar charts list every class up to this many classes; above it
#: they are summarised (a histogram, the extremes), so a 1000-class report stays readable.
CLASS_ROWS = 20
#: classes listed at each end when a per-class view is summarised.
CLASS_EXTREMES = 10


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


# -------------------------------------------------------------------------------- html

CSS = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1f2328;
 margin:0;background:#f6f8fa}
main{max-width:1000px;margin:0 auto;padding:24px 32px 64px;background:#fff;
 box-shadow:0 0 0 1px #e5e7eb}
h1{font-size:26px;margin:8px 0 4px}h2{font-size:20px;margin:36px 0 8px;padding-top:8px;
 border-top:2px solid #e5e7eb}h3{font-size:16px;margin:22px 0 6px}
p.meta{color:#57606a;margin:0 0 12px}
nav{font-size:14px;margin:8px 0 0}nav a{margin-right:14px;color:#0969da;
 text-decoration:none}
table{border-collapse:collapse;margin:8px 0 12px;font-size:14px}
th,td{border-bottom:1px solid #e5e7eb;padding:4px 10px;text-align:left;vertical-align:top}
th{background:#f6f8fa;font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.hl td{background:#eef6ff;font-weight:600}
code,.mono{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:12.5px}
.note{color:#57606a;font-size:13.5px}
.warn{background:#fff8c5;border:1px solid #eed888;padding:6px 10px;border-radius:4px}
.bad{color:#cf222e;font-weight:600}.good{color:#1a7f37}
img{max-width:100%;height:auto;display:block;margin:6px 0 10px}
.tag{display:inline-block;font-size:11.5px;padding:0 6px;border-radius:8px;
 background:#eaeef2;color:#57606a;margin-left:6px;font-weight:500}
.tag.oracle{background:#ffebe9;color:#cf222e}.tag.honest{background:#dafbe1;color:#1a7f37}
table.nbr td{white-space:nowrap;font-size:13px;line-height:1.35}
.idx{color:#6e7781;font-size:12px}.kv{font-variant-numeric:tabular-nums}
table.knn td:first-child{white-space:nowrap}
.row{display:flex;gap:28px;flex-wrap:wrap;align-items:flex-start}
.row h4{margin:6px 0 0;font-size:14px}
"""


def _e(x) -> str:
    return html.escape(str(x))


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def _table(head: Sequence[str], rows: Sequence[Sequence], num: Sequence[int] = (),
           highlight: Sequence[int] = (), cls: str = "") -> str:
    attr = f' class="{cls}"' if cls else ""
    out = [f"<table{attr}><thead><tr>", *(f"<th>{_e(h)}</th>" for h in head), "</tr></thead><tbody>"]
    for i, r in enumerate(rows):
        cls = ' class="hl"' if i in highlight else ""
        cells = []
        for j, c in enumerate(r):
            raw = c if isinstance(c, _Raw) else _e(c)
            cells.append(f'<td class="num">{raw}</td>' if j in num else f"<td>{raw}</td>")
        out.append(f"<tr{cls}>{''.join(cells)}</tr>")
    out.append("</tbody></table>")
    return "".join(out)


class _Raw(str):
    """Table cell content that is already HTML."""


def _img(name: str, alt: str) -> str:
    return f'<img src="{_e(name)}" alt="{_e(alt)}">'


def _neighbour_table(entries: Sequence[dict], names: Sequence[str], n: int) -> str:
    """One row per test example; a cell per neighbour: label, kernel value, train index."""
    n = max(1, min(n, max((len(e["neighbours"]) for e in entries), default=1)))
    head = ["test example"] + (["most similar train example"] if n == 1 else
                               [f"neighbour {j + 1}" for j in range(n)])
    rows = []
    for e in entries:
        cells = [_Raw(f'<b>{_e(names[e["label"]])}</b><br><span class="idx">test '
                      f'{e["test"]}</span>')]
        for nbr in e["neighbours"][:n]:
            cls = "good" if nbr["label"] == e["label"] else "bad"
            cells.append(_Raw(f'<span class="{cls}">{_e(names[nbr["label"]])}</span> '
                              f'<span class="kv">K={nbr["value"]:.3f}</span><br>'
                              f'<span class="idx">train {nbr["train"]}</span>'))
        rows.append(cells)
    return _table(head, rows, cls="nbr")


def _provenance(store: Store, prov: Provenance, attrs: dict, images_note: str) -> str:
    m = store.manifest
    s = store.shape
    ident = prov.kernel_identity or {}
    parts = ["<table><tbody>"]
    for k, v in [
        ("store", _Raw(f'<span class="mono">{_e(prov.store)}</span>')),
        ("store fingerprint", _Raw(f'<span class="mono">{_e(prov.store_fingerprint)}</span>')),
        ("runs", m["runs"]),
        ("examples", f"{s.n_test} test, {s.n_train} train, {s.classes} classes ({s.dtype})"),
        ("kernel", _Raw(f'<span class="mono">{_e(prov.kernel)}</span>')),
        ("kernel inputs", f"{ident.get('pairs')}, runs {ident.get('runs')}, precision "
                          f"{ident.get('precision')}, log-softmax {ident.get('log_softmax')}, "
                          f"classes {ident.get('classes') or 'all'}"
                          + (f"; a top-{ident['topk']} kernel (each test row's "
                             f"{ident['topk']} largest values kept)"
                             if ident.get("topk") else "")),
        ("zero-variance entries", ", ".join(f"{a} {b}" for a, b in
                                            sorted(attrs.get("zero_variance", {}).items()))
         or "–"),
        ("kernel computed on", prov.device or "–"),
        ("labels", prov.labels),
        ("images", images_note),
        ("software", f"kernelscale {prov.kernelscale_version}, torch {prov.torch_version}, "
                     f"numpy {prov.numpy_version}"),
        ("command", _Raw(f'<span class="mono">{_e(prov.command or "–")}</span>')),
    ]:
        parts.append(f"<tr><th>{_e(k)}</th><td>{v if isinstance(v, _Raw) else _e(v)}</td></tr>")
    parts.append("</tbody></table>")
    srcs = m.get("sources") or []
    if srcs:
        parts.append("<h3>Sources</h3>")
        keys = sorted({k for src in srcs for k in src})
        parts.append(_table(keys, [[src.get(k, "") for k in keys] for src in srcs]))
    files = m.get("files") or []
    parts.append(f"<h3>Files ({len(files)})</h3>")
    rows = [[f["name"], _Raw(f'<span class="mono">{_e(f["sha256"][:16])}</span>'),
             f"{f['run_start']}–{f['run_stop']}", format_bytes(f["size"]),
             f.get("commit") or "–"] for f in files]
    parts.append(_table(["file", "sha256", "runs", "size", "commit"], rows, num=(2, 3)))
    if m.get("rejected"):
        parts.append(f"<h3>Rejected files ({len(m['rejected'])})</h3>")
        parts.append(_table(["file", "reason"], [[r["name"], r["reason"]]
                                                 for r in m["rejected"]]))
    return "".join(parts)


def _knn_section(ev: Evaluation) -> str:
    rows, hl = [], []
    rows.append([f"k={ev.k}, majority vote", _pct(ev.knn_accuracy),
                 _Raw('fixed, as in the reference <span class="tag">fixed</span>')])
    if ev.setting and ev.setting.weighting != "none":
        rows.append([ev.setting.label(), _pct(ev.weighted_accuracy),
                     _Raw('as requested <span class="tag">fixed</span>')])
    sel = ev.selection
    if sel:
        if sel.method == "leave-one-out":
            how = (f"leave-one-out k-NN on the train × train kernel (own column excluded): "
                   f"{sel.selection_accuracy:.2f}% on {sel.selection_rows} train "
                   "examples; then scored on test")
        else:
            how = ("cross-fitting: the setting chosen on one random half of the test set "
                   "scores the other half, and the other way round; "
                   + "; ".join(f"half {i + 1} → {f.accuracy:.2f}% "
                               f"({f.scored_on_rows} examples)"
                               for i, f in enumerate(sel.folds)))
        hl.append(len(rows))
        rows.append([sel.label(), _pct(sel.accuracy),
                     _Raw(f'{_e(how)} <span class="tag honest">honest</span>')])
    cf = ev.crossfit
    if cf is not None and sel is not None and sel.method != "cross-fit":
        how = ("cross-fitting over two random halves of the test set (each half scored "
               "with the setting chosen on the other)")
        rows.append([cf.label(), _pct(cf.accuracy),
                     _Raw(f'{_e(how)} <span class="tag honest">honest</span>')])
    if ev.oracle:
        rows.append([ev.oracle.setting.label(), _pct(ev.oracle.accuracy),
                     _Raw('best of the grid on the test labels — optimistic, what tuning on '
                          'the test set reports <span class="tag oracle">oracle</span>')])
    out = [_table(["setting", "test accuracy (%)", "how the setting was chosen"], rows,
                  num=(1,), highlight=hl, cls="knn")]
    if sel and sel.method == "leave-one-out" and sel.selection_accuracy >= 99.0:
        out.append(f"<p class='warn'>Leave-one-out accuracy on the train set is "
                   f"{sel.selection_accuracy:.2f}%: the train examples' outputs carry "
                   "their own labels (they were trained on), so the train × train kernel "
                   "tells the settings apart poorly. The cross-fitted accuracy, chosen on "
                   "test examples but never scored on the ones it was chosen on, is the "
                   "better guide here.</p>")
    if ev.families:
        out.append("<h3>Best k of each weighting <span class='tag oracle'>oracle</span></h3>"
                   "<p class='note'>Weight of a neighbour with kernel value K: majority vote "
                   "1; power max(K, 0)<sup>p</sup>; softmax exp(K/T). The best k of each "
                   "row is chosen with the test labels.</p><div class='row'>")
        top = max(f.accuracy for f in ev.families)
        for w, title, par in (("none", "majority vote", None), ("power", "power", "p"),
                              ("softmax", "softmax", "T")):
            fam = [f for f in ev.families if f.weighting == w]
            if not fam:
                continue
            head = ([par] if par else []) + ["best k", "accuracy"]
            frows = [([f"{f.param:g}"] if par else []) + [f.setting.k, _pct(f.accuracy)]
                     for f in fam]
            hl = [i for i, f in enumerate(fam) if f.accuracy == top]
            out.append(f"<div><h4>{_e(title)}</h4>"
                       + _table(head, frows, num=range(len(head)), highlight=hl) + "</div>")
        out.append("</div>")
    return "".join(out)


def _runs_section(curve: Curve | None, fig: str | None) -> str:
    if not curve:
        return ("<p class='note'>No curve given: run <code>kernelscale curve --store STORE "
                "--labels LABELS --runs 10,20,50,...</code> and pass its "
                "<code>curve.json</code> with <code>--curve</code>.</p>")
    c = curve.crossover
    k = curve.k
    lead = (f"<p>The kernel {k}-NN is ahead of the ensemble from <b>{c} runs</b> on "
            "(first run count from which it stays ahead at every larger count measured)."
            "</p>" if c is not None else
            f"<p>The kernel {k}-NN is <b>not</b> ahead of the ensemble at the largest run "
            "count measured.</p>")
    rows = [[p.runs, _pct(p.single_model_accuracy), _pct(p.ensemble_accuracy),
             _pct(p.knn_accuracy), _pct(p.selected.accuracy), _pct(p.oracle.accuracy)]
            for p in curve.points]
    hl = [i for i, p in enumerate(curve.points) if p.runs == c]
    return (lead + _img(fig, "accuracy against the number of runs")
            + _table(["runs", "single model", "ensemble", f"{k}-NN", "selected (cross-fit)",
                      "oracle"], rows, num=range(6), highlight=hl)
            + "<p class='note'>Each point uses the first n runs of the store, standardised "
              "with the statistics of those n runs. \"selected\" is honest (cross-fitting "
              "over test halves); \"oracle\" chooses with the test labels.</p>")


def _class_label(c: int, names: Sequence[str]) -> str:
    """``class 7 only (horse)``: the class index, and its name when it has one."""
    return f"class {c} only" + (f" ({names[c]})" if names[c] != f"class {c}" else "")


def _ablation_section(ev: Evaluation, fig: str | None, names: Sequence[str]) -> str:
    if not ev.ablations:
        return ("<p class='note'>No ablations computed: pass <code>--ablations DIR</code> "
                "to compute the kernel of each class alone and of raw logits (one kernel "
                "each, computed with the kernel engine and kept in DIR).</p>")

    def row(what: str, a) -> list:
        return [what, _pct(a.accuracy), _pct(a.oracle.accuracy), a.oracle.setting.label()]

    rows = [["all classes (summed kernel)", _pct(ev.weighted_accuracy),
             _pct(ev.oracle.accuracy), ev.oracle.setting.label()]]
    per_class = [a for a in ev.ablations if a.class_index is not None]
    note = ""
    if len(per_class) <= CLASS_ROWS:
        rows += [row(_class_label(a.class_index, names), a) for a in per_class]
    else:
        acc = np.array([a.accuracy for a in per_class])
        rows.append([f"{len(per_class)} single-class kernels: mean (median)",
                     _pct(float(acc.mean())) + f" ({_pct(float(np.median(acc)))})", "–", "–"])
        order = sorted(per_class, key=lambda a: (-a.accuracy, a.class_index))
        n = min(CLASS_EXTREMES // 2, len(order) // 2)
        rows += [row(_class_label(a.class_index, names) + " — highest", a)
                 for a in order[:n]]
        rows += [row(_class_label(a.class_index, names) + " — lowest", a)
                 for a in order[-n:]]
        note = (f" Of the {len(per_class)} single-class kernels the {n} highest and {n} "
                "lowest are listed; every one is in <code>report.json</code>.")
    rows += [row("no log-softmax (raw logits)", a) for a in ev.ablations
             if a.class_index is None]
    return (_img(fig, "ablation accuracies")
            + _table(["kernel", f"k-NN ({ev.setting.label()})", "best (oracle)",
                      "best setting"], rows, num=(1, 2), highlight=(0,))
            + "<p class='note'>The summed kernel is the mean of the per-class kernels. "
              "\"best\" is chosen with the test labels." + note + "</p>")


def per_class(pred: np.ndarray, truth: np.ndarray, classes: int,
              names: Sequence[str]) -> list[dict]:
    """Each class's test examples, k-NN accuracy and most frequent mistake.

    ``pred``, ``truth``: int64 (n_test,) in ``[0, classes)``. One JSON-able dict per
    class: ``class``, ``name``, ``test_examples``, ``correct``, ``accuracy`` (percent;
    None without test examples) and ``mistake`` (the most frequent wrong prediction,
    ties to the smaller label: ``{"label", "name", "count"}``, or None). Memory O(n_test +
    classes): mistakes are counted over the (truth, prediction) pairs that occur, not in
    a classes x classes matrix.
    """
    n = np.bincount(truth, minlength=classes)
    hit = np.bincount(truth[pred == truth], minlength=classes)
    wrong = pred != truth
    pairs, counts = np.unique(truth[wrong] * classes + pred[wrong], return_counts=True)
    mistake: dict[int, tuple[int, int]] = {}
    for code, cnt in zip(pairs.tolist(), counts.tolist(), strict=True):
        t, p = divmod(code, classes)
        if t not in mistake or cnt > mistake[t][1]:  # pairs ascend: ties keep the smaller
            mistake[t] = (p, cnt)
    out = []
    for c in range(classes):
        m = mistake.get(c)
        out.append({"class": c, "name": names[c], "test_examples": int(n[c]),
                    "correct": int(hit[c]),
                    "accuracy": float(hit[c] / n[c] * 100) if n[c] else None,
                    "mistake": ({"label": m[0], "name": names[m[0]], "count": m[1]}
                                if m else None)})
    return out


def _classes_section(rows: list[dict], label: str, fig: str | None) -> str:
    def cells(r: dict) -> list:
        m = r["mistake"]
        return [r["name"] if r["name"] == f"class {r['class']}"
                else f"{r['name']} (class {r['class']})", r["test_examples"],
                _pct(r["accuracy"]), f"{m['name']} ({m['count']})" if m else "–"]

    head = ["class", "test examples", f"k-NN accuracy (%), {label}",
            "most frequent mistake (test examples)"]
    if len(rows) <= CLASS_ROWS:
        return _table(head, [cells(r) for r in rows], num=(1, 2))
    seen = [r for r in rows if r["accuracy"] is not None]
    acc = np.array([r["accuracy"] for r in seen])
    empty = len(rows) - len(seen)
    lowest = sorted(seen, key=lambda r: (r["accuracy"], -r["test_examples"], r["class"]))
    lowest = lowest[:CLASS_EXTREMES]
    text = (f"<p>{len(rows)} classes; {len(seen)} have test examples"
            + (f" ({empty} have none)" if empty else "") + ". Per-class k-NN accuracy: "
            + (f"mean {acc.mean():.2f}, median {np.median(acc):.2f}, lowest {acc.min():.2f}, "
               f"highest {acc.max():.2f}; {int((acc == 100).sum())} classes at 100%, "
               f"{int((acc == 0).sum())} at 0%." if acc.size else "–")
            + "</p>")
    return (text + (_img(fig, "per-class accuracy histogram") if fig else "")
            + f"<h3>The {len(lowest)} classes with the lowest accuracy</h3>"
            + _table(head, [cells(r) for r in lowest], num=(1, 2))
            + "<p class='note'>Every class's row is in <code>report.json</code> "
              "(<code>per_class</code>).</p>")


# ------------------------------------------------------------------------------ driver

def _class_names(labels_names, images: Images | None, classes: int) -> list[str]:
    """The labels' class names, else the images' (when they name ``classes``), else
    ``class 0`` .. ``class C-1``."""
    if labels_names and len(labels_names) == classes:
        return list(labels_names)
    if images is not None and len(images.class_names) == classes:
        return list(images.class_names)
    return list(default_class_names(classes))


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
    setting = make_setting(cfg.k, cfg.weighting, cfg.power, cfg.temperature)
    store = Store.open(cfg.store)
    s = store.shape
    labels = load_labels(cfg.labels, n_train=s.n_train, n_test=s.n_test, classes=s.classes,
                         download=False)
    curve = load_curve(cfg.curve) if cfg.curve else None
    inputs = open_inputs(cfg.store, cfg.kernel, labels)
    ev = evaluate_inputs(inputs, setting, select=True, train_kernel=cfg.train_kernel,
                         grid=Grid(), seed=cfg.seed, ablations_dir=cfg.ablations,
                         device=cfg.device, workers=cfg.workers,
                         show_progress=cfg.show_progress)
    images, images_note = load_images(cfg.images or labels.source)
    if images is not None and (len(images.train) != s.n_train or len(images.test) != s.n_test):
        images_note = (f"{images.source}: {len(images.train)} train / {len(images.test)} "
                       f"test images, the store has {s.n_train} / {s.n_test}; views are "
                       "tables")
        images = None
    names = _class_names(labels.class_names, images, s.classes)
    tmp = _temp_dir(cfg.out)
    try:
        html_text, data = _render(tmp, cfg, store, inputs, ev, curve, images, images_note,
                                  names, labels)
        (tmp / "index.html").write_text(html_text, encoding="utf-8")
        atomic_write_json(tmp / "report.json", data)
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


def _fig_classes(ev: Evaluation, rows: list[dict], path: Path) -> str | None:
    """Histogram of the per-class k-NN accuracies, for more than :data:`CLASS_ROWS`
    classes (below that the table shows every class)."""
    acc = np.array([r["accuracy"] for r in rows if r["accuracy"] is not None])
    if len(rows) <= CLASS_ROWS or not acc.size:
        return None
    return fig_class_hist(acc, [("all classes", ev.weighted_accuracy, BLUE)],
                          f"per-class test accuracy (%), k-NN with {ev.setting.label()}", path)


def _render(tmp: Path, cfg: ReportConfig, store: Store, inputs, ev: Evaluation,
            curve: Curve | None, images: Images | None, images_note: str,
            names: Sequence[str], labels) -> tuple[str, dict]:
    nb = ev.neighbours
    lab_tr, lab_te = labels.train, labels.test
    nn = cfg.neighbours
    sim = most_similar(nb, lab_tr, lab_te, cfg.threshold, top=cfg.examples, neighbours=nn)
    fail = failures(nb, lab_tr, lab_te, top=cfg.examples, neighbours=nn)
    rand = random_examples(nb, lab_tr, lab_te, count=cfg.examples, neighbours=nn,
                           seed=cfg.seed)
    classes = store.shape.classes
    by_class = per_class(predict(nb, lab_tr, ev.setting, classes), lab_te, classes, names)
    figs: dict[str, str | None] = {
        "per_run": fig_per_run(ev, tmp / "baselines-runs.png") if ev.per_run_accuracy
        else None,
        "runs": fig_runs(curve, tmp / "accuracy-vs-runs.png") if curve else None,
        "k": fig_k(ev, tmp / "accuracy-vs-k.png"),
        "ablation": _fig_ablation(ev, names, tmp / "ablation.png") if ev.ablations else None,
        "classes": _fig_classes(ev, by_class, tmp / "per-class.png"),
        "similar": fig_similar(nb.values[:, 0].astype(np.float64), cfg.threshold,
                               tmp / "most-similar.png"),
    }
    for key, view in (("similar_grid", sim["top"]), ("failures_grid", fail["top"]),
                      ("random_grid", rand["examples"])):
        figs[key] = (fig_grid(view, images, names, tmp / f"{key.replace('_', '-')}.png", nn)
                     if images is not None and view else None)

    attrs = inputs.kernel.attrs
    title = f"kernelscale report — {store.runs}-run ensemble"
    sections = []
    sections.append(("provenance", "Data provenance",
                     _provenance(store, ev.provenance, attrs, images_note)))
    rng = (min(ev.per_run_accuracy), max(ev.per_run_accuracy)) if ev.per_run_accuracy \
        else (None, None)
    base_rows = [
        ["average single model", _pct(ev.single_model_accuracy),
         f"mean over {ev.runs} runs (range {_pct(rng[0])}–{_pct(rng[1])})"],
        ["ensemble", _pct(ev.ensemble_accuracy), f"argmax of the mean logits of {ev.runs} runs"],
        [f"kernel {ev.k}-NN", _pct(ev.knn_accuracy),
         f"{ev.k} train examples with the largest kernel values, majority vote"],
    ]
    sections.append(("baselines", "Baselines",
                     _table(["classifier", "test accuracy (%)", "definition"], base_rows,
                            num=(1,))
                     + (_img(figs["per_run"], "per-run accuracies") if figs["per_run"] else "")))
    sections.append(("knn", "k-NN and weighted k-NN", _knn_section(ev)))
    sections.append(("runs", "Accuracy against the number of runs",
                     _runs_section(curve, figs["runs"])))
    sections.append(("k", "Accuracy against k",
                     _img(figs["k"], "accuracy against k")
                     + "<p class='note'>Test accuracy of the majority vote and of each "
                       "weighting at its best parameter (chosen with the test labels), "
                       "against the number of neighbours.</p>"))
    sections.append(("ablation", "Kernel ablations", _ablation_section(ev, figs["ablation"],
                                                                        names)))
    sections.append(("classes", "Per-class accuracy",
                     _classes_section(by_class, ev.setting.label(), figs["classes"])))
    thr_rows = [[f"> {t['threshold']:g}", t["count"], f"{t['fraction'] * 100:.2f}%"]
                for t in sim["by_threshold"]]
    same = sim["same_label_above"]
    interp = [
        "<p class='note'>" + _e(images_note) + "</p>",
        '<h3 id="similar">(a) Test examples by their most similar train example</h3>',
        f"<p><b>{sim['count_above']}</b> of {len(nb)} test examples "
        f"(<b>{sim['fraction_above'] * 100:.2f}%</b>) have a train example with kernel value "
        f"above {cfg.threshold:g}"
        + (f"; {same * 100:.1f}% of those share its label" if same is not None else "")
        + ". The examples at the top are candidate near-duplicates of train examples.</p>",
        _img(figs["similar"], "most similar train example"),
        _table(["most similar train example", "test examples", "fraction"], thr_rows,
               num=(1, 2)),
        "<p>The most similar pairs:</p>",
        _img(figs["similar_grid"], "most similar pairs") if figs["similar_grid"]
        else _neighbour_table(sim["top"], names, 1),
        '<h3 id="failures">(b) Failure modes: confident nearest neighbours of another '
        'label</h3>',
        f"<p>The nearest train example of <b>{fail['count']}</b> test examples "
        f"({fail['fraction'] * 100:.2f}%) carries another label. The most similar of those "
        "(neighbours of another label in red):</p>",
        _img(figs["failures_grid"], "failure modes") if figs["failures_grid"]
        else _neighbour_table(fail["top"], names, nn),
        "<p>Most frequent confusions (label of the test example → label of its nearest "
        "train example):</p>",
        _table(["test label", "nearest neighbour's label", "test examples"],
               [[names[c["label"]], names[c["neighbour_label"]], c["count"]]
                for c in fail["confused"]], num=(2,)),
        f'<h3 id="random">(c) Random test examples (seed {rand["seed"]}) and their nearest '
        'train examples</h3>',
        _img(figs["random_grid"], "random examples") if figs["random_grid"]
        else _neighbour_table(rand["examples"], names, nn),
    ]
    sections.append(("interpretability", "Interpretability", "".join(interp)))

    nav = "".join(f'<a href="#{sid}">{_e(t)}</a>' for sid, t, _ in sections)
    body = "".join(f'<section id="{sid}"><h2>{_e(t)}</h2>{content}</section>'
                   for sid, t, content in sections)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    doc = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
           f'<meta name="viewport" content="width=device-width,initial-scale=1">'
           f"<title>{_e(title)}</title><style>{CSS}</style></head><body><main>"
           f"<h1>{_e(title)}</h1><p class='meta'>written {stamp} by kernelscale "
           f"{_e(__version__)}</p><nav>{nav}</nav>{body}</main></body></html>\n")
    evaluation = ev.as_json()
    provenance = evaluation.pop("provenance")  # once, for the whole report
    data = round_floats({
        "provenance": provenance, "evaluation": evaluation, "most_similar": sim,
        "failures": fail, "random": rand, "curve": curve.as_json() if curve else None,
        "figures": {k: v for k, v in figs.items() if v}, "images": images_note,
        "class_names": list(names),
        "per_class": {"setting": ev.setting.as_json(), "classes": by_class}})
    return doc, data
