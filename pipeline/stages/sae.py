"""`hspace sae`: a sparse autoencoder trained on the run's h as a Lightning ``fit`` job, then its features
measured and labelled (:mod:`pipeline.stages.sae_features`).

1. Checks (nothing written before): a complete samples dataset, the trained steps within its T.
2. Normalisation: one read of the training examples gives each step's scale (sqrt(d) / mean norm), the data's
   mean (the pre-encoder bias starts there) and variance (the loss's denominator): :class:`~pipeline.methods.sae.NormStats`.
3. ``Trainer.fit`` over :class:`ShardStream`, an ``IterableDataset``: the global batches of
   :class:`~pipeline.methods.sae_plan.ExamplePlan` (world-independent), each rank reading only its shards of the
   current window and taking its share of every batch, DataLoader workers taking turns at the batches. Each rank's
   loss is its share of the global batch's (times the world size, which DDP's gradient average divides out), so 1
   and N processes take the same optimizer steps up to float summation order. Checkpoints
   (``<run_dir>/sae/last-<key>.ckpt``, every ``sae.checkpoint_every`` steps, written atomically) hold the weights,
   Adam's state, the dead-latent counters and the curve: a killed run resumes at the next batch to the same result.
4. Rank 0 writes ``sae/sae.safetensors`` and removes the checkpoint; the features pass follows.
"""
from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import numpy as np
import torch

from pipeline.dtypes import torch_dtype
from pipeline.errors import DatasetError
from pipeline.formats.identity import read_record
from pipeline.formats.sae import SAEModel, load_sae, sae_dir, save_sae
from pipeline.formats.samples import h_layout, h_view, open_shard, read_manifest, shard_paths
from pipeline.io import atomic_path, launching_rank, write_text_atomic
from pipeline.methods.sae import (
    NormStats,
    default_lr,
    example_dim,
    examples,
    examples_per_step,
    sae_terms,
    sparse_coder,
)
from pipeline.methods.sae_plan import ExamplePlan, held_out
from pipeline.registry import COMMANDS
from pipeline.stages.lightning_utils import agreed, make_trainer, share_cpu_threads

#: settings of the features pass only (the model does not depend on them)
LABEL_KEYS = ("sae.features_per_attribute",)


def training_identity(cfg) -> dict:
    """The record of ``sae/sae.safetensors``: the training settings, the precision and the samples dataset."""
    return COMMANDS["sae"].identity(cfg, drop=LABEL_KEYS, reads=("samples",))


