"""hspace's per-step PCA (pipeline.methods.pca.PCA: randomized, exact, onepass) against scikit-learn's
IncrementalPCA and PCA (full SVD): time, peak memory and accuracy at a configurable size.

Data: synthetic h of T steps x D features (--steps, --dim; the toy model's are 20 x 8192, the
paper's 50 x 32768): a shared per-sample latent of R=128 factors with a power-law spectrum
(var_j ~ j^-1.2) mapped through a basis that turns slowly over the steps, plus a per-step mean and an
isotropic noise floor, so every step is full rank with a slowly decaying spectrum. Batches are
float16 (as stored in a samples dataset) and generated on the fly from seeded generators (batch i
is a pure function of (seed, i)), so the streaming methods never hold the dataset and the
randomized method's passes re-read the same data; the exact methods (hspace exact, scikit-learn
PCA) hold it, as they must.

Each method runs in a fresh subprocess. Reported per method and N: fit time (data generation
excluded); samples/s by wall clock and by process CPU time (the fairer figure on a shared machine);
passes over the data; peak memory = ru_maxrss (peak resident set size) at the end, and after each
quarter of N (first pass), minus ru_maxrss after imports, generator set-up and one generated
batch. scikit-learn gets float32 arrays for IncrementalPCA (its faster path) and float64 for PCA
(the reference). Accuracy: the largest principal angle between each method's top-K subspace and
scikit-learn's full-SVD PCA at every step, and the largest relative error of the explained variances.

On a machine shared with other jobs use --threads 1: the OpenMP / OpenBLAS pools spin-wait when one
of their threads is descheduled (docs/benchmarks.md).

    python bench/pca.py [--n 1000 2000] [--steps 4] [--dim 8192] [--k 25] [--threads 1]
    python bench/pca.py --n 20000 --steps 50 --dim 32768 --k 25 --methods randomized sklearn-ipca   # paper size
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

R = 128  # latent factors
METHODS = ("randomized", "exact", "onepass", "sklearn-ipca", "sklearn-pca")


# ---- synthetic h --------------------------------------------------------------------------------
class SyntheticH:
    """h: (B, T, D) float16 batches; batch i is a pure function of (seed, i)."""

    def __init__(self, T: int, D: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        a0, a1 = torch.randn(2, R, D, generator=g) / math.sqrt(D)
        theta = torch.linspace(0, 1.0, T)[:, None, None]  # basis turns by 1 rad over the trajectory
        scale = torch.linspace(1.0, 3.0, T)[:, None, None]  # and grows towards the end
        self.basis = (torch.cos(theta) * a0 + torch.sin(theta) * a1) * scale  # (T, R, D)
        self.sd = torch.arange(1, R + 1, dtype=torch.float32) ** -0.6  # var_j ~ j^-1.2
        self.mean = torch.randn(T, D, generator=g)
        self.noise = 0.02
        self.T, self.D, self.seed = T, D, seed

    def batch(self, i: int, size: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i + 1)
        z = torch.randn(size, R, generator=g) * self.sd
        h = torch.einsum("br,trd->btd", z, self.basis) + self.mean
        h += self.noise * torch.randn(size, self.T, self.D, generator=g)
        return h.half()

    def batches(self, n: int, size: int, on_quarter=None):
        """Yields the batches of n samples; calls on_quarter() after each quarter of them is used."""
        nb = -(-n // size)
        for i, start in enumerate(range(0, n, size)):
            yield self.batch(i, min(size, n - start))
            if on_quarter is not None and (4 * (i + 1)) // nb > (4 * i) // nb:
                on_quarter()


# ---- workers (one per subprocess) ------------------------------------------------------------------
def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker(args) -> dict:
    import numpy as np
    import scipy.linalg  # noqa: F401  (load its BLAS before limiting it)
    from sklearn.decomposition import PCA as SkPCA
    from sklearn.decomposition import IncrementalPCA
    from threadpoolctl import threadpool_info, threadpool_limits

    from pipeline.methods.pca import PCA

    torch.set_num_threads(args.threads)
    # Limits only the libraries loaded by now; an unlimited OpenBLAS spin-waits on a busy machine.
    limits = threadpool_limits(args.threads)  # noqa: F841
    pools = {(p["internal_api"], p["num_threads"]) for p in threadpool_info()}
    assert all(n <= args.threads for _, n in pools), pools

    data = SyntheticH(args.steps, args.dim, args.seed)
    first = data.batch(0, min(args.batch, args.n))
    base = maxrss_mb()
    quarters: list[float] = []
    mark = lambda: quarters.append(maxrss_mb() - base)  # noqa: E731
    gen = {"s": 0.0, "cpu": 0.0, "passes": 0}

    def timed(batches):
        """The batches, counting the time spent generating them (excluded from the fit time)."""
        gen["passes"] += 1
        it = iter(batches)
        while True:
            t0, c0 = time.perf_counter(), time.process_time()
            h = next(it, None)
            gen["s"] += time.perf_counter() - t0
            gen["cpu"] += time.process_time() - c0
            if h is None:
                return
            yield h

    T, m = args.steps, args.worker
    t0, c0 = time.perf_counter(), time.process_time()
    if m in ("randomized", "exact", "onepass"):
        est = PCA(args.k, method=m, oversample=args.oversample, power_iterations=args.power_iterations,
                  tol=args.tol, chunk_size=64)
        passes = [0]

        def one_pass():
            passes[0] += 1
            return timed(data.batches(args.n, args.batch, mark if passes[0] == 1 else None))

        est.fit(one_pass)
        comps, ev = est.components_.double(), est.explained_variance_.double()
    elif m == "sklearn-ipca":
        fits = [IncrementalPCA(args.k) for _ in range(T)]
        for h in timed(data.batches(args.n, args.batch, mark)):
            x = h.float().numpy()  # float32: scikit-learn's faster path (float16 would be upcast to float64)
            for t in range(T):
                fits[t].partial_fit(x[:, t])
        comps = torch.from_numpy(np.stack([f.components_ for f in fits])).double()
        ev = torch.from_numpy(np.stack([f.explained_variance_ for f in fits])).double()
    elif m == "sklearn-pca":
        X = torch.cat(list(timed(data.batches(args.n, args.batch, mark))))  # (N, T, D) float16, held as stored
        fits = [SkPCA(args.k, svd_solver="full").fit(X[:, t].double().numpy()) for t in range(T)]
        comps = torch.from_numpy(np.stack([f.components_ for f in fits])).double()
        ev = torch.from_numpy(np.stack([f.explained_variance_ for f in fits])).double()
    else:
        raise SystemExit(f"unknown method {m}")
    fit_s, cpu_s = time.perf_counter() - t0 - gen["s"], time.process_time() - c0 - gen["cpu"]
    peak = maxrss_mb()
    del first
    torch.save({"components": comps, "explained_variance": ev}, args.out)
    return {"method": m, "n": args.n, "fit_s": fit_s, "cpu_s": cpu_s, "passes": gen["passes"],
            "samples_per_s": args.n / fit_s, "samples_per_cpu_s": args.n / cpu_s,
            "peak_mb": peak - base, "baseline_mb": base, "peak_quarters_mb": quarters}


def run_worker(method: str, n: int, args, tmp: str) -> tuple[dict, dict]:
    out = os.path.join(tmp, f"{method}-{n}.pt")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, "--n", str(n), "--k", str(args.k),
           "--steps", str(args.steps), "--dim", str(args.dim), "--batch", str(args.batch),
           "--threads", str(args.threads), "--seed", str(args.seed), "--out", out,
           "--power-iterations", str(args.power_iterations), "--tol", str(args.tol)]
    if args.oversample is not None:
        cmd += ["--oversample", str(args.oversample)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{method} N={n} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1]), torch.load(out)


# ---- accuracy -------------------------------------------------------------------------------------
def subspace_angles(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Principal angles (rad) between the row spaces of a, b: (T, K, D) orthonormal rows -> (T, K)."""
    return torch.arccos(torch.linalg.svdvals(a.double() @ b.double().mT).clamp(max=1.0))


