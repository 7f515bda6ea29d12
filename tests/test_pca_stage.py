"""`hspace pca` on a real samples dataset: exact against torch.linalg.svd, and across processes."""
from __future__ import annotations

import pytest
import torch

from conftest import exact_pca, hspace, principal_angles, tiny_overrides
from pipeline.config import load_config
from pipeline.formats.directions import load_directions
from pipeline.formats.samples import load_samples

pytestmark = pytest.mark.slow  # every test here generates a samples dataset first


@pytest.fixture(scope="module")
def samples_run(tmp_path_factory, tiny_model_dir):
    from pipeline.stages.generate import run_generate

    run = tmp_path_factory.mktemp("pca") / "run"
    run_generate(load_config(None, [*tiny_overrides(run, tiny_model_dir), "generate.num_samples=40", "generate.batch_size=7"]))
    return run


def stored_pca(run) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference PCA of the run's h as stored (float16 values): components (T, N, D), variance (T, N)."""
    ds = load_samples(run).with_format("torch", columns=["h"])
    _, V, ev, _ = exact_pca(ds[:]["h"].double().flatten(2))
    return V, ev


# onepass: q >= N is exact
METHODS = {"exact": [], "randomized": ["pca.tol=1e-4", "pca.oversample=20"], "onepass": ["pca.oversample=60"]}


@pytest.mark.parametrize("method", METHODS)
def test_pca_stage_matches_exact_svd(samples_run, tiny_model_dir, method):
    from pipeline.stages.pca import run_pca

    cfg = load_config(None, [f"run_dir={samples_run}", f"model.name_or_path={tiny_model_dir}", "trainer.accelerator=cpu",
                             "pca.n_components=4", "pca.batch_size=9", f"pca.method={method}", *METHODS[method]])
    run_pca(cfg)
    d = load_directions(samples_run / "directions" / "pca.safetensors")
    assert d.params["method_used"] == method and d.extras["angle_bound"].shape == (3,)
    if method == "randomized":
        assert d.params["n_passes"] > 2 and (d.extras["angle_bound"] <= 1e-4).all()
    V, ev = stored_pca(samples_run)
    assert d.directions.shape == (4, 3, 16, 8, 8) and d.names == ["pc1", "pc2", "pc3", "pc4"]
    torch.testing.assert_close(d.extras["explained_variance"].double(), ev[:, :4], rtol=1e-4, atol=0)
    for t in range(3):
        ours = d.directions[:, t].flatten(1).double()
        norms = ours.norm(dim=1)
        torch.testing.assert_close(norms, ev[t, :4].sqrt(), rtol=1e-4, atol=0)  # direction = std x component
        assert principal_angles(ours / norms[:, None], V[t, :4]).max() < 1e-3
        for k in range(4):  # each component individually, up to sign
            assert abs(float((ours[k] / norms[k]) @ V[t, k])) > 1 - 1e-5
    # signs aligned along the trajectory: neighbouring steps point the same way
    cos = torch.nn.functional.cosine_similarity(d.directions[:, 1:].flatten(2), d.directions[:, :-1].flatten(2), dim=2)
    assert (cos > 0).all()
    rnd = d.extras["random_directions"]
    torch.testing.assert_close(rnd.flatten(2).norm(dim=2), d.directions.flatten(2).norm(dim=2), rtol=1e-4, atol=1e-6)
    assert (samples_run / "directions" / "explained_variance.png").exists()


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_pca_two_processes_merge_to_the_same_result(samples_run, tiny_model_dir, tmp_path, method):
    """Two ranks (exact: two sets of steps; randomized: two sets of shards, merged every pass) give
    what one process gives."""
    import shutil

    from pipeline.stages.pca import run_pca

    overrides = [f"model.name_or_path={tiny_model_dir}", "trainer.accelerator=cpu", "pca.n_components=4",
                 f"pca.method={method}", "pca.tol=1e-4", "pca.oversample=20"]
    run = tmp_path / "run"
    shutil.copytree(samples_run / "samples", run / "samples")
    hspace("pca", f"run_dir={run}", "trainer.devices=2", "trainer.strategy=ddp", *overrides, cwd=tmp_path)
    assert {"partial-0-of-2.safetensors", "partial-1-of-2.safetensors"} <= {p.name for p in (run / "pca").iterdir()}
    two = load_directions(run / "directions" / "pca.safetensors")
    one_run = tmp_path / "one"
    shutil.copytree(samples_run / "samples", one_run / "samples")
    run_pca(load_config(None, [f"run_dir={one_run}", *overrides]))
    one = load_directions(one_run / "directions" / "pca.safetensors")
    torch.testing.assert_close(two.extras["explained_variance"], one.extras["explained_variance"], rtol=1e-6, atol=0)
    torch.testing.assert_close(two.directions.abs(), one.directions.abs(), rtol=0, atol=1e-5)
    assert two.params["n_passes"] == one.params["n_passes"]
    V, ev = stored_pca(run)
    torch.testing.assert_close(two.extras["explained_variance"].double(), ev[:, :4], rtol=1e-4, atol=0)
    for t in range(3):
        ours = two.directions[:, t].flatten(1).double()
        assert principal_angles(ours / ours.norm(dim=1, keepdim=True), V[t, :4]).max() < 1e-3


def test_randomized_pca_that_stops_short_fails_and_writes_nothing(samples_run, tiny_model_dir, tmp_path):
    import shutil

    from pipeline.errors import ConvergenceError
    from pipeline.stages.pca import run_pca

    run = tmp_path / "run"
    shutil.copytree(samples_run / "samples", run / "samples")
    cfg = load_config(None, [f"run_dir={run}", f"model.name_or_path={tiny_model_dir}", "trainer.accelerator=cpu",
                             "pca.n_components=4", "pca.method=randomized", "pca.power_iterations=0", "pca.tol=1e-9"])
    with pytest.raises(ConvergenceError, match="after 2 passes"):
        run_pca(cfg)
    assert not (run / "directions" / "pca.safetensors").exists()


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_joint_pca_stage_matches_the_estimator(samples_run, tiny_model_dir, tmp_path, method):
    import shutil

    from pipeline.methods.pca import PCA
    from pipeline.stages.pca import run_pca

    run = tmp_path / "run"
    shutil.copytree(samples_run / "samples", run / "samples")
    run_pca(load_config(None, [f"run_dir={run}", f"model.name_or_path={tiny_model_dir}", "trainer.accelerator=cpu",
                               "pca.n_components=3", "pca.joint=true", f"pca.method={method}", "pca.tol=1e-4",
                               "pca.oversample=20"]))
    d = load_directions(run / "directions" / "pca.safetensors")
    h = load_samples(run).with_format("torch", columns=["h"])[:]["h"]
    ref = PCA(3, method="exact", joint=True).fit(h)
    assert d.directions.shape == (3, 3, 16, 8, 8) and d.params["method_used"] == method
    torch.testing.assert_close(d.extras["explained_variance"].double(), ref.explained_variance_, rtol=1e-4, atol=0)
    ours = d.directions.flatten(1).double()
    ours = ours / ours.norm(dim=1, keepdim=True)
    assert principal_angles(ours, ref.components_[0]).max() < 1e-2
