"""`hspace edit`: grids of samples x edit scales for any directions file, or sequential edits.

One PNG per direction in ``<run_dir>/grids/<file>/<direction>.png``, or in ``edit.out_dir`` (rows:
seeds; columns: scales): not in ``edits/``, which the figures stage writes. With ``edit.out_dir``
outside the run directory it only reads the run (which may then be read-only). With
``edit.sequential`` one PNG applies the chosen directions one after another, each at its own
scale (paper Fig. 11): column j has directions 1..j applied.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from pipeline.engine.model import HSpaceModel
from pipeline.errors import ConfigError
from pipeline.formats.directions import Directions, compose, load_directions
from pipeline.formats.figures import image_grid_figure, save_figure
from pipeline.formats.images import to_uint8
from pipeline.methods.calibration import calibrated_scale


def resolve_directions_path(run_dir, name_or_path: str) -> Path:
    """A path, or a bare name such as 'pca' meaning <run_dir>/directions/pca.safetensors."""
    p = Path(name_or_path)
    if p.suffix == ".safetensors" or p.exists():
        return p
    return Path(run_dir) / "directions" / f"{name_or_path}.safetensors"


#: the columns of a calibrated direction's grid, in multiples of its calibrated strength
CALIBRATED_MULTIPLES = (-2.0, -1.0, 0.0, 1.0, 2.0)


def edit_grids(model: HSpaceModel, seeds: Sequence[int], directions: Sequence[torch.Tensor], scales: Sequence,
               asyrp: bool = False, x_T_space: bool = False, batch_size: int = 64) -> np.ndarray:
    """(N, len(seeds), K, H, W, 3) uint8: every seed edited along each of N directions at each of
    K scales, sampled together in batches of ``batch_size`` images.

    directions: N of (T, C, H, W) in h-space, or (3, H, W) when ``x_T_space`` (added to x_T).
    scales: K numbers for every direction, or N lists of K (each direction its own scales).
    Scale 0 is the plain sample (a zero edit gives it bit for bit), sampled once for all directions."""
    N, S = len(directions), len(seeds)
    per = [list(s) for s in scales] if scales and isinstance(scales[0], (list, tuple)) else [list(scales)] * N
    K = len(per[0])
    if len(per) != N or any(len(p) != K for p in per):
        raise ConfigError(f"edit_grids: give one list of scales for all {N} directions or {N} lists of equal length")
    cells = [(n, j) for n in range(N) for j in range(K) if per[n][j] != 0]
    edits = [None] + [per[n][j] * directions[n] for n, j in cells]
    images = to_uint8(model.sample_edits(seeds, edits, space="x_T" if x_T_space else "h", batch_size=batch_size,
                                         asyrp=asyrp))                     # (1 + edited cells, S, H, W, 3)
    grids = np.empty((N, S, K, *images.shape[2:]), np.uint8)
    grids[:] = images[0][None, :, None]                                     # scale 0 everywhere, then the edits
    for (n, j), image in zip(cells, images[1:]):
        grids[n, :, j] = image
    return grids


def default_scales(directions: Directions, index: int, multiples: Sequence[float] = CALIBRATED_MULTIPLES) -> list[float]:
    """A direction's grid columns: ``multiples`` of its calibrated strength when its file has one
    (pipeline.methods.calibration), else the file's suggested scales (-2..2 without any)."""
    s = calibrated_scale(directions.params, directions.names[index])
    if s is not None:
        return [m * s for m in multiples]
    return list(directions.params.get("scales") or [-2.0, -1.0, 0.0, 1.0, 2.0])


def sequential_grid(model: HSpaceModel, seeds: Sequence[int], directions: Sequence[torch.Tensor],
                    scales: Sequence[float], batch_size: int = 64) -> np.ndarray:
    """(len(seeds), len(directions) + 1, H, W, 3): column j applies directions 1..j (Fig. 11)."""
    steps = [None] + [compose(directions[:j], scales[:j]) for j in range(1, len(directions) + 1)]
    return to_uint8(model.sample_edits(seeds, steps, batch_size=batch_size)).swapaxes(0, 1)


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", name)


def render_edits(model: HSpaceModel, directions: Directions, names: Sequence, seeds: Sequence[int],
                 scales: Sequence[float] | None, out_dir: Path, asyrp: bool = False, x_T_space: bool = False,
                 title_prefix: str = "", batch_size: int = 64) -> list[Path]:
    """One seeds x scales PNG per direction in ``names`` (indices or names) -> their paths; ``scales``
    None: each direction's ``default_scales``."""
    extra = directions.extras.get("x_T_directions") if x_T_space else None
    if x_T_space and extra is None:
        raise ConfigError(f"{directions.method} directions have no x_T-space version (only supervised ones do)")
    index = [directions.index(key) for key in names]
    vectors = [extra[i] if x_T_space else directions.directions[i] for i in index]
    per = [list(scales) if scales is not None else default_scales(directions, i) for i in index]
    # calibrated directions have len(CALIBRATED_MULTIPLES) columns, the others their file's scales: one
    # edit_grids call per number of columns (a file where only some directions are calibrated mixes them)
    grids: list = [None] * len(index)
    groups: dict[int, list[int]] = {}
    for j, cols in enumerate(per):
        groups.setdefault(len(cols), []).append(j)
    for js in groups.values():
        part = edit_grids(model, seeds, [vectors[j] for j in js], [per[j] for j in js], asyrp=asyrp,
                          x_T_space=x_T_space, batch_size=batch_size)
        for j, grid in zip(js, part):
            grids[j] = grid
    paths = []
    for i, grid, cols in zip(index, grids, per):
        label = f"{title_prefix}{directions.display_name(i)}" + (" (x_T space)" if x_T_space else "")
        fig = image_grid_figure(grid, row_labels=[f"seed {s}" for s in seeds], col_labels=[f"{s:+.3g}" for s in cols],
                                title=label)
        paths.append(save_figure(fig, out_dir / f"{safe_name(directions.names[i])}{'-xT' if x_T_space else ''}.png"))
    return paths


def run_edit(cfg) -> list[Path]:
    e = cfg.edit
    if not e.directions:
        raise ConfigError("edit.directions is not set: give a directions file or a name (pca, jacobian, supervised, "
                          "disentangled, real) from <run_dir>/directions")
    path = resolve_directions_path(cfg.run_dir, e.directions)
    model = HSpaceModel.from_config(cfg)
    directions = load_directions(path, model)
    if tuple(directions.timesteps) != tuple(model.timesteps.tolist()):
        raise ConfigError(f"{path} was made for timesteps {directions.timesteps[:3]}... (T={len(directions.timesteps)}) "
                          f"but the model samples {model.timesteps.tolist()[:3]}... (T={model.num_steps}); "
                          f"set model.num_inference_steps={len(directions.timesteps)}")
    names = list(e.names) or list(range(len(directions)))
    scales = list(e.scales) if e.scales else None  # None: calibrated multiples, or the file's suggested scales
    out_dir = Path(e.out_dir or Path(cfg.run_dir) / "grids" / path.stem)
    if e.sequential:
        if scales is None or len(scales) != len(names):
            raise ConfigError(f"edit.sequential applies each of the {len(names)} directions at its own scale: "
                              f"give {len(names)} values in edit.scales (got {len(scales or [])})")
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
