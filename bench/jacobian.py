"""Time to the top-k Jacobian directions at every step of one sample, per method.

Methods (each in a fresh subprocess, same model, sample, k, tol and steps):
  alg1       Alg. 1, the paper's subspace iteration (forward-mode J V, J^T U from the graph of y = f(h))
  alg2       Alg. 2, sequential subspace iteration in mini-batches of b=2
  best       the project's default (method="auto": block Lanczos on one linearisation, warm-started
             from the previous step)
  deflation  the original code's way: power method, one vector at a time, with deflation
Extra (with --methods): alg1-lin (Alg. 1 on the linearisation, oversample 4), krylov-cold (no warm start).

Every method stops on the same relative residual ||J^T J v - s^2 v|| / s^2 < tol (default 1e-3),
and the accuracy actually reached is checked against a reference: --reference explicit builds
the full Jacobian of each step (d_out backward passes) and takes its exact SVD; --reference
krylov (default, faster) is a long high-accuracy run of the best method (tol 1e-6).

Reported: wall-clock and CPU seconds of the direction search (the sampling pass that gives x_t and
h_t is the same for all methods and excluded), ratio deflation / method, batched U-Net passes
(forward, forward-mode, backward, double backward) and vectors pushed through J, the max
relative error of the singular values, and peak memory: ru_maxrss of the worker process (peak
resident set, includes torch, the model and the sampling pass) and the peak RSS during the search
minus the RSS at its start (sampled every 5 ms by a thread).

    python bench/jacobian.py [--steps 20 | --steps 0,5,10] [--k 8] [--quick] [--model random|PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
import warnings

import torch

warnings.filterwarnings("ignore", message=".*should be kept in float32.*")

METHODS = {
    "alg1": dict(method="subspace"),
    "alg2": dict(method="sequential", block=2),
    "best": dict(method="auto"),
    "deflation": dict(method="deflation"),
    "alg1-lin": dict(method="subspace", products="linearized", oversample=4),
    "krylov-cold": dict(method="auto", warm_start=False),
}
WARM = {"best", "krylov-cold"}  # only these use warm_start (the paper methods start from Gaussians)


def load_model(spec: str, steps: int):
    from diffusers import DDIMScheduler

    from pipeline import HSpaceModel
    from pipeline.config import ToyTrainConfig, load_config
    from toyfaces.train_ddpm import build_unet

    if spec == "random":  # the embedded default's architecture, random weights, saved where the builder reads it
        torch.manual_seed(0)
        spec = tempfile.mkdtemp(prefix="hspace-bench-")
        build_unet(ToyTrainConfig()).save_pretrained(spec)
        DDIMScheduler().save_pretrained(spec)
    return HSpaceModel.from_config(load_config(None, [f"model.name_or_path={spec}", "model.device=cpu",
                                                      f"model.num_inference_steps={steps}"]))


def trajectory(args):
    from pipeline.methods.jacobian import sample_trajectory

    model = load_model(args.model, args.T)
    latents, hs = sample_trajectory(model, args.seed)
    return model, {"latents": latents, "h": hs}


def rss_mib() -> float:
    """Peak resident set of this process so far (ru_maxrss; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RssSampler:
    """Samples this process's current resident set (/proc/self/statm) every few ms in a thread,
    so that the peak *during* a block of code can be told from the process's earlier peak."""

    def __init__(self, period: float = 0.005):
        self.period, self.peak, self._stop = period, 0.0, threading.Event()
        self.start_mib = self.now()

    @staticmethod
    def now() -> float:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(self.period)

    def __enter__(self):
        self.peak = self.start_mib
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def worker(args) -> None:
    """One method on all steps; writes its figures to args.out."""
    from pipeline.methods.jacobian import jacobian_directions_all_steps

    torch.set_num_threads(args.threads)
    model, sample = trajectory(args)
    kw = dict(METHODS[args.worker])
    kw.setdefault("warm_start", args.worker in WARM)
    with RssSampler() as mem:
        t0, c0 = time.perf_counter(), time.process_time()
        res = jacobian_directions_all_steps(model, sample, args.k, steps=args.step_list, tol=args.tol,
                                            max_iter=args.max_iter, generator=torch.Generator().manual_seed(args.seed),
                                            unconverged="return", **kw)  # each method on its own, converged or not
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    torch.save({"wall": wall, "cpu": cpu, "S": res.singular_values, "passes": res.passes, "vectors": res.vectors,
                "iterations": res.iterations, "converged": res.converged, "rss_start": mem.start_mib,
                "rss_search_peak": mem.peak, "ru_maxrss": rss_mib()}, args.out)


def reference(args) -> tuple[torch.Tensor, float]:
    """Reference top-k singular values (T', k) and the seconds it took."""
    from pipeline.methods.jacobian import directions_at, eps_function, explicit_jacobian

    torch.set_num_threads(args.threads)
    model, sample = trajectory(args)
    t0 = time.perf_counter()
    out = []
    for s in args.step_list:
        x, h = sample["latents"][s], sample["h"][s]
        if args.reference == "explicit":
            J = explicit_jacobian(eps_function(model, x, s), h.reshape(-1)).double()  # (d_out, d_in)
            G = J @ J.T if J.shape[0] <= J.shape[1] else J.T @ J
            out.append(torch.linalg.eigvalsh(G).flip(0)[: args.k].clamp_min(0).sqrt())
        else:
            r = directions_at(model, x, h, s, args.k, method="krylov", block=8, tol=1e-6, max_iter=2000)
            if not r.converged:
                print(f"warning: reference did not converge at step {s}", file=sys.stderr)
            out.append(r.singular_values.double())
    return torch.stack(out), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--T", type=int, default=20, help="sampling steps of the model")
    ap.add_argument("--steps", default=None,
                    help="N: N evenly spaced steps (all T by default), or a comma list of step indices")
    ap.add_argument("--quick", action="store_true", help="k=4 on 2 steps (a few minutes)")
    ap.add_argument("--model", default="random", help="'random' (the embedded toy U-Net, seed 0) or a model folder")
    ap.add_argument("--seed", type=int, default=0, help="sample seed (and Gaussian starts)")
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--max-iter", type=int, default=3000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reference", choices=("krylov", "explicit"), default="krylov")
    ap.add_argument("--methods", default="alg1,alg2,best,deflation")
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.k = 4 if args.k == 8 else args.k
        args.steps = args.steps or "2"
    if args.steps is None:
        args.step_list = list(range(args.T))
    elif "," in args.steps:
        args.step_list = [int(s) for s in args.steps.split(",") if s.strip()]
    else:
        n = int(args.steps)
        args.step_list = sorted({round(i * (args.T - 1) / max(1, n - 1)) for i in range(n)})
    if args.worker:
        worker(args)
        return
    torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; choose from {sorted(METHODS)}")
    print(f"model {args.model}, T={args.T}, steps {args.step_list}, k={args.k}, tol={args.tol}, "
          f"{args.threads} threads, load average {os.getloadavg()[0]:.1f}", flush=True)
    ref, t_ref = reference(args)
    print(f"reference ({args.reference}): {t_ref:.1f} s", flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in methods:
            out = os.path.join(tmp, f"{name}.pt")
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--out", out]
            for flag in ("k", "T", "model", "seed", "tol", "threads"):
                cmd += [f"--{flag}", str(getattr(args, flag))]
            cmd += ["--max-iter", str(args.max_iter), "--steps", ",".join(map(str, args.step_list)) + ","]
            subprocess.run(cmd, check=True)
            r = torch.load(out)
            r["err"] = float(((r["S"].double() - ref).abs() / ref).max())
            results[name] = r
            print(f"  {name}: {r['wall']:.1f} s wall, {r['cpu']:.1f} s CPU, max rel. error {r['err']:.1e}, "
                  f"converged {bool(r['converged'].all())}, load {os.getloadavg()[0]:.1f}", flush=True)
    base = results.get("deflation")
    print(f"\n{'method':12s} {'wall s':>8s} {'cpu s':>8s} {'defl/x':>7s} {'vectors':>8s} {'fwd':>4s} {'fwd-AD':>6s} "
          f"{'bwd':>5s} {'2xbwd':>5s} {'max err':>8s} {'maxrss':>7s} {'+MiB':>6s}")
    for name, r in results.items():
        ratio = base["wall"] / r["wall"] if base else float("nan")
        p = r["passes"]
        print(f"{name:12s} {r['wall']:8.1f} {r['cpu']:8.1f} {ratio:7.2f} {r['vectors']['jvp']:8d} {p['forward']:4d} "
              f"{p['forward_ad']:6d} {p['backward']:5d} {p['double_backward']:5d} {r['err']:8.1e} "
              f"{r['ru_maxrss']:7.0f} {r['rss_search_peak'] - r['rss_start']:6.0f}")
    print("vectors: vectors pushed through J (as many through J^T); passes are batched U-Net passes "
          "(fwd: forward with graph, fwd-AD: forward-mode, bwd: backward, 2xbwd: double backward); "
          "maxrss: the worker's peak RSS in MiB (torch + model + sampling + search); +MiB: peak RSS during "
          f"the search minus RSS at its start (sampled every 5 ms). Load average now {os.getloadavg()[0]:.1f}.")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": {k: v for k, v in vars(args).items()}, "reference_seconds": t_ref,
                       "results": {n: {k: (v.tolist() if torch.is_tensor(v) else v) for k, v in r.items()}
                                   for n, r in results.items()}}, fh, indent=1)


if __name__ == "__main__":
    main()
