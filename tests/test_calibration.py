"""Calibrated strengths, dose-response and `disentangle.pairs: auto`, against models and scorers of
known response: a fake model whose images move linearly with the edit, read by a linear scorer,
so every scale, slope and entanglement has an exact value."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.optimize import brentq

from evaluation.metrics import dose_response
from pipeline.formats.directions import Directions
from pipeline.methods.calibration import calibrate, entangled_with, search_scales
from pipeline.stages.disentangle import disentangle, resolve_auto

ATTRS = ("a", "b", "c")


class LinearModel:
    """h-space of shape (T=1, C=3, 1, 1); the 'image' (3, 2, 2) of a seed is its own noise (one
    value per channel, from the seed) plus ``gain`` times the edit's channels: attribute j, read
    as the mean of channel j, moves by exactly gain * scale * v[j]."""

    def __init__(self, gain: float = 2.0):
        self.gain, self.calls = gain, 0

    def base(self, seed: int) -> torch.Tensor:
        return torch.randn(3, generator=torch.Generator().manual_seed(seed))

    def iter_edits(self, pairs, batch_size: int = 64, **_):
        for start in range(0, len(pairs), batch_size):
            idx = list(range(start, min(start + batch_size, len(pairs))))
            images = []
            for i in idx:
                seed, delta = pairs[i]
                x = self.base(seed) + (0 if delta is None else self.gain * torch.as_tensor(delta).reshape(3))
                images.append(x[:, None, None].expand(3, 2, 2))
            self.calls += 1
            yield idx, torch.stack(images)


def linear_scorer(images: torch.Tensor) -> dict:
    return {a: images[:, j].mean(dim=(1, 2)) for j, a in enumerate(ATTRS)}


def vec(*v) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32).reshape(1, 3, 1, 1)


def unedited_std(model, seeds) -> np.ndarray:
    return torch.stack([model.base(s) for s in seeds]).double().std(dim=0).numpy()


class Responses:
    """measure(indices, scales) for search_scales from one response function per direction; logs the
    directions each round measured."""

    def __init__(self, *fns):
        self.fns, self.calls = fns, []

    def __call__(self, idx, scales):
        self.calls.append(list(idx))
        return np.array([self.fns[k](s) for k, s in zip(idx, scales)])


def saturating(s):
    return 1.3 * np.tanh(2.0 * s)


def convex(s):
    return 1.3 * (s / 2.0) ** 3


def step(s):
    """A binary attribute on 8 seeds: seed i flips at scale thresholds[i]; levels 0.3 std apart, none
    within 5% of 1 (0.9 and 1.2 are the nearest)."""
    return 0.3 * float(np.sum(s > np.array([0.3, 0.7, 1.1, 1.6, 2.2, 2.9, 3.5, 5.0])))


def test_search_solves_a_linear_response_in_one_step_and_a_saturating_one_within_tolerance():
    slopes = np.array([0.5, 2.0, 0.1])
    lin = search_scales(lambda idx, s: slopes[idx] * s, np.full(3, 3.0), target=1.0, rtol=1e-9, max_iter=4)
    np.testing.assert_allclose(lin["scales"], 1.0 / slopes, rtol=1e-12)
    assert lin["rounds"] == 2 and lin["converged"].all()  # the start, then the exact scale
    sat = search_scales(lambda idx, s: np.tanh(0.4 * s), np.array([3.0]), target=0.8, rtol=0.01, max_iter=6)
    assert abs(np.tanh(0.4 * sat["scales"][0]) - 0.8) <= 0.01 * 0.8
    np.testing.assert_allclose(sat["scales"][0], np.arctanh(0.8) / 0.4, rtol=0.02)


@pytest.mark.parametrize("f", [saturating, convex], ids=["saturating", "convex"])
def test_search_brackets_a_strongly_non_linear_response_and_reaches_the_target(f):
    """From the start 3, where f is 1.3 std: a secant through the last two points overshoots on
    these (its best after 6 rounds: 1.25 std for the saturating one, 0.81 for the convex one); the
    bracketed search reaches 1 std within 5%, and every point after the first one above the target
    lies inside the bracket of the points before it."""
    rtol = 0.05
    out = search_scales(Responses(f), np.array([3.0]), target=1.0, rtol=rtol, max_iter=6)
    assert out["converged"][0]
    s = out["scales"][0]
    assert abs(f(s) - 1.0) <= rtol and out["responses"][0] == f(s)
    # f is increasing: f(s) within rtol of 1 <=> s between the scales where f = 1 -/+ rtol
    assert brentq(lambda x: f(x) - (1 - rtol), 1e-6, 3.0) <= s <= brentq(lambda x: f(x) - (1 + rtol), 1e-6, 3.0)
    history = out["history"][0]
    assert history[0] == (0.0, 0.0) and history[1][0] == 3.0 and history[1][1] > 1.0
    for i in range(2, len(history)):
        below = max(x for x, fx in history[:i] if fx < 1.0)
        above = min(x for x, fx in history[:i] if fx > 1.0)
        assert below < history[i][0] < above


def test_a_step_response_ends_unconverged_at_the_measured_point_closest_to_the_target():
    """A binary attribute on few seeds: no scale reaches 1 std within 5%. The search stops at
    max_iter, or sooner once the bracket around the step has shrunk to nothing, and returns the
    measured point closest to the target: 0.9 std, the nearest level there is."""
    for max_iter in (6, 500):
        out = search_scales(Responses(step), np.array([3.0]), target=1.0, rtol=0.05, max_iter=max_iter)
        measured = out["history"][0][1:]
        assert not out["converged"][0] and len(measured) == out["rounds"] <= max_iter
        assert out["responses"][0] == pytest.approx(0.9) and (out["scales"][0], out["responses"][0]) in measured
        assert abs(out["responses"][0] - 1.0) == min(abs(fx - 1.0) for _, fx in measured)
    assert out["rounds"] < 500  # the bracket closed on the step at 1.6
    assert sorted({round(fx, 9) for _, fx in measured[-4:]}) == [0.9, 1.2]  # on both sides of it
    assert abs(measured[-1][0] - 1.6) < 1e-9


@pytest.mark.parametrize("f", [lambda s: -1.0 * s, lambda s: 0.0 * s], ids=["down", "flat"])
def test_a_direction_that_does_not_move_its_attribute_up_gets_no_scale(f):
    out = search_scales(Responses(f), np.array([3.0]), target=1.0)
    assert np.isnan(out["scales"][0]) and np.isnan(out["responses"][0]) and not out["converged"][0]
    assert out["rounds"] == 1 and len(out["history"][0]) == 2  # measured at its start only


def test_directions_searched_together_get_what_each_gets_alone():
    fns = [lambda s: 0.5 * s, saturating, convex, step, lambda s: -s, lambda s: np.sqrt(s) / 4]
    start = np.array([3.0, 3.0, 3.0, 3.0, 3.0, 1.0])  # the last one starts below its target
    measure = Responses(*fns)
    together = search_scales(measure, start, target=1.0, rtol=0.05, max_iter=6)
    alone = [search_scales(Responses(f), start[[k]], target=1.0, rtol=0.05, max_iter=6) for k, f in enumerate(fns)]
    for k, one in enumerate(alone):
        np.testing.assert_array_equal(together["scales"][k], one["scales"][0])
        np.testing.assert_array_equal(together["responses"][k], one["responses"][0])
        assert together["converged"][k] == one["converged"][0] and together["history"][k] == one["history"][0]
        # a direction is measured only until it is done
        assert sum(k in idx for idx in measure.calls) == len(one["history"][0]) - 1
    assert together["rounds"] == max(one["rounds"] for one in alone)
    assert list(together["converged"]) == [True, True, True, False, False, True]


def test_calibrate_gives_the_known_scale_and_the_planted_side_effects():
    model = LinearModel(gain=2.0)
    std_seeds = list(range(100, 140))
    seeds = std_seeds[:6]
    dirs = [vec(1.0, 0.5, 0.0), vec(0.0, 1.0, 0.0), vec(0.0, 0.0, -1.0)]  # a moves b too; c moves its attribute down
    rec = calibrate(model, linear_scorer, ["a", "b", "c"], dirs, seeds, std_seeds, start=3.0, target=1.0, rtol=1e-6,
                    max_iter=3, batch_size=5)
    std = unedited_std(model, std_seeds)
    np.testing.assert_allclose([rec["std"][a] for a in ATTRS], std, rtol=1e-9)
    # own change = gain * s * v_own / std = 1 -> s = std / (gain * v_own)
    assert rec["scales"]["a"] == pytest.approx(std[0] / 2.0, rel=1e-6)  # float32 images
    assert rec["scales"]["b"] == pytest.approx(std[1] / 2.0, rel=1e-6)  # float32 images
    assert rec["scales"]["c"] is None and rec["effects"]["c"] is None  # it moves c down: no positive scale
    assert rec["effects"]["a"]["b"] == pytest.approx(2.0 * rec["scales"]["a"] * 0.5 / std[1], rel=1e-6)  # float32 images
    assert rec["effects"]["a"]["c"] == pytest.approx(0.0, abs=1e-6) and rec["se"]["a"]["b"] == pytest.approx(0, abs=1e-6)
    assert rec["rounds"] == 2 and rec["converged"]["a"]


def test_auto_conditions_exactly_on_the_planted_entanglements():
    model = LinearModel(gain=1.0)
    std_seeds = list(range(200, 264))
    names = ["a", "b", "c"]
    # a moves b by 0.6 of its own change (in raw units), b moves nothing else, c moves a by 0.05 (below threshold)
    dirs = [vec(1.0, 0.6, 0.0), vec(0.0, 1.0, 0.0), vec(0.05, 0.0, 1.0)]
    rec = calibrate(model, linear_scorer, names, dirs, std_seeds[:4], std_seeds, start=1.0, rtol=1e-6)
    d = Directions(torch.stack(dirs), names, "supervised", [0], params={"calibration": rec})
    std = unedited_std(model, std_seeds)
    assert rec["effects"]["a"]["b"] == pytest.approx(0.6 * std[0] / std[1], rel=1e-6)
    assert abs(rec["effects"]["c"]["a"]) < 0.25 <= abs(rec["effects"]["a"]["b"])
    pairs, choices = resolve_auto(d, "auto", threshold=0.25)
    assert pairs == {"a": ["b"], "b": [], "c": []}
    assert choices["a"]["entanglement"] == {"b": pytest.approx(rec["effects"]["a"]["b"])}
    result = disentangle(d, pairs)
    assert result.names == ["a|b", "b|none", "c|none"]
    torch.testing.assert_close(result.directions[1], dirs[1])  # no measured entanglement: unchanged
    torch.testing.assert_close(result.directions[2], dirs[2])
    torch.testing.assert_close(result.directions[0], vec(1.0, 0.0, 0.0))  # a with b's direction projected out
    # a threshold above every side effect leaves all as they are; explicit lists stay as given
    assert resolve_auto(d, "auto", threshold=10.0)[0] == {"a": [], "b": [], "c": []}
    assert resolve_auto(d, {"a": "auto", "c": ["b"]}, threshold=0.25)[0] == {"a": ["b"], "c": ["b"]}


def test_entanglement_needs_both_the_threshold_and_two_standard_errors():
    rec = {"effects": {"x": {"x": 1.0, "y": 0.5, "z": 0.3}}, "se": {"x": {"x": 0.1, "y": 0.3, "z": 0.1}}}
    assert entangled_with(rec, "x", {"y": "y", "z": "z"}, threshold=0.25) == {"z": 0.3}  # y: 0.5 < 2 x 0.3


def test_dose_response_of_a_linear_scorer_has_the_known_slope():
    """Per-seed changes = slope * scale (+ zero-mean per-seed noise): the own effect at each scale is
    slope * scale / std exactly, the largest side effect the other attribute's, the curve starts at 0."""
    rows = []
    noise = np.array([-0.2, 0.0, 0.2])
    for s in (-2.0, 1.0, 3.0):
        for j, seed in enumerate((5, 6, 7)):
            rows.append({"repeat": 0, "seed": seed, "direction": "a", "family": "original", "scale": s,
                         "pixel_change": 0.01 * abs(s), "quality_before": 1.0, "quality_after": 1.0 + 0.1 * abs(s),
                         "d_a": 0.7 * s + noise[j], "d_b": -0.2 * s})
            rows.append({"repeat": 0, "seed": seed, "direction": "pc1", "family": "pca", "scale": s,
                         "pixel_change": 0.02 * abs(s), "quality_before": 1.0, "quality_after": 1.0,
                         "d_a": 0.1 * s, "d_b": 0.4 * s + noise[j]})
    curves = dose_response(pd.DataFrame(rows), {"a": 2.0, "b": 0.5}, n_boot=50).set_index(["direction", "scale"])
    for s in (-2.0, 1.0, 3.0):
        assert curves.loc[("a", s), "own"] == pytest.approx(0.7 * s / 2.0)
        assert curves.loc[("a", s), "side"] == pytest.approx(0.2 * abs(s) / 0.5)
        assert curves.loc[("a", s), "side_attribute"] == "b"
        assert curves.loc[("pc1", s), "attribute"] == "b"  # matched to the attribute it moves most
        assert curves.loc[("pc1", s), "own"] == pytest.approx(0.4 * s / 0.5)
        assert curves.loc[("a", s), "pixel_change"] == pytest.approx(0.01 * abs(s))
        assert curves.loc[("a", s), "own_low"] <= curves.loc[("a", s), "own"] <= curves.loc[("a", s), "own_high"]
    assert curves.loc[("a", 0.0), "own"] == 0.0 and curves.loc[("a", 0.0), "quality"] == 1.0
    slope = np.polyfit([-2.0, 0.0, 1.0, 3.0], curves.loc["a"].sort_index()["own"], 1)[0]
    assert slope == pytest.approx(0.7 / 2.0)


