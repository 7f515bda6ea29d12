"""The latent family: a ``UNet2DModel`` on the latents of a ``VQModel`` or ``AutoencoderKL``
(``LDMPipeline`` layout: ``unet/``, ``vqvae/`` or ``vae/``, ``scheduler/``); images are decoded at
the end and encoded before inversion."""
from __future__ import annotations

import torch
from torch import nn

from pipeline.engine.families.pixel import PixelFamily


class LatentFamily(PixelFamily):
    """A U-Net on an autoencoder's latents.

    Latents are the autoencoder's, multiplied by its ``scaling_factor`` (decode divides by it), as
    diffusers' LDMPipeline and StableDiffusionPipeline do, less its ``shift_factor`` first where it
    has one (SD3, FLUX: x_0 = (z - shift) scaling); encoding takes the VQ encoder's
    pre-quantisation output or the KL posterior's mode (deterministic, for inversion)."""

    kind = "latent"
    pipelines = ("LDMPipeline",)

    def __init__(self, net: nn.Module, autoencoder: nn.Module, component: str = "vqvae"):
        super().__init__(net)
        self.autoencoder, self.component = autoencoder, component

    def modules(self) -> dict[str, nn.Module]:
        return {self.net_component: self.net, self.component: self.autoencoder}

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
        z = x0 / self.autoencoder.config.scaling_factor
        shift = getattr(self.autoencoder.config, "shift_factor", None)
        if shift is not None:  # SD3's and FLUX's autoencoders: z / scaling + shift, as their pipelines decode
            z = z + shift
        return self.autoencoder.decode(z.to(self._ae_dtype())).sample.float().clamp(-1, 1)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        out = self.autoencoder.encode(images.to(self._ae_dtype()))
        z = (out.latents if hasattr(out, "latents") else out.latent_dist.mode()).float()
        shift = getattr(self.autoencoder.config, "shift_factor", None)
        return (z if shift is None else z - shift) * self.autoencoder.config.scaling_factor

    @classmethod
    def load(cls, folder, dtype):
        from diffusers import AutoencoderKL, UNet2DModel, VQModel

        unet = folder.network(UNet2DModel, folder.subfolder("unet", "config.json"), dtype)
        component = "vqvae" if "vqvae" in folder.index else "vae"
        autoencoder = folder.component(component, {"VQModel": VQModel, "AutoencoderKL": AutoencoderKL}, dtype)
        return cls(unet, autoencoder, component)
