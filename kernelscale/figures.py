"""The report's figures: matplotlib (Agg, no display), one PNG per function.

Each ``fig_*`` draws one figure from typed results (:class:`~kernelscale.evaluation.Evaluation`,
:class:`~kernelscale.curve.Curve`, the views of :mod:`kernelscale.interpret`) and saves it
to ``path``, returning the file name the HTML links to. Colours are colour-blind safe
(Okabe-Ito).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .curve import Curve
    from .evaluation import Evaluation
    from .interpret import Images

#: colours of the plots (colour-blind safe: Okabe-Ito).
ORANGE, BLUE, GREEN, RED, GREY, PURPLE = ("#E69F00", "#0072B2", "#009E73", "#D55E00",
                                          "#7f7f7f", "#CC79A7")


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> str:
    fig.savefig(path, format="png", dpi=110)
    return path.name


def _style(ax) -> None:
    ax.grid(True, color="#dddddd", linewidth=0.6)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _legend_above(ax, ncols: int = 2) -> None:
    ax.legend(fontsize=8, loc="lower left", bbox_to_anchor=(0.0, 1.01), ncols=ncols,
              frameon=False, borderaxespad=0.2)


def fig_runs(curve: Curve, path: Path) -> str:
    """Ensemble, kernel k-NN (fixed and selected) and single-model accuracy against runs."""
    pts = curve.points
    n = [p.runs for p in pts]
    fig = _figure(7.5, 4.2)
    ax = fig.add_subplot()
    k = curve.k
    ax.plot(n, [p.ensemble_accuracy for p in pts], "o-", color=ORANGE,
            label="ensemble (mean logits)")
    ax.plot(n, [p.knn_accuracy for p in pts], "s-", color=BLUE,
            label=f"kernel {k}-NN (majority vote)")
    ax.plot(n, [p.selected.accuracy for p in pts], "^--", color=GREEN,
            label="kernel k-NN, setting selected by cross-fitting")
    ax.plot(n, [p.single_model_accuracy for p in pts], ".:", color=GREY,
            label="average single model")
    c = curve.crossover
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
    """Test accuracy against k of each weighting; the leave-one-out choice starred."""
    abk = ev.accuracy_by_k
    fig = _figure(7.5, 4.2)
    ax = fig.add_subplot()
    colours = {"none": BLUE, "power": GREEN, "softmax": PURPLE}
    for w, c in abk.curves.items():
        lab = c.label + ("" if w == "none" else " (parameter chosen on test)")
        ax.plot(abk.ks, c.accuracy, "o-", markersize=3.5, color=colours[w], label=lab)
    ax.axhline(ev.ensemble_accuracy, color=ORANGE, linestyle="--", linewidth=1,
               label=f"ensemble ({ev.runs} runs)")
    sel = ev.selection
    if sel and sel.method == "leave-one-out":
        s = sel.setting
        ax.plot([s.k], [sel.accuracy], "*", color=RED, markersize=13,
                label=f"selected by leave-one-out: {s.label()}")
    ax.set_xscale("log")
    ax.set_xticks(abk.ks, [str(x) for x in abk.ks], fontsize=8)
    ax.minorticks_off()
    ax.set_xlabel("k (neighbours, log scale)")
    ax.set_ylabel("test accuracy (%)")
    _style(ax)
    _legend_above(ax)
    return _save(fig, path)


def fig_ablation(ev: Evaluation, names: Sequence[str], path: Path) -> str:
    """k-NN accuracy of the summed kernel and of each ablation kernel, as bars."""
    rows = ev.ablations or []
    labels = ["all classes (summed kernel)"]
    vals = [ev.weighted_accuracy]
    for a in rows:
        if a.class_index is not None:
            labels.append(f"{names[a.class_index]} only")
        else:
            labels.append("no log-softmax (raw logits)")
        vals.append(a.accuracy)
    fig = _figure(7.5, 1.2 + 0.3 * len(labels))
    ax = fig.add_subplot()
    y = np.arange(len(labels))[::-1]
    colours = [BLUE] + [GREY if a.class_index is not None else PURPLE for a in rows]
    ax.barh(y, vals, color=colours, height=0.7)
    for yi, v in zip(y, vals, strict=True):
        ax.text(v + 0.3, yi, f"{v:.2f}", va="center", fontsize=8)
    ax.axvline(ev.ensemble_accuracy, color=ORANGE, linestyle="--", linewidth=1,
               label=f"ensemble {ev.ensemble_accuracy:.2f}")
    ax.set_yticks(y, labels, fontsize=8)
    lo = max(0.0, min(vals + [ev.ensemble_accuracy]) - 5)
    ax.set_xlim(lo, min(100.0, max(vals + [ev.ensemble_accuracy]) + 4))
    ax.set_xlabel(f"test accuracy (%), k-NN with {ev.setting.label()}")
    _style(ax)
    _legend_above(ax)
    return _save(fig, path)


def fig_class_hist(acc: np.ndarray, lines: Sequence[tuple[str, float, str]], xlabel: str,
                   path: Path, other: tuple[str, np.ndarray] | None = None) -> str:
    """Histogram of per-class accuracies ``acc`` float64 (classes,), percent, one bar per
    2.5 points; ``lines``: (label, accuracy, colour) reference lines; ``other``: (label,
    accuracies float64 (classes,)) of a second classifier, drawn as an outline. For class
    counts too large for one bar or row per class."""
    fig = _figure(7.5, 3.4)
    ax = fig.add_subplot()
    bins = np.linspace(0.0, 100.0, 41)
    ax.hist(acc, bins=bins, color=GREY, alpha=0.9,
            label=f"{acc.size} classes (mean {acc.mean():.2f})")
    if other is not None and other[1].size:
        ax.hist(other[1], bins=bins, histtype="step", color=ORANGE, linewidth=1.8,
                label=f"{other[0]} (mean {other[1].mean():.2f})")
    for label, x, colour in lines:
        ax.axvline(x, color=colour, linestyle="--", linewidth=1.2, label=f"{label} {x:.2f}")
    ax.set_xlim(0.0, 100.0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("classes")
    _style(ax)
    _legend_above(ax)
    return _save(fig, path)


def fig_similar(best: np.ndarray, threshold: float, path: Path) -> str:
    """Histogram of each test example's largest kernel value, the threshold marked."""
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
    """Histogram of the single runs' accuracies beside the ensemble's and the k-NN's."""
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


