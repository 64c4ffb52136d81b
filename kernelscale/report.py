"""One self-contained HTML report of a kernel: provenance, accuracies, plots, views.

``OUT/index.html`` (inline CSS, no scripts, no external assets) links PNG figures beside
it by relative paths; ``OUT/report.json`` holds every number shown. The report is written
into a temporary directory beside ``OUT`` and renamed into place, so ``OUT`` holds either
the previous report or the new one, complete.

Sections (each an ``<section id=...>``): ``provenance`` (store manifest, kernel identity,
labels), ``baselines``, ``knn`` (majority vote, weighted, selected, oracle), ``runs``
(accuracy against the number of runs, from a curve of ``kernelscale curve``), ``k``
(accuracy against k), ``ablation`` (per-class and no-log-softmax kernels),
``interpretability`` (most similar train examples, failure modes, random examples; image
grids when the images are available, tables otherwise).
"""

from __future__ import annotations

import html
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import __version__
from .atomic import atomic_write_json, fsync_dir
from .curve import load_curve
from .errors import KernelscaleError
from .evaluate import (
    Evaluation,
    Grid,
    Neighbours,
    ablation_kernels,
    evaluate_neighbours,
    make_setting,
    prepare,
    top_neighbours,
)
from .interpret import Images, failures, load_images, most_similar, random_examples
from .sources import load_labels
from .store import Store

#: colours of the plots (colour-blind safe: Okabe-Ito).
ORANGE, BLUE, GREEN, RED, GREY, PURPLE = ("#E69F00", "#0072B2", "#009E73", "#D55E00",
                                          "#7f7f7f", "#CC79A7")


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


# ----------------------------------------------------------------------------- figures

def _figure(w: float, h: float):  # noqa: ANN202
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> str:  # noqa: ANN001
    fig.savefig(path, format="png", dpi=110)
    return path.name


def _style(ax) -> None:  # noqa: ANN001
    ax.grid(True, color="#dddddd", linewidth=0.6)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _legend_above(ax, ncols: int = 2) -> None:  # noqa: ANN001
    ax.legend(fontsize=8, loc="lower left", bbox_to_anchor=(0.0, 1.01), ncols=ncols,
              frameon=False, borderaxespad=0.2)


def fig_runs(curve: dict, path: Path) -> str:
    pts = curve["points"]
    n = [p["runs"] for p in pts]
    fig = _figure(7.5, 4.2)
    ax = fig.add_subplot()
    k = curve["k"]
    ax.plot(n, [p["ensemble_accuracy"] for p in pts], "o-", color=ORANGE,
            label="ensemble (mean logits)")
    ax.plot(n, [p["knn_accuracy"] for p in pts], "s-", color=BLUE,
            label=f"kernel {k}-NN (majority vote)")
    ax.plot(n, [p["selected"]["accuracy"] for p in pts], "^--", color=GREEN,
            label="kernel k-NN, setting selected by cross-fitting")
    ax.plot(n, [p["single_model_accuracy"] for p in pts], ".:", color=GREY,
            label="average single model")
    c = curve.get("crossover")
    if c is not None:
        ax.axvline(c, color=RED, linestyle="--", linewidth=1)
        ax.annotate(f"crossover: {c} runs", (c, 0.04), xycoords=("data", "axes fraction"),
                    xytext=(5, 0), textcoords="offset points", color=RED, fontsize=9,
                    backgroundcolor="white")
    ax.set_xscale("log")
    ax.set_xticks(n, [str(x) for x in n])
    ax.minorticks_off()
    ax.set_xlabel("number of runs in the ensemble (log scale)")
    ax.set_ylabel("test accuracy (%)")
    _style(ax)
    _legend_above(ax)
    return _save(fig, path)


def fig_k(ev: Evaluation, path: Path) -> str:
    abk = ev.accuracy_by_k
    fig = _figure(7.5, 4.2)
    ax = fig.add_subplot()
    colours = {"none": BLUE, "power": GREEN, "softmax": PURPLE}
    for w, c in abk["curves"].items():
        lab = c["label"] + ("" if w == "none" else " (parameter chosen on test)")
        ax.plot(abk["ks"], c["accuracy"], "o-", markersize=3.5, color=colours[w], label=lab)
    ax.axhline(ev.ensemble_accuracy, color=ORANGE, linestyle="--", linewidth=1,
               label=f"ensemble ({ev.runs} runs)")
    sel = ev.selection
    if sel and sel["method"] == "leave-one-out":
        s = sel["setting"]
        ax.plot([s["k"]], [sel["accuracy"]], "*", color=RED, markersize=13,
                label=f"selected by leave-one-out: {s['label']}")
    ax.set_xscale("log")
    ax.set_xticks(abk["ks"], [str(x) for x in abk["ks"]], fontsize=8)
    ax.minorticks_off()
    ax.set_xlabel("k (neighbours, log scale)")
    ax.set_ylabel("test accuracy (%)")
    _style(ax)
    _legend_above(ax)
    return _save(fig, path)


