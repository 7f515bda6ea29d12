"""Edit strips of a directions file where only some directions carry a calibrated strength: each
strip has its own columns (calibrated multiples or the file's scales) and equals edit_grids alone."""
from __future__ import annotations

import numpy as np
import torch

from pipeline.formats.directions import Directions
from pipeline.stages.edit import CALIBRATED_MULTIPLES, edit_grids, render_edits


def test_mixed_calibrated_and_suggested_scales(tmp_path, tiny_model):
    model = tiny_model(steps=2)
    torch.manual_seed(0)
    vectors = torch.randn(2, model.num_steps, *model.h_shape)
    d = Directions(vectors, ["a", "b"], "supervised", [int(t) for t in model.timesteps],
                   params={"scales": [0.0, 2.0], "calibration": {"scales": {"a": 1.5}}})
    captured = []

    import pipeline.stages.edit as edit

    real = edit.edit_grids
    edit.edit_grids = lambda *a, **k: captured.append(real(*a, **k)) or captured[-1]
    try:
        paths = render_edits(model, d, ["a", "b"], [3, 4], None, tmp_path)
    finally:
        edit.edit_grids = real
    assert [p.name for p in paths] == ["a.png", "b.png"] and all(p.exists() for p in paths)
    a_alone = edit_grids(model, [3, 4], [vectors[0]], [[1.5 * m for m in CALIBRATED_MULTIPLES]])
    b_alone = edit_grids(model, [3, 4], [vectors[1]], [[0.0, 2.0]])
    assert captured[0].shape[2] == len(CALIBRATED_MULTIPLES) and captured[1].shape[2] == 2
    np.testing.assert_array_equal(captured[0][0], a_alone[0])
    np.testing.assert_array_equal(captured[1][0], b_alone[0])
