"""Faults in what a user gives hspace (issue 31, inputs): override values, numbers the schema accepts,
prompts files, directions files, annotator scores, model folders, the hook point.

Each test goes through the command line (``pipeline.cli.main``, or a subprocess where argparse
exits) and asserts the outcome: one error line naming the problem, exit status 2 and nothing
written, or the correct result. docs/guarantees.md's "Inputs" table lists which test covers which
kind.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from test_faults import ANN, cli, common, one_error

HSPACE = str(Path(sys.executable).parent / "hspace")
SEED_MAX = 2**63 - 1


def written(run: Path) -> list[Path]:
    """The files under ``run``, its lock files left out."""
    return [p for p in Path(run).rglob("*") if p.is_file() and "lock" not in str(p.relative_to(run))] \
        if Path(run).exists() else []


def resolved(capsys, monkeypatch, *overrides) -> dict:
    """`hspace config <overrides>` -> the printed configuration."""
    rc, out = cli(capsys, monkeypatch, "config", *overrides)
    assert rc == 0, out
    return yaml.safe_load(out)


# ---------------------------------------------------------------------- override values
def test_overrides_are_text_where_the_schema_says_string(capsys, monkeypatch):
    cfg = resolved(capsys, monkeypatch, "model.prompt=a photo # of a cat", "run_dir=runs/x #1", "sample.direction=007",
                   "model.negative_prompt='quoted # whole'", "model.hook=up_blocks.0", "sample.out=",
                   "evaluate.quality=null", "evaluate.scorer=clip", "evaluate.scorer_options={prompts: paper}",
                   "evaluate.scorer_options.pretrained=/w/clip #2.pt", "evaluate.attributes=[smile]",
                   "evaluate.quality_score=x", "generate.prompts=['a # b']", "jacobian.tol=1e-4")
    assert cfg["model"]["prompt"] == "a photo # of a cat" and cfg["run_dir"] == "runs/x #1"
    assert cfg["sample"]["direction"] == "007"  # a name, not the number 7
    assert cfg["model"]["negative_prompt"] == "quoted # whole"  # quoted whole: unquoted
    assert cfg["model"]["hook"] == "up_blocks.0" and cfg["sample"]["out"] is None and cfg["evaluate"]["quality"] is None
    assert cfg["evaluate"]["scorer_options"] == {"prompts": "paper", "pretrained": "/w/clip #2.pt"}  # inside a mapping
    assert cfg["generate"]["prompts"] == ["a # b"] and cfg["jacobian"]["tol"] == 1e-4  # YAML where it is structure
    rc, err = cli(capsys, monkeypatch, "config", "generate.prompts=a # b")  # a list given as text: said, not cut
    assert rc == 2 and one_error(err, "config") and "generate.prompts='a # b' in the command line: Input should be a " \
        "valid list" in err, err


@pytest.mark.slow
def test_a_run_dir_with_a_hash_gets_the_outputs(tmp_path, tiny_model_dir, capsys, monkeypatch):
    run = tmp_path / "runs" / "x #1"
    run.mkdir(parents=True)  # sample writes into a run directory that exists (a first look makes none)
    rc, err = cli(capsys, monkeypatch, "sample", *common(run, tiny_model_dir, steps=2), "sample.seeds=[0]")
    assert rc == 0, err
    assert (run / "sample.png").is_file() and written(tmp_path / "runs") == [run / "sample.png"]


# ---------------------------------------------------------------------- numbers the schema accepts
@pytest.mark.parametrize("overrides, named", [
    (["generate.first_seed=9223372036854775806", "generate.num_samples=4"], "generate.first_seed=9223372036854775806"),
    ([f"sample.seeds=[0, {SEED_MAX + 1}]"], f"sample.seeds[1]={SEED_MAX + 1}"),
    ([f"edit.seeds=[{2**64}]"], f"edit.seeds[0]={2**64}"),
    ([f"jacobian.sample_ids=[{2**63}]"], "jacobian.sample_ids[0]"),
    ([f"evaluate.first_seed={SEED_MAX - 10}"], "evaluate.first_seed"),  # 3 repeats x 16 seeds run past 2**63
    ([f"calibrate.first_seed={SEED_MAX}"], "calibrate.first_seed"),
    ([f"fewshot.first_seed={SEED_MAX - 8}"], "fewshot.first_seed"),  # its 32 restriction seeds
    ([f"pca.seed={2**64}"], "pca.seed"),
    ([f"supervised.seed={2**32}"], "supervised.seed"),  # scikit-learn's random_state
    (["probe.seed=-1"], "probe.seed"),
    (["sample.scales=[0, .inf]"], "sample.scales[1]=inf"),
    (["evaluate.scale=.nan"], "evaluate.scale=nan"),
    (["model.eta=[0, .inf, 0]", "model.num_inference_steps=3"], "model.eta"),
    (["train_toy.correlations={glasses~hair: -.inf}"], "train_toy.correlations"),
    (["run_dir="], "run_dir=''"),
])
def test_numbers_that_cannot_work_are_refused_at_load(overrides, named, capsys, monkeypatch):
    rc, err = cli(capsys, monkeypatch, "config", *overrides)
    assert rc == 2 and one_error(err, "config") and f"error: {named}" in err, err


def test_the_largest_seeds_are_accepted(capsys, monkeypatch):
    cfg = resolved(capsys, monkeypatch, f"generate.first_seed={SEED_MAX - 3}", "generate.num_samples=4",
                   f"sample.seeds=[{SEED_MAX}]", f"supervised.seed={2**32 - 1}", f"pca.seed={SEED_MAX}")
    assert cfg["generate"]["first_seed"] == SEED_MAX - 3 and cfg["sample"]["seeds"] == [SEED_MAX]


@pytest.mark.slow
@pytest.mark.parametrize("first", [10**10 - 1, SEED_MAX - 1])
def test_the_largest_seeds_make_a_dataset(first, tmp_path, tiny_model_dir, capsys, monkeypatch):
    """Seeds of more than 10 digits (shard names past the width of their format) and the last two the
    schema accepts make a complete dataset: the first were left out of it while "2 samples" was
    printed, the second crashed after sampling started."""
    from test_faults import dataset

    from pipeline import HSpaceModel

    run = tmp_path / "run"
    rc, err = cli(capsys, monkeypatch, "generate", *common(run, tiny_model_dir, steps=2), f"generate.first_seed={first}",
                  "generate.num_samples=2", "generate.batch_size=1")
    assert rc == 0, err
    stored = dataset(run)
    assert sorted(stored) == [first, first + 1]
    fresh = HSpaceModel.from_pretrained(str(tiny_model_dir), num_inference_steps=2, device="cpu").sample([first + 1]).h[0]
    torch.testing.assert_close(stored[first + 1].float(), fresh, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("port", ["70000", "-1", "http"])
def test_a_port_outside_0_to_65535_is_one_line(port, tmp_path):
    out = subprocess.run([HSPACE, "explore", "--port", port, f"run_dir={tmp_path / 'run'}"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith(f"hspace explore: error: argument --port: '{port}' is not a port: give 1-65535")
    assert not (tmp_path / "run").exists()


def test_a_config_file_that_is_not_utf8_is_one_line(tmp_path, capsys, monkeypatch):
    f = tmp_path / "c.yaml"
    f.write_bytes("model:\n  prompt: un café\n".encode("latin-1"))
    rc, err = cli(capsys, monkeypatch, "config", "--config", f)
    assert rc == 2 and one_error(err, "config") and f"{f}: not UTF-8 text (byte 0xe9" in err, err


# ---------------------------------------------------------------------- prompts files
@pytest.mark.parametrize("encoding, ok", [("latin-1", False), ("utf-8", True), ("utf-8-sig", True)])
def test_a_prompts_file_is_read_as_utf8_or_refused_in_one_line(encoding, ok, tmp_path, tiny_model_dir, capsys,
                                                               monkeypatch):
    from pipeline.config import load_config
    from pipeline.stages.generate import prompts_from_config

    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("a face\nun visage souriant, café\n".encode(encoding))
    args = [*common(tmp_path / "run", tiny_model_dir), "generate.num_samples=2", f"generate.prompts_file={prompts}"]
    if ok:
        assert prompts_from_config(load_config(None, args).generate) == ["a face", "un visage souriant, café"]
        return
    rc, err = cli(capsys, monkeypatch, "generate", *args)
    assert rc == 2 and one_error(err, "generate"), err
    assert f"generate.prompts_file={prompts}: line 2 is not UTF-8 (byte 0xe9); save the file as UTF-8" in err
    assert written(tmp_path / "run") == []


# ---------------------------------------------------------------------- directions files
def poison(path: Path, row: int, value: float) -> Path:
    """Put ``value`` into direction ``row`` of a directions file, its metadata and identity record kept
    (written around save_directions, which refuses it)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors["directions"][row, -1, 0, 0, 0] = value
    save_file(tensors, str(path), metadata=meta)
    return path