# ---------------------------------------------------------------------- the data
class Layout:
    """What the stage reads of the samples dataset: shards, h's shape and dtype, the trained steps, the feed."""

    def __init__(self, run_dir, sae_cfg):
        stored = h_layout(read_manifest(run_dir))
        self.shards = shard_paths(run_dir)  # a complete dataset, or a one-line error
        self.h_shape_t, self.h_dtype = list(stored.stored), stored.dtype
        self.T, self.h_shape = stored.num_steps, stored.shape
        self.steps = sae_cfg.step_list(self.T)
        if self.steps[-1] >= self.T:
            raise DatasetError(f"sae.steps={sae_cfg.steps}: the samples in {run_dir} have T={self.T} steps (indices "
                               f"0..{self.T - 1}); choose steps within them")
        stored.require(self.steps, "hspace sae", f"sae.steps={sae_cfg.steps}")
        self.positions = [stored.steps.index(t) for t in self.steps]  # where the trained steps are in the stored h
        self.feed, self.holdout = sae_cfg.feed, sae_cfg.holdout
        self.d, self.per_step = example_dim(self.feed, self.h_shape), examples_per_step(self.feed, self.h_shape)

    def open(self, shard: Path, split: str = "train"):
        """(h (N, T', *h_shape) read-only view of the recorded steps, sample ids (N,), rows of the split: train /
        heldout / all)."""
        table = open_shard(shard)
        ids = table.column("sample_id").to_numpy()
        out = held_out(ids, self.holdout)
        rows = {"train": ~out, "heldout": out, "all": np.ones(len(ids), bool)}[split]
        return h_view(table.column("h"), self.h_shape_t, self.h_dtype), ids, torch.from_numpy(np.flatnonzero(rows))

    def at_steps(self, h: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """h of those rows at the trained steps, (B, len(steps), C, H, W) (only those steps are read)."""
        return h[rows[:, None], torch.tensor(self.positions)[None, :]]

    def train_rows(self) -> list[int]:
        return [int((~held_out(open_shard(s).column("sample_id").to_numpy(), self.holdout)).sum()) for s in self.shards]

    def norm_stats(self, batch_size: int = 64) -> NormStats:
        stats = NormStats.zeros(len(self.steps), self.d)
        for shard in self.shards:
            h, _, rows = self.open(shard)
            for start in range(0, len(rows), batch_size):
                stats.update(examples(self.at_steps(h, rows[start:start + batch_size]), self.feed))
        if not stats.count.sum():
            raise DatasetError("no training samples: sae.holdout leaves none of the samples to train on; lower it")
        return stats


class ShardStream(torch.utils.data.IterableDataset):
    """Rank ``rank``'s share of the plan's global batches from number ``start`` on: {"x": (b, d) in the stored
    dtype, "t": (b,) positions in the trained steps, "n": the global batch's size}. The rank holds the memory maps
    of its shards of one window at a time; DataLoader workers take turns at the batches."""

    def __init__(self, plan: ExamplePlan, layout: Layout, rank: int = 0, world: int = 1, start: int = 0):
        super().__init__()
        self.plan, self.layout, self.rank, self.world, self.start = plan, layout, rank, world, start

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        window, views = None, {}
        for batch in self.plan.batches(self.start):
            if (batch.index - self.start) % workers != worker:
                continue
            if batch.window is not window:
                window, views = batch.window, {}  # the last window's maps are dropped
                views = self.views(window)
            yield self.gather(batch, views)

    def views(self, window) -> dict:
        """Position in the window -> (h view, sample ids, training rows) of this rank's shards of the window."""
        return {j: self.layout.open(self.layout.shards[s]) for j, s in enumerate(window.shards) if j % self.world == self.rank}

    def gather(self, batch, views) -> dict:
        """This rank's examples of ``batch``, read from the views of its shards (an empty share is (0, d))."""
        layout = self.layout
        j, row, t, p = batch.locate()
        steps = torch.tensor(layout.positions)
        xs, ts = [], []
        for jj, (h, _, rows) in views.items():
            mine = j == jj
            if not bool(mine.any()):
                continue
            r, s = rows[row[mine]], steps[t[mine]]
            N, T = h.shape[:2]
            token = layout.feed == "token"
            xs.append(h.reshape(N, T, layout.h_shape[0], -1)[r, s, :, p[mine]] if token else h.reshape(N, T, -1)[r, s])
            ts.append(t[mine])
        if not xs:
            return {"x": torch.zeros(0, layout.d, dtype=torch_dtype(layout.h_dtype)), "t": torch.zeros(0, dtype=torch.long),
                    "n": batch.size}
        return {"x": torch.cat(xs), "t": torch.cat(ts), "n": batch.size}


class SAEData(L.LightningDataModule):
    """The stream of this rank, from the batch after the last optimizer step (a resumed run's included)."""

    def __init__(self, plan: ExamplePlan, layout: Layout, num_workers: int = 0):
        super().__init__()
        self.plan, self.layout, self.num_workers = plan, layout, num_workers

    def train_dataloader(self):
        t = self.trainer
        stream = ShardStream(self.plan, self.layout, t.global_rank, t.world_size, start=t.global_step)
        return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=self.num_workers)


