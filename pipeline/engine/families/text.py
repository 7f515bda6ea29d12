"""The text-to-image family: Stable Diffusion 1.x / 2.x (``StableDiffusionPipeline`` layout), a
``UNet2DConditionModel`` on ``AutoencoderKL`` latents conditioned on a CLIP text encoder's last
hidden states; prompts are tokenised as StableDiffusionPipeline does (padded to the tokenizer's
``model_max_length``).

Classifier-free guidance (guidance_scale > 1): each step runs one U-Net pass on the batch
``[unconditional; conditional]`` (diffusers' order) and combines the native predictions as
``uncond + g (cond - uncond)``. h is recorded from the **conditional** half: it is the activation
of the prompt being studied, and with guidance 1 (one conditional pass) it is the same quantity.
An edit is injected into **both** halves (as in the h-space literature on guided models): the
guided prediction then moves by about the edit's effect on one branch, independent of g, and the
guidance direction (cond - uncond) is left unchanged to first order; an edit of the conditional
half alone would be amplified g-fold. A replacement of h (``Edit.replace``) sets the conditional
half and moves the unconditional half by the same offset, so ``replace=h + d`` is the edit ``d``
and replaying a recorded h reproduces the sample bit for bit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from pipeline.engine.families.latent import LatentFamily
from pipeline.errors import InputError, ModelLoadError


def prompt_list(prompt: str | Sequence[str] | None, batch: int, name: str = "prompt") -> list[str]:
    """One prompt for every sample, or one per sample (B,); None is the empty prompt."""
    if prompt is None:
        return [""] * batch
    if isinstance(prompt, str):
        return [prompt] * batch
    prompts = [str(p) for p in prompt]
    if len(prompts) != batch:
        raise InputError(f"got {len(prompts)} values of {name} for {batch} samples; give one, or one per sample")
    return prompts


def check_guidance(scale: float) -> float:
    scale = float(scale)
    if not (math.isfinite(scale) and scale >= 0):
        raise InputError(f"guidance_scale must be a finite number >= 0, got {scale}")
    return scale


@dataclass
class Conditioning:
    """Text embeddings of a batch: ``text`` (B, L, D) and, under classifier-free guidance
    (``scale`` > 1), ``uncond`` (B, L, D) of the negative prompts."""

    text: torch.Tensor
    uncond: torch.Tensor | None
    scale: float
    prompts: list[str]

    @property
    def branches(self) -> int:
        """Rows of the denoiser's batch per sample: 2 under guidance, else 1."""
        return 1 if self.uncond is None else 2

    def expand(self, batch: int) -> Conditioning:
        """One sample's conditioning repeated for a batch (a Jacobian's vectors)."""
        if len(self.text) == batch:
            return self
        grow = lambda t: None if t is None else t.expand(batch, *t.shape[1:])  # noqa: E731
        return Conditioning(grow(self.text), grow(self.uncond), self.scale, self.prompts * batch)


