"""The report of a small main job: read in a real browser (headless Debian chromium, as the explore test
drives it), and its numbers checked against each other (one matching of directions to attributes,
the signed Table 1 against Table 1).

One small run (`hspace run` on the tiny random U-Net with the brightness annotator) serves every
test of the module.
"""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from test_run import tiny_run_args

from conftest import hspace


def run_args(run_dir, model_dir) -> list[str]:
    """test_run's small main job, with a dose-response sweep and a short calibration."""
    return [*tiny_run_args(run_dir, model_dir), "edit.seeds=[1000000,1000001]", "evaluate.num_samples=4",
            "evaluate.sweep_samples=3", "evaluate.bootstrap=50", "calibrate.num_samples=3", "calibrate.std_samples=6",
            "calibrate.max_iter=2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir):
    """The run directory of one small `hspace run`, and the command line it was made with."""
    cwd = tmp_path_factory.mktemp("report-run")
    args = ["run", *run_args(cwd / "run", tiny_model_dir)]
    hspace(*args, cwd=cwd)
    return cwd / "run", shlex.join(["hspace", *args])


# ---------------------------------------------------------------------- the numbers agree
@pytest.mark.slow
def test_every_section_matches_a_direction_to_the_same_attribute(run):
    run_dir, _ = run
    ev, later = run_dir / "evaluation", run_dir / "evaluation-calibrated"
    summary = json.loads((ev / "summary.json").read_text())
    pvr = pd.read_csv(ev / "pca_vs_random.csv").set_index("direction")
    dose = pd.read_csv(later / "dose_response.csv")
    matched = summary["matched"]
    assert json.loads((later / "summary.json").read_text())["matched"] == matched  # both parts match alike
    assert {"pc1", "pc2", "random1", "random2"} <= set(pvr.index) and set(pvr.index) <= set(matched)
    for direction, attribute in pvr.attribute.items():
        assert attribute == matched[direction], direction
    for direction, g in dose.groupby("direction"):
        assert set(g.attribute) == {matched[direction]}, direction
    for direction in ("bright", "red", "bright|red"):
        assert matched[direction] == direction.split("|")[0]
    page = (run_dir / "report" / "index.html").read_text()
    assert page.count("evaluation.metrics.matched_attributes") >= 2  # said in the dose-response and Fig. 6 sections


@pytest.mark.slow
def test_the_signed_table_reproduces_table1_where_its_caption_says(run):
    run_dir, _ = run
    for suffix in ("", "_calibrated"):
        ev = run_dir / ("evaluation-calibrated" if suffix else "evaluation")
        table = pd.read_csv(ev / f"table1{suffix}.csv").set_index("direction")
        signed = pd.read_csv(ev / f"table1{suffix}_signed.csv").set_index("direction")
        attrs = [c for c in table.columns if c not in ("family",) and not c.endswith("_std")]
        agree = signed[[f"{a}_agree" for a in attrs]].to_numpy(bool)
        magnitude, unsigned = signed[attrs].abs().to_numpy(), table[attrs].to_numpy()
        np.testing.assert_allclose(magnitude[agree], unsigned[agree], rtol=1e-9, atol=1e-12)
        assert (magnitude[~agree] < unsigned[~agree]).all()  # the sets disagree: |mean of x_r| < mean of |x_r|
        # the agreement is the signs of the per-set means, recomputed from the per-sample table
        per = pd.read_parquet(ev / "per_sample.parquet")
        per = per[per.table1] if not suffix else per[per.calibrated]
        per = per[per.family.isin(["original", "disentangled"])]
        sets = per.groupby(["direction", "repeat"])[[f"d_{a}" for a in attrs]].mean()
        for d in signed.index:
            means = sets.loc[d].to_numpy()
            expected = (means >= 0).all(axis=0) | (means <= 0).all(axis=0)
            assert list(signed.loc[d, [f"{a}_agree" for a in attrs]]) == list(expected), d
    page = (run_dir / "report" / "index.html").read_text()
    assert "Its magnitude equals Table 1's entry wherever every seed set moves the attribute the same way" in page
    assert "Noise floor." in page and "corrected for the noise floor" in page


@pytest.mark.slow
def test_the_report_folder_is_complete_and_reproduces_its_configuration(run):
    from pipeline.config import load_config, to_yaml

    run_dir, command = run
    report = run_dir / "report"
    cfg = load_config(str(report / "data" / "config-resolved.yaml"))  # the resolved configuration loads as it is
    assert to_yaml(cfg) == (report / "data" / "config-resolved.yaml").read_text()
    assert cfg.run_dir == str(run_dir) and cfg.select.n == 5
    for name in ("table1.csv", "table1_signed.csv", "table1_corrected.csv", "table1_calibrated.csv", "dose_response.csv",
                 "pca_vs_random.csv",
                 "confounds.csv", "per_sample.parquet", "annotations.parquet", "selection.parquet", "timings.json"):
        assert (report / "data" / name).is_file(), name
    np.testing.assert_array_equal(pd.read_csv(report / "data" / "table1.csv").select_dtypes("number"),
                                  pd.read_csv(run_dir / "evaluation" / "table1.csv").select_dtypes("number"))


# ---------------------------------------------------------------------- the page in a browser
FIGURES = """() => [...document.querySelectorAll('figure img')].map(img => {
    const r = img.getBoundingClientRect(), a = img.closest('a');
    return {src: img.getAttribute('src'), width: r.width, href: a ? a.getAttribute('href') : null};
})"""


def text_height(png: Path, displayed_width: float) -> float:
    """The smallest text of a figure as displayed, in CSS pixels: its font size (points, written by
    save_figure) at the PNG's DPI, scaled by displayed width over the PNG's width."""
    with Image.open(png) as im:
        dpi, points, width = im.info["dpi"][0], float(im.info["hspace:min_font_pt"]), im.size[0]
    return points * dpi / 72 * displayed_width / width


@pytest.mark.slow
@pytest.mark.parametrize("width", [1000, 1400])
def test_the_report_reads_at_the_page_width(run, browser, width):
    """No sideways scrolling; every figure's smallest text at least 9 px as shown and a link to its PNG;
    every data file named on the page a working link inside report/; the command line on the page;
    a followed link lands below the sticky bar."""
    run_dir, command = run
    report = run_dir / "report"
    page = browser.new_page(viewport={"width": width, "height": 900})
    page.goto((report / "index.html").as_uri())
    assert page.evaluate("document.documentElement.scrollWidth") <= width
    page.evaluate("document.querySelectorAll('details').forEach(d => d.open = true)")  # every figure shown
    assert page.evaluate("document.documentElement.scrollWidth") <= width
    figures = page.evaluate(FIGURES)
    assert len(figures) >= 15
    heights = []
    for f in figures:
        assert f["href"] == f["src"], f  # the figure is a link to its full-size file
        png = report / f["src"]
        assert png.is_file() and png.resolve().is_relative_to(report.resolve())
        heights.append((text_height(png, f["width"]), f["src"]))
    assert min(heights)[0] >= 9, sorted(heights)[:5]
    # every CSV/Parquet/JSON/YAML named in the text is the text of a link to a file inside report/
    named = set(re.findall(r"[\w.-]+\.(?:csv|parquet|json|yaml)\b", page.inner_text("main")))
    links = {a["text"]: a["href"] for a in page.evaluate(
        "() => [...document.querySelectorAll('main a')].map(a => ({text: a.innerText, href: a.getAttribute('href')}))")}
    assert {"table1.csv", "dose_response.csv", "config-resolved.yaml"} <= named
    for name in named:
        assert name in links, f"{name} is named but not linked"
        target = (report / links[name]).resolve()
        assert target.is_file() and target.is_relative_to(report.resolve()), name
    assert command in page.inner_text("#provenance pre")
    # followed links land below the sticky navigation bar (stuck to the top once scrolled)
    for anchor in ("table1", "dose-response", "edits", "annotators"):
        page.click(f'nav a[href="#{anchor}"]')
        page.wait_for_timeout(100)
        nav_bottom = page.evaluate("document.querySelector('nav').getBoundingClientRect().bottom")
        top = page.evaluate(f"document.querySelector('#{anchor} h2').getBoundingClientRect().top")
        assert nav_bottom <= 90 and nav_bottom <= top <= nav_bottom + 60, (anchor, top, nav_bottom)
    if width == 1000:
        page.screenshot(path=str(run_dir / "report-1000.png"), full_page=False)
    page.close()
