"""The sampler's schedules behind one interface (:class:`~pipeline.engine.schedules.base.Schedule`):
DDIM for DDPM-trained models (:mod:`.ddim`), the Euler step of flow matching for SD3 and FLUX
(:mod:`.flow`). The denoising loop of :class:`~pipeline.engine.model.HSpaceModel` calls only the
interface; a model's scheduler config picks the kind."""
from __future__ import annotations

from typing import Sequence

from pipeline.engine.schedules.base import Schedule, state_dtype
from pipeline.engine.schedules.ddim import DDIMSchedule
from pipeline.engine.schedules.flow import FlowMatchSchedule

__all__ = ["Schedule", "DDIMSchedule", "FlowMatchSchedule", "schedule_for", "scheduler_from_config", "state_dtype"]


def is_flow_matching(scheduler_or_config) -> bool:
    config = getattr(scheduler_or_config, "config", scheduler_or_config)
    name = type(scheduler_or_config).__name__ if hasattr(scheduler_or_config, "config") else config.get("_class_name", "")
    return str(name).startswith("FlowMatch")


def scheduler_from_config(config: dict):
    """The diffusers scheduler a model's scheduler config describes, as hspace samples with it: a
    ``FlowMatchEulerDiscreteScheduler`` for flow-matching models, else a ``DDIMScheduler`` (``clip_sample`` off)."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    if is_flow_matching(config):
        return FlowMatchEulerDiscreteScheduler.from_config(config)
    return DDIMScheduler.from_config(config, clip_sample=False)


def schedule_for(scheduler, num_steps: int, eta: float | Sequence[float] = 0.0, **options) -> Schedule:
    """The schedule of a diffusers scheduler at T = ``num_steps``; ``options``: what a family supplies
    (a flow model's ``mu``, ``sigmas``)."""
    if is_flow_matching(scheduler):
        return FlowMatchSchedule(scheduler, num_steps, eta, **options)
    return DDIMSchedule(scheduler, num_steps, eta)
