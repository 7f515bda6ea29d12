"""Fault injection on the run directory (issue 31, its run-directory kinds), through the command line.

One small clean `hspace run` (T=3, 12 samples) is made once per module; each test damages or
misuses a copy of it and compares the outcome with the clean run by content hashes of the samples,
annotations, selection, directions, probes and Table 1 (:func:`fingerprint`): every case ends in
one clear line and exit status 2 with nothing changed, or in the clean run's content. One test per
kind: what a stage reads is what its record says (damage is rebuilt or refused, also by `hspace
run`), generate makes the dataset asked for or refuses, nothing is written before everything is
checked and a stage writes only its outputs, one writer lock per run directory, every safetensors
write atomic, Trainer settings that cannot work refused first, the right remedies, and the stages'
declarations as the one source of records, part keys and order. docs/guarantees.md names them.
"""
from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from test_faults import cli, finish, inject, one_error, spawn, temporaries, wait_for  # noqa: F401 (inject: a fixture)

TESTS = Path(__file__).resolve().parent
ANN = "annotate.annotators=[fake_annotators:brightness]"


def job(run, model_dir) -> list[str]:
    """The overrides of the small main job every test starts from."""
    return [f"run_dir={run}", f"model.name_or_path={model_dir}", "model.num_inference_steps=3", "trainer.accelerator=cpu",
            "generate.num_samples=12", "generate.batch_size=4", ANN, "annotate.batch_size=6",
            "select.attributes=[bright,red]", "select.n=3", "select.contact_sheet_size=2", "pca.n_components=2",
            "jacobian.sample_ids=[0]", "jacobian.k=1", "jacobian.tau=1", "supervised.convergence_ns=[1,3]",
            "disentangle.pairs={bright: [red]}", "edit.seeds=[100]", "report.pca_components=1",
            "report.jacobian_directions=1", "evaluate.scorer=fake_annotators:brightness", "evaluate.quality=null",
            "evaluate.num_samples=2", "evaluate.repeats=1", "evaluate.pca_components=1", "evaluate.sweep_samples=1",
            "probe.pca_components=2", "probe.batch_size=6", "fewshot.ns=[1,3]", "fewshot.draws=1", "fewshot.num_samples=2",
            "fewshot.restriction_samples=2", "calibrate.num_samples=2", "calibrate.std_samples=4", "calibrate.max_iter=2",
            "run.skip=[jacobian,fewshot]"]


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
    return h.hexdigest()[:16]


def fingerprint(run) -> dict[str, str]:
    """Content hashes of what a run holds: every sample's h and image, the annotations, the selection,
    every directions file's tensors, the probes and Table 1 (what a researcher reads)."""
    from safetensors.torch import load_file

    from pipeline.formats.samples import iter_samples

    run, out = Path(run), {}
    samples = {int(i): _digest(h.numpy().tobytes(), im.tobytes())
               for b in iter_samples(run, batch_size=64, images=True) for i, h, im in zip(b["sample_id"], b["h"], b["images"])}
    out["samples"] = _digest(sorted(samples.items()))
    for name in ("annotations.parquet", "selection.parquet"):
        out[name] = _digest(pd.read_parquet(run / name).to_csv(index=False))
    for path in sorted((run / "directions").glob("*.safetensors")):
        tensors = load_file(str(path))
        out[path.name] = _digest(*[k.encode() + v.contiguous().numpy().tobytes() for k, v in sorted(tensors.items())])
    for name in ("probes/probes.csv", "evaluation/table1_signed.csv", "evaluation-calibrated/table1_calibrated_signed.csv"):
        out[name] = _digest((run / name).read_bytes())
    return out


