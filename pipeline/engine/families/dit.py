"""DiT (``DiTPipeline`` layout): a class-conditional ``DiTTransformer2DModel`` (adaLN-zero blocks)
on ``AutoencoderKL`` latents, sampled as the pipeline does:

- the condition is a class: a name from the folder's ``id2label`` (ImageNet's, for the hub's models)
  or an index. Every comma-separated synonym of a label is a name (``"goldfish"`` and ``"Carassius
  auratus"`` are class 1), as ``DiTPipeline.get_label_ids``; hspace also ignores case;
- guidance (``guidance_scale`` > 1, default 4.0 as the pipeline's) runs the batch **[class; null
  class]**, the conditional rows first (the reverse of SD's order); the null class is the label
  table's dropout row, ``num_embeds_ada_norm`` (1000 for every DiT: what DiTPipeline hard-codes).
  As the pipeline, the guided sum takes the first C output channels (the noise prediction) and the
  learned-sigma half is dropped. h is recorded from the conditional rows; edits move both branches,
  as for SD (:mod:`pipeline.engine.families.text`);
- no class given: the null class, an unconditional sample (guidance then changes nothing), the
  counterpart of a text model's empty prompt.

h is a transformer block's output, token-wise (N, C) (``transformer_blocks.{n // 2}``, docs/families.md).
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.engine.families.latent import LatentFamily
from pipeline.engine.families.pixart import drop_learned_sigma
from pipeline.engine.families.text import check_guidance, guided_pass
from pipeline.errors import InputError


def label_names(id2label: dict) -> dict[str, int]:
    """Every comma-separated synonym of every label, lower-cased and stripped -> its class index."""
    return {name.strip().lower(): int(k) for k, label in id2label.items() for name in str(label).split(",")}


@dataclass
class ClassConditioning:
    """The classes of a batch, ``labels`` (B,) int64, and the guidance ``scale`` (> 1: a second, null-class branch)."""

    labels: torch.Tensor
    scale: float

    @property
    def branches(self) -> int:
        return 2 if self.scale > 1 else 1

    def expand(self, batch: int) -> ClassConditioning:
        """One sample's conditioning repeated for a batch (a Jacobian's vectors)."""
        return self if len(self.labels) == batch else ClassConditioning(self.labels.expand(batch), self.scale)


class DiTFamily(LatentFamily):
    """DiT; ``class_label`` (a name or an index, one or one per sample; default None: the null class)
    and ``guidance_scale`` are the conditioning inputs."""

    kind = "dit"
    pipelines = ("DiTPipeline",)
    net_component = "transformer"
    condition_inputs = ("class_label", "guidance_scale")

    def __init__(self, net: nn.Module, autoencoder: nn.Module, id2label: dict | None = None):
        super().__init__(net, autoencoder, "vae")
        self.names = label_names(id2label or {})
        self.class_label, self.guidance_scale = None, 4.0

    @property
    def num_classes(self) -> int:
        """The classes the model knows; index ``num_classes`` is the null class."""
        return int(self.net.config.num_embeds_ada_norm)

    # ------------------------------------------------------------------ conditioning
    def set_defaults(self, class_label=None, guidance_scale=None, **other) -> None:
        self._refuse(other)
        if class_label is not None:
            self.class_index(class_label)  # checked, kept as given
            self.class_label = class_label
        self.guidance_scale = self.guidance_scale if guidance_scale is None else check_guidance(guidance_scale)

    def defaults(self) -> dict:
        return {"class_label": self.class_label, "guidance_scale": self.guidance_scale}

    def _refuse(self, inputs: dict) -> None:
        given = [k for k, v in inputs.items() if v is not None]
        if given:
            raise InputError(f"{', '.join(given)} given to a class-conditional DiT model, which takes class_label "
                             f"(an ImageNet class name or index) and guidance_scale")

    def class_index(self, label) -> int:
        """A class name (any synonym, any case) or index -> its index; unknown names name close ones."""
        if isinstance(label, bool) or isinstance(label, float) and not label.is_integer():
            raise InputError(f"class_label must be a class name or an index, got {label!r}")
        if isinstance(label, str) and not label.strip().isdigit():
            name = label.strip().lower()
            if name in self.names:
                return self.names[name]
            if not self.names:
                raise InputError(f"class_label {label!r}: this model has no class names (no id2label in its "
                                 f"model_index.json); give an index 0..{self.num_classes - 1}")
            close = difflib.get_close_matches(name, self.names, n=3, cutoff=0.6)
            hint = f"; close: {', '.join(close)}" if close else ""
            raise InputError(f"class_label {label!r} is not a class name of this model{hint} (or give an index "
                             f"0..{self.num_classes - 1})")
        index = int(label)
        if not 0 <= index < self.num_classes:
            raise InputError(f"class_label {index} out of range: this model has classes 0..{self.num_classes - 1}")
        return index

    def conditioning(self, batch: int, class_label=None, guidance_scale=None, **other) -> ClassConditioning:
        """Classes (one, or one per sample; None: the default) and guidance of a batch."""
        self._refuse(other)
        scale = self.guidance_scale if guidance_scale is None else check_guidance(guidance_scale)
        label = self.class_label if class_label is None else class_label
        if isinstance(label, (list, tuple)):
            if len(label) != batch:
                raise InputError(f"got {len(label)} values of class_label for {batch} samples; give one, or one per sample")
            labels = [self.num_classes if x is None else self.class_index(x) for x in label]
        else:
            labels = [self.num_classes if label is None else self.class_index(label)] * batch
        return ClassConditioning(torch.tensor(labels, dtype=torch.long), scale)

    def describe(self) -> dict:
        return self.defaults()

    # ------------------------------------------------------------------ the denoiser
    def denoise(self, x, t, cond: ClassConditioning, hook):
        if cond is None:
            raise InputError("a class-conditional model needs its classes")
        cond = cond.expand(len(x))
        labels = cond.labels.to(x.device)
        null = None if cond.branches == 1 else torch.full_like(labels, self.num_classes)  # DiTPipeline's order, [class; null]
        return guided_pass(self.forward, x, t, labels, null, cond.scale, hook, conditional_first=True)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One pass: the noise prediction (B, C, H, W) of x at times t (B,) for classes ``labels`` (B,)."""
        return drop_learned_sigma(self.net(x, timestep=t, class_labels=labels).sample, x.shape[1])

    @classmethod
    def load(cls, folder, dtype):
        from diffusers import AutoencoderKL, DiTTransformer2DModel

        # the hub names the transformer Transformer2DModel (diffusers maps it to DiT's class by its norm_type)
        transformer = folder.component("transformer", {"Transformer2DModel": DiTTransformer2DModel,
                                                       "DiTTransformer2DModel": DiTTransformer2DModel}, dtype)
        vae = folder.network(AutoencoderKL, "vae", dtype)
        return cls(transformer, vae, folder.index.get("id2label"))

