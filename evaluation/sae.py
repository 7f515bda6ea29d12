"""The SAE's figures and its section of the report: training curves, the feature x annotation correlation
heatmap, the measured quality (FVU, L0, dead latents), the best feature of every annotation beside the best PCA
component, Table 1 of the SAE features at calibrated strength, and their edit strips.

Read from ``<run_dir>/sae/`` (``metrics.json``, ``curves.csv``, ``correlations.png``) and ``<run_dir>/evaluation/``
(``table1_sae.csv``, ``sae_factors.csv``, ``strips/sae/``); :func:`report_section` is the report's one call.
"""
from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import pandas as pd

from evaluation.folders import CALIBRATED
from evaluation.tables import df_html, table1_html
from pipeline.formats.figures import plt, save_figure


def curves_plot(curve: pd.DataFrame, out: Path) -> Path:
    """FVU (log scale), the AuxK or L1 term, L0 and the share of dead latents against optimizer steps."""
    extra = "auxk" if "auxk" in curve else "l1"
    panels = [("fvu", "FVU of the batch", True), (extra, f"{extra} term", False), ("l0", "L0 (active latents)", False),
              ("dead_fraction", "dead latents (share)", False)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.0 * len(panels), 2.6), layout="constrained")
    for ax, (col, title, log) in zip(axes, panels):
        if col in curve:
            ax.plot(curve.step, curve[col], lw=1)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if log and (curve[col] > 0).all():
            ax.set_yscale("log")
    return save_figure(fig, out)


def correlation_heatmap(r: np.ndarray, features: list[str], annotations: list[str], out: Path) -> Path:
    """Rows: the chosen features; columns: annotations; cells: Pearson r of the per-sample mean activation."""
    fig, ax = plt.subplots(figsize=(1.4 + 0.55 * len(annotations), 1.0 + 0.24 * len(features)), layout="constrained")
    im = ax.imshow(r, cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
    ax.set_xticks(range(len(annotations)), annotations, rotation=35, ha="right", fontsize=7)
    ax.set_yticks(range(len(features)), features, fontsize=7)
    for i in range(r.shape[0]):
        for j in range(r.shape[1]):
            ax.text(j, i, f"{r[i, j]:+.2f}", ha="center", va="center", fontsize=5.5,
                    color="white" if abs(r[i, j]) > 0.6 else "black")
    fig.colorbar(im, ax=ax, shrink=0.6, label="correlation")
    ax.set_title("SAE features against the annotations", fontsize=9, loc="left")
    return save_figure(fig, out)


def quality_table(metrics: dict) -> pd.DataFrame:
    rows = []
    for split in ("train", "heldout"):
        m = metrics.get(split) or {}
        if m.get("examples"):
            rows.append({"samples": {"train": "trained on", "heldout": "held out"}[split], "h vectors": m["examples"],
                         "FVU": round(m["fvu"], 4), "L0": round(m["l0"], 2), "latents that never fire": m["never_fire"]})
    return pd.DataFrame(rows)


def best_table(metrics: dict) -> pd.DataFrame:
    """Per annotation: the best SAE feature and its r, the best PCA component and its r."""
    pca = metrics.get("best_pca_component") or {}
    return pd.DataFrame([{"annotation": a, "SAE feature": b["feature"], "r (SAE)": round(b["r"], 3),
                          "PCA component": pca.get(a, {}).get("feature", ""),
                          "r (PCA)": round(pca[a]["r"], 3) if a in pca else ""}
                         for a, b in (metrics.get("best_feature") or {}).items()])


def report_section(page, run_dir: Path) -> None:
    """The report's SAE section, when the run has a trained SAE."""
    run_dir = Path(run_dir)
    folder, ev = run_dir / "sae", run_dir / CALIBRATED
    if not (folder / "metrics.json").exists():
        return
    m = json.loads((folder / "metrics.json").read_text())
    page.section("sae", "Sparse autoencoder features")
    feed = ("token-wise (every position of a step is one example)" if m["feed"] == "token"
            else "whole (the flattened h of a step is one example)")
    page.note(f"A {html.escape(str(m.get('sparsity')))} SAE of {m['num_latents']} latents"
              + (f" (k = {m['k']})" if m.get("sparsity") == "topk" else "")
              + f" trained on h fed {feed} at steps {m['steps'][0]}..{m['steps'][-1]}. FVU: squared reconstruction "
              "error over the variance of the normalised h vectors; L0: latents active per h vector; dead: latents "
              f"that never fire on the training samples ({m['dead']} of {m['num_latents']}).")
    page.add(df_html(quality_table(m)))
    page.image(folder / "curves.png", "Training curves (per logged interval of optimizer steps).", name="sae-curves.png")
    if m.get("best_feature"):
        page.add("<h3>The feature of largest |correlation| with each annotation</h3>")
        page.note("Pearson correlation over the samples of a feature's mean activation (over the trained steps and "
                  "positions) with the annotation, beside the PCA component whose projection correlates most. "
                  "All correlations: <code>sae/correlations.csv</code>, <code>sae/pca_correlations.csv</code>.")
        page.add(df_html(best_table(m)))
        page.image(folder / "correlations.png", "Correlation of the features in directions/sae.safetensors with "
                   "every annotation.", name="sae-correlations.png")
    pending = page.still_to_come(CALIBRATED, "the SAE features' evaluation at their calibrated strengths")
    if not pending and (ev / "sae_factors.csv").exists():
        page.add("<h3>Per factor: the best SAE feature, the best PCA component and the supervised direction</h3>")
        page.note("Each edited at its calibrated strength (its own attribute moved by the calibration target on the "
                  "calibration seeds), measured on the evaluation seeds: own effect and the largest side effect, in "
                  "standard deviations of the unedited scores.")
        page.add(df_html(pd.read_csv(ev / "sae_factors.csv")))
    if (ev / "table1_sae.csv").exists():
        page.add("<h3>Table 1 of the SAE features (calibrated strength)</h3>")
        page.add(table1_html(pd.read_csv(ev / "table1_sae.csv")))
    strips = sorted((ev / "strips" / "sae").glob("*.png")) if (ev / "strips" / "sae").is_dir() else []
    if strips:
        page.add("<h3>Edit strips of the evaluated features</h3><div class=\"grid\">")
        for png in strips:
            page.image(png, png.stem, name=f"sweep-sae-{png.name}")
        page.add("</div>")
