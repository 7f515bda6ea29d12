"""The randomized method: subspace iteration with Rayleigh-Ritz on the scatter matrix S_t of each
step (Halko, Martinsson & Tropp 2011, Algs. 4.4 and 5.1), with a stated accuracy.

Every pass streams the data once and multiplies a basis of l = K + oversample rows by S_t, centred
exactly by Chan et al.'s pairwise update (:class:`Moments`): memory O(T x D x l), never O(N). Pass 1
multiplies a Gaussian sketch; each later pass gives the Ritz pairs of the previous basis and their
residuals, from which the largest principal angle of the top-K subspace is estimated
(:func:`angle_bound`, the accuracy contract). It stops when that estimate is below ``tol`` (or fails
after ``power_iterations``). The passes' partial products are sums, so ranks that stream disjoint
shards merge exactly (:func:`merge_moments`).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from pipeline.errors import ConvergenceError, InputError
from pipeline.methods.linalg import Ritz, orthonormal_rows, rayleigh_ritz
from pipeline.methods.pca.fitted import NotFittedError, PCAState, centred_steps


class Moments(NamedTuple):
    """What one pass of the randomized method sums over n samples, per step (pure data):
    n; mean (T, D); ss (T,): total sum of squared deviations from the mean; Z (T, l, D) = Q S, the
    pass's basis Q (T, l, D) times the scatter matrix S = X_c^T X_c of the samples about their mean."""

    n: int
    mean: torch.Tensor
    ss: torch.Tensor
    Z: torch.Tensor


def moments_update(acc: Moments | None, batch: torch.Tensor, Q: torch.Tensor) -> Moments:
    """Fold ``batch: (B, T, D)`` (any float dtype, cast to Q's) into ``acc`` (None: nothing yet).

    Each batch is centred on its own mean and joined by Chan et al.'s pairwise update, so the sums
    stay exact however far the data sit from the origin. ``acc.Z`` is updated in place (it is the
    pass's accumulator); the returned Moments holds it."""
    T, l, D = Q.shape
    if batch.ndim != 3 or batch.shape[1:] != (T, D):
        raise InputError(f"batch must be (B, {T}, {D}), got {tuple(batch.shape)}")
    if batch.shape[0] == 0:
        return acc
    x, mean_b = centred_steps(batch, Q.dtype, Q.device)
    if not bool(torch.isfinite(x).all()):
        raise InputError("h contains NaN or inf values (float16 overflow?)")
    b = Moments(x.shape[1], mean_b, x.pow(2).sum((1, 2)), torch.bmm(Q @ x.mT, x))  # (T,l,B) @ (T,B,D)
    return b if acc is None else merge_moments(acc, b, Q, inplace=True)


def merge_moments(a: Moments, b: Moments, Q: torch.Tensor, *, inplace: bool = False) -> Moments:
    """Moments of the union of two disjoint sets multiplied by the same basis Q (T, l, D):
    S = S_a + S_b + (n_a n_b / n) d d^T with d = mean_b - mean_a (exact). inplace: reuse a.Z."""
    if b.n == 0:
        return a
    if a.n == 0:
        return b
    n = a.n + b.n
    d = b.mean - a.mean  # (T, D)
    w = a.n * b.n / n
    Z = a.Z if inplace else a.Z.clone()
    Z.add_(b.Z).add_((Q @ d.unsqueeze(-1)) * d.unsqueeze(-2), alpha=w)  # (T, l, 1) * (T, 1, D)
    return Moments(n, a.mean + d * (b.n / n), a.ss + b.ss + w * d.pow(2).sum(-1), Z)


