"""`hspace run`: the main job, every stage in order on one configuration.

generate -> annotate -> select -> pca -> jacobian -> supervised -> disentangle -> figures ->
evaluate -> report. A stage is skipped when its outputs exist and were made from the same
inputs: each finished stage leaves a stamp (``<run_dir>/.stamps/<stage>.json``) with a hash of
the configuration sections it reads and of the hashes of the stages it reads from, so a
changed setting re-runs exactly the stages downstream of it; a stage that runs again (for
example to restore a deleted output) makes the stages that read it run again too. The stages
that use Lightning (generate, annotate, pca, jacobian, evaluate) run on whatever the
``trainer`` section says.
"""
from __future__ import annotations

import importlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import config_hash, select
from ..samples import write_json_atomic
from .lightning_utils import agreed, launching_rank


@dataclass(frozen=True)
class Stage:
    name: str
    entry: str  # "module:function" taking the config
    reads: tuple[str, ...]  # config sections (dotted) that determine the output
    after: tuple[str, ...]  # stages whose outputs it reads
    outputs: tuple[str, ...]  # paths under run_dir that must exist for it to count as done
    distributed: bool = False  # runs a Lightning Trainer (every rank takes part)
    assets: tuple[str, ...] = ()  # files it reads that the config names but does not pin: "model", "annotators"


STAGES: tuple[Stage, ...] = (
    Stage("generate", "pipeline.stages.generate:run_generate", ("model", "generate", "trainer.precision"), (),
          ("samples/manifest.json",), True, ("model",)),
    Stage("annotate", "pipeline.stages.annotate:run_annotate", ("annotate",), ("generate",), ("annotations.parquet",), True,
          ("annotators",)),
    Stage("select", "pipeline.stages.select:run_select", ("select",), ("annotate",), ("selection.parquet",)),
    Stage("pca", "pipeline.stages.pca:run_pca", ("pca",), ("generate",), ("directions/pca.safetensors",), True),
    Stage("jacobian", "pipeline.stages.jacobian:run_jacobian", ("jacobian", "model"), ("generate",),
          ("directions/jacobian.safetensors",), True),
    Stage("supervised", "pipeline.stages.supervised:run_supervised", ("supervised",), ("select",),
          ("directions/supervised.safetensors",)),
    Stage("disentangle", "pipeline.stages.disentangle:run_disentangle", ("disentangle",), ("supervised",),
          ("directions/disentangled.safetensors",)),
    Stage("figures", "pipeline.stages.figures:run_figures", ("report", "edit.seeds", "model"),
          ("pca", "jacobian", "supervised", "disentangle"), ("edits",)),
    Stage("evaluate", "evaluation.stage:run_evaluate", ("evaluate", "model"), ("pca", "supervised", "disentangle"),
          ("evaluation/summary.json", "evaluation/table1_signed.csv"), True, ("annotators",)),
    Stage("report", "evaluation.report:run_report", ("report",), ("figures", "evaluate", "select"), ("report/index.html",)),
)


def asset_identities(cfg) -> dict[str, str]:
    """Content identities of what a path in the config points at: the model's weights (the same
    name_or_path may hold new weights) and the annotators shipped in the package."""
    from annotators import ASSETS as ANNOTATOR_ASSETS

    from ..loading import files_identity, weights_identity

    return {"model": weights_identity(cfg.model.name_or_path), "annotators": files_identity(ANNOTATOR_ASSETS)}


def stage_hashes(cfg) -> dict[str, str]:
    """Each stage's input hash: its config sections, the identity of the assets it reads and the
    hashes of the stages it reads from."""
    assets = asset_identities(cfg)
    hashes: dict[str, str] = {}
    for st in STAGES:
        hashes[st.name] = config_hash({k: select(cfg, k) for k in st.reads}, {u: hashes[u] for u in st.after},
                                      *({a: assets[a]} for a in st.assets))
    return hashes


def stamp_path(run_dir, name: str) -> Path:
    return Path(run_dir) / ".stamps" / f"{name}.json"


def _finished(run_dir, name: str) -> float:
    p = stamp_path(run_dir, name)
    return float(json.loads(p.read_text()).get("finished", 0.0)) if p.exists() else 0.0


def is_fresh(run_dir, st: Stage, h: str) -> bool:
    """Outputs present, made from the same inputs, and after every stage it reads from last ran
    (a stage re-run to restore a deleted output also refreshes what reads it)."""
    p = stamp_path(run_dir, st.name)
    if not p.exists() or not all((Path(run_dir) / o).exists() for o in st.outputs):
        return False
    stamp = json.loads(p.read_text())
    finished = float(stamp.get("finished", 0.0))
    return stamp.get("hash") == h and all(_finished(run_dir, u) <= finished for u in st.after)


def run_all(cfg, only: list[str] | None = None) -> Path:
    from annotators.base import check_columns

    check_columns(cfg)  # before the first stage: an attribute no annotator gives would fail only at its stage
    run_dir = Path(cfg.run_dir)
    hashes = stage_hashes(cfg)
    rank0 = launching_rank() == 0
    t_start = time.time()
    for i, st in enumerate(STAGES, 1):
        if only and st.name not in only:
            continue
        if not (rank0 or st.distributed):
            continue  # other ranks only take part in the Lightning stages
        fresh = is_fresh(run_dir, st, hashes[st.name])
        if st.distributed:  # the other ranks wait here for rank 0's single-process stages, then follow its decision
            fresh = agreed(fresh)
        if fresh:
            if rank0:
                print(f"[{i}/{len(STAGES)}] {st.name}: up to date, skipped")
            continue
        if rank0:
            print(f"[{i}/{len(STAGES)}] {st.name} ...", flush=True)
        t0 = time.time()
        module, func = st.entry.split(":")
        getattr(importlib.import_module(module), func)(cfg)
        if rank0:
            write_json_atomic(stamp_path(run_dir, st.name), {"hash": hashes[st.name], "seconds": round(time.time() - t0, 1),
                                                             "finished": time.time()})
            print(f"[{i}/{len(STAGES)}] {st.name}: done in {time.time() - t0:.0f} s", flush=True)
    report = run_dir / "report" / "index.html"
    if rank0:
        print(f"hspace run: finished in {time.time() - t_start:.0f} s; outputs in {run_dir.resolve()}")
        print(f"hspace run: report -> {report.resolve()}")
    return report
