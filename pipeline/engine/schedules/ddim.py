"""DDIM (eq. 2-5 of the paper): the arithmetic as pure tensor functions, and :class:`DDIMSchedule`,
the :class:`~pipeline.engine.schedules.base.Schedule` of every DDPM-trained model.

Indices follow sampling order: step i goes from timestep ``timesteps[i]`` to the noise level of
``timesteps[i] - N // T`` (N training timesteps, T steps), or to the clean image
(``final_alpha_cumprod``) below 0, as diffusers' ``DDIMScheduler.step`` does. With the "leading"
spacing that is the next timestep of the list; with "linspace" (PixArt's scheduler) and "trailing"
it is not: the next step's prediction is then taken at its own listed timestep from a latent at
another noise level, as in diffusers. Step 0 is the first, noisiest step. a_t = sqrt(alpha_t),
b_t = sqrt(1 - alpha_t) in the notation of :mod:`pipeline.engine.schedules.base`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from pipeline.engine.schedules.base import Schedule, check_num_steps, eta_schedule
from pipeline.errors import InputError


@dataclass(frozen=True)
class DDIMCoefficients:
    """Per-step scalars, each (T,): alpha_t, alpha_{t-1} and sigma_t of eq. 2-5."""

    alpha: torch.Tensor
    alpha_prev: torch.Tensor
    sigma: torch.Tensor
    eta: torch.Tensor


def ddim_coefficients(
    alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, final_alpha_cumprod: float, eta: torch.Tensor,
    step_ratio: int,
) -> DDIMCoefficients:
    """alpha_t, alpha_prev (that of ``t - step_ratio``, or ``final_alpha_cumprod`` below 0) and sigma_t (eq. 5)."""
    acp = alphas_cumprod.to(torch.float64)
    alpha = acp[timesteps]
    prev = timesteps - int(step_ratio)
    final = torch.full_like(alpha, float(final_alpha_cumprod))
    alpha_prev = torch.where(prev >= 0, acp[prev.clamp(min=0)], final)
    sigma = eta * torch.sqrt((1 - alpha_prev) / (1 - alpha)) * torch.sqrt(1 - alpha / alpha_prev)
    return DDIMCoefficients(alpha, alpha_prev, sigma, eta)


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise InputError(f"unsupported prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def output_to_eps(output: torch.Tensor, x_t: torch.Tensor, alpha: float, prediction_type: str) -> torch.Tensor:
    """The noise prediction eps_t implied by a U-Net output of any diffusers prediction type.

    The paper's formulas (and the Jacobian of eq. 6) are in terms of eps; a v-prediction model
    (v = sqrt(a) eps - sqrt(1-a) x0) gives eps = sqrt(a) v + sqrt(1-a) x_t, an x0-prediction
    model eps = (x_t - sqrt(a) x0) / sqrt(1-a)."""
    return split_prediction(output, x_t, alpha, prediction_type)[1]


def split_prediction(output: torch.Tensor, x_t: torch.Tensor, alpha: float,
                     prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(P_t, eps_t): the predicted clean sample (eq. 3) and the noise prediction, each computed
    from the model's native output as diffusers' ``DDIMScheduler.step`` does.

    Only an eps-model's P_t divides by sqrt(alpha) (and only an x0-model's eps by sqrt(1-alpha)):
    going through eps for a v-model would divide by sqrt(alpha) ~ 5e-5 at t=999 of a cosine
    schedule, and by 0 on a zero-terminal-SNR schedule (``rescale_betas_zero_snr``).
    """
    _check_prediction_type(prediction_type)
    a, b = alpha**0.5, (1 - alpha) ** 0.5
    if prediction_type == "epsilon":
        return (x_t - b * output) / a, output
    if prediction_type == "v_prediction":
        return a * x_t - b * output, a * output + b * x_t
    return output, (x_t - a * output) / b


def predicted_x0(x_t: torch.Tensor, eps: torch.Tensor, alpha: float) -> torch.Tensor:
    """P_t of eq. 3 from x_t and a noise prediction (divides by sqrt(alpha): prefer
    :func:`split_prediction` on the model's native output)."""
    return (x_t - (1 - alpha) ** 0.5 * eps) / alpha**0.5


