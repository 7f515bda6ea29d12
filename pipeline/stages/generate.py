"""`hspace generate`: bulk generation with h recording into a sharded samples dataset.

``Trainer.predict`` over batches of seeds, on whatever the ``trainer`` section says (1 CPU,
8 GPUs, several nodes). Each rank writes its own shards through a prediction-writer
callback; nothing is gathered on rank 0. Every sample's noise comes from its seed, so the
dataset is the same whatever the number of processes or the batch size.

Restarts: the seeds are cut into batches aligned to ``first_seed``; a re-run skips every
batch whose shard exists and is valid, so a killed run completes with no duplicates and,
with the same batch size, bit-identical to an uninterrupted one. A run directory whose
manifest was written by a different configuration (model, weights, scheduler, eta, hook,
dtypes) is refused instead of mixing samples.
"""
from __future__ import annotations

import shutil
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
from lightning.pytorch.callbacks import BasePredictionWriter

from ..config import config_hash, to_dict
from ..errors import DatasetError
from ..images import to_uint8
from ..model import HSpaceModel
from ..samples import FORMAT, H_DTYPES, MANIFEST, samples_dir, scan_shards, write_json_atomic, write_shard
from .lightning_utils import (IDLE, AfterAllRanks, ItemModule, ItemsProgress, RankShare, agreed, launching_rank,
                              make_trainer, share_cpu_threads)


# ---------------------------------------------------------------------- planning (pure)
def plan_batches(first_seed: int, num_samples: int, batch_size: int, done: set[int]) -> list[list[int]]:
    """Seeds still to generate, cut into batches aligned to ``first_seed`` (so a restart with the
    same batch size reproduces the same batches); finished seeds are left out."""
    batches = []
    for start in range(first_seed, first_seed + num_samples, batch_size):
        todo = [s for s in range(start, min(start + batch_size, first_seed + num_samples)) if s not in done]
        if todo:
            batches.append(todo)
    return batches


def bytes_per_sample(h_shape_t, h_dtype: str, image_shape) -> int:
    """Upper estimate of one sample on disk: h with its Array4D offsets, the PNG, the ids."""
    T, C, H, W = h_shape_t
    h_bytes = T * C * H * W * np.dtype(H_DTYPES[h_dtype][0]).itemsize
    offsets = 4 * (T + T * C + T * C * H + 4)
    return h_bytes + offsets + int(np.prod(image_shape)) + 1024


