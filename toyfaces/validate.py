"""`hspace validate-toy`: the embedded default against its own ground truth.

Figures (printed and saved as JSON):

- factor statistics of model samples read by the toy annotator, against fresh renders read
  by the same annotator: binary rates (target: within 5 points) and the spread (standard
  deviation) of continuous factors (target: at least 80% of the renders');
- high-frequency energy: mean of (x - 3x3 box blur of x)^2 over pixels, x in [0, 1]; it
  rises with sampling noise and falls with blur (target: within 25% of the renders');
- editability: per factor, the mean-difference direction (top 50 minus bottom 50 of the
  annotated samples, per step, chosen as the select stage chooses them) applied at a fixed
  scale to new seeds must move the factor's mean by at least one renderer standard deviation
  (half the range for binary factors) in the intended sign;
- DDIM inversion: invert rendered faces (eta 0), decode, PSNR (target >= 30 dB);
- correlations: for every pair the training data correlates (the model's ``training.json``,
  else ``train_toy.correlations``), the Pearson r of the two factors as the annotator reads
  them, samples against renders, with a 95% interval for the samples' r (Fisher z): the
  entanglement the disentanglement experiment is meant to remove is only there if the model
  reproduced it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.engine.edits import Edit
from pipeline.engine.model import HSpaceModel
from pipeline.errors import ModelLoadError
from pipeline.formats.images import from_uint8
from pipeline.formats.samples import write_json_atomic
from pipeline.methods.supervised import mean_difference
from toyfaces.render import FACTORS, render_faces, sample_factors


def hf_energy(images: torch.Tensor) -> float:
    """Mean squared high-pass residual of (B, 3, H, W) images in [-1, 1] (computed in [0, 1] units)."""
    x = (images.float() + 1) / 2
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return float(((x - blur) ** 2).mean())


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = ((a.float() - b.float()) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-12))


def _batched(fn, items, batch_size):
    return [fn(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]


def sample_and_read(model: HSpaceModel, annotator, seeds, batch_size: int = 128):
    """Samples (images, h) of the seeds and their annotator scores."""
    images, hs, scores = [], [], []
    for out in _batched(model.sample, list(seeds), batch_size):
        images.append(out.images.cpu())
        hs.append(out.h.cpu().half())
        scores.append(annotator(out.images))
    return torch.cat(images), torch.cat(hs), {k: torch.cat([s[k] for s in scores]) for k in scores[0]}


def factor_statistics(sample_scores: dict, render_scores: dict) -> dict:
    out = {}
    for f in FACTORS:
        if f.kind == "binary":
            out[f.name] = {"rate_samples": float((sample_scores[f.name] > 0.5).float().mean()),
                           "rate_renders": float((render_scores[f.name] > 0.5).float().mean())}
            out[f.name]["ok"] = bool(abs(out[f.name]["rate_samples"] - out[f.name]["rate_renders"]) <= 0.05)
        elif f.kind == "continuous":
            s, r = float(sample_scores[f.name].std()), float(render_scores[f.name].std())
            out[f.name] = {"std_samples": s, "std_renders": r, "spread_ratio": s / r, "ok": bool(s / r >= 0.8)}
    return out


def pearson_interval(x: torch.Tensor, y: torch.Tensor, level: float = 0.95) -> tuple[float, float, float]:
    """Pearson r of two (N,) series and its ``level`` interval (Fisher z, normal approximation)."""
    from scipy.stats import norm

    x, y = x.double().flatten(), y.double().flatten()
    r = float(torch.corrcoef(torch.stack([x, y]))[0, 1])
    half = float(norm.ppf((1 + level) / 2)) / np.sqrt(max(len(x) - 3, 1))
    z = np.arctanh(np.clip(r, -0.999999, 0.999999))
    return r, float(np.tanh(z - half)), float(np.tanh(z + half))


def correlation_statistics(sample_scores: dict, render_scores: dict, correlations) -> dict:
    """Per correlated pair 'a~b': r in the samples (with its 95% interval) and in the renders;
    ``ok`` (reproduced) when the renders' r lies inside the samples' interval."""
    out = {}
    for key in correlations or {}:
        a, b = (part.strip() for part in key.split("~"))
        r, low, high = pearson_interval(sample_scores[a], sample_scores[b])
        r_renders = pearson_interval(render_scores[a], render_scores[b])[0]
        out[key] = {"r_samples": r, "r_samples_low": low, "r_samples_high": high, "r_renders": r_renders,
                    "ok": bool(low <= r_renders <= high)}
    return out


def editability(model: HSpaceModel, annotator, h: torch.Tensor, scores: dict, new_seeds, n: int = 50,
                scale: float = 1.0, resolution: float = 0.0) -> dict:
    """Per factor: the top-n minus bottom-n direction (``select_top_bottom`` at ``resolution``)
    applied at ``scale`` to new seeds; the change of the factor's mean against the bar (one
    renderer std, half the range if binary). h: (N, T, C, H, W), scores: name -> (N,)."""
    import pandas as pd

    from pipeline.methods.selection import select_top_bottom

    base = {k: v for k, v in annotator(torch.cat([o.images for o in _batched(model.sample, list(new_seeds), 128)])).items()}
    out = {}
    for f in FACTORS:
        if f.kind == "categorical":
            continue
        top, bottom = select_top_bottom(pd.Series(scores[f.name].cpu().numpy(), name=f.name), n, resolution=resolution)
        d = mean_difference(h[torch.as_tensor(top.index)], h[torch.as_tensor(bottom.index)])
        edit = Edit(delta=scale * d)
        edited = torch.cat([o.images for o in _batched(lambda s, e=edit: model.sample(s, e), list(new_seeds), 128)])
        moved = float(annotator(edited)[f.name].mean() - base[f.name].mean())
        bar = 0.5 if f.kind == "binary" else f.std
        out[f.name] = {"mean_change": moved, "bar": bar, "ok": bool(moved >= bar)}
    return out


def inversion_round_trip(model: HSpaceModel, n: int = 32, seed: int = 7, fixed_point_iterations: int = 0) -> dict:
    """Invert n rendered faces with DDIM (eta 0) at the model's steps and decode; PSNR."""
    faces = from_uint8(render_faces(sample_factors(n, seed)))
    inv = model.invert(faces, fixed_point_iterations=fixed_point_iterations)
    decoded = model.sample(x_T=inv.x_T, eta=0.0).images.cpu()
    p = psnr(decoded, faces)
    return {"psnr_mean": float(p.mean()), "psnr_min": float(p.min()), "n": n, "steps": model.num_steps,
            "fixed_point_iterations": fixed_point_iterations, "ok": bool(float(p.mean()) >= 30.0)}


