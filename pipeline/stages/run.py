"""`hspace run`: the main job, every stage in order on one configuration.

generate -> annotate -> select -> pca -> jacobian -> supervised -> disentangle -> figures ->
evaluate -> report. A stage is skipped when its artefact carries the identity record the stage
would write now (:mod:`pipeline.identity`: the configuration sections it reads, the content
hashes of the assets it reads and the identities of the artefacts it reads), so a changed
setting re-runs exactly the stages downstream of it; a stage that runs again (for example to
restore a deleted output) makes the stages that read it run again too. Each stage holds the
run directory's lock for that stage while it runs; wall times go to ``<run_dir>/timings.json``.
The stages that use Lightning (generate, annotate, pca, jacobian, evaluate) run on whatever the
``trainer`` section says.
"""
from __future__ import annotations

import importlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import HSpaceError
from ..identity import is_fresh
from ..io import locked_stage, write_json_atomic
from .lightning_utils import agreed, launching_rank


@dataclass(frozen=True)
class Stage:
    name: str
    entry: str  # "module:function" taking the config
    artefact: str  # the output under run_dir that carries the stage's identity record
    after: tuple[str, ...]  # stages whose outputs it reads
    outputs: tuple[str, ...]  # paths under run_dir that must exist for it to count as done
    distributed: bool = False  # runs a Lightning Trainer (every rank takes part)

    def identity(self, cfg, known: dict | None = None) -> dict:
        """The record the stage would write now (its module's ``identity``)."""
        return getattr(importlib.import_module(self.entry.split(":")[0]), "identity")(cfg, known)


STAGES: tuple[Stage, ...] = (
    Stage("generate", "pipeline.stages.generate:run_generate", "samples", (), ("samples/manifest.json",), True),
    Stage("annotate", "pipeline.stages.annotate:run_annotate", "annotations.parquet", ("generate",),
          ("annotations.parquet",), True),
    Stage("select", "pipeline.stages.select:run_select", "selection.parquet", ("annotate",), ("selection.parquet",)),
    Stage("pca", "pipeline.stages.pca:run_pca", "directions/pca.safetensors", ("generate",),
          ("directions/pca.safetensors",), True),
    Stage("jacobian", "pipeline.stages.jacobian:run_jacobian", "directions/jacobian.safetensors", (),
          ("directions/jacobian.safetensors",), True),
    Stage("supervised", "pipeline.stages.supervised:run_supervised", "directions/supervised.safetensors", ("select",),
          ("directions/supervised.safetensors",)),
    Stage("disentangle", "pipeline.stages.disentangle:run_disentangle", "directions/disentangled.safetensors",
          ("supervised",), ("directions/disentangled.safetensors",)),
    Stage("figures", "pipeline.stages.figures:run_figures", "edits", ("pca", "jacobian", "supervised", "disentangle"),
          ("edits",)),
    Stage("evaluate", "evaluation.stage:run_evaluate", "evaluation", ("pca", "supervised", "disentangle"),
          ("evaluation/summary.json", "evaluation/table1_signed.csv"), True),
    Stage("report", "evaluation.report:run_report", "report", ("figures", "evaluate", "select"), ("report/index.html",)),
)


def stage_hashes(cfg) -> dict[str, str]:
    """Each stage's identity key as predicted from the configuration alone, every stage before it
    assumed to be re-made from it (what a fresh run directory would record)."""
    known: dict[str, str] = {}
    keys = {}
    for st in STAGES:
        record = st.identity(cfg, known)
        keys[st.name] = record["key"]
        known[st.artefact] = record["key"]
    return keys


def fresh(cfg, st: Stage) -> bool:
    """Outputs present and carrying the identity the stage would write now."""
    run_dir = Path(cfg.run_dir)
    if not all((run_dir / o).exists() for o in st.outputs):
        return False
    try:
        return is_fresh(run_dir, st.artefact, st.identity(cfg))
    except (HSpaceError, OSError):  # an input missing or unreadable: the stage runs and says what is wrong
        return False


def record_time(run_dir: Path, name: str, seconds: float) -> None:
    path = run_dir / "timings.json"
    try:
        timings = json.loads(path.read_text()) if path.exists() else {}
    except ValueError:
        timings = {}
    timings[name] = {"seconds": round(seconds, 1), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_json_atomic(path, timings)


def run_all(cfg, only: list[str] | None = None) -> Path:
    run_dir = Path(cfg.run_dir)
    rank0 = launching_rank() == 0
    t_start = time.time()
    ran: set[str] = set()
    for i, st in enumerate(STAGES, 1):
        if only and st.name not in only:
            continue
        if not (rank0 or st.distributed):
            continue  # other ranks only take part in the Lightning stages
        skip = rank0 and not (ran & set(st.after)) and fresh(cfg, st)
        if st.distributed:  # the other ranks wait here for rank 0's single-process stages, then follow its decision
            skip = agreed(skip)
        if skip:
            if rank0:
                print(f"[{i}/{len(STAGES)}] {st.name}: up to date, skipped")
            continue
        if rank0:
            print(f"[{i}/{len(STAGES)}] {st.name} ...", flush=True)
        t0 = time.time()
        module, func = st.entry.split(":")
        with locked_stage(run_dir, st.name, rank0):
            getattr(importlib.import_module(module), func)(cfg)
        ran.add(st.name)
        if rank0:
            record_time(run_dir, st.name, time.time() - t0)
            print(f"[{i}/{len(STAGES)}] {st.name}: done in {time.time() - t0:.0f} s", flush=True)
    report = run_dir / "report" / "index.html"
    if rank0:
        print(f"hspace run: finished in {time.time() - t_start:.0f} s; outputs in {run_dir.resolve()}")
        print(f"hspace run: report -> {report.resolve()}")
    return report
