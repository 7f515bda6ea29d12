"""`hspace fewshot`: Fig. 8 as numbers, and the probe-step restriction, on held-out seeds.

Fig. 8 of the paper claims that a supervised direction (eq. 10) converges with a few examples in
h-space and needs hundreds in x_T space. Here that becomes a measurement: for each attribute, the
direction from n random top and n random bottom samples of the selection (``fewshot.ns``,
``fewshot.draws`` random draws each, up to what the selection holds), in h-space and in x_T
space, rescaled to the norm of the direction from the whole selection (so that n changes only
where it points) and applied at ``h_scale`` / ``x_T_scale`` to ``fewshot.num_samples`` held-out
seeds from ``fewshot.first_seed`` (disjoint from every selected sample). The scorer
(``evaluate.scorer``) reads the change of the attribute, in standard deviations of its scores
over the run's samples.

With ``fewshot.restriction`` and the probes present, also: the whole-selection h direction of
each attribute zeroed outside the steps where the probe finds it encoded, against the same
direction over all steps, at the same scale on the same ``fewshot.restriction_samples`` held-out
seeds: own effect, largest side effect, pixel change.

Writes ``<run_dir>/fewshot/``: ``per_edit.csv`` (one row per edit and seed), ``effect_vs_n.csv``
and ``effect_vs_n.png``, ``restriction.csv``, and the folder's identity record.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from annotators.base import build_annotator
from pipeline.config import to_dict
from pipeline.engine.model import HSpaceModel
from pipeline.errors import ConfigError
from pipeline.formats.identity import seal_folder, verify
from pipeline.io import atomic_path
from pipeline.methods.probes import restrict_to_steps
from pipeline.methods.supervised import draw_subsets, mean_difference
from pipeline.registry import COMMANDS
from pipeline.stages.annotate import load_annotations
from pipeline.stages.select import load_selection
from pipeline.stages.supervised import check_ns, gather_h, gather_x_T, sides

FEWSHOT = "fewshot"


def fewshot_attributes(cfg, selection: pd.DataFrame) -> list[str]:
    attrs = list(cfg.fewshot.attributes) or list(cfg.supervised.attributes) or list(dict.fromkeys(selection.attribute))
    unknown = sorted(set(attrs) - set(selection.attribute))
    if unknown:
        raise ConfigError(f"fewshot.attributes {unknown} are not in selection.parquet; add them to select.attributes")
    return attrs


def fewshot_edits(run_dir, cfg, attrs: list[str], selection: pd.DataFrame) -> list[dict]:
    """Every edit to apply: {attribute, space, n, draw, delta}; the h edit from the whole selection
    has n = the selection's size per side."""
    fc = cfg.fewshot
    h = gather_h(run_dir, sorted(set(selection.sample_id)))
    x_T = gather_x_T(run_dir, selection.sample_id)
    edits = []
    own = to_dict(cfg.evaluate.own_attribute)
    for attr in attrs:
        top, bottom = sides(selection, attr)
        for space, latents, scale in (("h", h, fc.h_scale), ("x_T", x_T, fc.x_T_scale)):
            pos, neg = torch.stack([latents[i] for i in top]), torch.stack([latents[i] for i in bottom])
            norm = mean_difference(pos, neg).norm()
            for n, draw, ip, ineg in draw_subsets(len(pos), len(neg), fc.ns, fc.draws, fc.seed):
                d = mean_difference(pos[ip], neg[ineg])
                edits.append({"attribute": attr, "own": own.get(attr, attr), "space": space, "n": n, "draw": draw,
                              "delta": scale * d * (norm / d.norm().clamp_min(1e-12))})
    return edits


def score_units(cfg, scorer_columns, base_scores: dict) -> dict[str, float]:
    """Per scorer column, the standard deviation its effects are divided by: over the run's samples
    when the annotations hold that column (same scorer), else over the held-out seeds' unedited images."""
    annotations = load_annotations(cfg.run_dir)
    return {a: float(annotations[a].std(ddof=1)) if a in annotations and cfg.evaluate.scorer in cfg.annotate.annotators
            else float(np.std(base_scores[a], ddof=1)) for a in scorer_columns}


