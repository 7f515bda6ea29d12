"""SD3 and FLUX in hspace (pipeline/engine/families/sd3.py, flux.py): sampled by flow matching through
the one denoising loop, checked against diffusers' own StableDiffusion3Pipeline and FluxPipeline on the
tiny random-weight pipelines of pipeline/testing/tiny_families.py (float32, same initial latents,
prompt and guidance), and for what h-space needs: h is the image stream of a two-stream block, same
seed same sample in any batch, exact zero edits and replays, inversion, the Jacobian in h.
"""
from __future__ import annotations

import pytest
import torch
from diffusers import DiffusionPipeline, FluxPipeline
from test_tiny_families import GUIDANCE, PROMPT, SIZE, STEPS, load

from pipeline.engine.edits import Edit
from pipeline.engine.model import HSpaceModel
from pipeline.errors import InputError
from pipeline.methods.jacobian.products import autograd_context
from pipeline.testing import tiny_families

FAMILIES = ("sd3", "flux")
SEEDS = [3, 11, 5]
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow-families")
    return {family: tiny_families.save(family, root / family) for family in FAMILIES}


def model(folders, family, **kw) -> HSpaceModel:
    """The tiny model at SIZE px (FLUX's pipeline default is 128 latent pixels), STEPS steps, on the CPU."""
    kw = {"num_inference_steps": STEPS, "device": "cpu", "prompt": PROMPT, "guidance_scale": GUIDANCE,
          **({"height": SIZE, "width": SIZE} if family == "flux" else {}), **kw}
    return HSpaceModel.from_pretrained(str(folders[family]), **kw)


def record_image_stream(block: torch.nn.Module, seen: list):
    """A plain forward hook keeping element [1] (the image stream) of a two-stream block's output."""
    return block.register_forward_hook(lambda _m, _a, out: seen.append(out[1].detach().clone()))


