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

import warnings
from typing import Iterable, Mapping

import numpy as np
import pandas as pd

from pipeline.errors import InputError
from pipeline.methods.linalg import gram_svd, top_eigh

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


def pca_scores(Ztr: np.ndarray, Zte: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The top-k principal component scores of centred training features Ztr (n, D) and of Zte (m, D)
    projected on the same components: (n, k), (m, k). The components come from the smaller of the
    Gram matrix Ztr Ztr^T (n x n, :func:`~pipeline.methods.linalg.gram_svd`) and the covariance
    Ztr^T Ztr (D x D): the same scores as scikit-learn's exact PCA up to each component's sign,
    without an SVD of the n x D matrix (docs/benchmarks.md has the time saved)."""
    n, D = Ztr.shape
    if n <= D:
        _, W = gram_svd(Ztr @ Ztr.T, k)
        V = Ztr.T @ W.mT  # (D, k) unit principal axes
    else:
        _, V = top_eigh(Ztr.T @ Ztr, k)
    return Ztr @ V, Zte @ V


def reduce_features(X: np.ndarray, test: np.ndarray, components: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(training, held-out) features of X (N, D), standardised and, with ``components``, reduced by
    PCA (``pca_scores``) and standardised again, every transform fitted on the training samples
    only. Attribute-free: one reduction serves every attribute."""
    from sklearn.preprocessing import StandardScaler

    test = np.asarray(test, bool)
    train = ~test
    X = np.asarray(X, dtype=np.float64).reshape(len(X), -1)
    scaler = StandardScaler().fit(X[train])
    Ztr, Zte = scaler.transform(X[train]), scaler.transform(X[test])
    k = min(int(components), int(train.sum()) - 1, X.shape[1]) if components else X.shape[1]
    if k < X.shape[1]:
        Ztr, Zte = pca_scores(Ztr, Zte, k)  # Ztr is centred: the scaler removed the training mean
        scaler = StandardScaler().fit(Ztr)
        Ztr, Zte = scaler.transform(Ztr), scaler.transform(Zte)
    return Ztr, Zte


def probe_step(X: np.ndarray | None, y: np.ndarray, test: np.ndarray, binary: bool, components: int | None = None,
               reduced: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[float, float]:
    """(held-out score, chance) of one probe on features X (N, D): accuracy against the accuracy of
    always answering the training samples' majority class, or R^2 against 0. NaN when the training
    samples hold fewer than two of either class. ``reduced``: ``reduce_features(X, test,
    components)`` computed already (X is then not used)."""
    from sklearn.linear_model import LogisticRegressionCV, RidgeCV
    from sklearn.metrics import r2_score

    test = np.asarray(test, bool)
    train = ~test
    y = np.asarray(y)
    if binary:
        y = y.astype(int)
        classes, counts = np.unique(y[train], return_counts=True)
        if len(classes) < 2 or counts.min() < 2:
            return float("nan"), float("nan")
        chance = float(np.mean(y[test] == classes[np.argmax(counts)]))
    Ztr, Zte = reduced if reduced is not None else reduce_features(X, test, components)
    if binary:
        with warnings.catch_warnings():  # scikit-learn 1.8 announces changed defaults; these settings keep today's
            warnings.simplefilter("ignore", FutureWarning)
            model = LogisticRegressionCV(Cs=list(CS), cv=int(min(5, counts.min())), max_iter=5000).fit(Ztr, y[train])
        return float(np.mean(model.predict(Zte) == y[test])), chance
    model = RidgeCV(alphas=ALPHAS).fit(Ztr, y[train].astype(np.float64))
    return float(r2_score(y[test].astype(np.float64), model.predict(Zte))), 0.0


def probe_table(spaces: Mapping[str, np.ndarray], targets: Mapping[str, np.ndarray], test, binary: Iterable[str] = (),
                threshold: float = 0.5, components: int | None = None, n_jobs: int = 1) -> pd.DataFrame:
    """Every attribute of ``targets`` ({name: (N,)}) probed at every step of every space of
    ``spaces`` ({"h": (N, T, ...), "x_t": ...}). An attribute in ``binary`` is thresholded at
    ``threshold`` into 0/1 labels. Rows {attribute, space, step, metric, score, chance, n_train, n_test},
    in that order. The features of a step are reduced once for all attributes. ``n_jobs``: worker
    processes the steps are dealt to (-1: one per core); the table is the same for any number."""
    binary, test = set(binary), np.asarray(test, bool)
    labels = {a: (np.asarray(y, float) > threshold).astype(int) if a in binary else np.asarray(y, float)
              for a, y in targets.items()}
    for space, X in spaces.items():
        if X.ndim < 3:
            raise InputError(f"features of {space} must be (N, T, ...), got {tuple(X.shape)}")
        if len(X) != len(test) or any(len(y) != len(test) for y in labels.values()):
            raise InputError(f"{len(X)} samples of {space}, {len(test)} split entries and targets of "
                             f"{sorted({len(y) for y in labels.values()})}")
    tasks = [(space, t, X[:, t]) for space, X in spaces.items() for t in range(X.shape[1])]
    if n_jobs == 1 or len(tasks) < 2:
        per_step = [step_rows(space, t, X_t, labels, test, binary, components) for space, t, X_t in tasks]
    else:
        per_step = in_processes(step_rows, [(space, t, X_t, labels, test, binary, components)
                                            for space, t, X_t in tasks], n_jobs)
    table = pd.DataFrame([row for rows in per_step for row in rows])
    order = {a: i for i, a in enumerate(labels)}, {s: i for i, s in enumerate(spaces)}
    return table.sort_values(["attribute", "space", "step"], key=lambda c: c.map(order[0]) if c.name == "attribute"
                             else c.map(order[1]) if c.name == "space" else c, kind="stable").reset_index(drop=True)


def step_rows(space: str, t: int, X_t: np.ndarray, labels: Mapping[str, np.ndarray], test: np.ndarray,
              binary: set, components: int | None) -> list[dict]:
    """The probe table's rows of one step of one space: features X_t (N, D) reduced once, then every attribute."""
    reduced = reduce_features(X_t, test, components)
    rows = []
    for attr, y in labels.items():
        score, chance = probe_step(None, y, test, attr in binary, reduced=reduced)
        rows.append({"attribute": attr, "space": space, "step": t, "metric": "accuracy" if attr in binary else "r2",
                     "score": score, "chance": chance, "n_train": int((~test).sum()), "n_test": int(test.sum())})
    return rows


def in_processes(fn, args: list[tuple], n_jobs: int) -> list:
    """``[fn(*a) for a in args]`` in ``n_jobs`` worker processes (joblib's loky, reused between calls), each
    computing with as many BLAS threads as this process does, so that every result is bit for bit the one this
    process would compute (a BLAS of another thread count rounds differently)."""
    from joblib import Parallel, delayed, parallel_config
    from threadpoolctl import threadpool_info

    blas = max([pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"] or [1])
    with parallel_config(backend="loky", inner_max_num_threads=blas):
        return Parallel(n_jobs=n_jobs)(delayed(fn)(*a) for a in args)


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
