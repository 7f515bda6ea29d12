"""HSpaceModel: recording, editing, reproducibility and its failure modes (tiny random U-Nets)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from pipeline import Edit, HSpaceModel
from pipeline.engine.noise import randn
from pipeline.errors import InputError

SEEDS = [11, 3, 5, 8, 13, 21, 34]


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_zero_edit_is_bit_identical(tiny_model, eta):
    m = tiny_model(eta=eta)
    plain = m.sample(SEEDS[:3])
    zero = m.sample(SEEDS[:3], Edit(delta=torch.zeros(m.num_steps, *m.h_shape)))
    assert torch.equal(plain.images, zero.images)
    assert torch.equal(plain.h, zero.h)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_same_seed_same_sample_alone_or_in_a_batch(tiny_model, eta):
    m = tiny_model(eta=eta)
    batch = m.sample(SEEDS)
    shuffled = m.sample(SEEDS[::-1])
    for i, seed in enumerate(SEEDS):
        alone = m.sample([seed])
        torch.testing.assert_close(alone.images[0], batch.images[i], atol=1e-4, rtol=0)
        torch.testing.assert_close(alone.h[0], batch.h[i], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(shuffled.h[len(SEEDS) - 1 - i], batch.h[i], atol=1e-4, rtol=1e-4)
        assert torch.equal(alone.x_T[0], batch.x_T[i])
    # reproducible run to run, bit for bit
    again = m.sample(SEEDS)
    assert torch.equal(again.images, batch.images) and torch.equal(again.h, batch.h)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_sample_edits_gives_each_edit_as_if_sampled_alone(tiny_model, eta):
    """Every (edit, seed) image equals sampling that edit of those seeds on its own, however the
    pairs are cut into batches; None is the plain sample; x_T-space edits the same."""
    m = tiny_model(eta=eta)
    g = torch.Generator().manual_seed(0)
    seeds = SEEDS[:3]
    edits = [None, torch.randn(m.num_steps, *m.h_shape, generator=g), 3 * torch.randn(m.num_steps, *m.h_shape, generator=g)]
    alone = torch.stack([m.sample(seeds, Edit(delta=e)).images for e in edits])
    for batch_size in (1, 4, 64):
        images = m.sample_edits(seeds, edits, batch_size=batch_size)
        assert images.shape == (3, 3, *m.image_shape)
        torch.testing.assert_close(images, alone, atol=1e-4, rtol=0)
    assert (alone[2] - alone[0]).abs().max() > 1e-2, "the edits must show for this test to tell them apart"
    dx = torch.randn(*m.image_shape, generator=g)
    shifted = m.sample_edits(seeds, [dx, None], space="x_T", batch_size=2)
    torch.testing.assert_close(shifted[0], m.sample(seeds, Edit(dx_T=dx)).images, atol=1e-4, rtol=0)
    torch.testing.assert_close(shifted[1], alone[0], atol=1e-4, rtol=0)
    with pytest.raises(InputError, match="space"):
        m.sample_edits(seeds, edits, space="pixels")
    with pytest.raises(InputError, match="at least one"):
        m.sample_edits([], edits)


def test_stochastic_sampling_depends_on_step_noise(tiny_model):
    ddim, ddpm = tiny_model(eta=0.0), tiny_model(eta=1.0)
    a, b = ddim.sample([1]), ddpm.sample([1])
    assert torch.equal(a.x_T, b.x_T)
    assert (a.images - b.images).abs().max() > 1e-3


@pytest.mark.parametrize("eta,prediction,spacing", [
    (0.0, "epsilon", "leading"), (1.0, "epsilon", "leading"), ([1.0, 0.5, 0.0, 0.3, 1.0], "epsilon", "leading"),
    (1.0, "v_prediction", "trailing"), (0.0, "sample", "leading")])
def test_matches_diffusers_ddim_step(tiny_unet, eta, prediction, spacing):
    """Our eq. 2-5 against diffusers' DDIMScheduler.step, same noise, every prediction type."""
    kw = {"prediction_type": prediction, "timestep_spacing": spacing}
    m = HSpaceModel(tiny_unet, DDIMScheduler(**kw), num_inference_steps=5, eta=eta, device="cpu")
    sched = DDIMScheduler(clip_sample=False, **kw)
    sched.set_timesteps(5)
    x, z = m.initial_noise([4, 9]), m.step_noise([4, 9])
    etas = m.eta.tolist()
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            x = sched.step(tiny_unet(x, t).sample, t, x, eta=etas[i], variance_noise=z[:, i]).prev_sample
    torch.testing.assert_close(m.sample([4, 9]).images, x.clamp(-1, 1), atol=1e-5, rtol=0)


