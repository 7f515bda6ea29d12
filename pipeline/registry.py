"""The one stage registry: every `hspace` command, the module and function it runs, and for the main
job (`hspace run`) what each stage reads and what its output depends on.

Each stage *declares* its inputs: the run-directory artefacts it reads, the configuration sections
its output depends on, whether it uses the model (and at which precision), the annotators' weights,
and the files the configuration names. The machinery derives the rest from that declaration: the
identity record every artefact carries (:meth:`Stage.identity`), the key of its resumable parts
(:meth:`Stage.part_key`), the stages it waits for (:attr:`Stage.after`) and the order of the main
job (:data:`STAGES`, a topological order of the declared reads) and the order ``hspace run`` runs it
in (:func:`run_order`: the paper's pipeline and its report first, then each stage marked ``further``
followed by the report again when the report shows what it wrote). A field may be a value or a
function of the configuration (a read that only some settings make).

``pipeline.cli`` builds its sub-commands from ``COMMANDS``, ``pipeline.stages.run`` runs
``run_order(cfg)``, and the commands that run Lightning Trainers (every rank of a multi-process job takes
part) are ``DISTRIBUTED``. A stage's module is named as a string and imported only when the stage
runs, so that ``hspace --help`` does not load Lightning, and so that a stage module can read its own
record here.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Union

from pipeline.errors import ConfigError, DatasetError
from pipeline.formats.identity import MODEL_DROP, MODEL_SECTIONS, artefact_ids, config_sections, make_record, present
from pipeline.io import hash_json

Declared = Union[tuple, Callable[[Any], Any]]  # a value, or a function of the configuration that gives it


def _value(field, cfg):
    return field(cfg) if callable(field) else field


@dataclass(frozen=True)
class Stage:
    name: str
    entry: str  # "module:function", the function taking the validated config
    help: str
    artefact: str = ""  # the output under run_dir that carries the stage's identity record (pipeline.formats.identity)
    outputs: tuple[str, ...] = ()  # paths under run_dir that must exist for it to count as done
    reads: tuple[str, ...] = ()  # run-directory artefacts it reads (an error when one is missing)
    optional: tuple[str, ...] = ()  # artefacts it reads when they exist
    only: dict = field(default_factory=dict)  # artefact -> function of the configuration: read only when true
    sections: Declared = ()  # configuration sections (dotted) its output depends on
    drop: Declared = ()  # keys inside them that do not change it (batch sizes)
    model: Declared = False  # True: the model section, its weights and trainer.precision; "float32": no precision
    annotators: Declared = False  # the annotators' weights
    files: Declared = ()  # configuration keys naming files or folders it reads: their content, not their path
    part_drop: tuple[str, ...] = ()  # keys that decide how its parts are combined, not what one part holds
    distributed: bool = False  # runs a Lightning Trainer (every rank takes part)
    writes: Declared = True  # writes the run directory (takes its writer lock)
    further: bool = False  # a further analysis: `hspace run` runs it after the paper's pipeline and its first report
    renders: bool = False  # the report: rendered after the paper's pipeline and again after each further analysis

    def module(self) -> ModuleType:
        return importlib.import_module(self.entry.split(":")[0])

    def run(self, cfg, **kwargs) -> Any:
        return getattr(self.module(), self.entry.split(":")[1])(cfg, **kwargs)

    @property
    def after(self) -> tuple[str, ...]:
        """The main-job stages whose outputs it may read (every declared read, whatever the settings)."""
        return tuple(PRODUCERS[a] for a in self.reads + self.optional if a in PRODUCERS)

    def required(self, cfg) -> list[str]:
        """The artefacts it must read with this configuration."""
        return [a for a in self.reads if a not in self.only or self.only[a](cfg)]

    def may_read(self, cfg=None) -> tuple[str, ...]:
        """The artefacts it reads with this configuration, present or not (``cfg`` None: whatever the settings)."""
        return tuple(a for a in self.reads + self.optional if cfg is None or a not in self.only or self.only[a](cfg))

    def read_names(self, cfg, known: dict | None = None) -> list[str]:
        """The artefacts it reads with this configuration: the required ones and the optional ones present."""
        wanted = [a for a in self.optional if a not in self.only or self.only[a](cfg)]
        return self.required(cfg) + present(cfg.run_dir, wanted, known)

    def inputs(self, cfg, known: dict | None = None, drop: tuple[str, ...] = ()) -> tuple[dict, dict, list[str]]:
        """(configuration sections, assets, names of the artefacts read) of its output."""
        from pipeline.io import hash_file, hash_tree

        model = _value(self.model, cfg)
        files = self.inputs_exist(cfg)
        sections = [*_value(self.sections, cfg), *(MODEL_SECTIONS if model is True else ("model",) if model else ())]
        config = config_sections(cfg, *sections, drop=(*_value(self.drop, cfg), *MODEL_DROP, *files, *drop))
        assets = {key: hash_tree(path) if Path(path).is_dir() else hash_file(path) for key, path in files.items()}
        if model:
            from pipeline.engine.loading import weights_identity

            assets["model"] = weights_identity(cfg.model.name_or_path)
        if _value(self.annotators, cfg):
            from annotators import assets_identity

            assets["annotators"] = assets_identity()
        return config, assets, self.read_names(cfg, known)

    def inputs_exist(self, cfg) -> dict[str, str]:
        """The files the configuration names for it (key -> path), checked to exist (a ConfigError if not)."""
        files = {key: str(_config_value(cfg, key)) for key in _value(self.files, cfg)}
        missing = [f"{k}={v}" for k, v in files.items() if not Path(v).exists()]
        if missing:
            raise ConfigError(f"{missing[0]}: no such file or folder")
        return files

    def missing_reads(self, cfg) -> list[str]:
        """The artefacts it must read that the run directory does not hold (each written by a stage, in order),
        once the files the configuration names are checked to exist (a ConfigError if not)."""
        self.inputs_exist(cfg)
        return [name for name in self.required(cfg) if name in PRODUCERS and not present(cfg.run_dir, [name])]

    def check_reads(self, cfg) -> None:
        """Before the stage takes the run directory's lock (so before anything is created): the files the
        configuration names exist, and so does every artefact it must read, or a one-line error names the stage
        that writes the first one missing."""
        missing = self.missing_reads(cfg)
        if missing:
            raise DatasetError(f"{Path(cfg.run_dir) / missing[0]} is missing: run `hspace {PRODUCERS[missing[0]]} "
                               f"run_dir={cfg.run_dir}` first (or `hspace run`, which runs every stage in order)")

    def identity(self, cfg, known: dict | None = None, drop: tuple[str, ...] = (),
                 reads: tuple[str, ...] | None = None) -> dict:
        """The identity record the stage would write now; ``known``: predicted ids of the artefacts it reads.
        ``drop`` and ``reads`` narrow it to what an intermediate output depends on (the SAE's weights: not the
        labelling keys, the samples only)."""
        config, assets, names = self.inputs(cfg, known, drop)
        names = [n for n in names if reads is None or n in reads]
        return make_record(self.name, config, assets, artefact_ids(cfg.run_dir, names, known))

    def part_inputs(self, cfg) -> dict:
        """What every resumable part of its output is made from, whichever items it covers: its inputs
        without ``part_drop``, and the samples dataset by its content identity (not by which samples
        it holds: a part stays valid when the dataset is extended)."""
        from pipeline.formats.samples import read_manifest

        config, assets, names = self.inputs(cfg, drop=self.part_drop)
        artefacts = {n: read_manifest(cfg.run_dir)["identity_hash"] for n in names if n == "samples"}
        artefacts.update(artefact_ids(cfg.run_dir, [n for n in names if n != "samples"]))
        return {"config": config, "assets": assets, "artefacts": artefacts}

    def part_key(self, cfg) -> str:
        return hash_json(self.part_inputs(cfg))

    def writes_run_dir(self, cfg) -> bool:
        return bool(_value(self.writes, cfg))


def _config_value(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _inside_run_dir(path, cfg) -> bool:
    """``path`` (None: the default, under run_dir) is inside the run directory."""
    if not path:
        return True
    run_dir = Path(cfg.run_dir).resolve()
    return Path(path).resolve() == run_dir or run_dir in Path(path).resolve().parents


#: what a calibration of directions depends on besides the directions, the model and the scorer's weights
CALIBRATION_SECTIONS = ("calibrate", "evaluate.scorer", "evaluate.scorer_options", "evaluate.own_attribute",
                        "evaluate.scale")


#: evaluate's settings that only the calibrated evaluation (evaluate-calibrated) reads
EVALUATED_LATER = ("evaluate.calibrated", "evaluate.sweep_samples", "evaluate.sweep_multiples", "evaluate.sae_features")


def _auto(cfg) -> bool:
    """disentangle.pairs asks for ``auto`` (it calibrates the source directions, in memory)."""
    return bool(cfg.calibrate.enabled) and cfg.disentangle.uses_auto


def evaluated_strips(cfg) -> bool:
    """Whether evaluate-calibrated draws the strips of the supervised, disentangled, PCA and random
    directions (its dose-response sweep applies them at their strip scales to seeds that include
    edit.seeds): then the figures stage leaves them out rather than sample the same images twice."""
    ev = cfg.evaluate
    sweep = set(range(ev.first_seed, ev.first_seed + min(ev.sweep_samples, ev.num_samples)))
    return bool(sweep) and set(cfg.edit.seeds) <= sweep


def calibration_key(cfg) -> str:
    """What a calibration stored in a directions file was measured with (its settings, the scorer and
    the model), to tell whether it is current."""
    calibration = Stage("calibration", "", "", sections=CALIBRATION_SECTIONS, drop=("calibrate.batch_size",), model=True,
                        annotators=True)
    config, assets, _ = calibration.inputs(cfg)
    return hash_json(config, assets)


def _real(cfg) -> bool:
    return bool(cfg.supervised.real.positive_dir and cfg.supervised.real.negative_dir)


DIRECTIONS = tuple(f"directions/{n}.safetensors" for n in ("pca", "jacobian", "supervised", "disentangled", "real"))
SUPERVISED = "directions/supervised.safetensors"
DISENTANGLED = "directions/disentangled.safetensors"

# ------------------------------------------------------------------ the main job
_MAIN_JOB: tuple[Stage, ...] = (
    Stage("generate", "pipeline.stages.generate:run_generate",
          "generate samples with h trajectories into a sharded dataset", "samples", ("samples/manifest.json",),
          sections=("generate",), drop=lambda cfg: ("generate.batch_size", "generate.writer_queue", "generate.record_x_t",
                                                    *(("generate.h_steps",) if cfg.generate.h_steps is None else ())),
          model=True, files=lambda cfg: ("generate.prompts_file",) if cfg.generate.prompts_file else (),
          part_drop=("generate.first_seed", "generate.num_samples"), distributed=True),
    Stage("annotate", "pipeline.stages.annotate:run_annotate",
          "score every sample with the configured annotators", "annotations.parquet", ("annotations.parquet",),
          reads=("samples",), sections=("annotate",), drop=("annotate.batch_size",), annotators=True, distributed=True),
    Stage("select", "pipeline.stages.select:run_select",
          "top/bottom n samples per attribute, with contact sheets", "selection.parquet", ("selection.parquet",),
          reads=("annotations.parquet", "samples"), sections=("select",)),
    Stage("probe", "pipeline.stages.probe:run_probe",
          "per-step linear probes: each attribute read from h_t and from x_t", "probes", ("probes/probes.csv",),
          reads=("samples", "annotations.parquet"), sections=("probe", "select.attributes"),
          drop=("probe.batch_size", "probe.n_jobs"),
          model=lambda cfg: "x_t" in cfg.probe.spaces, further=True),
    Stage("pca", "pipeline.stages.pca:run_pca",
          "per-step PCA of h (streamed, multi-process) -> directions/pca.safetensors",
          "directions/pca.safetensors", ("directions/pca.safetensors",), reads=("samples",), sections=("pca",),
          distributed=True),
    Stage("jacobian", "pipeline.stages.jacobian:run_jacobian",
          "image-specific directions by Jacobian subspace iteration",
          "directions/jacobian.safetensors", ("directions/jacobian.safetensors",), sections=("jacobian",),
          model="float32",  # its tolerance is below half precision's rounding: float32 whatever trainer.precision says
          files=lambda cfg: ("jacobian.mask",) if cfg.jacobian.mask and not str(cfg.jacobian.mask).startswith("rect:")
          else (), part_drop=("jacobian.sample_ids", "jacobian.tau", "jacobian.scales"), distributed=True),
    Stage("supervised", "pipeline.stages.supervised:run_supervised",
          "supervised directions (eq. 10) from the selection", SUPERVISED, (SUPERVISED,),
          reads=("selection.parquet", "samples", "probes"), only={"probes": lambda cfg: cfg.supervised.restrict_steps},
          sections=("supervised",), model=_real,
          files=lambda cfg: ("supervised.real.positive_dir", "supervised.real.negative_dir") if _real(cfg) else ()),
    Stage("disentangle", "pipeline.stages.disentangle:run_disentangle",
          "remove projections onto other directions (eq. 11)",
          DISENTANGLED, (DISENTANGLED,), reads=(SUPERVISED,), only={SUPERVISED: lambda cfg: not cfg.disentangle.source},
          sections=lambda cfg: ("disentangle", *(CALIBRATION_SECTIONS if _auto(cfg) else ())), drop=("calibrate.batch_size",),
          model=_auto, annotators=_auto, files=lambda cfg: ("disentangle.source",) if cfg.disentangle.source else ()),
    Stage("calibrate", "pipeline.stages.calibrate:run_calibrate",
          "calibrated strengths of the supervised and disentangled directions -> calibration/strengths.json",
          "calibration", ("calibration/strengths.json",), reads=(SUPERVISED,), optional=(DISENTANGLED,),
          sections=CALIBRATION_SECTIONS, drop=("calibrate.batch_size",), model=lambda cfg: cfg.calibrate.enabled,
          annotators=lambda cfg: cfg.calibrate.enabled, further=True),
    Stage("figures", "pipeline.stages.figures:run_figures",
          "edit strips of every direction family for the report", "edits", ("edits/identity.json",),
          optional=(*DIRECTIONS, "calibration"), only={"calibration": lambda cfg: not evaluated_strips(cfg)},
          sections=("report", "edit.seeds", "evaluate.first_seed", "evaluate.sweep_samples", "evaluate.num_samples",
                    "evaluate.pca_components"), model=True),
    Stage("evaluate", "pipeline.stages.evaluate:run_evaluate",
          "Table 1 at the fixed scale and PCA against random (Fig. 6) on held-out seeds", "evaluation",
          ("evaluation/summary.json", "evaluation/table1_signed.csv"), reads=(SUPERVISED,),
          optional=(DISENTANGLED, "directions/pca.safetensors"),
          only={"directions/pca.safetensors": lambda cfg: cfg.evaluate.pca_components > 0},
          sections=("evaluate", "calibrate.first_seed"), drop=EVALUATED_LATER, model=True, annotators=True,
          part_drop=("evaluate.bootstrap",), distributed=True),
    Stage("evaluate-calibrated", "pipeline.stages.evaluate:run_evaluate_calibrated",
          "Table 1 at calibrated strengths, dose-response, the evaluated edit strips, the SAE family",
          "evaluation-calibrated", ("evaluation-calibrated/summary.json",),
          reads=("calibration", "evaluation", SUPERVISED),
          optional=(DISENTANGLED, "directions/pca.safetensors", "directions/sae.safetensors"),
          only={"directions/pca.safetensors": lambda cfg: cfg.evaluate.pca_components > 0 or cfg.evaluate.sae_features > 0,
                "directions/sae.safetensors": lambda cfg: cfg.evaluate.sae_features > 0},
          sections=("evaluate", "calibrate", "edit.seeds"), drop=("calibrate.batch_size",), model=True, annotators=True,
          part_drop=("evaluate.bootstrap",), distributed=True, further=True),
    Stage("fewshot", "pipeline.stages.fewshot:run_fewshot",
          "Fig. 8 as numbers: effect against n in h and x_T space; probe-step restriction",
          "fewshot", ("fewshot/effect_vs_n.csv",), reads=("selection.parquet", "samples", "annotations.parquet"),
          optional=("probes",), only={"probes": lambda cfg: cfg.fewshot.restriction},
          sections=("fewshot", "evaluate.scorer", "evaluate.scorer_options", "supervised.attributes",
                    "annotate.annotators"), drop=("fewshot.batch_size",), model=True, annotators=True, further=True),
    Stage("report", "pipeline.stages.report:run_report", "write <run_dir>/report/index.html", "report",
          ("report/index.html",), optional=("samples", "selection.parquet", "edits", "evaluation",
                                             "evaluation-calibrated", "probes", "fewshot", "sae"),
          sections=("report",), renders=True),
)

#: artefact -> the stage that writes it
PRODUCERS: dict[str, str] = {st.artefact: st.name for st in _MAIN_JOB}


def ordered(stages) -> tuple[Stage, ...]:
    """The stages in an order where each comes after every stage it reads from (their listed order where
    the reads leave it free); a cycle is an error."""
    out, done, todo = [], set(), list(stages)
    names = {st.name for st in todo}
    while todo:
        ready = next((st for st in todo if all(a in done or a not in names for a in st.after)), None)
        if ready is None:
            raise ConfigError(f"the stages {[st.name for st in todo]} read each other's outputs in a cycle")
        out.append(ready)
        done.add(ready.name)
        todo.remove(ready)
    return tuple(out)


#: the main job, in the order its declared reads give
STAGES: tuple[Stage, ...] = ordered(_MAIN_JOB)


def run_order(cfg=None, stages: tuple[Stage, ...] = STAGES) -> tuple[Stage, ...]:
    """The order `hspace run` runs ``stages`` in: the paper's pipeline (every stage neither ``further`` nor
    ``renders``, with each further analysis one of them reads with this configuration, and what that one
    reads in turn), then the report (``renders``), then each further analysis, followed by the report again
    when the report shows its artefact;
    each part in the order its declared reads give. ``cfg`` None: the reads whatever the settings."""
    render = [st for st in stages if st.renders]
    further = {st.name: st for st in stages if st.further}
    first = [st for st in stages if not st.further and not st.renders]
    reading = list(first)
    while reading:  # a further analysis that a stage of the first part reads joins the first part
        names = [PRODUCERS.get(a) for a in reading.pop().may_read(cfg)]
        pulled = [further.pop(n) for n in names if n in further]
        first += pulled
        reading += pulled
    first = [st for st in stages if st in first]  # the registry's order, which ordered() keeps where reads allow
    out = [*ordered(first), *render]
    for st in ordered(tuple(further.values())):  # the report again when it shows what the analysis wrote
        out += [st, *(r for r in render if st.artefact in r.may_read(cfg))]
    return tuple(out)

#: commands outside the main job
TOOLS: tuple[Stage, ...] = (
    Stage("edit", "pipeline.stages.edit:run_edit", "grids of samples x scales for a directions file",
          writes=lambda cfg: _inside_run_dir(cfg.edit.out_dir, cfg)),
    Stage("sample", "pipeline.stages.sample:run_sample", "write a PNG grid of seeds, optionally edited",
          writes=lambda cfg: Path(cfg.run_dir).is_dir() and _inside_run_dir(cfg.sample.out, cfg)),  # no run: ./sample.png
    Stage("train-toy", "toyfaces.train_ddpm:run_train_toy", "train the embedded default DDPM on toy faces",
          writes=False),
    Stage("finetune-toy", "toyfaces.train_ddpm:run_finetune_toy",
          "phase 2 of the embedded default: fine-tune with skip dropout", writes=False),
    Stage("train-toy-annotator", "toyfaces.annotator:run_train_toy_annotator",
          "train the toy-face annotator", writes=False),
    Stage("validate-toy", "toyfaces.validate:run_validate_toy",
          "check the embedded default against its ground truth"),
    Stage("sae", "pipeline.stages.sae:run_sae",
          "a sparse autoencoder on h (Lightning fit over the streamed shards); features labelled by annotation",
          "sae", ("directions/sae.safetensors",), reads=("samples",),
          optional=("annotations.parquet", "directions/pca.safetensors"), sections=("sae", "trainer.precision"),
          drop=("sae.num_workers", "sae.checkpoint_every", "sae.log_every"), distributed=True),
    Stage("explore", "pipeline.explore.app:run_explore",
          "a local web app: sliders over the run's directions, naming, export (--host, --port)",
          writes=False),  # a reader: it takes the writer lock only while it saves
)

#: every command but `run` and `config` (which pipeline.cli adds: `run` runs STAGES), by name
COMMANDS: dict[str, Stage] = {st.name: st for st in STAGES + TOOLS}

#: the commands that run Lightning Trainers: `run` and the distributed stages and tools
DISTRIBUTED: frozenset[str] = frozenset({"run"} | {st.name for st in STAGES + TOOLS if st.distributed})


def record(name: str, cfg, known: dict | None = None) -> dict:
    """The identity record stage ``name`` would write now."""
    return COMMANDS[name].identity(cfg, known)


def part_key(name: str, cfg) -> str:
    return COMMANDS[name].part_key(cfg)


def check_skip(skip) -> None:
    """``run.skip`` names stages of the main job, or it is a ConfigError naming them."""
    names = [st.name for st in STAGES]
    unknown = [s for s in skip if s not in names]
    if unknown:
        raise ConfigError(f"run.skip: {', '.join(unknown)} is not a stage of the main job; its stages are {', '.join(names)}")
