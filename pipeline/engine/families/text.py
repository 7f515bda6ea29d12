"""The text-to-image family: Stable Diffusion 1.x / 2.x (``StableDiffusionPipeline`` layout), a
``UNet2DConditionModel`` on ``AutoencoderKL`` latents conditioned on a CLIP text encoder's last
hidden states; prompts are tokenised as StableDiffusionPipeline does (padded to the tokenizer's
``model_max_length``). :class:`TextFamily` is also what every prompt-conditioned family builds on
(SDXL, PixArt): the prompts, their cache and the guided pass are here; a subclass says how prompts
are encoded (:meth:`TextFamily.encode_prompts`: a tensor, or a dict of tensors with one row per
prompt) and how the denoiser is called with them (:meth:`TextFamily.forward`).

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
from typing import ClassVar, Sequence, Union

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


def check_positive_int(key: str, value) -> int:
    """A size setting (``height``, ``max_sequence_length``): a positive integer, else one line naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InputError(f"{key} must be a positive integer, got {value!r}")
    return value


#: A batch's text embeddings: a tensor (B, L, D), or a dict of tensors with B rows each (``context``
#: (B, L, D) and SDXL's, SD3's and FLUX's ``pooled`` (B, P), PixArt's attention ``mask`` (B, L), FLUX's
#: ``guidance`` (B,))
Embedding = Union[torch.Tensor, dict]


def map_rows(fn, emb: Embedding) -> Embedding:
    """``fn`` applied to the embedding's tensor, or to each of its tensors."""
    return {k: fn(v) for k, v in emb.items()} if isinstance(emb, dict) else fn(emb)


def join_rows(first: Embedding, second: Embedding) -> Embedding:
    """Two embeddings' rows one after the other (a guidance batch)."""
    if isinstance(first, dict):
        return {k: torch.cat([first[k], second[k]]) for k in first}
    return torch.cat([first, second])


def guided_pass(forward, x: torch.Tensor, t: torch.Tensor, conditional: Embedding, null: Embedding | None,
                scale: float, hook, conditional_first: bool = False) -> torch.Tensor:
    """One pass of ``forward(x, t, condition)`` (x (B, ...), t a scalar tensor): on x alone where ``null``
    is None, else classifier-free guidance over the doubled batch, [null; conditional] (SD's order) or
    [conditional; null] (DiT's): ``null + scale (conditional - null)``. h is recorded from the
    conditional rows; an edit moves both branches (the hook's ``branch_rows``)."""
    B = len(x)
    if null is None:
        return forward(x, t.expand(B), conditional)
    first, second = (conditional, null) if conditional_first else (null, conditional)
    with hook.branch_rows(0, B) if conditional_first else hook.branch_rows(B):
        both = forward(torch.cat([x, x]), t.expand(2 * B), join_rows(first, second))
    a, b = both.chunk(2)
    cond_out, null_out = (a, b) if conditional_first else (b, a)
    return null_out + scale * (cond_out - null_out)


@dataclass
class Conditioning:
    """Text embeddings of a batch: ``text`` (B rows) and, under classifier-free guidance
    (``scale`` > 1), ``uncond`` (B rows) of the negative prompts."""

    text: Embedding
    uncond: Embedding | None
    scale: float
    prompts: list[str]

    @property
    def branches(self) -> int:
        """Rows of the denoiser's batch per sample: 2 under guidance, else 1."""
        return 1 if self.uncond is None else 2

    def expand(self, batch: int) -> Conditioning:
        """One sample's conditioning repeated for a batch (a Jacobian's vectors)."""
        if len(self.prompts) == batch:
            return self
        grow = lambda e: None if e is None else map_rows(lambda t: t.expand(batch, *t.shape[1:]), e)  # noqa: E731
        return Conditioning(grow(self.text), grow(self.uncond), self.scale, self.prompts * batch)


