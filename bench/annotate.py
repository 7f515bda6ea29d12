"""Throughput of the annotation stage against calling the annotator in a plain loop.

Both score the same images of one samples dataset with the same annotator and batch size, in
one run: the stage (`hspace annotate`: Lightning predict, PNG decoding from the memory-mapped
shards, Parquet parts, merge) against a loop over the decoded images (decoding excluded, so the
ratio shows everything the stage adds).

    python bench/annotate.py [--n 1024] [--annotator toy] [--batch 256]
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from annotators.base import build_annotator
from pipeline.config import load_config
from pipeline.formats.identity import make_record
from pipeline.formats.images import from_uint8
from pipeline.formats.samples import FORMAT, finalise_manifest, iter_samples, samples_dir, write_shard
from pipeline.stages.annotate import run_annotate
from toyfaces.render import render_faces, sample_factors


def make_dataset(run: Path, n: int, shard: int = 256) -> None:
    """A samples dataset of rendered toy faces (h is a small dummy: annotation never reads it)."""
    images = render_faces(sample_factors(n, 0))
    for start in range(0, n, shard):
        ids = list(range(start, min(start + shard, n)))
        write_shard(samples_dir(run) / "shards", ids, ids, images[ids], torch.zeros(len(ids), 1, 1, 1, 1))
    finalise_manifest(run, {"format": FORMAT, "identity_hash": "bench", "h_shape_t": [1, 1, 1, 1], "h_dtype": "float16",
                            "image_shape": [3, 32, 32], "model": {"name_or_path": "renders", "timesteps": [0]}},
                      set(range(n)), make_record("generate"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--annotator", default="toy")
    ap.add_argument("--batch", type=int, default=256)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="hspace-bench-annotate-"))
    try:
        run = tmp / "run"
        make_dataset(run, args.n)
        images = np.concatenate([b["images"] for b in iter_samples(run, batch_size=args.batch, images=True, h=False)])
        annotator = build_annotator(args.annotator)
        annotator(from_uint8(images[:8]))  # warm-up
        t0 = time.perf_counter()
        for i in range(0, len(images), args.batch):
            annotator(from_uint8(images[i:i + args.batch]))
        t_loop = time.perf_counter() - t0
        cfg = load_config(None, [f"run_dir={run}", f"annotate.annotators=[{args.annotator}]",
                                 f"annotate.batch_size={args.batch}", "trainer.accelerator=cpu"])
        t0 = time.perf_counter()
        run_annotate(cfg)
        t_stage = time.perf_counter() - t0
        print(f"{args.n} images (32x32), annotator {args.annotator}, batch {args.batch}, {torch.get_num_threads()} threads")
        print(f"plain loop over decoded images   {args.n / t_loop:8.0f} images/s")
        print(f"hspace annotate (whole stage)     {args.n / t_stage:8.0f} images/s   stage/loop time {t_stage / t_loop:.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
