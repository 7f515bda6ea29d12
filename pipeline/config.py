"""Configuration: one schema (pydantic), conf.yaml, dotted ``key=value`` overrides, validation.

The models below are the schema: each field's type, choices (``Literal``), range (``Field(ge=...)``),
default and description sit together, and cross-field rules (steps against T, ...) are validators
of :class:`HSpaceConfig`. ``conf.yaml`` is generated from them (``hspace config --defaults``; a test
keeps it equal). :func:`load_config` layers the defaults, a YAML file and ``key=value`` overrides,
then validates once; every problem is a one-line :class:`ConfigError` naming the key, where it was
set (the file, the command line) and what the key accepts, raised before any stage starts work.

Layering rules: in a file, a section merges into the defaults key by key, while a mapping-valued
option (``annotate.options``, ``disentangle.pairs``, ...) is replaced whole. On the command line
``a.b.c=v`` sets ONE key (inside a mapping too: the mapping's other keys stay); ``a.b={...}`` (a
YAML flow mapping as the value) replaces the whole mapping. ``${other.key}`` interpolates another
key (finetune_toy's model and data keys follow train_toy that way).
"""
from __future__ import annotations

import copy
import dataclasses
import os
import typing
from pathlib import Path
from typing import Annotated, Any, Dict, List, Literal, Optional, Union

import annotated_types
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from pipeline.errors import ConfigError

NonNegInt = Annotated[int, Field(ge=0)]
NonNegFloat = Annotated[float, Field(ge=0)]


class Section(BaseModel):
    """A configuration section: unknown keys are errors, values are read-only."""

    model_config = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True)


def _accepts(text: str) -> dict:
    """Field(**_accepts("...")): what the key accepts, in error messages, when the type says it badly."""
    return {"json_schema_extra": {"accepts": text}}


# ------------------------------------------------------------------------------------------ sections
class ModelConfig(Section):
    """the diffusion model and its sampler"""

    name_or_path: str = Field("toyfaces", description="embedded default; or a local save_pretrained folder, or a hub "
                              "id such as google/ddpm-ema-celebahq-256 (HF cache + HF_HUB_OFFLINE=1 works)")
    num_inference_steps: int = Field(20, ge=1, description="T; step index 0 is the first (noisiest) sampling step")
    eta: Union[NonNegFloat, List[NonNegFloat]] = Field(
        0.0, description="0 = DDIM (the embedded default), 1 = DDPM-like (the paper), or a list of T values",
        **_accepts("a number >= 0 (0 DDIM, 1 DDPM-like) or a list of T such numbers"))
    hook: str = Field("after", pattern=r"^[A-Za-z_]\w*(\.\w+)*$",
                      description='h = mid-block output ("after"), its input ("before"), or the output of a U-Net '
                      'module by dotted path (up_blocks.0, down_blocks.3.resnets.1); checked against the model',
                      **_accepts("after, before or a dotted module path of the U-Net (up_blocks.0)"))
    prompt: str = Field("", description="text-to-image models: the prompt of every sample unless generate.prompts "
                        "says otherwise, and of edits and evaluation")
    negative_prompt: str = Field("", description="text-to-image models: the unconditional branch's prompt")
    guidance_scale: float = Field(7.5, ge=0, description="text-to-image models: classifier-free guidance (1: one "
                                  "conditional pass; h is the conditional branch's, edits go into both)")
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="of the U-Net's weights")
    device: Optional[str] = Field(None, description="null: cuda if available, else cpu (stages take it from `trainer`)")


class TrainerConfig(Section):
    """passed to lightning.Trainer: the same command runs on 1 CPU, 8 GPUs or several nodes"""

    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps", "tpu"] = Field("auto", description="cpu | gpu | auto")
    devices: Union[int, List[NonNegInt], Literal["auto"]] = Field(
        1, description="number of processes/GPUs per node (-1: all), or a list of GPU ids",
        **_accepts("an integer >= 1, -1 (every device), a non-empty list of device ids or 'auto'"))
    num_nodes: int = Field(1, ge=1)
    strategy: str = Field("auto", description="auto | ddp | ddp_spawn ...")
    precision: Literal["32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true", 32, 16, 64, "bf16"] = Field(
        "32-true", description="32-true | 16-mixed | bf16-mixed | 16-true | bf16-true: what every stage samples in, "
        "with or without a Trainer; jacobian computes in float32 (its tol is below half precision's "
        "rounding)")

    @field_validator("devices")
    @classmethod
    def _devices(cls, v):
        if (isinstance(v, int) and v < 1 and v != -1) or (isinstance(v, list) and not v):
            raise PydanticCustomError("devices", "no devices")
        return v


class SampleConfig(Section):
    """hspace sample: seeds (rows) x scales (columns) -> a PNG grid"""

    seeds: List[NonNegInt] = Field(list(range(8)), min_length=1)
    directions: Optional[str] = Field(None, description="a directions file (.safetensors); null: plain samples")
    direction: str = Field("0", description="name or index of a direction in that file")
    scales: List[float] = Field([0.0], min_length=1)
    out: Optional[str] = Field(None, description="default <run_dir>/sample.png")


