"""The embedded default's annotator: a small CNN that reads the toy-face factors back.

Registered as ``toy`` and ``toy_consistency`` in annotators.base by name (a lazy entry: the
annotators package does not import the toy domain).

Trained on freshly rendered faces with *independent* factors (so it cannot learn one factor
from another) and light augmentation (noise, blur, 1-pixel shifts, contrast), so that it
reads generated samples, which are never quite as clean as renders. Outputs, in the
renderer's own units: ``smile`` [-1, 1], ``eye_open`` [0, 1], ``yaw`` [-1, 1], ``hair`` [0, 1]
(regression), ``glasses`` and ``hat`` (probabilities), ``background`` (class index 0-3).
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from annotators import ASSETS
from annotators.base import Annotator
from pipeline.errors import ModelLoadError
from toyfaces.render import FACTORS, render_faces, sample_factors

ASSET = ASSETS / "toyfaces-annotator"
CONTINUOUS = tuple(f.name for f in FACTORS if f.kind == "continuous")
BINARY = tuple(f.name for f in FACTORS if f.kind == "binary")
N_BACKGROUNDS = next(f.levels for f in FACTORS if f.kind == "categorical")
ATTRIBUTES = CONTINUOUS + BINARY + ("background",)


class ToyFaceNet(nn.Module):
    """(B, 3, 32, 32) normalised -> (B, 4 continuous + 2 binary logits + 4 background logits)."""

    def __init__(self, width: int = 32):
        super().__init__()

        def block(cin, cout, stride):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.SiLU())

        w = width
        self.features = nn.Sequential(block(3, w, 1), block(w, w, 2), block(w, 2 * w, 1), block(2 * w, 2 * w, 2),
                                      block(2 * w, 4 * w, 2))  # -> (4w, 4, 4): position is kept, not pooled
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * 16, 256), nn.SiLU(),
                                  nn.Linear(256, len(CONTINUOUS) + len(BINARY) + N_BACKGROUNDS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def decode_outputs(out: torch.Tensor) -> dict[str, torch.Tensor]:
    """Network outputs (B, 10) -> {factor: (B,)} in the renderer's units."""
    nc, nb = len(CONTINUOUS), len(BINARY)
    scores = {name: out[:, i] for i, name in enumerate(CONTINUOUS)}
    scores.update({name: torch.sigmoid(out[:, nc + i]) for i, name in enumerate(BINARY)})
    scores["background"] = out[:, nc + nb:].argmax(dim=1).float()
    return scores


