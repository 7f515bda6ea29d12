"""Tiny random-weight SDXL, DiT, PixArt-alpha/Sigma, SD3 and FLUX pipelines (pipeline/testing/tiny_families.py).

Each saved folder loads offline through diffusers' public API, and each family's own pipeline (float32)
is matched by a float64 hand loop written from the pipeline's source: how the condition is encoded,
guided, stepped and decoded. These loops are the executable specification the family integration
follows (docs/families.md); where h is taken, the block's output has the shape the docs give, here
at tiny size and, on the meta device, at the real models' size.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.utils import logging as diffusers_logging

from pipeline.testing import tiny_families

STEPS, SIZE, GUIDANCE = 3, 16, 4.0
PROMPT = "  A Photo of a Cat "
ROOT = Path(__file__).resolve().parents[1]

diffusers_logging.set_verbosity_error()
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest)


@pytest.fixture(scope="module")
def folders(tiny_family_folders):
    return tiny_family_folders  # conftest: saved once per session, shared with test_families_new.py


def load(folder, dtype=torch.float32) -> DiffusionPipeline:
    """The saved pipeline as hspace samples it: the epsilon families with DDIM built from the saved
    scheduler's config (clip_sample off), the flow-matching ones with their own scheduler."""
    pipe = DiffusionPipeline.from_pretrained(folder, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    if not isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    return pipe


# ---- shared pieces of the hand loops (float64, tensors in and out) ----
def tokens(tokenizer, text: str, length: int, mask: bool = False):
    """Token ids (1, length), padded to ``length`` and truncated, as every pipeline asks; with the mask."""
    out = tokenizer([text], padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    return (out.input_ids, out.attention_mask) if mask else out.input_ids


def guide(output: torch.Tensor, scale: float, cond_first: bool = False) -> torch.Tensor:
    """Classifier-free guidance over a doubled batch: [uncond; cond] (DiT: [cond; uncond])."""
    a, b = output.chunk(2)
    uncond, cond = (b, a) if cond_first else (a, b)
    return uncond + scale * (cond - uncond)


def ddim_timesteps(config, steps: int) -> list[int]:
    """The sampling timesteps of DDIMScheduler.set_timesteps for the spacings these families use."""
    n = config.num_train_timesteps
    if config.timestep_spacing == "leading":
        return [i * (n // steps) + config.steps_offset for i in reversed(range(steps))]
    if config.timestep_spacing == "linspace":
        return torch.linspace(0, n - 1, steps, dtype=torch.float64).round().flip(0).long().tolist()
    raise NotImplementedError(config.timestep_spacing)


def ddim_sample(eps_fn, x: torch.Tensor, scheduler, steps: int) -> torch.Tensor:
    """Deterministic DDIM (eta 0) on diffusers' alphas_cumprod table. diffusers' rule for the next
    noise level: the timestep t - N // T (not the next one of the list: they differ for "linspace"),
    or ``final_alpha_cumprod`` below 0."""
    acp, n = scheduler.alphas_cumprod.double(), scheduler.config.num_train_timesteps
    final = acp.new_tensor(1.0) if scheduler.config.set_alpha_to_one else acp[0]
    for t in ddim_timesteps(scheduler.config, steps):
        eps = eps_fn(x, torch.tensor(t))
        a, prev = acp[t], t - n // steps
        a_prev = acp[prev] if prev >= 0 else final
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x


def flow_sample(v_fn, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Euler steps of a flow-matching model: x <- x + (s' - s) v, from sigmas[0] to 0."""
    sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        x = x + (s_next - s) * v_fn(x, s)
    return x


def to_image(vae, z: torch.Tensor) -> torch.Tensor:
    """Decoded and mapped from [-1, 1] to [0, 1] as the pipelines' postprocessing does (clamped)."""
    return (vae.decode(z).sample / 2 + 0.5).clamp(0, 1)


# ---- the hand loops: one per family ----
def sdxl_loop(c, prompt: str, latents: torch.Tensor, scale: float) -> torch.Tensor:
    """SDXL: both CLIPs' penultimate hidden states joined along channels, the second CLIP's projected
    pooled output as ``text_embeds``; the unconditional pair is zeros (force_zeros_for_empty_prompt,
    no negative prompt); time_ids (H, W, 0, 0, H, W) in pixels; DDIM; z / scaling_factor decoded."""
    states = []
    for tok, enc in ((c.tokenizer, c.text_encoder), (c.tokenizer_2, c.text_encoder_2)):
        out = enc(tokens(tok, prompt, tok.model_max_length), output_hidden_states=True)
        states.append(out.hidden_states[-2])
    context, pooled = torch.cat(states, dim=-1), out.text_embeds
    height, width = (side * c.vae_scale_factor for side in latents.shape[-2:])
    time_ids = torch.tensor([[height, width, 0, 0, height, width]] * 2, dtype=latents.dtype)
    cond = {"text_embeds": torch.cat([torch.zeros_like(pooled), pooled]), "time_ids": time_ids}
    context = torch.cat([torch.zeros_like(context), context])

    def eps(x, t):
        return guide(c.unet(torch.cat([x, x]), t, encoder_hidden_states=context, added_cond_kwargs=cond).sample, scale)

    z = ddim_sample(eps, latents, c.scheduler, STEPS)
    return to_image(c.vae, z / c.vae.config.scaling_factor)


def dit_latents(transformer, label_count: int, seed: int) -> torch.Tensor:
    """DiT draws its own initial latents: randn(B, C, S, S) from the generator, in the model's dtype."""
    size, channels = transformer.config.sample_size, transformer.config.in_channels
    return torch.randn((label_count, channels, size, size), generator=torch.Generator().manual_seed(seed))


def dit_loop(c, label: int, latents: torch.Tensor, scale: float) -> torch.Tensor:
    """DiT: the batch is [class; null class 1000] (conditional first); guidance on the first C
    output channels, the learned-sigma half dropped; DDIM; z / scaling_factor decoded."""
    channels = c.transformer.config.in_channels
    labels = torch.tensor([label, 1000])

    def eps(x, t):
        out = c.transformer(torch.cat([x, x]), timestep=t.expand(2), class_labels=labels).sample
        return guide(out[:, :channels], scale, cond_first=True)

    z = ddim_sample(eps, latents, c.scheduler, STEPS)
    return to_image(c.vae, z / c.vae.config.scaling_factor)


def pixart_loop(c, prompt: str, latents: torch.Tensor, scale: float, length: int) -> torch.Tensor:
    """PixArt: the prompt lower-cased and stripped (clean_caption off), T5 over ``length`` tokens
    (alpha 120, Sigma 300) with the attention mask into T5 and into the transformer; the negative
    prompt "" encoded the same way; size conditioning (resolution, aspect ratio) when the transformer's
    sample_size is 128; guidance over all channels, then the learned-sigma half dropped; DDIM."""
    def encode(text):
        ids, mask = tokens(c.tokenizer, text.lower().strip(), length, mask=True)
        return c.text_encoder(ids, attention_mask=mask)[0], mask

    (context, mask), (null, null_mask) = encode(prompt), encode("")
    height, width = (side * c.vae_scale_factor for side in latents.shape[-2:])
    sizes = {"resolution": None, "aspect_ratio": None}
    if c.transformer.config.sample_size == 128:
        sizes = {"resolution": torch.tensor([[height, width]] * 2, dtype=latents.dtype),
                 "aspect_ratio": torch.tensor([[height / width]] * 2, dtype=latents.dtype)}

    def eps(x, t):
        out = c.transformer(torch.cat([x, x]), encoder_hidden_states=torch.cat([null, context]),
                            encoder_attention_mask=torch.cat([null_mask, mask]), timestep=t.expand(2),
                            added_cond_kwargs=sizes).sample
        return guide(out, scale)[:, : latents.shape[1]]

    z = ddim_sample(eps, latents, c.scheduler, STEPS)
    return to_image(c.vae, z / c.vae.config.scaling_factor)


def sd3_sigmas(config, steps: int) -> torch.Tensor:
    """SD3's schedule: linspace(1, sigma_min, T) then shifted, s -> shift s / (1 + (shift - 1) s), where
    sigma_min is itself the shifted 1/N (the scheduler's table starts shifted)."""
    shift, n = config.shift, config.num_train_timesteps

    def shifted(s):
        return shift * s / (1 + (shift - 1) * s)

    return shifted(torch.linspace(1.0, shifted(1 / n), steps, dtype=torch.float64))


def sd3_loop(c, prompt: str, latents: torch.Tensor, scale: float) -> torch.Tensor:
    """SD3: each CLIP's penultimate states joined along channels and zero-padded to T5's width, then
    T5's 256 tokens (no mask) appended along the sequence; pooled = both CLIPs' text_embeds joined;
    the negative prompt "" encoded the same way; the timestep is 1000 sigma; flow-matching Euler;
    z / scaling_factor + shift_factor decoded."""
    def encode(text):
        states, pooled = [], []
        for tok, enc in ((c.tokenizer, c.text_encoder), (c.tokenizer_2, c.text_encoder_2)):
            out = enc(tokens(tok, text, tok.model_max_length), output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled.append(out.text_embeds)
        t5 = c.text_encoder_3(tokens(c.tokenizer_3, text, 256))[0]
        clip = torch.cat(states, dim=-1)
        return torch.cat([F.pad(clip, (0, t5.shape[-1] - clip.shape[-1])), t5], dim=-2), torch.cat(pooled, dim=-1)

    (context, pooled), (null, null_pooled) = encode(prompt), encode("")
    context, pooled = torch.cat([null, context]), torch.cat([null_pooled, pooled])

    def velocity(x, s):
        out = c.transformer(torch.cat([x, x]), timestep=(1000 * s).expand(2), encoder_hidden_states=context,
                            pooled_projections=pooled).sample
        return guide(out, scale)

    z = flow_sample(velocity, latents, sd3_sigmas(c.scheduler.config, STEPS))
    return to_image(c.vae, z / c.vae.config.scaling_factor + c.vae.config.shift_factor)


def pack(z: torch.Tensor) -> torch.Tensor:
    """FLUX's 2x2 packing: (B, C, H, W) -> (B, H/2 * W/2, 4C), row-major over the (H/2, W/2) grid."""
    b, ch, h, w = z.shape
    return z.view(b, ch, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, 4 * ch)


def unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, _, c4 = x.shape
    return x.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


def flux_sigmas(config, steps: int, tokens_: int) -> torch.Tensor:
    """FLUX's schedule: linspace(1, 1/T, T) shifted by mu, linear in the image-token count (0.5 at
    256 tokens, 1.15 at 4,096): s -> e^mu / (e^mu + 1/s - 1)."""
    slope = (config.max_shift - config.base_shift) / (config.max_image_seq_len - config.base_image_seq_len)
    mu = config.base_shift + slope * (tokens_ - config.base_image_seq_len)
    s = torch.linspace(1.0, 1 / steps, steps, dtype=torch.float64)
    return math.exp(mu) / (math.exp(mu) + (1 / s - 1))


def flux_loop(c, prompt: str, latents: torch.Tensor, guidance: float) -> torch.Tensor:
    """FLUX.1-dev: CLIP's pooler_output as pooled projection, T5's 512 tokens (no mask) as context;
    packed latents with image ids (0, row, col) over the (H/2, W/2) grid and text ids zeros; one pass
    with the guidance embedding (no negative prompt); the timestep given as sigma (the transformer
    multiplies timestep and guidance by 1000); flow-matching Euler; z / scaling_factor + shift_factor."""
    pooled = c.text_encoder(tokens(c.tokenizer, prompt, c.tokenizer.model_max_length)).pooler_output
    context = c.text_encoder_2(tokens(c.tokenizer_2, prompt, 512))[0]
    h, w = latents.shape[-2:]
    rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).to(latents.dtype)
    txt_ids = torch.zeros(context.shape[1], 3, dtype=latents.dtype)
    x = pack(latents)

    def velocity(x, s):
        return c.transformer(x, timestep=s.expand(1), guidance=torch.full((1,), guidance, dtype=x.dtype),
                             pooled_projections=pooled, encoder_hidden_states=context, txt_ids=txt_ids,
                             img_ids=img_ids).sample

    x = flow_sample(velocity, x, flux_sigmas(c.scheduler.config, STEPS, x.shape[1]))
    return to_image(c.vae, unpack(x, h, w) / c.vae.config.scaling_factor + c.vae.config.shift_factor)


# ---- running the pipeline and the loop on the same inputs ----
def initial_latents(pipe, seed: int = 7) -> torch.Tensor:
    """(1, C, h, w) standard normal latents for a SIZE-px image."""
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    channels = denoiser.config.in_channels // (4 if type(pipe).__name__ == "FluxPipeline" else 1)
    side = SIZE // pipe.vae_scale_factor
    return torch.randn((1, channels, side, side), generator=torch.Generator().manual_seed(seed))


def run_pipeline(family: str, pipe, latents: torch.Tensor, prompt: str = PROMPT, label: int = 1) -> torch.Tensor:
    """The family's diffusers pipeline at STEPS steps on ``latents`` (DiT: on the generator's), as (B, 3, H, W)."""
    common = {"num_inference_steps": STEPS, "output_type": "pt", "guidance_scale": GUIDANCE}
    if family == "dit":
        return pipe(class_labels=[label], generator=torch.Generator().manual_seed(7), **common).images
    text = {"prompt": prompt, "height": SIZE, "width": SIZE, **common}
    if family.startswith("pixart"):
        return pipe(latents=latents, use_resolution_binning=False, clean_caption=False, **text).images
    if family == "flux":
        return pipe(latents=pack(latents), **text).images
    return pipe(latents=latents, **text).images


def run_hand_loop(family: str, c, latents: torch.Tensor) -> torch.Tensor:
    if family == "sdxl":
        return sdxl_loop(c, PROMPT, latents, GUIDANCE)
    if family == "dit":
        return dit_loop(c, 1, latents, GUIDANCE)
    if family.startswith("pixart"):
        return pixart_loop(c, PROMPT, latents, GUIDANCE, 300 if family == "pixart_sigma" else 120)
    if family == "sd3":
        return sd3_loop(c, PROMPT, latents, GUIDANCE)
    return flux_loop(c, PROMPT, latents, GUIDANCE)


@pytest.mark.parametrize("family", tiny_families.FAMILIES)
def test_pipeline_matches_the_float64_hand_loop(folders, family):
    """diffusers' pipeline in float32 and the family's hand loop in float64 (the same components loaded
    in float64) give the same image from the same latents, condition and guidance, to about 1e-6."""
    pipe, c = load(folders[family]), load(folders[family], torch.float64)
    latents = dit_latents(pipe.transformer, 1, 7) if family == "dit" else initial_latents(pipe)
    image = run_pipeline(family, pipe, latents)
    with torch.no_grad():
        reference = run_hand_loop(family, c, latents.double())
    assert image.shape == reference.shape == (1, 3, SIZE, SIZE)
    inside = ((reference > 0) & (reference < 1)).double().mean().item()
    assert inside > 0.9, f"{family}: only {inside:.0%} of the values unclamped: the comparison would say little"
    difference = (image.double() - reference).abs().max().item()
    print(f"{family}: max |pipeline float32 - hand loop float64| = {difference:.1e}")
    assert difference < 2e-6, f"{family}: the pipeline and the hand loop differ by {difference:.2e}"
    # the comparison can fail: another prompt (or class) moves the image by far more than the tolerance
    other = run_pipeline(family, pipe, latents, prompt="a red dog", label=2)
    assert (other - image).abs().max() > 1e-3


def test_ddim_next_level_follows_diffusers_rule_not_the_next_timestep(folders):
    """For PixArt's saved scheduler (DPMSolver's "linspace" spacing), DDIM's next noise level at T=3
    is alphas_cumprod[t - 333], not that of the next timestep of the list: an engine that steps to the
    next listed timestep will not reproduce diffusers' pipeline with this config."""
    scheduler = load(folders["pixart_sigma"]).scheduler
    scheduler.set_timesteps(STEPS)
    listed = scheduler.timesteps.tolist()
    assert listed == ddim_timesteps(scheduler.config, STEPS) == [999, 500, 0]
    assert [t - 1000 // STEPS for t in listed[:-1]] != listed[1:]


# ---- the saved folders ----
PIPELINES = {"sdxl": "StableDiffusionXLPipeline", "dit": "DiTPipeline", "pixart_alpha": "PixArtAlphaPipeline",
             "pixart_sigma": "PixArtSigmaPipeline", "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}


@pytest.mark.parametrize("family", tiny_families.FAMILIES)
def test_saved_folder_loads_offline_through_the_public_api(folders, family):
    """model_index.json names every component folder; the pipeline and each component load offline
    through their own classes; the pipeline with its saved scheduler makes a 16-px image."""
    import importlib
    import os

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    folder = folders[family]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == PIPELINES[family]
    components = {name: entry for name, entry in index.items() if isinstance(entry, list) and entry[0] is not None}
    pipe = DiffusionPipeline.from_pretrained(folder)  # the saved scheduler, not the DDIM of load()
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == PIPELINES[family]
    for name, (library, class_name) in components.items():
        loaded = getattr(importlib.import_module(library), class_name).from_pretrained(folder, subfolder=name)
        assert type(loaded).__name__ == type(getattr(pipe, name)).__name__, name
    image = run_pipeline(family, pipe, initial_latents(pipe) if family != "dit" else None)
    assert image.shape == (1, 3, SIZE, SIZE) and torch.isfinite(image).all()


def test_hub_names_and_family_settings_are_kept(folders):
    """What the hub's repositories have and save_pretrained alone would not write or would name
    otherwise: DiT's and PixArt's ``Transformer2DModel`` (loaded as the DiT / PixArt class by its
    norm_type), DiT's id2label (a class name or any of its comma-separated synonyms -> index),
    SDXL's force_zeros_for_empty_prompt; the real models' VAE scaling and shift factors."""
    from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel

    for family, cls in (("dit", DiTTransformer2DModel), ("pixart_alpha", PixArtTransformer2DModel),
                        ("pixart_sigma", PixArtTransformer2DModel)):
        index = json.loads((folders[family] / "model_index.json").read_text())
        config = json.loads((folders[family] / "transformer" / "config.json").read_text())
        assert index["transformer"] == ["diffusers", "Transformer2DModel"] and config["_class_name"] == "Transformer2DModel"
        assert isinstance(DiffusionPipeline.from_pretrained(folders[family]).transformer, cls)
    dit = DiffusionPipeline.from_pretrained(folders["dit"])
    assert dit.get_label_ids(["goldfish", "Carassius auratus", "tench"]) == [1, 1, 0]
    assert json.loads((folders["dit"] / "model_index.json").read_text())["id2label"]["2"].startswith("great white shark")
    assert DiffusionPipeline.from_pretrained(folders["sdxl"]).config.force_zeros_for_empty_prompt is True
    for family, scaling, shift in (("sdxl", 0.13025, None), ("sd3", 1.5305, 0.0609), ("flux", 0.3611, 0.1159)):
        vae = json.loads((folders[family] / "vae" / "config.json").read_text())
        assert (vae["scaling_factor"], vae["shift_factor"]) == (scaling, shift)


def test_weights_come_from_the_seed_alone(tmp_path):
    """The same seed gives the same weights whatever the global RNG did before; another seed others;
    the global RNG is left as it was."""
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = tiny_families.build("flux", seed=3).transformer.state_dict()
    assert torch.equal(torch.random.get_rng_state(), before)
    torch.manual_seed(999)
    b = tiny_families.build("flux", seed=3).transformer.state_dict()
    c = tiny_families.build("flux", seed=4).transformer.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    with pytest.raises(ValueError, match="unknown family 'sdxl2'"):
        tiny_families.build("sdxl2")


def test_tokenizers_are_written_by_the_code():
    """CLIP: BPE merges apply ("the", "cat", "photo" are one token each), start and end of text are
    the last two ids, padded with the end token; T5: whole words where the vocabulary has them,
    letters otherwise, case kept, ended by </s> = 1 and padded with 0, mask marking the padding."""
    clip = tiny_families.clip_tokenizer(16)
    ids = clip("the cat photo", padding="max_length", max_length=16).input_ids
    start, end = len(clip) - 2, len(clip) - 1
    assert ids[:5] == [start, clip.convert_tokens_to_ids("the</w>"), clip.convert_tokens_to_ids("cat</w>"),
                       clip.convert_tokens_to_ids("photo</w>"), end] and set(ids[5:]) == {end}
    t5 = tiny_families.t5_tokenizer()
    out = t5("a Cat", padding="max_length", max_length=8)
    assert t5.convert_ids_to_tokens(out.input_ids[:5]) == ["▁a", "▁C", "a", "t", "</s>"]
    assert out.input_ids[5:] == [0, 0, 0] and out.attention_mask == [1] * 5 + [0] * 3


# ---- where h is taken ----
def default_h_module(denoiser) -> str:
    """h's default place: a U-Net's mid block (as for SD 1.x/2.x); in a transformer, block n // 2 of
    its n blocks in execution order (double-stream before single-stream): as many blocks before as after."""
    if hasattr(denoiser, "mid_block"):
        return "mid_block"
    names = [f"transformer_blocks.{i}" for i in range(len(denoiser.transformer_blocks))]
    names += [f"single_transformer_blocks.{i}" for i in range(len(getattr(denoiser, "single_transformer_blocks", ())))]
    return names[len(names) // 2]


def record_outputs(module: torch.nn.Module, calls: list):
    """A forward hook keeping the shapes of a module's output (a tensor, or a tuple with None)."""
    def hook(_module, _inputs, output):
        calls.append(tuple(None if o is None else tuple(o.shape) for o in output) if isinstance(output, tuple)
                     else tuple(output.shape))
    return module.register_forward_hook(hook)


def expected_h(family: str, denoiser, batch: int, latent: int, text_tokens: int):
    """The output shape of the default block (B = batch as the denoiser sees it): U-Net (B, C, h, w);
    DiT/PixArt (B, N, C); SD3/FLUX (text (B, L, C), image (B, N, C)) with N the latent's patches."""
    config = denoiser.config
    if family == "sdxl":
        side = latent // 2 ** (len(config.block_out_channels) - 1)
        return (batch, config.block_out_channels[-1], side, side)
    patches = (latent // (2 if family == "flux" else config.patch_size)) ** 2
    width = config.num_attention_heads * config.attention_head_dim
    if family in ("sd3", "flux"):
        return ((batch, text_tokens, width), (batch, patches, width))
    return (batch, patches, width)


@pytest.mark.parametrize("family", tiny_families.FAMILIES)
def test_h_block_output_has_the_documented_shape(folders, family):
    """In a pipeline call the default block fires once per step with the documented shape; for the
    two-stream families the image stream is element [1] with as many tokens as the latent has patches
    (FLUX: also in the single-stream blocks); SD3's last block returns (None, image)."""
    pipe = load(folders[family])
    denoiser = pipe.unet if family == "sdxl" else pipe.transformer
    name, calls, other_calls = default_h_module(denoiser), [], []
    handles = [record_outputs(denoiser.get_submodule(name), calls)]
    if family in ("sd3", "flux"):  # SD3: the last block; FLUX: a double-stream block
        handles.append(record_outputs(denoiser.transformer_blocks[-1 if family == "sd3" else 0], other_calls))
    latents = initial_latents(pipe) if family != "dit" else None
    run_pipeline(family, pipe, latents)
    for handle in handles:
        handle.remove()
    latent = denoiser.config.sample_size if family == "dit" else latents.shape[-1]
    batch = 1 if family == "flux" else 2  # FLUX: one pass (guidance embedded); the others [uncond; cond]
    text = {"sd3": 16 + 256, "flux": 512}.get(family, 0)  # SD3: 16 CLIP tokens (two CLIPs side by side), 256 T5
    expected = expected_h(family, denoiser, batch, latent, text)
    assert calls == [expected] * STEPS, (name, calls)
    if family == "sd3":
        assert other_calls == [(None, expected[1])] * STEPS
    if family == "flux":
        assert other_calls == [expected] * STEPS


# ---- the real block structure ----
def real_blocks(family: str):
    """(pipeline with the real block structure and tiny widths, its denoiser)."""
    pipe = tiny_families.build(family, blocks="real")
    return pipe, pipe.unet if family == "sdxl" else pipe.transformer


def test_real_block_structure_with_tiny_widths():
    """blocks="real" keeps each real model's block types, counts and depths, patch size, latent
    channels and sample size, its text encoders' depths and lengths, and an 8x VAE."""
    pipe, unet = real_blocks("sdxl")
    real = tiny_families.REAL["sdxl"]
    assert (unet.config.down_block_types, unet.config.up_block_types) == (real["down_block_types"], real["up_block_types"])
    depths = [[len(a.transformer_blocks) for a in block.attentions] for block in unet.down_blocks[1:]]
    assert depths == [[2, 2], [10, 10]] and len(unet.mid_block.attentions[0].transformer_blocks) == 10
    assert [len(b.resnets) for b in unet.down_blocks] == [2, 2, 2] and unet.config.sample_size == 128
    assert (pipe.text_encoder.config.num_hidden_layers, pipe.text_encoder_2.config.num_hidden_layers) == (12, 32)
    assert pipe.tokenizer.model_max_length == 77 and pipe.vae_scale_factor == 8
    for family, count in (("dit", 28), ("pixart_alpha", 28), ("pixart_sigma", 28), ("sd3", 24)):
        pipe, transformer = real_blocks(family)
        assert len(transformer.transformer_blocks) == count, family
        assert transformer.config.patch_size == 2 and transformer.config.sample_size in (32, 128)
    assert transformer.config.in_channels == 16 and transformer.config.pos_embed_max_size == 192
    assert [b.context_pre_only for b in transformer.transformer_blocks].index(True) == 23
    assert pipe.text_encoder_3.config.num_layers == 24 and pipe.vae_scale_factor == 8
    assert real_blocks("pixart_alpha")[1].use_additional_conditions
    assert not real_blocks("pixart_sigma")[1].use_additional_conditions
    pipe, transformer = real_blocks("flux")
    assert (len(transformer.transformer_blocks), len(transformer.single_transformer_blocks)) == (19, 38)
    assert transformer.config.in_channels == 64 and transformer.config.guidance_embeds
    assert pipe.text_encoder_2.config.num_layers == 24 and pipe.vae.config.latent_channels == 16


@pytest.mark.slow
@pytest.mark.parametrize("family", tiny_families.FAMILIES)
def test_real_blocks_pipeline_samples_and_h_has_the_latent_patches(family):
    """A pipeline with the real block structure makes an image (two steps at 64 px, DiT at its
    256 px) and its default h block fires each step with the documented shape."""
    pipe, denoiser = real_blocks(family)
    pipe.set_progress_bar_config(disable=True)
    calls = []
    handle = record_outputs(denoiser.get_submodule(default_h_module(denoiser)), calls)
    kw = {"num_inference_steps": 2, "output_type": "pt"}
    if family == "dit":
        image = pipe(class_labels=[3], generator=torch.Generator().manual_seed(0), **kw).images
    else:
        extra = {"use_resolution_binning": False, "clean_caption": False} if family.startswith("pixart") else {}
        image = pipe(prompt="a cat", height=64, width=64, generator=torch.Generator().manual_seed(0), **kw, **extra).images
    handle.remove()
    side = 256 if family == "dit" else 64
    assert image.shape == (1, 3, side, side) and torch.isfinite(image).all()
    text = {"sd3": 77 + 256, "flux": 512}.get(family, 0)
    expected = expected_h(family, denoiser, 1 if family == "flux" else 2, side // 8, text)
    assert calls == [expected] * 2


# ---- h at the real models' size, from diffusers' own modules on the meta device ----
#: family: (image size in px, h per sample and step at the default block) -- docs/families.md's table
REAL_H = {"sdxl": (1024, (1280, 32, 32)), "dit": (256, (256, 1152)), "pixart": (1024, (4096, 1152)),
          "sd3": (1024, (4096, 1536)), "flux": (1024, (4096, 3072))}


def real_size_h(family: str):
    """(default module, shape of h per sample) of the real denoiser at its real image size, run on the
    meta device (shapes only: no weights, no arithmetic)."""
    import diffusers

    latent = REAL_H[family][0] // 8
    with torch.device("meta"):
        if family == "sdxl":
            model = diffusers.UNet2DConditionModel(**tiny_families.REAL["sdxl"])
            args = dict(sample=torch.randn(1, 4, latent, latent), timestep=torch.ones(1),
                        encoder_hidden_states=torch.randn(1, 77, 2048),
                        added_cond_kwargs={"text_embeds": torch.randn(1, 1280), "time_ids": torch.randn(1, 6)})
        elif family == "dit":
            model = diffusers.DiTTransformer2DModel(**tiny_families.REAL["dit"])
            args = dict(hidden_states=torch.randn(1, 4, latent, latent), timestep=torch.ones(1),
                        class_labels=torch.zeros(1, dtype=torch.long))
        elif family == "pixart":
            model = diffusers.PixArtTransformer2DModel(**tiny_families.REAL["pixart"])
            args = dict(hidden_states=torch.randn(1, 4, latent, latent), timestep=torch.ones(1),
                        encoder_hidden_states=torch.randn(1, 120, 4096), encoder_attention_mask=torch.ones(1, 120),
                        added_cond_kwargs={"resolution": torch.randn(1, 2), "aspect_ratio": torch.randn(1, 1)})
        elif family == "sd3":
            model = diffusers.SD3Transformer2DModel(**tiny_families.REAL["sd3"])
            args = dict(hidden_states=torch.randn(1, 16, latent, latent), timestep=torch.ones(1),
                        encoder_hidden_states=torch.randn(1, 77 + 256, 4096), pooled_projections=torch.randn(1, 2048))
        else:
            model = diffusers.FluxTransformer2DModel(**tiny_families.REAL["flux"])
            tokens_ = (latent // 2) ** 2
            args = dict(hidden_states=torch.randn(1, tokens_, 64), timestep=torch.ones(1), guidance=torch.ones(1),
                        encoder_hidden_states=torch.randn(1, 512, 4096), pooled_projections=torch.randn(1, 768),
                        img_ids=torch.zeros(tokens_, 3), txt_ids=torch.zeros(512, 3))
    name, calls = default_h_module(model), []
    record_outputs(model.get_submodule(name), calls)
    model(**args)
    shape = calls[0][1] if isinstance(calls[0][0], tuple) or calls[0][0] is None else calls[0]
    return name, shape[1:]


@pytest.mark.parametrize("family", REAL_H)
def test_real_size_h_shape_and_bytes_are_what_the_docs_say(family):
    """At the real size the default block's h per sample and step is docs/families.md's shape, and its
    float16 bytes are the docs' figure (FLUX: 4,096 image tokens x 3,072 channels, 25.2 MB)."""
    name, shape = real_size_h(family)
    assert shape == REAL_H[family][1], (family, name, shape)
    docs = (ROOT / "docs" / "families.md").read_text()
    row = next((line for line in docs.splitlines() if line.startswith("| ") and f"`{name}`" in line
                and " x ".join(f"{d:,}" for d in shape) in line), None)
    assert row is not None, f"docs/families.md has no row with `{name}` and {shape}"
    assert f"{2 * math.prod(shape) / 1e6:.2f} MB" in row, row


def test_flow_euler_step_is_the_deterministic_ddim_step_of_the_x0_eps_split():
    """With x_0 = x - s v and eps = x + (1 - s) v, the Euler step x + (s' - s) v equals
    (1 - s') x_0 + s' eps: DDIM's eq. 2 with sqrt(alpha) = 1 - s, sqrt(1 - alpha) = s, sigma_t = 0."""
    generator = torch.Generator().manual_seed(0)
    x, v = torch.randn(2, 4, 8, 8, dtype=torch.float64, generator=generator).unbind(0)
    for s, s_next in sd3_sigmas(FlowMatchEulerDiscreteScheduler(shift=3.0).config, 4).reshape(2, 2).tolist():
        x0, eps = x - s * v, x + (1 - s) * v
        torch.testing.assert_close(x + (s_next - s) * v, (1 - s_next) * x0 + s_next * eps, rtol=0, atol=1e-14)
        assert torch.allclose((1 - s) * x0 + s * eps, x)
