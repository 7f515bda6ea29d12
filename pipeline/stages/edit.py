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
from pipeline.formats.directions import Directions, compose, load_directions, with_calibration
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


def edit_strips(model: HSpaceModel, seeds: Sequence[int], rows: Sequence[tuple[torch.Tensor, Sequence[float]]],
                asyrp: bool = False, x_T_space: bool = False, batch_size: int = 64) -> list[np.ndarray]:
    """One (len(seeds), K_r, H, W, 3) uint8 strip per row (vector, its K_r scales): every seed edited along
    the vector at each scale. Every row's edits are sampled together, ``batch_size`` images at a time
    (full batches across rows), each batch converted to uint8 as it comes.

    vector: (T, C, H, W) in h-space, or (3, H, W) when ``x_T_space`` (added to x_T). Scale 0 is the plain
    sample (a zero edit gives it bit for bit), sampled once for all rows."""
    if not rows:
        return []
    cells = [(r, j) for r, (_, scales) in enumerate(rows) for j, scale in enumerate(scales) if scale != 0]
    edits = [None] + [rows[r][1][j] * rows[r][0] for r, j in cells]
    pairs = [(int(s), e) for e in edits for s in seeds]
    flat = np.empty((len(pairs), *model.image_shape[1:], 3), np.uint8)
    for idx, images in model.iter_edits(pairs, space="x_T" if x_T_space else "h", batch_size=batch_size, asyrp=asyrp):
        flat[idx] = to_uint8(images)
    images = flat.reshape(len(edits), len(seeds), *flat.shape[1:])      # (1 + edited cells, S, H, W, 3)
    strips = [np.repeat(images[0][:, None], len(scales), axis=1) for _, scales in rows]  # scale 0, then the edits
    for (r, j), image in zip(cells, images[1:]):
        strips[r][:, j] = image
    return strips


def edit_grids(model: HSpaceModel, seeds: Sequence[int], directions: Sequence[torch.Tensor], scales: Sequence,
               asyrp: bool = False, x_T_space: bool = False, batch_size: int = 64) -> np.ndarray:
    """(N, len(seeds), K, H, W, 3) uint8: every seed edited along each of N directions at each of
    K scales (:func:`edit_strips`).

    directions: N of (T, C, H, W) in h-space, or (3, H, W) when ``x_T_space`` (added to x_T).
    scales: K numbers for every direction, or N lists of K (each direction its own scales)."""
    N = len(directions)
    per = [list(s) for s in scales] if scales and isinstance(scales[0], (list, tuple)) else [list(scales)] * N
    if len(per) != N or any(len(p) != len(per[0]) for p in per):
        raise ConfigError(f"edit_grids: give one list of scales for all {N} directions or {N} lists of equal length")
    return np.stack(edit_strips(model, seeds, list(zip(directions, per)), asyrp, x_T_space, batch_size))


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


def strip_rows(directions: Directions, names: Sequence, scales: Sequence[float] | None,
               x_T_space: bool = False) -> list[tuple[int, torch.Tensor, list[float]]]:
    """(index, vector, scales) of each direction in ``names`` (indices or names); ``scales`` None: each
    direction's ``default_scales`` (calibrated multiples or the file's scales: rows of unequal length)."""
    extra = directions.extras.get("x_T_directions") if x_T_space else None
    if x_T_space and extra is None:
        raise ConfigError(f"{directions.method} directions have no x_T-space version (only supervised ones do)")
    index = [directions.index(key) for key in names]
    return [(i, extra[i] if x_T_space else directions.directions[i],
             list(scales) if scales is not None else default_scales(directions, i)) for i in index]


def save_strips(directions: Directions, rows, strips: Sequence[np.ndarray], seeds: Sequence[int], out_dir: Path,
                x_T_space: bool = False, title_prefix: str = "") -> list[Path]:
    """One seeds x scales PNG per row of :func:`strip_rows` and its strip -> their paths."""
    paths = []
    for (i, _, cols), strip in zip(rows, strips):
        label = f"{title_prefix}{directions.display_name(i)}" + (" (x_T space)" if x_T_space else "")
        fig = image_grid_figure(strip, row_labels=[f"seed {s}" for s in seeds], col_labels=[f"{s:+.3g}" for s in cols],
                                title=label)
        paths.append(save_figure(fig, out_dir / f"{safe_name(directions.names[i])}{'-xT' if x_T_space else ''}.png"))
    return paths


def render_edits(model: HSpaceModel, directions: Directions, names: Sequence, seeds: Sequence[int],
                 scales: Sequence[float] | None, out_dir: Path, asyrp: bool = False, x_T_space: bool = False,
                 title_prefix: str = "", batch_size: int = 64) -> list[Path]:
    """One seeds x scales PNG per direction in ``names`` (indices or names) -> their paths; ``scales``
    None: each direction's ``default_scales``."""
    rows = strip_rows(directions, names, scales, x_T_space)
    strips = edit_strips(model, seeds, [(v, cols) for _, v, cols in rows], asyrp, x_T_space, batch_size)
    return save_strips(directions, rows, strips, seeds, out_dir, x_T_space, title_prefix)


def run_edit(cfg) -> list[Path]:
    e = cfg.edit
    if not e.directions:
        raise ConfigError("edit.directions is not set: give a directions file or a name (pca, jacobian, supervised, "
                          "disentangled, real) from <run_dir>/directions")
    path = resolve_directions_path(cfg.run_dir, e.directions)
    model = HSpaceModel.from_config(cfg)
    directions = with_calibration(load_directions(path, model), path, cfg.run_dir)
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