def effect_vs_n(per_edit: pd.DataFrame) -> pd.DataFrame:
    """per_edit rows (attribute, space, n, draw, seed, own_change in std) -> per attribute, space and
    n: the mean own change over the seeds of each draw, then its mean, std, min and max over the
    draws, and the mean as a share of the whole selection's."""
    per_draw = per_edit.groupby(["attribute", "space", "n", "draw"], sort=False).own_change.mean().reset_index()
    curve = per_draw.groupby(["attribute", "space", "n"], sort=False).own_change.agg(
        ["count", "mean", "std", "min", "max"]).reset_index()
    curve = curve.rename(columns={"count": "draws", "mean": "effect", "std": "effect_std", "min": "effect_min",
                                  "max": "effect_max"})
    curve["effect_std"] = curve.effect_std.fillna(0.0)
    full = curve.loc[curve.groupby(["attribute", "space"]).n.idxmax()].set_index(["attribute", "space"]).effect
    curve["share_of_full"] = [e / full[(a, s)] if full[(a, s)] else np.nan
                              for a, s, e in zip(curve.attribute, curve.space, curve.effect)]
    return curve


def restriction_table(rows: pd.DataFrame, attrs: list[str]) -> pd.DataFrame:
    """rows (attribute, variant, steps, seed, pixel_change, d_<attr> in std...) -> per attribute and
    variant: own effect (signed mean), the largest |mean| side effect among ``attrs`` and its
    attribute, their standard errors over the seeds, and the mean pixel change."""
    out = []
    for (attr, variant), g in rows.groupby(["attribute", "variant"], sort=False):
        means = {a: float(g[f"d_{a}"].mean()) for a in attrs}
        side = max((a for a in attrs if a != attr), key=lambda a: abs(means[a]), default=None)
        se = {a: float(g[f"d_{a}"].std(ddof=1) / np.sqrt(len(g))) if len(g) > 1 else np.nan for a in attrs}
        out.append({"direction": attr, "variant": variant, "steps": g.steps.iloc[0], "own_effect": means[attr],
                    "own_effect_se": se[attr], "largest_side_effect": abs(means[side]) if side else np.nan,
                    "side_attribute": side or "", "side_effect_se": se[side] if side else np.nan,
                    "pixel_change": float(g.pixel_change.mean())})
    return pd.DataFrame(out)


