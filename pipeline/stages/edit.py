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

from ..directions import Directions, load_directions
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


def edit_grid(model: HSpaceModel, seeds: Sequence[int], direction: torch.Tensor, scales: Sequence[float],
              asyrp: bool = False, x_T_space: bool = False, unedited: np.ndarray | None = None) -> np.ndarray:
    """(len(seeds), len(scales), H, W, 3) uint8: every seed edited at every scale, in one batch.

    direction: (T, C, H, W) in h-space, or (3, H, W) when ``x_T_space`` (added to x_T).
    unedited: the seeds' plain samples (len(seeds), H, W, 3) to reuse for scale 0 (a zero edit
    gives the plain sample bit for bit), saving one image per seed."""
    S, K = len(seeds), len(scales)
    edited = [j for j, s in enumerate(scales) if s != 0] if unedited is not None else list(range(K))
    all_seeds = [s for s in seeds for _ in edited]
    scale = torch.tensor([scales[j] for j in edited] * S, dtype=torch.float32).view(-1, *([1] * direction.ndim))
    if x_T_space:
        out = model.sample(all_seeds, dx_T=scale * direction)
    else:
        out = model.sample(all_seeds, delta_h=scale * direction, asyrp=asyrp)
    images = to_uint8(out.images)
    grid = np.empty((S, K, *images.shape[1:]), np.uint8)
    grid[:, edited] = images.reshape(S, len(edited), *images.shape[1:])
    if len(edited) < K:
        grid[:, [j for j in range(K) if j not in edited]] = unedited[:, None]
    return grid


def sequential_grid(model: HSpaceModel, seeds: Sequence[int], directions: Sequence[torch.Tensor],
                    scales: Sequence[float]) -> np.ndarray:
    """(len(seeds), len(directions) + 1, H, W, 3): column j applies directions 1..j (Fig. 11)."""
    steps = [torch.zeros_like(directions[0])]
    for d, s in zip(directions, scales):
        steps.append(steps[-1] + s * d)
    deltas = torch.stack([steps[j] for _ in seeds for j in range(len(steps))])
    out = model.sample([s for s in seeds for _ in steps], delta_h=deltas)
    return to_uint8(out.images).reshape(len(seeds), len(steps), *out.images.shape[2:], 3)


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", name)


def render_edits(model: HSpaceModel, directions: Directions, names: Sequence, seeds: Sequence[int],
                 scales: Sequence[float], out_dir: Path, asyrp: bool = False, x_T_space: bool = False,
                 title_prefix: str = "") -> list[Path]:
    paths = []
    extra = directions.extras.get("x_T_directions") if x_T_space else None
    if x_T_space and extra is None:
        raise ConfigError(f"{directions.method} directions have no x_T-space version (only supervised ones do)")
    unedited = to_uint8(model.sample(list(seeds)).images) if 0 in scales and len(names) > 1 else None
    for key in names:
        i = directions.index(key)
        d = extra[i] if x_T_space else directions.directions[i]
        grid = edit_grid(model, seeds, d, scales, asyrp=asyrp, x_T_space=x_T_space, unedited=unedited)
        label = f"{title_prefix}{directions.names[i]}" + (" (x_T space)" if x_T_space else "")
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
    directions = load_directions(path)
    model = HSpaceModel.from_config(cfg.model)
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
        grid = sequential_grid(model, list(e.seeds), [directions.get(k) for k in names], scales)
        cols = ["original"] + [f"+{directions.names[directions.index(k)]} ({s:+g})" for k, s in zip(names, scales)]
        fig = image_grid_figure(grid, row_labels=[f"seed {s}" for s in e.seeds], col_labels=cols,
                                title="sequential edits (Fig. 11)", cell=1.2)
        paths = [save_figure(fig, out_dir / "sequential.png")]
    else:
        paths = render_edits(model, directions, names, list(e.seeds), scales, out_dir, e.asyrp, e.x_T_space)
    print(f"hspace edit: {len(paths)} grid(s) in {out_dir}")
    return paths