def fig_ablation(ev: Evaluation, names: Sequence[str], path: Path) -> str:
    rows = ev.ablations or []
    labels = ["all classes (summed kernel)"]
    vals = [ev.weighted_accuracy]
    for a in rows:
        if a["class"] is not None:
            labels.append(f"{names[a['class']]} only")
        else:
            labels.append("no log-softmax (raw logits)")
        vals.append(a["accuracy"])
    fig = _figure(7.5, 1.2 + 0.3 * len(labels))
    ax = fig.add_subplot()
    y = np.arange(len(labels))[::-1]
    colours = [BLUE] + [GREY if a["class"] is not None else PURPLE for a in rows]
    ax.barh(y, vals, color=colours, height=0.7)
    for yi, v in zip(y, vals, strict=True):
        ax.text(v + 0.3, yi, f"{v:.2f}", va="center", fontsize=8)
    ax.axvline(ev.ensemble_accuracy, color=ORANGE, linestyle="--", linewidth=1,
               label=f"ensemble {ev.ensemble_accuracy:.2f}")
    ax.set_yticks(y, labels, fontsize=8)
    lo = max(0.0, min(vals + [ev.ensemble_accuracy]) - 5)
    ax.set_xlim(lo, min(100.0, max(vals + [ev.ensemble_accuracy]) + 4))
    ax.set_xlabel(f"test accuracy (%), k-NN with {ev.setting['label']}")
    _style(ax)
    _legend_above(ax)
    return _save(fig, path)


def fig_similar(best: np.ndarray, threshold: float, path: Path) -> str:
    fig = _figure(7.5, 3.4)
    ax = fig.add_subplot()
    ax.hist(best, bins=80, color=BLUE, alpha=0.85)
    ax.axvline(threshold, color=RED, linestyle="--", linewidth=1)
    frac = float((best > threshold).mean() * 100)
    ax.annotate(f"{frac:.1f}% above {threshold:g}", (threshold, 0.92),
                xycoords=("data", "axes fraction"), xytext=(5, 0), textcoords="offset points",
                color=RED, fontsize=9)
    ax.set_yscale("log")
    ax.set_xlabel("kernel value of the most similar train example")
    ax.set_ylabel("test examples")
    _style(ax)
    return _save(fig, path)