def plot_effect_vs_n(curve: pd.DataFrame, out: Path) -> Path:
    from pipeline.formats.figures import plt, save_figure

    attrs = list(dict.fromkeys(curve.attribute))
    fig, axes = plt.subplots(1, len(attrs), figsize=(2.6 * len(attrs), 2.7), squeeze=False, sharey=True)
    for ax, attr in zip(axes[0], attrs):
        for space, style in (("h", "-o"), ("x_T", "--s")):
            c = curve[(curve.attribute == attr) & (curve.space == space)]
            ax.errorbar(c.n, c.effect, yerr=c.effect_std, fmt=style, ms=3, capsize=2, label=f"{space}-space")
        ns = sorted(set(curve[curve.attribute == attr].n))
        ax.set_xscale("log")
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.minorticks_off()
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_title(attr, fontsize=9)
        ax.set_xlabel("n per side", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("own attribute change (std)", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, out)


def scored(model, scorer, seeds, edits: list[dict], space: str, batch_size: int):
    """The seeds sampled unedited and under every edit, scored: (unedited scores, [(edit, edited
    scores, pixel change (S,))])."""
    images = model.sample_edits(seeds, [None] + [e["delta"] for e in edits], space=space, batch_size=batch_size)
    s0 = scorer(images[0])
    return s0, [(e, scorer(im), ((im - images[0]).abs().mean(dim=(1, 2, 3)) / 2).numpy())
                for e, im in zip(edits, images[1:])]


def measure(cfg, edits: list[dict], restricted: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Sample the held-out seeds under every edit and score them: (per_edit rows, restriction rows)."""
    fc = cfg.fewshot
    model = HSpaceModel.from_config(cfg)
    scorer = build_annotator(cfg.evaluate.scorer, cfg.evaluate.scorer_options, model.device)
    seeds = list(range(fc.first_seed, fc.first_seed + fc.num_samples))
    results = {space: scored(model, scorer, seeds, [e for e in edits if e["space"] == space], space, fc.batch_size)
               for space in ("h", "x_T")}
    s0 = results["h"][0]
    missing = sorted({e["own"] for e in edits} - set(s0))
    if missing:
        raise ConfigError(f"evaluate.scorer {cfg.evaluate.scorer!r} gives {sorted(s0)}, not {missing}; map the "
                          f"attributes to its columns with evaluate.own_attribute, or set fewshot.attributes")
    units = score_units(cfg, list(s0), {a: v.numpy() for a, v in s0.items()})
    rows, rrows = [], []
    for space, (s0, results_) in results.items():
        for e, s1, pixel in results_:
            change = ((s1[e["own"]] - s0[e["own"]]) / units[e["own"]]).numpy()
            rows += [{"attribute": e["attribute"], "space": space, "n": e["n"], "draw": e["draw"], "seed": seed,
                      "own_change": float(change[i]), "pixel_change": float(pixel[i])} for i, seed in enumerate(seeds)]
    if restricted:
        rseeds = list(range(fc.first_seed, fc.first_seed + fc.restriction_samples))
        s0, results_ = scored(model, scorer, rseeds, restricted, "h", fc.batch_size)
        for e, s1, pixel in results_:
            change = {a: ((s1[a] - s0[a]) / units[a]).numpy() for a in s0}
            rrows += [{"attribute": e["own"], "variant": e["variant"], "steps": e["steps"], "seed": seed,
                       "pixel_change": float(pixel[i]), **{f"d_{a}": float(change[a][i]) for a in s0}}
                      for i, seed in enumerate(rseeds)]
    return pd.DataFrame(rows), pd.DataFrame(rrows)


def restricted_edits(run_dir, cfg, edits: list[dict]) -> list[dict]:
    """The whole-selection h edit of each attribute over all steps, and zeroed outside the probe's
    encoded steps."""
    from pipeline.stages.probe import encoded_mask, load_probes

    probes = load_probes(run_dir)
    out = []
    for e in edits:
        if e["space"] != "h" or e["n"] != max(x["n"] for x in edits if x["attribute"] == e["attribute"]):
            continue
        mask = encoded_mask(probes, e["attribute"], e["delta"].shape[0])
        out.append({**e, "variant": "all steps", "steps": f"0-{len(mask) - 1}"})
        out.append({**e, "variant": "probe steps", "steps": ",".join(map(str, np.flatnonzero(mask))),
                    "delta": restrict_to_steps(e["delta"], mask)})
    return out


def run_fewshot(cfg) -> Path:
    run_dir = Path(cfg.run_dir)
    fc = cfg.fewshot
    selection = load_selection(run_dir)
    overlap = set(range(fc.first_seed, fc.first_seed + fc.num_samples)) & set(map(int, selection.sample_id))
    if overlap:
        raise ConfigError(f"fewshot.first_seed: held-out seeds {sorted(overlap)[:3]} are selected samples; "
                          f"start them elsewhere")
    stage = COMMANDS["fewshot"]
    record = stage.identity(cfg)
    restrict = "probes" in stage.read_names(cfg)  # fewshot.restriction, with the probes present
    if restrict:
        verify(run_dir, "probes")  # the rest is checked as it is read
    attrs = fewshot_attributes(cfg, selection)
    check_ns("fewshot.ns", fc.ns, selection, attrs)
    edits = fewshot_edits(run_dir, cfg, attrs, selection)
    restricted = restricted_edits(run_dir, cfg, edits) if restrict else []
    print(f"hspace fewshot: {len(edits)} edits x {fc.num_samples} held-out seeds"
          + (f", {len(restricted)} x {fc.restriction_samples} for the restriction" if restricted else ""))
    per_edit, rrows = measure(cfg, edits, restricted)
    curve = effect_vs_n(per_edit)
    out = run_dir / FEWSHOT
    with atomic_path(out) as tmp:
        tmp.mkdir()
        per_edit.to_csv(tmp / "per_edit.csv", index=False)
        curve.to_csv(tmp / "effect_vs_n.csv", index=False)
        plot_effect_vs_n(curve, tmp / "effect_vs_n.png")
        if restricted:
            scored = list(dict.fromkeys(e["own"] for e in edits))
            restriction_table(rrows, scored).to_csv(tmp / "restriction.csv", index=False)
        seal_folder(tmp, record)
    for (attr, space), c in curve.groupby(["attribute", "space"], sort=False):
        print(f"  {attr} {space}: " + ", ".join(f"n={n}: {e:.2f}±{s:.2f}" for n, e, s in zip(c.n, c.effect, c.effect_std)))
    print(f"hspace fewshot: effect against n -> {out}")
    return out
