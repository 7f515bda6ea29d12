"""`hspace evaluate`: the paper's Table 1 on held-out seeds, at a fixed scale and at calibrated
strengths, the dose-response of every direction, plus image-change and quality checks.

Every direction of the supervised file ("original") and of the disentangled file is applied
at ``evaluate.scale`` to ``evaluate.num_samples`` new seeds, in ``evaluate.repeats`` disjoint
seed sets starting at ``evaluate.first_seed`` (never used to find the directions), and at its
calibrated strength (the scale that moves its own attribute by one standard deviation on the
calibration seeds, stored in its file by the disentangle stage: ``table1_calibrated.*``). The
scorer (an annotator: CLIP with the paper's prompts for faces, the toy annotator for the toy
domain) scores each original and edited image; also recorded per edit: the mean absolute pixel
change and an image-quality score (MTCNN face probability, or the toy render error). The top PCA
directions and as many norm-matched random directions are applied too (paper Fig. 6).

Dose-response: on the first ``evaluate.sweep_samples`` seeds every direction is also applied at
its sweep scales (``sweep_multiples`` of its calibrated strength, else its file's suggested
scales): ``dose_response.csv``/``.png`` (own effect against the largest side effect and the image
change, with bootstrap intervals). Every (direction, scale) is sampled once per seed whatever
tables it serves, and each seed's unedited sample once. When those seeds include ``edit.seeds``
the edit strips of these families are drawn from the same images (``strips/``) and the figures
stage leaves them out. Images are sampled ``batch_size`` at a time, scored and dropped.

``Trainer.predict`` over (seed set, batch of seeds): one Parquet part per batch, resumable;
rank 0 merges them into ``<run_dir>/evaluation/per_sample.parquet`` and writes
``table1.csv``/``table1.md`` (paper layout, strongest effect per row in bold), ``table1_signed.csv``
(the same with signs), the heatmaps,
``pca_vs_random.csv`` and ``summary.json``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from evaluation.metrics import (
    bootstrap_effects,
    disentanglement_summary,
    dose_response,
    effect_matrix,
    own_attribute,
    pca_vs_random,
    primary,
    table1_markdown,
)
from evaluation.preservation import build_embedder, identity_similarity, preservation_table
from pipeline.config import to_dict
from pipeline.engine.model import HSpaceModel, default_device
from pipeline.errors import ConfigError, DatasetError
from pipeline.formats.directions import load_directions
from pipeline.formats.identity import folder_files, parquet_metadata, read_record, seal_folder, verify
from pipeline.formats.images import to_uint8
from pipeline.io import atomic_path, write_json_atomic, write_text_atomic
from pipeline.methods.calibration import calibrated_scale
from pipeline.registry import COMMANDS
from pipeline.stages.figures import evaluated_strips
from pipeline.stages.lightning_utils import (
    ItemModule,
    ItemsProgress,
    RankShare,
    launching_rank,
    predict_parts,
    rank0_first,
    share_cpu_threads,
)

# Seeds the pixel-matched random baseline is calibrated on (the first calibration seeds, never evaluated on); 4
# are close to 8 in half the time (docs/benchmarks.md).
CALIBRATION_SEEDS = 4

#: evaluated family -> the edit-strip folder it fills (the names of the figures stage)
STRIP_FOLDERS = {"original": "supervised", "disentangled": "disentangled", "pca": "pca", "random": "pca_random"}


def eval_dir(run_dir) -> Path:
    return Path(run_dir) / "evaluation"


# ---------------------------------------------------------------------- what to apply
@dataclass
class Edit:
    """``scale * unit`` applied as delta_h. ``roles``: the tables it serves ("table1": the fixed
    scale, "calibrated": the calibrated strength, "fig6": PCA against random); an edit with no role
    is a dose-response point, applied on the sweep seeds only (every edit is applied there)."""

    name: str
    family: str
    unit: torch.Tensor
    scale: float
    roles: set = field(default_factory=set)

    @property
    def delta(self) -> torch.Tensor:
        return self.scale * self.unit

    @property
    def sweep_only(self) -> bool:
        return not self.roles


def _add(edits: list[Edit], name, family, unit, scale, role=None) -> None:
    """One edit per (direction, scale): a scale asked for twice serves both roles."""
    for e in edits:
        if e.name == name and e.scale == float(scale):
            e.roles |= {role} if role else set()
            return
    edits.append(Edit(name, family, unit, float(scale), {role} if role else set()))


def edit_list(run_dir, ev_cfg, model=None) -> list[Edit]:
    """Every edit to evaluate (directions checked to fit ``model``'s h when given): each supervised
    ("original") and disentangled direction at the fixed scale (a disentangled one rescaled to its
    original's norm with ``match_norm``), at its calibrated strength (``calibrated``) and at the
    sweep scales (``sweep_multiples`` of the calibrated strength, else the file's suggested scales);
    the top PCA directions and as many norm-matched random ones at ``pca_scale`` and the PCA file's
    suggested scales, and the pixel-matched random ones."""
    d = Path(run_dir) / "directions"
    edits: list[Edit] = []
    original = load_directions(d / "supervised.safetensors", model)
    files = [("original", original)]
    if (d / "disentangled.safetensors").exists():
        files.append(("disentangled", load_directions(d / "disentangled.safetensors", model)))
    sweep = ev_cfg.sweep_samples > 0
    for family, dirs in files:
        for name, v in zip(dirs.names, dirs.directions):
            fixed = ev_cfg.scale
            if family == "disentangled" and ev_cfg.match_norm and primary(name) in original.names:
                fixed *= float(original.get(primary(name)).norm() / v.norm().clamp_min(1e-12))
            _add(edits, name, family, v, fixed, "table1")
            calibrated = calibrated_scale(dirs.params, name)
            if calibrated is not None and ev_cfg.calibrated:
                _add(edits, name, family, v, calibrated, "calibrated")
            if sweep:
                points = ([m * calibrated for m in ev_cfg.sweep_multiples] if calibrated is not None
                          else [s for s in dirs.params.get("scales") or [] if s != 0])
                for s in points:
                    _add(edits, name, family, v, s)
    fig6 = pca_and_random(run_dir, ev_cfg, model)
    for e in fig6:
        _add(edits, e.name, e.family, e.unit, e.scale, "fig6")
    if sweep and fig6:
        pca_scales = load_directions(d / "pca.safetensors").params.get("scales") or []
        for e in fig6:
            for s in pca_scales:
                if s != 0:
                    _add(edits, e.name, e.family, e.unit, s)
    calibration = eval_dir(run_dir) / "pixel_matching.json"
    if ev_cfg.pixel_matched_random and calibration.exists():
        randoms = {e.name: e for e in fig6 if e.family == "random"}
        for name, c in json.loads(calibration.read_text())["multipliers"].items():
            _add(edits, f"{name}-pixmatch", "random_pixel", randoms[name].unit, c * randoms[name].scale, "fig6")
    return edits


def pca_and_random(run_dir, ev_cfg, model=None) -> list[Edit]:
    """The top PCA directions at ``pca_scale`` and the norm-matched random ones (paper Fig. 6)."""
    pca_path = Path(run_dir) / "directions" / "pca.safetensors"
    if ev_cfg.pca_components <= 0 or not pca_path.exists():
        return []
    pca = load_directions(pca_path, model)
    k = min(ev_cfg.pca_components, len(pca))
    edits = [Edit(pca.names[i], "pca", pca.directions[i], ev_cfg.pca_scale, {"fig6"}) for i in range(k)]
    if "random_directions" in pca.extras:
        edits += [Edit(f"random{i + 1}", "random", pca.extras["random_directions"][i], ev_cfg.pca_scale, {"fig6"})
                  for i in range(k)]
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
    pcs = [e.delta for e in edits if e.family == "pca"]
    randoms = [(e.name, e.delta) for e in edits if e.family == "random"]
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
def sweep_seeds(ev_cfg) -> list[int]:
    """The dose-response seeds: the first ``sweep_samples`` of the first seed set."""
    return list(range(ev_cfg.first_seed, ev_cfg.first_seed + min(ev_cfg.sweep_samples, ev_cfg.num_samples)))


def strip_seeds(cfg) -> list[int]:
    """The edit strips' seeds (edit.seeds) when the sweep covers them: the strips of the evaluated
    families are then its images (the figures stage leaves them out: ``evaluated_strips``)."""
    return list(cfg.edit.seeds) if evaluated_strips(cfg) else []


class EvaluateModule(ItemModule):
    """predict_item: one batch of seeds -> one row per (seed, edit) with all score changes.

    The images are sampled ``batch_size`` at a time (unedited first), scored and dropped: a process
    holds two batches of images, however many edits there are. The edits are read in ``setup``,
    after every process has joined: under ``hspace run`` the directions are written by rank 0 just
    before."""

    def __init__(self, model: HSpaceModel, run_dir, ev_cfg, scorer, quality, quality_score: str | None,
                 strips: list[int] = ()):
        super().__init__()
        self.hmodel, self.scorer, self.quality, self.quality_score = model, scorer, quality, quality_score
        self.run_dir, self.ev_cfg, self.strips = run_dir, ev_cfg, set(strips)
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
        return {a: v.detach().cpu() for a, v in scores.items()}, q.detach().cpu()

    def predict_item(self, item):
        repeat, seeds = item
        self.hmodel.to(self.device)
        sweep = set(sweep_seeds(self.ev_cfg))
        jobs = [(s, None) for s in seeds] + [(s, e) for e in self.edits for s in seeds
                                             if not e.sweep_only or s in sweep]
        base, s0, q0, rows = {}, {}, {}, []
        for idx, images in self.hmodel.iter_edits([(s, None if e is None else e.delta) for s, e in jobs],
                                                  batch_size=self.ev_cfg.batch_size):
            scores, q = self._measure(images)
            for j, i in enumerate(idx):  # the unedited samples first: every edit of a seed is compared with its own
                seed, e = jobs[i]
                if e is None:
                    base[seed], q0[seed] = images[j], float(q[j])
                    s0[seed] = {a: float(v[j]) for a, v in scores.items()}
            edited = [j for j, i in enumerate(idx) if jobs[i][1] is not None]
            identity = (identity_similarity(self.embedder, torch.stack([base[jobs[idx[j]][0]] for j in edited]),
                                            images[edited]) if edited and self.embedder is not None else None)
            for j, i in enumerate(idx):
                seed, e = jobs[i]
                if e is None:
                    continue
                row = {"repeat": repeat, "seed": seed, "direction": e.name, "family": e.family, "scale": e.scale,
                       "table1": "table1" in e.roles, "calibrated": "calibrated" in e.roles, "fig6": "fig6" in e.roles,
                       "pixel_change": float((images[j] - base[seed]).abs().mean() / 2),  # in [0, 1] units
                       "quality_before": q0[seed], "quality_after": float(q[j])}
                row.update({f"o_{a}": s0[seed][a] for a in s0[seed]})
                row.update({f"d_{a}": float(v[j]) - s0[seed][a] for a, v in scores.items()})
                if identity is not None:  # face identity (evaluation/preservation.py) with evaluate.identity_weights
                    row["identity"] = float(identity[edited.index(j)])
                strip = seed in self.strips and e.family in STRIP_FOLDERS
                row["image"] = png_bytes(images[j]) if strip else None  # every row has the columns (Arrow's schema)
                row["base_image"] = png_bytes(base[seed]) if strip else None
                rows.append(row)
        return {"repeat": repeat, "seeds": seeds, "rows": rows}


def png_bytes(image: torch.Tensor) -> bytes:
    """An image (3, H, W) in [-1, 1] as PNG bytes (the strips are drawn from them)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(to_uint8(image[None])[0]).save(buf, format="PNG")
    return buf.getvalue()


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
def write_results(run_dir, ev_cfg, items, record: dict, strips: list[int] = ()) -> dict:
    """Rank 0: the parts -> per_sample.parquet, Table 1 and the rest; the folder's identity record last."""
    out = eval_dir(run_dir)
    parts = [out / "parts" / part_name(r, s) for r, s in items]
    missing = [p for p in parts if not p.exists()]
    if missing:
        raise DatasetError(f"{len(missing)} evaluation parts are missing (e.g. {missing[0].name}); re-run hspace evaluate")
    per_sample = pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)
    write_strips(per_sample, list(strips), out / "strips")
    per_sample = per_sample.drop(columns=[c for c in ("image", "base_image") if c in per_sample])
    with atomic_path(out / "per_sample.parquet") as tmp:
        per_sample.to_parquet(tmp, index=False)
    summary = summarise(per_sample, ev_cfg, out)
    seal_folder(out, record, [f for f in folder_files(out) if not f.startswith("parts/") and f != "pixel_matching.json"])
    return summary


def write_strips(per_sample: pd.DataFrame, seeds: list[int], out: Path) -> None:
    """The edit strips of the evaluated families, from the sweep's images of ``seeds`` (rows: seeds;
    columns: the scales applied to every one of them, 0 the unedited sample): the folder ``out``
    is replaced whole, as the figures stage's is."""
    import io

    from PIL import Image

    from pipeline.formats.figures import image_grid_figure, save_figure
    from pipeline.stages.edit import safe_name

    with atomic_path(out) as tmp:
        tmp.mkdir()
        if not seeds or "image" not in per_sample:
            return
        rows = per_sample[per_sample.seed.isin(seeds) & per_sample.image.notna()]

        def decode(b):
            return np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))

        for (family, direction), g in rows.groupby(["family", "direction"], sort=False):
            scales = sorted(sc for sc, h in g.groupby("scale") if set(h.seed) >= set(seeds))
            grid = [[decode(g[g.seed == seed].base_image.iloc[0])]
                    + [decode(g[(g.seed == seed) & (g.scale == sc)].image.iloc[0]) for sc in scales] for seed in seeds]
            cols = sorted([0.0] + scales)
            order = [([0.0] + scales).index(c) for c in cols]
            grid = np.stack([np.stack([r[i] for i in order]) for r in grid])
            fig = image_grid_figure(grid, row_labels=[f"seed {s}" for s in seeds], col_labels=[f"{c:+.3g}" for c in cols],
                                    title=direction)
            save_figure(fig, tmp / STRIP_FOLDERS[family] / f"{safe_name(direction)}.png")


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


