"""The report's HTML tables and the sentence on matching, shared by the page (:mod:`pipeline.stages.report`) and its sections
(:mod:`evaluation.effects`, :mod:`evaluation.semantics`, :mod:`evaluation.dose`)."""
from __future__ import annotations

import html
import math

import pandas as pd

#: column suffixes of table1*.csv that belong to an attribute's column: spread, sign agreement, noise floor
SUFFIXES = ("_std", "_agree", "_floor")


def number(v, floatfmt: str = "{:.3f}") -> str:
    """A float as the tables show it: empty for NaN, and never "-0.000" (a value that rounds to 0 has no sign)."""
    if isinstance(v, float) and math.isnan(v):
        return ""
    text = floatfmt.format(v)
    return text[1:] if text[:1] in "-+" and not text.strip("-+0.") else text


def df_html(df: pd.DataFrame, floatfmt: str = "{:.3f}", index: bool = False, headers: dict | None = None) -> str:
    """A DataFrame as an HTML table (``headers``: column -> the header shown)."""
    cols = ([df.index.name or ""] if index else []) + [str(c) for c in df.columns]
    head = "".join(f"<th>{html.escape((headers or {}).get(c, c))}</th>" for c in cols)
    rows = []
    for idx, r in df.iterrows():
        cells = ([f"<td>{html.escape(str(idx))}</td>"] if index else [])
        for v in r.values:
            cells.append(f"<td>{number(v, floatfmt) if isinstance(v, float) else html.escape(str(v))}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def attribute_columns(table: pd.DataFrame) -> list[str]:
    """The attribute columns of a table1*.csv (family, direction, <attr>..., <attr><suffix>...)."""
    return [c for c in table.columns if c not in ("family", "direction") and not c.endswith(SUFFIXES)]


def table1_html(table: pd.DataFrame, corrected: pd.DataFrame | None = None, spread: bool = True) -> str:
    """table1.csv (family, direction, <attr>..., <attr>_std...) -> the paper's layout, the strongest
    effect of each row highlighted. With ``corrected`` (table1_corrected.csv), an entry within twice
    its noise floor (``<attr>_floor``) is greyed and the floor shown on hovering."""
    attrs = attribute_columns(table)
    floors = corrected.set_index("direction") if corrected is not None else None
    out = ["<table><thead><tr><th>Edit \\ Effect</th>" + "".join(f"<th>{html.escape(a)}</th>" for a in attrs)
           + "</tr></thead><tbody>"]
    for family, title in (("original", "Original directions"), ("disentangled", "Disentangled directions")):
        rows = table[table.family == family]
        if rows.empty:
            continue
        out.append(f'<tr class="section"><td colspan="{len(attrs) + 1}">{title}</td></tr>')
        for _, r in rows.iterrows():
            best = max(attrs, key=lambda a: abs(r[a]))
            cells = []
            for a in attrs:
                floor = floors.loc[r.direction, f"{a}_floor"] if floors is not None else None
                cls = ["best"] if a == best else []
                if floor is not None and abs(r[a]) < 2 * floor:
                    cls.append("noise")
                tip = f' title="noise floor {floor:.2f}"' if floor is not None else ""
                pm = f' <span class="pm">± {r[a + "_std"]:.2f}</span>' if spread and f"{a}_std" in r else ""
                cells.append(f'<td class="{" ".join(cls)}"{tip}>{number(r[a], "{:.2f}")}{pm}</td>')
            out.append(f"<tr><td>{html.escape(str(r.direction))}</td>{''.join(cells)}</tr>")
    return "".join(out) + "</tbody></table>"


def matching_note(summary: dict) -> str:
    """One sentence: how every section matches a direction to its attribute, and the matches of the
    directions whose name is not their attribute's (PCA and random ones)."""
    matched = summary.get("matched") or {}
    shown = ", ".join(f"{html.escape(d)} &rarr; {html.escape(a)}" for d, a in matched.items() if d.split("|")[0] != a)
    return ("One matching of directions to attributes serves every section (<code>evaluation.metrics.matched_attributes</code>): "
            "a supervised or disentangled direction is matched to its own attribute; a PCA or random one to the "
            "attribute it moves most consistently (noise-corrected |mean change|) at the scale it was applied to on "
            "the most seeds (its Fig. 6 scale)" + (f": {shown}." if shown else "."))