@pytest.mark.parametrize("family,guidance", [("sd3", GUIDANCE), ("sd3", 1.0), ("flux", GUIDANCE)])
def test_image_and_h_equal_diffusers_pipeline(folders, family, guidance):
    """hspace's image equals the diffusers pipeline's from the same latents, prompt and guidance (SD3:
    CFG [uncond; cond] in one pass, or one pass at guidance 1; FLUX: one pass with the guidance
    embedding), to float32 rounding; h equals the image stream [1] of the default block as a plain
    hook sees it in the pipeline's call (SD3 under CFG: the conditional half)."""
    m = model(folders, family, guidance_scale=guidance)
    out = m.sample(SEEDS[:1])
    pipe = load(folders[family])
    seen: list = []
    handle = record_image_stream(pipe.transformer.get_submodule(m.hook_point), seen)
    latents = out.x_T
    if family == "flux":  # the pipeline takes its latents packed
        latents = FluxPipeline._pack_latents(latents, 1, latents.shape[1], SIZE // 2, SIZE // 2)
    image = pipe(prompt=PROMPT, latents=latents, height=SIZE, width=SIZE, num_inference_steps=STEPS,
                 guidance_scale=guidance, output_type="pt").images
    handle.remove()
    ours = out.images / 2 + 0.5  # [-1, 1] -> the pipeline's [0, 1]
    inside = ((image > 0) & (image < 1)).float().mean().item()
    assert inside > 0.9, f"only {inside:.0%} of the pixels unclamped: the comparison would say little"
    difference = (ours - image).abs().max().item()
    print(f"{family} guidance {guidance}: max |hspace - pipeline| = {difference:.1e}")
    assert difference < 2e-6
    rows = slice(-1, None)  # the conditional half of [uncond; cond], or the one row
    h_pipe = torch.stack([s[rows] for s in seen], 1)
    assert out.h.shape == h_pipe.shape == (1, STEPS, *m.h_shape)
    torch.testing.assert_close(out.h, h_pipe, atol=1e-5, rtol=1e-5)
    other = model(folders, family, guidance_scale=guidance, prompt="a red dog").sample(SEEDS[:1])
    assert (other.images - out.images).abs().max() > 1e-3, "another prompt must change the image"
    assert (other.h - out.h).abs().max() > 1e-3, "another prompt must change h"


@pytest.mark.parametrize("family", FAMILIES)
def test_h_is_the_image_stream_of_the_default_middle_block(folders, family):
    """h: (B, T, N, C) with N the image tokens (SD3: latent patches; FLUX: packed 2x2 patches) and C the
    transformer's width; the default block is block n // 2 of n in execution order."""
    m = model(folders, family)
    config = m.unet.config
    blocks = [f"transformer_blocks.{i}" for i in range(config.num_layers)]
    blocks += [f"single_transformer_blocks.{i}" for i in range(getattr(config, "num_single_layers", 0))]
    assert m.hook_point == blocks[len(blocks) // 2]
    _, h, w = m.latent_shape
    patch = 2 if family == "flux" else config.patch_size
    assert m.h_shape == ((h // patch) * (w // patch), config.num_attention_heads * config.attention_head_dim)
    out = m.sample(SEEDS[:2])
    assert out.h.shape == (2, STEPS, *m.h_shape) and torch.isfinite(out.h).all()


@pytest.mark.parametrize("family,hook", [("sd3", "transformer_blocks.3"), ("flux", "transformer_blocks.0"),
                                         ("flux", "single_transformer_blocks.1")])
def test_any_two_stream_block_gives_its_image_stream(folders, family, hook):
    """SD3's last block returns (None, image), FLUX's double- and single-stream blocks (text, image):
    h is element [1] at every one, and editing it changes the image."""
    m = model(folders, family, hook=hook)
    seen: list = []
    handle = record_image_stream(m.unet.get_submodule(hook), seen)
    out = m.sample(SEEDS[:1], guidance_scale=1.0)
    handle.remove()
    torch.testing.assert_close(out.h, torch.stack(seen, 1), atol=0, rtol=0)
    delta = 0.5 * torch.randn(STEPS, *m.h_shape, generator=torch.Generator().manual_seed(0))  # not constant over
    edited = m.sample(SEEDS[:1], Edit(delta=delta), guidance_scale=1.0)  # channels: the next LayerNorm removes that
    assert (edited.images - out.images).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_and_prompt_alone_or_in_a_batch(folders, family):
    """A sample depends on its seed and prompt only: alone, or in a batch of others with other prompts."""
    m = model(folders, family)
    prompts = [PROMPT, "a red dog", PROMPT]
    batch = m.sample(SEEDS, prompt=prompts)
    alone = [m.sample([seed], prompt=prompt) for seed, prompt in zip(SEEDS, prompts)]
    torch.testing.assert_close(torch.cat([a.images for a in alone]), batch.images, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat([a.h for a in alone]), batch.h, atol=1e-5, rtol=1e-5)
    assert batch.prompts == prompts


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_edit_is_bit_exact_an_edit_changes_the_image_a_replay_reproduces_it(folders, family):
    m = model(folders, family)
    out = m.sample(SEEDS[:2])
    zero = m.sample(SEEDS[:2], Edit(delta=torch.zeros(STEPS, *m.h_shape)))
    assert torch.equal(zero.images, out.images) and torch.equal(zero.h, out.h)
    delta = 0.5 * torch.randn(STEPS, *m.h_shape, generator=torch.Generator().manual_seed(0))
    edited = m.sample(SEEDS[:2], Edit(delta=delta))
    asyrp = m.sample(SEEDS[:2], Edit(delta=delta, asyrp=True))
    assert (edited.images - out.images).abs().max() > 1e-3
    assert (asyrp.images - edited.images).abs().max() > 1e-4, "Asyrp: P_t edited, D_t from the unedited pass"
    assert torch.equal(edited.h[:, 0], out.h[:, 0]), "h is recorded before the edit"
    assert torch.equal(m.sample(SEEDS[:2], Edit(replace=out.h)).images, out.images)


def test_flux_guidance_is_one_pass_with_the_embedding(folders):
    """FLUX runs one pass per step whatever the guidance (no unconditional branch), and the guidance
    value changes the sample through the embedding."""
    m = model(folders, "flux")
    rows: list = []
    handle = m.unet.register_forward_hook(lambda _m, _a, out: rows.append(len(out.sample)))
    out = m.sample(SEEDS[:2])
    handle.remove()
    assert rows == [2] * STEPS
    other = m.sample(SEEDS[:2], guidance_scale=1.5)
    assert (other.images - out.images).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_inverting_then_decoding_lands_back(folders, family):
    """The Euler step run backwards (with fixed-point iterations) from an image's latent, then sampled
    forward, lands back on that latent; the bound is measured on these tiny random models."""
    m = model(folders, family, guidance_scale=1.0)
    images = m.sample(SEEDS[:2]).images
    x0 = m.encode_images(images).float()
    vae = m.autoencoder.config  # x_0 = (z - shift) scaling, as the img2img pipelines encode (here z's mode)
    z = m.autoencoder.encode(images).latent_dist.mode()
    torch.testing.assert_close(x0, (z - vae.shift_factor) * vae.scaling_factor)
    inv = m.invert(images, fixed_point_iterations=8)
    assert inv.h.shape == (2, STEPS, *m.h_shape) and inv.x_T.shape == (2, *m.latent_shape)
    back = m.sample(x_T=inv.x_T)
    error, scale = (back.x_0 - x0).abs().max().item(), x0.abs().max().item()
    print(f"{family}: inversion round trip max |x_0 error| = {error:.1e} (|x_0| up to {scale:.2f})")
    assert error < 1e-3 * scale
    assert (back.images - m.family.decode(x0)).abs().max() < 1e-3
    plain = m.invert(images)  # one pass per step: the error fixed-point iterations remove
    assert (m.sample(x_T=plain.x_T).x_0 - x0).abs().max() > 10 * error


@pytest.mark.parametrize("family", FAMILIES)
def test_the_prediction_is_differentiable_in_h(folders, family):
    """The Jacobian of eps_t with respect to h (what the jacobian stage uses), by forward-mode AD, matches
    central finite differences (weights in float64; measured: 1e-4 of its largest entry)."""
    m = model(folders, family, precision="64-true")
    out = m.sample(SEEDS[:1], return_latents=True)
    step = 1
    x, h = out.latents[:, step].double(), out.h[:, step]
    v = torch.randn(h.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with autograd_context():
        _, jv = torch.func.jvp(lambda hh: m.eps_given_h(x, step, hh), (h,), (v,))
    eps = 1e-2  # eps_t comes back in float32: a smaller step would measure its rounding
    with torch.no_grad():
        fd = (m.eps_given_h(x, step, h + eps * v) - m.eps_given_h(x, step, h - eps * v)) / (2 * eps)
    scale = jv.abs().max().item()
    assert scale > 1e-2
    assert (jv - fd).abs().max() < 1e-3 * scale


@pytest.mark.parametrize("family", FAMILIES)
def test_jacobian_directions_are_eps_s_and_exist_at_the_first_step(folders, family):
    """eps_t = x_t + (1 - s) v: at the first step (s = 1) it does not depend on h (its Jacobian is zero),
    and later J_eps = (1 - s) J_v. The directions come from v: at step 1 they span the top right singular
    subspace of eps's full Jacobian (an SVD), and at step 0 they exist with positive singular values."""
    from pipeline.methods.jacobian.products import explicit_jacobian
    from pipeline.methods.jacobian.trajectory import jacobian_directions

    m = model(folders, family, precision="64-true", guidance_scale=1.0)
    out = m.sample(SEEDS[:1], return_latents=True)
    x, h = out.latents[:, 0].double(), out.h[:, 0].double()
    v = torch.randn(h.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with autograd_context():
        _, jv = torch.func.jvp(lambda hh: m.eps_given_h(x, 0, hh), (h,), (v,))
    assert jv.abs().max() == 0  # eps_0 = x_0 whatever h is
    first = jacobian_directions(m, out, 0, k=2, tol=1e-6)
    assert first.converged and (first.singular_values > 0).all()
    step = 1
    x, h = out.latents[:, step].double(), out.h[:, step].double()
    with autograd_context():
        J = explicit_jacobian(lambda hh: m.eps_given_h(x.expand(len(hh), *x.shape[1:]), step,
                                                       hh.reshape(-1, *m.h_shape)).reshape(len(hh), -1), h.reshape(1, -1))
    V = torch.linalg.svd(J.double(), full_matrices=False).Vh[:2].T  # (d, 2)
    got = jacobian_directions(m, out, step, k=2, tol=1e-6).directions.reshape(2, -1).double().T
    overlap = torch.linalg.svdvals(V.T @ got)  # cosines of the principal angles
    assert overlap.min() > 0.999


@pytest.mark.parametrize("family", FAMILIES)
def test_a_prompt_set_for_a_block_is_the_prompt_of_a_call_and_is_undone_after(folders, family):
    """``model.prompted`` (the stages' regeneration of a stored sample) samples as the prompt given per
    call, and leaves every default as it was."""
    m = model(folders, family)
    before = m.family.defaults()
    with m.prompted("a red square"):
        inside = m.sample(SEEDS[:1])
    assert m.family.defaults() == before
    assert torch.equal(inside.images, m.sample(SEEDS[:1], prompt="a red square").images)


@pytest.mark.parametrize("family", FAMILIES)
def test_wrong_inputs_are_one_line_errors(folders, family):
    m = model(folders, family)
    cases = [
        (lambda: m.sample(SEEDS[:1], eta=0.5), "eta > 0 has no meaning for a flow-matching model"),
        (lambda: m.sample(SEEDS[:1], height=32), "set when it is built"),
        (lambda: m.sample(SEEDS[:2], prompt=["a", "b", "c"]), "got 3 values of prompt for 2 samples"),
        (lambda: m.sample(SEEDS[:1], seed_me=1), "unknown conditioning input"),
        (lambda: model(folders, family, height=SIZE + 1, width=SIZE), "must be a multiple of"),
        (lambda: model(folders, family, hook="after"), "no mid_block"),
        (lambda: m.family.set_defaults(height=2 * SIZE), "set when it is built"),
    ]
    if family == "flux":
        cases.append((lambda: m.sample(SEEDS[:1], negative_prompt="blurry"), "FLUX.1's guidance is distilled"))
        cases.append((lambda: model(folders, family, negative_prompt="blurry"), "no unconditional branch"))
    else:
        cases.append((lambda: model(folders, family, height=128, width=128), "position table"))
    for call, says in cases:
        with pytest.raises(InputError, match=says) as error:
            call()
        assert "\n" not in str(error.value), str(error.value)
    assert m.latent_shape[1:] == (SIZE // 2, SIZE // 2), "a refused size leaves the model as it was"


def test_sd3_without_t5_takes_zeros_as_the_pipeline_does(folders, tmp_path):
    """An SD3 folder whose model_index.json lists no T5 (text_encoder_3 null) samples as the pipeline
    loaded without it: T5's part of the context is zeros."""
    import json
    import shutil

    folder = shutil.copytree(folders["sd3"], tmp_path / "sd3-no-t5")
    index = json.loads((folder / "model_index.json").read_text())
    index["text_encoder_3"] = index["tokenizer_3"] = [None, None]
    (folder / "model_index.json").write_text(json.dumps(index))
    m = HSpaceModel.from_pretrained(str(folder), num_inference_steps=STEPS, device="cpu", prompt=PROMPT,
                                    guidance_scale=GUIDANCE)
    assert "text_encoder_3" not in m.family.modules()
    out = m.sample(SEEDS[:1])
    pipe = DiffusionPipeline.from_pretrained(folders["sd3"], text_encoder_3=None, tokenizer_3=None)  # as its docs drop T5
    pipe.set_progress_bar_config(disable=True)
    image = pipe(prompt=PROMPT, latents=out.x_T, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                 output_type="pt").images
    assert (out.images / 2 + 0.5 - image).abs().max() < 2e-6
    with_t5 = model(folders, "sd3").sample(SEEDS[:1])
    assert (with_t5.images - out.images).abs().max() > 1e-3
