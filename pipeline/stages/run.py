"""`hspace run`: the main job, every stage in order on one configuration."""
from __future__ import annotations

from pathlib import Path

from .sample import run_sample


def run_all(cfg) -> None:
    out = run_sample(cfg)
    print(f"hspace run: done; outputs in {Path(cfg.run_dir).resolve()} (first look: {out})")