# ---------------------------------------------------------------------- the model
class SAEModule(L.LightningModule):
    """sparsify's SparseCoder trained on normalised examples: training_step adds this rank's share of the global
    batch's loss (:func:`~pipeline.methods.sae.sae_terms`); the latents that fired anywhere and the batch's sums
    are summed over the ranks every step (one small all-reduce), so the dead-latent counters and the curve are
    the same on every rank. Decoder rows: their gradient's parallel part removed, unit norm after every step."""

    def __init__(self, sae_cfg, d: int, scales: torch.Tensor, mean: torch.Tensor, variance: float, dead_after: int,
                 total_steps: int):
        super().__init__()
        self.cfg, self.variance, self.dead_after, self.total_steps = sae_cfg, float(variance), int(dead_after), total_steps
        self.coder = sparse_coder(d, sae_cfg.num_latents, sae_cfg.k, sae_cfg.seed)
        with torch.no_grad():
            self.coder.b_dec.copy_(mean)
        self.register_buffer("scales", scales.float())
        self.register_buffer("since_fired", torch.zeros(sae_cfg.num_latents, dtype=torch.long))
        self.register_buffer("interval", torch.zeros(5, dtype=torch.float64))  # sse, aux/l1, l0, examples, steps
        self.curve: list[dict] = []
        self.examples_seen = 0

    def setup(self, stage: str) -> None:
        share_cpu_threads(self.trainer)

    @property
    def uses_auxk(self) -> bool:
        return self.cfg.sparsity == "topk" and self.cfg.auxk_alpha > 0

    def training_step(self, batch, batch_idx):
        x = batch["x"].float() * self.scales[batch["t"]][:, None]
        n = int(batch["n"])
        dead = self.since_fired >= self.dead_after if self.uses_auxk else None
        terms = sae_terms(self.coder, x, n, self.variance, dead, self.cfg.sparsity, self.cfg.l1_coefficient,
                          self.cfg.auxk_alpha)
        sums = torch.cat([terms.fired.double(), torch.stack([terms.sse.double(), terms.auxk.double(),
                                                             terms.l0.double(), x.new_tensor(len(x)).double()])])
        sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        with torch.no_grad():
            self.since_fired += n
            self.since_fired[sums[:-4] > 0] = 0
            self.interval[:4] += sums[-4:]
            self.interval[4] += 1
        self.examples_seen += n
        step = self.trainer.global_step + 1
        if step % self.cfg.log_every == 0 or step == self.total_steps:
            self.log_row(step)
        return terms.loss * self.trainer.world_size

    def log_row(self, step: int) -> None:
        sse, extra, l0, n, steps = (float(v) for v in self.interval)
        dead = float((self.since_fired >= self.dead_after).double().mean())
        self.curve.append({"step": step, "examples": self.examples_seen, "fvu": sse / max(n * self.variance, 1e-30),
                           "auxk" if self.cfg.sparsity == "topk" else "l1": extra / max(steps, 1),
                           "l0": l0 / max(n, 1), "dead_fraction": dead,
                           "lr": float(self.trainer.optimizers[0].param_groups[0]["lr"])})
        self.interval.zero_()

    def on_before_optimizer_step(self, optimizer):
        self.coder.remove_gradient_parallel_to_decoder_directions()

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        self.coder.set_decoder_norm_to_unit_norm()

    def configure_optimizers(self):
        lr = self.cfg.lr or default_lr(self.cfg.num_latents)
        opt = torch.optim.Adam(self.coder.parameters(), lr=lr, betas=(0.9, 0.999), eps=6.25e-10)
        warm = max(1, self.cfg.warmup_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint):
        checkpoint["hspace_sae"] = {"curve": self.curve, "examples_seen": self.examples_seen}

    def on_load_checkpoint(self, checkpoint):
        state = checkpoint["hspace_sae"]
        self.curve, self.examples_seen = list(state["curve"]), int(state["examples_seen"])


# ---------------------------------------------------------------------- callbacks
class StepCheckpoint(L.Callback):
    """Every ``every`` optimizer steps: the whole training state to ``path`` (rank 0, atomically) and the curve
    to ``sae/curves.csv``."""

    def __init__(self, path: Path, every: int):
        self.path, self.every = Path(path), every

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step % self.every or step >= trainer.max_steps:
            return
        if trainer.is_global_zero:
            with atomic_path(self.path) as tmp:
                trainer.save_checkpoint(tmp)
            write_curve(self.path.parent, pl_module.curve)
        else:
            trainer.save_checkpoint(self.path)  # writes nothing here; meets rank 0 at its barrier


class TrainProgress(L.Callback):
    """A progress bar on rank 0: optimizer steps, h vectors (examples) per second, the last logged FVU."""

    def __init__(self, desc: str):
        self.desc, self.bar = desc, None

    def on_train_start(self, trainer, pl_module):
        if trainer.is_global_zero:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=trainer.max_steps, initial=trainer.global_step, desc=self.desc, unit="steps",
                            dynamic_ncols=True, smoothing=0.1)
            self.t0, self.n0 = time.perf_counter(), pl_module.examples_seen

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.bar is not None:
            self.bar.update(1)
            rate = (pl_module.examples_seen - self.n0) / max(time.perf_counter() - self.t0, 1e-9)
            last = pl_module.curve[-1]["fvu"] if pl_module.curve else float("nan")
            self.bar.set_postfix_str(f"{rate:,.0f} h vectors/s, fvu {last:.3f}", refresh=False)

    def on_train_end(self, trainer, pl_module):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def write_curve(folder: Path, curve: list[dict]) -> None:
    import pandas as pd

    write_text_atomic(folder / "curves.csv", pd.DataFrame(curve).to_csv(index=False))


