"""`hspace evaluate`: the paper's Table 1 on held-out seeds, plus image-change and quality checks.

Every direction of the supervised file ("original") and of the disentangled file is applied
at ``evaluate.scale`` to ``evaluate.num_samples`` new seeds, in ``evaluate.repeats`` disjoint
seed sets starting at ``evaluate.first_seed`` (never used to find the directions). The scorer
(an annotator: CLIP with the paper's prompts for faces, the toy annotator for the toy domain)
scores each original and edited image; also recorded per edit: the mean absolute pixel change
and an image-quality score (MTCNN face probability, or the toy render error). The top PCA
directions and as many norm-matched random directions are applied too (paper Fig. 6).

``Trainer.predict`` over (seed set, batch of seeds): one Parquet part per batch, resumable;
rank 0 merges them into ``<run_dir>/evaluation/per_sample.parquet`` and writes
``table1.csv``/``table1.md`` (paper layout, strongest effect per row in bold), ``table1_signed.csv``
(the same with signs), the heatmaps,
``pca_vs_random.csv`` and ``summary.json``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from annotators import assets_identity
from pipeline.config import to_dict
from pipeline.directions import load_directions
from pipeline.errors import ConfigError, DatasetError
from pipeline.identity import (
    FOLDER_RECORD,
    artefact_ids,
    config_sections,
    make_record,
    parquet_metadata,
    present,
    read_record,
    verify,
)
from pipeline.io import atomic_path, write_json_atomic, write_text_atomic
from pipeline.loading import weights_identity
from pipeline.model import HSpaceModel, default_device
from pipeline.stages.lightning_utils import (
    AfterAllRanks,
    ItemModule,
    ItemsProgress,
    PartWriter,
    RankShare,
    agreed,
    launching_rank,
    make_trainer,
    share_cpu_threads,
)

from .metrics import (
    bootstrap_effects,
    disentanglement_summary,
    effect_matrix,
    own_attribute,
    pca_vs_random,
    primary,
    table1_markdown,
)
from .preservation import build_embedder, identity_similarity, preservation_table

# Seeds the pixel-matched random baseline is calibrated on (the first of the first seed set); 4 are
# close to 8 in half the time (docs/benchmarks.md).
CALIBRATION_SEEDS = 4


def eval_dir(run_dir) -> Path:
    return Path(run_dir) / "evaluation"


# ---------------------------------------------------------------------- what to apply
def edit_list(run_dir, ev_cfg, model=None) -> list[tuple[str, str, torch.Tensor]]:
    """(name, family, delta (T, C, H, W)) for every edit to evaluate, scales applied (checked to fit
    ``model``'s h when given)."""
    d = Path(run_dir) / "directions"
    edits = []
    original = load_directions(d / "supervised.safetensors", model)
    for name, v in zip(original.names, original.directions):
        edits.append((name, "original", ev_cfg.scale * v))
    dis_path = d / "disentangled.safetensors"
    if dis_path.exists():
        dis = load_directions(dis_path, model)
        for name, v in zip(dis.names, dis.directions):
            if ev_cfg.match_norm and primary(name) in original.names:
                v = v * (original.get(primary(name)).norm() / v.norm().clamp_min(1e-12))
            edits.append((name, "disentangled", ev_cfg.scale * v))
    fig6 = pca_and_random(run_dir, ev_cfg, model)
    edits += fig6
    calibration = eval_dir(run_dir) / "pixel_matching.json"
    if ev_cfg.pixel_matched_random and calibration.exists():
        randoms = {name: v for name, family, v in fig6 if family == "random"}
        for name, c in json.loads(calibration.read_text())["multipliers"].items():
            edits.append((f"{name}-pixmatch", "random_pixel", c * randoms[name]))
    return edits


def pca_and_random(run_dir, ev_cfg, model=None) -> list[tuple[str, str, torch.Tensor]]:
    """The top PCA directions at ``pca_scale`` and the norm-matched random ones (paper Fig. 6)."""
    pca_path = Path(run_dir) / "directions" / "pca.safetensors"
    if ev_cfg.pca_components <= 0 or not pca_path.exists():
        return []
    pca = load_directions(pca_path, model)
    k = min(ev_cfg.pca_components, len(pca))
    edits = [(pca.names[i], "pca", ev_cfg.pca_scale * pca.directions[i]) for i in range(k)]
    if "random_directions" in pca.extras:
        edits += [(f"random{i + 1}", "random", ev_cfg.pca_scale * pca.extras["random_directions"][i]) for i in range(k)]
    return edits


def pixel_changes(model: HSpaceModel, seeds, deltas, base: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """Mean absolute pixel change (in [0, 1] units) of the seeds' samples under each delta (T, C, H, W)."""
    images = model.sample_edits(seeds, list(deltas), batch_size=batch_size)
    return ((images - base.cpu()).abs().mean(dim=(1, 2, 3, 4)) / 2).numpy()


def match_pixel_change(model: HSpaceModel, seeds, directions, targets, rtol: float = 0.03, max_iter: int = 6,
                       base: torch.Tensor | None = None, batch_size: int = 64) -> np.ndarray:
    """Multipliers c such that ``c[k] * directions[k]`` changes the seeds' samples by ``targets[k]``
    (mean absolute pixel change): secant steps on log(change) against log(c), from c = 1 and the
    linear guess, for all directions at once. The change is monotone but not linear in c (small
    edits are damped, large ones break the image), so the linear guess alone is off by up to
    several times."""
    directions, targets = list(directions), np.asarray(targets, dtype=float)
    base = model.sample(seeds).images if base is None else base
    c0, p0 = np.ones(len(directions)), pixel_changes(model, seeds, directions, base, batch_size)
    if (p0 <= 0).any() or (targets <= 0).any():
        raise ValueError(f"cannot match pixel changes {targets.tolist()} with directions that change {p0.tolist()} "
                         f"(a direction that changes nothing has no multiplier)")
    c1 = targets / p0
    p1 = pixel_changes(model, seeds, [c * d for c, d in zip(c1, directions)], base, batch_size)
    for _ in range(max_iter):
        todo = np.flatnonzero(np.abs(np.log(p1 / targets)) > rtol)
        if not len(todo):
            break
        for k in todo:
            slope = np.clip(np.log(p1[k] / p0[k]) / np.log(c1[k] / c0[k]), 0.2, 5.0) if c1[k] != c0[k] else 1.0
            c0[k], p0[k] = c1[k], p1[k]
            c1[k] = c1[k] * float(np.clip(np.exp(np.log(targets[k] / p1[k]) / slope), 0.1, 10.0))
        p1[todo] = pixel_changes(model, seeds, [c1[k] * directions[k] for k in todo], base, batch_size)
    return c1


def calibrate_random(model: HSpaceModel, run_dir, ev_cfg, seeds) -> dict[str, float]:
    """Per random direction, the multiplier that makes it change the images as much as its PCA
    component (on ``seeds``): the pixel-matched baseline, where the Fig. 6 claim (random
    directions degrade the image instead of changing attributes) can be read off per pixel."""
    edits = pca_and_random(run_dir, ev_cfg, model)
    pcs = [v for _, family, v in edits if family == "pca"]
    randoms = [(name, v) for name, family, v in edits if family == "random"]
    base = model.sample(seeds).images
    targets = pixel_changes(model, seeds, pcs[:len(randoms)], base, ev_cfg.batch_size)
    multipliers = match_pixel_change(model, seeds, [v for _, v in randoms], targets, base=base,
                                     batch_size=ev_cfg.batch_size)
    return {name: float(c) for (name, _), c in zip(randoms, multipliers)}


def seed_sets(ev_cfg) -> list[tuple[int, list[int]]]:
    """(repeat, batch of seeds): disjoint seed sets of num_samples each, starting at first_seed."""
    items = []
    for r in range(ev_cfg.repeats):
        start = ev_cfg.first_seed + r * ev_cfg.num_samples
        for b in range(start, start + ev_cfg.num_samples, ev_cfg.batch_size):
            items.append((r, list(range(b, min(b + ev_cfg.batch_size, start + ev_cfg.num_samples)))))
    return items


# ---------------------------------------------------------------------- Lightning
class EvaluateModule(ItemModule):
    """predict_item: one batch of seeds -> one row per (seed, edit) with all score changes.

    The edits are read in ``setup``, after every process has joined: under ``hspace run`` the
    directions are written by rank 0 just before."""

    def __init__(self, model: HSpaceModel, run_dir, ev_cfg, scorer, quality, quality_score: str | None):
        super().__init__()
        self.hmodel, self.scorer, self.quality, self.quality_score = model, scorer, quality, quality_score
        self.run_dir, self.ev_cfg = run_dir, ev_cfg
        self.unet = model.unet

    def setup(self, stage: str) -> None:
        share_cpu_threads(self.trainer)
        self.edits = edit_list(self.run_dir, self.ev_cfg, self.hmodel)
        self.embedder = build_embedder(self.ev_cfg)  # face identity (evaluation/preservation.py), or None
        for ann in (self.scorer, self.quality, self.embedder):
            if ann is not None:
                ann.to(self.trainer.strategy.root_device)

    def _measure(self, images):
        images = images.to(self.device)
        scores = self.scorer(images)
        q = self.quality(images)[self.quality_score] if self.quality is not None else torch.full((len(images),), np.nan)
        return scores, q

    def predict_item(self, item):
        repeat, seeds = item
        self.hmodel.to(self.device)
        images = self.hmodel.sample_edits(seeds, [None] + [delta for _, _, delta in self.edits],
                                          batch_size=self.ev_cfg.batch_size)  # (1 + edits, seeds, 3, H, W)
        base = images[0]
        s0, q0 = self._measure(base)
        rows = []
        for (name, family, _), edited in zip(self.edits, images[1:]):
            s1, q1 = self._measure(edited)
            pixel = (edited - base).abs().mean(dim=(1, 2, 3)) / 2  # in [0, 1] units
            identity = identity_similarity(self.embedder, base, edited)  # NaN without evaluate.identity_weights
            for i, seed in enumerate(seeds):
                row = {"repeat": repeat, "seed": seed, "direction": name, "family": family,
                       "pixel_change": float(pixel[i]), "quality_before": float(q0[i]), "quality_after": float(q1[i])}
                row.update({f"o_{a}": float(s0[a][i]) for a in s0})
                row.update({f"d_{a}": float(s1[a][i] - s0[a][i]) for a in s0})
                if self.embedder is not None:
                    row["identity"] = float(identity[i])
                rows.append(row)
        return {"repeat": repeat, "seeds": seeds, "rows": rows}


def part_name(repeat: int, seeds) -> str:
    return f"part-r{repeat:02d}-{min(seeds):010d}-{max(seeds):010d}.parquet"


def remaining(run_dir, items) -> list:
    """The (repeat, seeds) items whose Parquet part is not written yet."""
    return [it for it in items if not (eval_dir(run_dir) / "parts" / part_name(*it)).exists()]


class EvaluateData(RankShare):
    def __init__(self, run_dir, items):
        super().__init__()
        self.run_dir, self.all_items = run_dir, items

    def plan(self) -> list:
        return remaining(self.run_dir, self.all_items)


# ---------------------------------------------------------------------- outputs
def write_results(run_dir, ev_cfg, items, record: dict) -> dict:
    """Rank 0: the parts -> per_sample.parquet, Table 1 and the rest; the folder's identity record last."""
    out = eval_dir(run_dir)
    parts = [out / "parts" / part_name(r, s) for r, s in items]
    missing = [p for p in parts if not p.exists()]
    if missing:
        raise DatasetError(f"{len(missing)} evaluation parts are missing (e.g. {missing[0].name}); re-run hspace evaluate")
    per_sample = pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)
    with atomic_path(out / "per_sample.parquet") as tmp:
        per_sample.to_parquet(tmp, index=False)
    summary = summarise(per_sample, ev_cfg, out)
    write_json_atomic(out / FOLDER_RECORD, record)
    return summary


def table1_sections(keep: pd.DataFrame, scale: dict, signed: bool = False):
    """[(title, mean, std)] for the original and disentangled families, and the same as one
    table (family, direction, <attr>..., <attr>_std...)."""
    sections, tables = [], []
    for family, title in (("original", "Original directions"), ("disentangled", "Disentangled directions")):
        sub = keep[keep.family == family]
        if sub.empty:
            continue
        mean, std = effect_matrix(sub, scale, signed=signed)
        sections.append((title, mean, std))
        tables.append(mean.join(std.add_suffix("_std")).rename_axis("direction").reset_index().assign(family=family))
    table = pd.concat(tables, ignore_index=True)
    return sections, table[["family", "direction"] + [c for c in table.columns if c not in ("family", "direction")]]


def summarise(per_sample: pd.DataFrame, ev_cfg, out: Path) -> dict:
    """Effect matrices, Table 1 (csv + markdown), heatmaps, PCA vs random, summary.json."""
    from .plots import effect_heatmaps, pca_vs_random_plot

    attrs = [a[2:] for a in per_sample.columns if a.startswith("d_")]
    mapping = to_dict(ev_cfg.own_attribute)
    measured = list(ev_cfg.attributes) or [a for a in dict.fromkeys(own_attribute(d, mapping) for d in per_sample.direction)
                                           if a in attrs]
    if not measured:
        raise ConfigError(f"evaluate.attributes is empty and no direction is named after a scorer attribute ({attrs}); "
                          f"list the attributes to measure")
    unedited = per_sample.drop_duplicates(["repeat", "seed"])
    scale = {a: float(unedited[f"o_{a}"].std(ddof=1)) if ev_cfg.normalize else 1.0 for a in measured}
    keep = per_sample[["repeat", "seed", "direction", "family", "pixel_change", "quality_before", "quality_after"]
                      + [f"d_{a}" for a in measured]]
    families = dict(zip(per_sample.direction, per_sample.family))
    sections, table = table1_sections(keep, scale)
    signed_sections, signed_table = table1_sections(keep, scale, signed=True)
    unit = "in standard deviations of the unedited scores" if ev_cfg.normalize else "in score units"
    write_text_atomic(out / "table1.csv", table.to_csv(index=False))
    write_text_atomic(out / "table1_signed.csv", signed_table.to_csv(index=False))
    write_text_atomic(out / "table1.md", table1_markdown(sections, unit))
    all_mean = pd.concat([s[1] for s in sections])
    rows = keep[keep.family.isin(["original", "disentangled"])]
    boot = bootstrap_effects(rows, scale, ev_cfg.bootstrap, seed=0) if ev_cfg.bootstrap and len(rows) else None
    summary_rows = disentanglement_summary(all_mean, families, mapping, boot)
    write_text_atomic(out / "disentanglement.csv", summary_rows.to_csv(index=False))
    quality = keep.groupby("direction", sort=False)[["pixel_change", "quality_before", "quality_after"]].mean()
    write_text_atomic(out / "image_change.csv", quality.to_csv())
    write_text_atomic(out / "preservation.csv", preservation_table(per_sample, mapping).to_csv(index=False))
    pvr = pca_vs_random(keep, scale)
    if not pvr.empty:
        write_text_atomic(out / "pca_vs_random.csv", pvr.to_csv(index=False))
        pca_vs_random_plot(pvr, out / "pca_vs_random.png")
    effect_heatmaps(sections, out / "table1.png", unit)
    effect_heatmaps(signed_sections, out / "table1_signed.png", unit, signed=True)
    summary = {
        "num_samples": int(ev_cfg.num_samples), "repeats": int(ev_cfg.repeats), "scale": float(ev_cfg.scale),
        "scorer": ev_cfg.scorer, "measured": measured, "unit": unit,
        "disentangled_own_strongest": None, "rows_with_lower_max_off_diagonal": None,
        "all_disentangled_own_strongest": None, "disentangling_lowers_max_off_diagonal": None,
    }
    if not summary_rows.empty:  # [how many pass, of how many], and whether all do
        disentangled = summary_rows[summary_rows.family == "disentangled"]
        compared = summary_rows.dropna(subset=["off_diagonal_vs_original"])
        own = [int(disentangled.own_is_strongest.sum()), len(disentangled)]
        lowered = [int((compared.off_diagonal_vs_original < 0).sum()), len(compared)]
        summary.update({"disentangled_own_strongest": own, "rows_with_lower_max_off_diagonal": lowered,
                        "all_disentangled_own_strongest": own[0] == own[1],
                        "disentangling_lowers_max_off_diagonal": lowered[0] == lowered[1]})
        if boot is not None:  # the same counts where the 95% bootstrap interval excludes 0
            summary.update({
                "bootstrap_resamples": int(ev_cfg.bootstrap),
                "disentangled_own_strongest_ci": {
                    "confirmed": int((disentangled.own_margin_ci_low > 0).sum()),
                    "contradicted": int((disentangled.own_margin_ci_high < 0).sum()), "of": len(disentangled)},
                "rows_with_lower_max_off_diagonal_ci": {
                    "confirmed": int((compared.off_diagonal_vs_original_ci_high < 0).sum()),
                    "contradicted": int((compared.off_diagonal_vs_original_ci_low > 0).sum()), "of": len(compared)}})
    if not pvr.empty:
        fam = pvr.groupby("family").effect_per_pixel_change.mean()
        summary["pca_effect_per_pixel"] = float(fam.get("pca", np.nan))
        summary["random_effect_per_pixel"] = float(fam.get("random", np.nan))
        if "random_pixel" in fam:
            summary["random_pixel_matched_effect_per_pixel"] = float(fam["random_pixel"])
    write_json_atomic(out / "summary.json", summary)
    return summary


def _directions(cfg, known: dict | None = None) -> list[str]:
    """The run's directions files an evaluation applies (supervised, and the others if present)."""
    optional = ["disentangled"] + (["pca"] if cfg.evaluate.pca_components > 0 else [])
    return ["directions/supervised.safetensors"] + present(cfg.run_dir, [f"directions/{n}.safetensors" for n in optional],
                                                           known)


def identity(cfg, known: dict | None = None, drop: tuple[str, ...] = ()) -> dict:
    """The record of the evaluation folder: settings, model, scorer weights and the directions.
    Without the bootstrap setting (``drop``), what every part is made from."""
    return make_record("evaluate", config_sections(cfg, "evaluate", "model", drop=drop),
                       assets={"model": weights_identity(cfg.model.name_or_path), "annotators": assets_identity()},
                       artefacts=artefact_ids(cfg.run_dir, _directions(cfg, known), known))


def clean_existing(out: Path, part_key: str) -> None:
    """Remove parts and calibration made from other directions or settings."""
    calibration = out / "pixel_matching.json"
    stale = [p for p in (out / "parts").glob("part-*.parquet") if (read_record(p) or {}).get("key") != part_key]
    if calibration.exists() and json.loads(calibration.read_text()).get("key") != part_key:
        stale.append(calibration)
    if stale:
        print(f"hspace evaluate: the directions or settings changed since the last evaluation; starting over in {out}")
        for p in stale:
            p.unlink()


def write_part(prediction: dict, path: Path, part_key: str) -> None:
    table = pa.Table.from_pylist(prediction["rows"])
    pq.write_table(table.replace_schema_metadata({**(table.schema.metadata or {}),
                                                  **parquet_metadata({"key": part_key})}), path)


def run_evaluate(cfg) -> dict:
    from annotators.base import build_annotator, check_columns

    run_dir, ev = Path(cfg.run_dir), cfg.evaluate
    check_columns(cfg, "evaluate")
    if not (Path(run_dir) / "directions" / "supervised.safetensors").exists():
        raise DatasetError(f"{run_dir}/directions/supervised.safetensors is missing; run hspace supervised first")
    for name in _directions(cfg):
        verify(run_dir, name)
    out = eval_dir(run_dir)
    record, part_key = identity(cfg), identity(cfg, drop=("evaluate.bootstrap",))["key"]
    model = HSpaceModel.from_config(cfg.model, device="cpu")
    scorer = build_annotator(ev.scorer, ev.scorer_options)
    quality = build_annotator(ev.quality, {}) if ev.quality else None
    calibration = out / "pixel_matching.json"
    if launching_rank() == 0:
        clean_existing(out, part_key)  # after the checks above: a mistyped setting removes nothing
    edit_list(run_dir, ev, model)  # every file fits the model, before any sampling
    if launching_rank() == 0:
        if ev.pixel_matched_random and pca_and_random(run_dir, ev, model) and not calibration.exists():
            seeds = seed_sets(ev)[0][1][:CALIBRATION_SEEDS]
            model.to(default_device(cfg.model.device))  # on the GPU if there is one (the ranks start after this)
            multipliers = calibrate_random(model, run_dir, ev, seeds)
            model.to("cpu")
            write_json_atomic(calibration, {"key": part_key, "seeds": seeds, "multipliers": multipliers})
            print("hspace evaluate: random directions rescaled to their component's pixel change: "
                  + ", ".join(f"{k} x{v:.1f}" for k, v in multipliers.items()))
    items = seed_sets(ev)
    todo = agreed(remaining(run_dir, items))  # after rank 0's clean-up
    if todo:
        progress = ItemsProgress("evaluate", sum(len(s) for _, s in todo), count=lambda it: len(it[1]))
        writer = PartWriter(out / "parts", lambda p: part_name(p["repeat"], p["seeds"]),
                            lambda p, path: write_part(p, path, part_key))
        merge = AfterAllRanks(lambda: write_results(run_dir, ev, items, record), "evaluate")
        trainer = make_trainer(cfg.trainer, [writer, progress, merge])
        trainer.predict(EvaluateModule(model, run_dir, ev, scorer, quality, ev.quality_score),
                        datamodule=EvaluateData(run_dir, items), return_predictions=False)
        if not trainer.is_global_zero:
            return {}
    else:
        write_results(run_dir, ev, items, record)
    summary = json.loads((out / "summary.json").read_text())
    print((out / "table1.md").read_text())
    print(f"hspace evaluate: {len(edit_list(run_dir, ev))} edits x {ev.repeats * ev.num_samples} samples -> {out}")
    return summary
