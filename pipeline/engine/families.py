"""Model families: what differs between a pixel DDPM, a latent diffusion model and Stable Diffusion.

The sampling loop of :class:`~pipeline.engine.model.HSpaceModel` runs the same DDIM steps for every
family on x_t, the U-Net's input. A family adapter supplies the rest:

- ``pixel``: a ``UNet2DModel`` on images; x_t is the image (``DDPMPipeline`` layout).
- ``latent``: a ``UNet2DModel`` on the latents of a ``VQModel`` or ``AutoencoderKL``
  (``LDMPipeline`` layout: ``unet/``, ``vqvae/``, ``scheduler/``); images are decoded at the end
  and encoded before inversion.
- ``text``: a ``UNet2DConditionModel`` over an ``AutoencoderKL`` latent, conditioned on a CLIP text
  encoder's last hidden states (``StableDiffusionPipeline`` layout, SD 1.x / 2.x), with
  classifier-free guidance.

Classifier-free guidance (``text``, guidance_scale > 1): each step runs one U-Net pass on the
batch ``[unconditional; conditional]`` (diffusers' order) and combines the native predictions as
``uncond + g (cond - uncond)``. h is recorded from the **conditional** half: it is the activation
of the prompt being studied, and with guidance 1 (one conditional pass) it is the same quantity.
An edit is injected into **both** halves (as in the h-space literature on guided models): the
guided prediction then moves by about the edit's effect on one branch, independent of g, and the
guidance direction (cond - uncond) is left unchanged to first order; an edit of the conditional
half alone would be amplified g-fold. A replacement of h (``replace_h``) sets the conditional
half and moves the unconditional half by the same offset, so ``replace_h=h + d`` is the edit
``d`` and replaying a recorded h reproduces the sample bit for bit.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from pipeline.errors import InputError

#: The pipeline layouts hspace loads, by the ``_class_name`` of their model_index.json.
PIPELINE_FAMILIES = {"DDPMPipeline": "pixel", "DDIMPipeline": "pixel", "LDMPipeline": "latent",
                     "StableDiffusionPipeline": "text"}


def _size(sample_size) -> tuple[int, int]:
    return (sample_size, sample_size) if isinstance(sample_size, int) else tuple(sample_size)


class PixelFamily:
    """A ``UNet2DModel`` on images in [-1, 1]: encode and decode are the identity."""

    kind = "pixel"
    conditional = False

    def __init__(self, unet: nn.Module):
        self.unet = unet

    def modules(self) -> dict[str, nn.Module]:
        """Every network of the family, by component name (what ``to`` moves, what the weights hash covers)."""
        return {"unet": self.unet}

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of x_t, the U-Net's input."""
        return (self.unet.config.in_channels, *_size(self.unet.config.sample_size))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(3, H, W) of the decoded images."""
        return self.latent_shape

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """(B, *latent_shape) -> images (B, 3, H, W) in [-1, 1]."""
        return x0.float().clamp(-1, 1)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> x_0 (B, *latent_shape)."""
        return images.float()

    def unet_output(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """The U-Net's native prediction for a batch x at timesteps t (B,)."""
        return self.unet(x, t).sample


class LatentFamily(PixelFamily):
    """A U-Net on an autoencoder's latents (``VQModel`` as in LDMPipeline, or ``AutoencoderKL``).

    Latents are the autoencoder's, multiplied by its ``scaling_factor`` (decode divides by it), as
    diffusers' LDMPipeline and StableDiffusionPipeline do; encoding takes the VQ encoder's
    pre-quantisation output or the KL posterior's mode (deterministic, for inversion)."""

    kind = "latent"

    def __init__(self, unet: nn.Module, autoencoder: nn.Module, component: str = "vqvae"):
        super().__init__(unet)
        self.autoencoder, self.component = autoencoder, component

    def modules(self) -> dict[str, nn.Module]:
        return {"unet": self.unet, self.component: self.autoencoder}

    @property
    def scale_factor(self) -> int:
        """Image pixels per latent pixel along each side (diffusers' vae_scale_factor)."""
        return 2 ** (len(self.autoencoder.config.block_out_channels) - 1)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        _, H, W = self.latent_shape
        f = self.scale_factor
        return (self.autoencoder.config.out_channels, H * f, W * f)

    def _ae_dtype(self) -> torch.dtype:
        return next(self.autoencoder.parameters()).dtype

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        z = (x0 / self.autoencoder.config.scaling_factor).to(self._ae_dtype())
        return self.autoencoder.decode(z).sample.float().clamp(-1, 1)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        out = self.autoencoder.encode(images.to(self._ae_dtype()))
        z = out.latents if hasattr(out, "latents") else out.latent_dist.mode()
        return z.float() * self.autoencoder.config.scaling_factor


class TextFamily(LatentFamily):
    """Stable Diffusion: a ``UNet2DConditionModel`` on ``AutoencoderKL`` latents, conditioned on a
    CLIP text encoder's last hidden states; prompts are tokenised as StableDiffusionPipeline does
    (padded to the tokenizer's ``model_max_length``)."""

    kind = "text"
    conditional = True

    def __init__(self, unet: nn.Module, autoencoder: nn.Module, text_encoder: nn.Module, tokenizer):
        super().__init__(unet, autoencoder, "vae")
        self.text_encoder, self.tokenizer = text_encoder, tokenizer

    def modules(self) -> dict[str, nn.Module]:
        return {"unet": self.unet, "vae": self.autoencoder, "text_encoder": self.text_encoder}

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> text embeddings (B, L, D), in the text encoder's dtype and device."""
        tokens = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        device = next(self.text_encoder.parameters()).device
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(device)
        return self.text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]

    def unet_output(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if context is None:
            raise InputError("a text-conditional model needs prompt embeddings")
        return self.unet(x, t, encoder_hidden_states=context.to(x.dtype)).sample


def prompt_list(prompt: str | Sequence[str] | None, batch: int, name: str = "prompt") -> list[str]:
    """One prompt for every sample, or one per sample (B,); None is the empty prompt."""
    if prompt is None:
        return [""] * batch
    if isinstance(prompt, str):
        return [prompt] * batch
    prompts = [str(p) for p in prompt]
    if len(prompts) != batch:
        raise InputError(f"got {len(prompts)} values of {name} for {batch} samples; give one, or one per sample")
    return prompts
