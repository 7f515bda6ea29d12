"""`hspace disentangle`: remove from each primary direction its projection onto others (eq. 11).

Reads a directions file (default: the supervised one) and ``disentangle.pairs``, a mapping
primary -> list of conditioning directions (or ``others``: every other direction in the
file, as in the paper's Table 1), and writes ``<run_dir>/directions/disentangled.safetensors``
with one direction per primary, named ``<primary>|<cond1>,<cond2>`` (``glasses|hair``: glasses
with hair removed) or ``<primary>|others``.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..config import to_dict
from ..directions import Directions, load_directions, save_directions
from ..errors import ConfigError
from ..identity import artefact_ids, config_sections, make_record, verify
from ..io import hash_file
from ..supervised import cosine, project_out

OTHERS = "others"  # pairs value: every other direction in the file


def disentangle(directions: Directions, pairs: dict[str, list[str]]) -> Directions:
    if not pairs:
        raise ConfigError("disentangle.pairs is empty; give e.g. {glasses: [hair], age: [gender]}")
    out, names, report = [], [], {}
    for primary, conditions in pairs.items():
        v0 = directions.get(primary)
        if conditions == OTHERS:
            conditions = [n for n in directions.names if n != primary]
            label = OTHERS
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


SUPERVISED = "directions/supervised.safetensors"


def identity(cfg, known: dict | None = None) -> dict:
    """The record of disentangled.safetensors: the pairs and the directions they act on (the run's
    supervised file, or the content of ``disentangle.source``)."""
    if cfg.disentangle.source:
        return make_record("disentangle", config_sections(cfg, "disentangle"),
                           assets={"source": hash_file(cfg.disentangle.source)})
    return make_record("disentangle", config_sections(cfg, "disentangle"),
                       artefacts=artefact_ids(cfg.run_dir, [SUPERVISED], known))


def run_disentangle(cfg) -> Path:
    run_dir = Path(cfg.run_dir)
    source = Path(cfg.disentangle.source or run_dir / SUPERVISED)
    if not cfg.disentangle.source and source.exists():
        verify(run_dir, SUPERVISED)
    directions = load_directions(source)
    record = identity(cfg)
    result = disentangle(directions, to_dict(cfg.disentangle.pairs))
    out = save_directions(result, run_dir / "directions" / "disentangled.safetensors", record)
    for name, r in result.params["report"].items():
        before = ", ".join(f"cos(v0,{c})={v:+.2f}" for c, v in r["cosines_before"].items())
        print(f"  {name}: {before}; kept {r['norm_ratio']:.0%} of the norm")
    print(f"hspace disentangle: {len(result)} directions -> {out}")
    return out
