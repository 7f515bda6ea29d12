"""Cost of recording h: HSpaceModel.sample against a plain diffusers DDIM loop (no hooks).

Same U-Net architecture (the embedded default's, random weights: timing does not depend on
them), same steps, batch and noise, one process. Prints the ratio (target <= 1.05), and the
cost of an edit: symmetric injection against Asyrp (two U-Net passes per step).

    python bench/sampling_overhead.py [--batch 32] [--steps 20] [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from diffusers import DDIMScheduler, UNet2DModel

from pipeline import Edit, HSpaceModel
from pipeline.config import ToyTrainConfig, load_config
from toyfaces.train_ddpm import build_unet


def plain_loop(unet, scheduler, x: torch.Tensor, eta: float, z: torch.Tensor) -> torch.Tensor:
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.step(unet(x, t).sample, t, x, eta=eta, variance_noise=z[:, i]).prev_sample
    return x


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--eta", type=float, default=1.0)
    args = ap.parse_args()
    torch.manual_seed(0)
    folder = tempfile.mkdtemp(prefix="hspace-bench-")
    build_unet(ToyTrainConfig()).save_pretrained(folder)
    DDIMScheduler().save_pretrained(folder)
    baseline_unet = UNet2DModel.from_pretrained(folder).eval()  # no hooks on this one
    model = HSpaceModel.from_config(load_config(None, [f"model.name_or_path={folder}", "model.device=cpu",
                                                       f"model.num_inference_steps={args.steps}", f"model.eta={args.eta}"]))
    sched = DDIMScheduler(clip_sample=False)
    sched.set_timesteps(args.steps)
    seeds = list(range(args.batch))
    x_T, z = model.initial_noise(seeds), model.step_noise(seeds)
    delta = 0.1 * torch.randn(args.steps, *model.h_shape)

    t_plain = timed(lambda: plain_loop(baseline_unet, sched, x_T.clone(), args.eta, z), args.repeats)
    t_record = timed(lambda: model.sample(seeds), args.repeats)
    t_sym = timed(lambda: model.sample(seeds, Edit(delta=delta)), args.repeats)
    t_asyrp = timed(lambda: model.sample(seeds, Edit(delta=delta, asyrp=True)), args.repeats)
    check = (model.sample(seeds).images - plain_loop(baseline_unet, sched, x_T.clone(), args.eta, z).clamp(-1, 1)).abs().max()

    print(f"U-Net {sum(p.numel() for p in model.unet.parameters()) / 1e6:.1f}M params, batch {args.batch}, "
          f"T={args.steps}, eta={args.eta}, {torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"plain diffusers DDIM loop      {t_plain:8.3f} s")
    print(f"HSpaceModel.sample (record h)  {t_record:8.3f} s   ratio {t_record / t_plain:.3f}  (target <= 1.05)")
    print(f"  same images as the plain loop: max |diff| = {check:.2e}")
    print(f"edit, symmetric injection      {t_sym:8.3f} s   ratio {t_sym / t_plain:.3f}")
    print(f"edit, Asyrp (two passes/step)  {t_asyrp:8.3f} s   ratio {t_asyrp / t_plain:.3f}   "
          f"asyrp/symmetric {t_asyrp / t_sym:.2f}")


if __name__ == "__main__":
    main()