def fig_confusion(m: np.ndarray, names: Sequence[str], title: str, path: Path) -> str:
    """A confusion matrix ``m`` int64 (C, C) (rows: true label, columns: predicted) as a
    heatmap: colour the share of the row's test examples, every nonzero count written in
    its cell. For up to about 20 classes."""
    from matplotlib.colors import LinearSegmentedColormap

    c = len(names)
    cmap = LinearSegmentedColormap.from_list("kernelscale", ["#ffffff", BLUE])
    side = 2.6 + 0.22 * c
    fig = _figure(side + 2.4, side)
    ax = fig.add_subplot()
    share = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    im = ax.imshow(share, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
    for (i, j), v in np.ndenumerate(m):
        if v:
            ax.text(j, i, str(v), ha="center", va="center", fontsize=7 if c > 12 else 8.5,
                    color="white" if share[i, j] > 0.55 else "#1a1a1a")
    ticks = [f"{n[:16]} ({i})" if n != f"class {i}" else str(i) for i, n in enumerate(names)]
    ax.set_xticks(range(c), [str(i) for i in range(c)], fontsize=8)
    ax.set_yticks(range(c), ticks, fontsize=8)
    ax.set_xlabel("predicted label (class index)")
    ax.set_ylabel("true label")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.8, label="share of the true label's examples")
    return _save(fig, path)


def fig_kernel_values(panels: Sequence[tuple[str, np.ndarray, np.ndarray]],
                      path: Path) -> str:
    """Histograms (densities) of kernel values of same-label and different-label pairs,
    one panel per (title, same float (a,), different float (b,)) of ``panels``; each
    group's count and median in the legend. The x range is the 0.5-99.5 % quantile range
    of the panel's values; the values outside it are counted in the axis label."""
    fig = _figure(3.9 * len(panels) + 0.3, 3.4)
    for p, (title, same, diff) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), p + 1)
        both = np.concatenate([same, diff]).astype(np.float64)
        # the bulk of the values: a few near-duplicates would squeeze it into a few bins
        lo, hi = (np.quantile(both, [0.005, 0.995]) if both.size else (0.0, 1.0))
        lo, hi = float(lo), float(hi) if hi > lo else float(lo) + 1e-6
        bins = np.linspace(lo, hi, 61)
        out = int(((both < lo) | (both > hi)).sum())
        for vals, colour, what, kind in ((same, GREEN, "same label", "stepfilled"),
                                         (diff, RED, "different label", "step")):
            if vals.size:
                ax.hist(vals, bins=bins, density=True, color=colour, histtype=kind,
                        alpha=0.55 if kind == "stepfilled" else 1.0, linewidth=1.6,
                        label=f"{what}: {vals.size} (median {np.median(vals):.3f})")
        ax.set_xlim(lo, hi)
        ax.set_xlabel("kernel value" + (f" ({out} values outside the range drawn)"
                                         if out else ""), fontsize=8 if out else None)
        ax.set_ylabel("density")
        _style(ax)
        ax.legend(fontsize=7.5, title=title, title_fontsize=8.5, loc="lower left",
                  bbox_to_anchor=(0.0, 1.01), frameon=False, borderaxespad=0.2,
                  alignment="left")
    return _save(fig, path)


