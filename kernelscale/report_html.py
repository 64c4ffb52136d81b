"""The report's HTML primitives: escaping, tables, images, marks and the page itself.

Every table is written inside ``<div class="scroll">``, a wrapper that scrolls
horizontally (``overflow-x: auto``) when the table is wider than the screen, so a narrow
window scrolls the table and never the page. A right or wrong outcome is shown by a
symbol (:data:`RIGHT` ✓, :data:`WRONG` ✗) as well as by its colour. The page has inline
CSS, no scripts and no external assets.
"""

from __future__ import annotations

import html
import time
from collections.abc import Sequence

from .version import __version__

#: marks of a right and a wrong outcome, shown beside the colour.
RIGHT, WRONG = "✓", "✗"

CSS = """
*{box-sizing:border-box}
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1f2328;
 margin:0;background:#f6f8fa}
main{max-width:1000px;margin:0 auto;padding:24px 32px 64px;background:#fff;
 box-shadow:0 0 0 1px #e5e7eb}
@media (max-width:800px){main{padding:16px 14px 48px}body{font-size:14px}}
h1{font-size:26px;margin:8px 0 4px}h2{font-size:20px;margin:36px 0 8px;padding-top:8px;
 border-top:2px solid #e5e7eb}h3{font-size:16px;margin:22px 0 6px}
p.meta{color:#57606a;margin:0 0 12px}
nav{font-size:14px;margin:8px 0 0;display:flex;flex-wrap:wrap;gap:2px 16px}
nav a{color:#0969da;text-decoration:none;white-space:nowrap}
p.files a{color:#0969da;margin-right:4px}
.scroll{overflow-x:auto;max-width:100%;margin:8px 0 12px;-webkit-overflow-scrolling:touch}
table{border-collapse:collapse;font-size:14px}
th,td{border-bottom:1px solid #e5e7eb;padding:4px 10px;text-align:left;vertical-align:top}
th{background:#f6f8fa;font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.hl td{background:#eef6ff;font-weight:600}
table.cm td,table.cm th{padding:3px 6px;font-size:12.5px;text-align:right}
table.cm th.rowh{text-align:left;white-space:nowrap}
td.right{background:#dafbe1;color:#1a7f37;font-weight:600}
td.wrong{background:#ffebe9;color:#cf222e}td.zero{color:#afb8c1}
code,.mono{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:12.5px;
 overflow-wrap:anywhere}
.note{color:#57606a;font-size:13.5px}
.warn{background:#fff8c5;border:1px solid #eed888;padding:6px 10px;border-radius:4px}
.bad{color:#cf222e;font-weight:600}.good{color:#1a7f37}
img{max-width:100%;height:auto;display:block;margin:6px 0 10px}
.tag{display:inline-block;font-size:11.5px;padding:0 6px;border-radius:8px;
 background:#eaeef2;color:#57606a;margin-left:6px;font-weight:500}
.tag.oracle{background:#ffebe9;color:#cf222e}.tag.honest{background:#dafbe1;color:#1a7f37}
.tag.headline{background:#0969da;color:#fff}.tag.poor{background:#fff8c5;color:#7d4e00}
table.nbr td{white-space:nowrap;font-size:13px;line-height:1.35}
.idx{color:#6e7781;font-size:12px}.kv{font-variant-numeric:tabular-nums}
table.knn td:first-child,table.cls td:first-child,.nowrap{white-space:nowrap}
.scroll img.wide{max-width:none;width:900px}
.row{display:flex;gap:28px;flex-wrap:wrap;align-items:flex-start}
.row h4{margin:6px 0 0;font-size:14px}
"""


class Raw(str):
    """Content that is already HTML (not escaped again)."""


def e(x) -> str:
    """``x`` as escaped HTML text."""
    return html.escape(str(x))


def pct(x: float | None) -> str:
    """A percentage with two decimals, ``–`` for None."""
    return "–" if x is None else f"{x:.2f}"


