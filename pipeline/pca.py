"""Streaming PCA of h-space trajectories (paper sec. 4.1) and the direction helpers built on it.

The samples dataset holds, for N samples, the bottleneck activations of every step: ``h: (N, T, D)``
(D = C*H*W). The paper takes a separate PCA of ``{h_t^(i)}_i`` at every step t and defines direction
k as the concatenation over t of the k-th component, scaled by its standard deviation. N can be large
(50,000 x T=50 x D=32,768 in the original incremental script), so the PCA here is *streaming*: batches
``h: (B, T, D)`` are folded into a summary whose size is O(q x T x D), never O(N).

Summary of n samples, per step t (a :class:`PCAState`):
  ``mean (T, D)``; ``S (T, q)``, ``V (T, q, D)``: the top-q singular values / right singular vectors of
  the centred data; ``ss (T,)``: the exact total sum of squared deviations (so the explained-variance
  ratio is exact even though only q components are kept).

Update (as scikit-learn's IncrementalPCA, batched over all T steps): stack ``S V`` (q rows), the new
rows centred on *their own* mean, and the mean-correction row ``sqrt(n_a n_b / n) (mean_a - mean_b)``;
the Gram matrix of that stack equals the scatter matrix of the union, so its top-q SVD is the new
summary. The SVD is taken through the Gram trick (rows m = q + B + 1 << D), without materialising
the stack: block products V V^T, V X^T, X X^T, ... give the (T, m, m) Gram, one batched ``eigh``
gives U and S, and V' = S^-1 U^T [S V; X; c] is accumulated block by block. float64 by default: the
Gram squares the condition number; in float64 directions down to ~1e-13 of the largest variance
are resolved (float32: ~1e-4).
When q >= the rank of the data seen so far the update is exact up to rounding; otherwise it
truncates, and oversampling (q = K + oversample, top K reported) keeps the top K accurate.
Merging two summaries (multi-process runs) is the same function with ``S_b V_b`` as the new rows.

Joint (whole-trajectory) PCA: ``StreamingPCA(joint=True)`` is the same code with T'=1, D'=T*D. Its
memory is the same O(q T D) as the per-step PCA (``V`` is ``(1, q, T*D)`` instead of ``(T, q, D)``),
and so is its compute; it keeps one Gram of ``(m, m)`` instead of T of them.
Memory, per-step or joint: ``(q + 1) * T * D`` values of the compute dtype for the state
plus, during an update, the new V and the cast, centred chunk: ``(q + chunk) * T * D``; e.g. T=50,
D=32,768, q=50, chunk=100, float64: 0.67 GB state + 2 GB peak temporaries. Pass a smaller
``chunk_size`` (or dtype=float32) to trade speed for memory.
"""
from __future__ import annotations

import math
from typing import Iterable, NamedTuple

import torch

from .errors import InputError
from .signs import align_signs, largest_entry_signs

__all__ = [
    "PCAState", "NotFittedError", "init_state", "svd_update", "merge_summaries", "StreamingPCA",
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


def _top_rows(blocks: list[Block], q: int, G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-q SVD of the stacked rows R of ``blocks`` (T, m, D) from their Gram G = R R^T (T, m, m):
    S (T, q) descending, V (T, q, D) = diag(1/S) U^T R; rows beyond the numerical rank are 0."""
    T, m, _ = G.shape
    D = blocks[0][1].shape[-1]
    lam, U = torch.linalg.eigh(G)  # ascending
    k = min(q, m)
    lam, U = lam.flip(-1)[:, :k], U.flip(-1)[:, :, :k]
    # Eigenvalues at the Gram's rounding level are null space, not data.
    keep = lam > lam[:, :1].clamp_min(0) * (4 * m * torch.finfo(G.dtype).eps)
    s = lam.clamp_min(0).sqrt()
    S = torch.where(keep, s, torch.zeros_like(s))
    W = U.mT * torch.where(keep, 1.0 / torch.where(keep, s, torch.ones_like(s)), torch.zeros_like(s)).unsqueeze(-1)
    V, start = None, 0
    for scale, M in blocks:  # V = W R, block by block
        Wi = W[:, :, start:start + M.shape[1]]
        start += M.shape[1]
        if scale is not None:
            Wi = Wi * scale.unsqueeze(-2)
        V = Wi @ M if V is None else V.baddbmm_(Wi, M)
    if k < q:
        S = torch.cat([S, S.new_zeros(T, q - k)], 1)
        V = torch.cat([V, V.new_zeros(T, q - k, D)], 1)
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


class StreamingPCA:
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
        (scale 1 = 1 std). Per-step mode aligns the signs across steps (see :func:`pipeline.signs.align_signs`);
        joint mode splits the one trajectory-long component into its T steps."""
        comps, var = self.components_, self.explained_variance_
        if self.joint:
            d = pca_directions(comps, var)  # (K, 1, T*D)
            return d.reshape(self.n_components, self.n_steps_, -1).to(dtype)
        if align is not None:
            comps = align_signs(comps, method=align)
        return pca_directions(comps, var).to(dtype)


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
