"""The report's sections on where semantics live and how many examples a direction needs:
the per-step probe curves (``probes/``), Fig. 8 as effect against n and the probe-step
restriction check (``fewshot/``). One call from pipeline.stages.report: ``add_sections(page, run_dir)``."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from evaluation.tables import df_html, number


def probe_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per attribute and space: the metric, the first and best steps' scores, chance, and the encoded steps."""
    rows = []
    for (attr, space), c in table.groupby(["attribute", "space"], sort=False):
        c = c.sort_values("step")
        best = c.loc[c.score.idxmax()] if c.score.notna().any() else None
        row = {"attribute": attr, "space": space, "metric": c.metric.iloc[0],
               "first step": float(c.score.iloc[0]), "last step": float(c.score.iloc[-1]),
               "best": float(best.score) if best is not None else float("nan"),
               "best step": int(best.step) if best is not None else -1, "chance": float(c.chance.iloc[0])}
        if space == "h" and "encoded" in c:
            row["encoded steps"] = step_ranges(c[c.encoded.astype(bool)].step)
        rows.append(row)
    return pd.DataFrame(rows).fillna("")


def step_ranges(steps) -> str:
    """Step indices as runs: [3, 4, 5, 9, 10, 12] -> "3-5, 9-10, 12"; none -> "none"."""
    steps = sorted(int(s) for s in steps)
    runs: list[list[int]] = []
    for s in steps:
        if runs and s == runs[-1][-1] + 1:
            runs[-1].append(s)
        else:
            runs.append([s])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs) or "none"


def effect_table(curve: pd.DataFrame) -> pd.DataFrame:
    """effect_vs_n.csv -> one row per attribute and space, one column per n: "effect ± std" over the
    draws, or "effect (1 draw)" where there was one (n = the whole selection: no spread to show)."""
    draws = curve["draws"] if "draws" in curve else pd.Series(2, index=curve.index)
    cells = curve.assign(cell=[f"{number(e, '{:.2f}')} ± {s:.2f}" if k > 1 else f"{number(e, '{:.2f}')} (1 draw)"
                               for e, s, k in zip(curve.effect, curve.effect_std, draws)])
    table = cells.pivot_table(index=["attribute", "space"], columns="n", values="cell", aggfunc="first", sort=False)
    table.columns = [f"n={n}" for n in table.columns]
    return table.reset_index().fillna("")


PROBES_TITLE = "Where semantics live: per-step linear probes"
FIG8_TITLE = "Fig. 8 as numbers: attribute change against the number of examples"


def add_sections(page, run_dir) -> None:
    """Append the probe and Fig. 8 sections to a report ``page`` (pipeline.stages.report.Page) when the
    run holds their outputs; each says it is still to come while its stage is (``page.pending``)."""
    run_dir = Path(run_dir)
    probes = run_dir / "probes"
    if not page.to_come("probes", "probes", PROBES_TITLE, "Probes") and (probes / "probes.csv").exists():
        table = pd.read_csv(probes / "probes.csv")
        page.section("probes", PROBES_TITLE, "Probes")
        page.note("For every attribute and sampling step, a linear model reads the attribute from h<sub>t</sub> "
                  "(solid) and from x<sub>t</sub>, the latent entering that step (dashed): held-out accuracy for a "
                  "binary attribute, R<sup>2</sup> for a continuous one, on a fixed train/test split by sample id "
                  "(features standardised and PCA-reduced on the training samples). Dotted: chance. Circled: the "
                  "steps where the h probe counts the attribute as encoded (<code>probe.encoded_fraction</code> of "
                  "the best step's score above chance), which <code>supervised.restrict_steps</code> keeps.")
        page.image(probes / "probes.png", "Held-out probe score against the sampling step.", name="probes.png")
        page.note("Below, per attribute and space: the score at the first and last step, the best step and its score, "
                  "chance, and the steps counted as encoded (runs of step indices, 0 the first step). R<sup>2</sup> "
                  "below 0 means the probe predicts worse than the attribute's mean (shown to 3 decimals: a value "
                  f"that rounds to 0 shows as 0.000). All steps: {page.data(probes / 'probes.csv')}.")
        page.table(df_html(probe_summary(table)))
    fewshot = run_dir / "fewshot"
    to_come = page.to_come("fewshot", "fig8", FIG8_TITLE + " (and the probe-step restriction)", "Fig. 8")
    if not to_come and (fewshot / "effect_vs_n.csv").exists():
        curve = pd.read_csv(fewshot / "effect_vs_n.csv")
        page.section("fig8", FIG8_TITLE, "Fig. 8")
        page.note("The change of its own attribute produced by a supervised direction estimated from n random "
                  "top and n random bottom samples of the selection (eq. 10), in h-space and in x<sub>T</sub> "
                  "space, applied to held-out seeds (disjoint from every selected sample) and read by the scorer, "
                  "in standard deviations of the attribute over the run's samples. Each direction is rescaled to "
                  "the norm of the direction from the whole selection, so n changes only where it points. Bars and ±: "
                  "spread (std) over the random draws of the n samples; where n is the whole selection there is one "
                  f"draw and no spread (\"1 draw\"). {page.data(fewshot / 'effect_vs_n.csv')}.")
        page.image(fewshot / "effect_vs_n.png", "Mean own-attribute change against n per side.", name="effect_vs_n.png")
        page.table(df_html(effect_table(curve)))
    if not to_come and (fewshot / "restriction.csv").exists():
        page.section("restriction", "Supervised directions restricted to the probe's steps", "Probe steps")
        page.note("Each supervised direction applied on the same held-out seeds at the same scale over all steps, "
                  "and zeroed outside the steps where the probe finds its attribute encoded: own effect, the "
                  "largest side effect (in std of the attributes) and the mean absolute pixel change. "
                  f"{page.data(fewshot / 'restriction.csv')}.")
        page.table(df_html(pd.read_csv(fewshot / "restriction.csv")))
    preservation = run_dir / "evaluation" / "preservation.csv"
    if preservation.exists():
        page.section("preservation", "What an edit should leave alone", "Left alone")
        page.note("Per direction, the mean over the held-out faces of |change| of each scorer attribute that is not "
                  "the direction's own (its matched attribute, as in every section; in std of the unedited scores): "
                  "<i>untouched</i> averages them, "
                  "<i>largest</i> names the worst. Table 1 counts the side effect all faces share (|mean change|); "
                  "this counts each face's disturbance, which cancels in a mean. <i>background_changed</i>: share "
                  "of faces whose toy background class changed. <i>identity</i> (with "
                  "<code>evaluate.identity_weights</code>): cosine of face embeddings before and after the edit. "
                  f"{page.data(preservation)}.")
        page.table(df_html(pd.read_csv(preservation)))
    convergence = run_dir / "directions" / "convergence.png"
    if convergence.exists():
        page.add("<details><summary>Cosine to the direction from the whole selection</summary>")
        page.note("Cosine between the direction from n random top/bottom samples and from all of them. It reaches "
                  "1 at the selection's size by construction, and for directions of pure noise it would follow "
                  "sqrt(n/N): it measures how stable the estimate is, not whether it edits the attribute (the "
                  "section above does).")
        page.image(convergence, "mean ± std over random draws")
        page.add("</details>")

