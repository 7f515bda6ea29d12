"""Matplotlib figures shared by the stages and the report: one style, labelled image grids, panels
per attribute (curves against n or the step), the PCA stage's explained-variance plot, atomic saving.

Every figure is drawn for the report's page: at most ``PAGE_WIDTH_IN`` inches wide at ``DPI``, so
that the page shows it at its natural size (one PNG pixel per CSS pixel) on a 1,000-px window, with
text of at least ``FONT_PT`` points (``FONT_PT * DPI / 72`` = 14 px there, the body text's size).
Plot functions draw inside :func:`style` (or are :func:`styled`); :func:`save_figure` writes the smallest font size the
figure uses into the PNG (``hspace:min_font_pt``), so that a test can check what a reader sees.
"""
from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import Callable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from pipeline.io import atomic_path  # noqa: E402

#: pixels per inch of every saved figure (stored in the PNG)
DPI = 100
#: the widest figure the report shows unscaled on a 1,000-px window
PAGE_WIDTH_IN = 8.6
#: the smallest text of a figure, in points
FONT_PT = 10
STYLE = {"font.size": FONT_PT, "axes.titlesize": FONT_PT + 1, "axes.labelsize": FONT_PT, "xtick.labelsize": FONT_PT,
         "ytick.labelsize": FONT_PT, "legend.fontsize": FONT_PT, "legend.title_fontsize": FONT_PT,
         "figure.titlesize": FONT_PT + 2, "lines.markersize": 5}
#: PNG text key holding the smallest font size (points) of a saved figure
MIN_FONT_KEY = "hspace:min_font_pt"


def style():
    """A context in which figures are drawn in the shared style (``STYLE``'s font sizes)."""
    return plt.rc_context(STYLE)


def styled(fn):
    """``fn`` draws its figure in :func:`style`."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with style():
            return fn(*args, **kwargs)
    return wrapper


def min_font_pt(fig) -> float:
    """The smallest font size (points) of the figure's visible, non-empty texts."""
    sizes = [t.get_fontsize() for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
    return float(min(sizes)) if sizes else float("nan")


def save_figure(fig, path: str | os.PathLike, dpi: int = DPI) -> Path:
    """Save a figure as PNG atomically (its smallest font size in the PNG's metadata) and close it."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight",
                        metadata={MIN_FONT_KEY: f"{min_font_pt(fig):g}"})
    finally:
        plt.close(fig)
    return path


def scale_labels(scales: Sequence[float], calibrated: float | None = None, fixed: float | None = None,
                 unit: str = "") -> list[str]:
    """Column labels of an edit strip, on two lines: 0 is "unedited"; with a calibrated strength a scale
    reads as its multiple ("+1x cal." for the strength itself, "-2x" above "(-1.05)"); ``fixed``: the
    evaluation's fixed scale ("fixed" above "(+3)"); else the number with ``unit`` ("+2 SD")."""
    out = []
    for s in scales:
        is_fixed = fixed is not None and math.isclose(s, fixed, rel_tol=1e-6)
        if s == 0:
            out.append("unedited")
        elif calibrated and math.isclose(s / calibrated, 1, rel_tol=1e-6):
            out.append("+1× cal." + (" = fixed" if is_fixed else "") + f"\n({s:+.2g})")
        elif is_fixed:
            out.append(f"fixed\n({s:+.3g})")
        elif calibrated:
            m = s / calibrated
            near = round(m * 4) / 4  # a scale typed from a rounded strength still reads as its multiple
            out.append(f"{near if abs(m - near) <= 0.02 * abs(m) else m:+.3g}×\n({s:+.2g})")
        else:
            out.append(f"{s:+.3g}{unit}")
    return out


def attribute_panels(names: Sequence[str], ncols: int = 3, panel: tuple[float, float] = (2.8, 2.3),
                     sharey: bool = False):
    """One panel per name, ``ncols`` to a row (a page-wide figure) -> (fig, {name: ax}); the panels
    left empty are hidden. Label the left column's y axes and the bottom row's x axes with
    :func:`label_outer`."""
    ncols = max(1, min(ncols, len(names)))
    nrows = math.ceil(len(names) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel[0] * ncols, panel[1] * nrows), squeeze=False,
                             sharey=sharey, layout="constrained")
    flat = list(axes.flat)
    for ax in flat[len(names):]:
        ax.set_visible(False)
    return fig, dict(zip(names, flat))


