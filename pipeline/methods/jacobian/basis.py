"""What the solvers share on top of :mod:`pipeline.methods.linalg`: the orthonormal complement,
Rayleigh-Ritz with relative residuals, starting blocks, and the solvers' result (:class:`TopSingular`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from pipeline.methods.linalg import orthonormal_rows, rayleigh_ritz

DEFAULT_TOL = 1e-3
DEFAULT_MAX_ITER = 300
_STATE_DTYPE = torch.float64  # algorithm state (bases, Rayleigh quotients); products run in f's dtype


def orthonormal_complement(X: torch.Tensor, Q: torch.Tensor | None, rtol: float = 1e-8) -> torch.Tensor:
    """Orthonormal rows spanning the part of X (n, d) orthogonal to the orthonormal rows Q (m, d).

    Two passes of classical Gram-Schmidt against Q; rows that vanish (relative norm < rtol) are dropped.
    """
    norms = X.norm(dim=1).clamp_min(torch.finfo(X.dtype).tiny)
    X = X / norms[:, None]
    for _ in range(2):
        if Q is not None and len(Q):
            X = X - (X @ Q.T) @ Q
    keep = X.norm(dim=1) > rtol
    X = X[keep]
    if not len(X):
        return X
    B = orthonormal_rows(X)
    _, R = torch.linalg.qr(X.T)
    B = B[torch.diagonal(R).abs() > rtol]
    if Q is not None and len(Q) and len(B):
        B = B - (B @ Q.T) @ Q
        B = B / B.norm(dim=1, keepdim=True)
    return B


def ritz(Q: torch.Tensor, Z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rayleigh-Ritz for ``J^T J`` on the span of orthonormal rows Q (m, d), given Z = J^T J Q (m, d).

    Returns (lam (m,) descending Ritz values s^2, A (m, m) with Ritz vectors ``A^T Q``,
    rel_res (m,) relative residuals ``||J^T J v - lam v|| / lam``).
    """
    pairs = rayleigh_ritz(Q, Z)
    lam = pairs.values
    rel = pairs.residual_norms / lam.clamp_min(torch.finfo(lam.dtype).tiny)
    rel[lam <= 0] = math.inf
    return lam, pairs.coefficients, rel


@dataclass
class TopSingular:
    """Top-k singular triplets of J (``J v_i = s_i u_i``), rows.

    singular_values: (k,) descending; V: (k, d_in) unit right vectors; U: (k, d_out) unit left
    vectors; iterations: outer iterations; converged: every residual < tol; residuals: (k,)
    relative residuals at the last check; passes / vectors: the products' counters; fallback:
    the method that finished the search after the requested one stopped short (None: it did not).
    """

    singular_values: torch.Tensor
    V: torch.Tensor
    U: torch.Tensor
    iterations: int
    converged: bool
    residuals: torch.Tensor
    passes: dict[str, int] = field(default_factory=dict)
    vectors: dict[str, int] = field(default_factory=dict)
    fallback: str | None = None


def _state_kwargs(ops) -> dict:
    """{"device", "dtype"} of the algorithm's state (bases, Rayleigh quotients) for ``ops``."""
    dev = getattr(ops, "device", torch.device("cpu"))
    dtype = torch.float32 if torch.device(dev).type == "mps" else _STATE_DTYPE
    return {"device": dev, "dtype": dtype}


def _gaussian(n: int, d: int, generator: torch.Generator | None, like: dict) -> torch.Tensor:
    """(n, d) standard Gaussian rows drawn in float64 on the generator's device, then moved ``like``."""
    gen_dev = generator.device if generator is not None else torch.device("cpu")
    X = torch.randn(n, d, generator=generator, dtype=torch.float64, device=gen_dev)
    return X.to(**like)


def _start_block(init: torch.Tensor | None, m: int, d: int, generator, like: dict, at_least: bool = False) -> torch.Tensor:
    """Orthonormal starting rows: init's rows (first m, or all if ``at_least``), topped up with Gaussian rows to m."""
    rows = torch.zeros(0, d, **like)
    if init is not None and len(init):
        X = init.reshape(len(init), -1).to(**like)
        rows = orthonormal_complement(X if at_least else X[:m], None)
    if len(rows) < m:
        extra = orthonormal_complement(_gaussian(m - len(rows) + 2, d, generator, like), rows)[: m - len(rows)]
        rows = torch.cat([rows, extra])
    return rows


def _times_J(ops, X, like):
    """J X^T as rows: X (b, d_in) -> (b, d_out), in the state's dtype."""
    return ops.jvp(X).to(**like)


def _times_JT(ops, Y, like):
    """J^T Y^T as rows: Y (b, d_out) -> (b, d_in), in the state's dtype."""
    return ops.vjp(Y).to(**like)


def _orthonormal_left(Y: torch.Tensor) -> torch.Tensor:
    """Unit left vectors from Y ~ J V (rows), orthonormalised in order (the paper's "Orthonormalize U")."""
    return orthonormal_rows(Y)
