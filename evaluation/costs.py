"""The report's "Where the time went" section: each stage's wall time, U-Net evaluations and
images/s from ``<run_dir>/timings.json`` (written by :mod:`pipeline.cost`)."""
from __future__ import annotations

import html

from pipeline.cost import COLUMNS, read_timings, rows


def costs_html(run_dir, order=None, link: str = "<code>timings.json</code>") -> str | None:
    """A small HTML table of the recorded stage costs (None when the run directory has none); ``link``:
    how the note names ``timings.json``."""
    body = rows(read_timings(run_dir), order)
    if not body:
        return None
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label in COLUMNS)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body)
    note = ("Wall time of each stage's last run, with the U-Net evaluations it made (batch rows; a guided pass "
            "counts both halves), the images it sampled and the images its annotators scored, summed over the "
            "processes of a multi-process stage. <i>J products</i>: vectors the jacobian stage pushed through the "
            "Jacobian of the U-Net after h or its transpose (each one backward or forward pass through the U-Net's "
            "decoder). The report's own time is recorded after the page is written "
            f"({link}).")
    table = f"<table><thead><tr>{head}</tr></thead><tbody>{trs}</tbody></table>"
    return f'<p class="note">{note}</p><div class="table-wrap">{table}</div>'
