"""The features pass of `hspace sae`: every sample through the trained SAE, then what its features are.

A ``Trainer.predict`` over the shards (dealt to the ranks): each rank adds up, for its samples,
:class:`~pipeline.methods.sae.FeatureStats` of the training and the held-out samples (FVU, L0, how often each
latent fires and how strongly) and :class:`~pipeline.methods.sae.CorrelationSums` of each sample's mean
activation of every latent (over the trained steps and positions) against its annotations, and of its projection
on every PCA direction (the trajectory at the trained steps, less the PCA mean, onto the direction there) against
the same annotations. Rank 0 merges the ranks' sums and writes, in ``<run_dir>/sae/``: ``metrics.json``,
``features.csv`` (per latent: firing rate, mean activation when firing, the annotation it correlates with most),
``correlations.csv`` (latent x annotation), ``pca_correlations.csv``, ``curves.png``, ``correlations.png``, and
``<run_dir>/directions/sae.safetensors``: for every annotation the ``sae.features_per_attribute`` latents of
largest |correlation|, as deltas (:meth:`~pipeline.formats.sae.SAEModel.delta`: the decoder vector at every
position of every trained step, scale 1 = the latent's mean activation when it fires, signed so that + raises
the annotation it is labelled with), named ``f<index>`` and labelled ``<annotation> <r>``. An annotation with a
few integer values (the toy's background class) is read as one indicator per value (``background=2``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file

from pipeline.config import to_dict
from pipeline.formats.directions import Directions, load_directions, save_directions
from pipeline.formats.identity import FOLDER_RECORD
from pipeline.formats.sae import SAEModel, sae_dir
from pipeline.formats.samples import read_manifest
from pipeline.io import save_safetensors, write_json_atomic, write_text_atomic
from pipeline.methods.sae import CorrelationSums, FeatureStats, best_features, decode, encode, per_sample_activations
from pipeline.methods.sae_plan import held_out
from pipeline.stages.lightning_utils import (
    AfterAllRanks,
    ItemModule,
    ItemsProgress,
    RankShare,
    make_trainer,
    share_cpu_threads,
)

LATENT_VALUES = 2**24  # pre-activations (examples x latents) computed at a time: 64 MiB in float32
SPLITS = ("train", "heldout")


def annotation_matrix(table: pd.DataFrame | None) -> tuple[list[str], dict[int, int], torch.Tensor]:
    """(names, sample id -> row, Y (N, A)): every numeric annotation column; one with 3 to 16 integer values
    becomes one indicator per value (``background=2``)."""
    if table is None:
        return [], {}, torch.zeros(0, 0)
    names, cols = [], []
    for c in table.columns:
        if c == "sample_id" or not pd.api.types.is_numeric_dtype(table[c]):
            continue
        v = table[c].to_numpy(dtype=float)
        values = np.unique(v[np.isfinite(v)])
        if 3 <= len(values) <= 16 and np.all(values == np.round(values)):
            for k in values:
                names.append(f"{c}={int(k)}")
                cols.append((v == k).astype(float))
        else:
            names.append(c)
            cols.append(v)
    rows = {int(i): j for j, i in enumerate(table["sample_id"])}
    return names, rows, torch.tensor(np.stack(cols, 1) if cols else np.zeros((len(table), 0)), dtype=torch.float64)


class PCAProjection:
    """Per-sample projections of h at the trained steps on each PCA direction: <h - mean, v> / |v|."""

    def __init__(self, path: Path, steps: list[int]):
        d = load_directions(path)
        self.names = list(d.names)
        v = d.directions[:, steps].flatten(1).double()  # (K, T' * D)
        self.units = v / v.norm(dim=1, keepdim=True).clamp_min(1e-30)
        self.mean = d.extras["mean"][steps].flatten().double()

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        """h at the trained steps (B, T', C, H, W) -> (B, K)."""
        return (h.flatten(1).double() - self.mean) @ self.units.T


class FeaturesModule(ItemModule):
    """predict_item: one shard -> its samples' sums (the training and held-out splits, the correlations)."""

    def __init__(self, model: SAEModel, layout, annotations: pd.DataFrame | None, pca_path: Path | None, out: Path):
        super().__init__()
        self.model, self.coder, self.layout, self.out = model, model.coder, layout, out
        self.names, self.rows, self.Y = annotation_matrix(annotations)
        self.pca = PCAProjection(pca_path, layout.steps) if pca_path is not None else None

    def setup(self, stage: str) -> None:
        share_cpu_threads(self.trainer)
        F, A = self.model.num_latents, len(self.names)
        self.stats = {s: FeatureStats.zeros(self.layout.d, F) for s in SPLITS}
        self.corr = CorrelationSums.zeros(F, A)
        self.pca_corr = CorrelationSums.zeros(len(self.pca.names), A) if self.pca is not None else None

    @torch.no_grad()
    def predict_item(self, shard: str):
        h, ids, rows = self.layout.open(Path(shard), "all")
        out = held_out(ids, self.layout.holdout)
        per_sample = len(self.layout.steps) * self.layout.per_step * self.model.num_latents
        batch = max(1, LATENT_VALUES // per_sample)
        for start in range(0, len(rows), batch):
            r = rows[start:start + batch]
            hb = self.layout.at_steps(h, r).to(self.device)  # (B, T', C, H, W)
            self.add(hb, ids[r.numpy()], out[r.numpy()])

    def add(self, h: torch.Tensor, ids: np.ndarray, out: np.ndarray) -> None:
        x = self.model.inputs(h)  # (B, T', P, d)
        B, per_sample = len(h), x.shape[1] * x.shape[2]
        flat = x.reshape(-1, x.shape[-1])
        values, indices, _ = encode(self.coder, flat, self.model.sparsity)
        recon = decode(self.coder, values, indices)
        split = torch.as_tensor(np.repeat(out, per_sample), device=flat.device)
        for name, mask in (("train", ~split), ("heldout", split)):
            if bool(mask.any()):
                self.stats[name].update(flat[mask].cpu(), recon[mask].cpu(), values[mask].cpu(),
                                        None if indices is None else indices[mask].cpu())
        sample = torch.arange(B, device=flat.device).repeat_interleave(per_sample)
        acts = per_sample_activations(values, indices, sample, B, self.model.num_latents).cpu() / per_sample
        known = [j for j, i in enumerate(ids) if int(i) in self.rows]
        if known and self.names:
            y = self.Y[[self.rows[int(ids[j])] for j in known]]
            self.corr.update(acts[known], y)
            if self.pca is not None:
                self.pca_corr.update(self.pca(h.cpu())[known], y)

    def partial(self) -> Path:
        return self.out / f"partial-{self.trainer.global_rank}-of-{self.trainer.world_size}.safetensors"

    def write_partial(self) -> None:
        tensors = {f"{s}.{i}": t for s in SPLITS for i, t in enumerate(self.stats[s].tensors())}
        tensors.update({f"corr.{i}": t for i, t in enumerate(self.corr.tensors())})
        if self.pca_corr is not None:
            tensors.update({f"pca.{i}": t for i, t in enumerate(self.pca_corr.tensors())})
        save_safetensors(tensors, self.partial())

    def merged(self) -> tuple[dict, CorrelationSums, CorrelationSums | None]:
        world = self.trainer.world_size
        parts = [load_file(str(self.out / f"partial-{r}-of-{world}.safetensors")) for r in range(world)]

        def total(prefix, n, cls):
            return cls(*(sum(p[f"{prefix}.{i}"] for p in parts) for i in range(n)))

        stats = {s: total(s, 7, FeatureStats) for s in SPLITS}
        pca = total("pca", 6, CorrelationSums) if self.pca_corr is not None else None
        for r in range(world):
            (self.out / f"partial-{r}-of-{world}.safetensors").unlink()
        return stats, total("corr", 6, CorrelationSums), pca


class ShardItems(RankShare):
    def __init__(self, shards: list[Path]):
        super().__init__()
        self.shards = [str(s) for s in shards]

    def plan(self) -> list:
        return self.shards


# ---------------------------------------------------------------------- outputs
def chosen_features(r: torch.Tensor, alive: torch.Tensor, per_attribute: int, act_sum: torch.Tensor) -> list[int]:
    """The latents of directions/sae.safetensors: each annotation's best (in annotation order, each once); without
    annotations the ``per_attribute`` latents of largest total activation."""
    if r.shape[1] == 0:
        return act_sum.masked_fill(~alive, -1).topk(min(per_attribute, int(alive.sum()))).indices.tolist()
    return list(dict.fromkeys(f for fs in best_features(r, alive, per_attribute) for f in fs))


def best_per_annotation(r: torch.Tensor, names: list[str], labels: list[str], alive: torch.Tensor | None = None) -> dict:
    """{annotation: {"feature": label of the row of largest |r|, "r": its correlation}}."""
    score = r.abs() if alive is None else r.abs().masked_fill(~alive[:, None], -1)
    out = {}
    for a, name in enumerate(names):
        if len(score):
            i = int(score[:, a].argmax())
            out[name] = {"feature": labels[i], "r": float(r[i, a])}
    return out


def write_outputs(cfg, layout, model: SAEModel, names: list[str], stats: dict, corr: CorrelationSums,
                  pca_corr: CorrelationSums | None, pca_names: list[str], record: dict) -> dict:
    """Rank 0: the metrics, tables, figures and directions file of the trained SAE; the folder's record last."""
    from evaluation.sae import correlation_heatmap, curves_plot

    run_dir, folder = Path(cfg.run_dir), sae_dir(cfg.run_dir)
    train = stats["train"]
    alive = train.fires > 0
    r = corr.correlation() if names else torch.zeros(model.num_latents, 0)
    F = model.num_latents
    mean_act = (train.act_sum / train.fires.clamp_min(1)).float()
    features = pd.DataFrame({"feature": [f"f{i}" for i in range(F)], "firing_rate": (train.fires / train.count).numpy(),
                             "mean_activation": mean_act.numpy()})
    if names:
        best = r.abs().argmax(1)
        features["annotation"] = [names[int(a)] for a in best]
        features["r"] = r[torch.arange(F), best].numpy()
        write_text_atomic(folder / "correlations.csv", pd.DataFrame(r.numpy(), columns=names)
                          .assign(feature=features.feature)[["feature", *names]].to_csv(index=False))
    write_text_atomic(folder / "features.csv", features.to_csv(index=False))
    metrics = {"feed": model.feed, "steps": model.steps, "num_latents": F, "sparsity": model.sparsity,
               "k": (model.info or {}).get("k"), "train": train.summary(), "heldout": stats["heldout"].summary(),
               "dead": int((~alive).sum()), "dead_fraction": float((~alive).double().mean()),
               "best_feature": best_per_annotation(r, names, list(features.feature), alive)}
    if pca_corr is not None and names:
        pr = pca_corr.correlation()
        write_text_atomic(folder / "pca_correlations.csv", pd.DataFrame(pr.numpy(), columns=names)
                          .assign(component=pca_names)[["component", *names]].to_csv(index=False))
        metrics["best_pca_component"] = best_per_annotation(pr, names, pca_names)
    chosen = chosen_features(r, alive, cfg.sae.features_per_attribute, train.act_sum)
    write_directions(run_dir, cfg, model, chosen, r, names, mean_act, train, record)
    write_json_atomic(folder / "metrics.json", metrics)
    curves = folder / "curves.csv"
    if curves.exists():
        curves_plot(pd.read_csv(curves), folder / "curves.png")
    if names and chosen:
        correlation_heatmap(r[chosen].numpy(), [f"f{i}" for i in chosen], names, folder / "correlations.png")
    write_json_atomic(folder / FOLDER_RECORD, record)
    return metrics


def write_directions(run_dir: Path, cfg, model: SAEModel, chosen: list[int], r: torch.Tensor, names: list[str],
                     mean_act: torch.Tensor, train: FeatureStats, record: dict) -> Path:
    manifest = read_manifest(run_dir)
    labels, info, deltas = {}, [], []
    for i, f in enumerate(chosen):
        entry = {"index": f, "firing_rate": float(train.fires[f] / train.count), "mean_activation": float(mean_act[f]),
                 "sign": 1}
        if names:
            a = int(r[f].abs().argmax())
            entry.update({"annotation": names[a], "r": float(r[f, a]), "sign": 1 if r[f, a] >= 0 else -1,
                          "correlations": {n: float(v) for n, v in zip(names, r[f])}})
            labels[i] = f"{names[a]} {float(r[f, a]):+.2f}"
        info.append(entry)
        deltas.append(model.delta(f, entry["sign"] * float(mean_act[f])))
    T = model.T
    dirs = torch.stack(deltas) if deltas else torch.zeros(0, T, *model.h_shape)
    d = Directions(dirs, [f"f{f}" for f in chosen], f"sae/{model.feed}", manifest["model"]["timesteps"],
                   model=manifest["model"]["name_or_path"], source_run=str(run_dir.resolve()),
                   params={**to_dict(cfg.sae), "features": info, "trained_steps": model.steps,
                           "positions": "everywhere", "scales": [-2.0, -1.0, 0.0, 1.0, 2.0],
                           "scale_unit": "the feature's mean activation when it fires, at every position of every "
                                         "trained step; signed so that + raises the annotation it is labelled with"},
                   labels=labels)
    return save_directions(d, run_dir / "directions" / "sae.safetensors", record)


def write_features(cfg, layout, model: SAEModel, record: dict) -> Path:
    """The features pass on every rank; rank 0 writes the outputs."""
    from pipeline.stages.annotate import annotations_path, load_annotations

    run_dir = Path(cfg.run_dir)
    annotations = load_annotations(run_dir) if annotations_path(run_dir).exists() else None
    pca_path = run_dir / "directions" / "pca.safetensors"
    module = FeaturesModule(model, layout, annotations, pca_path if pca_path.exists() else None, sae_dir(run_dir))
    result = {}

    def merge():
        stats, corr, pca = module.merged()
        result.update(write_outputs(cfg, layout, model, module.names, stats, corr, pca,
                                    module.pca.names if module.pca is not None else [], record))

    trainer = make_trainer(cfg.trainer, [ItemsProgress("sae features", len(layout.shards), count=lambda item: 1,
                                                       unit="shards"),
                                         AfterAllRanks(merge, "sae", part=module.write_partial)])
    trainer.predict(module, datamodule=ShardItems(layout.shards), return_predictions=False)
    out = run_dir / "directions" / "sae.safetensors"
    if trainer.is_global_zero:
        m = result
        held = m["heldout"] if m["heldout"]["examples"] else m["train"]
        split = "held-out" if m["heldout"]["examples"] else "training"
        print(f"hspace sae: {m['num_latents']} latents ({m['feed']}, {len(m['steps'])} steps): FVU {held['fvu']:.3f} and "
              f"L0 {held['l0']:.1f} on the {split} samples, {m['dead']} dead")
        for name, b in m["best_feature"].items():
            print(f"  {name}: {b['feature']} r={b['r']:+.2f}")
        print(f"hspace sae: -> {sae_dir(run_dir)}, {out}")
    return out