def test_non_finite_directions_are_refused_where_they_enter(tmp_path, tiny_model_dir, capsys, monkeypatch):
    from pipeline.errors import InputError
    from pipeline.formats.directions import Directions, save_directions

    path = tmp_path / "user.safetensors"  # for the tiny model: T=3, h 16 x 8 x 8
    save_directions(Directions(torch.randn(2, 3, 16, 8, 8), ["smile", "hat"], "supervised", [2, 1, 0]), path)
    poison(path, 1, float("nan"))
    run = tmp_path / "run"
    for stage, args in (("sample", [f"sample.directions={path}", "sample.direction=hat", "sample.scales=[1]"]),
                        ("edit", [f"edit.directions={path}"]),
                        ("disentangle", [f"disentangle.source={path}", "calibrate.enabled=false",
                                         "disentangle.pairs={smile: [hat]}"])):
        rc, err = cli(capsys, monkeypatch, stage, *common(run, tiny_model_dir), *args)
        assert rc == 2 and one_error(err, stage), err
        assert f"{path}: direction 'hat' holds 1 non-finite values (NaN or inf)" in err and "make the file again" in err
    assert written(run) == []
    with pytest.raises(InputError, match="^direction 'b' holds 2 non-finite values"):  # made in Python
        Directions(torch.tensor([[[[[0.0]]]], [[[[float("inf")]]]], [[[[float("nan")]]]]]).repeat(1, 1, 2, 1, 1),
                   ["a", "b", "c"], "test", [0])


