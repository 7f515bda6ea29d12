"""`hspace jacobian`: image-specific directions by Jacobian subspace iteration (paper Sec. 4.2).

For each of ``jacobian.sample_ids`` (samples of the dataset, regenerated from their seeds so
that x_t is the sample's own, its own step noise included), the top-k right singular vectors
of J_t = d eps / d h_t at every step. Written to ``<run_dir>/directions/jacobian.safetensors``
as ready-to-apply trajectories, the reference's "global at index" edit: the direction j found
at step tau applied at every step i, scaled by step i's j-th singular value. ``jacobian.steps``
limits the work to those step indices (``tau`` among them): the edit is then applied at those
steps only (zero at the others). The per-step vectors and singular values are kept as extras
(``vectors``: (n, T', k, C, H, W), ``singular_values``: (n, T', k), ``steps``: the T' step indices).

``jacobian.mask`` restricts the output to an image region (directions that move only that
region): ``rect:y0:y1:x0:x1`` in fractions of the image, or a greyscale PNG (white = region).
Runs on several processes (samples dealt round-robin) with autograd enabled (Lightning's
predict otherwise runs in inference mode).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from pipeline.config import to_dict
from pipeline.engine.model import HSpaceModel
from pipeline.errors import ConfigError, ConvergenceError, DatasetError
from pipeline.formats.directions import Directions, save_directions
from pipeline.formats.identity import read_record, safetensors_metadata
from pipeline.formats.samples import read_manifest, read_prompts
from pipeline.io import write_safetensors
from pipeline.methods.jacobian import global_at_index, jacobian_directions_all_steps
from pipeline.registry import COMMANDS
from pipeline.stages.lightning_utils import (
    ItemModule,
    ItemsProgress,
    RankShare,
    predict_parts,
    share_cpu_threads,
)


def parse_mask(spec: str | None, image_shape) -> torch.Tensor | None:
    """None, ``rect:y0:y1:x0:x1`` (fractions) or a PNG path -> (H, W) float mask in [0, 1]."""
    if not spec:
        return None
    H, W = image_shape[-2:]
    if spec.startswith("rect:"):
        try:
            y0, y1, x0, x1 = (float(v) for v in spec[5:].split(":"))
        except ValueError:
            raise ConfigError(f"jacobian.mask={spec!r}: write rect:y0:y1:x0:x1 with fractions in [0, 1]") from None
        if not (0 <= y0 < y1 <= 1 and 0 <= x0 < x1 <= 1):
            raise ConfigError(f"jacobian.mask={spec!r}: need 0 <= y0 < y1 <= 1 and 0 <= x0 < x1 <= 1")
        m = torch.zeros(H, W)
        m[round(y0 * H):max(round(y1 * H), round(y0 * H) + 1), round(x0 * W):max(round(x1 * W), round(x0 * W) + 1)] = 1
        return m
    path = Path(spec)
    if not path.exists():
        raise ConfigError(f"jacobian.mask: {path} does not exist (give rect:y0:y1:x0:x1 or a PNG mask)")
    from PIL import Image

    try:
        image = Image.open(path).convert("L")
    except (OSError, SyntaxError, ValueError) as e:
        raise ConfigError(f"jacobian.mask: {path} is not a readable image ({type(e).__name__})") from None
    if image.size != (W, H):
        print(f"hspace jacobian: warning: the mask {path} is {image.width}x{image.height}; resized to the model's "
              f"{W}x{H}", file=sys.stderr)
    return torch.from_numpy(np.asarray(image.resize((W, H), Image.BILINEAR), np.float32) / 255)


class JacobianModule(ItemModule):
    """predict_item: one sample id -> its directions at every step (autograd on)."""

    def __init__(self, model: HSpaceModel, jac_cfg, mask, prompts: dict | None = None):
        super().__init__()
        self.hmodel, self.cfg, self.mask, self.prompts = model, jac_cfg, mask, prompts or {}
        self.unet = model.unet

    def setup(self, stage: str) -> None:
        share_cpu_threads(self.trainer)

    def predict_item(self, sample_id: int):
        self.hmodel.to(self.device)
        c = self.cfg
        # a text model's sample is regenerated under its own stored prompt (outside the dataset: model.prompt)
        with torch.inference_mode(False), torch.enable_grad(), self.hmodel.prompted(self.prompts.get(int(sample_id))):
            out = jacobian_directions_all_steps(
                self.hmodel, int(sample_id), c.k, steps=None if c.steps is None else list(c.steps), mask=self.mask,
                method=c.method, block=c.block, tol=c.tol, max_iter=c.max_iter, unconverged=c.unconverged,
                generator=torch.Generator().manual_seed(c.seed + int(sample_id)))
        return {"sample_id": int(sample_id), "vectors": out.directions, "singular_values": out.singular_values,
                "iterations": out.iterations, "converged": out.converged, "residuals": out.residuals,
                "fallback": out.fallback, "steps": torch.tensor(out.steps)}


class Items(RankShare):
    """The sample ids whose part is not written yet (a killed run resumes)."""

    def __init__(self, parts: Path, ids):
        super().__init__()
        self.parts, self.ids = parts, ids

    def plan(self) -> list:
        return [i for i in self.ids if not (self.parts / part_name(i)).exists()]


def part_name(sample_id: int) -> str:
    return f"sample-{sample_id:010d}.safetensors"


def clean_parts(parts: Path, ids, inputs: dict) -> None:
    """Remove the parts made with other settings or for samples no longer asked for."""
    wanted = {part_name(i) for i in ids}
    for p in parts.glob("sample-*.safetensors"):
        stored = read_record(p)
        if p.name not in wanted or stored is None or stored.get("inputs") != inputs:
            p.unlink()


def write_part(prediction: dict, path: Path, inputs: dict) -> None:
    write_safetensors({k: v for k, v in prediction.items() if isinstance(v, torch.Tensor)}, path,
                      safetensors_metadata({"inputs": inputs}))


def write_directions(run_dir, jac_cfg, ids, timesteps, model_name, record: dict | None = None) -> Path:
    parts = Path(run_dir) / "jacobian" / "parts"
    results = []
    for i in ids:
        path = parts / part_name(i)
        if not path.exists():
            raise DatasetError(f"{path} is missing; re-run hspace jacobian")
        results.append(load_file(str(path)))
    T = len(timesteps)
    steps = results[0]["steps"].tolist()
    tau = steps.index(jac_cfg.tau)  # the schema keeps tau among jacobian.steps, each in 0..T-1
    trajectories, names = [], []
    for i, r in zip(ids, results):
        deltas = global_at_index(r["vectors"], r["singular_values"], tau)  # (k, T', C, H, W)
        full = deltas.new_zeros(len(deltas), T, *deltas.shape[2:])
        full[:, steps] = deltas  # no edit at the steps not computed
        trajectories.append(full)
        names += [f"s{i}-t{jac_cfg.tau}-v{j + 1}" for j in range(len(deltas))]
    extras = {"vectors": torch.stack([r["vectors"] for r in results]),
              "singular_values": torch.stack([r["singular_values"] for r in results]),
              "iterations": torch.stack([r["iterations"] for r in results]),
              "converged": torch.stack([r["converged"] for r in results]).to(torch.uint8),
              "residuals": torch.stack([r["residuals"] for r in results]),  # (n, T', k) relative, each < tol
              "fallback": torch.stack([r["fallback"] for r in results]).to(torch.uint8),
              "steps": torch.tensor(steps)}
    if not bool(extras["converged"].all()) or not bool((extras["residuals"] < jac_cfg.tol).all()):
        bad = [(i, steps[t]) for i, c in zip(ids, extras["converged"]) for t in range(len(steps)) if not c[t]]
        raise ConvergenceError(f"unconverged Jacobian directions (sample, step) {bad[:5]}: nothing written")
    d = Directions(torch.cat(trajectories), names, "jacobian/global-at-index", list(timesteps),
                   model=model_name, source_run=str(Path(run_dir).resolve()),
                   params={**to_dict(jac_cfg), "sample_ids": list(map(int, ids)), "scales": list(jac_cfg.scales)},
                   extras=extras)
    return save_directions(d, Path(run_dir) / "directions" / "jacobian.safetensors", record)


def run_jacobian(cfg) -> Path:
    run_dir, c = Path(cfg.run_dir), cfg.jacobian
    ids = [int(i) for i in c.sample_ids]
    if not ids:
        raise ConfigError("jacobian.sample_ids is empty: name the samples (their ids = seeds) to analyse")
    stage = COMMANDS["jacobian"]
    record, inputs = stage.identity(cfg), stage.part_inputs(cfg)
    model = HSpaceModel.from_config(cfg, under_trainer=True, precision="32-true")  # tol is below half precision's rounding
    mask = parse_mask(c.mask, model.image_shape)
    parts = run_dir / "jacobian" / "parts"
    timesteps, name = model.timesteps.tolist(), model.name_or_path
    todo = Items(parts, ids)
    has_samples = (run_dir / "samples" / "manifest.json").exists()
    prompts = read_prompts(run_dir, ids) if model.prompt is not None and has_samples else None
    float32 = cfg.trainer.model_copy(update={"precision": "32-true"})  # tol is below half precision's rounding
    trainer = predict_parts(
        float32, JacobianModule(model, c, mask, prompts), todo, tag="jacobian",
        merge=lambda: write_directions(run_dir, c, ids, timesteps, name, record), parts=parts,
        name=lambda p: part_name(p["sample_id"]), write=lambda p, path: write_part(p, path, inputs),
        progress=ItemsProgress("jacobian", lambda: len(todo.plan()), count=lambda i: 1),
        clean=lambda: clean_parts(parts, ids, inputs), inference_mode=False)
    out = run_dir / "directions" / "jacobian.safetensors"
    if trainer.is_global_zero:
        note = ""
        if (run_dir / "samples" / "manifest.json").exists():
            requested = read_manifest(run_dir).get("requested", {})
            first, n = requested.get("first_seed", 0), requested.get("num_samples", 0)
            outside = [i for i in ids if not first <= i < first + n]
            note = f" (samples {outside} are not in the dataset; they were generated from their seeds)" if outside else ""
        print(f"hspace jacobian: top-{c.k} directions at every step of {len(ids)} samples -> {out}{note}")
    return out
