"""The whole configuration: :class:`HSpaceConfig` (its sections and the rules across them), the
defaults as a tree, and plain dict / YAML views of a configuration."""
from __future__ import annotations

import dataclasses

import yaml
from pydantic import BaseModel, Field, PrivateAttr, model_validator

from pipeline.config.sae import SAEConfig
from pipeline.config.sections import (
    AnnotateConfig,
    CalibrateConfig,
    DisentangleConfig,
    EditConfig,
    EvaluateConfig,
    FewshotConfig,
    GenerateConfig,
    JacobianConfig,
    ModelConfig,
    PCAConfig,
    ProbeConfig,
    ReportConfig,
    RunConfig,
    SampleConfig,
    Section,
    SelectConfig,
    SupervisedConfig,
    TrainerConfig,
    _cross,
)
from pipeline.config.toy_training import PHASE_1_KEYS, FinetuneToyConfig, ToyAnnotatorTrainConfig, ToyTrainConfig


class HSpaceConfig(Section):
    """the whole configuration"""

    run_dir: str = Field("runs/demo", min_length=1, description="every stage reads and writes here")
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
    sae: SAEConfig = SAEConfig()
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
        hs = self.generate.h_steps
        if hs is not None and (not hs or min(hs) < 0 or max(hs) >= T or len(set(hs)) != len(hs)):
            raise _cross("generate.h_steps", hs, f"null or distinct step indices in 0..{T - 1} "
                         f"(T = model.num_inference_steps)", "model.num_inference_steps")
        sae_steps = self.sae.step_list(T)
        if sae_steps[-1] >= T:
            raise _cross("sae.steps", self.sae.steps, f"step indices in 0..{T - 1} (T = model.num_inference_steps)",
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
        return where(self._sources, *keys)




def where(sources: dict, *keys: str) -> str:
    """Where the dotted ``keys`` (or keys inside them, or the mappings holding them) were set, from
    ``sources`` (dotted key -> "file:line" or "the command line"); "the defaults" when nowhere."""
    found = [src for key in keys for path, src in sources.items()
             if path == key or path.startswith(key + ".") or key.startswith(path + ".")]
    return " and ".join(dict.fromkeys(found)) or "the defaults"


def section_class(annotation) -> type[BaseModel] | None:
    """The section model a field's annotation is, or None for a plain value."""
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def defaults() -> dict:
    """The default configuration tree, with finetune_toy's phase-1 keys as ``${train_toy.<key>}``."""
    tree = HSpaceConfig().model_dump()
    tree["finetune_toy"].update({k: "${train_toy.%s}" % k for k in PHASE_1_KEYS})
    return tree


def to_dict(cfg) -> dict:
    """A plain dict from a config model, a dataclass or a mapping."""
    if isinstance(cfg, BaseModel):
        return cfg.model_dump()
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    return dict(cfg)


def to_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)