# ---------------------------------------------------------------------- annotator scores
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_annotator_scores_are_refused_naming_the_sample(value):
    from fake_annotators import Broken
    from pipeline.errors import InputError

    images = torch.zeros(3, 3, 8, 8)
    with pytest.raises(InputError, match=rf"^annotator 'broken' scored bright={value} for sample 12 \(1 non-finite"):
        Broken(value)(images, sample_ids=[11, 12, 13])
    with pytest.raises(InputError, match="for image 1 of a batch of 3"):
        Broken(value)(images)
    missing = Broken(value)
    missing.may_be_missing = ("bright",)  # NaN where the attribute cannot be read (face_pose without a face)
    if value != value:
        assert missing(images)["bright"].isnan().tolist() == [False, True, False]
    else:
        with pytest.raises(InputError, match="scored bright=inf"):
            missing(images)


# ---------------------------------------------------------------------- model folders and the hook
@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    from test_families import write_ldm, write_sd

    root = tmp_path_factory.mktemp("pipelines")
    return {"ldm": write_ldm(root / "ldm"), "sd": write_sd(root / "sd")}


def damaged(pipelines, tmp_path, family: str, remove: str, truncate: bool = False) -> Path:
    import shutil

    folder = tmp_path / f"{family}-damaged"
    shutil.copytree(pipelines[family], folder)
    if truncate:
        (folder / remove).write_bytes((folder / remove).read_bytes()[:100])
    elif (folder / remove).is_dir():
        shutil.rmtree(folder / remove)
    else:
        (folder / remove).unlink()
    return folder


@pytest.mark.parametrize("family, remove, truncate, message", [
    ("ldm", "vqvae", False, "has no vqvae/ folder, though its model_index.json lists the vqvae (VQModel)"),
    ("sd", "vae", False, "has no vae/ folder, though its model_index.json lists the vae (AutoencoderKL)"),
    ("sd", "tokenizer", False, "has no tokenizer/ folder, though its model_index.json lists the tokenizer"),
    ("sd", "tokenizer/tokenizer_config.json", False, "has no tokenizer_config.json in tokenizer/"),
    ("sd", "scheduler/scheduler_config.json", False, "has no scheduler_config.json in scheduler/"),
    ("sd", "text_encoder/model.safetensors", True, "could not load the text_encoder of model"),
])
def test_a_missing_or_damaged_component_is_named(pipelines, tmp_path, family, remove, truncate, message, capsys,
                                                 monkeypatch):
    folder = damaged(pipelines, tmp_path, family, remove, truncate)
    out = tmp_path / "grid.png"
    rc, err = cli(capsys, monkeypatch, "sample", *common(tmp_path / "run", folder, steps=2), "sample.seeds=[0]",
                  f"sample.out={out}")
    assert rc == 2 and one_error(err, "sample") and str(folder) in err and message in err, err
    assert not out.exists()