class GenerateConfig(Section):
    """hspace generate: samples with their h trajectories -> <run_dir>/samples"""

    first_seed: int = Field(0, ge=0, description="sample i has seed first_seed + i (sample_id = seed)")
    num_samples: int = Field(512, ge=1)
    batch_size: int = Field(64, ge=1, description="per process; one shard per batch")
    writer_queue: int = Field(0, ge=0, description="> 0: a writer thread encodes and writes the shards while the "
                              "U-Net makes the next batches, this many waiting (for GPUs); 0: each batch written before "
                              "the next (an interrupt then leaves exactly the shards written)")
    h_dtype: Literal["float16", "float32", "bfloat16"] = Field("float16", description="h as stored")
    record_x_t: bool = Field(True, description="also store x_t, the latent entering every step (float32), which "
                             "the probe stage reads instead of sampling the seeds again (the toy: 0.25 MB per "
                             "sample; a 256-px pixel model at T=50: 39 MB, so conf.paper.yaml turns it off)")
    prompts: List[str] = Field([], description="text-to-image models: [] = model.prompt for every sample, one prompt "
                               "for all, or one per sample")
    prompts_file: Optional[str] = Field(None, description="text-to-image models: a text file with one prompt per "
                                        "line, one line per sample (instead of prompts)")

    @model_validator(mode="after")
    def _prompts_per_sample(self):
        if len(self.prompts) not in (0, 1, self.num_samples):
            raise _cross("generate.prompts", self.prompts, f"empty, one prompt or one per sample "
                         f"(generate.num_samples={self.num_samples}), got {len(self.prompts)}", "generate.num_samples")
        if self.prompts and self.prompts_file:
            raise _cross("generate.prompts_file", self.prompts_file, "null when generate.prompts is given",
                         "generate.prompts")
        return self


class AnnotateConfig(Section):
    """hspace annotate: scores per sample -> <run_dir>/annotations.parquet"""

    annotators: List[str] = Field(["toy"], min_length=1,
                                  description="toy | clip | face_pose | celeba | hopenet | package.module:factory")
    options: Dict[str, Dict[str, Any]] = Field(
        {}, description="per annotator, e.g. {clip: {model: ViT-B-32, pretrained: openai, prompts: celeba40}, "
        "celeba: {checkpoint: /path/celeba.pt}, hopenet: {checkpoint: /path/hopenet.pkl}}")
    batch_size: int = Field(256, ge=1)

    @model_validator(mode="after")
    def _options_name_annotators(self):
        unknown = sorted(set(self.options) - set(self.annotators))
        if unknown:
            raise _cross("annotate.options", self.options, f"keyed by names in annotate.annotators {self.annotators} "
                         f"(it has entries for {unknown})", "annotate.annotators")
        return self


class SelectConfig(Section):
    """hspace select: top/bottom n per attribute -> <run_dir>/selection.parquet"""

    attributes: List[str] = Field(["smile", "eye_open", "glasses", "hat", "yaw", "hair"],
                                  description="empty: every annotation column")
    n: int = Field(50, ge=1)
    balance: Optional[str] = Field(None, description="e.g. Male: half of each side from either class of that attribute")
    threshold: float = Field(0.5, description="class boundary of the balance attribute")
    resolution: float = Field(0.01, ge=0.0, description="rank scores rounded to this step, ties by sample id: a "
                              "saturated classifier's last digits (0.99998 vs 0.99991) follow other attributes, not "
                              "this one; 0: exact")
    contact_sheet_size: int = Field(10, ge=0, description="samples shown per side in "
                                    "<run_dir>/contact_sheets/<attribute>.png")
    confound_threshold: float = Field(0.5, gt=0, description="warn (contact sheets, report) when another attribute "
                                      "differs between an attribute's top and bottom samples by more than this many "
                                      "standard deviations")


class PCAConfig(Section):
    """hspace pca: per-step PCA of h -> <run_dir>/directions/pca.safetensors"""

    n_components: int = Field(10, ge=1, description="K (the paper: 25)")
    method: Literal["auto", "exact", "randomized", "onepass"] = Field(
        "auto", description="auto: exact up to exact_max_samples samples, else randomized; exact: Gram matrix "
        "(holds the data); randomized: streaming passes, accuracy set by tol; onepass: a quick look, no guarantee")
    exact_max_samples: int = Field(2048, ge=0, description="auto takes exact up to this many samples (exact holds "
                                   "h: N x T x D values in the stored dtype, shared by the ranks step by step)")
    power_iterations: int = Field(40, ge=0, description="randomized: the most power iterations (passes over the "
                                  "data <= this + 2); not converged by then: the stage fails, writing nothing")
    tol: float = Field(1e-2, gt=0, description="randomized: target for the estimated largest principal angle "
                       "(rad) of the top-K subspace at every step")
    oversample: Optional[int] = Field(None, ge=0, description="randomized / onepass: extra components kept "
                                      "(randomized: >= 1); null: = n_components")
    joint: bool = Field(False, description="one PCA over the whole flattened trajectory instead of one per step")
    batch_size: int = Field(256, ge=1)
    dtype: Literal["float64", "float32"] = Field("float64", description="accumulation precision (float32: faster, "
                                                 "rounding far below the truncation error; docs/benchmarks.md)")
    align: Literal["chain", "reference"] = Field("chain", description="signs aligned to the neighbouring step "
                                                 "(chain) or to step 0 (reference)")
    seed: int = Field(0, description="of the norm-matched random directions (Fig. 6 baseline)")
    scales: List[float] = Field([-4.0, -2.0, 0.0, 2.0, 4.0], description="suggested edit scales, in standard deviations")

    @model_validator(mode="after")
    def _randomized_oversamples(self):
        if self.method == "randomized" and self.oversample == 0:
            raise _cross("pca.oversample", self.oversample, "at least 1 with pca.method=randomized (its accuracy "
                         "estimate needs the (K+1)-th Ritz value)", "pca.method")
        return self


