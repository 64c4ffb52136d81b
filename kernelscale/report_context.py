"""The report's context sections as HTML: where the data came from (store, kernel,
labels, class names), how and when the report was made (command, versions, devices, the
times the inputs record, JSON files) and how the kernel compares with another (a
``compare.json`` of ``kernelscale compare``, read by :func:`load_compare`).
"""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from pathlib import Path

from .atomic import read_json
from .errors import BadInputError
from .provenance import Provenance
from .report_data import CLASS_ROWS
from .report_html import RIGHT, WRONG, Raw, e, kv_table, mono, pct, table
from .store import Store
from .units import format_bytes


def _names_text(names: Sequence[str], source: str) -> Raw:
    """The class names, all of them up to :data:`CLASS_ROWS`, and where they came from."""
    shown = ", ".join(f"{i} {n}" for i, n in enumerate(names[:CLASS_ROWS]))
    more = (f" … and {len(names) - CLASS_ROWS} more (every name in <code>report.json"
            "</code>, <code>class_names</code>)" if len(names) > CLASS_ROWS else "")
    return Raw(f"{e(shown)}{more}<br><span class='note'>from {e(source)}</span>")


def provenance_section(store: Store, prov: Provenance, attrs: dict, images_note: str,
                       names: Sequence[str], names_source: str) -> str:
    m, s = store.manifest, store.shape
    ident = prov.kernel_identity or {}
    zero = ", ".join(f"{a} {b}" for a, b in sorted(attrs.get("zero_variance", {}).items()))
    parts = [kv_table([
        ("store", mono(prov.store)),
        ("store fingerprint", mono(prov.store_fingerprint)),
        ("runs", m["runs"]),
        ("examples", f"{s.n_test} test, {s.n_train} train, {s.classes} classes ({s.dtype})"),
        ("kernel", mono(prov.kernel)),
        ("kernel inputs", f"{ident.get('pairs')}, runs {ident.get('runs')}, precision "
                          f"{ident.get('precision')}, log-softmax {ident.get('log_softmax')}, "
                          f"classes {ident.get('classes') or 'all'}"
                          + (f"; a top-{ident['topk']} kernel (each test row's "
                             f"{ident['topk']} largest values kept)"
                             if ident.get("topk") else "")),
        ("zero-variance entries", zero or "–"),
        ("labels", prov.labels),
        ("class names", _names_text(names, names_source)),
        ("images", images_note),
    ])]
    srcs = m.get("sources") or []
    if srcs:
        keys = sorted({k for src in srcs for k in src})
        parts.append("<h3>Sources</h3>"
                     + table(keys, [[src.get(k, "") for k in keys] for src in srcs]))
    files = m.get("files") or []
    rows = [[f["name"], Raw(f'<span class="mono nowrap">{e(f["sha256"][:16])}</span>'),
             f"{f['run_start']}–{f['run_stop']}",
             format_bytes(f["size"]), f.get("commit") or "–"] for f in files]
    parts.append(f"<h3>Files ({len(files)})</h3>"
                 + table(["file", "sha256", "runs", "size", "commit"], rows, num=(2, 3)))
    if m.get("rejected"):
        parts.append(f"<h3>Rejected files ({len(m['rejected'])})</h3>"
                     + table(["file", "reason"], [[r["name"], r["reason"]]
                                                  for r in m["rejected"]]))
    return "".join(parts)


def _span(t: tuple[str, str] | None) -> str:
    if t is None:
        return "not recorded"
    return t[0] if t[0] == t[1] else f"{t[0]} – {t[1]}"


