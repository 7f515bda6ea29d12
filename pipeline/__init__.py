"""hspace: discover, apply and evaluate editing directions in the h-space of diffusion models.

Public API (imported lazily, so that ``import pipeline.errors`` stays cheap)::

    HSpaceModel, SampleOutput, InversionOutput   # the engine (pipeline.model)
    load_samples, iter_samples                   # the samples dataset (pipeline.samples)
    Directions, load_directions, save_directions # directions files (pipeline.directions)
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "HSpaceModel": "pipeline.model", "SampleOutput": "pipeline.model", "InversionOutput": "pipeline.model",
    "load_samples": "pipeline.samples", "iter_samples": "pipeline.samples",
    "Directions": "pipeline.directions", "load_directions": "pipeline.directions",
    "save_directions": "pipeline.directions",
    "jacobian_directions": "pipeline.jacobian",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