def test_noise_streams_are_independent_and_leave_global_rng_alone():
    torch_state, np_state = torch.random.get_rng_state(), np.random.get_state()[1].copy()
    seeds = list(range(500))
    x_T = randn(seeds, "x_T", (3, 4, 4))
    z = randn(seeds, "z", (3, 4, 4))
    assert torch.equal(torch.random.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], np_state)
    flat = x_T.flatten(1)
    assert len({tuple(r.tolist()) for r in flat}) == 500  # no seed-chain collapse
    # no stream shared: z of seed s is not x_T of seed s or s+1 (the original code's defect)
    assert not torch.allclose(z[:-1], x_T[1:]) and not torch.allclose(z, x_T)
    corr = torch.corrcoef(torch.stack([z[:-1].flatten(), x_T[1:].flatten(), x_T[:-1].flatten()]))
    assert corr[0, 1].abs() < 0.02 and corr[0, 2].abs() < 0.02
    assert torch.equal(randn([7], "x_T", (3, 4, 4))[0], x_T[7])
    with pytest.raises(ValueError, match="non-negative"):
        randn([-1], "x_T", (2,))


def test_asyrp_runs_two_passes_per_edited_step(tiny_model):
    m = tiny_model(eta=1.0)
    delta = 0.5 * torch.ones(m.num_steps, *m.h_shape)
    start = m.hook.calls  # the hook counts the network's passes
    sym = m.sample([1, 2], Edit(delta=delta))
    assert m.hook.calls - start == m.num_steps
    start = m.hook.calls
    asy = m.sample([1, 2], Edit(delta=delta, asyrp=True))
    assert m.hook.calls - start == 2 * m.num_steps
    start = m.hook.calls
    m.sample([1, 2], Edit(delta=delta, asyrp=True, steps=[0, 2]))
    assert m.hook.calls - start == m.num_steps + 2
    assert (sym.images - asy.images).abs().max() > 1e-4
    # the recorded h is the activation before the edit: step 0 sees the same x_T either way
    assert torch.equal(sym.h[:, 0], asy.h[:, 0])


