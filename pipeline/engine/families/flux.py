"""FLUX (``FluxPipeline`` layout; FLUX.1-dev, FLUX.1-schnell): a ``FluxTransformer2DModel`` (double-
then single-stream blocks) on a 16-channel VAE latent, sampled by flow matching with a
resolution-dependent shift.

As ``FluxPipeline`` does: the context is T5's ``max_sequence_length`` (512) last hidden states (no
mask), the pooled projection CLIP's ``pooler_output``; x_t keeps the latent's (C, H, W) (a seed's
noise is the pipeline's before packing) and is **packed** into 2x2 patches for each pass,
(B, C, H, W) -> (B, H/2 x W/2, 4C) (``_pack_latents``), with image ids (0, row, col) over the
(H/2, W/2) grid and text ids zeros (L, 3); the velocity is unpacked back. The sigmas are
linspace(1, 1/T, T) shifted by mu, linear in the image-token count (``calculate_shift`` with the
scheduler config's base/max shift); the transformer gets timestep = t / 1000.

Guidance is FLUX.1-dev's distilled guidance: ``guidance_scale`` (3.5) is an input of the
transformer's **one pass** (its guidance embedding); there is no unconditional branch, so no
negative prompt (refused). A transformer without a guidance embedding (schnell) ignores the scale.
h is the image stream of the hooked block; its tokens are the packed patches, row-major.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from pipeline.engine.families.mmdit import MMDiTFamily, device_of, t5_states, token_ids
from pipeline.engine.families.text import Conditioning, Embedding
from pipeline.engine.schedules.flow import resolution_shift
from pipeline.errors import InputError


def pack(z: torch.Tensor) -> torch.Tensor:
    """FLUX's 2x2 packing (``_pack_latents``): (B, C, H, W) -> (B, H/2 x W/2, 4C), row-major patches."""
    b, c, h, w = z.shape
    return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`pack` (``_unpack_latents``): (B, H/2 x W/2, 4C) -> (B, C, H, W)."""
    b, _, c4 = x.shape
    return x.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


def image_ids(h: int, w: int, dtype: torch.dtype, device) -> torch.Tensor:
    """(H/2 x W/2, 3) position ids (0, row, col) of the packed patches (``_prepare_latent_image_ids``)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FluxFamily(MMDiTFamily):
    """FLUX; ``prompt`` and ``guidance_scale`` (defaults "", 3.5 as the pipeline's; no negative prompt),
    and at build ``height``, ``width`` (default 1024 px: the pipeline's 128 latent pixels x 8) and
    ``max_sequence_length`` (T5 tokens, 512)."""

    kind = "flux"
    pipelines = ("FluxPipeline",)
    condition_inputs = ("prompt", "guidance_scale")
    transformer_class = "FluxTransformer2DModel"
    text_components = (("clip", "text_encoder", "tokenizer"), ("t5", "text_encoder_2", "tokenizer_2"))
    default_guidance, default_max_sequence_length = 3.5, 512

    @property
    def default_latent_side(self) -> int:
        return 128  # FluxPipeline.default_sample_size

    @property
    def size_multiple(self) -> int:
        return self.scale_factor * 2

    # ------------------------------------------------------------------ conditioning
    def set_defaults(self, prompt=None, negative_prompt=None, guidance_scale=None, **other) -> None:
        refuse_negative(negative_prompt)
        super().set_defaults(prompt, None, guidance_scale, **other)

    def defaults(self) -> dict:
        return {"prompt": self.prompt, "guidance_scale": self.guidance_scale}

    def conditioning(self, batch: int, prompt=None, negative_prompt=None, guidance_scale=None, **other) -> Conditioning:
        """Prompts -> their embeddings and ``guidance`` (B,), the guidance embedding's input, for one pass."""
        refuse_negative(negative_prompt)
        cond = super().conditioning(batch, prompt, None, guidance_scale, **other)
        guidance = torch.full((batch,), cond.scale, dtype=torch.float32, device=cond.text["context"].device)
        return dataclasses.replace(cond, text={**cond.text, "guidance": guidance})

    def negative(self, negative_prompt, batch: int, text: Embedding) -> None:
        """No unconditional branch: the guidance is distilled into the one pass."""
        return None

    @torch.no_grad()
    def encode_prompts(self, prompts) -> Embedding:
        """Prompts -> {"context": (B, max_sequence_length, T5 width), "pooled": (B, CLIP width)}."""
        clip, t5 = self.encoders
        pooled = clip(token_ids(self.tokenizers[0], prompts, self.tokenizers[0].model_max_length)
                      .to(device_of(clip))).pooler_output
        return {"context": t5_states(t5, self.tokenizers[1], prompts, self.max_sequence_length), "pooled": pooled}

    def describe(self) -> dict:
        embedded = bool(self.net.config.guidance_embeds)
        return {"guidance_scale": self.guidance_scale if embedded else None, "guidance": "embedded, one pass",
                "max_sequence_length": self.max_sequence_length}

    # ------------------------------------------------------------------ the denoiser
    def schedule_options(self, scheduler_config, num_steps: int) -> dict:
        super().schedule_options(scheduler_config, num_steps)
        _, h, w = self.latent_shape
        sigmas = None if scheduler_config.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / num_steps, num_steps)
        return {"mu": resolution_shift((h // 2) * (w // 2), scheduler_config), "sigmas": sigmas}

    def forward(self, x, t, emb):
        """x (B, C, H, W) packed for the transformer, its velocity unpacked; ``guidance`` to a transformer
        with a guidance embedding (dev), none to one without (schnell)."""
        _, h, w = x.shape[1:]
        guidance = emb["guidance"] if self.net.config.guidance_embeds else None
        velocity = self.net(hidden_states=pack(x), timestep=t.to(x.dtype) / 1000, guidance=guidance,
                            pooled_projections=emb["pooled"].to(x.dtype),
                            encoder_hidden_states=emb["context"].to(x.dtype),
                            txt_ids=x.new_zeros(emb["context"].shape[1], 3), img_ids=image_ids(h, w, x.dtype, x.device)
                            ).sample
        return unpack(velocity, h, w)


def refuse_negative(negative_prompt) -> None:
    """FLUX takes no negative prompt: one line saying why (an empty one is no negative prompt)."""
    if negative_prompt is None or negative_prompt == "" or (not isinstance(negative_prompt, str)
                                                             and not any(str(p) for p in negative_prompt)):
        return
    raise InputError("negative_prompt given to a FLUX model: FLUX.1's guidance is distilled into one pass "
                     "(guidance_scale is an input of the transformer), there is no unconditional branch to "
                     "take a negative prompt; remove it")
