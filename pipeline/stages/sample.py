"""`hspace sample`: a first look at a model, a labelled PNG grid of seeds, plain or edited.

Plain (no ``sample.directions``): the seeds' samples, several to a row, each titled with its seed.
Edited: rows are seeds, columns ``sample.scales`` of ``sample.direction`` from ``sample.directions`` (a
file, or a name of ``<run_dir>/directions/`` as ``hspace edit`` takes: pca, supervised, ...), labelled
as multiples of the direction's calibrated strength where its file has one. Written to
``sample.out``, else ``<run_dir>/sample.png`` when the run directory exists, else ``./sample.png``:
a first look creates no run directory.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.engine.model import HSpaceModel
from pipeline.errors import ConfigError
from pipeline.formats.figures import image_grid_figure, save_figure, scale_labels
from pipeline.formats.images import to_uint8

#: plain samples per row of the grid
PER_ROW = 8


def output_path(cfg) -> Path:
    """``sample.out``, else ``<run_dir>/sample.png`` if the run directory exists, else ``./sample.png``."""
    if cfg.sample.out:
        return Path(cfg.sample.out)
    return Path(cfg.run_dir) / "sample.png" if Path(cfg.run_dir).is_dir() else Path("sample.png")


def check(cfg) -> Path | None:
    """The directions file to use (None: plain samples), or a ConfigError before any model is loaded:
    a direction or scales without a file, a file that does not exist."""
    from pipeline.stages.edit import resolve_directions_path

    s = cfg.sample
    if s.directions is None:
        if s.direction != "0" or list(s.scales) != [0.0]:
            raise ConfigError(f"sample.direction={s.direction} / sample.scales={list(s.scales)} edit along a direction, but "
                              "sample.directions is not set: give a directions file or a name (pca, jacobian, supervised, "
                              "disentangled, real) from <run_dir>/directions")
        return None
    path = resolve_directions_path(cfg.run_dir, s.directions)
    if not path.exists():
        raise ConfigError(f"sample.directions={s.directions}: {path} does not exist (a name means "
                          f"{Path(cfg.run_dir) / 'directions'}/<name>.safetensors; run the stage that writes it first)")
    return path


def run_sample(cfg) -> Path:
    path = check(cfg)
    model = HSpaceModel.from_config(cfg)
    seeds, out = list(cfg.sample.seeds), output_path(cfg)
    if path is None:
        images = to_uint8(model.sample(seeds).images)
        rows = [list(images[i:i + PER_ROW]) for i in range(0, len(seeds), PER_ROW)]
        titles = [[f"seed {s}" for s in seeds[i:i + PER_ROW]] for i in range(0, len(seeds), PER_ROW)]
        fig = image_grid_figure(rows, cell_titles=titles, cell=1.0,
                                title=f"{Path(str(model.name_or_path)).name}: samples (T={model.num_steps})")
        shape = f"{len(seeds)} seeds"
    else:
        from pipeline.formats.directions import load_directions, with_calibration
        from pipeline.methods.calibration import calibrated_scale

        directions = with_calibration(load_directions(path, model), path, cfg.run_dir)
        index = directions.index(cfg.sample.direction)
        direction, scales = directions.directions[index], list(cfg.sample.scales)
        edits = [None if scale == 0 else scale * direction for scale in scales]
        grid = to_uint8(model.sample_edits(seeds, edits, progress=True)).swapaxes(0, 1)  # (seeds, scales, H, W, 3)
        calibrated = calibrated_scale(directions.params, directions.names[index])
        fig = image_grid_figure(grid, row_labels=[f"seed {s}" for s in seeds],
                                col_labels=scale_labels(scales, calibrated),
                                title=f"{path.stem}: {directions.display_name(index)}")
        shape = f"{len(seeds)} seeds x {len(scales)} scales"
    save_figure(fig, out)
    print(f"hspace sample: wrote {out} ({shape})")
    return out
