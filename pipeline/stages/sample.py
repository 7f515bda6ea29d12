"""`hspace sample`: a first look at a model, a PNG grid of seeds (rows) x edit scales (columns)."""
from __future__ import annotations

from pathlib import Path

from pipeline.engine.model import HSpaceModel
from pipeline.formats.images import image_grid, save_png, to_uint8


def run_sample(cfg) -> Path:
    model = HSpaceModel.from_config(cfg)
    seeds = list(cfg.sample.seeds)
    scales = list(cfg.sample.scales)
    if cfg.sample.directions is not None:
        from pipeline.formats.directions import load_directions

        direction = load_directions(cfg.sample.directions, model).get(cfg.sample.direction)
    else:
        direction, scales = None, [0.0]
    edits = [None if direction is None or scale == 0 else scale * direction for scale in scales]
    images = model.sample_edits(seeds, edits, progress=True).transpose(0, 1).flatten(0, 1)  # row-major: seed, then scale
    out = Path(cfg.sample.out or Path(cfg.run_dir) / "sample.png")
    save_png(image_grid(to_uint8(images), ncol=len(scales)), out, upscale=max(1, 256 // model.image_shape[-1]))
    print(f"wrote {out} ({len(seeds)} seeds x {len(scales)} scales)")
    return out
