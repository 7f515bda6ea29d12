"""The one-pass method (``onepass``): a truncated incremental SVD of each step, for a quick look.

Its summary of n samples is a :class:`~pipeline.methods.pca.fitted.PCAState` of q = K + oversample
components. The update (as scikit-learn's IncrementalPCA, batched over all T steps): stack ``S V``
(q rows), the new rows centred on *their own* mean, and the mean-correction row
``sqrt(n_a n_b / n) (mean_a - mean_b)``; the Gram matrix of that stack equals the scatter matrix of
the union, so its top-q SVD is the new summary. The SVD is taken through the Gram trick
(:func:`~pipeline.methods.linalg.gram_svd`; rows m = q + B + 1 << D), without materialising the
stack: block products V V^T, V X^T, X X^T, ... give the (T, m, m) Gram, and V' = W [S V; X; c] is
accumulated block by block. float64 by default: the Gram squares the condition number. When q >=
the rank of the data seen so far the update is exact up to rounding; otherwise it truncates, and
oversampling keeps the top K closer; on flat spectra its top K can be far from the exact ones
(docs/benchmarks.md). Merging two summaries (multi-process runs) is the same function with
``S_b V_b`` as the new rows. Memory: ``(q + 1) * T * D`` values of the compute dtype for the state
plus, during an update, the new V and the cast, centred chunk: ``(q + chunk) * T * D``.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch

from pipeline.errors import InputError
from pipeline.methods.linalg import gram_svd
from pipeline.methods.pca.fitted import FittedPCA, PCAState, centred_steps, check_parameters, init_state

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
    S (T, q) descending, V (T, q, D) = diag(1/S) U^T R; rows beyond the numerical rank (and beyond m)
    are 0."""
    S, W = gram_svd(G, q)
    V, start = None, 0
    for scale, M in blocks:  # V = W R, block by block
        Wi = W[:, :, start:start + M.shape[1]]
        start += M.shape[1]
        if scale is not None:
            Wi = Wi * scale.unsqueeze(-2)
        V = Wi @ M if V is None else V.baddbmm_(Wi, M)
    missing = q - S.shape[-1]
    if missing:  # fewer rows than q
        S = torch.cat([S, S.new_zeros(S.shape[0], missing)], -1)
        V = torch.cat([V, V.new_zeros(V.shape[0], missing, V.shape[-1])], 1)
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
    x, mean_b = centred_steps(batch, state.mean.dtype, state.mean.device)
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


class StreamingPCA(FittedPCA):
    """Per-timestep (or joint) PCA of h trajectories fed in batches, scikit-learn style.

    ``partial_fit(h)`` with h: (B, T, D) or (B, T, C, H, W) (trailing dims are flattened), any float
    dtype. Keeps q = n_components + oversample components internally (default oversample =
    n_components), reports the top K. dtype: compute/accumulation dtype (float64 default; float32
    is an option: docs/benchmarks.md has both choices' accuracy and cost). device: where the state
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
        check_parameters(n_components, oversample, dtype)
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
