"""Per-sample noise streams: every sample's randomness comes from its own seed.

A sample's seed ``s`` feeds independent streams, one per purpose (the starting noise x_T,
the per-step variance noise z_t, ...). Each stream's torch generator is seeded with a hash
(numpy ``SeedSequence``) of ``(s, stream)``, so

- no stream is shared between samples, nor between x_T and z_t of one sample (the original
  code's z_t of seed s was the x_T of seed s+1);
- nothing touches the global RNG (the original code reseeded it per sample, collapsing 500
  "random" samples to 142 distinct images);
- a sample's noise is the same whatever batch, order, device or process it is drawn in:
  noise is always drawn on the CPU and then moved.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch

#: Stream identifiers; append new purposes, never renumber.
STREAMS = {"x_T": 0, "z": 1, "inversion": 2, "directions": 3}
_DOMAIN = 0x68737061  # "hspa": keeps our streams apart from other SeedSequence users


def _check_seeds(seeds: Iterable[int]) -> list[int]:
    seeds = [int(s) for s in seeds]
    bad = [s for s in seeds if s < 0]
    if bad:
        raise ValueError(f"seeds must be non-negative integers, got {bad[:5]}")
    return seeds


def generator(seed: int, stream: str) -> torch.Generator:
    """A CPU generator for one (seed, stream) pair, independent of every other pair."""
    if stream not in STREAMS:
        raise KeyError(f"unknown noise stream {stream!r}; streams are {sorted(STREAMS)}")
    state = np.random.SeedSequence([_DOMAIN, _check_seeds([seed])[0], STREAMS[stream]]).generate_state(2, np.uint32)
    return torch.Generator(device="cpu").manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


def randn(seeds: Sequence[int], stream: str, shape: Sequence[int]) -> torch.Tensor:
    """Standard normal noise ``(len(seeds), *shape)`` (float32, whatever the default dtype), row i drawn
    from seed i's stream."""
    seeds = _check_seeds(seeds)
    out = torch.empty((len(seeds), *shape), dtype=torch.float32)
    for i, s in enumerate(seeds):
        torch.randn(tuple(shape), generator=generator(s, stream), out=out[i])
    return out
