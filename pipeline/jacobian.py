"""Image-specific directions: top singular vectors of J_t = d eps_t(x_t, h) / d h (paper Sec. 4.2).

The right singular vectors of ``J_t`` (eq. 6-7) are the orthogonal h-space directions that
change the noise prediction, and so the predicted image P_t (supp. E, eq. 13), the most.
``J_t`` is never stored: every method only applies ``J`` and ``J^T`` to blocks of vectors.

Conventions
-----------
- vectors are **rows**: ``V: (k, d_in)`` right singular vectors, ``U: (k, d_out)`` left ones,
  ``J v_i = s_i u_i``; ``f: (b, d_in) -> (b, d_out)`` is batched (row i of the output depends
  only on row i of the input);
- signs are deterministic: each right vector's largest-|component| entry is positive (left
  vectors follow, so ``J v = s u`` keeps holding); :func:`jacobian_directions_all_steps` can
  instead align each step's vectors with the previous step's (``align=True``, its default).

Methods (``method=``)
---------------------
- ``"subspace"``: Alg. 1 as in the paper: ``V <- QR(V)``; loop ``U <- J V`` (batched
  forward-mode AD), ``V_hat <- J^T U`` (backward through the graph of ``y = f(h)``, built once),
  ``V, Sigma^2, R <- SVD(V_hat)``; finally orthonormalise ``U``. ``oversample=p`` iterates
  ``k + p`` vectors and keeps the top k (off by default, as in the paper).
- ``"sequential"``: Alg. 2 (supp. C): blocks of ``b`` vectors, each block projected onto the
  complement of the vectors already found, ``Sigma <- S^(1/2)``.
- ``"deflation"``: the original code's way: one vector at a time, power iteration on
  ``J^T J`` with the found vectors projected out. Its own stopping rule (an *absolute* 1e-5
  change of s^2, at most 50 iterations) is loose where s^2 is small (s^2 ~ 2e-4 at the first
  step of the toy model: 5% relative) and too short for flat spectra; here it uses the
  criterion below, like every method, so that the methods can be compared at equal accuracy.
- ``"krylov"`` (= ``"auto"``, the default): block Lanczos on ``J^T J`` with Rayleigh-Ritz over
  the whole basis, locking of converged pairs and thick restarts, expanding with the residuals
  of the unconverged Ritz pairs; products from one linearisation (below); block 4 by default
  (2, 3 and 4 cost about the same on CPU; larger blocks batch better on a GPU). On the flat
  spectra of these Jacobians (``s_{k+1}/s_k`` around 0.95-0.99) it needs 4-10x fewer products
  than the power methods: see ``bench/jacobian.py``.

Products (``products=``)
------------------------
``"forward"`` (paper; default of the three paper methods): ``J V`` by forward-mode AD, a fresh
batched U-Net pass per call; ``J^T U`` by backward passes through a graph of ``f`` on ``width``
copies of ``h`` built once. ``"linearized"`` (default of ``krylov``): both from that one graph:
``J^T U`` is a backward pass, ``J V`` differentiates the graph's own backward ``J^T W`` (linear in
``W``) w.r.t. ``W`` (double backward). After the one forward no U-Net forward runs; the part
of the U-Net before h (which does not depend on h) is not in the graph at all.

Stopping criterion (every method)
---------------------------------
Converged when each of the top-k Ritz pairs ``(s_i, v_i)`` of the current basis has a relative
residual ``||J^T J v_i - s_i^2 v_i|| / s_i^2 < tol``. It costs no extra products (``J^T J V`` is
computed anyway) and is scale-free (``s`` ranges over 10^-2..1 across steps). It guarantees that
``s_i^2`` lies within ``tol * s_i^2`` of an eigenvalue of ``J^T J`` (so ``s_i`` within about
``tol / 2``, relative, of a singular value; in practice quadratically better) and that ``v_i``
is within an angle of about ``tol * s_i^2 / gap`` of an eigenvector (gap: distance of
``s_i^2`` to the rest of the spectrum). Default ``tol = 1e-3``. The products run in float32, so
residuals stall around 1e-6 (5e-7 on the tests' tiny U-Net): a ``tol`` below ~1e-5 may never be
met (``max_iter`` then stops the search, ``converged=False`` and a logged warning).

Autograd context
----------------
Everything that differentiates runs inside ``torch.inference_mode(False)``,
``torch.enable_grad()`` and the math SDPA kernel (needed for forward-mode AD and double
backward through attention), and clones its inputs, so the functions can be called from
``torch.no_grad()`` or ``torch.inference_mode()`` (e.g. Lightning predict). The model itself
must have been created outside inference mode (its weights are saved for backward).
"""
from __future__ import annotations