def test_steps_limit_where_the_edit_applies(tiny_model):
    m = tiny_model(eta=1.0)
    plain = m.sample([3])
    delta = torch.randn(m.num_steps, *m.h_shape, generator=torch.Generator().manual_seed(0))
    edited = m.sample([3], Edit(delta=delta, steps=[3]))
    assert torch.equal(plain.h[:, :4], edited.h[:, :4])  # h at step 3 is recorded before the edit
    assert not torch.allclose(plain.h[:, 4], edited.h[:, 4])
    # per-sample deltas: sample 0 unedited, sample 1 edited
    both = m.sample([3, 3], Edit(delta=torch.stack([torch.zeros_like(delta), delta]), steps=[3]))
    torch.testing.assert_close(both.images[0], plain.images[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(both.images[1], edited.images[0], atol=1e-5, rtol=0)


def test_edit_is_added_to_h(tiny_model):
    """The U-Net downstream of the hook sees h + delta: compare against a replace of h + delta."""
    m = tiny_model(eta=0.0)
    plain = m.sample([5])
    delta = 0.3 * torch.randn(m.num_steps, *m.h_shape, generator=torch.Generator().manual_seed(1))
    edited = m.sample([5], Edit(delta=delta, steps=[0]))
    replaced = m.sample([5], Edit(replace=plain.h + delta, steps=[0]))
    torch.testing.assert_close(edited.images, replaced.images, atol=1e-6, rtol=0)


def test_replaying_recorded_h_reproduces_the_image(tiny_model):
    m = tiny_model(eta=1.0)
    out = m.sample([1, 2])
    replay = m.sample([1, 2], Edit(replace=out.h))
    assert torch.equal(replay.images, out.images)


def test_swapping_h_swaps_the_bottleneck_only(tiny_model):
    m = tiny_model(eta=1.0)
    a, b = m.sample([1]), m.sample([2])
    swapped = m.sample([1], Edit(replace=b.h))
    assert torch.equal(swapped.x_T, a.x_T)
    assert torch.equal(swapped.h[:, 0], a.h[:, 0])  # recorded before the swap
    da, db = (swapped.images - a.images).abs().mean(), (swapped.images - b.images).abs().mean()
    assert da > 1e-3 and db > 1e-3  # neither sample: h alone does not determine the image (Fig. 3)


def test_latents_round_trip_through_sample(tiny_model):
    m = tiny_model(eta=1.0)
    out = m.sample([6, 7])
    again = m.sample(x_T=out.x_T, noise=m.step_noise([6, 7]))
    assert torch.equal(again.images, out.images)
    via_seeds = m.sample([6, 7], x_T=out.x_T)
    assert torch.equal(via_seeds.images, out.images)
    dx = 0.1 * torch.ones(3, 16, 16)
    shifted = m.sample([6, 7], Edit(dx_T=dx))
    assert torch.equal(shifted.x_T, out.x_T + dx)
    assert torch.equal(shifted.images, m.sample([6, 7], x_T=out.x_T + dx).images)


@pytest.mark.parametrize("point", ["after", "before"])
def test_hook_records_the_mid_block_activation(tiny_unet, point):
    m = HSpaceModel(tiny_unet, DDIMScheduler(), num_inference_steps=3, hook=point, device="cpu")
    assert m.h_shape == (16, 8, 8)  # probed once when the model loads, before we listen
    seen = []
    if point == "after":
        handle = tiny_unet.mid_block.register_forward_hook(lambda mod, a, out: seen.append(out.clone()))
    else:
        handle = tiny_unet.mid_block.register_forward_pre_hook(lambda mod, a: seen.append(a[0].clone()))
    try:
        out = m.sample([1, 2])
    finally:
        handle.remove()
    assert out.h.shape == (2, 3, 16, 8, 8)
    for i in range(3):
        assert torch.equal(out.h[:, i], seen[i])


def test_inversion_records_h_and_returns_latents(tiny_model):
    m = tiny_model(eta=0.0)
    images = m.sample([1, 2]).images * 0.5
    inv = m.invert(images)
    assert inv.x_T.shape == images.shape and inv.h.shape == (2, m.num_steps, *m.h_shape)
    with pytest.raises(InputError, match=r"\[-1, 1\]"):
        m.invert(images * 4)


def test_fixed_point_inversion_lands_closer_and_converges_to_exact(tiny_unet):
    """Decoding an inversion reproduces the image better with fixed-point iterations, and the
    iterate converges to a true fixed point: sampling from it recovers the image to float
    precision. (The U-Net's output is scaled down so that the iteration contracts; the random
    tiny U-Net as built saturates every sample.)"""
    with torch.no_grad():
        tiny_unet.conv_out.weight.mul_(0.1)
        tiny_unet.conv_out.bias.zero_()
    m = HSpaceModel(tiny_unet, DDIMScheduler(), num_inference_steps=5, eta=0.0, device="cpu")
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 1.6 - 0.8
    errors = []
    for k in (0, 1, 3, 30):
        inv = m.invert(images, fixed_point_iterations=k)
        errors.append(float((m.sample(x_T=inv.x_T, eta=0.0).images - images).abs().max()))
    assert errors[0] > 0.1, errors  # plain inversion's approximation is visible on this model
    assert errors[0] > errors[1] > errors[2] > 1e-3, errors
    assert errors[3] < 1e-4, errors
    with pytest.raises(InputError, match="fixed_point_iterations must be >= 0"):
        m.invert(images, fixed_point_iterations=-1)


def test_bad_inputs_raise_clear_errors(tiny_unet, tiny_model):
    m = tiny_model(eta=1.0)
    with pytest.raises(InputError, match=r"Edit.delta has shape"):
        m.sample([1], Edit(delta=torch.zeros(2, 16, 8, 8)))
    with pytest.raises(InputError, match=r"eta has 3 values but there are 5"):
        HSpaceModel(tiny_unet, DDIMScheduler(), num_inference_steps=5, eta=[0, 1, 0], device="cpu")
    with pytest.raises(InputError, match="eta values must be finite and >= 0"):
        HSpaceModel(tiny_unet, DDIMScheduler(), num_inference_steps=5, eta=-1, device="cpu")
    with pytest.raises(InputError, match="unknown hook point 'middle'"):
        HSpaceModel(tiny_unet, DDIMScheduler(), hook="middle", device="cpu")
    with pytest.raises(InputError, match="needs per-step noise"):
        m.sample(x_T=torch.zeros(1, 3, 16, 16))
    with pytest.raises(InputError, match="steps .* out of range"):
        m.sample([1], Edit(delta=torch.zeros(m.num_steps, *m.h_shape), steps=[9]))
    with pytest.raises(InputError, match="give seeds"):
        m.sample()


def test_edit_friendly_ddpm_inversion_reproduces_the_image(tiny_model):
    m = tiny_model(eta=1.0)
    images = m.sample([1, 2]).images * 0.8
    inv = m.invert_ddpm(images, seeds=[10, 11])
    assert inv.noise.shape == (2, m.num_steps, 3, 16, 16) and inv.h.shape == (2, m.num_steps, *m.h_shape)
    again = m.invert_ddpm(images, seeds=[10, 11])
    assert torch.equal(inv.noise, again.noise) and torch.equal(inv.x_T, again.x_T)  # seeded
    out = m.sample(x_T=inv.x_T, noise=inv.noise)
    # every stochastic step lands exactly on the inversion's x_t; only the last, deterministic
    # step (sigma = 0) is the model's own denoising of the least noisy x_t
    last = m.sample(x_T=inv.x_T, noise=inv.noise, return_latents=True).latents[:, -1]
    coef = m.coefficients()
    a = float(coef.alpha[-1])
    expected_last = a ** 0.5 * images + (1 - a) ** 0.5 * randn([10, 11], "inversion", (m.num_steps, 3, 16, 16))[:, -1]
    torch.testing.assert_close(last, expected_last, atol=1e-4, rtol=0)
    assert (out.images - images).abs().mean() < 0.05
    with pytest.raises(InputError, match="eta > 0"):
        tiny_model(eta=0.0).invert_ddpm(images, seeds=[1, 2])


# ---------------------------------------------------------------------- the one builder
ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_every_stage_builds_the_model_with_the_one_builder():
    """Stages, explore, evaluation, the direction methods, validate-toy and the bench scripts build the model only
    with HSpaceModel.from_config(cfg, ...) from the whole configuration: never HSpaceModel(...), from_pretrained,
    load_pipeline or a model section alone (which would leave trainer.precision out)."""
    import re

    files = [*(ROOT / "pipeline" / "stages").glob("*.py"), *(ROOT / "pipeline" / "explore").glob("*.py"),
             *(ROOT / "pipeline" / "methods").rglob("*.py"), *(ROOT / "evaluation").glob("*.py"),
             *(ROOT / "bench").glob("*.py"), ROOT / "toyfaces" / "validate.py"]
    other_way = re.compile(r"HSpaceModel\(|HSpaceModel\.from_pretrained|load_pipeline\(|use_precision\(")
    builder = re.compile(r"HSpaceModel\.from_config\(\s*([^,)]*)")
    bad, builds = [], 0
    for path in files:
        text = path.read_text()
        bad += [f"{path.relative_to(ROOT)}: {m.group(0)}" for m in other_way.finditer(text)]
        for m in builder.finditer(text):
            builds += 1
            if m.group(1).strip() not in ("cfg", "self.cfg") and not m.group(1).strip().startswith("load_config("):
                bad.append(f"{path.relative_to(ROOT)}: from_config({m.group(1)}...): give the whole configuration")
    assert not bad, bad
    assert builds >= 17  # every stage that samples, explore, validate-toy and the bench scripts


class Stop(Exception):
    """Raised by the first pass of the denoiser once its precision is recorded."""


def record_first_pass(monkeypatch, module, name: str) -> list:
    """Wrap ``module.name(model, ...)``: its model's first denoiser pass records (autocast dtype or None, the
    weights' dtype) and stops the run with :class:`Stop`."""
    seen, original = [], getattr(module, name)

    def wrapper(model, *args, **kwargs):
        def first_pass(net, args):
            seen.append((torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None,
                         next(net.parameters()).dtype))
            raise Stop

        handle = model.unet.register_forward_pre_hook(first_pass)
        try:
            return original(model, *args, **kwargs)
        finally:
            handle.remove()

    monkeypatch.setattr(module, name, wrapper)
    return seen


@pytest.mark.parametrize("precision,expected", [("bf16-mixed", (torch.bfloat16, torch.float32)),
                                                ("bf16-true", (None, torch.bfloat16))])
def test_validate_toy_samples_at_the_trainers_precision(monkeypatch, tmp_path, precision, expected):
    import toyfaces.validate
    from pipeline.config import load_config

    seen = record_first_pass(monkeypatch, toyfaces.validate, "validate")
    cfg = load_config(None, [f"run_dir={tmp_path}", "model.num_inference_steps=2", "trainer.accelerator=cpu",
                             f"trainer.precision={precision}"])
    with pytest.raises(Stop):
        toyfaces.validate.run_validate_toy(cfg)
    assert seen == [expected]


@pytest.mark.slow
def test_evaluates_pixel_matching_samples_at_the_trainers_precision(monkeypatch, tmp_path, tiny_model_dir):
    """evaluate's random-direction pixel matching (calibrate_random, before the Trainer starts) samples at
    trainer.precision, as the Trainer's part of the stage does."""
    import pipeline.stages.evaluate as evaluate
    from pipeline.config import load_config
    from pipeline.stages.annotate import run_annotate
    from pipeline.stages.generate import run_generate
    from pipeline.stages.pca import run_pca
    from pipeline.stages.select import run_select
    from pipeline.stages.supervised import run_supervised

    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", f"model.name_or_path={tiny_model_dir}",
                             "model.num_inference_steps=2", "trainer.accelerator=cpu", "trainer.precision=bf16-mixed",
                             "generate.num_samples=8", "annotate.annotators=[fake_annotators:brightness]",
                             "select.attributes=[bright,red]", "select.n=2", "supervised.convergence_ns=[1]",
                             "pca.n_components=2", "evaluate.scorer=fake_annotators:brightness", "evaluate.quality=null",
                             "evaluate.pca_components=1"])
    for stage in (run_generate, run_annotate, run_select, run_supervised, run_pca):
        stage(cfg)
    seen = record_first_pass(monkeypatch, evaluate, "calibrate_random")
    with pytest.raises(Stop):
        evaluate.run_evaluate(cfg)
    assert seen == [(torch.bfloat16, torch.float32)]


