"""P_t and D_t from the model's native prediction: finite on zero-terminal-SNR schedules, and as
close to a float64 reference as diffusers' own float32 DDIM loop."""
from __future__ import annotations

import copy

import pytest
import torch
from diffusers import DDIMScheduler

from pipeline import HSpaceModel
from pipeline.engine.schedules.ddim import output_to_eps, predicted_x0, split_prediction


def diffusers_loop(unet, scheduler, x, z, etas, dtype=torch.float32):
    """diffusers' DDIMScheduler.step loop (clip_sample off) from x_T with variance noise z (B, T, ...)."""
    x = x.to(dtype)
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            out = unet(x, t).sample
            x = scheduler.step(out, t, x, eta=etas[i], variance_noise=None if z is None else z[:, i].to(dtype)).prev_sample
    return x


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_v_prediction_on_a_zero_terminal_snr_schedule_is_finite_and_matches_diffusers(tiny_unet, eta):
    kw = {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    m = HSpaceModel(tiny_unet, DDIMScheduler(**kw), num_inference_steps=5, eta=eta, device="cpu")
    assert float(m.coefficients().alpha[0]) == 0.0, "the first step starts from pure noise (alpha_bar_T = 0)"
    sched = DDIMScheduler(clip_sample=False, **kw)
    sched.set_timesteps(5)
    seeds = [4, 9]
    ref = diffusers_loop(tiny_unet, sched, m.initial_noise(seeds), m.step_noise(seeds), m.eta.tolist())
    assert torch.isfinite(ref).all()
    out = m.sample(seeds)
    assert torch.isfinite(out.images).all() and torch.isfinite(out.h).all()
    torch.testing.assert_close(out.images, ref.clamp(-1, 1), atol=1e-5, rtol=0)


def test_split_prediction_needs_no_division_by_sqrt_alpha():
    """At alpha = 0 a v-model's P_t is -v and its eps is x_t (the eps route divides 0 by 0)."""
    x, v = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    x0, eps = split_prediction(v, x, 0.0, "v_prediction")
    assert torch.equal(x0, -v) and torch.equal(eps, x)
    # every prediction type is consistent with x_t = sqrt(a) P_t + sqrt(1-a) eps
    for kind in ("epsilon", "v_prediction", "sample"):
        x0, eps = split_prediction(v, x, 0.3, kind)
        torch.testing.assert_close(0.3**0.5 * x0 + 0.7**0.5 * eps, x, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def toy():
    return HSpaceModel.from_pretrained("toyfaces", num_inference_steps=20, eta=0.0, device="cpu")


def test_toy_first_step_prediction_is_exact_to_float32(toy):
    """P_t at t=999 (alpha_bar 2.4e-9) from the native v-prediction against float64: within float32
    rounding; the route through eps (dividing by sqrt(alpha_bar)) is off by orders of magnitude."""
    x = toy.initial_noise([0, 1])
    alpha = float(toy.coefficients().alpha[0])
    t = toy.timesteps[0]
    with torch.no_grad():
        v32 = toy.unet(x, t).sample
        v64 = copy.deepcopy(toy.unet).double()(x.double(), t).sample
    exact = split_prediction(v64, x.double(), alpha, "v_prediction")[0]
    native = split_prediction(v32, x, alpha, "v_prediction")[0].double()
    via_eps = predicted_x0(x, output_to_eps(v32, x, alpha, "v_prediction"), alpha).double()
    err_native, err_eps = (native - exact).abs().max().item(), (via_eps - exact).abs().max().item()
    assert err_native < 1e-4 and err_eps > 30 * err_native, (err_native, err_eps)


def test_toy_matches_a_float64_reference_as_closely_as_diffusers_float32_loop(toy):
    """On the shipped toy (v-prediction, cosine, t=999 first), hspace's images lie no further (RMS
    over 8 seeds, up to float32 noise) from a float64 run of diffusers' loop than diffusers' own float32 loop does."""
    seeds = list(range(8))
    x_T = toy.initial_noise(seeds)
    sched32 = DDIMScheduler.from_config(toy.scheduler.config, clip_sample=False)
    sched32.set_timesteps(20)
    sched64 = copy.deepcopy(sched32)
    sched64.alphas_cumprod = sched64.alphas_cumprod.double()
    sched64.final_alpha_cumprod = sched64.final_alpha_cumprod.double()
    unet64 = copy.deepcopy(toy.unet).double()
    ref = diffusers_loop(unet64, sched64, x_T, None, [0.0] * 20, torch.float64).clamp(-1, 1)
    ours = toy.sample(seeds).images.double()
    theirs = diffusers_loop(toy.unet, sched32, x_T, None, [0.0] * 20).clamp(-1, 1).double()
    rms_ours, rms_theirs = ((ours - ref).pow(2).mean().sqrt().item(), (theirs - ref).pow(2).mean().sqrt().item())
    # both are the U-Net's float32 rounding, amplified along the trajectory (measured 1.3e-7 and 1.2-1.6e-7
    # depending on the threads); the eps route adds ~100x at the first step (test above)
    assert rms_ours <= 1.5 * rms_theirs, (rms_ours, rms_theirs)


# ---------------------------------------------------------------------- flow matching (SD3, FLUX)
FLOW_CONFIGS = {  # FlowMatchEulerDiscreteScheduler settings -> set_timesteps keywords (as the pipelines pass them)
    "sd3": ({"shift": 3.0}, {}),
    "unshifted": ({}, {}),
    "flux": ({"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
              "max_image_seq_len": 4096}, {"mu": 0.8, "sigmas": "flux"}),
    "linear_terminal": ({"use_dynamic_shifting": True, "time_shift_type": "linear", "shift_terminal": 0.1}, {"mu": 1.3}),
}


def flow_pair(name: str, steps: int = 7):
    """diffusers' scheduler after set_timesteps, and hspace's FlowMatchSchedule, for one of FLOW_CONFIGS."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler

    from pipeline.engine.schedules.flow import FlowMatchSchedule

    config, kwargs = FLOW_CONFIGS[name]
    kwargs = dict(kwargs)
    if kwargs.get("sigmas") == "flux":  # FluxPipeline's own unshifted levels
        kwargs["sigmas"] = np.linspace(1.0, 1 / steps, steps)
    ref = FlowMatchEulerDiscreteScheduler(**config)
    ref.set_timesteps(steps, **kwargs)
    return ref, FlowMatchSchedule(FlowMatchEulerDiscreteScheduler(**config), steps, **kwargs)


@pytest.mark.parametrize("name", sorted(FLOW_CONFIGS))
def test_flow_matching_levels_and_timesteps_are_diffusers(name):
    """The noise levels s_i (the static shift of SD3, FLUX's resolution shift mu, a linear shift with a
    terminal value) and the timesteps given to the transformer equal FlowMatchEulerDiscreteScheduler's."""
    ref, ours = flow_pair(name)
    torch.testing.assert_close(ours.sigmas, ref.sigmas, atol=0, rtol=0)
    torch.testing.assert_close(ours.timesteps, ref.timesteps, atol=0, rtol=0)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_flow_matching_step_is_diffusers_euler_step(name):
    """Our step (the DDIM step in the flow split, in float64) against FlowMatchEulerDiscreteScheduler.step
    on random latents and velocities, step by step: equal to float32 rounding."""
    ref, ours = flow_pair(name)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 12, generator=g)
    coef = ours.coefficients()
    for i, t in enumerate(ref.timesteps):
        v = torch.randn(2, 16, 12, generator=g)
        expected = ref.step(v, t, x).prev_sample
        x0, eps = ours.split_prediction(v.double(), x.double(), i)
        got = ours.step(x0, eps, i, coef)
        torch.testing.assert_close(got.float(), expected, atol=2e-6, rtol=2e-6)
        x = expected


def test_flow_matching_split_identities():
    """P_t = x - s v and eps_t = x + (1 - s) v give back x = (1 - s) P_t + s eps_t and v = eps_t - P_t; the
    DDIM step (1 - s') P_t + s' eps_t is the Euler step x + (s' - s) v; the inversion step undoes it (float64)."""
    _, ours = flow_pair("flux")
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(3, 16, 12, generator=g, dtype=torch.float64), torch.randn(3, 16, 12, generator=g, dtype=torch.float64)
    coef = ours.coefficients()
    for i in range(ours.num_steps):
        s, s_next = float(coef.s[i]), float(coef.s_next[i])
        x0, eps = ours.split_prediction(v, x, i)
        torch.testing.assert_close((1 - s) * x0 + s * eps, x, atol=1e-14, rtol=0)
        torch.testing.assert_close(eps - x0, v, atol=1e-14, rtol=0)
        x_next = ours.step(x0, eps, i, coef)
        torch.testing.assert_close(x_next, x + (s_next - s) * v, atol=1e-14, rtol=0)
        torch.testing.assert_close(ours.inversion_step(x_next, x0, eps, i), x, atol=1e-14, rtol=0)
    assert float(coef.s[0]) == 1.0 and float(coef.s_next[-1]) == 0.0 and not (coef.sigma > 0).any()


def test_flow_matching_refusals_and_the_resolution_shift():
    """eta > 0 and the scheduler options that change the sampler are one-line errors; FLUX's mu is
    diffusers' calculate_shift, and a dynamic-shift scheduler without mu is refused."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from pipeline.engine.schedules.flow import FlowMatchSchedule, resolution_shift
    from pipeline.errors import InputError

    with pytest.raises(InputError, match="^eta > 0 has no meaning for a flow-matching model .*set model.eta=0$"):
        FlowMatchSchedule(FlowMatchEulerDiscreteScheduler(shift=3.0), 4, eta=[0, 0.5, 0, 0])
    assert (FlowMatchSchedule(FlowMatchEulerDiscreteScheduler(), 4).coefficients(0.0).sigma == 0).all()
    with pytest.raises(InputError, match="sets use_karras_sigmas; hspace samples with the deterministic Euler"):
        FlowMatchSchedule(FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True), 4)
    dynamic = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    with pytest.raises(InputError, match="must give mu"):
        FlowMatchSchedule(dynamic, 4)
    for tokens in (256, 1024, 4096):
        assert resolution_shift(tokens, dynamic.config) == pytest.approx(calculate_shift(tokens), abs=1e-12)
