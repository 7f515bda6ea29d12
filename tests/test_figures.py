"""The one plot of curves per attribute (pipeline/formats/figures.py) behind the convergence, Fig. 8 and
probe figures: what each panel draws, read back from the figure."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.formats import figures


@pytest.fixture
def drawn(monkeypatch, tmp_path):
    """curves_by_attribute(...) -> its figure, captured instead of closed (the PNG is still written)."""
    captured = {}
    save = figures.save_figure

    def keep(fig, path, **kw):
        captured["fig"] = fig
        captured["png"] = save(fig, path, **kw)
        return captured["png"]

    monkeypatch.setattr(figures, "save_figure", keep)

    def draw(table, y, **kw):
        figures.curves_by_attribute(table, y, tmp_path / "curves.png", **kw)
        assert captured["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        return captured["fig"]

    return draw


def against_n() -> pd.DataFrame:
    ns = [1, 2, 5, 10]
    return pd.DataFrame([{"attribute": a, "space": s, "n": n, "effect": (2 if s == "h" else 1) * np.log(n) + i,
                          "effect_std": 0.1} for i, a in enumerate(["smile", "hat"]) for s in ("h", "x_T") for n in ns])


def test_curves_against_n_one_panel_per_attribute_log_axis_at_the_ns(drawn):
    table = against_n()
    fig = drawn(table, "effect", yerr="effect_std", ylabel="own change", baseline=0.0)
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["smile", "hat"]
    for ax, attr in zip(axes, ["smile", "hat"]):
        assert ax.get_xscale() == "log" and list(ax.get_xticks()) == [1, 2, 5, 10]
        assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "5", "10"]
        handles, labels = ax.get_legend_handles_labels()  # error bar containers: [0] is the data line
        assert labels == ["h-space", "x_T-space"]
        for ln, space in zip([c[0] for c in handles], ("h", "x_T")):
            rows = table[(table.attribute == attr) & (table.space == space)]
            np.testing.assert_array_equal(ln.get_ydata(), rows.effect.to_numpy())
        assert any(list(ln.get_ydata()) == [0.0, 0.0] for ln in ax.get_lines())  # the baseline
    assert axes[0].get_ylabel() == "own change" and len(fig.legends) == 1  # one legend for the panels, below them


def test_curves_against_the_step_with_timesteps_chance_and_highlighted_steps(drawn):
    T = 6
    rows = [{"attribute": "glasses", "space": s, "step": t, "score": 0.5 + 0.05 * t * (s == "h"), "chance": 0.5,
             "metric": "accuracy", "encoded": s == "h" and t >= 4} for s in ("x_t", "h") for t in reversed(range(T))]
    fig = drawn(pd.DataFrame(rows), "score", x="step", ylabel="held-out score", spaces=(("h", "h"), ("x_t", "x_t")),
                timesteps=[999, 800, 600, 400, 200, 0], baseline="chance", highlight="encoded",
                title=lambda attr, r: f"{attr} ({r.metric.iloc[0]})", sharey=False)
    ax = fig.axes[0]
    assert ax.get_title() == "glasses (accuracy)" and ax.get_xscale() == "linear"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["999", "800", "600", "400", "200", "0"]
    h, marks, x_t, chance = ax.get_lines()
    assert list(h.get_xdata()) == list(range(T))  # sorted by step
    assert list(marks.get_xdata()) == [4, 5] and marks.get_markerfacecolor() == "none"
    assert x_t.get_label() == "x_t" and list(chance.get_ydata()) == [0.5, 0.5] and chance.get_linestyle() == ":"