def package_versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for pkg in ("hspace", "torch", "diffusers", "lightning", "datasets", "pyarrow"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def content_identity(model: HSpaceModel, h_dtype: str, precision) -> dict:
    """Everything that determines a sample's content (not the batch size, not the devices)."""
    d = model.describe()
    return {"model": d, "h_dtype": h_dtype, "precision": str(precision)}


def _differences(a, b, prefix="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _differences(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix[:-1]}: {a!r} (existing) vs {b!r} (now)"]


# ---------------------------------------------------------------------- Lightning
class GenerateModule(ItemModule):
    """predict_item: seeds -> images and h trajectories of an HSpaceModel."""

    def __init__(self, model: HSpaceModel, h_dtype: str):
        super().__init__()
        self.hmodel = model
        self.unet = model.unet  # registered, so Lightning moves it to the rank's device
        self.h_dtype = h_dtype

    def setup(self, stage: str) -> None:
        share_cpu_threads(self.trainer)

    def predict_item(self, seeds: list[int]):
        self.hmodel.to(self.device)
        out = self.hmodel.sample(seeds)
        return {"seeds": seeds, "images": to_uint8(out.images), "h": out.h.to("cpu", H_DTYPES[self.h_dtype][1])}


class ShardWriter(BasePredictionWriter):
    """Writes each predicted batch as one shard, on the rank that made it."""

    def __init__(self, shards_dir: Path, h_dtype: str):
        super().__init__(write_interval="batch")
        self.shards_dir, self.h_dtype = shards_dir, h_dtype

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        if batch is IDLE:
            return
        write_shard(self.shards_dir, prediction["seeds"], prediction["seeds"], prediction["images"],
                    prediction["h"], self.h_dtype)


class GenerateData(RankShare):
    """Plans on every rank after the process group exists and before anyone writes (Lightning
    puts a barrier after setup), then deals batches round-robin to the ranks."""

    def __init__(self, run_dir: str, gen_cfg):
        super().__init__()
        self.run_dir, self.cfg = run_dir, gen_cfg

    def plan(self) -> list:
        done = set(scan_shards(self.run_dir).sample_ids.tolist())
        return plan_batches(self.cfg.first_seed, self.cfg.num_samples, self.cfg.batch_size, done)


def finalise_manifest(run_dir: str, manifest: dict, wanted: set[int]) -> dict:
    scan = scan_shards(run_dir)
    ids = scan.sample_ids
    if len(ids) != len(set(ids.tolist())):
        dup = sorted({int(i) for i in ids if (ids == i).sum() > 1})[:5]
        raise DatasetError(f"samples {dup} appear in more than one shard of {samples_dir(run_dir)}; remove the "
                           f"older shard(s) by hand")
    have = set(ids.tolist())
    manifest = {**manifest, "shards": [p.name for p in sorted(scan.valid)], "num_samples": len(ids),
                "complete": wanted <= have}
    write_json_atomic(samples_dir(run_dir) / MANIFEST, manifest)
    return manifest


# ---------------------------------------------------------------------- the stage
def check_existing(run_dir: str, identity: dict) -> None:
    path = samples_dir(run_dir) / MANIFEST
    if not path.exists():
        return
    import json

    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise DatasetError(f"{path} is corrupt; move {samples_dir(run_dir)} away or fix the file") from None
    if old.get("identity_hash") != config_hash(identity):
        diff = _differences(old.get("identity", {}), identity)
        raise DatasetError(
            f"{samples_dir(run_dir)} holds samples made with a different configuration "
            f"({'; '.join(diff[:4]) or 'identity differs'}); use another run_dir, or delete that folder to start over"
        )


def check_disk(run_dir: str, n: int, per_sample: int) -> None:
    target = samples_dir(run_dir)
    target.mkdir(parents=True, exist_ok=True)
    need, free = n * per_sample, shutil.disk_usage(target).free
    print(f"hspace generate: {n} samples to write, about {need / 1e9:.2f} GB needed, {free / 1e9:.1f} GB free in {target}")
    if need > free:
        raise DatasetError(f"not enough disk space in {target}: the run needs about {need / 1e9:.2f} GB but only "
                           f"{free / 1e9:.2f} GB are free; free space, choose another run_dir, or lower "
                           f"generate.num_samples / use generate.h_dtype=float16")


def run_generate(cfg) -> dict:
    g = cfg.generate
    run_dir = str(cfg.run_dir)
    model = HSpaceModel.from_config(cfg.model, device="cpu")
    identity = content_identity(model, g.h_dtype, cfg.trainer.precision)
    check_existing(run_dir, identity)

    trainer_probe_rank = launching_rank()
    wanted = set(range(g.first_seed, g.first_seed + g.num_samples))
    manifest = {
        "format": FORMAT, "identity": identity, "identity_hash": config_hash(identity),
        "model": identity["model"], "h_shape_t": [model.num_steps, *model.h_shape], "h_dtype": g.h_dtype,
        "image_shape": list(model.image_shape), "config": to_dict(cfg), "config_hash": config_hash(cfg),
        "packages": package_versions(), "requested": {"first_seed": g.first_seed, "num_samples": g.num_samples},
    }
    scan = scan_shards(run_dir)
    if trainer_probe_rank == 0:
        for path, why in scan.corrupt.items():  # quarantined, then regenerated
            bad = samples_dir(run_dir) / "corrupt"
            bad.mkdir(exist_ok=True)
            shutil.move(str(path), bad / path.name)
            print(f"hspace generate: {why.split(';')[0]}; moved to {bad} and regenerating its samples", file=sys.stderr)
    todo = agreed(len(wanted - set(scan.sample_ids.tolist())))  # after rank 0 moved corrupt shards away
    if todo == 0:
        final = finalise_manifest(run_dir, manifest, wanted) if trainer_probe_rank == 0 else manifest
        print(f"hspace generate: all {g.num_samples} samples already in {samples_dir(run_dir)}")
        return final
    check_disk(run_dir, todo, bytes_per_sample(manifest["h_shape_t"], g.h_dtype, model.image_shape))
    if trainer_probe_rank == 0:
        write_json_atomic(samples_dir(run_dir) / MANIFEST, {**manifest, "shards": [p.name for p in sorted(scan.valid)],
                                                              "complete": False})
    trainer = make_trainer(cfg.trainer, [
        ShardWriter(samples_dir(run_dir) / "shards", g.h_dtype),
        ItemsProgress("generate", todo),
        AfterAllRanks(lambda: finalise_manifest(run_dir, manifest, wanted), "generate"),
    ])
    trainer.predict(GenerateModule(model, g.h_dtype), datamodule=GenerateData(run_dir, g), return_predictions=False)
    if trainer.is_global_zero:
        print(f"hspace generate: {g.num_samples} samples in {samples_dir(run_dir)}")
    return manifest
