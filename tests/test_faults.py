"""Fault injection through the command line (issue: the run directory as a trustworthy dataset).

Each test reproduces one fault a hostile but realistic user meets, asserts the clear outcome
(exit status, one line naming what is wrong) and that afterwards no data is lost, duplicated or
mislabelled: sample ids counted, h compared with the model sampled afresh, annotations
describing exactly the samples on disk. docs/guarantees.md lists which test covers which
guarantee. Commands run in-process through ``pipeline.cli.main`` where nothing but the exit
matters, and as subprocesses where signals, locks and dying processes are the point; tests that
run stages are marked slow (``make test-fast`` keeps the quick checks of messages and writes).
"""
from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.formats.samples import iter_samples, read_manifest

HSPACE = str(Path(sys.executable).parent / "hspace")
TESTS = Path(__file__).resolve().parent
ANN = ["annotate.annotators=[fake_annotators:brightness]", "annotate.batch_size=4"]


def common(run, model_dir, steps=3):
    return [f"run_dir={run}", f"model.name_or_path={model_dir}", f"model.num_inference_steps={steps}",
            "trainer.accelerator=cpu"]


def cli(capsys, monkeypatch, stage, *args) -> tuple[int, str]:
    """`hspace <stage> args` in this process -> (exit status, stdout + stderr); signal handlers restored."""
    from pipeline.cli import main

    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    monkeypatch.chdir(tempfile.mkdtemp(prefix="hspace-cli-"))  # no conf.yaml: only the defaults and the arguments
    capsys.readouterr()
    try:
        rc = main([stage, *map(str, args)])
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    out = capsys.readouterr()
    return rc, out.out + out.err


def one_error(err: str, stage: str) -> bool:
    """Exactly one error line for the stage, and no traceback."""
    return err.count(f"hspace {stage}: error:") == 1 and "Traceback" not in err


