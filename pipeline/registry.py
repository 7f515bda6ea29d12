"""The one stage registry: every `hspace` command, the module and function it runs, and for the main
job (`hspace run`) what each stage reads and writes.

``pipeline.cli`` builds its sub-commands from ``COMMANDS``, ``pipeline.stages.run`` runs ``STAGES``
in order, and the commands that run Lightning Trainers (every rank of a multi-process job takes
part) are ``DISTRIBUTED``. A stage's module is imported only when the stage runs (or its identity
is asked for), so that ``hspace --help`` does not load Lightning.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from pipeline.errors import ConfigError


@dataclass(frozen=True)
class Stage:
    name: str
    entry: str  # "module:function", the function taking the validated config
    help: str
    artefact: str = ""  # the output under run_dir that carries the stage's identity record (pipeline.formats.identity)
    after: tuple[str, ...] = ()  # stages whose outputs it reads
    outputs: tuple[str, ...] = ()  # paths under run_dir that must exist for it to count as done
    distributed: bool = False  # runs a Lightning Trainer (every rank takes part)

    def module(self) -> ModuleType:
        return importlib.import_module(self.entry.split(":")[0])

    def run(self, cfg, **kwargs) -> Any:
        return getattr(self.module(), self.entry.split(":")[1])(cfg, **kwargs)

    def identity(self, cfg, known: dict | None = None) -> dict:
        """The identity record the stage would write now (its module's ``identity``); ``known``:
        predicted ids of the artefacts it reads."""
        return self.module().identity(cfg, known)


# ------------------------------------------------------------------ the main job, in order
STAGES: tuple[Stage, ...] = (
    Stage("generate", "pipeline.stages.generate:run_generate",
          "generate samples with h trajectories into a sharded dataset", "samples",
          (), ("samples/manifest.json",), True),
    Stage("annotate", "pipeline.stages.annotate:run_annotate",
          "score every sample with the configured annotators", "annotations.parquet",
          ("generate",), ("annotations.parquet",), True),
    Stage("select", "pipeline.stages.select:run_select",
          "top/bottom n samples per attribute, with contact sheets", "selection.parquet",
          ("annotate",), ("selection.parquet",)),
    Stage("probe", "pipeline.stages.probe:run_probe",
          "per-step linear probes: each attribute read from h_t and from x_t", "probes",
          ("annotate",), ("probes/probes.csv",)),
    Stage("pca", "pipeline.stages.pca:run_pca",
          "per-step PCA of h (streamed, multi-process) -> directions/pca.safetensors",
          "directions/pca.safetensors", ("generate",), ("directions/pca.safetensors",), True),
    Stage("jacobian", "pipeline.stages.jacobian:run_jacobian",
          "image-specific directions by Jacobian subspace iteration",
          "directions/jacobian.safetensors", (), ("directions/jacobian.safetensors",), True),
    Stage("supervised", "pipeline.stages.supervised:run_supervised",
          "supervised directions (eq. 10) from the selection",
          "directions/supervised.safetensors", ("select",), ("directions/supervised.safetensors",)),
    Stage("disentangle", "pipeline.stages.disentangle:run_disentangle",
          "remove projections onto other directions (eq. 11)",
          "directions/disentangled.safetensors", ("supervised",),
          ("directions/disentangled.safetensors",)),
    Stage("fewshot", "pipeline.stages.fewshot:run_fewshot",
          "Fig. 8 as numbers: effect against n in h and x_T space; probe-step restriction",
          "fewshot", ("select", "probe"), ("fewshot/effect_vs_n.csv",)),
    Stage("figures", "pipeline.stages.figures:run_figures",
          "edit strips of every direction family for the report", "edits",
          ("pca", "jacobian", "supervised", "disentangle"), ("edits",)),
    Stage("evaluate", "pipeline.stages.evaluate:run_evaluate",
          "Table 1: effects of every edit on every attribute, held-out seeds", "evaluation",
          ("pca", "supervised", "disentangle"),
          ("evaluation/summary.json", "evaluation/table1_signed.csv"), True),
    Stage("report", "pipeline.stages.report:run_report", "write <run_dir>/report/index.html", "report",
          ("figures", "evaluate", "select", "probe", "fewshot"), ("report/index.html",)),
)

#: commands outside the main job
TOOLS: tuple[Stage, ...] = (
    Stage("edit", "pipeline.stages.edit:run_edit", "grids of samples x scales for a directions file"),
    Stage("sample", "pipeline.stages.sample:run_sample", "write a PNG grid of seeds, optionally edited"),
    Stage("train-toy", "toyfaces.train_ddpm:run_train_toy", "train the embedded default DDPM on toy faces"),
    Stage("finetune-toy", "toyfaces.train_ddpm:run_finetune_toy",
          "phase 2 of the embedded default: fine-tune with skip dropout"),
    Stage("train-toy-annotator", "toyfaces.annotator:run_train_toy_annotator",
          "train the toy-face annotator"),
    Stage("validate-toy", "toyfaces.validate:run_validate_toy",
          "check the embedded default against its ground truth"),
    Stage("sae", "pipeline.stages.sae:run_sae",
          "a sparse autoencoder on h (Lightning fit over the streamed shards); features labelled by annotation",
          distributed=True),
    Stage("explore", "pipeline.explore.app:run_explore",
          "a local web app: sliders over the run's directions, naming, export (--host, --port)"),
)

#: every command but `run` and `config` (which pipeline.cli adds: `run` runs STAGES), by name
COMMANDS: dict[str, Stage] = {st.name: st for st in STAGES + TOOLS}

#: the commands that run Lightning Trainers: `run` and the distributed stages and tools
DISTRIBUTED: frozenset[str] = frozenset({"run"} | {st.name for st in STAGES + TOOLS if st.distributed})


def check_skip(skip) -> None:
    """``run.skip`` names stages of the main job, or it is a ConfigError naming them."""
    names = [st.name for st in STAGES]
    unknown = [s for s in skip if s not in names]
    if unknown:
        raise ConfigError(f"run.skip: {', '.join(unknown)} is not a stage of the main job; its stages are {', '.join(names)}")
