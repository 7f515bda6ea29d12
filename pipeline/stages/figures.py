"""The main job's edit strips: one folder of seeds x scales grids per direction family.

``<run_dir>/edits/<family>/<direction>.png`` for pca, pca_random (norm-matched random
directions), jacobian, supervised, supervised_xT (the same directions in x_T space) and
disentangled, each at its calibrated multiples (pipeline.methods.calibration) or the scales its directions
file suggests; the report shows them. When the evaluate stage's dose-response sweep covers
edit.seeds (the default), it draws the strips of the supervised, disentangled, PCA and random
directions from its own images (``evaluation/strips/``) and this stage leaves them out.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.engine.loading import weights_identity
from pipeline.engine.model import HSpaceModel
from pipeline.formats.directions import Directions, load_directions
from pipeline.formats.identity import FOLDER_RECORD, MODEL_SECTIONS, artefact_ids, config_sections, make_record, present, verify
from pipeline.io import atomic_path, write_json_atomic
from pipeline.stages.edit import render_edits

#: edit scales where a directions file suggests none, and of x_T-space edits (multiples of the
#: class-mean gap of x_T)
DEFAULT_SCALES = (-2.0, -1.0, 0.0, 1.0, 2.0)


FILES = ("pca", "jacobian", "supervised", "disentangled", "real")


def evaluated_strips(cfg) -> bool:
    """Whether the evaluate stage draws the strips of the supervised, disentangled, PCA and random
    directions (its dose-response sweep applies them at their strip scales to seeds that include
    edit.seeds): then this stage leaves them out rather than sample the same images twice."""
    ev = cfg.evaluate
    sweep = set(range(ev.first_seed, ev.first_seed + min(ev.sweep_samples, ev.num_samples)))
    return bool(sweep) and set(cfg.edit.seeds) <= sweep


def _present(run_dir, known: dict | None = None) -> list[str]:
    return present(run_dir, [f"directions/{n}.safetensors" for n in FILES], known)


def identity(cfg, known: dict | None = None) -> dict:
    """The record of the edits folder: the model, the seeds and scales shown, and every directions
    file of the run it draws."""
    return make_record("figures", config_sections(cfg, "report", "edit.seeds", *MODEL_SECTIONS, "evaluate.first_seed",
                                                  "evaluate.sweep_samples", "evaluate.num_samples",
                                                  "evaluate.pca_components"),
                       assets={"model": weights_identity(cfg.model.name_or_path)},
                       artefacts=artefact_ids(cfg.run_dir, _present(cfg.run_dir, known), known))


def run_figures(cfg) -> Path:
    run_dir = Path(cfg.run_dir)
    d, out = run_dir / "directions", run_dir / "edits"
    model = HSpaceModel.from_config(cfg)
    seeds = list(cfg.edit.seeds)
    for name in _present(run_dir):
        verify(run_dir, name)
    record = identity(cfg)
    jobs: list[tuple[str, Directions, list, bool]] = []
    evaluated = evaluated_strips(cfg)  # evaluate draws these families' strips from its sweep
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
            if not (evaluated and name in ("supervised", "disentangled")):
                jobs.append((name, dirs, list(range(len(dirs))), False))
            if name == "supervised" and "x_T_directions" in dirs.extras:
                jobs.append(("supervised_xT", dirs, list(range(len(dirs))), True))
    count = 0
    with atomic_path(out) as tmp:  # the whole folder at once: strips of directions that are gone go too
        tmp.mkdir()
        for family, dirs, names, x_T in jobs:
            if not names:
                continue
            scales = list(DEFAULT_SCALES) if x_T else None  # None: each direction's calibrated or suggested scales
            count += len(render_edits(model, dirs, names, seeds, scales, tmp / family, x_T_space=x_T,
                                      batch_size=cfg.edit.batch_size))
        write_json_atomic(tmp / FOLDER_RECORD, record)
    print(f"hspace figures: {count} edit strips in {out}")
    return out