import contextlib
import logging
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from .errors import InputError

log = logging.getLogger(__name__)

Fn = Callable[[torch.Tensor], torch.Tensor]
METHODS = ("auto", "krylov", "subspace", "sequential", "deflation")
PRODUCTS = ("forward", "linearized")
DEFAULT_METHOD = "krylov"
DEFAULT_TOL = 1e-3
DEFAULT_MAX_ITER = 300
_STATE_DTYPE = torch.float64  # algorithm state (bases, Rayleigh quotients); products run in f's dtype


# ---------------------------------------------------------------------------------------------
# autograd plumbing and products
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def autograd_context():
    """Grad on, inference mode off, math SDPA kernel (forward AD / double backward through attention)."""
    with torch.inference_mode(False), torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        yield


def _copies(h: torch.Tensor, m: int) -> torch.Tensor:
    """h: (d,) -> (m, d), a fresh (non-inference, detached) tensor."""
    return h.detach().reshape(1, -1).expand(m, -1).clone()


def _grad(out: torch.Tensor, inp: torch.Tensor, cotangent: torch.Tensor, retain: bool) -> torch.Tensor:
    if not out.requires_grad:
        return torch.zeros_like(inp)
    (g,) = torch.autograd.grad(out, inp, cotangent, retain_graph=retain, allow_unused=True)
    return torch.zeros_like(inp) if g is None else g


