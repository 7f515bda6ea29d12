"""Matplotlib figures shared by the stages and the report: labelled image grids, the PCA stage's
explained-variance plot, atomic saving."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

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
