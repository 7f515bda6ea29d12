"""Model loading (local, pipeline layout, HF cache offline), configuration and the CLI skeleton."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipeline import HSpaceModel
from pipeline.cli import main
from pipeline.config import defaults, load_config, parse_overrides, to_dict
from pipeline.errors import ConfigError, ModelLoadError

ROOT = Path(__file__).resolve().parents[1]


def test_from_pretrained_flat_hub_layout(tiny_model_dir, tiny_unet):
    m = HSpaceModel.from_pretrained(str(tiny_model_dir), num_inference_steps=4, eta=1.0, device="cpu")
    assert m.timesteps.tolist() == [750, 500, 250, 0]
    assert m.scheduler.config.clip_sample is False
    assert type(m.scheduler).__name__ == "DDIMScheduler"
    ref = HSpaceModel(tiny_unet, m.scheduler, num_inference_steps=4, eta=1.0, device="cpu")
    # the same weights, but a module loaded from disk and one built in memory need not run the same
    # float32 kernels: equal to rounding (about 3e-6 on images in [-1, 1] seen), not bit for bit
    torch.testing.assert_close(m.sample([3]).images, ref.sample([3]).images, rtol=0, atol=1e-5)


def test_from_pretrained_pipeline_layout(tiny_model_dir, tmp_path):
    shutil.copytree(tiny_model_dir, tmp_path / "pipe" / "unet")
    (tmp_path / "pipe" / "scheduler").mkdir()
    shutil.move(tmp_path / "pipe" / "unet" / "scheduler_config.json", tmp_path / "pipe" / "scheduler")
    m = HSpaceModel.from_pretrained(str(tmp_path / "pipe"), num_inference_steps=2, device="cpu")
    assert m.sample([0]).images.shape == (1, 3, 16, 16)


@pytest.mark.slow
def test_from_hf_cache_offline(tiny_model_dir, tmp_path):
    """A hub id resolves from the HF cache with HF_HUB_OFFLINE=1 (the cache layout built by hand)."""
    snap = tmp_path / "hub" / "models--someone--tiny-ddpm" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_model_dir, snap)
    (tmp_path / "hub" / "models--someone--tiny-ddpm" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--tiny-ddpm" / "refs" / "main").write_text("a" * 40)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    code = (
        "from pipeline import HSpaceModel;"
        "m = HSpaceModel.from_pretrained('someone/tiny-ddpm', num_inference_steps=3, device='cpu');"
        "print(tuple(m.sample([1]).images.shape))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "(1, 3, 16, 16)" in out.stdout
    missing = subprocess.run(
        [sys.executable, "-c", "from pipeline import HSpaceModel; HSpaceModel.from_pretrained('someone/absent')"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert missing.returncode != 0
    assert "ModelLoadError" in missing.stderr and "HF_HUB_OFFLINE=1" in missing.stderr


def test_missing_or_unreadable_model_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        HSpaceModel.from_pretrained(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="neither config.json nor unet/config.json"):
        HSpaceModel.from_pretrained(str(tmp_path / "empty"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="could not load model"):
        HSpaceModel.from_pretrained(str(tmp_path / "broken"))


def test_conf_yaml_spells_out_exactly_the_defaults():
    shipped = yaml.safe_load((ROOT / "conf.yaml").read_text())
    assert shipped == defaults()


def test_finetune_toy_shares_phase_1s_model_and_data():
    """Phase 2 must build the same U-Net on the same data as phase 1: its architecture, schedule
    and correlations follow train_toy (one override reaches both), its own keys stay its own."""
    cfg = load_config(ROOT / "conf.yaml", ["train_toy.layers_per_block=1", "train_toy.correlations={hat~yaw: 0.3}",
                                           "train_toy.lr=0.01"])
    ft = to_dict(cfg.finetune_toy)
    assert ft["layers_per_block"] == 1 and ft["correlations"] == {"hat~yaw": 0.3}
    assert ft["lr"] == 3e-4 and ft["skip_dropout"] == 0.75 and ft["init_from"] == "runs/train-toy/model"
    assert {k: v for k, v in ft.items() if k in ("block_out_channels", "prediction_type", "beta_schedule")} == \
        {k: v for k, v in to_dict(cfg.train_toy).items() if k in ("block_out_channels", "prediction_type", "beta_schedule")}
    own = load_config(ROOT / "conf.yaml", ["finetune_toy.batch_size=8"])
    assert own.finetune_toy.batch_size == 8 and own.train_toy.batch_size == 32


def test_paper_config_is_valid():
    cfg = load_config(ROOT / "conf.paper.yaml")
    assert cfg.model.name_or_path == "google/ddpm-ema-celebahq-256" and cfg.model.eta == 1.0
    assert cfg.evaluate.scorer == "clip" and cfg.evaluate.scorer_options["prompts"] == "paper"
    assert set(cfg.evaluate.own_attribute.values()) == set(cfg.evaluate.attributes)
    assert set(cfg.disentangle.pairs) == set(cfg.select.attributes)


def test_config_overrides_and_validation(tmp_path):
    cfg = load_config(None, ["model.eta=[0, 1, 1]", "model.num_inference_steps=3", "run_dir=/x"])
    assert list(cfg.model.eta) == [0, 1, 1] and cfg.model.num_inference_steps == 3 and cfg.run_dir == "/x"
    with pytest.raises(ConfigError, match=r"unknown config key 'model.nme'.*valid keys under 'model': class_label, device, eta"):
        load_config(None, ["model.nme=x"])
    with pytest.raises(ConfigError, match="model.num_inference_steps"):
        load_config(None, ["model.num_inference_steps=many"])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        parse_overrides(["model.eta"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("modle:\n  eta: 1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'modle' in .*bad.yaml:1 \(did you mean model\?\); "
                                          r"valid keys at the top level"):
        load_config(bad)


@pytest.mark.parametrize("override, message", [
    ("select.resolution=-0.01", r"select.resolution=-0.01 in the command line: Input should be greater than or equal to 0"),
    ("select.n=0", r"select.n=0 .*Input should be greater than or equal to 1"),
    ("generate.num_samples=0", r"generate.num_samples=0 .*greater than or equal to 1"),
    ("evaluate.num_samples=1", r"evaluate.num_samples=1 .*greater than or equal to 2"),
    ("model.hook=mid block", r"model.hook='mid block' .*after, before or a dotted module path"),
    ("pca.dtype=float16", r"pca.dtype='float16' .*Input should be 'float64' or 'float32'"),
    ("jacobian.tol=0", r"jacobian.tol=0 .*greater than 0"),
    ("train_toy.ema_decay=1.5", r"train_toy.ema_decay=1.5 .*less than or equal to 1"),
    ("model.eta=-1", r"model.eta=-1 .*must be a number >= 0"),
    ("model.eta=[0, -0.5]", r"model.eta=.*must be a number >= 0"),
    ("model.eta=fast", r"model.eta='fast' .*must be a number >= 0"),
])
def test_out_of_range_values_fail_at_load_time(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_range_checks_name_the_file_and_accept_the_edges(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("select:\n  resolution: -1\n")
    with pytest.raises(ConfigError, match=r"select.resolution=-1 in .*c.yaml:2: Input should be greater than or equal to 0"):
        load_config(f)
    cfg = load_config(None, ["select.resolution=0", "model.eta=[0, 1]", "model.num_inference_steps=2", "pca.oversample=0",
                             "evaluate.pca_components=0", "train_toy.ema_decay=0"])
    assert cfg.select.resolution == 0 and list(cfg.model.eta) == [0, 1]


def test_cli_rejects_a_bad_value_before_any_work(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["validate-toy", f"run_dir={run}", "select.resolution=-1"]) == 2
    assert "select.resolution=-1" in capsys.readouterr().err
    assert not run.exists()  # no stage started: nothing sampled, nothing written


def test_mapping_options_are_replaced_not_merged(tmp_path):
    cfg = load_config(None, ["disentangle.pairs={age: [gender]}"])
    assert cfg.disentangle.pairs == {"age": ["gender"]}
    f = tmp_path / "c.yaml"
    f.write_text("annotate:\n  annotators: [clip]\n  options: {clip: {model: RN50}}\n")
    assert load_config(f).annotate.options == {"clip": {"model": "RN50"}}
    assert "glasses" in load_config(f).disentangle.pairs  # untouched sections keep their defaults


def test_cli_reports_errors_in_one_line_with_exit_code_2(capsys):
    assert main(["config", "trainer.devicez=2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hspace config: error: unknown config key 'trainer.devicez'")
    assert main(["sample", "model.name_or_path=/no/such/model"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_sample_writes_a_grid(tiny_model_dir, tmp_path):
    out = tmp_path / "grid.png"
    rc = main(["sample", f"model.name_or_path={tiny_model_dir}", "model.num_inference_steps=3",
               "sample.seeds=[1,2,3]", f"sample.out={out}"])
    assert rc == 0 and out.exists()
    from PIL import Image

    assert Image.open(out).size[0] > Image.open(out).size[1]  # plain samples: 3 seeds in one row
