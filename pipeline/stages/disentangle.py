"""`hspace disentangle`: remove from each primary direction its projection onto others (eq. 11).

Reads a directions file (default: the supervised one) and ``disentangle.pairs``, a mapping
primary -> list of conditioning directions (or ``others``: every other direction in the
file, as in the paper's Table 1; or ``auto``), and writes ``<run_dir>/directions/disentangled.safetensors``
with one direction per primary, named ``<primary>|<cond1>,<cond2>`` (``glasses|hair``: glasses
with hair removed), ``<primary>|others``, or ``<primary>|none`` (``auto`` found no entanglement).

Calibrated strengths (``calibrate``, :mod:`pipeline.methods.calibration`): this stage measures them,
for the source directions (stored in the run's supervised file, rewritten atomically with its
identity record kept; done once per calibration setting) and for the disentangled ones (stored
with them). ``auto`` conditions a direction on the other directions whose attributes it moves,
at its calibrated strength on the calibration seeds, by at least ``disentangle.threshold``
standard deviations (and 2 standard errors); the choices and the measured changes are in the
file's params (``auto``).
"""
from __future__ import annotations

from pathlib import Path

import torch

from pipeline.config import to_dict
from pipeline.errors import ConfigError
from pipeline.formats.directions import Directions, load_directions, save_directions
from pipeline.formats.identity import MODEL_SECTIONS, artefact_ids, config_sections, make_record, read_record, verify
from pipeline.io import hash_file, hash_json
from pipeline.methods.calibration import calibrate, entangled_with, own_attribute, unedited_scores
from pipeline.methods.supervised import cosine, project_out

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


SUPERVISED = "directions/supervised.safetensors"


def calibration_sections(cfg) -> dict:
    """What a calibration depends on (besides the directions and the model's weights): the calibrate
    section, the scorer and its own-attribute mapping, the start scale and the model section."""
    return config_sections(cfg, "calibrate", "evaluate.scorer", "evaluate.scorer_options", "evaluate.own_attribute",
                           "evaluate.scale", *MODEL_SECTIONS, drop=("calibrate.batch_size",))


def identity(cfg, known: dict | None = None) -> dict:
    """The record of disentangled.safetensors: the pairs and the directions they act on (the run's
    supervised file, or the content of ``disentangle.source``), and what the calibration reads."""
    sections = config_sections(cfg, "disentangle")
    assets = {}
    if cfg.calibrate.enabled:
        from annotators import assets_identity
        from pipeline.engine.loading import weights_identity

        sections.update(calibration_sections(cfg))
        assets = {"model": weights_identity(cfg.model.name_or_path), "annotators": assets_identity()}
    if cfg.disentangle.source:
        return make_record("disentangle", sections, assets={**assets, "source": hash_file(cfg.disentangle.source)})
    return make_record("disentangle", sections, assets=assets, artefacts=artefact_ids(cfg.run_dir, [SUPERVISED], known))


class Calibrator:
    """Calibrates directions files with the run's model and scorer (built once, on first use)."""

    def __init__(self, cfg):
        self.cfg, self.model, self.scorer, self.unedited = cfg, None, None, None
        self.key = hash_json(calibration_sections(cfg), identity(cfg)["inputs"]["assets"])

    def __call__(self, d: Directions) -> dict:
        from annotators.base import build_annotator
        from pipeline.engine.model import HSpaceModel

        c, ev = self.cfg.calibrate, self.cfg.evaluate
        if self.model is None:
            self.model = HSpaceModel.from_config(self.cfg)
            self.scorer = build_annotator(ev.scorer, ev.scorer_options, self.model.device)
        std_seeds = list(range(c.first_seed, c.first_seed + c.std_samples))
        if self.unedited is None:  # sampled once for both files
            self.unedited = unedited_scores(self.model, self.scorer, std_seeds, c.batch_size, self.model.device)
        try:
            record = calibrate(self.model, self.scorer, d.names, list(d.directions), std_seeds[:c.num_samples], std_seeds,
                               ev.scale, c.target, c.rtol, c.max_iter, to_dict(ev.own_attribute), c.batch_size,
                               self.model.device, self.unedited)
        except KeyError as e:
            raise ConfigError(f"calibrate: {e.args[0]}") from None
        record["key"] = self.key
        print(f"  calibrated {d.method} directions ({record['rounds']} rounds, {c.num_samples} seeds): " + ", ".join(
            f"{n} x{s:.2f}" if s is not None else f"{n} (none)" for n, s in record["scales"].items()))
        return record


def run_disentangle(cfg) -> Path:
    run_dir = Path(cfg.run_dir)
    source = Path(cfg.disentangle.source or run_dir / SUPERVISED)
    if not cfg.disentangle.source and source.exists():
        verify(run_dir, SUPERVISED)
    directions = load_directions(source)
    record = identity(cfg)
    calibrator = Calibrator(cfg) if cfg.calibrate.enabled else None
    if calibrator is not None and (directions.params.get("calibration") or {}).get("key") != calibrator.key:
        directions.params["calibration"] = calibrator(directions)
        if not cfg.disentangle.source:  # the run's own file: its calibration stored with it, its identity kept
            save_directions(directions, source, read_record(source))
    pairs = cfg.disentangle.pairs if cfg.disentangle.pairs == AUTO else to_dict(cfg.disentangle.pairs)
    pairs, choices = resolve_auto(directions, pairs, cfg.disentangle.threshold, to_dict(cfg.evaluate.own_attribute))
    result = disentangle(directions, pairs)
    if choices:
        result.params["auto"] = {"threshold": cfg.disentangle.threshold, "choices": choices}
        for primary, ch in choices.items():
            found = ", ".join(f"{n} {v:+.2f}" for n, v in ch["entanglement"].items()) or "none"
            print(f"  auto: {primary} moves {found} (std, at its calibrated strength) -> "
                  f"{'conditioned on ' + ', '.join(ch['conditioned_on']) if ch['conditioned_on'] else 'left as it is'}")
    if calibrator is not None:
        result.params["calibration"] = calibrator(result)
    out = save_directions(result, run_dir / "directions" / "disentangled.safetensors", record)
    for name, r in result.params["report"].items():
        before = ", ".join(f"cos(v0,{c})={v:+.2f}" for c, v in r["cosines_before"].items())
        print(f"  {name}: {before}; kept {r['norm_ratio']:.0%} of the norm" if before else f"  {name}: unchanged")
    print(f"hspace disentangle: {len(result)} directions -> {out}")
    return out
