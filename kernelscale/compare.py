"""``kernelscale compare``: how alike two finished kernels over the same examples are.

The kernels may come from different stores (two training configurations of one data
set) but must have the same pairs and shape. Either may be full or top-K, local or a
published ``hf://`` kernel (downloaded into the Hub cache and verified). Reported:

* neighbour overlap: for each ``k`` of :data:`OVERLAP_KS` (and ``--k``) up to what both
  kernels hold, the mean over rows of the Jaccard index of the two top-``k`` sets, and the
  percent of rows with the same nearest neighbour. Top-``k`` sets follow
  :mod:`kernelscale.topk`'s order (value descending, ties to the smaller column); a square
  kernel's own column is never a neighbour (what a square top-K kernel stores).
* rank correlation of rows (Spearman: Pearson correlation of average ranks), method
  stated in the result:

  - ``exact``: both full and at most :data:`EXACT_ENTRIES` values: every row over all its
    columns (a square kernel's own column left out);
  - ``sample``: both full, bigger or ``--sample N``: ``N`` random rows (seeded), over all
    columns, or :data:`SAMPLE_COLUMNS` random ones of a wider kernel;
  - ``neighbours``: one full, one top-K: over each row's stored neighbours of the top-K
    kernel, their values there against their values in the full one (every row);
  - ``none``: both top-K: no row's values are known in both kernels outside the overlap
    of two sets each kernel chose by its own values, so only the overlap is reported.

* with labels: majority-vote k-NN predictions of both kernels, their agreement, each
  kernel's accuracy at every ``k`` side by side, and the rows where the predictions differ,
  lowest top-``k`` overlap first.

Each full kernel is read once, in row blocks of whole chunk rows (checksums verified),
with at most ``workers`` blocks of each kernel in memory; a top-K kernel's stored
neighbours are read whole ((rows, K) float32 and int64).
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import atomic_write_json, check_output_dir
from .errors import BadInputError, ConfigError, KernelOutputError
from .hubkernel import local_kernel
from .kernelread import CheckedArray, kernel_neighbours, load_kernel
from .knn import predictions_by_k
from .labels import Labels, class_names
from .output import PAIRS, KernelOutput
from .progress import progress
from .similarity import (
    Comparison,
    Disagreement,
    KernelSide,
    KnnAgreement,
    Overlap,
    RankCorrelation,
    jaccard_rows,
    spearman_rows,
)
from .topk import BLOCK_BYTES, Neighbours, default_workers, tile_neighbours

#: the ``k`` of the neighbour overlap (with ``--k``), cut to what both kernels hold.
OVERLAP_KS = (1, 3, 10, 50)
#: both kernels full and at most this many values (rows x columns): exact rank correlation.
EXACT_ENTRIES = 50_000_000
#: rows of the sampled rank correlation unless ``--sample`` says otherwise.
DEFAULT_SAMPLE = 1000
#: columns of the sampled rank correlation: all of them up to this many, else a sample.
SAMPLE_COLUMNS = 100_000
#: rows listed where the predictions differ.
DISAGREEMENTS = 20
#: target bytes of the float64 work arrays while ranking a block's rows.
RANK_BYTES = 64 << 20
JSON_NAME, FIGURE_NAME = "compare.json", "compare.png"


# ------------------------------------------------------------------------- the scan

def _side(path: str | os.PathLike, kern: KernelOutput) -> KernelSide:
    ident, attrs = kern.attrs.get("identity", {}), kern.attrs
    return KernelSide(str(path), kern.topk, ident.get("runs"), ident.get("precision"),
                      attrs.get("store"), ident.get("store_fingerprint"), kern.fingerprint())


@dataclass
class _Plan:
    """What the pass over the full kernels computes: the rank-correlation ``method``,
    its selected ``rows`` int64 (r,) (None: all) and ``cols`` int64 (c,) (None: all),
    and for ``neighbours`` the top-K side's stored neighbours ``held`` and full side."""

    method: str
    rows: np.ndarray | None = None
    cols: np.ndarray | None = None
    held: Neighbours | None = None
    full: str | None = None


