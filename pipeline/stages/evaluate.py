"""`hspace evaluate` and `hspace evaluate-calibrated`: the paper's Table 1 on held-out seeds, at a fixed
scale, then at calibrated strengths with the dose-response of every direction, plus image-change and
quality checks.

``hspace evaluate`` (the paper's pipeline, ``<run_dir>/evaluation/``): every direction of the supervised
file ("original") and of the disentangled file is applied at ``evaluate.scale`` to
``evaluate.num_samples`` new seeds, in ``evaluate.repeats`` disjoint seed sets starting at
``evaluate.first_seed`` (never used to find the directions). The scorer (an annotator: CLIP with the
paper's prompts for faces, the toy annotator for the toy domain) scores each original and edited
image; also recorded per edit: the mean absolute pixel change and an image-quality score (MTCNN face
probability, or the toy render error). The top PCA directions and as many norm-matched random
directions are applied too (paper Fig. 6), and random directions rescaled to their component's pixel
change.

``hspace evaluate-calibrated`` (a further analysis, after ``hspace calibrate``:
``<run_dir>/evaluation-calibrated/``): every direction at its calibrated strength (the scale that moves
its own attribute by one standard deviation on the calibration seeds: ``table1_calibrated.*``), and the
dose-response: on the first ``evaluate.sweep_samples`` seeds every direction at its sweep scales
(``sweep_multiples`` of its calibrated strength, else its file's suggested scales):
``dose_response.csv``/``.png`` (own effect against the largest side effect and the image change, with
bootstrap intervals; the fixed-scale evaluation's points on those seeds included). When those seeds
include ``edit.seeds`` the edit strips of these families are drawn from the same images (``strips/``)
and the figures stage leaves them out. The SAE family (pipeline.stages.sae_evaluate) is evaluated here
too. Its tables are normalised by the fixed-scale evaluation's unedited scores.

Every (direction, scale) is sampled once per seed whatever tables of a part it serves, and each seed's
unedited sample once per part. Images are sampled ``batch_size`` at a time, scored and dropped.
``Trainer.predict`` over (seed set, batch of seeds): one Parquet part per batch, resumable; rank 0
merges them into ``per_sample.parquet`` and writes ``table1.csv``/``table1.md`` (paper layout, strongest
effect per row in bold), ``table1_signed.csv`` (the same with signs), the heatmaps,
``pca_vs_random.csv`` and ``summary.json`` (and the calibrated part's files in its folder).
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

from evaluation import folders
from evaluation.preservation import build_embedder, identity_similarity
from evaluation.summary import summarise, summarise_calibrated
from pipeline.engine.model import HSpaceModel, default_device
from pipeline.errors import DatasetError
from pipeline.formats.directions import load_directions, with_calibration
from pipeline.formats.identity import folder_files, parquet_metadata, read_record, seal_folder, verify
from pipeline.formats.images import to_uint8
from pipeline.io import atomic_path, write_json_atomic
from pipeline.methods.calibration import calibrated_scale, primary_direction, search_scales
from pipeline.registry import COMMANDS, DISENTANGLED, SUPERVISED, evaluated_strips
from pipeline.stages.lightning_utils import (
    ItemModule,
    ItemsProgress,
    RankShare,
    launching_rank,
    predict_parts,
    rank0_first,
    share_cpu_threads,
)

# The pixel-matched random baseline: the seeds it is calibrated on (the first calibration seeds, never evaluated on;
# docs/benchmarks.md compares 4 with 8), how close to its component's pixel change, in how many rounds.
CALIBRATION_SEEDS = 4
PIXEL_RTOL = 0.025
PIXEL_ROUNDS = 8

#: evaluated family -> the edit-strip folder it fills (the names of the figures stage)
STRIP_FOLDERS = {"original": "supervised", "disentangled": "disentangled", "pca": "pca", "random": "pca_random",
                 "sae": "sae"}


#: the two parts of the evaluation: their stage and their folder under run_dir
PAPER, CALIBRATED = "evaluate", "evaluate-calibrated"
FOLDERS = {PAPER: folders.FIXED, CALIBRATED: folders.CALIBRATED}


def eval_dir(run_dir, part: str = PAPER) -> Path:
    return Path(run_dir) / FOLDERS[part]


# ---------------------------------------------------------------------- what to apply
@dataclass
class Edit:
    """``scale * unit`` applied as delta_h. ``roles``: the tables it serves ("table1": the fixed
    scale, "calibrated": the calibrated strength, "fig6": PCA against random, "sae": the SAE family at its
    calibrated strength, pipeline.stages.sae_evaluate); an edit with no role
    is a dose-response point, applied on the sweep seeds only (every edit is applied there)."""

    name: str
    family: str
    unit: torch.Tensor
    scale: float
    roles: set = field(default_factory=set)
    target: str = ""  # the SAE family's: the attribute it is matched to, and the correlation it was chosen by
    target_r: float = float("nan")

    @property
    def delta(self) -> torch.Tensor:
        return self.scale * self.unit

    @property
    def sweep_only(self) -> bool:
        return not self.roles


def _add(edits: list[Edit], name, family, unit, scale, role=None, **extra) -> None:
    """One edit per (direction, scale): a scale asked for twice serves both roles."""
    for e in edits:
        if e.name == name and e.scale == float(scale):
            e.roles |= {role} if role else set()
            return
    edits.append(Edit(name, family, unit, float(scale), {role} if role else set(), **extra))


def edit_list(run_dir, ev_cfg, model=None, part: str = PAPER) -> list[Edit]:
    """Every edit of one part of the evaluation (directions checked to fit ``model``'s h when given).
    ``PAPER``: each supervised ("original") and disentangled direction at the fixed scale (a disentangled
    one rescaled to its original's norm with ``match_norm``), the top PCA directions and as many
    norm-matched random ones at ``pca_scale``, and the pixel-matched random ones. ``CALIBRATED``: each
    supervised and disentangled direction at its calibrated strength (``calibrated``) and at the sweep
    scales (``sweep_multiples`` of the calibrated strength, else the file's suggested scales), the PCA and
    random ones at the PCA file's suggested scales, and the SAE family."""
    d = Path(run_dir) / "directions"
    edits: list[Edit] = []

    def read(name):
        dirs = load_directions(Path(run_dir) / name, model)
        return with_calibration(dirs, Path(run_dir) / name, run_dir) if part == CALIBRATED else dirs

    original = read(SUPERVISED)
    files = [("original", original)]
    if (Path(run_dir) / DISENTANGLED).exists():
        files.append(("disentangled", read(DISENTANGLED)))
    sweep = ev_cfg.sweep_samples > 0
    for family, dirs in files:
        for name, v in zip(dirs.names, dirs.directions):
            if part == PAPER:
                fixed = ev_cfg.scale
                if family == "disentangled" and ev_cfg.match_norm and primary_direction(name) in original.names:
                    fixed *= float(original.get(primary_direction(name)).norm() / v.norm().clamp_min(1e-12))
                _add(edits, name, family, v, fixed, "table1")
                continue
            calibrated = calibrated_scale(dirs.params, name)
            if calibrated is not None and ev_cfg.calibrated:
                _add(edits, name, family, v, calibrated, "calibrated")
            if sweep:
                points = ([m * calibrated for m in ev_cfg.sweep_multiples] if calibrated is not None
                          else [s for s in dirs.params.get("scales") or [] if s != 0])
                for s in points:
                    _add(edits, name, family, v, s)
    fig6 = pca_and_random(run_dir, ev_cfg, model)
    if part == PAPER:
        for e in fig6:
            _add(edits, e.name, e.family, e.unit, e.scale, "fig6")
        calibration = eval_dir(run_dir) / "pixel_matching.json"
        if ev_cfg.pixel_matched_random and calibration.exists():
            randoms = {e.name: e for e in fig6 if e.family == "random"}
            for name, c in json.loads(calibration.read_text())["multipliers"].items():
                _add(edits, f"{name}-pixmatch", "random_pixel", randoms[name].unit, c * randoms[name].scale, "fig6")
        return edits
    if sweep and fig6:
        pca_scales = load_directions(d / "pca.safetensors").params.get("scales") or []
        for e in fig6:
            for s in pca_scales:
                if s != 0:
                    _add(edits, e.name, e.family, e.unit, s)
    _add_sae_family(edits, run_dir, ev_cfg, model)
    return edits


def _add_sae_family(edits: list[Edit], run_dir, ev_cfg, model=None) -> None:
    """The SAE features and matched PCA components (pipeline.stages.sae_evaluate) at their calibrated strength
    (scale 1 without a calibration; none where the calibration found no scale), the features also at the sweep
    scales (their edit strips)."""
    from pipeline.stages.sae_evaluate import calibrated_scales, candidates

    scales = calibrated_scales(eval_dir(run_dir, CALIBRATED))
    for c in candidates(run_dir, ev_cfg, model):
        s = 1.0 if scales is None else scales.get(c.name)
        if s is None:
            continue
        _add(edits, c.name, c.family, c.unit, s, "sae", target=c.attribute, target_r=c.r)
        if ev_cfg.sweep_samples > 0 and c.family == "sae":
            for m in ev_cfg.sweep_multiples:
                _add(edits, c.name, c.family, c.unit, m * s, target=c.attribute, target_r=c.r)


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


def mean_pixel_change(images: torch.Tensor, base: torch.Tensor) -> np.ndarray:
    """(E,) mean absolute pixel change (in [0, 1] units) of each edit's images (E, S, 3, H, W) in [-1, 1]
    from the unedited ones, base (S, 3, H, W)."""
    return ((images - base.cpu()).abs().mean(dim=(1, 2, 3, 4)) / 2).numpy()


def pixel_changes(model: HSpaceModel, seeds, deltas, base: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """Mean absolute pixel change (in [0, 1] units) of the seeds' samples under each delta (T, C, H, W)."""
    return mean_pixel_change(model.sample_edits(seeds, list(deltas), batch_size=batch_size), base)


def match_pixel_change(model: HSpaceModel, seeds, directions, targets, rtol: float = PIXEL_RTOL,
                       max_iter: int = PIXEL_ROUNDS, base: torch.Tensor | None = None, batch_size: int = 64) -> np.ndarray:
    """Multipliers c such that ``c[k] * directions[k]`` changes the seeds' samples by ``targets[k]``
    (mean absolute pixel change) within ``rtol`` of it: the calibration's search
    (:func:`~pipeline.methods.calibration.search_scales`) on each direction's change relative to its
    target, from c = 1 (the change is monotone but not linear in c: small edits are damped, large
    ones break the image)."""
    directions, targets = list(directions), np.asarray(targets, dtype=float)
    if (targets <= 0).any():
        raise ValueError(f"cannot match pixel changes {targets.tolist()}: the targets must be positive")
    base = model.sample(seeds).images if base is None else base

    def relative_change(todo: list[int], scales: np.ndarray) -> np.ndarray:
        deltas = [float(c) * directions[k] for k, c in zip(todo, scales)]
        return pixel_changes(model, seeds, deltas, base, batch_size) / targets[todo]

    found = search_scales(relative_change, np.ones(len(directions)), 1.0, rtol, max_iter)
    if np.isnan(found["scales"]).any():
        raise ValueError(f"cannot match pixel changes {targets.tolist()}: direction(s) "
                         f"{np.flatnonzero(np.isnan(found['scales'])).tolist()} change nothing (a direction that "
                         f"changes nothing has no multiplier)")
    return found["scales"]


def calibrate_random(model: HSpaceModel, run_dir, ev_cfg, seeds) -> dict[str, float]:
    """Per random direction, the multiplier that makes it change the images as much as its PCA
    component (on ``seeds``): the pixel-matched baseline, where the Fig. 6 claim (random
    directions degrade the image instead of changing attributes) can be read off per pixel."""
    edits = pca_and_random(run_dir, ev_cfg, model)
    pcs = [e.delta for e in edits if e.family == "pca"]
    randoms = [(e.name, e.delta) for e in edits if e.family == "random"]
    images = model.sample_edits(seeds, [None, *pcs[:len(randoms)]], batch_size=ev_cfg.batch_size)  # in one batch
    base, targets = images[0], mean_pixel_change(images[1:], images[0])
    multipliers = match_pixel_change(model, seeds, [v for _, v in randoms], targets, base=base,
                                     batch_size=ev_cfg.batch_size)
    return {name: float(c) for (name, _), c in zip(randoms, multipliers)}


def calibrate_sae_family(cfg, model: HSpaceModel, scorer, out: Path, part_key: str) -> None:
    """Rank 0, before the evaluation: the calibrated strengths of the SAE family (pipeline.stages.sae_evaluate),
    once per evaluation key."""
    from pipeline.stages.sae_evaluate import CALIBRATION, calibrate_candidates, candidates

    cands = candidates(cfg.run_dir, cfg.evaluate, model)
    if cands and cfg.calibrate.enabled and not (out / CALIBRATION).exists():
        device = default_device(cfg.model.device)  # on the GPU if there is one (the ranks start after this)
        model.to(device)
        scorer.to(device)
        calibrate_candidates(cfg, model, scorer, cands, part_key, out)
        model.to("cpu")
        scorer.to("cpu")


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
                 strips: list[int] = (), part: str = PAPER):
        super().__init__()
        self.hmodel, self.scorer, self.quality, self.quality_score = model, scorer, quality, quality_score
        self.run_dir, self.ev_cfg, self.strips, self.part = run_dir, ev_cfg, set(strips), part
        self.unet = model.unet

    def setup(self, stage: str) -> None:
        share_cpu_threads(self.trainer)
        self.edits = edit_list(self.run_dir, self.ev_cfg, self.hmodel, self.part)
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
        edited = [(s, e) for e in self.edits for s in seeds if not e.sweep_only or s in sweep]
        used = {s for s, _ in edited}
        jobs = [(s, None) for s in seeds if s in used] + edited  # the unedited samples first
        base, s0, q0, rows = {}, {}, {}, []
        for idx, images in self.hmodel.iter_edits([(s, None if e is None else e.delta) for s, e in jobs],
                                                  batch_size=self.ev_cfg.batch_size):
            scores, q = self._measure(images)
            for j, i in enumerate(idx):  # every edit of a seed is compared with its own unedited sample
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
                       "sae": "sae" in e.roles, "target": e.target, "target_r": e.target_r,
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


def remaining(run_dir, items, part: str = PAPER) -> list:
    """The (repeat, seeds) items whose Parquet part is not written yet."""
    return [it for it in items if not (eval_dir(run_dir, part) / "parts" / part_name(*it)).exists()]


class EvaluateData(RankShare):
    def __init__(self, run_dir, items, part: str = PAPER):
        super().__init__()
        self.run_dir, self.all_items, self.part = run_dir, items, part

    def plan(self) -> list:
        return remaining(self.run_dir, self.all_items, self.part)


# ---------------------------------------------------------------------- outputs
def write_results(run_dir, ev_cfg, items, record: dict, strips: list[int] = (), part: str = PAPER) -> dict:
    """Rank 0: the parts -> per_sample.parquet, the part's tables and the rest; the folder's identity record last."""
    out = eval_dir(run_dir, part)
    parts = [out / "parts" / part_name(r, s) for r, s in items]
    missing = [p for p in parts if not p.exists()]
    if missing:
        raise DatasetError(f"{len(missing)} evaluation parts are missing (e.g. {missing[0].name}); re-run hspace {part}")
    per_sample = pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)
    if part == CALIBRATED:
        write_strips(per_sample, list(strips), out / "strips")
    per_sample = per_sample.drop(columns=[c for c in ("image", "base_image") if c in per_sample])
    if part == PAPER:
        drop_moved(out)
    with atomic_path(out / "per_sample.parquet") as tmp:
        per_sample.to_parquet(tmp, index=False)
    if part == PAPER:
        summary = summarise(per_sample, ev_cfg, out)
    else:  # with the fixed-scale evaluation's rows: its unedited scores normalise, its points join the curves
        both = pd.concat([pd.read_parquet(eval_dir(run_dir) / "per_sample.parquet"), per_sample], ignore_index=True)
        summary = summarise_calibrated(both, ev_cfg, out, sweep_seeds(ev_cfg), sae_section(both, ev_cfg, out))
    seal_folder(out, record, [f for f in folder_files(out) if not f.startswith("parts/") and f != "pixel_matching.json"])
    return summary


#: what evaluation/ held before the calibrated part had a folder of its own (evaluation-calibrated/)
MOVED = ("table1_calibrated*", "disentanglement_calibrated.csv", "dose_response*", "table1_sae*", "sae_factors.csv",
         "sae_calibration.json", "strips")


def drop_moved(out: Path) -> None:
    """Remove from ``out`` (evaluation/) the files an earlier version wrote there that evaluate-calibrated writes now."""
    import shutil

    for path in sorted({p for pattern in MOVED for p in out.glob(pattern)}):
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def sae_section(per_sample: pd.DataFrame, ev_cfg, out: Path) -> dict:
    """The SAE family's section of summary.json (``pipeline.stages.sae_evaluate``), when the run has an SAE."""
    if not (("sae" in per_sample and per_sample.sae.any()) or (out.parent / "sae" / "metrics.json").exists()):
        return {}
    from pipeline.stages.sae_evaluate import sae_tables

    return {"sae": lambda keep, scale: sae_tables(per_sample, keep, scale, ev_cfg, out)}


def write_strips(per_sample: pd.DataFrame, seeds: list[int], out: Path) -> None:
    """The edit strips of the evaluated families, from the sweep's images of ``seeds`` (rows: seeds;
    columns: the scales applied to every one of them, 0 the unedited sample): the folder ``out``
    is replaced whole, as the figures stage's is."""
    import io

    from PIL import Image

    from pipeline.formats.figures import image_grid_figure, save_figure, scale_labels
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
            calibrated = g[g.calibrated].scale.iloc[0] if g.calibrated.any() else None
            fixed = g[g.table1].scale.iloc[0] if g.table1.any() else None
            labels = scale_labels(cols, calibrated, fixed, unit=" SD" if family in ("pca", "random") else "")
            fig = image_grid_figure(grid, row_labels=[f"seed {s}" for s in seeds], col_labels=labels, title=direction)
            save_figure(fig, tmp / STRIP_FOLDERS[family] / f"{safe_name(direction)}.png")




def clean_existing(out: Path, part_key: str) -> None:
    """Remove parts and calibration made from other directions or settings."""
    stale = [p for p in (out / "parts").glob("part-*.parquet") if (read_record(p) or {}).get("key") != part_key]
    for calibration in (out / "pixel_matching.json", out / "sae_calibration.json"):
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
    """`hspace evaluate`: Table 1 at the fixed scale and Fig. 6 (``evaluation/``)."""
    return evaluate(cfg, PAPER)


def run_evaluate_calibrated(cfg) -> dict:
    """`hspace evaluate-calibrated`: Table 1 at the calibrated strengths, the dose-response, the strips and the SAE
    family (``evaluation-calibrated/``)."""
    return evaluate(cfg, CALIBRATED)


def evaluate(cfg, part: str) -> dict:
    from annotators.base import build_annotator

    run_dir, ev = Path(cfg.run_dir), cfg.evaluate
    if not (run_dir / SUPERVISED).exists():
        raise DatasetError(f"{run_dir / SUPERVISED} is missing; run hspace supervised first")
    stage = COMMANDS[part]
    for name in stage.read_names(cfg):
        verify(run_dir, name)
    out = eval_dir(run_dir, part)
    record, part_key = stage.identity(cfg), stage.part_key(cfg)
    model = HSpaceModel.from_config(cfg, under_trainer=True)
    scorer = build_annotator(ev.scorer, ev.scorer_options)
    quality = build_annotator(ev.quality, {}) if ev.quality else None
    edits = edit_list(run_dir, ev, model, part)  # every file fits the model, before any sampling
    if part == PAPER and not any(e.family == "original" for e in edits):
        raise DatasetError(f"{run_dir / SUPERVISED} holds no directions; re-run hspace supervised "
                           f"(with select.attributes naming what to find)")
    rank0_first(lambda: clean_existing(out, part_key))  # after the checks above: a mistyped setting removes nothing
    if launching_rank() == 0:
        if part == PAPER:
            match_random_pixels(cfg, model, out / "pixel_matching.json", part_key)
        else:
            calibrate_sae_family(cfg, model, scorer, out, part_key)
    items, strips = seed_sets(ev), strip_seeds(cfg) if part == CALIBRATED else []
    todo = rank0_first(lambda: remaining(run_dir, items, part))  # after rank 0's calibration
    if todo:
        trainer = predict_parts(
            cfg.trainer, EvaluateModule(model, run_dir, ev, scorer, quality, ev.quality_score, strips, part),
            EvaluateData(run_dir, items, part), tag=part,
            merge=lambda: write_results(run_dir, ev, items, record, strips, part),
            parts=out / "parts", name=lambda p: part_name(p["repeat"], p["seeds"]),
            write=lambda p, path: write_part(p, path, part_key),
            progress=ItemsProgress(part, sum(len(s) for _, s in todo), count=lambda it: len(it[1])))
        if not trainer.is_global_zero:
            return {}
    else:
        write_results(run_dir, ev, items, record, strips, part)
    summary = json.loads((out / "summary.json").read_text())
    if part == PAPER:
        print((out / "table1.md").read_text())
    elif (out / "table1_calibrated.md").exists():
        print("At the calibrated strengths (matched own effect):\n" + (out / "table1_calibrated.md").read_text())
    edits = edit_list(run_dir, ev, part=part)
    images = sum(len(s) if not e.sweep_only else len(set(s) & set(sweep_seeds(ev))) for e in edits for _, s in items)
    print(f"hspace {part}: {len(edits)} edits, {images} edited images of {ev.repeats * ev.num_samples} seeds -> {out}")
    return summary


def match_random_pixels(cfg, model: HSpaceModel, path: Path, part_key: str) -> None:
    """Rank 0, before the evaluation: the pixel-matched random directions' multipliers, once per evaluation key."""
    ev = cfg.evaluate
    if ev.pixel_matched_random and pca_and_random(cfg.run_dir, ev, model) and not path.exists():
        seeds = list(range(cfg.calibrate.first_seed, cfg.calibrate.first_seed + CALIBRATION_SEEDS))
        model.to(default_device(cfg.model.device))  # on the GPU if there is one (the ranks start after this)
        multipliers = calibrate_random(model, cfg.run_dir, ev, seeds)
        model.to("cpu")
        write_json_atomic(path, {"key": part_key, "seeds": seeds, "multipliers": multipliers})
        print("hspace evaluate: random directions rescaled to their component's pixel change: "
              + ", ".join(f"{k} x{v:.1f}" for k, v in multipliers.items()))