def test_text_settings_are_refused_for_a_model_that_takes_no_text(tiny_model_dir):
    from pipeline.config import load_config
    from pipeline.errors import ConfigError

    base = [f"model.name_or_path={tiny_model_dir}", "model.num_inference_steps=2", "model.device=cpu"]
    assert HSpaceModel.from_config(load_config(None, base)).kind == "pixel"  # the defaults are no setting
    with pytest.raises(ConfigError, match=r"^model.prompt='a face', model.guidance_scale=3.0: .* is a pixel model, "
                                          r"which takes no prompt, class or size setting; remove the setting"):
        HSpaceModel.from_config(load_config(None, [*base, "model.prompt=a face", "model.guidance_scale=3"]))


def test_a_hook_point_whose_output_is_not_h_is_refused_when_the_model_loads(tiny_unet):
    with pytest.raises(InputError, match=r"^model.hook=time_embedding: TimestepEmbedding returns a tensor \(1, 32\) "
                                         r"for a batch of 1; h must be a per-sample activation of rank >= 2"):
        HSpaceModel(tiny_unet, DDIMScheduler(), num_inference_steps=2, hook="time_embedding", device="cpu")


def test_an_edit_with_non_finite_values_is_refused(tiny_model):
    m = tiny_model()
    bad = torch.zeros(m.num_steps, *m.h_shape)
    bad[2, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match=r"^Edit.delta has non-finite values \(nan or inf\); give finite numbers$"):
        m.sample([1], Edit(delta=bad))
    with pytest.raises(InputError, match=r"^Edit.dx_T has non-finite values"):
        m.sample([1], Edit(dx_T=torch.full(m.latent_shape, float("inf"))))


