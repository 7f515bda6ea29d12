"""What the two multimodal diffusion transformers sampled by flow matching share: SD3 (:mod:`.sd3`)
and FLUX (:mod:`.flux`).

- **Text**: prompts as for Stable Diffusion (:mod:`.text`: one, or one per sample; the distinct ones
  encoded once), each encoded into the :data:`~pipeline.engine.families.text.Embedding` dict
  ``{"context": (B, L, D) token states, "pooled": (B, P)}`` by CLIP and T5 encoders as the family's
  pipeline does.
- **Latents**: a 16-channel ``AutoencoderKL`` with a shift factor (x_0 = (z - shift) scaling, in
  :class:`~pipeline.engine.families.latent.LatentFamily`).
- **Image size**: ``height`` and ``width`` in pixels, as the pipelines take them (default: the
  pipeline's own default size), chosen when the model is built (``HSpaceModel.from_pretrained(...,
  height=, width=)``): the schedule depends on it (FLUX's mu), so it is fixed once the schedule is made.
- **h** in a two-stream block, which returns (text, image) (SD3's last block (None, image)), is the
  **image** stream, element [1]: recorded and edited there, the text stream passes unchanged. h is
  token-wise, (N, C) per sample with N the image tokens. The default block: :attr:`Family.default_hook`.
"""
from __future__ import annotations

from typing import ClassVar, Sequence

import torch
from torch import nn

from pipeline.engine.families.text import TextFamily, check_positive_int
from pipeline.errors import InputError, ModelLoadError


def device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def token_ids(tokenizer, prompts: Sequence[str], length: int) -> torch.Tensor:
    """(B, length) ids, padded to ``length`` and truncated, as every pipeline tokenises."""
    return tokenizer(list(prompts), padding="max_length", max_length=length, truncation=True,
                     return_tensors="pt").input_ids


def clip_states(encoder: nn.Module, ids: torch.Tensor):
    """(penultimate hidden states (B, L, D), the first output: projected ``text_embeds`` of a
    CLIPTextModelWithProjection, the last hidden state of a CLIPTextModel)."""
    out = encoder(ids.to(device_of(encoder)), output_hidden_states=True)
    return out.hidden_states[-2], out[0]


def t5_states(encoder: nn.Module, tokenizer, prompts: Sequence[str], length: int) -> torch.Tensor:
    """T5's last hidden states (B, length, D), no attention mask (as SD3's and FLUX's pipelines)."""
    return encoder(token_ids(tokenizer, prompts, length).to(device_of(encoder)))[0]


