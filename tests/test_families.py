"""Every model family through one HSpaceModel: pixel, latent (LDMPipeline layout) and text-to-image
(StableDiffusionPipeline layout). Tiny random-weight models are built and saved here in the
standard diffusers layouts (the tokenizer's vocab.json and merges.txt written by hand) and loaded
offline through the public API; samples are compared with diffusers' own pipelines."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    FlowMatchEulerDiscreteScheduler,
    LDMPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UNet2DModel,
    VQModel,
)

from pipeline import Edit, HSpaceModel
from pipeline.engine.families import Family
from pipeline.errors import InputError, ModelLoadError

SEEDS = [11, 3, 5, 8, 13, 21, 34]
STEPS = 4
PROMPTS = ("a smiling face", "a face with glasses")


def _scale_out(model: torch.nn.Module, conv: str = "conv_out", factor: float = 0.3):
    with torch.no_grad():
        getattr(model, conv).weight.mul_(factor)
    return model


def tiny_vq(seed: int = 0) -> VQModel:
    torch.manual_seed(seed)
    return VQModel(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=3,
                   down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                   layers_per_block=1, norm_num_groups=4, num_vq_embeddings=32, vq_embed_dim=3, sample_size=16)


def tiny_kl(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=4, sample_size=16)


def tiny_latent_unet(channels: int, seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=8, in_channels=channels, out_channels=channels, block_out_channels=(8, 16),
                       layers_per_block=1, norm_num_groups=4, attention_head_dim=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    return _scale_out(unet)


def tiny_cond_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, norm_num_groups=4, cross_attention_dim=16, attention_head_dim=2,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    return _scale_out(unet)


def write_clip_tokenizer(folder: Path, max_length: int = 16) -> None:
    """A CLIP BPE tokenizer over single letters: vocab.json, merges.txt (no merges), its config."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab.update({c: 2 + i for i, c in enumerate(letters)})
    vocab.update({c + "</w>": 2 + len(letters) + i for i, c in enumerate(letters)})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": max_length}))


def tiny_text_encoder(seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=54, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                            num_hidden_layers=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                            pad_token_id=1, projection_dim=16)
    return CLIPTextModel(config).eval()


def write_pixel(folder: Path) -> Path:
    from conftest import make_tiny_unet

    make_tiny_unet().save_pretrained(folder)
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(folder)
    return folder


def write_ldm(folder: Path, autoencoder: str = "vq") -> Path:
    """The CompVis/ldm-celebahq-256 layout: unet/, vqvae/ (or vae/), scheduler/, model_index.json."""
    vae = tiny_vq() if autoencoder == "vq" else tiny_kl()
    unet = tiny_latent_unet(vae.config.latent_channels)
    if autoencoder == "vq":
        LDMPipeline(vqvae=vae, unet=unet, scheduler=DDIMScheduler(clip_sample=False)).save_pretrained(folder)
    else:
        unet.save_pretrained(folder / "unet")
        vae.save_pretrained(folder / "vae")
        DDIMScheduler(clip_sample=False).save_pretrained(folder / "scheduler")
        (folder / "model_index.json").write_text(json.dumps({
            "_class_name": "LDMPipeline", "unet": ["diffusers", "UNet2DModel"], "vae": ["diffusers", "AutoencoderKL"],
            "scheduler": ["diffusers", "DDIMScheduler"]}))
    return folder


