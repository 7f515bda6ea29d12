"""Where semantics live: per-timestep linear probes, as pure functions (arrays in, tables out).

For every sampling step t, a linear model predicts an attribute from the features of that step
(h_t, or x_t for comparison), fitted on the training samples and scored on held-out ones: the
accuracy of a logistic regression for a binary attribute, the R^2 of a ridge regression for a
continuous one, each with its penalty chosen on the training samples only (``LogisticRegressionCV``,
5 folds; ``RidgeCV``, leave-one-out).
Features are standardised and, when ``components`` is given, reduced by PCA fitted on the
training samples only (h has thousands of dimensions per step and a selection a few hundred
samples). The split is by sample id, so every step and every space sees the same samples.

Shapes: features ``(N, T, D)`` (N samples, T steps, D = C*H*W flattened), a target ``(N,)``,
a test mask ``(N,)`` bool. Step 0 is the first, noisiest sampling step.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np
import pandas as pd

from .errors import InputError

#: ridge penalties RidgeCV chooses from, and inverse penalties LogisticRegressionCV chooses from (5-fold on
#: the training samples); both on standardised features
ALPHAS = tuple(np.logspace(-3, 5, 17))
CS = tuple(np.logspace(-4, 2, 7))


def split_by_id(ids, test_fraction: float = 0.25, seed: int = 0) -> np.ndarray:
    """A fixed train/test split by sample id: (N,) bool, True for the held-out samples.

    The ids are sorted and permuted with ``seed``; the first ``round(test_fraction * n)`` of
    the permutation are held out, so the split does not depend on the order the samples come in."""
    ids = np.asarray(ids)
    unique = np.unique(ids)
    if not 0 < test_fraction < 1:
        raise InputError(f"test_fraction must be in (0, 1), got {test_fraction}")
    n_test = int(round(test_fraction * len(unique)))
    if n_test < 2 or len(unique) - n_test < 2:
        raise InputError(f"{len(unique)} samples are too few for a train/test split with test_fraction {test_fraction}")
    test_ids = unique[np.random.default_rng(seed).permutation(len(unique))[:n_test]]
    return np.isin(ids, test_ids)


def is_binary(values, tol: float = 0.05, share: float = 0.9) -> bool:
    """True when ``values`` look like a binary attribute's probabilities: all in [0, 1] and at least
    ``share`` of them within ``tol`` of 0 or 1."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if not len(v) or v.min() < 0 or v.max() > 1:
        return False
    return float(np.mean(np.minimum(v, 1 - v) <= tol)) >= share


