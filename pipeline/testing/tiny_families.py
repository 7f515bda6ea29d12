"""Random-weight pipelines of the newer diffusers families, built offline and saved in the standard
``save_pretrained`` layout (``model_index.json`` and one folder per component), loadable with
``DiffusionPipeline.from_pretrained(folder)`` like the hub repositories.

Families (:data:`FAMILIES`): ``sdxl`` (StableDiffusionXLPipeline), ``dit`` (DiTPipeline), ``pixart_alpha``
and ``pixart_sigma`` (PixArtAlphaPipeline, PixArtSigmaPipeline), ``sd3`` (StableDiffusion3Pipeline),
``flux`` (FluxPipeline). Two sizes of each:

* ``blocks="tiny"``: one to four blocks, widths of 16-64, a 2x VAE: a pipeline call of a few steps at
  16 px takes a fraction of a second on a CPU (tests).
* ``blocks="real"``: the real model's block structure (block types, counts and depths, patch size,
  latent channels, 8x VAE, text encoders' depths and lengths) with tiny widths and one to three
  attention heads (attention over N tokens costs heads x N^2: 4,096 tokens at 1024 px), for dry runs
  at the real image size, like :func:`pipeline.testing.standins.celebahq_unet`.

The real configurations are kept in :data:`REAL` (their sources: docs/families.md). The tokenizers
are written here from a small vocabulary (a CLIP BPE over letters and a few merges; a T5 unigram
over letters and a few words). Weights come from ``seed`` alone (the global RNG is left as it was).
The hub's names are kept where they differ from what ``save_pretrained`` writes: DiT and PixArt
name their transformer ``Transformer2DModel``, and DiT's ``model_index.json`` holds ``id2label``.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

FAMILIES = ("sdxl", "dit", "pixart_alpha", "pixart_sigma", "sd3", "flux")

# ---- the real configurations (numbers and sources in docs/families.md) ----
REAL = {
    "sdxl": dict(  # stabilityai/stable-diffusion-xl-base-1.0 unet (sd_xl_base.yaml in Stability-AI/generative-models)
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816, norm_num_groups=32),
    "dit": dict(  # facebook/DiT-XL-2-256 (scripts/convert_dit_to_diffusers.py)
        num_layers=28, num_attention_heads=16, attention_head_dim=72, patch_size=2, in_channels=4, out_channels=8,
        sample_size=32),
    "pixart": dict(  # PixArt-alpha/PixArt-XL-2-1024-MS and PixArt-Sigma-XL-2-1024-MS (scripts/convert_pixart_*.py)
        num_layers=28, num_attention_heads=16, attention_head_dim=72, patch_size=2, in_channels=4, out_channels=8,
        sample_size=128, cross_attention_dim=1152, caption_channels=4096),
    "sd3": dict(  # stabilityai/stable-diffusion-3-medium-diffusers (scripts/convert_sd3_to_diffusers.py: heads = depth)
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, num_attention_heads=24,
        attention_head_dim=64, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
        pos_embed_max_size=192),
    "flux": dict(  # black-forest-labs/FLUX.1-dev (scripts/convert_flux_to_diffusers.py, the model's defaults)
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, num_attention_heads=24,
        attention_head_dim=128, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56)),
    # text encoders: CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 text towers (open_clip's model_configs), T5 v1.1 XXL
    "clip_l": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, projection_dim=768, max_length=77),
    "clip_g": dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=20, projection_dim=1280, max_length=77),
    "t5_xxl": dict(d_model=4096, num_layers=24, num_heads=64, d_kv=64, d_ff=10240),
    # the 8x autoencoders: 4 levels of 2 ResNet blocks; latent channels and scaling per family
    "vae": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2),
    "vae_latents": {"sdxl": (4, 0.13025, None), "dit": (4, 0.18215, None), "pixart_alpha": (4, 0.18215, None),
                    "pixart_sigma": (4, 0.13025, None), "sd3": (16, 1.5305, 0.0609), "flux": (16, 0.3611, 0.1159)},
}

#: ImageNet's first classes, as DiT's id2label names them (comma-separated synonyms)
IMAGENET_FIRST = ["tench, Tinca tinca", "goldfish, Carassius auratus",
                  "great white shark, white shark, man-eater, man-eating shark, Carcharodon carcharias",
                  "tiger shark, Galeocerdo cuvieri", "hammerhead, hammerhead shark", "electric ray, crampfish, numbfish, torpedo",
                  "stingray", "cock", "hen", "ostrich, Struthio camelus"]

LETTERS = "abcdefghijklmnopqrstuvwxyz"
CLIP_MERGES = ("t h", "th e</w>", "a n", "o n</w>", "o f</w>", "a t</w>", "c at</w>", "p h", "o t", "ph ot", "phot o</w>")
T5_WORDS = ("a", "the", "of", "photo", "cat", "dog", "red", "on")


# ---- tokenizers and text encoders ----
def clip_tokenizer(max_length: int = 16):
    """A CLIP BPE tokenizer over lower-case letters (with and without ``</w>``) and :data:`CLIP_MERGES`;
    start and end of text take the last two ids, as in CLIP's own vocabulary."""
    from transformers import CLIPTokenizer

    vocab = [*LETTERS, *(c + "</w>" for c in LETTERS), *("".join(m.split()) for m in CLIP_MERGES)]
    vocab = {piece: i for i, piece in enumerate([*dict.fromkeys(vocab), "<|startoftext|>", "<|endoftext|>"])}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(CLIP_MERGES) + "\n")
        return CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=max_length)


