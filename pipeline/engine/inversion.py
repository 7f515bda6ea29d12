"""Inversion: from images back to the noise that samples them, recording h on the way.

:func:`ddim_inversion` (deterministic steps run backwards, with fixed-point iterations) works for
every schedule; :func:`edit_friendly_inversion` (Huberman-Spiegelglas et al. 2023) needs stochastic
steps (eta > 0, DDIM only). Both take the model's x_0 (B, *latent_shape) (the encoded image) and
the batch's conditioning; :meth:`HSpaceModel.invert` and :meth:`HSpaceModel.invert_ddpm` are the API.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

from pipeline.engine import noise as noise_streams
from pipeline.errors import InputError


@dataclass
class InversionOutput:
    """Result of an inversion: x_T (B, *latent_shape) and h (B, T, *h_shape) recorded on the way."""

    x_T: torch.Tensor
    h: torch.Tensor
    noise: torch.Tensor | None = None  # (B, T, *latent_shape) step noise, from edit_friendly_inversion


def ddim_inversion(model, x0: torch.Tensor, cond, fixed_point_iterations: int = 0,
                   progress: bool = False) -> InversionOutput:
    """The deterministic steps backwards, from x_0 (B, *latent_shape) up to the first sampling step.

    Step i is solved for x_i given the latent after it, x_{i+1} (:meth:`Schedule.inversion_step`);
    the denoiser for step i is evaluated on x_{i+1} (x_i is not known yet), then, with
    ``fixed_point_iterations`` k > 0, k more times on the current estimate of x_i (a fixed-point
    iteration of x_i = inverse_step(x_{i+1}, eps(x_i)), as in AIDI / ReNoise). h[:, i] is recorded
    by the last pass of step i."""
    if int(fixed_point_iterations) < 0:
        raise InputError(f"fixed_point_iterations must be >= 0, got {fixed_point_iterations}")
    T, x = model.num_steps, x0
    hs = torch.empty((len(x), T, *model.h_shape), device=model.device, dtype=model.dtype)
    for i in tqdm(reversed(range(T)), total=T, disable=not progress, desc="inverting", leave=False):
        x_next, x_i = x, x
        for _ in range(int(fixed_point_iterations) + 1):
            p0, eps = model.predict(x_i, i, cond)
            x_i = model.schedule.inversion_step(x_next, p0, eps, i)
        hs[:, i] = model.hook.h
        x = x_i
    return InversionOutput(x_T=x.float(), h=hs)


def edit_friendly_inversion(model, x0: torch.Tensor, seeds: Sequence[int], eta, cond,
                            progress: bool = False) -> InversionOutput:
    """Every x_t drawn independently around x_0 (stream "inversion" of each image's seed), then the
    step noise z_t that makes each sampling step land exactly on the next x_t."""
    seeds = [int(s) for s in seeds]
    if len(seeds) != len(x0):
        raise InputError(f"got {len(seeds)} seeds for {len(x0)} images")
    coef = model.coefficients(eta)
    if (coef.sigma[:-1] <= 0).any():
        raise InputError("edit-friendly inversion needs eta > 0 at every step but the last")
    T, schedule = model.num_steps, model.schedule
    n = noise_streams.randn(seeds, "inversion", (T, *model.latent_shape)).to(model.device)
    xs = schedule.add_noise(x0, n, coef)  # (B, T, *latent_shape): x_t entering every step
    z = torch.zeros_like(xs)
    hs = torch.empty((len(x0), T, *model.h_shape), device=model.device, dtype=model.dtype)
    for i in tqdm(range(T), disable=not progress, desc="inverting", leave=False):
        p0, eps = model.predict(xs[:, i], i, cond)
        hs[:, i] = model.hook.h
        if i < T - 1:
            z[:, i] = schedule.solve_step_noise(xs[:, i + 1], p0, eps, i, coef)
    return InversionOutput(x_T=xs[:, 0], h=hs, noise=z)