def make_probe(binary: bool, components: int | None = None, seed: int = 0, folds: int = 5, size: int = 0):
    """The scikit-learn pipeline of one probe: standardise, optionally PCA (exact SVD up to ``size``
    = samples x features of 10^7, randomized above), then a logistic regression (binary, penalty by
    ``folds``-fold CV) or RidgeCV (continuous)."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegressionCV, RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    steps = [StandardScaler()]
    if components:
        solver = "full" if size <= 10**7 else "randomized"
        steps += [PCA(components, svd_solver=solver, random_state=seed), StandardScaler()]
    steps.append(LogisticRegressionCV(Cs=list(CS), cv=folds, max_iter=5000) if binary else RidgeCV(alphas=ALPHAS))
    return make_pipeline(*steps)


def probe_step(X: np.ndarray, y: np.ndarray, test: np.ndarray, binary: bool, components: int | None = None,
               seed: int = 0) -> tuple[float, float]:
    """(held-out score, chance) of one probe on features X (N, D): accuracy against the accuracy of
    always answering the training samples' majority class, or R^2 against 0. NaN when the training
    samples hold fewer than two of either class."""
    test = np.asarray(test, bool)
    train = ~test
    X = np.asarray(X, dtype=np.float64).reshape(len(X), -1)
    y = np.asarray(y)
    k = None
    if components:
        k = min(int(components), int(train.sum()) - 1, X.shape[1])
        k = None if k >= X.shape[1] else k
    if binary:
        y = y.astype(int)
        classes, counts = np.unique(y[train], return_counts=True)
        if len(classes) < 2 or counts.min() < 2:
            return float("nan"), float("nan")
        majority = classes[np.argmax(counts)]
        chance = float(np.mean(y[test] == majority))
    else:
        y = y.astype(np.float64)
        chance = 0.0
    folds = int(min(5, counts.min())) if binary else 5
    model = make_probe(binary, k, seed, folds, int(train.sum()) * X.shape[1]).fit(X[train], y[train])
    if binary:
        return float(np.mean(model.predict(X[test]) == y[test])), chance
    from sklearn.metrics import r2_score

    return float(r2_score(y[test], model.predict(X[test]))), chance


def probe_trajectory(features: np.ndarray, y, test, binary: bool, components: int | None = None,
                     seed: int = 0) -> pd.DataFrame:
    """One probe per step of ``features`` (N, T, ...) -> rows {step, metric, score, chance}."""
    if features.ndim < 3:
        raise InputError(f"features must be (N, T, ...), got {tuple(features.shape)}")
    if len(features) != len(y) or len(y) != len(test):
        raise InputError(f"{len(features)} samples of features, {len(y)} targets and {len(test)} split entries")
    rows = []
    for t in range(features.shape[1]):
        score, chance = probe_step(features[:, t], y, test, binary, components, seed)
        rows.append({"step": t, "metric": "accuracy" if binary else "r2", "score": score, "chance": chance})
    return pd.DataFrame(rows)


def probe_table(spaces: Mapping[str, np.ndarray], targets: Mapping[str, np.ndarray], test, binary: Iterable[str] = (),
                threshold: float = 0.5, components: int | None = None, seed: int = 0) -> pd.DataFrame:
    """Every attribute of ``targets`` ({name: (N,)}) probed at every step of every space of
    ``spaces`` ({"h": (N, T, ...), "x_t": ...}). An attribute in ``binary`` is thresholded at
    ``threshold`` into 0/1 labels. Rows {attribute, space, step, metric, score, chance, n_train, n_test}."""
    binary, test = set(binary), np.asarray(test, bool)
    tables = []
    for attr, y in targets.items():
        y = np.asarray(y, dtype=float)
        labels = (y > threshold).astype(int) if attr in binary else y
        for space, X in spaces.items():
            t = probe_trajectory(X, labels, test, attr in binary, components, seed)
            tables.append(t.assign(attribute=attr, space=space, n_train=int((~test).sum()), n_test=int(test.sum())))
    table = pd.concat(tables, ignore_index=True)
    return table[["attribute", "space", "step", "metric", "score", "chance", "n_train", "n_test"]]


def encoded_steps(scores, chance=0.0, fraction: float = 0.9) -> np.ndarray:
    """(T,) bool: the steps where the attribute is encoded, i.e. whose score above chance is at least
    ``fraction`` of the best step's. All False when no step beats chance (NaN scores never count)."""
    s = np.asarray(scores, dtype=float) - np.broadcast_to(np.asarray(chance, dtype=float), np.shape(scores))
    s = np.where(np.isfinite(s), s, -np.inf)
    best = s.max() if len(s) else -np.inf
    if not best > 0:
        return np.zeros(len(s), bool)
    return s >= fraction * best


def encoded_steps_of(table: pd.DataFrame, attribute: str, space: str = "h", fraction: float = 0.9) -> np.ndarray:
    """``encoded_steps`` of one attribute's probe curve in a ``probe_table`` (rows in step order)."""
    rows = table[(table.attribute == attribute) & (table.space == space)].sort_values("step")
    if rows.empty:
        raise InputError(f"no {space} probe of attribute {attribute!r} (probed: {sorted(set(table.attribute))})")
    return encoded_steps(rows.score.to_numpy(), rows.chance.to_numpy(), fraction)


def restrict_to_steps(direction, mask):
    """A direction (T, ...) with every step outside ``mask`` (T,) bool set to zero (a torch tensor
    or a numpy array, returned as the same type)."""
    mask = np.asarray(mask, bool)
    if len(mask) != direction.shape[0]:
        raise InputError(f"step mask of {len(mask)} steps for a direction of {direction.shape[0]}")
    keep = mask.reshape((-1,) + (1,) * (direction.ndim - 1))
    if isinstance(direction, np.ndarray):
        return direction * keep
    import torch

    return direction * torch.from_numpy(keep).to(direction.device, direction.dtype)