class TextFamily(LatentFamily):
    """Stable Diffusion 1.x / 2.x; ``prompt``, ``negative_prompt`` and ``guidance_scale`` are the
    conditioning inputs (defaults: "", "", 7.5)."""

    kind = "text"
    pipelines = ("StableDiffusionPipeline",)
    condition_inputs = ("prompt", "negative_prompt", "guidance_scale")

    def __init__(self, unet: nn.Module, autoencoder: nn.Module, text_encoder: nn.Module, tokenizer):
        super().__init__(unet, autoencoder, "vae")
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.prompt, self.negative_prompt, self.guidance_scale = "", "", 7.5
        self._cache: tuple | None = None

    def modules(self) -> dict[str, nn.Module]:
        return {"unet": self.unet, "vae": self.autoencoder, "text_encoder": self.text_encoder}

    # ------------------------------------------------------------------ conditioning
    def set_defaults(self, prompt=None, negative_prompt=None, guidance_scale=None, **other) -> None:
        self._refuse(other)
        self.prompt = self.prompt if prompt is None else str(prompt)
        self.negative_prompt = self.negative_prompt if negative_prompt is None else str(negative_prompt)
        self.guidance_scale = self.guidance_scale if guidance_scale is None else check_guidance(guidance_scale)

    def defaults(self) -> dict:
        return {"prompt": self.prompt, "negative_prompt": self.negative_prompt, "guidance_scale": self.guidance_scale}

    def _refuse(self, inputs: dict) -> None:
        if inputs:
            raise InputError(f"unknown conditioning input(s) {', '.join(inputs)} of a text-to-image model; it takes "
                             f"{', '.join(self.condition_inputs)}")

    def conditioning(self, batch: int, prompt=None, negative_prompt=None, guidance_scale=None, **other) -> Conditioning:
        """Prompts (one, or one per sample; None: the default) -> their embeddings; guidance (a second,
        unconditional branch of the negative prompts) only for ``guidance_scale`` > 1."""
        self._refuse(other)
        scale = self.guidance_scale if guidance_scale is None else check_guidance(guidance_scale)
        prompts = prompt_list(self.prompt if prompt is None else prompt, batch)
        uncond = None
        text = self.embed(prompts)
        if scale > 1:
            negative = prompt_list(self.negative_prompt if negative_prompt is None else negative_prompt, batch,
                                   "negative_prompt")
            uncond = self.embed(negative)
        return Conditioning(text, uncond, scale, prompts)

    def embed(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings (B, L, D) of prompts, the distinct ones encoded once (and the last set cached)."""
        key = tuple(prompts)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        unique = list(dict.fromkeys(prompts))
        emb = self.encode_prompts(unique)
        out = emb[[unique.index(p) for p in prompts]]
        self._cache = (key, out)
        return out

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> text embeddings (B, L, D), in the text encoder's dtype and device."""
        tokens = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        device = next(self.text_encoder.parameters()).device
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(device)
        return self.text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]

    def forget(self) -> None:
        self._cache = None

    def describe(self) -> dict:
        return {"guidance_scale": self.guidance_scale, "negative_prompt": self.negative_prompt}

    # ------------------------------------------------------------------ the denoiser
    def denoise(self, x, t, cond: Conditioning, hook):
        if cond is None:
            raise InputError("a text-conditional model needs prompt embeddings")
        B = len(x)
        cond = cond.expand(B)
        if cond.uncond is None:
            return self.unet(x, t.expand(B), encoder_hidden_states=cond.text.to(x.dtype)).sample
        with hook.branch_rows(B):  # h of the conditional half; edits move both halves
            context = torch.cat([cond.uncond, cond.text]).to(x.dtype)
            both = self.unet(torch.cat([x, x]), t.expand(2 * B), encoder_hidden_states=context).sample
        uncond, text = both.chunk(2)
        return uncond + cond.scale * (text - uncond)

    @classmethod
    def load(cls, folder, dtype):
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, CLIPTokenizerFast

        unet = folder.network(UNet2DConditionModel, "unet", dtype)
        vae = folder.network(AutoencoderKL, "vae", dtype)
        encoder = folder.component("text_encoder", {"CLIPTextModel": CLIPTextModel,
                                                    "CLIPTextModelWithProjection": CLIPTextModelWithProjection}, dtype)
        tokenizer = folder.component("tokenizer", {"CLIPTokenizer": CLIPTokenizer, "CLIPTokenizerFast": CLIPTokenizerFast})
        if not 0 < tokenizer.model_max_length <= 100_000:  # unset: transformers' 1e30, an overflow later
            raise ModelLoadError(f"the tokenizer of model {folder.location} has no model_max_length (tokenizer/"
                                 f"tokenizer_config.json); copy or download the whole model folder again")
        return cls(unet, vae, encoder, tokenizer)
