"""Directions files: ``<run_dir>/directions/<name>.safetensors``.

One tensor ``directions`` of shape ``(K, T, *h_shape)`` (K directions, each a full h-space
trajectory, ready to be used as ``delta_h`` with scale 1; h_shape is (C, H, W) at a U-Net's
bottleneck, (N, C) in a transformer; zero at a step means no edit there, as at the steps a dataset
recorded with ``generate.h_steps`` leaves out), optional extra tensors (explained
variance, singular values, ...) and JSON metadata: method, names of the K directions,
timesteps, h shape, model, source run, the method's parameters and the labels users gave
directions (``hspace explore``: index -> "hat", shown as "pc3: hat"; the names stay).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from pipeline.errors import ConfigError, DatasetError, InputError
from pipeline.formats.identity import read_record, safetensors_bytes, safetensors_digest
from pipeline.io import write_bytes_atomic

_META_KEY = "hspace"


@dataclass
class Directions:
    """K named h-space directions, ``directions``: (K, T, *h_shape), plus provenance."""

    directions: torch.Tensor
    names: list[str]
    method: str
    timesteps: list[int]
    model: str | None = None
    source_run: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    labels: dict[int, str] = field(default_factory=dict)  # index -> a user's name for it

    def __post_init__(self):
        self.labels = {int(i): str(v) for i, v in self.labels.items() if str(v)}
        if self.directions.ndim < 4:
            raise InputError(f"directions must be (K, T, *h_shape) with h_shape (C, H, W) or (N, C), got shape "
                             f"{tuple(self.directions.shape)}")
        if len(self.names) != len(self.directions):
            raise InputError(f"{len(self.names)} names for {len(self.directions)} directions")
        if len(self.timesteps) != self.directions.shape[1]:
            raise InputError(f"{len(self.timesteps)} timesteps for directions with T={self.directions.shape[1]}")
        bad = [i for i in self.labels if not 0 <= i < len(self.names)]
        if bad:
            raise InputError(f"labels for directions {bad}, but the file has {len(self.names)}")
        problem = nonfinite(self.names, {"directions": self.directions, **self.extras})
        if problem:
            raise InputError(problem)

    def __len__(self) -> int:
        return len(self.directions)

    @property
    def h_shape(self) -> tuple[int, ...]:
        return tuple(self.directions.shape[2:])

    def display_name(self, i: int) -> str:
        """The name of direction ``i`` with its label, if it has one: "pc3: hat"."""
        label = self.labels.get(int(i))
        return f"{self.names[i]}: {label}" if label else self.names[i]

    def index(self, key: str | int) -> int:
        """Position of a direction given by name, label, or index (an int or a numeric string)."""
        if isinstance(key, str) and key in self.names:
            return self.names.index(key)
        labelled = [i for i, label in sorted(self.labels.items()) if label == key]
        if isinstance(key, str) and len(labelled) == 1:
            return labelled[0]
        try:
            i = int(key)
        except (TypeError, ValueError):
            raise InputError(f"no direction named {key!r}; names are {self.names}") from None
        if not -len(self) <= i < len(self):
            raise InputError(f"direction index {i} out of range: the file has {len(self)} directions")
        return i % len(self)

    def get(self, key: str | int) -> torch.Tensor:
        """One direction, (T, *h_shape)."""
        return self.directions[self.index(key)]

    def subset(self, keys) -> "Directions":
        idx = [self.index(k) for k in keys]
        extras = {k: v[idx] for k, v in self.extras.items() if v.shape[:1] == (len(self),)}
        labels = {j: self.labels[i] for j, i in enumerate(idx) if i in self.labels}
        return Directions(self.directions[idx], [self.names[i] for i in idx], self.method, self.timesteps,
                          self.model, self.source_run, self.params, extras, labels)

    def metadata(self) -> dict:
        return {"method": self.method, "names": self.names, "timesteps": list(map(int, self.timesteps)),
                "h_shape": list(self.h_shape), "model": self.model, "source_run": self.source_run,
                "params": self.params, "labels": {str(i): v for i, v in sorted(self.labels.items())}}


def nonfinite(names: list[str], tensors: dict[str, torch.Tensor]) -> str | None:
    """What is not finite in the tensors used as edits: ``directions`` (row i: direction ``names[i]``)
    and every extra named ``*directions``; None when all is finite."""
    for key, t in tensors.items():
        if key.endswith("directions") and t.is_floating_point() and t.ndim > 1 and not bool(torch.isfinite(t).all()):
            i = int((~torch.isfinite(t)).flatten(1).any(1).nonzero()[0])
            what = f"direction {names[i]!r}" if key == "directions" and i < len(names) else f"{key}[{i}]"
            return f"{what} holds {int((~torch.isfinite(t[i])).sum())} non-finite values (NaN or inf): an edit with it " \
                   f"gives blank images"
    return None


def save_directions(d: Directions, path: str | os.PathLike, record: dict | None = None) -> Path:
    """Write atomically (a temporary file renamed into place), with the identity ``record`` of
    what the directions were made from (:mod:`pipeline.formats.identity`, sealed with the file's content)
    when a stage made them."""
    path = Path(path)
    tensors = {"directions": d.directions.detach().float().cpu().contiguous()}
    for k, v in d.extras.items():
        if k == "directions":
            raise InputError("'directions' is reserved for the main tensor")
        tensors[k] = v.detach().cpu().contiguous()
    write_bytes_atomic(path, safetensors_bytes(tensors, {_META_KEY: json.dumps(d.metadata(), default=str)}, record))
    return path


def load_directions(path: str | os.PathLike, model=None) -> Directions:
    """A directions file; with ``model`` (an HSpaceModel), checked to fit its h trajectories
    (T, *h_shape) before anything is sampled with it."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"directions file {path} does not exist; run the stage that writes it "
                           f"(hspace pca / jacobian / supervised / disentangle) first")
    tensors, meta = read_tensors(path, "hspace directions file")
    if "directions" not in tensors or "names" not in meta:
        raise DatasetError(f"{path} is not a readable hspace directions file (no directions tensor or names); make it again")
    main = tensors.pop("directions")
    problem = nonfinite(meta.get("names", []), {"directions": main, **tensors})
    scales = ((meta.get("params") or {}).get("calibration") or {}).get("scales") or {}
    bad = [n for n, v in scales.items() if isinstance(v, float) and not math.isfinite(v)]
    problem = problem or (f"direction {bad[0]!r} has a calibrated strength of {scales[bad[0]]}" if bad else None)
    if problem:
        stage = (read_record(path) or {}).get("stage")
        raise DatasetError(f"{path}: {problem}; " + (f"delete it and run hspace {stage} again" if stage else
                                                      "make the file again"))
    try:
        d = Directions(main, meta["names"], meta["method"], meta["timesteps"], meta.get("model"),
                       meta.get("source_run"), meta.get("params", {}), tensors, meta.get("labels", {}))
    except (InputError, KeyError) as e:
        raise DatasetError(f"{path} is not a consistent hspace directions file ({e})") from None
    if model is not None:
        want = (model.num_steps, *model.h_shape)
        if d.directions.shape[2:] == tuple(model.h_shape) and d.directions.shape[1] != model.num_steps:
            raise ConfigError(f"{path} was made for T={d.directions.shape[1]} steps but the model samples "
                              f"T={model.num_steps}; set model.num_inference_steps={d.directions.shape[1]}")
        if tuple(d.directions.shape[1:]) != tuple(want):
            raise DatasetError(f"{path} holds directions of shape (T, *h_shape) = {tuple(d.directions.shape[1:])}, but "
                               f"this model's h trajectories are {tuple(want)}; use directions made with the same model, "
                               f"hook and model.num_inference_steps")
    return d


