"""Time of one `hspace explore` update: a slider moved, the edited image sampled and scored.

The embedded default (T=20, 32x32), one seed, the toy annotator, a directions file of two
random h-space directions in a temporary run directory. The first render of a seed samples the
unedited trajectory (cached afterwards); each update then runs only the edited sampling (one
sample) from the first edited step on, and scores the result. Prints the median of ``--repeats``
updates at distinct slider values for: every step edited, every step with Asyrp, and steps
10..19 only (half the steps run). ``--threads`` sets torch's intra-op threads (default: torch's).

    python bench/explore_update.py [--repeats 9] [--threads N] [--device cpu|cuda] [--model toyfaces]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from annotators.base import build_annotator
from pipeline import HSpaceModel
from pipeline.config import load_config
from pipeline.explore.session import ExploreSession, Slider
from pipeline.formats.directions import Directions, save_directions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="toyfaces")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = HSpaceModel.from_config(load_config(None, [f"model.name_or_path={args.model}", f"model.device={args.device}",
                                                       f"model.num_inference_steps={args.steps}"]))
    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as run:
        save_directions(Directions(torch.randn(2, model.num_steps, *model.h_shape, generator=g), ["a", "b"], "test",
                                   model.timesteps.tolist()), f"{run}/directions/random.safetensors")
        session = ExploreSession(model, run, build_annotator("toy", device=args.device))
        t0 = time.perf_counter()
        session.render(0)
        print(f"{args.model} {tuple(model.image_shape)}, T={model.num_steps}, {args.device}, "
              f"torch threads {torch.get_num_threads()}: first render of a seed (unedited trajectory) "
              f"{time.perf_counter() - t0:.3f} s")
        for label, kwargs in (("every step", {}), ("every step, Asyrp", {"asyrp": True}),
                              ("steps 10..19", {"window": (10, model.num_steps - 1)})):
            times = [session.render(0, [Slider("random", 0, 0.1 * (k + 1)), Slider("random", 1, 0.05)], **kwargs).seconds
                     for k in range(args.repeats)]
            print(f"  update, {label}: median {statistics.median(times) * 1000:.0f} ms "
                  f"(min {min(times) * 1000:.0f}, max {max(times) * 1000:.0f}, {args.repeats} updates)")


if __name__ == "__main__":
    main()