def cell(x) -> str:
    return x if isinstance(x, Raw) else e(x)


def scroll(inner: str) -> str:
    """``inner`` (a table) inside the horizontally scrolling wrapper."""
    return f'<div class="scroll">{inner}</div>'


def table(head: Sequence[str], rows: Sequence[Sequence], num: Sequence[int] = (),
          highlight: Sequence[int] = (), cls: str = "") -> str:
    """A table in its scroll wrapper: header ``head``, body ``rows``; columns ``num``
    right-aligned, rows ``highlight`` highlighted. Cells are escaped unless :class:`Raw`."""
    attr = f' class="{cls}"' if cls else ""
    out = [f"<table{attr}><thead><tr>", *(f"<th>{cell(h)}</th>" for h in head),
           "</tr></thead><tbody>"]
    for i, r in enumerate(rows):
        hl = ' class="hl"' if i in highlight else ""
        cells = [f'<td class="num">{cell(c)}</td>' if j in num else f"<td>{cell(c)}</td>"
                 for j, c in enumerate(r)]
        out.append(f"<tr{hl}>{''.join(cells)}</tr>")
    out.append("</tbody></table>")
    return scroll("".join(out))


def kv_table(pairs: Sequence[tuple[str, object]]) -> str:
    """A two-column table of (name, value) rows, names as row headers."""
    body = "".join(f"<tr><th>{e(k)}</th><td>{cell(v)}</td></tr>" for k, v in pairs)
    return scroll(f"<table><tbody>{body}</tbody></table>")


def img(name: str | None, alt: str) -> str:
    """An image beside ``index.html``; empty without a name."""
    return f'<img src="{e(name)}" alt="{e(alt)}">' if name else ""


def mono(x) -> Raw:
    return Raw(f'<span class="mono">{e(x)}</span>')


def mark(ok: bool) -> str:
    """:data:`RIGHT` or :data:`WRONG`."""
    return RIGHT if ok else WRONG


def neighbour_table(entries: Sequence[dict], names: Sequence[str], n: int) -> str:
    """One row per test example; a cell per neighbour: label (✓ same label as the test
    example, ✗ another, in green or red), kernel value, train index."""
    n = max(1, min(n, max((len(x["neighbours"]) for x in entries), default=1)))
    head = ["test example"] + (["most similar train example"] if n == 1 else
                               [f"neighbour {j + 1}" for j in range(n)])
    rows = []
    for x in entries:
        cells = [Raw(f'<b>{e(names[x["label"]])}</b><br><span class="idx">test '
                     f'{x["test"]}</span>')]
        for nbr in x["neighbours"][:n]:
            ok = nbr["label"] == x["label"]
            cells.append(Raw(f'<span class="{"good" if ok else "bad"}">{mark(ok)} '
                             f'{e(names[nbr["label"]])}</span> '
                             f'<span class="kv">K={nbr["value"]:.3f}</span><br>'
                             f'<span class="idx">train {nbr["train"]}</span>'))
        rows.append(cells)
    return table(head, rows, cls="nbr")


def page(title: str, sections: Sequence[tuple[str, str, str]],
         files: Sequence[str]) -> str:
    """The whole document: ``sections`` (id, heading, HTML) in order behind a navigation
    bar, and links to the JSON ``files`` beside ``index.html``."""
    nav = "".join(f'<a href="#{sid}">{e(t)}</a>' for sid, t, _ in sections)
    links = " · ".join(f'<a href="{e(f)}">{e(f)}</a>' for f in files)
    body = "".join(f'<section id="{sid}"><h2>{e(t)}</h2>{content}</section>'
                   for sid, t, content in sections)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>{e(title)}</title><style>{CSS}</style></head><body><main>"
            f"<h1>{e(title)}</h1><p class='meta'>written {stamp} by kernelscale "
            f"{e(__version__)}</p><p class='files'>Every number, as JSON: {links}</p>"
            f"<nav>{nav}</nav>{body}</main></body></html>\n")
