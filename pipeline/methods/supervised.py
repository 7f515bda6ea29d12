"""Supervised directions (paper Sec. 5) and their disentanglement (eq. 11), as pure functions.

Shapes: a sample's latent ``q`` is flattened to ``(D,)`` (D = T*C*H*W for h trajectories, or
3*H*W for x_T); a set of n latents is ``(n, D)``.
"""
from __future__ import annotations

import numpy as np
import torch

from pipeline.errors import InputError


def mean_difference(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """Eq. 10: mean of the positives minus mean of the negatives, (n+, ...) and (n-, ...) -> (...).

    Accumulated in float64 (the inputs may be float16 from disk)."""
    if positive.shape[1:] != negative.shape[1:]:
        raise InputError(f"positive {tuple(positive.shape)} and negative {tuple(negative.shape)} latents differ in shape")
    if len(positive) == 0 or len(negative) == 0:
        raise InputError("mean_difference needs at least one positive and one negative example")
    return (positive.double().mean(0) - negative.double().mean(0)).float()


def paired_difference(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """Mean of per-pair differences q+_i - q-_i (paired real images, e.g. one subject's
    expression and neutral faces); (n, ...) and (n, ...) -> (...)."""
    if positive.shape != negative.shape:
        raise InputError(f"paired latents must have equal shapes, got {tuple(positive.shape)} and {tuple(negative.shape)}")
    return (positive.double() - negative.double()).mean(0).float()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two tensors, flattened."""
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-300))


def project_out(v0: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """Eq. 11: v = [I - V (V^T V)^-1 V^T] v0, by least squares (no explicit inverse).

    v0: (...) a direction; others: (k, ...) the directions to remove. Everything is flattened
    over the whole trajectory. Works for any k, including linearly dependent ``others``."""
    if others.ndim == v0.ndim:
        others = others.unsqueeze(0)
    if others.shape[1:] != v0.shape:
        raise InputError(f"conditioning directions {tuple(others.shape)} do not match the primary {tuple(v0.shape)}")
    V = others.double().reshape(len(others), -1).T  # (D, k)
    x = v0.double().reshape(-1, 1)  # (D, 1)
    coef = torch.linalg.lstsq(V, x, driver="gelsd").solution  # min ||V c - v0||
    return (x - V @ coef).reshape(v0.shape).to(v0.dtype)


def logistic_direction(X: np.ndarray, y: np.ndarray, folds: int = 5, seed: int = 0, C: float = 1.0):
    """Normal of a logistic-regression separating plane (scikit-learn), and its held-out accuracy.

    X: (n, D) latents, y: (n,) 0/1 labels. Features are standardised for fitting; the normal is
    mapped back to latent space and returned with unit norm (D,), plus the mean and standard
    deviation of the stratified k-fold accuracy."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = np.asarray(y).astype(int)
    if set(np.unique(y)) != {0, 1}:
        raise InputError("logistic_direction needs both classes (labels 0 and 1)")
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000))
    k = min(folds, int(np.bincount(y).min()))
    acc = cross_val_score(clf, X, y, cv=StratifiedKFold(k, shuffle=True, random_state=seed)) if k >= 2 else np.array([np.nan])
    clf.fit(X, y)
    scaler, lr = clf[0], clf[1]
    w = lr.coef_[0] / np.where(scaler.scale_ > 0, scaler.scale_, 1.0)  # d logit / d x in latent units
    w = w / np.linalg.norm(w)
    return w.astype(np.float32), float(np.nanmean(acc)), float(np.nanstd(acc))


def draw_subsets(n_pos: int, n_neg: int, ns, draws: int = 10, seed: int = 0) -> list[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """(n, draw, positive indices, negative indices): ``draws`` random choices of n of the n_pos
    positives and n of the n_neg negatives for each n of ``ns`` (one draw where n takes them all;
    an n above what both sides hold is left out)."""
    g = torch.Generator().manual_seed(seed)
    m, out = min(n_pos, n_neg), []
    for n in ns:
        if n > m:
            continue
        for d in range(draws if n < m else 1):
            out.append((int(n), d, torch.randperm(n_pos, generator=g)[:n], torch.randperm(n_neg, generator=g)[:n]))
    return out


def convergence_curve(positive: torch.Tensor, negative: torch.Tensor, ns, draws: int = 10, seed: int = 0):
    """Cosine between the direction from n random positives/negatives and from all of them.

    positive, negative: (N, D). Returns rows {n, cosine_mean, cosine_std} (paper Fig. 8)."""
    full = mean_difference(positive, negative)
    cos: dict[int, list[float]] = {}
    for n, _, ip, ineg in draw_subsets(len(positive), len(negative), ns, draws, seed):
        cos.setdefault(n, []).append(cosine(mean_difference(positive[ip], negative[ineg]), full))
    return [{"n": n, "cosine_mean": float(np.mean(c)), "cosine_std": float(np.std(c))} for n, c in cos.items()]