def t5_tokenizer():
    """A T5 unigram tokenizer: pad 0, end 1, unknown 2, then whole words of :data:`T5_WORDS` and single
    letters (both cases) with and without the word-start mark."""
    from transformers import T5Tokenizer

    letters = LETTERS + LETTERS.upper()
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -1.0) for w in T5_WORDS] + [("▁" + c, -3.0) for c in letters] + [(c, -4.0) for c in letters]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def clip_text_encoder(tokenizer, hidden: int, layers: int, heads: int, projection: bool, max_length: int):
    """A CLIP text transformer (with its projection where ``projection``) over ``tokenizer``'s vocabulary."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
                            num_attention_heads=heads, num_hidden_layers=layers, max_position_embeddings=max_length,
                            projection_dim=hidden, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def t5_encoder(tokenizer, d_model: int, layers: int, heads: int):
    """A T5 v1.1 encoder (gated-gelu) over ``tokenizer``'s vocabulary."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=d_model // heads, d_ff=2 * d_model + 8,
                      num_layers=layers, num_heads=heads, relative_attention_num_buckets=8,
                      feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(config).eval()


def autoencoder(family: str, blocks: str):
    """The family's AutoencoderKL: 8x (four levels) for ``real`` blocks, 2x (two levels) for ``tiny``;
    latent channels, scaling and shift factors as the real one's; no quant convolutions for SD3/FLUX."""
    from diffusers import AutoencoderKL

    channels, scaling, shift = REAL["vae_latents"][family]
    widths, layers = ((8, 16, 32, 32), 2) if blocks == "real" else ((8, 16), 1)
    quant = family not in ("sd3", "flux")
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(widths),
                         up_block_types=("UpDecoderBlock2D",) * len(widths), block_out_channels=widths,
                         layers_per_block=layers, latent_channels=channels, norm_num_groups=4,
                         scaling_factor=scaling, shift_factor=shift, use_quant_conv=quant,
                         use_post_quant_conv=quant).eval()


