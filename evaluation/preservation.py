"""Identity and what an edit should leave alone, beyond pixel change.

- **Identity** (real faces): the cosine between face embeddings of the image before and after
  the edit, from facenet-pytorch's ``InceptionResnetV1`` with user-supplied weights
  (``evaluate.identity_weights``: a state dict, e.g. facenet's VGGFace2 weights saved with
  ``torch.save(net.state_dict(), path)``; nothing is downloaded). The whole image is resized to
  160 x 160 and standardised as facenet does ((x * 255 - 127.5) / 128): the generated faces of
  the face models here are aligned crops already, so no detector runs first. 1 is the same
  face; unrelated faces give about 0.1-0.4 with trained weights.
- **Untouched factors** (any scorer, the toy's factors in particular): per direction, how much
  an edit changes, on each face, the scorer's attributes that are not the direction's own:
  the mean over seeds of |change| (in standard deviations of the unedited scores), averaged
  over those attributes, and the largest. Table 1 counts |mean change|, the side effect every
  face shares; this counts the per-face disturbance, which cancels in a mean. A categorical
  score (the toy's ``background`` class) counts as the share of faces whose class changed.
"""
from __future__ import annotations

import os

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from pipeline.errors import ConfigError, ModelLoadError

#: facenet's input size
FACE_SIZE = 160


class FaceEmbedder:
    """Images (B, 3, H, W) in [-1, 1] -> L2-normalised face embeddings (B, 512)."""

    def __init__(self, weights: str | os.PathLike, device: str | torch.device = "cpu"):
        try:
            from facenet_pytorch import InceptionResnetV1
        except ImportError as e:  # pragma: no cover - a declared dependency
            raise ConfigError(f"evaluate.identity_weights needs facenet-pytorch: {e}") from None
        if not os.path.isfile(weights):
            raise ConfigError(f"evaluate.identity_weights: {weights} is not a file")
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is one line
            raise ModelLoadError(f"cannot read face-embedding weights {weights}: {e}") from None
        state = {k: v for k, v in state.items() if not k.startswith("logits.")}  # a classifier head is not used
        self.net = InceptionResnetV1(pretrained=None, classify=False)
        try:
            self.net.load_state_dict(state)
        except RuntimeError as e:
            raise ModelLoadError(f"{weights} is not an InceptionResnetV1 state dict: {str(e).splitlines()[0]}") from None
        self.net.eval().to(device)
        self.device = torch.device(device)

    def to(self, device) -> "FaceEmbedder":
        self.device = torch.device(device)
        self.net.to(self.device)
        return self

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().to(self.device)
        if tuple(x.shape[-2:]) != (FACE_SIZE, FACE_SIZE):
            x = F.interpolate(x, size=(FACE_SIZE, FACE_SIZE), mode="bilinear", antialias=True, align_corners=False)
        x = ((x + 1) * 127.5 - 127.5) / 128.0  # facenet's fixed_image_standardization of uint8-range pixels
        return self.net(x).cpu()


def build_embedder(ev_cfg) -> FaceEmbedder | None:
    """The face embedder of ``evaluate.identity_weights``, or None when it is not set."""
    path = getattr(ev_cfg, "identity_weights", None)
    return FaceEmbedder(path) if path else None


def identity_similarity(embedder: FaceEmbedder | None, before: torch.Tensor, after: torch.Tensor) -> np.ndarray:
    """(B,) cosine between the face embeddings of ``before`` and ``after`` (NaN without an embedder)."""
    if embedder is None:
        return np.full(len(before), np.nan)
    a, b = embedder(before), embedder(after)
    return F.cosine_similarity(a, b, dim=1).numpy()


def preservation_table(per_sample: pd.DataFrame, mapping: dict[str, str] | None = None,
                       matched: dict[str, str] | None = None) -> pd.DataFrame:
    """``untouched_factors`` of the evaluation's per-sample table: each direction's own attribute is
    ``matched[direction]`` (the evaluation's one matching, ``evaluation.metrics.matched_attributes``), else
    its name (``evaluate.own_attribute``); units the std of the unedited scores over the seeds."""
    from evaluation.metrics import own_attribute

    unedited = per_sample.drop_duplicates(["repeat", "seed"])
    scale = {c[2:]: float(unedited[c].std(ddof=1)) for c in per_sample.columns if c.startswith("o_")}
    own = {d: (matched or {}).get(d) or own_attribute(d, mapping) for d in dict.fromkeys(per_sample.direction)}
    return untouched_factors(per_sample, own, scale)


def untouched_factors(per_sample: pd.DataFrame, own: dict[str, str | None], scale: dict[str, float],
                      categorical: tuple[str, ...] = ("background",)) -> pd.DataFrame:
    """Per direction: mean over seeds of |change| of every scorer attribute that is not its own
    (``own``: direction -> own attribute or None), in ``scale`` units (std of the unedited scores);
    columns: direction, family, untouched (mean over those attributes), largest, largest_attribute,
    the share of faces whose categorical scores changed, and the identity cosine when measured."""
    attrs = [c[2:] for c in per_sample.columns if c.startswith("d_")]
    rows = []
    for direction, g in per_sample.groupby("direction", sort=False):
        others = [a for a in attrs if a != own.get(direction) and a not in categorical]
        change = {a: float(g[f"d_{a}"].abs().mean() / (scale.get(a) or 1.0)) for a in others}
        worst = max(change, key=change.get) if change else ""
        row = {"direction": direction, "family": g.family.iloc[0],
               "untouched": float(np.mean(list(change.values()))) if change else np.nan,
               "largest": change.get(worst, np.nan), "largest_attribute": worst}
        for a in categorical:
            if a in attrs:
                row[f"{a}_changed"] = float((g[f"d_{a}"].abs() > 0.5).mean())
        if "identity" in g and g.identity.notna().any():
            row["identity"] = float(g.identity.mean())
        rows.append(row)
    return pd.DataFrame(rows)
