"""Where the time goes: process-wide work counters and each stage's cost in ``<run_dir>/timings.json``.

The engine counts its work at one place each: every U-Net pass adds its batch rows to
``COUNTERS.unet_evaluations`` (``HSpaceModel.predict``: sampling, edits, inversion, Jacobian
products; a classifier-free-guided pass counts both halves), every decoded sample adds to
``COUNTERS.images`` (``HSpaceModel.sample``), every image an annotator scores to
``COUNTERS.scored`` (``Annotator.__call__``) and every vector pushed through the Jacobian of the
U-Net after h (or its transpose) to ``COUNTERS.jacobian_products`` (``jacobian.Linearization``:
backward passes through the retained graph, which the forward count does not see).
:func:`measured` reads the counters around a stage and writes one entry per stage to ``timings.json``::

    {"generate": {"seconds": 12.3, "unet_evaluations": 4800, "images": 480, "scored": 0, "jacobian_products": 0,
                  "unet_evaluations_per_s": 390.2, "images_per_s": 39.0, "scored_per_s": 0.0,
                  "processes": 1, "finished": "2026-12-02 23:10:00"}, ...}

In a multi-process stage the counts are summed over the ranks (the wall time is rank 0's).
``hspace run`` prints :func:`table` at the end and the report shows the same figures.
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from pipeline.io import write_json_atomic

TIMINGS = "timings.json"


@dataclass
class Counters:
    unet_evaluations: int = 0  # batch rows through the U-Net
    images: int = 0  # samples decoded by the engine
    scored: int = 0  # images read by an annotator
    jacobian_products: int = 0  # vectors pushed through J or J^T (a backward pass through the U-Net after h)

    def snapshot(self) -> dict[str, int]:
        return asdict(self)


#: this process's counters (the engine and the annotators add to them)
COUNTERS = Counters()


def count(**amounts: int) -> None:
    """Add to this process's counters: ``count(unet_evaluations=B)``."""
    for name, n in amounts.items():
        setattr(COUNTERS, name, getattr(COUNTERS, name) + int(n))


def _sum_over_ranks(values: dict[str, int]) -> tuple[dict[str, int], int]:
    """(counts summed over the ranks of the process group, number of ranks); every rank must call it."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values, 1
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, values)  # works on gloo and nccl alike
    return {k: sum(g[k] for g in gathered) for k in values}, len(gathered)


def cost_entry(seconds: float, counts: dict[str, int], processes: int = 1) -> dict:
    """One stage's entry of timings.json from its wall time and counter deltas."""
    seconds = max(float(seconds), 1e-9)
    entry: dict = {"seconds": round(seconds, 3), **counts}
    for k, n in counts.items():
        entry[f"{k}_per_s"] = round(n / seconds, 2)
    entry["processes"] = processes
    entry["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    return entry


@contextlib.contextmanager
def measured(run_dir, name: str, rank0: bool = True, all_ranks: bool = False) -> Iterator[dict]:
    """Measure the block (a stage): on success, its entry is filled into the yielded dict and, on
    rank 0, written to ``<run_dir>/timings.json`` under ``name``. ``all_ranks``: every rank of the
    process group runs the block (a Lightning stage), so the counts are summed over them."""
    before = COUNTERS.snapshot()
    t0 = time.perf_counter()
    result: dict = {}
    yield result
    seconds = time.perf_counter() - t0
    counts = {k: v - before[k] for k, v in COUNTERS.snapshot().items()}
    processes = 1
    if all_ranks:
        counts, processes = _sum_over_ranks(counts)
    result.update(cost_entry(seconds, counts, processes))
    if rank0:
        record(run_dir, name, result)


def read_timings(run_dir) -> dict[str, dict]:
    path = Path(run_dir) / TIMINGS
    try:
        data = json.loads(path.read_text()) if path.exists() else {}
    except (ValueError, OSError):
        return {}
    return data if isinstance(data, dict) else {}


def record(run_dir, name: str, entry: dict) -> None:
    timings = read_timings(run_dir)
    timings[name] = entry
    write_json_atomic(Path(run_dir) / TIMINGS, timings)


COLUMNS = (("stage", "stage"), ("seconds", "wall s"), ("unet_evaluations", "U-Net evals"),
           ("unet_evaluations_per_s", "evals/s"), ("images", "images"), ("images_per_s", "images/s"),
           ("scored", "scored"), ("scored_per_s", "scored/s"), ("jacobian_products", "J products"))


def rows(timings: dict[str, dict], order=None) -> list[list[str]]:
    """The table's rows (strings), stages in ``order`` (default: as recorded), then a total."""
    names = [n for n in (order or timings) if n in timings]
    out = []
    total = {"seconds": 0.0, "unet_evaluations": 0, "images": 0, "scored": 0, "jacobian_products": 0}
    for n in names:
        e = timings[n]
        out.append([n] + [_fmt(e.get(key)) for key, _ in COLUMNS[1:]])
        for k in total:
            total[k] += e.get(k, 0) or 0
    if len(names) > 1:
        s = max(total["seconds"], 1e-9)
        out.append(["total", _fmt(total["seconds"]), _fmt(total["unet_evaluations"]),
                    _fmt(total["unet_evaluations"] / s), _fmt(total["images"]), _fmt(total["images"] / s),
                    _fmt(total["scored"]), _fmt(total["scored"] / s), _fmt(total["jacobian_products"])])
    return out


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.1f}" if v < 1000 else f"{v:.0f}"
    return str(v)


def table(timings: dict[str, dict], order=None) -> str:
    """A plain-text table of the stages' costs (what ``hspace run`` prints)."""
    body = rows(timings, order)
    if not body:
        return ""
    head = [label for _, label in COLUMNS]
    widths = [max(len(head[i]), *(len(r[i]) for r in body)) for i in range(len(head))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body)])
