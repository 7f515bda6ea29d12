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
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import shutil
import tempfile
import threading
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
        compute = torch.autocast("cpu", dtype=autocast) if autocast is not None else contextlib.nullcontext()
        with torch.no_grad(), compute:
            return pipe(batch_size=batch_size, num_inference_steps=steps, eta=eta, generator=generator,
                        output_type="np").images

    return run


def plain_diffusers(cfg, precision="32-true") -> tuple[float, float]:
    """(wall, CPU) seconds for DDIMPipeline to generate cfg.generate.num_samples samples, same T, eta and
    batch, at ``precision`` (:func:`plain_pipeline`)."""
    from pipeline.engine.model import HSpaceModel

    model = HSpaceModel.from_config(cfg, under_trainer=True, precision="32-true")  # converted below, as hspace does
    run = plain_pipeline(model, precision)
    n, b = cfg.generate.num_samples, cfg.generate.batch_size
    t0, c0 = time.perf_counter(), time.process_time()
    for start in range(0, n, b):
        run(min(b, n - start), torch.Generator().manual_seed(start))
    return time.perf_counter() - t0, time.process_time() - c0


def first_written(path: Path, t0: float, stop: threading.Event) -> dict:
    """Watches ``path`` from a thread; the returned dict gets "seconds" (after ``t0``) when it first exists."""
    out: dict = {}

    def watch():
        while not stop.is_set() and "seconds" not in out:
            if path.exists():
                out["seconds"] = time.perf_counter() - t0
            stop.wait(0.25)

    threading.Thread(target=watch, daemon=True).start()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", default=None, help="fresh run directory (default: a temporary one, removed after)")
    ap.add_argument("--config", default=None, help="default: the built-in defaults (= conf.yaml)")
    ap.add_argument("--baseline-once", action="store_true", help="time the baseline only before the main job")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    from pipeline.config import load_config
    from pipeline.cost import read_timings
    from pipeline.stages.run import run_all

    tmp = None
    run_dir = args.run_dir or (tmp := tempfile.mkdtemp(prefix="hspace-mainjob-"))
    if Path(run_dir).exists() and any(Path(run_dir).iterdir()):
        raise SystemExit(f"{run_dir} is not empty: the main job must start from nothing")
    cfg = load_config(args.config, [f"run_dir={run_dir}", *args.overrides])
    T, n, b = cfg.model.num_inference_steps, cfg.generate.num_samples, cfg.generate.batch_size
    precision = str(cfg.trainer.precision)
    print(f"plain diffusers: DDIMPipeline, {n} samples, T={T}, batch {b}, {torch.get_num_threads()} threads, "
          f"{precision}", flush=True)
    base = [plain_diffusers(cfg, precision)]
    print(f"  {base[0][0]:.1f} s ({base[0][1]:.1f} s CPU)", flush=True)
    float32 = None
    if precision not in ("32-true", "32"):
        float32 = plain_diffusers(cfg)[0]
        print(f"plain diffusers at 32-true (its default): {float32:.1f} s", flush=True)
    stop = threading.Event()
    t0, c0 = time.perf_counter(), time.process_time()
    first_report = first_written(Path(run_dir) / "report" / "index.html", t0, stop)
    run_all(cfg)
    main_s, main_cpu = time.perf_counter() - t0, time.process_time() - c0
    stop.set()
    stages = read_timings(run_dir)
    if not args.baseline_once:
        base.append(plain_diffusers(cfg, precision))
        print(f"plain diffusers again: {base[1][0]:.1f} s ({base[1][1]:.1f} s CPU)", flush=True)
    ref = sum(w for w, _ in base) / len(base)
    print(f"\n{'stage':<12} {'seconds':>8} {'U-Net evals':>12} {'x generate':>11}")
    gen = stages.get("generate", {}).get("unet_evaluations") or n * T
    total = sum(s.get("unet_evaluations", 0) for s in stages.values())
    for name, s in stages.items():
        u = s.get("unet_evaluations", 0)
        print(f"{name:<12} {s.get('seconds', 0):8.1f} {u:12d} {u / gen:11.2f}")
    print(f"{'total':<12} {main_s:8.1f} {total:12d} {total / gen:11.2f}")
    ratio = main_s / ref
    print(f"\nmain job {main_s:.1f} s / plain diffusers {ref:.1f} s = ratio {ratio:.2f} (target <= 3.0)")
    fractions = {}
    for clock, spent, plain in (("wall", main_s, [w for w, _ in base]), ("CPU", main_cpu, [c for _, c in base])):
        each = [(total / spent) / (n * T / p) for p in plain]  # evaluations per second over plain diffusers'
        fractions[clock] = each
        print(f"whole job, U-Net evaluations per second of plain diffusers' ({clock} time): "
              f"{(total / spent) / (n * T / (sum(plain) / len(plain))):.3f} ({min(each):.3f}..{max(each):.3f} "
              f"against each baseline; target >= 0.9)")
    if "seconds" in first_report:
        print(f"first report after {first_report['seconds']:.1f} s = {first_report['seconds'] / ref:.2f} x plain "
              f"generation ({first_report['seconds'] / max(w for w, _ in base):.2f}.."
              f"{first_report['seconds'] / min(w for w, _ in base):.2f}; target <= 5)")
    if float32 is not None:
        print(f"main job at {precision} {main_s:.1f} s / plain diffusers at 32-true {float32:.1f} s = {main_s / float32:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"main_job_s": main_s, "main_job_cpu_s": main_cpu, "plain_diffusers_s": base,
                                               "ratio": ratio, "fractions": fractions,
                                               "first_report_s": first_report.get("seconds"),
                                               "precision": precision, "plain_diffusers_32_true_s": float32,
                                               "unet_evaluations": total, "stages": stages}, indent=1))
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