def jvp(f: Fn, h: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """``J V`` by forward-mode AD in one batched pass of f on k copies of h (Alg. 1 "batch forward").

    f: (b, d_in) -> (b, d_out); h: (d_in,); V: (k, d_in) -> (k, d_out).
    """
    import torch.autograd.forward_ad as fwAD

    with autograd_context(), fwAD.dual_level():
        H = _copies(h, len(V))
        out = f(fwAD.make_dual(H, V.detach().to(H.dtype).clone()))
        primal, tangent = fwAD.unpack_dual(out)
        return torch.zeros_like(primal) if tangent is None else tangent.detach().clone()


def vjp(f: Fn, h: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """``J^T U`` by one batched backward pass of f on k copies of h. U: (k, d_out) -> (k, d_in)."""
    with autograd_context():
        H = _copies(h, len(U)).requires_grad_(True)
        out = f(H)
        return _grad(out, H, U.detach().to(out.dtype).clone(), retain=False).detach()


class Linearization:
    """``J = df/dh`` at ``h`` as batched products, from one forward pass of f on ``width`` copies of h.

    ``vjp(U)``: ``J^T U`` (n, d_out) -> (n, d_in), backward passes through the retained graph.
    ``jvp(V)``: ``J V`` (n, d_in) -> (n, d_out); ``jvp_mode="double_backward"``: differentiate the
    graph's backward ``g(W) = J^T W`` w.r.t. ``W`` (no forward pass); ``"forward"``: forward-mode AD,
    a fresh batched pass of f per call. Inputs are processed in chunks of ``width`` rows (a short
    chunk is zero-padded for the graph products). ``passes`` counts batched passes by kind,
    ``vectors`` the vectors pushed through ``J`` and ``J^T``.
    """

    def __init__(self, f: Fn, h: torch.Tensor, width: int, jvp_mode: str = "double_backward"):
        if jvp_mode not in ("double_backward", "forward"):
            raise InputError(f"jvp_mode must be 'double_backward' or 'forward', got {jvp_mode!r}")
        if width < 1:
            raise InputError(f"width must be >= 1, got {width}")
        self.f, self.width, self.jvp_mode = f, int(width), jvp_mode
        with autograd_context():
            self.h = h.detach().reshape(-1).clone()
            self._H = _copies(self.h, self.width).requires_grad_(True)
            self._y = f(self._H)
        if self._y.ndim != 2 or self._y.shape[0] != self.width:
            raise InputError(f"f must map (b, d_in) to (b, d_out); got output shape {tuple(self._y.shape)} for b={self.width}")
        if not self._y.requires_grad:
            raise InputError("f(h) does not depend on h: its Jacobian is zero")
        self.d_in, self.d_out = self.h.numel(), self._y.shape[1]
        self.dtype, self.device = self._y.dtype, self._y.device
        self._W: torch.Tensor | None = None
        self._g: torch.Tensor | None = None
        self.passes = {"forward": 1, "forward_ad": 0, "backward": 0, "double_backward": 0}
        self.vectors = {"jvp": 0, "vjp": 0}

    @property
    def value(self) -> torch.Tensor:
        """f(h), (d_out,)."""
        return self._y[0].detach()

    def _chunks(self, X: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], pad: bool, d: int) -> torch.Tensor:
        with autograd_context():
            X = X.detach().to(device=self.device, dtype=self.dtype).clone()
            outs = []
            for i in range(0, len(X), self.width):
                c = X[i:i + self.width]
                n = len(c)
                if pad and n < self.width:
                    c = torch.cat([c, c.new_zeros(self.width - n, c.shape[1])])
                outs.append(fn(c)[:n].detach())
            return torch.cat(outs) if outs else X.new_zeros(0, d)

    def _vjp_chunk(self, U: torch.Tensor) -> torch.Tensor:
        self.passes["backward"] += 1
        with autograd_context():
            return _grad(self._y, self._H, U, retain=True)

    def _jvp_chunk(self, V: torch.Tensor) -> torch.Tensor:
        if self.jvp_mode == "forward":
            self.passes["forward_ad"] += 1
            return jvp(self.f, self.h, V)
        with autograd_context():
            if self._g is None:
                self._W = torch.zeros_like(self._y.detach()).requires_grad_(True)
                (self._g,) = torch.autograd.grad(self._y, self._H, self._W, create_graph=True)
                self.passes["backward"] += 1
            self.passes["double_backward"] += 1
            return _grad(self._g, self._W, V, retain=True)

    def jvp(self, V: torch.Tensor) -> torch.Tensor:
        """J V: (n, d_in) -> (n, d_out)."""
        if V.ndim != 2 or V.shape[1] != self.d_in:
            raise InputError(f"V must be (n, {self.d_in}), got {tuple(V.shape)}")
        self.vectors["jvp"] += len(V)
        return self._chunks(V, self._jvp_chunk, self.jvp_mode == "double_backward", self.d_out)

    def vjp(self, U: torch.Tensor) -> torch.Tensor:
        """J^T U: (n, d_out) -> (n, d_in)."""
        if U.ndim != 2 or U.shape[1] != self.d_out:
            raise InputError(f"U must be (n, {self.d_out}), got {tuple(U.shape)}")
        self.vectors["vjp"] += len(U)
        return self._chunks(U, self._vjp_chunk, True, self.d_in)

    def close(self) -> None:
        """Free the retained graphs."""
        self._y = self._H = self._g = self._W = None


def explicit_jacobian(f: Fn, h: torch.Tensor, width: int = 64) -> torch.Tensor:
    """The full Jacobian ``J``: (d_out, d_in), one row per output (d_out / width backward passes)."""
    lin = Linearization(f, h, width)
    try:
        return lin.vjp(torch.eye(lin.d_out, device=lin.device, dtype=lin.dtype))
    finally:
        lin.close()


# ---------------------------------------------------------------------------------------------
# small linear algebra (pure functions on row bases)
# ---------------------------------------------------------------------------------------------
def orthonormalize(X: torch.Tensor) -> torch.Tensor:
    """Reduced QR of the rows: (m, d) -> (m, d) orthonormal rows spanning the same space, in order
    (row i's direction keeps a positive component on X's row i)."""
    Q, R = torch.linalg.qr(X.T)
    s = torch.sign(torch.diagonal(R))
    s[s == 0] = 1
    return (Q * s).T.contiguous()


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
    B = orthonormalize(X)
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
    M = Q @ Z.T
    lam, E = torch.linalg.eigh((M + M.T) / 2)
    lam, E = lam.flip(0), E.flip(1)
    R = E.T @ Z - lam[:, None] * (E.T @ Q)
    rel = R.norm(dim=1) / lam.clamp_min(torch.finfo(lam.dtype).tiny)
    rel[lam <= 0] = math.inf
    return lam, E, rel


def fix_signs(V: torch.Tensor, U: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Flip rows so each row of V (k, d) has its largest-|component| entry positive; U (k, d_out) follows."""
    idx = V.abs().argmax(dim=1)
    s = torch.sign(V.gather(1, idx[:, None]))
    s[s == 0] = 1
    return V * s, None if U is None else U * s


def align_signs(V: torch.Tensor, reference: torch.Tensor, U: torch.Tensor | None = None):
    """Flip rows of V (k, d) whose dot product with the same row of ``reference`` (k, d) is negative."""
    s = torch.sign((V * reference).sum(dim=1))
    s[s == 0] = 1
    return V * s[:, None], None if U is None else U * s[:, None]


# ---------------------------------------------------------------------------------------------
# solvers: each takes products (jvp / vjp / d_in / d_out, e.g. a Linearization)
# ---------------------------------------------------------------------------------------------
@dataclass
class TopSingular:
    """Top-k singular triplets of J (``J v_i = s_i u_i``), rows.

    singular_values: (k,) descending; V: (k, d_in) unit right vectors; U: (k, d_out) unit left
    vectors; iterations: outer iterations; converged: every residual < tol; residuals: (k,)
    relative residuals at the last check; passes / vectors: the products' counters.
    """

    singular_values: torch.Tensor
    V: torch.Tensor
    U: torch.Tensor
    iterations: int
    converged: bool
    residuals: torch.Tensor
    passes: dict[str, int] = field(default_factory=dict)
    vectors: dict[str, int] = field(default_factory=dict)


def _state(ops) -> dict:
    dev = getattr(ops, "device", torch.device("cpu"))
    dtype = torch.float32 if torch.device(dev).type == "mps" else _STATE_DTYPE
    return {"device": dev, "dtype": dtype}


def _gaussian(n: int, d: int, generator: torch.Generator | None, like: dict) -> torch.Tensor:
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


def _fwd(ops, X, like):
    return ops.jvp(X).to(**like)


def _bwd(ops, Y, like):
    return ops.vjp(Y).to(**like)


def _left_from(Y: torch.Tensor) -> torch.Tensor:
    """Unit left vectors from Y ~ J V (rows), orthonormalised in order (the paper's "Orthonormalize U")."""
    return orthonormalize(Y)


def subspace_iteration(ops, k: int, *, tol: float = DEFAULT_TOL, max_iter: int = DEFAULT_MAX_ITER,
                       init: torch.Tensor | None = None, generator: torch.Generator | None = None,
                       oversample: int = 0) -> TopSingular:
    """Alg. 1 (Jacobian subspace iteration). init: (m, d_in) starting V (else Gaussian); m = k + oversample."""
    like = _state(ops)
    m = min(k + max(0, oversample), ops.d_in)
    V = _start_block(init, m, ops.d_in, generator, like)                   # V <- QR(V)
    it, converged = 0, False
    while True:
        it += 1
        U = _fwd(ops, V, like)                                            # U <- J V (batch forward)
        Vh = _bwd(ops, U, like)                                           # V_hat <- J^T U
        _, _, rel = ritz(V, Vh)                                           # stopping criterion on V
        A, S2, Vnew = torch.linalg.svd(Vh, full_matrices=False)            # V, Sigma^2, R <- SVD(V_hat)
        residuals = rel[:k]
        converged = bool((residuals < tol).all())
        U, V = A.T @ U, Vnew
        if converged or it >= max_iter:
            break
    s = S2[:k].clamp_min(0).sqrt()
    return TopSingular(s, V[:k], _left_from(U[:k]), it, converged, residuals)


def sequential_subspace_iteration(ops, k: int, block: int, *, tol: float = DEFAULT_TOL,
                                  max_iter: int = DEFAULT_MAX_ITER, init: torch.Tensor | None = None,
                                  generator: torch.Generator | None = None) -> TopSingular:
    """Alg. 2 (supp. C): mini-batches of ``block`` vectors, each iterated on the complement of
    the vectors already found (projector ``I - V (V^T V)^-1 V^T``). max_iter: per mini-batch."""
    like = _state(ops)
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
                Phi = orthonormalize(project(Phi))                      # project, QR
            Psi = _fwd(ops, Phi, like)                                    # Psi <- J Phi
            Ph = _bwd(ops, Psi, like)                                     # Phi_hat <- J^T Psi
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
    return TopSingular(s, found, _left_from(torch.cat(lefts)), iters, all_converged, torch.cat(res))


def power_deflation(ops, k: int, *, tol: float = DEFAULT_TOL, max_iter: int = DEFAULT_MAX_ITER,
                    init: torch.Tensor | None = None, generator: torch.Generator | None = None) -> TopSingular:
    """The original code's baseline: power iteration on J^T J for one vector at a time, the
    vectors found so far projected out (deflation). max_iter: per vector."""
    like = _state(ops)
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
            u = _fwd(ops, v, like)
            w = _bwd(ops, u, like)
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
    return TopSingular(s, found, _left_from(torch.cat(lefts)), iters, all_converged, torch.tensor(res, **like))


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
    like = _state(ops)
    d = ops.d_in
    max_basis = min(d, max_basis or max(k + 2 * block, 24 * block, 3 * k))
    Q = _start_block(init, block, d, generator, like, at_least=True)
    JQ = _fwd(ops, Q, like)
    Z = _bwd(ops, JQ, like)
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
        JN = _fwd(ops, N, like)
        Q, JQ, Z = torch.cat([Q, N]), torch.cat([JQ, JN]), torch.cat([Z, _bwd(ops, JN, like)])
        it += 1
    k_ = min(k, len(lam))
    s = lam[:k_].clamp_min(0).sqrt()
    V = A[:, :k_].T @ Q
    U = (A[:, :k_].T @ JQ) / s.clamp_min(torch.finfo(s.dtype).tiny)[:, None]
    return TopSingular(s, V, U / U.norm(dim=1, keepdim=True).clamp_min(torch.finfo(U.dtype).tiny), it, converged, rel[:k_])


# ---------------------------------------------------------------------------------------------
# one entry point over a function
# ---------------------------------------------------------------------------------------------
def default_block(method: str, k: int) -> int:
    """Block (batch) size each method uses when none is given."""
    if method in ("auto", "krylov"):
        return max(1, min(k, 4))
    if method == "sequential":
        return max(1, min(k, 2))
    return 1 if method == "deflation" else k


def _check_k(k: int, d_in: int, d_out: int | None = None) -> int:
    try:
        if isinstance(k, bool):
            raise TypeError
        k = operator.index(k)
    except TypeError:
        raise InputError(f"k must be a positive int, got {k!r}") from None
    if k < 1:
        raise InputError(f"k must be a positive int, got {k!r}")
    if k > d_in or (d_out is not None and k > d_out):
        limit = d_in if d_out is None else min(d_in, d_out)
        raise InputError(
            f"k={k} is too large: h has d_in={d_in} dimensions"
            + ("" if d_out is None else f" and the output d_out={d_out}")
            + f", so at most {limit} singular vectors can be found"
        )
    return k


def top_singular(f: Fn, h: torch.Tensor, k: int, *, method: str = "auto", block: int | None = None,
                 tol: float = DEFAULT_TOL, max_iter: int = DEFAULT_MAX_ITER, init: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, oversample: int = 0, products: str | None = None,
                 max_basis: int | None = None) -> TopSingular:
    """Top-k singular triplets of ``J = df/dh`` at h, signs fixed (largest-|component| positive).

    f: (b, d_in) -> (b, d_out) batched; h: (d_in,) or any shape with d_in elements.
    method: see the module doc ("auto" = "krylov"). block: mini-batch b of ``sequential``
    (Alg. 2, 1 <= b <= k), block size of ``krylov``; ignored by the others. init: (m, d_in)
    starting vectors (warm start); generator: for Gaussian starts (default: seeded with 0).
    oversample: extra vectors for ``subspace``. products: "forward" or "linearized" (module doc),
    default per method. max_basis: basis size before a thick restart (``krylov``).
    """
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; choose one of {METHODS}")
    method = DEFAULT_METHOD if method == "auto" else method
    h = torch.as_tensor(h).detach().reshape(-1)
    d_in = h.numel()
    k = _check_k(k, d_in)
    if not tol > 0:
        raise InputError(f"tol must be > 0, got {tol!r}")
    if int(max_iter) < 1:
        raise InputError(f"max_iter must be >= 1, got {max_iter!r}")
    if block is not None and (int(block) < 1 or (method == "sequential" and int(block) > k)):
        raise InputError(f"block must be in 1..k={k}, got {block}")
    if int(oversample) < 0:
        raise InputError(f"oversample must be >= 0, got {oversample}")
    b = int(block) if block is not None else default_block(method, k)
    products = products or ("linearized" if method == "krylov" else "forward")
    if products not in PRODUCTS:
        raise InputError(f"unknown products {products!r}; choose one of {PRODUCTS}")
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    with autograd_context():
        if init is not None:
            init = torch.as_tensor(init).detach()
            if init.ndim < 1 or init.numel() == 0 or init.numel() % d_in:
                raise InputError(f"init must be (m, {d_in}) (or (m, C, H, W)), got shape {tuple(init.shape)}")
            init = init.reshape(-1, d_in).clone()
        width = {"subspace": min(k + int(oversample), d_in), "sequential": b, "deflation": 1, "krylov": b}[method]
        ops = Linearization(f, h.clone(), width, jvp_mode="double_backward" if products == "linearized" else "forward")
        try:
            _check_k(k, d_in, ops.d_out)
            kw = dict(tol=float(tol), max_iter=int(max_iter), init=init, generator=generator)
            if method == "subspace":
                out = subspace_iteration(ops, k, oversample=int(oversample), **kw)
            elif method == "sequential":
                out = sequential_subspace_iteration(ops, k, b, **kw)
            elif method == "deflation":
                out = power_deflation(ops, k, **kw)
            else:
                out = block_krylov(ops, k, b, max_basis=max_basis, **kw)
        finally:
            ops.close()
        out.V, out.U = fix_signs(out.V, out.U)
    out.passes, out.vectors = dict(ops.passes), dict(ops.vectors)
    if not out.converged:
        log.warning("Jacobian %s did not converge in %d iterations: max relative residual %.2e > tol %.1e",
                    method, out.iterations, float(out.residuals.max()), tol)
    return out


# ---------------------------------------------------------------------------------------------
# the model: f(h) = mask * eps_t(x_t, h)
# ---------------------------------------------------------------------------------------------
def check_mask(mask, image_shape: Sequence[int]) -> torch.Tensor:
    """An image-region mask (H, W), (1, H, W) or (3, H, W) with values in [0, 1] -> (c, H, W) float."""
    C, H, W = image_shape
    m = torch.as_tensor(mask).detach().clone().float()
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3 or tuple(m.shape[1:]) != (H, W) or m.shape[0] not in (1, C):
        raise InputError(f"mask has shape {tuple(torch.as_tensor(mask).shape)}; expected (H, W) = {(H, W)}, "
                         f"(1, H, W) or ({C}, H, W) = {(C, H, W)}")
    if not torch.isfinite(m).all() or m.min() < 0 or m.max() > 1:
        raise InputError("mask values must lie in [0, 1]")
    if m.max() == 0:
        raise InputError("mask is all zero: the masked Jacobian vanishes, no direction can be found")
    return m


def eps_function(model, x_t: torch.Tensor, step: int, mask: torch.Tensor | None = None) -> Fn:
    """f(h) = mask * eps_t(x_t, h), batched and flattened: (b, C*H*W) -> (b, 3*H*W).

    x_t: (3, H, W) or (1, 3, H, W); mask: as :func:`check_mask` (None: the whole image).
    """
    C, H, W = model.h_shape
    x = x_t.detach().reshape(1, *model.image_shape).to(model.device).clone()
    m = None if mask is None else check_mask(mask, model.image_shape).to(model.device)

    def f(hb: torch.Tensor) -> torch.Tensor:
        b = hb.shape[0]
        eps = model.eps_given_h(x.expand(b, -1, -1, -1), step, hb.reshape(b, C, H, W))
        if m is not None:
            eps = eps * m
        return eps.reshape(b, -1)

    return f


def _get(sample, name: str):
    if isinstance(sample, Mapping):
        return sample.get(name)
    return getattr(sample, name, None)


def sample_trajectory(model, sample) -> tuple[torch.Tensor, torch.Tensor]:
    """The sample's own trajectory: x_t entering every step (T, 3, H, W) and h_t (T, C, H, W).

    sample: a seed (int); or a :class:`~pipeline.model.SampleOutput`-like object / dict of ONE
    sample with ``x_T`` ((1, 3, H, W) or (3, H, W)) and, for eta > 0, its step noise ``noise``
    ((1, T, 3, H, W)) or ``seeds``/``seed``. If it already carries ``latents`` and ``h`` these are
    used as they are (no re-sampling).
    """
    T = model.num_steps
    with torch.inference_mode(False):
        if isinstance(sample, bool) or sample is None:
            raise InputError(f"sample must be a seed (int) or a SampleOutput / dict with x_T; got {sample!r}")
        if isinstance(sample, int) or (hasattr(sample, "__index__") and not isinstance(sample, torch.Tensor)):
            out = model.sample([int(sample)], return_latents=True)
            return out.latents[0].clone(), out.h[0].float().clone()
        latents, h = _get(sample, "latents"), _get(sample, "h")
        if latents is not None and h is not None:
            latents, h = torch.as_tensor(latents), torch.as_tensor(h)
            if latents.ndim == 5:
                if len(latents) != 1 or h.ndim != 5 or len(h) != 1:
                    raise InputError(f"give one sample, not a batch of {len(latents)}: slice it (e.g. out.latents[i:i+1])")
                latents, h = latents[0], h[0]
            if latents.shape[0] != T or h.shape[0] != T:
                raise InputError(f"sample has {latents.shape[0]} steps; the model samples with T={T}")
            return latents.clone().float(), h.clone().float()
        x_T = _get(sample, "x_T")
        if x_T is None:
            raise InputError("sample must be a seed (int) or carry x_T (a SampleOutput or a dict with 'x_T')")
        x_T = torch.as_tensor(x_T).clone().float()
        if x_T.ndim == 3:
            x_T = x_T[None]
        if x_T.ndim != 4 or len(x_T) != 1:
            raise InputError(f"give one sample: x_T has shape {tuple(x_T.shape)}, expected (1, 3, H, W) or (3, H, W); slice a batch first")
        noise = _get(sample, "noise")
        seeds = _get(sample, "seeds")
        if seeds is None and _get(sample, "seed") is not None:
            seeds = [int(_get(sample, "seed"))]
        if noise is not None:
            noise = torch.as_tensor(noise).clone().float()
            if noise.ndim == 4:
                noise = noise[None]
        stochastic = bool((model.coefficients().sigma > 0).any())
        if stochastic and noise is None and seeds is None:
            raise InputError("eta > 0: the Jacobian must be taken on the sample's own trajectory; "
                             "give its step noise ('noise', (1, T, 3, H, W)) or its seed")
        out = model.sample(seeds=None if seeds is None else list(seeds), x_T=x_T, noise=noise, return_latents=True)
        return out.latents[0].clone(), out.h[0].float().clone()


def _check_step(model, step) -> int:
    T = model.num_steps
    if isinstance(step, bool) or not (isinstance(step, int) or hasattr(step, "__index__")):
        raise InputError(f"step must be an int step index, got {step!r}")
    step = int(step)
    if not 0 <= step < T:
        raise InputError(f"step {step} out of range: step indices run 0..{T - 1} (0 = first, noisiest)")
    return step


@dataclass
class JacobianDirections:
    """Top-k directions of one sample at one step (``J v_i = s_i u_i``).

    singular_values: (k,) descending; directions: (k, C, H, W) unit right singular vectors;
    left: (k, 3, H, W) unit left singular vectors (in eps space); residuals: (k,) relative
    residuals; passes: batched U-Net passes by kind; vectors: vectors through J / J^T.
    """

    singular_values: torch.Tensor
    directions: torch.Tensor
    left: torch.Tensor
    step: int
    method: str
    iterations: int
    converged: bool
    residuals: torch.Tensor
    passes: dict[str, int] = field(default_factory=dict)
    vectors: dict[str, int] = field(default_factory=dict)


def directions_at(model, x_t: torch.Tensor, h_t: torch.Tensor, step: int, k: int, *, mask=None,
                  method: str = "auto", block: int | None = None, tol: float = DEFAULT_TOL,
                  max_iter: int = DEFAULT_MAX_ITER, init: torch.Tensor | None = None,
                  generator: torch.Generator | None = None, **kw: Any) -> JacobianDirections:
    """Directions at a given point: x_t (3, H, W), h_t (C, H, W) at step index ``step``."""
    step = _check_step(model, step)
    h_t = torch.as_tensor(h_t)
    if tuple(h_t.shape[-3:]) != tuple(model.h_shape) or h_t.numel() != math.prod(model.h_shape):
        raise InputError(f"h_t has shape {tuple(h_t.shape)}; expected {tuple(model.h_shape)}")
    if _is_inference(model):
        raise InputError("the model's weights are inference tensors (created under torch.inference_mode()); "
                         "build the model outside inference mode to differentiate through it")
    f = eps_function(model, x_t, step, mask)
    out = top_singular(f, h_t.to(model.device, torch.float32), k, method=method, block=block, tol=tol,
                       max_iter=max_iter, init=init, generator=generator, **kw)
    return JacobianDirections(
        singular_values=out.singular_values.float().cpu(),
        directions=out.V.float().reshape(-1, *model.h_shape).cpu(),
        left=out.U.float().reshape(-1, *model.image_shape).cpu(),
        step=step, method=DEFAULT_METHOD if method == "auto" else method, iterations=out.iterations,
        converged=out.converged, residuals=out.residuals.float().cpu(), passes=out.passes, vectors=out.vectors,
    )


def _is_inference(model) -> bool:
    return any(p.is_inference() for p in model.unet.parameters())


def jacobian_directions(model, sample, step: int, k: int, mask=None, block: int | None = None,
                        tol: float = DEFAULT_TOL, max_iter: int = DEFAULT_MAX_ITER, method: str = "auto",
                        init: torch.Tensor | None = None, generator: torch.Generator | None = None,
                        **kw: Any) -> JacobianDirections:
    """Top-k Jacobian directions of one sample at step index ``step`` (paper Sec. 4.2).

    sample: a seed or one sample's SampleOutput / dict (see :func:`sample_trajectory`); the
    Jacobian is taken at the sample's own x_t (its own step noise for eta > 0) and recorded h_t.
    mask: (H, W), (1, H, W) or (3, H, W) in [0, 1]: directions of ``mask * eps`` (a region).
    block: ``b`` selects Alg. 2 (``method="sequential"``) when method is "auto"; else the
    method's block size. init: (m, C, H, W) or (m, d) warm start. Extra keywords
    (``oversample``, ``products``, ``max_basis``) go to :func:`top_singular`.
    """
    step = _check_step(model, step)
    if block is not None and method == "auto":
        method = "sequential"
    latents, hs = sample_trajectory(model, sample)
    return directions_at(model, latents[step], hs[step], step, k, mask=mask, method=method, block=block,
                         tol=tol, max_iter=max_iter, init=init, generator=generator, **kw)


@dataclass
class TrajectoryDirections:
    """Directions at several steps of one sample.

    directions: (T', k, C, H, W); singular_values: (T', k); left: (T', k, 3, H, W);
    steps: the T' step indices (all T by default); iterations: (T',); converged: (T',) bool;
    residuals: (T', k); passes / vectors: totals over the steps.
    """

    directions: torch.Tensor
    singular_values: torch.Tensor
    left: torch.Tensor
    steps: list[int]
    iterations: torch.Tensor
    converged: torch.Tensor
    residuals: torch.Tensor
    method: str
    passes: dict[str, int] = field(default_factory=dict)
    vectors: dict[str, int] = field(default_factory=dict)


def jacobian_directions_all_steps(model, sample, k: int, *, steps: Sequence[int] | None = None, mask=None,
                                  method: str = "auto", block: int | None = None, tol: float = DEFAULT_TOL,
                                  max_iter: int = DEFAULT_MAX_ITER, warm_start: bool = True,
                                  align: bool = True, generator: torch.Generator | None = None,
                                  progress: bool = False, **kw: Any) -> TrajectoryDirections:
    """Top-k directions at every step (or ``steps``) of one sample, from one sampling pass.

    warm_start: start each step from the previous step's directions (neighbouring steps' subspaces
    overlap, so fewer iterations). align: flip each step's vectors to a non-negative dot product
    with the previous step's vector of the same index (the first step keeps the largest-component
    rule), so that "+" means the same across steps as far as the ordering persists.
    """
    steps = list(range(model.num_steps)) if steps is None else [_check_step(model, s) for s in steps]
    if not steps:
        raise InputError("steps is empty")
    if block is not None and method == "auto":
        method = "sequential"
    latents, hs = sample_trajectory(model, sample)
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    results: list[JacobianDirections] = []
    prev = None
    for s in tqdm(steps, disable=not progress, desc="jacobian", leave=False):
        r = directions_at(model, latents[s], hs[s], s, k, mask=mask, method=method, block=block, tol=tol,
                          max_iter=max_iter, init=prev if warm_start else None, generator=generator, **kw)
        if align and results:
            V, U = align_signs(r.directions.reshape(k, -1), results[-1].directions.reshape(k, -1), r.left.reshape(k, -1))
            r.directions, r.left = V.reshape(r.directions.shape), U.reshape(r.left.shape)
        results.append(r)
        prev = r.directions
    passes = {key: sum(r.passes.get(key, 0) for r in results) for key in results[0].passes}
    vectors = {key: sum(r.vectors.get(key, 0) for r in results) for key in results[0].vectors}
    return TrajectoryDirections(
        directions=torch.stack([r.directions for r in results]),
        singular_values=torch.stack([r.singular_values for r in results]),
        left=torch.stack([r.left for r in results]),
        steps=steps,
        iterations=torch.tensor([r.iterations for r in results]),
        converged=torch.tensor([r.converged for r in results]),
        residuals=torch.stack([r.residuals for r in results]),
        method=results[0].method, passes=passes, vectors=vectors,
    )


def global_at_index(V: torch.Tensor, S: torch.Tensor, tau: int, index: int | None = None) -> torch.Tensor:
    """The reference's "global at index" edit: direction ``index`` found at step ``tau``, applied
    at every step i scaled by step i's singular value of that index:

        delta[i] = S[i, index] * V[tau, index]

    V: (T, k, C, H, W); S: (T, k) -> (T, C, H, W), or (k, T, C, H, W) for all indices when
    ``index`` is None (one trajectory per direction, ready as ``delta_h`` with scale 1; the
    demo scales are 50-100 for unit singular values, smaller here as S already carries the scale).
    """
    if V.ndim != 5 or S.ndim != 2 or tuple(S.shape) != tuple(V.shape[:2]):
        raise InputError(f"V must be (T, k, C, H, W) and S (T, k); got {tuple(V.shape)} and {tuple(S.shape)}")
    T, k = S.shape
    if not -T <= tau < T:
        raise InputError(f"tau {tau} out of range 0..{T - 1}")
    if index is None:
        return S.T[:, :, None, None, None] * V[tau][:, None]
    if not -k <= index < k:
        raise InputError(f"index {index} out of range 0..{k - 1}")
    return S[:, index, None, None, None] * V[tau, index][None]