class TextFamily(LatentFamily):
    """Stable Diffusion 1.x / 2.x; ``prompt``, ``negative_prompt`` and ``guidance_scale`` are the
    conditioning inputs (defaults: "", "", ``default_guidance``)."""

    kind = "text"
    pipelines = ("StableDiffusionPipeline",)
    condition_inputs = ("prompt", "negative_prompt", "guidance_scale")
    default_guidance: ClassVar[float] = 7.5

    def __init__(self, net: nn.Module, autoencoder: nn.Module, text_encoder: nn.Module, tokenizer):
        super().__init__(net, autoencoder, "vae")
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.prompt, self.negative_prompt, self.guidance_scale = "", "", self.default_guidance
        self._cache: tuple | None = None

    def modules(self) -> dict[str, nn.Module]:
        return {**super().modules(), "text_encoder": self.text_encoder}

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
            raise InputError(f"unknown conditioning input(s) {', '.join(inputs)} of a {self.kind} text-to-image model; "
                             f"it takes {', '.join(self.condition_inputs)}")

    def conditioning(self, batch: int, prompt=None, negative_prompt=None, guidance_scale=None, **other) -> Conditioning:
        """Prompts (one, or one per sample; None: the default) -> their embeddings; guidance (a second,
        unconditional branch of the negative prompts) only for ``guidance_scale`` > 1."""
        self._refuse(other)
        scale = self.guidance_scale if guidance_scale is None else check_guidance(guidance_scale)
        prompts = prompt_list(self.prompt if prompt is None else prompt, batch)
        text = self.embed(prompts)
        uncond = None
        if scale > 1:
            uncond = self.negative(self.negative_prompt if negative_prompt is None else negative_prompt, batch, text)
        return Conditioning(text, uncond, scale, prompts)

    def negative(self, negative_prompt, batch: int, text: Embedding) -> Embedding:
        """The unconditional branch's embeddings of the negative prompts (one, or one per sample)."""
        return self.embed(prompt_list(negative_prompt, batch, "negative_prompt"))

    def embed(self, prompts: list[str]) -> Embedding:
        """Text embeddings (B rows) of prompts, the distinct ones encoded once (and the last set cached)."""
        key = tuple(prompts)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        unique = list(dict.fromkeys(prompts))
        rows = [unique.index(p) for p in prompts]
        out = map_rows(lambda t: t[rows], self.encode_prompts(unique))
        self._cache = (key, out)
        return out

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Embedding:
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
        cond = cond.expand(len(x))
        return guided_pass(self.forward, x, t, cond.text, cond.uncond, cond.scale, hook)

    def forward(self, x: torch.Tensor, t: torch.Tensor, emb: Embedding) -> torch.Tensor:
        """One pass of the denoiser: its native prediction (B, *latent_shape) for x (B, *latent_shape)
        at times t (B,) with text embeddings of B rows."""
        return self.net(x, t, encoder_hidden_states=emb.to(x.dtype)).sample

    @staticmethod
    def check_tokenizer(tokenizer, location: str, component: str = "tokenizer") -> None:
        if not 0 < tokenizer.model_max_length <= 100_000:  # unset: transformers' 1e30, an overflow later
            raise ModelLoadError(f"the {component} of model {location} has no model_max_length ({component}/"
                                 f"tokenizer_config.json); copy or download the whole model folder again")

    @classmethod
    def load(cls, folder, dtype):
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, CLIPTokenizerFast

        unet = folder.network(UNet2DConditionModel, "unet", dtype)
        vae = folder.network(AutoencoderKL, "vae", dtype)
        encoder = folder.component("text_encoder", {"CLIPTextModel": CLIPTextModel,
                                                    "CLIPTextModelWithProjection": CLIPTextModelWithProjection}, dtype)
        tokenizer = folder.component("tokenizer", {"CLIPTokenizer": CLIPTokenizer, "CLIPTokenizerFast": CLIPTokenizerFast})
        cls.check_tokenizer(tokenizer, folder.location)
        return cls(unet, vae, encoder, tokenizer)