def label_outer(axes: dict, xlabel: str, ylabel: str, ncols: int = 3) -> None:
    """x labels on the bottom panel of each column, y labels on the first column."""
    flat = list(axes.values())
    for i, ax in enumerate(flat):
        if i + ncols >= len(flat):
            ax.set_xlabel(xlabel)
        if i % ncols == 0:
            ax.set_ylabel(ylabel)


#: one line of text, in inches (10 pt at 1.35 line spacing)
LINE_IN = FONT_PT * 1.35 / 72


@styled
def image_grid_figure(images, row_labels: Sequence[str] = (), col_labels: Sequence[str] = (), title: str = "",
                      cell: float = 0.72, cell_titles: Sequence[Sequence[str]] | None = None):
    """images: (rows, cols, H, W, 3) uint8 (rows may be shorter; a cell may be None) -> a figure with row and
    column labels and, with ``cell_titles``, a title above each image. ``cell``: inches per image (0.72: 72 px,
    so that two strips of six columns fit side by side on a wide page).

    The images are pasted into one mosaic (white gutters) shown by one axes and labelled by its ticks: one axes
    is laid out and saved much faster than rows x cols of them (docs/benchmarks.md)."""
    rows, cols = len(images), max(len(r) for r in images)
    first = next(im for r in images for im in r if im is not None)
    H, W = first.shape[:2]
    px = H / cell                                      # data units (image pixels) per inch
    gap = max(1, round(0.03 * H))
    heads = [0] * rows if cell_titles is None else \
        [round(LINE_IN * px * max([1] + [str(t).count("\n") + 1 for t in cell_titles[r]])) + gap for r in range(rows)]
    tops = np.cumsum([0] + [h + H + gap for h in heads])[:-1] + np.array(heads)
    mosaic = np.full((int(tops[-1] + H), cols * (W + gap) - gap, 3), 255, np.uint8)
    for r, row in enumerate(images):
        for c, im in enumerate(row):
            if im is not None:
                mosaic[tops[r]:tops[r] + H, c * (W + gap):c * (W + gap) + W] = im
    lines = max([1] + [str(c).count("\n") + 1 for c in col_labels])
    head = (0.45 if title else 0.0) + (LINE_IN * lines if col_labels else 0.0)
    fig, ax = plt.subplots(figsize=(cols * cell * (1 + gap / W) + 1.1, mosaic.shape[0] / px + head), layout="constrained")
    fig.get_layout_engine().set(w_pad=0.01, h_pad=0.01)
    ax.imshow(mosaic, interpolation="nearest" if H <= 64 else "antialiased")
    centres = [c * (W + gap) + (W - 1) / 2 for c in range(cols)]
    ax.set_xticks(centres[:len(col_labels)], list(col_labels))
    ax.xaxis.tick_top()
    ax.set_yticks([tops[r] + (H - 1) / 2 for r in range(len(row_labels))], list(row_labels))
    ax.tick_params(length=0, pad=3)
    for side in ax.spines.values():
        side.set_visible(False)
    for r in range(rows if cell_titles is not None else 0):
        for c, text in enumerate(cell_titles[r][:len(images[r])]):
            ax.text(centres[c], tops[r] - gap / 2 - 0.5, text, ha="center", va="bottom")
    if title:
        fig.suptitle(title)
    return fig


