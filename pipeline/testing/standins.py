"""Random-weight stand-ins with the structure of the paper's checkpoints, for dry runs and benchmarks
on machines that cannot fetch the real weights.

* :func:`celebahq_unet`: a ``UNet2DModel`` with the block structure of ``google/ddpm-ema-celebahq-256``
  (256 px, six levels of 2 ResNet blocks, attention at 16x16, h of 512x8x8 after the mid block;
  its ``config.json`` below), optionally narrower: ``width`` is the first level's channels (128
  in the real model; h has ``4 * width`` channels). :func:`save_celebahq` writes it in the hub's
  flat layout (``config.json``, weights, ``scheduler_config.json``), which ``model.name_or_path``
  accepts like the real repository.
* :func:`save_random_open_clip`: an open_clip checkpoint file of a real architecture (ViT-B-32) with
  random weights, which ``annotate.options.clip.pretrained`` accepts like the real file.

Random weights make random images: they check that every stage runs at the real shapes (and how
long it takes), never what a direction means.
"""
from __future__ import annotations

from pathlib import Path

import torch

#: google/ddpm-ema-celebahq-256's config.json (diffusers UNet2DModel) and scheduler_config.json
CELEBAHQ_256 = {
    "act_fn": "silu", "attention_head_dim": None, "block_out_channels": [128, 128, 256, 256, 512, 512],
    "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-06, "norm_num_groups": 32, "out_channels": 3, "sample_size": 256,
    "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"],
}
CELEBAHQ_256_SCHEDULER = {"beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001, "clip_sample": True,
                          "num_train_timesteps": 1000, "variance_type": "fixed_small"}


def celebahq_unet(width: int = 128, seed: int = 0, sample_size: int = 256, out_scale: float = 0.3):
    """The celebahq-256 U-Net with random weights; ``width`` < 128 scales every level's channels
    by width/128 (GroupNorm groups: min(32, width)); ``sample_size`` < 256 for benchmarks at a
    reduced size (h is then sample_size/32 on a side). ``out_scale`` shrinks the output
    convolution so that random samples do not saturate."""
    from diffusers import UNet2DModel

    if width < 1 or (width > 32 and width % 32):
        raise ValueError(f"width must be in 1..32 or a multiple of 32 (GroupNorm groups), got {width}")
    config = dict(CELEBAHQ_256)
    config["block_out_channels"] = [c * width // 128 for c in CELEBAHQ_256["block_out_channels"]]
    config["norm_num_groups"] = min(32, width)
    config["sample_size"] = int(sample_size)
    torch.manual_seed(seed)
    unet = UNet2DModel(**config)
    with torch.no_grad():
        unet.conv_out.weight.mul_(out_scale)
    return unet.eval()


def save_celebahq(folder, width: int = 128, seed: int = 0, sample_size: int = 256) -> Path:
    """:func:`celebahq_unet` and the real scheduler saved in the hub repository's flat layout."""
    from diffusers import DDPMScheduler

    folder = Path(folder)
    celebahq_unet(width, seed, sample_size).save_pretrained(folder)
    DDPMScheduler(**CELEBAHQ_256_SCHEDULER).save_pretrained(folder)
    return folder


def save_random_open_clip(path, model: str = "ViT-B-32", seed: int = 0, dtype: torch.dtype = torch.float16) -> Path:
    """An open_clip ``model`` with random weights saved as a checkpoint file (a state dict; float16
    halves the file, open_clip casts it back on loading)."""
    import open_clip

    torch.manual_seed(seed)
    net = open_clip.create_model(model, device="cpu")
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in net.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path
