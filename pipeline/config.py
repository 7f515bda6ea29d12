"""Configuration: typed defaults, conf.yaml, dotted ``key=value`` overrides, validation.

The dataclasses below are the schema and the defaults; ``conf.yaml`` at the project root
spells the same values out with comments (a test keeps the two identical). Unknown or
misspelt keys, values of the wrong type and values out of range (``RANGES``) are errors
naming the key and what it accepts, raised before any stage starts work.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from .errors import ConfigError


@dataclass
class ModelConfig:
    name_or_path: str = "toyfaces"  # embedded name, local save_pretrained folder, or hub id
    num_inference_steps: int = 20  # T
    eta: Any = 0.0  # 0 = DDIM (the embedded default), 1 = DDPM-like (the paper; conf.paper.yaml), or a list of T values
    hook: str = "after"  # where h lives: "after" (mid-block output) or "before" (its input)
    dtype: str = "float32"  # float32 | float16 | bfloat16
    device: Optional[str] = None  # null: cuda if available, else cpu (stages: set by the trainer)


@dataclass
class TrainerConfig:
    """Passed to lightning.Trainer: the same command runs on 1 CPU, 8 GPUs or several nodes."""

    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: Any = "32-true"


@dataclass
class SampleConfig:
    """`hspace sample`: a PNG grid of seeds (rows) x edit scales (columns)."""

    seeds: List[int] = field(default_factory=lambda: list(range(8)))
    directions: Optional[str] = None  # a directions file; null: no edit
    direction: str = "0"  # name or index of the direction in that file
    scales: List[float] = field(default_factory=lambda: [0.0])
    out: Optional[str] = None  # default: <run_dir>/sample.png


@dataclass
class GenerateConfig:
    """`hspace generate`: seeds first_seed .. first_seed + num_samples - 1 into <run_dir>/samples."""

    first_seed: int = 0
    num_samples: int = 512
    batch_size: int = 64  # per process; one shard per batch
    h_dtype: str = "float16"  # float16 | float32 | bfloat16


@dataclass
class AnnotateConfig:
    """`hspace annotate`: scores per sample -> <run_dir>/annotations.parquet."""

    annotators: List[str] = field(default_factory=lambda: ["toy"])  # registered names or "module:factory"
    options: Dict[str, Any] = field(default_factory=dict)  # per annotator, e.g. {clip: {model: ViT-B-32}}
    batch_size: int = 256


@dataclass
class SelectConfig:
    """`hspace select`: top n / bottom n samples per attribute -> <run_dir>/selection.parquet."""

    attributes: List[str] = field(default_factory=lambda: ["smile", "eye_open", "glasses", "hat", "yaw", "hair"])
    n: int = 50
    balance: Optional[str] = None  # conditioning attribute: half of each side from either of its classes
    threshold: float = 0.5  # class boundary of the balance attribute
    resolution: float = 0.01  # rank scores rounded to this step (ties by sample id); 0: exact
    contact_sheet_size: int = 10  # samples shown per side


@dataclass
class PCAConfig:
    """`hspace pca`: per-step (or joint) PCA of h -> <run_dir>/directions/pca.safetensors."""

    n_components: int = 10  # K (the paper: 25)
    oversample: Optional[int] = None  # extra components kept while streaming; null: = n_components
    joint: bool = False  # one PCA over the whole flattened trajectory instead of one per step
    batch_size: int = 256
    dtype: str = "float64"  # accumulation: float64 | float32 (2x faster, error far below truncation)
    align: str = "chain"  # sign alignment across steps: chain (to the neighbour) | reference (to step 0)
    seed: int = 0  # of the norm-matched random directions
    scales: List[float] = field(default_factory=lambda: [-4.0, -2.0, 0.0, 2.0, 4.0])  # in standard deviations


@dataclass
class JacobianConfig:
    """`hspace jacobian`: top-k Jacobian directions of a few samples -> directions/jacobian.safetensors."""

    sample_ids: List[int] = field(default_factory=lambda: [0, 1])  # samples (= seeds) to analyse
    k: int = 6  # directions per step
    steps: Optional[List[int]] = None  # step indices; null: every step
    method: str = "auto"  # auto (block Krylov) | subspace (Alg. 1) | sequential (Alg. 2) | deflation
    block: Optional[int] = None  # mini-batch size b of Alg. 2 (selects it when method is auto)
    tol: float = 1e-3  # relative stopping tolerance
    max_iter: int = 300
    tau: int = 10  # the step whose directions are applied at every step ("global at index")
    mask: Optional[str] = None  # rect:y0:y1:x0:x1 (fractions) or a PNG: only that image region
    seed: int = 0  # of the random start
    scales: List[float] = field(default_factory=lambda: [-600.0, -300.0, 0.0, 300.0, 600.0])  # J = d eps / d h is small on the toy (S ~ 0.1)


@dataclass
class RealImagesConfig:
    """Directions from two folders of real images through DDIM inversion (paper's BU3DFE case)."""

    positive_dir: Optional[str] = None
    negative_dir: Optional[str] = None
    paired: bool = False  # pair files by name and average per-pair differences
    name: str = "real"
    fixed_point_iterations: int = 1  # extra U-Net passes per inversion step (0: plain DDIM inversion)


@dataclass
class SupervisedConfig:
    """`hspace supervised`: eq. 10 per attribute -> <run_dir>/directions/supervised.safetensors."""

    attributes: List[str] = field(default_factory=list)  # empty: every attribute in selection.parquet
    method: str = "mean_difference"  # mean_difference | logistic
    convergence_ns: List[int] = field(default_factory=lambda: [1, 2, 5, 10, 20, 50])
    convergence_draws: int = 10
    seed: int = 0
    scales: List[float] = field(default_factory=lambda: [-3.0, -1.5, 0.0, 1.5, 3.0])  # suggested edit scales
    real: RealImagesConfig = field(default_factory=RealImagesConfig)


@dataclass
class DisentangleConfig:
    """`hspace disentangle`: eq. 11, primary -> directions to remove."""

    source: Optional[str] = None  # default <run_dir>/directions/supervised.safetensors
    pairs: Dict[str, Any] = field(default_factory=lambda: {  # a list of directions, or "others"
        a: "others" for a in ("smile", "eye_open", "glasses", "hat", "yaw", "hair")})


@dataclass
class EditConfig:
    """`hspace edit`: seeds x scales grids for a directions file, or sequential edits (Fig. 11)."""

    directions: Optional[str] = None  # a path, or pca | jacobian | supervised | disentangled | real
    names: List[str] = field(default_factory=list)  # empty: every direction in the file
    scales: List[float] = field(default_factory=list)  # empty: the file's suggested scales
    seeds: List[int] = field(default_factory=lambda: [100000, 100001, 100002])
    sequential: bool = False
    asyrp: bool = False
    x_T_space: bool = False  # apply the supervised directions' x_T-space version instead (Fig. 8)
    out_dir: Optional[str] = None  # default <run_dir>/edits/<file>
    batch_size: int = 64  # images per U-Net call (directions x scales x seeds); also the main job's edit strips


@dataclass
class EvaluateConfig:
    """`hspace evaluate`: Table 1 on held-out seeds -> <run_dir>/evaluation/."""

    first_seed: int = 1_000_000  # seeds never used to find the directions
    num_samples: int = 16  # per seed set
    repeats: int = 3  # disjoint seed sets; the table reports mean +- std across them
    batch_size: int = 64  # images per U-Net call (edits x seeds), and the most seeds in one Parquet part
    scale: float = 3.0  # edit strength of the supervised / disentangled directions
    match_norm: bool = True  # rescale each disentangled direction to its original's norm
    scorer: str = "toy"  # the annotator that measures the attributes (clip for faces)
    scorer_options: Dict[str, Any] = field(default_factory=dict)
    attributes: List[str] = field(default_factory=list)  # measured columns; empty: the directions' own
    own_attribute: Dict[str, str] = field(default_factory=dict)  # direction -> its scorer column, if named apart
    normalize: bool = True  # effects in standard deviations of the unedited scores
    quality: Optional[str] = "toy_consistency"  # image-quality annotator (face_pose for real faces)
    quality_score: str = "render_error"  # its score to report (face_prob for face_pose)
    pca_components: int = 3  # top PCA directions against as many norm-matched random ones
    pca_scale: float = 2.0  # in standard deviations along the component
    pixel_matched_random: bool = True  # also random directions rescaled to each component's pixel change
    bootstrap: int = 1000  # paired bootstrap resamples of the seeds for the checks' 95% intervals (0: none)


@dataclass
class ReportConfig:
    """`hspace report` and the edit strips it shows (`hspace run`'s figures step, seeds from edit.seeds)."""

    pca_components: int = 4  # leading PCA directions shown (and as many random ones)
    jacobian_directions: int = 6  # Jacobian directions shown


@dataclass
class ToyTrainConfig:
    """`hspace train-toy`: everything that determines the embedded default's weights."""

    out_dir: str = "runs/train-toy"
    steps: int = 5000
    batch_size: int = 32
    lr: float = 6e-4
    warmup_steps: int = 300
    ema_decay: float = 0.999
    min_snr_gamma: float = 5.0
    seed: int = 0
    block_out_channels: List[int] = field(default_factory=lambda: [32, 64, 128])
    layers_per_block: int = 2
    correlations: Dict[str, float] = field(default_factory=lambda: {"glasses~hair": 0.4})
    prediction_type: str = "v_prediction"  # v_prediction | epsilon
    beta_schedule: str = "squaredcos_cap_v2"  # squaredcos_cap_v2 (cosine) | linear
    timestep_spacing: str = "trailing"  # sampling timesteps start at t=999
    checkpoint_every: int = 250
    sample_every: int = 1000
    #: probability of zeroing all down-block skip connections of a training sample, so that the
    #: decoder must draw from h alone: without it the decoder reads small features (the eyes) from
    #: the skips and h-space edits cannot move them. Training only; the saved model is unchanged.
    skip_dropout: float = 0.0
    #: an exported model directory whose weights start the run (the fine-tune phase); null: random
    init_from: Optional[str] = None


#: what phase 2 must share with phase 1 (the model and the data): interpolated from train_toy,
#: so that one override of train_toy reaches both phases
_PHASE_1_KEYS = ("batch_size", "min_snr_gamma", "block_out_channels", "layers_per_block", "correlations",
                 "prediction_type", "beta_schedule", "timestep_spacing")


def _finetune_toy() -> "ToyTrainConfig":
    """Phase 2 of the embedded default: the phase-1 model fine-tuned with skip dropout."""
    return ToyTrainConfig(out_dir="runs/finetune-toy", init_from="runs/train-toy/model", steps=1000, lr=3e-4,
                          warmup_steps=0, ema_decay=0.995, seed=1, skip_dropout=0.75,
                          checkpoint_every=100, sample_every=400,
                          **{k: "${train_toy.%s}" % k for k in _PHASE_1_KEYS})


@dataclass
class ToyAnnotatorTrainConfig:
    """`hspace train-toy-annotator`: the toy-face factor reader."""

    out_dir: str = "runs/train-toy-annotator"
    steps: int = 3000
    batch_size: int = 64
    lr: float = 2e-3
    width: int = 32
    seed: int = 0


@dataclass
class HSpaceConfig:
    run_dir: str = "runs/demo"
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    annotate: AnnotateConfig = field(default_factory=AnnotateConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    pca: PCAConfig = field(default_factory=PCAConfig)
    jacobian: JacobianConfig = field(default_factory=JacobianConfig)
    supervised: SupervisedConfig = field(default_factory=SupervisedConfig)
    disentangle: DisentangleConfig = field(default_factory=DisentangleConfig)
    edit: EditConfig = field(default_factory=EditConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    train_toy: ToyTrainConfig = field(default_factory=ToyTrainConfig)
    finetune_toy: ToyTrainConfig = field(default_factory=_finetune_toy)
    train_toy_annotator: ToyAnnotatorTrainConfig = field(default_factory=ToyAnnotatorTrainConfig)


#: Range checks applied when the configuration is loaded, so that a bad value fails before a
#: stage spends minutes of sampling: dotted key -> (test, what the value must be).
def _at_least(low):
    return (lambda v: v >= low), f"an integer >= {low}" if isinstance(low, int) else f">= {low}"


_POSITIVE = (lambda v: v > 0), "> 0"
_PROBABILITY = (lambda v: 0 <= v <= 1), "in [0, 1]"


def _one_of(*choices):
    return (lambda v: v in choices), "one of " + ", ".join(map(str, choices))


RANGES: dict[str, tuple] = {
    "model.num_inference_steps": _at_least(1),
    "model.hook": _one_of("after", "before"),
    "model.dtype": _one_of("float32", "float16", "bfloat16"),
    "trainer.num_nodes": _at_least(1),
    "generate.first_seed": _at_least(0),
    "generate.num_samples": _at_least(1),
    "generate.batch_size": _at_least(1),
    "generate.h_dtype": _one_of("float16", "float32", "bfloat16"),
    "annotate.batch_size": _at_least(1),
    "select.n": _at_least(1),
    "select.resolution": _at_least(0.0),
    "select.contact_sheet_size": _at_least(0),
    "pca.n_components": _at_least(1),
    "pca.oversample": _at_least(0),
    "pca.batch_size": _at_least(1),
    "pca.dtype": _one_of("float64", "float32"),
    "pca.align": _one_of("chain", "reference"),
    "jacobian.k": _at_least(1),
    "jacobian.method": _one_of("auto", "subspace", "sequential", "deflation"),
    "jacobian.block": _at_least(1),
    "jacobian.tol": _POSITIVE,
    "jacobian.max_iter": _at_least(1),
    "jacobian.tau": _at_least(0),
    "supervised.method": _one_of("mean_difference", "logistic"),
    "supervised.convergence_draws": _at_least(1),
    "supervised.real.fixed_point_iterations": _at_least(0),
    "evaluate.first_seed": _at_least(0),
    "evaluate.num_samples": _at_least(2),
    "evaluate.repeats": _at_least(1),
    "evaluate.batch_size": _at_least(1),
    "edit.batch_size": _at_least(1),
    "evaluate.pca_components": _at_least(0),
    "evaluate.bootstrap": _at_least(0),
    "report.pca_components": _at_least(0),
    "report.jacobian_directions": _at_least(0),
    **{k.format(section): v for section in ("train_toy", "finetune_toy") for k, v in {
        "{0}.steps": _at_least(1),
        "{0}.batch_size": _at_least(1),
        "{0}.lr": _POSITIVE,
        "{0}.warmup_steps": _at_least(0),
        "{0}.ema_decay": _PROBABILITY,
        "{0}.checkpoint_every": _at_least(1),
        "{0}.sample_every": _at_least(1),
        "{0}.skip_dropout": _PROBABILITY,
    }.items()},
    "train_toy_annotator.steps": _at_least(1),
    "train_toy_annotator.batch_size": _at_least(1),
    "train_toy_annotator.lr": _POSITIVE,
    "train_toy_annotator.width": _at_least(1),
}


def check_ranges(cfg: DictConfig, source: str = "the configuration") -> None:
    """Raise ConfigError naming the first key whose value is out of its range (null passes:
    it means "the default behaviour" wherever a key allows it). ``model.eta`` may be a number
    or a list of numbers, each >= 0."""
    for key, (ok, must) in RANGES.items():
        value = OmegaConf.select(cfg, key)
        if value is not None and not ok(value):
            raise ConfigError(f"{key}={value!r} in {source}: must be {must}")
    eta = OmegaConf.select(cfg, "model.eta")
    etas = list(eta) if isinstance(eta, (list, tuple)) or OmegaConf.is_list(eta) else [eta]
    if not etas or not all(isinstance(e, (int, float)) and not isinstance(e, bool) and e >= 0 for e in etas):
        raise ConfigError(f"model.eta={eta!r} in {source}: must be a number >= 0 (0 DDIM, 1 DDPM-like) or a list of them")


def defaults() -> DictConfig:
    return OmegaConf.structured(HSpaceConfig)


def _valid_keys(cfg: DictConfig, dotted: str) -> str:
    parent = dotted.rsplit(".", 1)[0] if "." in dotted else ""
    node = OmegaConf.select(cfg, parent) if parent else cfg
    keys = sorted(node.keys()) if isinstance(node, DictConfig) else []
    where = f"under '{parent}'" if parent else "at the top level"
    return f"valid keys {where}: {', '.join(keys)}"


def _replace_mappings(merged: DictConfig, schema: DictConfig, other: dict, prefix: str = "") -> None:
    """Mapping-valued options (disentangle.pairs, annotate.options) are replaced, not merged key
    by key: a user's `pairs: {age: [gender]}` means exactly that pair, not the defaults plus it."""
    for key, value in other.items():
        node = schema.get(key) if isinstance(schema, DictConfig) else None
        if not isinstance(node, DictConfig) or not isinstance(value, dict):
            continue
        if OmegaConf.get_type(node) is dict:
            OmegaConf.update(merged, f"{prefix}{key}", value, merge=False)
        else:
            _replace_mappings(merged, node, value, f"{prefix}{key}.")


def _merge(cfg: DictConfig, other, source: str) -> DictConfig:
    try:
        merged = OmegaConf.merge(cfg, other)
        _replace_mappings(merged, cfg, other)
        return merged
    except ConfigKeyError as e:
        key = getattr(e, "full_key", None) or str(e)
        raise ConfigError(f"unknown config key '{key}' in {source}; {_valid_keys(cfg, key)}") from None
    except ValidationError as e:
        key = getattr(e, "full_key", "?")
        raise ConfigError(f"invalid value for '{key}' in {source}: {str(e).splitlines()[0]}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"invalid configuration in {source}: {str(e).splitlines()[0]}") from None


def parse_overrides(overrides: List[str]) -> dict:
    """['a.b=1', 'c=[1,2]'] -> nested dict; values are parsed as YAML."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. generate.num_samples=1000)")
        key, raw = item.split("=", 1)
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def load_config(path: str | os.PathLike | None = None, overrides: List[str] | None = None) -> DictConfig:
    """Defaults, then the YAML file (if any), then ``key=value`` overrides; validated."""
    cfg = defaults()
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {p} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p} must hold a mapping of sections, got {type(data).__name__}")
        cfg = _merge(cfg, data, str(p))
    if overrides:
        cfg = _merge(cfg, parse_overrides(overrides), "command-line overrides")
    check_ranges(cfg, f"{path} or the command line" if path is not None else "the command line")
    OmegaConf.set_readonly(cfg, True)
    return cfg


def to_dict(cfg) -> dict:
    """A plain dict from a DictConfig, a config dataclass or a mapping."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    return dict(cfg)


def config_hash(*parts) -> str:
    """A short stable hash of JSON-able config parts (what determines a stage's output)."""
    from .io import hash_json

    return hash_json(*[to_dict(p) if isinstance(p, DictConfig) else p for p in parts])