def ddim_step(x0: torch.Tensor, eps: torch.Tensor, alpha_prev: float, sigma: float,
              z: torch.Tensor | None = None) -> torch.Tensor:
    """x_{t-1} of eq. 2: sqrt(alpha_prev) P_t + D_t (+ sigma_t z_t).

    ``x0`` is P_t and ``eps`` drives D_t = sqrt(1 - alpha_prev - sigma^2) eps. The paper's symmetric
    injection takes both from the edited U-Net pass; Asyrp takes ``eps`` from an unedited one.
    ``z`` is the step's variance noise (needed when sigma > 0).
    """
    x = alpha_prev**0.5 * x0 + max(0.0, 1 - alpha_prev - sigma**2) ** 0.5 * eps
    if sigma > 0:
        if z is None:
            raise ValueError("a stochastic step (sigma > 0) needs its variance noise z")
        x = x + sigma * z
    return x


def ddim_inversion_step(x: torch.Tensor, eps: torch.Tensor, alpha_from: float, alpha_to: float) -> torch.Tensor:
    """One deterministic DDIM step towards more noise: from noise level alpha_from to alpha_to
    (alpha_from > 0: the clean end of the step)."""
    return alpha_to**0.5 * predicted_x0(x, eps, alpha_from) + (1 - alpha_to) ** 0.5 * eps


def solve_step_noise(x_next: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, alpha_prev: float,
                     sigma: float) -> torch.Tensor:
    """The z that makes ``ddim_step(x0, eps, alpha_prev, sigma, z)`` land exactly on ``x_next`` (edit-friendly inversion)."""
    if sigma <= 0:
        raise ValueError("step noise is only defined for stochastic steps (sigma > 0)")
    return (x_next - ddim_step(x0, eps, alpha_prev, sigma, torch.zeros_like(x0))) / sigma


class DDIMSchedule(Schedule):
    """DDIM on a DDPM-trained model: diffusers' ``DDIMScheduler`` (``clip_sample`` off) gives the
    timesteps and alpha_t; P_t and eps_t come from the native prediction (epsilon, v or sample).
    ``eta``: 0 is DDIM, 1 DDPM-like, or a list of T values."""

    def __init__(self, scheduler, num_steps: int, eta: float | Sequence[float] = 0.0):
        from diffusers import DDIMScheduler

        num_steps = check_num_steps(num_steps, scheduler.config.num_train_timesteps)
        self.scheduler = DDIMScheduler.from_config(scheduler.config, clip_sample=False)
        self.scheduler.set_timesteps(num_steps)
        self.timesteps = self.scheduler.timesteps.clone().cpu()
        self.prediction_type = self.scheduler.config.prediction_type
        if self.prediction_type not in PREDICTION_TYPES:
            raise InputError(f"unsupported prediction_type {self.prediction_type!r} in the scheduler config; "
                             f"expected one of {PREDICTION_TYPES}")
        self.eta = eta_schedule(eta, self.num_steps)

    def coefficients(self, eta: float | Sequence[float] | None = None) -> DDIMCoefficients:
        """alpha_t, alpha_{t-1} and sigma_t (eq. 5) of every step."""
        eta_t = self.eta if eta is None else eta_schedule(eta, self.num_steps)
        step_ratio = self.scheduler.config.num_train_timesteps // self.num_steps
        return ddim_coefficients(self.scheduler.alphas_cumprod, self.timesteps,
                                 float(self.scheduler.final_alpha_cumprod), eta_t, step_ratio)

    def _alpha(self, step: int) -> float:
        return float(self.scheduler.alphas_cumprod[self.timesteps[step]].double())

    def split_prediction(self, output, x_t, step):
        return split_prediction(output, x_t, self._alpha(step), self.prediction_type)

    def step(self, x0, eps, step, coef, z=None):
        return ddim_step(x0, eps, float(coef.alpha_prev[step]), float(coef.sigma[step]), z)

    def inversion_step(self, x_next, x0, eps, step):
        """DDIM inversion from eps_t alone: P_t recomputed from x_next (x_t = a_t P_t + b_t eps_t)."""
        coef = self.coefficients(0.0)
        return ddim_inversion_step(x_next, eps, float(coef.alpha_prev[step]), float(coef.alpha[step]))

    def add_noise(self, x0, noise, coef):
        a = coef.alpha.to(torch.float32).to(x0.device).view(1, -1, *[1] * (x0.ndim - 1))
        return a.sqrt() * x0.float()[:, None] + (1 - a).sqrt() * noise

    def solve_step_noise(self, x_next, x0, eps, step, coef):
        return solve_step_noise(x_next, x0, eps, float(coef.alpha_prev[step]), float(coef.sigma[step]))
