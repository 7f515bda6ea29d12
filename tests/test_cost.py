"""Where the time goes: the engine's one count of U-Net work, a stage's entry in timings.json, the table."""
from __future__ import annotations

import json
import os

import torch

from pipeline import Edit, cost


def test_sampling_counts_every_unet_row_and_image(tiny_model):
    model = tiny_model(eta=1.0, steps=4)
    before = cost.COUNTERS.snapshot()
    model.sample(seeds=[0, 1, 2])
    model.sample([3, 4], Edit(delta=torch.zeros(4, *model.h_shape), asyrp=True))  # Asyrp: a second pass per step
    after = cost.COUNTERS.snapshot()
    assert after["unet_evaluations"] - before["unet_evaluations"] == 3 * 4 + 2 * 4 * 2
    assert after["images"] - before["images"] == 5
    start = model.hook.calls  # the hook's own count of passes agrees
    model.sample(seeds=[0])
    assert model.hook.calls - start == 4


def test_measured_writes_the_stage_entry_and_the_table(tmp_path, tiny_model):
    model = tiny_model(steps=2)
    with cost.measured(tmp_path, "generate") as entry:
        model.sample(seeds=[0, 1])
    with cost.measured(tmp_path, "select") as other:
        pass
    stored = json.loads((tmp_path / cost.TIMINGS).read_text())
    assert list(stored) == ["generate", "select"]
    assert stored["generate"]["unet_evaluations"] == 4 and stored["generate"]["images"] == 2
    assert stored["generate"] == entry and other["unet_evaluations"] == 0
    assert abs(entry["images_per_s"] * entry["seconds"] - 2) < 0.2 and entry["processes"] == 1
    text = cost.table(stored)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["stage", "wall", "s"] and lines[2].startswith("generate")
    assert lines[-1].startswith("total") and lines[-1].split()[2] == "4"
    with cost.measured(tmp_path, "x", rank0=False):  # other ranks write nothing
        pass
    assert "x" not in cost.read_timings(tmp_path)


def test_the_command_line_lets_waiting_openmp_threads_sleep_unless_told_otherwise(monkeypatch, capsys):
    from pipeline.cli import main

    for name in ("OMP_WAIT_POLICY", "OPENBLAS_THREAD_TIMEOUT"):
        monkeypatch.setenv(name, "unset")
        monkeypatch.delenv(name)  # restored to the session's value afterwards
    assert main(["config", "--defaults"]) == 0
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE" and os.environ["OPENBLAS_THREAD_TIMEOUT"] == "4"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert main(["config", "--defaults"]) == 0
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
