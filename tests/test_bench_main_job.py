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


def test_paced_fractions_weigh_each_interval_of_a_step_by_its_own_plain_rate():
    bench = load_bench("main_job")
    steps = [{"stage": "evaluate", "intervals": [
        {"evals": 100, "wall": 1.0, "cpu": 1.0, "before": (100.0, 100.0), "after": (50.0, 100.0)},
        {"evals": 50, "wall": 1.0, "cpu": 1.0, "before": (50.0, 100.0), "after": (50.0, 100.0)}]}]
    paced = bench.paced_fractions(steps)
    # mean rates 75 then 50: 150 evaluations against 1 s x 75 + 1 s x 50; before alone 100 + 50, after alone 50 + 50
    expected = (150 / 125, 150 / 150, 150 / 100)
    assert paced["wall"]["job"] == pytest.approx(expected)
    assert paced["wall"]["stages"] == [("evaluate", *map(pytest.approx, expected))]
    assert paced["CPU"]["job"] == pytest.approx((0.75, 0.75, 0.75))


def test_the_pacer_cuts_a_step_at_a_plain_batch_after_a_pass_when_its_time_has_come(monkeypatch):
    bench = load_bench("main_job")
    from pipeline.cost import count
    from pipeline.engine.model import HSpaceModel

    batches = []
    monkeypatch.setattr(HSpaceModel, "predict", lambda model, evals: count(unet_evaluations=evals))
    pacer = bench.Pacer(lambda batch_size, generator: batches.append(batch_size), batch_size=4, steps=2, every=0.0)
    with pacer.within_steps():
        HSpaceModel.predict(None, 8)  # a pass: every=0, so its time has come
        count(unet_evaluations=3)  # work counted outside a pass is in the interval under way
        HSpaceModel.predict(None, 4)
    HSpaceModel.predict(None, 5)  # after the block the passes are no longer paced
    pacer(types.SimpleNamespace(name="evaluate"), {"unet_evaluations": 20})
    assert len(batches) == 4  # before the first step, after each of the two passes, after the step
    (step,) = pacer.steps
    assert [p["evals"] for p in step["intervals"]] == [8, 7, 5]
    assert step["wall"] == pytest.approx(sum(p["wall"] for p in step["intervals"]))
    for before, after in zip(step["intervals"], step["intervals"][1:]):
        assert after["before"] == before["after"]
    assert step["before"] == step["intervals"][0]["before"] and step["after"] == step["intervals"][-1]["after"]
    between_steps_only = bench.Pacer(lambda batch_size, generator: batches.append(batch_size), 4, 2)
    with between_steps_only.within_steps():
        HSpaceModel.predict(None, 8)
    assert len(batches) == 5  # its first batch only


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