def run_section(prov: Provenance, *, ingested: tuple[str, str] | None,
                kernel_done: tuple[str, str] | None, ablation_device: str | None,
                curve_points: Sequence | None, files: Sequence[str]) -> str:
    """Command, versions, devices, the times the inputs record, and links to the JSON
    ``files`` beside ``index.html``. What differs between two builds of the same report
    (its own seconds, the curve kernels' seconds) is in ``timings.json``, not here."""
    rows: list[tuple[str, object]] = [
        ("command", mono(prov.command or "–")),
        ("software", f"kernelscale {prov.kernelscale_version}, torch "
                     f"{prov.torch_version or '–'}, numpy {prov.numpy_version}, Python "
                     f"{platform.python_version()}"),
        ("kernel computed on", prov.device or "not recorded"),
    ]
    if ablation_device is not None:
        rows.append(("ablation kernels computed on", ablation_device))
    devices = sorted({p.device for p in curve_points or () if p.device})
    if devices:
        rows.append(("curve kernels computed on", ", ".join(devices)))
    rows += [
        ("store files ingested (UTC)", _span(ingested)),
        ("kernel tiles finished (UTC)", _span(kernel_done)),
        ("run times", Raw("of this report's phases (evaluation, views, figures), when it "
                          "was evaluated, and of each curve point's kernel: "
                          '<a href="timings.json">timings.json</a>')),
        ("JSON", Raw(" · ".join(f'<a href="{e(f)}">{e(f)}</a>' for f in files))),
    ]
    return (kv_table(rows)
            + "<p class='note'>A kernel records when each of its tiles finished, not how "
              "long it took. Run times change from one build to the next, so they are kept "
              "in <code>timings.json</code>: the same inputs give the same page and the "
              "same <code>report.json</code>. <code>results.json</code> is the evaluation "
              "as <code>kernelscale evaluate --json</code> writes it (with every run's "
              "accuracy); <code>report.json</code> every number shown here.</p>")


# ------------------------------------------------------------------------- compare

#: the comparison's files, as ``kernelscale compare --out`` names them and as the report
#: keeps its copies
COMPARE_JSON, COMPARE_PNG = "compare.json", "compare.png"


def load_compare(path: str | os.PathLike) -> tuple[dict, Path, Path | None]:
    """(document, its path, its figure's path or None) of a ``compare.json`` or of the
    folder holding one; one :class:`~kernelscale.errors.BadInputError` line when it is not
    a readable JSON object."""
    p = Path(path)
    if p.is_dir():
        p = p / COMPARE_JSON
    try:
        data = read_json(p)
    except (OSError, ValueError) as e:
        raise BadInputError(f"{p}: not a readable compare.json ({type(e).__name__}: "
                            f"{str(e)[:120]})") from None
    if not isinstance(data, dict):
        raise BadInputError(f"{p}: not a compare.json (a JSON object of `kernelscale "
                            "compare --out`)")
    name = data.get("figure")
    fig = p.parent / name if isinstance(name, str) and name and "/" not in name else None
    return data, p, fig if fig is not None and fig.is_file() else None


def _side(d: dict) -> str:
    return (f"{d.get('path', '–')} ({d.get('kind', '–')}, {d.get('runs', '–')} runs, "
            f"{d.get('precision', '–')})")


def _scalars(d: dict, skip: Sequence[str] = ()) -> list[list]:
    """Rows (key, value) of ``d``'s numbers and strings, one level of dicts flattened."""
    rows = []
    for k, v in d.items():
        if k in skip:
            continue
        if isinstance(v, dict):
            rows += [[f"{k}.{k2}", v2] for k2, v2 in v.items()
                     if isinstance(v2, (int, float, str)) and not isinstance(v2, bool)]
        elif isinstance(v, (int, float, str)) and not isinstance(v, bool):
            rows.append([k, v])
    return rows


