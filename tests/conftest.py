"""Shared fixtures: tiny random U-Nets built and saved by the tests themselves (CPU, seconds)."""
from __future__ import annotations

import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is imported: it reads this once

import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel  # noqa: E402

warnings.filterwarnings("ignore", message=".*should be kept in float32.*")
torch.set_num_threads(2)


def make_tiny_unet(seed: int = 0, size: int = 16) -> UNet2DModel:
    """A 2-level UNet2DModel (h: 16 x size/2 x size/2) with random weights, scaled down so
    that samples do not saturate."""
    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=size,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        attention_head_dim=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    with torch.no_grad():
        unet.conv_out.weight.mul_(0.3)
    return unet.eval()


@pytest.fixture
def tiny_unet():
    return make_tiny_unet()


@pytest.fixture
def tiny_model(tiny_unet):
    from pipeline import HSpaceModel

    def build(eta=0.0, steps=5, hook="after"):
        return HSpaceModel(tiny_unet, DDIMScheduler(), num_inference_steps=steps, eta=eta, hook=hook, device="cpu")

    return build


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny model saved in the flat hub-DDPM layout (config.json + scheduler_config.json)."""
    path = tmp_path_factory.mktemp("tiny-ddpm")
    make_tiny_unet().save_pretrained(path)
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(path)
    return path