@styled
def explained_variance_plot(ratio: np.ndarray, timesteps, out: Path, k: int = 10) -> Path:
    """ratio: (T, K) explained variance ratio per step and component."""
    fig, ax = plt.subplots(figsize=(7.5, 3.6), layout="constrained")
    T = ratio.shape[0]
    cmap = plt.get_cmap("viridis")
    shown = min(k, ratio.shape[1])
    for j in range(shown):
        ax.plot(range(T), ratio[:, j], "-o", ms=3, lw=1.2, color=cmap(j / max(1, shown - 1)), label=f"PC{j + 1}")
    ticks = range(0, T, max(1, T // 8))
    ax.set_xticks(ticks, [str(timesteps[i]) for i in ticks])
    ax.set_xlabel("timestep (left: step 0, the first and noisiest)")
    ax.set_ylabel("explained variance ratio")
    ax.grid(alpha=0.3)
    ax.legend(ncol=2, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_title("PCA of h per step")
    return save_figure(fig, out)


SERIES_STYLES = ("-o", "--s")  # the first space (h) solid with circles, the one it is compared with dashed with squares


@styled
def curves_by_attribute(table, y: str, out: Path, *, ylabel: str, x: str = "n", yerr: str | None = None,
                        spaces: Sequence[tuple[str, str]] = (("h", "h-space"), ("x_T", "x_T-space")),
                        timesteps: Sequence[int] | None = None, baseline: float | str | None = None,
                        highlight: str | None = None, title: Callable | None = None, sharey: bool = True) -> Path:
    """One panel per attribute (``table.attribute``, in order of appearance; :func:`attribute_panels`), one
    curve per space (``spaces``: (value of ``table.space``, legend label)) of ``y`` against ``x``, with error
    bars ``yerr`` when given; saved to ``out``.

    x axis: without ``timesteps``, a log axis ticked at the values of ``x`` (n per side); with them,
    step indices labelled by their timestep. baseline: a number (a solid grey line there) or a
    column whose mean over the panel's rows is drawn dotted (e.g. ``chance``). highlight: a bool
    column; the first space's points where it is true get an open black circle. title(attribute,
    rows) -> the panel's title (default: the attribute)."""
    attrs = list(dict.fromkeys(table.attribute))
    steps = int(table[x].max()) + 1 if timesteps is not None else 0
    fig, axes = attribute_panels(attrs, sharey=sharey)
    for attr, ax in axes.items():
        rows = table[table.attribute == attr]
        for (space, label), fmt in zip(spaces, SERIES_STYLES):
            c = rows[rows.space == space].sort_values(x, kind="stable")
            if c.empty:
                continue
            if yerr is None:
                ax.plot(c[x], c[y], fmt, ms=3, lw=1.2, label=label)
            else:
                ax.errorbar(c[x], c[y], yerr=c[yerr], fmt=fmt, ms=4, capsize=2, label=label)
            if highlight is not None and space == spaces[0][0] and highlight in c:
                marked = c[c[highlight].astype(bool)]
                ax.plot(marked[x], marked[y], "o", ms=7, mfc="none", color="k", lw=0,
                        label=highlight if attr == attrs[0] else None)
        if isinstance(baseline, str):
            level = rows[baseline].dropna()
            if len(level):
                ax.axhline(float(level.mean()), color="grey", lw=0.8, ls=":")
        elif baseline is not None:
            ax.axhline(baseline, color="grey", lw=0.8)
        _x_axis(ax, sorted(set(rows[x])), timesteps, steps)
        ax.set_title(attr if title is None else title(attr, rows))
        ax.grid(alpha=0.3)
    xlabel = "n per side" if timesteps is None else "timestep (left: first, noisiest step)"
    label_outer(axes, xlabel, ylabel)
    fig.legend(*axes[attrs[0]].get_legend_handles_labels(), loc="outside lower center", ncol=3, frameon=False)
    return save_figure(fig, out)


def _x_axis(ax, values: list, timesteps: Sequence[int] | None, steps: int) -> None:
    """A log axis ticked at ``values`` (n per side), or with ``timesteps``, steps 0..steps-1 labelled by timestep."""
    if timesteps is None:
        ax.set_xscale("log")
        ax.set_xticks(values, [str(v) for v in values])
        ax.minorticks_off()
        return
    ticks = list(range(0, steps, max(1, steps // 4)))
    ax.set_xticks(ticks, [str(timesteps[i]) if i < len(timesteps) else str(i) for i in ticks])
