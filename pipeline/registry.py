"""The one stage registry: every `hspace` command, the function it runs, and for the main job
(`hspace run`) what each stage reads and writes.

``pipeline.cli`` builds its sub-commands from ``COMMANDS``, ``pipeline.stages.run`` runs ``STAGES``
in order, and the commands that run Lightning Trainers (every rank of a multi-process job takes
part) are ``DISTRIBUTED``. Each ``Stage.run`` is a function taking the validated config; the small
wrappers below import their stage on call, so that ``hspace --help`` does not load Lightning.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[Any], Any]  # takes the validated config
    help: str
    artefact: str = ""  # the output under run_dir that carries the stage's identity record (pipeline.identity)
    after: tuple[str, ...] = ()  # stages whose outputs it reads
    outputs: tuple[str, ...] = ()  # paths under run_dir that must exist for it to count as done
    distributed: bool = False  # runs a Lightning Trainer (every rank takes part)


# ------------------------------------------------------------------ stage functions (imported on call)
def generate(cfg):
    from .stages.generate import run_generate

    return run_generate(cfg)


def annotate(cfg):
    from .stages.annotate import run_annotate

    return run_annotate(cfg)


def select(cfg):
    from .stages.select import run_select

    return run_select(cfg)


def probe(cfg):
    from .stages.probe import run_probe

    return run_probe(cfg)


def pca(cfg):
    from .stages.pca import run_pca

    return run_pca(cfg)


def jacobian(cfg):
    from .stages.jacobian import run_jacobian

    return run_jacobian(cfg)


def supervised(cfg):
    from .stages.supervised import run_supervised

    return run_supervised(cfg)


def disentangle(cfg):
    from .stages.disentangle import run_disentangle

    return run_disentangle(cfg)


def fewshot(cfg):
    from .stages.fewshot import run_fewshot

    return run_fewshot(cfg)


def figures(cfg):
    from .stages.figures import run_figures

    return run_figures(cfg)


def evaluate(cfg):
    from evaluation.stage import run_evaluate

    return run_evaluate(cfg)


def report(cfg):
    from evaluation.report import run_report

    return run_report(cfg)


def edit(cfg):
    from .stages.edit import run_edit

    return run_edit(cfg)


def sample(cfg):
    from .stages.sample import run_sample

    return run_sample(cfg)


def train_toy(cfg):
    from toyfaces.train_ddpm import run_train_toy

    return run_train_toy(cfg)


def finetune_toy(cfg):
    from toyfaces.train_ddpm import run_finetune_toy

    return run_finetune_toy(cfg)


def train_toy_annotator(cfg):
    from toyfaces.annotator import run_train_toy_annotator

    return run_train_toy_annotator(cfg)


def validate_toy(cfg):
    from toyfaces.validate import run_validate_toy

    return run_validate_toy(cfg)


def explore(cfg, host: str = "127.0.0.1", port: int = 7860):
    from .explore.app import run_explore

    return run_explore(cfg, host=host, port=port)


# ------------------------------------------------------------------ their identity records
def stage_identity(name: str, cfg, known: dict | None = None) -> dict:
    """The identity record main-job stage ``name`` would write now (its module's ``identity``; the
    modules are imported on call). ``known``: predicted ids of the artefacts it reads."""
    from evaluation import report
    from evaluation import stage as evaluation_stage

    from .stages import annotate, disentangle, fewshot, figures, generate, jacobian, pca, probe, select, supervised

    modules = {"generate": generate, "annotate": annotate, "select": select, "probe": probe, "pca": pca,
               "jacobian": jacobian,
               "supervised": supervised, "disentangle": disentangle, "fewshot": fewshot, "figures": figures,
               "evaluate": evaluation_stage, "report": report}
    return modules[name].identity(cfg, known)


# ------------------------------------------------------------------ the main job, in order
STAGES: tuple[Stage, ...] = (
    Stage("generate", generate, "generate samples with h trajectories into a sharded dataset", "samples",
          (), ("samples/manifest.json",), True),
    Stage("annotate", annotate, "score every sample with the configured annotators", "annotations.parquet",
          ("generate",), ("annotations.parquet",), True),
    Stage("select", select, "top/bottom n samples per attribute, with contact sheets", "selection.parquet",
          ("annotate",), ("selection.parquet",)),
    Stage("probe", probe, "per-step linear probes: each attribute read from h_t and from x_t", "probes",
          ("annotate",), ("probes/probes.csv",)),
    Stage("pca", pca, "per-step PCA of h (streamed, multi-process) -> directions/pca.safetensors",
          "directions/pca.safetensors", ("generate",), ("directions/pca.safetensors",), True),
    Stage("jacobian", jacobian, "image-specific directions by Jacobian subspace iteration",
          "directions/jacobian.safetensors", (), ("directions/jacobian.safetensors",), True),
    Stage("supervised", supervised, "supervised directions (eq. 10) from the selection",
          "directions/supervised.safetensors", ("select",), ("directions/supervised.safetensors",)),
    Stage("disentangle", disentangle, "remove projections onto other directions (eq. 11)",
          "directions/disentangled.safetensors", ("supervised",),
          ("directions/disentangled.safetensors",)),
    Stage("fewshot", fewshot, "Fig. 8 as numbers: effect against n in h and x_T space; probe-step restriction",
          "fewshot", ("select", "probe"), ("fewshot/effect_vs_n.csv",)),
    Stage("figures", figures, "edit strips of every direction family for the report", "edits",
          ("pca", "jacobian", "supervised", "disentangle"), ("edits",)),
    Stage("evaluate", evaluate, "Table 1: effects of every edit on every attribute, held-out seeds", "evaluation",
          ("pca", "supervised", "disentangle"),
          ("evaluation/summary.json", "evaluation/table1_signed.csv"), True),
    Stage("report", report, "write <run_dir>/report/index.html", "report",
          ("figures", "evaluate", "select", "probe", "fewshot"), ("report/index.html",)),
)

#: commands outside the main job
TOOLS: tuple[Stage, ...] = (
    Stage("edit", edit, "grids of samples x scales for a directions file"),
    Stage("sample", sample, "write a PNG grid of seeds, optionally edited"),
    Stage("train-toy", train_toy, "train the embedded default DDPM on toy faces"),
    Stage("finetune-toy", finetune_toy, "phase 2 of the embedded default: fine-tune with skip dropout"),
    Stage("train-toy-annotator", train_toy_annotator, "train the toy-face annotator"),
    Stage("validate-toy", validate_toy, "check the embedded default against its ground truth"),
    Stage("explore", explore, "a local web app: sliders over the run's directions, naming, export (--host, --port)"),
)

#: every command but `run` and `config` (which pipeline.cli adds: `run` runs STAGES), by name
COMMANDS: dict[str, Stage] = {st.name: st for st in STAGES + TOOLS}

#: the commands that run Lightning Trainers: `run` and the distributed stages
DISTRIBUTED: frozenset[str] = frozenset({"run"} | {st.name for st in STAGES if st.distributed})