class JacobianConfig(Section):
    """hspace jacobian: image-specific directions (Alg. 1) -> directions/jacobian.safetensors"""

    sample_ids: List[NonNegInt] = Field([0, 1], min_length=1, description="samples (= seeds) to analyse")
    k: int = Field(6, ge=1, description="directions per step")
    steps: Optional[List[NonNegInt]] = Field(None, min_length=1, description="step indices (each < T); null: every step")
    method: Literal["auto", "subspace", "sequential", "deflation"] = Field(
        "auto", description="auto (block Krylov, fastest) | subspace (Alg. 1) | sequential (Alg. 2) | deflation")
    block: Optional[int] = Field(None, ge=1, description="mini-batch size b of Alg. 2, <= k (selects it when method "
                                 "is auto)")
    tol: float = Field(1e-3, gt=0, description="relative stopping tolerance")
    max_iter: int = Field(300, ge=1)
    unconverged: Literal["fallback", "error"] = Field(
        "fallback", description="a method that max_iter stops short of tol: fallback (the default method continues "
        "from its vectors; fails if that stops short too) | error (fails at once); nothing unconverged is written")
    tau: Optional[int] = Field(None, ge=0, description='apply the directions found at this step at every step ("global '
                               'at index"); null: the middle step, T // 2')
    mask: Optional[str] = Field(None, description="rect:y0:y1:x0:x1 (fractions) or a PNG mask: directions that move "
                                "only that region")
    seed: int = Field(0, description="of the random start")
    scales: List[float] = Field([-600.0, -300.0, 0.0, 300.0, 600.0], description="the toy's singular values are ~0.1: "
                                "large scales (reference demo: 50-100)")

    @model_validator(mode="after")
    def _block_within_k(self):
        if self.block is not None and self.block > self.k:
            raise _cross("jacobian.block", self.block, f"at most jacobian.k={self.k}", "jacobian.k")
        return self


class RealImagesConfig(Section):
    """optional: direction between two folders of real images (DDIM inversion)"""

    positive_dir: Optional[str] = None
    negative_dir: Optional[str] = None
    paired: bool = Field(False, description="pair files by name")
    name: str = "real"
    fixed_point_iterations: int = Field(1, ge=0, description="extra U-Net passes per DDIM-inversion step "
                                        "(0: plain inversion; docs/benchmarks.md has the gain)")

    @model_validator(mode="after")
    def _both_or_neither(self):
        if bool(self.positive_dir) != bool(self.negative_dir):
            given, other = ("positive_dir", "negative_dir") if self.positive_dir else ("negative_dir", "positive_dir")
            raise _cross(f"supervised.real.{given}", getattr(self, given), f"given together with supervised.real.{other}",
                         f"supervised.real.{other}")
        return self


class SupervisedConfig(Section):
    """hspace supervised: eq. 10 -> <run_dir>/directions/supervised.safetensors"""

    attributes: List[str] = Field([], description="empty: every attribute in selection.parquet")
    method: Literal["mean_difference", "logistic"] = Field("mean_difference", description="mean_difference | logistic "
                                                           "(normal of a logistic regression)")
    convergence_ns: List[Annotated[int, Field(ge=1)]] = Field(
        [1, 2, 5, 10, 20, 50], description="n per side for the convergence curve (h vs x_T space)")
    convergence_draws: int = Field(10, ge=1)
    seed: int = 0
    scales: List[float] = Field([-3.0, -1.5, 0.0, 1.5, 3.0], description="suggested edit scales (the strips; eq. 10 "
                                "directions are unnormalised)")
    restrict_steps: bool = Field(False, description="zero each direction at the steps where the probe stage finds its "
                                 "attribute not encoded (probe.encoded_fraction; the full trajectory is kept in the "
                                 "file as unrestricted_directions); false: every step, as in the paper")
    real: RealImagesConfig = RealImagesConfig()


class ProbeConfig(Section):
    """hspace probe: per-step linear probes of each attribute from h_t and x_t -> <run_dir>/probes/"""

    attributes: List[str] = Field([], description="empty: select.attributes, else every annotation column")
    spaces: List[Literal["h", "x_t"]] = Field(["h", "x_t"], min_length=1, description="h: the stored h_t; x_t: the "
                                              "latent entering each step (recomputed by sampling the seeds again)")
    num_samples: Optional[int] = Field(None, ge=8, description="probe the first n samples by id; null: all")
    test_fraction: float = Field(0.25, gt=0, lt=1, description="held-out share of the samples (fixed split by "
                                 "sample id)")
    seed: int = Field(0, description="of the split")
    pca_components: int = Field(64, ge=0, description="features reduced by PCA fitted on the training samples "
                                "(0: none); then logistic regression (binary) or ridge (continuous), penalty by CV")
    binary: Union[Literal["auto"], List[str]] = Field("auto", description="attributes probed as binary (accuracy of "
                                                      "score > threshold); auto: those whose scores are probabilities "
                                                      "near 0 or 1; the rest: R^2")
    threshold: float = Field(0.5, description="class boundary of binary attributes")
    encoded_fraction: float = Field(0.9, gt=0, le=1, description="a step encodes an attribute when its h probe's "
                                    "score above chance is at least this share of the best step's")
    batch_size: int = Field(64, ge=1, description="samples per U-Net call when recomputing x_t")


class DisentangleConfig(Section):
    """hspace disentangle: eq. 11 -> <run_dir>/directions/disentangled.safetensors"""

    source: Optional[str] = Field(None, description="default <run_dir>/directions/supervised.safetensors")
    pairs: Union[Literal["auto"], Dict[str, Union[Literal["others", "auto"], List[str]]]] = Field(
        {a: "others" for a in ("smile", "eye_open", "glasses", "hat", "yaw", "hair")},
        description="primary -> directions to remove: a list (e.g. {glasses: [hair]}), `others` (every other "
        "direction in the file, as in the paper's Table 1) or `auto` (the directions whose attributes it measurably "
        "moves on the calibration seeds; none: left as it is); `auto` alone: every direction of the file so",
        **_accepts("auto, or a non-empty mapping primary -> a list of other directions, others or auto"))
    threshold: float = Field(0.25, gt=0, description="auto: a side effect counts as entanglement when the mean change "
                             "of the other attribute at the calibrated strength is at least this many standard "
                             "deviations of its unedited scores and at least 2 standard errors from 0")

    @field_validator("pairs")
    @classmethod
    def _pairs(cls, pairs):
        if pairs == "auto":
            return pairs
        if not pairs:
            raise PydanticCustomError("pairs", "empty pairs")
        for primary, conditions in pairs.items():
            if conditions not in ("others", "auto") and (not conditions or primary in conditions):
                raise PydanticCustomError("pairs", "bad pair")
        return pairs

    @property
    def uses_auto(self) -> bool:
        return self.pairs == "auto" or "auto" in self.pairs.values()


