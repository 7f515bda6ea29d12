"""The order in which an SAE sees its training examples: one global sequence of batches, whatever the number of
processes, so that 1 and N processes train the same model.

Every epoch deals the shards in a seeded random order and cuts that order into windows of ``window`` shards; the
examples of a window (every training row of its shards, at every trained step and position) are shuffled with a
seeded permutation and cut into global batches of ``batch_size`` examples (the window's last batch is smaller).
Batch ``i`` is a pure function of (seed, i): a resumed run picks up at its next batch. The shard at position j of
a window is read by rank ``j % world``, which takes the examples of every batch that come from it: the ranks'
shares of a batch add up to the batch, and each rank holds only its own shards of one window at a time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch


def held_out(sample_ids: np.ndarray, fraction: float) -> np.ndarray:
    """Whether each sample is held out of training: a fixed hash of its id below ``fraction`` (the same sample is
    held out whatever the shards, order or number of samples)."""
    ids = np.asarray(sample_ids, dtype=np.uint64)
    with np.errstate(over="ignore"):
        u = (ids * np.uint64(2654435761) + np.uint64(12345)) % np.uint64(2**32)
    return u.astype(np.float64) / 2**32 < fraction


@dataclass(frozen=True)
class Batch:
    """Global batch ``index``: the examples ``order`` (indices into the window's examples) of ``window``."""

    index: int
    window: Window
    order: torch.Tensor

    @property
    def size(self) -> int:
        return len(self.order)

    def locate(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(position in the window, training row of that shard, step position, example position) of each example."""
        w = self.window
        j = torch.searchsorted(w.offsets, self.order, right=True) - 1
        local = self.order - w.offsets[j]
        per_row = w.per_sample
        return j, local // per_row, (local % per_row) // w.per_step, local % w.per_step


@dataclass(frozen=True)
class Window:
    epoch: int
    index: int
    shards: tuple[int, ...]    # shard numbers, in window order
    offsets: torch.Tensor      # (len(shards) + 1,) first example of each shard in the window
    per_sample: int            # examples of one row: trained steps x examples per step
    per_step: int

    @property
    def size(self) -> int:
        return int(self.offsets[-1])


class ExamplePlan:
    """Global batches over shards holding ``train_rows[s]`` training rows each; every row gives ``steps`` x
    ``per_step`` examples."""

    def __init__(self, train_rows: list[int], steps: int, per_step: int, batch_size: int, epochs: int, window: int,
                 seed: int):
        self.train_rows, self.steps, self.per_step = list(train_rows), steps, per_step
        self.batch_size, self.epochs, self.window, self.seed = batch_size, epochs, max(1, window), seed

    def windows(self) -> Iterator[Window]:
        n = len(self.train_rows)
        for e in range(self.epochs):
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self._seed(e))).tolist()
            for w, start in enumerate(range(0, n, self.window)):
                shards = tuple(order[start:start + self.window])
                sizes = [self.train_rows[s] * self.steps * self.per_step for s in shards]
                offsets = torch.tensor(np.concatenate([[0], np.cumsum(sizes)]), dtype=torch.long)
                yield Window(e, w, shards, offsets, self.steps * self.per_step, self.per_step)

    def _seed(self, epoch: int, window: int = -1) -> int:
        return (self.seed * 1_000_003 + epoch) * 100_003 + window + 1

    def num_batches(self) -> int:
        return sum(-(-w.size // self.batch_size) for w in self.windows())

    def examples_per_epoch(self) -> int:
        return sum(self.train_rows) * self.steps * self.per_step

    def batches(self, start: int = 0) -> Iterator[Batch]:
        """The global batches from number ``start`` on."""
        i = 0
        for w in self.windows():
            nb = -(-w.size // self.batch_size)
            if i + nb <= start:
                i += nb
                continue
            order = torch.randperm(w.size, generator=torch.Generator().manual_seed(self._seed(w.epoch, w.index)))
            for b in range(nb):
                if i >= start:
                    yield Batch(i, w, order[b * self.batch_size:(b + 1) * self.batch_size])
                i += 1
