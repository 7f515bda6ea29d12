"""Throughput of `hspace generate` (recording h, PNG encoding, writing shards) against diffusers'
`DDIMPipeline` alone, same model, batch, steps and device, in one run.

The model: a U-Net with google/ddpm-ema-celebahq-256's block structure at full width (113.7M
parameters, random weights: timing does not depend on them; `pipeline/testing/standins.py`), 256 px, T=10,
eta 1, batch 64. Steady-state samples/s of each side: diffusers after one warm-up batch; hspace as
the difference between a run of 1 + K batches and a run of 1 batch (each a fresh run directory, so
loading, Lightning's start-up and the first batch cancel out). Also hspace with the writer thread
off (`generate.writer_queue=0`): what overlapping the writing with the U-Net gains.

    python bench/gpu_throughput.py                          # on the GPU (target: hspace >= 0.95x diffusers)
    python bench/gpu_throughput.py --dtype float16          # the U-Net in half precision on both sides
    python bench/gpu_throughput.py --device cpu --reduced   # a CPU-sized version (the default without a GPU)
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

REDUCED = {"width": 32, "size": 128, "batch": 4, "steps": 3, "batches": 2}
PRECISION = {"float32": "32-true", "float16": "16-true", "bfloat16": "bf16-true"}  # weights dtype -> trainer.precision


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def diffusers_rate(folder: Path, args) -> float:
    """Samples/s of DDIMPipeline (eta 1, numpy output) over ``args.batches`` batches after a warm-up."""
    from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

    unet = UNet2DModel.from_pretrained(folder, torch_dtype=getattr(torch, args.dtype)).to(args.device)
    pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_pretrained(folder, clip_sample=False))
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator(device="cpu").manual_seed(0)
    run = lambda: pipe(batch_size=args.batch, num_inference_steps=args.steps, eta=1.0, generator=gen,  # noqa: E731
                       output_type="np")
    run()  # warm-up
    sync(args.device)
    t0 = time.perf_counter()
    for _ in range(args.batches):
        run()
    sync(args.device)
    return args.batches * args.batch / (time.perf_counter() - t0)


def hspace_seconds(folder: Path, run_dir: Path, n_batches: int, args, writer_queue: int) -> float:
    from pipeline.config import load_config
    from pipeline.stages.generate import run_generate

    accelerator = "gpu" if args.device.startswith("cuda") else "cpu"
    cfg = load_config(None, [f"run_dir={run_dir}", f"model.name_or_path={folder}", f"model.num_inference_steps={args.steps}",
                             "model.eta=1.0", f"trainer.precision={PRECISION[args.dtype]}",
                             f"generate.num_samples={n_batches * args.batch}", f"generate.batch_size={args.batch}",
                             f"generate.writer_queue={writer_queue}",
                             f"trainer.accelerator={accelerator}", "trainer.devices=1"])
    t0 = time.perf_counter()
    run_generate(cfg)
    sync(args.device)
    return time.perf_counter() - t0


def hspace_rate(folder: Path, tmp: Path, args, writer_queue: int) -> tuple[float, float]:
    """(steady-state samples/s, whole-stage samples/s of the longer run)."""
    short = hspace_seconds(folder, tmp / f"short-{writer_queue}", 1, args, writer_queue)
    long = hspace_seconds(folder, tmp / f"long-{writer_queue}", 1 + args.batches, args, writer_queue)
    return args.batches * args.batch / max(long - short, 1e-9), (1 + args.batches) * args.batch / long


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reduced", action="store_true", help=f"CPU-sized: {REDUCED} (the default without a GPU)")
    ap.add_argument("--full", action="store_true", help="the full size even on the CPU")
    ap.add_argument("--width", type=int, default=128, help="first level's channels (celebahq-256: 128)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batches", type=int, default=4, help="K timed batches per side")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--no-writer-compare", action="store_true", help="skip the run with the writer thread off")
    args = ap.parse_args()
    if args.reduced or (args.device == "cpu" and not args.full):
        for k, v in REDUCED.items():
            setattr(args, k, v)
    from pipeline.testing.standins import celebahq_unet, save_celebahq

    tmp = Path(tempfile.mkdtemp(prefix="hspace-gpu-bench-"))
    try:
        folder = save_celebahq(tmp / "model", width=args.width, sample_size=args.size)
        params = sum(p.numel() for p in celebahq_unet(args.width, sample_size=args.size).parameters())
        print(f"celebahq-256-shaped U-Net: width {args.width} ({params / 1e6:.1f}M parameters), {args.size} px, "
              f"T={args.steps}, eta 1, batch {args.batch}, {args.dtype}, device {args.device}, "
              f"{torch.get_num_threads()} threads; {args.batches} timed batches per side")
        ref = diffusers_rate(folder, args)
        print(f"diffusers DDIMPipeline alone          {ref:9.2f} samples/s")
        rate, whole = hspace_rate(folder, tmp, args, writer_queue=2)
        print(f"hspace generate (h, PNGs, shards)     {rate:9.2f} samples/s   ratio {rate / ref:.3f} "
              f"(target >= 0.95); whole stage incl. loading: {whole:.2f} samples/s")
        if not args.no_writer_compare:
            rate0, _ = hspace_rate(folder, tmp, args, writer_queue=0)
            print(f"hspace generate, writer thread off    {rate0:9.2f} samples/s   ratio {rate0 / ref:.3f}; "
                  f"the writer thread gains {100 * (rate / rate0 - 1):+.1f}%")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
