"""Edit strips of a directions file where only some directions carry a calibrated strength: each
strip has its own columns (calibrated multiples or the file's scales), all sampled together, and
equals edit_grids of its direction alone (to one grey level: the batches differ)."""
from __future__ import annotations

import numpy as np
import torch

from pipeline.formats.directions import Directions
from pipeline.stages.edit import CALIBRATED_MULTIPLES, edit_grids, edit_strips, render_edits, strip_rows


def test_mixed_calibrated_and_suggested_scales(tmp_path, tiny_model):
    model = tiny_model(steps=2)
    torch.manual_seed(0)
    vectors = torch.randn(2, model.num_steps, *model.h_shape)
    d = Directions(vectors, ["a", "b"], "supervised", [int(t) for t in model.timesteps],
                   params={"scales": [0.0, 2.0], "calibration": {"scales": {"a": 1.5}}})
    paths = render_edits(model, d, ["a", "b"], [3, 4], None, tmp_path)
    assert [p.name for p in paths] == ["a.png", "b.png"] and all(p.exists() for p in paths)

    rows = strip_rows(d, ["a", "b"], None)
    assert [cols for _, _, cols in rows] == [[1.5 * m for m in CALIBRATED_MULTIPLES], [0.0, 2.0]]
    a, b = edit_strips(model, [3, 4], [(v, cols) for _, v, cols in rows], batch_size=5)  # batches across both rows
    a_alone = edit_grids(model, [3, 4], [vectors[0]], [[1.5 * m for m in CALIBRATED_MULTIPLES]])[0]
    b_alone = edit_grids(model, [3, 4], [vectors[1]], [[0.0, 2.0]])[0]
    assert a.shape == a_alone.shape and b.shape == b_alone.shape == (2, 2, *a.shape[2:])
    assert np.abs(a.astype(int) - a_alone.astype(int)).max() <= 1
    assert np.abs(b.astype(int) - b_alone.astype(int)).max() <= 1
    assert (b[:, 0] == a[:, CALIBRATED_MULTIPLES.index(0.0)]).all()  # the one plain sample, shared by both rows
