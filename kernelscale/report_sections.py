"""The report's accuracy sections as HTML: the summary, baselines, k-NN (the headline row
first), accuracy against runs, ablations, per-class accuracy and confusion matrices.

Each function returns the HTML of one section's body from typed results
(:class:`~kernelscale.evaluation.Evaluation`, :class:`~kernelscale.curve.Curve`, the
rows and cells of :mod:`kernelscale.report_data`) and the names of its figures.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .curve import Curve
from .evaluation import Evaluation
from .knn import Selection
from .report_data import (
    CLASS_EXTREMES,
    CLASS_ROWS,
    LOO_POOR_GUIDE,
    Headline,
    confusion_matrix,
    loo_is_poor_guide,
    top_confusions,
)
from .report_html import RIGHT, WRONG, Raw, e, img, pct, scroll, table


def _tags(*names: str) -> str:
    return "".join(f' <span class="tag {n}">{n}</span>' for n in names)


def summary_section(ev: Evaluation, head: Headline | None) -> str:
    """The numbers a reader wants first: the honest k-NN against the ensemble."""
    rows, hl = [], []
    if head is not None:
        hl.append(0)
        rows.append([f"kernel k-NN, {head.selection.label()}", pct(head.selection.accuracy),
                     Raw(f"setting chosen honestly: {e(head.reason)}"
                         + _tags("headline", "honest"))])
    rows += [["ensemble", pct(ev.ensemble_accuracy),
              f"argmax of the mean logits of {ev.runs} runs"],
             ["average single model", pct(ev.single_model_accuracy),
              f"mean over the {ev.runs} runs"]]
    if ev.oracle is not None:
        rows.append([f"kernel k-NN, {ev.oracle.setting.label()}", pct(ev.oracle.accuracy),
                     Raw("best of the grid on the test labels: optimistic"
                         + _tags("oracle"))])
    out = table(["classifier", "test accuracy (%)", "what it is"], rows, num=(1,),
                highlight=hl, cls="knn")
    if head is not None:
        d = head.selection.accuracy - ev.ensemble_accuracy
        out += (f"<p>The honestly selected kernel k-NN is <b>{abs(d):.2f} points "
                f"{'above' if d >= 0 else 'below'}</b> the {ev.runs}-run ensemble.</p>")
    return out


def baselines_section(ev: Evaluation, fig: str | None) -> str:
    rng = ((min(ev.per_run_accuracy), max(ev.per_run_accuracy)) if ev.per_run_accuracy
           else (None, None))
    rows = [["average single model", pct(ev.single_model_accuracy),
             f"mean over {ev.runs} runs (range {pct(rng[0])}–{pct(rng[1])})"],
            ["ensemble", pct(ev.ensemble_accuracy),
             f"argmax of the mean logits of {ev.runs} runs"],
            [f"kernel {ev.k}-NN", pct(ev.knn_accuracy),
             f"{ev.k} train examples with the largest kernel values, majority vote"]]
    return (table(["classifier", "test accuracy (%)", "definition"], rows, num=(1,))
            + img(fig, "per-run accuracies"))


def _how(sel: Selection) -> str:
    if sel.method == "leave-one-out":
        return (f"leave-one-out k-NN on the train × train kernel (own column excluded): "
                f"{sel.selection_accuracy:.2f}% on {sel.selection_rows} train examples; "
                "then scored on test")
    return ("cross-fitting: the setting chosen on one random half of the test set scores "
            "the other half, and the other way round; "
            + "; ".join(f"half {i + 1} → {f.accuracy:.2f}% ({f.scored_on_rows} examples)"
                        for i, f in enumerate(sel.folds)))


def _crossfit_note(cf: Selection) -> str:
    rows = [[f"half {i + 1}", f.setting.label(), f.chosen_on_rows,
             pct(f.accuracy_where_chosen), f"half {2 - i}", f.scored_on_rows, pct(f.accuracy)]
            for i, f in enumerate(cf.folds)]
    return ("<h3>How to read a cross-fitted row</h3><p class='note'>A cross-fitted row "
            "names one setting per half, “A / B”. The test set is split into two random "
            f"halves (seed {cf.seed}); A is the best setting of the grid on half 1 and "
            "classifies half 2, B the best on half 2 and classifies half 1. Its accuracy "
            "counts every test example once, classified by the setting chosen on the half "
            "it is not in, so no example is scored by a setting chosen with its own label. "
            "The accuracy where a setting was chosen is optimistic and shown for comparison "
            "only.</p>"
            + table(["chosen on", "setting", "examples", "accuracy there (%), optimistic",
                     "scores", "examples", "accuracy there (%), honest"], rows,
                    num=(2, 3, 5, 6)))


def knn_section(ev: Evaluation, head: Headline | None) -> str:
    """The k-NN table, the headline (honest) selection first and highlighted; the other
    selection, the fixed settings and the oracle after it."""
    sel, cf = ev.selection, ev.crossfit
    rows, hl = [], []
    picks = [s for s in (sel, cf) if s is not None]
    if head is not None:
        picks.sort(key=lambda s: s is not head.selection)
    for s in dict.fromkeys(picks):  # the selection may be the cross-fit itself
        tags = ["honest"]
        if head is not None and s is head.selection:
            hl.append(len(rows))
            tags.insert(0, "headline")
        if loo_is_poor_guide(s):
            tags = ["poor"]
        rows.append([s.label(), pct(s.accuracy), Raw(e(_how(s)) + _tags(*tags))])
    rows.append([f"k={ev.k}, majority vote", pct(ev.knn_accuracy),
                 Raw("fixed, as in the reference" + _tags("fixed"))])
    if ev.setting and ev.setting.weighting != "none":
        rows.append([ev.setting.label(), pct(ev.weighted_accuracy),
                     Raw("as requested" + _tags("fixed"))])
    if ev.oracle:
        rows.append([ev.oracle.setting.label(), pct(ev.oracle.accuracy),
                     Raw("best of the grid on the test labels — optimistic, what tuning on "
                         "the test set reports" + _tags("oracle"))])
    out = [table(["setting", "test accuracy (%)", "how the setting was chosen"], rows,
                 num=(1,), highlight=hl, cls="knn")]
    if loo_is_poor_guide(sel):
        out.append(f"<p class='warn'>Leave-one-out accuracy on the train set is "
                   f"{sel.selection_accuracy:.2f}% (at least {LOO_POOR_GUIDE:g}%): the train "
                   "examples' outputs carry their own labels (they were trained on), so the "
                   "train × train kernel tells the settings apart poorly (tag "
                   "<span class='tag poor'>poor</span>). The cross-fitted accuracy, chosen "
                   "on test examples but never scored on the ones it was chosen on, is the "
                   "better guide here, and is the headline row.</p>")
    if cf is not None and cf.folds:
        out.append(_crossfit_note(cf))
    if ev.families:
        out.append(_families(ev))
    return "".join(out)


def _families(ev: Evaluation) -> str:
    out = ["<h3>Best k of each weighting <span class='tag oracle'>oracle</span></h3>"
           "<p class='note'>Weight of a neighbour with kernel value K: majority vote "
           "1; power max(K, 0)<sup>p</sup>; softmax exp(K/T). The best k of each "
           "row is chosen with the test labels.</p><div class='row'>"]
    top = max(f.accuracy for f in ev.families)
    for w, title, par in (("none", "majority vote", None), ("power", "power", "p"),
                          ("softmax", "softmax", "T")):
        fam = [f for f in ev.families if f.weighting == w]
        if not fam:
            continue
        head = ([par] if par else []) + ["best k", "accuracy"]
        rows = [([f"{f.param:g}"] if par else []) + [f.setting.k, pct(f.accuracy)]
                for f in fam]
        hl = [i for i, f in enumerate(fam) if f.accuracy == top]
        out.append(f"<div><h4>{e(title)}</h4>"
                   + table(head, rows, num=range(len(head)), highlight=hl) + "</div>")
    out.append("</div>")
    return "".join(out)


def runs_section(curve: Curve | None, fig: str | None) -> str:
    if not curve:
        return ("<p class='note'>No curve given: run <code>kernelscale curve --store STORE "
                "--labels LABELS --runs 10,20,50,...</code> and pass its "
                "<code>curve.json</code> with <code>--curve</code>.</p>")
    c, k = curve.crossover, curve.k
    lead = (f"<p>The kernel {k}-NN is ahead of the ensemble from <b>{c} runs</b> on "
            "(first run count from which it stays ahead at every larger count measured)."
            "</p>" if c is not None else
            f"<p>The kernel {k}-NN is <b>not</b> ahead of the ensemble at the largest run "
            "count measured.</p>")
    rows = [[p.runs, pct(p.single_model_accuracy), pct(p.ensemble_accuracy),
             pct(p.knn_accuracy), pct(p.selected.accuracy), pct(p.oracle.accuracy)]
            for p in curve.points]
    hl = [i for i, p in enumerate(curve.points) if p.runs == c]
    return (lead + img(fig, "accuracy against the number of runs")
            + table(["runs", "single model", "ensemble", f"{k}-NN", "selected (cross-fit)",
                     "oracle"], rows, num=range(6), highlight=hl)
            + "<p class='note'>Each point uses the first n runs of the store, standardised "
              "with the statistics of those n runs. \"selected\" is honest (cross-fitting "
              "over test halves, read as in the k-NN section); \"oracle\" chooses with the "
              "test labels.</p>")


def _class_label(c: int, names: Sequence[str]) -> str:
    """``class 7 only (horse)``: the class index, and its name when it has one."""
    return f"class {c} only" + (f" ({names[c]})" if names[c] != f"class {c}" else "")


def ablation_section(ev: Evaluation, fig: str | None, names: Sequence[str]) -> str:
    if not ev.ablations:
        return ("<p class='note'>No ablations computed: pass <code>--ablations DIR</code> "
                "to compute the kernel of each class alone and of raw logits (one kernel "
                "each, computed with the kernel engine and kept in DIR).</p>")

    def row(what: str, a) -> list:
        return [what, pct(a.accuracy), pct(a.oracle.accuracy), a.oracle.setting.label()]

    rows = [["all classes (summed kernel)", pct(ev.weighted_accuracy),
             pct(ev.oracle.accuracy), ev.oracle.setting.label()]]
    per_class = [a for a in ev.ablations if a.class_index is not None]
    note = ""
    if len(per_class) <= CLASS_ROWS:
        rows += [row(_class_label(a.class_index, names), a) for a in per_class]
    else:
        acc = np.array([a.accuracy for a in per_class])
        rows.append([f"{len(per_class)} single-class kernels: mean (median)",
                     pct(float(acc.mean())) + f" ({pct(float(np.median(acc)))})", "–", "–"])
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
    return (img(fig, "ablation accuracies")
            + table(["kernel", f"k-NN ({ev.setting.label()})", "best (oracle)",
                     "best setting"], rows, num=(1, 2), highlight=(0,))
            + "<p class='note'>The summed kernel is the mean of the per-class kernels. "
              "\"best\" is chosen with the test labels." + note + "</p>")


def classes_section(knn: list[dict], ens: list[dict], label: str, fig: str | None) -> str:
    """Per-class accuracy of the ensemble and the k-NN (``knn``/``ens``: the rows of
    :func:`~kernelscale.report_data.per_class`, one per class, in class order): every
    class up to :data:`CLASS_ROWS`, else a summary and the lowest k-NN classes."""
    def mistake(r: dict) -> str:
        m = r["mistake"]
        return f"{m['name']} ({m['count']})" if m else "–"

    def cells(r: dict, q: dict) -> list:
        return [r["name"] if r["name"] == f"class {r['class']}"
                else f"{r['name']} (class {r['class']})", r["test_examples"],
                pct(q["accuracy"]), mistake(q), pct(r["accuracy"]), mistake(r)]

    head = ["class", "test examples", "ensemble accuracy (%)",
            "ensemble's most frequent mistake", f"k-NN accuracy (%), {label}",
            "k-NN's most frequent mistake"]
    note = ("<p class='note'>A mistake is the predicted class and its number of test "
            "examples; the full confusion matrices follow.</p>")
    if len(knn) <= CLASS_ROWS:
        return table(head, [cells(r, q) for r, q in zip(knn, ens, strict=True)],
                     num=(1, 2, 4), cls="cls") + note
    seen = [i for i, r in enumerate(knn) if r["accuracy"] is not None]
    empty = len(knn) - len(seen)

    def stats(rows: list[dict], who: str) -> str:
        acc = np.array([rows[i]["accuracy"] for i in seen])
        if not acc.size:
            return ""
        return (f" {who}: mean {acc.mean():.2f}, median {np.median(acc):.2f}, lowest "
                f"{acc.min():.2f}, highest {acc.max():.2f}; {int((acc == 100).sum())} classes "
                f"at 100%, {int((acc == 0).sum())} at 0%.")

    lowest = sorted(seen, key=lambda i: (knn[i]["accuracy"], -knn[i]["test_examples"], i))
    lowest = lowest[:CLASS_EXTREMES]
    text = (f"<p>{len(knn)} classes; {len(seen)} have test examples"
            + (f" ({empty} have none)" if empty else "") + ". Per-class accuracy —"
            + stats(ens, "ensemble") + stats(knn, "k-NN") + "</p>")
    return (text + img(fig, "per-class accuracy histogram")
            + f"<h3>The {len(lowest)} classes with the lowest k-NN accuracy</h3>"
            + table(head, [cells(knn[i], ens[i]) for i in lowest], num=(1, 2, 4), cls="cls")
            + "<p class='note'>Every class's row is in <code>report.json</code> "
              "(<code>per_class</code>, <code>per_class_ensemble</code>).</p>")


def _matrix_table(m: np.ndarray, names: Sequence[str]) -> str:
    """A confusion matrix int64 (C, C) as a table: rows true, columns predicted; the
    diagonal marked ✓ (right), nonzero cells off it ✗ (wrong); each row's total and
    accuracy."""
    c = m.shape[0]
    head = ("<tr><th>true \\ predicted</th>" + "".join(f"<th>{j}</th>" for j in range(c))
            + "<th>examples</th><th>accuracy (%)</th></tr>")
    body = []
    for i in range(c):
        n = int(m[i].sum())
        tds = []
        for j in range(c):
            v = int(m[i, j])
            kind = ("right" if i == j else "wrong") if v else "zero"
            text = f"{RIGHT} {v}" if kind == "right" else f"{WRONG} {v}" if v else "0"
            tds.append(f'<td class="num {kind}">{text}</td>')
        body.append(f'<tr><th class="rowh">{e(names[i])} ({i})</th>{"".join(tds)}'
                    f'<td class="num">{n}</td>'
                    f'<td class="num">{pct(m[i, i] / n * 100 if n else None)}</td></tr>')
    return scroll(f'<table class="cm"><thead>{head}</thead><tbody>{"".join(body)}'
                  "</tbody></table>")


def confusion_section(cells: dict[str, np.ndarray], titles: dict[str, str],
                      names: Sequence[str], figs: dict[str, str | None]) -> str:
    """Confusion matrices of each classifier (``cells``: key -> int64 (cells, 3) rows
    (true, predicted, count) of :func:`~kernelscale.report_data.confusion_cells`;
    ``titles``: key -> heading; ``figs``: key -> its heatmap): whole, as a heatmap and a
    table, up to :data:`CLASS_ROWS` classes, else the most frequent confusions."""
    c = len(names)
    out = []
    if c <= CLASS_ROWS:
        out.append(f"<p class='note'>Rows: true label; columns: predicted label (class "
                   f"index). {RIGHT} on the diagonal: right; {WRONG}: wrong (test examples "
                   "of the row's class predicted as the column's).</p>")
        for key, title in titles.items():
            out.append(f"<h3>{e(title)}</h3>" + img(figs.get(key), f"confusion matrix, "
                                                                    f"{title}")
                       + _matrix_table(confusion_matrix(cells[key], c), names))
        return "".join(out)
    out.append(f"<p>{c} classes: the matrices are summarised by their most frequent "
               "confusions; every nonzero cell is in <code>report.json</code> "
               "(<code>confusion</code>).</p>")
    for key, title in titles.items():
        cl = cells[key]
        n = np.bincount(cl[:, 0], weights=cl[:, 2], minlength=c)
        rows = [[f"{names[t]} ({t})", Raw(f'<span class="bad">{WRONG}</span> '
                                          f'{e(names[p])} ({p})'), k, pct(k / n[t] * 100)]
                for t, p, k in top_confusions(cl).tolist()]
        wrong = int(cl[cl[:, 0] != cl[:, 1], 2].sum())
        out.append(f"<h3>{e(title)}</h3><p>{wrong} of {int(cl[:, 2].sum())} test examples "
                   f"wrong, in {int((cl[:, 0] != cl[:, 1]).sum())} distinct (true, "
                   "predicted) pairs. The most frequent:</p>"
                   + table(["true label", "predicted label", "test examples",
                            "share of the true label's examples (%)"], rows, num=(2, 3)))
    return "".join(out)
