"""What every PCA estimator of this package fits and reports: the summary (:class:`PCAState`), the
fitted attributes and their use (:class:`FittedPCA`), and the directions built from components.

Shapes, per step t (joint mode: T'=1, D'=T*D): ``mean (T, D)``; ``S (T, q)``, ``V (T, q, D)``: the
top-q singular values / right singular vectors of the centred data; ``ss (T,)``: the exact total
sum of squared deviations (so the explained-variance ratio is exact even where only q components
are kept).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from pipeline.errors import InputError
from pipeline.methods.signs import align_signs, largest_entry_signs


class NotFittedError(InputError, AttributeError):
    """A fitted attribute was read before any sample was seen (or with too few samples)."""


class PCAState(NamedTuple):
    """Streaming PCA summary of ``n`` samples (pure data, no behaviour).

    n: samples seen; mean: (T, D); S: (T, q) descending singular values of the centred data
    (0 beyond its rank); V: (T, q, D) right singular vectors (orthonormal rows, zero rows where S == 0);
    ss: (T,) total sum of squared deviations from ``mean`` (exact, not truncated).
    """

    n: int
    mean: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor
    ss: torch.Tensor


def init_state(T: int, D: int, q: int, dtype=torch.float64, device=None) -> PCAState:
    """The summary of zero samples: (T, D) features, q kept components."""
    if min(T, D, q) < 1:
        raise InputError(f"need T, D, q >= 1, got T={T}, D={D}, q={q}")
    z = dict(dtype=dtype, device=device)
    return PCAState(0, torch.zeros(T, D, **z), torch.zeros(T, q, **z), torch.zeros(T, q, D, **z),
                    torch.zeros(T, **z))


def check_parameters(n_components: int, oversample: int, dtype: torch.dtype, **more: tuple) -> None:
    """The estimators' parameter checks, one message for all: n_components >= 1, oversample >= 0, a
    float compute dtype, and ``more``: {name: (value, condition, holds)}, e.g.
    tol=(tol, "tol > 0", tol > 0)."""
    checks = {"n_components": (n_components, "n_components >= 1", n_components >= 1),
              "oversample": (oversample, "oversample >= 0", oversample >= 0), **more}
    failed = [f"{name}={value}" for name, (value, _, holds) in checks.items() if not holds]
    if failed:
        raise InputError(f"need {', '.join(c for _, c, _ in checks.values())}; got {', '.join(failed)}")
    if not dtype.is_floating_point:
        raise InputError(f"compute dtype must be floating point, got {dtype}")


def centred_steps(batch: torch.Tensor, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """batch (B, T, D) in any float dtype -> (x, mean): x (T, B, D) a contiguous copy in ``dtype`` on
    ``device``, centred in place on its own mean (T, D)."""
    x = torch.empty((batch.shape[1], batch.shape[0], batch.shape[2]), dtype=dtype, device=device)
    x.copy_(batch.transpose(0, 1))
    mean = x.mean(1)
    x.sub_(mean.unsqueeze(1))
    return x, mean


class FittedPCA:
    """Input checks and fitted attributes shared by the estimators: subclasses set ``state``
    (a :class:`PCAState` whose first ``n_components`` rows are the result), ``n_steps_``,
    ``feature_shape_``, and have ``n_components``, ``joint``, ``dtype``, ``device``."""

    state: PCAState | None = None
    n_steps_: int | None = None  # T of the input trajectories (also in joint mode)
    feature_shape_: tuple[int, ...] | None = None  # e.g. (C, H, W)

    def _as_steps(self, h: torch.Tensor) -> torch.Tensor:
        """(B, T, *feature) -> (B, T', D') in the layout the state uses; checks consistency."""
        if not isinstance(h, torch.Tensor):
            raise InputError(f"h must be a torch.Tensor, got {type(h).__name__}")
        if h.ndim < 3:
            raise InputError(f"h must be (B, T, D) or (B, T, C, H, W), got shape {tuple(h.shape)}")
        if not (h.dtype.is_floating_point):
            raise InputError(f"h must be a float tensor, got {h.dtype}")
        T, feat = h.shape[1], tuple(h.shape[2:])
        if self.n_steps_ is None:
            self.n_steps_, self.feature_shape_ = T, feat
        elif (T, math.prod(feat)) != (self.n_steps_, math.prod(self.feature_shape_)):
            raise InputError(f"h has T={T}, D={math.prod(feat)} but this PCA was fitted on "
                             f"T={self.n_steps_}, D={math.prod(self.feature_shape_)}")
        h = h.reshape(h.shape[0], T, -1)
        return h.reshape(h.shape[0], 1, -1) if self.joint else h

    # ---- fitted attributes ----------------------------------------------------------------------
    def _fitted(self, min_n: int = 1) -> PCAState:
        if self.state is None or self.state.n < min_n:
            n = 0 if self.state is None else self.state.n
            raise NotFittedError(f"this {type(self).__name__} has seen {n} samples; it needs at least {min_n}")
        return self.state

    @property
    def n_samples_seen_(self) -> int:
        return 0 if self.state is None else self.state.n

    @property
    def mean_(self) -> torch.Tensor:
        """(T, D)"""
        return self._fitted().mean

    @property
    def components_(self) -> torch.Tensor:
        """(T, K, D) orthonormal rows (zero rows beyond the data's rank), descending variance.
        Signs as sklearn's svd_flip: the largest-|.| entry of each row is positive."""
        V = self._fitted().V[:, : self.n_components]
        return V * largest_entry_signs(V)

    @property
    def singular_values_(self) -> torch.Tensor:
        """(T, K) of the centred data."""
        return self._fitted().S[:, : self.n_components]

    @property
    def explained_variance_(self) -> torch.Tensor:
        """(T, K) sample variance along each component, ddof=1."""
        st = self._fitted(2)
        return st.S[:, : self.n_components].pow(2) / (st.n - 1)

    @property
    def total_variance_(self) -> torch.Tensor:
        """(T,) exact total sample variance (trace of the covariance, ddof=1)."""
        st = self._fitted(2)
        return st.ss / (st.n - 1)

    @property
    def explained_variance_ratio_(self) -> torch.Tensor:
        """(T, K) explained_variance_ / total_variance_ (exact denominator)."""
        st = self._fitted(2)
        return st.S[:, : self.n_components].pow(2) / st.ss.clamp_min(torch.finfo(st.ss.dtype).tiny).unsqueeze(-1)

    # ---- using the fit --------------------------------------------------------------------------
    def transform(self, h: torch.Tensor) -> torch.Tensor:
        """Scores: h: (B, T, D) -> (B, T', K) (T' = 1 in joint mode)."""
        st = self._fitted()
        if h.ndim < 3 or (h.shape[1], math.prod(h.shape[2:])) != (self.n_steps_, math.prod(self.feature_shape_)):
            raise InputError(f"h must be (B, {self.n_steps_}, {math.prod(self.feature_shape_)}), got {tuple(h.shape)}")
        x = h.reshape(h.shape[0], 1 if self.joint else h.shape[1], -1).to(device=self.device, dtype=self.dtype)
        return torch.einsum("btd,tkd->btk", x - st.mean, self.components_)

    def directions(self, *, align: str | None = "chain", dtype=torch.float32) -> torch.Tensor:
        """Directions (K, T, D), each one standard deviation along its component at every step
        (scale 1 = 1 std). Per-step mode aligns the signs across steps (see :func:`pipeline.methods.signs.align_signs`);
        joint mode splits the one trajectory-long component into its T steps."""
        comps, var = self.components_, self.explained_variance_
        if self.joint:
            d = pca_directions(comps, var)  # (K, 1, T*D)
            return d.reshape(self.n_components, self.n_steps_, -1).to(dtype)
        if align is not None:
            comps = align_signs(comps, method=align)
        return pca_directions(comps, var).to(dtype)


def adjacent_cosines(components: torch.Tensor) -> torch.Tensor:
    """|cos| between component k at steps t and t+1: components (T, K, D) -> (T-1, K). Values near 0
    flag steps where the sign alignment (or the identity of component k) is ambiguous."""
    if components.ndim != 3:
        raise InputError(f"components must be (T, K, D), got shape {tuple(components.shape)}")
    c = torch.nn.functional.normalize(components, dim=-1)
    return (c[1:] * c[:-1]).sum(-1).abs()


def pca_directions(components: torch.Tensor, explained_variance: torch.Tensor) -> torch.Tensor:
    """Direction k at step t = std_{k,t} * u_{k,t}: components (T, K, D), explained_variance (T, K)
    -> (K, T, D). Scale 1 moves h_t by one standard deviation along the component."""
    if components.ndim != 3 or explained_variance.shape != components.shape[:2]:
        raise InputError(f"need components (T, K, D) and explained_variance (T, K), got "
                         f"{tuple(components.shape)} and {tuple(explained_variance.shape)}")
    std = explained_variance.clamp_min(0).sqrt().to(components.dtype)
    return (components * std.unsqueeze(-1)).transpose(0, 1).contiguous()


def random_directions_like(directions: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gaussian random directions with the same norm as ``directions`` at every (k, t) (the paper's
    Fig. 6 baseline). directions: (K, T, D) or (K, T, C, H, W) -> same shape and dtype."""
    if directions.ndim < 3:
        raise InputError(f"directions must be (K, T, D) or (K, T, C, H, W), got {tuple(directions.shape)}")
    d = directions.float()
    dev = generator.device if generator is not None else d.device
    g = torch.randn(d.shape, generator=generator, dtype=torch.float32, device=dev).to(d.device)
    dims = tuple(range(2, d.ndim))
    norm_d = torch.linalg.vector_norm(d, dim=dims, keepdim=True)
    norm_g = torch.linalg.vector_norm(g, dim=dims, keepdim=True)
    return (g * (norm_d / norm_g)).to(directions.dtype)
