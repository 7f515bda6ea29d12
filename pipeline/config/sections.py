"""The sections of the configuration schema: one pydantic model per section of conf.yaml.

Each field's type, choices (``Literal``), range (``Field(ge=...)``), default and description sit
together; conf.yaml is generated from them (:mod:`pipeline.config.conf_yaml`). Rules between the
fields of one section are its validators; rules across sections are :class:`HSpaceConfig`'s
(:mod:`pipeline.config.schema`).
"""
from __future__ import annotations

from typing import Annotated, Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

NonNegInt = Annotated[int, Field(ge=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
#: the largest seed: sample ids (= seeds) are stored as 64-bit integers (shards, annotation and evaluation tables)
SEED_MAX = 2**63 - 1
Seed = Annotated[int, Field(ge=0, le=SEED_MAX)]


class Section(BaseModel):
    """A configuration section: unknown keys are errors, values are read-only, numbers are finite."""

    model_config = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True, allow_inf_nan=False)


def _accepts(text: str) -> dict:
    """Field(**_accepts("...")): what the key accepts, in error messages, where pydantic's own words for a
    union type would be several."""
    return {"json_schema_extra": {"accepts": text}}


def _cross(key: str, value, must: str, *others: str) -> PydanticCustomError:
    """A cross-field error about ``key`` (the others are the keys it was checked against)."""
    return PydanticCustomError("cross_field", "{key}: must be {must}",
                               {"key": key, "value": value, "must": must, "others": list(others)})


def _seeds_fit(key: str, first: int, count: int, *counted_by: str) -> None:
    """The ``count`` seeds from ``first`` (``counted_by``: the keys that set ``count``) must stay <= SEED_MAX."""
    if first + count - 1 > SEED_MAX:
        raise _cross(key, first, f"at most {SEED_MAX - count + 1}: its {count} seeds ({' x '.join(counted_by)}) "
                     f"must stay below 2**63, seeds being stored as 64-bit integers", *counted_by)


# ------------------------------------------------------------------------------------------ sections
class ModelConfig(Section):
    """the diffusion model and its sampler"""

    name_or_path: str = Field("toyfaces", description="embedded default; or a local save_pretrained folder, or a hub "
                              "id such as google/ddpm-ema-celebahq-256 (HF cache + HF_HUB_OFFLINE=1 works)")
    num_inference_steps: int = Field(20, ge=1, description="T; step index 0 is the first (noisiest) sampling step")
    eta: Union[NonNegFloat, List[NonNegFloat]] = Field(
        0.0, description="0 = DDIM (the embedded default), 1 = DDPM-like (the paper), or a list of T values",
        **_accepts("a number >= 0 (0 DDIM, 1 DDPM-like) or a list of T such numbers"))
    hook: Optional[str] = Field(
        None, pattern=r"^[A-Za-z_]\w*(\.\w+)*$",
        description='h = mid-block output ("after"), its input ("before"), or the output of a module of the denoiser '
        'by dotted path (up_blocks.0, transformer_blocks.14); null: the family\'s default (after a U-Net\'s mid '
        'block, a transformer\'s middle block: docs/families.md); checked against the model',
        **_accepts("null, after, before or a dotted module path of the denoiser (up_blocks.0, transformer_blocks.14)"))
    prompt: str = Field("", description="text-to-image models: the prompt of every sample unless generate.prompts "
                        "says otherwise, and of edits and evaluation")
    negative_prompt: str = Field("", description="text-to-image models: the unconditional branch's prompt (FLUX has "
                                 "none)")
    guidance_scale: Optional[NonNegFloat] = Field(
        None, description="text-to-image and class-conditional models: classifier-free guidance (1: one conditional "
        "pass; h is the conditional branch's, edits go into both); null: the family's pipeline default (SD 7.5, SDXL "
        "5, PixArt 4.5, DiT 4, SD3 7, FLUX 3.5, FLUX's distilled guidance in one pass)",
        **_accepts("null or a number >= 0"))
    class_label: Union[NonNegInt, str, None] = Field(
        None, description="class-conditional models (DiT): the class of every sample, an index or a name of the "
        "model's id2label (golden retriever); null: the null class (unconditional samples)",
        **_accepts("null, a class index >= 0 or a class name of the model's id2label"))
    height: Optional[Annotated[int, Field(ge=1)]] = Field(
        None, description="SD3, FLUX: image height in pixels, fixed when the model is built; null: the pipeline's "
        "default (1024)", **_accepts("null or an integer >= 1"))
    width: Optional[Annotated[int, Field(ge=1)]] = Field(
        None, description="SD3, FLUX: image width in pixels; null: the pipeline's default (1024)",
        **_accepts("null or an integer >= 1"))
    max_sequence_length: Optional[Annotated[int, Field(ge=1)]] = Field(
        None, description="T5 models (PixArt, SD3, FLUX): text tokens per prompt; null: the pipeline's default "
        "(PixArt-alpha 120, Sigma 300, SD3 256, FLUX 512)", **_accepts("null or an integer >= 1"))
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

    seeds: List[Seed] = Field(list(range(8)), min_length=1)
    directions: Optional[str] = Field(None, description="a directions file (.safetensors); null: plain samples")
    direction: str = Field("0", description="name or index of a direction in that file")
    scales: List[float] = Field([0.0], min_length=1)
    out: Optional[str] = Field(None, description="default <run_dir>/sample.png")


class GenerateConfig(Section):
    """hspace generate: samples with their h trajectories -> <run_dir>/samples"""

    first_seed: Seed = Field(0, description="sample i has seed first_seed + i (sample_id = seed)")
    num_samples: int = Field(512, ge=1)
    batch_size: int = Field(64, ge=1, description="per process; one shard per batch")
    writer_queue: int = Field(0, ge=0, description="> 0: a writer thread encodes and writes the shards while the "
                              "U-Net makes the next batches, this many waiting (for GPUs); 0: each batch written before "
                              "the next (an interrupt then leaves exactly the shards written)")
    h_dtype: Literal["float16", "float32", "bfloat16"] = Field("float16", description="h as stored")
    h_steps: Optional[List[int]] = Field(None, description="null: record h at every step; a list of step indices "
                                         "(0 = the first, noisiest): record h there only (a FLUX block's h is about "
                                         "25 MB per step at 1024 px). Directions found from these samples are zero, "
                                         "so edit nothing, at the other steps; stages that need h there say so")
    record_x_t: bool = Field(True, description="also store x_t, the latent entering every step (float32), which "
                             "the probe stage reads instead of sampling the seeds again (the toy: 0.25 MB per "
                             "sample; a 256-px pixel model at T=50: 39 MB, so conf.paper.yaml turns it off)")
    prompts: List[str] = Field([], description="text-to-image models: [] = model.prompt for every sample, one prompt "
                               "for all, or one per sample")
    prompts_file: Optional[str] = Field(None, description="text-to-image models: a text file with one prompt per "
                                        "line, one line per sample (instead of prompts)")

    @model_validator(mode="after")
    def _prompts_per_sample(self):
        _seeds_fit("generate.first_seed", self.first_seed, self.num_samples, "generate.num_samples")
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
    seed: Seed = Field(0, description="of the norm-matched random directions (Fig. 6 baseline)")
    scales: List[float] = Field([-4.0, -2.0, 0.0, 2.0, 4.0], description="suggested edit scales, in standard deviations")

    @model_validator(mode="after")
    def _randomized_oversamples(self):
        if self.method == "randomized" and self.oversample == 0:
            raise _cross("pca.oversample", self.oversample, "at least 1 with pca.method=randomized (its accuracy "
                         "estimate needs the (K+1)-th Ritz value)", "pca.method")
        return self


class JacobianConfig(Section):
    """hspace jacobian: image-specific directions (Alg. 1) -> directions/jacobian.safetensors"""

    sample_ids: List[Seed] = Field([0, 1], min_length=1, description="samples (= seeds) to analyse")
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
    seed: Seed = Field(0, description="of the random start")
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
        [1, 2, 5, 10, 20, 50], min_length=1, description="n per side for the convergence curve (h vs x_T space)")
    convergence_draws: int = Field(10, ge=1)
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 0  # scikit-learn's random_state takes no more
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
    seed: Seed = Field(0, description="of the split")
    pca_components: int = Field(64, ge=0, description="features reduced by PCA fitted on the training samples "
                                "(0: none); then logistic regression (binary) or ridge (continuous), penalty by CV")
    binary: Union[Literal["auto"], List[str]] = Field("auto", description="attributes probed as binary (accuracy of "
                                                      "score > threshold); auto: those whose scores are probabilities "
                                                      "near 0 or 1; the rest: R^2",
                                                      **_accepts("auto or a list of attribute names"))
    threshold: float = Field(0.5, description="class boundary of binary attributes")
    encoded_fraction: float = Field(0.9, gt=0, le=1, description="a step encodes an attribute when its h probe's "
                                    "score above chance is at least this share of the best step's")
    batch_size: int = Field(64, ge=1, description="samples per U-Net call when recomputing x_t")
    n_jobs: int = Field(-1, ge=-1, description="worker processes the steps' fits are dealt to (-1: one per core; "
                        "1: none, in the command's own process); the table is the same for any number")

    @field_validator("n_jobs")
    @classmethod
    def _n_jobs(cls, n):
        if n == 0:
            raise ValueError("0 workers cannot fit anything: give -1 (one per core), 1 (none) or more")
        return n


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
    """calibrated strengths of the supervised and disentangled directions, measured by hspace calibrate (a
    further analysis) into <run_dir>/calibration: used by edit, explore and the calibrated Table 1"""

    enabled: bool = Field(True, description="false: no calibration (edit and explore use the files' suggested "
                          "scales; Table 1 at the fixed scale only)")
    target: float = Field(1.0, gt=0, description="own-attribute change to reach, in standard deviations of the "
                          "unedited scores (scored by evaluate.scorer)")
    first_seed: Seed = Field(4_000_000, description="calibration seeds: never used to find the directions nor "
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
        _seeds_fit("calibrate.first_seed", self.first_seed, self.std_samples, "calibrate.std_samples")
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
    seed: Seed = Field(0, description="of the draws")
    first_seed: Seed = Field(2_000_000, description="held-out seeds, disjoint from the selected samples and from "
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

    @model_validator(mode="after")
    def _seeds_below_max(self):
        counted_by = "fewshot.num_samples" if self.num_samples >= self.restriction_samples else "fewshot.restriction_samples"
        _seeds_fit("fewshot.first_seed", self.first_seed, max(self.num_samples, self.restriction_samples), counted_by)
        return self


class EditConfig(Section):
    """hspace edit: seeds x scales grids -> <run_dir>/grids/<file>/"""

    directions: Optional[str] = Field(None, description="a file, or pca | jacobian | supervised | disentangled | real")
    names: List[str] = Field([], description="empty: every direction in the file")
    scales: List[float] = Field([], description="empty: -2, -1, 0, 1, 2 times each direction's calibrated strength "
                                "(calibrate), or the file's suggested scales where it has none")
    seeds: List[Seed] = Field([1_000_000, 1_000_001, 1_000_002], min_length=1, description="held-out seeds; "
                                   "the first evaluation seeds, so that the main job's strips of the directions it "
                                   "evaluates are images of evaluate's dose-response sweep")
    sequential: bool = Field(False, description="apply names one after another at their scales (Fig. 11)")
    asyrp: bool = False
    x_T_space: bool = Field(False, description="use the supervised directions' x_T-space version (Fig. 8 baseline)")
    out_dir: Optional[str] = Field(None, description="default <run_dir>/grids/<file>")
    batch_size: int = Field(64, ge=1, description="images per U-Net call (directions x scales x seeds); also the main "
                            "job's edit strips")


class EvaluateConfig(Section):
    """hspace evaluate: Table 1 on held-out seeds -> <run_dir>/evaluation/"""

    first_seed: Seed = Field(1_000_000, description="seeds never used to find the directions")
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
    sae_features: int = Field(1, ge=0, description="with directions/sae.safetensors (hspace sae): per attribute the "
                              "features of largest |correlation|, beside the PCA component of largest correlation, "
                              "at calibrated strength (table1_sae.*, sae_factors.csv); 0: none")
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

    @model_validator(mode="after")
    def _seeds_below_max(self):
        _seeds_fit("evaluate.first_seed", self.first_seed, self.repeats * self.num_samples, "evaluate.repeats",
                   "evaluate.num_samples")
        return self


class ReportConfig(Section):
    """hspace report -> <run_dir>/report/index.html (edit strips use edit.seeds)"""

    pca_components: int = Field(4, ge=0, description="leading PCA directions shown (and as many random ones)")
    jacobian_directions: int = Field(6, ge=0, description="Jacobian directions shown")


class RunConfig(Section):
    """hspace run: the main job, every stage in order"""

    skip: List[str] = Field([], description="stages of the main job not to run, e.g. [probe, fewshot] (the paper's "
                            "pipeline without the probes and Fig. 8 as numbers); a stage that reads a skipped one's "
                            "outputs uses those of an earlier run, or does without them where it can")