def gaussian_sketch(T: int, l: int, D: int, seed: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """(T, l, D) standard Gaussian rows from a CPU generator seeded with ``seed`` (the same on every
    process and device)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, l, D, generator=g, dtype=dtype).to(device)


def angle_bound(ritz: Ritz, k: int) -> torch.Tensor:
    """The accuracy contract: the estimated largest principal angle (rad) between the top-k Ritz
    vectors of ``ritz`` (..., l) and the operator's top-k eigenvectors, k < l: (...,).

    Davis-Kahan's sin-theta theorem: arcsin(||R_k||_2 / gap), R_k the residuals of the top k; the gap
    theta_k - lambda_{k+1} is estimated from below by theta_k - theta_{k+1} - ||r_{k+1}||
    (lambda_{k+1} itself is unknown); pi/2 where that is not positive."""
    l = ritz.values.shape[-1]
    if not 0 < k < l:
        raise InputError(f"the angle bound needs 0 < k < l (an oversampled basis), got k={k}, l={l}")
    theta, norms = ritz.values, ritz.residual_norms
    gap = theta[..., k - 1] - theta[..., k] - norms[..., k]
    ratio = torch.linalg.matrix_norm(ritz.residuals[..., :k, :], ord=2) / gap
    return torch.where(gap > 0, torch.arcsin(ratio.clamp(0, 1)), torch.full_like(gap, math.pi / 2))


class SubspaceIteration:
    """The randomized method's state between passes over the data (one pass per :meth:`update`).

    ``basis`` (T, l, D) is what the next pass multiplies by S (:func:`moments_update`): a Gaussian
    sketch for pass 1, then orthonormal rows. After pass p >= 2, ``ritz`` holds the Ritz pairs of the
    basis of pass p and ``angle`` (T,) their :func:`angle_bound`; the iteration is ``done`` when that
    angle is at most ``tol``
    at every step (``converged``) or after ``max_passes`` passes (not converged). Pass count as in
    Halko et al.: power_iterations q -> at most q + 2 passes.
    """

    def __init__(self, T: int, D: int, k: int, l: int, *, tol: float, max_passes: int, seed: int = 0,
                 dtype=torch.float64, device=None):
        if not 0 < k < l:
            raise InputError(f"the randomized PCA needs oversample >= 1 and k >= 1, got k={k}, l={l}")
        if max_passes < 2:
            raise InputError(f"the randomized PCA needs at least 2 passes, got {max_passes}")
        self.k, self.l, self.tol, self.max_passes = k, min(l, D), float(tol), int(max_passes)
        if self.l <= k:
            raise InputError(f"the randomized PCA needs K < D, got K={k}, D={D}; use method exact")
        self.basis = gaussian_sketch(T, self.l, D, seed, dtype, device)
        self.passes, self.done, self.converged = 0, False, False
        self.ritz: Ritz | None = None
        self.angle: torch.Tensor | None = None
        self.moments: Moments | None = None

    def update(self, m: Moments) -> bool:
        """Take the moments of one pass with ``basis``; returns ``done``."""
        if self.done:
            raise InputError("this subspace iteration is done")
        self.passes += 1
        self.moments = m
        if self.passes == 1:
            self.basis = orthonormal_rows(m.Z)
            return False
        self.ritz = rayleigh_ritz(self.basis, m.Z)
        self.angle = angle_bound(self.ritz, self.k)
        self.converged = bool((self.angle <= self.tol).all())
        self.done = self.converged or self.passes >= self.max_passes
        if not self.done:
            self.basis = orthonormal_rows(self.ritz.products)
        return self.done

    def state(self) -> PCAState:
        """The top-k result as a :class:`PCAState` (S = sqrt(theta), V = Ritz vectors)."""
        if self.ritz is None:
            raise NotFittedError("the subspace iteration has not finished two passes")
        m, r = self.moments, self.ritz
        return PCAState(m.n, m.mean, r.values[:, :self.k].clamp_min(0).sqrt(), r.vectors[:, :self.k], m.ss)

    def error(self) -> ConvergenceError:
        """The error to raise when done without converging: what was reached, what to change."""
        a = self.angle
        t = int(a.argmax())
        return ConvergenceError(
            f"randomized PCA did not converge: after {self.passes} passes the estimated principal angle of "
            f"the top {self.k} components is {float(a[t]):.2e} rad at step {t} (tol {self.tol:.0e}; "
            f"{int((a > self.tol).sum())} of {len(a)} steps above it). Raise pca.power_iterations or "
            f"pca.oversample, or use pca.method=exact")
