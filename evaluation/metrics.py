"""The arithmetic of the evaluation (paper Table 1), as pure functions on tables.

The per-sample table has one row per (repeat, seed, direction) with, for every measured
attribute ``a``, the score change ``d_<a>`` (edited minus original), plus ``pixel_change``
and the image-quality score before/after. From it:

- the **effect matrix**: rows = applied direction, columns = measured attribute, entry =
  |mean score change| over a seed set, averaged over repeated seed sets (its spread across
  sets is the reported standard deviation); optionally in units of the attribute's standard
  deviation over the unedited samples, so attributes with different ranges compare;
- the **strongest effect per row**, marked as in the paper's Table 1; the same matrix signed
  (which way each edit moves each attribute) beside it, with whether every seed set agrees on the
  sign (where they do, the signed entry's magnitude is Table 1's entry exactly);
- Table 1's **noise floor** (``noise_floor``): |mean| over a seed set of n is biased upward by
  about sqrt(2/pi) * sd / sqrt(n) when the true change is 0, so Table 1 is also given corrected
  for it (``corrected_effect_matrix``: the PCA section's statistic, over all seeds);
- the **matching** of each direction to "its" attribute (``matched_attributes``), one rule used by
  every table and plot: a named direction's own attribute, else the one it moves most consistently;
- **PCA vs random** (paper Fig. 6 as a number): consistent attribute change per unit of pixel
  change, where the consistent change is |mean| corrected for its noise floor
  (``consistent_abs_mean``): a direction whose per-sample changes cancel has none;
- **bootstrap intervals** for the disentanglement checks: seeds are resampled within each
  seed set, the same resample for every direction (all directions edit the same seeds), so a
  comparison between two rows keeps its pairing and its interval is as narrow as the data allow.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.methods.calibration import own_attribute, primary_direction  # the naming rules live with the calibration


def attribute_columns(per_sample: pd.DataFrame) -> list[str]:
    return [c[2:] for c in per_sample.columns if c.startswith("d_")]


def effect_matrix(per_sample: pd.DataFrame, scale: dict[str, float] | None = None,
                  signed: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(mean, std) matrices, index = direction (in order of appearance), columns = attributes.

    Entry = |mean over the seed set of the score change| / scale[attribute], then mean and std
    across repeats (std is 0 with a single repeat). ``signed``: without the absolute value,
    so that it shows which way an edit moves each attribute (a side effect that disentangling
    over-corrects changes sign)."""
    attrs = attribute_columns(per_sample)
    scale = scale or {}
    per_repeat = per_sample.groupby(["direction", "repeat"], sort=False)[[f"d_{a}" for a in attrs]].mean()
    per_repeat = per_repeat if signed else per_repeat.abs()
    per_repeat.columns = attrs
    for a in attrs:
        per_repeat[a] = per_repeat[a] / scale.get(a, 1.0)
    order = list(dict.fromkeys(per_sample["direction"]))
    grouped = per_repeat.groupby(level="direction", sort=False)
    mean = grouped.mean().reindex(order)
    std = grouped.std(ddof=1).reindex(order).fillna(0.0)
    return mean, std


def sets_agree(per_sample: pd.DataFrame) -> pd.DataFrame:
    """Per (direction, attribute): whether the mean change has the same sign in every seed set (a
    zero mean counts with either sign). Where it does, ``effect_matrix``'s unsigned entry equals the
    magnitude of its signed one (mean of |x_r| = |mean of x_r| exactly when the x_r share a sign)."""
    attrs = attribute_columns(per_sample)
    per_repeat = per_sample.groupby(["direction", "repeat"], sort=False)[[f"d_{a}" for a in attrs]].mean()
    per_repeat.columns = attrs
    grouped = per_repeat.groupby(level="direction", sort=False)
    agree = (grouped.min() >= 0) | (grouped.max() <= 0)
    return agree.reindex(list(dict.fromkeys(per_sample["direction"])))


def noise_floor(per_sample: pd.DataFrame, scale: dict[str, float] | None = None) -> pd.DataFrame:
    """What ``effect_matrix``'s entry would be with no true change: per seed set, E|mean| of n
    zero-mean changes of their spread, sqrt(2 / pi) * sd / sqrt(n), averaged over sets (in ``scale``
    units). The bias of Table 1's statistic: an entry near its floor is noise."""
    attrs = attribute_columns(per_sample)
    cols = [f"d_{a}" for a in attrs]
    g = per_sample.groupby(["direction", "repeat"], sort=False)[cols]
    floor = np.sqrt(2 / np.pi) * g.std(ddof=1) / np.sqrt(g.count())
    floor.columns = attrs
    for a in attrs:
        floor[a] = floor[a] / (scale or {}).get(a, 1.0)
    out = floor.groupby(level="direction", sort=False).mean()
    return out.reindex(list(dict.fromkeys(per_sample["direction"])))