def test_the_earlier_keywords_say_what_replaced_them(tiny_model):
    m = tiny_model()
    with pytest.raises(InputError, match=r"^delta_h= is now Edit\(delta=...\); asyrp= is now Edit\(asyrp=...\) "):
        m.sample([1], delta_h=torch.zeros(m.num_steps, *m.h_shape), asyrp=True)
    with pytest.raises(InputError, match=r"^dtype= is now precision= \('16-true', 'bf16-true', ...\)"):
        HSpaceModel(m.unet, DDIMScheduler(), num_inference_steps=2, dtype="float16")


def test_precision_leaves_the_global_default_dtype_alone(tiny_model_dir):
    """bf16-true converts the weights and nothing else: torch's default dtype stays float32 while the model
    samples, and a default dtype set around it (as Lightning's *-true context does under a Trainer) changes
    nothing, so that stages with and without a Trainer give the same samples."""
    from pipeline.config import load_config

    m = HSpaceModel.from_config(load_config(None, [f"model.name_or_path={tiny_model_dir}", "model.device=cpu",
                                                   "model.num_inference_steps=3", "trainer.precision=bf16-true"]))
    seen = []
    handle = m.unet.register_forward_pre_hook(lambda module, args: seen.append(torch.get_default_dtype()))
    out = m.sample([1, 2], Edit(delta=torch.ones(3, *m.h_shape)))
    handle.remove()
    assert set(seen) == {torch.float32} and m.dtype == torch.bfloat16 and out.h.dtype == torch.bfloat16
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        under = m.sample([1, 2], Edit(delta=torch.ones(3, *m.h_shape)))
    finally:
        torch.set_default_dtype(previous)
    assert torch.equal(under.images, out.images) and torch.equal(under.h, out.h) and torch.equal(under.x_T, out.x_T)


