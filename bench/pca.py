"""Streaming per-step PCA (pipeline.pca.StreamingPCA) against scikit-learn's IncrementalPCA.

Same batches (float16, as read from a samples dataset), same K, one estimator per step for
scikit-learn. Data: synthetic h with the toy model's shape T=20 x D=8192 (128x8x8): a shared
per-sample latent of R=128 factors with a power-law spectrum (var_j ~ j^-1.2) mapped through a
basis that turns slowly over the steps, plus a per-step mean and an isotropic noise floor, so every
step is full rank with a decaying spectrum. Batches are generated on the fly from seeded generators,
so no method ever holds the dataset (only the exact reference does, for a few steps, at small N).

Each method runs in a fresh subprocess. Reported per method and N: fit time (data generation
excluded); samples/s by wall clock and by process CPU time (the fairer figure on a shared machine;
with more than one thread it also counts the thread pools' spin-waiting); peak memory = ru_maxrss
(peak resident set size) at the end, and after each quarter of N, minus ru_maxrss after imports,
generator set-up and one generated batch (so the one-batch generation temporaries, the same for
every method, are mostly in the baseline). scikit-learn gets float32 arrays (its faster path; it
would upcast float16 to float64). Accuracy: principal angles between the top-K subspaces and
per-component angles (top 10), ours vs scikit-learn and both vs an exact SVD of the full data for
3 steps (only where N <= --exact-max).

On a machine shared with other jobs use --threads 1: the OpenMP / OpenBLAS pools spin-wait when one
of their threads is descheduled (docs/benchmarks.md).

    python bench/pca.py [--n 2000 8000] [--k 25] [--oversample K] [--batch 100] [--threads 2] [--quick]
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

T, C, H, W = 20, 128, 8, 8
D = C * H * W
R = 128  # latent factors
EXACT_STEPS = (0, T // 2, T - 1)


# ---- synthetic h --------------------------------------------------------------------------------
class SyntheticH:
    """h: (B, T, D) float16 batches; batch i is a pure function of (seed, i)."""

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        a0, a1 = torch.randn(2, R, D, generator=g) / math.sqrt(D)
        theta = torch.linspace(0, 1.0, T)[:, None, None]  # basis turns by 1 rad over the trajectory
        scale = torch.linspace(1.0, 3.0, T)[:, None, None]  # and grows towards the end
        self.basis = (torch.cos(theta) * a0 + torch.sin(theta) * a1) * scale  # (T, R, D)
        self.sd = torch.arange(1, R + 1, dtype=torch.float32) ** -0.6  # var_j ~ j^-1.2
        self.mean = torch.randn(T, D, generator=g)
        self.noise = 0.02
        self.seed = seed

    def batch(self, i: int, size: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i + 1)
        z = torch.randn(size, R, generator=g) * self.sd
        h = torch.einsum("br,trd->btd", z, self.basis) + self.mean
        h += self.noise * torch.randn(size, T, D, generator=g)
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
    from sklearn.decomposition import IncrementalPCA
    from threadpoolctl import threadpool_info, threadpool_limits

    from pipeline.pca import StreamingPCA

    torch.set_num_threads(args.threads)
    # Limits only the libraries loaded by now; an unlimited OpenBLAS spin-waits on a busy machine.
    limits = threadpool_limits(args.threads)  # noqa: F841
    pools = {(p["internal_api"], p["num_threads"]) for p in threadpool_info()}
    assert all(n <= args.threads for _, n in pools), pools

    data = SyntheticH(args.seed)
    first = data.batch(0, min(args.batch, args.n))
    base = maxrss_mb()
    quarters: list[float] = []
    mark = lambda: quarters.append(maxrss_mb() - base)  # noqa: E731
    fit_s = cpu_s = 0.0
    out: dict[str, torch.Tensor] = {}
    if args.worker.startswith("ours"):
        dtype = torch.float32 if args.worker == "ours-f32" else torch.float64
        pca = StreamingPCA(args.k, oversample=args.oversample, dtype=dtype)
        for h in data.batches(args.n, args.batch, mark):
            t0, c0 = time.perf_counter(), time.process_time()
            pca.partial_fit(h)
            fit_s += time.perf_counter() - t0
            cpu_s += time.process_time() - c0
        out = {"components": pca.components_.float(), "explained_variance": pca.explained_variance_.double()}
    elif args.worker == "sklearn":
        est = [IncrementalPCA(args.k) for _ in range(T)]
        for h in data.batches(args.n, args.batch, mark):
            t0, c0 = time.perf_counter(), time.process_time()
            x = h.float().numpy()  # float32: scikit-learn's faster path (float16 would be upcast to float64)
            for t in range(T):
                est[t].partial_fit(x[:, t])
            fit_s += time.perf_counter() - t0
            cpu_s += time.process_time() - c0
        out = {"components": torch.from_numpy(np.stack([e.components_ for e in est])).float(),
               "explained_variance": torch.from_numpy(np.stack([e.explained_variance_ for e in est])).double()}
    elif args.worker == "exact":
        X = torch.empty(args.n, len(EXACT_STEPS), D, dtype=torch.float64)
        i = 0
        for h in data.batches(args.n, args.batch, mark):
            X[i:i + len(h)] = h[:, list(EXACT_STEPS)].double()
            i += len(h)
        t0, c0 = time.perf_counter(), time.process_time()
        comps, evs = [], []
        for s in range(len(EXACT_STEPS)):
            Xc = X[:, s] - X[:, s].mean(0)
            lam, U = torch.linalg.eigh(Xc @ Xc.T)  # (N, N) Gram: N << D
            lam, U = lam.flip(0)[: args.k], U.flip(1)[:, : args.k]
            comps.append((U.T @ Xc) / lam.sqrt()[:, None])
            evs.append(lam / (args.n - 1))
        fit_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
        out = {"components": torch.stack(comps).float(), "explained_variance": torch.stack(evs)}
    peak = maxrss_mb()
    del first
    torch.save(out, args.out)
    return {"method": args.worker, "n": args.n, "fit_s": fit_s, "samples_per_s": args.n / fit_s,
            "cpu_s": cpu_s, "samples_per_cpu_s": args.n / cpu_s,
            "peak_mb": peak - base, "baseline_mb": base, "peak_quarters_mb": quarters}


def run_worker(method: str, n: int, args, tmp: str) -> tuple[dict, dict]:
    out = os.path.join(tmp, f"{method}-{n}.pt")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, "--n", str(n), "--k", str(args.k),
           "--batch", str(args.batch), "--threads", str(args.threads), "--seed", str(args.seed), "--out", out]
    if args.oversample is not None:
        cmd += ["--oversample", str(args.oversample)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{method} N={n} failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1]), torch.load(out)


# ---- accuracy -------------------------------------------------------------------------------------
def subspace_angles(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Principal angles (rad) between the row spaces of a, b: (S, K, D) orthonormal rows -> (S, K)."""
    return torch.arccos(torch.linalg.svdvals(a.double() @ b.double().mT).clamp(max=1.0))


