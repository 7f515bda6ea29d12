"""The shared linear algebra (pipeline/methods/linalg.py) against torch.linalg and numpy's own
decompositions, batched and unbatched, in both libraries."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.methods.linalg import gram_svd, orthonormal_rows, rayleigh_ritz, top_eigh


def spectrum_rows(m: int, d: int, rank: int, seed: int = 0) -> torch.Tensor:
    """(m, d) rows of rank ``rank`` with well-separated singular values 1, 1/2, 1/4, ..."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, rank, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(d, rank, generator=g, dtype=torch.float64))[0]
    return (U * 2.0 ** -torch.arange(rank, dtype=torch.float64)) @ V.T


def assert_same_rows_up_to_sign(a: torch.Tensor, b: torch.Tensor, atol: float) -> None:
    signs = torch.sign((a * b).sum(-1, keepdim=True))
    torch.testing.assert_close(a * signs, b, atol=atol, rtol=0)


@pytest.mark.parametrize("library", ["numpy", "torch"])
def test_top_eigh_is_eigh_in_descending_order(library):
    g = torch.Generator().manual_seed(1)
    A = torch.randn(3, 6, 6, generator=g, dtype=torch.float64)
    G = A @ A.mT  # batched symmetric
    values, vectors = top_eigh(G.numpy() if library == "numpy" else G, 4)
    values, vectors = torch.as_tensor(values), torch.as_tensor(vectors)
    ref_values, ref_vectors = np.linalg.eigh(G.numpy())
    assert values.shape == (3, 4) and vectors.shape == (3, 6, 4)
    np.testing.assert_allclose(values.numpy(), ref_values[..., ::-1][..., :4], rtol=1e-12)
    assert (values[..., :-1] >= values[..., 1:]).all()
    for b in range(3):  # each column an eigenvector of its value
        torch.testing.assert_close(G[b] @ vectors[b], vectors[b] * values[b], atol=1e-10, rtol=0)
    assert top_eigh(G, None)[0].shape == (3, 6)  # k=None: all


@pytest.mark.parametrize("library", ["numpy", "torch"])
def test_gram_svd_gives_the_svd_of_the_rows_without_them(library):
    R = spectrum_rows(12, 40, rank=5)
    G = R @ R.T
    S, W = gram_svd(G.numpy() if library == "numpy" else G, 8)
    S, W = torch.as_tensor(S), torch.as_tensor(W)
    _, ref_S, ref_Vh = torch.linalg.svd(R, full_matrices=False)
    assert S.shape == (8,) and W.shape == (8, 12)
    torch.testing.assert_close(S[:5], ref_S[:5], atol=1e-12, rtol=0)
    assert (S[5:] == 0).all() and (W[5:] == 0).all()  # beyond the rank: null space, not data
    assert_same_rows_up_to_sign(W[:5] @ R, ref_Vh[:5], atol=1e-10)


def test_gram_svd_batched_and_fewer_rows_than_asked():
    R = torch.stack([spectrum_rows(4, 30, rank=4, seed=s) for s in range(3)])  # (3, 4, 30)
    S, W = gram_svd(R @ R.mT, 10)
    assert S.shape == (3, 4) and W.shape == (3, 4, 4)  # min(k, m)
    for b in range(3):
        one_S, one_W = gram_svd(R[b] @ R[b].T, 10)
        torch.testing.assert_close(S[b], one_S, atol=1e-14, rtol=0)
        V = W[b] @ R[b]
        torch.testing.assert_close(V @ V.T, torch.eye(4, dtype=V.dtype), atol=1e-10, rtol=0)


def test_orthonormal_rows_span_the_rows_in_order_with_positive_diagonal():
    g = torch.Generator().manual_seed(2)
    X = torch.randn(2, 5, 30, generator=g, dtype=torch.float64)
    Q = orthonormal_rows(X)
    assert Q.shape == X.shape and Q.is_contiguous()
    torch.testing.assert_close(Q @ Q.mT, torch.eye(5, dtype=X.dtype).expand(2, 5, 5), atol=1e-12, rtol=0)
    C = X @ Q.mT  # X = C Q with C lower triangular, positive diagonal (Gram-Schmidt in order)
    torch.testing.assert_close(C @ Q, X, atol=1e-12, rtol=0)
    torch.testing.assert_close(C, C.tril(), atol=1e-12, rtol=0)
    assert (torch.diagonal(C, dim1=-2, dim2=-1) > 0).all()
    ref = torch.linalg.qr(X[0].T)[0].T  # torch's own QR: the same rows up to sign
    assert_same_rows_up_to_sign(Q[0], ref, atol=1e-12)
    torch.testing.assert_close(orthonormal_rows(X[1]), Q[1], atol=0, rtol=0)  # batched = one by one


def test_rayleigh_ritz_on_an_invariant_subspace_is_exact_and_matches_the_projection():
    g = torch.Generator().manual_seed(3)
    d = 25
    E = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    lam = torch.linspace(10, 1, d, dtype=torch.float64)
    A = (E * lam) @ E.T  # symmetric, eigenvectors the columns of E
    Q = orthonormal_rows(torch.randn(4, 4, generator=g, dtype=torch.float64) @ E[:, :4].T)  # span of the top 4
    r = rayleigh_ritz(Q, Q @ A)
    torch.testing.assert_close(r.values, lam[:4], atol=1e-12, rtol=0)
    assert_same_rows_up_to_sign(r.vectors, E[:, :4].T, atol=1e-10)
    assert r.residual_norms.max() < 1e-10
    # a basis that is not invariant: Ritz values are the projection's eigenvalues, residuals as defined
    Q = orthonormal_rows(torch.randn(2, 6, d, generator=g, dtype=torch.float64))
    r = rayleigh_ritz(Q, Q @ A)
    ref = torch.linalg.eigvalsh(Q @ A @ Q.mT).flip(-1)
    torch.testing.assert_close(r.values, ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(r.vectors, r.coefficients.mT @ Q, atol=0, rtol=0)
    torch.testing.assert_close(r.products, r.vectors @ A, atol=1e-12, rtol=0)
    torch.testing.assert_close(r.residuals, r.vectors @ A - r.values.unsqueeze(-1) * r.vectors, atol=1e-12, rtol=0)
    torch.testing.assert_close(r.residual_norms, r.residuals.norm(dim=-1), atol=0, rtol=0)
    assert (r.values <= lam[:6] + 1e-12).all()  # Cauchy interlacing: below the true eigenvalue of each rank
