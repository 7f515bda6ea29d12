"""The SAE family of `hspace evaluate`: which features it edits, their calibrated strengths, and their Table 1.

For every attribute with a supervised direction, the ``evaluate.sae_features`` features of
``directions/sae.safetensors`` of largest |correlation| with it (each signed so that + raises the attribute), and
beside them the PCA component whose projection correlates most with it (``sae/pca_correlations.csv``; signed the
same way), are edited at their calibrated strength: the scale at which the attribute moves by ``calibrate.target``
standard deviations on the calibration seeds (:func:`~pipeline.methods.calibration.calibrate`, measured once by
rank 0 before the evaluation and kept in ``evaluation/sae_calibration.json``; without ``calibrate.enabled``, scale
1: one mean activation of the feature, one standard deviation along the component). Their rows make
``table1_sae.*`` (Table 1's layout) and ``sae_factors.csv``: per attribute the best feature, the best PCA component
and the supervised direction (at its own calibrated strength), each with its own effect and largest side effect.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.formats.directions import load_directions
from pipeline.io import write_json_atomic, write_text_atomic
from pipeline.methods.calibration import calibrate, own_attribute

SAE_FILE = "directions/sae.safetensors"
CALIBRATION = "sae_calibration.json"
FAMILIES = (("sae", "SAE features"), ("pca_best", "PCA component of largest correlation"))


@dataclass
class Candidate:
    name: str        # "f1195 (smile)", "pc3 (smile)"
    family: str      # sae | pca_best
    unit: torch.Tensor
    attribute: str   # the scorer attribute it is matched to
    r: float         # its correlation with that attribute's annotation


def attributes(run_dir, ev_cfg) -> list[str]:
    """The scorer attributes of the supervised directions (the factors the SAE features are compared on)."""
    names = load_directions(Path(run_dir) / "directions" / "supervised.safetensors").names
    mapping = dict(ev_cfg.own_attribute)
    return list(dict.fromkeys(own_attribute(n, mapping) for n in names))


def candidates(run_dir, ev_cfg, model=None) -> list[Candidate]:
    """The SAE features and PCA components evaluated (empty without directions/sae.safetensors or with
    ``evaluate.sae_features`` 0)."""
    run_dir = Path(run_dir)
    if ev_cfg.sae_features <= 0 or not (run_dir / SAE_FILE).exists():
        return []
    sae = load_directions(run_dir / SAE_FILE, model)
    info = sae.params.get("features") or []
    out = []
    for a in attributes(run_dir, ev_cfg):
        r = [(i, f.get("correlations", {}).get(a)) for i, f in enumerate(info)]
        r = sorted([(i, v) for i, v in r if v is not None], key=lambda p: -abs(p[1]))[:ev_cfg.sae_features]
        for i, v in r:  # the file's direction raises its label's annotation; turn it to raise this one
            sign = float(np.sign(v) * info[i]["sign"]) or 1.0
            out.append(Candidate(f"{sae.names[i]} ({a})", "sae", sign * sae.directions[i], a, float(v)))
    pca_r, pca_path = run_dir / "sae" / "pca_correlations.csv", run_dir / "directions" / "pca.safetensors"
    if pca_r.exists() and pca_path.exists():
        table, pca = pd.read_csv(pca_r), load_directions(pca_path, model)
        for a in attributes(run_dir, ev_cfg):
            if a in table:
                k = int(table[a].abs().idxmax())
                v = float(table[a].iloc[k])
                out.append(Candidate(f"{table.component.iloc[k]} ({a})", "pca_best",
                                     (1.0 if v >= 0 else -1.0) * pca.get(str(table.component.iloc[k])), a, v))
    return out


def calibrated_scales(out_dir: Path) -> dict[str, float | None] | None:
    path = Path(out_dir) / CALIBRATION
    return json.loads(path.read_text())["scales"] if path.exists() else None


def calibrate_candidates(cfg, model, scorer, cands: list[Candidate], key: str, out_dir: Path) -> dict:
    """Calibrate every candidate on the calibration seeds (rank 0) and keep the scales with ``key``."""
    c = cfg.calibrate
    std_seeds = list(range(c.first_seed, c.first_seed + c.std_samples))
    record = calibrate(model, scorer, [x.name for x in cands], [x.unit for x in cands], std_seeds[:c.num_samples],
                       std_seeds, 1.0, c.target, c.rtol, c.max_iter, own={x.name: x.attribute for x in cands},
                       batch_size=c.batch_size, device=model.device)
    write_json_atomic(out_dir / CALIBRATION, {"key": key, "scales": record["scales"], "record": record})
    print("hspace evaluate: SAE features and matched PCA components calibrated: " + ", ".join(
        f"{n} x{s:.2f}" if s is not None else f"{n} (none)" for n, s in record["scales"].items()))
    return record["scales"]


# ---------------------------------------------------------------------- the tables
def sae_tables(per_sample: pd.DataFrame, keep: pd.DataFrame, scale: dict, ev_cfg, out: Path) -> dict:
    """``table1_sae.*`` of the SAE rows (and the matched PCA components) and ``sae_factors.csv``; -> the summary's
    ``sae`` entry (with the SAE's own measures from ``sae/metrics.json``)."""
    from evaluation.metrics import effect_matrix, table1_markdown
    from evaluation.plots import effect_heatmaps

    target = dict(zip(per_sample.direction, per_sample["target"]))
    r = dict(zip(per_sample.direction, per_sample["target_r"]))
    rows = keep[per_sample.sae]
    unit = "in standard deviations of the unedited scores" if ev_cfg.normalize else "in score units"
    sections, tables = [], []
    for family, title in FAMILIES:
        sub = rows[rows.family == family]
        if sub.empty:
            continue
        mean, std = effect_matrix(sub, scale)
        sections.append((title, mean, std))
        tables.append(mean.join(std.add_suffix("_std")).rename_axis("direction").reset_index().assign(family=family))
    summary = {}
    metrics = out.parent / "sae" / "metrics.json"
    if metrics.exists():
        m = json.loads(metrics.read_text())
        summary = {k: m[k] for k in ("feed", "steps", "num_latents", "sparsity", "k", "train", "heldout", "dead",
                                     "dead_fraction", "best_feature", "best_pca_component") if k in m}
    if not sections:
        return summary
    table = pd.concat(tables, ignore_index=True)
    write_text_atomic(out / "table1_sae.csv", table[["family", "direction"] + [c for c in table.columns
                                                                               if c not in ("family", "direction")]]
                      .to_csv(index=False))
    write_text_atomic(out / "table1_sae.md", table1_markdown(sections, unit))
    effect_heatmaps(sections, out / "table1_sae.png", unit)
    calibrated = keep[per_sample.calibrated & (per_sample.family == "original")]
    factors = factor_table(rows, calibrated, scale, target, r, dict(ev_cfg.own_attribute))
    write_text_atomic(out / "sae_factors.csv", factors.to_csv(index=False))
    summary["factors"] = factors.to_dict(orient="records")
    return summary


def _own_and_side(mean: pd.DataFrame, name: str, attr: str) -> dict:
    row = mean.loc[name]
    side = row.drop(attr)
    return {"own": float(row[attr]), "side": float(side.max()), "side_attribute": str(side.idxmax())}


def factor_table(rows: pd.DataFrame, calibrated: pd.DataFrame, scale: dict, target: dict, r: dict,
                 mapping: dict) -> pd.DataFrame:
    """Per attribute: the first SAE feature and the PCA component matched to it, and the supervised direction,
    each with its own effect and its largest side effect (|mean change| in std, averaged over the seed sets)."""
    from evaluation.metrics import effect_matrix

    mean = effect_matrix(rows, scale)[0] if not rows.empty else pd.DataFrame()
    sup = effect_matrix(calibrated, scale)[0] if not calibrated.empty else pd.DataFrame()
    out = []
    for attr in dict.fromkeys(target[d] for d in rows.direction):
        entry = {"attribute": attr}
        for family, prefix in (("sae", "sae"), ("pca_best", "pca")):
            names = [d for d in dict.fromkeys(rows[rows.family == family].direction) if target[d] == attr]
            if names and attr in mean.columns:
                entry[prefix], entry[f"{prefix}_r"] = names[0].split(" ")[0], float(r[names[0]])
                entry.update({f"{prefix}_{k}": v for k, v in _own_and_side(mean, names[0], attr).items()})
        sup_names = [d for d in sup.index if own_attribute(d, mapping) == attr]
        if sup_names and attr in sup.columns:
            entry.update({f"supervised_{k}": v for k, v in _own_and_side(sup, sup_names[0], attr).items()})
        out.append(entry)
    return pd.DataFrame(out)