def validate(model: HSpaceModel, annotator, n_samples: int = 512, n_edit: int = 32, n_top: int = 50,
             edit_scale: float = 3.0, first_seed: int = 0, correlations=None, resolution: float = 0.0) -> dict:
    """The figures above; the inversion both plain and with one fixed-point iteration per step."""
    images, h, scores = sample_and_read(model, annotator, range(first_seed, first_seed + n_samples))
    renders = from_uint8(render_faces(sample_factors(n_samples, 12345, correlations)))
    render_scores = annotator(renders)
    hf_s, hf_r = hf_energy(images), hf_energy(renders)
    return {
        "factors": factor_statistics(scores, render_scores),
        "correlations": correlation_statistics(scores, render_scores, correlations),
        "hf_energy": {"samples": hf_s, "renders": hf_r, "ratio": hf_s / hf_r, "ok": bool(abs(hf_s / hf_r - 1) <= 0.25)},
        "editability": editability(model, annotator, h, scores, range(10**6, 10**6 + n_edit), n_top, edit_scale,
                                   resolution),
        "inversion": {f"fixed_point_iterations={k}": inversion_round_trip(model, fixed_point_iterations=k) for k in (0, 1)},
        "settings": {"n_samples": n_samples, "n_edit": n_edit, "n_top": n_top, "edit_scale": edit_scale,
                     "resolution": resolution,
                     "steps": model.num_steps, "eta": model.eta.tolist()[0]},
    }


def samples_vs_renders_figure(model: HSpaceModel, path, n: int = 48, correlations=None) -> Path:
    """Model samples (seeds 0..n-1) beside rendered faces of the training distribution."""
    import matplotlib.pyplot as plt

    from pipeline.formats.figures import save_figure
    from pipeline.formats.images import image_grid, to_uint8

    samples = to_uint8(model.sample(list(range(n))).images.cpu())
    renders = render_faces(sample_factors(n, 12345, correlations))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), layout="constrained")
    for ax, imgs, title in zip(axes, (samples, renders), (f"model samples (seeds 0-{n - 1}, T={model.num_steps}, "
                                                        f"eta {float(model.eta[0]):g})", "rendered faces")):
        ax.imshow(image_grid(imgs, 8, pad=2))
        ax.set_title(title)
        ax.axis("off")
    return save_figure(fig, path)


def training_correlations(cfg) -> dict:
    """The factor correlations the model was trained with: its ``training.json`` (written by
    train-toy / finetune-toy), else ``train_toy.correlations``."""
    import json

    from pipeline.engine.loading import resolve

    location, is_local = resolve(cfg.model.name_or_path)
    record = Path(location) / "training.json"
    if is_local and record.exists():
        try:
            return dict(json.loads(record.read_text())["config"].get("correlations") or {})
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ModelLoadError(f"{record} is not a train-toy training record (JSON with a 'config' mapping); "
                                 f"restore it from the model's source or delete it to use train_toy.correlations") from None
    return dict(cfg.train_toy.correlations)


def run_validate_toy(cfg) -> dict:
    from toyfaces.annotator import ToyFaceAnnotator

    model = HSpaceModel.from_config(cfg)
    correlations = training_correlations(cfg)
    result = validate(model, ToyFaceAnnotator(), n_top=cfg.select.n, edit_scale=cfg.evaluate.scale,
                      correlations=correlations, resolution=cfg.select.resolution)
    out = write_json_atomic(Path(cfg.run_dir) / "validate-toy.json", result)
    figure = samples_vs_renders_figure(model, out.with_suffix(".png"), correlations=correlations)
    width = max([9] + [len(name) for section in ("factors", "correlations", "editability") for name in result[section]])
    for section in ("factors", "correlations", "editability"):
        for name, r in result[section].items():
            verdict = "OK " if r["ok"] else ("OFF" if section == "correlations" else "LOW")
            print(f"{section:12s} {name:{width}s} {verdict} " +
                  " ".join(f"{k}={v:.3f}" for k, v in r.items() if isinstance(v, float)))
    for section, r in [("hf_energy", result["hf_energy"])] + [(f"inversion {k}", v) for k, v in result["inversion"].items()]:
        print(f"{section:12s} {'OK ' if r['ok'] else 'LOW'} "
              + " ".join(f"{k}={v:.3f}" for k, v in r.items() if isinstance(v, float)))
    print(f"hspace validate-toy: {out}, {figure}")
    return result
