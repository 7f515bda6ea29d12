"""conf.paper.yaml at real size: the dry-run command of docs/paper-setting.md, run as written (tiny
sizes, T=2) on a U-Net with google/ddpm-ema-celebahq-256's block structure (narrow channels, random
weights) and a random ViT-B-32 open_clip checkpoint file, both built here. Guards the 256-px path the
toy never takes: h at 8x8 after the mid block, CLIP's and MTCNN's resizing, 25 PCA components, the
paper's disentanglement pairs, the report."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch

from conftest import hspace

ROOT = Path(__file__).resolve().parents[1]
WIDTH = 8  # celebahq-256 has 128: every level's channels / 16, h 32x8x8 instead of 512x8x8
PAIRS = {"Smiling": ["Eyeglasses", "Young", "Male", "Wearing_Hat"], "Eyeglasses": ["Smiling", "Young", "Male", "Wearing_Hat"],
         "Young": ["Smiling", "Eyeglasses", "Male", "Wearing_Hat"], "Male": ["Smiling", "Eyeglasses", "Young", "Wearing_Hat"],
         "Wearing_Hat": ["Smiling", "Eyeglasses", "Young", "Male"]}


def documented_command() -> list[str]:
    """The dry-run command of docs/paper-setting.md (the code block after ``<!-- dry-run -->``)."""
    text = (ROOT / "docs" / "paper-setting.md").read_text()
    block = re.search(r"<!-- dry-run -->\s*```\n(.*?)```", text, re.S).group(1)
    return shlex.split(block.replace("\\\n", " "))


@pytest.mark.slow
def test_paper_setting_dry_run_at_real_size(tmp_path):
    from pipeline.formats.directions import load_directions
    from pipeline.formats.samples import read_manifest
    from pipeline.testing.standins import save_celebahq, save_random_open_clip

    model = save_celebahq(tmp_path / "celebahq", width=WIDTH)
    clip = save_random_open_clip(tmp_path / "clip.pt")
    cmd = documented_command()
    assert cmd[:4] == ["hspace", "run", "--config", "conf.paper.yaml"]
    run = tmp_path / "runs" / "celebahq-dry"
    args = [a.replace("$MODEL", str(model)).replace("$CLIP", str(clip)) for a in cmd[4:]]
    out = hspace("run", "--config", ROOT / "conf.paper.yaml", *args, cwd=tmp_path, timeout=3600).stdout
    from pipeline.registry import STAGES

    for stage in STAGES:
        assert f"{stage.name}: done" in out, stage.name
    assert "where the time went" in out

    manifest = read_manifest(run)
    assert manifest["image_shape"] == [3, 256, 256] and manifest["h_shape_t"] == [2, 4 * WIDTH, 8, 8]
    assert manifest["model"]["hook"] == "after" and manifest["num_samples"] == 26

    import pandas as pd

    from annotators.clip import CELEBA40_PROMPTS

    ann = pd.read_parquet(run / "annotations.parquet")
    assert len(ann) == 26 and set(CELEBA40_PROMPTS) <= set(ann.columns) and "face_prob" in ann.columns
    scores = ann[list(CELEBA40_PROMPTS) + ["face_prob"]].to_numpy()
    assert ((scores >= 0) & (scores <= 1)).all()  # CLIP read the 256-px images at 224, MTCNN at its sizes

    pca = load_directions(run / "directions" / "pca.safetensors")
    assert tuple(pca.directions.shape) == (25, 2, 4 * WIDTH, 8, 8)
    dis = load_directions(run / "directions" / "disentangled.safetensors")
    assert list(dis.names) == [f"{a}|{','.join(b)}" for a, b in PAIRS.items()]
    assert torch.isfinite(dis.directions).all()

    table = pd.read_csv(run / "evaluation" / "table1.csv")
    assert {"smile", "glasses", "age", "gender", "hat"} <= set(table.columns)
    page = (run / "report" / "index.html").read_text()
    assert 'id="table1"' in page and 'id="costs"' in page
    timings = json.loads((run / "timings.json").read_text())
    assert timings["generate"]["unet_evaluations"] == 26 * 2 and timings["annotate"]["scored"] == 2 * 26
