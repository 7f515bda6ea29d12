"""The configuration schema: overrides set one key, cross-field and annotator-column checks at
load, one-line messages naming the key, where it was set and what it accepts, exit status 2."""
from __future__ import annotations

import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from annotators.base import check_columns, declared_columns
from pipeline.cli import main
from pipeline.config import HSpaceConfig, defaults, defaults_yaml, load_config, to_dict, with_overrides
from pipeline.config.sections import GenerateConfig, ModelConfig, PCAConfig
from pipeline.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "conf.paper.yaml"


def test_conf_yaml_is_the_generated_defaults_and_validates():
    text = (ROOT / "conf.yaml").read_text()
    assert text == defaults_yaml(), "conf.yaml is generated: run `hspace config --defaults > conf.yaml`"
    assert yaml.safe_load(text) == defaults()
    assert to_dict(load_config(ROOT / "conf.yaml")) == to_dict(load_config(None))
    assert "# K (the paper: 25)" in text  # field descriptions are its comments


def test_hspace_config_defaults_prints_conf_yaml(capsys):
    assert main(["config", "--defaults"]) == 0
    assert capsys.readouterr().out == (ROOT / "conf.yaml").read_text()


def test_choices_are_the_engines_tables():
    from pipeline.dtypes import DTYPES
    from pipeline.engine.hooks import HOOK_POINTS

    def choices(model, key):
        return set(typing.get_args(model.model_fields[key].annotation))

    for point in (*HOOK_POINTS, "up_blocks.0", "down_blocks.3.resnets.1"):  # the engine checks the module exists
        assert ModelConfig(hook=point).hook == point
    # one dtype table; each field accepts part of it
    assert "dtype" not in ModelConfig.model_fields  # the weights' precision is trainer.precision's
    assert choices(GenerateConfig, "h_dtype") == {"float16", "float32", "bfloat16"} <= set(DTYPES)
    assert choices(PCAConfig, "dtype") == {"float64", "float32"} <= set(DTYPES)


# ------------------------------------------------------------------------------------------ overrides
def test_paper_switch_with_a_local_clip_keeps_model_and_prompts():
    """Issue 22 item 9: a dotted override into a mapping sets that one key."""
    cfg = load_config(PAPER, ["evaluate.scorer_options.pretrained=/path/clip.pt",
                              "annotate.options.clip.pretrained=/path/clip.pt"])
    assert cfg.evaluate.scorer_options == {"model": "ViT-B-32", "pretrained": "/path/clip.pt", "prompts": "paper"}
    assert cfg.annotate.options == {"clip": {"model": "ViT-B-32", "pretrained": "/path/clip.pt", "prompts": "celeba40"}}
    check_columns(cfg)  # the paper's attributes are columns of the paper prompts, select's of celeba40


def test_explicit_mapping_replaces_and_then_scorer_columns_are_checked_before_work():
    cfg = load_config(PAPER, ["evaluate.scorer_options={pretrained: /path/clip.pt}"])
    assert cfg.evaluate.scorer_options == {"pretrained": "/path/clip.pt"}
    # without prompts: paper the scorer gives the 40 CelebA columns: refused at load, not after every stage
    with pytest.raises(ConfigError, match=r"^evaluate.attributes=\['smile', 'glasses', 'age', 'gender', 'hat'\] in "
                       r".*conf.paper.yaml:\d+: \['smile', 'glasses', 'age', 'gender', 'hat'\] not among the columns of "
                       r"the scorer clip with \{'pretrained': '/path/clip.pt'\}: 5_o_Clock_Shadow, "):
        check_columns(cfg)


def test_a_file_merges_sections_and_replaces_mappings(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("evaluate:\n  scorer_options: {prompts: paper}\nmodel:\n  eta: 1.0\n")
    cfg = load_config(f, ["model.num_inference_steps=4"])
    assert cfg.model.eta == 1.0 and cfg.model.hook is None and cfg.model.num_inference_steps == 4
    assert cfg.evaluate.scorer_options == {"prompts": "paper"}
    base = load_config(PAPER)
    f.write_text(PAPER.read_text() + "\ndisentangle:\n  pairs: {Smiling: [Male]}\n")
    assert load_config(f).disentangle.pairs == {"Smiling": ["Male"]} != base.disentangle.pairs


def test_interpolation_follows_one_override_and_survives_with_overrides():
    cfg = load_config(None, ["train_toy.batch_size=8"])
    assert cfg.finetune_toy.batch_size == 8
    again = with_overrides(cfg, ["train_toy.layers_per_block=1"])
    assert again.finetune_toy.batch_size == 8 and again.finetune_toy.layers_per_block == 1
    assert cfg.finetune_toy.layers_per_block == 2  # the first one is unchanged (read-only)
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="Instance is frozen"):  # read-only
        cfg.model.eta = 1.0


