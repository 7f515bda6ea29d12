"""Sign conventions of direction vectors (rows), written once for PCA components and Jacobian
singular vectors.

A direction and its negative span the same line; these rules choose one. ``largest_entry_signs``
makes "+" reproducible (sklearn's ``svd_flip`` rule: each row's largest-|entry| is positive);
``agreement_signs`` and ``align_signs`` make "+" mean the same at every step of a trajectory.
Each returns or applies factors of +-1; a zero dot product or entry keeps the sign.
"""
from __future__ import annotations

import torch

from pipeline.errors import InputError


def largest_entry_signs(V: torch.Tensor) -> torch.Tensor:
    """V: (..., k, d) rows -> (..., k, 1) factors +-1 that make each row's largest-|entry| positive."""
    s = torch.sign(torch.gather(V, -1, V.abs().argmax(-1, keepdim=True)))
    return torch.where(s == 0, torch.ones_like(s), s)


def agreement_signs(V: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """V, reference: (..., k, d) -> (..., k, 1) factors +-1: -1 where a row of V has a negative dot
    product with the same row of ``reference``."""
    return torch.where((V * reference).sum(-1, keepdim=True) < 0, -1.0, 1.0).to(V.dtype)


def align_signs(components: torch.Tensor, *, method: str = "chain", reference: int = 0) -> torch.Tensor:
    """Flip signs so that "+" of component k means the same at every step. components: (T, K, D).

    ``"chain"`` (default): step t is flipped to have a non-negative dot product with the already
    aligned step t-1 (the reference is step ``reference``, propagated both ways). Neighbouring steps
    of a trajectory have nearly parallel components (|cos| close to 1), so every decision is
    well-conditioned; aligning every step to one fixed step (``"reference"``, what the original
    code did with step 0) compares components of distant steps, which can be nearly orthogonal, so
    the sign of a small dot product is decided by noise. Where |cos| between neighbours is small
    (components swapped order, see :func:`pipeline.methods.pca.adjacent_cosines`) no sign rule is meaningful.
    """
    if components.ndim != 3:
        raise InputError(f"components must be (T, K, D), got shape {tuple(components.shape)}")
    T = components.shape[0]
    if not -T <= reference < T:
        raise InputError(f"reference step {reference} out of range for T={T}")
    reference %= T
    out = components.clone()
    if method == "reference":
        return out * agreement_signs(out, out[reference])
    if method != "chain":
        raise InputError(f"align_signs method must be 'chain' or 'reference', got {method!r}")
    for order in (range(reference + 1, T), range(reference - 1, -1, -1)):
        for t in order:
            prev = t - 1 if t > reference else t + 1
            out[t] *= agreement_signs(out[t], out[prev])
    return out
