"""SDXL, DiT and PixArt-alpha/Sigma through one HSpaceModel (pipeline/engine/families/sdxl.py, dit.py,
pixart.py), on the tiny random-weight pipelines of pipeline/testing/tiny_families.py saved in the hub
layouts and loaded offline: samples equal diffusers' own pipelines (with a DDIMScheduler made from the
saved scheduler's config) from the same initial latents, condition and guidance; the engine's
guarantees (seeds, edits, h, inversion) hold for each family; wrong inputs are one-line errors. Also:
hspace's DDIM equals diffusers' DDIMScheduler for every timestep spacing."""
from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, DiTTransformer2DModel, PixArtTransformer2DModel
from diffusers.utils import logging as diffusers_logging

from pipeline import Edit, HSpaceModel
from pipeline.engine.schedules import DDIMSchedule
from pipeline.errors import InputError

STEPS = 3
SEEDS = [11, 3, 5]
PROMPT = "  A Photo of a Cat "  # PixArt lower-cases and strips it
FAMILIES = ["sdxl", "dit", "pixart_alpha", "pixart_sigma"]
FAST = ["sdxl", "dit", "pixart_sigma"]  # PixArt-alpha's tiny model keeps the 1024 model's sample size 128 (256 px)
CONDITION = {"sdxl": {"prompt": PROMPT}, "dit": {"class_label": "goldfish"}, "pixart_alpha": {"prompt": PROMPT},
             "pixart_sigma": {"prompt": PROMPT}}
OTHER = {"sdxl": {"prompt": "a red dog"}, "dit": {"class_label": 2}, "pixart_sigma": {"prompt": "a red dog"},
         "pixart_alpha": {"prompt": "a red dog"}}

diffusers_logging.set_verbosity_error()
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest)


@pytest.fixture(scope="module")
def models(tiny_family_folders):
    """family -> its HSpaceModel (3 steps, CPU), loaded once for the tests that do not change it."""
    class Models(dict):
        def __missing__(self, family):
            self[family] = load(tiny_family_folders, family)
            return self[family]

    return Models()


def load(folders, family, **kw) -> HSpaceModel:
    return HSpaceModel.from_pretrained(str(folders[family]), num_inference_steps=STEPS, device="cpu",
                                       **CONDITION[family], **kw)


def output_layer(m: HSpaceModel) -> torch.nn.Module:
    net = m.unet
    return {"sdxl": lambda: net.conv_out, "dit": lambda: net.proj_out_2}.get(m.kind, lambda: net.proj_out)()


# ---------------------------------------------------------------------- against diffusers' pipelines
def pipeline_images(folder, family: str, x_T: torch.Tensor, guidance: float, **condition) -> torch.Tensor:
    """diffusers' own pipeline of the saved folder with DDIM (eta 0) from the saved scheduler's config,
    from latents x_T (DiT: drawn by the pipeline itself from generator seed 7), as images in [-1, 1]."""
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    common = {"num_inference_steps": STEPS, "guidance_scale": guidance, "output_type": "pt"}
    B = len(x_T)
    if family == "dit":
        labels = pipe.get_label_ids([condition["class_label"]] * B)
        images = pipe(class_labels=labels, generator=torch.Generator().manual_seed(7), **common).images
    else:
        side = x_T.shape[-1] * pipe.vae_scale_factor
        text = {"prompt": [condition["prompt"]] * B, "latents": x_T.clone(), "height": side, "width": side}
        if "negative_prompt" in condition:
            text["negative_prompt"] = [condition["negative_prompt"]] * B
        if family.startswith("pixart"):
            text |= {"use_resolution_binning": False, "clean_caption": False}
        images = pipe(**text, **common).images
    return images * 2 - 1


CASES = [("sdxl", 4.0, {}), ("sdxl", 4.0, {"negative_prompt": "a red dog"}), ("sdxl", 1.0, {}), ("dit", 4.0, {}),
         ("dit", 1.0, {}), ("pixart_sigma", 4.0, {}), ("pixart_sigma", 4.0, {"negative_prompt": "a dog"}),
         pytest.param("pixart_alpha", 4.0, {}, marks=pytest.mark.slow)]


