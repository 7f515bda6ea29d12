"""The probe stage, supervised directions restricted to the probe's steps, and the fewshot stage
(Fig. 8 as effect against n), on a tiny run."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import selected_run as make_selected_run
from pipeline.config import with_overrides
from pipeline.formats.directions import load_directions


@pytest.fixture(scope="module")
def selected_run(tmp_path_factory, tiny_model_dir):
    """A tiny run directory taken through generate, annotate (known responses) and select, in-process."""
    return make_selected_run(tmp_path_factory.mktemp("semantics") / "run", tiny_model_dir, "generate.num_samples=40",
                             "generate.batch_size=20", "select.n=6", "supervised.convergence_ns=[1,3,6]",
                             "probe.pca_components=8", "probe.batch_size=16", "fewshot.ns=[1,3,6]", "fewshot.draws=2",
                             "fewshot.num_samples=3", "fewshot.restriction_samples=4")


@pytest.mark.slow
def test_probe_stage_matches_an_independent_computation(selected_run):
    from pipeline.engine.model import HSpaceModel
    from pipeline.formats.samples import load_samples
    from pipeline.methods.probes import encoded_steps, probe_table, split_by_id
    from pipeline.stages.annotate import load_annotations
    from pipeline.stages.probe import gather_features, load_probes, run_probe

    cfg = selected_run
    run_probe(cfg)
    table = load_probes(cfg.run_dir)
    assert set(table.space) == {"h", "x_t"} and set(table.attribute) == {"bright", "red"}
    assert len(table) == 2 * 2 * 3 and (table.metric == "r2").all()  # brightness scores are continuous

    ann = load_annotations(cfg.run_dir).sort_values("sample_id")
    ids = ann.sample_id.tolist()
    ds = load_samples(cfg.run_dir).with_format("torch", columns=["sample_id", "h"])
    h = dict(zip(map(int, ds["sample_id"]), ds["h"]))
    H = torch.stack([h[i] for i in ids]).flatten(2).numpy()
    model = HSpaceModel.from_config(cfg)
    X = model.sample(ids, return_latents=True).latents.flatten(2).numpy()
    feats = gather_features(cfg, ids)
    np.testing.assert_array_equal(feats["h"], H)
    np.testing.assert_allclose(feats["x_t"], X, atol=1e-5)
    ref = probe_table({"h": H, "x_t": X}, {a: ann[a].to_numpy() for a in ("bright", "red")},
                      split_by_id(ids, 0.25, 0), (), components=8)
    merged = table.merge(ref, on=["attribute", "space", "step"], suffixes=("", "_ref"))
    np.testing.assert_allclose(merged.score, merged.score_ref, atol=1e-6)
    for attr in ("bright", "red"):
        rows = table[(table.attribute == attr) & (table.space == "h")].sort_values("step")
        assert rows.encoded.tolist() == encoded_steps(rows.score, rows.chance, 0.9).tolist()


@pytest.mark.slow
def test_probe_reads_the_stored_x_t_bit_for_bit_and_samples_nothing(selected_run):
    """generate stores x_t (generate.record_x_t): the probe reads it instead of sampling the seeds
    again, and gets exactly what the resampling gives at the same batches (generate's 20 per batch)."""
    from pipeline.cost import COUNTERS
    from pipeline.formats.samples import has_x_t
    from pipeline.methods.probes import probe_table, split_by_id
    from pipeline.stages.annotate import load_annotations
    from pipeline.stages.probe import gather_features

    cfg = with_overrides(selected_run, ["probe.batch_size=20"])  # = generate.batch_size: the same batches
    assert has_x_t(cfg.run_dir)
    ids = load_annotations(cfg.run_dir).sort_values("sample_id").sample_id.astype(int).tolist()
    before = COUNTERS.unet_evaluations
    stored = gather_features(cfg, ids)
    assert COUNTERS.unet_evaluations == before  # no U-Net pass
    resampled = gather_features(cfg, ids, resample=True)
    assert COUNTERS.unet_evaluations == before + len(ids) * 3
    for space in ("h", "x_t"):
        assert stored[space].dtype == resampled[space].dtype
        np.testing.assert_array_equal(stored[space], resampled[space])
    ann = load_annotations(cfg.run_dir).sort_values("sample_id")
    scores = {a: ann[a].to_numpy() for a in ("bright", "red")}
    test = split_by_id(ids, 0.25, 0)
    pd.testing.assert_frame_equal(probe_table(stored, scores, test, (), components=8),
                                  probe_table(resampled, scores, test, (), components=8))


@pytest.mark.slow
def test_supervised_restricted_to_the_probe_steps(selected_run):
    from pipeline.stages.probe import load_probes, run_probe
    from pipeline.stages.supervised import run_supervised

    cfg = selected_run
    if not (cfg.run_dir and (__import__("pathlib").Path(cfg.run_dir) / "probes").exists()):
        run_probe(cfg)
    run_supervised(cfg)
    plain = load_directions(f"{cfg.run_dir}/directions/supervised.safetensors")
    assert "unrestricted_directions" not in plain.extras
    restricted_cfg = with_overrides(cfg, ["supervised.restrict_steps=true"])
    run_supervised(restricted_cfg)
    d = load_directions(f"{cfg.run_dir}/directions/supervised.safetensors")
    probes = load_probes(cfg.run_dir)
    torch.testing.assert_close(d.extras["unrestricted_directions"], plain.directions)
    for k, name in enumerate(d.names):
        rows = probes[(probes.attribute == name) & (probes.space == "h")].sort_values("step")
        keep = rows.encoded.to_numpy(bool) if rows.encoded.any() else np.ones(len(rows), bool)  # none: every step
        assert d.params["restricted_steps"][name] == np.flatnonzero(keep).tolist()
        assert keep.any()
        torch.testing.assert_close(d.directions[k][keep], plain.directions[k][keep])
        assert d.directions[k][~keep].abs().sum() == 0
    run_supervised(cfg)  # back to the paper's directions for the tests after this one
    assert pd.read_csv(f"{cfg.run_dir}/directions/convergence.csv").n.max() == 6


@pytest.mark.slow
def test_fewshot_stage_effect_against_n(selected_run):
    """The edits are the eq. 10 directions of the drawn samples rescaled to the whole selection's norm,
    the effects are the scorer's changes on the held-out seeds in std of the annotations."""
    from pathlib import Path

    from fake_annotators import Brightness
    from pipeline.engine.model import HSpaceModel
    from pipeline.methods.supervised import draw_subsets, mean_difference
    from pipeline.stages.annotate import load_annotations
    from pipeline.stages.fewshot import effect_vs_n, fewshot_edits, run_fewshot
    from pipeline.stages.probe import run_probe
    from pipeline.stages.select import load_selection

    cfg = selected_run
    if not (Path(cfg.run_dir) / "probes").exists():
        run_probe(cfg)
    run_fewshot(cfg)
    out = Path(cfg.run_dir) / "fewshot"
    curve = pd.read_csv(out / "effect_vs_n.csv")
    per_edit = pd.read_csv(out / "per_edit.csv")
    assert set(curve.space) == {"h", "x_T"} and sorted(set(curve.n)) == [1, 3, 6]
    assert curve[curve.n == 6].draws.eq(1).all() and curve[curve.n < 6].draws.eq(2).all()
    assert np.allclose(curve[curve.n == 6].share_of_full, 1.0)
    pd.testing.assert_frame_equal(curve, effect_vs_n(per_edit), check_dtype=False, atol=1e-9)
    assert (out / "effect_vs_n.png").exists() and (out / "restriction.csv").exists()
    restriction = pd.read_csv(out / "restriction.csv")
    assert set(restriction.variant) == {"all steps", "probe steps"}

    # one edit, recomputed independently: the bright direction from a draw of n=1 in h-space
    selection = load_selection(cfg.run_dir)
    edits = fewshot_edits(cfg.run_dir, cfg, ["bright"], selection)
    e = next(x for x in edits if x["space"] == "h" and x["n"] == 1 and x["draw"] == 1)
    sel = selection[selection.attribute == "bright"]
    top = sel[sel.side == "top"].sort_values("rank").sample_id.tolist()
    bottom = sel[sel.side == "bottom"].sort_values("rank").sample_id.tolist()
    from pipeline.formats.samples import load_samples

    ds = load_samples(cfg.run_dir).with_format("torch", columns=["sample_id", "h"])
    h = dict(zip(map(int, ds["sample_id"]), ds["h"]))
    pos, neg = torch.stack([h[i] for i in top]), torch.stack([h[i] for i in bottom])
    subsets = [s for s in draw_subsets(6, 6, [1, 3, 6], 2, 0) if s[0] == 1]
    _, _, ip, ineg = subsets[1]
    d = mean_difference(pos[ip], neg[ineg])
    ref = 3.0 * d * mean_difference(pos, neg).norm() / d.norm()
    torch.testing.assert_close(e["delta"], ref)
    model = HSpaceModel.from_config(cfg)
    seeds = list(range(2_000_000, 2_000_003))
    images = model.sample_edits(seeds, [None, ref])
    scorer = Brightness()
    unit = load_annotations(cfg.run_dir).bright.std(ddof=1)
    change = ((scorer(images[1])["bright"] - scorer(images[0])["bright"]) / unit).numpy()
    rows = per_edit[(per_edit.attribute == "bright") & (per_edit.space == "h") & (per_edit.n == 1) & (per_edit.draw == 1)]
    np.testing.assert_allclose(rows.sort_values("seed").own_change, change, atol=1e-5)


def test_restrict_zeroes_the_steps_the_probes_leave_out():
    from pipeline.formats.directions import Directions
    from pipeline.stages.supervised import restrict

    v = torch.randn(2, 4, 3, 2, 2)
    d = Directions(v.clone(), ["a", "b"], "supervised/mean_difference", [999, 700, 400, 100])
    probes = pd.DataFrame({"attribute": ["a"] * 4 + ["b"] * 4 + ["a"] * 4, "space": ["h"] * 8 + ["x_t"] * 4,
                           "step": list(range(4)) * 3, "encoded": [0, 1, 1, 0] + [0] * 4 + [1] * 4})
    r = restrict(d, probes)
    assert r.params["restricted_steps"] == {"a": [1, 2], "b": [0, 1, 2, 3]}  # b: encoded nowhere, kept whole
    torch.testing.assert_close(r.extras["unrestricted_directions"], v)
    assert r.directions[0, [0, 3]].abs().sum() == 0 and torch.equal(r.directions[0, 1:3], v[0, 1:3])
    assert torch.equal(r.directions[1], v[1])


def test_effect_vs_n_and_restriction_arithmetic():
    from evaluation.semantics import effect_table
    from pipeline.stages.fewshot import effect_vs_n, restriction_table

    rows = []
    for n, draws in ((1, [0.2, 0.6]), (4, [1.0])):
        for d, effect in enumerate(draws):
            for seed, dev in ((0, -0.1), (1, 0.1)):  # the seeds' mean is the draw's effect
                rows.append({"attribute": "a", "space": "h", "n": n, "draw": d, "seed": seed, "own_change": effect + dev})
    curve = effect_vs_n(pd.DataFrame(rows)).set_index("n")
    assert curve.loc[1, "effect"] == pytest.approx(0.4)
    assert curve.loc[1, "effect_std"] == pytest.approx(np.std([0.2, 0.6], ddof=1))
    assert curve.loc[1, "draws"] == 2 and curve.loc[4, "effect_std"] == 0 and curve.loc[1, "share_of_full"] == pytest.approx(0.4)
    assert effect_table(curve.reset_index()).loc[0, "n=1"] == "0.40 ± 0.28"

    r = pd.DataFrame([{"attribute": "a", "variant": v, "steps": "", "seed": s, "pixel_change": 0.1,
                       "d_a": own + 0.1 * s, "d_b": side * (-1) ** s, "d_c": 0.2}
                      for v, own, side in (("all steps", 1.0, 0.5), ("probe steps", 0.5, 0.1)) for s in range(2)])
    t = restriction_table(r, ["a", "b", "c"]).set_index("variant")
    assert t.loc["all steps", "own_effect"] == pytest.approx(1.05) and t.loc["all steps", "side_attribute"] == "c"
    assert t.loc["all steps", "largest_side_effect"] == pytest.approx(0.2)  # b's +-0.5 cancels in the mean
    assert t.loc["probe steps", "own_effect"] == pytest.approx(0.55)
