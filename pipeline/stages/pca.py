"""`hspace pca`: per-step (or joint) PCA of the samples' h on any number of processes.

``pca.method`` (see :mod:`pipeline.methods.pca`), resolved from the number of samples when ``auto``:

- ``exact``: the ranks share the steps (rank r takes steps r, r + world, ...; joint PCA runs on
  rank 0), each reads those steps of every shard and takes their Gram-matrix PCA.
- ``randomized``: one ``Trainer.predict`` per pass; each rank streams the shards dealt to it,
  multiplying the pass's basis by the scatter of its samples (:func:`~pipeline.methods.pca.moments_update`);
  rank 0 merges the partial sums (exact), takes the Rayleigh-Ritz step and writes the next basis
  (``<run_dir>/pca/basis.safetensors``), and tells the other ranks whether another pass follows,
  until the estimated principal angle is below ``pca.tol``;
  if ``pca.power_iterations`` run out first, every rank stops with a ConvergenceError and nothing
  is written.
- ``onepass``: each rank folds its shards into a :class:`~pipeline.methods.pca.StreamingPCA`; rank 0
  merges the partial states.

At the end of each pass the ranks meet in the shared
:class:`~pipeline.stages.lightning_utils.AfterAllRanks` callback (as the other distributed stages
do): each writes its partial result to ``<run_dir>/pca/partial-<rank>-of-<world>.safetensors``,
rank 0 merges them. Rank 0 writes
``<run_dir>/directions/pca.safetensors``: direction k at step t = std_{k,t} u_{k,t} (scale 1 = one
standard deviation, as in the original code), signs aligned across steps so "+" means the same at
every step, with the explained variance per step, the method, its passes and estimated principal
angle per step (extra ``angle_bound``) and, as the Fig. 6 baseline, random directions with the
same per-step norms (extra ``random_directions``).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import load_file

from pipeline.config import to_dict
from pipeline.dtypes import torch_dtype
from pipeline.errors import ConvergenceError
from pipeline.formats.directions import Directions, save_directions
from pipeline.formats.samples import h_layout, h_view, open_shard, read_manifest, shard_paths
from pipeline.io import save_safetensors
from pipeline.methods.pca import (
    PCA,
    Moments,
    PCAState,
    StreamingPCA,
    SubspaceIteration,
    gaussian_sketch,
    gram_pca,
    merge_moments,
    moments_update,
    pca_directions,
    random_directions_like,
    resolve_method,
)
from pipeline.methods.signs import align_signs
from pipeline.registry import COMMANDS
from pipeline.stages.lightning_utils import (
    IDLE,
    AfterAllRanks,
    ItemModule,
    ItemsProgress,
    RankShare,
    agreed,
    make_trainer,
    share_cpu_threads,
)

CHUNK = 64  # samples cast to the compute dtype at a time


def partial_path(run_dir, rank: int, world: int) -> Path:
    return Path(run_dir) / "pca" / f"partial-{rank}-of-{world}.safetensors"


def basis_path(run_dir) -> Path:
    return Path(run_dir) / "pca" / "basis.safetensors"


def new_estimator(pca_cfg) -> StreamingPCA:
    """The one-pass estimator each rank fills (method onepass)."""
    return StreamingPCA(pca_cfg.n_components, oversample=pca_cfg.oversample, joint=pca_cfg.joint,
                        dtype=torch_dtype(pca_cfg.dtype))


def estimator_params(pca_cfg) -> dict:
    """:class:`~pipeline.methods.pca.PCA` parameters of the ``pca`` section."""
    return dict(n_components=pca_cfg.n_components, method=pca_cfg.method, oversample=pca_cfg.oversample,
                power_iterations=pca_cfg.power_iterations, tol=pca_cfg.tol,
                exact_max_samples=pca_cfg.exact_max_samples, joint=pca_cfg.joint, seed=pca_cfg.seed,
                dtype=torch_dtype(pca_cfg.dtype))


def shard_batches(shards: list[Path], batch_size: int, h_shape_t, h_dtype: str):
    """h of the given shards, (B, T', *h_shape) batches (h_shape_t: as stored; zero-copy, read-only views)."""
    for shard in shards:
        table = open_shard(shard)
        for start in range(0, table.num_rows, batch_size):
            yield h_view(table.slice(start, batch_size).column("h"), h_shape_t, h_dtype)


def fit_shards(pca: StreamingPCA, shards: list[Path], batch_size: int, h_shape_t, h_dtype: str) -> StreamingPCA:
    """Fold the h of the given shards into ``pca``, batch by batch (zero-copy reads)."""
    for h in shard_batches(shards, batch_size, h_shape_t, h_dtype):
        pca.partial_fit(h)
    return pca


def state_tensors(st: PCAState, **extra: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"n": torch.tensor(st.n), "mean": st.mean, "S": st.S, "V": st.V, "ss": st.ss, **extra}


class _PCAModule(ItemModule):
    """One rank's share of a pass over the shards. When every rank has finished the pass
    (:meth:`after_all_ranks`, the shared :class:`AfterAllRanks`), each writes its partial result
    (``write_partial``), rank 0 merges them (``merge``), then every rank learns whether another
    pass follows (``next_pass``)."""

    def __init__(self, run_dir, pca_cfg, record: dict | None = None):
        super().__init__()
        self.run_dir, self.cfg, self.record = str(run_dir), pca_cfg, record

    def after_all_ranks(self) -> AfterAllRanks:
        return AfterAllRanks(self.merge, "pca", part=self.write_partial, then=self.next_pass)

    def setup(self, stage: str) -> None:
        share_cpu_threads(self.trainer)
        layout = h_layout(read_manifest(self.run_dir))  # the PCA of the recorded steps (T' of them)
        self.h_shape_t, self.h_dtype = layout.stored, layout.dtype
        self.T, self.D = self.h_shape_t[0], math.prod(self.h_shape_t[1:])

    def batches(self, shard: str):
        return shard_batches([Path(shard)], self.cfg.batch_size, self.h_shape_t, self.h_dtype)

    @property
    def partial(self) -> Path:
        return partial_path(self.run_dir, self.trainer.global_rank, self.trainer.world_size)

    def partials(self, ranks: int | None = None):
        for r in range(self.trainer.world_size if ranks is None else ranks):
            yield load_file(str(partial_path(self.run_dir, r, self.trainer.world_size)))

    def write_partial(self) -> None:
        raise NotImplementedError

    def merge(self) -> None:
        raise NotImplementedError

    def next_pass(self) -> None:
        """One pass is all (the randomized method decides after each)."""


class OnePassModule(_PCAModule):
    """predict_item: one shard -> folded into this rank's StreamingPCA; rank 0 merges the states."""

    def setup(self, stage: str) -> None:
        super().setup(stage)
        self.pca = new_estimator(self.cfg)

    def predict_item(self, shard: str):
        for h in self.batches(shard):
            self.pca.partial_fit(h)

    def write_partial(self) -> None:
        save_safetensors(self.pca.state_dict(), self.partial)

    def merge(self) -> None:
        merged = new_estimator(self.cfg)
        for d in self.partials():
            merged.merge(StreamingPCA.from_state_dict(d))
        result = PCA.from_state(merged.state, merged.n_steps_, merged.feature_shape_, method_used="onepass",
                                n_passes=1, angle_bound=float("nan"), converged=True, **estimator_params(self.cfg))
        write_directions(self.run_dir, self.cfg, result, self.record)


class ExactModule(_PCAModule):
    """predict_item: one shard -> this rank's steps of its h, held in the stored dtype; at the end
    each rank takes the Gram-matrix PCA of its steps and rank 0 assembles them (joint: rank 0 alone)."""

    def setup(self, stage: str) -> None:
        super().setup(stage)
        rank, world = self.trainer.global_rank, self.trainer.world_size
        self.steps = (list(range(self.T)) if rank == 0 else []) if self.cfg.joint else list(range(self.T))[rank::world]
        self.held: list[torch.Tensor] = []

    def predict_item(self, shard: str):
        if self.steps:
            for h in self.batches(shard):
                self.held.append(h[:, self.steps].reshape(len(h), len(self.steps), -1).clone())

    def write_partial(self) -> None:
        if self.steps:
            X = torch.cat(self.held)
            self.held = []
            if self.cfg.joint:
                X = X.reshape(len(X), 1, -1)
            st = gram_pca(X, self.cfg.n_components, dtype=torch_dtype(self.cfg.dtype))
            save_safetensors(state_tensors(st, steps=torch.tensor(self.steps)), self.partial)

    def merge(self) -> None:
        parts = list(self.partials(1 if self.cfg.joint else min(self.T, self.trainer.world_size)))
        order = torch.cat([d["steps"] for d in parts]).argsort() if not self.cfg.joint else torch.tensor([0])
        cat = {k: torch.cat([d[k] for d in parts])[order] for k in ("mean", "S", "V", "ss")}
        st = PCAState(int(parts[0]["n"]), cat["mean"], cat["S"], cat["V"], cat["ss"])
        result = PCA.from_state(st, self.T, tuple(self.h_shape_t[1:]), method_used="exact", n_passes=1,
                                angle_bound=0.0, converged=True, **estimator_params(self.cfg))
        write_directions(self.run_dir, self.cfg, result, self.record)


class RandomizedModule(_PCAModule):
    """One pass of the randomized method per ``Trainer.predict``: predict_item folds one shard into
    this rank's :class:`~pipeline.methods.pca.Moments`; rank 0 merges them, steps its
    :class:`~pipeline.methods.pca.SubspaceIteration` and writes the next basis (or the directions)."""

    def __init__(self, run_dir, pca_cfg, record: dict | None = None):
        super().__init__(run_dir, pca_cfg, record)
        self.passes, self.done, self.iteration, self.status = 0, False, None, None

    def setup(self, stage: str) -> None:
        super().setup(stage)
        Tp, Dp = (1, self.T * self.D) if self.cfg.joint else (self.T, self.D)
        k = self.cfg.n_components
        over = k if self.cfg.oversample is None else self.cfg.oversample
        if self.passes > 0:
            self.basis = load_file(str(basis_path(self.run_dir)))["basis"]
        elif self.trainer.is_global_zero:
            self.iteration = SubspaceIteration(Tp, Dp, k, k + over, tol=self.cfg.tol,
                                               max_passes=self.cfg.power_iterations + 2, seed=self.cfg.seed,
                                               dtype=torch_dtype(self.cfg.dtype))
            self.basis = self.iteration.basis
        else:  # the same Gaussian sketch as rank 0's (seeded CPU generator)
            self.basis = gaussian_sketch(Tp, min(k + over, Dp), Dp, self.cfg.seed, torch_dtype(self.cfg.dtype))
        self.acc: Moments | None = None

    def predict_item(self, shard: str):
        for h in self.batches(shard):
            h = h.reshape(len(h), 1 if self.cfg.joint else self.T, -1)
            for chunk in h.split(CHUNK):
                self.acc = moments_update(self.acc, chunk, self.basis)

    def write_partial(self) -> None:
        self.passes += 1
        if self.acc is not None:
            save_safetensors({"n": torch.tensor(self.acc.n), "mean": self.acc.mean, "ss": self.acc.ss, "Z": self.acc.Z},
                         self.partial)
        elif self.partial.exists():
            self.partial.unlink()

    def merge(self) -> None:
        merged = None
        for r in range(self.trainer.world_size):
            path = partial_path(self.run_dir, r, self.trainer.world_size)
            if path.exists():
                d = load_file(str(path))
                m = Moments(int(d["n"]), d["mean"], d["ss"], d["Z"])
                merged = m if merged is None else merge_moments(merged, m, self.basis, inplace=True)
        it = self.iteration
        it.update(merged)
        if not it.done:
            save_safetensors({"basis": it.basis}, basis_path(self.run_dir))
        elif it.converged:
            result = PCA.from_state(it.state(), self.T, tuple(self.h_shape_t[1:]), method_used="randomized",
                                    n_passes=it.passes, angle_bound=it.angle, converged=True,
                                    **estimator_params(self.cfg))
            write_directions(self.run_dir, self.cfg, result, self.record)
        self.status = (it.done, str(it.error()) if it.done and not it.converged else None)

    def next_pass(self) -> None:
        self.done, error = agreed(self.status)  # rank 0's decision on every rank
        if error:
            raise ConvergenceError(error)


class ShardData(RankShare):
    def __init__(self, run_dir, every_rank: bool = False):
        super().__init__()
        self.run_dir, self.every_rank = run_dir, every_rank

    def plan(self) -> list:
        return [str(p) for p in shard_paths(self.run_dir)]

    def setup(self, stage: str) -> None:
        if self.every_rank:  # the exact method: every rank reads its steps of every shard
            self.items = self.plan() or [IDLE]
        else:
            super().setup(stage)


def write_directions(run_dir, pca_cfg, pca: PCA, record: dict | None = None) -> Path:
    """The directions file of a PCA of the recorded steps: every step's tensors at their place in T, zero
    (no edit, no variance) at the steps the samples did not record."""
    manifest = read_manifest(run_dir)
    layout = h_layout(manifest)
    comps = align_signs(pca.components_, method=pca_cfg.align) if not pca_cfg.joint else pca.components_
    dirs = layout.scatter(pca_directions(comps, pca.explained_variance_).float().reshape(-1, *layout.stored))
    g = torch.Generator().manual_seed(pca_cfg.seed)
    random = random_directions_like(dirs, generator=g).float()
    K = len(dirs)
    per_step = (lambda t: t) if pca_cfg.joint else (lambda t: layout.scatter(t, axis=0))
    extras = {"explained_variance": per_step(pca.explained_variance_.float()),
              "explained_variance_ratio": per_step(pca.explained_variance_ratio_.float()),
              "singular_values": per_step(pca.singular_values_.float()),
              "mean": layout.scatter(pca.mean_.float().reshape(-1, *layout.shape), axis=0),
              "angle_bound": per_step(pca.angle_bound_.float()), "random_directions": random}
    result = Directions(dirs, [f"pc{k + 1}" for k in range(K)], "pca/joint" if pca_cfg.joint else "pca/per-step",
                        manifest["model"]["timesteps"], model=manifest["model"]["name_or_path"],
                        source_run=str(Path(run_dir).resolve()),
                        params={**to_dict(pca_cfg), "method_used": pca.method_, "n_passes": pca.n_passes_,
                                "n_samples": pca.n_samples_seen_, "scales": list(pca_cfg.scales),
                                "scale_unit": "standard deviations along the component"},
                        extras=extras)
    out = save_directions(result, Path(run_dir) / "directions" / "pca.safetensors", record)
    from pipeline.formats.figures import explained_variance_plot

    ratio = pca.explained_variance_ratio_.float().numpy()
    if not pca_cfg.joint:
        timesteps = [manifest["model"]["timesteps"][i] for i in layout.steps]
        explained_variance_plot(ratio, timesteps, Path(run_dir) / "directions" / "explained_variance.png")
    return out


def run_pca(cfg) -> Path:
    run_dir = Path(cfg.run_dir)
    shards = shard_paths(run_dir)
    record = COMMANDS["pca"].identity(cfg)
    n = read_manifest(run_dir)["num_samples"]
    method = resolve_method(cfg.pca.method, n, cfg.pca.exact_max_samples)
    module = {"exact": ExactModule, "randomized": RandomizedModule, "onepass": OnePassModule}[method](
        run_dir, cfg.pca, record)
    trainer = make_trainer(cfg.trainer, [ItemsProgress(f"pca ({method})", len(shards), count=lambda item: 1,
                                                       unit="shards"), module.after_all_ranks()], inference_mode=False)
    with torch.no_grad():
        while True:
            trainer.predict(module, datamodule=ShardData(str(run_dir), every_rank=method == "exact"),
                            return_predictions=False)
            if method != "randomized" or module.done:
                break
    out = run_dir / "directions" / "pca.safetensors"
    if trainer.is_global_zero:
        passes = f", {module.passes} passes" if method == "randomized" else ""
        print(f"hspace pca: {cfg.pca.n_components} components of {n} samples "
              f"({'joint' if cfg.pca.joint else 'per step'}, {method}{passes}) -> {out}")
    return out