def corrected_effect_matrix(per_sample: pd.DataFrame, scale: dict[str, float] | None = None) -> pd.DataFrame:
    """Table 1 corrected for its noise floor: per (direction, attribute), ``consistent_abs_mean`` of the
    changes over all seeds of every set (sqrt(max(mean^2 - var/n, 0)): the PCA section's statistic),
    in ``scale`` units. A change that scatters around 0 gives about 0 instead of its noise floor."""
    attrs = attribute_columns(per_sample)
    out = per_sample.groupby("direction", sort=False)[[f"d_{a}" for a in attrs]].apply(
        lambda g: pd.Series(consistent_abs_mean(g.to_numpy()), index=attrs))
    for a in attrs:
        out[a] = out[a] / (scale or {}).get(a, 1.0)
    return out.reindex(list(dict.fromkeys(per_sample["direction"])))


def matched_attributes(per_sample: pd.DataFrame, scale: dict[str, float] | None = None,
                       mapping: dict[str, str] | None = None) -> dict[str, str]:
    """The one rule that gives every direction "its" attribute, used by every table and plot: a
    supervised or disentangled direction's own attribute by its name (``own_attribute``); any other
    (PCA, random) the attribute it moves most consistently (largest ``consistent_abs_mean`` in
    ``scale`` units) at the scale it was applied to on the most seeds (its Fig. 6 scale; ties: the
    largest |scale|)."""
    attrs = attribute_columns(per_sample)
    out = {}
    for direction, rows in per_sample.groupby("direction", sort=False):
        named = own_attribute(direction, mapping)
        if rows["family"].iloc[0] in ("original", "disentangled") and named in attrs:
            out[direction] = named
            continue
        if "scale" in rows:
            counts = rows.groupby("scale")["seed"].nunique()
            best = max(counts.index, key=lambda s: (counts[s], abs(s)))
            rows = rows[rows["scale"] == best]
        effect = consistent_abs_mean(rows[[f"d_{a}" for a in attrs]].to_numpy())
        effect = effect / np.array([(scale or {}).get(a, 1.0) for a in attrs])
        out[direction] = attrs[int(np.argmax(effect))]
    return out


def bootstrap_effects(per_sample: pd.DataFrame, scale: dict[str, float] | None = None, n_boot: int = 1000,
                      seed: int = 0) -> tuple[np.ndarray, list[str], list[str]]:
    """Effect matrices of ``n_boot`` paired bootstrap resamples: (n_boot, directions, attributes),
    with the direction and attribute names. Each resample draws the seeds of every seed set with
    replacement, the same draw for every direction, and computes ``effect_matrix``'s mean.
    Every direction must have been measured on every seed of each set."""
    attrs = attribute_columns(per_sample)
    order = list(dict.fromkeys(per_sample["direction"]))
    rng = np.random.default_rng(seed)
    total = np.zeros((n_boot, len(order), len(attrs)))
    repeats = sorted(per_sample["repeat"].unique())
    for r in repeats:
        part = per_sample[per_sample["repeat"] == r]
        seeds = sorted(part["seed"].unique())
        grid = part.set_index(["direction", "seed"])[[f"d_{a}" for a in attrs]]
        if grid.index.duplicated().any():
            raise ValueError(f"seed set {r}: a (direction, seed) pair appears twice")
        grid = grid.reindex(pd.MultiIndex.from_product([order, seeds]))
        if grid.isna().any().any():
            raise ValueError(f"seed set {r}: not every direction was measured on every seed; the bootstrap needs pairs")
        d = grid.to_numpy().reshape(len(order), len(seeds), len(attrs))
        weights = rng.multinomial(len(seeds), np.full(len(seeds), 1 / len(seeds)), size=n_boot) / len(seeds)
        total += np.abs(np.einsum("bs,dsa->bda", weights, d))
    divisor = np.array([(scale or {}).get(a, 1.0) for a in attrs])
    return total / len(repeats) / divisor, order, attrs


