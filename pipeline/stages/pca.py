"""`hspace pca`: per-step (or joint) PCA of the samples' h, streamed, on any number of processes.

Each rank folds the shards dealt to it into a :class:`StreamingPCA` (memory O(q x T x D),
never O(N)), saves its partial state to ``<run_dir>/pca/partial-<rank>-of-<world>.safetensors``
and, after a barrier, rank 0 merges the partial states with the same update as the batches
and writes ``<run_dir>/directions/pca.safetensors``: direction k at step t = std_{k,t} u_{k,t}
(scale 1 = one standard deviation, as in the original code), signs aligned across steps so
"+" means the same at every step, with the explained variance per step and, as the Fig. 6
baseline, random directions with the same per-step norms (extra ``random_directions``).
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..config import to_dict
from ..dtypes import torch_dtype
from ..directions import Directions, save_directions
from ..io import atomic_path
from ..pca import StreamingPCA, pca_directions, random_directions_like
from ..samples import h_view, open_shard, read_manifest, shard_paths
from ..signs import align_signs
from .lightning_utils import ItemModule, ItemsProgress, RankShare, make_trainer, share_cpu_threads


def partial_path(run_dir, rank: int, world: int) -> Path:
    return Path(run_dir) / "pca" / f"partial-{rank}-of-{world}.safetensors"


def new_estimator(pca_cfg) -> StreamingPCA:
    return StreamingPCA(pca_cfg.n_components, oversample=pca_cfg.oversample, joint=pca_cfg.joint,
                        dtype=torch_dtype(pca_cfg.dtype))


def fit_shards(pca: StreamingPCA, shards: list[Path], batch_size: int, h_shape_t, h_dtype: str) -> StreamingPCA:
    """Fold the h of the given shards into ``pca``, batch by batch (zero-copy reads)."""
    for shard in shards:
        table = open_shard(shard)
        for start in range(0, table.num_rows, batch_size):
            pca.partial_fit(h_view(table.slice(start, batch_size).column("h"), h_shape_t, h_dtype))
    return pca


class PCAModule(ItemModule):
    """predict_item: one shard -> folded into this rank's estimator; saved at the end."""

    def __init__(self, run_dir, pca_cfg):
        super().__init__()
        self.run_dir, self.cfg = run_dir, pca_cfg

    def setup(self, stage: str) -> None:
        share_cpu_threads(self.trainer)
        self.pca = new_estimator(self.cfg)
        manifest = read_manifest(self.run_dir)
        self.h_shape_t, self.h_dtype = manifest["h_shape_t"], manifest["h_dtype"]

    def predict_item(self, shard: str):
        fit_shards(self.pca, [Path(shard)], self.cfg.batch_size, self.h_shape_t, self.h_dtype)
        return None

    def on_predict_end(self) -> None:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        path = partial_path(self.run_dir, rank, world)
        with atomic_path(path) as tmp:
            save_file({k: v.contiguous().cpu() for k, v in self.pca.state_dict().items()}, str(tmp))
        self.trainer.strategy.barrier("hspace-pca-partials")
        if self.trainer.is_global_zero:
            merged = new_estimator(self.cfg)
            for r in range(world):
                merged.merge(StreamingPCA.from_state_dict(load_file(str(partial_path(self.run_dir, r, world)))))
            write_directions(self.run_dir, self.cfg, merged)
        self.trainer.strategy.barrier("hspace-pca-written")


class ShardData(RankShare):
    def __init__(self, run_dir):
        super().__init__()
        self.run_dir = run_dir

    def plan(self) -> list:
        return [str(p) for p in shard_paths(self.run_dir)]


def write_directions(run_dir, pca_cfg, pca: StreamingPCA) -> Path:
    manifest = read_manifest(run_dir)
    T, C, H, W = manifest["h_shape_t"]
    comps = align_signs(pca.components_, method=pca_cfg.align) if not pca_cfg.joint else pca.components_
    dirs = pca_directions(comps, pca.explained_variance_).float().reshape(-1, T, C, H, W)
    g = torch.Generator().manual_seed(pca_cfg.seed)
    random = random_directions_like(dirs, generator=g).float()
    K = len(dirs)
    extras = {"explained_variance": pca.explained_variance_.float(),
              "explained_variance_ratio": pca.explained_variance_ratio_.float(),
              "singular_values": pca.singular_values_.float(), "mean": pca.mean_.float().reshape(-1, C, H, W),
              "random_directions": random}
    result = Directions(dirs, [f"pc{k + 1}" for k in range(K)], "pca/joint" if pca_cfg.joint else "pca/per-step",
                        manifest["model"]["timesteps"], model=manifest["model"]["name_or_path"],
                        source_run=str(Path(run_dir).resolve()),
                        params={**to_dict(pca_cfg), "n_samples": pca.n_samples_seen_, "scales": list(pca_cfg.scales),
                                "scale_unit": "standard deviations along the component"},
                        extras=extras)
    out = save_directions(result, Path(run_dir) / "directions" / "pca.safetensors")
    from ..figures import explained_variance_plot

    ratio = pca.explained_variance_ratio_.float().numpy()
    if not pca_cfg.joint:
        explained_variance_plot(ratio, manifest["model"]["timesteps"], Path(run_dir) / "directions" / "explained_variance.png")
    return out


def run_pca(cfg) -> Path:
    run_dir = Path(cfg.run_dir)
    shards = shard_paths(run_dir)
    n = read_manifest(run_dir)["num_samples"]
    trainer = make_trainer(cfg.trainer, [ItemsProgress("pca", len(shards), count=lambda item: 1, unit="shards")],
                           inference_mode=False)
    with torch.no_grad():
        trainer.predict(PCAModule(str(run_dir), cfg.pca), datamodule=ShardData(str(run_dir)), return_predictions=False)
    out = run_dir / "directions" / "pca.safetensors"
    if trainer.is_global_zero:
        print(f"hspace pca: {cfg.pca.n_components} components of {n} samples "
              f"({'joint' if cfg.pca.joint else 'per step'}) -> {out}")
    return out
