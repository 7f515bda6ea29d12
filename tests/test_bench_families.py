"""bench/families.py's core on two tiny families, one round each: the rows it returns and its table
(what it measures is in docs/benchmarks.md; no timing threshold here)."""
from __future__ import annotations

import pytest

from conftest import load_bench

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest)


def test_bench_families_rows_have_their_fields_and_positive_times(tmp_path):
    """An unconditional latent family (LDM, the pipeline's own latents) and a text family (SD3, hspace's
    latents passed to the pipeline: the same images)."""
    bench = load_bench("families")
    rows = bench.run(["ldm", "sd3"], batch=2, steps=2, repeats=1, root=tmp_path)
    assert [(r["family"], r["device"]) for r in rows] == [("ldm", "cpu"), ("sd3", "cpu")]
    for r in rows:
        assert r["pipeline_s"] > 0 and r["hspace_s"] > 0
        assert r["ratio"] == pytest.approx(r["pipeline_s"] / r["hspace_s"])  # one round: median = that round
        assert r["ratio_min"] <= r["ratio"] <= r["ratio_max"] and r["target"] in ("yes", "median", "no")
        assert len(r["h_shape"]) >= 2
    assert rows[0]["max_abs_diff"] is None
    assert rows[1]["max_abs_diff"] < 1e-5, "the same latents, prompt and guidance: the same images"
    table = bench.table(rows).splitlines()
    assert len(table) == 4 and table[2].startswith("| ldm | cpu |") and table[3].startswith("| sd3 | cpu |")
