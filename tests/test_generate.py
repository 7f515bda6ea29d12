"""`hspace generate`: multi-process equivalence, kill-and-resume, corrupt shards, conflicts."""
from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
import torch

from conftest import hspace, tiny_overrides
from pipeline.config import load_config
from pipeline.errors import DatasetError
from pipeline.formats.samples import iter_samples, load_samples, read_manifest, samples_dir
from pipeline.stages.generate import plan_batches, run_generate


def generate(run_dir, model_dir, *overrides, check=True, cwd=None, wait=True):
    return hspace("generate", *tiny_overrides(run_dir, model_dir, steps=4), *overrides, cwd=cwd or run_dir.parent,
                  check=check, log=None if wait else run_dir.parent / f"{run_dir.name}.log")


def dataset(run_dir) -> dict[int, tuple[torch.Tensor, np.ndarray]]:
    """sample_id -> (h, image), read through the streaming reader."""
    out = {}
    for b in iter_samples(run_dir, batch_size=5, images=True):
        for i, sid in enumerate(b["sample_id"]):
            assert int(sid) not in out, "duplicate sample"
            out[int(sid)] = (b["h"][i].clone(), b["images"][i])
    return out


def test_plan_batches_aligned_and_skips_done():
    assert plan_batches(10, 7, 3, set()) == [[10, 11, 12], [13, 14, 15], [16]]
    assert plan_batches(10, 7, 3, {10, 11, 12, 14}) == [[13, 15], [16]]
    assert plan_batches(0, 4, 2, {0, 1, 2, 3}) == []


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path, tiny_model_dir):
    """DDP on gloo with 2 CPU processes writes exactly the dataset 1 process writes."""
    one, two, other = tmp_path / "one", tmp_path / "two", tmp_path / "other"
    generate(one, tiny_model_dir, "generate.num_samples=10", "generate.batch_size=3")
    generate(two, tiny_model_dir, "generate.num_samples=10", "generate.batch_size=3",
             "trainer.devices=2", "trainer.strategy=ddp")
    generate(other, tiny_model_dir, "generate.num_samples=10", "generate.batch_size=4")
    a, b, c = dataset(one), dataset(two), dataset(other)
    assert sorted(a) == sorted(b) == sorted(c) == list(range(10))
    for sid in a:
        assert torch.equal(a[sid][0], b[sid][0]), "same batches must give bit-identical h"
        assert np.array_equal(a[sid][1], b[sid][1])
        torch.testing.assert_close(a[sid][0].float(), c[sid][0].float(), atol=2e-3, rtol=2e-3)
    assert sorted(p.name for p in (two / "samples" / "shards").iterdir()) == \
        sorted(p.name for p in (one / "samples" / "shards").iterdir())
    assert read_manifest(two)["complete"] and read_manifest(two)["num_samples"] == 10


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_dataset(tmp_path, tiny_model_dir):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    args = ("generate.num_samples=80", "generate.batch_size=2", "model.num_inference_steps=60")
    proc = generate(killed, tiny_model_dir, *args, wait=False)
    shards = killed / "samples" / "shards"
    deadline = time.time() + 300
    while not (shards.exists() and len(list(shards.glob("part-*.arrow"))) >= 3):
        assert proc.poll() is None, "generation ended before it could be killed: " + \
            (tmp_path / "killed.log").read_text()[-2000:]
        assert time.time() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    n_before = len(list(shards.glob("part-*.arrow")))
    assert n_before < 40, "the kill came too late to test anything"
    assert not read_manifest(killed)["complete"]
    with pytest.raises(DatasetError, match="incomplete"):
        load_samples(killed)
    generate(killed, tiny_model_dir, *args)
    generate(clean, tiny_model_dir, *args)
    a, b = dataset(killed), dataset(clean)
    assert sorted(a) == sorted(b) == list(range(80))
    assert all(torch.equal(a[s][0], b[s][0]) and np.array_equal(a[s][1], b[s][1]) for s in a)