def write_sd(folder: Path, prediction_type: str = "epsilon") -> Path:
    """The StableDiffusionPipeline layout (SD 1.x scheduler settings), saved by diffusers itself."""
    from transformers import CLIPTokenizer

    write_clip_tokenizer(folder / "_tokenizer")
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(vae=tiny_kl(), text_encoder=tiny_text_encoder(), unet=tiny_cond_unet(),
                                   tokenizer=CLIPTokenizer.from_pretrained(folder / "_tokenizer"), scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {"pixel": write_pixel(root / "pixel"), "latent": write_ldm(root / "ldm"),
            "latent_kl": write_ldm(root / "ldm-kl", "kl"), "text": write_sd(root / "sd")}


def load(folders, family, **kw):
    kw = {"num_inference_steps": STEPS, "device": "cpu", **kw}
    if family == "text":
        kw.setdefault("prompt", PROMPTS[0])
        kw.setdefault("guidance_scale", 3.0)
    return HSpaceModel.from_pretrained(str(folders[family]), **kw)


FAMILIES = ["pixel", "latent", "latent_kl", "text"]


# ---------------------------------------------------------------------- loading
@pytest.mark.parametrize("family", FAMILIES)
def test_family_is_detected_from_the_folder(folders, family):
    m = load(folders, family)
    assert m.kind == family.split("_")[0]
    if family == "pixel":
        assert m.latent_shape == m.image_shape == (3, 16, 16)
    else:
        assert m.image_shape == (3, 16, 16) and m.latent_shape[1:] == (8, 8)
    out = m.sample(SEEDS[:2])
    assert out.images.shape == (2, *m.image_shape) and out.x_T.shape == (2, *m.latent_shape)
    assert out.h.shape == (2, STEPS, *m.h_shape) and torch.isfinite(out.images).all()


def test_unsupported_pipeline_types_name_the_supported_ones(folders, tmp_path):
    folder = tmp_path / "kandinsky"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    from pipeline.engine.families import PIPELINE_FAMILIES

    with pytest.raises(ModelLoadError, match="KandinskyPipeline; hspace loads the pipeline types DDIMPipeline, "
                                             "DDPMPipeline, DiTPipeline, FluxPipeline, LDMPipeline") as info:
        HSpaceModel.from_pretrained(str(folder))
    assert str(info.value).endswith(", ".join(sorted(PIPELINE_FAMILIES)))


def test_a_hub_id_loads_from_the_cache_offline(folders, tmp_path, monkeypatch):
    """The SD layout as the Hugging Face cache holds it (snapshots/<commit>/...), by hub id, offline."""
    import shutil

    cache = tmp_path / "hub"
    snapshot = cache / "models--tiny--sd" / "snapshots" / ("0" * 40)
    shutil.copytree(folders["text"], snapshot)
    (cache / "models--tiny--sd" / "refs").mkdir()
    (cache / "models--tiny--sd" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    m = HSpaceModel.from_pretrained("tiny/sd", num_inference_steps=STEPS, device="cpu", prompt=PROMPTS[0])
    ref = load(folders, "text", guidance_scale=7.5)
    assert m.kind == "text" and m.fingerprint() == ref.fingerprint()


# ---------------------------------------------------------------------- the pixel engine's guarantees
@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_alone_or_in_a_batch_of_7(folders, family):
    m = load(folders, family, eta=1.0)
    batch = m.sample(SEEDS)
    for i in (0, 4):
        alone = m.sample([SEEDS[i]])
        torch.testing.assert_close(alone.images[0], batch.images[i], atol=1e-4, rtol=0)
        torch.testing.assert_close(alone.h[0], batch.h[i], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_edit_is_bit_identical_and_an_edit_changes_the_image(folders, family):
    m = load(folders, family)
    plain = m.sample(SEEDS[:2])
    zero = m.sample(SEEDS[:2], Edit(delta=torch.zeros(m.num_steps, *m.h_shape)))
    assert torch.equal(plain.images, zero.images) and torch.equal(plain.h, zero.h)
    delta = torch.randn(m.num_steps, *m.h_shape, generator=torch.Generator().manual_seed(0))
    delta *= plain.h.float().std() / delta.std()
    edited = m.sample(SEEDS[:2], Edit(delta=delta))
    assert (edited.images - plain.images).abs().max() > 1e-3
    assert torch.equal(edited.h[:, 0], plain.h[:, 0]), "h is recorded before the edit"
    asyrp = m.sample(SEEDS[:2], Edit(delta=delta, asyrp=True))
    assert (asyrp.images - edited.images).abs().max() > 1e-4, "Asyrp differs from the symmetric edit"
    replay = m.sample(SEEDS[:2], Edit(replace=plain.h))
    assert torch.equal(replay.images, plain.images)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("hook", ["after", "up_blocks.0", "down_blocks.1.resnets.0"])
def test_recorded_h_equals_a_plain_forward_hook_at_the_module(folders, family, hook):
    m = load(folders, family, hook=hook)
    _ = m.h_shape  # probed once when the model loads, before we listen
    module = m.unet.mid_block if hook == "after" else m.unet.get_submodule(hook)
    seen = []
    handle = module.register_forward_hook(lambda mod, a, out: seen.append((out[0] if isinstance(out, tuple) else out).clone()),
                                          prepend=True)
    try:
        delta = torch.ones(m.num_steps, *m.h_shape)
        out = m.sample(SEEDS[:2], Edit(delta=delta))
    finally:
        handle.remove()
    B = 2
    for i in range(STEPS):
        # a plain hook run first sees the pre-edit activation;
        # under guidance the batch is [uncond; cond] and h is the conditional half
        expected = seen[i][B:] if len(seen[i]) == 2 * B else seen[i]
        assert torch.equal(out.h[:, i], expected.to(out.h.dtype))
    assert out.h.shape[2:] == tuple(seen[0].shape[1:])


def test_a_hook_path_that_does_not_exist_lists_the_top_level_modules(folders):
    with pytest.raises(InputError, match=r"unknown hook point 'up_blocks\.9'.*conv_in, time_proj, time_embedding, "
                                         r"down_blocks, up_blocks, mid_block"):
        load(folders, "pixel", hook="up_blocks.9")


def test_hook_shapes_follow_the_module(folders):
    m = load(folders, "pixel", hook="up_blocks.0")
    assert m.h_shape == (16, 16, 16)  # the first up block upsamples the 8x8 bottleneck
    assert load(folders, "pixel", hook="down_blocks.0").h_shape == (8, 8, 8)


# ---------------------------------------------------------------------- inversion
@pytest.mark.parametrize("family", FAMILIES)
def test_inverting_then_decoding_lands_back(folders, family):
    """DDIM inversion with fixed-point iterations: sampling from the inverted x_T lands on the
    image's latent (the autoencoder's encoding) within 1e-4 of its largest value (measured: 2e-6
    and below), and the decoded sample on the decoding of that latent within 1e-3 (a VQ decoder
    quantises: it is compared on a KL autoencoder only). The U-Net's output is scaled down so that
    the iteration contracts on random weights."""
    m = load(folders, family, eta=0.0)
    with torch.no_grad():  # a U-Net whose steps contract, so that the fixed-point iteration converges
        m.unet.conv_out.weight.mul_(0.02)
        m.unet.conv_out.bias.zero_()
    images = torch.rand(2, *m.image_shape, generator=torch.Generator().manual_seed(0)) * 1.6 - 0.8
    inv = m.invert(images, fixed_point_iterations=20)
    back = m.sample(x_T=inv.x_T)
    assert inv.h.shape == (2, STEPS, *m.h_shape)
    with torch.no_grad():
        latent = m.family.encode(images)
    err = ((back.x_0 - latent).abs().max() / latent.abs().max()).item()
    assert err < 1e-4, err
    if family != "latent":
        assert (back.images - m.family.decode(latent)).abs().max() < 1e-3


# ---------------------------------------------------------------------- text-to-image
def test_two_prompts_with_the_same_seed_give_different_h(folders):
    m = load(folders, "text")
    out = m.sample([SEEDS[0]] * 2, prompt=list(PROMPTS))
    assert out.prompts == list(PROMPTS)
    assert (out.h[0] - out.h[1]).abs().max() > 1e-4
    assert torch.equal(out.x_T[0], out.x_T[1])


def test_guidance_one_is_one_unguided_pass(folders):
    m = load(folders, "text")
    start = m.hook.calls  # the hook counts the network's passes
    one = m.sample(SEEDS[:2], guidance_scale=1.0)
    assert m.hook.calls - start == STEPS
    cond = m.conditioning(2, guidance_scale=1.0)
    assert cond.uncond is None
    guided = m.sample(SEEDS[:2], guidance_scale=3.0)
    assert (guided.images - one.images).abs().max() > 1e-3
    # g = 1 through the guidance formula (uncond + 1 (cond - uncond)) is the conditional pass
    cond = m.conditioning(2, guidance_scale=3.0)
    cond.scale = 1.0
    x = m.initial_noise(SEEDS[:2])
    with torch.no_grad():
        torch.testing.assert_close(m.predict(x, 0, cond)[1], m.predict(x, 0, m.conditioning(2, guidance_scale=1.0))[1],
                                   atol=1e-6, rtol=0)


def test_an_edit_under_guidance_moves_both_halves(folders):
    """replace_h = h + d is the edit d: the conditional half is replaced, the unconditional half
    moves by the same offset."""
    m = load(folders, "text")
    plain = m.sample(SEEDS[:2])
    delta = 0.5 * torch.randn(m.num_steps, *m.h_shape, generator=torch.Generator().manual_seed(2))
    edited = m.sample(SEEDS[:2], Edit(delta=delta, steps=[0]))
    replaced = m.sample(SEEDS[:2], Edit(replace=plain.h.float() + delta, steps=[0]))
    torch.testing.assert_close(edited.images, replaced.images, atol=1e-5, rtol=0)


@pytest.mark.parametrize("guidance", [1.0, 4.0])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_matches_diffusers_stable_diffusion_pipeline(tmp_path, guidance, prediction_type):
    folder = write_sd(tmp_path / "sd", prediction_type)
    m = HSpaceModel.from_pretrained(str(folder), num_inference_steps=STEPS, device="cpu", guidance_scale=guidance,
                                    prompt=PROMPTS[1], negative_prompt="a blurry face")
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    pipe.set_progress_bar_config(disable=True)
    x_T = m.initial_noise(SEEDS[:2])
    ref = pipe(prompt=[PROMPTS[1]] * 2, negative_prompt=["a blurry face"] * 2, latents=x_T.clone(),
               num_inference_steps=STEPS, guidance_scale=guidance, eta=0.0, output_type="latent").images
    ours = m.sample(x_T=x_T)
    torch.testing.assert_close(ours.x_0, ref, atol=1e-5, rtol=1e-5)
    images = pipe(prompt=[PROMPTS[1]] * 2, negative_prompt=["a blurry face"] * 2, latents=x_T.clone(),
                  num_inference_steps=STEPS, guidance_scale=guidance, output_type="pt").images
    torch.testing.assert_close(ours.images, images * 2 - 1, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["latent", "latent_kl"])
def test_matches_diffusers_ldm_pipeline(folders, family):
    """Same x_T (the pipeline's generator): the latents LDMPipeline decodes equal ours to float
    tolerance, and our decoding of its latents is its image. (Images are not compared end to end:
    a VQ decoder's nearest-code lookup turns 1e-6 latent rounding into a different code now and then.)"""
    from diffusers.utils.torch_utils import randn_tensor

    m = load(folders, family)
    if family == "latent":
        pipe = LDMPipeline.from_pretrained(folders[family])
    else:
        pipe = LDMPipeline(vqvae=m.autoencoder, unet=m.unet, scheduler=DDIMScheduler(clip_sample=False))
    pipe.set_progress_bar_config(disable=True)
    decoded, decode = [], pipe.vqvae.decode
    pipe.vqvae.decode = lambda z, *a, **k: decoded.append(z.clone()) or decode(z, *a, **k)
    images = pipe(batch_size=2, generator=torch.Generator().manual_seed(7), num_inference_steps=STEPS, eta=0.0,
                  output_type="np").images
    x_T = randn_tensor((2, *m.latent_shape), generator=torch.Generator().manual_seed(7))
    scale = m.autoencoder.config.scaling_factor
    torch.testing.assert_close(m.sample(x_T=x_T).x_0 / scale, decoded[0], atol=1e-5, rtol=1e-5)
    ours = m.family.decode(decoded[0] * scale).permute(0, 2, 3, 1).numpy()
    assert abs(ours - (images * 2 - 1)).max() < 1e-5


def test_prompts_are_for_text_models_only(folders):
    m = load(folders, "latent")
    with pytest.raises(InputError, match="apply to text-to-image models"):
        m.sample(SEEDS[:1], prompt="a face")
    t = load(folders, "text")
    with pytest.raises(InputError, match="got 3 values of prompt for 2 samples"):
        t.sample(SEEDS[:2], prompt=["a", "b", "c"])


# ---------------------------------------------------------------------- a family of tokens, sampled by flow matching
class TwoStreamBlock(torch.nn.Module):
    """A block as SD3's and FLUX's are: (image tokens, text tokens) -> (text, image)."""

    def __init__(self, dim: int):
        super().__init__()
        self.mix, self.txt = torch.nn.Linear(dim, dim), torch.nn.Linear(dim, dim)

    def forward(self, image, text):
        return self.txt(text), image + torch.tanh(self.mix(image + text.mean(1, keepdim=True)))


class TinyTokenNet(torch.nn.Module):
    """A velocity predictor on packed latents (B, N, C) at time t (s * 1000), with two two-stream blocks."""

    def __init__(self, dim: int = 12, seed: int = 0):
        torch.manual_seed(seed)
        super().__init__()
        self.time, self.out = torch.nn.Linear(1, dim), torch.nn.Linear(dim, dim)
        self.blocks = torch.nn.ModuleList([TwoStreamBlock(dim) for _ in range(2)])
        self.text = torch.nn.Parameter(torch.randn(1, 3, dim))
        self.unused = torch.nn.Linear(dim, dim)  # in the module tree, never run

    def forward(self, x, t):
        h, text = x + self.time(t.view(-1, 1, 1) / 1000), self.text.expand(len(x), -1, -1)
        for block in self.blocks:
            text, h = block(h, text)
        return self.out(h)


class TokenFamily(Family):
    """What a family of issue 32 supplies for a flow-matching transformer on packed latents (16 tokens of 12
    channels, a 3 x 8 x 8 image), and nothing more: the loop, edits, hooks and inversion are the engine's."""

    kind = "tokens"

    def __init__(self, net):
        self.net = net

    @property
    def denoiser(self):
        return self.net

    def modules(self):
        return {"transformer": self.net}

    latent_shape, image_shape = (16, 12), (3, 8, 8)

    def decode(self, x0):
        return x0.float().reshape(len(x0), *self.image_shape).clamp(-1, 1)

    def encode(self, images):
        return images.float().reshape(len(images), *self.latent_shape)

    def denoise(self, x, t, cond, hook):
        return self.net(x, t.expand(len(x)))

    def hook_element(self, module):
        return 1 if isinstance(module, TwoStreamBlock) else None


def test_a_flow_matching_family_of_tokens_runs_the_same_loop():
    """A transformer family sampled by flow matching supplies only its adapter and scheduler: sampling equals
    diffusers' FlowMatchEulerDiscreteScheduler loop to float32 tolerance; h is the image stream (element [1])
    of a two-stream block, token-wise (N, C); a zero edit is bit-exact, an edit and Asyrp change the image,
    replaying h reproduces it; inverting then sampling lands back."""
    net = TinyTokenNet()
    m = HSpaceModel(TokenFamily(net), FlowMatchEulerDiscreteScheduler(shift=3.0), num_inference_steps=STEPS,
                    hook="blocks.0", device="cpu")
    assert m.h_shape == (16, 12) and m.kind == "tokens"
    seen = []
    handle = net.blocks[0].register_forward_hook(lambda mod, a, o: seen.append(o[1].clone()), prepend=True)
    out = m.sample(SEEDS[:2])
    handle.remove()
    assert torch.equal(out.h, torch.stack(seen, 1))
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref.set_timesteps(STEPS)
    x = m.initial_noise(SEEDS[:2])
    with torch.no_grad():
        for t in ref.timesteps:
            x = ref.step(net(x, t.expand(2)), t, x).prev_sample
    torch.testing.assert_close(out.x_0, x, atol=1e-5, rtol=1e-5)
    with pytest.raises(InputError, match="eta > 0 has no meaning for a flow-matching model"):
        m.sample(SEEDS[:2], eta=1.0)
    with pytest.raises(InputError, match=r"^model.hook=unused: the network's pass never runs this Linear"):
        HSpaceModel(TokenFamily(net), FlowMatchEulerDiscreteScheduler(), num_inference_steps=2, hook="unused", device="cpu")

    zero = m.sample(SEEDS[:2], Edit(delta=torch.zeros(STEPS, *m.h_shape)))
    assert torch.equal(zero.images, out.images) and torch.equal(zero.h, out.h)
    delta = 0.5 * torch.randn(STEPS, *m.h_shape, generator=torch.Generator().manual_seed(0))
    edited, asyrp = m.sample(SEEDS[:2], Edit(delta=delta)), m.sample(SEEDS[:2], Edit(delta=delta, asyrp=True))
    assert (edited.images - out.images).abs().max() > 1e-3 and (asyrp.images - edited.images).abs().max() > 1e-4
    assert torch.equal(edited.h[:, 0], out.h[:, 0]), "h is recorded before the edit"
    assert torch.equal(m.sample(SEEDS[:2], Edit(replace=out.h)).images, out.images)

    with torch.no_grad():  # a net whose steps contract, so that the fixed-point iteration converges
        net.out.weight.mul_(0.02)
        net.out.bias.zero_()
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 1.6 - 0.8
    inv = m.invert(images, fixed_point_iterations=20)
    assert inv.h.shape == (2, STEPS, 16, 12)
    assert (m.sample(x_T=inv.x_T).images - images).abs().max() < 1e-4


# ---------------------------------------------------------------------- the main job on every family
def write_tiny_clip_hub(cache: Path, repo: str = "hspace-test/tiny-clip") -> str:
    """A random tiny open_clip model laid out as the Hugging Face cache holds a hub repository
    (config + safetensors weights), so that a subprocess loads it offline as 'hf-hub:<repo>'."""
    import open_clip
    from safetensors.torch import save_file

    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
    torch.manual_seed(0)
    model = open_clip.CLIP(**cfg)
    commit = "0" * 40
    snapshot = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(commit)
    (snapshot / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(snapshot / "open_clip_model.safetensors"))
    return f"hf-hub:{repo}"


#: per family config: what points it at its tiny model (tiny_families' tiny models sample at their own small size)
TINY_OVERRIDES = {"conf.ldm.yaml": [], "conf.sd.yaml": ["model.guidance_scale=3"],
                  "conf.sdxl.yaml": ["generate.h_steps=null"], "conf.pixart.yaml": ["generate.h_steps=[0,2]"],
                  "conf.sd3.yaml": ["generate.h_steps=null"],
                  "conf.flux.yaml": ["generate.h_steps=null", "model.height=16", "model.width=16"],  # its default: 1024 px
                  "conf.dit.yaml": ["model.class_label=goldfish"]}
TINY_FOLDER = {"conf.sdxl.yaml": "sdxl", "conf.pixart.yaml": "pixart_sigma", "conf.sd3.yaml": "sd3",
               "conf.flux.yaml": "flux", "conf.dit.yaml": "dit"}


@pytest.mark.slow
@pytest.mark.parametrize("conf", list(TINY_OVERRIDES))
def test_hspace_run_end_to_end_on_each_family(tmp_path, monkeypatch, tiny_family_folders, conf):
    """`hspace run --config conf.<family>.yaml`, pointed at a tiny model and a tiny random CLIP by
    overrides, runs every stage and writes the report; text samples carry their prompts; `hspace sample`
    and the explorer edit with the run's directions."""
    import numpy as np
    from test_run import hspace_run

    from pipeline.config import load_config
    from pipeline.explore.session import ExploreSession, Slider
    from pipeline.formats.samples import iter_samples
    from pipeline.stages.sample import run_sample

    root = Path(__file__).resolve().parents[1]
    if conf in TINY_FOLDER:
        model = tiny_family_folders[TINY_FOLDER[conf]]
    else:
        model = write_ldm(tmp_path / "model") if "ldm" in conf else write_sd(tmp_path / "model")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    clip = write_tiny_clip_hub(tmp_path / "hub")
    run = tmp_path / "run"
    args = ["--config", str(root / conf), f"run_dir={run}", f"model.name_or_path={model}", "model.num_inference_steps=3",
            "trainer.accelerator=cpu", "trainer.devices=1", "trainer.strategy=auto",
            "trainer.precision=32-true", "generate.num_samples=12", "generate.batch_size=6",
            f"annotate.options.clip.pretrained={clip}", "annotate.options.clip.model=ViT-B-32",
            "annotate.batch_size=12", "select.n=3", "select.contact_sheet_size=2", "pca.n_components=3",
            "jacobian.sample_ids=[0]", "jacobian.k=2", "jacobian.tau=1", "supervised.convergence_ns=[1,3]",
            "supervised.convergence_draws=2", "edit.seeds=[100,101]", "edit.batch_size=16", "evaluate.num_samples=3",
            "evaluate.repeats=2", "evaluate.batch_size=16", "evaluate.quality=null", "evaluate.pca_components=2",
            "evaluate.bootstrap=10", f"evaluate.scorer_options.pretrained={clip}", "evaluate.scorer_options.model=ViT-B-32",
            "report.pca_components=2", "report.jacobian_directions=2", "fewshot.ns=[1,3]", "fewshot.draws=2",
            "fewshot.num_samples=2", "fewshot.restriction_samples=2", *TINY_OVERRIDES[conf]]
    texts = conf not in ("conf.ldm.yaml", "conf.dit.yaml")
    if texts:
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("\n".join(PROMPTS[i % 2] for i in range(12)) + "\n")
        args.append(f"generate.prompts_file={prompts}")
    hspace_run(tmp_path, *args)
    assert (run / "report" / "index.html").exists()
    stored = {int(i): p for b in iter_samples(run, h=False) for i, p in zip(b["sample_id"], b.get("prompt", [None] * 99))}
    assert sorted(stored) == list(range(12))
    assert list(stored.values()) == ([PROMPTS[i % 2] for i in range(12)] if texts else [None] * 12)
    # the commands outside the main job on the run's directions: sample's grid and the explorer's render
    cfg = load_config(root / conf, [*args[2:], "sample.directions=supervised", "sample.scales=[-1,0,1]",
                                    "sample.seeds=[5,6]"])
    assert run_sample(cfg) == run / "sample.png" and (run / "sample.png").stat().st_size > 0
    session = ExploreSession(HSpaceModel.from_config(cfg), run)
    file, index = session.choices()[0][1]
    view = session.render(5, [Slider(file, index, 2.0)])
    assert view.original.shape == view.edited.shape and not np.array_equal(view.original, view.edited)


@pytest.mark.slow
def test_a_prompts_file_with_another_count_than_samples_is_one_line_error(tmp_path, folders):
    import subprocess
    import sys

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a smiling face\na face\n")
    hspace = str(Path(sys.executable).parent / "hspace")
    out = subprocess.run([hspace, "generate", f"run_dir={tmp_path / 'run'}", f"model.name_or_path={folders['text']}",
                          "model.num_inference_steps=2", "generate.num_samples=3", f"generate.prompts_file={prompts}",
                          "trainer.accelerator=cpu"], check=False, capture_output=True, text=True, timeout=600)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "has 2 prompts for generate.num_samples=3" in lines[0], out.stderr
    assert not (tmp_path / "run" / "samples").exists()


@pytest.mark.slow
@pytest.mark.parametrize("hook,says", [("up_blocks.7", "down_blocks, up_blocks, mid_block"),
                                       ("time_embedding", "model.hook=time_embedding: TimestepEmbedding returns a tensor")])
def test_a_hook_point_that_is_not_h_exits_2_with_one_line(tmp_path, folders, hook, says):
    """A path that is no module, or a module whose output is not a per-sample activation (it used to crash
    later, sizing the samples), is one line and exit status 2 when the model loads, before anything is written."""
    import subprocess
    import sys

    hspace = str(Path(sys.executable).parent / "hspace")
    out = subprocess.run([hspace, "generate", f"run_dir={tmp_path / 'run'}", f"model.name_or_path={folders['latent']}",
                          f"model.hook={hook}", "generate.num_samples=2", "trainer.accelerator=cpu"],
                         check=False, capture_output=True, text=True, timeout=600)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and len(lines) == 1 and says in lines[0], out.stderr
    assert not (tmp_path / "run" / "samples").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="half precision is for the GPU")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("family", ["latent_kl", "text"])
def test_half_precision_on_the_gpu_is_close_to_float32(folders, family, dtype):
    """precision 16-true / bf16-true runs the U-Net, autoencoder and text encoder in that dtype; the
    sampler's state stays float64, so the images stay close to float32's."""
    full = load(folders, family, device="cuda").sample(SEEDS[:2])
    half = load(folders, family, device="cuda", precision={"float16": "16-true", "bfloat16": "bf16-true"}[dtype])
    assert {p.dtype for m in half.family.modules().values() for p in m.parameters()} == {getattr(torch, dtype)}
    out = half.sample(SEEDS[:2])
    assert out.h.dtype == getattr(torch, dtype) and torch.isfinite(out.images).all()
    assert (out.images - full.images).abs().max() < 0.05
