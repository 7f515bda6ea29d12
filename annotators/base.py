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
import inspect
from types import SimpleNamespace
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.cost import count
from pipeline.errors import ConfigError, InputError


class Annotator(abc.ABC):
    """Images in [-1, 1] -> {attribute: (B,) float32 score on the CPU}.

    Subclasses set ``attributes``, ``input_size`` ((H, W) or None to keep the size), ``mean``
    and ``std`` (per channel, applied to images scaled to [0, 1]), and implement ``score`` on
    preprocessed inputs. ``networks()`` lists the torch modules to move and put in eval mode.
    Scores are finite, but for the attributes in ``may_be_missing``, which are NaN on an image they
    cannot be read from (face_pose's geometry without a face).
    """

    name: str = "annotator"
    attributes: tuple[str, ...] = ()
    may_be_missing: tuple[str, ...] = ()
    #: scores that are class indices: attribute -> the class names (index k is classes[k])
    categorical: dict[str, tuple[str, ...]] = {}
    input_size: tuple[int, int] | None = None
    mean: Sequence[float] = (0.5, 0.5, 0.5)
    std: Sequence[float] = (0.5, 0.5, 0.5)
    device: torch.device = torch.device("cpu")

    @classmethod
    def columns(cls, options: Mapping) -> tuple[str, ...] | None:
        """The score names an instance built with ``options`` returns, known without loading any
        weights, so that the configuration is checked before work. Default: the class's
        ``attributes`` (None, "known once built", when it declares none); a class whose options
        change the names overrides this."""
        return tuple(cls.attributes) or None

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

    def __call__(self, images: torch.Tensor, sample_ids: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        """Scores of ``images``; a score that is not finite (but NaN where ``may_be_missing``) is an
        InputError naming the annotator, the attribute and the sample (``sample_ids``: the images'
        ids, else their place in the batch)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise InputError(f"{self.name}: images must be (B, 3, H, W) in [-1, 1], got {tuple(images.shape)}")
        for net in self.networks():
            net.eval()
        # scores are measurements: float32 whatever autocast the caller runs under (trainer.precision)
        with torch.no_grad(), torch.autocast(torch.device(self.device).type, enabled=False):
            out = self.score(self.preprocess(images.to(self.device)))
        count(scored=len(images))
        missing = set(self.attributes) - set(out)
        if missing:
            raise InputError(f"annotator {self.name!r} did not return {sorted(missing)}: its score() must return every "
                             f"name in its attributes")
        scores = {k: out[k].detach().float().reshape(len(images)).cpu() for k in self.attributes}
        for attr, v in scores.items():
            bad = (torch.isinf(v) if attr in self.may_be_missing else ~torch.isfinite(v)).nonzero()
            if len(bad):
                i = int(bad[0])
                which = f"sample {sample_ids[i]}" if sample_ids is not None else f"image {i} of a batch of {len(images)}"
                raise InputError(f"annotator {self.name!r} scored {attr}={float(v[i])} for {which} ({len(bad)} non-finite "
                                 f"scores in the batch): check its weights and options, or the image")
        return scores


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


def annotator_factory(name: str) -> Callable[..., Annotator]:
    """The class or factory registered as ``name``, or imported from ``"package.module:factory"``."""
    if ":" in name:
        return _import_factory(name, name)
    if name in ANNOTATORS:
        factory = ANNOTATORS[name]
        return _import_factory(factory, name) if isinstance(factory, str) else factory
    raise ConfigError(f"unknown annotator {name!r}; registered: {sorted(ANNOTATORS)} "
                      f"(or give 'package.module:factory')")


def build_annotator(name: str, options: dict | None = None, device: str | torch.device = "cpu") -> Annotator:
    """An annotator by registered name or ``"package.module:factory"``, built with ``options``."""
    factory = annotator_factory(name)
    try:
        annotator = factory(**dict(options or {}))
    except TypeError as e:
        raise ConfigError(f"bad options for annotator {name!r}: {e}") from None
    return annotator.to(device)


def declared_columns(name: str, options: Mapping | None = None) -> tuple[str, ...] | None:
    """The score names of annotator ``name`` built with ``options``, without building it (no
    weights are loaded); None when the factory does not declare them. Unknown names and option
    names the factory does not take are ConfigErrors."""
    factory = annotator_factory(name)
    options = dict(options or {})
    try:
        inspect.signature(factory).bind(**options)
    except TypeError as e:
        raise ConfigError(f"bad options for annotator {name!r}: {e} (options {sorted(options)})") from None
    except ValueError:  # no signature to check (a builtin): the build will tell
        pass
    columns = getattr(factory, "columns", None)
    return None if columns is None else columns(options)


def column_names(annotators: Mapping) -> dict[tuple[str, str], str]:
    """(config name, attribute) -> column, for annotators (anything with ``name`` and
    ``attributes``) keyed by config name; prefixed with the annotator's name only where
    attribute names collide."""
    counts: dict[str, int] = {}
    for ann in annotators.values():
        for a in ann.attributes:
            counts[a] = counts.get(a, 0) + 1
    columns = {(key, a): (a if counts[a] == 1 else f"{ann.name}.{a}") for key, ann in annotators.items()
               for a in ann.attributes}
    if len(set(columns.values())) != len(columns):
        raise ConfigError(f"annotators {list(annotators)} give clashing score names even with prefixes")
    return columns


def _missing(cfg, key: str, value, wanted: list, columns, what: str) -> None:
    missing = [a for a in wanted if a not in columns]
    if missing:
        raise ConfigError(f"{key}={value!r} in {cfg.source_of(key)}: {missing} not among the columns of {what}: "
                          f"{', '.join(columns)}")


#: the commands whose columns come from the configured annotators (annotate.annotators; a lone `hspace select`
#: reads the run's annotations file, whatever annotated it, and checks its columns itself) and scorer
COLUMNS_FROM_ANNOTATORS = ("annotate", "run", "config")
COLUMNS_FROM_SCORER = ("evaluate", "run", "config")


def check_columns(cfg, command: str = "run") -> None:
    """Check, before any work, that the attribute names the configuration asks for are among the
    columns its annotators give: for the commands that annotate (:data:`COLUMNS_FROM_ANNOTATORS`),
    select.attributes and select.balance against annotate.annotators with their options (names known,
    options accepted, no clashing columns); for those that score (:data:`COLUMNS_FROM_SCORER`),
    evaluate.attributes, own_attribute's columns and quality_score against the scorer and the quality
    annotator. The CLI calls it once, right after loading the configuration. Annotators that do not
    declare their columns (see :meth:`Annotator.columns`) are checked once built."""
    if command in COLUMNS_FROM_ANNOTATORS:
        _check_annotator_columns(cfg)
    if command in COLUMNS_FROM_SCORER:
        _check_scorer_columns(cfg)


def _check_annotator_columns(cfg) -> None:
    a = cfg.annotate
    declared = {k: declared_columns(k, a.options.get(k)) for k in a.annotators}
    if all(cols is not None for cols in declared.values()):
        columns = list(column_names({k: SimpleNamespace(name=getattr(annotator_factory(k), "name", k), attributes=cols)
                                     for k, cols in declared.items()}).values())
        what = f"annotate.annotators {list(a.annotators)}"
        sel = cfg.select
        _missing(cfg, "select.attributes", sel.attributes, list(sel.attributes), columns, what)
        _missing(cfg, "select.balance", sel.balance, [sel.balance] if sel.balance else [], columns, what)


def _check_scorer_columns(cfg) -> None:
    ev = cfg.evaluate
    scorer = declared_columns(ev.scorer, ev.scorer_options)
    if scorer is not None:
        what = f"the scorer {ev.scorer}" + (f" with {dict(ev.scorer_options)}" if ev.scorer_options else "")
        _missing(cfg, "evaluate.attributes", ev.attributes, list(ev.attributes), scorer, what)
        _missing(cfg, "evaluate.own_attribute", ev.own_attribute, list(ev.own_attribute.values()), scorer, what)
    quality = declared_columns(ev.quality, {}) if ev.quality else None
    if quality is not None and ev.quality_score not in quality:
        where = cfg.source_of("evaluate.quality_score", "evaluate.quality")
        raise ConfigError(f"evaluate.quality_score={ev.quality_score!r} in {where}: "
                          f"must be one of the columns of evaluate.quality {ev.quality}: {', '.join(quality)}")
