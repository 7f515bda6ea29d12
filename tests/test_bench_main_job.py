"""bench/main_job.py's pacing arithmetic: each step judged against the plain diffusers batches around it, the
whole job against the plain rate of the moment (what it measures is in docs/benchmarks.md; no timing threshold
here)."""
from __future__ import annotations

import types

import pytest

from conftest import load_bench


def test_paced_fractions_weigh_each_step_by_the_plain_rate_around_it():
    bench = load_bench("main_job")
    steps = [{"stage": "generate", "evals": 100, "wall": 1.0, "cpu": 2.0, "before": (100.0, 50.0), "after": (50.0, 50.0)},
             {"stage": "pca", "evals": 0, "wall": 2.0, "cpu": 2.0, "before": (50.0, 50.0), "after": (100.0, 50.0)}]
    paced = bench.paced_fractions(steps)
    # wall: the plain rate is 75 around both steps: 100 evaluations in 1 s x 75 + 2 s x 75; against the batches
    # before alone, 1 s x 100 + 2 s x 50; after alone, 1 s x 50 + 2 s x 100
    assert paced["wall"]["job"] == pytest.approx((100 / 225, 100 / 250, 100 / 200))
    assert paced["wall"]["stages"] == [("generate", pytest.approx(100 / 75), pytest.approx(1.0), pytest.approx(2.0))]
    assert paced["CPU"]["job"] == pytest.approx((0.5, 0.5, 0.5))
    assert paced["CPU"]["stages"] == [("generate", pytest.approx(1.0), pytest.approx(1.0), pytest.approx(1.0))]


def test_the_pacer_times_a_plain_batch_after_every_step_and_leaves_it_out_of_the_steps():
    bench = load_bench("main_job")
    batches = []

    def plain(batch_size, generator):
        batches.append((batch_size, generator.initial_seed()))

    pacer = bench.Pacer(plain, batch_size=4, steps=2)
    for name, cost in (("generate", {"unet_evaluations": 8}), ("report", {"unet_evaluations": 0}), ("probe", None)):
        pacer(types.SimpleNamespace(name=name), cost)
    assert batches == [(4, 0)] * 4  # one before the first step, one after each
    assert [(s["stage"], s["evals"]) for s in pacer.steps] == [("generate", 8), ("report", 0), ("probe", 0)]
    for before, after in zip(pacer.steps, pacer.steps[1:]):
        assert after["before"] == before["after"] and min(before["after"]) > 0
    assert pacer.first_report_s() == pytest.approx(pacer.steps[0]["wall"] + pacer.steps[1]["wall"])
    unpaced = bench.Pacer(plain, batch_size=4, steps=2, enabled=False)
    unpaced(types.SimpleNamespace(name="generate"), {"unet_evaluations": 8})
    assert len(batches) == 4 and "after" not in unpaced.steps[0]
