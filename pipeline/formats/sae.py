"""A trained SAE on disk: ``<run_dir>/sae/sae.safetensors`` and ``<run_dir>/sae/cfg.json``.

The weights are sparsify's ``SparseCoder`` state dict (``encoder.weight`` (F, d), ``encoder.bias`` (F,),
``W_dec`` (F, d), ``b_dec`` (d,)) and ``cfg.json`` its configuration, so ``sparsify.SparseCoder.load_from_disk(
run_dir / "sae")`` reads them too. The safetensors metadata ``hspace`` holds what maps h to the SAE's inputs and
back: the feed (token / whole), the trained steps, the per-step normalisation scales (an example x of step t is
``scale_t * x``; a decoder vector is ``vector / scale_t`` in h's units), h's shape, the sparsity rule; and the
identity record of what it was trained from (:mod:`pipeline.formats.identity`).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.errors import DatasetError, InputError
from pipeline.formats.directions import _META_KEY, read_tensors
from pipeline.formats.identity import safetensors_metadata
from pipeline.io import save_safetensors, write_json_atomic
from pipeline.methods.sae import decode, encode, examples, sparse_coder, to_h


def sae_dir(run_dir) -> Path:
    return Path(run_dir) / "sae"


@dataclass
class SAEModel:
    """A trained SAE and the map between h and its examples. ``coder``: the sparsify SparseCoder; ``steps``: the
    trained step indices; ``scales``: (len(steps),); ``h_shape``: (C, H, W); ``T``: steps of h."""

    coder: torch.nn.Module
    feed: str
    steps: list[int]
    scales: torch.Tensor
    h_shape: tuple[int, int, int]
    T: int
    sparsity: str = "topk"
    info: dict | None = None

    @property
    def num_latents(self) -> int:
        return self.coder.W_dec.shape[0]

    def inputs(self, h: torch.Tensor) -> torch.Tensor:
        """h (B, T, C, H, W), or h at the trained steps only (B, T', C, H, W) -> the normalised examples of the
        trained steps, (B, T', P, d)."""
        x = examples((h if h.shape[1] == len(self.steps) else h[:, self.steps]).float(), self.feed)
        return x * self.scales.to(x.device)[None, :, None, None]

    @torch.no_grad()
    def codes(self, h: torch.Tensor) -> torch.Tensor:
        """h (B, T, C, H, W) -> every latent's activation at every trained step and example, (B, T', P, F)."""
        x = self.inputs(h)
        values, indices, _ = encode(self.coder, x.reshape(-1, x.shape[-1]), self.sparsity)
        dense = values if indices is None else torch.zeros(len(values), self.num_latents).scatter_(1, indices, values)
        return dense.reshape(*x.shape[:3], -1)

    @torch.no_grad()
    def reconstruct(self, h: torch.Tensor) -> torch.Tensor:
        """h (B, T, C, H, W) -> its reconstruction at the trained steps, in h's units, (B, T', C, H, W)."""
        x = self.inputs(h)
        values, indices, _ = encode(self.coder, x.reshape(-1, x.shape[-1]), self.sparsity)
        recon = decode(self.coder, values, indices).reshape(x.shape) / self.scales[None, :, None, None]
        B, Tp, P, d = recon.shape
        if self.feed == "token":
            return recon.transpose(2, 3).reshape(B, Tp, *self.h_shape)
        return recon.reshape(B, Tp, *self.h_shape)

    def delta(self, feature: int, gain: float = 1.0, h: torch.Tensor | None = None) -> torch.Tensor:
        """Feature ``feature``'s decoder vector times ``gain``, in h's units, as a delta_h: at every position of
        every trained step, (T, C, H, W) (what directions/sae.safetensors holds); or, given the source samples' h
        (B, T, C, H, W), only where the feature fires on them, (B, T, C, H, W)."""
        if not 0 <= feature < self.num_latents:
            raise InputError(f"feature {feature} out of range: the SAE has {self.num_latents} latents")
        row = self.coder.W_dec[feature].detach().float().cpu() * gain
        if h is None:
            out = torch.zeros(self.T, *self.h_shape)
            for j, t in enumerate(self.steps):
                out[t] = to_h(row / float(self.scales[j]), self.feed, self.h_shape)
            return out
        fires = self.codes(h)[..., feature] > 0  # (B, T', P)
        out = torch.zeros(len(h), self.T, *self.h_shape)
        C, H, W = self.h_shape
        for j, t in enumerate(self.steps):
            vec = to_h(row / float(self.scales[j]), self.feed, self.h_shape)  # (C, H, W)
            mask = fires[:, j].reshape(len(h), 1, H, W) if self.feed == "token" else fires[:, j].reshape(-1, 1, 1, 1)
            out[:, t] = mask * vec
        return out


def save_sae(run_dir, model: SAEModel, record: dict | None = None) -> Path:
    """Write ``sae/sae.safetensors`` (weights + the h map + ``record``) and ``sae/cfg.json``, each atomically."""
    folder = sae_dir(run_dir)
    meta = {"feed": model.feed, "steps": list(model.steps), "scales": [float(s) for s in model.scales],
            "h_shape": list(model.h_shape), "T": int(model.T), "sparsity": model.sparsity, "info": model.info or {}}
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in model.coder.state_dict().items()}
    path = folder / "sae.safetensors"
    save_safetensors(tensors, path, {_META_KEY: json.dumps(meta), **(safetensors_metadata(record) if record else {})})
    cfg = model.coder.cfg
    write_json_atomic(folder / "cfg.json", {**cfg.to_dict(), "d_in": model.coder.d_in})
    return path


def load_sae(path: str | os.PathLike) -> SAEModel:
    """A run directory's SAE (``path``: the run directory, its ``sae/`` folder or the safetensors file)."""
    path = Path(path)
    if path.is_dir():
        path = path / "sae.safetensors" if (path / "sae.safetensors").exists() else sae_dir(path) / "sae.safetensors"
    if not path.exists():
        raise DatasetError(f"no trained SAE at {path}; run `hspace sae` first")
    tensors, meta = read_tensors(path, "hspace SAE file")
    F, d = tensors["W_dec"].shape
    k = int((meta.get("info") or {}).get("k", 1))
    coder = sparse_coder(d, F, k, seed=0)
    coder.load_state_dict(tensors)
    coder.requires_grad_(False)
    return SAEModel(coder, meta["feed"], list(meta["steps"]), torch.tensor(meta["scales"]), tuple(meta["h_shape"]),
                    int(meta["T"]), meta.get("sparsity", "topk"), meta.get("info"))
