"""`hspace sae` on samples datasets made from a known sparse dictionary: it recovers the dictionary, labels the
features by the annotations they follow, gives the same model on 1 and 2 processes (and DataLoader workers),
resumes a killed run to the same weights, and refuses bad input in one line."""
from __future__ import annotations

import os
import shutil
import signal

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from conftest import hspace
from pipeline.config import load_config
from pipeline.testing.sparse_data import dictionary, sparse_h, write_annotations, write_samples

pytestmark = pytest.mark.slow  # every test here trains an SAE

# token-wise: 16-d examples, 16 positions x 2 steps x 128 samples (4096 per epoch); whole-h: 32-d examples,
# 8 steps x 256 samples (2048 per epoch); 32 atoms, 3 active per example; 64 latents, k = 3.
SIZES = {"token": dict(num_samples=128, T=2, h_shape=(16, 4, 4)), "whole": dict(num_samples=256, T=8, h_shape=(8, 2, 2))}
ATOMS, ACTIVE = 32, 3
TRAIN = ["sae.num_latents=64", "sae.k=3", "sae.batch_size=256", "sae.epochs=15", "sae.lr=0.01", "sae.holdout=0.1"]


def make_run(run, feed: str = "token", annotate: bool = False):
    size = SIZES[feed]
    d = size["h_shape"][0] if feed == "token" else size["h_shape"][0] * size["h_shape"][1] * size["h_shape"][2]
    atoms = dictionary(ATOMS, d, seed=0)
    h, codes = sparse_h(atoms, size["num_samples"], size["T"], size["h_shape"], ACTIVE, feed=feed, seed=0)
    write_samples(run, h, shard_size=16)
    if annotate:  # atom a's per-sample mean code, for a few atoms
        table = pd.DataFrame({"sample_id": range(len(h)), **{f"atom{a}": codes[:, :, a].mean(1).numpy() for a in (3, 7, 20)}})
        write_annotations(run, table)
    return atoms


def overrides(run, feed="token"):
    return [f"run_dir={run}", f"model.num_inference_steps={SIZES[feed]['T']}", "trainer.accelerator=cpu",
            f"sae.feed={feed}", *TRAIN]


