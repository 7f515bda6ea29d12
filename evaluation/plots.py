"""Plots of the evaluation and the report (matplotlib)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.ticker import NullFormatter

from evaluation.tables import number
from pipeline.formats.figures import FONT_PT, plt, save_figure, styled


@styled
def effect_heatmaps(sections: list[tuple[str, pd.DataFrame, pd.DataFrame]], out: Path, unit: str,
                    signed: bool = False, agree: list[np.ndarray] | None = None) -> Path:
    """One heatmap per section (rows: applied direction, columns: measured attribute), values
    written in the cells, the strongest effect of each row outlined. ``signed``: signed
    changes on a diverging scale centred on 0 (the strongest is the largest in magnitude);
    ``agree``: per section, (rows, attributes) bool, False where the seed sets disagree on the sign
    (those values are written in italics with a "~")."""
    vmax = max(float(np.abs(m.values).max()) for _, m, _ in sections) or 1.0
    vmin, cmap = (-vmax, "RdBu_r") if signed else (0, "viridis")
    ncol = len(sections[0][1].columns)
    rows = [len(m) for _, m, _ in sections]
    fig, axes = plt.subplots(len(sections), 1, figsize=(2.2 + 0.8 * ncol, 1.3 + 0.42 * sum(rows) + 0.5 * len(sections)),
                             squeeze=False, layout="constrained", gridspec_kw={"height_ratios": rows})
    for k, (ax, (title, mean, _std)) in enumerate(zip(axes[:, 0], sections)):
        im = ax.imshow(mean.values, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
        ax.set_xticks(range(ncol), mean.columns, rotation=30, ha="right")
        ax.set_yticks(range(len(mean.index)), mean.index)
        ax.set_title(title, loc="left")
        best = np.abs(mean.values).argmax(axis=1)
        for i in range(len(mean.index)):
            for j in range(ncol):
                v = mean.values[i, j]
                light = abs(v) < 0.6 * vmax if signed else v > 0.6 * vmax  # is the cell's colour light?
                flips = agree is not None and not agree[k][i, j]
                text = number(v, "{:+.2f}" if signed else "{:.2f}").replace("+0.00", "0.00")
                text = f"~{text}" if flips else text
                ax.text(j, i, text, ha="center", va="center", color="black" if light else "white",
                        fontweight="bold" if j == best[i] else "normal", fontstyle="italic" if flips else "normal")
            ax.add_patch(plt.Rectangle((best[i] - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="#ff5a36", lw=2))
    label = "mean change" if signed else "|mean change|"
    fig.colorbar(im, ax=axes[:, 0].tolist(), shrink=0.9, label=f"{label} (SD)" if "standard" in unit else label)
    if signed and agree is not None:
        fig.suptitle("~ italic: the seed sets disagree on the sign", x=0.02, ha="left", fontsize=FONT_PT)
    return save_figure(fig, out)


@styled
def pca_vs_random_plot(pvr: pd.DataFrame, out: Path) -> Path:
    """Left: consistent attribute change per unit of pixel change per direction; right: consistent
    attribute change against pixel change (log x), so norm-matched random directions (tiny changes) and
    pixel-matched ones (same change as their component) are both placed against PCA."""
    styles = {"pca": ("#1f77b4", "o", "PCA"), "random": ("#bbbbbb", "s", "random, norm-matched"),
              "random_pixel": ("#555555", "D", "random, pixel-matched")}
    fig, (bar, sc) = plt.subplots(1, 2, figsize=(8.6, 4.0), layout="constrained")
    bar.bar(range(len(pvr)), pvr.effect_per_pixel_change, color=[styles[f][0] for f in pvr.family])
    names = [d.replace("-pixmatch", "-pm") for d in pvr.direction]
    bar.set_xticks(range(len(pvr)), names, rotation=50, ha="right")
    bar.set_ylabel("consistent change / pixel change")
    bar.grid(alpha=0.3, axis="y")
    for family, (color, marker, label) in styles.items():
        part = pvr[pvr.family == family]
        if not part.empty:
            sc.scatter(part.pixel_change, part.consistent_effect, color=color, marker=marker, label=label, s=40,
                       edgecolor="k", lw=0.5)
    sc.set_xscale("log")
    sc.xaxis.set_minor_formatter(NullFormatter())  # labels at 2, 3, 4, 6 x 10^k overlap at this width
    changes = pvr.pixel_change[pvr.pixel_change > 0]
    if len(changes):  # whole decades, so that at least two major ticks are labelled
        sc.set_xlim(10 ** np.floor(np.log10(changes.min())), 10 ** np.ceil(np.log10(changes.max())))
    sc.set_xlabel("mean absolute pixel change")
    sc.set_ylabel("consistent change (SD)")
    sc.grid(alpha=0.3)
    fig.legend(*sc.get_legend_handles_labels(), loc="outside lower center", ncol=3, frameon=False)
    fig.suptitle("PCA against random directions (paper Fig. 6); -pm: pixel-matched")
    return save_figure(fig, out)