def table1_outputs(keep: pd.DataFrame, scale: dict, ev_cfg, out: Path, suffix: str = "") -> tuple[list, dict]:
    """Table 1 of the rows ``keep`` (csv, signed csv, markdown, heatmaps) and its disentanglement
    checks (``disentanglement<suffix>.csv``, with bootstrap intervals) -> (sections, summary counts)."""
    from evaluation.plots import effect_heatmaps

    mapping = to_dict(ev_cfg.own_attribute)
    families = dict(zip(keep.direction, keep.family))
    sections, table = table1_sections(keep, scale)
    signed_sections, signed_table = table1_sections(keep, scale, signed=True)
    unit = "in standard deviations of the unedited scores" if ev_cfg.normalize else "in score units"
    write_text_atomic(out / f"table1{suffix}.csv", table.to_csv(index=False))
    write_text_atomic(out / f"table1{suffix}_signed.csv", signed_table.to_csv(index=False))
    write_text_atomic(out / f"table1{suffix}.md", table1_markdown(sections, unit))
    effect_heatmaps(sections, out / f"table1{suffix}.png", unit)
    effect_heatmaps(signed_sections, out / f"table1{suffix}_signed.png", unit, signed=True)
    all_mean = pd.concat([sec[1] for sec in sections])
    rows = keep[keep.family.isin(["original", "disentangled"])]
    boot = bootstrap_effects(rows, scale, ev_cfg.bootstrap, seed=0) if ev_cfg.bootstrap and len(rows) else None
    summary_rows = disentanglement_summary(all_mean, families, mapping, boot)
    write_text_atomic(out / f"disentanglement{suffix}.csv", summary_rows.to_csv(index=False))
    summary = {"disentangled_own_strongest": None, "rows_with_lower_max_off_diagonal": None,
               "all_disentangled_own_strongest": None, "disentangling_lowers_max_off_diagonal": None}
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
    return sections, summary


