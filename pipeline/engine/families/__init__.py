"""Model families: one module per family, each a :class:`~pipeline.engine.families.base.Family`
adapter (the interface and what it owns: :mod:`.base`).

- ``pixel`` (:mod:`.pixel`): a ``UNet2DModel`` on images (``DDPMPipeline`` layout).
- ``latent`` (:mod:`.latent`): a ``UNet2DModel`` on a VQ or KL autoencoder's latents (``LDMPipeline``).
- ``text`` (:mod:`.text`): Stable Diffusion 1.x / 2.x (``StableDiffusionPipeline``), prompts and
  classifier-free guidance; the base of the prompt-conditioned families.
- ``sdxl`` (:mod:`.sdxl`): SDXL (``StableDiffusionXLPipeline``): two CLIP encoders, pooled text and
  size conditioning.
- ``dit`` (:mod:`.dit`): DiT (``DiTPipeline``): a class-conditional transformer, ImageNet class names.
- ``pixart`` (:mod:`.pixart`): PixArt-alpha / Sigma (``PixArtAlphaPipeline``, ``PixArtSigmaPipeline``):
  a transformer conditioned on T5 with its attention mask.
- ``sd3`` (:mod:`.sd3`) and ``flux`` (:mod:`.flux`): the multimodal diffusion transformers sampled by
  flow matching (``StableDiffusion3Pipeline``, ``FluxPipeline``), on what they share (:mod:`.mmdit`).

A new family is a module here and one entry in :data:`FAMILIES`.
"""
from __future__ import annotations

from torch import nn

from pipeline.engine.families.base import Family
from pipeline.engine.families.dit import ClassConditioning, DiTFamily
from pipeline.engine.families.flux import FluxFamily
from pipeline.engine.families.latent import LatentFamily
from pipeline.engine.families.pixart import PixArtFamily
from pipeline.engine.families.pixel import PixelFamily
from pipeline.engine.families.sd3 import SD3Family
from pipeline.engine.families.sdxl import SDXLFamily
from pipeline.engine.families.text import Conditioning, TextFamily, prompt_list
from pipeline.errors import InputError

#: Every family hspace loads, by kind.
FAMILIES: dict[str, type[Family]] = {f.kind: f for f in (PixelFamily, LatentFamily, TextFamily, SDXLFamily, DiTFamily,
                                                          PixArtFamily, SD3Family, FluxFamily)}

#: The pipeline layouts hspace loads, by the ``_class_name`` of their model_index.json -> the family's kind.
PIPELINE_FAMILIES = {name: kind for kind, f in FAMILIES.items() for name in f.pipelines}

#: Every setting some family takes when built (prompt, class_label, height, ...): :meth:`Family.settings`.
SETTINGS = tuple(dict.fromkeys(k for f in FAMILIES.values() for k in f.settings()))

__all__ = ["FAMILIES", "PIPELINE_FAMILIES", "SETTINGS", "Family", "PixelFamily", "LatentFamily", "TextFamily", "SDXLFamily",
           "DiTFamily", "PixArtFamily", "SD3Family", "FluxFamily", "Conditioning", "ClassConditioning", "prompt_list",
           "family_of"]


def family_of(unet: nn.Module, autoencoder: nn.Module | None = None, component: str | None = None,
              text_encoder: nn.Module | None = None, tokenizer=None) -> Family:
    """The adapter of networks given in memory: text-to-image when the U-Net takes text
    (``cross_attention_dim``), latent with an autoencoder, else pixel."""
    conditional = getattr(unet.config, "cross_attention_dim", None) is not None
    if conditional and (text_encoder is None or tokenizer is None or autoencoder is None):
        raise InputError("a text-conditional U-Net needs its autoencoder, text_encoder and tokenizer")
    if text_encoder is not None and not conditional:
        raise InputError("a text encoder was given but the U-Net takes no text (no cross_attention_dim)")
    if conditional:
        return TextFamily(unet, autoencoder, text_encoder, tokenizer)
    if autoencoder is not None:
        return LatentFamily(unet, autoencoder, component or "vqvae")
    return PixelFamily(unet)
