"""The main job's edit strips: one folder of seeds x scales grids per direction family.

``<run_dir>/edits/<family>/<direction>.png`` for pca, pca_random (norm-matched random
directions), jacobian, supervised, supervised_xT (the same directions in x_T space) and
disentangled, each at its calibrated multiples (pipeline.methods.calibration, from the calibrate stage's
``calibration/``) or the scales its directions file suggests; the report shows them. When the
calibrated evaluation's dose-response sweep covers edit.seeds (the default), it draws the strips of the
supervised, disentangled, PCA and random directions from its own images
(``evaluation-calibrated/strips/``) and this stage leaves them out. The strips of
every h-space family are sampled together, and those in x_T space together (full batches:
:func:`pipeline.stages.edit.edit_strips`).

Each family's folder is replaced whole (strips of directions that are gone go too); what else a
person keeps in ``edits/`` stays, and so does a file of their own inside a family folder, unless a
strip of the same name replaces it, which is said. The folder's identity record lists the files
this stage wrote.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

from pipeline.engine.model import HSpaceModel
from pipeline.formats.directions import Directions, load_directions, with_calibration
from pipeline.formats.identity import FOLDER_RECORD, folder_files, read_record, seal_folder, verify
from pipeline.io import atomic_path
from pipeline.registry import COMMANDS, evaluated_strips
from pipeline.stages.edit import edit_strips, save_strips, strip_rows

#: edit scales where a directions file suggests none, and of x_T-space edits (multiples of the
#: class-mean gap of x_T)
DEFAULT_SCALES = (-2.0, -1.0, 0.0, 1.0, 2.0)


#: the folders of edits/ this stage writes, one per direction family
FAMILIES = ("pca", "pca_random", "jacobian", "supervised", "supervised_xT", "disentangled", "real")


def run_figures(cfg) -> Path:
    run_dir = Path(cfg.run_dir)
    d, out = run_dir / "directions", run_dir / "edits"
    stage = COMMANDS["figures"]
    record = stage.identity(cfg)
    for name in stage.read_names(cfg):
        verify(run_dir, name)
    model = HSpaceModel.from_config(cfg)
    seeds = list(cfg.edit.seeds)
    jobs: list[tuple[str, Directions, list, bool]] = []
    evaluated = evaluated_strips(cfg)  # evaluate-calibrated draws these families' strips from its sweep
    first_pc = min(cfg.evaluate.pca_components, cfg.report.pca_components) if evaluated else 0
    if (d / "pca.safetensors").exists():
        pca = load_directions(d / "pca.safetensors", model)
        k = min(cfg.report.pca_components, len(pca))
        jobs.append(("pca", pca, list(range(first_pc, k)), False))
        if "random_directions" in pca.extras:
            rnd = Directions(pca.extras["random_directions"][:k], [f"random{i + 1}" for i in range(k)], "random",
                             pca.timesteps, params={"scales": pca.params.get("scales")})
            jobs.append(("pca_random", rnd, list(range(first_pc, k)), False))
    if (d / "jacobian.safetensors").exists():
        jac = load_directions(d / "jacobian.safetensors", model)
        jobs.append(("jacobian", jac, list(range(min(cfg.report.jacobian_directions, len(jac)))), False))
    for name in ("supervised", "disentangled", "real"):
        if (d / f"{name}.safetensors").exists():
            dirs = load_directions(d / f"{name}.safetensors", model)
            if not evaluated:  # their calibrated strengths, when the calibrate stage has measured them
                dirs = with_calibration(dirs, d / f"{name}.safetensors", run_dir)
            if not (evaluated and name in ("supervised", "disentangled")):
                jobs.append((name, dirs, list(range(len(dirs))), False))
            if name == "supervised" and "x_T_directions" in dirs.extras:
                jobs.append(("supervised_xT", dirs, list(range(len(dirs))), True))
    jobs = [(family, dirs, strip_rows(dirs, names, list(DEFAULT_SCALES) if x_T else None, x_T), x_T)
            for family, dirs, names, x_T in jobs if names]  # scales None: each direction's calibrated or suggested
    strips = {}
    for x_T in (False, True):  # every family's strips of one space sampled together: full batches
        rows = [(family, row) for family, _, family_rows, space in jobs if space == x_T for row in family_rows]
        if rows:
            images = edit_strips(model, seeds, [(v, cols) for _, (_, v, cols) in rows], x_T_space=x_T,
                                 batch_size=cfg.edit.batch_size)
            for (family, _), strip in zip(rows, images):
                strips.setdefault(family, []).append(strip)
    ours = written_before(out)
    count, drawn, kept = 0, [], set()
    for family, dirs, rows, x_T in jobs:
        with atomic_path(out / family) as tmp:  # the family's folder at once: strips of directions that are gone go too
            count += len(save_strips(dirs, rows, strips[family], seeds, tmp, x_T_space=x_T))
            kept |= keep_others(out / family, tmp, ours)
        drawn.append(family)
    for family in set(FAMILIES) - set(drawn):
        if (out / family).is_dir():
            with atomic_path(out / family) as tmp:  # a family no longer drawn: its strips go, a person's files stay
                tmp.mkdir()
                kept |= keep_others(out / family, tmp, ours)
            if not any((out / family).iterdir()):
                (out / family).rmdir()
    out.mkdir(parents=True, exist_ok=True)
    seal_folder(out, record, [f for f in folder_files(out) if f.split("/")[0] in drawn and f not in kept])
    print(f"hspace figures: {count} edit strips in {out}")
    return out


def written_before(out: Path) -> set[str]:
    """The files of edits/ this stage wrote last time (its record's list; every file of the family folders
    for a record of an older version, which listed none)."""
    previous = read_record(out) if (out / FOLDER_RECORD).exists() else None
    if previous is None:
        return set()
    if "files" in previous:
        return set(previous["files"])
    return {f for f in folder_files(out) if f.split("/")[0] in FAMILIES}


def keep_others(old: Path, new: Path, ours: set[str]) -> set[str]:
    """Copy into the new family folder ``new`` the files of the old one that this stage did not write
    (``ours``: the paths its last record listed) -> their paths under edits/; one that a new strip
    replaces is said."""
    kept = set()
    for path in sorted(p for p in old.rglob("*") if p.is_file()) if old.is_dir() else []:
        rel = f"{old.name}/{path.relative_to(old)}"
        if rel in ours:
            continue
        target = new / path.relative_to(old)
        if target.exists():
            print(f"hspace figures: warning: {path} was not written by hspace figures; a strip of the same name "
                  f"replaces it", file=sys.stderr)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
        kept.add(rel)
    return kept