@pytest.mark.slow
def test_corrupt_shards_are_named_then_redone(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    generate(run, tiny_model_dir, "generate.num_samples=9", "generate.batch_size=3")
    before = dataset(run)
    shard = sorted((run / "samples" / "shards").glob("part-*.arrow"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(DatasetError, match=shard.name):
        load_samples(run)
    with pytest.raises(DatasetError, match=shard.name):
        list(iter_samples(run))
    out = generate(run, tiny_model_dir, "generate.num_samples=9", "generate.batch_size=3")
    assert "regenerating" in out.stderr and shard.name in out.stderr
    assert (run / "samples" / "corrupt" / shard.name).exists()
    after = dataset(run)
    assert sorted(after) == sorted(before)
    assert all(torch.equal(after[s][0], before[s][0]) for s in after)
    ds = load_samples(run).with_format("numpy")
    assert ds.column_names == ["sample_id", "seed", "image", "h", "x_t"] and len(ds) == 9  # x_t: generate.record_x_t
    assert ds[0]["h"].shape == (4, 16, 8, 8) and ds[0]["x_t"].shape == (4, 3, 16, 16) and ds[0]["x_t"].dtype == np.float32


@pytest.mark.slow
def test_conflicting_configuration_is_refused(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    generate(run, tiny_model_dir, "generate.num_samples=4", "generate.batch_size=2")
    shards = sorted((run / "samples" / "shards").iterdir())
    out = generate(run, tiny_model_dir, "generate.num_samples=4", "model.eta=0.5", check=False)
    assert out.returncode == 2
    assert "different configuration" in out.stderr and "eta" in out.stderr
    assert sorted((run / "samples" / "shards").iterdir()) == shards
    # extending the same configuration is fine and only adds the new seeds
    generate(run, tiny_model_dir, "generate.num_samples=6", "generate.batch_size=2")
    assert sorted(dataset(run)) == list(range(6))


@pytest.mark.slow
def test_different_weights_are_refused(tmp_path, tiny_model_dir):
    from conftest import make_tiny_unet

    other = tmp_path / "other-model"
    make_tiny_unet(seed=1).save_pretrained(other)
    (other / "scheduler_config.json").write_text((tiny_model_dir / "scheduler_config.json").read_text())
    run = tmp_path / "run"
    generate(run, tiny_model_dir, "generate.num_samples=2")
    other_copy = tmp_path / "copy"
    import shutil

    shutil.copytree(other, other_copy)
    out = generate(run, other_copy, "generate.num_samples=2", check=False)
    assert out.returncode == 2 and "assets.model" in out.stderr


@pytest.mark.slow
def test_not_enough_disk_space_stops_before_writing(tmp_path, tiny_model_dir, monkeypatch):
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", f"model.name_or_path={tiny_model_dir}",
                             "model.num_inference_steps=2", "generate.num_samples=100", "trainer.accelerator=cpu"])
    with pytest.raises(DatasetError, match="not enough disk space"):
        run_generate(cfg)
    assert not list((samples_dir(tmp_path / "run")).rglob("*.arrow"))


def _generate_in_process(run_dir, model_dir, *overrides):
    cfg = load_config(None, [*tiny_overrides(run_dir, model_dir, steps=2), "generate.num_samples=7",
                             "generate.batch_size=2", *overrides])
    return run_generate(cfg)


@pytest.mark.slow
def test_writer_thread_writes_the_same_shards_in_order(tmp_path, tiny_model_dir, monkeypatch):
    """Shards written by the writer thread (the default) are byte for byte those written in the loop,
    in batch order, all on disk before the manifest is finalised."""
    import pipeline.stages.lightning_utils as lu

    order = []
    write_part = lu.PartWriter.write_part
    monkeypatch.setattr(lu.PartWriter, "write_part", lambda self, p: order.append(p["seeds"][0]) or write_part(self, p))
    _generate_in_process(tmp_path / "loop", tiny_model_dir, "generate.writer_queue=0")
    assert order == [0, 2, 4, 6]
    order.clear()
    _generate_in_process(tmp_path / "thread", tiny_model_dir, "generate.writer_queue=1")
    assert order == [0, 2, 4, 6]
    loop, thread = samples_dir(tmp_path / "loop") / "shards", samples_dir(tmp_path / "thread") / "shards"
    names = sorted(p.name for p in loop.iterdir())
    assert names == sorted(p.name for p in thread.iterdir()) and len(names) == 4
    for name in names:
        assert (loop / name).read_bytes() == (thread / name).read_bytes(), name
    assert read_manifest(tmp_path / "thread")["complete"] and read_manifest(tmp_path / "thread")["shards"] == names


@pytest.mark.slow
def test_writer_thread_error_stops_the_stage(tmp_path, tiny_model_dir, monkeypatch):
    """A write that fails in the writer thread is raised by the stage; the parts before it are whole,
    nothing after it is written, and the manifest is not marked complete."""
    import pipeline.stages.lightning_utils as lu
    from pipeline.errors import StorageError

    write_part = lu.PartWriter.write_part

    def failing(self, p):
        if p["seeds"][0] == 2:
            raise StorageError("cannot write shard: no space left on the device")
        write_part(self, p)

    monkeypatch.setattr(lu.PartWriter, "write_part", failing)
    with pytest.raises(StorageError, match="no space left"):
        _generate_in_process(tmp_path / "run", tiny_model_dir, "generate.writer_queue=1")
    shards = sorted(p.name for p in (samples_dir(tmp_path / "run") / "shards").iterdir())
    assert len(shards) == 1 and not read_manifest(tmp_path / "run").get("complete")


@pytest.mark.slow
@pytest.mark.parametrize("override", ["trainer.precision=16-true", "trainer.precision=bf16-mixed",
                                      "trainer.precision=bf16-true"])
def test_half_precision_generates_what_float32_does_within_rounding(tmp_path, tiny_model_dir, override):
    """trainer.precision in half precision: the same samples as float32 up to the
    rounding of a half-precision U-Net (bf16-true converts the U-Net's weights itself: the engine's input
    follows them). float16 runs here on the CPU; on a GPU it is the same code path."""
    ref = dataset_of(tmp_path / "ref", tiny_model_dir)
    half = dataset_of(tmp_path / "half", tiny_model_dir, override)
    assert sorted(ref) == sorted(half) == list(range(4))
    tol = 0.05 if override.endswith("=16-true") else 0.1  # bfloat16 keeps 8 bits of mantissa
    for sid in ref:
        h32, im32 = ref[sid]
        h16, im16 = half[sid]
        assert torch.isfinite(h16.float()).all()
        assert (h16.float() - h32.float()).abs().mean() <= tol * h32.float().abs().mean()
        assert np.abs(im16.astype(float) - im32.astype(float)).mean() <= 255 * tol / 4
    assert read_manifest(tmp_path / "half")["identity"] != read_manifest(tmp_path / "ref")["identity"]


def dataset_of(run_dir, model_dir, *overrides):
    _generate_in_process(run_dir, model_dir, "generate.num_samples=4", *overrides)
    return dataset(run_dir)


@pytest.mark.parametrize("precision", ["32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true", 16, "bf16"])
def test_precision_dtypes_are_lightnings(precision):
    """The stages without a Trainer read trainer.precision as Lightning does: the weights dtype of
    *-true (the default dtype inside Fabric's context) and the autocast dtype of *-mixed."""
    import lightning

    from pipeline.dtypes import precision_dtypes

    weights, autocast = precision_dtypes(precision)
    with lightning.Fabric(accelerator="cpu", devices=1, precision=precision).autocast():
        assert torch.is_autocast_enabled("cpu") == (autocast is not None)
        if autocast is not None:
            assert torch.get_autocast_dtype("cpu") == autocast
        assert torch.get_default_dtype() == (weights or torch.float32)


def test_an_unknown_precision_is_one_clear_error():
    from pipeline.dtypes import precision_dtypes
    from pipeline.errors import InputError

    with pytest.raises(InputError, match="unknown precision 'bf15-mixed'; choose one of"):
        precision_dtypes("bf15-mixed")


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_stages_without_a_trainer_sample_at_the_trainers_precision(tmp_path, tiny_model_dir, precision):
    """trainer.precision applies to every stage: a model built for a stage that runs without a
    Lightning Trainer (sample, edit, figures, fewshot, the calibration) gives, seed for seed, the h
    and images `hspace generate` (under a Trainer) gives at that precision, and not float32's."""
    from pipeline.engine.model import HSpaceModel
    from pipeline.formats.images import to_uint8

    half = dataset_of(tmp_path / "half", tiny_model_dir, f"trainer.precision={precision}")
    cfg = load_config(None, [*tiny_overrides(tmp_path / "x", tiny_model_dir, steps=2), f"trainer.precision={precision}"])
    for model, same in ((HSpaceModel.from_config(cfg), True),
                        (HSpaceModel.from_config(cfg, precision="32-true"), False)):
        out = model.sample(seeds=[0, 1])
        images = to_uint8(out.images)
        for i, sid in enumerate((0, 1)):
            h, image = half[sid]
            assert torch.equal(out.h[i].to(h.dtype), h) == same
            if same:
                np.testing.assert_array_equal(images[i], image)
