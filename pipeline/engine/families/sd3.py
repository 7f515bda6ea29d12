"""Stable Diffusion 3 (``StableDiffusion3Pipeline`` layout): an MMDiT (``SD3Transformer2DModel``) on a
16-channel VAE latent, sampled by flow matching (``FlowMatchEulerDiscreteScheduler``, the Euler step
as the deterministic DDIM step of :mod:`pipeline.engine.schedules.flow`).

Text as ``StableDiffusion3Pipeline.encode_prompt`` builds it: each CLIP (``CLIPTextModelWithProjection``
x 2, both tokenised to the first tokenizer's ``model_max_length``) gives its penultimate hidden
states and its projected pooled output; the context is the two CLIPs' states joined along channels,
zero-padded to T5's width, followed along the tokens by T5's ``max_sequence_length`` (256) states (no
mask; zeros where the model has no T5); the pooled projection is the two pooled outputs joined.
Classifier-free guidance as Stable Diffusion's (:mod:`.text`): for ``guidance_scale`` > 1 one pass of
the batch [uncond; cond] (the negative prompt, "" by default, encoded the same way), h from the
conditional half, an edit moving both. The transformer's time input is 1000 s; a scheduler with
``use_dynamic_shifting`` gets mu from the image's patch count, as the pipeline does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.engine.families.mmdit import MMDiTFamily, clip_states, t5_states, token_ids
from pipeline.engine.families.text import Embedding
from pipeline.engine.schedules.flow import resolution_shift
from pipeline.errors import InputError


class SD3Family(MMDiTFamily):
    """SD3 / SD3.5; ``prompt``, ``negative_prompt``, ``guidance_scale`` (defaults "", "", 7.0 as the
    pipeline's), and at build ``height``, ``width`` (default: the transformer's sample size x 8 px) and
    ``max_sequence_length`` (T5 tokens, 256)."""

    kind = "sd3"
    pipelines = ("StableDiffusion3Pipeline",)
    transformer_class = "SD3Transformer2DModel"
    text_components = (("clip", "text_encoder", "tokenizer"), ("clip", "text_encoder_2", "tokenizer_2"),
                       ("t5?", "text_encoder_3", "tokenizer_3"))
    default_guidance, default_max_sequence_length = 7.0, 256

    @property
    def default_latent_side(self) -> int:
        return self.net.config.sample_size

    @property
    def size_multiple(self) -> int:
        return self.scale_factor * self.net.config.patch_size

    def check_size(self, height: int, width: int) -> None:
        super().check_size(height, width)
        config = self.net.config
        limit = (config.pos_embed_max_size or 0) * config.patch_size * self.scale_factor
        if limit and max(height, width) > limit:
            raise InputError(f"{height} x {width} px is larger than this SD3 model's position table allows "
                             f"({limit} px a side); give height and width <= {limit}")

    @torch.no_grad()
    def encode_prompts(self, prompts) -> Embedding:
        """Prompts -> {"context": (B, 2 x CLIP length + max_sequence_length, T5 width), "pooled": (B, P)}."""
        length = self.tokenizers[0].model_max_length
        states, pooled = zip(*(clip_states(enc, token_ids(tok, prompts, length))
                               for enc, tok in zip(self.encoders[:2], self.tokenizers[:2])))
        clip = torch.cat(states, dim=-1)
        t5_encoder, t5_tokenizer = self.encoders[2], self.tokenizers[2]
        if t5_encoder is None:
            t5 = clip.new_zeros(len(prompts), self.max_sequence_length, self.net.config.joint_attention_dim)
        else:
            t5 = t5_states(t5_encoder, t5_tokenizer, prompts, self.max_sequence_length)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"context": torch.cat([clip, t5], dim=-2), "pooled": torch.cat(pooled, dim=-1)}

    def schedule_options(self, scheduler_config, num_steps: int) -> dict:
        super().schedule_options(scheduler_config, num_steps)
        if not scheduler_config.get("use_dynamic_shifting", False):
            return {}
        p, (_, h, w) = self.net.config.patch_size, self.latent_shape
        return {"mu": resolution_shift((h // p) * (w // p), scheduler_config)}

    def forward(self, x, t, emb):
        return self.net(hidden_states=x, timestep=t, encoder_hidden_states=emb["context"].to(x.dtype),
                        pooled_projections=emb["pooled"].to(x.dtype)).sample
