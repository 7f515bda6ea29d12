"""SAE training throughput, streaming the h vectors from the shards against the same training on an in-memory
tensor, and peak memory against the number of samples.

Data: synthetic h of the embedded default's shape (C=128, 8 x 8 positions; ``--steps`` sampling steps, 4 by
default: the throughput is per h vector and does not depend on T) written as a samples dataset of ``--n``
samples (shards of 64, float16), sums of 4 atoms of a random 256-atom dictionary per h vector.

Throughput: the stage's own training (``pipeline.stages.sae``: ``SAEModule`` under ``Trainer.fit``, the token-wise
feed, 2048 latents, k = 16, 4096 h vectors per optimizer step) for ``--train-steps`` steps, fed by
``ShardStream`` (memory maps of each window's shards, the h vectors gathered per batch) or by the same stream over
tensors loaded into memory beforehand (the same batches: the two train the same weights, checked). Timed from the
5th optimizer step to the last; the two alternate ``--repeats`` times (A B A B ...); h vectors per second by wall
clock and by process CPU time, medians, and the ratio streaming / in memory (target >= 0.9).

Peak memory: for each N in ``--memory-n``, a fresh process trains one epoch over every h vector of step 0 of a
dataset of N samples (N x 64 h vectors, after the normalisation pass over them); VmHWM (peak resident set, which
includes the memory-mapped shard pages touched) and the peak of anonymous memory (RssAnon, sampled every 50 ms)
above what the process held after its imports, against N.

    python bench/sae.py [--n 256] [--train-steps 40] [--repeats 3] [--memory-n 256 1024 4096] [--threads 1]
                        [--parts throughput memory] [--dir DIR (keeps the datasets)]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SAE = ["sae.num_latents=2048", "sae.k=16", "sae.batch_size=4096", "sae.epochs=100", "sae.holdout=0"]


def make_dataset(run: Path, n: int, steps: int) -> Path:
    from pipeline.testing.sparse_data import dictionary, sparse_h, write_samples

    if not (run / "samples" / "manifest.json").exists():
        atoms = dictionary(256, 128, seed=0)
        for first in range(0, n, 256):  # written in parts, so that making a big dataset stays small too
            h, _ = sparse_h(atoms, min(256, n - first), steps, (128, 8, 8), active=4, seed=first)
            write_samples(run / f"part{first}", h, shard_size=64, first_id=first)
        merge_parts(run, n)
    return run


def merge_parts(run: Path, n: int) -> None:
    """One samples dataset from the parts written by make_dataset."""
    import shutil

    from pipeline.formats.identity import make_record
    from pipeline.io import write_json_atomic

    parts = sorted(run.glob("part*"), key=lambda p: int(p.name[4:]))
    manifest = json.loads((parts[0] / "samples" / "manifest.json").read_text())
    (run / "samples" / "shards").mkdir(parents=True, exist_ok=True)
    names = []
    for part in parts:
        for shard in sorted((part / "samples" / "shards").glob("*.arrow")):
            shutil.move(str(shard), run / "samples" / "shards" / shard.name)
            names.append(shard.name)
        shutil.rmtree(part)
    manifest.update(shards=sorted(names), num_samples=n, record=make_record("generate", content=["bench", n]))
    write_json_atomic(run / "samples" / "manifest.json", manifest)


def config(run: Path, steps: int, extra=()):
    from pipeline.config import load_config

    return load_config(None, [f"run_dir={run}", f"model.num_inference_steps={steps}", "trainer.accelerator=cpu", *SAE,
                              *extra])


def train(run: Path, steps: int, train_steps: int | None, in_memory: bool, extra=()) -> dict:
    """One training of ``train_steps`` optimizer steps (None: the plan's) -> rates and the weights' checksum."""
    import lightning as L

    from pipeline.stages.lightning_utils import make_trainer
    from pipeline.stages.sae import Layout, SAEData, ShardStream, prepare

    cfg = config(run, steps, extra)
    layout = Layout(run, cfg.sae)
    module, plan = prepare(cfg.sae, layout)
    train_steps = module.total_steps = train_steps or module.total_steps

    class MemoryStream(ShardStream):
        """The same stream over tensors loaded into memory beforehand."""

        loaded = {}

        def views(self, window):
            for s in window.shards:
                if s not in self.loaded:
                    h, ids, rows = self.layout.open(self.layout.shards[s])
                    self.loaded[s] = (h.clone(), ids, rows)
            return {j: self.loaded[s] for j, s in enumerate(window.shards)}

    class MemoryData(SAEData):
        def train_dataloader(self):
            stream = MemoryStream(self.plan, self.layout)
            for w in self.plan.windows():  # everything in memory before the clock starts
                stream.views(w)
            return torch.utils.data.DataLoader(stream, batch_size=None)

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx in (0, 4):  # from the 5th step (a run of fewer steps: from the first)
                self.t0, self.c0, self.n0 = time.perf_counter(), time.process_time(), pl_module.examples_seen

        def on_train_end(self, trainer, pl_module):
            self.wall, self.cpu = time.perf_counter() - self.t0, time.process_time() - self.c0
            self.n = pl_module.examples_seen - self.n0

    clock = Clock()
    trainer = make_trainer(cfg.trainer, [clock], max_steps=train_steps, max_epochs=1, num_sanity_val_steps=0)
    data = (MemoryData if in_memory else SAEData)(plan, layout)
    trainer.fit(module, datamodule=data)
    checksum = float(sum(p.double().sum() for p in module.coder.parameters()))
    return {"vectors_per_s": clock.n / clock.wall, "vectors_per_cpu_s": clock.n / clock.cpu, "checksum": checksum}


def rss_anon_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def memory_worker(args) -> dict:
    """Peak memory of one streaming training over a dataset of args.worker_n samples."""
    run = Path(args.dir) / f"n{args.worker_n}"
    import lightning  # noqa: F401  (imports before the baseline)

    import pipeline.stages.sae  # noqa: F401

    base_anon, peak = rss_anon_mb(), [0.0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss_anon_mb())
            time.sleep(0.05)

    threading.Thread(target=sample, daemon=True).start()
    base_hwm = vm_hwm_mb()
    out = train(run, args.steps, None, in_memory=False, extra=["sae.steps=0", "sae.epochs=1"])
    stop.set()
    return {"n": args.worker_n, "anon_peak_mb": peak[0] - base_anon, "vm_hwm_mb": vm_hwm_mb() - base_hwm, **out}


def subprocess_json(args, extra: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": str(args.threads)}
    out = subprocess.run([sys.executable, __file__, *sys.argv[1:], *extra], capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=256, help="samples of the throughput dataset")
    p.add_argument("--steps", type=int, default=4, help="sampling steps T of the synthetic h")
    p.add_argument("--train-steps", type=int, default=40)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--memory-n", type=int, nargs="*", default=[256, 1024, 4096])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--parts", nargs="*", default=["throughput", "memory"], choices=["throughput", "memory"])
    p.add_argument("--dir", default=None, help="where the datasets are written (default: a temporary folder)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-n", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker == "memory":
        print(json.dumps(memory_worker(args)))
        return
    if args.worker == "throughput":
        print(json.dumps(throughput_worker(args)))
        return
    with tempfile.TemporaryDirectory(prefix="hspace-bench-sae-") as tmp:
        args.dir = args.dir or tmp
        for n in {args.n, *args.memory_n}:
            make_dataset(Path(args.dir) / f"n{n}", n, args.steps)
        if args.dir == tmp:
            sys.argv += ["--dir", tmp]
        if "throughput" in args.parts:
            report_throughput(args)
        if "memory" in args.parts:
            report_memory(args)


def throughput_worker(args) -> dict:
    """Streaming and in-memory training, alternating, in one process (the same warm caches for both)."""
    run = Path(args.dir) / f"n{args.n}"
    rows = []
    for r in range(args.repeats):
        for in_memory in (False, True):
            rows.append({"repeat": r, "in_memory": in_memory, **train(run, args.steps, args.train_steps, in_memory)})
    return {"rows": rows}


def report_throughput(args) -> None:
    rows = subprocess_json(args, ["--worker", "throughput"])["rows"]
    stream = [r for r in rows if not r["in_memory"]]
    memory = [r for r in rows if r["in_memory"]]
    assert len({r["checksum"] for r in rows}) == 1, "streaming and in-memory trained different weights"
    med = lambda rs, k: statistics.median(r[k] for r in rs)  # noqa: E731
    print(f"SAE training, token-wise, 2048 latents, k=16, 4096 h vectors per step, {args.train_steps} steps, "
          f"{args.n} samples, {args.threads} thread(s); the same weights both ways")
    print(f"{'repeat':>6s} {'streaming h/s':>14s} {'in memory h/s':>14s} {'ratio':>6s}")
    for r in range(args.repeats):
        s, m = stream[r]["vectors_per_s"], memory[r]["vectors_per_s"]
        print(f"{r:6d} {s:14,.0f} {m:14,.0f} {s / m:6.3f}")
    for key, label in (("vectors_per_s", "wall clock"), ("vectors_per_cpu_s", "CPU time")):
        print(f"median ({label}): streaming {med(stream, key):,.0f} h vectors/s, in memory {med(memory, key):,.0f}; "
              f"ratio {med(stream, key) / med(memory, key):.3f}")


def report_memory(args) -> None:
    print("\npeak memory of a streaming training (one epoch over step 0's h vectors) against the number of samples")
    print(f"{'samples':>8s} {'h MB read':>9s} {'peak RssAnon +MB':>17s} {'VmHWM +MB':>10s}")
    for n in args.memory_n:
        r = subprocess_json(args, ["--worker", "memory", "--worker-n", str(n)])
        print(f"{n:8d} {n * 128 * 64 * 2 / 1e6:9.1f} {r['anon_peak_mb']:17.0f} {r['vm_hwm_mb']:10.0f}")


if __name__ == "__main__":
    main()