class ToyFaceAnnotator(Annotator):
    """Reads smile, eye_open, glasses, hat, yaw, hair and background off a toy face."""

    name = "toy"
    attributes = ATTRIBUTES
    input_size = (32, 32)

    def __init__(self, weights: str | os.PathLike | None = None, net: ToyFaceNet | None = None):
        if net is None:
            path = Path(weights) if weights else ASSET / "model.safetensors"
            if not path.exists():
                raise ModelLoadError(f"the toy annotator's weights {path} are missing; run `hspace train-toy-annotator` "
                                     f"or reinstall the package (they ship in annotators/assets)")
            from safetensors.torch import load_file

            net = ToyFaceNet()
            net.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
        self.net = net.eval()

    def score(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return decode_outputs(self.net(x))


# ---------------------------------------------------------------------- training
def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Light, seeded augmentation of (B, 3, 32, 32) in [-1, 1]: shift, blur, noise, contrast."""
    B = len(x)
    shifts = torch.randint(-1, 2, (B, 2), generator=g)
    x = torch.stack([torch.roll(im, tuple(s.tolist()), dims=(1, 2)) for im, s in zip(x, shifts)])
    sigma = torch.rand(B, generator=g) * 0.7
    k = torch.arange(-2, 3).float()
    kern = torch.exp(-(k[None] ** 2) / (2 * sigma[:, None].clamp_min(1e-3) ** 2))
    kern = kern / kern.sum(1, keepdim=True)  # (B, 5)
    x = torch.stack([F.conv2d(F.pad(im[None], (2, 2, 2, 2), mode="replicate"),
                              (kk[:, None] * kk[None, :]).expand(3, 1, 5, 5), groups=3)[0] for im, kk in zip(x, kern)])
    contrast = 1 + 0.1 * (torch.rand(B, 1, 1, 1, generator=g) - 0.5)
    noise = torch.randn(x.shape, generator=g) * (torch.rand(B, 1, 1, 1, generator=g) * 0.08)
    return (x * contrast + noise).clamp(-1, 1)


def training_batch(seed: int, step: int, batch_size: int, aug: bool = True):
    from pipeline.formats.images import from_uint8

    factors = sample_factors(batch_size, np.random.SeedSequence([seed, 3, step]))
    x = from_uint8(render_faces(factors))
    if aug:
        x = augment(x, torch.Generator().manual_seed(int(np.random.SeedSequence([seed, 4, step]).generate_state(1)[0])))
    y = torch.tensor(np.stack([factors[f.name] for f in FACTORS], 1), dtype=torch.float32)
    return x, y


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    nc, nb = len(CONTINUOUS), len(BINARY)
    idx = {f.name: i for i, f in enumerate(FACTORS)}
    cont = torch.stack([y[:, idx[n]] for n in CONTINUOUS], 1)
    binary = torch.stack([y[:, idx[n]] for n in BINARY], 1)
    return (F.mse_loss(out[:, :nc], cont) * 4 + F.binary_cross_entropy_with_logits(out[:, nc:nc + nb], binary)
            + F.cross_entropy(out[:, nc + nb:], y[:, idx["background"]].long()))


def evaluate_annotator(annotator: Annotator, n: int = 2048, seed: int = 10_000) -> dict[str, float]:
    """Held-out accuracy on fresh renders (no augmentation): R^2 for continuous factors,
    accuracy for binary and categorical ones."""
    x, y = training_batch(seed, 0, n, aug=False)
    scores = annotator(x)
    metrics = {}
    for i, f in enumerate(FACTORS):
        pred, true = scores[f.name].double(), y[:, i].double()
        if f.kind == "continuous":
            metrics[f"{f.name}_r2"] = float(1 - ((pred - true) ** 2).sum() / ((true - true.mean()) ** 2).sum())
        elif f.kind == "binary":
            metrics[f"{f.name}_accuracy"] = float(((pred > 0.5).double() == true).double().mean())
        else:
            metrics[f"{f.name}_accuracy"] = float((pred == true).double().mean())
    return metrics


def train_toy_annotator(cfg) -> Path:
    """Train, evaluate on held-out renders, and save weights (fp16) + config + metrics."""
    from tqdm.auto import tqdm

    from pipeline.io import save_safetensors

    torch.manual_seed(cfg.seed)
    net = ToyFaceNet(cfg.width)
    annotator = ToyFaceAnnotator(net=net)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, s / cfg.steps))))
    t0 = time.time()
    bar = tqdm(range(cfg.steps), desc="train-toy-annotator", dynamic_ncols=True)
    net.train()
    for step in bar:
        x, y = training_batch(cfg.seed, step, cfg.batch_size)
        loss = loss_fn(net(annotator.preprocess(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    metrics = evaluate_annotator(annotator)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.half() if v.is_floating_point() else v for k, v in net.state_dict().items()}
    save_safetensors(weights, out / "model.safetensors")
    from pipeline.config import to_dict

    (out / "config.json").write_text(json.dumps({"config": to_dict(cfg), "train_seconds": round(time.time() - t0)}, indent=2))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print("held-out accuracy (fresh renders):")
    for k, v in metrics.items():
        print(f"  {k:20s} {v:.4f}")
    print(f"saved {out}")
    return out


def run_train_toy_annotator(cfg) -> Path:
    return train_toy_annotator(cfg.train_toy_annotator)


class ToyConsistency(Annotator):
    """How much an image still looks like a toy face: the mean absolute difference (in [0, 1]
    pixel units) between the image and a fresh render of the factors the toy annotator reads
    off it. A clean toy face scores near 0; an edit that destroys the face scores high. This is
    the toy domain's stand-in for "is a face still detected" (MTCNN does not see toy faces)."""

    name = "toy_consistency"
    attributes = ("render_error",)
    input_size = (32, 32)

    def __init__(self, weights: str | os.PathLike | None = None):
        self.reader = ToyFaceAnnotator(weights)

    def networks(self):
        return self.reader.networks()

    def to(self, device):
        self.reader.to(device)
        self.device = torch.device(device)
        return self

    def score(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        from pipeline.formats.images import from_uint8

        factors = {k: v.cpu().numpy() for k, v in self.reader.score(x).items()}
        rerender = from_uint8(render_faces(factors)).to(x.device)
        return {"render_error": ((x - rerender).abs().mean(dim=(1, 2, 3)) * 0.5)}