def test_values_are_yaml_by_the_library():
    cfg = load_config(None, ["jacobian.tol=1e-4", "sample.direction=3", "sample.out=", "trainer.devices=[0,1]"])
    assert cfg.jacobian.tol == 1e-4 and cfg.sample.direction == "3" and cfg.sample.out is None
    assert cfg.trainer.devices == [0, 1]
    with pytest.raises(ConfigError, match=r"^override 'model.eta=\[0,' : the value is not valid YAML|"
                                          r"^override 'model.eta=\[0,': the value is not valid YAML \(while parsing"):
        load_config(None, ["model.eta=[0,"])


# ------------------------------------------------------------------------------------------ cross-field checks
@pytest.mark.parametrize("overrides, message", [
    (["jacobian.tau=25"], r"^jacobian.tau=25 in the command line: must be a step index in 0..19 "
                          r"\(T = model.num_inference_steps\)$"),
    (["model.num_inference_steps=5", "jacobian.tau=5"], r"^jacobian.tau=5 in the command line: .* in 0..4 "),
    (["jacobian.steps=[0, 30]"], r"^jacobian.steps=\[0, 30\] in the command line: must be distinct step indices in 0..19"),
    (["jacobian.steps=[1, 1]"], r"^jacobian.steps=\[1, 1\] .*distinct"),
    (["jacobian.steps=[0, 1]", "jacobian.tau=5"],
     r"^jacobian.tau=5 in the command line: must be one of jacobian.steps \[0, 1\]$"),
    (["model.eta=[0, 1]"], r"^model.eta=\[0.0, 1.0\] in the command line: must be a number or a list of T=20 numbers"),
    (["trainer.devices=0"], r"^trainer.devices=0 in the command line: must be an integer >= 1, -1 \(every device\), "),
    (["trainer.devices=-2"], r"^trainer.devices=-2 "),
    (["trainer.devices=[]"], r"^trainer.devices=\[\] "),
    (["generate.batch_size=0"], r"^generate.batch_size=0 in the command line: Input should be greater than or equal to 1$"),
    (["annotate.batch_size=0"], r"^annotate.batch_size=0 "),
    (["evaluate.num_samples=0"], r"^evaluate.num_samples=0 .*greater than or equal to 2"),
    (["evaluate.repeats=0"], r"^evaluate.repeats=0 "),
    (["sample.seeds=[]"], r"^sample.seeds=\[\] in the command line: List should have at least 1 item"),
    (["jacobian.sample_ids=[3, -1]"], r"^jacobian.sample_ids\[1\]=-1 in the command line: Input should be greater than or "
                                     r"equal to 0$"),
    (["jacobian.block=7"], r"^jacobian.block=7 in the command line: must be at most jacobian.k=6$"),
    (["annotate.options={clip: {model: RN50}}"], r"^annotate.options=\{'clip': \{'model': 'RN50'\}\} in the command "
                                                 r"line: must be keyed by names in annotate.annotators \['toy'\]"),
    (["annotate.annotators=[]"], r"^annotate.annotators=\[\] .*List should have at least 1 item"),
    (["supervised.real.positive_dir=/a"], r"^supervised.real.positive_dir='/a' .*together with supervised.real.negative_dir"),
    (["supervised.attributes=[hat, age]"], r"^supervised.attributes=\['hat', 'age'\] .*among select.attributes"),
    (["disentangle.pairs={}"], r"^disentangle.pairs=\{\} .*must be auto, or a non-empty mapping"),
    (["disentangle.pairs={hat: [hat]}"], r"^disentangle.pairs=\{'hat': \['hat'\]\} "),
    (["trainer.precision=17"], r"^trainer.precision=17 .*Input should be '32-true', "),
    (["model=3"], r"^model=3 in the command line: Input should be a valid dictionary or instance of ModelConfig$"),
    (["finetune_toy.lr=${train_toy.nope}"], r"^finetune_toy.lr in the command line: .*train_toy.nope"),
])
def test_checks_at_load_name_the_key_where_and_what(overrides, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config(None, overrides)
    assert "\n" not in str(e.value)


def test_edges_that_are_accepted():
    cfg = load_config(None, ["model.num_inference_steps=5"])  # jacobian.tau follows T (null: T // 2)
    assert cfg.jacobian.tau == 2
    cfg = load_config(None, ["model.num_inference_steps=4", "model.eta=[0, 1, 1, 0]", "jacobian.steps=[3, 0, 1]",
                             "trainer.devices=-1", "jacobian.block=6"])
    assert cfg.jacobian.tau == 1 and cfg.model.eta == [0.0, 1.0, 1.0, 0.0] and cfg.trainer.devices == -1
    assert load_config(None, ["trainer.devices=auto"]).trainer.devices == "auto"
    assert load_config(PAPER).jacobian.tau == 5


def test_cross_field_errors_name_every_source(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  num_inference_steps: 4\n")
    with pytest.raises(ConfigError, match=r"^jacobian.tau=6 in the command line and .*c.yaml:2: must be a step index in 0..3"):
        load_config(f, ["jacobian.tau=6"])
    f.write_text("jacobian:\n  tau: 12\n")
    with pytest.raises(ConfigError, match=r"^jacobian.tau=12 in .*c.yaml:2 and the command line: .* 0..9"):
        load_config(f, ["model.num_inference_steps=10"])
    f.write_text("model: 3\n")
    with pytest.raises(ConfigError, match=r"^model=3 in .*c.yaml:1: Input should be a valid dictionary"):
        load_config(f)
    with pytest.raises(ConfigError, match=r"^model.hook='x y' in the command line: "):  # the override, not the file
        load_config(ROOT / "conf.yaml", ["model.hook=x y"])


# ------------------------------------------------------------------------------------------ annotator columns
def test_annotators_declare_columns_without_loading_weights():
    from annotators.celeba import CELEBA_ATTRIBUTES

    assert declared_columns("celeba", {"checkpoint": "/no/such/file.pt"}) == tuple(CELEBA_ATTRIBUTES)
    assert declared_columns("clip", {"pretrained": "/no/such/clip.pt", "prompts": "paper"}) == \
        ("smile", "glasses", "age", "gender", "hat")
    assert declared_columns("clip", {"prompts": {"x": {"positive": ["a"], "negative": ["b"]}}}) == ("x",)
    assert declared_columns("clip", {"prompts": "celeba40", "attributes": ["Male"]}) == ("Male",)
    assert "render_error" in declared_columns("toy_consistency")
    assert declared_columns("fake_annotators:brightness") is None  # a plain factory: known once built
    with pytest.raises(ConfigError, match="bad options for annotator 'clip'.*prompt"):
        declared_columns("clip", {"prompt": "paper"})
    with pytest.raises(ConfigError, match="unknown annotator 'nope'"):
        declared_columns("nope")


@pytest.mark.parametrize("overrides, message", [
    (["select.attributes=[smile, Smiling]"], r"^select.attributes=\['smile', 'Smiling'\] in the command line: "
                                             r"\['Smiling'\] not among the columns of annotate.annotators \['toy'\]: smile, "),
    (["select.balance=Male"], r"^select.balance='Male' in the command line: \['Male'\] not among"),
    (["annotate.annotators=[clip]", "annotate.options.clip.prompts=paper"],
     r"^select.attributes=\['smile', 'eye_open', .*\] in conf.yaml:\d+: \['eye_open', 'yaw', 'hair'\] not among the "
     r"columns of annotate.annotators \['clip'\]: smile, glasses, age, gender, hat$"),
    (["evaluate.own_attribute={smile: grin}"], r"^evaluate.own_attribute=\{'smile': 'grin'\} in the command line: "
                                               r"\['grin'\] not among the columns of the scorer toy"),
    (["evaluate.quality_score=face_prob"],
     r"^evaluate.quality_score='face_prob' in the command line and conf.yaml:\d+: must be one of "
                                           r"the columns of evaluate.quality toy_consistency: render_error$"),
    (["evaluate.scorer=nope"], r"^unknown annotator 'nope'"),
    (["annotate.options={toy: {weight: /x}}"], r"^bad options for annotator 'toy'"),
])
def test_columns_are_checked_by_hspace_config_in_one_line_with_status_2(overrides, message, capsys):
    assert main(["config", *overrides]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("hspace config: error: ")
    import re

    assert re.search(message, err[len("hspace config: error: "):].strip()), err


def test_clip_columns_with_prefixes_when_annotators_share_names(capsys):
    # face_pose and hopenet both give yaw: the columns are prefixed, so select must name the prefixed one
    over = ["annotate.annotators=[face_pose, hopenet]", "select.attributes=[yaw]"]
    assert main(["config", *over]) == 2
    assert "['yaw'] not among the columns" in capsys.readouterr().err
    assert main(["config", "annotate.annotators=[face_pose, hopenet]", "select.attributes=[hopenet.yaw, face_prob]"]) == 0


@pytest.mark.slow
@pytest.mark.parametrize("text, message", [
    ("model:\n  eta: [1, 2\n  hook: after\n", r"c.yaml:3:7: invalid YAML: while parsing a flow sequence: expected ',' or ']'"),
    ("model:\n\thook: after\n", r"c.yaml:2:1: invalid YAML: while scanning for the next token: found character '\\t'"),
    ("modle:\n  eta: 1\n", r"unknown config key 'modle' in .*c.yaml:1 \(did you mean model\?\); valid keys at the top "
                           r"level: annotate, "),
    ("model: 3\n", r"model=3 in .*c.yaml:1: Input should be a valid dictionary or instance of ModelConfig"),
    ("- 1\n", r"c.yaml must hold a mapping of sections, got list"),
    ("select:\n  n: many\n", r"select.n='many' in .*c.yaml:2: Input should be a valid integer"),
])
def test_file_errors_through_the_cli_are_one_line_with_status_2(tmp_path, text, message):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "config", "--config", str(f)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("hspace config: error: "), out.stderr
    import re

    assert re.search(message, out.stderr), out.stderr


def test_schema_defaults_are_valid_and_complete():
    cfg = HSpaceConfig()
    assert to_dict(load_config(None)) == {**to_dict(cfg), "jacobian": {**to_dict(cfg.jacobian), "tau": 10}}
