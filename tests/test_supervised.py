"""Supervised directions, disentanglement (eq. 10, 11) and the edit stage."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import selected_run
from pipeline.errors import ConfigError, DatasetError, InputError
from pipeline.formats.directions import Directions, load_directions, save_directions
from pipeline.methods.supervised import convergence_curve, cosine, logistic_direction, mean_difference, project_out


def test_project_out_is_orthogonal_and_exact():
    g = torch.Generator().manual_seed(0)
    v0 = torch.randn(4, 6, 3, 3, generator=g)
    V = torch.randn(3, 4, 6, 3, 3, generator=g)
    v = project_out(v0, V)
    for k in range(3):
        assert abs(float((v * V[k]).sum())) < 1e-5 * float(v0.norm() * V[k].norm())
    A = V.reshape(3, -1).double().T
    explicit = (torch.eye(A.shape[0], dtype=torch.float64) - A @ torch.linalg.inv(A.T @ A) @ A.T) @ v0.double().flatten()
    torch.testing.assert_close(v.double().flatten(), explicit, atol=1e-5, rtol=1e-5)
    # already orthogonal: unchanged; dependent conditioning directions: still a projection
    w = project_out(torch.randn(4, 6, 3, 3, generator=g), V)
    torch.testing.assert_close(project_out(w, V), w, atol=1e-5, rtol=1e-5)
    dup = torch.cat([V, V[:1] * 2])
    torch.testing.assert_close(project_out(v0, dup), v, atol=1e-4, rtol=1e-4)
    single = project_out(v0, V[0])  # v1 - <v1,v2>/|v2|^2 v2
    ref = v0 - (v0 * V[0]).sum() / V[0].square().sum() * V[0]
    torch.testing.assert_close(single, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(InputError):
        project_out(v0, torch.randn(2, 5))


def test_mean_difference_and_convergence():
    g = torch.Generator().manual_seed(1)
    pos, neg = torch.randn(40, 7, generator=g) + 1, torch.randn(30, 7, generator=g)
    torch.testing.assert_close(mean_difference(pos.half(), neg.half()),
                               (pos.half().double().mean(0) - neg.half().double().mean(0)).float())
    rows = convergence_curve(pos, neg, [1, 5, 30, 31], draws=20)
    assert [r["n"] for r in rows] == [1, 5, 30]  # 31 > 30 negatives: skipped
    assert rows[0]["cosine_mean"] < rows[1]["cosine_mean"] < 1.0
    with pytest.raises(InputError):
        mean_difference(pos[:0], neg)


def test_logistic_direction_recovers_the_normal():
    rng = np.random.default_rng(0)
    normal = rng.normal(size=50)
    normal /= np.linalg.norm(normal)
    X = rng.normal(size=(400, 50)) * 0.5
    y = (X @ normal > 0).astype(int)
    X = X + np.outer(y - 0.5, normal)  # a margin along the normal
    w, acc, _ = logistic_direction(X, y)
    assert abs(np.linalg.norm(w) - 1) < 1e-5 and w @ normal > 0.9 and acc > 0.95


def test_directions_file_round_trip_and_errors(tmp_path):
    d = Directions(torch.randn(2, 3, 4, 2, 2), ["a", "b"], "test", [20, 10, 0], params={"x": 1},
                   extras={"ev": torch.rand(3, 2)})
    path = save_directions(d, tmp_path / "d.safetensors")
    back = load_directions(path)
    assert torch.equal(back.directions, d.directions) and back.names == ["a", "b"] and back.params == {"x": 1}
    assert torch.equal(back.get("b"), d.directions[1]) and torch.equal(back.get("0"), d.directions[0])
    with pytest.raises(InputError, match="no direction named 'c'"):
        back.get("c")
    with pytest.raises(DatasetError, match="does not exist"):
        load_directions(tmp_path / "none.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="not a readable"):
        load_directions(tmp_path / "bad.safetensors")


@pytest.fixture(scope="module")
def annotated_run(tmp_path_factory, tiny_model_dir):
    """A tiny run directory taken through generate, annotate (known responses) and select, in-process."""
    return selected_run(tmp_path_factory.mktemp("sup") / "run", tiny_model_dir, "generate.num_samples=30",
                        "generate.batch_size=10", "select.n=6", "disentangle.pairs={bright: [red]}",
                        "supervised.convergence_ns=[1,3,6]", "edit.seeds=[500,501]", "edit.scales=[-1,0,1]",
                        "calibrate.num_samples=2", "calibrate.std_samples=8")


@pytest.mark.slow
def test_supervised_stage_matches_an_independent_computation(annotated_run):
    from pipeline.engine.noise import randn
    from pipeline.formats.samples import load_samples
    from pipeline.stages.select import load_selection
    from pipeline.stages.supervised import run_supervised

    cfg = annotated_run
    run_supervised(cfg)
    d = load_directions(f"{cfg.run_dir}/directions/supervised.safetensors")
    assert d.names == ["bright", "red"] and d.directions.shape == (2, 3, 16, 8, 8)
    ds = load_samples(cfg.run_dir).with_format("torch", columns=["sample_id", "h"])
    h = {int(i): x for i, x in zip(ds["sample_id"], ds["h"])}
    sel = load_selection(cfg.run_dir)
    for k, attr in enumerate(d.names):
        top = sel[(sel.attribute == attr) & (sel.side == "top")].sample_id
        bottom = sel[(sel.attribute == attr) & (sel.side == "bottom")].sample_id
        ref = torch.stack([h[i] for i in top]).double().mean(0) - torch.stack([h[i] for i in bottom]).double().mean(0)
        torch.testing.assert_close(d.directions[k].double(), ref, atol=1e-4, rtol=1e-4)
        xref = randn(list(top), "x_T", (3, 16, 16)).mean(0) - randn(list(bottom), "x_T", (3, 16, 16)).mean(0)
        torch.testing.assert_close(d.extras["x_T_directions"][k], xref, atol=1e-5, rtol=1e-5)
    curves = pd.read_csv(f"{cfg.run_dir}/directions/convergence.csv")
    full = curves[curves.n == 6]
    assert np.allclose(full.cosine_mean, 1.0)


@pytest.mark.slow
def test_disentangle_and_edit_stages(annotated_run):
    from pipeline.stages.disentangle import run_disentangle
    from pipeline.stages.edit import run_edit
    from pipeline.stages.supervised import run_supervised

    cfg = annotated_run
    run_supervised(cfg)
    run_disentangle(cfg)
    dis = load_directions(f"{cfg.run_dir}/directions/disentangled.safetensors")
    sup = load_directions(f"{cfg.run_dir}/directions/supervised.safetensors")
    assert dis.names == ["bright|red"]
    assert abs(cosine(dis.directions[0], sup.get("red"))) < 1e-5
    from pipeline.config import with_overrides

    for over in (["edit.directions=supervised"], ["edit.directions=supervised", "edit.x_T_space=true"],
                 ["edit.directions=supervised", "edit.sequential=true", "edit.scales=[1,-1]"]):
        paths = run_edit(with_overrides(cfg, over))
        assert all(p.exists() and p.stat().st_size > 1000 for p in paths)
    with pytest.raises(ConfigError, match="num_inference_steps"):
        run_edit(with_overrides(cfg, ["edit.directions=supervised", "model.num_inference_steps=4"]))
    with pytest.raises(ConfigError, match="own scale"):
        run_edit(with_overrides(cfg, ["edit.directions=supervised", "edit.sequential=true"]))


def test_edit_grids_put_each_direction_and_scale_in_its_place(tiny_model):
    """grids[n, :, j] is direction n at scales[j] (sampled alone, to one grey level: the batches
    differ); scale 0 is the plain sample, shared by every direction."""
    from pipeline import Edit
    from pipeline.formats.images import to_uint8
    from pipeline.stages.edit import edit_grids

    tiny_model = tiny_model()
    seeds, scales = [3, 4], [-50.0, 0.0, 100.0]
    g = torch.Generator().manual_seed(0)
    dirs = [torch.randn(tiny_model.num_steps, *tiny_model.h_shape, generator=g) for _ in range(2)]
    grids = edit_grids(tiny_model, seeds, dirs, scales, batch_size=3)
    plain = to_uint8(tiny_model.sample(seeds).images)
    assert grids.shape == (2, 2, 3, *plain.shape[1:])
    assert (grids[:, :, 1] == plain[None]).all()
    for n, d in enumerate(dirs):
        for j in (0, 2):
            direct = to_uint8(tiny_model.sample(seeds, Edit(delta=scales[j] * d)).images)
            assert np.abs(grids[n, :, j].astype(int) - direct.astype(int)).max() <= 1, (n, j)
    columns_apart = np.abs(grids[0, :, 0].astype(int) - grids[0, :, 2].astype(int)).max()
    directions_apart = np.abs(grids[0, :, 2].astype(int) - grids[1, :, 2].astype(int)).max()
    assert columns_apart > 10 and directions_apart > 10, "the edits must show for this test to tell them apart"


def test_disentangle_from_every_other_direction():
    """pairs value 'others' = every other direction in the file: the result is orthogonal to all
    of them and equals the explicit list; a primary among its own conditions is refused."""
    from pipeline.stages.disentangle import disentangle

    g = torch.Generator().manual_seed(0)
    d = Directions(torch.randn(3, 2, 4, 2, 2, generator=g), ["a", "b", "c"], "supervised", [10, 0])
    out = disentangle(d, {"a": "others", "b": ["c"]})
    assert out.names == ["a|others", "b|c"]
    for other in ("b", "c"):
        assert abs(cosine(out.get("a|others"), d.get(other))) < 1e-5
    torch.testing.assert_close(out.get("a|others"), disentangle(d, {"a": ["b", "c"]}).directions[0])
    with pytest.raises(ConfigError, match="other directions to remove"):
        disentangle(d, {"a": ["a", "b"]})
