"""One entry point over a function: :func:`top_singular` checks its arguments, builds the
products and runs the chosen solver."""
from __future__ import annotations

import logging
import operator

import torch

from pipeline.errors import ConvergenceError, InputError
from pipeline.methods.jacobian.basis import DEFAULT_MAX_ITER, DEFAULT_TOL, TopSingular
from pipeline.methods.jacobian.krylov import block_krylov
from pipeline.methods.jacobian.paper import power_deflation, sequential_subspace_iteration, subspace_iteration
from pipeline.methods.jacobian.products import Fn, Linearization, autograd_context
from pipeline.methods.signs import largest_entry_signs

log = logging.getLogger(__name__)

METHODS = ("auto", "krylov", "subspace", "sequential", "deflation")
PRODUCTS = ("forward", "linearized")
DEFAULT_METHOD = "krylov"
UNCONVERGED = ("fallback", "error", "return")


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
                 max_basis: int | None = None, unconverged: str = "fallback") -> TopSingular:
    """Top-k singular triplets of ``J = df/dh`` at h, signs fixed (largest-|component| positive).

    f: (b, d_in) -> (b, d_out) batched; h: (d_in,) or any shape with d_in elements.
    method: see the module doc ("auto" = "krylov"). block: mini-batch b of ``sequential``
    (Alg. 2, 1 <= b <= k), block size of ``krylov``; ignored by the others. init: (m, d_in)
    starting vectors (warm start); generator: for Gaussian starts (default: seeded with 0).
    oversample: extra vectors for ``subspace``. products: "forward" or "linearized" (module doc),
    default per method. max_basis: basis size before a thick restart (``krylov``).
    unconverged: what happens when ``max_iter`` ends the search before every residual is below
    ``tol``: ``"fallback"`` (default) continues with the default method (``krylov``), warm-started
    from the vectors reached, for up to ``max_iter`` more iterations, and raises
    :class:`~pipeline.errors.ConvergenceError` if that stops short too; ``"error"`` raises at once;
    ``"return"`` returns the unconverged result (``converged=False``, a logged warning).
    """
    h = torch.as_tensor(h).detach().reshape(-1)
    d_in = h.numel()
    method, k, b, products = _checked_options(method, k, d_in, tol, max_iter, block, unconverged, oversample, products)
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
        s = largest_entry_signs(out.V)
        out.V, out.U = out.V * s, out.U * s
    out.passes, out.vectors = dict(ops.passes), dict(ops.vectors)
    if out.converged or unconverged == "return":
        if not out.converged:
            log.warning("Jacobian %s did not converge in %d iterations: max relative residual %.2e > tol %.1e",
                        method, out.iterations, float(out.residuals.max()), tol)
        return out
    if unconverged == "fallback" and method != DEFAULT_METHOD:
        log.info("Jacobian %s stopped short after %d iterations (max relative residual %.2e > tol %.1e); "
                 "continuing with %s from its vectors", method, out.iterations, float(out.residuals.max()), tol,
                 DEFAULT_METHOD)
        more = top_singular(f, h, k, method=DEFAULT_METHOD, tol=tol, max_iter=max_iter, init=out.V,
                            generator=generator, unconverged="error")
        more.iterations += out.iterations
        more.passes = {key: out.passes.get(key, 0) + more.passes.get(key, 0) for key in out.passes | more.passes}
        more.vectors = {key: out.vectors.get(key, 0) + more.vectors.get(key, 0) for key in out.vectors | more.vectors}
        more.fallback = DEFAULT_METHOD
        return more
    worst = int(out.residuals.argmax())
    raise ConvergenceError(
        f"Jacobian {method} stopped short of tol={tol:.1e} after {out.iterations} iterations: vector {worst + 1} of "
        f"{k} has relative residual {float(out.residuals[worst]):.2e} (residuals {_fmt(out.residuals)}). Raise "
        f"max_iter, loosen tol (the float32 products stall near 1e-6)"
        + (f", or let it fall back to {DEFAULT_METHOD} (unconverged='fallback')" if method != DEFAULT_METHOD else ""))


def _checked_options(method: str, k: int, d_in: int, tol: float, max_iter: int, block: int | None, unconverged: str,
                     oversample: int, products: str | None) -> tuple[str, int, int, str]:
    """top_singular's options checked -> (method, k, block size, products), "auto" and None resolved."""
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; choose one of {METHODS}")
    method = DEFAULT_METHOD if method == "auto" else method
    k = _check_k(k, d_in)
    if not tol > 0:
        raise InputError(f"tol must be > 0, got {tol!r}")
    if int(max_iter) < 1:
        raise InputError(f"max_iter must be >= 1, got {max_iter!r}")
    if block is not None and (int(block) < 1 or (method == "sequential" and int(block) > k)):
        raise InputError(f"block must be in 1..k={k}, got {block}")
    if unconverged not in UNCONVERGED:
        raise InputError(f"unconverged must be one of {UNCONVERGED}, got {unconverged!r}")
    if int(oversample) < 0:
        raise InputError(f"oversample must be >= 0, got {oversample}")
    b = int(block) if block is not None else default_block(method, k)
    products = products or ("linearized" if method == "krylov" else "forward")
    if products not in PRODUCTS:
        raise InputError(f"unknown products {products!r}; choose one of {PRODUCTS}")
    return method, k, b, products


def _fmt(r: torch.Tensor) -> str:
    return "[" + ", ".join(f"{float(x):.1e}" for x in r) + "]"
