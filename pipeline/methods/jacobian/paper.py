"""The paper's methods and the original code's baseline, each a solver over products ``ops``
(``jvp`` / ``vjp`` / ``d_in`` / ``d_out``, e.g. a :class:`~pipeline.methods.jacobian.products.Linearization`):

- :func:`subspace_iteration`: Alg. 1 (Jacobian subspace iteration), ``method="subspace"``;
- :func:`sequential_subspace_iteration`: Alg. 2 (supp. C), mini-batches, ``method="sequential"``;
- :func:`power_deflation`: one vector at a time with deflation, ``method="deflation"``.
"""
from __future__ import annotations

import math

import torch

from pipeline.methods.jacobian.basis import (
    DEFAULT_MAX_ITER,
    DEFAULT_TOL,
    TopSingular,
    _gaussian,
    _orthonormal_left,
    _start_block,
    _state_kwargs,
    _times_J,
    _times_JT,
    orthonormal_complement,
    ritz,
)
from pipeline.methods.linalg import orthonormal_rows


def subspace_iteration(ops, k: int, *, tol: float = DEFAULT_TOL, max_iter: int = DEFAULT_MAX_ITER,
                       init: torch.Tensor | None = None, generator: torch.Generator | None = None,
                       oversample: int = 0) -> TopSingular:
    """Alg. 1 (Jacobian subspace iteration). init: (m, d_in) starting V (else Gaussian); m = k + oversample."""
    like = _state_kwargs(ops)
    m = min(k + max(0, oversample), ops.d_in)
    V = _start_block(init, m, ops.d_in, generator, like)                   # V <- QR(V)
    it, converged = 0, False
    while True:
        it += 1
        U = _times_J(ops, V, like)                                            # U <- J V (batch forward)
        Vh = _times_JT(ops, U, like)                                           # V_hat <- J^T U
        _, _, rel = ritz(V, Vh)                                           # stopping criterion on V
        A, S2, Vnew = torch.linalg.svd(Vh, full_matrices=False)            # V, Sigma^2, R <- SVD(V_hat)
        residuals = rel[:k]
        converged = bool((residuals < tol).all())
        U, V = A.T @ U, Vnew
        if converged or it >= max_iter:
            break
    s = S2[:k].clamp_min(0).sqrt()
    return TopSingular(s, V[:k], _orthonormal_left(U[:k]), it, converged, residuals)


def sequential_subspace_iteration(ops, k: int, block: int, *, tol: float = DEFAULT_TOL,
                                  max_iter: int = DEFAULT_MAX_ITER, init: torch.Tensor | None = None,
                                  generator: torch.Generator | None = None) -> TopSingular:
    """Alg. 2 (supp. C): mini-batches of ``block`` vectors, each iterated on the complement of
    the vectors already found (projector ``I - V (V^T V)^-1 V^T``). max_iter: per mini-batch."""
    like = _state_kwargs(ops)
    d = ops.d_in
    found = torch.zeros(0, d, **like)
    sig, lefts, res = [], [], []
    iters, all_converged = 0, True

    def project(X):
        if not len(found):
            return X
        G = found @ found.T
        return X - torch.linalg.solve(G, found @ X.T).T @ found

    for start in range(0, k, block):
        nb = min(block, k - start)
        theta = None if init is None or len(init) <= start else init.reshape(len(init), -1)[start:start + nb]
        Phi = _start_block(theta, nb, d, generator, like)                 # Phi <- QR(Phi)
        it = 0
        while True:
            it += 1
            if len(found):
                Phi = orthonormal_rows(project(Phi))                    # project, QR
            Psi = _times_J(ops, Phi, like)                                    # Psi <- J Phi
            Ph = _times_JT(ops, Psi, like)                                     # Phi_hat <- J^T Psi
            _, _, rel = ritz(Phi, project(Ph))                            # criterion on (I - P) J^T J (I - P)
            A, S, Phi_new = torch.linalg.svd(Ph, full_matrices=False)      # Phi, S, R <- SVD(Phi_hat)
            conv = bool((rel < tol).all())
            Psi, Phi = A.T @ Psi, Phi_new
            if conv or it >= max_iter:
                break
        iters += it
        all_converged &= conv
        found = torch.cat([found, Phi])                                   # V <- [V; Phi]
        sig.append(S.clamp_min(0).sqrt())                                 # Sigma <- diag(Sigma, S^(1/2))
        lefts.append(Psi)                                                 # U <- [U; Psi]
        res.append(rel)
    s = torch.cat(sig)
    return TopSingular(s, found, _orthonormal_left(torch.cat(lefts)), iters, all_converged, torch.cat(res))


def power_deflation(ops, k: int, *, tol: float = DEFAULT_TOL, max_iter: int = DEFAULT_MAX_ITER,
                    init: torch.Tensor | None = None, generator: torch.Generator | None = None) -> TopSingular:
    """The original code's baseline: power iteration on J^T J for one vector at a time, the
    vectors found so far projected out (deflation). max_iter: per vector."""
    like = _state_kwargs(ops)
    d = ops.d_in
    found = torch.zeros(0, d, **like)
    sig, lefts, res = [], [], []
    iters, all_converged = 0, True
    for i in range(k):
        theta = None if init is None or len(init) <= i else init.reshape(len(init), -1)[i:i + 1]
        v = orthonormal_complement(_start_block(theta, 1, d, generator, like), found)
        if not len(v):
            v = orthonormal_complement(_gaussian(1, d, generator, like), found)
        it = 0
        while True:
            it += 1
            u = _times_J(ops, v, like)
            w = _times_JT(ops, u, like)
            w = w - (w @ found.T) @ found                                 # deflate
            lam = float((v * w).sum())
            rel = float((w - lam * v).norm()) / lam if lam > 0 else math.inf
            nw = float(w.norm())
            if nw == 0:
                break
            v_new = w / nw
            u = u / max(float(u.norm()), torch.finfo(u.dtype).tiny)
            if rel < tol or it >= max_iter:
                break
            v = v_new
        iters += it
        all_converged &= rel < tol
        found = torch.cat([found, v])
        sig.append(math.sqrt(max(lam, 0.0)))
        lefts.append(u)
        res.append(rel)
    s = torch.tensor(sig, **like)
    return TopSingular(s, found, _orthonormal_left(torch.cat(lefts)), iters, all_converged, torch.tensor(res, **like))
