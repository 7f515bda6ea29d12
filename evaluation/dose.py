"""Dose-response and calibrated strengths in the report: the curves (own effect against the largest
side effect and against image damage, one panel per family), Table 1 at the calibrated strengths
beside the fixed-scale one, and the choices of ``disentangle.pairs: auto``.

Read from ``<run_dir>/evaluation/`` (``dose_response.csv``, ``table1_calibrated.*``) and the
directions files' params (``calibration``, ``auto``); one function per output so that the report
calls :func:`report_section` once.
"""
from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import pandas as pd

from evaluation.tables import df_html, table1_html
from pipeline.formats.figures import plt, save_figure

FAMILY_TITLES = {"original": "supervised (eq. 10)", "disentangled": "disentangled (eq. 11)",
                 "pca": "PCA (matched to the attribute each moves most)", "random": "random, norm-matched"}


def dose_response_plot(curves: pd.DataFrame, out: Path, unit: str) -> Path:
    """Two rows of panels, one column per family: own effect (x) against the largest side effect,
    and against the mean pixel change; one line per direction through its scales (0 included),
    95% bootstrap intervals over the seeds as bars."""
    families = [f for f in FAMILY_TITLES if f in set(curves.family)]
    fig, axes = plt.subplots(2, len(families), figsize=(3.3 * len(families), 6.2), squeeze=False, layout="constrained")
    for col, family in enumerate(families):
        sub = curves[curves.family == family]
        for i, (direction, g) in enumerate(sub.groupby("direction", sort=False)):
            g = g.sort_values("scale")
            color = plt.get_cmap("tab10")(i % 10)
            label = direction if family in ("original", "disentangled") else f"{direction} ({g.attribute.iloc[0]})"
            for row, (y, lo, hi) in enumerate((("side", "side_low", "side_high"),
                                               ("pixel_change", "pixel_change_low", "pixel_change_high"))):
                ax = axes[row][col]
                xerr = np.abs(np.vstack([g.own - g.own_low.fillna(g.own), g.own_high.fillna(g.own) - g.own]))
                yerr = np.abs(np.vstack([g[y] - g[lo].fillna(g[y]), g[hi].fillna(g[y]) - g[y]]))
                ax.errorbar(g.own, g[y], xerr=xerr, yerr=yerr, fmt="-o", ms=3, lw=1, elinewidth=0.6, color=color,
                            label=label if row == 0 else None)
        axes[0][col].set_title(FAMILY_TITLES[family], fontsize=9)
        axes[0][col].legend(fontsize=6)
        for row, ylabel in enumerate(("largest side effect", "mean pixel change")):
            ax = axes[row][col]
            ax.axvline(0, color="0.8", lw=0.8)
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
            ax.set_xlabel("own effect (signed)", fontsize=8)
            if col == 0:
                ax.set_ylabel(ylabel, fontsize=8)
    fig.suptitle(f"Dose-response: effects {unit}", fontsize=9)
    return save_figure(fig, out)


def auto_choices(run_dir: Path) -> pd.DataFrame:
    """One row per direction ``disentangle.pairs: auto`` decided on: what it was conditioned on and the
    measured changes of the other attributes (in std, at its calibrated strength, calibration seeds)."""
    from pipeline.formats.directions import load_directions

    path = Path(run_dir) / "directions" / "disentangled.safetensors"
    if not path.exists():
        return pd.DataFrame()
    auto = load_directions(path).params.get("auto")
    if not auto:
        return pd.DataFrame()
    rows = []
    for primary, ch in auto["choices"].items():
        effects = ", ".join(f"{a} {v:+.2f}" for a, v in ch["effects"].items())
        rows.append({"direction": primary, "conditioned on": ", ".join(ch["conditioned_on"]) or "nothing (left as it is)",
                     "entanglement (std)": ", ".join(f"{n} {v:+.2f}" for n, v in ch["entanglement"].items()) or "",
                     "all changes at the calibrated strength (std)": effects})
    return pd.DataFrame(rows).assign(threshold=auto["threshold"])


def report_section(page, run_dir: Path) -> None:
    """The report's dose-response section: calibrated Table 1, the curves, auto's choices."""
    ev = Path(run_dir) / "evaluation"
    summary = json.loads((ev / "summary.json").read_text()) if (ev / "summary.json").exists() else {}
    if (ev / "table1_calibrated.csv").exists():
        page.section("calibrated", "Table 1 at calibrated strengths (matched own effect)")
        cal = summary.get("calibrated", {})
        page.note("Each direction at the scale where it moves its own attribute by the calibration target (one standard "
                  "deviation of the unedited scores by default), found on calibration seeds disjoint from these "
                  "evaluation seeds and stored in the directions files. At matched own effect the rows compare: a "
                  "disentangled direction is not helped or hurt by being shorter or longer than its original. Scales: "
                  + html.escape(", ".join(f"{d} {s:.2f}" for d, s in cal.get("scales", {}).items())))
        page.add(table1_html(pd.read_csv(ev / "table1_calibrated.csv")))
        for key, label in (("disentangled_own_strongest", "disentangled directions whose own effect is strongest"),
                           ("rows_with_lower_max_off_diagonal", "rows whose largest side effect disentangling lowers")):
            if cal.get(key):
                ci = cal.get(f"{key}_ci")
                extra = f" (95% CI: {ci['confirmed']} confirmed, {ci['contradicted']} contradicted)" if ci else ""
                page.note(f"{label}: {cal[key][0]} of {cal[key][1]}{extra}")
        page.image(ev / "table1_calibrated_signed.png", "Signed effects at the calibrated strengths.")
    if (ev / "dose_response.csv").exists():
        page.section("dose-response", "Dose-response")
        page.note("Every direction at a sweep of scales on the first "
                  f"{summary.get('dose_response', {}).get('seeds', '?')} evaluation seeds: its own attribute's change "
                  "against the largest change of any other attribute (top) and against the mean pixel change (bottom); "
                  "bars are 95% bootstrap intervals over the seeds. A good direction climbs along the x axis and stays "
                  "low. PCA and random directions are matched to the attribute they move most. All numbers, with the "
                  "quality score: <code>evaluation/dose_response.csv</code>.")
        page.image(ev / "dose_response.png", "own effect against side effect (top) and image change (bottom)")
    choices = auto_choices(run_dir)
    if not choices.empty:
        page.add("<h3>disentangle.pairs: auto</h3>")
        page.note(f"Each direction conditioned (eq. 11) on the directions whose attributes it moves by at least "
                  f"{choices.threshold.iloc[0]} std and 2 standard errors at its calibrated strength, measured on the "
                  "calibration seeds; a direction with none is left as it is.")
        page.add(df_html(choices.drop(columns="threshold")))
    strips = sorted(p for p in (ev / "strips").glob("*/*.png")) if (ev / "strips").is_dir() else []
    if strips:
        page.section("sweep-strips", "Edit strips of the evaluated directions")
        page.note("Rows: held-out seeds (edit.seeds, the first evaluation seeds); columns: the sweep's scales (0 = "
                  "unedited; a calibrated direction also at its calibrated strength and the fixed scale). The images "
                  "are those the dose-response above was measured on.")
        for folder in ("supervised", "disentangled", "pca", "pca_random"):
            pngs = sorted((ev / "strips" / folder).glob("*.png"))
            if pngs:
                page.add(f"<h3>{html.escape(folder)}</h3><div class=\"grid\">")
                for png in pngs:
                    page.image(png, png.stem, name=f"sweep-{folder}-{png.name}")
                page.add("</div>")
