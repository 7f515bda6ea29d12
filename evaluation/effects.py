"""The report's sections on what the edits do (``<run_dir>/evaluation/``; ``<run_dir>/evaluation-calibrated/``
for the calibrated strengths): Table 1 at the fixed scale and at the calibrated strengths, each with its
noise floor stated, its signed version and the version corrected for the floor, and the disentanglement
checks; PCA against random directions (Fig. 6); image change and quality. Every data file named is
linked (copied into the report's ``data/``).
"""
from __future__ import annotations

import html
import json
from pathlib import Path

import pandas as pd

from evaluation.folders import CALIBRATED, FIXED
from evaluation.tables import df_html, matching_note, number, table1_html


def _summary(run_dir: Path, folder: str = FIXED) -> dict:
    path = Path(run_dir) / folder / "summary.json"
    return json.loads(path.read_text()) if path.exists() else {}


def checks_table(d: pd.DataFrame) -> pd.DataFrame:
    """disentanglement.csv for reading: the largest side effect with its attribute, and each
    check with its bootstrap interval in one cell ("0.38 [0.02, 0.65]")."""
    def f(v):
        return number(float(v), "{:.2f}")

    def with_ci(col):
        if f"{col}_ci_low" not in d:
            return [f(v) for v in d[col]]
        return [f"{f(v)} [{f(lo)}, {f(hi)}]" if pd.notna(v) and pd.notna(lo) else f(v)
                for v, lo, hi in zip(d[col], d[f"{col}_ci_low"], d[f"{col}_ci_high"])]
    return pd.DataFrame({
        "direction": d["direction"], "family": d["family"], "own effect": [f(v) for v in d["own_effect"]],
        "largest side effect": [f"{f(v)} ({a})" for v, a in zip(d["max_off_diagonal"], d["max_off_attribute"])],
        "own strongest": d["own_is_strongest"].map({True: "yes", False: "no"}),
        "own - largest side [95% CI]": with_ci("own_margin"),
        "side effect vs original [95% CI]": with_ci("off_diagonal_vs_original")})


def table1_block(page, ev: Path, suffix: str, summary: dict, counts: dict) -> None:
    """Table 1 of ``table1<suffix>.csv``: the table with its noise floor, the heatmap, the signed
    effects (caption: when they equal Table 1's magnitudes), the corrected table and the checks."""
    table = pd.read_csv(ev / f"table1{suffix}.csv")
    corrected = pd.read_csv(ev / f"table1{suffix}_corrected.csv") if (ev / f"table1{suffix}_corrected.csv").exists() else None
    floor = counts.get("noise_floor")
    if floor:
        page.note(f"<b>Noise floor.</b> |mean change| over a seed set is biased upward by noise: an edit with no "
                  f"effect on an attribute still scores about sqrt(2/&pi;) &middot; sd / sqrt(n) (sd: the spread of "
                  f"the seeds' changes, n: seeds per set). Here that floor is {floor['median']:.2f} SD (median over "
                  f"the cells; {floor['min']:.2f} to {floor['max']:.2f}). <span style='color:#9aa3ad'>Grey</span>: an "
                  f"entry within twice its floor (hover a cell for its floor; all floors: "
                  f"{page.data(ev / f'table1{suffix}_corrected.csv')}, columns <code>&lt;attribute&gt;_floor</code>). "
                  "The same effects corrected for the floor are below the heatmaps.")
    page.table(table1_html(table, corrected))
    page.note(f"Numbers: {page.data(ev / f'table1{suffix}.csv')} (± columns: <code>&lt;attribute&gt;_std</code>), "
              f"{page.data(ev / f'table1{suffix}.md')}.")
    page.image(ev / f"table1{suffix}.png", "Heatmaps of the same matrices; the strongest effect per row is outlined.")
    signed = ev / f"table1{suffix}_signed.csv"
    if signed.exists():
        n = summary.get("repeats", 0) * summary.get("num_samples", 0)
        flips = counts.get("sign_flips")
        flipped = (f"The {flips} cells marked ~ (in italics) change sign between seed sets: there Table 1's entry, "
                   "an average of magnitudes, is larger than the signed one and is mostly noise. ") if flips else ""
        page.image(ev / f"table1{suffix}_signed.png",
                   f"Which way each edit moves each attribute: the mean change over all {n or 'the'} seeds with its "
                   f"sign ({page.data(signed)}). Its magnitude equals Table 1's entry wherever every seed set moves "
                   f"the attribute the same way (column <code>&lt;attribute&gt;_agree</code>). {flipped}A side effect "
                   "that disentangling over-corrects changes sign.")
    if corrected is not None:
        page.add("<details><summary>Table 1 corrected for the noise floor</summary>")
        page.note("The effect over all seeds of every set, sqrt(max(mean<sup>2</sup> - var/n, 0)): the statistic of the "
                  "PCA section below, about 0 for a change that scatters around 0. "
                  f"{page.data(ev / f'table1{suffix}_corrected.csv')}.")
        page.table(table1_html(corrected, spread=False))
        page.add("</details>")
    checks = ev / f"disentanglement{suffix}.csv"
    if checks.exists():
        page.add("<h3>Disentanglement checks</h3>")
        d = pd.read_csv(checks)
        if "own_margin_ci_low" in d:
            page.note("<i>own - largest side</i>: above 0, the own effect is the strongest; <i>side effect vs "
                      "original</i>: the largest side effect minus the original direction's, below 0 when "
                      "disentangling lowered it. In brackets: 95% paired bootstrap interval "
                      f"({counts.get('bootstrap_resamples')} resamples of the seeds; every direction edits the "
                      "same seeds, so differences between rows keep their pairing). A check is confirmed (or "
                      f"contradicted) when its interval excludes 0. All columns: {page.data(checks)}.")
        page.table(df_html(checks_table(d)))