def compare_section(data: dict | None, figure: str | None) -> str:
    """A ``compare.json``'s kernels, neighbour overlap, rank correlation, k-NN agreement
    and disagreements; any other top-level numbers as a table of their own."""
    if data is None:
        return ("<p class='note'>No comparison given: run <code>kernelscale compare "
                "KERNEL_A KERNEL_B --labels LABELS --out DIR</code> and pass "
                "<code>DIR/compare.json</code> with <code>--compare</code> (a job: a "
                "<code>[compare]</code> table, or <code>[report] compare</code>).</p>")
    out, known = [], ["a", "b", "pairs", "shape", "overlap", "same_nearest",
                      "rank_correlation", "knn", "disagreements", "figure"]
    if "a" in data and "b" in data:
        out.append(kv_table([("A", mono(_side(data["a"]))), ("B", mono(_side(data["b"]))),
                             ("pairs, shape", f"{data.get('pairs', '–')}, "
                                              f"{data.get('shape', '–')}")]))
    # three panels: scrolled on a narrow screen rather than shrunk to unreadable text
    out.append(f'<div class="scroll"><img class="wide" src="{e(figure)}" alt="comparison">'
               "</div>" if figure else "")
    if data.get("overlap"):
        rows = [[o.get("k"), f"{o.get('mean_jaccard', 0):.3f}",
                 f"{o.get('median_jaccard', 0):.3f}", pct(o.get("identical_rows"))]
                for o in data["overlap"]]
        out.append("<h3>Top-k neighbour overlap</h3>"
                   + table(["k", "mean Jaccard", "median Jaccard", "identical sets (%)"],
                           rows, num=(0, 1, 2, 3))
                   + (f"<p>Same nearest neighbour in {pct(data['same_nearest'])}% of "
                      "rows.</p>" if data.get("same_nearest") is not None else ""))
    rk = data.get("rank_correlation")
    if rk:
        def val(x) -> str:
            return "–" if x is None else f"{x:.4f}"

        out.append("<h3>Rank correlation of rows (Spearman)</h3>"
                   + (table(["mean", "median", "10th percentile", "rows", "method"],
                            [[val(rk.get("mean")), val(rk.get("median")), val(rk.get("p10")),
                              rk.get("rows"), rk.get("method")]], num=(0, 1, 2, 3))
                      if rk.get("method") != "none" else "")
                   + f"<p class='note'>{e(rk.get('description', ''))}</p>")
    kn = data.get("knn")
    if kn:
        by = kn.get("accuracy_by_k") or {}
        rows = [[k, pct(a), pct(b)] for k, a, b in zip(by.get("ks", []), by.get("a", []),
                                                       by.get("b", []), strict=False)]
        out.append(f"<h3>k-NN (majority vote) of both kernels</h3><p>At k={kn.get('k')}: "
                   f"A {pct(kn.get('accuracy_a'))}%, B {pct(kn.get('accuracy_b'))}%; "
                   f"predictions agree on {pct(kn.get('agreement'))}% of rows (both right "
                   f"{kn.get('both_right')}, only A {kn.get('only_a_right')}, only B "
                   f"{kn.get('only_b_right')}, both wrong {kn.get('both_wrong')}).</p>"
                   + table(["k", "accuracy A (%)", "accuracy B (%)"], rows, num=(0, 1, 2)))
    dis = data.get("disagreements") or []
    if dis:
        def pred(d: dict, side: str) -> Raw:
            ok = d.get(f"pred_{side}") == d.get("label")
            return Raw(f'<span class="{"good" if ok else "bad"}">'
                       f'{RIGHT if ok else WRONG} {e(d.get(f"pred_{side}_name", ""))}</span>')

        rows = [[d.get("row"), d.get("label_name", d.get("label")), pred(d, "a"),
                 pred(d, "b"), f"{d.get('jaccard', 0):.3f}"] for d in dis[:10]]
        out.append(f"<h3>Where the predictions differ (lowest overlap first; {len(dis)} "
                   "listed in compare.json)</h3>"
                   + table(["row", "label", "A predicts", "B predicts", "Jaccard"], rows,
                           num=(0, 4)))
    rest = _scalars(data, skip=known)
    if rest:
        out.append("<h3>Other numbers of compare.json</h3>"
                   + table(["key", "value"], rest))
    return "".join(out)
