"""The evaluation's files, from its per-sample tables (``per_sample.parquet``: the fixed-scale evaluation's
in ``evaluation/``, the calibrated one's in ``evaluation-calibrated/``): Table 1 at the fixed scale
and at the calibrated strengths, each unsigned (the paper's statistic), signed (with whether every
seed set agrees on the sign) and corrected for its noise floor, with heatmaps and the
disentanglement checks; PCA against random directions; image change; what edits leave alone; the
dose-response curves; ``summary.json``. One matching of directions to attributes
(:func:`evaluation.metrics.matched_attributes`) serves every one of them.

Files (under ``out``): ``table1{,_calibrated}.csv/.md/.png`` (|mean change| per seed set, averaged
over sets, ± std across sets), ``table1*_signed.csv/.png`` (the signed mean; ``<attr>_agree``: every
set moves it the same way), ``table1*_corrected.csv`` (the noise-corrected effect over all seeds;
``<attr>_floor``: the noise floor of Table 1's entry), ``disentanglement*.csv``, ``pca_vs_random.csv/.png``,
``image_change.csv``, ``preservation.csv``, ``dose_response.csv`` and ``dose_response-<family>.png``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from evaluation.dose import dose_response_plots
from evaluation.metrics import (
    bootstrap_effects,
    corrected_effect_matrix,
    disentanglement_summary,
    dose_response,
    effect_matrix,
    matched_attributes,
    noise_floor,
    own_attribute,
    pca_vs_random,
    sets_agree,
    table1_markdown,
)
from evaluation.plots import effect_heatmaps, pca_vs_random_plot
from evaluation.preservation import preservation_table
from pipeline.config import to_dict
from pipeline.errors import ConfigError
from pipeline.io import write_json_atomic, write_text_atomic

FAMILIES = (("original", "Original directions"), ("disentangled", "Disentangled directions"))


def table1_sections(keep: pd.DataFrame, scale: dict, signed: bool = False):
    """[(title, mean, std)] for the original and disentangled families, and the same as one
    table (family, direction, <attr>..., <attr>_std...); ``signed`` adds <attr>_agree columns."""
    sections, tables = [], []
    for family, title in FAMILIES:
        sub = keep[keep.family == family]
        if sub.empty:
            continue
        mean, std = effect_matrix(sub, scale, signed=signed)
        sections.append((title, mean, std))
        parts = [mean, std.add_suffix("_std")] + ([sets_agree(sub).add_suffix("_agree")] if signed else [])
        tables.append(pd.concat(parts, axis=1).rename_axis("direction").reset_index().assign(family=family))
    table = pd.concat(tables, ignore_index=True)
    return sections, table[["family", "direction"] + [c for c in table.columns if c not in ("family", "direction")]]


def corrected_table(keep: pd.DataFrame, scale: dict) -> pd.DataFrame:
    """Table 1 corrected for its noise floor (family, direction, <attr>..., <attr>_floor...)."""
    tables = []
    for family, _ in FAMILIES:
        sub = keep[keep.family == family]
        if not sub.empty:
            both = pd.concat([corrected_effect_matrix(sub, scale), noise_floor(sub, scale).add_suffix("_floor")], axis=1)
            tables.append(both.rename_axis("direction").reset_index().assign(family=family))
    table = pd.concat(tables, ignore_index=True)
    return table[["family", "direction"] + [c for c in table.columns if c not in ("family", "direction")]]


def table1_outputs(keep: pd.DataFrame, scale: dict, ev_cfg, out: Path, suffix: str = "") -> tuple[list, dict]:
    """Table 1 of the rows ``keep`` (csv, signed csv, corrected csv, markdown, heatmaps) and its
    disentanglement checks (``disentanglement<suffix>.csv``, with bootstrap intervals) -> (sections,
    summary counts, with the noise floor's range)."""
    mapping = to_dict(ev_cfg.own_attribute)
    families = dict(zip(keep.direction, keep.family))
    sections, table = table1_sections(keep, scale)
    signed_sections, signed_table = table1_sections(keep, scale, signed=True)
    corrected = corrected_table(keep, scale)
    unit = "in standard deviations of the unedited scores" if ev_cfg.normalize else "in score units"
    write_text_atomic(out / f"table1{suffix}.csv", table.to_csv(index=False))
    write_text_atomic(out / f"table1{suffix}_signed.csv", signed_table.to_csv(index=False))
    write_text_atomic(out / f"table1{suffix}_corrected.csv", corrected.to_csv(index=False))
    write_text_atomic(out / f"table1{suffix}.md", table1_markdown(sections, unit))
    effect_heatmaps(sections, out / f"table1{suffix}.png", unit)
    agree = signed_table.set_index("direction")
    masks = [agree.loc[m.index, [f"{a}_agree" for a in m.columns]].to_numpy(bool) for _, m, _ in signed_sections]
    effect_heatmaps(signed_sections, out / f"table1{suffix}_signed.png", unit, signed=True, agree=masks)
    all_mean = pd.concat([sec[1] for sec in sections])
    rows = keep[keep.family.isin(["original", "disentangled"])]
    boot = bootstrap_effects(rows, scale, ev_cfg.bootstrap, seed=0) if ev_cfg.bootstrap and len(rows) else None
    summary_rows = disentanglement_summary(all_mean, families, mapping, boot)
    write_text_atomic(out / f"disentanglement{suffix}.csv", summary_rows.to_csv(index=False))
    floors = corrected[[c for c in corrected.columns if c.endswith("_floor")]].to_numpy()
    summary = {"disentangled_own_strongest": None, "rows_with_lower_max_off_diagonal": None,
               "all_disentangled_own_strongest": None, "disentangling_lowers_max_off_diagonal": None,
               "noise_floor": {"median": float(np.nanmedian(floors)), "min": float(np.nanmin(floors)),
                               "max": float(np.nanmax(floors))},
               "sign_flips": int((~signed_table[[c for c in signed_table.columns if c.endswith("_agree")]]).to_numpy().sum())}
    if not summary_rows.empty:  # [how many pass, of how many], and whether all do
        summary.update(_check_counts(summary_rows, boot is not None, ev_cfg.bootstrap))
    return sections, summary


def _check_counts(summary_rows: pd.DataFrame, bootstrapped: bool, resamples: int) -> dict:
    disentangled = summary_rows[summary_rows.family == "disentangled"]
    compared = summary_rows.dropna(subset=["off_diagonal_vs_original"])
    own = [int(disentangled.own_is_strongest.sum()), len(disentangled)]
    lowered = [int((compared.off_diagonal_vs_original < 0).sum()), len(compared)]
    counts = {"disentangled_own_strongest": own, "rows_with_lower_max_off_diagonal": lowered,
              "all_disentangled_own_strongest": own[0] == own[1],
              "disentangling_lowers_max_off_diagonal": lowered[0] == lowered[1]}
    if bootstrapped:  # the same counts where the 95% bootstrap interval excludes 0
        counts.update({
            "bootstrap_resamples": int(resamples),
            "disentangled_own_strongest_ci": {
                "confirmed": int((disentangled.own_margin_ci_low > 0).sum()),
                "contradicted": int((disentangled.own_margin_ci_high < 0).sum()), "of": len(disentangled)},
            "rows_with_lower_max_off_diagonal_ci": {
                "confirmed": int((compared.off_diagonal_vs_original_ci_high < 0).sum()),
                "contradicted": int((compared.off_diagonal_vs_original_ci_low > 0).sum()), "of": len(compared)}})
    return counts


def prepare(per_sample: pd.DataFrame, ev_cfg) -> tuple[pd.DataFrame, dict, dict, dict, dict]:
    """What every file of the evaluation is computed from: (the rows with the measured attributes' changes,
    the normalising scales (std of the unedited scores), each direction's own attribute by name, each
    direction's matched attribute, the head of summary.json)."""
    attrs = [a[2:] for a in per_sample.columns if a.startswith("d_")]
    for col, empty in (("sae", False), ("target", ""), ("target_r", np.nan), ("calibrated", False), ("fig6", False)):
        per_sample[col] = per_sample[col].fillna(empty) if col in per_sample else empty  # parts of other versions
    # a direction's own attribute: evaluate.own_attribute, or the one an SAE feature was matched to
    mapping = {**to_dict(ev_cfg.own_attribute), **{d: t for d, t in zip(per_sample.direction, per_sample.target) if t}}
    measured = list(ev_cfg.attributes) or [a for a in dict.fromkeys(own_attribute(d, mapping) for d in per_sample.direction)
                                           if a in attrs]
    if not measured:
        raise ConfigError(f"evaluate.attributes is empty and no direction is named after a scorer attribute ({attrs}); "
                          f"list the attributes to measure")
    unedited = per_sample.drop_duplicates(["repeat", "seed"])
    scale = {a: float(unedited[f"o_{a}"].std(ddof=1)) if ev_cfg.normalize else 1.0 for a in measured}
    columns = ["repeat", "seed", "direction", "family", "scale", "pixel_change", "quality_before", "quality_after"]
    keep = per_sample[columns + [f"d_{a}" for a in measured]]
    matched = matched_attributes(keep, scale, mapping)  # every section's direction -> attribute
    unit = "in standard deviations of the unedited scores" if ev_cfg.normalize else "in score units"
    head = {"num_samples": int(ev_cfg.num_samples), "repeats": int(ev_cfg.repeats), "scale": float(ev_cfg.scale),
            "scorer": ev_cfg.scorer, "measured": measured, "unit": unit, "matched": matched}
    return keep, scale, mapping, matched, head


def summarise(per_sample: pd.DataFrame, ev_cfg, out: Path) -> dict:
    """The evaluation of the paper's pipeline: Table 1 at the fixed scale (csv + markdown, heatmaps,
    checks), image change, what edits leave alone, PCA vs random, summary.json."""
    keep, scale, mapping, matched, head = prepare(per_sample, ev_cfg)
    _, summary = table1_outputs(keep[per_sample.table1], scale, ev_cfg, out)
    summary = {**head, **summary}
    table_rows = keep[per_sample.table1 | per_sample.fig6]
    quality = table_rows.groupby("direction", sort=False)[["pixel_change", "quality_before", "quality_after"]].mean()
    write_text_atomic(out / "image_change.csv", quality.to_csv())
    fixed = per_sample[per_sample.table1 | per_sample.fig6]
    write_text_atomic(out / "preservation.csv", preservation_table(fixed, mapping, matched).to_csv(index=False))
    pvr = pca_vs_random(keep[per_sample.fig6], scale, matched)
    if not pvr.empty:
        write_text_atomic(out / "pca_vs_random.csv", pvr.to_csv(index=False))
        pca_vs_random_plot(pvr, out / "pca_vs_random.png")
        fam = pvr.groupby("family").effect_per_pixel_change.mean()
        summary["pca_effect_per_pixel"] = float(fam.get("pca", np.nan))
        summary["random_effect_per_pixel"] = float(fam.get("random", np.nan))
        if "random_pixel" in fam:
            summary["random_pixel_matched_effect_per_pixel"] = float(fam["random_pixel"])
    write_json_atomic(out / "summary.json", summary)
    return summary


def summarise_calibrated(per_sample: pd.DataFrame, ev_cfg, out: Path, sweep: list[int],
                         sections: dict | None = None) -> dict:
    """The further evaluation, from its own rows and the fixed-scale evaluation's (``per_sample``: both, the
    fixed-scale ones first: the unedited scores that normalise every table are theirs): Table 1 at the
    calibrated strengths (csv + markdown, heatmaps, checks), the dose-response curves on the ``sweep``
    seeds (every scale applied to them, fixed ones included), summary.json. ``sections``: name ->
    f(keep, scale), further entries of summary.json (the SAE family's)."""
    keep, scale, mapping, matched, head = prepare(per_sample, ev_cfg)
    summary, calibrated = dict(head), {}
    if per_sample.calibrated.any():
        cal = keep[per_sample.calibrated]
        _, cal_summary = table1_outputs(cal, scale, ev_cfg, out, "_calibrated")
        calibrated = {d: float(g.scale.iloc[0]) for d, g in cal.groupby("direction", sort=False)}
        summary["calibrated"] = {**cal_summary, "scales": calibrated}
    rows = keep[keep.seed.isin(sweep) & (keep.family != "random_pixel")]
    rows = rows.drop_duplicates(["repeat", "seed", "direction", "scale"])  # a fixed scale swept again: once
    for old in out.glob("dose_response*.png"):  # one figure per family: those of families no longer swept go
        old.unlink()
    if sweep and not rows.empty:
        curves = dose_response(rows, scale, mapping, matched=matched, calibrated=calibrated)
        write_text_atomic(out / "dose_response.csv", curves.to_csv(index=False))
        dose_response_plots(curves, out, head["unit"],
                            max(abs(m) for m in ev_cfg.sweep_multiples) if ev_cfg.sweep_multiples else 2.0)
        summary["dose_response"] = {"seeds": len(sweep), "directions": int(curves.direction.nunique())}
    for name, section in (sections or {}).items():
        summary[name] = section(keep, scale)
    write_json_atomic(out / "summary.json", summary)
    return summary