def test_edit_and_explore_start_from_the_calibrated_strength():
    from pipeline.stages.edit import default_scales

    d = Directions(torch.zeros(2, 1, 3, 1, 1), ["a", "b"], "supervised", [0],
                   params={"scales": [-3.0, 0.0, 3.0], "calibration": {"scales": {"a": 0.5, "b": None}}})
    assert default_scales(d, 0) == [-1.0, -0.5, 0.0, 0.5, 1.0]  # -2..2 times the calibrated strength
    assert default_scales(d, 1) == [-3.0, 0.0, 3.0]  # no calibrated strength: the file's suggested scales


def test_stored_strengths_apply_to_the_file_of_their_content_only(tmp_path):
    """calibration/strengths.json holds each file's strengths under its content hash: a reader gets them for
    that file (still after a user labels a direction), not for a file of other content, and a non-finite
    strength is refused naming the file and the stage to re-run."""
    import json

    from pipeline.errors import DatasetError
    from pipeline.formats.directions import (
        CALIBRATION,
        calibration_entry,
        label_direction,
        load_directions,
        save_directions,
        with_calibration,
    )

    run = tmp_path / "run"
    path, other = run / "directions" / "supervised.safetensors", tmp_path / "elsewhere" / "supervised.safetensors"
    d = Directions(torch.ones(2, 1, 3, 1, 1), ["a", "b"], "supervised", [0], params={"scales": [-3.0, 3.0]})
    save_directions(d, path)
    save_directions(Directions(2 * torch.ones(2, 1, 3, 1, 1), ["a", "b"], "supervised", [0]), other)
    record = {"scales": {"a": 0.5, "b": None}, "key": "k"}
    (run / "calibration").mkdir()
    (run / CALIBRATION).write_text(json.dumps({"files": {"supervised": {**calibration_entry(path), "record": record}}}))
    assert with_calibration(load_directions(path), path, run).params["calibration"] == record
    assert load_directions(path).params == {"scales": [-3.0, 3.0]}  # the file itself is as it was written
    assert "calibration" not in with_calibration(load_directions(other), other, run).params
    assert "calibration" not in with_calibration(load_directions(path), path, tmp_path / "no-run").params
    label_direction(path, 0, "smile")
    assert with_calibration(load_directions(path), path, run).params["calibration"] == record
    record["scales"]["a"] = float("nan")
    (run / CALIBRATION).write_text(json.dumps({"files": {"supervised": {**calibration_entry(path), "record": record}}}))
    with pytest.raises(DatasetError, match="direction 'a' has a calibrated strength of nan.*hspace calibrate"):
        with_calibration(load_directions(path), path, run)


def test_a_reused_evaluation_folder_loses_what_the_calibrated_part_writes_now(tmp_path):
    """evaluation/ of an earlier version held the calibrated tables, the sweep and its strips: the fixed-scale
    evaluation removes them (they live in evaluation-calibrated/ now) and keeps its own files."""
    from pipeline.stages.evaluate import drop_moved

    out = tmp_path / "evaluation"
    (out / "strips" / "supervised").mkdir(parents=True)
    moved = ["table1_calibrated.md", "table1_calibrated_signed.csv", "disentanglement_calibrated.csv", "dose_response.csv",
             "dose_response-original.png", "table1_sae.csv", "sae_factors.csv", "sae_calibration.json",
             "strips/supervised/a.png"]
    kept = ["table1.md", "table1_signed.csv", "disentanglement.csv", "summary.json", "pixel_matching.json"]
    for name in moved + kept:
        (out / name).write_text("x")
    drop_moved(out)
    assert sorted(p.name for p in out.iterdir()) == sorted(kept)