def _clips(blocks: str, with_projection=(False, True), which=("clip_l", "clip_g")):
    """Tokenizers and CLIP text encoders: tiny widths (CLIP-L 16, CLIP-G 24, so that joining them
    in the wrong order fails), the real depths and 77 tokens for ``real`` blocks."""
    out = []
    for name, projection in zip(which, with_projection):
        width = {"clip_l": 16, "clip_g": 24}[name]
        real = REAL[name]
        depth, length = (real["num_hidden_layers"], real["max_length"]) if blocks == "real" else (2, 16)
        tokenizer = clip_tokenizer(length)
        out += [tokenizer, clip_text_encoder(tokenizer, width, depth, width // 8, projection, length)]
    return out


def _t5(blocks: str, d_model: int = 32):
    tokenizer = t5_tokenizer()
    return tokenizer, t5_encoder(tokenizer, d_model, REAL["t5_xxl"]["num_layers"] if blocks == "real" else 2, 4)


def _shrink_output(module: torch.nn.Module, scale: float = 0.3) -> None:
    """Scale the last layer down so that random samples do not saturate."""
    with torch.no_grad():
        module.weight.mul_(scale)


# ---- the pipelines ----
def sdxl(blocks: str = "tiny"):
    """StableDiffusionXLPipeline: CLIP-L (hidden states) and CLIP-G with projection (hidden states and
    pooled ``text_embeds``), text_time conditioning, EulerDiscreteScheduler as the hub's."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import SCHEDULER_DEFAULT_CONFIG

    tok, enc, tok2, enc2 = _clips(blocks)
    context = enc.config.hidden_size + enc2.config.hidden_size
    if blocks == "real":  # the real block structure at 1/16 of the channels, one attention head per level
        unet_config = {**REAL["sdxl"], "block_out_channels": (20, 40, 80), "norm_num_groups": 4, "attention_head_dim": 1,
                       "addition_time_embed_dim": 16}
    else:
        unet_config = {**REAL["sdxl"], "sample_size": 8, "block_out_channels": (16, 32), "layers_per_block": 1,
                       "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"), "attention_head_dim": (2, 4),
                       "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"), "transformer_layers_per_block": (1, 2),
                       "norm_num_groups": 4, "addition_time_embed_dim": 8}
    unet_config |= {"cross_attention_dim": context,
                    "projection_class_embeddings_input_dim": 6 * unet_config["addition_time_embed_dim"]
                    + enc2.config.projection_dim}
    unet = UNet2DConditionModel(**unet_config).eval()
    _shrink_output(unet.conv_out)
    scheduler = EulerDiscreteScheduler.from_config(SCHEDULER_DEFAULT_CONFIG)
    return StableDiffusionXLPipeline(vae=autoencoder("sdxl", blocks), text_encoder=enc, text_encoder_2=enc2,
                                     tokenizer=tok, tokenizer_2=tok2, unet=unet, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)


def dit(blocks: str = "tiny"):
    """DiTPipeline: class-conditional over 1000 classes (the null class 1000 for guidance), learned
    sigma (8 output channels), DDIMScheduler as scripts/convert_dit_to_diffusers.py builds it."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    size = dict(num_layers=28, num_attention_heads=2, attention_head_dim=16) if blocks == "real" \
        else dict(num_layers=2, num_attention_heads=2, attention_head_dim=8, sample_size=8)
    transformer = DiTTransformer2DModel(**{**REAL["dit"], **size}).eval()
    _shrink_output(transformer.proj_out_2)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon",
                              clip_sample=False)
    return DiTPipeline(transformer=transformer, vae=autoencoder("dit", blocks), scheduler=scheduler,
                       id2label=dict(enumerate(IMAGENET_FIRST)))


def pixart(blocks: str = "tiny", sigma: bool = False):
    """PixArtAlphaPipeline / PixArtSigmaPipeline: T5 text with its mask, learned sigma, adaLN-single;
    alpha as PixArt-XL-2-1024-MS (sample size 128: resolution and aspect-ratio conditioning, also when
    tiny), Sigma without them; DPMSolverMultistepScheduler as the conversion scripts build it."""
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtSigmaPipeline, PixArtTransformer2DModel

    tokenizer, text_encoder = _t5(blocks)  # widths divisible by 3: the size conditioning takes a third each
    size = dict(num_layers=28, num_attention_heads=3, attention_head_dim=8) if blocks == "real" \
        else dict(num_layers=2, num_attention_heads=3, attention_head_dim=8, sample_size=8 if sigma else 128)
    heads_width = size["num_attention_heads"] * size["attention_head_dim"]
    transformer = PixArtTransformer2DModel(**{**REAL["pixart"], **size, "cross_attention_dim": heads_width,
                                              "caption_channels": text_encoder.config.d_model,
                                              "use_additional_conditions": not sigma}).eval()
    _shrink_output(transformer.proj_out)
    cls = PixArtSigmaPipeline if sigma else PixArtAlphaPipeline
    return cls(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer,
               vae=autoencoder("pixart_sigma" if sigma else "pixart_alpha", blocks), scheduler=DPMSolverMultistepScheduler())


def sd3(blocks: str = "tiny"):
    """StableDiffusion3Pipeline: two CLIPTextModelWithProjection and T5, MMDiT joint blocks (the last
    one context-pre-only), FlowMatchEulerDiscreteScheduler with shift 3, VAE with a shift factor."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tok, enc, tok2, enc2 = _clips(blocks, with_projection=(True, True))
    tok3, enc3 = _t5(blocks, d_model=48)  # wider than the two CLIPs joined (40): the pipeline pads them to it
    size = dict(num_layers=24, num_attention_heads=2, attention_head_dim=16) if blocks == "real" \
        else dict(num_layers=4, num_attention_heads=2, attention_head_dim=8, sample_size=8, pos_embed_max_size=16)
    size["caption_projection_dim"] = size["num_attention_heads"] * size["attention_head_dim"]
    transformer = SD3Transformer2DModel(**{**REAL["sd3"], **size, "joint_attention_dim": enc3.config.d_model,
                                           "pooled_projection_dim": enc.config.projection_dim + enc2.config.projection_dim})
    _shrink_output(transformer.proj_out)
    return StableDiffusion3Pipeline(transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=autoencoder("sd3", blocks), text_encoder=enc, tokenizer=tok,
                                    text_encoder_2=enc2, tokenizer_2=tok2, text_encoder_3=enc3, tokenizer_3=tok3)


def flux(blocks: str = "tiny"):
    """FluxPipeline: CLIP-L pooled output and T5 states, 2x2-packed latents, double- then single-stream
    blocks, guidance embedding (FLUX.1-dev), FlowMatchEulerDiscreteScheduler with the resolution shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tok, enc = _clips(blocks, with_projection=(False,), which=("clip_l",))
    tok2, enc2 = _t5(blocks)
    size = dict(num_layers=19, num_single_layers=38) if blocks == "real" else dict(num_layers=1, num_single_layers=2)
    transformer = FluxTransformer2DModel(**{**REAL["flux"], **size, "num_attention_heads": 2, "attention_head_dim": 16,
                                            "axes_dims_rope": (4, 6, 6), "joint_attention_dim": enc2.config.d_model,
                                            "pooled_projection_dim": enc.config.hidden_size})
    _shrink_output(transformer.proj_out)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(scheduler=scheduler, vae=autoencoder("flux", blocks), text_encoder=enc, tokenizer=tok,
                        text_encoder_2=enc2, tokenizer_2=tok2, transformer=transformer.eval())


BUILDERS = {"sdxl": sdxl, "dit": dit, "pixart_alpha": pixart, "pixart_sigma": lambda blocks: pixart(blocks, sigma=True),
            "sd3": sd3, "flux": flux}


def build(family: str, seed: int = 0, blocks: str = "tiny"):
    """The family's pipeline with random weights drawn from ``seed`` (the global RNG is restored)."""
    if family not in BUILDERS:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    if blocks not in ("tiny", "real"):
        raise ValueError(f"blocks must be 'tiny' or 'real', got {blocks!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BUILDERS[family](blocks)


def save(family: str, folder, seed: int = 0, blocks: str = "tiny") -> Path:
    """:func:`build` saved with ``save_pretrained`` into ``folder``, with the hub's names where they
    differ: DiT and PixArt's transformer as ``Transformer2DModel`` (diffusers maps it back to
    DiTTransformer2DModel / PixArtTransformer2DModel by its ``norm_type``), DiT's ``id2label`` in
    ``model_index.json``."""
    folder = Path(folder)
    pipe = build(family, seed, blocks)
    pipe.save_pretrained(folder)
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    if family in ("dit", "pixart_alpha", "pixart_sigma"):
        index["transformer"] = ["diffusers", "Transformer2DModel"]
        config_path = folder / "transformer" / "config.json"
        config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "_class_name": "Transformer2DModel"},
                                          indent=2))
    if family == "dit":
        index["id2label"] = {str(k): v for k, v in enumerate(IMAGENET_FIRST)}
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True))
    return folder
