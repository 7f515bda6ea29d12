"""`hspace run`: the main job, every stage in order on one configuration.

generate -> annotate -> select -> pca -> jacobian -> supervised -> disentangle -> figures ->
evaluate -> report (the order and each stage's inputs and outputs: pipeline.registry.STAGES).
A stage is skipped when its artefact carries the identity record the stage would write now
(:mod:`pipeline.formats.identity`: the configuration sections it reads, the content hashes of the
assets it reads and the identities of the artefacts it reads), so a changed setting re-runs
exactly the stages downstream of it; a stage that runs again (for example to restore a deleted
output) makes the stages that read it run again too. Each stage holds the run directory's lock
for that stage while it runs; each stage's wall time, U-Net evaluations and images/s go to
``<run_dir>/timings.json`` (:mod:`pipeline.cost`) and the stages run are printed as a table at the
end. The stages that use Lightning (generate, annotate, pca, jacobian, evaluate) run on whatever
the ``trainer`` section says.
"""
from __future__ import annotations

import time
from pathlib import Path

from pipeline.cost import measured, table
from pipeline.errors import HSpaceError
from pipeline.formats.identity import is_fresh
from pipeline.io import locked_stage
from pipeline.registry import STAGES, Stage, check_skip
from pipeline.stages.lightning_utils import agreed, launching_rank


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


def run_all(cfg, only: list[str] | None = None) -> Path:
    check_skip(cfg.run.skip)
    run_dir = Path(cfg.run_dir)
    rank0 = launching_rank() == 0
    t_start = time.time()
    ran: set[str] = set()
    costs: dict[str, dict] = {}
    for i, st in enumerate(STAGES, 1):
        if only and st.name not in only:
            continue
        if st.name in cfg.run.skip:
            if rank0:
                print(f"[{i}/{len(STAGES)}] {st.name}: not run (run.skip)")
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
        with locked_stage(run_dir, st.name, rank0), measured(run_dir, st.name, rank0, st.distributed) as cost:
            st.run(cfg)
        ran.add(st.name)
        costs[st.name] = cost
        if rank0:
            print(f"[{i}/{len(STAGES)}] {st.name}: done in {cost['seconds']:.0f} s", flush=True)
    report = run_dir / "report" / "index.html"
    if rank0:
        if costs:
            print("hspace run: where the time went (also in timings.json)\n" + table(costs), flush=True)
        print(f"hspace run: finished in {time.time() - t_start:.0f} s; outputs in {run_dir.resolve()}")
        print(f"hspace run: report -> {report.resolve()}")
    return report