def fig_per_run(ev: Evaluation, path: Path) -> str:
    fig = _figure(7.5, 3.0)
    ax = fig.add_subplot()
    acc = np.asarray(ev.per_run_accuracy)
    ax.hist(acc, bins=min(40, max(5, acc.size // 5)), color=GREY, alpha=0.9,
            label=f"single runs (mean {acc.mean():.2f})")
    ax.axvline(ev.ensemble_accuracy, color=ORANGE, linewidth=2,
               label=f"ensemble {ev.ensemble_accuracy:.2f}")
    ax.axvline(ev.knn_accuracy, color=BLUE, linewidth=2,
               label=f"kernel {ev.k}-NN {ev.knn_accuracy:.2f}")
    ax.set_xlabel("test accuracy (%)")
    ax.set_ylabel("runs")
    _style(ax)
    ax.legend(fontsize=8, loc="best", frameon=False)
    return _save(fig, path)


def fig_grid(entries: Sequence[dict], images: Images, names: Sequence[str], path: Path,
             neighbours: int) -> str:
    """One row per test example: its image, then its nearest train images."""
    cols = 1 + max(1, min(neighbours, max(len(e["neighbours"]) for e in entries)))
    rows = len(entries)
    fig = _figure(1.45 * cols, 1.6 * rows)
    for r, e in enumerate(entries):
        ax = fig.add_subplot(rows, cols, r * cols + 1)
        ax.imshow(images.test[e["test"]], interpolation="nearest")
        ax.set_title(f"test {e['test']}\n{names[e['label']]}", fontsize=8, fontweight="bold")
        _frame(ax, "#333333", 2.5)
        for j, nbr in enumerate(e["neighbours"][:cols - 1]):
            ax = fig.add_subplot(rows, cols, r * cols + j + 2)
            ax.imshow(images.train[nbr["train"]], interpolation="nearest")
            ok = nbr["label"] == e["label"]
            ax.set_title(f"{names[nbr['label']]}  K={nbr['value']:.3f}\ntrain {nbr['train']}",
                         fontsize=7.5, color="#1a1a1a" if ok else RED)
            _frame(ax, GREEN if ok else RED, 2.0)
    return _save(fig, path)


def _frame(ax, colour: str, width: float) -> None:  # noqa: ANN001
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_edgecolor(colour)
        s.set_linewidth(width)


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


def _e(x) -> str:  # noqa: ANN001
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


def _provenance(store: Store, cfg: ReportConfig, ident: dict, attrs: dict, labels_src: str,
                images_note: str) -> str:
    m = store.manifest
    s = store.shape
    parts = ["<table><tbody>"]
    for k, v in [
        ("store", _Raw(f'<span class="mono">{_e(Path(cfg.store).resolve())}</span>')),
        ("store fingerprint", _Raw(f'<span class="mono">{_e(store.fingerprint())}</span>')),
        ("runs", m["runs"]),
        ("examples", f"{s.n_test} test, {s.n_train} train, {s.classes} classes ({s.dtype})"),
        ("kernel", _Raw(f'<span class="mono">{_e(Path(cfg.kernel).resolve())}</span>')),
        ("kernel inputs", f"{ident.get('pairs')}, runs {ident.get('runs')}, precision "
                          f"{ident.get('precision')}, log-softmax {ident.get('log_softmax')}, "
                          f"classes {ident.get('classes') or 'all'}"),
        ("zero-variance entries", ", ".join(f"{a} {b}" for a, b in
                                            sorted(attrs.get("zero_variance", {}).items()))
         or "–"),
        ("labels", labels_src),
        ("images", images_note),
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
             f"{f['run_start']}–{f['run_stop']}", f"{f['size'] / 1e6:.1f} MB",
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
    if ev.setting and ev.setting["weighting"] != "none":
        rows.append([ev.setting["label"], _pct(ev.weighted_accuracy),
                     _Raw('as requested <span class="tag">fixed</span>')])
    sel = ev.selection
    if sel:
        if sel["method"] == "leave-one-out":
            how = (f"leave-one-out k-NN on the train × train kernel (own column excluded): "
                   f"{sel['selection_accuracy']:.2f}% on {sel['selection_rows']} train "
                   "examples; then scored on test")
            label = sel["setting"]["label"]
        else:
            folds = sel["folds"]
            label = " / ".join(f["setting"]["label"] for f in folds)
            how = ("cross-fitting: the setting chosen on one random half of the test set "
                   "scores the other half, and the other way round; "
                   + "; ".join(f"half {i + 1} → {f['accuracy']:.2f}% "
                               f"({f['scored_on_rows']} examples)"
                               for i, f in enumerate(folds)))
        hl.append(len(rows))
        rows.append([label, _pct(sel["accuracy"]),
                     _Raw(f'{_e(how)} <span class="tag honest">honest</span>')])
    cf = ev.crossfit
    if cf and sel and sel["method"] != "cross-fit":
        folds = cf["folds"]
        how = ("cross-fitting over two random halves of the test set (each half scored "
               "with the setting chosen on the other)")
        rows.append([" / ".join(f["setting"]["label"] for f in folds), _pct(cf["accuracy"]),
                     _Raw(f'{_e(how)} <span class="tag honest">honest</span>')])
    if ev.oracle:
        rows.append([ev.oracle["setting"]["label"], _pct(ev.oracle["accuracy"]),
                     _Raw('best of the grid on the test labels — optimistic, what tuning on '
                          'the test set reports <span class="tag oracle">oracle</span>')])
    out = [_table(["setting", "test accuracy (%)", "how the setting was chosen"], rows,
                  num=(1,), highlight=hl, cls="knn")]
    if sel and sel["method"] == "leave-one-out" and sel["selection_accuracy"] >= 99.0:
        out.append(f"<p class='warn'>Leave-one-out accuracy on the train set is "
                   f"{sel['selection_accuracy']:.2f}%: the train examples' outputs carry "
                   "their own labels (they were trained on), so the train × train kernel "
                   "tells the settings apart poorly. The cross-fitted accuracy, chosen on "
                   "test examples but never scored on the ones it was chosen on, is the "
                   "better guide here.</p>")
    if ev.families:
        out.append("<h3>Best k of each weighting <span class='tag oracle'>oracle</span></h3>"
                   "<p class='note'>Weight of a neighbour with kernel value K: majority vote "
                   "1; power max(K, 0)<sup>p</sup>; softmax exp(K/T). The best k of each "
                   "row is chosen with the test labels.</p><div class='row'>")
        top = max(f["accuracy"] for f in ev.families)
        for w, title, par in (("none", "majority vote", None), ("power", "power", "p"),
                              ("softmax", "softmax", "T")):
            fam = [f for f in ev.families if f["weighting"] == w]
            if not fam:
                continue
            head = ([par] if par else []) + ["best k", "accuracy"]
            frows = [([f"{f['param']:g}"] if par else []) + [f["setting"]["k"],
                                                             _pct(f["accuracy"])]
                     for f in fam]
            hl = [i for i, f in enumerate(fam) if f["accuracy"] == top]
            out.append(f"<div><h4>{_e(title)}</h4>"
                       + _table(head, frows, num=range(len(head)), highlight=hl) + "</div>")
        out.append("</div>")
    return "".join(out)


def _runs_section(curve: dict | None, fig: str | None) -> str:
    if not curve:
        return ("<p class='note'>No curve given: run <code>kernelscale curve --store STORE "
                "--labels LABELS --runs 10,20,50,...</code> and pass its "
                "<code>curve.json</code> with <code>--curve</code>.</p>")
    c = curve.get("crossover")
    k = curve["k"]
    lead = (f"<p>The kernel {k}-NN is ahead of the ensemble from <b>{c} runs</b> on "
            "(first run count from which it stays ahead at every larger count measured)."
            "</p>" if c is not None else
            f"<p>The kernel {k}-NN is <b>not</b> ahead of the ensemble at the largest run "
            "count measured.</p>")
    rows = [[p["runs"], _pct(p["single_model_accuracy"]), _pct(p["ensemble_accuracy"]),
             _pct(p["knn_accuracy"]), _pct(p["selected"]["accuracy"]),
             _pct(p["oracle"]["accuracy"])] for p in curve["points"]]
    hl = [i for i, p in enumerate(curve["points"]) if p["runs"] == c]
    return (lead + _img(fig, "accuracy against the number of runs")
            + _table(["runs", "single model", "ensemble", f"{k}-NN", "selected (cross-fit)",
                      "oracle"], rows, num=range(6), highlight=hl)
            + "<p class='note'>Each point uses the first n runs of the store, standardised "
              "with the statistics of those n runs. \"selected\" is honest (cross-fitting "
              "over test halves); \"oracle\" chooses with the test labels.</p>")


def _ablation_section(ev: Evaluation, fig: str | None, names: Sequence[str]) -> str:
    if not ev.ablations:
        return ("<p class='note'>No ablations computed: pass <code>--ablations DIR</code> "
                "to compute the kernel of each class alone and of raw logits (one kernel "
                "each, computed with the kernel engine and kept in DIR).</p>")
    rows = [["all classes (summed kernel)", _pct(ev.weighted_accuracy),
             _pct(ev.oracle["accuracy"]), ev.oracle["setting"]["label"]]]
    for a in ev.ablations:
        what = (f"class {a['class']} only" + (f" ({names[a['class']]})"
                                              if names[a["class"]] != f"class {a['class']}"
                                              else "")
                if a["class"] is not None else "no log-softmax (raw logits)")
        rows.append([what, _pct(a["accuracy"]), _pct(a["oracle"]["accuracy"]),
                     a["oracle"]["setting"]["label"]])
    return (_img(fig, "ablation accuracies")
            + _table(["kernel", f"k-NN ({ev.setting['label']})", "best (oracle)",
                      "best setting"], rows, num=(1, 2), highlight=(0,))
            + "<p class='note'>The summed kernel is the mean of the per-class kernels. "
              "\"best\" is chosen with the test labels.</p>")


def _view(title_id: str, title: str, intro: str, entries: Sequence[dict],
          names: Sequence[str], fig: str | None, n: int) -> str:
    body = (_img(fig, title) if fig else _neighbour_table(entries, names, n))
    return f'<h3 id="{title_id}">{_e(title)}</h3><p>{intro}</p>{body}'


# ------------------------------------------------------------------------------ driver

def _class_names(labels_names, images: Images | None, classes: int) -> list[str]:  # noqa: ANN001
    if labels_names and len(labels_names) >= classes:
        return list(labels_names)
    if images is not None and len(images.class_names) >= classes:
        return list(images.class_names)
    return [f"class {c}" for c in range(classes)]


def _prepare_out(out: Path) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ReportError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "report.json").exists():
        raise ReportError(f"{out}: exists and is not a kernelscale report; choose another "
                          "--out")
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))


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
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build_report(cfg: ReportConfig) -> Path:
    """Evaluate, render and publish the report ``cfg`` describes; returns ``index.html``."""
    setting = make_setting(cfg.k, cfg.weighting, cfg.power, cfg.temperature)
    store = Store.open(cfg.store)
    s = store.shape
    labels = load_labels(cfg.labels, n_train=s.n_train, n_test=s.n_test, classes=s.classes,
                         download=False)
    curve = load_curve(cfg.curve) if cfg.curve else None
    inputs = prepare(cfg.store, cfg.kernel, labels)
    grid = Grid()
    nb = top_neighbours(inputs.kernel.array, max(cfg.k, max(grid.ks)), workers=cfg.workers,
                        show_progress=cfg.show_progress)
    abl = []
    if cfg.ablations is not None:
        abl = ablation_kernels(inputs, cfg.ablations, device=cfg.device,
                               show_progress=cfg.show_progress)
    ev = evaluate_neighbours(inputs, nb, setting, select=True, train_kernel=cfg.train_kernel,
                             grid=grid, seed=cfg.seed, ablations=abl, workers=cfg.workers,
                             show_progress=cfg.show_progress)
    images, images_note = load_images(cfg.images or labels.source)
    if images is not None and (len(images.train) != s.n_train or len(images.test) != s.n_test):
        images_note = (f"{images.source}: {len(images.train)} train / {len(images.test)} "
                       f"test images, the store has {s.n_train} / {s.n_test}; views are "
                       "tables")
        images = None
    names = _class_names(labels.class_names, images, s.classes)
    tmp = _prepare_out(cfg.out)
    try:
        html_text, data = _render(tmp, cfg, store, inputs, ev, nb, curve, images, images_note,
                                  names, labels)
        (tmp / "index.html").write_text(html_text, encoding="utf-8")
        atomic_write_json(tmp / "report.json", data)
        _publish(tmp, Path(cfg.out))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Path(cfg.out) / "index.html"


