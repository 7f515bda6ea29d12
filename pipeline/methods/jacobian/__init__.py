"""Image-specific directions: top singular vectors of J_t = d eps_t(x_t, h) / d h (paper Sec. 4.2).

The right singular vectors of ``J_t`` (eq. 6-7) are the orthogonal h-space directions that
change the noise prediction, and so the predicted image P_t (supp. E, eq. 13), the most.
``J_t`` is never stored: every method only applies ``J`` and ``J^T`` to blocks of vectors.

Modules: ``products`` (Jacobian-vector products by autograd, :class:`Linearization`), ``basis``
(the orthonormal complement, Ritz pairs with relative residuals and starting blocks, on
:mod:`pipeline.methods.linalg`; the solvers' result :class:`TopSingular`), ``paper`` (Alg. 1,
Alg. 2 and the deflation baseline), ``krylov`` (the default solver), ``solve``
(:func:`top_singular`, one entry point over a function f), ``trajectory`` (f of a sample's
trajectory, the directions at one step or all steps, :class:`JacobianDirections`, the "global
at index" edit). Everything is
re-exported here: ``from pipeline.methods.jacobian import jacobian_directions``.

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
  change of s^2) is loose where s^2 is small; here it uses the criterion below, like every
  method, so that the methods can be compared at equal accuracy.
- ``"krylov"`` (= ``"auto"``, the default): block Lanczos on ``J^T J`` with Rayleigh-Ritz over
  the whole basis, locking of converged pairs and thick restarts, expanding with the residuals
  of the unconverged Ritz pairs; products from one linearisation (below); block 4 by default.
  It needs fewer products than the power methods on flat spectra (docs/benchmarks.md,
  ``bench/jacobian.py``).

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
residuals stall around 1e-6: a ``tol`` below ~1e-5 may never be met. A search that ``max_iter``
stops short is never returned as if it had converged: by default
(``unconverged="fallback"``) the default method continues from the vectors reached, and a
:class:`~pipeline.errors.ConvergenceError` says what was reached if that stops short too
(``"error"``: at once; ``"return"``: the unconverged result, ``converged=False``).

Autograd context
----------------
Everything that differentiates runs inside ``torch.inference_mode(False)``,
``torch.enable_grad()`` and the math SDPA kernel (needed for forward-mode AD and double
backward through attention), and clones its inputs, so the functions can be called from
``torch.no_grad()`` or ``torch.inference_mode()`` (e.g. Lightning predict). The model itself
must have been created outside inference mode (its weights are saved for backward).
"""
from __future__ import annotations

from pipeline.methods.jacobian.basis import (
    DEFAULT_MAX_ITER,
    DEFAULT_TOL,
    TopSingular,
    orthonormal_complement,
    ritz,
)
from pipeline.methods.jacobian.krylov import block_krylov
from pipeline.methods.jacobian.paper import power_deflation, sequential_subspace_iteration, subspace_iteration
from pipeline.methods.jacobian.products import Fn, Linearization, autograd_context, explicit_jacobian, jvp, vjp
from pipeline.methods.jacobian.solve import DEFAULT_METHOD, METHODS, PRODUCTS, UNCONVERGED, default_block, top_singular
from pipeline.methods.jacobian.trajectory import (
    JacobianDirections,
    check_mask,
    directions_at,
    eps_function,
    global_at_index,
    jacobian_directions,
    jacobian_directions_all_steps,
    sample_trajectory,
)

__all__ = [
    "DEFAULT_MAX_ITER", "DEFAULT_METHOD", "DEFAULT_TOL", "METHODS", "PRODUCTS", "Fn", "JacobianDirections", "Linearization",
    "TopSingular", "autograd_context", "block_krylov", "check_mask", "default_block", "directions_at", "eps_function",
    "explicit_jacobian", "global_at_index", "jacobian_directions", "jacobian_directions_all_steps", "jvp",
    "orthonormal_complement", "power_deflation", "ritz", "sample_trajectory",
    "sequential_subspace_iteration", "subspace_iteration", "top_singular", "vjp", "UNCONVERGED",
]
