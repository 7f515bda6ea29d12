"""Matplotlib figures shared by the stages and the report: labelled image grids, the PCA stage's
explained-variance plot, curves per attribute (convergence with n, effect against n, probes per
step), atomic saving."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pipeline.io import atomic_path  # noqa: E402


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Save a figure as PNG atomically and close it."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def image_grid_figure(images: np.ndarray, row_labels: Sequence[str] = (), col_labels: Sequence[str] = (),
                      title: str = "", cell: float = 1.0, cell_titles: Sequence[Sequence[str]] | None = None):
    """images: (rows, cols, H, W, 3) uint8 -> a figure with row/column labels; empty cells may be None."""
    rows, cols = len(images), max(len(r) for r in images)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * cell + 0.8, rows * cell + (0.6 if title else 0.3)),
                             squeeze=False, layout="constrained")
    fig.get_layout_engine().set(w_pad=0.01, h_pad=0.01, wspace=0.01, hspace=0.02)
    for r in range(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if c < len(images[r]) and images[r][c] is not None:
                ax.imshow(images[r][c], interpolation="nearest" if images[r][c].shape[0] <= 64 else "antialiased")
            if cell_titles is not None and c < len(cell_titles[r]):
                ax.set_title(cell_titles[r][c], fontsize=7, pad=2)
            if r == 0 and c < len(col_labels):
                ax.set_title(col_labels[c] if cell_titles is None else f"{col_labels[c]}\n{cell_titles[r][c]}", fontsize=8)
        if r < len(row_labels):
            axes[r][0].set_ylabel(row_labels[r], fontsize=8, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def explained_variance_plot(ratio: np.ndarray, timesteps, out: Path, k: int = 10) -> Path:
    """ratio: (T, K) explained variance ratio per step and component."""
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    T = ratio.shape[0]
    cmap = plt.get_cmap("viridis")
    for j in range(min(k, ratio.shape[1])):
        ax.plot(range(T), ratio[:, j], "-o", ms=2.5, lw=1, color=cmap(j / max(1, min(k, ratio.shape[1]) - 1)),
                label=f"PC{j + 1}")
    ax.set_xticks(range(0, T, max(1, T // 10)), [str(timesteps[i]) for i in range(0, T, max(1, T // 10))], fontsize=7)
    ax.set_xlabel("timestep (step index 0 = first, noisiest)", fontsize=8)
    ax.set_ylabel("explained variance ratio", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    ax.set_title("PCA of h per step", fontsize=9)
    return save_figure(fig, out)


SERIES_STYLES = ("-o", "--s")  # the first space (h) solid with circles, the one it is compared with dashed with squares


def curves_by_attribute(table, y: str, out: Path, *, ylabel: str, x: str = "n", yerr: str | None = None,
                        spaces: Sequence[tuple[str, str]] = (("h", "h-space"), ("x_T", "x_T-space")),
                        timesteps: Sequence[int] | None = None, baseline: float | str | None = None,
                        highlight: str | None = None, title: Callable | None = None, size: tuple[float, float] = (2.6, 2.6),
                        sharey: bool = True) -> Path:
    """One panel per attribute (``table.attribute``, in order of appearance), one curve per space
    (``spaces``: (value of ``table.space``, legend label)) of ``y`` against ``x``, with error bars
    ``yerr`` when given; saved to ``out``.

    x axis: without ``timesteps``, a log axis ticked at the values of ``x`` (n per side); with them,
    step indices labelled by their timestep. baseline: a number (a solid grey line there) or a
    column whose mean over the panel's rows is drawn dotted (e.g. ``chance``). highlight: a bool
    column; the first space's points where it is true get an open black circle. title(attribute,
    rows) -> the panel's title (default: the attribute). size: (width, height) of a panel in inches."""
    attrs = list(dict.fromkeys(table.attribute))
    steps = int(table[x].max()) + 1 if timesteps is not None else 0
    fig, axes = plt.subplots(1, len(attrs), figsize=(size[0] * len(attrs), size[1]), squeeze=False, sharey=sharey)
    for ax, attr in zip(axes[0], attrs):
        rows = table[table.attribute == attr]
        for (space, label), style in zip(spaces, SERIES_STYLES):
            c = rows[rows.space == space].sort_values(x, kind="stable")
            if c.empty:
                continue
            if yerr is None:
                ax.plot(c[x], c[y], style, ms=3, lw=1.2, label=label)
            else:
                ax.errorbar(c[x], c[y], yerr=c[yerr], fmt=style, ms=3, capsize=2, label=label)
            if highlight is not None and space == spaces[0][0] and highlight in c:
                marked = c[c[highlight].astype(bool)]
                ax.plot(marked[x], marked[y], "o", ms=6, mfc="none", color="k", lw=0)
        if isinstance(baseline, str):
            level = rows[baseline].dropna()
            if len(level):
                ax.axhline(float(level.mean()), color="grey", lw=0.8, ls=":")
        elif baseline is not None:
            ax.axhline(baseline, color="grey", lw=0.8)
        _x_axis(ax, sorted(set(rows[x])), timesteps, steps)
        ax.set_title(attr if title is None else title(attr, rows), fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel, fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, out)


def _x_axis(ax, values: list, timesteps: Sequence[int] | None, steps: int) -> None:
    """A log axis ticked at ``values`` (n per side), or with ``timesteps``, steps 0..steps-1 labelled by timestep."""
    if timesteps is None:
        ax.set_xscale("log")
        ax.set_xticks(values, [str(v) for v in values])
        ax.minorticks_off()
        ax.set_xlabel("n per side", fontsize=8)
        return
    ticks = list(range(0, steps, max(1, steps // 5)))
    ax.set_xticks(ticks, [str(timesteps[i]) if i < len(timesteps) else str(i) for i in ticks], fontsize=7)
    ax.set_xlabel("timestep (left: first, noisiest step)", fontsize=7)