def spawn(stage, *args, env=None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {}),
           "PYTHONPATH": os.pathsep.join([str(TESTS), *(env or {}).get("PYTHONPATH", "").split(os.pathsep),
                                          os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([HSPACE, stage, *map(str, args)], cwd=TESTS, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=300) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def dataset(run) -> dict[int, torch.Tensor]:
    """sample_id -> h, asserting no sample appears twice."""
    out = {}
    for b in iter_samples(run, batch_size=64):
        for sid, h in zip(b["sample_id"].tolist(), b["h"]):
            assert sid not in out, f"sample {sid} twice"
            out[sid] = h.clone()
    return out


def assert_h_is_fresh(run, model_dir, seeds, steps, eta=0.0):
    """The stored h of these seeds equals the model sampled afresh (float16 storage)."""
    from pipeline import HSpaceModel

    model = HSpaceModel.from_pretrained(str(model_dir), num_inference_steps=steps, eta=eta, device="cpu")
    stored = dataset(run)
    fresh = model.sample(list(seeds)).h
    for i, s in enumerate(seeds):
        torch.testing.assert_close(stored[s].float(), fresh[i].float(), atol=2e-3, rtol=2e-3)


def temporaries(run) -> list[Path]:
    return [p for p in Path(run).rglob("*") if ".tmp" in p.name]


def wait_for(path_glob: tuple[Path, str], proc, n=1, timeout=300):
    folder, pattern = path_glob
    deadline = time.time() + timeout
    while not (folder.exists() and len(list(folder.glob(pattern))) >= n):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() < deadline
        time.sleep(0.02)


@pytest.fixture(scope="module")
def inject(tmp_path_factory) -> Path:
    """A folder for PYTHONPATH whose sitecustomize makes the shard writer of a subprocess fail with
    ENOSPC at its FULL_AT-th shard (after writing a few bytes), or wait at its HOLD_AT-th shard (its
    temporary file open) for as long as the file HOLD exists."""
    folder = tmp_path_factory.mktemp("inject")
    (folder / "sitecustomize.py").write_text(
        "import errno, os, time\n"
        "import pyarrow as pa\n"
        "_new_stream, _calls = pa.ipc.new_stream, [0]\n"
        "def new_stream(sink, schema, **kw):\n"
        "    _calls[0] += 1\n"
        "    while _calls[0] == int(os.environ.get('HOLD_AT', 0)) and os.path.exists(os.environ['HOLD']):\n"
        "        time.sleep(0.05)\n"
        "    if _calls[0] == int(os.environ.get('FULL_AT', 0)):\n"
        "        sink.write(b'half a shard')\n"
        "        raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "    return _new_stream(sink, schema, **kw)\n"
        "pa.ipc.new_stream = new_stream\n")
    return folder


@pytest.fixture(scope="module")
def annotated(tmp_path_factory, tiny_model_dir):
    """A run with 8 samples (ids 0..7), annotated."""
    from pipeline.cli import main

    run = tmp_path_factory.mktemp("faults") / "run"
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        assert main(["generate", *common(run, tiny_model_dir), "generate.num_samples=8", "generate.batch_size=4"]) == 0
        assert main(["annotate", *common(run, tiny_model_dir), *ANN]) == 0
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    return run


def copy(run, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


# ---------------------------------------------------------------------- 1: an earlier sample set
@pytest.mark.slow
def test_annotations_of_an_earlier_sample_set_are_refused_then_rebuilt(annotated, tmp_path, tiny_model_dir,
                                                                         capsys, monkeypatch):
    from test_annotate import expected_brightness

    run = copy(annotated, tmp_path)
    args = common(run, tiny_model_dir)
    shutil.rmtree(run / "samples")
    assert cli(capsys, monkeypatch, "generate", *args, "generate.num_samples=8", "generate.batch_size=4",
               "generate.first_seed=100")[0] == 0
    rc, err = cli(capsys, monkeypatch, "select", *args, "select.attributes=[bright]", "select.n=2")
    assert rc == 2 and "different samples dataset" in err and "hspace annotate" in err
    assert not (run / "selection.parquet").exists()

    rc, err = cli(capsys, monkeypatch, "annotate", *args, *ANN)
    assert rc == 0 and "removed 2 annotation part(s) of samples that are no longer in the dataset" in err
    df = pd.read_parquet(run / "annotations.parquet")
    assert list(df.sample_id) == list(range(100, 108))  # exactly the samples on disk, once each
    parts = pd.concat([pd.read_parquet(p) for p in (run / "annotations" / "parts").glob("*.parquet")])
    assert sorted(parts.sample_id) == list(range(100, 108))  # the old parts are gone
    ref = expected_brightness(run)
    np.testing.assert_allclose(df.bright, ref.bright, atol=1e-5)  # scores of these images, not the old ones
    rc, _ = cli(capsys, monkeypatch, "select", *args, "select.attributes=[bright]", "select.n=2")
    assert rc == 0 and set(pd.read_parquet(run / "selection.parquet").sample_id) <= set(range(100, 108))


@pytest.mark.slow
def test_readers_check_the_whole_chain(annotated, tmp_path, tiny_model_dir, capsys, monkeypatch):
    """A selection made before the samples changed is refused by supervised, naming what changed."""
    run = copy(annotated, tmp_path)
    args = common(run, tiny_model_dir)
    assert cli(capsys, monkeypatch, "select", *args, "select.attributes=[bright]", "select.n=2")[0] == 0
    assert cli(capsys, monkeypatch, "generate", *args, "generate.num_samples=10", "generate.batch_size=4")[0] == 0
    rc, err = cli(capsys, monkeypatch, "supervised", *args, "supervised.convergence_ns=[1]")
    assert rc == 2 and "annotations.parquet was made from a different samples dataset" in err
    assert not (run / "directions" / "supervised.safetensors").exists()
    assert cli(capsys, monkeypatch, "annotate", *args, *ANN)[0] == 0  # extends: 2 new samples annotated
    assert list(pd.read_parquet(run / "annotations.parquet").sample_id) == list(range(10))
    rc, err = cli(capsys, monkeypatch, "supervised", *args, "supervised.convergence_ns=[1]")
    assert rc == 2 and "selection.parquet was made from a different annotations" in err


# ---------------------------------------------------------------------- 2: shards without a manifest
@pytest.mark.slow
def test_shards_without_manifest_are_checked_before_adoption(annotated, tmp_path, tiny_model_dir, capsys, monkeypatch):
    run = copy(annotated, tmp_path)
    args = common(run, tiny_model_dir)
    before = {p.name: p.read_bytes() for p in (run / "samples" / "shards").iterdir()}
    (run / "samples" / "manifest.json").unlink()
    rc, err = cli(capsys, monkeypatch, "generate", *args, "generate.num_samples=8", "model.eta=1.0")
    assert rc == 2 and "part-0000000000" in err and "eta" in err and "different configuration" in err
    assert not (run / "samples" / "manifest.json").exists()  # nothing claims eta 1 over eta-0 data
    rc, err = cli(capsys, monkeypatch, "generate", *args, "generate.num_samples=8")
    assert rc == 0
    assert {p.name: p.read_bytes() for p in (run / "samples" / "shards").iterdir()} == before  # adopted as they were
    manifest = read_manifest(run)
    assert manifest["complete"] and manifest["num_samples"] == 8 and manifest["model"]["eta"] == [0.0] * 3
    assert sorted(dataset(run)) == list(range(8))
    assert_h_is_fresh(run, tiny_model_dir, [0, 7], steps=3)
    assert cli(capsys, monkeypatch, "select", *args, "select.attributes=[bright]", "select.n=2")[0] == 0  # same dataset


# ---------------------------------------------------------------------- 3: errors before the expensive work
@pytest.mark.slow
def test_jacobian_settings_fail_before_any_work_and_keep_parts(tmp_path, tiny_model_dir, capsys, monkeypatch):
    from PIL import Image

    run = tmp_path / "run"
    args = [*common(run, tiny_model_dir), "jacobian.sample_ids=[0]", "jacobian.k=1",
            "jacobian.tau=1"]
    mask = tmp_path / "mask.png"
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(mask)  # the model's images are 16x16
    rc, err = cli(capsys, monkeypatch, "jacobian", *args, f"jacobian.mask={mask}")
    assert rc == 0 and err.count("hspace jacobian: warning: the mask") == 1 and "resized" in err
    part = run / "jacobian" / "parts" / "sample-0000000000.safetensors"
    stamp = part.stat().st_mtime_ns
    from pipeline.cost import COUNTERS

    for bad in ("jacobian.tau=3", "jacobian.steps=[0,5]"):
        before = COUNTERS.snapshot()
        rc, err = cli(capsys, monkeypatch, "jacobian", *args, bad, f"jacobian.mask={mask}")
        assert rc == 2 and bad.split("=")[0] in err and one_error(err, "jacobian"), err
        assert COUNTERS.snapshot() == before  # no U-Net pass, Jacobian product or image before the error
        assert part.exists() and part.stat().st_mtime_ns == stamp  # nothing deleted, nothing recomputed


# ---------------------------------------------------------------------- 3, 4, 9, 10: the configuration, before any work
def test_configuration_faults_are_one_line_before_any_work(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """The checks themselves are helper config's (tests/test_config.py); here: through the CLI, each
    is one line, exit 2, and nothing is written to the run directory."""
    run = tmp_path / "run"
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model:\n  eta: [0, 1\n")
    cases = [("generate", ["trainer.devices=0"], "trainer.devices=0"),
             ("jacobian", ["jacobian.tau=5"], "jacobian.tau=5"),
             ("generate", ["model.eta=[0,1]"], "model.eta"),
             ("config", ["model=3"], "model=3"),
             ("config", ["--config", bad_yaml], f"{bad_yaml}:3:1")]
    for stage, extra, named in cases:
        rc, err = cli(capsys, monkeypatch, stage, *common(run, tiny_model_dir), *extra)
        assert rc == 2 and named in err and one_error(err, stage), err
    assert not run.exists()
    rc, out = cli(capsys, monkeypatch, "config", "--config", TESTS.parent / "conf.paper.yaml",
                  "evaluate.scorer_options.pretrained=/local/clip.pt")
    assert rc == 0 and "pretrained: /local/clip.pt" in out and "prompts: paper" in out  # one key set, the others kept


# ---------------------------------------------------------------------- 5: disk full, stale temporaries
@pytest.mark.slow
def test_disk_full_is_one_line_and_leaves_nothing_behind(tmp_path, tiny_model_dir, inject):
    run = tmp_path / "run"
    args = [*common(run, tiny_model_dir), "generate.num_samples=8", "generate.batch_size=2"]
    rc, err = finish(spawn("generate", *args, env={"FULL_AT": "3", "PYTHONPATH": str(inject)}))
    assert rc == 2 and "no space left" in err and "part-0000000004-0000000005-n2.arrow" in err
    assert one_error(err, "generate"), err
    assert temporaries(run) == []
    assert len(list((run / "samples" / "shards").glob("part-*.arrow"))) == 2  # the two whole shards before it

    # a temporary left by a process that is gone (SIGKILL: no handler ran) is swept by the next run
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    from pipeline.io import _HOST

    stale = run / "samples" / "shards" / f".part-0000000006-0000000007-n2.arrow.{dead.pid}-{_HOST}.tmp.arrow"
    stale.write_bytes(b"half")
    rc, err = finish(spawn("generate", *args))
    assert rc == 0 and "removed 1 temporary file" in err
    assert temporaries(run) == [] and sorted(dataset(run)) == list(range(8))
    assert_h_is_fresh(run, tiny_model_dir, [4, 5], steps=3)


def test_disk_space_message_has_readable_units():
    from pipeline.stages.generate import _size

    assert (_size(1500), _size(2_500_000), _size(3e9), _size(12)) == ("1.50 kB", "2.50 MB", "3.00 GB", "12 bytes")


def test_atomic_write_removes_its_temporary_on_any_failure(tmp_path):
    from pipeline.errors import Interrupted, StorageError
    from pipeline.io import atomic_path

    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(StorageError, match=f"cannot write {target}: no space left"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(Interrupted):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise Interrupted("SIGINT")
    assert target.read_text() == "old" and sorted(tmp_path.iterdir()) == [target]


@pytest.mark.parametrize("error", ["DatasetError", "ModelLoadError", "StorageError", "ConfigError"])
def test_atomic_write_passes_the_pipelines_own_errors_through(tmp_path, error):
    # DatasetError & co. are OSErrors too; they already say what is wrong and must not become "cannot write"
    from pipeline import errors
    from pipeline.io import atomic_path

    target = tmp_path / "out.json"
    target.write_text("old")
    inner = getattr(errors, error)("runs/x/samples is from another configuration; use a new run_dir")
    with pytest.raises(type(inner)) as caught:
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise inner
    assert caught.value is inner and "cannot write" not in str(caught.value)
    assert target.read_text() == "old" and sorted(tmp_path.iterdir()) == [target]


# ---------------------------------------------------------------------- 6: wrong directions, bad images
def test_directions_of_another_shape_are_refused_before_sampling(tmp_path, tiny_model_dir, capsys, monkeypatch):
    from pipeline.formats.directions import Directions, save_directions

    path = tmp_path / "other.safetensors"
    save_directions(Directions(torch.zeros(1, 3, 4, 2, 2), ["x"], "test", [600, 300, 0]), path)
    run = tmp_path / "run"
    for stage, key in (("edit", "edit.directions"), ("sample", "sample.directions")):
        rc, err = cli(capsys, monkeypatch, stage, *common(run, tiny_model_dir), f"{key}={path}")
        assert rc == 2 and str(path) in err and "(3, 16, 8, 8)" in err and one_error(err, stage), err
    assert not (run / "grids").exists() and not (run / "sample.png").exists()


@pytest.mark.slow
def test_real_image_folders_name_a_bad_file_and_say_once_that_they_resize(annotated, tmp_path, tiny_model_dir,
                                                                          capsys, monkeypatch):
    from PIL import Image

    run = copy(annotated, tmp_path)
    args = common(run, tiny_model_dir)
    assert cli(capsys, monkeypatch, "select", *args, "select.attributes=[bright]", "select.n=2")[0] == 0
    pos, neg = tmp_path / "pos", tmp_path / "neg"
    for folder, value in ((pos, 200), (neg, 50)):
        folder.mkdir()
        for i in range(2):
            Image.fromarray(np.full((24, 20, 3), value + i, np.uint8)).save(folder / f"{i}.png")
    (pos / "notes.png").write_text("not an image")
    real = [f"supervised.real.positive_dir={pos}", f"supervised.real.negative_dir={neg}", "supervised.convergence_ns=[1]",
            "calibrate.enabled=false"]
    rc, err = cli(capsys, monkeypatch, "supervised", *args, *real)
    assert rc == 2 and str(pos / "notes.png") in err and one_error(err, "supervised")
    assert not (run / "directions" / "real.safetensors").exists()
    (pos / "notes.png").unlink()
    rc, err = cli(capsys, monkeypatch, "supervised", *args, *real)
    assert rc == 0 and err.count("hspace supervised: warning:") == 2, err  # once per folder, not once per image


# ---------------------------------------------------------------------- 7, 8: signals and the lock
@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_and_concurrent_runs(tmp_path, tiny_model_dir, inject, sig):
    """A second writer of the same stage is refused naming the holder; SIGINT/SIGTERM end with 130
    and the resume message; a SIGKILLed holder's lock is taken over; the dataset ends whole."""
    run = tmp_path / "run"
    args = [*common(run, tiny_model_dir), "generate.num_samples=24", "generate.batch_size=2"]
    hold = tmp_path / "hold"
    hold.touch()
    held = {"HOLD_AT": "3", "HOLD": str(hold), "PYTHONPATH": str(inject)}  # waits inside its third shard's write
    shards = (run / "samples" / "shards", "part-*.arrow")
    first = spawn("generate", *args, env=held)
    wait_for(shards, first, n=2)
    rc, err = finish(spawn("generate", *args))
    assert rc == 2 and f"process {first.pid}" in err and "is in use" in err and one_error(err, "generate"), err
    first.send_signal(sig)
    rc, err = finish(first)
    assert rc == 130 and "interrupted; re-run the same command to resume" in err and "Traceback" not in err, err
    assert temporaries(run) == [] and len(list(shards[0].glob(shards[1]))) == 2

    killed = spawn("generate", *args, env=held)  # resumes: its third shard is the fifth
    wait_for(shards, killed, n=4)
    while not temporaries(run):
        time.sleep(0.02)
    killed.kill()
    killed.wait()
    rc, err = finish(spawn("generate", *args))  # the dead holder's lock is taken over, its temporary swept
    assert rc == 0 and "removed 1 temporary file" in err, err
    assert temporaries(run) == []
    assert sorted(dataset(run)) == list(range(24)) and read_manifest(run)["complete"]
    assert_h_is_fresh(run, tiny_model_dir, [0, 11, 23], steps=3)


# ---------------------------------------------------------------------- 10: messages
def test_a_damaged_local_model_folder_is_not_told_to_download(tmp_path, tiny_model_dir, capsys, monkeypatch):
    broken = tmp_path / "model"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "config.json").write_text("{not json")
    rc, err = cli(capsys, monkeypatch, "generate", *common(tmp_path / "run", broken))
    assert rc == 2 and str(broken) in err and "damaged" in err and "huggingface-cli" not in err


def test_a_command_closes_the_process_group_it_ran_in(tmp_path, monkeypatch, capsys):
    """Left open to the interpreter's exit, gloo's threads abort a finished multi-process command
    ("terminate called without an active exception"); the command line closes the group itself."""
    import torch.distributed as dist

    from pipeline.cli import main

    monkeypatch.chdir(tmp_path)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert main(["config", f"run_dir={tmp_path / 'run'}"]) == 0
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
