"""Per-step (and joint) PCA of h-space trajectories (paper sec. 4.1) and the direction helpers built on it.

The samples dataset holds, for N samples, the bottleneck activations of every step: ``h: (N, T, D)``
(D = C*H*W). The paper takes a separate PCA of ``{h_t^(i)}_i`` at every step t and defines direction
k as the concatenation over t of the k-th component, scaled by its standard deviation. Joint
(whole-trajectory) PCA is the same with T'=1, D'=T*D.

Three methods (:class:`PCA`, ``method=``), all batched over the T steps:

- ``exact``: the (N, N) Gram matrix of the centred data of each step, eigendecomposed in float64,
  components recovered from the data (V = diag(1/s) U^T X). Holds the data (N x T x D values in
  their stored dtype) plus one (N, N) Gram at a time: for small N.
- ``randomized``: randomized subspace iteration with Rayleigh-Ritz (Halko, Martinsson & Tropp 2011,
  Algs. 4.4 and 5.1) on the scatter matrix S_t of each step. Every pass streams the data once and
  multiplies a basis of l = K + oversample rows by S_t, centred exactly by Chan et al.'s pairwise
  update (:class:`Moments`): memory O(T x D x l), never O(N). Pass 1 multiplies a Gaussian sketch;
  each later pass gives the Ritz pairs of the previous basis and their residuals, from which the
  largest principal angle of the top-K subspace is estimated (Davis-Kahan: ||R_K|| / (theta_K -
  theta_{K+1})). It stops when that estimate is below ``tol`` (or fails after ``power_iterations``).
  The passes' partial products are sums, so ranks that stream disjoint shards merge exactly
  (:func:`merge_moments`).
- ``onepass``: a one-pass truncated incremental SVD (:class:`StreamingPCA`), for a quick look: on
  flat spectra its top K can be far from the exact ones (docs/benchmarks.md).
``auto`` takes ``exact`` up to ``exact_max_samples`` samples and ``randomized`` beyond.

StreamingPCA's summary of n samples, per step t (a :class:`PCAState`):
  ``mean (T, D)``; ``S (T, q)``, ``V (T, q, D)``: the top-q singular values / right singular vectors of
  the centred data; ``ss (T,)``: the exact total sum of squared deviations (so the explained-variance
  ratio is exact even though only q components are kept).
Its update (as scikit-learn's IncrementalPCA, batched over all T steps): stack ``S V`` (q rows), the new
rows centred on *their own* mean, and the mean-correction row ``sqrt(n_a n_b / n) (mean_a - mean_b)``;
the Gram matrix of that stack equals the scatter matrix of the union, so its top-q SVD is the new
summary. The SVD is taken through the Gram trick (rows m = q + B + 1 << D), without materialising
the stack: block products V V^T, V X^T, X X^T, ... give the (T, m, m) Gram, one batched ``eigh``
gives U and S, and V' = S^-1 U^T [S V; X; c] is accumulated block by block. float64 by default: the
Gram squares the condition number. When q >= the rank of the data seen so far the update is exact
up to rounding; otherwise it truncates, and oversampling (q = K + oversample) keeps the top K closer.
Merging two summaries (multi-process runs) is the same function with ``S_b V_b`` as the new rows.
Memory: ``(q + 1) * T * D`` values of the compute dtype for the state plus, during an update, the new
V and the cast, centred chunk: ``(q + chunk) * T * D``.
"""
from __future__ import annotations

import itertools
import math
from typing import Callable, Iterable, Iterator, NamedTuple

import torch

from pipeline.errors import ConvergenceError, InputError
from pipeline.methods.signs import align_signs, largest_entry_signs

__all__ = [
    "PCAState", "NotFittedError", "init_state", "svd_update", "merge_summaries", "StreamingPCA",
    "Moments", "moments_update", "merge_moments", "gaussian_sketch", "orthonormal_rows", "RitzPairs",
    "rayleigh_ritz", "SubspaceIteration", "gram_pca", "resolve_method", "METHODS", "PCA",
    "align_signs", "adjacent_cosines", "pca_directions", "random_directions_like",
]


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


Block = tuple  # (scale: (T, r) or None, M: (T, r, D)): the rows diag(scale) @ M