def _interval(x: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    lo, hi = np.quantile(x, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def strongest(mean: pd.DataFrame) -> pd.Series:
    """The measured attribute with the largest effect, per row."""
    return mean.idxmax(axis=1)


def disentanglement_summary(mean: pd.DataFrame, families: dict[str, str],
                            mapping: dict[str, str] | None = None, boot=None) -> pd.DataFrame:
    """Per direction: its own effect, the largest off-diagonal effect, and whether its own
    attribute is the strongest; for disentangled rows also the change of the largest
    off-diagonal effect against the original direction of the same attribute.

    With ``boot`` (``bootstrap_effects``'s output) also 95% intervals of the margin
    ``own_effect - max_off_diagonal`` (above 0: the own effect is strongest) and of
    ``off_diagonal_vs_original`` (below 0: disentangling lowered the largest side effect)."""
    rows = []
    for d in mean.index:
        own = own_attribute(d, mapping)
        if own not in mean.columns:
            continue
        off = mean.loc[d].drop(own)
        rows.append({"direction": d, "family": families.get(d, ""), "own_effect": mean.loc[d, own],
                     "max_off_diagonal": off.max(), "max_off_attribute": off.idxmax(),
                     "own_is_strongest": bool(mean.loc[d].idxmax() == own)})
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    original = {r.direction: r.max_off_diagonal for r in out.itertuples() if r.family == "original"}
    out["off_diagonal_vs_original"] = [
        (r.max_off_diagonal - original[primary_direction(r.direction)]) if r.family == "disentangled"
        and primary_direction(r.direction) in original else np.nan for r in out.itertuples()]
    out["own_margin"] = out["own_effect"] - out["max_off_diagonal"]
    if boot is not None:
        effects, order, attrs = boot
        row = {d: i for i, d in enumerate(order)}

        def max_off(d):  # (n_boot,) largest off-diagonal effect of direction d in every resample
            own = attrs.index(own_attribute(d, mapping))
            return np.delete(effects[:, row[d]], own, axis=1).max(axis=1)

        margins, changes = [], []
        for r in out.itertuples():
            margins.append(_interval(effects[:, row[r.direction], attrs.index(own_attribute(r.direction, mapping))]
                                     - max_off(r.direction)))
            p = primary_direction(r.direction)
            changes.append(_interval(max_off(r.direction) - max_off(p)) if r.family == "disentangled"
                           and p in original else (np.nan, np.nan))
        out[["own_margin_ci_low", "own_margin_ci_high"]] = margins
        out[["off_diagonal_vs_original_ci_low", "off_diagonal_vs_original_ci_high"]] = changes
    return out


def consistent_abs_mean(x: np.ndarray) -> np.ndarray:
    """|E[x]| estimated without the noise floor of |mean|: sqrt(max(mean^2 - var/n, 0)) per
    column (mean^2 - var/n is unbiased for E[x]^2). x: (n, k) -> (k,). Changes that scatter
    around 0 give ~0, where |mean| alone gives about 0.8 * std / sqrt(n)."""
    x = np.asarray(x, dtype=float)
    n = x.shape[0]
    if n < 2:
        return np.abs(x.mean(axis=0))
    return np.sqrt(np.clip(x.mean(axis=0) ** 2 - x.var(axis=0, ddof=1) / n, 0.0, None))


def pca_vs_random(per_sample: pd.DataFrame, scale: dict[str, float] | None = None,
                  matched: dict[str, str] | None = None) -> pd.DataFrame:
    """Per direction of the PCA and random families (``random``: norm-matched; ``random_pixel``:
    rescaled to the same pixel change as its component): the largest attribute effect as in
    the effect matrix, the *consistent* effect over all its seeds (``consistent_abs_mean``) on its
    matched attribute (``matched``, default ``matched_attributes``: the one it moves most
    consistently), the mean pixel change, and consistent effect per unit of pixel change (higher:
    the edit is semantic rather than noise). The correction matters for norm-matched random
    directions: their tiny edits change attributes per sample in both signs, and |mean| of such
    changes divided by a tiny pixel change would rank noise above semantics."""
    sub = per_sample[per_sample["family"].isin(["pca", "random", "random_pixel"])]
    if sub.empty:
        return pd.DataFrame()
    scale = scale or {}
    matched = matched or matched_attributes(sub, scale)
    mean, _ = effect_matrix(sub, scale)
    consistent = corrected_effect_matrix(sub, scale)
    pixel = sub.groupby("direction", sort=False)["pixel_change"].mean()
    fam = sub.groupby("direction", sort=False)["family"].first()
    attribute = pd.Series({d: matched[d] for d in consistent.index})
    out = pd.DataFrame({"family": fam, "max_attribute_effect": mean.max(axis=1),
                        "consistent_effect": [consistent.loc[d, a] for d, a in attribute.items()],
                        "attribute": attribute, "pixel_change": pixel})
    out["effect_per_pixel_change"] = out["consistent_effect"] / out["pixel_change"].clip(lower=1e-12)
    return out.rename_axis("direction").reset_index()


def table1_markdown(sections: list[tuple[str, pd.DataFrame, pd.DataFrame]], unit: str) -> str:
    """The paper's Table-1 layout: one block per section (e.g. original / disentangled), rows =
    applied direction, columns = measured effect, `mean ± std`, the strongest effect in bold."""
    cols = list(sections[0][1].columns)
    lines = [f"| Edit \\ Effect | {' | '.join(cols)} |", "|---|" + "---|" * len(cols)]
    for title, mean, std in sections:
        lines.append(f"| *{title}* |" + " |" * len(cols))
        best = strongest(mean)
        for d in mean.index:
            cells = []
            for c in cols:
                cell = f"{mean.loc[d, c]:.2f} ± {std.loc[d, c]:.2f}"
                cells.append(f"**{cell}**" if c == best[d] else cell)
            lines.append(f"| {d.replace('|', chr(92) + '|')} | {' | '.join(cells)} |")
    lines.append("")
    lines.append(f"Entries: |mean score change| over each seed set, averaged over seed sets (± std across sets), {unit}. "
                 "Bold: the strongest effect of the row.")
    return "\n".join(lines) + "\n"


def _consistent_weighted(weights: np.ndarray, d: np.ndarray) -> np.ndarray:
    """``consistent_abs_mean`` of every bootstrap resample at once: weights (B, n) resample frequencies
    (rows sum to 1) of the n seeds' changes d (n, k) -> (B, k)."""
    n = d.shape[0]
    m = weights @ d
    if n < 2:
        return np.abs(m)
    var = (weights @ d ** 2 - m ** 2) * n / (n - 1)
    return np.sqrt(np.clip(m ** 2 - var / n, 0.0, None))


def dose_response(rows: pd.DataFrame, scale: dict[str, float], mapping: dict[str, str] | None = None,
                  n_boot: int = 200, seed: int = 0, matched: dict[str, str] | None = None,
                  calibrated: dict[str, float] | None = None) -> pd.DataFrame:
    """The dose-response curves: per direction and scale (over the seeds every scale of it was
    applied to), the own attribute's signed mean change, the largest side effect (max over the
    other attributes of the noise-corrected |mean change|, ``consistent_abs_mean``) and which attribute
    it is, the mean pixel change and the mean quality score after the edit, each with a 95% bootstrap
    interval over the seeds (the same resample for all four). Changes in units of ``scale``. The own
    attribute is ``matched[direction]`` (default: ``matched_attributes`` of ``rows``; pass the
    evaluation's so that every section agrees). ``multiple``: the scale over the direction's
    ``calibrated`` strength (NaN without one). A scale-0 row (no change, the unedited quality)
    starts every curve."""
    attrs = attribute_columns(rows)
    matched = matched or matched_attributes(rows, scale, mapping)
    calibrated = calibrated or {}
    rng = np.random.default_rng(seed)
    out = []
    for direction, sub in rows.groupby("direction", sort=False):
        family = sub["family"].iloc[0]
        z = sub.copy()
        for a in attrs:
            z[f"d_{a}"] = z[f"d_{a}"] / scale.get(a, 1.0)
        own = matched[direction]
        others = [a for a in attrs if a != own]
        cal = calibrated.get(direction)
        seeds = sorted(set.intersection(*(set(g["seed"]) for _, g in z.groupby("scale"))))
        weights = rng.multinomial(len(seeds), np.full(len(seeds), 1 / len(seeds)), size=n_boot) / len(seeds)
        q0 = z.drop_duplicates("seed").set_index("seed").reindex(seeds)["quality_before"].to_numpy()
        out.append({"family": family, "direction": direction, "attribute": own, "scale": 0.0, "multiple": 0.0 if cal
                    else np.nan, "own": 0.0, "side": 0.0, "side_attribute": "", "pixel_change": 0.0,
                    "quality": float(np.mean(q0)), "n_seeds": len(seeds)})
        for s, g in z.groupby("scale", sort=True):
            g = g.set_index("seed").reindex(seeds)
            d_own = g[f"d_{own}"].to_numpy()
            d_side = g[[f"d_{a}" for a in others]].to_numpy() if others else np.zeros((len(seeds), 1))
            pixel, quality = g["pixel_change"].to_numpy(), g["quality_after"].to_numpy()
            side_effects = consistent_abs_mean(d_side)
            row = {"family": family, "direction": direction, "attribute": own, "scale": float(s),
                   "multiple": float(s) / cal if cal else np.nan, "own": float(d_own.mean()),
                   "side": float(side_effects.max()), "side_attribute": others[int(side_effects.argmax())] if others else "",
                   "pixel_change": float(pixel.mean()), "quality": float(np.mean(quality)), "n_seeds": len(seeds)}
            boot = {"own": weights @ d_own, "side": _consistent_weighted(weights, d_side).max(axis=1),
                    "pixel_change": weights @ pixel, "quality": weights @ quality}
            for k, v in boot.items():
                row[f"{k}_low"], row[f"{k}_high"] = _interval(v) if np.isfinite(v).all() else (np.nan, np.nan)
            out.append(row)
    return pd.DataFrame(out)
