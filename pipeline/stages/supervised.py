"""`hspace supervised`: directions from annotated samples (eq. 10), and from real images.

Reads ``selection.parquet`` (top/bottom samples per attribute) and their recorded h, and
writes ``<run_dir>/directions/supervised.safetensors``: per attribute, mean h of the top
minus mean h of the bottom samples at every step (unnormalised, as in the paper; edit scales
around +-1). Also stored in that file: the same directions in x_T space (``x_T_directions``,
the Fig. 8 baseline), and with ``supervised.method=logistic`` a logistic-regression normal
instead of the mean difference (held-out accuracy reported). ``convergence.csv`` and
``convergence.png`` show how the direction converges with n, in h-space and in x_T-space.

With ``supervised.restrict_steps`` each direction is set to zero at the steps where the probe
stage (``probes/probes.csv``) finds its attribute not encoded in h; the whole-trajectory
directions stay in the file as ``unrestricted_directions`` and the step masks in its params.

Their calibrated strengths are measured by the calibrate stage (pipeline.stages.calibrate).

With ``supervised.real.positive_dir`` / ``negative_dir`` it also writes ``real.safetensors``:
the direction between two folders of real images, through DDIM inversion (the paper's BU3DFE
experiment), paired by file name when ``supervised.real.paired`` is true.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.engine import noise
from pipeline.engine.model import HSpaceModel
from pipeline.errors import ConfigError, DatasetError, InputError
from pipeline.formats.directions import Directions, save_directions
from pipeline.formats.images import from_uint8, load_image
from pipeline.formats.samples import h_layout, iter_samples, read_manifest
from pipeline.io import atomic_path
from pipeline.methods.supervised import convergence_curve, logistic_direction, mean_difference, paired_difference
from pipeline.registry import COMMANDS
from pipeline.stages.select import load_selection


def gather_h(run_dir, ids) -> dict[int, torch.Tensor]:
    """sample_id -> h (T, *h_shape), copied out of the memory map (float16 stays float16); zero at the steps
    the samples did not record (``generate.h_steps``), so directions made from it edit nothing there."""
    out, layout = {}, h_layout(read_manifest(run_dir))
    for b in iter_samples(run_dir, batch_size=256, ids=ids):
        out.update({int(i): h for i, h in zip(b["sample_id"], layout.scatter(b["h"].clone()))})
    missing = set(map(int, ids)) - set(out)
    if missing:
        raise DatasetError(f"samples {sorted(missing)[:5]} are selected but not in the samples dataset")
    return out


def restrict(directions: Directions, probes: pd.DataFrame) -> Directions:
    """The directions zeroed at the steps where the probes find their attribute not encoded; the
    unrestricted ones kept as the extra ``unrestricted_directions``, the masks in ``params``."""
    from pipeline.methods.probes import restrict_to_steps
    from pipeline.stages.probe import encoded_mask

    T = directions.directions.shape[1]
    masks = {name: encoded_mask(probes, name, T) for name in directions.names}
    for name, mask in masks.items():
        if not mask.any():  # no step reads the attribute better than chance: nothing to restrict to
            print(f"hspace supervised: warning: the probe finds {name!r} encoded at no step; kept at every step",
                  file=sys.stderr)
            masks[name] = np.ones(T, bool)
    restricted = torch.stack([restrict_to_steps(v, masks[n]) for n, v in zip(directions.names, directions.directions)])
    return dataclasses.replace(
        directions, directions=restricted,
        params={**directions.params, "restricted_steps": {n: np.flatnonzero(m).tolist() for n, m in masks.items()}},
        extras={**directions.extras, "unrestricted_directions": directions.directions})


def gather_x_T(run_dir, ids) -> dict[int, torch.Tensor]:
    """sample_id -> x_T of the generated samples ``ids`` (sample_id == seed), from their seeds."""
    manifest = read_manifest(run_dir)
    ids = sorted(set(map(int, ids)))
    return dict(zip(ids, noise.randn(ids, "x_T", manifest.get("latent_shape", manifest["image_shape"]))))


def sides(selection: pd.DataFrame, attribute: str) -> tuple[list[int], list[int]]:
    """The top and the bottom sample ids of one attribute in the selection, by rank."""
    sel = selection[selection.attribute == attribute]
    top = sel[sel.side == "top"].sort_values("rank").sample_id.astype(int).tolist()
    return top, sel[sel.side == "bottom"].sort_values("rank").sample_id.astype(int).tolist()


def check_ns(key: str, ns, selection: pd.DataFrame, attributes) -> None:
    """Some n of ``ns`` (config key ``key``: n per side, those above the selection's size left out) fits
    every attribute's selection; else a ConfigError before any work."""
    per_side = min(min(map(len, sides(selection, a))) for a in attributes)
    if min(ns) > per_side:
        raise ConfigError(f"{key}={list(ns)}: every n is above the {per_side} selected samples per side; give at least "
                          f"one n <= {per_side} (or raise select.n)")


def supervised_directions(run_dir, sup_cfg) -> tuple[Directions, pd.DataFrame]:
    selection = load_selection(run_dir)
    attributes = list(sup_cfg.attributes) or list(dict.fromkeys(selection.attribute))
    unknown = set(attributes) - set(selection.attribute)
    if unknown:
        raise ConfigError(f"supervised.attributes {sorted(unknown)} are not in selection.parquet "
                          f"(selected: {sorted(set(selection.attribute))}); add them to select.attributes")
    check_ns("supervised.convergence_ns", sup_cfg.convergence_ns, selection, attributes)
    h = gather_h(run_dir, sorted(set(selection.sample_id)))
    manifest = read_manifest(run_dir)
    x_T = gather_x_T(run_dir, selection.sample_id)
    directions, x_dirs, info, curves = [], [], {}, []
    for attr in attributes:
        top, bottom = sides(selection, attr)
        pos, neg = torch.stack([h[i] for i in top]), torch.stack([h[i] for i in bottom])
        xpos, xneg = torch.stack([x_T[i] for i in top]), torch.stack([x_T[i] for i in bottom])
        d = mean_difference(pos, neg)
        if sup_cfg.method == "logistic":
            X = torch.cat([pos, neg]).flatten(1).float().numpy()
            y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
            w, acc, acc_std = logistic_direction(X, y, seed=sup_cfg.seed)
            w = torch.from_numpy(w).view_as(d)
            d = w * float((d.flatten() @ w.flatten()))  # the class-mean gap along the normal
            info[attr] = {"cv_accuracy": acc, "cv_accuracy_std": acc_std}
        directions.append(d)
        x_dirs.append(mean_difference(xpos, xneg))
        ns = [n for n in sup_cfg.convergence_ns if n <= len(top)]
        for space, (p, q) in (("h", (pos.flatten(1), neg.flatten(1))), ("x_T", (xpos.flatten(1), xneg.flatten(1)))):
            curves += [{"attribute": attr, "space": space, **row}
                       for row in convergence_curve(p, q, ns, draws=sup_cfg.convergence_draws, seed=sup_cfg.seed)]
    result = Directions(
        torch.stack(directions), attributes, f"supervised/{sup_cfg.method}", manifest["model"]["timesteps"],
        model=manifest["model"]["name_or_path"], source_run=str(Path(run_dir).resolve()),
        params={"n": int(selection.groupby("attribute").size().max() // 2), "method": sup_cfg.method, "per_attribute": info,
                "scales": list(sup_cfg.scales)},
        extras={"x_T_directions": torch.stack(x_dirs)},
    )
    return result, pd.DataFrame(curves)


def plot_convergence(curves: pd.DataFrame, out: Path) -> Path:
    """Cosine of the direction of n samples per side to the whole selection's, against n, in h and x_T space."""
    from pipeline.formats.figures import curves_by_attribute

    return curves_by_attribute(curves, "cosine_mean", out, yerr="cosine_std", ylabel="cosine to the full direction")


# ---------------------------------------------------------------------- real images
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def load_image_folder(folder, size: tuple[int, int]) -> tuple[list[str], torch.Tensor]:
    """Images of a folder (sorted by name), centre-cropped to square and resized: (n, 3, H, W) in [-1, 1]."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"supervised.real: image folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DatasetError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    arrays, resized = [], 0
    for p in files:
        try:
            array, own_size = load_image(p, size)
        except InputError as e:
            raise DatasetError(f"{e}; remove it from {folder} or replace it") from None
        resized += own_size != tuple(size[::-1])
        arrays.append(array)
    if resized:
        print(f"hspace supervised: warning: {resized} of {len(files)} images in {folder} are not "
              f"{size[1]}x{size[0]}; centre-cropped to square and resized to the model's size", file=sys.stderr)
    return [p.stem for p in files], from_uint8(np.stack(arrays))


def real_image_direction(model: HSpaceModel, positive_dir, negative_dir, paired: bool = False,
                         batch_size: int = 32, fixed_point_iterations: int = 1) -> tuple[torch.Tensor, dict]:
    """Direction from two folders of real images via DDIM inversion, recording h on the way."""
    size = model.image_shape[1:]
    names_p, pos = load_image_folder(positive_dir, size)
    names_n, neg = load_image_folder(negative_dir, size)

    def invert(x):
        return torch.cat([model.invert(x[i:i + batch_size], fixed_point_iterations).h.cpu()
                          for i in range(0, len(x), batch_size)])

    hp, hn = invert(pos), invert(neg)
    if paired:
        common = sorted(set(names_p) & set(names_n))
        if not common:
            raise ConfigError(f"supervised.real.paired: no file names in common between {positive_dir} and {negative_dir}")
        ip, ineg = [names_p.index(c) for c in common], [names_n.index(c) for c in common]
        return paired_difference(hp[ip], hn[ineg]), {"pairs": len(common)}
    return mean_difference(hp, hn), {"positives": len(names_p), "negatives": len(names_n)}


def real_directions(cfg, run_dir: Path) -> Directions | None:
    """The direction between the two folders of real images (``supervised.real``), None without them."""
    real = cfg.supervised.real
    if not real.positive_dir:  # the schema requires negative_dir with it
        return None
    model = HSpaceModel.from_config(cfg)
    d, info = real_image_direction(model, real.positive_dir, real.negative_dir, real.paired,
                                   fixed_point_iterations=real.fixed_point_iterations)
    print(f"hspace supervised: real-image direction {real.name!r} ({info})")
    return Directions(d[None], [real.name], "real/ddim-inversion", model.timesteps.tolist(), model=model.name_or_path,
                      source_run=str(run_dir.resolve()),
                      params={**info, "positive_dir": real.positive_dir, "negative_dir": real.negative_dir,
                              "paired": real.paired, "fixed_point_iterations": real.fixed_point_iterations})


def run_supervised(cfg) -> Path:
    """Everything is computed (the directions, their restriction, the real-image direction) before
    anything is written: a failure leaves the run directory as it was."""
    run_dir = Path(cfg.run_dir)
    record = COMMANDS["supervised"].identity(cfg)  # the files it names (real-image folders) exist
    directions, curves = supervised_directions(run_dir, cfg.supervised)
    if cfg.supervised.restrict_steps:
        from pipeline.stages.probe import load_probes

        directions = restrict(directions, load_probes(run_dir))
        for name, steps in directions.params["restricted_steps"].items():
            print(f"  {name}: restricted to the steps where the probe finds it encoded: {steps}")
    real = real_directions(cfg, run_dir)
    if real is not None:
        save_directions(real, run_dir / "directions" / "real.safetensors", record)
    with atomic_path(run_dir / "directions" / "convergence.csv") as tmp:
        curves.to_csv(tmp, index=False)
    plot_convergence(curves, run_dir / "directions" / "convergence.png")
    out = save_directions(directions, run_dir / "directions" / "supervised.safetensors", record)  # its record last
    for attr, info in directions.params["per_attribute"].items():
        print(f"  {attr}: logistic regression held-out accuracy {info['cv_accuracy']:.3f} +- {info['cv_accuracy_std']:.3f}")
    print(f"hspace supervised: {len(directions)} directions ({', '.join(directions.names)}) -> {out}")
    return out
