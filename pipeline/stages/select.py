"""`hspace select`: per attribute, the top n and bottom n samples by annotator score.

Writes ``<run_dir>/selection.parquet`` (attribute, side, rank, sample_id, score), which the
supervised stage reads, and a contact sheet per attribute,
``<run_dir>/contact_sheets/<attribute>.png``, for a person to check the annotator by eye.
``select.balance`` names a conditioning attribute (e.g. gender): each side then takes half
its samples from either class of that attribute, so the direction is not dragged along it.
``select.resolution`` ranks scores rounded to that step: a saturated classifier's last digits
(0.99998 against 0.99991) are not evidence of more of the attribute, but they do follow
whatever else makes the classifier sure (on the toy default, "most certainly glasses" meant
"also a hat, facing the viewer"), so ranking by them selects other attributes too. Rounded
ties fall back to sample-id order, which is unrelated to content (ids are seeds).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import ConfigError, DatasetError
from ..io import atomic_path
from ..selection import selection_table
from .annotate import load_annotations


def load_selection(run_dir) -> pd.DataFrame:
    path = Path(run_dir) / "selection.parquet"
    if not path.exists():
        raise DatasetError(f"{path} does not exist; run `hspace select run_dir={run_dir}` first")
    return pd.read_parquet(path)


def contact_sheet(selection: pd.DataFrame, attribute: str, images: dict[int, np.ndarray], out: Path,
                  per_side: int = 10) -> Path:
    """A labelled PNG: the ``per_side`` most extreme samples on each side, with their scores."""
    from ..figures import image_grid_figure, save_figure

    sel = selection[selection.attribute == attribute]
    grid, titles = [], []
    for side in ("top", "bottom"):
        part = sel[sel.side == side].sort_values("rank").head(per_side)
        grid.append([images[int(i)] for i in part.sample_id])
        titles.append([f"{v:.2f}" for v in part.score])
    fig = image_grid_figure(grid, row_labels=["top", "bottom"], cell_titles=titles,
                            title=f"{attribute}: highest (top) and lowest (bottom) scores")
    return save_figure(fig, out)


def run_select(cfg) -> pd.DataFrame:
    from ..samples import iter_samples

    run_dir = Path(cfg.run_dir)
    annotations = load_annotations(run_dir)
    attributes = list(cfg.select.attributes) or [c for c in annotations.columns if c != "sample_id"]
    table = selection_table(annotations, attributes, cfg.select.n, cfg.select.balance, cfg.select.threshold,
                            cfg.select.resolution)
    out = run_dir / "selection.parquet"
    with atomic_path(out) as tmp:
        table.to_parquet(tmp, index=False)
    shown = table[table["rank"] < cfg.select.contact_sheet_size]
    images = {}
    for b in iter_samples(run_dir, batch_size=256, images=True, h=False, ids=sorted(set(shown.sample_id))):
        images.update(zip(b["sample_id"].tolist(), b["images"]))
    sheets = [contact_sheet(table, a, images, run_dir / "contact_sheets" / f"{a}.png", cfg.select.contact_sheet_size)
              for a in attributes]
    print(f"hspace select: top/bottom {cfg.select.n} for {len(attributes)} attributes -> {out}; "
          f"contact sheets in {sheets[0].parent}")
    return table
