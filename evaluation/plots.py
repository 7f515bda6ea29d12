"""Plots of the evaluation and the report (matplotlib)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.ticker import NullFormatter

from pipeline.formats.figures import plt, save_figure


def effect_heatmaps(sections: list[tuple[str, pd.DataFrame, pd.DataFrame]], out: Path, unit: str,
                    signed: bool = False) -> Path:
    """One heatmap per section (rows: applied direction, columns: measured attribute), values
    written in the cells, the strongest effect of each row outlined. ``signed``: signed
    changes on a diverging scale centred on 0 (the strongest is the largest in magnitude)."""
    vmax = max(float(np.abs(m.values).max()) for _, m, _ in sections) or 1.0
    vmin, cmap = (-vmax, "RdBu_r") if signed else (0, "viridis")
    ncol = len(sections[0][1].columns)
    rows = [len(m) for _, m, _ in sections]
    fig, axes = plt.subplots(len(sections), 1, figsize=(1.6 + 0.75 * ncol, 1.2 + 0.38 * sum(rows) + 0.5 * len(sections)),
                             squeeze=False, layout="constrained", gridspec_kw={"height_ratios": rows})
    for ax, (title, mean, _std) in zip(axes[:, 0], sections):
        im = ax.imshow(mean.values, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
        ax.set_xticks(range(ncol), mean.columns, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(mean.index)), mean.index, fontsize=8)
        ax.set_title(title, fontsize=9, loc="left")
        best = np.abs(mean.values).argmax(axis=1)
        for i in range(len(mean.index)):
            for j in range(ncol):
                v = mean.values[i, j]
                light = abs(v) < 0.6 * vmax if signed else v > 0.6 * vmax  # is the cell's colour light?
                ax.text(j, i, f"{v:+.2f}" if signed else f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if light else "white", fontweight="bold" if j == best[i] else "normal")
            ax.add_patch(plt.Rectangle((best[i] - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="#ff5a36", lw=2))
    label = "mean change" if signed else "|mean change|"
    fig.colorbar(im, ax=axes[:, 0].tolist(), shrink=0.9, label=f"{label} (SD)" if "standard" in unit else label)
    return save_figure(fig, out)


def pca_vs_random_plot(pvr: pd.DataFrame, out: Path) -> Path:
    """Left: consistent attribute change per unit of pixel change per direction; right: consistent
    attribute change against pixel change (log x), so norm-matched random directions (tiny changes) and
    pixel-matched ones (same change as their component) are both placed against PCA."""
    styles = {"pca": ("#1f77b4", "PCA"), "random": ("#bbbbbb", "random, norm-matched"),
              "random_pixel": ("#666666", "random, pixel-matched")}
    fig, (bar, sc) = plt.subplots(1, 2, figsize=(9.5, 3.2), layout="constrained")
    bar.bar(range(len(pvr)), pvr.effect_per_pixel_change, color=[styles[f][0] for f in pvr.family])
    bar.set_xticks(range(len(pvr)), pvr.direction, rotation=40, ha="right", fontsize=7)
    bar.set_ylabel("consistent attribute change / pixel change", fontsize=8)
    bar.grid(alpha=0.3, axis="y")
    for family, (color, label) in styles.items():
        part = pvr[pvr.family == family]
        if not part.empty:
            sc.scatter(part.pixel_change, part.consistent_effect, color=color, label=label, s=28, edgecolor="k", lw=0.4)
    sc.set_xscale("log")
    sc.xaxis.set_minor_formatter(NullFormatter())  # labels at 2, 3, 4, 6 x 10^k overlap at this width
    changes = pvr.pixel_change[pvr.pixel_change > 0]
    if len(changes):  # whole decades, so that at least two major ticks are labelled
        sc.set_xlim(10 ** np.floor(np.log10(changes.min())), 10 ** np.ceil(np.log10(changes.max())))
    sc.set_xlabel("mean absolute pixel change", fontsize=8)
    sc.set_ylabel("largest consistent attribute change (SD)", fontsize=8)
    sc.grid(alpha=0.3)
    sc.legend(fontsize=7)
    fig.suptitle("PCA directions against random directions (paper Fig. 6)", fontsize=9)
    return save_figure(fig, out)
