"""Flow matching (SD3, FLUX) in the paper's equations: :class:`FlowMatchSchedule`.

A rectified-flow model is trained on x_s = (1 - s) x_0 + s eps (s in [0, 1], s = 1 pure noise) to
predict the velocity v = eps - x_0. In the notation of :mod:`pipeline.engine.schedules.base`,
a_t = 1 - s and b_t = s, and the split of the native output v at x_s is

    P_t = x_s - s v,      eps_t = x_s + (1 - s) v        (so x_s = (1 - s) P_t + s eps_t exactly)

The Euler step of diffusers' ``FlowMatchEulerDiscreteScheduler``, x + (s' - s) v, is then the
deterministic DDIM step (1 - s') P_t + s' eps_t: P_t, D_t = s' eps_t, Asyrp (P_t from the edited
pass, eps_t from the unedited one), inversion (the Euler step backwards, with the same fixed-point
iterations) and the Jacobian of the prediction carry over. ``eta`` has no meaning here (the Euler
sampler is deterministic; diffusers has no eta for it): eta > 0 is refused, and with it the
edit-friendly (DDPM) inversion, which needs stochastic steps.

The noise levels s_i are computed as that scheduler computes them (the static ``shift`` of SD3, or
FLUX's resolution-dependent ``mu`` with ``use_dynamic_shifting``, and ``shift_terminal``), in the
same float precision, and checked against it in the tests.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from pipeline.engine.schedules.base import Schedule, check_num_steps, eta_schedule
from pipeline.errors import InputError

#: FlowMatchEulerDiscreteScheduler options that change the sampler into something else: refused
UNSUPPORTED = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas", "stochastic_sampling")


@dataclass(frozen=True)
class FlowCoefficients:
    """Per-step scalars, each (T,): the noise level s of the step, s' of the next (0 after the last)
    and sigma_t = 0 (no step noise)."""

    s: torch.Tensor
    s_next: torch.Tensor
    sigma: torch.Tensor
    eta: torch.Tensor


def resolution_shift(image_seq_len: int, config) -> float:
    """FLUX's ``mu`` for an image of ``image_seq_len`` latent tokens (diffusers' ``calculate_shift``:
    linear from ``base_shift`` at ``base_image_seq_len`` tokens to ``max_shift`` at ``max_image_seq_len``)."""
    get = config.get if hasattr(config, "get") else lambda k, d: getattr(config, k, d)
    base_len, max_len = get("base_image_seq_len", 256), get("max_image_seq_len", 4096)
    base_shift, max_shift = get("base_shift", 0.5), get("max_shift", 1.15)
    m = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * m + (base_shift - m * base_len)


def _shifted(sigmas: np.ndarray, config, mu: float | None) -> np.ndarray:
    if config.use_dynamic_shifting:
        if mu is None:
            raise InputError("this flow-matching scheduler shifts its steps by the image size "
                             "(use_dynamic_shifting): the model family must give mu")
        if getattr(config, "time_shift_type", "exponential") == "linear":
            return mu / (mu + (1 / sigmas - 1))
        return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
    shift = config.shift
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flow_sigmas(config, num_steps: int, mu: float | None = None,
                sigmas: Sequence[float] | None = None) -> torch.Tensor:
    """The noise levels s_0 > ... > s_{T-1} and a final 0, (T + 1,) float32, as
    ``FlowMatchEulerDiscreteScheduler.set_timesteps(num_steps, mu=mu, sigmas=sigmas)`` makes them.
    ``sigmas``: a pipeline's own unshifted levels (FLUX: linspace(1, 1/T, T)); None: the scheduler's."""
    bad = [k for k in UNSUPPORTED if getattr(config, k, False)]
    if bad:
        raise InputError(f"the flow-matching scheduler config sets {', '.join(bad)}; hspace samples with the "
                         f"deterministic Euler (DDIM) step only")
    n = config.num_train_timesteps
    if sigmas is None:
        train = torch.from_numpy(np.linspace(1, n, n, dtype=np.float32)[::-1].copy()) / n
        if not config.use_dynamic_shifting:
            train = config.shift * train / (1 + (config.shift - 1) * train)
        s_max, s_min = train[0].item(), train[-1].item()
        levels = np.linspace(s_max * n, s_min * n, num_steps) / n
    else:
        levels = np.array(sigmas).astype(np.float32)
        if len(levels) != num_steps:
            raise InputError(f"got {len(levels)} noise levels for {num_steps} steps")
    levels = _shifted(levels, config, mu)
    terminal = getattr(config, "shift_terminal", None)
    if terminal:
        one_minus = 1 - levels
        levels = 1 - one_minus / (one_minus[-1] / (1 - terminal))
    return torch.cat([torch.from_numpy(np.asarray(levels)).to(torch.float32), torch.zeros(1, dtype=torch.float32)])


class FlowMatchSchedule(Schedule):
    """The Euler sampler of rectified-flow models as the DDIM step in the flow split (module docstring).

    scheduler: a ``FlowMatchEulerDiscreteScheduler`` (its config gives the levels); mu, sigmas: as
    :func:`flow_sigmas` (the family supplies them); timesteps: s * num_train_timesteps (float32), the
    time input of SD3's and FLUX's transformers (FLUX divides it by 1000)."""

    def __init__(self, scheduler, num_steps: int, eta: float | Sequence[float] = 0.0, *,
                 mu: float | None = None, sigmas: Sequence[float] | None = None):
        num_steps = check_num_steps(num_steps, scheduler.config.num_train_timesteps)
        self.scheduler, self.mu = scheduler, mu
        self.eta = check_eta(eta, num_steps)
        self.sigmas = flow_sigmas(scheduler.config, num_steps, mu, sigmas)  # (T + 1,) float32, as diffusers
        self.timesteps = self.sigmas[:-1] * scheduler.config.num_train_timesteps
        self._s = self.sigmas.double()

    def coefficients(self, eta: float | Sequence[float] | None = None) -> FlowCoefficients:
        eta_t = self.eta if eta is None else check_eta(eta, self.num_steps)
        return FlowCoefficients(self._s[:-1], self._s[1:], torch.zeros(self.num_steps, dtype=torch.float64), eta_t)

    def split_prediction(self, output, x_t, step):
        s = float(self._s[step])
        return x_t - s * output, x_t + (1 - s) * output

    def step(self, x0, eps, step, coef, z=None):
        s_next = float(coef.s_next[step])
        return (1 - s_next) * x0 + s_next * eps

    def inversion_step(self, x_next, x0, eps, step):
        """The Euler step backwards, x_t = x_next + (s - s') v with v = eps_t - P_t (from eps_t alone the
        first step, s = 1, would lose v: eps_t = x_t there)."""
        s, s_next = float(self._s[step]), float(self._s[step + 1])
        return x_next + (s - s_next) * (eps - x0)

    def jacobian_output(self, x0, eps, step):
        """The velocity v = eps_t - P_t: J_eps = (1 - s) J_v, so v's right singular vectors (the directions)
        are eps's at every s < 1 and their limit at the first step, s = 1, where eps_t = x_t does not depend
        on h; the singular values are v's."""
        return eps - x0

    def describe(self) -> dict:
        return {**super().describe(), "mu": self.mu, "sigmas": self.sigmas.tolist()}


def check_eta(eta, num_steps: int) -> torch.Tensor:
    """eta checked as for DDIM, then refused where > 0: flow matching has no stochastic step here."""
    out = eta_schedule(eta, num_steps)
    if (out > 0).any():
        raise InputError("eta > 0 has no meaning for a flow-matching model (SD3, FLUX): its Euler sampler is "
                         "deterministic; set model.eta=0")
    return out
