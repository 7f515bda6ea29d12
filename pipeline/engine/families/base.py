"""The family adapter: what differs between model families, behind one small interface.

The denoising loop of :class:`~pipeline.engine.model.HSpaceModel` is the same for every family;
an adapter supplies the rest: its networks (:meth:`Family.modules`), the space sampling runs in
(``latent_shape``) and the images (``image_shape``, :meth:`~Family.encode`, :meth:`~Family.decode`),
the conditioning of a batch (:meth:`~Family.conditioning`: None for an unconditional model), one
(guided) pass of the denoiser (:meth:`~Family.denoise`: the guidance batch layout and which rows h
is recorded from), where a hook point's h is in a module's output (:meth:`~Family.hook_element`),
and what its schedule needs (:meth:`~Family.schedule_options`, e.g. FLUX's resolution shift).
A new family is one module with a subclass and one entry in :data:`pipeline.engine.families.FAMILIES`.

x_t keeps the shape its noise is drawn in (``latent_shape``, e.g. (C, H, W) for every latent model, so
that a seed's noise is the pipeline's); a family whose network takes another layout (FLUX's packed
2x2 tokens) converts inside :meth:`~Family.denoise`. h is whatever the hooked block gives, token-wise
in a transformer.
"""
from __future__ import annotations

import contextlib
from typing import ClassVar

import torch
from torch import nn

from pipeline.engine.hooks import HSpaceHook
from pipeline.errors import InputError


def square(sample_size) -> tuple[int, int]:
    """A config's ``sample_size`` (an int or (H, W)) as (H, W)."""
    return (sample_size, sample_size) if isinstance(sample_size, int) else tuple(sample_size)


class Family:
    """An unconditional denoiser on x_t; subclasses override what differs.

    ``kind``: the family's name; ``pipelines``: the model_index.json ``_class_name`` values it loads;
    ``condition_inputs``: the names of its conditioning inputs (``prompt``, ...), which
    :meth:`conditioning` takes per call and :meth:`set_defaults` sets for every call;
    ``build_settings``: what :meth:`set_defaults` also takes, when the model is built only (an image size)."""

    kind: ClassVar[str] = "base"
    pipelines: ClassVar[tuple[str, ...]] = ()
    condition_inputs: ClassVar[tuple[str, ...]] = ()
    build_settings: ClassVar[tuple[str, ...]] = ()

    @property
    def conditional(self) -> bool:
        return bool(self.condition_inputs)

    @classmethod
    def settings(cls) -> tuple[str, ...]:
        """Every setting the model takes when it is built: its conditioning inputs and build settings."""
        return cls.condition_inputs + cls.build_settings

    @property
    def denoiser(self) -> nn.Module:
        """The network that predicts the noise (or velocity): where h is hooked."""
        raise NotImplementedError

    def modules(self) -> dict[str, nn.Module]:
        """Every network of the family by component name (what ``to`` moves and converts, what the weights hash covers)."""
        raise NotImplementedError

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """The shape of x_t per sample, where sampling runs."""
        raise NotImplementedError

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(3, H, W) of the decoded images."""
        raise NotImplementedError

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """(B, *latent_shape) -> images (B, 3, H, W) in [-1, 1]."""
        raise NotImplementedError

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [-1, 1] -> x_0 (B, *latent_shape)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ conditioning
    def set_defaults(self, **inputs) -> None:
        """The conditioning inputs every call uses unless it gives its own (``model.prompt``, ...)."""
        self._refuse(inputs)

    def defaults(self) -> dict:
        """The current defaults by the name of the attribute that holds each (``prompt``, ...)."""
        return {}

    @contextlib.contextmanager
    def defaults_set(self, **inputs):
        """Within the block, ``inputs`` (those not None) are the defaults."""
        old = self.defaults()
        self.set_defaults(**{k: v for k, v in inputs.items() if v is not None})
        try:
            yield
        finally:
            self.restore_defaults(old)

    def restore_defaults(self, old: dict) -> None:
        """Set the defaults back to ``old`` (what :meth:`defaults` gave), None values included."""
        for name, value in old.items():
            setattr(self, name, value)

    def conditioning(self, batch: int, **inputs):
        """The conditioning of a batch (inputs not given: the defaults); None for an unconditional model."""
        self._refuse(inputs)
        return None

    def _refuse(self, inputs: dict) -> None:
        given = [k for k, v in inputs.items() if v is not None]
        if given:
            raise InputError(f"{', '.join(given)} given to a {self.kind} model, which takes no conditioning: "
                             f"they apply to text-to-image models")

    # ------------------------------------------------------------------ the denoiser
    def denoise(self, x: torch.Tensor, t: torch.Tensor, cond, hook: HSpaceHook) -> torch.Tensor:
        """The native prediction for a batch x (B, *latent_shape) at time t (a scalar tensor), guided
        where ``cond`` asks for it; h is recorded from the rows of the conditioned branch."""
        raise NotImplementedError

    @property
    def default_hook(self) -> str:
        """Where h is taken unless ``hook`` says otherwise: after a U-Net's mid block (the paper's h); in a
        transformer, which has no bottleneck, the output of the block half-way through in execution order,
        block n // 2 of its n blocks (double-stream ``transformer_blocks`` before ``single_transformer_blocks``):
        as many blocks before it as after it (reasons and references: docs/families.md)."""
        net = self.denoiser
        if getattr(net, "mid_block", None) is not None:
            return "after"
        names = [f"{group}.{i}" for group in ("transformer_blocks", "single_transformer_blocks")
                 for i in range(len(getattr(net, group, ())))]
        return names[len(names) // 2] if names else "after"

    def hook_element(self, module: nn.Module) -> int | None:
        """Which element of ``module``'s tuple output is h (None: the first)."""
        return None

    def schedule_options(self, scheduler_config, num_steps: int) -> dict:
        """What this family's schedule needs beyond the scheduler config (FLUX: ``mu``, ``sigmas``)."""
        return {}

    def describe(self) -> dict:
        """Provenance beyond the networks: e.g. a text model's guidance settings."""
        return {}

    def forget(self) -> None:
        """Drop what is cached on the current device (prompt embeddings), after the networks moved."""

    @classmethod
    def load(cls, folder, dtype: torch.dtype) -> Family:
        """The family's networks from a pipeline folder (:class:`~pipeline.engine.loading.Folder`), in ``dtype``."""
        raise NotImplementedError
