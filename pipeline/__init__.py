"""hspace: discover, apply and evaluate editing directions in the h-space of diffusion models.

Public API (imported lazily, so that ``import pipeline.errors`` stays cheap)::

    HSpaceModel, SampleOutput, Edit, InversionOutput  # the engine (pipeline.engine)
    load_samples, iter_samples                   # the samples dataset (pipeline.formats.samples)
    Directions, load_directions, save_directions # directions files (pipeline.formats.directions)
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "HSpaceModel": "pipeline.engine.model", "SampleOutput": "pipeline.engine.model", "Edit": "pipeline.engine.edits",
    "InversionOutput": "pipeline.engine.inversion",
    "load_samples": "pipeline.formats.samples", "iter_samples": "pipeline.formats.samples",
    "Directions": "pipeline.formats.directions", "load_directions": "pipeline.formats.directions",
    "save_directions": "pipeline.formats.directions",
    "jacobian_directions": "pipeline.methods.jacobian",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
