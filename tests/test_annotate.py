"""`hspace annotate` and `hspace select`: equivalence across processes, resume, refusals, selection."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import conftest
from conftest import tiny_overrides
from pipeline.errors import ConfigError, DatasetError
from pipeline.methods.selection import select_top_bottom, selection_table
from pipeline.stages.annotate import annotations_path, load_annotations


def hspace(stage, run_dir, model_dir, *overrides, check=True, wait=True):
    cwd = Path(run_dir).parent
    return conftest.hspace(stage, *tiny_overrides(run_dir, model_dir), *overrides, cwd=cwd, check=check,
                           log=None if wait else cwd / "annotate.log")


@pytest.fixture(scope="module")
def samples_run(tmp_path_factory, tiny_model_dir):
    run = tmp_path_factory.mktemp("annot") / "run"
    hspace("generate", run, tiny_model_dir, "generate.num_samples=24", "generate.batch_size=6")
    return run


def copy_run(samples_run, tmp_path) -> Path:
    import shutil

    dst = tmp_path / "run"
    shutil.copytree(samples_run / "samples", dst / "samples")
    return dst


ANN = ["annotate.annotators=[fake_annotators:brightness]", "annotate.batch_size=5"]


def expected_brightness(run: Path) -> pd.DataFrame:
    from pipeline.formats.samples import iter_samples

    rows = []
    for b in iter_samples(run, images=True, h=False):
        x = b["images"].astype(np.float64) / 255.0
        for sid, im in zip(b["sample_id"], x):
            rows.append({"sample_id": int(sid), "bright": im.mean(), "red": im[..., 0].mean() - im[..., 1:].mean()})
    return pd.DataFrame(rows).sort_values("sample_id").reset_index(drop=True)


@pytest.mark.slow
def test_annotations_match_known_responses_and_two_processes(samples_run, tmp_path, tiny_model_dir):
    one, two = copy_run(samples_run, tmp_path / "a"), copy_run(samples_run, tmp_path / "b")
    hspace("annotate", one, tiny_model_dir, *ANN)
    hspace("annotate", two, tiny_model_dir, *ANN, "trainer.devices=2", "trainer.strategy=ddp")
    a, b = load_annotations(one), load_annotations(two)
    assert list(a.columns) == ["sample_id", "bright", "red"] and list(a.sample_id) == list(range(24))
    pd.testing.assert_frame_equal(a, b)
    ref = expected_brightness(one)
    np.testing.assert_allclose(a.bright, ref.bright, atol=1e-5)
    np.testing.assert_allclose(a.red, ref.red, atol=1e-5)


@pytest.mark.slow
def test_annotation_resumes_after_a_kill(samples_run, tmp_path, tiny_model_dir):
    run = copy_run(samples_run, tmp_path)
    slow = ["annotate.annotators=[fake_annotators:brightness]", "annotate.batch_size=2",
            "annotate.options={fake_annotators:brightness: {delay: 0.3}}"]
    proc = hspace("annotate", run, tiny_model_dir, *slow, wait=False)
    parts = run / "annotations" / "parts"
    deadline = time.time() + 300
    while not (parts.exists() and len(list(parts.glob("part-*.parquet"))) >= 2):
        assert proc.poll() is None, (run.parent / "annotate.log").read_text()[-2000:]
        assert time.time() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not annotations_path(run).exists()
    done_before = len(list(parts.glob("part-*.parquet")))
    assert done_before < 12
    hspace("annotate", run, tiny_model_dir, *slow)
    df = load_annotations(run)
    assert list(df.sample_id) == list(range(24))
    ref = expected_brightness(run)
    np.testing.assert_allclose(df.bright, ref.bright, atol=1e-5)


@pytest.mark.slow
def test_refuses_other_annotators_and_other_samples(samples_run, tmp_path, tiny_model_dir):
    run = copy_run(samples_run, tmp_path)
    hspace("annotate", run, tiny_model_dir, *ANN)
    out = hspace("annotate", run, tiny_model_dir, "annotate.annotators=[fake_annotators:darkness]", check=False)
    assert out.returncode == 2 and "different annotators" in out.stderr
    # a different samples dataset in the same run directory
    import shutil

    shutil.rmtree(run / "samples")
    hspace("generate", run, tiny_model_dir, "generate.num_samples=24", "generate.batch_size=6", "model.eta=0.5")
    out = hspace("annotate", run, tiny_model_dir, *ANN, check=False)
    assert out.returncode == 2 and "different samples dataset" in out.stderr
    with pytest.raises(DatasetError, match="different samples dataset"):
        load_annotations(run)


@pytest.mark.slow
def test_clashing_names_get_prefixes(samples_run, tmp_path, tiny_model_dir):
    run = copy_run(samples_run, tmp_path)
    hspace("annotate", run, tiny_model_dir, "annotate.annotators=[fake_annotators:brightness,fake_annotators:darkness]")
    df = load_annotations(run)
    assert list(df.columns) == ["sample_id", "brightness.bright", "brightness.red", "darkness.bright", "darkness.red"]
    np.testing.assert_allclose(df["brightness.bright"], -df["darkness.bright"])


@pytest.mark.slow
def test_unknown_annotator_and_missing_weights_are_clear(samples_run, tmp_path, tiny_model_dir):
    run = copy_run(samples_run, tmp_path)
    out = hspace("annotate", run, tiny_model_dir, "annotate.annotators=[nope]", check=False)
    assert out.returncode == 2 and "unknown annotator 'nope'" in out.stderr
    out = hspace("annotate", run, tiny_model_dir, "annotate.annotators=[celeba]", "select.attributes=[Smiling]",
                 "annotate.options={celeba: {checkpoint: /no/such/file.pt}}", check=False)
    assert out.returncode == 2 and "/no/such/file.pt" in out.stderr and "Traceback" not in out.stderr


def test_select_top_bottom_and_balance():
    rng = np.random.default_rng(0)
    scores = pd.Series(rng.normal(size=200), index=np.arange(1000, 1200), name="smile")
    scores.iloc[5] = np.nan
    top, bottom = select_top_bottom(scores, 10)
    assert list(top.index) == list(scores.dropna().nlargest(10).index)
    assert list(bottom.index) == list(scores.dropna().nsmallest(10).index)
    gender = pd.Series((rng.random(200) > 0.7).astype(float), index=scores.index)
    top, bottom = select_top_bottom(scores, 10, gender)
    assert (gender[top.index] > 0.5).sum() == 5 and (gender[bottom.index] > 0.5).sum() == 5
    men = scores[gender > 0.5].dropna()
    assert set(top.index[gender[top.index] > 0.5]) == set(men.nlargest(5).index)
    with pytest.raises(DatasetError, match="cannot give a top and a bottom"):
        select_top_bottom(scores.iloc[:15], 10)
    table = selection_table(pd.DataFrame({"sample_id": scores.index, "smile": scores.values}), ["smile"], 3)
    assert list(table.side) == ["top"] * 3 + ["bottom"] * 3 and list(table["rank"]) == [0, 1, 2] * 2
    with pytest.raises(ConfigError, match="no annotation column"):
        selection_table(pd.DataFrame({"sample_id": [1], "a": [0.0]}), ["b"], 1)


def test_select_resolution_ranks_saturated_scores_as_ties():
    """A saturated classifier's last digits follow another attribute (here: more sure of glasses
    without a hat). Exact ranking selects that attribute along; at resolution 0.01 the top 20
    of the 60 certain positives are the 20 lowest ids, whatever their hat."""
    rng = np.random.default_rng(1)
    ids = rng.permutation(np.arange(500, 700))[:120]
    hat = pd.Series(rng.random(120) > 0.5, index=ids)
    glasses = pd.Series(np.r_[np.ones(60), np.zeros(60)], index=ids, name="glasses")
    sure = np.where(hat, 1e-5, 1e-6) * rng.uniform(1, 2, 120)
    glasses = (glasses - np.where(glasses > 0.5, sure, -sure)).rename("glasses")
    top, bottom = select_top_bottom(glasses, 20)
    assert hat[top.index].mean() == 0.0  # exact ranking: all hatless
    top, bottom = select_top_bottom(glasses, 20, resolution=0.01)
    positives, negatives = glasses[glasses > 0.5], glasses[glasses < 0.5]
    assert list(top.index) == sorted(positives.index)[:20] and list(bottom.index) == sorted(negatives.index)[:20]
    assert 0.2 < hat[top.index].mean() < 0.8
    assert (top == glasses[top.index]).all()  # the table keeps the exact scores
    smooth = pd.Series(np.linspace(-1, 1, 120), index=ids, name="smile")
    assert list(select_top_bottom(smooth, 10, resolution=0.01)[0].index) == list(smooth.nlargest(10).index)
    with pytest.raises(ConfigError, match="resolution"):
        select_top_bottom(smooth, 10, resolution=-1.0)


@pytest.mark.slow
def test_select_stage_writes_table_and_contact_sheets(samples_run, tmp_path, tiny_model_dir):
    run = copy_run(samples_run, tmp_path)
    hspace("annotate", run, tiny_model_dir, *ANN)
    ann = load_annotations(run).set_index("sample_id")
    for resolution in (0.0, 0.01):  # the tiny model's brightness scores differ in the 3rd digit: the orders differ
        hspace("select", run, tiny_model_dir, "select.attributes=[bright,red]", "select.n=5",
               f"select.resolution={resolution}")
        table = pd.read_parquet(run / "selection.parquet")
        top = table[(table.attribute == "bright") & (table.side == "top")].sort_values("rank")
        expected = select_top_bottom(ann.bright, 5, resolution=resolution)[0]
        assert list(top.sample_id) == list(expected.index)
    assert list(expected.index) != list(ann.bright.nlargest(5).index)
    for attr in ("bright", "red"):
        assert (run / "contact_sheets" / f"{attr}.png").stat().st_size > 1000