def _blocks(lab: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Of sorted labels int (n,): the edges between label blocks (n_blocks - 1,), the
    blocks' centres (n_blocks,) and labels, in axis coordinates."""
    if not lab.size:
        return np.zeros(0), np.zeros(0), []
    change = np.flatnonzero(np.diff(lab)) + 1
    starts = np.concatenate([[0], change])
    ends = np.concatenate([change, [lab.size]])
    return change - 0.5, (starts + ends - 1) / 2, [int(x) for x in lab[starts]]


def fig_heatmap(values: np.ndarray, row_labels: np.ndarray, col_labels: np.ndarray,
                names: Sequence[str], path: Path) -> str:
    """Kernel entries ``values`` float32 (r, m) of test rows and train columns sorted by
    label (``row_labels`` int (r,), ``col_labels`` int (m,)): a diverging colour map
    centred on 0, the class blocks outlined and named."""
    fig = _figure(7.5, 5.6)
    ax = fig.add_subplot()
    v = values.astype(np.float64)
    lim = float(np.quantile(np.abs(v), 0.99)) if v.size else 0.0
    lim = lim if lim > 0 else 1.0
    im = ax.imshow(v, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto",
                   interpolation="nearest")
    r_edges, r_mid, r_cls = _blocks(np.asarray(row_labels))
    c_edges, c_mid, c_cls = _blocks(np.asarray(col_labels))
    for x in c_edges:
        ax.axvline(x, color="#333333", linewidth=0.5)
    for y in r_edges:
        ax.axhline(y, color="#333333", linewidth=0.5)
    few = len(r_cls) <= 20
    ax.set_yticks(r_mid, [names[c][:16] for c in r_cls] if few else [], fontsize=7)
    ax.set_xticks(c_mid, [str(c) for c in c_cls] if few else [], fontsize=7)
    ax.set_xlabel(f"{v.shape[1]} train examples, sorted by label (class index)")
    ax.set_ylabel(f"{v.shape[0]} test examples, sorted by label")
    fig.colorbar(im, ax=ax, shrink=0.8, label="kernel value")
    return _save(fig, path)


def fig_grid(entries: Sequence[dict], images: Images, names: Sequence[str], path: Path,
             neighbours: int) -> str:
    """One row per test example: its image, then its nearest train images, each marked
    ✓ (green frame) when it shares the test example's label and ✗ (red) when not."""
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
            ax.set_title(f"{'✓' if ok else '✗'} {names[nbr['label']]}  K={nbr['value']:.3f}"
                         f"\ntrain {nbr['train']}", fontsize=7.5,
                         color="#1a1a1a" if ok else RED)
            _frame(ax, GREEN if ok else RED, 2.0)
    return _save(fig, path)


def _frame(ax, colour: str, width: float) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_edgecolor(colour)
        s.set_linewidth(width)


def fig_compare(jaccard: np.ndarray, k: int, overlap: Sequence[tuple[int, float]],
                knn: tuple[Sequence[int], Sequence[float], Sequence[float], float] | None,
                path: Path) -> str:
    """Two kernels compared (``kernelscale compare``): a histogram of the per-row Jaccard
    index ``jaccard`` float64 (rows,) of the top-``k`` sets; the mean Jaccard against k
    (``overlap``: (k, mean) pairs); with labels, ``knn`` = (ks, accuracies of A, of B,
    agreement percent at ``k``) as accuracy against k. Written atomically."""
    from .atomic import atomic_open

    panels = 3 if knn is not None else 2
    fig = _figure(3.6 * panels, 3.4)
    ax = fig.add_subplot(1, panels, 1)
    # the index takes only the values i / (2k - i): one bar per value taken
    vals, counts = np.unique(np.round(jaccard, 9), return_counts=True)
    ax.bar(vals, counts, width=0.6 / (2 * k), color=BLUE, alpha=0.9)
    mean = float(np.mean(jaccard)) if jaccard.size else float("nan")
    ax.axvline(mean, color=RED, linestyle="--", linewidth=1.2, label=f"mean {mean:.3f}")
    ax.set_xlim(-0.02, 1.02)
    ax.set_xlabel(f"Jaccard index of the two top-{k} sets")
    ax.set_ylabel("rows")
    _style(ax)
    _legend_above(ax, ncols=1)
    ax = fig.add_subplot(1, panels, 2)
    ks = [x for x, _ in overlap]
    ax.plot(ks, [j for _, j in overlap], "o-", color=BLUE)
    ax.set_xscale("log")
    ax.set_xticks(ks, [str(x) for x in ks])
    ax.minorticks_off()
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("k (neighbours, log scale)")
    ax.set_ylabel("mean Jaccard of the top-k sets")
    _style(ax)
    if knn is not None:
        kk, acc_a, acc_b, agreement = knn
        ax = fig.add_subplot(1, panels, 3)
        ax.plot(kk, acc_a, "o-", color=BLUE, label="A")
        ax.plot(kk, acc_b, "s--", color=ORANGE, label="B")
        ax.set_xscale("log")
        ax.set_xticks(kk, [str(x) for x in kk])
        ax.minorticks_off()
        ax.set_xlabel(f"k (log scale); predictions agree at k={k}: {agreement:.1f}%",
                      fontsize=8)
        ax.set_ylabel("k-NN accuracy (%), majority vote")
        _style(ax)
        _legend_above(ax)
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=110)
    return path.name
