"""`hspace sae` on samples datasets made from a known sparse dictionary: it recovers the dictionary, labels the
features by the annotations they follow, gives the same model on 1 and 2 processes (and DataLoader workers),
resumes a killed run to the same weights, and refuses bad input in one line."""
from __future__ import annotations

import os
import shutil
import signal
import time

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


def test_a_killed_run_resumes_to_the_same_weights(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    make_run(whole)
    shutil.copytree(whole / "samples", killed / "samples")
    args = [*TRAIN[:-2], "sae.epochs=20", "sae.checkpoint_every=25"]
    base = [f"model.num_inference_steps={SIZES['token']['T']}", "trainer.accelerator=cpu", *args]
    proc = hspace("sae", f"run_dir={killed}", *base, cwd=tmp_path, log=tmp_path / "killed.log")
    deadline = time.time() + 600
    while not list((killed / "sae").glob("last-*.ckpt")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
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
