"""Cost of the generation stage: `hspace generate` (Lightning, recording h, writing shards)
against sampling alone with the same model and batches, in one run; and read throughput of
the samples dataset (datasets.Dataset and the streaming reader) against plain file reads.

    python bench/generate_overhead.py [--n 256] [--batch 64] [--steps 20]
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch
from diffusers import DDPMScheduler

from pipeline import HSpaceModel
from pipeline.config import ToyTrainConfig, load_config
from pipeline.formats.samples import iter_samples, load_samples, shard_paths
from pipeline.stages.generate import plan_batches, run_generate
from toyfaces.train_ddpm import build_unet


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="hspace-bench-"))
    try:
        torch.manual_seed(0)
        build_unet(ToyTrainConfig()).save_pretrained(tmp / "model")
        DDPMScheduler(num_train_timesteps=1000).save_pretrained(tmp / "model")
        cfg = load_config(None, [f"run_dir={tmp / 'run'}", f"model.name_or_path={tmp / 'model'}",
                                 f"model.num_inference_steps={args.steps}", f"generate.num_samples={args.n}",
                                 f"generate.batch_size={args.batch}", "trainer.accelerator=cpu", "model.device=cpu"])
        model = HSpaceModel.from_config(cfg)
        batches = plan_batches(0, args.n, args.batch, set())
        model.sample(batches[0][:2])  # warm-up
        t0 = time.perf_counter()
        for seeds in batches:
            model.sample(seeds)
        t_sample = time.perf_counter() - t0

        t0 = time.perf_counter()
        run_generate(cfg)
        t_generate = time.perf_counter() - t0

        paths = shard_paths(tmp / "run")
        nbytes = sum(p.stat().st_size for p in paths)
        for p in paths:  # warm the page cache for every reader alike
            p.read_bytes()

        def consume(x: torch.Tensor) -> float:  # every reader's output is used the same way
            return float(x.float().sum())

        t0 = time.perf_counter()
        for p in paths:
            with open(p, "rb") as f:
                buf = bytearray(f.read())
            consume(torch.frombuffer(buf[: len(buf) // 2 * 2], dtype=torch.float16))
        t_plain = time.perf_counter() - t0
        t0 = time.perf_counter()
        for b in iter_samples(tmp / "run", batch_size=args.batch):
            consume(b["h"])
        t_stream = time.perf_counter() - t0
        t0 = time.perf_counter()
        ds = load_samples(tmp / "run").with_format("torch", columns=["h"])
        for i in range(0, len(ds), args.batch):
            consume(ds[i:i + args.batch]["h"])
        t_ds = time.perf_counter() - t0

        print(f"{args.n} samples, batch {args.batch}, T={args.steps}, h {list(model.h_shape)}, "
              f"{torch.get_num_threads()} threads")
        print(f"sampling alone (HSpaceModel.sample loop)   {t_sample:8.2f} s  {args.n / t_sample:7.1f} samples/s")
        print(f"hspace generate (whole stage, incl. load)  {t_generate:8.2f} s  {args.n / t_generate:7.1f} samples/s"
              f"   overhead {100 * (t_generate / t_sample - 1):+.1f}%  (target <= 5%)")
        mb = nbytes / 1e6
        print(f"dataset on disk: {mb:.1f} MB in {len(paths)} shards")
        print("reading, each reader's output summed as a float tensor (page cache warm):")
        print(f"plain file reads + torch.frombuffer   {mb / t_plain:9.0f} MB/s")
        print(f"streaming reader (iter_samples)       {mb / t_stream:9.0f} MB/s   {t_plain / t_stream:.2f}x plain")
        print(f"load_samples() torch format           {mb / t_ds:9.0f} MB/s   {t_plain / t_ds:.2f}x plain"
              f"   (datasets converts float16 to float32)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
