"""The report's HTML tables, shared by the page (:mod:`pipeline.stages.report`) and its sections
(:mod:`evaluation.semantics`, :mod:`evaluation.dose`)."""
from __future__ import annotations

import html

import pandas as pd


def df_html(df: pd.DataFrame, floatfmt: str = "{:.3f}", index: bool = False) -> str:
    cols = ([df.index.name or ""] if index else []) + [str(c) for c in df.columns]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    rows = []
    for idx, r in df.iterrows():
        cells = ([f"<td>{html.escape(str(idx))}</td>"] if index else [])
        for v in r.values:
            cells.append(f"<td>{floatfmt.format(v) if isinstance(v, float) else html.escape(str(v))}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def table1_html(table: pd.DataFrame) -> str:
    """table1.csv (family, direction, <attr>..., <attr>_std...) -> the paper's layout."""
    attrs = [c for c in table.columns if c not in ("family", "direction") and not c.endswith("_std")]
    out = ["<table><thead><tr><th>Edit \\ Effect</th>" + "".join(f"<th>{html.escape(a)}</th>" for a in attrs)
           + "</tr></thead><tbody>"]
    for family, title in (("original", "Original directions"), ("disentangled", "Disentangled directions")):
        rows = table[table.family == family]
        if rows.empty:
            continue
        out.append(f'<tr class="section"><td colspan="{len(attrs) + 1}">{title}</td></tr>')
        for _, r in rows.iterrows():
            best = max(attrs, key=lambda a: r[a])
            cells = "".join(f'<td class="{"best" if a == best else ""}">{r[a]:.2f} '
                            f'<span class="pm">± {r[a + "_std"]:.2f}</span></td>' for a in attrs)
            out.append(f"<tr><td>{html.escape(str(r.direction))}</td>{cells}</tr>")
    return "".join(out) + "</tbody></table>"
