"""`hspace run`: the main job, every stage in order on one configuration.

The paper's pipeline and its report first, then each further analysis followed by the report again:
generate -> annotate -> select -> pca -> jacobian -> supervised -> disentangle -> figures -> evaluate ->
report -> probe -> report -> fewshot -> report (:func:`pipeline.registry.run_order`, derived from the
stages marked ``further`` and what each stage declares it reads: with ``supervised.restrict_steps``
supervised reads the probes, so probe runs before it). A report rendered before a further analysis
shows that analysis' sections as still to come (:func:`to_come`) rather than an earlier run's files.
The stages share no random state (each seeds its own generators from the configuration), so the
order does not change what they write.
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
from typing import Callable

from pipeline.cost import measured, table
from pipeline.errors import ConfigError, HSpaceError
from pipeline.formats.identity import is_fresh
from pipeline.io import writing
from pipeline.registry import PRODUCERS, STAGES, Stage, check_skip, run_order
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
        for name in st.missing_reads(cfg):
            producer = PRODUCERS[name]
            if producer in skipped:
                consumers = [c.name for c in stages if name in c.required(cfg)]
                raise ConfigError(f"run.skip: {producer} is skipped, but {', '.join(consumers)} read(s) {run_dir / name}, "
                                  f"which no earlier run made; run {producer}, or skip {', '.join(consumers)} too")


def fresh(cfg, st: Stage, pending: dict | None = None) -> bool:
    """Outputs present and carrying the identity the stage would write now (the report: without the
    artefacts ``pending``, which it shows as still to come)."""
    run_dir = Path(cfg.run_dir)
    if not all((run_dir / o).exists() for o in st.outputs):
        return False
    try:
        reads = tuple(n for n in st.read_names(cfg) if n not in pending) if pending else None
        return is_fresh(run_dir, st.artefact, st.identity(cfg, reads=reads))
    except (HSpaceError, OSError):  # an input missing or unreadable: the stage runs and says what is wrong
        return False


def to_come(cfg, ahead, runs) -> dict[str, str]:
    """The artefacts of the further analyses among the stages ``ahead`` that a report rendered now must show
    as still to come (artefact -> the stage that writes it): those this run will run (``runs(stage)``) and
    that are not up to date now or read one that is still to come."""
    pending: dict[str, str] = {}
    for st in ahead:
        if st.further and runs(st) and (not fresh(cfg, st) or any(a in pending for a in st.may_read(cfg))):
            pending[st.artefact] = st.name
    return pending


def run_all(cfg, only: list[str] | None = None,
            after_step: Callable[[Stage, dict | None], None] | None = None) -> Path:
    """Every step of :func:`pipeline.registry.run_order` (or those of ``only``) -> the report's path.

    after_step(stage, cost): called on rank 0 after each step that ran (cost: its ``timings.json`` entry) or was
    up to date (cost None); ``bench/main_job.py`` times plain diffusers between the steps with it."""
    check_plan(cfg, only)
    run_dir = Path(cfg.run_dir)
    rank0 = launching_rank() == 0
    t_start = time.time()
    costs: dict[str, dict] = {}
    plan = run_order(cfg)
    n = len(plan)
    report = run_dir / "report" / "index.html"

    def runs(st: Stage) -> bool:
        return (not only or st.name in only) and st.name not in cfg.run.skip

    for i, st in enumerate(plan, 1):
        if only and st.name not in only:
            continue
        if st.name in cfg.run.skip:
            if rank0:
                print(f"[{i}/{n}] {st.name}: not run (run.skip)")
            continue
        if not (rank0 or st.distributed):
            continue  # other ranks only take part in the Lightning stages
        kwargs = {"pending": to_come(cfg, plan[i:], runs)} if st.renders else {}
        skip = rank0 and fresh(cfg, st, kwargs.get("pending"))  # judged after the stages before it ran
        if st.distributed:  # the other ranks wait here for rank 0's single-process stages, then follow its decision
            skip = agreed(skip)
        if skip:
            if rank0:
                print(f"[{i}/{n}] {st.name}: up to date, skipped")
        else:
            if rank0:
                print(f"[{i}/{n}] {st.name} ...", flush=True)
            with writing(run_dir, "run", rank0), measured(run_dir, st.name, rank0, st.distributed) as cost:
                st.run(cfg, **kwargs)
            costs[st.name] = cost
            if rank0:
                print(f"[{i}/{n}] {st.name}: done in {cost['seconds']:.0f} s", flush=True)
        if rank0 and after_step is not None:
            after_step(st, None if skip else costs[st.name])
        if rank0 and kwargs.get("pending"):
            print(f"hspace run: report after {time.time() - t_start:.0f} s -> {report.resolve()}; still to come: "
                  f"{', '.join(kwargs['pending'].values())}", flush=True)
    if rank0:
        if costs:
            print("hspace run: where the time went (also in timings.json)\n" + table(costs), flush=True)
        print(f"hspace run: finished in {time.time() - t_start:.0f} s; outputs in {run_dir.resolve()}")
        print(f"hspace run: report -> {report.resolve()}")
    return report
