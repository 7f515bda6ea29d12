"""The annotator interface and registry.

An annotator maps a batch of images ``(B, 3, H, W)`` float in [-1, 1] to a dict of named
float scores, each ``(B,)``. It declares its attribute names, the input size its network
expects and the normalisation it applies, and it always runs in eval mode under no_grad
(the original code scored with BatchNorm in training mode, so an image's score depended on
its batch). New annotators plug in by name (``@register("name")``) or, from conf.yaml, as a
``"package.module:factory"`` path.
"""
from __future__ import annotations

import abc
import importlib
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import ConfigError, InputError


class Annotator(abc.ABC):
    """Images in [-1, 1] -> {attribute: (B,) float32 score on the CPU}.

    Subclasses set ``attributes``, ``input_size`` ((H, W) or None to keep the size), ``mean``
    and ``std`` (per channel, applied to images scaled to [0, 1]), and implement ``score`` on
    preprocessed inputs. ``networks()`` lists the torch modules to move and put in eval mode.
    """

    name: str = "annotator"
    attributes: tuple[str, ...] = ()
    input_size: tuple[int, int] | None = None
    mean: Sequence[float] = (0.5, 0.5, 0.5)
    std: Sequence[float] = (0.5, 0.5, 0.5)
    device: torch.device = torch.device("cpu")

    def networks(self) -> list[nn.Module]:
        return [v for v in vars(self).values() if isinstance(v, nn.Module)]

    def to(self, device: str | torch.device) -> "Annotator":
        self.device = torch.device(device)
        for net in self.networks():
            net.to(self.device)
        return self

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images -> the network's input: resized to ``input_size``, then normalised."""
        x = (images.float() + 1) / 2
        if self.input_size is not None and tuple(x.shape[-2:]) != tuple(self.input_size):
            x = F.interpolate(x, size=tuple(self.input_size), mode="bilinear", antialias=True, align_corners=False)
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std

    @abc.abstractmethod
    def score(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Scores for preprocessed inputs ``x``; called under no_grad with networks in eval mode."""

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.ndim != 4 or images.shape[1] != 3:
            raise InputError(f"{self.name}: images must be (B, 3, H, W) in [-1, 1], got {tuple(images.shape)}")
        for net in self.networks():
            net.eval()
        with torch.no_grad():
            out = self.score(self.preprocess(images.to(self.device)))
        missing = set(self.attributes) - set(out)
        if missing:
            raise RuntimeError(f"{self.name} did not return {sorted(missing)}")
        return {k: out[k].detach().float().reshape(len(images)).cpu() for k in self.attributes}


#: name -> factory(**options) -> Annotator, or a lazy ``"package.module:factory"`` entry imported on first
#: use (the built-ins: importing this package stays light, and it does not import the toy domain).
ANNOTATORS: dict[str, Callable[..., Annotator] | str] = {
    "toy": "toyfaces.annotator:ToyFaceAnnotator",
    "toy_consistency": "toyfaces.annotator:ToyConsistency",
    "clip": "annotators.clip:ClipAnnotator",
    "face_pose": "annotators.face_pose:FacePoseAnnotator",
    "celeba": "annotators.celeba:CelebAAttributes",
    "hopenet": "annotators.celeba:HopenetPose",
}


def register(name: str):
    """Class or factory decorator: make an annotator available by name."""

    def deco(factory):
        ANNOTATORS[name] = factory
        return factory

    return deco


def _import_factory(path: str, name: str) -> Callable[..., Annotator]:
    module, attr = path.split(":", 1)
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"cannot import annotator {name!r}: {e}") from None


def build_annotator(name: str, options: dict | None = None, device: str | torch.device = "cpu") -> Annotator:
    """An annotator by registered name or ``"package.module:factory"``, built with ``options``."""
    if ":" in name:
        factory = _import_factory(name, name)
    elif name in ANNOTATORS:
        factory = ANNOTATORS[name]
        if isinstance(factory, str):
            factory = _import_factory(factory, name)
    else:
        raise ConfigError(f"unknown annotator {name!r}; registered: {sorted(ANNOTATORS)} "
                          f"(or give 'package.module:factory')")
    try:
        annotator = factory(**dict(options or {}))
    except TypeError as e:
        raise ConfigError(f"bad options for annotator {name!r}: {e}") from None
    return annotator.to(device)