def summarise(per_sample: pd.DataFrame, ev_cfg, out: Path) -> dict:
    """Table 1 at the fixed scale and at the calibrated strengths (csv + markdown, heatmaps,
    checks), image change, PCA vs random, the dose-response curves, summary.json."""
    from evaluation.dose import dose_response_plot
    from evaluation.plots import pca_vs_random_plot

    attrs = [a[2:] for a in per_sample.columns if a.startswith("d_")]
    mapping = to_dict(ev_cfg.own_attribute)
    measured = list(ev_cfg.attributes) or [a for a in dict.fromkeys(own_attribute(d, mapping) for d in per_sample.direction)
                                           if a in attrs]
    if not measured:
        raise ConfigError(f"evaluate.attributes is empty and no direction is named after a scorer attribute ({attrs}); "
                          f"list the attributes to measure")
    unedited = per_sample.drop_duplicates(["repeat", "seed"])
    scale = {a: float(unedited[f"o_{a}"].std(ddof=1)) if ev_cfg.normalize else 1.0 for a in measured}
    columns = ["repeat", "seed", "direction", "family", "scale", "pixel_change", "quality_before", "quality_after"]
    keep = per_sample[columns + [f"d_{a}" for a in measured]]
    unit = "in standard deviations of the unedited scores" if ev_cfg.normalize else "in score units"
    _, summary = table1_outputs(keep[per_sample.table1], scale, ev_cfg, out)
    summary = {"num_samples": int(ev_cfg.num_samples), "repeats": int(ev_cfg.repeats), "scale": float(ev_cfg.scale),
               "scorer": ev_cfg.scorer, "measured": measured, "unit": unit, **summary}
    if per_sample.calibrated.any():
        cal = keep[per_sample.calibrated]
        _, cal_summary = table1_outputs(cal, scale, ev_cfg, out, "_calibrated")
        summary["calibrated"] = {**cal_summary, "scales": {d: float(g.scale.iloc[0]) for d, g in
                                                           cal.groupby("direction", sort=False)}}
    table_rows = keep[per_sample.table1 | per_sample.fig6]
    quality = table_rows.groupby("direction", sort=False)[["pixel_change", "quality_before", "quality_after"]].mean()
    write_text_atomic(out / "image_change.csv", quality.to_csv())
    fixed = per_sample[per_sample.table1 | per_sample.fig6]
    write_text_atomic(out / "preservation.csv", preservation_table(fixed, mapping).to_csv(index=False))
    pvr = pca_vs_random(keep[per_sample.fig6], scale)
    if not pvr.empty:
        write_text_atomic(out / "pca_vs_random.csv", pvr.to_csv(index=False))
        pca_vs_random_plot(pvr, out / "pca_vs_random.png")
        fam = pvr.groupby("family").effect_per_pixel_change.mean()
        summary["pca_effect_per_pixel"] = float(fam.get("pca", np.nan))
        summary["random_effect_per_pixel"] = float(fam.get("random", np.nan))
        if "random_pixel" in fam:
            summary["random_pixel_matched_effect_per_pixel"] = float(fam["random_pixel"])
    sweep = keep[keep.seed.isin(sweep_seeds(ev_cfg)) & (keep.family != "random_pixel")]
    if sweep_seeds(ev_cfg) and not sweep.empty:
        curves = dose_response(sweep, scale, mapping)
        write_text_atomic(out / "dose_response.csv", curves.to_csv(index=False))
        dose_response_plot(curves, out / "dose_response.png", unit)
        summary["dose_response"] = {"seeds": len(sweep_seeds(ev_cfg)), "directions": int(curves.direction.nunique())}
    write_json_atomic(out / "summary.json", summary)
    return summary


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
    stage = COMMANDS["evaluate"]
    for name in stage.read_names(cfg):
        verify(run_dir, name)
    out = eval_dir(run_dir)
    record, part_key = stage.identity(cfg), stage.part_key(cfg)
    model = HSpaceModel.from_config(cfg, under_trainer=True)
    scorer = build_annotator(ev.scorer, ev.scorer_options)
    quality = build_annotator(ev.quality, {}) if ev.quality else None
    calibration = out / "pixel_matching.json"
    edits = edit_list(run_dir, ev, model)  # every file fits the model, before any sampling
    if not any(e.family == "original" for e in edits):
        raise DatasetError(f"{run_dir}/directions/supervised.safetensors holds no directions; re-run hspace supervised "
                           f"(with select.attributes naming what to find)")
    rank0_first(lambda: clean_existing(out, part_key))  # after the checks above: a mistyped setting removes nothing
    if launching_rank() == 0:
        if ev.pixel_matched_random and pca_and_random(run_dir, ev, model) and not calibration.exists():
            seeds = list(range(cfg.calibrate.first_seed, cfg.calibrate.first_seed + CALIBRATION_SEEDS))
            model.to(default_device(cfg.model.device))  # on the GPU if there is one (the ranks start after this)
            multipliers = calibrate_random(model, run_dir, ev, seeds)
            model.to("cpu")
            write_json_atomic(calibration, {"key": part_key, "seeds": seeds, "multipliers": multipliers})
            print("hspace evaluate: random directions rescaled to their component's pixel change: "
                  + ", ".join(f"{k} x{v:.1f}" for k, v in multipliers.items()))
    items, strips = seed_sets(ev), strip_seeds(cfg)
    todo = rank0_first(lambda: remaining(run_dir, items))  # after rank 0's calibration
    if todo:
        trainer = predict_parts(
            cfg.trainer, EvaluateModule(model, run_dir, ev, scorer, quality, ev.quality_score, strips),
            EvaluateData(run_dir, items), tag="evaluate", merge=lambda: write_results(run_dir, ev, items, record, strips),
            parts=out / "parts", name=lambda p: part_name(p["repeat"], p["seeds"]),
            write=lambda p, path: write_part(p, path, part_key),
            progress=ItemsProgress("evaluate", sum(len(s) for _, s in todo), count=lambda it: len(it[1])))
        if not trainer.is_global_zero:
            return {}
    else:
        write_results(run_dir, ev, items, record, strips)
    summary = json.loads((out / "summary.json").read_text())
    print((out / "table1.md").read_text())
    if (out / "table1_calibrated.md").exists():
        print("At the calibrated strengths (matched own effect):\n" + (out / "table1_calibrated.md").read_text())
    edits = edit_list(run_dir, ev)
    images = sum(len(s) if not e.sweep_only else len(set(s) & set(sweep_seeds(ev))) for e in edits for _, s in items)
    print(f"hspace evaluate: {len(edits)} edits, {images} edited images of {ev.repeats * ev.num_samples} seeds -> {out}")
    return summary
