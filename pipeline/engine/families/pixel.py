"""The pixel family: a ``UNet2DModel`` on images in [-1, 1] (``DDPMPipeline`` layout, or the flat
hub-DDPM layout with config.json at the root); x_t is the image."""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from pipeline.engine.families.base import Family, square


class PixelFamily(Family):
    """x_t is the image: encode and decode are the identity (decode clamps to [-1, 1]).

    ``net``: the denoiser, saved in the pipeline's folder ``net_component`` (``unet``; the
    transformer families': ``transformer``)."""

    kind = "pixel"
    pipelines = ("DDPMPipeline", "DDIMPipeline")
    net_component: ClassVar[str] = "unet"

    def __init__(self, net: nn.Module):
        self.net = net

    @property
    def denoiser(self) -> nn.Module:
        return self.net

    def modules(self) -> dict[str, nn.Module]:
        return {self.net_component: self.net}

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of x_t, the denoiser's input."""
        return (self.net.config.in_channels, *square(self.net.config.sample_size))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.latent_shape

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        return x0.float().clamp(-1, 1)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images.float()

    def denoise(self, x, t, cond, hook):
        return self.net(x, t.expand(len(x))).sample

    @classmethod
    def load(cls, folder, dtype):
        from diffusers import UNet2DModel

        return cls(folder.network(UNet2DModel, folder.subfolder("unet", "config.json"), dtype))
