"""bench/stage_paths.py's core for one round at batch 2, T=2: one row per stage path, each with the U-Net
evaluations the path must do and positive rates (what it measures is in docs/benchmarks.md; no timing
threshold here)."""
from __future__ import annotations

import pytest

from conftest import load_bench

pytestmark = pytest.mark.usefixtures("one_thread")  # batches of 2 (conftest)


def test_bench_stage_paths_rows_count_each_paths_unet_work():
    bench = load_bench("stage_paths")
    B, T = 2, 2
    result = bench.run(batch=B, steps=T, rounds=1)
    assert result["plain_unet_evaluations"] == B * T
    assert result["max_abs_diff"] < 1e-5, "plain diffusers from hspace's x_T of the same seeds: the same images"
    # images per call: calibration S = min(8, B) seeds x K directions; fewshot S = 1 seed x (1 + 1 edit);
    # evaluate S = 1 seed x (1 unedited + 1 edit); Asyrp: a second pass at every edited step (all T)
    want = {"generate": (B, B * T), "edit, symmetric": (B, B * T), "edit, Asyrp": (B, 2 * B * T),
            "calibration round, full": (2, 2 * T), "calibration round, 3/4": (2, 2 * T),
            "fewshot h": (2, 2 * T), "fewshot x_T": (2, 2 * T), "evaluate": (2, 2 * T)}
    assert [r["name"] for r in result["rows"]] == list(want)
    for r in result["rows"]:
        assert (r["images"], r["unet_evaluations"]) == want[r["name"]], r["name"]
        assert r["unet_evaluations"] == r["expected"], r["name"]
        assert len(r["sides_wall"]) == len(r["sides_cpu"]) == 2 and min(r["sides_cpu"]) > 0
        for key in ("wall", "cpu", "fraction_wall", "fraction_cpu"):
            assert len(r[key]) == 1 and r[key][0] > 0, (r["name"], key)
    assert len(result["plain"]["wall"]) == len(want) + 1 and min(result["plain"]["cpu"]) > 0
    table = bench.table(result).splitlines()
    assert table[4].startswith("| plain diffusers") and len(table) == 5 + len(want)
    assert table[-1].startswith("| evaluate | 2 | 4 |")
