"""h of any shape in the run directory, h recorded at chosen steps (``generate.h_steps``) and the bytes said
before sampling: the samples format's round trips, the U-Net format unchanged byte for byte, the stages on
the recorded steps, and the main job end to end on a family whose h is token-wise (N, C)."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_overrides
from pipeline.formats.samples import (
    FORMAT,
    MANIFEST,
    HLayout,
    features,
    finalise_manifest,
    h_layout,
    iter_samples,
    samples_dir,
    shard_table,
    write_shard,
)
from pipeline.formats.identity import make_record

STEPS = 3


# ---------------------------------------------------------------------- the format
def write_dataset(run_dir: Path, h: torch.Tensor, h_dtype: str, steps=None, batch: int = 2) -> None:
    """h (N, T', *h_shape) written as a complete dataset (black 8x8 images), ``steps`` the recorded indices."""
    N, T = len(h), STEPS
    for start in range(0, N, batch):
        ids = list(range(start, min(start + batch, N)))
        write_shard(samples_dir(run_dir) / "shards", ids, ids, np.zeros((len(ids), 8, 8, 3), np.uint8), h[ids], h_dtype)
    content = {"test": h_dtype}
    manifest = {"format": FORMAT, "identity": content, "identity_hash": "test", "h_dtype": h_dtype,
                "h_shape_t": [T, *h.shape[2:]], "h_steps": list(range(T)) if steps is None else steps,
                "model": {"timesteps": [900, 600, 300]}, "image_shape": [3, 8, 8], "latent_shape": [3, 8, 8]}
    finalise_manifest(run_dir, manifest, set(range(N)), make_record("generate"), {})


@pytest.mark.parametrize("h_dtype", ["float16", "bfloat16", "float32"])
def test_token_h_round_trips_with_its_shape(tmp_path, h_dtype):
    """Token h (B, T', N, C) is stored as datasets' Array3D and read back bit for bit, as our reader's views and as
    a datasets.Dataset; U-Net h stays Array4D."""
    import datasets

    dtype = getattr(torch, h_dtype)
    h = torch.randn(5, 2, 16, 12, generator=torch.Generator().manual_seed(0)).to(dtype)
    write_dataset(tmp_path, h, h_dtype, steps=[0, 2])
    layout = h_layout(json.loads((samples_dir(tmp_path) / MANIFEST).read_text()))
    assert layout == HLayout(STEPS, (0, 2), (16, 12), h_dtype) and layout.stored == (2, 16, 12)
    got = torch.cat([b["h"] for b in iter_samples(tmp_path, batch_size=2)])
    assert got.dtype == dtype and got.shape == (5, 2, 16, 12) and torch.equal(got, h)
    assert isinstance(features((2, 16, 12), h_dtype)["h"], datasets.Array3D)
    assert isinstance(features((3, 4, 2, 2), h_dtype)["h"], datasets.Array4D)
    if h_dtype != "bfloat16":  # datasets reads the stored values as numpy arrays of that shape
        ds = datasets.Dataset.from_file(str(next((samples_dir(tmp_path) / "shards").glob("part-*")))).with_format("numpy")
        stored = ds[:]["h"]
        assert stored.shape == (2, 2, 16, 12) and np.array_equal(stored, h[:2].numpy())


def test_unet_shards_are_byte_identical_to_the_format_before_h_of_any_shape():
    """A (C, H, W) shard's bytes are those the Array4D-only format wrote (its sha256 taken with that code), so
    that existing runs stay up to date and their Table 1 unchanged."""
    import io

    import pyarrow as pa

    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 3, 4, 2, 2, generator=g).half()
    images = (torch.rand(2, 8, 8, 3, generator=g) * 255).to(torch.uint8).numpy()
    x_t = torch.randn(2, 3, 3, 8, 8, generator=g)
    table = shard_table([0, 1], [0, 1], images, h, "float16", {"model": "m"}, ["a", "b"], x_t)
    buf = io.BytesIO()
    with pa.ipc.new_stream(buf, table.schema) as w:  # what write_table writes to a shard's path
        w.write_table(table)
    assert hashlib.sha256(buf.getvalue()).hexdigest() == GOLDEN_UNET_SHARD


GOLDEN_UNET_SHARD = "f80cfd06505151c5778aa81803601690e5958d0adb811eb0968be84f644bbd32"  # the format of 9ed05ff


def test_layout_scatters_the_recorded_steps_and_names_the_missing_ones():
    from pipeline.errors import ConfigError

    layout = HLayout(4, (1, 3), (2, 3), "float16")
    x = torch.ones(5, 2, 2, 3)
    full = layout.scatter(x)
    assert full.shape == (5, 4, 2, 3) and full[:, [1, 3]].eq(1).all() and full[:, [0, 2]].eq(0).all()
    assert layout.scatter(torch.ones(2, 7), axis=0)[[0, 2]].eq(0).all()
    assert HLayout(2, (0, 1), (2,), "float16").scatter(x) is x
    layout.require([1, 3], "hspace sae", "sae.steps")
    with pytest.raises(ConfigError, match=r"^hspace sae needs h at steps 0, 2 \(sae.steps=\[0, 2\]\), which "
                                          r"generate.h_steps=\[1, 3\] did not record"):
        layout.require([0, 2, 3], "hspace sae", "sae.steps=[0, 2]")
