"""Samples datasets of h made from a known sparse dictionary, for the SAE's tests and benchmark.

:func:`sparse_h` draws h whose examples (token-wise: every position's C-vector at every step; whole: every step's
flattened h) are sums of a few atoms of a random unit-norm dictionary with positive magnitudes;
:func:`write_samples` writes any h as a samples dataset (shards + manifest) that the stages read like a generated
one.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from pipeline.formats.identity import make_record
from pipeline.formats.samples import FORMAT, finalise_manifest, samples_dir, write_shard
from pipeline.io import hash_json


def dictionary(num_atoms: int, d: int, seed: int = 0) -> torch.Tensor:
    """(num_atoms, d) random unit vectors."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(num_atoms, d, generator=g)
    return atoms / atoms.norm(dim=1, keepdim=True)


def sparse_codes(n: int, num_atoms: int, active: int, seed: int = 0) -> torch.Tensor:
    """(n, num_atoms) codes: ``active`` atoms per row chosen at random, magnitudes uniform in [0.5, 1.5]."""
    g = torch.Generator().manual_seed(seed + 1)
    idx = torch.rand(n, num_atoms, generator=g).argsort(dim=1)[:, :active]
    return torch.zeros(n, num_atoms).scatter_(1, idx, 0.5 + torch.rand(n, active, generator=g))


def sparse_h(atoms: torch.Tensor, num_samples: int, T: int, h_shape, active: int, feed: str = "token",
             noise: float = 0.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(h (N, T, C, H, W), codes (N, T * P, num_atoms)): the examples of the ``feed`` (P per step) are ``codes @
    atoms`` (+ Gaussian noise of std ``noise``)."""
    C, H, W = h_shape
    P = H * W if feed == "token" else 1
    codes = sparse_codes(num_samples * T * P, len(atoms), active, seed)
    x = codes @ atoms
    if noise:
        x += noise * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 2))
    codes = codes.reshape(num_samples, T * P, len(atoms))
    if feed == "token":
        return x.reshape(num_samples, T, H, W, C).permute(0, 1, 4, 2, 3).contiguous(), codes
    return x.reshape(num_samples, T, C, H, W), codes


def write_samples(run_dir, h: torch.Tensor, shard_size: int = 16, h_dtype: str = "float16", first_id: int = 0) -> Path:
    """Write h (N, T, C, H, W) as ``<run_dir>/samples`` (images are black 8x8 PNGs): a complete dataset."""
    N, T = h.shape[:2]
    folder = samples_dir(run_dir)
    names = []
    for start in range(0, N, shard_size):
        ids = list(range(first_id + start, first_id + min(start + shard_size, N)))
        images = np.zeros((len(ids), 8, 8, 3), np.uint8)
        names.append(write_shard(folder / "shards", ids, ids, images, h[start:start + len(ids)], h_dtype).name)
    content = {"synthetic": hash_json(float(h.double().sum()), list(h.shape)), "h_dtype": h_dtype}
    model = {"name_or_path": "synthetic", "timesteps": [int(999 - i * math.floor(1000 / T)) for i in range(T)],
             "h_shape": list(h.shape[2:]), "eta": [0.0] * T}
    manifest = {"format": FORMAT, "identity": content, "identity_hash": hash_json(content), "model": model,
                "h_shape_t": list(h.shape[1:]), "h_dtype": h_dtype, "h_steps": list(range(T)),
                "image_shape": [3, 8, 8], "latent_shape": [3, 8, 8]}
    finalise_manifest(run_dir, manifest, set(range(first_id, first_id + N)), make_record("generate"), {})
    return folder


def write_annotations(run_dir, table) -> Path:
    """Write a pandas table (``sample_id`` + score columns) as ``<run_dir>/annotations.parquet``, recorded as
    made from the run's samples dataset (as the annotate stage records it)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.formats.identity import artefact_ids, parquet_table
    from pipeline.io import atomic_path

    record = make_record("annotate", artefacts=artefact_ids(run_dir, ["samples"]))
    path = Path(run_dir) / "annotations.parquet"
    with atomic_path(path) as tmp:
        pq.write_table(parquet_table(pa.Table.from_pandas(table, preserve_index=False), record), tmp)
    return path
