"""Editing many directions: one U-Net batch per edit against `HSpaceModel.sample_edits`.

The evaluate stage, the edit strips and `hspace sample` apply E edits to S seeds. Sampling each
edit as its own batch of S images (the way they did before) is compared, in one run, with
`sample_edits`, which samples the E x S (edit, seed) pairs in batches of ``--batch`` images; the
images are checked to agree. On the embedded default the evaluate stage's shape is E = 22 (the
unedited sample, 6 supervised, 6 disentangled, 3 PCA, 6 random) and S = 16.

    python bench/edit_batching.py [--edits 22] [--seeds 16] [--batch 64] [--model toyfaces]
"""
from __future__ import annotations

import argparse
import time

import torch

from pipeline import Edit, HSpaceModel
from pipeline.config import load_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--edits", type=int, default=22)
    ap.add_argument("--seeds", type=int, default=16)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--model", default="toyfaces")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    model = HSpaceModel.from_config(load_config(None, [f"model.name_or_path={args.model}", "model.device=cpu",
                                                       f"model.num_inference_steps={args.steps}"]))
    g = torch.Generator().manual_seed(0)
    edits = [None] + [torch.randn(model.num_steps, *model.h_shape, generator=g) for _ in range(args.edits - 1)]
    seeds = list(range(1_000_000, 1_000_000 + args.seeds))
    model.sample(seeds[:2])  # warm-up

    t0 = time.perf_counter()
    per_edit = torch.stack([model.sample(seeds, Edit(delta=e)).images for e in edits])
    t_per_edit = time.perf_counter() - t0
    t0 = time.perf_counter()
    batched = model.sample_edits(seeds, edits, batch_size=args.batch)
    t_batched = time.perf_counter() - t0

    n = args.edits * args.seeds
    print(f"{args.edits} edits x {args.seeds} seeds = {n} images, {model.num_steps} steps, "
          f"{torch.get_num_threads()} threads")
    print(f"one batch per edit ({args.seeds} images): {t_per_edit:7.1f} s  {t_per_edit / n * 1000:6.0f} ms/image")
    print(f"sample_edits (batches of {args.batch}):  {t_batched:7.1f} s  {t_batched / n * 1000:6.0f} ms/image")
    print(f"speed-up: {t_per_edit / t_batched:.2f}x; largest difference between the two: "
          f"{(per_edit - batched).abs().max():.1e} (images in [-1, 1])")


if __name__ == "__main__":
    main()
