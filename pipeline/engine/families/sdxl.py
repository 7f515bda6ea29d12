"""SDXL (``StableDiffusionXLPipeline`` layout): a ``UNet2DConditionModel`` with ``text_time``
conditioning on ``AutoencoderKL`` latents, conditioned as the pipeline's ``encode_prompt`` does:

- the context is both CLIP encoders' **penultimate** hidden states joined along channels
  (CLIP ViT-L 768 + OpenCLIP bigG 1,280 = 2,048), each tokenised to its ``model_max_length``;
- ``text_embeds`` is the second encoder's (``CLIPTextModelWithProjection``) projected pooled output;
- ``time_ids`` = (H, W, 0, 0, H, W): original size, crop top-left (0, 0) and target size, all the
  image's size in pixels, the same for both guidance branches;
- the negative branch is **zeros** (context and ``text_embeds``) when no negative prompt is given
  and the folder's ``force_zeros_for_empty_prompt`` is set (the base model's); a negative prompt
  given, even "", is encoded.

Guidance is as SD's (:class:`~pipeline.engine.families.text.TextFamily`: batch [uncond; cond], h
from the conditional half, edits move both). h is after the mid block by default, as for SD.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from torch import nn

from pipeline.engine.families.text import Embedding, TextFamily, map_rows
from pipeline.errors import ModelLoadError


class SDXLFamily(TextFamily):
    """SDXL; ``prompt``, ``negative_prompt`` (default None: zeros where the model says so) and
    ``guidance_scale`` (default 5.0, the pipeline's)."""

    kind = "sdxl"
    pipelines = ("StableDiffusionXLPipeline",)
    default_guidance = 5.0

    def __init__(self, net: nn.Module, autoencoder: nn.Module, text_encoder: nn.Module, tokenizer,
                 text_encoder_2: nn.Module, tokenizer_2, force_zeros_for_empty_prompt: bool = True):
        super().__init__(net, autoencoder, text_encoder, tokenizer)
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)
        self.negative_prompt = None

    def modules(self) -> dict[str, nn.Module]:
        return {**super().modules(), "text_encoder_2": self.text_encoder_2}

    def negative(self, negative_prompt, batch: int, text: Embedding) -> Embedding:
        if negative_prompt is None and self.force_zeros_for_empty_prompt:
            return map_rows(torch.zeros_like, text)
        return super().negative(negative_prompt, batch, text)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Embedding:
        """Prompts -> {"context": (B, L, D1 + D2), "pooled": (B, P)} in the second encoder's dtype."""
        states = []
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids
            out = encoder(ids.to(next(encoder.parameters()).device), output_hidden_states=True)
            states.append(out.hidden_states[-2])
        dtype = next(self.text_encoder_2.parameters()).dtype
        return {"context": torch.cat(states, dim=-1).to(dtype), "pooled": out.text_embeds}

    def forward(self, x, t, emb):
        _, height, width = self.image_shape
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=x.dtype, device=x.device)
        added = {"text_embeds": emb["pooled"].to(x.dtype), "time_ids": time_ids.repeat(len(x), 1)}
        return self.net(x, t, encoder_hidden_states=emb["context"].to(x.dtype), added_cond_kwargs=added).sample

    # ------------------------------------------------------------------ the autoencoder
    @contextlib.contextmanager
    def _upcast(self):
        """The VAE in float32 while it runs when it is in float16 and its config says ``force_upcast``
        (SDXL's VAE overflows in float16), as the pipeline does."""
        upcast = self._ae_dtype() == torch.float16 and getattr(self.autoencoder.config, "force_upcast", False)
        if upcast:  # nn.Module's own ``to``: diffusers' logs a float32-modules warning at every call
            nn.Module.to(self.autoencoder, torch.float32)
        try:
            yield
        finally:
            if upcast:
                nn.Module.to(self.autoencoder, torch.float16)

    def decode(self, x0):
        with self._upcast():
            return super().decode(x0)

    def encode(self, images):
        with self._upcast():
            return super().encode(images)

    @classmethod
    def load(cls, folder, dtype):
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, CLIPTokenizerFast

        tokenizers = {"CLIPTokenizer": CLIPTokenizer, "CLIPTokenizerFast": CLIPTokenizerFast}
        unet = folder.network(UNet2DConditionModel, "unet", dtype)
        vae = folder.network(AutoencoderKL, "vae", dtype)
        encoder = folder.component("text_encoder", {"CLIPTextModel": CLIPTextModel}, dtype)
        encoder_2 = folder.component("text_encoder_2", {"CLIPTextModelWithProjection": CLIPTextModelWithProjection}, dtype)
        tokenizer, tokenizer_2 = folder.component("tokenizer", tokenizers), folder.component("tokenizer_2", tokenizers)
        cls.check_tokenizer(tokenizer, folder.location)
        cls.check_tokenizer(tokenizer_2, folder.location, "tokenizer_2")
        added = 6 * unet.config.addition_time_embed_dim + encoder_2.config.projection_dim
        if getattr(unet, "add_embedding", None) is None or unet.add_embedding.linear_1.in_features != added:
            raise ModelLoadError(f"the unet of model {folder.location} does not take SDXL's text_time conditioning "
                                 f"({added} inputs: 6 size numbers x addition_time_embed_dim + the pooled text); "
                                 f"check unet/config.json")
        return cls(unet, vae, encoder, tokenizer, encoder_2, tokenizer_2,
                   folder.index.get("force_zeros_for_empty_prompt", True))
