"""`hspace run` end to end on a tiny configuration, the report, and stage skipping."""
from __future__ import annotations

import json
import shutil
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from conftest import hspace, tiny_overrides

VOID = {"meta", "img", "br", "hr", "link", "input", "source", "col", "wbr"}


class Checker(HTMLParser):
    """Collects image sources and checks that every element is closed in order."""

    def __init__(self):
        super().__init__()
        self.stack, self.images, self.errors, self.ids = [], [], [], set()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src"))
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
        else:
            self.stack.pop()


def tiny_run_args(run_dir, model_dir):
    return [*tiny_overrides(run_dir, model_dir), "generate.num_samples=24", "generate.batch_size=12",
            "annotate.annotators=[fake_annotators:brightness]", "select.attributes=[bright,red]", "select.n=5",
            "select.contact_sheet_size=4", "pca.n_components=3", "jacobian.sample_ids=[0]", "jacobian.k=2",
            "jacobian.tau=1", "supervised.convergence_ns=[1,5]", "disentangle.pairs={bright: [red]}",
            "edit.seeds=[100,101]", "report.pca_components=2", "report.jacobian_directions=2",
            "evaluate.scorer=fake_annotators:brightness", "evaluate.quality=null", "evaluate.num_samples=3",
            "evaluate.repeats=2", "evaluate.pca_components=2", "probe.pca_components=4", "fewshot.ns=[1,5]",
            "fewshot.draws=2", "fewshot.num_samples=2", "fewshot.restriction_samples=2"]


def hspace_run(cwd, *args, launcher=()):
    return hspace("run", *args, cwd=cwd, launcher=launcher).stdout