class MMDiTFamily(TextFamily):
    """A transformer on 16-channel latents, conditioned on CLIP and T5 text, sampled by flow matching.

    Subclasses give the transformer's class and the text encoders' components, the pipeline's defaults
    (guidance, T5 length, image side in latent pixels), the multiple the image side must be of, how
    prompts are encoded (:meth:`encode_prompts`) and the transformer called (:meth:`forward`)."""

    net_component = "transformer"
    build_settings = ("height", "width", "max_sequence_length")

    transformer_class: ClassVar[str] = ""
    #: the text encoders as (kind, encoder component, tokenizer component); kind "clip", "t5" or "t5?" (optional)
    text_components: ClassVar[tuple[tuple[str, str, str], ...]] = ()
    default_guidance: ClassVar[float] = 7.0
    default_max_sequence_length: ClassVar[int] = 256

    def __init__(self, transformer: nn.Module, autoencoder: nn.Module, encoders: Sequence[nn.Module | None],
                 tokenizers: Sequence):
        super().__init__(transformer, autoencoder, encoders[0], tokenizers[0])
        self.encoders, self.tokenizers = list(encoders), list(tokenizers)
        self.guidance_scale, self.max_sequence_length = self.default_guidance, self.default_max_sequence_length
        side = self.default_latent_side * self.scale_factor
        self.height, self.width = side, side
        self._size_fixed = False

    def modules(self) -> dict[str, nn.Module]:
        return {**super().modules(),
                **{name: e for (_, name, _), e in zip(self.text_components, self.encoders) if e is not None}}

    @property
    def default_latent_side(self) -> int:
        """The pipeline's default image side in latent pixels (its ``default_sample_size``)."""
        raise NotImplementedError

    @property
    def size_multiple(self) -> int:
        """The image side (pixels) must be a multiple of this (autoencoder factor x patch)."""
        raise NotImplementedError

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        f = self.scale_factor
        return (self.autoencoder.config.latent_channels, self.height // f, self.width // f)

    def hook_element(self, module: nn.Module) -> int | None:
        """The image stream [1] of a two-stream block's (text, image) output."""
        from diffusers.models.attention import JointTransformerBlock
        from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

        return 1 if isinstance(module, (JointTransformerBlock, FluxTransformerBlock, FluxSingleTransformerBlock)) else None

    # ------------------------------------------------------------------ settings
    def set_defaults(self, prompt=None, negative_prompt=None, guidance_scale=None, height=None, width=None,
                     max_sequence_length=None, **other) -> None:
        """The text defaults (as :class:`TextFamily`) and, before the schedule is made, the image size
        (``height``, ``width`` in pixels) and T5's ``max_sequence_length``."""
        given = {k: v for k, v in (("height", height), ("width", width), ("max_sequence_length", max_sequence_length))
                 if v is not None}
        if given:
            self._set_size(**given)
        super().set_defaults(prompt, negative_prompt, guidance_scale, **other)

    def _set_size(self, height=None, width=None, max_sequence_length=None) -> None:
        new = {"height": self.height if height is None else height, "width": self.width if width is None else width,
               "max_sequence_length": self.max_sequence_length if max_sequence_length is None else max_sequence_length}
        for key, value in new.items():
            check_positive_int(key, value)
        if self._size_fixed and (new["height"], new["width"]) != (self.height, self.width):
            raise InputError(f"height and width of a {self.kind} model are set when it is built "
                             f"(HSpaceModel.from_pretrained(..., height=, width=)): its schedule depends on them")
        self.check_size(new["height"], new["width"])
        self.height, self.width, self.max_sequence_length = new["height"], new["width"], new["max_sequence_length"]
        self._cache = None

    def check_size(self, height: int, width: int) -> None:
        """Refuse an image size the model cannot sample: each side a multiple of :attr:`size_multiple`."""
        for key, side in (("height", height), ("width", width)):
            if side % self.size_multiple:
                raise InputError(f"{key}={side} px: a {self.kind} image side must be a multiple of "
                                 f"{self.size_multiple} px (the autoencoder's factor x the patch); "
                                 f"try {max(1, round(side / self.size_multiple)) * self.size_multiple}")

    def _refuse(self, inputs: dict) -> None:
        built = [k for k in inputs if k in self.build_settings]
        if built:
            raise InputError(f"{', '.join(built)} of a {self.kind} model are set when it is built "
                             f"(HSpaceModel.from_pretrained(..., {'=, '.join(built)}=)), not per call")
        super()._refuse(inputs)

    def describe(self) -> dict:
        return {**super().describe(), "max_sequence_length": self.max_sequence_length}

    def schedule_options(self, scheduler_config, num_steps: int) -> dict:
        self._size_fixed = True  # the schedule is made from the size now: it cannot change after
        return {}

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, folder, dtype):
        import diffusers

        transformer = folder.network(getattr(diffusers, cls.transformer_class), "transformer", dtype)
        vae = folder.network(diffusers.AutoencoderKL, "vae", dtype)
        parts = [cls.load_clip(folder, encoder, tokenizer, dtype) if kind == "clip"
                 else cls.load_t5(folder, encoder, tokenizer, dtype, required=kind == "t5")
                 for kind, encoder, tokenizer in cls.text_components]
        return cls(transformer, vae, [e for e, _ in parts], [t for _, t in parts])

    @classmethod
    def load_clip(cls, folder, name: str, tokenizer_name: str, dtype):
        """A CLIP text encoder and its tokenizer (which must know its length: model_max_length)."""
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, CLIPTokenizerFast

        encoder = folder.component(name, {"CLIPTextModel": CLIPTextModel,
                                          "CLIPTextModelWithProjection": CLIPTextModelWithProjection}, dtype)
        tokenizer = folder.component(tokenizer_name, {"CLIPTokenizer": CLIPTokenizer, "CLIPTokenizerFast": CLIPTokenizerFast})
        cls.check_tokenizer(tokenizer, folder.location, tokenizer_name)
        return encoder, tokenizer

    @staticmethod
    def load_t5(folder, name: str, tokenizer_name: str, dtype, required: bool = True):
        """A T5 encoder and its tokenizer; (None, None) where model_index.json lists none and it is not
        ``required`` (SD3 without T5)."""
        from transformers import T5EncoderModel, T5Tokenizer, T5TokenizerFast

        entry = folder.index.get(name)
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1]):
            if required:
                raise ModelLoadError(f"model {folder.location} lists no {name} (T5), which it needs; copy or "
                                     f"download the whole model folder again")
            return None, None
        encoder = folder.component(name, {"T5EncoderModel": T5EncoderModel}, dtype)
        tokenizer = folder.component(tokenizer_name, {"T5Tokenizer": T5Tokenizer, "T5TokenizerFast": T5TokenizerFast})
        return encoder, tokenizer


__all__ = ["MMDiTFamily", "clip_states", "t5_states", "token_ids"]