def component_angles(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = (torch.nn.functional.normalize(x.double(), dim=-1) for x in (a, b))
    return torch.arccos((a * b).sum(-1).abs().clamp(max=1.0))


def compare(a: dict, b: dict, steps=None) -> str:
    ca, cb = a["components"], b["components"]
    ea, eb = a["explained_variance"], b["explained_variance"]
    if steps is not None:
        ca, ea = ca[list(steps)], ea[list(steps)]
    sub = subspace_angles(ca, cb)
    comp = component_angles(ca[:, :10], cb[:, :10])
    ev = (ea / eb - 1).abs()
    return (f"subspace angle median {sub.median():.1e} max {sub.max():.1e} rad | top-10 component angle "
            f"max {comp.max():.1e} rad | explained var rel. err top-10 max {ev[:, :10].max():.1e}, "
            f"top-{ca.shape[1]} max {ev.max():.1e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[2000, 8000], help="sample counts (one run each)")
    ap.add_argument("--k", type=int, default=25)
    ap.add_argument("--oversample", type=int, default=None, help="default: StreamingPCA's (= k)")
    ap.add_argument("--batch", type=int, default=100, help="batch size fed to both methods")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--exact-max", type=int, default=2000, help="exact SVD reference for N up to this")
    ap.add_argument("--methods", nargs="+", default=["ours", "ours-f32", "sklearn"])
    ap.add_argument("--quick", action="store_true", help="N = 500 and 1500 (about a minute)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.n = args.n[0]
        print(json.dumps(worker(args)))
        return
    if args.quick:
        args.n = [500, 1500]
    q = args.k + (args.k if args.oversample is None else args.oversample)
    print(f"h: T={T} x D={D} ({C}x{H}x{W}), K={args.k}, ours keeps q={q}, "
          f"batch {args.batch}, {args.threads} threads, float16 input")
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.n:
            results = {}
            for m in args.methods + (["exact"] if n <= args.exact_max else []):
                info, results[m] = run_worker(m, n, args, tmp)
                print(f"N={n:6d} {m:9s} fit {info['fit_s']:7.1f} s  {info['samples_per_s']:7.1f} samples/s  "
                      f"(CPU {info['cpu_s']:7.1f} s, {info['samples_per_cpu_s']:7.1f} samples/CPU-s)  "
                      f"peak +{info['peak_mb']:6.1f} MB (ru_maxrss over baseline {info['baseline_mb']:.0f} MB; "
                      f"after 1/4, 2/4, 3/4 of N: {', '.join(f'+{x:.0f}' for x in info['peak_quarters_mb'][:3])})",
                      flush=True)
                results[m]["info"] = info
            if "ours" in results and "sklearn" in results:
                o, s = results["ours"]["info"], results["sklearn"]["info"]
                print(f"N={n:6d} speed ours/sklearn {o['samples_per_s'] / s['samples_per_s']:.2f}x wall, "
                      f"{o['samples_per_cpu_s'] / s['samples_per_cpu_s']:.2f}x CPU time, "
                      f"peak memory ours/sklearn {o['peak_mb'] / max(s['peak_mb'], 1e-9):.2f}x")
            for m in results:
                if m not in ("sklearn", "exact") and "sklearn" in results:
                    print(f"N={n:6d} {m} vs sklearn: {compare(results[m], results['sklearn'])}")
            if "exact" in results:
                for m in results:
                    if m != "exact":
                        print(f"N={n:6d} {m} vs exact (steps {EXACT_STEPS}): "
                              f"{compare(results[m], results['exact'], EXACT_STEPS)}")
            if "ours" in results and "ours-f32" in results:
                print(f"N={n:6d} ours-f32 vs ours: {compare(results['ours-f32'], results['ours'])}")


if __name__ == "__main__":
    main()
