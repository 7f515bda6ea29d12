"""`hspace run`: the main job, every stage in order on one configuration.

generate -> annotate -> select -> probe -> pca -> jacobian -> supervised -> disentangle -> fewshot ->
figures -> evaluate -> report (the order, derived from what each stage declares it reads, and each
stage's inputs and outputs: pipeline.registry.STAGES).
A stage is skipped when its artefact carries the identity record the stage would write now
(:mod:`pipeline.formats.identity`: the configuration sections it reads, the content hashes of the
assets it reads and the identities of the artefacts it reads), so a changed setting re-runs
exactly the stages downstream of it; an artefact damaged or changed since it was written (its
content no longer the one its record holds) is not up to date either. An artefact's id covers what
it holds, so a stage that runs again (for example to restore a deleted output) makes the stages
that read it run again exactly when what it wrote differs from what they read. Before the first
stage, what the stages to run need and none of them makes is checked (:func:`check_plan`). The
job holds the run directory's one writer lock from start to end; each stage's wall time, U-Net
evaluations and images/s go to
``<run_dir>/timings.json`` (:mod:`pipeline.cost`) and the stages run are printed as a table at the
end. The stages that use Lightning (generate, annotate, pca, jacobian, evaluate) run on whatever
the ``trainer`` section says.
"""
from __future__ import annotations

import time
from pathlib import Path

from pipeline.cost import measured, table
from pipeline.errors import ConfigError, HSpaceError
from pipeline.formats.identity import is_fresh
from pipeline.io import writing
from pipeline.registry import PRODUCERS, STAGES, Stage, check_skip
from pipeline.stages.lightning_utils import agreed, launching_rank


def to_run(cfg, only: list[str] | None = None) -> list[Stage]:
    """The stages of the main job this run may run (all, or ``only``), but those of ``run.skip``."""
    check_skip(cfg.run.skip)
    return [st for st in STAGES if (not only or st.name in only) and st.name not in cfg.run.skip]


def check_plan(cfg, only: list[str] | None = None) -> None:
    """Before the first stage (and before the run directory is locked, so created): ``run.skip`` names
    stages of the main job, and what the stages to run need and no stage of this run makes (an output
    of a skipped stage, a file the configuration names) is there, or a ConfigError says which."""
    run_dir = Path(cfg.run_dir)
    skipped = set(cfg.run.skip)
    stages = to_run(cfg, only)
    for st in stages:
        st.inputs_exist(cfg)
        for name in st.required(cfg):
            producer = PRODUCERS.get(name)
            if producer in skipped and not (run_dir / name).exists():
                consumers = [c.name for c in stages if name in c.required(cfg)]
                raise ConfigError(f"run.skip: {producer} is skipped, but {', '.join(consumers)} read(s) {run_dir / name}, "
                                  f"which no earlier run made; run {producer}, or skip {', '.join(consumers)} too")


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
    from annotators.base import check_columns

    check_columns(cfg)  # before the first stage: an attribute no annotator gives would fail only at its stage
    check_plan(cfg, only)
    run_dir = Path(cfg.run_dir)
    rank0 = launching_rank() == 0
    t_start = time.time()
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
        skip = rank0 and fresh(cfg, st)  # judged after the stages before it ran: their ids cover what they hold
        if st.distributed:  # the other ranks wait here for rank 0's single-process stages, then follow its decision
            skip = agreed(skip)
        if skip:
            if rank0:
                print(f"[{i}/{len(STAGES)}] {st.name}: up to date, skipped")
            continue
        if rank0:
            print(f"[{i}/{len(STAGES)}] {st.name} ...", flush=True)
        with writing(run_dir, "run", rank0), measured(run_dir, st.name, rank0, st.distributed) as cost:
            st.run(cfg)
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