@pytest.mark.parametrize("family,guidance,extra", CASES)
def test_samples_equal_diffusers_pipeline(tiny_family_folders, models, family, guidance, extra):
    """Two samples from the same initial latents, condition and guidance: hspace's images equal the
    pipeline's to float32 tolerance (measured max |difference| of images in [-1, 1] <= 1e-6 on this CPU).
    SDXL without a negative prompt guides against zeros (force_zeros_for_empty_prompt), with one against
    its encoding; DiT's batch is [class; null class]; PixArt passes T5's mask, alpha its size conditioning."""
    m = models[family]
    condition = {**CONDITION[family], **extra}
    if family == "dit":
        x_T = torch.randn((2, *m.latent_shape), generator=torch.Generator().manual_seed(7))
    else:
        x_T = m.initial_noise(SEEDS[:2])
    ref = pipeline_images(tiny_family_folders[family], family, x_T, guidance, **condition)
    ours = m.sample(x_T=x_T, guidance_scale=guidance, **extra).images
    inside = ((ref > -1) & (ref < 1)).float().mean().item()
    assert inside > 0.9, f"{family}: only {inside:.0%} of the values unclamped: the comparison would say little"
    difference = (ours - ref).abs().max().item()
    print(f"{family} guidance {guidance} {extra}: max |hspace - pipeline| = {difference:.1e}")
    assert difference < 1e-5, difference
    # the comparison can fail: another condition moves the image by far more than the tolerance
    assert (m.sample(x_T=x_T, guidance_scale=guidance, **OTHER[family]).images - ref).abs().max() > 1e-3


# ---------------------------------------------------------------------- the engine's guarantees
def test_families_are_detected_with_their_default_hooks(models):
    """Each folder's model_index.json picks the family; the hub's ``Transformer2DModel`` name loads as
    DiT's / PixArt's class; h is after SDXL's mid block and at block n // 2 of a transformer's n."""
    expected = {"sdxl": ("sdxl", "after", torch.nn.Module), "dit": ("dit", "transformer_blocks.1", DiTTransformer2DModel),
                "pixart_sigma": ("pixart", "transformer_blocks.1", PixArtTransformer2DModel)}
    for family, (kind, hook, cls) in expected.items():
        m = models[family]
        assert (m.kind, m.hook_point) == (kind, hook) and isinstance(m.unet, cls), family
        assert set(m.family.modules()) == {"sdxl": {"unet", "vae", "text_encoder", "text_encoder_2"},
                                           "dit": {"transformer", "vae"},
                                           "pixart_sigma": {"transformer", "vae", "text_encoder"}}[family]
    assert models["pixart_sigma"].family.max_sequence_length == 300
    assert models["dit"].describe()["guidance_scale"] == 4.0