def matched(atoms: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """Each true atom's largest cosine with a learned decoder row."""
    return (atoms @ (W / W.norm(dim=1, keepdim=True)).T).max(1).values


@pytest.mark.parametrize("feed", ["token", "whole"])
def test_the_sae_recovers_a_known_sparse_dictionary(tmp_path, feed):
    from pipeline.formats.sae import load_sae
    from pipeline.stages.sae import run_sae

    run = tmp_path / "run"
    atoms = make_run(run, feed)
    run_sae(load_config(None, overrides(run, feed)))
    model = load_sae(run)
    cos = matched(atoms, model.coder.W_dec.detach())
    assert cos.min() >= 0.9, cos.sort().values[:5]
    metrics = pd.read_json(run / "sae" / "metrics.json", typ="series")
    assert metrics["heldout"]["examples"] > 0 and metrics["heldout"]["l0"] <= 3
    assert metrics["heldout"]["fvu"] < 0.2
    curve = pd.read_csv(run / "sae" / "curves.csv")
    assert curve.fvu.iloc[-1] < curve.fvu.iloc[0] / 3 and curve.step.iloc[-1] == model.info["steps_trained"]


def test_features_are_labelled_by_the_annotation_they_follow_and_become_deltas(tmp_path):
    from pipeline.formats.directions import load_directions
    from pipeline.formats.sae import load_sae
    from pipeline.stages.sae import run_sae

    run = tmp_path / "run"
    atoms = make_run(run, "token", annotate=True)
    run_sae(load_config(None, [*overrides(run), "sae.features_per_attribute=2"]))
    model = load_sae(run)
    d = load_directions(run / "directions" / "sae.safetensors")
    assert d.method == "sae/token" and len(d) <= 6
    r = pd.read_csv(run / "sae" / "correlations.csv")
    W = model.coder.W_dec.detach()
    cos = atoms @ (W / W.norm(dim=1, keepdim=True)).T  # (atoms, latents)
    for a in (3, 7, 20):
        best = pd.read_json(run / "sae" / "metrics.json", typ="series")["best_feature"][f"atom{a}"]
        f = int(best["feature"][1:])
        assert cos[a, f] > 0.9 and best["r"] > 0.5, best  # atom a's feature (or one of the features it split into)
        assert r[f"atom{a}"][(cos[a] < 0.5).numpy()].abs().max() < 0.3  # no other atom's feature follows it
        i = d.index(best["feature"])
        assert d.labels[i] == f"atom{a} {best['r']:+.2f}" and d.display_name(i) == f"f{f}: atom{a} {best['r']:+.2f}"
        info = d.params["features"][i]
        expected = model.delta(f, info["sign"] * info["mean_activation"])
        torch.testing.assert_close(d.get(best["feature"]), expected)
        assert expected[0, :, 1, 2].norm() > 0  # at every position, in h's units at each step
        torch.testing.assert_close(expected[0, :, 1, 2] * model.scales[0], expected[1, :, 3, 0] * model.scales[1])


def test_one_and_two_processes_with_workers_train_the_same_model(tmp_path):
    """2 ranks (DDP, gloo) each reading its shards with 2 DataLoader workers, against 1 process reading all: the
    same global batches, so the same model up to float summation order (measured: 2e-7)."""
    one, two = tmp_path / "one", tmp_path / "two"
    make_run(one)
    shutil.copytree(one / "samples", two / "samples")
    hspace("sae", *overrides(one), cwd=tmp_path)
    out = hspace("sae", *overrides(two), "trainer.devices=2", "trainer.strategy=ddp", "sae.num_workers=2", cwd=tmp_path)
    assert "hspace sae:" in out.stdout
    a, b = load_file(str(one / "sae" / "sae.safetensors")), load_file(str(two / "sae" / "sae.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)
    curves = pd.read_csv(one / "sae" / "curves.csv"), pd.read_csv(two / "sae" / "curves.csv")
    pd.testing.assert_frame_equal(curves[0], curves[1], rtol=1e-4)


def test_a_killed_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """SIGKILLed right after its second checkpoint landed (a sitecustomize wraps os.replace), the run
    resumes from it to the weights and curves of a run never killed."""
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    make_run(whole)
    shutil.copytree(whole / "samples", killed / "samples")
    args = [*TRAIN[:-2], "sae.epochs=20", "sae.checkpoint_every=25"]
    base = [f"model.num_inference_steps={SIZES['token']['T']}", "trainer.accelerator=cpu", *args]
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(
        "import os, signal\n"
        "_replace, _landed = os.replace, [0]\n"
        "def replace(src, dst, *a, **kw):\n"
        "    _replace(src, dst, *a, **kw)\n"
        "    if os.path.basename(os.fspath(dst)).startswith('last-'):\n"
        "        _landed[0] += 1\n"
        "        if _landed[0] == 2:\n"
        "            os.kill(os.getpid(), signal.SIGKILL)\n"
        "os.replace = replace\n")
    with monkeypatch.context() as patched:
        patched.setenv("PYTHONPATH", f"{inject}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
        out = hspace("sae", f"run_dir={killed}", *base, cwd=tmp_path, check=False)
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    assert list((killed / "sae").glob("last-*.ckpt")) and not (killed / "sae" / "sae.safetensors").exists()
    resumed = hspace("sae", f"run_dir={killed}", *base, cwd=tmp_path)
    assert "sae" in resumed.stdout
    hspace("sae", f"run_dir={whole}", *base, cwd=tmp_path)
    a, b = load_file(str(whole / "sae" / "sae.safetensors")), load_file(str(killed / "sae" / "sae.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    pd.testing.assert_frame_equal(pd.read_csv(whole / "sae" / "curves.csv"), pd.read_csv(killed / "sae" / "curves.csv"))
    assert not list((killed / "sae").glob("last-*.ckpt"))  # the checkpoint goes once the weights are written


@pytest.mark.parametrize("case, args, message", [
    ("no samples", [], "no samples dataset"),
    ("k above the dictionary", ["sae.num_latents=8", "sae.k=16"], "sae.k=16 .*at most sae.num_latents=8"),
    ("step past T", ["sae.steps=2"], r"sae.steps=2 .*step indices in 0..1"),
    ("window past the data's T", ["model.num_inference_steps=6", "sae.steps=[3, 5]"], "have T=2 steps"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, case, args, message):
    import re

    run = tmp_path / "run"
    if case != "no samples":
        make_run(run)
    out = hspace("sae", f"run_dir={run}", "model.num_inference_steps=2", "trainer.accelerator=cpu", *args,
                 cwd=tmp_path, check=False)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(message, lines[0]), lines
    assert not (run / "sae").exists() and not (run / "directions").exists()


def test_evaluate_edits_the_best_features_at_calibrated_strength_beside_pca_and_supervised(tmp_path, tiny_model_dir):
    """The SAE family of `hspace evaluate-calibrated` on a tiny run: each attribute's best feature and best PCA component,
    calibrated on the calibration seeds, in table1_sae.* and sae_factors.csv; a stored change recomputed."""
    from pipeline import Edit, HSpaceModel
    from pipeline.formats.directions import load_directions
    from pipeline.stages.annotate import run_annotate
    from pipeline.stages.calibrate import run_calibrate
    from pipeline.stages.disentangle import run_disentangle
    from pipeline.stages.evaluate import run_evaluate, run_evaluate_calibrated
    from pipeline.stages.generate import run_generate
    from pipeline.stages.pca import run_pca
    from pipeline.stages.sae import run_sae
    from pipeline.stages.select import run_select
    from pipeline.stages.supervised import run_supervised

    run = tmp_path / "run"
    cfg = load_config(None, [f"run_dir={run}", f"model.name_or_path={tiny_model_dir}", "model.num_inference_steps=3",
                             "trainer.accelerator=cpu", "generate.num_samples=24", "generate.batch_size=12",
                             "annotate.annotators=[fake_annotators:brightness]", "select.attributes=[bright,red]",
                             "select.n=5", "supervised.convergence_ns=[5]", "pca.n_components=4",
                             "disentangle.pairs={bright: [red]}",
                             "sae.num_latents=32", "sae.k=4", "sae.epochs=2", "sae.batch_size=512",
                             "evaluate.scorer=fake_annotators:brightness", "evaluate.quality=null",
                             "evaluate.num_samples=4", "evaluate.repeats=2", "evaluate.batch_size=8",
                             "evaluate.sweep_samples=2", "evaluate.pixel_matched_random=false",
                             "edit.seeds=[1000000, 1000001]",
                             "calibrate.num_samples=3", "calibrate.std_samples=6", "calibrate.max_iter=3"])
    for stage in (run_generate, run_annotate, run_select, run_supervised, run_disentangle, run_pca, run_sae):
        stage(cfg)
    run_evaluate(cfg)
    run_calibrate(cfg)
    summary = run_evaluate_calibrated(cfg)
    ev = run / "evaluation-calibrated"
    every = pd.read_parquet(ev / "per_sample.parquet")
    rows = every[every.sae]
    scales = pd.read_json(ev / "sae_calibration.json", typ="series")["scales"]
    # each attribute's best feature and best PCA component were calibrated; those with a scale are evaluated there
    assert {n.split(" ")[1] for n in scales} == {"(bright)", "(red)"} and len(scales) == 4
    assert set(rows.direction) == {n for n, s in scales.items() if s is not None} and len(rows)
    assert len(rows) == 2 * 4 * rows.direction.nunique()
    for name, g in rows.groupby("direction"):
        assert g.scale.nunique() == 1 and g.scale.iloc[0] == scales[name]
    # one stored change, recomputed: the feature's direction (signed for its attribute) at its calibrated scale
    sae = load_directions(run / "directions" / "sae.safetensors")
    row = rows[rows.family == "sae"].iloc[0]
    feature, attr = row.direction.split(" ")[0], row.target
    info = sae.params["features"][sae.index(feature)]
    sign = (1 if info["correlations"][attr] >= 0 else -1) * info["sign"]
    model = HSpaceModel.from_pretrained(str(tiny_model_dir), num_inference_steps=3, eta=cfg.model.eta, device="cpu")
    x0 = model.sample([int(row.seed)]).images
    x1 = model.sample([int(row.seed)], Edit(delta=row.scale * sign * sae.get(feature))).images
    assert row.pixel_change == pytest.approx(float((x1 - x0).abs().mean() / 2), abs=1e-5)
    table = pd.read_csv(ev / "table1_sae.csv")
    assert set(table.family) == set(rows.family) and {"bright", "red", "bright_std"} <= set(table.columns)
    factors = pd.read_csv(ev / "sae_factors.csv").set_index("attribute")
    assert set(factors.index) == set(rows.target)
    for col in ("sae", "sae_r", "sae_own", "sae_side", "sae_side_attribute", "supervised_own", "supervised_side"):
        assert col in factors
    best = factors.loc[row.target]
    assert best.sae_own == pytest.approx(table.set_index("direction").loc[f"{best.sae} ({row.target})", row.target])
    assert summary["sae"]["num_latents"] == 32 and "fvu" in summary["sae"]["heldout"]
    assert list((ev / "strips" / "sae").glob("*.png"))  # the features' edit strips, from the sweep
    # hspace explore offers the features by name and label, and applies them like any direction
    from pipeline.explore.session import ExploreSession, Slider

    session = ExploreSession(model, run)
    shown = dict(session.choices())
    assert all(f"sae / {sae.display_name(i)}" in shown for i in range(len(sae)))
    view = session.render(int(row.seed), [Slider("sae", sae.index(feature), 2.0)])
    assert view.edited.shape == view.original.shape and (view.edited != view.original).any()
