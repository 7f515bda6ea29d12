"""Sample grids of a toy model during training (plain diffusers DDIM, 20 steps, fixed seeds)."""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDIMScheduler, UNet2DModel

from pipeline.formats.images import image_grid, save_png, to_uint8


@torch.no_grad()
def save_model_grid(model_dir: Path, png: Path, n: int = 64, steps: int = 20) -> Path:
    unet = UNet2DModel.from_pretrained(model_dir).eval()
    sched = DDIMScheduler.from_pretrained(model_dir, clip_sample=False)
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((n, 3, unet.config.sample_size, unet.config.sample_size), generator=g)
    for t in sched.timesteps:
        x = sched.step(unet(x, t).sample, t, x, eta=0.0).prev_sample
    return save_png(image_grid(to_uint8(x), 8), png, upscale=3)