# ---------------------------------------------------------------------- the stage
def checkpoint_path(run_dir, key: str) -> Path:
    return sae_dir(run_dir) / f"last-{key}.ckpt"


def prepare(sae_cfg, layout: Layout) -> tuple[SAEModule, ExamplePlan]:
    """The untrained module (normalisation measured on the training examples) and the batch plan."""
    s = sae_cfg
    stats = layout.norm_stats()
    mean, variance = stats.normalised_moments()
    plan = ExamplePlan(layout.train_rows(), len(layout.steps), layout.per_step, s.examples_per_batch(), s.num_epochs(),
                       s.window, s.seed)
    dead_after = min(s.dead_after, plan.examples_per_epoch())
    return SAEModule(s, layout.d, stats.scales(), mean, variance, dead_after, plan.num_batches()), plan


def train(cfg, layout: Layout, key: str) -> SAEModel:
    """Trains (or resumes) the SAE; every rank returns the trained model."""
    s = cfg.sae
    run_dir = Path(cfg.run_dir)
    module, plan = prepare(s, layout)
    total, dead_after, variance = module.total_steps, module.dead_after, module.variance
    ckpt = checkpoint_path(run_dir, key)
    if launching_rank() == 0:
        stale = [p for p in sae_dir(run_dir).glob("last-*.ckpt") if p != ckpt]
        if stale:
            print("hspace sae: the settings or the samples changed since the last checkpoint; starting over")
        for p in stale:
            p.unlink(missing_ok=True)
    resume = agreed(ckpt.exists())  # after rank 0's clean-up
    trainer = make_trainer(cfg.trainer, [StepCheckpoint(ckpt, s.checkpoint_every),
                                         TrainProgress(f"sae ({s.feed}, {len(layout.steps)} steps)")],
                           max_steps=total, max_epochs=1, num_sanity_val_steps=0)
    _quiet_fit_warnings()
    trainer.fit(module, datamodule=SAEData(plan, layout, s.num_workers), ckpt_path=str(ckpt) if resume else None)
    model = SAEModel(module.coder.cpu().requires_grad_(False), s.feed, layout.steps, module.scales.cpu(),
                     layout.h_shape, layout.T, s.sparsity,
                     {"k": s.k, "variance": variance, "steps_trained": total, "examples_trained": module.examples_seen,
                      "dead_after": dead_after})
    if trainer.is_global_zero:
        write_curve(sae_dir(run_dir), module.curve)
        save_sae(run_dir, model, training_identity(cfg))
        ckpt.unlink(missing_ok=True)
    return model


def _quiet_fit_warnings() -> None:
    import warnings

    for message in (".*does not have many workers.*", ".*weights_only.*", ".*IterableDataset.*",
                    ".*that ended before the epoch ended.*", ".*Total length of `DataLoader`.*"):
        warnings.filterwarnings("ignore", message=message)


def is_trained(cfg) -> bool:
    """Whether sae/sae.safetensors was trained with these settings on these samples (then training is skipped)."""
    record = read_record(sae_dir(cfg.run_dir) / "sae.safetensors")
    return record is not None and record.get("key") == training_identity(cfg)["key"]


def run_sae(cfg) -> Path:
    from pipeline.stages.sae_features import write_features

    run_dir = Path(cfg.run_dir)
    layout = Layout(run_dir, cfg.sae)  # every check before anything is written
    key = training_identity(cfg)["key"]
    if agreed(is_trained(cfg)):
        model = load_sae(sae_dir(run_dir) / "sae.safetensors")
        if launching_rank() == 0:
            print(f"hspace sae: {sae_dir(run_dir) / 'sae.safetensors'} is up to date; measuring its features")
    else:
        model = train(cfg, layout, key)
    return write_features(cfg, layout, model, COMMANDS["sae"].identity(cfg))
