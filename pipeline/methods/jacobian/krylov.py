"""The default solver (``method="krylov"``): block Lanczos on ``J^T J`` with Rayleigh-Ritz, locking
and thick restarts (see the package docstring for why it is the default)."""
from __future__ import annotations

import torch

from pipeline.methods.jacobian.basis import (
    DEFAULT_MAX_ITER,
    DEFAULT_TOL,
    TopSingular,
    _gaussian,
    _start_block,
    _state_kwargs,
    _times_J,
    _times_JT,
    orthonormal_complement,
    ritz,
)


def block_krylov(ops, k: int, block: int, *, tol: float = DEFAULT_TOL, max_iter: int = DEFAULT_MAX_ITER,
                 init: torch.Tensor | None = None, generator: torch.Generator | None = None,
                 max_basis: int | None = None) -> TopSingular:
    """Block Lanczos on J^T J with Rayleigh-Ritz, locking and thick restarts.

    The basis Q starts from ``init`` (all its rows, e.g. a neighbouring step's V) topped up with
    Gaussian rows to ``block``; each iteration adds ``block`` new orthonormal rows: the residuals
    ``J^T J v - s^2 v`` of the unconverged top-k Ritz pairs (then of the next pairs, as guards),
    which span the block-Krylov continuation. ``J Q`` and ``J^T J Q`` are kept, so Ritz values,
    vectors, left vectors and residuals need no extra products; past ``max_basis`` rows the basis
    is rotated onto its top Ritz vectors (thick restart, no products). max_iter: block products.
    """
    like = _state_kwargs(ops)
    d = ops.d_in
    max_basis = min(d, max_basis or max(k + 2 * block, 24 * block, 3 * k))
    Q = _start_block(init, block, d, generator, like, at_least=True)
    JQ = _times_J(ops, Q, like)
    Z = _times_JT(ops, JQ, like)
    it = 1
    while True:
        lam, A, rel = ritz(Q, Z)
        converged = bool((rel[:k] < tol).all())
        if converged or it >= max_iter:
            break
        todo = [i for i in range(min(k, len(lam))) if not rel[i] < tol]
        todo += [i for i in range(k, len(lam))][: max(0, block - len(todo))]
        todo = todo[:block]
        Ai = A[:, todo]
        R = Ai.T @ Z - lam[todo][:, None] * (Ai.T @ Q)
        N = orthonormal_complement(R, Q)
        if len(N) < block:  # invariant subspace or lost directions: top up with random ones
            N = torch.cat([N, orthonormal_complement(_gaussian(block - len(N), d, generator, like), torch.cat([Q, N]))])
        if not len(N):
            break
        if len(Q) + len(N) > max_basis:                                   # thick restart
            keep = A[:, : max(k, max_basis - len(N))]
            Q, JQ, Z = keep.T @ Q, keep.T @ JQ, keep.T @ Z
        JN = _times_J(ops, N, like)
        Q, JQ, Z = torch.cat([Q, N]), torch.cat([JQ, JN]), torch.cat([Z, _times_JT(ops, JN, like)])
        it += 1
    k_ = min(k, len(lam))
    s = lam[:k_].clamp_min(0).sqrt()
    V = A[:, :k_].T @ Q
    U = (A[:, :k_].T @ JQ) / s.clamp_min(torch.finfo(s.dtype).tiny)[:, None]
    return TopSingular(s, V, U / U.norm(dim=1, keepdim=True).clamp_min(torch.finfo(U.dtype).tiny), it, converged, rel[:k_])
