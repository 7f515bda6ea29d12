"""Per-timestep linear probes (pipeline/methods/probes.py): a planted signal is found at exactly its steps,
and each score equals scikit-learn's own fit on the same split."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.errors import InputError
from pipeline.methods.probes import (
    encoded_steps,
    encoded_steps_of,
    is_binary,
    probe_step,
    probe_table,
    restrict_to_steps,
    split_by_id,
)

N, T, D = 240, 6, 40
PLANTED = (2, 4)


def planted(seed: int = 0):
    """h (N, T, D) of noise, with the attribute a linear function of a few high-variance features at
    the planted steps only; a binary attribute thresholded from it."""
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((N, T, D))
    z = rng.standard_normal(N)
    for t in PLANTED:
        h[:, t, :3] += 10 * np.outer(z, [1.0, -0.5, 0.8])  # the signal, in a large-variance direction
    smile = z + 0.1 * rng.standard_normal(N)
    glasses = 1 / (1 + np.exp(-30 * z))  # a classifier's probability, near 0 or 1
    return h, {"smile": smile, "glasses": glasses}


def test_split_by_id_is_fixed_and_order_free():
    ids = np.arange(100, 200)
    test = split_by_id(ids, 0.25, seed=3)
    assert test.sum() == 25
    shuffled = np.random.default_rng(0).permutation(ids)
    assert set(shuffled[split_by_id(shuffled, 0.25, seed=3)]) == set(ids[test])
    assert set(ids[split_by_id(ids, 0.25, seed=4)]) != set(ids[test])
    with pytest.raises(InputError):
        split_by_id(np.arange(4), 0.25)


def test_is_binary():
    h, targets = planted()
    assert is_binary(targets["glasses"]) and not is_binary(targets["smile"])
    assert not is_binary(np.linspace(0, 1, 50))


@pytest.mark.parametrize("components", [None, 10])
def test_planted_signal_is_found_at_exactly_its_steps(components):
    h, targets = planted()
    ids = np.arange(N)
    test = split_by_id(ids, 0.25, seed=0)
    table = probe_table({"h": h}, targets, test, binary=["glasses"], components=components)
    assert len(table) == 2 * T
    for attr in ("smile", "glasses"):
        rows = table[table.attribute == attr].sort_values("step")
        scores = rows.score.to_numpy()
        assert np.flatnonzero(encoded_steps_of(table, attr, "h", 0.5)).tolist() == list(PLANTED)
        signal = scores[list(PLANTED)]
        noise = np.delete(scores, PLANTED)
        if attr == "smile":  # R^2: near 1 where planted, near or below 0 elsewhere
            assert (rows.metric == "r2").all() and (signal > 0.85).all() and (noise < 0.15).all()
        else:  # accuracy: near 1 where planted, near chance elsewhere
            assert (rows.metric == "accuracy").all() and (signal > 0.85).all()
            assert (np.abs(noise - rows.chance.to_numpy()[0]) < 0.2).all()


def test_the_table_is_bit_for_bit_the_same_in_worker_processes():
    rng = np.random.default_rng(1)
    h, targets = planted()
    wide = np.concatenate([h[:, :4], rng.standard_normal((N, 4, 3000))], axis=2)  # BLAS products large enough to thread
    test = split_by_id(np.arange(N), 0.25, seed=0)
    args = ({"h": wide, "x_t": wide[:, :, ::-1]}, targets, test, ["glasses"], 0.5, 20)
    here = probe_table(*args, n_jobs=1)
    assert probe_table(*args, n_jobs=2).to_csv() == here.to_csv()
    assert np.isfinite(here.score).all() and len(here) == 2 * 2 * 4


def test_scores_equal_scikit_learn_fitted_directly():
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegressionCV, RidgeCV
    from sklearn.metrics import accuracy_score, r2_score
    from sklearn.preprocessing import StandardScaler

    from pipeline.methods.probes import ALPHAS, CS

    h, targets = planted(1)
    test = split_by_id(np.arange(N), 0.3, seed=5)
    train = ~test
    for components in (None, 8):
        for t in (0, 2):
            X = h[:, t]
            Xtr, Xte = X[train], X[test]
            sc = StandardScaler().fit(Xtr)
            Xtr, Xte = sc.transform(Xtr), sc.transform(Xte)
            if components:
                pca = PCA(components, svd_solver="full").fit(Xtr)
                sc2 = StandardScaler().fit(pca.transform(Xtr))
                Xtr, Xte = sc2.transform(pca.transform(Xtr)), sc2.transform(pca.transform(Xte))
            y = targets["smile"]
            r2 = r2_score(y[test], RidgeCV(alphas=ALPHAS).fit(Xtr, y[train]).predict(Xte))
            assert probe_step(X, y, test, False, components) == pytest.approx((r2, 0.0), abs=1e-9)
            labels = (targets["glasses"] > 0.5).astype(int)
            clf = LogisticRegressionCV(Cs=list(CS), cv=5, max_iter=5000).fit(Xtr, labels[train])
            acc = accuracy_score(labels[test], clf.predict(Xte))
            majority = int(labels[train].mean() > 0.5)
            score, chance = probe_step(X, labels, test, True, components)
            assert score == pytest.approx(acc, abs=1e-12) and chance == pytest.approx(np.mean(labels[test] == majority))


def test_pca_scores_equal_scikit_learn_up_to_sign():
    from sklearn.decomposition import PCA

    from pipeline.methods.probes import pca_scores

    rng = np.random.default_rng(0)
    for n, D in ((30, 80), (80, 20)):  # through the Gram matrix, and through the covariance
        Z = rng.standard_normal((n, D)) * np.linspace(3, 0.1, D)
        Z -= Z.mean(0)
        Zte = rng.standard_normal((7, D))
        tr, te = pca_scores(Z, Zte, 5)
        pca = PCA(5, svd_solver="full").fit(Z)
        ref_tr, ref_te = pca.transform(Z), Zte @ pca.components_.T
        signs = np.sign((tr * ref_tr).sum(0))
        np.testing.assert_allclose(tr * signs, ref_tr, atol=1e-8)
        np.testing.assert_allclose(te * signs, ref_te, atol=1e-8)


def test_one_class_in_training_gives_nan():
    X = np.random.default_rng(0).standard_normal((20, 5))
    y = np.zeros(20)
    test = np.arange(20) >= 15
    y[test] = 1
    score, chance = probe_step(X, y, test, True)
    assert np.isnan(score) and np.isnan(chance)


def test_encoded_steps_and_restriction():
    assert encoded_steps([0.5, 0.6, 0.96, 1.0], 0.5, 0.9).tolist() == [False, False, True, True]
    assert encoded_steps([0.1, -0.2, 0.5], 0.0, 0.5).tolist() == [False, False, True]
    assert not encoded_steps([0.5, 0.4], 0.5).any()  # nothing above chance
    assert encoded_steps([np.nan, 0.8, 0.9], 0.0, 0.9).tolist() == [False, False, True]
    v = torch.ones(3, 2, 2)
    r = restrict_to_steps(v, [True, False, True])
    assert r[1].abs().sum() == 0 and torch.equal(r[0], v[0]) and r.dtype == v.dtype
    assert restrict_to_steps(np.ones((3, 2)), [False, True, False]).sum() == 2
    with pytest.raises(InputError):
        restrict_to_steps(v, [True])