class CalibrateConfig(Section):
    """calibrated strengths, measured by hspace disentangle for the supervised and disentangled directions and
    stored in their files: used by edit, explore and Table 1"""

    enabled: bool = Field(True, description="false: no calibration (edit and explore use the files' suggested "
                          "scales; Table 1 at the fixed scale only)")
    target: float = Field(1.0, gt=0, description="own-attribute change to reach, in standard deviations of the "
                          "unedited scores (scored by evaluate.scorer)")
    first_seed: int = Field(4_000_000, ge=0, description="calibration seeds: never used to find the directions nor "
                            "to evaluate them")
    num_samples: int = Field(8, ge=2, description="seeds each direction is applied to while searching its scale")
    std_samples: int = Field(64, ge=2, description="unedited seeds whose scores give the standard deviations (the "
                             "first num_samples of them are the edited ones)")
    rtol: float = Field(0.05, gt=0, description="stop when the own change is within this fraction of the target")
    max_iter: int = Field(6, ge=1, description="rounds of the search (each applies every unfinished direction once): "
                          "secant steps until a point below and one above the target bracket it, then regula falsi "
                          "(Illinois) inside the bracket")
    batch_size: int = Field(64, ge=1, description="images per U-Net call")

    @model_validator(mode="after")
    def _std_covers_edited(self):
        if self.std_samples < self.num_samples:
            raise _cross("calibrate.std_samples", self.std_samples, f"at least calibrate.num_samples={self.num_samples}",
                         "calibrate.num_samples")
        return self


class FewshotConfig(Section):
    """hspace fewshot: Fig. 8 as numbers (own attribute change against n per side, h and x_T space) and the
    probe-step restriction, on held-out seeds -> <run_dir>/fewshot/"""

    attributes: List[str] = Field([], description="empty: supervised.attributes, else every selected attribute")
    ns: List[Annotated[int, Field(ge=1)]] = Field([1, 2, 5, 10, 20, 50, 100, 200, 500], min_length=1,
                                                  description="n per side; those above the selection's size are left out")
    draws: int = Field(3, ge=1, description="random draws of the n samples per n (one where n is the whole selection)")
    seed: int = Field(0, description="of the draws")
    first_seed: int = Field(2_000_000, ge=0, description="held-out seeds, disjoint from the selected samples and from "
                            "evaluate's")
    num_samples: int = Field(8, ge=2, description="held-out seeds every edit is applied to")
    h_scale: float = Field(3.0, description="edit strength in h-space, in multiples of the whole selection's eq. 10 "
                           "direction (every n rescaled to its norm)")
    x_T_scale: float = Field(1.0, description="the same in x_T space")
    restriction: bool = Field(True, description="also the whole-selection h direction restricted to the probe's "
                              "encoded steps against all steps, at h_scale (needs the probes)")
    restriction_samples: int = Field(32, ge=2, description="held-out seeds of the restriction check (from "
                                     "first_seed)")
    batch_size: int = Field(64, ge=1, description="images per U-Net call")


class EditConfig(Section):
    """hspace edit: seeds x scales grids -> <run_dir>/edits/<file>/"""

    directions: Optional[str] = Field(None, description="a file, or pca | jacobian | supervised | disentangled | real")
    names: List[str] = Field([], description="empty: every direction in the file")
    scales: List[float] = Field([], description="empty: -2, -1, 0, 1, 2 times each direction's calibrated strength "
                                "(calibrate), or the file's suggested scales where it has none")
    seeds: List[NonNegInt] = Field([1_000_000, 1_000_001, 1_000_002], min_length=1, description="held-out seeds; "
                                   "the first evaluation seeds, so that the main job's strips of the directions it "
                                   "evaluates are images of evaluate's dose-response sweep")
    sequential: bool = Field(False, description="apply names one after another at their scales (Fig. 11)")
    asyrp: bool = False
    x_T_space: bool = Field(False, description="use the supervised directions' x_T-space version (Fig. 8 baseline)")
    out_dir: Optional[str] = Field(None, description="default <run_dir>/edits/<file>")
    batch_size: int = Field(64, ge=1, description="images per U-Net call (directions x scales x seeds); also the main "
                            "job's edit strips")