def _render(tmp: Path, cfg: ReportConfig, store: Store, inputs, ev: Evaluation,  # noqa: ANN001
            nb: Neighbours, curve: dict | None, images: Images | None, images_note: str,
            names: Sequence[str], labels) -> tuple[str, dict]:  # noqa: ANN001
    lab_tr, lab_te = labels.train, labels.test
    nn = cfg.neighbours
    sim = most_similar(nb, lab_tr, lab_te, cfg.threshold, top=cfg.examples, neighbours=nn)
    fail = failures(nb, lab_tr, lab_te, top=cfg.examples, neighbours=nn)
    rand = random_examples(nb, lab_tr, lab_te, count=cfg.examples, neighbours=nn,
                           seed=cfg.seed)
    figs: dict[str, str | None] = {
        "per_run": fig_per_run(ev, tmp / "baselines-runs.png") if ev.per_run_accuracy
        else None,
        "runs": fig_runs(curve, tmp / "accuracy-vs-runs.png") if curve else None,
        "k": fig_k(ev, tmp / "accuracy-vs-k.png"),
        "ablation": fig_ablation(ev, names, tmp / "ablation.png") if ev.ablations else None,
        "similar": fig_similar(nb.values[:, 0].astype(np.float64), cfg.threshold,
                               tmp / "most-similar.png"),
    }
    for key, view in (("similar_grid", sim["top"]), ("failures_grid", fail["top"]),
                      ("random_grid", rand["examples"])):
        figs[key] = (fig_grid(view, images, names, tmp / f"{key.replace('_', '-')}.png", nn)
                     if images is not None and view else None)

    ident = inputs.identity
    attrs = inputs.kernel.attrs
    title = f"kernelscale report — {store.runs}-run ensemble"
    sections = []
    sections.append(("provenance", "Data provenance",
                     _provenance(store, cfg, ident, attrs, labels.source, images_note)))
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
    data = {"evaluation": ev.as_json(), "most_similar": sim, "failures": fail,
            "random": rand, "curve": curve, "figures": {k: v for k, v in figs.items() if v},
            "images": images_note, "class_names": list(names),
            "store": str(Path(cfg.store).resolve()), "kernel": str(Path(cfg.kernel).resolve()),
            "labels": labels.source}
    return doc, data
