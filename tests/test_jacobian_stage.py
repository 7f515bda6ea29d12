"""`hspace jacobian`: the stage computes the SVD of the sample's own Jacobian, and applies it."""
from __future__ import annotations

import pytest
import torch

from pipeline import HSpaceModel
from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.formats.directions import load_directions
from pipeline.methods.jacobian import explicit_jacobian
from pipeline.stages.jacobian import parse_mask


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_jacobian_stage_matches_the_explicit_svd(tmp_path, tiny_model_dir, precision):
    """Under any trainer.precision the stage computes in float32 (bf16's rounding is above its tol)."""
    from pipeline.stages.generate import run_generate
    from pipeline.stages.jacobian import run_jacobian

    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", f"model.name_or_path={tiny_model_dir}",
                             "model.num_inference_steps=3", "model.eta=1.0", "trainer.accelerator=cpu",
                             "generate.num_samples=3", "jacobian.sample_ids=[2]", "jacobian.k=3", "jacobian.tau=1",
                             "jacobian.tol=1e-6", "jacobian.mask=rect:0.5:1:0:1", f"trainer.precision={precision}"])
    run_generate(cfg)
    run_jacobian(cfg)
    d = load_directions(tmp_path / "run" / "directions" / "jacobian.safetensors")
    assert d.names == ["s2-t1-v1", "s2-t1-v2", "s2-t1-v3"] and d.directions.shape == (3, 3, 16, 8, 8)
    S, V = d.extras["singular_values"][0], d.extras["vectors"][0]  # (T, k), (T, k, C, H, W)

    model = HSpaceModel.from_pretrained(str(tiny_model_dir), num_inference_steps=3, eta=1.0, device="cpu")
    out = model.sample([2], return_latents=True)  # the sample's own trajectory, its own step noise
    mask = parse_mask("rect:0.5:1:0:1", model.image_shape)
    for step in range(3):
        f = lambda h, step=step: (model.eps_given_h(out.latents[:, step].expand(len(h), -1, -1, -1), step,  # noqa: E731
                                                    h.view(-1, *model.h_shape)) * mask).flatten(1)
        with torch.enable_grad():
            J = explicit_jacobian(f, out.h[0, step].flatten())
        U_, s, Vh = torch.linalg.svd(J.double(), full_matrices=False)
        torch.testing.assert_close(S[step].double(), s[:3], rtol=1e-3, atol=0)
        for j in range(3):
            assert abs(float(V[step, j].flatten().double() @ Vh[j])) > 0.999
    # the ready-to-apply trajectory: the direction found at tau scaled by each step's singular value
    for j in range(3):
        torch.testing.assert_close(d.directions[j], S[:, j, None, None, None] * V[1, j][None])


@pytest.mark.slow
def test_jacobian_stage_on_some_steps(tmp_path, tiny_model_dir):
    """``jacobian.steps``: directions at those steps only, the edit applied there and nowhere else."""
    from pipeline.stages.generate import run_generate
    from pipeline.stages.jacobian import run_jacobian

    args = [f"run_dir={tmp_path / 'run'}", f"model.name_or_path={tiny_model_dir}", "model.num_inference_steps=3",
            "trainer.accelerator=cpu", "generate.num_samples=2", "jacobian.sample_ids=[1]", "jacobian.k=2",
            "jacobian.tol=1e-6", "jacobian.steps=[0,2]"]
    run_generate(load_config(None, args))
    for bad, match in (("jacobian.tau=1", r"jacobian.tau=1 in the command line: must be one of jacobian.steps \[0, 2\]"),
                       ("jacobian.steps=[0,3]", "0..2"), ("jacobian.steps=[2,2]", "distinct")):
        with pytest.raises(ConfigError, match=match):
            run_jacobian(load_config(None, args + ["jacobian.tau=2", bad]))
    assert not (tmp_path / "run" / "directions" / "jacobian.safetensors").exists()
    run_jacobian(load_config(None, args + ["jacobian.tau=2"]))
    d = load_directions(tmp_path / "run" / "directions" / "jacobian.safetensors")
    assert d.extras["steps"].tolist() == [0, 2] and d.directions.shape == (2, 3, 16, 8, 8)
    S, V = d.extras["singular_values"][0], d.extras["vectors"][0]  # (2, k), (2, k, C, H, W)
    model = HSpaceModel.from_pretrained(str(tiny_model_dir), num_inference_steps=3, device="cpu")
    out = model.sample([1], return_latents=True)
    for row, step in enumerate((0, 2)):
        f = lambda h, step=step: model.eps_given_h(out.latents[:, step].expand(len(h), -1, -1, -1), step,  # noqa: E731
                                                   h.view(-1, *model.h_shape)).flatten(1)
        with torch.enable_grad():
            s = torch.linalg.svdvals(explicit_jacobian(f, out.h[0, step].flatten()).double())
        torch.testing.assert_close(S[row].double(), s[:2], rtol=1e-3, atol=0)
    for j in range(2):
        torch.testing.assert_close(d.directions[j, [0, 2]], S[:, j, None, None, None] * V[1, j][None])
        assert not d.directions[j, 1].any()


def test_mask_specifications():
    m = parse_mask("rect:0:0.5:0.25:0.75", (3, 8, 8))
    assert m.shape == (8, 8) and m.sum() == 16 and m[:4, 2:6].all()
    assert parse_mask(None, (3, 8, 8)) is None
    with pytest.raises(ConfigError, match="rect:y0:y1:x0:x1"):
        parse_mask("rect:a:b", (3, 8, 8))
    with pytest.raises(ConfigError, match="does not exist"):
        parse_mask("/no/mask.png", (3, 8, 8))


@pytest.mark.slow
def test_jacobian_stage_never_writes_unconverged_directions(tmp_path, tiny_model_dir):
    """Alg. 2 (block 2) cut off by max_iter: with jacobian.unconverged=error the stage fails and writes
    nothing; by default the default method finishes from its vectors and the file records the
    residuals reached (all below tol) and where it fell back."""
    from pipeline.errors import ConvergenceError
    from pipeline.stages.generate import run_generate
    from pipeline.stages.jacobian import run_jacobian

    args = [f"run_dir={tmp_path / 'run'}", f"model.name_or_path={tiny_model_dir}", "model.num_inference_steps=2",
            "trainer.accelerator=cpu", "generate.num_samples=1", "jacobian.sample_ids=[0]", "jacobian.k=3",
            "jacobian.tau=1", "jacobian.tol=1e-4", "jacobian.method=sequential", "jacobian.block=2",
            "jacobian.max_iter=2"]
    run_generate(load_config(None, args))
    with pytest.raises(ConvergenceError, match="sequential stopped short of tol=1.0e-04"):
        run_jacobian(load_config(None, args + ["jacobian.unconverged=error"]))
    assert not (tmp_path / "run" / "directions" / "jacobian.safetensors").exists()
    run_jacobian(load_config(None, args + ["jacobian.max_iter=10"]))
    d = load_directions(tmp_path / "run" / "directions" / "jacobian.safetensors")
    residuals, fallback = d.extras["residuals"], d.extras["fallback"]
    assert residuals.shape == (1, 2, 3) and (residuals < 1e-4).all() and d.extras["converged"].all()
    assert fallback.shape == (1, 2) and fallback.all()
