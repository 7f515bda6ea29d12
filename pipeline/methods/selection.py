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
