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
from pipeline.formats.identity import make_record
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
    x = torch.tensor([1.0, 2.0])[None, :, None, None].expand(5, 2, 2, 3)  # step 1's h is 1, step 3's 2
    full = layout.scatter(x)
    assert full.shape == (5, 4, 2, 3) and torch.equal(full[:, [1, 3]], x) and full[:, [0, 2]].eq(0).all()
    assert layout.scatter(torch.ones(2, 7), axis=0)[[0, 2]].eq(0).all()
    assert HLayout(2, (0, 1), (2,), "float16").scatter(x) is x
    layout.require([1, 3], "hspace sae", "sae.steps")
    with pytest.raises(ConfigError, match=r"^hspace sae needs h at steps 0, 2 \(sae.steps=\[0, 2\]\), which "
                                          r"generate.h_steps=\[1, 3\] did not record"):
        layout.require([0, 2, 3], "hspace sae", "sae.steps=[0, 2]")


# ---------------------------------------------------------------------- a token family loaded from a folder
def write_token_model(folder: Path) -> Path:
    """test_families' flow-matching family of tokens saved as a pipeline folder: model_index.json, the
    transformer's weights and a FlowMatchEulerDiscreteScheduler config."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from test_families import TinyTokenNet

    (folder / "transformer").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in TinyTokenNet().state_dict().items()},
              str(folder / "transformer" / "model.safetensors"))
    (folder / "transformer" / "config.json").write_text(json.dumps({"_class_name": "TinyTokenNet"}))  # the layout's
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_config(str(folder / "scheduler"))
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "TokenTestPipeline", "transformer": ["test_families", "TinyTokenNet"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}))
    return folder


@pytest.fixture
def token_model_dir(tmp_path, monkeypatch):
    """A saved token model, loadable in this process through HSpaceModel.from_pretrained (its family registered)."""
    from test_families import TinyTokenNet, TokenFamily

    import pipeline.engine.families as families

    class SavedTokenFamily(TokenFamily):
        pipelines = ("TokenTestPipeline",)

        @classmethod
        def load(cls, folder, dtype):
            net = TinyTokenNet()
            net.load_state_dict(load_file(str(Path(folder.location) / "transformer" / "model.safetensors")))
            return cls(net.to(dtype))

    monkeypatch.setitem(families.FAMILIES, "tokens", SavedTokenFamily)
    monkeypatch.setitem(families.PIPELINE_FAMILIES, "TokenTestPipeline", "tokens")
    return write_token_model(tmp_path / "token-model")


@pytest.mark.slow
def test_generate_h_steps_holds_the_same_samples_whatever_the_batch_size(tmp_path, tiny_model_dir):
    """generate.h_steps=[0, 2] at batch 2 stores, at those steps, the h of the whole trajectories generated at
    batch 3 (to within one float16 rounding: another batch size sums in another order) and the same images; the
    manifest names the steps, the dataset of all steps says every one."""
    from pipeline.config import load_config
    from pipeline.stages.generate import run_generate

    def generate(run, *extra):
        run_generate(load_config(None, [*tiny_overrides(run, tiny_model_dir, steps=STEPS), "generate.num_samples=5",
                                        *extra]))
        batches = list(iter_samples(run, images=True))
        return torch.cat([b["h"] for b in batches]).float(), np.concatenate([b["images"] for b in batches])

    part, part_images = generate(tmp_path / "part", "generate.h_steps=[2,0]", "generate.batch_size=2")
    full, full_images = generate(tmp_path / "full", "generate.batch_size=3")
    assert h_layout(json.loads((samples_dir(tmp_path / "part") / MANIFEST).read_text())).steps == (0, 2)
    assert h_layout(json.loads((samples_dir(tmp_path / "full") / MANIFEST).read_text())).complete
    assert part.shape == (5, 2, *full.shape[2:]) and len(full.shape) == 5
    torch.testing.assert_close(part, full[:, [0, 2]], rtol=2e-3, atol=2e-3)
    assert np.abs(part_images.astype(int) - full_images.astype(int)).max() <= 1


def test_sampling_records_h_at_the_chosen_steps_only(token_model_dir):
    """model.sample(h_steps=...) holds h at those steps only, equal to the same steps of the whole trajectory;
    the images are the same."""
    from pipeline.engine.model import HSpaceModel

    m = HSpaceModel.from_pretrained(token_model_dir, num_inference_steps=STEPS, hook="blocks.0", device="cpu")
    full, part = m.sample([3, 4]), m.sample([3, 4], h_steps=[2, 0])
    assert part.h.shape == (2, 2, 16, 12) and torch.equal(part.h, full.h[:, [0, 2]])
    assert torch.equal(part.images, full.images)


def token_run_args(run_dir, model_dir, *extra):
    from test_run import tiny_run_args

    args = [a for a in tiny_run_args(run_dir, model_dir) if not a.startswith(("model.num_inference_steps", "jacobian.k"))]
    return [*args, f"model.num_inference_steps={STEPS}", "model.hook=blocks.0", "trainer.devices=1",
            "jacobian.k=2", "jacobian.steps=[1,2]", "generate.batch_size=8", *extra]
    # jacobian.steps leaves out step 0: there s = 1, eps_t = x_t + (1 - s) v = x_t does not depend on h (J = 0)


@pytest.mark.slow
def test_main_job_on_token_h_recorded_at_two_steps(tmp_path, token_model_dir, capsys):
    """`hspace run` on a family whose h is (N, C) tokens, with h recorded at steps 0 and 2 of 3: every stage
    runs and the report is written; the samples hold (2, 16, 12) per sample, the bytes said before sampling
    are within 10% above the shards written; PCA and supervised directions are zero at step 1 and PCA's equal
    a PCA of the stored h; the probes read h at steps 0 and 2; the SAE on step 1 is one line, exit 2."""
    from pipeline.cli import main
    from pipeline.formats.directions import load_directions
    from pipeline.methods.pca import PCA

    run = tmp_path / "run"
    assert main(["run", *token_run_args(run, token_model_dir, "generate.h_steps=[0,2]")]) == 0
    out = capsys.readouterr().out
    assert (run / "report" / "index.html").exists()
    manifest = json.loads((samples_dir(run) / MANIFEST).read_text())
    assert manifest["h_shape_t"] == [STEPS, 16, 12] and manifest["h_steps"] == [0, 2]
    h = torch.cat([b["h"] for b in iter_samples(run)])
    assert h.shape == (24, 2, 16, 12) and torch.isfinite(h).all()

    said = re.search(r"about [\d.]+ (?:bytes|kB|MB) per sample, ([\d.]+) (bytes|kB|MB) in all", out)
    total = float(said.group(1)) * {"bytes": 1, "kB": 1e3, "MB": 1e6}[said.group(2)]
    written = sum(p.stat().st_size for p in (samples_dir(run) / "shards").glob("part-*.arrow"))
    assert written <= total <= 1.1 * written, (total, written)

    pca = load_directions(run / "directions" / "pca.safetensors")
    assert pca.directions.shape[1:] == (STEPS, 16, 12) and pca.directions[:, 1].eq(0).all()
    ref = PCA(n_components=3, method="exact").fit(h.float())
    for k in range(2):  # PCA of the stored steps: the directions' components (up to sign) at steps 0 and 2
        got = torch.nn.functional.normalize(pca.directions[:, [0, 2][k]].flatten(1), dim=1)
        cos = (got.double() @ ref.components_[k].double().T).abs().diagonal()
        assert (cos > 1 - 1e-4).all(), cos
    sup = load_directions(run / "directions" / "supervised.safetensors")
    assert sup.directions[:, 1].eq(0).all() and sup.directions[:, [0, 2]].abs().sum() > 0
    import pandas as pd

    probes = pd.read_csv(run / "probes" / "probes.csv")
    steps = {space: sorted(set(rows.step)) for space, rows in probes.groupby("space")}
    assert steps == {"h": [0, 2], "x_t": [0, 1, 2]}

    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    assert main(["sae", *token_run_args(run, token_model_dir, "generate.h_steps=[0,2]", "sae.steps=1")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "needs h at steps 1" in err[0] and "generate.h_steps=[0, 2] did not record" in err[0], err
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before


@pytest.mark.parametrize("steps", ["[3]", "[1,1]", "[]", "[-1]"])
def test_h_steps_outside_the_trajectory_are_refused_when_loaded(steps):
    from pipeline.config import load_config
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match=r"generate.h_steps=.*null or distinct step indices in 0..2"):
        load_config(None, ["model.num_inference_steps=3", f"generate.h_steps={steps}"])
    assert load_config(None, ["model.num_inference_steps=3", "generate.h_steps=[2,0]"]).generate.h_steps == [2, 0]