class EvaluateConfig(Section):
    """hspace evaluate: Table 1 on held-out seeds -> <run_dir>/evaluation/"""

    first_seed: int = Field(1_000_000, ge=0, description="seeds never used to find the directions")
    num_samples: int = Field(16, ge=2, description="per seed set")
    repeats: int = Field(3, ge=1, description="disjoint seed sets: mean +- std across them")
    batch_size: int = Field(64, ge=1, description="images per U-Net call (edits x seeds), and the most seeds in one "
                            "Parquet part")
    scale: float = Field(3.0, description="edit strength of supervised / disentangled directions")
    match_norm: bool = Field(True, description="disentangled directions rescaled to their original's norm")
    scorer: str = Field("toy", description="the annotator that measures the attributes: clip (with options "
                        "{prompts: paper}) for real faces")
    scorer_options: Dict[str, Any] = Field({}, description="the scorer's options, as in annotate.options")
    attributes: List[str] = Field([], description="measured scorer columns; empty: the directions' own attributes")
    own_attribute: Dict[str, str] = Field({}, description="direction -> scorer column when named apart, e.g. "
                                          "{Eyeglasses: glasses}")
    normalize: bool = Field(True, description="effects in standard deviations of the unedited scores")
    quality: Optional[str] = Field("toy_consistency", description="image-quality annotator: face_pose for real faces; "
                                   "null: none")
    quality_score: str = Field("render_error", description="its score to report: face_prob for face_pose")
    pca_components: int = Field(3, ge=0, description="top PCA directions vs as many norm-matched random ones")
    pca_scale: float = Field(2.0, description="in standard deviations along the component")
    pixel_matched_random: bool = Field(True, description="also the random directions rescaled to change the images "
                                       "as much as their component")
    bootstrap: int = Field(1000, ge=0, description="paired bootstrap resamples of the seeds: 95% intervals of the "
                           "disentanglement checks (0: none)")
    calibrated: bool = Field(True, description="Table 1 also at each direction's calibrated strength (matched own "
                             "effect; needs calibrate.enabled)")
    sweep_samples: int = Field(8, ge=0, description="dose-response: the first seeds of the first seed set (at most "
                               "num_samples), where each direction is also applied at the sweep scales; 0: no sweep")
    sweep_multiples: List[float] = Field([-2.0, -1.0, 1.0, 2.0], description="sweep scales of a calibrated direction, "
                                         "in multiples of its calibrated strength (other directions: their file's "
                                         "suggested scales)")
    identity_weights: Optional[str] = Field(None, description="face-embedding weights (a facenet-pytorch "
                                            "InceptionResnetV1 state dict) for an identity column: cosine of the "
                                            "embeddings before and after each edit; null: none")


class ReportConfig(Section):
    """hspace report -> <run_dir>/report/index.html (edit strips use edit.seeds)"""

    pca_components: int = Field(4, ge=0, description="leading PCA directions shown (and as many random ones)")
    jacobian_directions: int = Field(6, ge=0, description="Jacobian directions shown")