def _block_rows(fulls: list[KernelOutput], m: int) -> int:
    """Rows per block: whole chunk rows of every full kernel (their least common
    multiple, unless that is over 4 blocks' bytes: then the first's), ~BLOCK_BYTES in all."""
    crs = [int(k.chunks[0]) for k in fulls]
    base = math.lcm(*crs)
    per_row = max(1, m * 4 * len(fulls))
    if base * per_row > 4 * BLOCK_BYTES:
        base = crs[0]
    return base * max(1, BLOCK_BYTES // (per_row * base))


def _scan(kerns: dict[str, KernelOutput], n: int, m: int, kmax: int, square: bool,
          plan: _Plan, workers: int | None, show_progress: bool):
    """One read of the full kernels among ``kerns`` (side -> kernel): their top-``kmax``
    neighbours (side -> Neighbours) and the per-row Spearman float64 of ``plan``'s rows."""
    fulls = {s: k for s, k in kerns.items() if not k.topk}
    arrays = {s: CheckedArray(k.path, k.array) for s, k in fulls.items()}
    nbs = {s: Neighbours(np.empty((n, kmax), np.float32), np.empty((n, kmax), np.int64))
           for s in fulls}
    sel = np.arange(n) if plan.rows is None else plan.rows
    rho = np.full(sel.size if plan.method in ("exact", "sample") else n, np.nan)
    rows = _block_rows(list(fulls.values()), m)
    bar = progress(n, "compare", "row", enabled=show_progress and n > 4 * rows)

    def work(s: int) -> int:
        e = min(s + rows, n)
        blocks = {side: np.ascontiguousarray(arr[s:e], dtype=np.float32)
                  for side, arr in arrays.items()}
        if plan.method in ("exact", "sample"):
            lo, hi = np.searchsorted(sel, [s, e])
            _rank_block(blocks["a"], blocks["b"], sel[lo:hi], s, plan.cols, square,
                        rho[lo:hi])
        elif plan.method == "neighbours":
            held = plan.held.rows(slice(s, e))
            got = np.take_along_axis(blocks[plan.full], held.index, axis=1)
            rho[s:e] = spearman_rows(held.values, got)
        for side, block in blocks.items():
            t = tile_neighbours(block, kmax, 0, exclude_row0=s if square else None)
            nbs[side].values[s:e], nbs[side].index[s:e] = t.values, t.index
        return e - s

    try:
        with ThreadPoolExecutor(max_workers=workers or default_workers(),
                                thread_name_prefix="kernelscale-compare") as ex:
            for done in ex.map(work, range(0, n, rows)):
                bar.update(done)
    finally:
        bar.close()
    return nbs, rho


def _rank_block(a: np.ndarray, b: np.ndarray, rows: np.ndarray, r0: int,
                cols: np.ndarray | None, square: bool, out: np.ndarray) -> None:
    """Spearman of ``rows`` (global indices within this block, which starts at row
    ``r0``) of blocks ``a``/``b`` float32 (b, m) over ``cols`` (None: all), a square
    kernel's own column left out, into ``out`` float64 (len(rows),)."""
    width = a.shape[1] if cols is None else cols.size
    step = max(1, RANK_BYTES // (width * 8 * 8))
    for i in range(0, rows.size, step):
        r = rows[i:i + step]
        x, y = a[r - r0], b[r - r0]
        if cols is not None:
            x, y = x[:, cols], y[:, cols]
        x, y = x.astype(np.float64), y.astype(np.float64)
        if square:
            c = np.arange(a.shape[1]) if cols is None else cols
            own = c[None, :] == r[:, None]
            x[own] = y[own] = np.nan
        out[i:i + step] = spearman_rows(x, y)


def _rank_plan(ka: KernelOutput, kb: KernelOutput, n: int, m: int, square: bool,
               sample: int | None, seed: int) -> _Plan:
    """The rank correlation's method and, for a sample, its rows and columns: with
    ``rng = np.random.default_rng(seed)``, ``np.sort(rng.choice(n, N, replace=False))``
    rows, then (a kernel wider than :data:`SAMPLE_COLUMNS`) columns drawn the same way."""
    if ka.topk and kb.topk:
        return _Plan("none")
    if ka.topk or kb.topk:
        return _Plan("neighbours", full="b" if ka.topk else "a")
    if sample is None and n * m <= EXACT_ENTRIES:
        return _Plan("exact")
    rng = np.random.default_rng(seed)
    r = min(n, sample or DEFAULT_SAMPLE)
    rows = None if r == n else np.sort(rng.choice(n, r, replace=False))
    cols = None if m <= SAMPLE_COLUMNS else np.sort(rng.choice(m, SAMPLE_COLUMNS,
                                                               replace=False))
    return _Plan("exact" if rows is None and cols is None else "sample", rows, cols)


def _rank_result(plan: _Plan, rho: np.ndarray, sides: dict[str, KernelSide], n: int,
                 m: int, square: bool, seed: int) -> RankCorrelation:
    """The summary of the per-row Spearman ``rho`` float64 (rows,), NaN where undefined."""
    own = " (a row's own column left out)" if square else ""
    if plan.method == "none":
        return RankCorrelation("none", "not computed: both kernels are top-K, and a row's "
                               "values are known in both only where the two top-K sets "
                               "overlap, sets each kernel chose by its own values; only "
                               "the neighbour overlap is reported")
    if plan.method == "exact":
        entries = m - square
        text = f"exact: every one of the {n} rows over all of its {entries} columns{own}"
    elif plan.method == "sample":
        r = n if plan.rows is None else plan.rows.size
        entries = m - square if plan.cols is None else plan.cols.size
        text = (f"on a sample: {r} random rows of {n} (seed {seed}) over "
                + (f"all of their {entries} columns" if plan.cols is None else
                   f"the same {entries} random columns of {m}") + own)
    else:
        top = "a" if plan.full == "b" else "b"
        entries = plan.held.kmax
        text = (f"over each row's {entries} stored neighbours in {top.upper()} "
                f"({sides[top].kind}): their values in {top.upper()} against their values in "
                f"{plan.full.upper()} (full), all {n} rows; the correlation within the top "
                f"of {top.upper()}'s ranking, not over whole rows")
    ok = rho[~np.isnan(rho)]
    q = (lambda p: float(np.percentile(ok, p))) if ok.size else (lambda p: float("nan"))
    return RankCorrelation(plan.method, text, int(rho.size), int(entries),
                           float(ok.mean()) if ok.size else float("nan"), q(50), q(10),
                           int(rho.size - ok.size),
                           int(rho.size) if plan.method == "sample" else None,
                           seed if plan.method == "sample" else None)


# ---------------------------------------------------------------------- comparing

def _open_pair(path_a, path_b, quiet: bool
               ) -> tuple[KernelOutput, KernelOutput, str, int, int]:
    ka, kb = (load_kernel(local_kernel(p, quiet=quiet)) for p in (path_a, path_b))
    pa, pb = (k.attrs.get("identity", {}).get("pairs") for k in (ka, kb))
    if pa != pb:
        raise KernelOutputError(f"{path_a} is a {pa} kernel, {path_b} a {pb} one: compare "
                                "needs kernels of the same pairs")
    if ka.shape != kb.shape:
        raise KernelOutputError(f"{path_a} is {ka.shape[0]}x{ka.shape[1]}, {path_b} "
                                f"{kb.shape[0]}x{kb.shape[1]}: compare needs kernels over "
                                "the same examples (same rows and columns)")
    return ka, kb, pa, *ka.shape


def _row_labels(labels: Labels, pairs: str, n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """The labels int64 of the kernel's rows (n,) and columns (m,), checked."""
    r, c = PAIRS[pairs]
    out = []
    for split, size, what in ((r, n, "rows"), (c, m, "columns")):
        lab = getattr(labels, split)
        if lab.shape[0] != size:
            raise BadInputError(f"{labels.source}: {lab.shape[0]} {split} labels, but the "
                                f"kernels have {size} {what} ({split} examples)")
        out.append(lab)
    return out[0], out[1]


def _knn(nba: Neighbours, nbb: Neighbours, jac: np.ndarray, labels: Labels,
         truth: np.ndarray, train: np.ndarray, k: int,
         ks: list[int]) -> tuple[KnnAgreement, list[Disagreement]]:
    """Majority-vote predictions of both kernels at each of ``ks`` (``k`` among them):
    ``truth`` int64 (rows,) and ``train`` int64 (cols,) are the rows' and columns'
    labels; ``jac`` float64 (rows,) the per-row Jaccard at ``k``."""
    classes = (len(labels.class_names) if labels.class_names is not None
               else int(max(truth.max(initial=0), train.max(initial=0))) + 1)
    pa = predictions_by_k(nba, train, "none", None, ks, classes)
    pb = predictions_by_k(nbb, train, "none", None, ks, classes)

    def pct(hits: np.ndarray) -> float:
        return float(hits.mean() * 100) if hits.size else float("nan")

    i = ks.index(k)
    a_ok, b_ok = pa[i] == truth, pb[i] == truth
    agree = KnnAgreement(k, pct(a_ok), pct(b_ok), pct(pa[i] == pb[i]),
                         int((a_ok & b_ok).sum()), int((a_ok & ~b_ok).sum()),
                         int((~a_ok & b_ok).sum()), int((~a_ok & ~b_ok).sum()), tuple(ks),
                         tuple(pct(p == truth) for p in pa), tuple(pct(p == truth) for p in pb))
    differ = np.flatnonzero(pa[i] != pb[i])
    worst = differ[np.lexsort((differ, jac[differ]))][:DISAGREEMENTS]
    names = class_names(labels, classes)
    rows = [Disagreement(int(r), int(truth[r]), int(pa[i, r]), int(pb[i, r]),
                         float(jac[r]), (names[truth[r]], names[pa[i, r]], names[pb[i, r]]))
            for r in worst]
    return agree, rows


def compare_kernels(path_a: str | os.PathLike, path_b: str | os.PathLike, *,
                    labels: Labels | None = None, k: int = 10,
                    ks: tuple[int, ...] = OVERLAP_KS, sample: int | None = None,
                    seed: int = 0, workers: int | None = None,
                    show_progress: bool = False) -> Comparison:
    """Compare two finished kernels of the same pairs and shape (see the module
    docstring); either may be ``hf://datasets/OWNER/NAME[@REV]/PATH``, fetched and
    verified first (:mod:`kernelscale.hubkernel`) and named by its spec in the result.
    ``k``: the k-NN's and the per-row Jaccard's; ``ks``: the overlap's, cut to
    what both hold; ``sample``: rows of a sampled rank correlation (forces sampling);
    ``seed``: its draw. Raises :class:`KernelOutputError` for kernels over other examples
    and :class:`ConfigError` for a ``k`` they cannot give."""
    if k < 1:
        raise ConfigError(f"--k must be >= 1, not {k}")
    if sample is not None and sample < 2:
        raise ConfigError(f"--sample must be >= 2 rows, not {sample}")
    ka, kb, pairs, n, m = _open_pair(path_a, path_b, quiet=not show_progress)
    square = PAIRS[pairs][0] == PAIRS[pairs][1]
    held_k = {p: kern.topk or m - square for p, kern in ((path_a, ka), (path_b, kb))}
    avail = min(held_k.values())
    if k > avail:
        raise ConfigError(f"--k {k}: the kernels give at most {avail} neighbours per row ("
                          + "; ".join(f"{p}: {x}" for p, x in held_k.items()) + ")")
    truth = train = None
    if labels is not None:  # checked before the kernels are read
        truth, train = _row_labels(labels, pairs, n, m)
    kk = sorted({x for x in ks if 1 <= x <= avail} | {k})
    kmax = kk[-1]
    plan = _rank_plan(ka, kb, n, m, square, sample, seed)
    held = {s: kernel_neighbours(kern, kern.topk, exclude_diagonal=square)
            for s, kern in (("a", ka), ("b", kb)) if kern.topk}
    if plan.method == "neighbours":
        plan.held = held["a" if plan.full == "b" else "b"]
    nbs, rho = ({}, np.empty(0)) if plan.method == "none" else _scan(
        {"a": ka, "b": kb}, n, m, kmax, square, plan, workers, show_progress)
    nbs.update({s: Neighbours(np.ascontiguousarray(h.values[:, :kmax]),
                              np.ascontiguousarray(h.index[:, :kmax]))
                for s, h in held.items()})
    jac = {x: jaccard_rows(nbs["a"].index[:, :x], nbs["b"].index[:, :x]) for x in kk}
    overlap = [Overlap(x, float(j.mean()), float(np.median(j)), float((j == 1).mean() * 100))
               for x, j in jac.items()]
    sides = {"a": _side(path_a, ka), "b": _side(path_b, kb)}
    same = float((nbs["a"].index[:, 0] == nbs["b"].index[:, 0]).mean() * 100)
    cmp = Comparison(sides["a"], sides["b"], pairs, (n, m), k, overlap, same,
                     _rank_result(plan, rho, sides, n, m, square, seed),
                     jaccard=jac[k])
    if labels is not None:
        cmp.knn, cmp.disagreements = _knn(nbs["a"], nbs["b"], jac[k], labels, truth, train,
                                          k, kk)
        cmp.labels = labels.source
    return cmp


def write_comparison(cmp: Comparison, out: str | os.PathLike) -> tuple[Path, Path]:
    """``OUT/compare.json`` (atomic) and ``OUT/compare.png``; returns both paths."""
    from .figures import fig_compare

    out = check_output_dir(out, "--out folder")
    out.mkdir(parents=True, exist_ok=True)
    kn = cmp.knn
    fig_compare(cmp.jaccard, cmp.k, [(o.k, o.mean_jaccard) for o in cmp.overlap],
                None if kn is None else (kn.ks, kn.by_k_a, kn.by_k_b, kn.agreement),
                out / FIGURE_NAME)
    atomic_write_json(out / JSON_NAME, {**cmp.as_json(), "figure": FIGURE_NAME})
    return out / JSON_NAME, out / FIGURE_NAME