def test_h_of_rank_two_in_a_unet_is_recorded_and_edited_and_the_stages_take_it(tiny_unet, tiny_model_dir):
    """A module whose output is token-wise (an attention projection: (B, H*W, C)) gives h of rank 2: sampled,
    recorded and edited like any h (a zero edit bit-exact, replaying h reproduces the sample); the stages'
    builder refuses it in one line, since the samples and directions files hold (T, C, H, W)."""
    from pipeline.config import load_config

    m = HSpaceModel(tiny_unet, DDIMScheduler(), num_inference_steps=3, hook="mid_block.attentions.0.to_q", device="cpu")
    assert m.h_shape == (64, 16)
    out = m.sample([1, 2])
    assert out.h.shape == (2, 3, 64, 16)
    assert torch.equal(m.sample([1, 2], Edit(delta=torch.zeros(3, 64, 16))).images, out.images)
    assert torch.equal(m.sample([1, 2], Edit(replace=out.h)).images, out.images)
    assert (m.sample([1, 2], Edit(delta=torch.ones(3, 64, 16))).images - out.images).abs().max() > 1e-3
    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", "model.device=cpu", "model.num_inference_steps=2",
                             "model.hook=mid_block.attentions.0.to_q"])
    assert HSpaceModel.from_config(cfg).h_shape == (64, 16)  # the run directory holds h of any shape (test_h_storage)
