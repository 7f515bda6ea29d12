"""`hspace run`: the main job, every stage in order on one configuration.

generate -> annotate -> select -> pca -> jacobian -> supervised -> disentangle -> figures ->
evaluate -> report (the order and each stage's inputs and outputs: pipeline.registry.STAGES).
A stage is skipped when its outputs exist and were made from the same
inputs: each finished stage leaves a stamp (``<run_dir>/.stamps/<stage>.json``) with a hash of
the configuration sections it reads and of the hashes of the stages it reads from, so a
changed setting re-runs exactly the stages downstream of it; a stage that runs again (for
example to restore a deleted output) makes the stages that read it run again too. The stages
that use Lightning (generate, annotate, pca, jacobian, evaluate) run on whatever the
``trainer`` section says.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from ..config import config_hash, select
from ..registry import STAGES, Stage
from ..samples import write_json_atomic
from .lightning_utils import agreed, launching_rank


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
        st.run(cfg)
        if rank0:
            write_json_atomic(stamp_path(run_dir, st.name), {"hash": hashes[st.name], "seconds": round(time.time() - t0, 1),
                                                             "finished": time.time()})
            print(f"[{i}/{len(STAGES)}] {st.name}: done in {time.time() - t0:.0f} s", flush=True)
    report = run_dir / "report" / "index.html"
    if rank0:
        print(f"hspace run: finished in {time.time() - t_start:.0f} s; outputs in {run_dir.resolve()}")
        print(f"hspace run: report -> {report.resolve()}")
    return report