def table1_section(page, run_dir: Path) -> None:
    """Table 1 at the fixed scale."""
    ev, summary = Path(run_dir) / "evaluation", _summary(run_dir)
    if not (ev / "table1.csv").exists():
        return
    page.section("table1", "Table 1: effect of each edit on each attribute", "Table 1")
    page.note(f"Rows: applied direction; columns: measured attribute (the {html.escape(str(summary.get('scorer')))} "
              f"scorer), {html.escape(summary.get('unit', ''))}. Every direction at edit scale {summary.get('scale')} "
              f"on {summary.get('repeats')} disjoint sets of {summary.get('num_samples')} held-out seeds. Entry: "
              "|mean change| over a seed set, averaged over the sets, ± std across sets (the paper's statistic). "
              "Highlighted: the strongest effect of the row.")
    table1_block(page, ev, "", summary, summary)


CALIBRATED_TITLE = "Table 1 at calibrated strengths (matched own effect)"


def calibrated_section(page, run_dir: Path) -> None:
    """Table 1 at the calibrated strengths (matched own effect)."""
    ev, summary = Path(run_dir) / CALIBRATED, _summary(run_dir, CALIBRATED)
    if page.to_come(CALIBRATED, "calibrated", CALIBRATED_TITLE, "Calibrated") or not (ev / "table1_calibrated.csv").exists():
        return
    cal = summary.get("calibrated", {})
    page.section("calibrated", CALIBRATED_TITLE, "Calibrated")
    page.note("Each direction at the scale where it moves its own attribute by the calibration target (one standard "
              "deviation of the unedited scores by default), found on calibration seeds disjoint from these "
              "evaluation seeds (<code>hspace calibrate</code>). At matched own effect the rows compare: a "
              "disentangled direction is not helped or hurt by being shorter or longer than its original. Scales: "
              + html.escape(", ".join(f"{d} {s:.2f}" for d, s in cal.get("scales", {}).items())))
    for key, label in (("disentangled_own_strongest", "disentangled directions whose own effect is strongest"),
                       ("rows_with_lower_max_off_diagonal", "rows whose largest side effect disentangling lowers")):
        if cal.get(key):
            ci = cal.get(f"{key}_ci")
            extra = f" (95% CI: {ci['confirmed']} confirmed, {ci['contradicted']} contradicted)" if ci else ""
            page.note(f"{label}: {cal[key][0]} of {cal[key][1]}{extra}")
    table1_block(page, ev, "_calibrated", summary, cal)


def baselines_section(page, run_dir: Path) -> None:
    """PCA against random directions (Fig. 6), and image change and quality per edit."""
    ev, summary = Path(run_dir) / "evaluation", _summary(run_dir)
    if (ev / "pca_vs_random.csv").exists():
        page.section("pca-random", "PCA directions against random directions (Fig. 6)", "PCA vs random")
        pvr = pd.read_csv(ev / "pca_vs_random.csv")
        page.note("Per direction, the consistent change of its matched attribute (|mean change| over all held-out "
                  "seeds less its noise floor: sqrt(max(mean<sup>2</sup> - var/n, 0)); <i>|mean| per set</i> is the "
                  "largest uncorrected Table-1 value) per unit of mean absolute pixel change, for the top principal "
                  "directions, random directions with the same per-step norms (norm-matched), and the same random "
                  "directions rescaled until they change the images as much as their component (pixel-matched, "
                  "<code>-pixmatch</code>). A semantic direction moves attributes; a random one barely changes the "
                  "image at the same norm and degrades it at the same pixel change. " + matching_note(summary)
                  + f" Numbers: {page.data(ev / 'pca_vs_random.csv')}.")
        page.table(df_html(pvr, headers={"max_attribute_effect": "|mean| per set (largest)",
                                         "consistent_effect": "consistent change", "attribute": "matched attribute",
                                         "pixel_change": "pixel change", "effect_per_pixel_change": "per pixel change"}))
        page.image(ev / "pca_vs_random.png",
                   "Consistent attribute change per pixel change (left) and against pixel change (right).")
    if (ev / "image_change.csv").exists():
        page.section("quality", "Image change and quality per edit", "Quality")
        page.note("Mean absolute pixel change (in [0, 1] units) and the image-quality score before and after the edit "
                  "(MTCNN face probability for faces; the render error of the toy domain, lower is better), so that a "
                  f"direction that 'works' by destroying the image is visible. {page.data(ev / 'image_change.csv')}.")
        page.table(df_html(pd.read_csv(ev / "image_change.csv", index_col=0), index=True,
                           headers={"pixel_change": "pixel change", "quality_before": "quality before",
                                    "quality_after": "quality after"}))
