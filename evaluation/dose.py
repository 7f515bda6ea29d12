"""Dose-response in the report: the curves (one figure per family: own effect, largest side effect and
image change against the edit's strength), and the choices of ``disentangle.pairs: auto``.

Read from ``<run_dir>/evaluation-calibrated/dose_response.csv`` and the directions files' params (``auto``);
the report calls :func:`report_section` once.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.ticker import FuncFormatter, MaxNLocator

from evaluation.folders import CALIBRATED
from evaluation.tables import df_html, matching_note
from pipeline.formats.figures import plt, save_figure, styled

FAMILY_TITLES = {"original": "supervised (eq. 10)", "disentangled": "disentangled (eq. 11)",
                 "pca": "PCA", "random": "random, norm-matched"}
#: (column, its interval's columns, panel title) of the dose-response panels
PANELS = (("own", "its own attribute's change"), ("side", "largest side effect"),
          ("pixel_change", "mean pixel change"))


def dose_response_path(out: Path, family: str) -> Path:
    return Path(out) / f"dose_response-{family}.png"


def dose_response_plots(curves: pd.DataFrame, out: Path, unit: str, max_multiple: float = 2.0) -> list[Path]:
    """One figure per family (``dose_response-<family>.png``): three panels against the edit's
    strength (in multiples of each direction's calibrated strength where it has one, up to
    ``max_multiple``: the sweep, not Table 1's fixed scale; else its scale): the own attribute's
    signed change, the largest side effect and the mean pixel change; one line per direction (its
    matched attribute named where it has no name of its own), moved sideways a little so that the
    bars do not hide each other; 95% bootstrap intervals over the seeds as bars."""
    return [_family_plot(curves[curves.family == f], f, dose_response_path(out, f), unit, max_multiple)
            for f in FAMILY_TITLES if f in set(curves.family)]


@styled
def _family_plot(sub: pd.DataFrame, family: str, path: Path, unit: str, max_multiple: float) -> Path:
    multiples = sub.multiple.notna().all()
    if multiples:
        sub = sub[sub.multiple.abs() <= max_multiple * (1 + 1e-6)]
    span = float((sub.multiple if multiples else sub.scale).abs().max() or 1.0)
    names = list(dict.fromkeys(sub.direction))
    fig, axes = plt.subplots(1, 3, figsize=(8.6, 3.4), layout="constrained")
    for i, (direction, g) in enumerate(sub.groupby("direction", sort=False)):
        g = g.sort_values("scale")
        x = (g.multiple if multiples else g.scale) + 0.025 * span * (i - (len(names) - 1) / 2)
        label = direction if family in ("original", "disentangled") else f"{direction} → {g.attribute.iloc[0]}"
        color, marker = plt.get_cmap("tab10")(i % 10), "osD^vP*X"[i % 8]
        for ax, (y, _) in zip(axes, PANELS):
            yerr = np.abs(np.vstack([g[y] - g[f"{y}_low"].fillna(g[y]), g[f"{y}_high"].fillna(g[y]) - g[y]]))
            ax.errorbar(x, g[y], yerr=yerr, fmt="-", marker=marker, ms=5, lw=1.2, elinewidth=0.8, capsize=2,
                        color=color, label=label if ax is axes[0] else None)
    for ax, (_, title) in zip(axes, PANELS):
        ax.set_title(title)
        ax.axvline(0, color="0.8", lw=0.8)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: _tick(v, multiples)))
        ax.set_xlabel("× calibrated strength" if multiples else "scale (SD along the direction)")
    axes[0].axhline(0, color="0.8", lw=0.8)
    axes[0].set_ylabel("change (SD)" if "standard" in unit else "change")
    fig.legend(loc="outside lower center", ncol=min(3, sub.direction.nunique()), frameon=False)
    fig.suptitle(f"Dose-response of the {FAMILY_TITLES[family]} directions")
    return save_figure(fig, path)


def _tick(value: float, multiples: bool) -> str:
    if value == 0:
        return "0"
    return f"{value:+g}×" if multiples else f"{value:+g}"


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
    """The report's dose-response section: the curves of every family, auto's choices."""
    ev = Path(run_dir) / CALIBRATED
    summary = json.loads((ev / "summary.json").read_text()) if (ev / "summary.json").exists() else {}
    to_come = page.to_come(CALIBRATED, "dose-response", "Dose-response")
    if not to_come and (ev / "dose_response.csv").exists():
        page.section("dose-response", "Dose-response")
        page.note("Every direction at a sweep of strengths on the first "
                  f"{summary.get('dose_response', {}).get('seeds', '?')} evaluation seeds, one figure per family. "
                  "x: the strength, in multiples of each direction's calibrated strength (+1&times; moves its own "
                  "attribute by the calibration target on the calibration seeds; Table 1's fixed scale, a larger "
                  "multiple, is in the CSV, not on these axes), or for PCA and random directions the scale in standard "
                  "deviations along the direction. Panels: the signed change of the direction's own attribute, the "
                  "largest noise-corrected |mean change| of any other attribute, the mean absolute pixel change. Bars: "
                  "95% bootstrap intervals over the seeds. A good direction climbs in the first panel and stays low "
                  "in the other two. " + matching_note(summary) + f" All numbers, with the quality score: "
                  f"{page.data(ev / 'dose_response.csv')}.")
        for family, title in FAMILY_TITLES.items():
            page.image(dose_response_path(ev, family), f"Dose-response of the {title} directions.")
    choices = auto_choices(run_dir)
    if not choices.empty:
        page.add("<h3>disentangle.pairs: auto</h3>")
        page.note(f"Each direction conditioned (eq. 11) on the directions whose attributes it moves by at least "
                  f"{choices.threshold.iloc[0]} std and 2 standard errors at its calibrated strength, measured on the "
                  "calibration seeds; a direction with none is left as it is.")
        page.table(df_html(choices.drop(columns="threshold")))