#: where the calibrate stage keeps the calibrated strengths of a run's directions files (under run_dir)
CALIBRATION = "calibration/strengths.json"


def calibration_entry(path: str | os.PathLike) -> dict:
    """What identifies a directions file's content in ``calibration/strengths.json`` (its labels aside)."""
    return {"file": Path(path).name, "content": safetensors_digest(path)}


def with_calibration(d: Directions, path: str | os.PathLike, run_dir: str | os.PathLike) -> Directions:
    """``d``, read from ``path``, with the calibrated strengths that ``hspace calibrate`` measured in ``run_dir``
    for a file of that content (``params["calibration"]``); ``d`` as it is when there are none."""
    strengths = Path(run_dir) / CALIBRATION
    if not strengths.exists():
        return d
    try:
        files = json.loads(strengths.read_text())["files"]
    except (OSError, ValueError, KeyError) as e:
        raise DatasetError(f"{strengths} cannot be read ({type(e).__name__}: {e}); re-run hspace calibrate") from None
    content = safetensors_digest(path)
    for entry in files.values():
        if entry.get("content") == content:
            scales = entry["record"].get("scales") or {}
            bad = [n for n, v in scales.items() if isinstance(v, float) and not math.isfinite(v)]
            if bad:
                raise DatasetError(f"{strengths}: direction {bad[0]!r} has a calibrated strength of {scales[bad[0]]}; "
                                   f"delete it and run hspace calibrate again")
            d.params = {**d.params, "calibration": entry["record"]}
            break
    return d


def read_tensors(path: str | os.PathLike, what: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors of a safetensors file written by hspace and its ``hspace`` metadata (JSON); a file that cannot
    be read is a DatasetError naming it as ``what``."""
    from safetensors import safe_open

    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {})[_META_KEY])
    except (SafetensorError, KeyError, json.JSONDecodeError, OSError) as e:
        raise DatasetError(f"{path} is not a readable {what} ({type(e).__name__}: {e})") from None
    return tensors, meta


def label_direction(path: str | os.PathLike, key: str | int, label: str) -> Directions:
    """Give direction ``key`` of the file at ``path`` a label (an empty one removes it), rewriting the
    file atomically; its names, order and tensors stay as they are."""
    d = load_directions(path)
    i, label = d.index(key), " ".join(str(label).split())
    if label in d.names and d.names.index(label) != i:
        raise InputError(f"{label!r} is the name of another direction in {Path(path).name}")
    d.labels.pop(i, None)
    if label:
        d.labels[i] = label
    save_directions(d, path, read_record(path))  # the stage's identity record stays
    return d


def compose(directions, scales) -> torch.Tensor:
    """Sequential composition (paper Fig. 11): sum of ``scale * direction``; each (T, *h_shape)."""
    directions, scales = list(directions), [float(s) for s in scales]
    if not directions or len(directions) != len(scales):
        raise InputError(f"compose needs one scale per direction, got {len(directions)} and {len(scales)}")
    return sum(s * torch.as_tensor(d, dtype=torch.float32) for d, s in zip(directions, scales))