def test_the_hub_ddpm_layout_keeps_its_unet_and_scheduler_at_the_root(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """A model_index.json beside a root config.json (google/ddpm-ema-celebahq-256, the embedded default) loads."""
    import json
    import shutil

    folder = tmp_path / "ddpm"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"],
                                                         "scheduler": ["diffusers", "DDPMScheduler"]}))
    out = tmp_path / "grid.png"
    rc, err = cli(capsys, monkeypatch, "sample", *common(tmp_path / "run", folder, steps=2), "sample.seeds=[0]",
                  f"sample.out={out}")
    assert rc == 0 and out.is_file(), err
    (folder / "scheduler_config.json").unlink()
    rc, err = cli(capsys, monkeypatch, "sample", *common(tmp_path / "run", folder, steps=2), f"sample.out={out}")
    assert rc == 2 and one_error(err, "sample") and "has no scheduler/ folder" in err, err


def test_a_hook_whose_output_is_not_a_feature_map_is_refused(tmp_path, tiny_model_dir, capsys, monkeypatch):
    run = tmp_path / "run"
    rc, err = cli(capsys, monkeypatch, "generate", *common(run, tiny_model_dir, steps=2), "model.hook=time_embedding",
                  "generate.num_samples=2")
    assert rc == 2 and one_error(err, "generate"), err
    assert "model.hook=time_embedding: TimestepEmbedding returns a tensor (1, 32) for a batch of 1" in err
    assert written(run) == []


# ---------------------------------------------------------------------- on a run
@pytest.fixture(scope="module")
def selected(tmp_path_factory, tiny_model_dir):
    """A run of 12 samples, annotated with the fake brightness annotator, 3 selected per side."""
    import signal

    from pipeline.cli import main

    run = tmp_path_factory.mktemp("inputs") / "run"
    args = [*common(run, tiny_model_dir), "generate.num_samples=12", "generate.batch_size=6", *ANN,
            "select.attributes=[bright, red]", "select.n=3"]
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for stage in ("generate", "annotate", "select"):
            assert main([stage, *args]) == 0
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    return run, args


@pytest.mark.slow
def test_a_non_finite_annotator_score_names_the_sample_and_writes_nothing(selected, tmp_path, tiny_model_dir, capsys,
                                                                          monkeypatch):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(selected[0] / "samples", run / "samples")
    before = written(run)
    rc, err = cli(capsys, monkeypatch, "annotate", *common(run, tiny_model_dir), "annotate.batch_size=4",
                  "annotate.annotators=[fake_annotators:Broken]", "select.attributes=[bright]")
    assert rc == 2 and one_error(err, "annotate"), err
    assert "annotator 'broken' scored bright=nan for sample 1 " in err
    assert not (run / "annotations.parquet").exists() and written(run)[:len(before)] == before


@pytest.mark.slow
def test_every_n_above_the_selection_is_refused_before_work(selected, tmp_path, capsys, monkeypatch):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(selected[0], run)
    before = sorted(written(run))
    for stage, key in (("supervised", "supervised.convergence_ns"), ("fewshot", "fewshot.ns")):
        rc, err = cli(capsys, monkeypatch, stage, *selected[1], f"run_dir={run}", f"{key}=[4, 10]")
        assert rc == 2 and one_error(err, stage), err
        assert f"{key}=[4, 10]: every n is above the 3 selected samples per side; give at least one n <= 3" in err
        assert sorted(written(run)) == before


@pytest.mark.slow
def test_the_runs_own_directions_with_a_nan_are_refused_by_their_readers(selected, tmp_path, capsys, monkeypatch):
    """The run's supervised file damaged with its identity record kept: disentangle and edit refuse it
    in one line naming the file, the direction and the stage that rewrites it (it was an lstsq assert
    and black images)."""
    import shutil

    from pipeline.formats.identity import read_record

    run = tmp_path / "run"
    shutil.copytree(selected[0], run)
    assert cli(capsys, monkeypatch, "supervised", *selected[1], f"run_dir={run}", "supervised.convergence_ns=[1, 3]",
               "calibrate.enabled=false")[0] == 0
    path = poison(run / "directions" / "supervised.safetensors", 1, float("inf"))
    assert read_record(path)["stage"] == "supervised"
    before = sorted(written(run))
    for stage, args in (("disentangle", ["calibrate.enabled=false", "disentangle.pairs={bright: [red]}"]),
                        ("edit", ["edit.directions=supervised"])):
        rc, err = cli(capsys, monkeypatch, stage, *selected[1], f"run_dir={run}", *args)
        assert rc == 2 and one_error(err, stage), err
        assert f"{path}: direction 'red' holds 1 non-finite values" in err and "run hspace supervised again" in err
    assert sorted(written(run)) == before