def _block_gram(blocks: list[Block]) -> torch.Tensor:
    """Gram matrix of the stacked rows of ``blocks`` without stacking them: (T, m, m)."""
    rows = []
    for i, (si, Mi) in enumerate(blocks):
        row = []
        for j, (sj, Mj) in enumerate(blocks):
            if j < i:
                row.append(rows[j][i].mT)
                continue
            P = Mi @ Mj.mT  # (T, r_i, r_j)
            if si is not None:
                P = P * si.unsqueeze(-1)
            if sj is not None:
                P = P * sj.unsqueeze(-2)
            row.append(P)
        rows.append(row)
    return torch.cat([torch.cat(r, -1) for r in rows], -2)


def _eig_top(G: torch.Tensor, q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-q eigenpairs of Grams G = R R^T (T, m, m) as an SVD of R: S (T, q) descending singular
    values and W (T, q, m) with V = W R (the right singular vectors); rows beyond the numerical rank
    (and beyond m) are 0 in both."""
    T, m, _ = G.shape
    lam, U = torch.linalg.eigh(G)  # ascending
    k = min(q, m)
    lam, U = lam.flip(-1)[:, :k], U.flip(-1)[:, :, :k]
    # Eigenvalues at the Gram's rounding level are null space, not data.
    keep = lam > lam[:, :1].clamp_min(0) * (4 * m * torch.finfo(G.dtype).eps)
    s = lam.clamp_min(0).sqrt()
    S = torch.where(keep, s, torch.zeros_like(s))
    W = U.mT * torch.where(keep, 1.0 / torch.where(keep, s, torch.ones_like(s)), torch.zeros_like(s)).unsqueeze(-1)
    if k < q:
        S = torch.cat([S, S.new_zeros(T, q - k)], 1)
        W = torch.cat([W, W.new_zeros(T, q - k, m)], 1)
    return S, W


def _top_rows(blocks: list[Block], q: int, G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-q SVD of the stacked rows R of ``blocks`` (T, m, D) from their Gram G = R R^T (T, m, m):
    S (T, q) descending, V (T, q, D) = diag(1/S) U^T R; rows beyond the numerical rank are 0."""
    S, W = _eig_top(G, q)
    V, start = None, 0
    for scale, M in blocks:  # V = W R, block by block
        Wi = W[:, :, start:start + M.shape[1]]
        start += M.shape[1]
        if scale is not None:
            Wi = Wi * scale.unsqueeze(-2)
        V = Wi @ M if V is None else V.baddbmm_(Wi, M)
    return S, V


def _combine(a: PCAState, n_b: int, mean_b: torch.Tensor, scale_b: torch.Tensor | None, M_b: torch.Tensor,
             ss_b: torch.Tensor | None, q: int) -> PCAState:
    """Summary of the union of ``a`` and a disjoint set b of n_b samples with mean mean_b (T, D) whose
    scatter matrix about mean_b is R_b^T R_b, R_b = diag(scale_b) M_b (T, r, D); ss_b (T,) = its trace
    (None: trace(R_b R_b^T), exact for raw centred rows). The one code path behind both the batch
    update (R_b = centred rows) and the merge (R_b = diag(S_b) V_b, ss_b = b's exact total)."""
    if n_b == 0:
        return a
    n = a.n + n_b
    diff = mean_b - a.mean  # (T, D)
    mean = a.mean + (n_b / n) * diff
    blocks: list[Block] = [(scale_b, M_b)]
    if a.n > 0:
        w = a.n * n_b / n  # mean-correction row sqrt(w) * (mean_b - mean_a)
        blocks = [(a.S, a.V), (scale_b, M_b), (None, math.sqrt(w) * diff.unsqueeze(1))]
    G = _block_gram(blocks)
    if not bool(torch.isfinite(G).all()):
        raise InputError("h contains NaN or inf values (float16 overflow?)")
    if ss_b is None:
        r0 = a.V.shape[1] if a.n > 0 else 0
        ss_b = G[:, r0:r0 + M_b.shape[1], r0:r0 + M_b.shape[1]].diagonal(dim1=-2, dim2=-1).sum(-1)
    ss = a.ss + ss_b + (a.n * n_b / n) * diff.pow(2).sum(-1) if a.n > 0 else ss_b.clone()
    S, V = _top_rows(blocks, q, G)
    return PCAState(n, mean, S, V, ss)


def svd_update(state: PCAState, batch: torch.Tensor) -> PCAState:
    """Fold ``batch: (B, T, D)`` (any float dtype; computed in the state's dtype) into ``state``."""
    T, q, D = state.V.shape
    if batch.ndim != 3 or batch.shape[1:] != (T, D):
        raise InputError(f"batch must be (B, {T}, {D}), got {tuple(batch.shape)}")
    B = batch.shape[0]
    if B == 0:
        return state
    # one pass: cast + transpose into a contiguous (T, B, D) buffer, centred in place
    x = torch.empty((T, B, D), dtype=state.mean.dtype, device=state.mean.device)
    x.copy_(batch.transpose(0, 1))
    mean_b = x.mean(1)
    x.sub_(mean_b.unsqueeze(1))
    return _combine(state, B, mean_b, None, x, None, q)


def _check_compatible(a: PCAState, b: PCAState) -> None:
    if a.V.shape != b.V.shape:
        raise InputError(f"cannot merge PCA summaries of different shapes: (T, q, D) = "
                         f"{tuple(a.V.shape)} vs {tuple(b.V.shape)}")


def merge_summaries(a: PCAState, b: PCAState) -> PCAState:
    """Summary of the union of two summaries fitted on disjoint data (order-independent up to
    rounding and signs). Same T, q, D required; computed in ``a``'s dtype and device."""
    _check_compatible(a, b)
    b = PCAState(b.n, *(t.to(device=a.mean.device, dtype=a.mean.dtype) for t in b[1:]))
    if a.n == 0:
        return b
    return _combine(a, b.n, b.mean, b.S, b.V, b.ss, a.V.shape[1])



# ---- exact and randomized PCA: pure functions ------------------------------------------------------
METHODS = ("auto", "exact", "randomized", "onepass")


def resolve_method(method: str, n_samples: int, exact_max_samples: int) -> str:
    """``auto`` -> ``exact`` for up to ``exact_max_samples`` samples, else ``randomized``."""
    if method not in METHODS:
        raise InputError(f"PCA method must be one of {', '.join(METHODS)}, got {method!r}")
    if method != "auto":
        return method
    return "exact" if n_samples <= exact_max_samples else "randomized"


def _cast_steps(batch: torch.Tensor, dtype, device) -> torch.Tensor:
    """(B, T, D) in any float dtype -> a contiguous (T, B, D) copy in ``dtype`` on ``device``."""
    x = torch.empty((batch.shape[1], batch.shape[0], batch.shape[2]), dtype=dtype, device=device)
    x.copy_(batch.transpose(0, 1))
    return x


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
    x = _cast_steps(batch, Q.dtype, Q.device)
    mean_b = x.mean(1)
    x.sub_(mean_b.unsqueeze(1))
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


def orthonormal_rows(Z: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of the row space of Z (T, l, D), l <= D: (T, l, D) (reduced QR)."""
    return torch.linalg.qr(Z.mT)[0].mT.contiguous()


class RitzPairs(NamedTuple):
    """Rayleigh-Ritz approximation of S's top eigenpairs on a basis of l rows (pure data).

    values (T, l) descending Ritz values theta (eigenvalue estimates of S, each <= the true one);
    vectors (T, l, D) orthonormal Ritz vectors U; products (T, l, D) = U S; residuals (T, l) =
    ||S u_i - theta_i u_i||; angle (T,): the estimated largest principal angle (rad) between the top-k Ritz
    vectors and S's top-k eigenvectors, arcsin(||R_k||_2 / gap) with R_k the residuals of the top k
    (Davis-Kahan's sin-theta theorem); the gap theta_k - lambda_{k+1} is estimated from below by
    theta_k - theta_{k+1} - ||r_{k+1}|| (lambda_{k+1} itself is unknown); pi/2 where that is not positive."""

    values: torch.Tensor
    vectors: torch.Tensor
    products: torch.Tensor
    residuals: torch.Tensor
    angle: torch.Tensor


def rayleigh_ritz(Q: torch.Tensor, Z: torch.Tensor, k: int) -> RitzPairs:
    """Ritz pairs of S on the orthonormal rows Q (T, l, D), given Z = Q S (T, l, D); k < l reported."""
    T, l, _ = Q.shape
    if not 0 < k < l:
        raise InputError(f"Rayleigh-Ritz needs 0 < k < l (an oversampled basis), got k={k}, l={l}")
    C = Q @ Z.mT
    theta, W = torch.linalg.eigh((C + C.mT) / 2)  # ascending
    theta, W = theta.flip(-1), W.flip(-1)
    U, SU = W.mT @ Q, W.mT @ Z
    R = SU - theta.unsqueeze(-1) * U
    res = torch.linalg.vector_norm(R, dim=-1)
    gap = theta[:, k - 1] - theta[:, k] - res[:, k]
    ratio = torch.linalg.matrix_norm(R[:, :k], ord=2) / gap
    angle = torch.where(gap > 0, torch.arcsin(ratio.clamp(0, 1)), torch.full_like(gap, math.pi / 2))
    return RitzPairs(theta, U, SU, res, angle)


class SubspaceIteration:
    """The randomized method's state between passes over the data (one pass per :meth:`update`).

    ``basis`` (T, l, D) is what the next pass multiplies by S (:func:`moments_update`): a Gaussian
    sketch for pass 1, then orthonormal rows. After pass p >= 2, ``ritz`` holds the Ritz pairs of the
    basis of pass p; the iteration is ``done`` when their estimated top-k angle is at most ``tol``
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
        self.ritz: RitzPairs | None = None
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
        self.ritz = rayleigh_ritz(self.basis, m.Z, self.k)
        self.converged = bool((self.ritz.angle <= self.tol).all())
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
        a = self.ritz.angle
        t = int(a.argmax())
        return ConvergenceError(
            f"randomized PCA did not converge: after {self.passes} passes the estimated principal angle of "
            f"the top {self.k} components is {float(a[t]):.2e} rad at step {t} (tol {self.tol:.0e}; "
            f"{int((a > self.tol).sum())} of {len(a)} steps above it). Raise pca.power_iterations or "
            f"pca.oversample, or use pca.method=exact")


def gram_pca(X: torch.Tensor, k: int, *, dtype=torch.float64, device=None, block_elements: int = 1 << 24) -> PCAState:
    """Exact top-k PCA of X: (N, T, D) (any float dtype) through the (N, N) Gram of each step.

    Per step: the mean and the centred Gram G = X_c X_c^T in ``dtype`` (float64 by default),
    accumulated over column blocks of about ``block_elements`` values; ``eigh(G)`` gives U and s^2;
    the components V = diag(1/s) U^T X_c are recovered from the data. Memory beyond X: one (N, N)
    Gram and one cast column block. Components beyond the data's rank are 0."""
    if X.ndim != 3:
        raise InputError(f"X must be (N, T, D), got shape {tuple(X.shape)}")
    N, T, D = X.shape
    if N == 0:
        raise InputError("no samples")
    cols = max(1, block_elements // N)
    z = dict(dtype=dtype, device=device)
    mean, ss = torch.zeros(T, D, **z), torch.zeros(T, **z)
    S, V = torch.zeros(T, k, **z), torch.zeros(T, k, D, **z)
    blocks = [(c, min(D, c + cols)) for c in range(0, D, cols)]
    for t in range(T):
        G = torch.zeros(N, N, **z)
        for c0, c1 in blocks:
            x = X[:, t, c0:c1].to(**z)
            mean[t, c0:c1] = x.mean(0)
            x -= mean[t, c0:c1]
            ss[t] += x.pow(2).sum()
            G.addmm_(x, x.T)
        if not bool(torch.isfinite(G).all()):
            raise InputError("h contains NaN or inf values (float16 overflow?)")
        s, W = _eig_top(G.unsqueeze(0), k)  # (1, k), (1, k, N)
        S[t] = s[0]
        for c0, c1 in blocks:
            V[t, :, c0:c1] = W[0] @ (X[:, t, c0:c1].to(**z) - mean[t, c0:c1])
    return PCAState(N, mean, S, V, ss)


# ---- estimators --------------------------------------------------------------------------------------
class _FittedPCA:
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
            raise NotFittedError(f"this StreamingPCA has seen {n} samples; it needs at least {min_n}")
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



class StreamingPCA(_FittedPCA):
    """Per-timestep (or joint) PCA of h trajectories fed in batches, scikit-learn style.

    ``partial_fit(h)`` with h: (B, T, D) or (B, T, C, H, W) (trailing dims are flattened), any float
    dtype. Keeps q = n_components + oversample components internally (default oversample =
    n_components, which more than halves the principal-angle error on slowly decaying spectra;
    docs/benchmarks.md), reports the top K.
    dtype: compute/accumulation dtype (float64 default; float32 is faster and its rounding error
    is far below the truncation error of such spectra). device: where the state
    lives (e.g. "cuda"); batches are moved there chunk by chunk.
    Fitted attributes (per step; joint mode: T'=1, D'=T*D): ``mean_ (T, D)``, ``components_ (T, K, D)``,
    ``explained_variance_ (T, K)`` (ddof=1), ``explained_variance_ratio_ (T, K)`` (of the exact total
    variance), ``singular_values_ (T, K)``, ``total_variance_ (T,)``,
    ``n_samples_seen_``. ``merge(other)`` folds in an estimator fitted on disjoint data.
    """

    def __init__(self, n_components: int = 25, *, oversample: int | None = None, joint: bool = False,
                 dtype: torch.dtype = torch.float64, device=None, chunk_size: int | None = None):
        if oversample is None:
            oversample = n_components
        if n_components < 1 or oversample < 0:
            raise InputError(f"need n_components >= 1 and oversample >= 0, got {n_components}, {oversample}")
        if not dtype.is_floating_point:
            raise InputError(f"compute dtype must be floating point, got {dtype}")
        self.n_components = int(n_components)
        self.oversample = int(oversample)
        self.joint = bool(joint)
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        q = self.n_components + self.oversample
        # Per-sample cost ~ (q + B)^2 / B * D per step, flat around B ~ q..4q; bigger chunks use more memory.
        self.chunk_size = int(chunk_size) if chunk_size else max(64, 2 * q)
        self.state: PCAState | None = None
        self.n_steps_: int | None = None         # T of the input trajectories (also in joint mode)
        self.feature_shape_: tuple[int, ...] | None = None  # e.g. (C, H, W)

    @property
    def n_kept(self) -> int:
        """q: components kept internally."""
        return self.n_components + self.oversample

    # ---- fitting -------------------------------------------------------------------------------
    def partial_fit(self, h: torch.Tensor) -> "StreamingPCA":
        """Fold in a batch ``h: (B, T, D)`` (or (B, T, C, H, W)); processed in chunks of chunk_size."""
        x = self._as_steps(h)
        if self.state is None:
            self.state = init_state(x.shape[1], x.shape[2], self.n_kept, self.dtype, self.device)
        for chunk in x.tensor_split(max(1, -(-x.shape[0] // self.chunk_size))):  # near-equal chunks
            self.state = svd_update(self.state, chunk)
        return self

    def fit(self, batches: Iterable[torch.Tensor] | torch.Tensor) -> "StreamingPCA":
        """Fit from scratch on one tensor ``(N, T, D)`` or an iterable of batches."""
        self.state, self.n_steps_, self.feature_shape_ = None, None, None
        for h in ([batches] if isinstance(batches, torch.Tensor) else batches):
            self.partial_fit(h)
        return self

    def merge(self, other: "StreamingPCA") -> "StreamingPCA":
        """Fold in an estimator fitted on disjoint data (e.g. another process's); returns self."""
        if not isinstance(other, StreamingPCA):
            raise InputError(f"can only merge a StreamingPCA, got {type(other).__name__}")
        cfg = lambda p: (p.n_components, p.oversample, p.joint)  # noqa: E731
        if cfg(self) != cfg(other):
            raise InputError(f"cannot merge PCAs with different (n_components, oversample, joint): "
                             f"{cfg(self)} vs {cfg(other)}")
        if other.state is None or other.state.n == 0:
            return self
        if self.state is None:
            self.n_steps_, self.feature_shape_ = other.n_steps_, other.feature_shape_
            self.state = PCAState(other.state.n, *(t.to(device=self.device, dtype=self.dtype)
                                                   for t in other.state[1:]))
            return self
        if (self.n_steps_, math.prod(self.feature_shape_)) != (other.n_steps_, math.prod(other.feature_shape_)):
            raise InputError(f"cannot merge PCAs of T={self.n_steps_}, D={math.prod(self.feature_shape_)} "
                             f"and T={other.n_steps_}, D={math.prod(other.feature_shape_)}")
        self.state = merge_summaries(self.state, other.state)
        return self

    # ---- (de)serialisation ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only (for torch.distributed gathers or safetensors); see :meth:`from_state_dict`."""
        d = {"n_components": torch.tensor(self.n_components), "oversample": torch.tensor(self.oversample),
             "joint": torch.tensor(int(self.joint)), "n_samples_seen": torch.tensor(0)}
        if self.state is not None:
            s = self.state
            d.update(n_samples_seen=torch.tensor(s.n), n_steps=torch.tensor(self.n_steps_),
                     feature_shape=torch.tensor(self.feature_shape_, dtype=torch.int64),
                     mean=s.mean, singular_values=s.S, components=s.V, sum_squares=s.ss)
        return d

    @classmethod
    def from_state_dict(cls, d: dict[str, torch.Tensor], *, device=None, chunk_size=None) -> "StreamingPCA":
        """Rebuild an estimator from :meth:`state_dict` (dtype taken from the stored tensors)."""
        try:
            dtype = d["mean"].dtype if "mean" in d else torch.float64
            p = cls(int(d["n_components"]), oversample=int(d["oversample"]), joint=bool(int(d["joint"])),
                    dtype=dtype, device=device, chunk_size=chunk_size)
            if "mean" in d:
                p.n_steps_ = int(d["n_steps"])
                p.feature_shape_ = tuple(int(v) for v in d["feature_shape"].reshape(-1).tolist())
                st = PCAState(int(d["n_samples_seen"]), d["mean"], d["singular_values"], d["components"],
                              d["sum_squares"])
                st = PCAState(st.n, *(t.to(p.device) for t in st[1:]))
        except KeyError as e:
            raise InputError(f"not a StreamingPCA state dict: missing {e}") from None
        if "mean" in d:
            T, D = st.mean.shape
            if st.V.shape != (T, p.n_kept, D) or st.S.shape != (T, p.n_kept) or st.ss.shape != (T,):
                raise InputError(f"inconsistent StreamingPCA state dict: mean {tuple(st.mean.shape)}, "
                                 f"components {tuple(st.V.shape)}, singular values {tuple(st.S.shape)}")
            p.state = st
        return p



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


class PCA(_FittedPCA):
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
        if n_components < 1 or oversample < 0 or power_iterations < 0 or not tol > 0 or chunk_size < 1:
            raise InputError(f"need n_components >= 1, oversample >= 0, power_iterations >= 0, tol > 0 and "
                             f"chunk_size >= 1, got {n_components}, {oversample}, {power_iterations}, {tol}, {chunk_size}")
        if not dtype.is_floating_point:
            raise InputError(f"compute dtype must be floating point, got {dtype}")
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
        it, held, n = batches(), [], 0
        if self.method in ("auto", "exact"):
            for b in it:
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
        first = itertools.chain(held, (self._as_steps(b) for b in it))
        si: SubspaceIteration | None = None
        while si is None or not si.done:
            acc = None
            for b in (first if si is None else (self._as_steps(b) for b in batches())):
                for chunk in b.split(self.chunk_size):
                    if si is None:
                        si = SubspaceIteration(chunk.shape[1], chunk.shape[2], self.n_components,
                                               self.n_components + self.oversample, tol=self.tol,
                                               max_passes=self.power_iterations + 2, seed=self.seed,
                                               dtype=self.dtype, device=self.device)
                    acc = moments_update(acc, chunk, si.basis)
            first = held = it = None
            if acc is None:
                raise InputError("no samples")
            si.update(acc)
        self._set(si.state(), "randomized", si.passes, si.ritz.angle, si.converged)
        if not si.converged:
            raise si.error()
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


# ---- direction helpers ----------------------------------------------------------------------------
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

