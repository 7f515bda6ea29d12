"""The small linear algebra the direction methods share: top eigenpairs of a symmetric matrix, the
Gram trick, orthonormal rows by QR, and Rayleigh-Ritz.

Pure functions, batched over any leading dimensions ``...``; vectors are rows (``(..., m, d)``
holds m vectors of length d). Used by PCA (:mod:`pipeline.methods.pca`: the exact Gram PCA, the
incremental update, the randomized passes), the Jacobian solvers (:mod:`pipeline.methods.jacobian`)
and the probes' feature reduction (:mod:`pipeline.methods.probes`). :func:`top_eigh` and
:func:`gram_svd` take numpy arrays as well as torch tensors and compute with the input's own
library (the probes stay in numpy, PCA and the Jacobian in torch, on any device).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:
    import torch


def _library(a):
    """numpy or torch: the library whose functions compute on ``a`` (torch imported only for a tensor, so
    that numpy callers, such as the probes' worker processes, do not pay for it)."""
    if isinstance(a, np.ndarray):
        return np
    import torch

    return torch


def top_eigh(G, k: int | None = None):
    """The top-k eigenpairs of symmetric G (..., m, m) (numpy or torch): values (..., k) descending
    and vectors (..., m, k), column i the eigenvector of value i; k=None: all m."""
    values, vectors = _library(G).linalg.eigh(G)  # ascending
    m = G.shape[-1]
    descending = list(range(m - 1, m - 1 - min(m, m if k is None else k), -1))
    return values[..., descending], vectors[..., descending]  # copies, in either library


def gram_svd(G, k: int):
    """Top-k singular values of rows R (..., m, d) from their Gram matrix G = R R^T (..., m, m),
    without R (the Gram trick): S (..., k') descending and W (..., k', m) with the right singular
    vectors V = W R (..., k', d), k' = min(k, m). Eigenvalues at the Gram's rounding level (below
    4 m eps times the largest) are null space, not data: their S and W rows are 0. Numpy or torch."""
    lib = _library(G)
    m = G.shape[-1]
    lam, U = top_eigh(G, min(k, m))
    keep = lam > lam[..., :1].clip(min=0) * (4 * m * lib.finfo(G.dtype).eps)
    S = lib.where(keep, lib.sqrt(lam.clip(min=0)), 0.0)
    inverse = lib.where(keep[..., None, :], U / lib.where(keep, S, 1.0)[..., None, :], 0.0)  # U diag(1/S)
    return S, inverse.mT


def orthonormal_rows(X: torch.Tensor) -> torch.Tensor:
    """Reduced QR of the rows: X (..., m, d), m <= d -> (..., m, d) orthonormal rows spanning the same
    space, in order (row i keeps a positive component on X's row i)."""
    import torch

    Q, R = torch.linalg.qr(X.mT)
    signs = torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))
    signs[signs == 0] = 1
    return (Q * signs.unsqueeze(-2)).mT.contiguous()


class Ritz(NamedTuple):
    """Rayleigh-Ritz approximation of a symmetric operator A's top eigenpairs on the span of l
    orthonormal rows Q (pure data).

    values (..., l): Ritz values theta, descending (each <= A's true eigenvalue of its rank);
    coefficients (..., l, l): W, column i the coordinates of Ritz vector i in Q (vectors = W^T Q);
    vectors (..., l, d): U, orthonormal; products (..., l, d): U A = W^T (Q A);
    residuals (..., l, d): U A - diag(theta) U; residual_norms (..., l): their norms."""

    values: torch.Tensor
    coefficients: torch.Tensor
    vectors: torch.Tensor
    products: torch.Tensor
    residuals: torch.Tensor
    residual_norms: torch.Tensor


def rayleigh_ritz(Q: torch.Tensor, Z: torch.Tensor) -> Ritz:
    """Rayleigh-Ritz on the orthonormal rows Q (..., l, d) given their products Z = Q A (..., l, d)
    with a symmetric A (d, d), which is never formed: the eigenpairs of the l x l projection Q A Q^T."""
    C = Q @ Z.mT
    theta, W = top_eigh((C + C.mT) / 2)
    U, UA = W.mT @ Q, W.mT @ Z
    R = UA - theta.unsqueeze(-1) * U
    return Ritz(theta, W, U, UA, R, _library(R).linalg.vector_norm(R, dim=-1))