def tree(run) -> dict[str, tuple[int, int]]:
    """Every file under the run directory but its lock -> (size, modification time): to show nothing changed."""
    return {str(p.relative_to(run)): (p.stat().st_size, p.stat().st_mtime_ns) for p in Path(run).rglob("*")
            if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def clean(tmp_path_factory, tiny_model_dir):
    """The clean main job, run once: (its run directory, its fingerprint)."""
    from pipeline.cli import main

    run = tmp_path_factory.mktemp("clean") / "run"
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    cwd = os.getcwd()
    os.chdir(TESTS.parent / "docs")  # no conf.yaml here: only the defaults and the arguments
    try:
        assert main(["run", *job(run, tiny_model_dir)]) == 0
    finally:
        os.chdir(cwd)
        for s, h in handlers.items():
            signal.signal(s, h)
    return run, fingerprint(run)


def copy(run, tmp_path, name="run") -> Path:
    dst = tmp_path / name
    shutil.copytree(run, dst)
    return dst


def main_job(capsys, monkeypatch, run, model_dir, *extra) -> tuple[int, str]:
    return cli(capsys, monkeypatch, "run", *job(run, model_dir), *extra)


# ---------------------------------------------------------------------- 1: what a stage reads is what its record says
def truncate_shard(run):
    shard = sorted((run / "samples" / "shards").glob("part-*.arrow"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])


def delete_shard(run):
    sorted((run / "samples" / "shards").glob("part-*.arrow"))[2].unlink()


def cut_shard_list(run):
    path = run / "samples" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["shards"] = manifest["shards"][:2]
    manifest["num_samples"] = 8
    path.write_text(json.dumps(manifest))


def drop_annotation_column(run):
    path = run / "annotations.parquet"
    table = pq.read_table(path)
    pq.write_table(table.drop(["red"]).replace_schema_metadata(table.schema.metadata), path)


def empty_supervised_file(run):
    from pipeline.formats.directions import load_directions, save_directions
    from pipeline.formats.identity import read_record

    path = run / "directions" / "supervised.safetensors"
    d = load_directions(path)
    save_directions(d.subset([]), path, read_record(path))  # 0 directions, the stage's record kept


def double_a_strength(run):
    path = run / "calibration" / "strengths.json"
    strengths = json.loads(path.read_text())
    record = strengths["files"]["supervised"]["record"]
    name = next(n for n, v in record["scales"].items() if v is not None)
    record["scales"][name] *= 2
    path.write_text(json.dumps(strengths))


@pytest.mark.slow
@pytest.mark.parametrize("damage, reader, named", [
    (truncate_shard, "pca", "truncated"),
    (delete_shard, "probe", "missing"),
    (cut_shard_list, "select", "manifest.json was changed"),
    (drop_annotation_column, "select", "annotations.parquet was changed"),
    (empty_supervised_file, "evaluate", "supervised.safetensors was changed"),
    (double_a_strength, "evaluate-calibrated", "calibration was changed"),
])
def test_damaged_inputs_are_refused_by_readers_and_rebuilt_by_hspace_run(clean, tmp_path, tiny_model_dir, capsys,
                                                                          monkeypatch, damage, reader, named):
    """A stage reading a damaged input refuses it in one line with exit 2 and changes nothing; `hspace run`
    does not call it up to date but rebuilds it, to exactly the clean run's content."""
    run = copy(clean[0], tmp_path)
    damage(run)
    before = tree(run)
    rc, err = cli(capsys, monkeypatch, reader, *job(run, tiny_model_dir))
    assert rc == 2 and named in err and one_error(err, reader), err
    assert tree(run) == before
    rc, out = main_job(capsys, monkeypatch, run, tiny_model_dir)
    assert rc == 0, out[-3000:]
    assert fingerprint(run) == clean[1]
    rc, out = main_job(capsys, monkeypatch, run, tiny_model_dir)
    assert rc == 0 and out.count("up to date, skipped") == 15, out[-3000:]  # 17 steps, 2 not run (run.skip)


# ---------------------------------------------------------------------- 2: generate makes the dataset asked for, or refuses
@pytest.mark.slow
@pytest.mark.parametrize("setting", ["generate.num_samples=8", "generate.first_seed=100"])
def test_generate_never_makes_another_dataset_than_asked(clean, tmp_path, tiny_model_dir, capsys, monkeypatch, setting):
    """A smaller count or another first seed on an existing dataset: refused before anything is written,
    naming the settings that keep it and the deletion that makes the one asked for; that command then
    makes exactly the dataset asked for."""
    from pipeline.formats.samples import dataset_ids

    run = copy(clean[0], tmp_path)
    before = tree(run)
    for stage in ("generate", "run"):
        rc, err = cli(capsys, monkeypatch, stage, *job(run, tiny_model_dir), setting)
        assert rc == 2 and one_error(err, stage) and "never removes samples" in err, err
        assert "generate.first_seed=0 generate.num_samples=12" in err and f"delete {run / 'samples'}" in err
        assert tree(run) == before
    shutil.rmtree(run / "samples")
    rc, _ = cli(capsys, monkeypatch, "generate", *job(run, tiny_model_dir), setting)
    want = list(range(8)) if "num_samples" in setting else list(range(100, 112))
    assert rc == 0 and sorted(dataset_ids(run).tolist()) == want
    rc, err = cli(capsys, monkeypatch, "select", *job(run, tiny_model_dir), setting)  # the old annotations: refused
    assert rc == 2 and "different samples dataset" in err and one_error(err, "select")


# ---------------------------------------------------------------------- 3: nothing written before everything is checked
@pytest.mark.slow
def test_nothing_is_written_before_everything_is_checked(clean, tmp_path, tiny_model_dir, capsys, monkeypatch):
    """Real-image folders that do not exist, a disentangle.source made for another T, a skipped stage whose
    output a later stage needs: one line, exit 2, before any file changes (and again the second time, never
    'up to date')."""
    from pipeline.formats.directions import load_directions, save_directions

    run = copy(clean[0], tmp_path)
    before = tree(run)
    missing = [f"supervised.real.positive_dir={tmp_path / 'nope'}", f"supervised.real.negative_dir={tmp_path / 'nope2'}"]
    for stage in ("supervised", "run", "run"):
        rc, err = cli(capsys, monkeypatch, stage, *job(run, tiny_model_dir), *missing)
        assert rc == 2 and one_error(err, stage) and "nope: no such file or folder" in err, err
        assert tree(run) == before

    other_T = tmp_path / "other.safetensors"
    d = load_directions(run / "directions" / "supervised.safetensors")
    save_directions(type(d)(d.directions[:, :2], d.names, d.method, d.timesteps[:2]), other_T)
    rc, err = cli(capsys, monkeypatch, "disentangle", *job(run, tiny_model_dir), f"disentangle.source={other_T}")
    assert rc == 2 and one_error(err, "disentangle") and "T=2" in err, err
    assert tree(run) == before

    empty = tmp_path / "empty"
    rc, err = cli(capsys, monkeypatch, "run", *job(empty, tiny_model_dir), "run.skip=[supervised]")
    assert rc == 2 and one_error(err, "run") and "run.skip: supervised is skipped" in err, err
    assert not empty.exists()
    assert fingerprint(run) == clean[1]


@pytest.mark.slow
def test_a_stage_writes_only_its_outputs_and_keeps_a_users_files(clean, tmp_path, tiny_model_dir, capsys, monkeypatch):
    """disentangle reads the supervised file and leaves it as it is; figures, run again, replaces its own
    strips and keeps what a person put in edits/ (and `hspace edit` writes its grids elsewhere)."""
    run = copy(clean[0], tmp_path)
    supervised = run / "directions" / "supervised.safetensors"
    stamp = (supervised.read_bytes(), supervised.stat().st_mtime_ns)
    rc, _ = cli(capsys, monkeypatch, "disentangle", *job(run, tiny_model_dir), "calibrate.target=0.5")
    assert rc == 0 and (supervised.read_bytes(), supervised.stat().st_mtime_ns) == stamp

    (run / "edits" / "notes.txt").write_text("mine")
    (run / "edits" / "pca" / "mine.png").write_bytes(b"not a strip")
    rc, _ = cli(capsys, monkeypatch, "edit", *job(run, tiny_model_dir), "edit.directions=pca")
    grids = sorted(p.relative_to(run) for p in (run / "grids").rglob("*.png"))
    assert rc == 0 and grids == [Path("grids/pca/pc1.png"), Path("grids/pca/pc2.png")]
    rc, out = main_job(capsys, monkeypatch, run, tiny_model_dir, "report.pca_components=2")  # figures runs again
    assert rc == 0 and "figures: done" in out
    assert (run / "edits" / "notes.txt").read_text() == "mine" and (run / "edits" / "pca" / "mine.png").exists()
    assert sorted(p.relative_to(run) for p in (run / "grids").rglob("*.png")) == grids
    assert (run / "edits" / "pca" / "pc2.png").exists()
    rc, out = main_job(capsys, monkeypatch, run, tiny_model_dir, "report.pca_components=2")
    assert rc == 0 and out.count("up to date, skipped") == 15  # 17 steps, 2 not run; a person's files are not the stage's content


def test_a_stage_without_its_inputs_names_the_stage_that_writes_them_and_creates_nothing(tmp_path, capsys, monkeypatch):
    """Every stage run on its own in a run directory that lacks what it must read (here: none at all): one
    line naming the missing artefact and the command that writes it, exit 2, and no folder made (the writer
    lock is taken after the check)."""
    from pipeline.config import load_config
    from pipeline.registry import PRODUCERS, STAGES

    empty = tmp_path / "nothing-here"
    cfg = load_config(None, [f"run_dir={empty}"])
    for st in STAGES:
        needs = [a for a in st.required(cfg) if a in PRODUCERS]
        if not needs:
            continue
        rc, err = cli(capsys, monkeypatch, st.name, f"run_dir={empty}")
        assert rc == 2 and one_error(err, st.name), (st.name, err)
        assert f"{empty / needs[0]} is missing: run `hspace {PRODUCERS[needs[0]]} run_dir={empty}` first" in err, err
        assert not empty.exists(), st.name
    rc, err = cli(capsys, monkeypatch, "evaluate-calibrated", f"run_dir={empty}")
    assert "run `hspace calibrate" in err  # the calibrated evaluation's first need: the calibration


# ---------------------------------------------------------------------- 4: one writer lock per run directory
@pytest.mark.slow
def test_one_writer_per_run_directory_and_readers_need_no_lock(clean, tmp_path, tiny_model_dir, inject):  # noqa: F811
    """While `hspace run` writes (held inside generate), any other writer of the run directory is refused
    naming it; edit and sample writing elsewhere only read the run (nothing created in it)."""
    run = copy(clean[0], tmp_path)
    args = [*job(run, tiny_model_dir)]
    hold = tmp_path / "hold"
    hold.touch()
    held = spawn("run", *args, "generate.num_samples=16", env={"HOLD_AT": "1", "HOLD": str(hold),
                                                                "PYTHONPATH": str(inject)})
    wait_for((run / "samples" / "shards", ".part-0000000012*"), held)
    for stage in ("generate", "select", "supervised"):
        rc, err = finish(spawn(stage, *args))
        assert rc == 2 and "is in use: `hspace run` is writing there" in err and one_error(err, stage), err
    hold.unlink()
    rc, err = finish(held)
    assert rc == 0, err[-2000:]

    ro = copy(clean[0], tmp_path, "read-only")
    before = tree(ro)
    if os.geteuid() != 0:  # root writes through permission bits: there the unchanged tree is the check
        for p in [ro, *ro.rglob("*")]:
            p.chmod(p.stat().st_mode & ~0o222)
    out = tmp_path / "elsewhere"
    try:
        rc, err = finish(spawn("edit", *job(ro, tiny_model_dir), "edit.directions=supervised", f"edit.out_dir={out}"))
        assert rc == 0, err[-2000:]
        rc, err = finish(spawn("sample", *job(ro, tiny_model_dir), f"sample.directions={ro}/directions/pca.safetensors",
                               "sample.scales=[-1,0,1]", "sample.seeds=[0,1]", f"sample.out={out / 's.png'}"))
        assert rc == 0, err[-2000:]
    finally:
        for p in [ro, *ro.rglob("*")]:
            p.chmod(p.stat().st_mode | 0o200)
    assert tree(ro) == before and sorted(p.name for p in out.iterdir()) == ["bright.png", "red.png", "s.png"]


# ---------------------------------------------------------------------- 5: every safetensors write through the atomic writer
def _file_size_limit(limit: int):
    def set_limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as a full disk does
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return set_limit


@pytest.mark.slow
def test_safetensors_writes_are_atomic_and_their_failures_one_line(clean, tmp_path, tiny_model_dir):
    """A file system that refuses a directions file midway (the file-size limit as a full disk): one line
    naming it, exit 2, the old file and no temporary of any kind; a temporary safetensors' own writer
    left (SIGKILL) is swept by the next writer."""
    run = copy(clean[0], tmp_path)
    pca = run / "directions" / "pca.safetensors"
    old = pca.read_bytes()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([str(Path(sys.executable).parent / "hspace"), "pca", *job(run, tiny_model_dir),
                           "pca.n_components=3"], cwd=TESTS, env=env, capture_output=True, text=True,
                          preexec_fn=_file_size_limit(len(old) // 2))
    assert proc.returncode == 2 and one_error(proc.stderr, "pca"), proc.stderr[-3000:]
    assert "cannot write" in proc.stderr and "safetensors" in proc.stderr
    assert pca.read_bytes() == old and temporaries(run) == [] and not list(run.rglob(".tmp*"))

    leftover = run / "directions" / ".tmpAb12Cd"  # what safetensors' save_file leaves when killed
    leftover.write_bytes(b"half a file")
    rc, err = finish(spawn("select", *job(run, tiny_model_dir)))
    assert rc == 0 and "removed 1 temporary file" in err and not leftover.exists(), err[-2000:]


def test_no_module_writes_safetensors_but_through_the_atomic_writer():
    """safetensors' save_file writes a temporary of its own (a SIGKILL leaves it, a full disk raises
    SafetensorError): the pipeline calls it nowhere; pipeline.io.save_safetensors is the one writer."""
    root = TESTS.parent
    callers = [str(p.relative_to(root)) for package in ("pipeline", "annotators", "evaluation", "toyfaces", "bench")
               for p in (root / package).rglob("*.py") if "save_file(" in p.read_text()]
    assert callers == []


# ---------------------------------------------------------------------- 6: Trainer settings that cannot work
@pytest.mark.slow
def test_trainer_settings_that_cannot_work_are_refused_before_anything_is_written(tmp_path, tiny_model_dir, capsys,
                                                                                   monkeypatch):
    """Lightning's own checks of accelerator, devices and strategy, and several nodes outside a cluster
    (which would wait forever, deaf to SIGTERM): one line, exit 2, the run directory not even created."""
    no_gpu = "trainer.accelerator=tpu" if torch.cuda.is_available() else "trainer.accelerator=gpu"
    run = tmp_path / "run"
    for setting, named in ((no_gpu, "trainer.accelerator="), ("trainer.strategy=bogus", "bogus"),
                           ("trainer.devices=[0,1]", "trainer.devices=[0, 1]")):
        for stage in ("generate", "run"):
            rc, err = cli(capsys, monkeypatch, stage, *job(run, tiny_model_dir), setting)
            assert rc == 2 and named in err and one_error(err, stage), err
    assert not run.exists()
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "NODE_RANK", "SLURM_NTASKS", "WORLD_SIZE")}
    proc = subprocess.run([str(Path(sys.executable).parent / "hspace"), "generate", *job(run, tiny_model_dir),
                           "trainer.num_nodes=2"], cwd=TESTS, env={**env, "PYTHONPATH": f"{TESTS}{os.pathsep}"
                                                                   f"{os.environ.get('PYTHONPATH', '')}"},
                          capture_output=True, text=True, timeout=600)  # a safety net for the hang: not a timing
    assert proc.returncode == 2 and "trainer.num_nodes=2: no cluster environment" in proc.stderr, proc.stderr[-2000:]
    assert one_error(proc.stderr, "generate") and not run.exists()


# ---------------------------------------------------------------------- 7: messages with the right remedy
@pytest.mark.slow
def test_messages_name_the_remedy_that_works(clean, tmp_path, tiny_model_dir, capsys, monkeypatch):
    """A corrupt manifest: deleting it alone (as the message says) and re-running generate recovers the same
    dataset; a manifest whose count was changed sends annotate's user to generate, which repairs it."""
    from pipeline.formats.samples import read_manifest

    run = copy(clean[0], tmp_path)
    manifest = run / "samples" / "manifest.json"
    manifest.write_text(manifest.read_text()[:50])
    rc, err = cli(capsys, monkeypatch, "generate", *job(run, tiny_model_dir))
    assert rc == 2 and one_error(err, "generate") and "delete that file alone" in err and "samples away" not in err
    manifest.unlink()
    assert cli(capsys, monkeypatch, "generate", *job(run, tiny_model_dir))[0] == 0
    assert fingerprint(run) == clean[1] and read_manifest(run)["record"] == read_manifest(clean[0])["record"]

    data = json.loads(manifest.read_text())
    data["num_samples"] = 10
    manifest.write_text(json.dumps(data))
    rc, err = cli(capsys, monkeypatch, "annotate", *job(run, tiny_model_dir))
    remedy = err.split("error:", 1)[1]
    assert rc == 2 and one_error(err, "annotate") and "re-run `hspace generate" in remedy and "annotate" not in remedy, err
    assert cli(capsys, monkeypatch, "generate", *job(run, tiny_model_dir))[0] == 0
    assert cli(capsys, monkeypatch, "annotate", *job(run, tiny_model_dir))[0] == 0
    assert fingerprint(run) == clean[1]


# ---------------------------------------------------------------------- 8: stages declare, the machinery derives
def test_records_part_keys_and_order_derive_from_the_declarations(tmp_path):
    """Every stage's record is its declaration's: a configuration key changes exactly the stages that
    declare it (and those reading them); the main job's order is a topological order of the declared
    reads, whatever order the records are listed in; no stage writes a record or a Trainer of its own."""
    from pipeline import registry
    from pipeline.config import load_config

    known = {st.artefact: f"id-of-{st.name}" for st in registry.STAGES}
    cfg = load_config(None, [f"run_dir={tmp_path}"])
    for st in registry.STAGES:
        record = st.identity(cfg, known)
        config, assets, reads = st.inputs(cfg, known)
        assert record["inputs"] == {"config": config, "assets": assets, "artefacts": {n: known[n] for n in reads}}
    changed = load_config(None, [f"run_dir={tmp_path}", "select.n=7"])
    assert {st.name for st in registry.STAGES if st.identity(cfg, known) != st.identity(changed, known)} == {"select"}
    changed = load_config(None, [f"run_dir={tmp_path}", "evaluate.scale=0.5"])  # read by every calibration
    assert {st.name for st in registry.STAGES if st.identity(cfg, known) != st.identity(changed, known)} == {
        "calibrate", "evaluate", "evaluate-calibrated"}
    changed = load_config(None, [f"run_dir={tmp_path}", "evaluate.sweep_multiples=[-1,1]"])  # the further part only
    assert {st.name for st in registry.STAGES if st.identity(cfg, known) != st.identity(changed, known)} == {
        "evaluate-calibrated"}
    shuffled = registry.ordered(tuple(reversed(registry._MAIN_JOB)))
    for order in (registry.STAGES, shuffled):
        seen = set()
        for st in order:
            assert set(st.after) <= seen, st.name
            seen.add(st.name)
    root = TESTS.parent / "pipeline" / "stages"
    for path in root.glob("*.py"):
        text = path.read_text()
        assert "make_record(" not in text and "def identity(" not in text and "weights_identity(" not in text, path.name
        assert "make_trainer(" not in text or path.stem in ("lightning_utils", "pca", "sae", "sae_features"), path.name
    assert not hasattr(__import__("pipeline.stages.run", fromlist=["x"]), "stage_hashes")
