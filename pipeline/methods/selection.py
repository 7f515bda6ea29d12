"""Top/bottom selection by score: the pure functions behind `hspace select` (and toyfaces' editability).

``resolution`` ranks scores rounded to that step (see pipeline.stages.select for why); ties fall
back to sample-id order.
"""
from __future__ import annotations

import pandas as pd

from pipeline.errors import ConfigError, DatasetError


def select_top_bottom(scores: pd.Series, n: int, condition: pd.Series | None = None,
                      threshold: float = 0.5, resolution: float = 0.0) -> tuple[pd.Series, pd.Series]:
    """Top n and bottom n of ``scores`` (index: sample_id), NaNs ignored, ties broken by id.

    Ranked by the scores rounded to multiples of ``resolution`` (0: exact). With ``condition``,
    n/2 of each side come from condition > threshold and n/2 from the rest.
    Returns two Series (sample_id -> score), best first / worst first.
    """
    s = scores.dropna()
    if resolution < 0:
        raise ConfigError(f"select.resolution must be >= 0, got {resolution}")
    if condition is None:
        if len(s) < 2 * n:
            raise DatasetError(f"{scores.name}: {len(s)} scored samples cannot give a top and a bottom {n}; "
                               f"lower select.n or generate more samples")
        key = ((s / resolution).round() if resolution else s).sort_index(kind="stable")
        top = key.sort_values(ascending=False, kind="stable").index[:n]
        bottom = key.sort_values(ascending=True, kind="stable").index[:n]
        return s.loc[top], s.loc[bottom]
    cond = condition.reindex(s.index)
    high, low = s[cond > threshold], s[cond <= threshold]
    half = n // 2
    tops, bottoms = [], []
    for part, k in ((high, half), (low, n - half)):
        t, b = select_top_bottom(part.rename(scores.name), k, resolution=resolution)
        tops.append(t)
        bottoms.append(b)
    return (pd.concat(tops).sort_values(ascending=False, kind="stable"),
            pd.concat(bottoms).sort_values(ascending=True, kind="stable"))


def selection_table(annotations: pd.DataFrame, attributes: list[str], n: int, balance: str | None = None,
                    threshold: float = 0.5, resolution: float = 0.0) -> pd.DataFrame:
    """Long table: attribute, side ('top' | 'bottom'), rank (0 = most extreme), sample_id, score."""
    df = annotations.set_index("sample_id")
    missing = [a for a in attributes + ([balance] if balance else []) if a not in df.columns]
    if missing:
        raise ConfigError(f"no annotation column {missing}; annotations have {list(df.columns)}")
    rows = []
    for attr in attributes:
        cond = df[balance] if balance and balance != attr else None
        top, bottom = select_top_bottom(df[attr].rename(attr), n, cond, threshold, resolution)
        for side, part in (("top", top), ("bottom", bottom)):
            rows += [{"attribute": attr, "side": side, "rank": r, "sample_id": int(i), "score": float(v)}
                     for r, (i, v) in enumerate(part.items())]
    return pd.DataFrame(rows)


def categorical_columns(annotations: pd.DataFrame) -> list[str]:
    """Columns holding class indices (integer values, 3 to 64 distinct ones), whose mean means nothing."""
    out = []
    for c in annotations.columns:
        v = annotations[c].dropna()
        if c != "sample_id" and len(v) and (v == v.round()).all() and 3 <= v.nunique() <= 64:
            out.append(c)
    return out


def chance_difference(n: int) -> float:
    """The difference between the means of two groups of n that chance alone gives, in standard
    deviations: two standard errors, 2 * sqrt(2 / n)."""
    return 2.0 * (2.0 / n) ** 0.5


def confounds(annotations: pd.DataFrame, selection: pd.DataFrame, shown: int = 0,
              threshold: float = float("inf")) -> pd.DataFrame:
    """How much every other annotated attribute differs between each attribute's top and bottom samples:
    (mean over the top - mean over the bottom) / its standard deviation over all annotated samples.
    A large difference is a confound: a direction made from these samples moves that attribute too.
    By chance alone the difference is about sqrt(2 / n) standard deviations (n per side). Class-index
    columns (``categorical_columns``) are left out. ``shown`` > 0: also the difference between the
    ``shown`` most extreme samples of each side (a contact sheet's). ``confounded``: the difference is above
    ``threshold`` and above what chance gives (``chance_difference``). Long table: attribute, other, top,
    bottom (means), difference (in standard deviations), n (samples per side), shown_difference, shown,
    threshold, confounded."""
    df = annotations.set_index("sample_id")
    skip = set(categorical_columns(annotations))
    numeric = [c for c in df.columns if c not in skip and pd.api.types.is_numeric_dtype(df[c])]
    std = df[numeric].std(ddof=1).replace(0.0, float("nan"))

    def sides(sel):
        top, bottom = (sel[sel.side == side].sort_values("rank") for side in ("top", "bottom"))
        return df.loc[top.sample_id, numeric].mean(), df.loc[bottom.sample_id, numeric].mean()

    rows = []
    for attr, sel in selection.groupby("attribute", sort=False):
        top, bottom = sides(sel)
        diff = ((top - bottom) / std).fillna(0.0)
        shown_diff = ((lambda t, b: (t - b) / std)(*sides(sel[sel["rank"] < shown])).fillna(0.0) if shown else None)
        for other in numeric:
            if other != attr:
                rows.append({"attribute": attr, "other": other, "top": float(top[other]), "bottom": float(bottom[other]),
                             "difference": float(diff[other]), "n": int((sel.side == "top").sum()),
                             "shown_difference": float(shown_diff[other]) if shown else float("nan"),
                             "shown": int(min(shown, (sel.side == "top").sum()))})
    out = pd.DataFrame(rows, columns=["attribute", "other", "top", "bottom", "difference", "n", "shown_difference",
                                      "shown"])
    out["threshold"] = threshold
    out["confounded"] = (out.difference.abs() > threshold) & (out.difference.abs() > out.n.map(chance_difference))
    return out
