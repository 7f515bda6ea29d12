"""The exact method: per step, the (N, N) Gram matrix of the centred data, eigendecomposed in float64,
components recovered from the data. Holds the data: for small N."""
from __future__ import annotations

import torch

from pipeline.errors import InputError
from pipeline.methods.linalg import gram_svd
from pipeline.methods.pca.fitted import PCAState


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
        s, W = gram_svd(G, k)  # (k',), (k', N), k' = min(k, N)
        S[t, :len(s)] = s
        for c0, c1 in blocks:
            V[t, :len(s), c0:c1] = W @ (X[:, t, c0:c1].to(**z) - mean[t, c0:c1])
    return PCAState(N, mean, S, V, ss)
