"""Each stage's sampling path against plain diffusers, batch by batch, so that the machine's drift cancels.

One process, the embedded default (``toyfaces``) at T and batch B (defaults: the main job's, 20 and 64).
Plain diffusers is ``DDIMPipeline`` on a hook-free copy of the U-Net with a DDIMScheduler from its config,
the same T and eta, each sample's x_T drawn from hspace's own x_T stream of its seed (a generator per
sample: the same starting noise, so at eta 0 the same images: checked, the table's header gives the
largest difference); ``bench/main_job.py``'s :func:`plain_pipeline`. Each round runs plain diffusers, a
path, plain diffusers, the next path, ..., plain diffusers (the paths' order rotates by one each round); a
path's fraction is its U-Net evaluations per second over the mean rate of the two plain batches on either
side of it. The paths, each called as
its stage calls it, one batch (about B images) per call:

- ``generate``: ``GenerateModule.predict_item`` (``HSpaceModel.sample`` recording h into float16 on the
  CPU and x_t, images to uint8), B seeds; the shards' writing is not in it (bench/generate_overhead.py);
- ``edit, symmetric`` / ``edit, Asyrp``: ``HSpaceModel.sample(seeds, Edit(delta=...[, asyrp=True]))``
  with one (T, *h_shape) delta at every step (Asyrp: a second, unedited pass at every edited step);
- ``calibration round``: ``measure_edits`` (pipeline/methods/calibration.py, what ``calibrate``'s search
  calls per round): K directions x S = ``calibrate.num_samples`` seeds, sampled by ``iter_edits`` in
  batches of B and scored by the toy annotator batch by batch; ``full``: K = B / S (B images), ``3/4``:
  K = 3B / 4S (the default job's rounds: 6 directions x 8 seeds = 48 images in a batch of 64);
- ``fewshot h`` / ``fewshot x_T``: ``pipeline.stages.fewshot.scored`` (``sample_edits`` of S seeds x
  (1 unedited + E edits) in space h or x_T, each edit's images scored, pixel changes), S = 8, E = B/S - 1;
- ``evaluate``: ``EvaluateModule.predict_item`` on one seed set of S = 16 seeds with E = B/S - 1 edits
  (``iter_edits``, each batch scored by the scorer and the quality annotator, rows built, the strips'
  PNGs of ``edit.seeds``).

U-Net evaluations are counted by the engine (:mod:`pipeline.cost`; one image through the U-Net once;
Asyrp counts both passes); plain diffusers does B x T. Time is measured twice: wall (``perf_counter``)
and the process's CPU time (``process_time``, all its threads). On a machine shared with other jobs
the CPU-time fraction is the one to read (a descheduled process loses wall time, not CPU time), with
one caveat: serial Python work between the U-Net's multi-threaded passes costs wall time on every
core but CPU time on one, so CPU time flatters a path whose overhead is serial; on a quiet machine
read the wall fraction. Per path the median fraction over ``--rounds`` and, as its interval, the
min..max of the fractions against each neighbour alone over the rounds (so that one round already
shows how far the machine drifted between a path's two neighbours); ">= 0.95" says "yes" when every
one of those meets the target, "median" when their median does.

    python bench/stage_paths.py [--batch 64] [--steps 20] [--rounds 5] [--threads N]
                                [--profile PATH_NAME] [--precisions 32-true bf16-mixed]

``--profile``: also cProfile one call of that path and print where its time goes. ``--precisions``:
instead, ``HSpaceModel.sample`` (generate's call) at each precision, interleaved, ``--rounds`` rounds.
Prints markdown tables.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from pipeline.process import passive_openmp_waits

passive_openmp_waits()  # before torch is imported, as the hspace command line runs
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from main_job import plain_pipeline  # noqa: E402

TARGET = 0.95


def bench_config(steps: int, precision: str = "32-true"):
    from pipeline.config import load_config

    return load_config(None, [f"model.num_inference_steps={steps}", "model.device=cpu", f"trainer.precision={precision}"])


def paths(model, cfg, batch: int) -> list[dict]:
    """The stages' sampling paths, each {name, call (no arguments, one batch of work), unet_evaluations
    (what the call must do: images x passes x T)}."""
    from annotators.base import build_annotator
    from pipeline import Edit
    from pipeline.methods.calibration import measure_edits, unedited_scores
    from pipeline.stages.evaluate import Edit as EvalEdit
    from pipeline.stages.evaluate import EvaluateModule, strip_seeds
    from pipeline.stages.fewshot import scored
    from pipeline.stages.generate import GenerateModule

    T, ev, g = model.num_steps, cfg.evaluate, torch.Generator().manual_seed(0)
    h_delta = lambda: 0.1 * torch.randn(T, *model.h_shape, generator=g)  # noqa: E731
    scorer = build_annotator(ev.scorer, ev.scorer_options, model.device)
    out = []

    gen = GenerateModule(model, cfg.generate.h_dtype, None, cfg.generate.record_x_t, cfg.generate.h_steps)
    seeds = list(range(cfg.generate.first_seed, cfg.generate.first_seed + batch))
    out.append({"name": "generate", "call": lambda: gen.predict_item(seeds), "images": batch,
                "unet_evaluations": batch * T})
    sym, asyrp = Edit(delta=h_delta()), Edit(delta=h_delta(), asyrp=True)
    out.append({"name": "edit, symmetric", "call": lambda: model.sample(seeds, sym), "images": batch,
                "unet_evaluations": batch * T})
    out.append({"name": "edit, Asyrp", "call": lambda: model.sample(seeds, asyrp), "images": batch,
                "unet_evaluations": 2 * batch * T})

    c = cfg.calibrate
    S = max(1, min(c.num_samples, batch))
    cal_seeds = list(range(c.first_seed, c.first_seed + S))
    base = unedited_scores(model, scorer, cal_seeds, batch, model.device)
    for label, K in (("full", max(1, batch // S)), ("3/4", max(1, 3 * batch // (4 * S)))):
        deltas = [h_delta() for _ in range(K)]
        out.append({"name": f"calibration round, {label}", "images": K * S, "unet_evaluations": K * S * T,
                    "call": lambda deltas=deltas: measure_edits(model, scorer, cal_seeds, deltas, base, batch,
                                                                model.device)})

    f = cfg.fewshot
    S = max(1, min(f.num_samples, batch // 2))
    E = max(1, batch // S - 1)
    few_seeds = list(range(f.first_seed, f.first_seed + S))
    for space, delta in (("h", h_delta), ("x_T", lambda: 0.5 * torch.randn(model.latent_shape, generator=g))):
        edits = [{"delta": delta()} for _ in range(E)]
        out.append({"name": f"fewshot {space}", "images": S * (1 + E), "unet_evaluations": S * (1 + E) * T,
                    "call": lambda edits=edits, space=space: scored(model, scorer, few_seeds, edits, space, batch)})

    S = max(1, min(ev.num_samples, batch // 4))
    E = max(1, batch // S - 1)
    quality = build_annotator(ev.quality, {}) if ev.quality else None
    module = EvaluateModule(model, None, ev, scorer, quality, ev.quality_score, strip_seeds(cfg))
    module.edits = [EvalEdit(f"direction{k}", "original", h_delta(), 1.0, {"table1"}) for k in range(E)]
    module.embedder = None  # evaluate.identity_weights is not set by default
    item = (0, list(range(ev.first_seed, ev.first_seed + S)))
    out.append({"name": "evaluate", "call": lambda: module.predict_item(item), "images": S * (1 + E),
                "unet_evaluations": S * (1 + E) * T})
    return out


def timed(call) -> tuple[float, float, int]:
    """(wall s, CPU s of the process, U-Net evaluations counted by the engine) of one call."""
    from pipeline.cost import COUNTERS

    before = COUNTERS.unet_evaluations
    w, c = time.perf_counter(), time.process_time()
    call()
    return time.perf_counter() - w, time.process_time() - c, COUNTERS.unet_evaluations - before


def run(batch: int = 64, steps: int = 20, rounds: int = 5, cfg=None) -> dict:
    """The measurement: {"plain": {wall, cpu: per-batch rates}, "rows": one per path with its counts, rates and
    per-round fractions (wall and CPU) against its neighbouring plain batches}."""
    from pipeline.engine import noise
    from pipeline.engine.model import HSpaceModel

    cfg = cfg or bench_config(steps)
    model = HSpaceModel.from_config(cfg)
    plain = plain_pipeline(model)
    plain_seeds = list(range(cfg.generate.first_seed, cfg.generate.first_seed + batch))
    plain_evals = batch * model.num_steps

    def plain_batch():
        generators = [noise.generator(s, "x_T") for s in plain_seeds]  # hspace's x_T of each seed
        w, c, _ = timed(lambda: plain(batch, generators))
        return plain_evals / w, plain_evals / c

    for p in paths(model, cfg, min(batch, 2)):  # warm-up: every path once, small
        p["call"]()
    few = plain_seeds[:2]  # and the same images as hspace's from the same seeds (eta 0: no step noise)
    ours = (model.sample(few).images.clamp(-1, 1) + 1) / 2
    theirs = torch.from_numpy(plain(len(few), [noise.generator(s, "x_T") for s in few])).permute(0, 3, 1, 2)
    max_abs_diff = float((ours - theirs).abs().max())
    todo = paths(model, cfg, batch)
    rows = [{"name": p["name"], "images": p["images"], "expected": p["unet_evaluations"], "counted": set(),
             "wall": [], "cpu": [], "fraction_wall": [], "fraction_cpu": [], "sides_wall": [], "sides_cpu": []}
            for p in todo]
    plain_rates: dict[str, list] = {"wall": [], "cpu": []}
    for r in range(rounds):
        order = [(k + r) % len(todo) for k in range(len(todo))]
        before = plain_batch()
        for k in order:
            w, c, n = timed(todo[k]["call"])
            after = plain_batch()
            row = rows[k]
            row["counted"].add(n)
            row["wall"].append(n / w)
            row["cpu"].append(n / c)
            row["fraction_wall"].append(n / w / ((before[0] + after[0]) / 2))
            row["fraction_cpu"].append(n / c / ((before[1] + after[1]) / 2))
            row["sides_wall"] += [n / w / before[0], n / w / after[0]]  # against each neighbour alone
            row["sides_cpu"] += [n / c / before[1], n / c / after[1]]
            plain_rates["wall"].append(before[0])
            plain_rates["cpu"].append(before[1])
            before = after
        plain_rates["wall"].append(before[0])
        plain_rates["cpu"].append(before[1])
    for row in rows:
        counted = row.pop("counted")
        row["unet_evaluations"] = counted.pop() if len(counted) == 1 else sorted(counted)
    return {"batch": batch, "steps": model.num_steps, "rounds": rounds, "threads": torch.get_num_threads(),
            "plain": plain_rates, "plain_unet_evaluations": plain_evals, "max_abs_diff": max_abs_diff, "rows": rows}


def spread(values: list[float], fmt: str = "{:.2f}", bounds: list[float] | None = None) -> str:
    """median (min..max) of ``values``; the min..max of ``bounds`` instead where given."""
    lo, hi = min(bounds or values), max(bounds or values)
    return f"{fmt.format(statistics.median(values))} ({fmt.format(lo)}..{fmt.format(hi)})"


def meets(fractions: list[float]) -> str:
    """"yes": every fraction meets the target; "median": their median does; else "no"."""
    return "yes" if min(fractions) >= TARGET else "median" if statistics.median(fractions) >= TARGET else "no"


def table(result: dict) -> str:
    p = result["plain"]
    lines = [f"batch {result['batch']}, T={result['steps']}, {result['threads']} threads, {result['rounds']} rounds; "
             f"median (min..max) over the rounds; fraction = the path's U-Net evaluations/s over its two plain "
             f"neighbours' mean, its interval the min..max against each neighbour alone over the rounds; "
             f"target >= {TARGET}; plain diffusers' images from the same seeds: max |diff| "
             f"{result['max_abs_diff']:.1e} of [0, 1]", "",
             "| path | images/call | U-Net evals/call | evals/s wall | evals/s CPU | fraction, CPU time | "
             f"fraction, wall | >= {TARGET} (CPU) |", "|---|---|---|---|---|---|---|---|",
             f"| plain diffusers `DDIMPipeline` | {result['batch']} | {result['plain_unet_evaluations']} | "
             f"{spread(p['wall'], '{:.0f}')} | {spread(p['cpu'], '{:.0f}')} | 1 | 1 | |"]
    for r in result["rows"]:
        lines.append(f"| {r['name']} | {r['images']} | {r['unet_evaluations']} | {spread(r['wall'], '{:.0f}')} | "
                     f"{spread(r['cpu'], '{:.0f}')} | {spread(r['fraction_cpu'], bounds=r['sides_cpu'])} | "
                     f"{spread(r['fraction_wall'], bounds=r['sides_wall'])} | {meets(r['sides_cpu'])} |")
    return "\n".join(lines)


def profile(batch: int, steps: int, name: str, top: int = 20) -> str:
    """cProfile of one call of the path ``name`` (after a warm-up call): the functions by own time."""
    import cProfile
    import io
    import pstats

    from pipeline.engine.model import HSpaceModel

    cfg = bench_config(steps)
    model = HSpaceModel.from_config(cfg)
    call = next(p for p in paths(model, cfg, batch) if p["name"] == name)["call"]
    call()
    prof = cProfile.Profile()
    prof.enable()
    call()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue()


def precisions(batch: int, steps: int, rounds: int, names: list[str]) -> str:
    """``HSpaceModel.sample`` as generate calls it, at each precision, interleaved: s per batch and the
    speed-up against the first precision, median (min..max) over the rounds."""
    from pipeline.engine.model import HSpaceModel
    from pipeline.stages.generate import GenerateModule

    seeds = list(range(batch))
    calls = {}
    for name in names:
        cfg = bench_config(steps, name)
        model = HSpaceModel.from_config(cfg)
        module = GenerateModule(model, cfg.generate.h_dtype, None, cfg.generate.record_x_t, cfg.generate.h_steps)
        calls[name] = lambda module=module: module.predict_item(seeds)
        calls[name]()  # warm-up
    secs: dict[str, list] = {n: [] for n in names}
    for _ in range(rounds):
        for name in names:
            w, _, _ = timed(calls[name])
            secs[name].append(w)
    ref = names[0]
    lines = [f"`HSpaceModel.sample` (generate's call), batch {batch}, T={steps}, {torch.get_num_threads()} threads, "
             f"{rounds} interleaved rounds; wall s per batch, median (min..max)", "",
             f"| precision | s per batch | speed-up against {ref} |", "|---|---|---|"]
    for name in names:
        lines.append(f"| {name} | {spread(secs[name])} | "
                     f"{spread([a / b for a, b in zip(secs[ref], secs[name])])} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, the cores)")
    ap.add_argument("--profile", default=None, help="also cProfile one call of this path (its name in the table)")
    ap.add_argument("--precisions", nargs="+", default=None,
                    help="instead: generate's sampling at these trainer.precision values, interleaved")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.precisions:
        print(precisions(args.batch, args.steps, args.rounds, args.precisions))
        return
    print(table(run(args.batch, args.steps, args.rounds)), flush=True)
    if args.profile:
        print(f"\ncProfile of one call of {args.profile!r}:\n" + profile(args.batch, args.steps, args.profile))


if __name__ == "__main__":
    main()
