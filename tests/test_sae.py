"""The SAE's maths and data order, against independent references: sparsify's own forward pass, direct sums,
numpy's correlation; the batch plan's shares on any number of ranks."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.methods.sae import (
    CorrelationSums,
    FeatureStats,
    NormStats,
    decode,
    encode,
    examples,
    per_sample_activations,
    sae_terms,
    sparse_coder,
    to_h,
)
from pipeline.methods.sae_plan import ExamplePlan, held_out


def test_the_plan_deals_every_example_once_per_epoch_and_any_number_of_ranks_shares_each_batch():
    rows = [5, 7, 0, 6, 3]
    plan = ExamplePlan(rows, steps=2, per_step=3, batch_size=8, epochs=2, window=2, seed=1)
    batches = list(plan.batches())
    assert len(batches) == plan.num_batches() and [b.index for b in batches] == list(range(len(batches)))
    seen = []
    for b in batches:
        j, row, t, p = b.locate()
        shards = torch.tensor(b.window.shards)[j]
        seen += [(b.window.epoch, int(s), int(r), int(tt), int(pp)) for s, r, tt, pp in zip(shards, row, t, p)]
    for epoch in range(2):
        mine = sorted(x[1:] for x in seen if x[0] == epoch)
        assert mine == sorted((s, r, t, p) for s, n in enumerate(rows) for r in range(n) for t in range(2) for p in range(3))
    assert [b.order.tolist() for b in plan.batches(start=3)] == [b.order.tolist() for b in batches[3:]]
    for world in (1, 2, 3):  # the ranks' shares (by shard position) partition every batch
        for b in batches:
            j = b.locate()[0]
            shares = [torch.nonzero(j % world == r).flatten() for r in range(world)]
            assert sorted(torch.cat(shares).tolist()) == list(range(b.size))


def test_held_out_samples_depend_on_the_id_only():
    ids = np.arange(10_000)
    out = held_out(ids, 0.1)
    assert 0.08 < out.mean() < 0.12
    assert (held_out(ids[::-1], 0.1) == out[::-1]).all() and not held_out(ids, 0.0).any()


def test_loss_shares_add_up_to_the_batch_loss_and_match_sparsify(monkeypatch):
    """The terms of any split of a batch add up to the whole batch's; FVU and AuxK equal sparsify's own forward
    (its denominator given: the batch's size times the data's variance; its eager decoder, as on a CPU)."""
    import sparsify.sparse_coder
    import sparsify.utils

    monkeypatch.setattr(sparsify.sparse_coder, "decoder_impl", sparsify.utils.eager_decode)
    torch.manual_seed(0)
    sae = sparse_coder(12, 40, 4, seed=3)
    x = torch.randn(50, 12)
    dead = torch.zeros(40, dtype=torch.bool)
    dead[::3] = True
    variance = 1.7
    whole = sae_terms(sae, x, len(x), variance, dead)
    parts = [sae_terms(sae, x[i:i + 17], len(x), variance, dead) for i in range(0, 50, 17)]
    torch.testing.assert_close(sum(p.loss for p in parts), whole.loss, rtol=1e-5, atol=0)
    assert int(sum(p.l0 for p in parts)) == int(whole.l0) <= 50 * 4
    assert torch.equal(torch.stack([p.fired for p in parts]).any(0), whole.fired)
    ref = sae(x, dead_mask=dead, total_variance=torch.tensor(len(x) * variance))
    torch.testing.assert_close(whole.sse / (len(x) * variance), ref.fvu, rtol=1e-5, atol=0)
    torch.testing.assert_close(whole.auxk, ref.auxk_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(decode(sae, *encode(sae, x, "topk")[:2]), ref.sae_out, rtol=1e-5, atol=1e-6)


def test_l1_terms():
    sae = sparse_coder(6, 10, 3, seed=0)
    x = torch.randn(20, 6)
    terms = sae_terms(sae, x, 20, 2.0, sparsity="l1", l1_coefficient=0.5)
    z = torch.relu((x - sae.b_dec) @ sae.encoder.weight.T + sae.encoder.bias)
    recon = z @ sae.W_dec + sae.b_dec
    torch.testing.assert_close(terms.loss, (x - recon).pow(2).sum() / 40 + 0.5 * z.sum() / 20)


def test_normalisation_gives_each_step_mean_norm_sqrt_d():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(30, 3, 4, 2, 2, generator=g) * torch.tensor([1.0, 5.0, 0.2])[None, :, None, None, None] + 0.3
    for feed in ("token", "whole"):
        stats = NormStats.zeros(3, 4 if feed == "token" else 16)
        for part in h.split(7):
            stats.update(examples(part, feed))
        x = examples(h, feed).double() * stats.scales().double()[None, :, None, None]
        d = x.shape[-1]
        torch.testing.assert_close(x.norm(dim=-1).mean(dim=(0, 2)), torch.full((3,), d ** 0.5, dtype=torch.float64))
        mean, var = stats.normalised_moments()
        flat = x.reshape(-1, d)
        torch.testing.assert_close(mean.double(), flat.mean(0), rtol=1e-5, atol=1e-6)
        assert abs(var - float((flat - flat.mean(0)).pow(2).sum(1).mean())) < 1e-4 * var


def test_feature_statistics_and_correlations_equal_direct_computation():
    torch.manual_seed(1)
    sae = sparse_coder(5, 16, 3, seed=0).requires_grad_(False)
    x = torch.randn(60, 5)
    values, indices, _ = encode(sae, x, "topk")
    stats = FeatureStats.zeros(5, 16)
    for i in range(0, 60, 25):
        v, ix, _ = encode(sae, x[i:i + 25], "topk")
        stats.update(x[i:i + 25], decode(sae, v, ix), v, ix)
    recon = decode(sae, values, indices)
    fvu = float((x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert abs(stats.fvu() - fvu) < 1e-6
    dense = torch.zeros(60, 16).scatter_(1, indices, values)
    assert torch.equal(stats.fires, (dense > 0).sum(0).double())
    sample = torch.arange(60) // 6  # 10 samples of 6 examples
    acts = per_sample_activations(values, indices, sample, 10, 16)
    torch.testing.assert_close(acts, dense.reshape(10, 6, 16).sum(1))
    y = torch.randn(10, 3, dtype=torch.float64)
    sums = CorrelationSums.zeros(16, 3)
    sums.update(acts[:4], y[:4])
    sums.update(acts[4:], y[4:])
    r = sums.correlation()
    ref = np.corrcoef(np.concatenate([acts.double().numpy(), y.numpy()], 1).T)[:16, 16:]
    varies = acts.std(0) > 0
    np.testing.assert_allclose(r[varies].numpy(), ref[varies.numpy()], rtol=1e-5, atol=1e-6)
    assert (r[~varies] == 0).all()


def test_examples_and_their_way_back_to_h():
    h = torch.arange(2 * 3 * 4 * 2 * 2, dtype=torch.float32).reshape(2, 3, 4, 2, 2)
    tok = examples(h, "token")  # (B, T, H*W, C)
    assert tok.shape == (2, 3, 4, 4) and torch.equal(tok[1, 2, 3], h[1, 2, :, 1, 1])
    assert torch.equal(examples(h, "whole")[1, 2, 0], h[1, 2].flatten())
    v = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert torch.equal(to_h(v, "token", (4, 2, 2))[:, 1, 0], v) and to_h(v, "token", (4, 2, 2)).shape == (4, 2, 2)
    assert torch.equal(to_h(torch.arange(16.0), "whole", (4, 2, 2)), torch.arange(16.0).reshape(4, 2, 2))


def test_a_feature_as_delta_h_everywhere_or_where_it_fires():
    from pipeline.formats.sae import SAEModel

    sae = sparse_coder(4, 8, 2, seed=0)
    model = SAEModel(sae, "token", [1, 2], torch.tensor([2.0, 4.0]), (4, 3, 3), T=4)
    d = model.delta(5, gain=3.0)
    assert d.shape == (4, 4, 3, 3) and (d[0] == 0).all() and (d[3] == 0).all()
    torch.testing.assert_close(d[1, :, 2, 1], 3.0 * sae.W_dec[5].detach() / 2.0)
    torch.testing.assert_close(d[2, :, 0, 0], 3.0 * sae.W_dec[5].detach() / 4.0)
    h = torch.randn(2, 4, 4, 3, 3)
    fires = model.codes(h)[..., 5] > 0  # (B, T', P)
    per = model.delta(5, gain=3.0, h=h)
    for b in range(2):
        for j, t in enumerate([1, 2]):
            mask = fires[b, j].reshape(3, 3)
            assert torch.equal(per[b, t][:, mask], d[t][:, mask]) and (per[b, t][:, ~mask] == 0).all()


def test_categorical_annotations_become_indicators():
    from pipeline.stages.sae_features import annotation_matrix

    table = pd.DataFrame({"sample_id": [3, 1, 2, 7], "smile": [0.1, 0.5, 0.2, 0.9], "background": [0.0, 2.0, 1.0, 2.0],
                          "glasses": [0.0, 1.0, 1.0, 0.0]})
    names, rows, Y = annotation_matrix(table)
    assert names == ["smile", "background=0", "background=1", "background=2", "glasses"]
    assert rows == {3: 0, 1: 1, 2: 2, 7: 3}
    assert Y[:, 3].tolist() == [0, 1, 0, 1] and Y[:, 0].tolist() == [0.1, 0.5, 0.2, 0.9]


@pytest.mark.parametrize("overrides, message", [
    (["sae.k=64", "sae.num_latents=32"], "sae.k=64 .* at most sae.num_latents=32"),
    (["sae.steps=20"], "sae.steps=20 .* step indices in 0..19"),
    (["sae.steps=[4, 2]"], "sae.steps=.* first <= last"),
])
def test_settings_that_cannot_work_are_refused_by_the_configuration(overrides, message):
    from pipeline.config import load_config
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


@pytest.mark.parametrize("feed, window", [("token", 2), ("whole", 1)])
def test_the_ranks_streams_share_every_batch_and_read_only_their_shards(tmp_path, feed, window):
    """Two ranks' ShardStreams give, batch by batch, exactly the examples of one rank's stream (a window of one
    shard leaves one rank an empty share); every example is h at its step, normalised later."""
    from pipeline.config import load_config
    from pipeline.stages.sae import Layout, ShardStream
    from pipeline.testing.sparse_data import write_samples

    h = torch.randn(12, 3, 4, 2, 2)
    write_samples(tmp_path, h, shard_size=4, h_dtype="float32")
    cfg = load_config(None, [f"run_dir={tmp_path}", "model.num_inference_steps=3", f"sae.feed={feed}",
                             "sae.steps=[1, 2]", "sae.holdout=0.2", f"sae.window={window}", "sae.batch_size=7",
                             "sae.epochs=2"])
    layout = Layout(tmp_path, cfg.sae)
    plan = ExamplePlan(layout.train_rows(), 2, layout.per_step, 7, 2, window, 0)
    one = list(ShardStream(plan, layout))
    two = [list(ShardStream(plan, layout, rank=r, world=2)) for r in range(2)]
    assert len(one) == len(two[0]) == len(two[1]) == plan.num_batches()
    empty = 0
    for a, r0, r1 in zip(one, *two):
        assert a["n"] == r0["n"] == r1["n"] == len(a["x"]) == len(r0["x"]) + len(r1["x"])
        key = lambda x, t: sorted(map(tuple, torch.cat([x, t[:, None].float()], 1).tolist()))  # noqa: E731
        assert key(a["x"], a["t"]) == key(torch.cat([r0["x"], r1["x"]]), torch.cat([r0["t"], r1["t"]]))
        empty += len(r1["x"]) == 0
    assert empty > 0 if window == 1 else empty < len(one)
    train = h[torch.from_numpy(~held_out(np.arange(12), 0.2))][:, [1, 2]]  # every training example, once per epoch
    expected = sorted(map(tuple, examples(train, feed).reshape(-1, layout.d).tolist()))
    for epoch in (0, 1):
        seen = torch.cat([x["x"] for x, b in zip(one, plan.batches()) if b.window.epoch == epoch])
        assert sorted(map(tuple, seen.tolist())) == expected


def test_an_empty_share_gives_zero_gradients():
    sae = sparse_coder(6, 12, 3, seed=0)
    terms = sae_terms(sae, torch.zeros(0, 6), 10, 1.0, dead=torch.ones(12, dtype=torch.bool))
    terms.loss.backward()
    assert float(terms.loss.detach()) == 0 and all(p.grad is not None and not p.grad.any() for p in sae.parameters())
