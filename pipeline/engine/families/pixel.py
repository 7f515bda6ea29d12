"""The pixel family: a ``UNet2DModel`` on images in [-1, 1] (``DDPMPipeline`` layout, or the flat
hub-DDPM layout with config.json at the root); x_t is the image."""
from __future__ import annotations

import torch
from torch import nn

from pipeline.engine.families.base import Family, square


class PixelFamily(Family):
    """x_t is the image: encode and decode are the identity (decode clamps to [-1, 1])."""

    kind = "pixel"
    pipelines = ("DDPMPipeline", "DDIMPipeline")

    def __init__(self, unet: nn.Module):
        self.unet = unet

    @property
    def denoiser(self) -> nn.Module:
        return self.unet

    def modules(self) -> dict[str, nn.Module]:
        return {"unet": self.unet}

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of x_t, the U-Net's input."""
        return (self.unet.config.in_channels, *square(self.unet.config.sample_size))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.latent_shape

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        return x0.float().clamp(-1, 1)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images.float()

    def denoise(self, x, t, cond, hook):
        return self.unet(x, t.expand(len(x))).sample

    @classmethod
    def load(cls, folder, dtype):
        from diffusers import UNet2DModel

        return cls(folder.network(UNet2DModel, folder.subfolder("unet", "config.json"), dtype))
