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
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import DatasetError
from pipeline.formats.identity import parquet_table, verify
from pipeline.io import atomic_path
from pipeline.methods.selection import selection_table
from pipeline.registry import COMMANDS
from pipeline.stages.annotate import load_annotations


def load_selection(run_dir) -> pd.DataFrame:
    """The selection, checked to come from the annotations of the samples in ``run_dir`` now."""
    path = Path(run_dir) / "selection.parquet"
    if not path.exists():
        raise DatasetError(f"{path} does not exist; run `hspace select run_dir={run_dir}` first")
    verify(run_dir, path.name)
    return pd.read_parquet(path)


def contact_sheet(selection: pd.DataFrame, attribute: str, images: dict[int, np.ndarray], out: Path,
                  per_side: int = 10) -> Path:
    """A labelled PNG: the ``per_side`` most extreme samples on each side, with their scores."""
    from pipeline.formats.figures import image_grid_figure, save_figure

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
    """selection.parquet (written last, with its identity record) and one contact sheet per attribute
    (the folder replaced as a whole: sheets of attributes no longer selected go)."""
    from pipeline.formats.samples import iter_samples

    run_dir = Path(cfg.run_dir)
    annotations = load_annotations(run_dir)
    record = COMMANDS["select"].identity(cfg)
    attributes = list(cfg.select.attributes) or [c for c in annotations.columns if c != "sample_id"]
    table = selection_table(annotations, attributes, cfg.select.n, cfg.select.balance, cfg.select.threshold,
                            cfg.select.resolution)
    shown = table[table["rank"] < cfg.select.contact_sheet_size]
    images = {}
    for b in iter_samples(run_dir, batch_size=256, images=True, h=False, ids=sorted(set(shown.sample_id))):
        images.update(zip(b["sample_id"].tolist(), b["images"]))
    sheets = run_dir / "contact_sheets"
    with atomic_path(sheets) as tmp:
        tmp.mkdir()
        for a in attributes:
            contact_sheet(table, a, images, tmp / f"{a}.png", cfg.select.contact_sheet_size)
    out = run_dir / "selection.parquet"
    arrow = pa.Table.from_pandas(table, preserve_index=False)
    with atomic_path(out) as tmp:
        pq.write_table(parquet_table(arrow, record), tmp)
    print(f"hspace select: top/bottom {cfg.select.n} for {len(attributes)} attributes -> {out}; "
          f"contact sheets in {sheets}")
    return table