@pytest.mark.slow
def test_main_job_end_to_end_and_skipping(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    args = tiny_run_args(run, tiny_model_dir)
    first = hspace_run(tmp_path, *args)
    for stage in ("generate", "annotate", "select", "probe", "pca", "jacobian", "supervised", "disentangle", "calibrate",
                  "fewshot", "figures", "evaluate", "evaluate-calibrated", "report"):
        assert f"{stage}: done" in first, stage
    report = run / "report" / "index.html"
    assert f"report -> {report.resolve()}" in first
    checker = Checker()
    checker.feed(report.read_text())
    checker.close()
    assert not checker.errors and not checker.stack, (checker.errors, checker.stack)
    assert {"table1", "calibrated", "dose-response", "edits", "annotators", "provenance", "pca-random", "costs", "probes",
            "fig8", "restriction"} <= checker.ids
    assert len(checker.images) >= 10
    for src in checker.images:
        assert not src.startswith(("http", "/")) and (report.parent / src).is_file(), src
    # where the time went: every stage's cost recorded and printed; generate's work is exactly N x T U-Net rows
    timings = json.loads((run / "timings.json").read_text())
    # the paper's pipeline and its report first, then the further analyses (the report rendered again after each);
    # the figures stage draws the strips of the supervised directions at their calibrated strengths (edit.seeds are
    # not the sweep's seeds here), so calibrate joins the paper's pipeline before it
    assert list(timings) == ["generate", "annotate", "select", "pca", "jacobian", "supervised", "disentangle",
                             "calibrate", "figures", "evaluate", "report", "probe", "evaluate-calibrated", "fewshot"]
    assert first.index("report: done") < first.index("probe: done") < first.index("fewshot: done")
    assert first.count("report: done") == 4 and "still to come: probe, evaluate-calibrated, fewshot" in first
    assert timings["generate"]["unet_evaluations"] == 24 * 3 and timings["generate"]["images"] == 24
    assert timings["annotate"]["scored"] == 24 and timings["annotate"]["unet_evaluations"] == 0
    assert timings["probe"]["unet_evaluations"] == 0  # x_t stored by generate (generate.record_x_t), not re-sampled
    assert timings["evaluate"]["unet_evaluations"] > 0 and timings["jacobian"]["unet_evaluations"] > 0
    assert "where the time went" in first and "U-Net evals" in first
    families = {p.name for p in (run / "edits").iterdir() if p.is_dir()}
    assert families == {"pca", "pca_random", "jacobian", "supervised", "supervised_xT", "disentangled"}

    again = hspace_run(tmp_path, *args)
    assert again.count("up to date, skipped") == 17  # 13 stages, the report at each of its 4 steps

    (run / "evaluation" / "table1_signed.csv").unlink()  # a lost output: its stage runs again, and gives what it gave
    restored = hspace_run(tmp_path, *args)
    assert restored.count("up to date, skipped") == 16 and "evaluate: done" in restored
    assert (run / "evaluation" / "table1_signed.csv").exists()

    changed = hspace_run(tmp_path, *args, "evaluate.scale=0.5")
    skipped = [line.split("]")[1].split(":")[0].strip() for line in changed.splitlines() if "skipped" in line]
    # the calibration reads evaluate.scale: calibrate, figures (its calibrated strips) and both evaluations run again
    assert skipped == ["generate", "annotate", "select", "pca", "jacobian", "supervised", "disentangle", "probe", "report",
                       "fewshot", "report"]
    for stage in ("calibrate", "figures", "evaluate", "evaluate-calibrated", "report"):
        assert f"{stage}: done" in changed, stage

    # another precision (generate and annotate keep what was made otherwise until it is deleted): every stage
    # that samples runs again at it (fewshot, figures and the calibration included, which run without a
    # Trainer); jacobian computes in float32 whatever it says
    refused = hspace("run", *args, "evaluate.scale=0.5", "trainer.precision=bf16-mixed", cwd=tmp_path, check=False)
    assert refused.returncode == 2 and "precision: '32-true' (existing) vs 'bf16-mixed' (now)" in refused.stderr
    shutil.rmtree(run / "samples")
    refused = hspace("run", *args, "evaluate.scale=0.5", "trainer.precision=bf16-mixed", cwd=tmp_path, check=False)
    assert refused.returncode == 2 and "annotations.parquet was made for a different samples dataset (id " in refused.stderr
    shutil.rmtree(run / "annotations")
    (run / "annotations.parquet").unlink()
    half = hspace_run(tmp_path, *args, "evaluate.scale=0.5", "trainer.precision=bf16-mixed")
    skipped = [line.split("]")[1].split(":")[0].strip() for line in half.splitlines() if "skipped" in line]
    assert skipped == ["generate", "jacobian"] and "report: done" in half  # generate ran in the refused run


@pytest.mark.slow
def test_skipping_a_stage_that_is_not_in_the_main_job_is_one_clear_error(tmp_path):
    out = hspace("run", f"run_dir={tmp_path / 'run'}", "run.skip=[probe,fewshots]", cwd=tmp_path, check=False)
    assert out.returncode == 2 and not (tmp_path / "run").exists()
    assert out.stderr.strip().splitlines()[-1] == (
        "hspace run: error: run.skip: fewshots is not a stage of the main job; its stages are generate, annotate, "
        "select, probe, pca, jacobian, supervised, disentangle, calibrate, figures, evaluate, evaluate-calibrated, "
        "fewshot, report")


def test_a_skipped_stage_whose_output_no_earlier_run_made_is_refused_before_anything_is_created(tmp_path):
    from pipeline.config import load_config
    from pipeline.errors import ConfigError
    from pipeline.stages.run import check_plan

    run = tmp_path / "run"
    cfg = load_config(None, [f"run_dir={run}", "run.skip=[generate]"])
    refusal = r"^run\.skip: generate is skipped, but annotate, (\w+, )*\w+ read\(s\) .*/run/samples, which no " \
              r"earlier run made; run generate, or skip annotate, (\w+, )*\w+ too$"
    with pytest.raises(ConfigError, match=refusal):
        check_plan(cfg)
    assert not run.exists()
    (run / "samples").mkdir(parents=True)  # a folder a person made under that name is not generate's output
    with pytest.raises(ConfigError, match=refusal):
        check_plan(cfg)
    check_plan(load_config(None, [f"run_dir={run}"]))  # nothing skipped: this run makes the samples


@pytest.mark.slow
def test_main_job_without_the_skipped_stages(tmp_path, tiny_model_dir):
    """run.skip=[probe, fewshot, jacobian]: those stages do not run, and the report renders without them."""
    run = tmp_path / "run"
    out = hspace_run(tmp_path, *tiny_run_args(run, tiny_model_dir), "run.skip=[probe,fewshot,jacobian]")
    for stage in ("probe", "fewshot", "jacobian"):
        assert f"{stage}: not run (run.skip)" in out and not (run / stage).exists()
    timings = json.loads((run / "timings.json").read_text())
    assert list(timings) == ["generate", "annotate", "select", "pca", "supervised", "disentangle", "calibrate",
                             "figures", "evaluate", "report", "evaluate-calibrated"]
    checker = Checker()
    checker.feed((run / "report" / "index.html").read_text())
    assert {"table1", "edits"} <= checker.ids and not {"probes", "fig8", "restriction"} & checker.ids


def predicted_keys(cfg) -> dict[str, str]:
    """Each stage's identity key as predicted from the configuration alone, every stage before it assumed
    to be made again from it (what a fresh run directory would record)."""
    from pipeline.registry import STAGES

    known, keys = {}, {}
    for st in STAGES:
        keys[st.name] = known[st.artefact] = st.identity(cfg, known)["key"]
    return keys


def test_stage_identities_follow_the_weights_not_only_the_config(tmp_path, tiny_model_dir, monkeypatch):
    """New weights at the same model path re-run generate and everything after it; new annotator
    weights re-run annotate, the calibrations (supervised, disentangle) and evaluate (and what reads
    them), not generate or pca."""
    import shutil

    import annotators
    from pipeline.config import load_config

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    assets = tmp_path / "annotator-assets"
    assets.mkdir()
    (assets / "weights.bin").write_bytes(b"one")
    monkeypatch.setattr(annotators, "ASSETS", assets)
    cfg = load_config(None, [f"model.name_or_path={model_dir}", f"run_dir={tmp_path / 'run'}"])
    before = predicted_keys(cfg)
    assert predicted_keys(cfg) == before

    (assets / "weights.bin").write_bytes(b"two")
    after_annotator = predicted_keys(cfg)
    changed = {k for k in before if before[k] != after_annotator[k]}
    assert changed == {"annotate", "select", "probe", "supervised", "disentangle", "calibrate", "fewshot", "figures",
                       "evaluate", "evaluate-calibrated", "report"}

    weights = model_dir / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    after_model = predicted_keys(cfg)
    assert all(after_model[k] != after_annotator[k] for k in before)


@pytest.mark.slow
def test_main_job_on_two_processes_equals_one(tmp_path, tiny_model_dir):
    """`hspace run` with trainer.devices=2 gives what one process gives, with every Lightning
    stage holding fewer work items than processes (one shard, one Jacobian sample, one seed set):
    the idle rank must still meet the others, and the other rank must wait for rank 0's
    single-process stages (supervised, disentangle, figures) before evaluating, also under torchrun,
    which starts both ranks at the beginning."""
    import numpy as np
    import pandas as pd
    import torch

    from pipeline.formats.directions import load_directions

    few = ["generate.batch_size=24", "annotate.batch_size=64", "evaluate.repeats=1", "pca.oversample=60"]
    runs = {n: tmp_path / n for n in ("one", "two")}
    hspace_run(tmp_path, *tiny_run_args(runs["one"], tiny_model_dir), *few)
    two = hspace_run(tmp_path, *tiny_run_args(runs["two"], tiny_model_dir), *few, "trainer.devices=2",
                     "trainer.strategy=ddp")
    assert two.count(": done in") == 17 and "report -> " in two  # the report rendered 4 times
    for name in ("jacobian", "supervised", "disentangled"):
        a, b = (load_directions(r / "directions" / f"{name}.safetensors") for r in runs.values())
        assert a.names == b.names
        torch.testing.assert_close(a.directions, b.directions, rtol=1e-5, atol=1e-6)
    a, b = (load_directions(r / "directions" / "pca.safetensors") for r in runs.values())
    cos = torch.nn.functional.cosine_similarity(a.directions.flatten(2), b.directions.flatten(2), dim=2)
    assert (cos.abs() > 1 - 1e-4).all(), cos  # the exact regime (oversample 60 >= 24 samples): equal up to sign
    pd.testing.assert_frame_equal(*(pd.read_parquet(r / "annotations.parquet") for r in runs.values()))
    key = ["repeat", "seed", "direction", "scale"]  # one row per (seed, direction, scale)
    one_ev, two_ev = (pd.read_parquet(r / "evaluation" / "per_sample.parquet").sort_values(key).reset_index(drop=True)
                      for r in runs.values())
    assert one_ev[key].equals(two_ev[key])
    table1 = one_ev.family.isin(["original", "disentangled"]).values
    cols = [c for c in one_ev.columns if c.startswith("d_")]
    np.testing.assert_allclose(one_ev.loc[table1, cols].values, two_ev.loc[table1, cols].values, atol=1e-5)
    assert hspace_run(tmp_path, *tiny_run_args(runs["two"], tiny_model_dir), *few, "trainer.devices=2",
                      "trainer.strategy=ddp").count("up to date, skipped") == 17

    # a launcher that starts both ranks at once (torchrun), on a run whose disentangled directions change (other
    # pairs): rank 0 redoes disentangle, calibrate and figures; the other rank must not judge either evaluation by
    # the old stamps
    import shutil

    torchrun = tmp_path / "torchrun"
    shutil.copytree(runs["two"], torchrun)
    out = hspace_run(tmp_path, *tiny_run_args(torchrun, tiny_model_dir), *few, "trainer.devices=2",
                     "trainer.strategy=ddp", "disentangle.pairs={bright: others}",
                     launcher=[str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2"])
    done = [line.split("]")[1].split(":")[0].strip() for line in out.splitlines() if ": done in" in line]
    assert done == ["disentangle", "calibrate", "figures", "evaluate", "report", "evaluate-calibrated", "report"], out[-2000:]
    ev = pd.read_parquet(torchrun / "evaluation" / "per_sample.parquet").sort_values(key).reset_index(drop=True)
    # bright|others removes red as bright|red did: the same numbers under another name
    np.testing.assert_allclose(one_ev.loc[table1, cols].values, ev.loc[table1, cols].values, atol=1e-5)
    assert set(ev[ev.family == "disentangled"].direction) == {"bright|others"}


def test_cli_joins_the_ranks_for_exactly_the_lightning_commands():
    """The CLI's commands and its list of multi-process commands derive from the one registry:
    `run` plus the distributed stages of the main job and the distributed tools (sae)."""
    from pipeline import registry
    from pipeline.cli import DISTRIBUTED, commands
    from pipeline.stages.run import STAGES

    assert STAGES is registry.STAGES
    assert set(DISTRIBUTED) == {"run"} | {st.name for st in STAGES + registry.TOOLS if st.distributed}
    cmds = commands()
    assert set(cmds) == {"run", "config"} | {st.name for st in registry.STAGES + registry.TOOLS}
    assert all(cmds[st.name][0] == st.run for st in STAGES)


def test_the_stages_that_sample_name_the_precision_in_their_identity(tmp_path):
    """trainer.precision changes the identity of exactly the stages whose outputs it changes: those that
    sample (with or without a Trainer; calibrate); not annotate (scores in float32), pca, select or jacobian
    (float32 whatever it says), nor supervised and disentangle (their default settings sample nothing)."""
    from pipeline.config import load_config
    from pipeline.registry import STAGES

    known = {st.artefact: f"id-of-{st.name}" for st in STAGES}  # the same inputs either way
    cfgs = [load_config(None, [f"run_dir={tmp_path}", f"trainer.precision={p}"]) for p in ("32-true", "bf16-mixed")]
    changed = {st.name for st in STAGES if st.identity(cfgs[0], known)["key"] != st.identity(cfgs[1], known)["key"]}
    assert changed == {"generate", "probe", "calibrate", "fewshot", "figures", "evaluate", "evaluate-calibrated"}


# ---------------------------------------------------------------------- the paper's answer first
PAPER = ["generate", "annotate", "select", "pca", "jacobian", "supervised", "disentangle", "figures", "evaluate"]


def recorded_run(tmp_path, monkeypatch, *overrides, act=None, after_step=None):
    """`hspace run`'s loop (pipeline.stages.run.run_all) with every stage's function replaced by a recorder
    (``act(stage, cfg, pending)`` does its work, if given) and no stage up to date: the (stage, pending)
    pairs in the order it called them."""
    from pipeline import registry
    from pipeline.config import load_config
    from pipeline.stages import run

    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", *overrides])
    calls = []

    def record(self, cfg, **kwargs):
        calls.append((self.name, kwargs.get("pending")))
        if act:
            act(self, cfg, kwargs.get("pending"))

    monkeypatch.setattr(registry.Stage, "run", record)
    monkeypatch.setattr(run, "fresh", lambda cfg, st, pending=None: False)
    run.run_all(cfg, after_step=after_step)
    return calls


def test_after_step_hears_of_every_step_in_order_with_its_cost(tmp_path, monkeypatch, capsys):
    """run_all's ``after_step`` (bench/main_job.py times plain diffusers with it) is called once after each step
    that runs, in the plan's order, with the cost the step recorded; not for a stage of ``run.skip``."""
    heard = []
    calls = recorded_run(tmp_path, monkeypatch, "run.skip=[fewshot]",
                         after_step=lambda st, cost: heard.append((st.name, cost)))
    assert [name for name, _ in heard] == [name for name, _ in calls] and "fewshot" not in dict(heard)
    timings = json.loads((tmp_path / "run" / "timings.json").read_text())
    for name, cost in heard:
        assert cost["seconds"] >= 0 and cost["unet_evaluations"] == 0 and cost == timings[name] or name == "report"


def test_the_paper_pipeline_and_its_report_come_first_then_each_further_analysis_and_the_report_again(
        tmp_path, monkeypatch, capsys):
    """The order derives from the registry: the stages not marked ``further`` (the paper's pipeline) in the
    order of their reads, the report, then each further analysis (probe, calibrate, evaluate-calibrated,
    fewshot) and the report again where it shows what the analysis wrote (not after calibrate), each
    rendering told which further analyses are still to come; every stage after every stage it reads."""
    from pipeline import registry
    from pipeline.registry import STAGES, run_order

    assert {st.name for st in STAGES if st.further} == {"probe", "calibrate", "evaluate-calibrated", "fewshot"}
    calls = recorded_run(tmp_path, monkeypatch)
    calibrated = {"calibration": "calibrate", "evaluation-calibrated": "evaluate-calibrated"}
    assert calls == [*((name, None) for name in PAPER),
                     ("report", {"probes": "probe", **calibrated, "fewshot": "fewshot"}),
                     ("probe", None), ("report", {**calibrated, "fewshot": "fewshot"}),
                     ("calibrate", None), ("evaluate-calibrated", None), ("report", {"fewshot": "fewshot"}),
                     ("fewshot", None), ("report", {})]
    out = capsys.readouterr().out
    assert "[10/17] report: done" in out and "still to come: probe, calibrate, evaluate-calibrated, fewshot" in out
    from pipeline.config import load_config

    for cfg in (None, load_config(None, [f"run_dir={tmp_path}"])):  # every stage after every stage it reads
        order = [st.name for st in run_order(cfg)]
        for i, st in enumerate(run_order(cfg)):
            reads = {registry.PRODUCERS.get(a) for a in st.may_read(cfg)} - {None}
            assert st.renders or reads <= set(order[:i]), st.name


def test_a_further_analysis_that_a_paper_stage_reads_runs_before_it(tmp_path, monkeypatch):
    """supervised.restrict_steps: supervised reads the probes, so probe joins the paper's pipeline where it
    ran before (after select, before pca); fewshot stays a further analysis; run.skip leaves a stage out
    of every rendering's list of what is still to come."""
    calls = recorded_run(tmp_path, monkeypatch, "supervised.restrict_steps=true")
    further = ["calibrate", "evaluate-calibrated", "report", "fewshot", "report"]
    assert [c[0] for c in calls] == ["generate", "annotate", "select", "probe", *PAPER[3:], "report", *further]
    assert calls[-3][1] == {"fewshot": "fewshot"}
    calls = recorded_run(tmp_path, monkeypatch, "run.skip=[probe]")
    calibrated = {"calibration": "calibrate", "evaluation-calibrated": "evaluate-calibrated"}
    assert [c for c in calls if c[0] == "report"] == [("report", {**calibrated, "fewshot": "fewshot"})] * 2 + [
        ("report", {"fewshot": "fewshot"}), ("report", {})]


def fake_outputs(st, cfg, pending) -> None:
    """What a stage writes, enough for the report (the report itself rendered by the real page code)."""
    from PIL import Image

    from pipeline.formats.samples import FORMAT
    from pipeline.stages.report import build_report

    run_dir = Path(cfg.run_dir)
    png = Image.new("RGB", (8, 8))
    if st.name == "generate":
        (run_dir / "samples").mkdir(parents=True)
        (run_dir / "samples" / "manifest.json").write_text(json.dumps({
            "format": FORMAT, "num_samples": 4, "model": {"name_or_path": "tiny", "timesteps": [900, 500, 100],
                                                           "eta": [0.0], "h_shape": [16, 4, 4]}}))
    elif st.name == "probe":
        (run_dir / "probes").mkdir()
        (run_dir / "probes" / "probes.csv").write_text(
            "attribute,space,metric,step,score,chance,encoded\nbright,h,r2,0,0.5,0.0,True\nbright,h,r2,1,0.7,0.0,True\n")
        png.save(run_dir / "probes" / "probes.png")
    elif st.name == "fewshot":
        (run_dir / "fewshot").mkdir()
        (run_dir / "fewshot" / "effect_vs_n.csv").write_text(
            "attribute,space,n,effect,effect_std,draws\nbright,h,1,0.3,0.1,2\nbright,h,5,0.9,0.0,1\n")
        png.save(run_dir / "fewshot" / "effect_vs_n.png")
    elif st.name == "evaluate-calibrated":
        (run_dir / "evaluation-calibrated").mkdir()
        (run_dir / "evaluation-calibrated" / "table1_calibrated.csv").write_text(
            "family,direction,bright,bright_std\noriginal,bright,1.0,0.1\n")
        png.save(run_dir / "evaluation-calibrated" / "table1_calibrated.png")
    elif st.renders:
        page = build_report(run_dir, None, pending).read_text()
        (run_dir / f"page-{len(list(run_dir.glob('page-*')))}.html").write_text(page)


def test_a_report_before_the_further_analyses_says_what_is_still_to_come(tmp_path, monkeypatch):
    """The report rendered after the paper's pipeline has the probe, calibrated Table 1, dose-response and
    Fig. 8 sections saying they are still to come and which stage makes them; after probe, the probes are
    shown and the others are still to come; after evaluate-calibrated, Fig. 8 alone; after fewshot, all are
    shown and nothing is to come."""
    recorded_run(tmp_path, monkeypatch, act=fake_outputs)
    pages = [(tmp_path / "run" / f"page-{i}.html").read_text() for i in range(4)]
    to_come = ["Still to come: the <code>probe</code> stage", "Still to come: the <code>fewshot</code> stage",
               "Still to come: the <code>evaluate-calibrated</code> stage"]
    shown = ['<img src="img/probes.png"', '<img src="img/effect_vs_n.png"', '<img src="img/table1_calibrated.png"']
    for page, still in zip(pages, ([True, True, True], [False, True, True], [False, True, False], [False, False, False])):
        checker = Checker()
        checker.feed(page)
        assert not checker.errors and {"probes", "fig8"} <= checker.ids
        assert ({"calibrated", "dose-response"} <= checker.ids) == still[2]  # the sections say they are to come
        assert ("Still to come: the strips of the evaluated families" in page) == still[2]  # a note in the strips
        for text, image, pending in zip(to_come, shown, still):
            assert (text in page) == pending and (image in page) == (not pending), (text, pending)