def compare(a: dict, ref: dict) -> str:
    angle = subspace_angles(a["components"], ref["components"]).max(-1).values  # (T,)
    ev = (a["explained_variance"] / ref["explained_variance"] - 1).abs()
    return (f"largest principal angle {angle.max():.1e} rad (median over steps {angle.median():.1e}); "
            f"explained variance rel. error max {ev.max():.1e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[1000, 2000], help="sample counts (one run each)")
    ap.add_argument("--steps", type=int, default=4, help="T (toy model: 20, paper: 50)")
    ap.add_argument("--dim", type=int, default=8192, help="D per step (toy model: 8192, paper: 32768)")
    ap.add_argument("--k", type=int, default=25)
    ap.add_argument("--oversample", type=int, default=None, help="default: = k")
    ap.add_argument("--power-iterations", type=int, default=40)
    ap.add_argument("--tol", type=float, default=1e-2)
    ap.add_argument("--batch", type=int, default=100, help="batch size fed to the streaming methods")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--reference", default="sklearn-pca", choices=METHODS,
                    help="what accuracy is measured against (sklearn-pca: full SVD in float64)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.n = args.n[0]
        print(json.dumps(worker(args)))
        return
    print(f"h: T={args.steps} x D={args.dim}, K={args.k}, oversample {args.oversample or args.k}, tol {args.tol}, "
          f"batch {args.batch}, {args.threads} threads, float16 input")
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.n:
            results = {}
            for m in args.methods:
                info, results[m] = run_worker(m, n, args, tmp)
                print(f"N={n:6d} {m:12s} fit {info['fit_s']:7.1f} s  {info['samples_per_s']:7.1f} samples/s  "
                      f"(CPU {info['cpu_s']:7.1f} s)  passes {info['passes']:2d}  peak +{info['peak_mb']:6.0f} MB "
                      f"(after 1/4, 2/4, 3/4 of the first pass: "
                      f"{', '.join(f'+{x:.0f}' for x in info['peak_quarters_mb'][:3])})", flush=True)
                results[m]["info"] = info
            if args.reference in results:
                ref = results[args.reference]
                for m in results:
                    if m != args.reference:
                        print(f"N={n:6d} {m} vs {args.reference}: {compare(results[m], ref)}", flush=True)
            if "randomized" in results and "sklearn-ipca" in results:
                o, s = results["randomized"]["info"], results["sklearn-ipca"]["info"]
                print(f"N={n:6d} randomized / sklearn-ipca: {s['fit_s'] / o['fit_s']:.2f}x faster by wall clock, "
                      f"{s['cpu_s'] / o['cpu_s']:.2f}x by CPU time; peak memory {o['peak_mb'] / max(s['peak_mb'], 1):.2f}x",
                      flush=True)


if __name__ == "__main__":
    main()
