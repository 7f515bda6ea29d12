"""The main job's cost: `hspace run` on the embedded default against plain diffusers generating
the same 512 samples.

Both run in this one process, on the same machine, one after another: diffusers' ``DDIMPipeline``
(the embedded default's U-Net and scheduler, no hooks, no recording, no writing) generates
``generate.num_samples`` samples at the same T and batch size as ``hspace generate``; then the
whole main job (``hspace run``, every stage, into a fresh run directory) runs. The baseline runs
again after the main job and the ratio is taken against the mean of the two (the machine's speed
drifts). Also shown, from the run's ``timings.json`` (:mod:`pipeline.cost`): each stage's wall time
and U-Net evaluations (one image through the U-Net once; a batch of 64 is 64; the Jacobian's
forward passes, its backward products counted apart).

    python bench/main_job.py [--run-dir /tmp/mainjob] [--config conf.yaml] [key=value ...]

Prints wall times, the ratio (target <= 3.0) and the evaluations per stage; the whole job's U-Net
evaluations per second as a fraction of plain diffusers' (wall time, and the process's CPU time, which a
busy machine's descheduling does not inflate; an interval from the two baselines); and the time to the
first report (``report/index.html`` first written: the paper's pipeline, before the further analyses) in
units of plain generation. On a shared machine the ratios are what to read, not the seconds.

The two baselines bracket a job of a quarter of an hour, and the machine's speed moves within it. So, by
default, one batch of plain diffusers (``generate.batch_size`` samples of one seed) is also timed before the
first step, after every step of the job and, within a step, after the first U-Net pass that ends
``--pace-every`` seconds (default 60) after the last batch (``--no-pace``: none). The job's time is cut
into intervals at those batches; each interval is judged against the plain rate of the batches just before
and just after it, a stage by its intervals together, and the whole job's fraction is its U-Net evaluations
over those that plain diffusers would have done in the same time at the rate of the moment,
``sum(evals) / sum(seconds_i x plain_rate_i)`` (:func:`paced_fractions`; the interval: every interval
against the batch before it alone, then after it alone). The pacing batches are not part of the job's time.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import shutil
import tempfile
import time
from pathlib import Path

from pipeline.process import passive_openmp_waits

passive_openmp_waits()  # before torch is imported, as the hspace command line runs
import torch  # noqa: E402


def plain_pipeline(model, precision="32-true"):
    """One batch of plain diffusers: a function (batch_size, generator) -> images (numpy) that runs
    ``DDIMPipeline`` on a hook-free copy of ``model``'s U-Net with a DDIMScheduler from its scheduler's
    config, at the model's T and eta, at ``precision`` (a ``trainer.precision`` value: weights converted
    or autocast, as hspace does). ``generator``: one, or one per sample (a list)."""
    from diffusers import DDIMPipeline, DDIMScheduler

    from pipeline.dtypes import precision_dtypes

    unet = copy.deepcopy(model.unet).eval()  # the copy carries no hook
    for hook_owner in unet.modules():
        hook_owner._forward_hooks.clear()
        hook_owner._forward_pre_hooks.clear()
    weights, autocast = precision_dtypes(precision)
    if weights is not None:
        unet.to(weights)
    pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(model.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    steps, eta = model.num_steps, float(model.eta[0])

    def run(batch_size: int, generator):
        # its own autocast (or none) even when timed inside a job's step that runs under autocast
        compute = torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None)
        with torch.no_grad(), compute:
            return pipe(batch_size=batch_size, num_inference_steps=steps, eta=eta, generator=generator,
                        output_type="np").images

    return run


def plain_diffusers(run, cfg) -> tuple[float, float]:
    """(wall, CPU) seconds for plain diffusers (``run``: :func:`plain_pipeline`) to generate
    cfg.generate.num_samples samples at the same batch size."""
    n, b = cfg.generate.num_samples, cfg.generate.batch_size
    t0, c0 = time.perf_counter(), time.process_time()
    for start in range(0, n, b):
        run(min(b, n - start), torch.Generator().manual_seed(start))
    return time.perf_counter() - t0, time.process_time() - c0


def plain_rate(run, batch_size: int, steps: int) -> tuple[float, float]:
    """(wall, CPU) U-Net evaluations per second of one plain diffusers batch of ``batch_size`` samples of seed 0."""
    t0, c0 = time.perf_counter(), time.process_time()
    run(batch_size, torch.Generator().manual_seed(0))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return batch_size * steps / wall, batch_size * steps / cpu


def paced_fractions(steps: list[dict]) -> dict:
    """Each stage's and the whole job's U-Net evaluations per second as a fraction of plain diffusers' at the moment.

    steps: one dict per step of the job, "stage" and "intervals": the parts of its time between pacing batches,
    each with "evals", "wall" and "cpu" (seconds), "before" and "after" ((wall, CPU) plain evaluations/s of the
    batches around it); a step without "intervals" is one interval itself. -> {"wall"/"CPU": {"job": (fraction,
    low, high), "stages": [(stage, fraction, low, high)] for the steps with evaluations}}: evaluations over
    ``sum(seconds_i x plain_rate_i)`` with the mean of each interval's two rates, the bounds with the rate before
    alone and after alone."""
    def fraction(intervals, key: str, k: int) -> tuple[float, float, float]:
        evals = sum(p["evals"] for p in intervals)
        each = {side: evals / sum(p[key] * rate(p) for p in intervals)
                for side, rate in (("mean", lambda p: (p["before"][k] + p["after"][k]) / 2),
                                   ("before", lambda p: p["before"][k]), ("after", lambda p: p["after"][k]))}
        return each["mean"], min(each["before"], each["after"]), max(each["before"], each["after"])

    parts = [s.get("intervals") or [s] for s in steps]
    out = {}
    for k, clock in enumerate(("wall", "CPU")):
        key = clock.lower()
        out[clock] = {"job": fraction([p for ps in parts for p in ps], key, k),
                      "stages": [(s["stage"], *fraction(ps, key, k)) for s, ps in zip(steps, parts)
                                 if sum(p["evals"] for p in ps)]}
    return out


class Pacer:
    """``after_step`` of :func:`pipeline.stages.run.run_all`, and ``tick`` after every U-Net pass: cuts the job's
    time into intervals at plain diffusers batches (:func:`plain_rate`), one before the first step, one after
    each step and one after the first pass that ends ``every`` seconds after the last batch (None: only between
    steps). Each interval keeps its wall and CPU time and its U-Net evaluations (``pipeline.cost.COUNTERS``)."""

    def __init__(self, run, batch_size: int, steps: int, enabled: bool = True, every: float | None = None):
        self.run, self.batch_size, self.T, self.enabled, self.every = run, batch_size, steps, enabled, every
        self.steps: list[dict] = []
        self.intervals: list[dict] = []  # of the step under way
        self.last = plain_rate(run, batch_size, steps) if enabled else (0.0, 0.0)
        self._start()

    def _start(self) -> None:
        from pipeline.cost import COUNTERS

        self.t, self.c, self.evals = time.perf_counter(), time.process_time(), COUNTERS.unet_evaluations

    def _close(self, pace: bool) -> dict:
        from pipeline.cost import COUNTERS

        part = {"evals": COUNTERS.unet_evaluations - self.evals, "wall": time.perf_counter() - self.t,
                "cpu": time.process_time() - self.c, "before": self.last}
        if pace:
            self.last = part["after"] = plain_rate(self.run, self.batch_size, self.T)
        self.intervals.append(part)
        self._start()
        return part

    def tick(self) -> None:
        """After a U-Net pass: a pacing batch when ``every`` seconds have passed since the last."""
        if self.enabled and self.every is not None and time.perf_counter() - self.t >= self.every:
            self._close(pace=True)

    def __call__(self, stage, cost: dict | None) -> None:
        self._close(pace=self.enabled)
        parts, self.intervals = self.intervals, []
        step = {"stage": stage.name, "evals": (cost or {}).get("unet_evaluations", 0),
                "wall": sum(p["wall"] for p in parts), "cpu": sum(p["cpu"] for p in parts),
                "before": parts[0]["before"], "intervals": parts}
        if self.enabled:
            step["after"] = parts[-1]["after"]
        self.steps.append(step)

    @contextlib.contextmanager
    def within_steps(self):
        """Tick after every pass of :meth:`HSpaceModel.predict <pipeline.engine.model.HSpaceModel.predict>`."""
        from pipeline.engine.model import HSpaceModel

        predict = HSpaceModel.predict

        def paced(model, *args, **kwargs):
            out = predict(model, *args, **kwargs)
            self.tick()
            return out

        HSpaceModel.predict = paced
        try:
            yield self
        finally:
            HSpaceModel.predict = predict

    def first_report_s(self) -> float | None:
        """The job's time (pacing batches left out) until the report was first written."""
        done = 0.0
        for s in self.steps:
            done += s["wall"]
            if s["stage"] == "report":
                return done
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", default=None, help="fresh run directory (default: a temporary one, removed after)")
    ap.add_argument("--config", default=None, help="default: the built-in defaults (= conf.yaml)")
    ap.add_argument("--baseline-once", action="store_true", help="time the baseline only before the main job")
    ap.add_argument("--no-pace", action="store_true", help="time no plain batch between the job's steps")
    ap.add_argument("--pace-every", type=float, default=60.0,
                    help="seconds of a step after which a plain batch is also timed within it (0: between steps only)")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.pace_every < 0:
        ap.error(f"--pace-every {args.pace_every:g}: give the seconds between pacing batches within a step (0: none)")

    from pipeline.config import load_config
    from pipeline.cost import read_timings
    from pipeline.engine.model import HSpaceModel
    from pipeline.stages.run import run_all

    tmp = None
    run_dir = args.run_dir or (tmp := tempfile.mkdtemp(prefix="hspace-mainjob-"))
    if Path(run_dir).exists() and any(Path(run_dir).iterdir()):
        raise SystemExit(f"{run_dir} is not empty: the main job must start from nothing")
    cfg = load_config(args.config, [f"run_dir={run_dir}", *args.overrides])
    T, n, b = cfg.model.num_inference_steps, cfg.generate.num_samples, cfg.generate.batch_size
    precision = str(cfg.trainer.precision)
    model = HSpaceModel.from_config(cfg, under_trainer=True, precision="32-true")  # converted below, as hspace does
    plain = plain_pipeline(model, precision)
    print(f"plain diffusers: DDIMPipeline, {n} samples, T={T}, batch {b}, {torch.get_num_threads()} threads, "
          f"{precision}", flush=True)
    base = [plain_diffusers(plain, cfg)]
    print(f"  {base[0][0]:.1f} s ({base[0][1]:.1f} s CPU)", flush=True)
    float32 = None
    if precision not in ("32-true", "32"):
        float32 = plain_diffusers(plain_pipeline(model), cfg)[0]
        print(f"plain diffusers at 32-true (its default): {float32:.1f} s", flush=True)
    pacer = Pacer(plain, b, T, enabled=not args.no_pace, every=args.pace_every or None)
    t0 = time.perf_counter()
    with pacer.within_steps():
        run_all(cfg, after_step=pacer)
    main_s = sum(s["wall"] for s in pacer.steps)  # the pacing batches left out
    main_cpu = sum(s["cpu"] for s in pacer.steps)
    print(f"the job's steps {main_s:.1f} s; with the pacing batches {time.perf_counter() - t0:.1f} s", flush=True)
    stages = read_timings(run_dir)
    if not args.baseline_once:
        base.append(plain_diffusers(plain, cfg))
        print(f"plain diffusers again: {base[1][0]:.1f} s ({base[1][1]:.1f} s CPU)", flush=True)
    ref = sum(w for w, _ in base) / len(base)
    print(f"\n{'stage':<12} {'seconds':>8} {'U-Net evals':>12} {'x generate':>11}")
    gen = stages.get("generate", {}).get("unet_evaluations") or n * T
    total = sum(s["evals"] for s in pacer.steps)
    spent = {}  # a stage's seconds without the pacing batches timed within it (timings.json counts them)
    for s in pacer.steps:
        spent[s["stage"]] = spent.get(s["stage"], 0.0) + s["wall"]
    for name, s in stages.items():
        u = s.get("unet_evaluations", 0)
        print(f"{name:<12} {spent.get(name, s.get('seconds', 0)):8.1f} {u:12d} {u / gen:11.2f}")
    print(f"{'total':<12} {main_s:8.1f} {total:12d} {total / gen:11.2f}")
    ratio = main_s / ref
    print(f"\nmain job {main_s:.1f} s / plain diffusers {ref:.1f} s = ratio {ratio:.2f} (target <= 3.0)")
    fractions = {}
    for clock, spent, base_s in (("wall", main_s, [w for w, _ in base]), ("CPU", main_cpu, [c for _, c in base])):
        each = [(total / spent) / (n * T / p) for p in base_s]  # evaluations per second over plain diffusers'
        fractions[clock] = each
        print(f"whole job, U-Net evaluations per second of plain diffusers' ({clock} time, the two baselines): "
              f"{(total / spent) / (n * T / (sum(base_s) / len(base_s))):.3f} ({min(each):.3f}..{max(each):.3f} "
              f"against each baseline; target >= 0.9)")
    paced = paced_fractions(pacer.steps) if not args.no_pace else None
    if paced:
        print(f"\npaced: one plain batch of {b} before the first step, after each step and every "
              f"{args.pace_every:.0f} s within a step; fraction = the step's evaluations over those plain diffusers "
              f"would have done in its intervals at the mean of each one's two neighbours' rates (interval: against "
              f"each alone)")
        print(f"{'step':<20} {'evals':>7} {'wall s':>7} {'parts':>5} {'plain/s before, after':>22} {'wall':>19} "
              f"{'CPU':>19}")
        cpu_stages = iter(paced["CPU"]["stages"])
        wall_stages = iter(paced["wall"]["stages"])
        for s in pacer.steps:
            cols = ["", ""]
            if sum(p["evals"] for p in s["intervals"]):  # as paced_fractions lists the stages
                cols = [f"{f:.3f} ({lo:.2f}..{hi:.2f})" for _, f, lo, hi in (next(wall_stages), next(cpu_stages))]
            print(f"{s['stage']:<20} {s['evals']:7d} {s['wall']:7.1f} {len(s['intervals']):5d} {s['before'][0]:10.1f} "
                  f"{s['after'][0]:10.1f} "
                  f"{cols[0]:>19} {cols[1]:>19}")
        for clock in ("wall", "CPU"):
            f, lo, hi = paced[clock]["job"]
            print(f"whole job, paced ({clock} time): {f:.3f} ({lo:.3f}..{hi:.3f}; target >= 0.9)")
    first = pacer.first_report_s()
    if first is not None:
        print(f"first report after {first:.1f} s = {first / ref:.2f} x plain "
              f"generation ({first / max(w for w, _ in base):.2f}..{first / min(w for w, _ in base):.2f}; target <= 5)")
    if float32 is not None:
        print(f"main job at {precision} {main_s:.1f} s / plain diffusers at 32-true {float32:.1f} s = {main_s / float32:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"main_job_s": main_s, "main_job_cpu_s": main_cpu, "plain_diffusers_s": base,
                                               "ratio": ratio, "fractions": fractions, "paced": paced,
                                               "steps": pacer.steps, "first_report_s": first,
                                               "precision": precision, "plain_diffusers_32_true_s": float32,
                                               "unet_evaluations": total, "stages": stages}, indent=1))
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
