"""PixArt-alpha and PixArt-Sigma (``PixArtAlphaPipeline``, ``PixArtSigmaPipeline`` layouts): a
``PixArtTransformer2DModel`` (adaLN-single DiT blocks with cross-attention) on ``AutoencoderKL``
latents, conditioned on T5 as the pipelines' ``encode_prompt`` does:

- the prompt is lower-cased and stripped, the pipelines' ``clean_caption=False``: their default
  caption cleaner (URLs, HTML, punctuation, ...) runs only where ``beautifulsoup4`` and ``ftfy`` are
  installed and otherwise falls back to exactly this, so the same prompt would encode differently on
  two machines; hspace always does the lower/strip;
- T5 over ``max_sequence_length`` tokens (alpha 120, Sigma 300, the pipelines' defaults) with the
  attention mask into T5 and into the transformer (``encoder_attention_mask``); the negative prompt
  (default "") is encoded the same way with its own mask;
- ``resolution`` (H, W) and ``aspect_ratio`` H / W in pixels in ``added_cond_kwargs`` where the
  transformer takes them (``use_additional_conditions``: PixArt-alpha's 1024 model), None otherwise,
  which is what both pipelines pass; no resolution binning (the pipelines' ``use_resolution_binning``
  off: the image is the model's ``sample_size`` times the VAE factor);
- learned sigma: the transformer predicts 2 C channels; guidance is SD's ([uncond; cond]) and the
  second half (the variance) is dropped (dropping it before or after the guided sum is the same
  arithmetic).

h is a transformer block's output, token-wise (N, C) (:attr:`Family.default_hook`).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from pipeline.engine.families.text import Embedding, TextFamily, check_positive_int

#: T5 tokens per prompt, by pipeline (the pipelines' ``max_sequence_length`` defaults)
MAX_SEQUENCE_LENGTH = {"PixArtAlphaPipeline": 120, "PixArtSigmaPipeline": 300}


def drop_learned_sigma(out: torch.Tensor, channels: int) -> torch.Tensor:
    """The prediction (B, C, H, W) of a learned-sigma output (B, 2C, H, W): its first C channels."""
    return out[:, :channels] if out.shape[1] == 2 * channels else out


class PixArtFamily(TextFamily):
    """PixArt-alpha / Sigma; ``prompt``, ``negative_prompt`` and ``guidance_scale`` (default 4.5, the
    pipelines'); ``max_sequence_length`` when built (default: the pipeline's)."""

    kind = "pixart"
    pipelines = tuple(MAX_SEQUENCE_LENGTH)
    net_component = "transformer"
    default_guidance = 4.5
    build_settings = ("max_sequence_length",)

    def __init__(self, net: nn.Module, autoencoder: nn.Module, text_encoder: nn.Module, tokenizer,
                 max_sequence_length: int = 120):
        super().__init__(net, autoencoder, text_encoder, tokenizer)
        self.max_sequence_length = int(max_sequence_length)

    def set_defaults(self, prompt=None, negative_prompt=None, guidance_scale=None, max_sequence_length=None,
                     **other) -> None:
        if max_sequence_length is not None:
            self.max_sequence_length = check_positive_int("max_sequence_length", max_sequence_length)
            self._cache = None
        super().set_defaults(prompt, negative_prompt, guidance_scale, **other)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Embedding:
        """Prompts -> {"context": (B, L, D), "mask": (B, L)}, L = ``max_sequence_length``."""
        tokens = self.tokenizer([p.lower().strip() for p in prompts], padding="max_length",
                                max_length=self.max_sequence_length, truncation=True, add_special_tokens=True,
                                return_tensors="pt")
        device = next(self.text_encoder.parameters()).device
        mask = tokens.attention_mask.to(device)
        return {"context": self.text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0], "mask": mask}

    def forward(self, x, t, emb):
        sizes = {"resolution": None, "aspect_ratio": None}
        if self.net.use_additional_conditions:
            _, height, width = self.image_shape
            sizes = {"resolution": torch.tensor([[height, width]], dtype=x.dtype, device=x.device).repeat(len(x), 1),
                     "aspect_ratio": torch.tensor([[height / width]], dtype=x.dtype, device=x.device).repeat(len(x), 1)}
        out = self.net(x, encoder_hidden_states=emb["context"].to(x.dtype), encoder_attention_mask=emb["mask"],
                       timestep=t, added_cond_kwargs=sizes).sample
        return drop_learned_sigma(out, x.shape[1])

    def describe(self) -> dict:
        return {**super().describe(), "max_sequence_length": self.max_sequence_length}

    @classmethod
    def load(cls, folder, dtype):
        from diffusers import AutoencoderKL, PixArtTransformer2DModel
        from transformers import T5EncoderModel, T5Tokenizer, T5TokenizerFast

        # the hub names the transformer Transformer2DModel (diffusers maps it to PixArt's class by its norm_type)
        transformer = folder.component("transformer", {"Transformer2DModel": PixArtTransformer2DModel,
                                                       "PixArtTransformer2DModel": PixArtTransformer2DModel}, dtype)
        vae = folder.network(AutoencoderKL, "vae", dtype)
        encoder = folder.component("text_encoder", {"T5EncoderModel": T5EncoderModel}, dtype)
        tokenizer = folder.component("tokenizer", {"T5Tokenizer": T5Tokenizer, "T5TokenizerFast": T5TokenizerFast})
        return cls(transformer, vae, encoder, tokenizer, MAX_SEQUENCE_LENGTH[folder.index["_class_name"]])
