"""`hspace disentangle`: remove from each primary direction its projection onto others (eq. 11).

Reads a directions file (default: the supervised one) and ``disentangle.pairs``, a mapping
primary -> list of conditioning directions (or ``others``: every other direction in the
file, as in the paper's Table 1; or ``auto``), and writes ``<run_dir>/directions/disentangled.safetensors``
with one direction per primary, named ``<primary>|<cond1>,<cond2>`` (``glasses|hair``: glasses
with hair removed), ``<primary>|others``, or ``<primary>|none`` (``auto`` found no entanglement).

``auto`` conditions a direction on the other directions whose attributes it moves, at its calibrated
strength on the calibration seeds (``calibrate``, :mod:`pipeline.methods.calibration`), by at least
``disentangle.threshold`` standard deviations (and 2 standard errors): this stage calibrates the source
directions for it, in memory (the calibrate stage, a further analysis, measures the strengths that
edit, explore and the calibrated evaluation use). The choices and the measured changes are in the
file's params (``auto``).
"""
from __future__ import annotations

from pathlib import Path

import torch

from pipeline.config import to_dict
from pipeline.errors import ConfigError
from pipeline.formats.directions import Directions, load_directions, save_directions
from pipeline.formats.identity import verify
from pipeline.methods.calibration import entangled_with, own_attribute
from pipeline.methods.supervised import cosine, project_out
from pipeline.registry import COMMANDS, SUPERVISED
from pipeline.stages.calibrate import Calibrator

OTHERS = "others"  # pairs value: every other direction in the file
AUTO = "auto"  # pairs value: the directions whose attributes it measurably moves (calibration seeds)
NONE = "none"  # the label of a direction auto left as it is


def disentangle(directions: Directions, pairs: dict[str, list[str]]) -> Directions:
    if not pairs:
        raise ConfigError("disentangle.pairs is empty; give e.g. {glasses: [hair], age: [gender]}")
    out, names, report = [], [], {}
    for primary, conditions in pairs.items():
        v0 = directions.get(primary)
        if conditions == OTHERS:
            conditions = [n for n in directions.names if n != primary]
            label = OTHERS
        elif isinstance(conditions, list) and not conditions:  # auto found nothing to remove
            out.append(v0.clone())
            names.append(f"{primary}|{NONE}")
            report[names[-1]] = {"cosine_to_original": 1.0, "norm_ratio": 1.0, "cosines_before": {}}
            continue
        else:
            conditions = [conditions] if isinstance(conditions, str) else list(conditions)
            label = ",".join(conditions)
        if not conditions or primary in conditions:
            raise ConfigError(f"disentangle.pairs.{primary}: give one or more other directions to remove, or {OTHERS!r}")
        v = project_out(v0, torch.stack([directions.get(c) for c in conditions]))
        out.append(v)
        names.append(f"{primary}|{label}")
        report[names[-1]] = {"cosine_to_original": cosine(v, v0), "norm_ratio": float(v.norm() / v0.norm()),
                             "cosines_before": {c: cosine(v0, directions.get(c)) for c in conditions}}
    return Directions(torch.stack(out), names, "disentangled", directions.timesteps, directions.model,
                      directions.source_run, params={"source_method": directions.method, "pairs": pairs, "report": report,
                              "scales": directions.params.get("scales")})


def resolve_auto(directions: Directions, pairs, threshold: float, own: dict | None = None) -> tuple[dict, dict]:
    """``pairs`` with every ``auto`` replaced by the list of directions whose attribute the primary
    measurably moves (``entangled_with`` on the file's calibration record; [] when none), and the
    choices: {primary: {"conditioned_on": [...], "entanglement": {direction: change in std},
    "effects": every attribute's change, "own_effect"}}."""
    if pairs == AUTO:
        pairs = {n: AUTO for n in directions.names}
    record = directions.params.get("calibration")
    resolved, choices = {}, {}
    for primary, conditions in pairs.items():
        if conditions != AUTO:
            resolved[primary] = conditions
            continue
        if not record or record.get("scales", {}).get(primary) is None:
            raise ConfigError(f"disentangle.pairs.{primary}: auto needs {primary}'s calibrated strength, and the "
                              f"calibration found none (it does not move its attribute up); give its pairs")
        candidates = {n: own_attribute(n, own) for n in directions.names if n != primary}
        found = entangled_with(record, primary, candidates, threshold)
        resolved[primary] = sorted(found, key=lambda n: directions.names.index(n))
        choices[primary] = {"conditioned_on": resolved[primary], "entanglement": found,
                            "effects": record["effects"][primary], "own_effect": record["own_effect"][primary]}
    return resolved, choices


def check_source(cfg, directions: Directions, source: Path) -> None:
    """A ``disentangle.source`` file made for another number of steps or another h shape than this run's
    model is refused here, before anything is written (not first by the stages that sample with it)."""
    T = cfg.model.num_inference_steps
    if len(directions.timesteps) != T:
        raise ConfigError(f"disentangle.source={source} was made for T={len(directions.timesteps)} steps but the model "
                          f"samples T={T} (model.num_inference_steps); use directions made with this model and T")
    manifest = Path(cfg.run_dir) / "samples" / "manifest.json"
    if manifest.exists():
        from pipeline.formats.samples import read_manifest

        want = tuple(read_manifest(cfg.run_dir)["h_shape_t"])
        if tuple(directions.directions.shape[1:]) != want:
            raise ConfigError(f"disentangle.source={source} holds directions of shape (T, *h_shape) = "
                              f"{tuple(directions.directions.shape[1:])}, but this run's h trajectories are {want}; use "
                              f"directions made with the same model, hook and model.num_inference_steps")


def run_disentangle(cfg) -> Path:
    run_dir = Path(cfg.run_dir)
    source = Path(cfg.disentangle.source or run_dir / SUPERVISED)
    directions = load_directions(source)  # a file that cannot be used (missing, not finite) is said as such first
    if cfg.disentangle.source:
        check_source(cfg, directions, source)
    else:
        verify(run_dir, SUPERVISED)  # the run's own file: what its record says, made from what the run holds now
    record = COMMANDS["disentangle"].identity(cfg)
    pairs = cfg.disentangle.pairs if cfg.disentangle.pairs == AUTO else to_dict(cfg.disentangle.pairs)
    if cfg.disentangle.uses_auto:
        calibrator = Calibrator(cfg)
        if not calibrator.current(directions.params.get("calibration")):
            directions.params["calibration"] = calibrator(directions)  # in memory: this stage writes only its own file
    pairs, choices = resolve_auto(directions, pairs, cfg.disentangle.threshold, to_dict(cfg.evaluate.own_attribute))
    result = disentangle(directions, pairs)
    if choices:
        result.params["auto"] = {"threshold": cfg.disentangle.threshold, "choices": choices}
        for primary, ch in choices.items():
            found = ", ".join(f"{n} {v:+.2f}" for n, v in ch["entanglement"].items()) or "none"
            print(f"  auto: {primary} moves {found} (std, at its calibrated strength) -> "
                  f"{'conditioned on ' + ', '.join(ch['conditioned_on']) if ch['conditioned_on'] else 'left as it is'}")
    out = save_directions(result, run_dir / "directions" / "disentangled.safetensors", record)
    for name, r in result.params["report"].items():
        before = ", ".join(f"cos(v0,{c})={v:+.2f}" for c, v in r["cosines_before"].items())
        print(f"  {name}: {before}; kept {r['norm_ratio']:.0%} of the norm" if before else f"  {name}: unchanged")
    print(f"hspace disentangle: {len(result)} directions -> {out}")
    return out