@pytest.mark.parametrize("family", FAST)
def test_same_seed_alone_or_in_a_batch(models, family):
    m = models[family]
    batch = m.sample(SEEDS)
    alone = m.sample(SEEDS[1:2])
    torch.testing.assert_close(alone.images[0], batch.images[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(alone.h[0], batch.h[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAST)
def test_zero_edit_is_bit_exact_and_an_edit_changes_the_image(models, family):
    m = models[family]
    plain = m.sample(SEEDS[:2])
    zero = m.sample(SEEDS[:2], Edit(delta=torch.zeros(m.num_steps, *m.h_shape)))
    assert torch.equal(plain.images, zero.images) and torch.equal(plain.h, zero.h)
    delta = torch.randn(m.num_steps, *m.h_shape, generator=torch.Generator().manual_seed(0))
    edited = m.sample(SEEDS[:2], Edit(delta=delta * plain.h.float().std() / delta.std()))
    assert (edited.images - plain.images).abs().max() > 1e-3
    assert torch.equal(edited.h[:, 0], plain.h[:, 0]), "h is recorded before the edit"
    assert torch.equal(m.sample(SEEDS[:2], Edit(replace=plain.h)).images, plain.images)


def expected_h_shape(m: HSpaceModel) -> tuple[int, ...]:
    """U-Net: (C, h, w) of the mid block; transformer: (N, C), N = the latent's patches."""
    config = m.unet.config
    if m.kind == "sdxl":
        side = m.latent_shape[-1] // 2 ** (len(config.block_out_channels) - 1)
        return (config.block_out_channels[-1], side, side)
    return ((m.latent_shape[-1] // config.patch_size) ** 2, config.num_attention_heads * config.attention_head_dim)


@pytest.mark.parametrize("family", FAST)
def test_h_is_the_conditional_rows_of_the_block_at_every_step(models, family):
    """h (B, T, *h_shape) equals what a plain forward hook at the module sees, before the edit, in the
    conditional rows of the guidance batch: the second half for SDXL and PixArt ([uncond; cond]), the
    first for DiT ([class; null])."""
    m = models[family]
    assert m.h_shape == expected_h_shape(m)
    module = m.unet.mid_block if m.hook_point == "after" else m.unet.get_submodule(m.hook_point)
    seen = []
    handle = module.register_forward_hook(lambda mod, a, out: seen.append(out.clone()), prepend=True)
    try:
        out = m.sample(SEEDS[:2], Edit(delta=torch.ones(m.num_steps, *m.h_shape)))
    finally:
        handle.remove()
    assert out.h.shape == (2, STEPS, *m.h_shape) and len(seen) == STEPS
    rows = slice(0, 2) if family == "dit" else slice(2, 4)
    for i in range(STEPS):
        assert seen[i].shape == (4, *m.h_shape)
        assert torch.equal(out.h[:, i], seen[i][rows])


@pytest.mark.parametrize("family", FAST)
def test_another_prompt_or_class_changes_h(models, family):
    m = models[family]
    key = "class_label" if family == "dit" else "prompt"
    out = m.sample([SEEDS[0]] * 2, **{key: [CONDITION[family][key], OTHER[family][key]]})
    assert torch.equal(out.x_T[0], out.x_T[1])
    assert (out.h[0] - out.h[1]).abs().max() > 1e-4


@pytest.mark.parametrize("family", FAST)
def test_inverting_then_decoding_lands_back(tiny_family_folders, family):
    """DDIM inversion under guidance with 20 fixed-point iterations: sampling from the inverted x_T
    lands on the image's latent within 1e-4 of its largest value, and its decoding on the decoding of
    that latent within 1e-3. The output layer is scaled down so that the iteration contracts on random
    weights."""
    m = load(tiny_family_folders, family)
    with torch.no_grad():
        output_layer(m).weight.mul_(0.02)
        output_layer(m).bias.zero_()
    images = torch.rand(2, *m.image_shape, generator=torch.Generator().manual_seed(0)) * 1.6 - 0.8
    inv = m.invert(images, fixed_point_iterations=20)
    assert inv.h.shape == (2, STEPS, *m.h_shape)
    back = m.sample(x_T=inv.x_T)
    with torch.no_grad():
        latent = m.family.encode(images)
        err = ((back.x_0 - latent).abs().max() / latent.abs().max()).item()
        assert err < 1e-4, err
        assert (back.images - m.family.decode(latent)).abs().max() < 1e-3


# ---------------------------------------------------------------------- conditioning details and errors
def test_sdxl_guides_against_zeros_only_without_a_negative_prompt(models):
    m = models["sdxl"]
    zeros, empty = m.conditioning(1), m.conditioning(1, negative_prompt="")
    assert zeros.text["context"].shape == (1, 16, 16 + 24) and zeros.text["pooled"].shape == (1, 24)
    assert all(not v.any() for v in zeros.uncond.values())
    assert all(v.abs().max() > 0 for v in empty.uncond.values())
    with m.family.defaults_set(negative_prompt="a dog"):
        assert m.conditioning(1).uncond["context"].abs().max() > 0
    assert m.family.negative_prompt is None, "the default is restored"


def test_sdxl_in_float16_decodes_with_its_vae_upcast(tiny_family_folders, models):
    """precision 16-true: SDXL's VAE (force_upcast) decodes in float32, as the pipeline does, and is
    float16 again afterwards; the images stay close to float32's."""
    m = load(tiny_family_folders, "sdxl", precision="16-true")
    seen = []
    handle = m.family.autoencoder.decoder.register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype))
    out = m.sample(SEEDS[:2])
    handle.remove()
    assert seen == [torch.float32] and m.family.autoencoder.dtype == torch.float16 and m.unet.dtype == torch.float16
    assert (out.images - models["sdxl"].sample(SEEDS[:2]).images).abs().max() < 0.05


def test_pixart_masks_the_padding_and_lower_cases(models):
    m = models["pixart_sigma"]
    emb = m.family.encode_prompts(["A Cat ", "a cat"])
    assert emb["mask"].shape == (2, 300) and emb["mask"][0].sum() == emb["mask"][0, :3].sum() == 3  # ▁a ▁cat </s>
    assert torch.equal(emb["context"][0], emb["context"][1])


def test_wrong_inputs_are_one_line_input_errors(models):
    dit, pixart, sdxl = models["dit"], models["pixart_sigma"], models["sdxl"]
    cases = [(lambda: dit.sample(SEEDS[:1], prompt="a cat"), "prompt given to a class-conditional DiT model"),
             (lambda: dit.sample(SEEDS[:1], class_label="goldfsh"), "not a class name of this model; close: goldfish"),
             (lambda: dit.sample(SEEDS[:1], class_label="white shrak"), "close: white shark"),
             (lambda: dit.sample(SEEDS[:1], class_label=1000), r"class_label 1000 out of range: this model has classes 0\.\.999"),
             (lambda: dit.sample(SEEDS[:2], class_label=[1, 2, 3]), "got 3 values of class_label for 2 samples"),
             (lambda: pixart.sample(SEEDS[:1], class_label=1), "unknown conditioning input.*class_label.*takes prompt"),
             (lambda: sdxl.sample(SEEDS[:2], prompt=["a", "b", "c"]), "got 3 values of prompt for 2 samples"),
             (lambda: HSpaceModel(dit.family, dit.scheduler, STEPS, hook="after", device="cpu"), "has no mid_block")]
    for call, says in cases:
        with pytest.raises(InputError, match=says) as info:
            call()
        assert "\n" not in str(info.value)
    assert dit.sample(SEEDS[:1], class_label=" Carassius AURATUS").h.shape[0] == 1  # any synonym, any case


def test_the_configuration_builds_each_family_with_its_settings_and_refuses_others(tiny_family_folders):
    """from_config: model.hook null is the family's default hook, guidance_scale null the pipeline's;
    class_label and max_sequence_length reach the family; a setting the family does not take is one line."""
    from pipeline.config import load_config
    from pipeline.errors import ConfigError

    def build(family, *overrides):
        return HSpaceModel.from_config(load_config(None, [f"model.name_or_path={tiny_family_folders[family]}",
                                                          f"model.num_inference_steps={STEPS}", "model.device=cpu",
                                                          *overrides]))

    dit = build("dit", "model.class_label=goldfish")
    assert (dit.hook_point, dit.family.guidance_scale, dit.family.class_label) == ("transformer_blocks.1", 4.0, "goldfish")
    pixart = build("pixart_sigma", "model.max_sequence_length=12", "model.guidance_scale=2", "model.prompt=a cat")
    assert (pixart.family.max_sequence_length, pixart.family.guidance_scale, pixart.family.prompt) == (12, 2.0, "a cat")
    assert pixart.family.encode_prompts(["a cat"])["mask"].shape == (1, 12)
    assert build("sdxl").family.guidance_scale == 5.0 and build("sdxl", "model.hook=up_blocks.0").hook_point == "up_blocks.0"
    for family, setting, takes in [("dit", "model.prompt=a cat", "model.class_label, model.guidance_scale"),
                                   ("sdxl", "model.class_label=3", "model.prompt, model.negative_prompt, model.guidance_scale"),
                                   ("pixart_sigma", "model.height=256", "model.max_sequence_length")]:
        with pytest.raises(ConfigError, match=rf"^{setting.split('=')[0]}=.*is a \w+ model, which takes .*{takes}.*; "
                                              r"remove the setting$"):
            build(family, setting)


# ---------------------------------------------------------------------- DDIM as diffusers steps it
@pytest.mark.parametrize("spacing,offset", [("leading", 1), ("leading", 0), ("linspace", 0), ("trailing", 0)])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_equals_diffusers_for_every_timestep_spacing(spacing, offset, eta):
    """hspace's DDIM (P_t, D_t, eq. 2) and diffusers' DDIMScheduler.step give the same trajectory for a
    fixed noise predictor at every spacing, offset and eta: diffusers steps from t to the level of
    t - N // T (PixArt's "linspace": 999 -> 666, not to the next listed 500)."""
    config = dict(beta_schedule="linear", clip_sample=False, set_alpha_to_one=False, timestep_spacing=spacing,
                  steps_offset=offset)
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 4, generator=generator, dtype=torch.float64) / 4
    x_T = torch.randn(2, 4, 3, 3, generator=generator, dtype=torch.float64)

    def eps(x, t):
        return torch.tanh(torch.einsum("oc,bchw->bohw", weight, x) + t / 1000)

    for T in (3, 7, 10):
        ours = DDIMSchedule(DDIMScheduler(**config), T, eta)
        ref = DDIMScheduler(**config)
        ref.set_timesteps(T)
        assert torch.equal(ours.timesteps, ref.timesteps)
        z = torch.randn(T, *x_T.shape, generator=generator, dtype=torch.float64)
        coef, x, y = ours.coefficients(), x_T.clone(), x_T.clone()
        for i, t in enumerate(ref.timesteps):
            x0, e = ours.split_prediction(eps(x, t), x, i)
            x = ours.step(x0, e, i, coef, z[i] if eta else None)
            y = ref.step(eps(y, t), t, y, eta=eta, variance_noise=z[i] if eta else None).prev_sample
        # diffusers' table is float32 and its step computes its square roots in float32: about 1e-6 apart
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
