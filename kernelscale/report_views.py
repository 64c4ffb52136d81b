"""The report's views of the kernel itself as HTML: its values for same- and
different-label pairs, a heatmap of a class-sorted sample, and the interpretability
views (most similar train examples, failure modes, random examples).
"""

from __future__ import annotations

from collections.abc import Sequence

from .report_data import KernelSample
from .report_html import e, img, neighbour_table, pct, table


def _stat(x: float | None) -> str:
    return "–" if x is None else f"{x:.4f}"


def kernel_values_section(values: dict, kmax: int, n_test: int,
                          sample: KernelSample | None, fig: str | None) -> str:
    """``values``: source (``neighbours``, ``sample``) -> {``same``, ``different``}:
    :func:`~kernelscale.report_data.summary` dicts."""
    rows = []
    what = {"neighbours": f"top {kmax} neighbours of each of the {n_test} test examples",
            "sample": "every entry of the heatmap's sample"}
    for src, groups in values.items():
        for g in ("same", "different"):
            s = groups[g]
            rows.append([what[src], f"{g} label", s["count"], _stat(s["mean"]),
                         _stat(s["p10"]), _stat(s["median"]), _stat(s["p90"])])
    src = (f"<p>Kernel values of (test, train) pairs whose labels agree and disagree, from "
           f"two sources: (1) the <b>top {kmax} neighbours</b> of every test example, the "
           "ones the k-NN votes with (read once for the evaluation)")
    src += ((f"; (2) a <b>seeded sample of kernel entries</b> (seed {sample.seed}): the "
             f"{sample.rows.size} × {sample.cols.size} entries of the heatmap below, "
             "drawn evenly from each class shown, so about 1 in "
             f"{max(1, sample.shown.size)} is a same-label pair.</p>")
            if sample is not None else
            ". A top-K kernel holds no other entries, so no sample of whole rows is drawn."
            "</p>")
    return (src + img(fig, "kernel values of same- and different-label pairs")
            + table(["pairs", "labels", "count", "mean", "10th percentile", "median",
                     "90th percentile"], rows, num=(2, 3, 4, 5, 6))
            + "<p class='note'>A kernel that separates the classes puts same-label pairs "
              "at larger values; where the two histograms overlap, neighbours of other "
              "labels outvote the right one.</p>")


def heatmap_section(sample: KernelSample | None, classes: int, topk: int | None,
                    fig: str | None, names: Sequence[str]) -> str:
    if sample is None:
        return (f"<p class='note'>No heatmap: the kernel is a top-{topk} kernel, which keeps "
                f"each test row's {topk} largest values and no full matrix to sample. "
                "Compute a full kernel (without <code>--topk</code>) for the heatmap.</p>")
    shown = sample.shown.size
    first = ", ".join(names[c] for c in sample.shown[:8]) + (", …" if shown > 8 else "")
    which = (f"all {shown} classes" if shown == classes else
             f"{shown} of the {classes} classes (chosen at random: {first})")
    return (f"<p>Kernel values of {sample.rows.size} test examples (rows) against "
            f"{sample.cols.size} train examples (columns), drawn at random (seed "
            f"{sample.seed}) evenly from {e(which)}, rows and columns sorted by label; the "
            "lines separate the classes. Only the sampled entries are read from the "
            "kernel. A kernel that tells the classes apart shows red blocks on the "
            "diagonal.</p>" + img(fig, "kernel heatmap of a class-sorted sample")
            + "<p class='note'>The sampled indices are in <code>report.json</code> "
              "(<code>kernel_sample</code>).</p>")


def interpretability_section(sim: dict, fail: dict, rand: dict, figs: dict, names,
                             images_note: str, threshold: float, n_test: int,
                             neighbours: int) -> str:
    """The views of :mod:`kernelscale.interpret`: image grids when ``figs`` has them,
    neighbour tables (✓ same label, ✗ another) otherwise."""
    thr_rows = [[f"> {t['threshold']:g}", t["count"], f"{t['fraction'] * 100:.2f}%"]
                for t in sim["by_threshold"]]
    same = sim["same_label_above"]
    parts = [
        "<p class='note'>" + e(images_note) + "</p>",
        '<h3 id="similar">(a) Test examples by their most similar train example</h3>',
        f"<p><b>{sim['count_above']}</b> of {n_test} test examples "
        f"(<b>{sim['fraction_above'] * 100:.2f}%</b>) have a train example with kernel value "
        f"above {threshold:g}"
        + (f"; {same * 100:.1f}% of those share its label" if same is not None else "")
        + ". The examples at the top are candidate near-duplicates of train examples.</p>",
        img(figs["similar"], "most similar train example"),
        table(["most similar train example", "test examples", "fraction"], thr_rows,
              num=(1, 2)),
        "<p>The most similar pairs (✓ same label, ✗ another):</p>",
        img(figs["similar_grid"], "most similar pairs") if figs["similar_grid"]
        else neighbour_table(sim["top"], names, 1),
        '<h3 id="failures">(b) Failure modes: confident nearest neighbours of another '
        'label</h3>',
        f"<p>The nearest train example of <b>{fail['count']}</b> test examples "
        f"({pct(fail['fraction'] * 100)}%) carries another label. The most similar of "
        "those (neighbours of another label in red, marked ✗):</p>",
        img(figs["failures_grid"], "failure modes") if figs["failures_grid"]
        else neighbour_table(fail["top"], names, neighbours),
        "<p>Most frequent confusions (label of the test example → label of its nearest "
        "train example):</p>",
        table(["test label", "nearest neighbour's label", "test examples"],
              [[names[c["label"]], names[c["neighbour_label"]], c["count"]]
               for c in fail["confused"]], num=(2,)),
        f'<h3 id="random">(c) Random test examples (seed {rand["seed"]}) and their nearest '
        'train examples</h3>',
        img(figs["random_grid"], "random examples") if figs["random_grid"]
        else neighbour_table(rand["examples"], names, neighbours),
    ]
    return "".join(parts)