class ToyTrainConfig(Section):
    """hspace train-toy: the embedded default DDPM (resumable)"""

    out_dir: str = "runs/train-toy"
    steps: int = Field(5000, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(6e-4, gt=0)
    warmup_steps: int = Field(300, ge=0)
    ema_decay: float = Field(0.999, ge=0, le=1)
    min_snr_gamma: float = 5.0
    seed: int = 0
    block_out_channels: List[Annotated[int, Field(ge=1)]] = Field([32, 64, 128], min_length=1)
    layers_per_block: int = Field(2, ge=1)
    correlations: Dict[str, float] = Field({"glasses~hair": 0.4}, description="entanglements for the "
                                           "disentanglement experiment")
    prediction_type: Literal["v_prediction", "epsilon"] = Field("v_prediction", description="the engine converts "
                                                                "either to eps")
    beta_schedule: Literal["squaredcos_cap_v2", "linear"] = Field("squaredcos_cap_v2", description="cosine; linear "
                                                                  "is the hub DDPMs' schedule")
    timestep_spacing: Literal["trailing", "leading", "linspace"] = Field(
        "trailing", description="trailing: sampling starts at t=999 (no signal leak at the first step)")
    checkpoint_every: int = Field(250, ge=1)
    sample_every: int = Field(1000, ge=1)
    skip_dropout: float = Field(0.0, ge=0, le=1, description="probability of zeroing a sample's down-block skips, so "
                                "that the decoder must draw from h alone (phase 2 uses it)")
    init_from: Optional[str] = Field(None, description="an exported model to start from; null: random weights from "
                                     "the seed")


#: what phase 2 must share with phase 1 (the model and the data): interpolated from train_toy in the
#: defaults, so that one override of train_toy reaches both phases
PHASE_1_KEYS = ("batch_size", "min_snr_gamma", "block_out_channels", "layers_per_block", "correlations",
                "prediction_type", "beta_schedule", "timestep_spacing")


class FinetuneToyConfig(ToyTrainConfig):
    """hspace finetune-toy: phase 2, the embedded default itself (resumable); its model and data keys
    (batch_size, min_snr_gamma, block_out_channels, ..., timestep_spacing) follow train_toy"""

    out_dir: str = "runs/finetune-toy"
    init_from: Optional[str] = Field("runs/train-toy/model", description="phase 1's EMA weights (float32)")
    steps: int = Field(1000, ge=1)
    lr: float = Field(3e-4, gt=0, description="cosine decay to 5%, no warm-up")
    warmup_steps: int = Field(0, ge=0)
    ema_decay: float = Field(0.995, ge=0, le=1)
    seed: int = Field(1, description="other batches than phase 1's")
    checkpoint_every: int = Field(100, ge=1)
    sample_every: int = Field(400, ge=1)
    skip_dropout: float = Field(0.75, ge=0, le=1, description="the decoder must draw 3 faces in 4 from h alone: the "
                                "eyes become editable")


class ToyAnnotatorTrainConfig(Section):
    """hspace train-toy-annotator: the toy-face factor reader"""

    out_dir: str = "runs/train-toy-annotator"
    steps: int = Field(3000, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(2e-3, gt=0)
    width: int = Field(32, ge=1)
    seed: int = 0


def _cross(key: str, value, must: str, *others: str) -> PydanticCustomError:
    """A cross-field error about ``key`` (the others are the keys it was checked against)."""
    return PydanticCustomError("cross_field", "{key}: must be {must}",
                               {"key": key, "value": value, "must": must, "others": list(others)})


class RunConfig(Section):
    """hspace run: the main job, every stage in order"""

    skip: List[str] = Field([], description="stages of the main job not to run, e.g. [probe, fewshot] (the paper's "
                            "pipeline without the probes and Fig. 8 as numbers); a stage that reads a skipped one's "
                            "outputs uses those of an earlier run, or does without them where it can")


class HSpaceConfig(Section):
    """the whole configuration"""

    run_dir: str = Field("runs/demo", description="every stage reads and writes here")
    model: ModelConfig = ModelConfig()
    trainer: TrainerConfig = TrainerConfig()
    run: RunConfig = RunConfig()
    sample: SampleConfig = SampleConfig()
    generate: GenerateConfig = GenerateConfig()
    annotate: AnnotateConfig = AnnotateConfig()
    select: SelectConfig = SelectConfig()
    pca: PCAConfig = PCAConfig()
    jacobian: JacobianConfig = JacobianConfig()
    probe: ProbeConfig = ProbeConfig()
    supervised: SupervisedConfig = SupervisedConfig()
    disentangle: DisentangleConfig = DisentangleConfig()
    calibrate: CalibrateConfig = CalibrateConfig()
    fewshot: FewshotConfig = FewshotConfig()
    edit: EditConfig = EditConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    report: ReportConfig = ReportConfig()
    train_toy: ToyTrainConfig = ToyTrainConfig()
    finetune_toy: FinetuneToyConfig = FinetuneToyConfig()
    train_toy_annotator: ToyAnnotatorTrainConfig = ToyAnnotatorTrainConfig()

    _sources: dict = PrivateAttr(default_factory=dict)  # dotted key -> where it was set (see source_of)
    _raw: dict = PrivateAttr(default_factory=dict)  # the unvalidated tree it came from (see with_overrides)

    @model_validator(mode="before")
    @classmethod
    def _middle_step(cls, data):
        """jacobian.tau: null -> the middle of jacobian.steps, or T // 2 (needs T, so it is filled here)."""
        jac = data.get("jacobian") if isinstance(data, dict) else None
        if isinstance(jac, dict) and jac.get("tau") is None:
            model, steps = data.get("model"), jac.get("steps")
            T = model.get("num_inference_steps", 20) if isinstance(model, dict) else None
            if isinstance(steps, list) and steps and all(isinstance(s, int) for s in steps):
                data = {**data, "jacobian": {**jac, "tau": sorted(steps)[len(steps) // 2]}}
            elif isinstance(T, int) and not isinstance(T, bool) and T >= 1:
                data = {**data, "jacobian": {**jac, "tau": T // 2}}
        return data

    @model_validator(mode="after")
    def _against_T(self):
        """Keys that must agree with the number of sampling steps T."""
        T = self.model.num_inference_steps
        eta = self.model.eta
        if isinstance(eta, list) and len(eta) != T:
            raise _cross("model.eta", eta, f"a number or a list of T={T} numbers (model.num_inference_steps), "
                         f"got {len(eta)}", "model.num_inference_steps")
        j = self.jacobian
        if j.steps is not None and (max(j.steps) >= T or len(set(j.steps)) != len(j.steps)):
            raise _cross("jacobian.steps", j.steps, f"distinct step indices in 0..{T - 1} (T = model.num_inference_steps)",
                         "model.num_inference_steps")
        if j.tau is not None and j.tau >= T:
            raise _cross("jacobian.tau", j.tau, f"a step index in 0..{T - 1} (T = model.num_inference_steps)",
                         "model.num_inference_steps")
        if j.steps is not None and j.tau not in j.steps:
            raise _cross("jacobian.tau", j.tau, f"one of jacobian.steps {j.steps}", "jacobian.steps")
        c, ev, gen = self.calibrate, self.evaluate, self.generate
        calibration = (c.first_seed, c.first_seed + c.std_samples)
        for key, (lo, hi) in (("evaluate.first_seed", (ev.first_seed, ev.first_seed + ev.repeats * ev.num_samples)),
                              ("generate.first_seed", (gen.first_seed, gen.first_seed + gen.num_samples))):
            if c.enabled and lo < calibration[1] and calibration[0] < hi:
                raise _cross("calibrate.first_seed", c.first_seed, f"seeds disjoint from those of {key} ({lo}..{hi - 1}); "
                             f"calibration seeds run {calibration[0]}..{calibration[1] - 1}", key)
        if self.disentangle.uses_auto and not c.enabled:
            raise _cross("disentangle.pairs", self.disentangle.pairs, "without auto when calibrate.enabled is false "
                         "(auto reads the entanglement measured while calibrating)", "calibrate.enabled")
        sup, sel = self.supervised.attributes, self.select.attributes
        if sup and sel and not set(sup) <= set(sel):
            raise _cross("supervised.attributes", sup, f"among select.attributes {sel}", "select.attributes")
        return self

    def source_of(self, *keys: str) -> str:
        """Where the dotted ``keys`` (or keys inside them) were set: a file, the command line, both,
        or the defaults."""
        return _where(self._sources, *keys)


# ------------------------------------------------------------------------------------------ loading
def defaults() -> dict:
    """The default configuration tree, with finetune_toy's phase-1 keys as ``${train_toy.<key>}``."""
    tree = HSpaceConfig().model_dump()
    tree["finetune_toy"].update({k: "${train_toy.%s}" % k for k in PHASE_1_KEYS})
    return tree


def _is_section(schema, key) -> type[BaseModel] | None:
    field = schema.model_fields.get(key) if schema is not None else None
    ann = field.annotation if field is not None else None
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def _merge_file(tree: dict, data: dict, schema, source: str, sources: dict, prefix: str = "") -> None:
    """Merge a file's mapping into ``tree``: sections key by key, every other value replaced whole."""
    for key, value in data.items():
        key = str(key)
        sub = _is_section(schema, key)
        if sub is not None and isinstance(value, dict) and isinstance(tree.get(key), dict):
            _merge_file(tree[key], value, sub, source, sources, f"{prefix}{key}.")
        else:
            tree[key] = value
            sources[prefix + key] = source


def parse_overrides(overrides: List[str]) -> list[tuple[str, Any]]:
    """['a.b=1', 'c=[1,2]'] -> [('a.b', 1), ('c', [1, 2])]; values parsed as YAML by OmegaConf."""
    out = []
    for item in overrides:
        key = item.split("=", 1)[0]
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. generate.num_samples=1000)")
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            parsed = OmegaConf.to_container(OmegaConf.from_dotlist([item]))
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({_yaml_problem(e)})") from None
        except OmegaConfBaseException as e:
            raise ConfigError(f"override {item!r}: {_one_line(e)}") from None
        for part in key.split("."):
            parsed = parsed[part]
        out.append((key, parsed))
    return out


def _override(tree: dict, sources: dict, overrides: List[str]) -> None:
    """Apply ``key=value`` overrides: each sets ONE dotted key; the mappings on the way keep their
    other keys (a mapping as the value replaces the mapping at that key)."""
    for key, value in parse_overrides(overrides):
        *parents, last = key.split(".")
        node = tree
        for i, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}=...: {'.'.join(parents[:i + 1])} is not a mapping")
        node[last] = value
        for path in [p for p in sources if p == key or p.startswith(key + ".")]:
            del sources[path]
        sources[key] = "the command line"


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _yaml_problem(e: yaml.YAMLError) -> str:
    return ": ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x) or _one_line(e)


def _yaml_error(path: Path, e: yaml.YAMLError) -> ConfigError:
    """One line: file:line:column: the problem."""
    mark = getattr(e, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    return ConfigError(f"{where}: invalid YAML: {_yaml_problem(e)}")


def _read_yaml(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise _yaml_error(p, e) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p} must hold a mapping of sections, got {type(data).__name__}")
    return data


def _validate(tree: dict, sources: dict) -> HSpaceConfig:
    try:
        resolved = OmegaConf.to_container(OmegaConf.create(tree), resolve=True)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raise ConfigError(f"{key} in {_where(sources, key)}: {_one_line(e).split(' full_key:')[0]}") from None
    try:
        cfg = HSpaceConfig.model_validate(resolved)
    except ValidationError as e:
        raise _message(e.errors()[0], resolved, sources) from None
    cfg._sources, cfg._raw = sources, tree
    return cfg


def load_config(path: str | os.PathLike | None = None, overrides: List[str] | None = None) -> HSpaceConfig:
    """Defaults, then the YAML file (if any), then ``key=value`` overrides; validated."""
    tree, sources = defaults(), {}
    if path is not None:
        _merge_file(tree, _read_yaml(path), HSpaceConfig, str(path), sources)
    _override(tree, sources, list(overrides or []))
    return _validate(tree, sources)


def with_overrides(cfg: HSpaceConfig, overrides: List[str]) -> HSpaceConfig:
    """``cfg`` with more ``key=value`` overrides, validated again (a tool for tests and scripts)."""
    tree, sources = copy.deepcopy(cfg._raw or defaults()), dict(cfg._sources)
    _override(tree, sources, overrides)
    return _validate(tree, sources)


# ------------------------------------------------------------------------------------------ messages
def _where(sources: dict, *keys: str) -> str:
    found = [src for key in keys for path, src in sources.items()
             if path == key or path.startswith(key + ".") or key.startswith(path + ".")]
    return " and ".join(dict.fromkeys(found)) or "the defaults"


def _field_path(loc: tuple) -> tuple[list[str], Any]:
    """(the dotted path of schema fields in ``loc``, the innermost field's FieldInfo or section class)."""
    schema, path, info = HSpaceConfig, [], HSpaceConfig
    for part in loc:
        if schema is None or not isinstance(part, str) or part not in schema.model_fields:
            break
        path.append(part)
        info = schema.model_fields[part]
        schema = _is_section(schema, part)
        if schema is not None:
            info = schema
    return path, info


def _bounds(info) -> tuple[dict, int | None]:
    bounds, min_len = {}, None
    for m in info.metadata:
        for op in ("ge", "gt", "le", "lt"):
            if getattr(m, op, None) is not None:
                bounds[op] = getattr(m, op)
        if isinstance(m, annotated_types.MinLen):
            min_len = m.min_length
    return bounds, min_len


_NOUNS = {int: "integer", float: "number", str: "string", bool: "boolean"}


def _describe(ann) -> str:
    """'an integer', 'a list of numbers >= 0', 'one of a, b', ... for a type annotation."""
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is Annotated:
        inner = _describe(args[0])
        bounds = {op: getattr(m, op) for f in args[1:] for m in getattr(f, "metadata", [f])
                  for op in ("ge", "gt") if getattr(m, op, None) is not None}
        return inner + "".join(f" {'>=' if op == 'ge' else '>'} {v}" for op, v in bounds.items())
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin in (list, List):
        return "a list of " + _describe(args[0]).replace("an integer", "integers").replace("a number", "numbers") \
            .replace("a string", "strings")
    if origin in (dict, Dict):
        return "a mapping"
    if origin is Union:
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return "a mapping with keys " + ", ".join(ann.model_fields)
    noun = _NOUNS.get(ann, getattr(ann, "__name__", str(ann)))
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def accepts(info) -> str:
    """What a field (FieldInfo) or a section (model class) accepts, as a phrase after 'must be'."""
    if isinstance(info, type):
        return _describe(info)
    extra = info.json_schema_extra or {}
    if "accepts" in extra:
        return extra["accepts"]
    ann, optional = info.annotation, False
    if typing.get_origin(ann) is Union and type(None) in typing.get_args(ann):
        rest = [a for a in typing.get_args(ann) if a is not type(None)]
        ann, optional = (rest[0] if len(rest) == 1 else Union[tuple(rest)]), True
    bounds, min_len = _bounds(info)
    if ann in (int, float) and bounds:
        if set(bounds) == {"ge", "le"}:
            text = f"in [{bounds['ge']}, {bounds['le']}]"
        else:
            text = " and ".join(f"{'>=' if op == 'ge' else '>' if op == 'gt' else '<=' if op == 'le' else '<'} {v}"
                                for op, v in bounds.items())
        text = f"an integer {text}" if ann is int else text
    else:
        text = _describe(ann)
        if min_len:
            text = text.replace("a list", "a non-empty list").replace("a mapping", "a non-empty mapping")
    return text + (" or null" if optional else "")


def _lookup(tree, path: list[str]):
    for part in path:
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def _message(err: dict, data: dict, sources: dict) -> ConfigError:
    """One line from pydantic's first error: key=value in <where>: must be <what it accepts>."""
    ctx = err.get("ctx") or {}
    if err["type"] == "cross_field":
        key, value = ctx["key"], ctx["value"]
        return ConfigError(f"{key}={value!r} in {_where(sources, key, *ctx['others'])}: must be {ctx['must']}")
    path, info = _field_path(err["loc"])
    if err["type"] == "extra_forbidden":
        key = ".".join([*path, str(err["loc"][len(path)])])
        section = _field_path(tuple(path))[1] if path else HSpaceConfig
        where = f"under '{'.'.join(path)}'" if path else "at the top level"
        valid = ", ".join(sorted(section.model_fields)) if isinstance(section, type) else ""
        return ConfigError(f"unknown config key '{key}' in {_where(sources, key)}; valid keys {where}: {valid}")
    key = ".".join(path) or "the configuration"
    value = _lookup(data, path)
    ann = getattr(info, "annotation", None)
    if ann is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)  # shown as the number it is read as
    return ConfigError(f"{key}={value!r} in {_where(sources, key)}: must be {accepts(info)}")


# ------------------------------------------------------------------------------------------ output
def to_dict(cfg) -> dict:
    """A plain dict from a config model, a dataclass or a mapping."""
    if isinstance(cfg, BaseModel):
        return cfg.model_dump()
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    return dict(cfg)


def select(cfg, dotted: str):
    """The plain value at a dotted key ('trainer.precision', 'model')."""
    node = to_dict(cfg)
    for part in dotted.split("."):
        node = node[part]
    return node


def to_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


def config_hash(*parts) -> str:
    """A short stable hash of JSON-able config parts (what determines a stage's output)."""
    from pipeline.io import hash_json

    return hash_json(*[to_dict(p) if isinstance(p, BaseModel) else p for p in parts])


# ------------------------------------------------------------------------------------------ conf.yaml
HEADER = """\
# hspace configuration: the defaults. Generated from the schema in pipeline/config.py by
#   hspace config --defaults > conf.yaml
# (edit the schema, not this file; a test keeps the two equal). `hspace config` prints the resolved configuration.
#
# Every key can be overridden on the command line as a dotted path:
#   hspace generate run_dir=runs/big generate.num_samples=10000 trainer.devices=8
# A dotted override sets ONE key: evaluate.scorer_options.pretrained=/path/clip.pt changes `pretrained` and
# keeps the mapping's other keys. To replace a whole mapping give a YAML flow mapping as the value:
#   disentangle.pairs='{glasses: [hair]}'
# In a --config file, a section merges into these defaults key by key; a mapping-valued option
# (annotate.options, evaluate.scorer_options, disentangle.pairs, own_attribute, correlations) is replaced whole.
# Unknown keys, wrong types and values out of range are errors, reported before any work.

"""
_COMMENT_AT = 32


def _flow(value) -> str:
    return yaml.safe_dump([value], default_flow_style=True, width=10**9, sort_keys=False).strip()[1:-1]


def _wrap(text: str, width: int) -> list[str]:
    out, cur = [], ""
    for w in text.split():
        if cur and len(cur) + 1 + len(w) > width:
            out.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}".strip()
    return out + [cur]


def _comment(line: str, text: str | None, indent: str) -> list[str]:
    """``line`` with ``text`` as a comment at column 32, or above it when the line is too long."""
    if not text:
        return [line]
    if len(line) >= _COMMENT_AT - 1:
        return [f"{indent}# {t}" for t in _wrap(text, 116 - len(indent))] + [line]
    first, *rest = _wrap(text, 116 - _COMMENT_AT)
    return [line.ljust(_COMMENT_AT - 1) + " # " + first] + [" " * _COMMENT_AT + "# " + r for r in rest]


def _render(schema: type[BaseModel], values: dict, indent: str = "") -> list[str]:
    lines = []
    for key, field in schema.model_fields.items():
        sub = _is_section(schema, key)
        if sub is not None:
            if not indent:
                lines.append("")
            lines += _comment(f"{indent}{key}:", (sub.__doc__ or "").strip().replace("\n", " "), indent)
            lines += _render(sub, values[key], indent + "  ")
        else:
            interpolated = isinstance(values[key], str) and values[key].startswith("${")
            lines += _comment(f"{indent}{key}: {_flow(values[key])}", None if interpolated else field.description, indent)
    return lines


def defaults_yaml() -> str:
    """conf.yaml: the defaults with each field's description as its comment."""
    tree = defaults()
    return HEADER + "\n".join(_render(HSpaceConfig, tree)) + "\n"
