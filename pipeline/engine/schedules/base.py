"""What the denoising loop needs of a schedule, whatever kind it is (DDIM, flow matching).

Notation (paper eq. 2-5; step i runs in sampling order from the noise level of ``timesteps[i]`` to
the next one, the clean sample after the last step). Every schedule writes x_t as

    x_t = a_t P_t + b_t eps_t        DDIM: a_t = sqrt(alpha_t), b_t = sqrt(1 - alpha_t)
                                     flow matching: a_t = 1 - s_t, b_t = s_t

and splits the denoiser's native output (eps, v, x_0 or a flow velocity) into P_t, the predicted
clean sample (eq. 3), and eps_t, the predicted noise, such that this holds at the step's own level.
The step is eq. 2, x_{t-1} = a_{t-1} P_t + D_t (+ sigma_t z_t), D_t = sqrt(b_{t-1}^2 - sigma_t^2) eps_t:
the paper's symmetric injection takes P_t and eps_t from the edited pass, Asyrp eps_t from an unedited
one. Inverting a deterministic step solves the same equation for x_t given the prediction.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import torch

from pipeline.errors import InputError


def state_dtype(device: torch.device) -> torch.dtype:
    """The sampler's arithmetic within a step (P_t, D_t, x_{t-1}): float64, so that a step adds one
    float32 rounding (x_t is kept in float32 between steps, as ``.latents`` stores it) to the
    denoiser's; float32 where the device has no float64 (mps)."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def eta_schedule(eta: float | Sequence[float], num_steps: int) -> torch.Tensor:
    """A scalar eta or a list of T values -> (T,) float64 tensor, checked."""
    if isinstance(eta, (int, float)) and not isinstance(eta, bool):
        values = [float(eta)] * num_steps
    else:
        try:
            values = [float(e) for e in eta]
        except (TypeError, ValueError):
            raise InputError(f"eta must be a number or a list of numbers, got {eta!r}") from None
        if len(values) != num_steps:
            raise InputError(
                f"eta has {len(values)} values but there are {num_steps} sampling steps; "
                f"give one eta per step or a single number"
            )
    out = torch.tensor(values, dtype=torch.float64)
    if (out < 0).any() or not torch.isfinite(out).all():
        raise InputError(f"eta values must be finite and >= 0, got {values}")
    return out


def check_num_steps(num_steps, num_train_timesteps: int) -> int:
    if int(num_steps) < 1 or num_steps > num_train_timesteps:
        raise InputError(f"num_inference_steps must be in 1..{num_train_timesteps}, got {num_steps}")
    return int(num_steps)


class Schedule(ABC):
    """The sampler's per-step arithmetic; one instance per model and number of steps T.

    ``timesteps`` (T,): the denoiser's time input at each step; ``eta`` (T,): the model's default
    stochasticity; ``scheduler``: the diffusers scheduler it was built from (provenance)."""

    timesteps: torch.Tensor
    eta: torch.Tensor
    scheduler: object

    @property
    def num_steps(self) -> int:
        """T, the number of sampling steps."""
        return len(self.timesteps)

    @abstractmethod
    def coefficients(self, eta: float | Sequence[float] | None = None):
        """Per-step scalars for ``eta`` (None: the schedule's); every kind has ``.sigma`` (T,), the
        step noise's scale (0 where a step is deterministic)."""

    @abstractmethod
    def split_prediction(self, output: torch.Tensor, x_t: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(P_t, eps_t) from the denoiser's native output at step index ``step``."""

    @abstractmethod
    def step(self, x0: torch.Tensor, eps: torch.Tensor, step: int, coef, z: torch.Tensor | None = None) -> torch.Tensor:
        """x_{t-1} of eq. 2 from P_t (``x0``) and eps_t; ``z``: the step's noise where sigma_t > 0."""

    @abstractmethod
    def inversion_step(self, x_next: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, step: int) -> torch.Tensor:
        """x_t from the latent after the deterministic step ``step`` (``x_next``) and the prediction
        (P_t, eps_t) at the current estimate of x_t: solves ``x_next = step(P_t, eps_t)`` for x_t, exactly
        where the prediction is taken at the solution (the fixed point of :func:`ddim_inversion`)."""

    def jacobian_output(self, x0: torch.Tensor, eps: torch.Tensor, step: int) -> torch.Tensor:
        """What the Jacobian directions (Sec. 4.2, Alg. 1) differentiate with respect to h: eps_t."""
        return eps

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, coef) -> torch.Tensor:
        """x_t of every step drawn around x_0 (B, *shape) with ``noise`` (B, T, *shape) -> (B, T, *shape)
        (edit-friendly inversion: stochastic schedules only)."""
        raise InputError(f"{type(self).__name__} has no stochastic steps")

    def solve_step_noise(self, x_next: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, step: int,
                         coef) -> torch.Tensor:
        """The z that makes :meth:`step` land exactly on ``x_next`` (edit-friendly inversion)."""
        raise InputError(f"{type(self).__name__} has no stochastic steps")

    def describe(self) -> dict:
        """Provenance: the scheduler, its configuration, the timesteps and eta."""
        return {"scheduler": type(self.scheduler).__name__, "scheduler_config": dict(self.scheduler.config),
                "timesteps": self.timesteps.tolist(), "eta": self.eta.tolist()}
