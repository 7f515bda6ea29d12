"""The estimator behind ``hspace pca``: :class:`PCA` picks the exact, randomized or one-pass method
and reports the accuracy reached."""
from __future__ import annotations

import itertools
from typing import Callable, Iterator

import torch

from pipeline.errors import InputError
from pipeline.methods.pca.exact import gram_pca
from pipeline.methods.pca.fitted import FittedPCA, PCAState, check_parameters
from pipeline.methods.pca.incremental import StreamingPCA
from pipeline.methods.pca.randomized import SubspaceIteration, moments_update

METHODS = ("auto", "exact", "randomized", "onepass")


def resolve_method(method: str, n_samples: int, exact_max_samples: int) -> str:
    """``auto`` -> ``exact`` for up to ``exact_max_samples`` samples, else ``randomized``."""
    if method not in METHODS:
        raise InputError(f"PCA method must be one of {', '.join(METHODS)}, got {method!r}")
    if method != "auto":
        return method
    return "exact" if n_samples <= exact_max_samples else "randomized"


def _batches(X, chunk: int) -> Callable[[], Iterator[torch.Tensor]]:
    """X: a tensor (N, T, ...), a list/tuple of batches, or a zero-argument callable returning a
    fresh iterable of batches -> a callable giving one pass over the batches."""
    if isinstance(X, torch.Tensor):
        return lambda: iter(X.split(chunk))
    if isinstance(X, (list, tuple)):
        return lambda: iter(X)
    if callable(X):
        return lambda: iter(X())
    raise InputError(f"X must be a tensor, a list of batches or a callable returning batches, got {type(X).__name__}")


class PCA(FittedPCA):
    """Per-timestep (or joint) PCA of h trajectories with a stated accuracy, scikit-learn style.

    ``fit(X)``: X is a tensor (N, T, D) or (N, T, C, H, W) (trailing dims flattened), a list of such
    batches, or a zero-argument callable returning a fresh iterable of batches (one call per pass,
    e.g. a reader over the shards of a samples dataset), any float dtype.
    method: ``exact`` (Gram matrix; holds the data), ``randomized`` (subspace iteration, one
    streaming pass per multiplication, memory O(T x D x (K + oversample))), ``onepass``
    (:class:`StreamingPCA`, a quick look without an accuracy guarantee) or ``auto`` (exact up to
    ``exact_max_samples`` samples, else randomized; decided while reading the first pass).
    oversample: extra basis rows (default n_components); power_iterations: the randomized method's
    most power iterations (passes <= power_iterations + 2); tol: the randomized method's target for
    the estimated largest principal angle (rad) of the top-K subspace at every step; if it is not
    reached, ``fit`` raises :class:`~pipeline.errors.ConvergenceError` (the attributes are set).
    seed: of the Gaussian sketch. dtype: compute dtype (float64 default). chunk_size: samples cast
    to ``dtype`` at a time.
    Fitted attributes: as :class:`StreamingPCA` (``mean_``, ``components_ (T, K, D)``,
    ``explained_variance_``, ...), plus ``method_`` (the method used), ``n_passes_`` (passes over the
    data), ``angle_bound_ (T,)`` (the randomized method's estimated largest principal angle, 0 for
    exact, NaN for onepass) and ``converged_``.
    """

    def __init__(self, n_components: int = 25, *, method: str = "auto", oversample: int | None = None,
                 power_iterations: int = 40, tol: float = 1e-2, exact_max_samples: int = 2048,
                 joint: bool = False, seed: int = 0, dtype: torch.dtype = torch.float64, device=None,
                 chunk_size: int = 64):
        resolve_method(method, 0, 0)  # checks the name
        if oversample is None:
            oversample = n_components
        check_parameters(n_components, oversample, dtype,
                         power_iterations=(power_iterations, "power_iterations >= 0", power_iterations >= 0),
                         tol=(tol, "tol > 0", tol > 0), chunk_size=(chunk_size, "chunk_size >= 1", chunk_size >= 1))
        self.n_components, self.method, self.oversample = int(n_components), method, int(oversample)
        self.power_iterations, self.tol, self.exact_max_samples = int(power_iterations), float(tol), int(exact_max_samples)
        self.joint, self.seed, self.dtype, self.chunk_size = bool(joint), int(seed), dtype, int(chunk_size)
        self.device = torch.device(device) if device is not None else torch.device("cpu")

    def fit(self, X) -> "PCA":
        """Fit from scratch (see the class docstring for X); returns self."""
        self.state, self.n_steps_, self.feature_shape_ = None, None, None
        batches = _batches(X, self.chunk_size)
        if self.method == "onepass":
            sp = StreamingPCA(self.n_components, oversample=self.oversample, joint=self.joint, dtype=self.dtype,
                              device=self.device, chunk_size=self.chunk_size).fit(batches())
            self._set(sp.state, "onepass", 1, float("nan"), True, sp.n_steps_, sp.feature_shape_)
            return self
        pending, held, n = batches(), [], 0
        if self.method in ("auto", "exact"):
            for b in pending:
                held.append(self._as_steps(b))
                n += len(held[-1])
                if self.method == "auto" and n > self.exact_max_samples:
                    break
            else:
                if n == 0:
                    raise InputError("no samples")
                st = gram_pca(torch.cat(held), self.n_components, dtype=self.dtype, device=self.device)
                self._set(st, "exact", 1, 0.0, True)
                return self
        # randomized; its first pass continues where the exact attempt stopped
        first = itertools.chain(held, (self._as_steps(b) for b in pending))
        iteration: SubspaceIteration | None = None
        while iteration is None or not iteration.done:
            moments = None
            for b in (first if iteration is None else (self._as_steps(b) for b in batches())):
                for chunk in b.split(self.chunk_size):
                    if iteration is None:
                        iteration = SubspaceIteration(chunk.shape[1], chunk.shape[2], self.n_components,
                                                      self.n_components + self.oversample, tol=self.tol,
                                                      max_passes=self.power_iterations + 2, seed=self.seed,
                                                      dtype=self.dtype, device=self.device)
                    moments = moments_update(moments, chunk, iteration.basis)
            first = held = pending = None
            if moments is None:
                raise InputError("no samples")
            iteration.update(moments)
        self._set(iteration.state(), "randomized", iteration.passes, iteration.angle, iteration.converged)
        if not iteration.converged:
            raise iteration.error()
        return self

    @classmethod
    def from_state(cls, state: PCAState, n_steps: int, feature_shape: tuple[int, ...], *, method_used: str,
                   n_passes: int, angle_bound, converged: bool, **params) -> "PCA":
        """An estimator holding a result computed elsewhere (e.g. merged from several processes);
        params: the estimator's parameters."""
        p = cls(**params)
        p._set(state, method_used, n_passes, angle_bound, converged, n_steps, tuple(feature_shape))
        return p

    def _set(self, state: PCAState, method: str, n_passes: int, angle, converged: bool,
             n_steps: int | None = None, feature_shape: tuple[int, ...] | None = None) -> None:
        self.state, self.method_, self.n_passes_, self.converged_ = state, method, int(n_passes), bool(converged)
        if not isinstance(angle, torch.Tensor):
            angle = torch.full((state.mean.shape[0],), float(angle), dtype=torch.float64)
        self.angle_bound_ = angle
        if n_steps is not None:
            self.n_steps_, self.feature_shape_ = n_steps, feature_shape
