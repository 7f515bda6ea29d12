"""`hspace edit`: grids of samples x edit scales for any directions file, or sequential edits.

One PNG per direction in ``<run_dir>/edits/<file>/<direction>.png`` (rows: seeds; columns:
scales). With ``edit.sequential`` one PNG applies the chosen directions one after another,
each at its own scale (paper Fig. 11): column j has directions 1..j applied.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..directions import Directions, compose, load_directions
from ..errors import ConfigError
from ..figures import image_grid_figure, save_figure
from ..images import to_uint8
from ..model import HSpaceModel


def resolve_directions_path(run_dir, name_or_path: str) -> Path:
    """A path, or a bare name such as 'pca' meaning <run_dir>/directions/pca.safetensors."""
    p = Path(name_or_path)
    if p.suffix == ".safetensors" or p.exists():
        return p
    return Path(run_dir) / "directions" / f"{name_or_path}.safetensors"


def edit_grids(model: HSpaceModel, seeds: Sequence[int], directions: Sequence[torch.Tensor], scales: Sequence[float],
               asyrp: bool = False, x_T_space: bool = False, batch_size: int = 64) -> np.ndarray:
    """(N, len(seeds), len(scales), H, W, 3) uint8: every seed edited along each of N directions
    at every scale, sampled together in batches of ``batch_size`` images.

    directions: N of (T, C, H, W) in h-space, or (3, H, W) when ``x_T_space`` (added to x_T).
    Scale 0 is the plain sample (a zero edit gives it bit for bit), sampled once for all directions."""
    edited = [j for j, s in enumerate(scales) if s != 0]
    edits = [None] + [scales[j] * d for d in directions for j in edited]
    images = to_uint8(model.sample_edits(seeds, edits, space="x_T" if x_T_space else "h", batch_size=batch_size,
                                         asyrp=asyrp))                     # (1 + N * len(edited), S, H, W, 3)
    N, S, K = len(directions), len(seeds), len(scales)
    grids = np.empty((N, S, K, *images.shape[2:]), np.uint8)
    grids[:] = images[0][None, :, None]                                     # scale 0 everywhere, then the edits
    grids[:, :, edited] = images[1:].reshape(N, len(edited), S, *images.shape[2:]).transpose(0, 2, 1, 3, 4, 5)
    return grids


def sequential_grid(model: HSpaceModel, seeds: Sequence[int], directions: Sequence[torch.Tensor],
                    scales: Sequence[float], batch_size: int = 64) -> np.ndarray:
    """(len(seeds), len(directions) + 1, H, W, 3): column j applies directions 1..j (Fig. 11)."""
    steps = [None] + [compose(directions[:j], scales[:j]) for j in range(1, len(directions) + 1)]
    return to_uint8(model.sample_edits(seeds, steps, batch_size=batch_size)).swapaxes(0, 1)


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", name)


def render_edits(model: HSpaceModel, directions: Directions, names: Sequence, seeds: Sequence[int],
                 scales: Sequence[float], out_dir: Path, asyrp: bool = False, x_T_space: bool = False,
                 title_prefix: str = "", batch_size: int = 64) -> list[Path]:
    """One seeds x scales PNG per direction in ``names`` (indices or names) -> their paths."""
    extra = directions.extras.get("x_T_directions") if x_T_space else None
    if x_T_space and extra is None:
        raise ConfigError(f"{directions.method} directions have no x_T-space version (only supervised ones do)")
    index = [directions.index(key) for key in names]
    vectors = [extra[i] if x_T_space else directions.directions[i] for i in index]
    grids = edit_grids(model, seeds, vectors, scales, asyrp=asyrp, x_T_space=x_T_space, batch_size=batch_size)
    paths = []
    for i, grid in zip(index, grids):
        label = f"{title_prefix}{directions.display_name(i)}" + (" (x_T space)" if x_T_space else "")
        fig = image_grid_figure(grid, row_labels=[f"seed {s}" for s in seeds], col_labels=[f"{s:+g}" for s in scales],
                                title=label)
        paths.append(save_figure(fig, out_dir / f"{safe_name(directions.names[i])}{'-xT' if x_T_space else ''}.png"))
    return paths


def run_edit(cfg) -> list[Path]:
    e = cfg.edit
    if not e.directions:
        raise ConfigError("edit.directions is not set: give a directions file or a name (pca, jacobian, supervised, "
                          "disentangled, real) from <run_dir>/directions")
    path = resolve_directions_path(cfg.run_dir, e.directions)
    model = HSpaceModel.from_config(cfg.model)
    directions = load_directions(path, model)
    if tuple(directions.timesteps) != tuple(model.timesteps.tolist()):
        raise ConfigError(f"{path} was made for timesteps {directions.timesteps[:3]}... (T={len(directions.timesteps)}) "
                          f"but the model samples {model.timesteps.tolist()[:3]}... (T={model.num_steps}); "
                          f"set model.num_inference_steps={len(directions.timesteps)}")
    names = list(e.names) or list(range(len(directions)))
    scales = list(e.scales) if e.scales else directions.params.get("scales", [-2.0, -1.0, 0.0, 1.0, 2.0])
    out_dir = Path(e.out_dir or Path(cfg.run_dir) / "edits" / path.stem)
    if e.sequential:
        if len(scales) != len(names):
            raise ConfigError(f"edit.sequential applies each of the {len(names)} directions at its own scale: "
                              f"give {len(names)} values in edit.scales (got {len(scales)})")
        grid = sequential_grid(model, list(e.seeds), [directions.get(k) for k in names], scales, e.batch_size)
        cols = ["original"] + [f"+{directions.display_name(directions.index(k))} ({s:+g})" for k, s in zip(names, scales)]
        fig = image_grid_figure(grid, row_labels=[f"seed {s}" for s in e.seeds], col_labels=cols,
                                title="sequential edits (Fig. 11)", cell=1.2)
        paths = [save_figure(fig, out_dir / "sequential.png")]
    else:
        paths = render_edits(model, directions, names, list(e.seeds), scales, out_dir, e.asyrp, e.x_T_space,
                             batch_size=e.batch_size)
    print(f"hspace edit: {len(paths)} grid(s) in {out_dir}")
    return paths
