"""The logic behind `hspace explore`, free of any web framework (the app in ``app.py`` only wires it).

An :class:`ExploreSession` holds the model, every directions file of ``<run_dir>/directions`` and
the run's scorer (``evaluate.scorer``: the toy annotator on the embedded default). For a source (a
seed, or an uploaded image inverted with the run's settings) it samples the unedited trajectory
once per eta and keeps it; an update applies the sliders' directions together as one ``delta_h``
(sequential composition, paper Fig. 11) and runs only the edited sampling, from the first edited
step on (the steps before it are the unedited trajectory's).

Readings are given in the scorer's units and in standard deviations of its unedited scores (the
calibration's, as in the report); a categorical score (the annotator's ``categorical``) as its
class. A slider's range is one rule, :meth:`ExploreSession.slider_range`. An exported image carries
how it was made in its PNG metadata (:meth:`ExploreSession.export_png`).
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.engine.edits import Edit
from pipeline.engine.model import HSpaceModel
from pipeline.errors import DatasetError, InputError
from pipeline.formats.directions import (
    Directions,
    compose,
    label_direction,
    load_directions,
    save_directions,
    with_calibration,
)
from pipeline.formats.images import from_uint8, load_image, save_png, to_uint8
from pipeline.io import writing
from pipeline.methods.calibration import calibrated_scale

#: method of the files `export_directions` writes (and may overwrite)
EXPORT_METHOD = "explore/combination"
_CACHE = 8  # unedited trajectories kept (sources x eta values)


@dataclass(frozen=True)
class Slider:
    """One slider: direction ``index`` of ``<run_dir>/directions/<file>.safetensors`` at ``scale``."""

    file: str
    index: int
    scale: float


@dataclass
class Reading:
    """The scorer's reading of one attribute, unedited and edited; ``std``: the unit of ``change_sd``
    (None: unknown); ``classes``: a categorical score's class names (None: a number)."""

    unedited: float
    edited: float
    std: float | None = None
    classes: tuple[str, ...] | None = None

    @property
    def change(self) -> float:
        return self.edited - self.unedited

    @property
    def change_sd(self) -> float | None:
        return None if not self.std else self.change / self.std

    def label(self, value: float) -> str:
        """A categorical value as its class name ("class 3" without names), a number with 4 decimals."""
        if self.classes is None:
            return f"{value:.4f}"
        k = int(round(value))
        return self.classes[k] if 0 <= k < len(self.classes) else f"class {k}"


@dataclass
class View:
    """What an update shows: images (H, W, 3) uint8, the scorer's readings of both, and for an uploaded
    image the image itself as the model sees it and how far its inversion lands from it."""

    original: np.ndarray
    edited: np.ndarray
    scores: dict[str, Reading]              # attribute -> its reading
    seconds: float                          # time of this update
    edited_tensor: torch.Tensor             # (3, H, W) in [-1, 1]
    settings: dict                          # what made it: source, seed, sliders, window, asyrp, eta
    source_image: np.ndarray | None = None  # the uploaded image, resized as the model samples
    inversion_error: float | None = None    # mean |reconstruction - upload|, in [0, 1] pixel units


@dataclass
class _Base:
    x_T: torch.Tensor             # (1, 3, H, W)
    noise: torch.Tensor | None    # (1, T, 3, H, W) for an inverted image at eta > 0
    seeds: list[int] | None
    latents: torch.Tensor         # (1, T, 3, H, W): x_t entering every step
    image: torch.Tensor           # (1, 3, H, W)
    scores: dict[str, float]
    target: torch.Tensor | None = None  # (1, 3, H, W): the uploaded image the inversion should land on


def load_run_directions(run_dir, model: HSpaceModel) -> dict[str, Directions]:
    """Every ``<run_dir>/directions/*.safetensors`` by file stem, checked against the model, with the calibrated
    strengths the run measured for it (``hspace calibrate``)."""
    folder = Path(run_dir) / "directions"
    paths = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not paths:
        raise DatasetError(f"{folder} holds no directions files; run hspace pca / jacobian / supervised first "
                           f"(or `hspace run`), or point run_dir at a run that has them")
    files = {}
    for p in paths:
        files[p.stem] = with_calibration(load_directions(p, model), p, run_dir)
    return files


class ExploreSession:
    """Model + directions + scorer; ``render`` is one update of the app.

    model: the run's HSpaceModel; run_dir: holds ``directions/``; scorer: an annotator (images in
    [-1, 1] -> {attribute: (B,)}) or None; fixed_point_iterations: of the DDIM inversion of
    uploaded images (``supervised.real.fixed_point_iterations``).
    """

    def __init__(self, model: HSpaceModel, run_dir, scorer=None, fixed_point_iterations: int = 1):
        self.model, self.run_dir, self.scorer = model, Path(run_dir), scorer
        self.fixed_point_iterations = int(fixed_point_iterations)
        self.files = load_run_directions(self.run_dir, model)
        self.stds = score_stds(self.files, self.run_dir)
        self._images: dict[str, torch.Tensor] = {}
        self._bases: OrderedDict = OrderedDict()
        self._lock = threading.Lock()  # one U-Net user at a time (the hook holds state)

    @classmethod
    def from_config(cls, cfg) -> ExploreSession:
        from annotators.base import build_annotator
        from pipeline.config import to_dict

        model = HSpaceModel.from_config(cfg)
        scorer = build_annotator(cfg.evaluate.scorer, to_dict(cfg.evaluate.scorer_options), device=model.device)
        return cls(model, cfg.run_dir, scorer, cfg.supervised.real.fixed_point_iterations)

    # ------------------------------------------------------------------ directions
    def choices(self) -> list[tuple[str, tuple[str, int]]]:
        """(label shown, (file, index)) of every direction: "supervised / smile", "pca / pc3: hat"."""
        return [(f"{stem} / {d.display_name(i)}", (stem, i)) for stem, d in self.files.items() for i in range(len(d))]

    def direction(self, file: str, index: int) -> torch.Tensor:
        if file not in self.files:
            raise InputError(f"no directions file {file!r} in {self.run_dir / 'directions'}; files: {sorted(self.files)}")
        return self.files[file].get(int(index))

    def slider_range(self, file: str, index: int) -> float:
        """A slider's half-range, one rule for every slider however it was bound: twice the direction's
        calibrated strength (``params.calibration``, pipeline.methods.calibration), else the largest
        |scale| its file suggests (``params.scales``), else 3; rounded up to two significant digits.
        A value typed beyond it is applied all the same (the app widens the slider)."""
        d = self.files[file]
        calibrated = calibrated_scale(d.params, d.names[int(index)])
        if calibrated is not None and abs(calibrated) > 0:
            half = 2 * abs(calibrated)
        else:
            half = max((abs(float(s)) for s in d.params.get("scales") or []), default=0.0) or 3.0
        return round_up(half)

    def combination(self, sliders: Sequence[Slider], window: tuple[int, int] | None = None) -> torch.Tensor | None:
        """The sliders' directions composed into one delta_h (T, C, H, W), zero outside the step window
        ``(first, last)``; None when every scale is 0."""
        active = [s for s in sliders if float(s.scale) != 0.0]
        if not active:
            return None
        delta = compose([self.direction(s.file, s.index) for s in active], [s.scale for s in active])
        first, last = self._window(window)
        outside = torch.ones(self.model.num_steps, dtype=torch.bool)
        outside[first:last + 1] = False
        delta[outside] = 0.0
        return delta

    def _window(self, window) -> tuple[int, int]:
        first, last = (0, self.model.num_steps - 1) if window is None else (int(window[0]), int(window[1]))
        if not 0 <= first <= last < self.model.num_steps:
            raise InputError(f"step window {first}..{last}: edited steps run from a first to a last step in "
                             f"0..{self.model.num_steps - 1}, first <= last")
        return first, last

    def name_direction(self, file: str, index: int, label: str) -> str:
        """Save a user's label for a direction in its file (atomically); returns the name shown."""
        self.direction(file, index)
        with self._lock, writing(self.run_dir, "explore"):  # the run directory's one writer, while it saves
            path = self.run_dir / "directions" / f"{file}.safetensors"
            self.files[file] = with_calibration(label_direction(path, int(index), label), path, self.run_dir)
        return self.files[file].display_name(int(index))

    # ------------------------------------------------------------------ sources
    def add_image(self, file) -> str:
        """An uploaded image (path or file object) -> the source key used by ``render``; the image is
        kept resized as the model samples (its centred square, ``formats.images.load_image``)."""
        array, _ = load_image(file, self.model.image_shape[1:])
        key = "image:" + hashlib.sha1(array.tobytes()).hexdigest()[:12]
        self._images[key] = from_uint8(array[None])
        return key

    def _eta(self, eta) -> torch.Tensor:
        return self.model.coefficients(eta).sigma  # validates eta; only its schedule matters for the cache

    def _base(self, source, eta, seed: int) -> _Base:
        key = (source, None if eta is None else tuple(np.atleast_1d(np.asarray(eta, dtype=float)).tolist()),
               seed if isinstance(source, str) else None)
        if key in self._bases:
            self._bases.move_to_end(key)
            return self._bases[key]
        stochastic = bool((self._eta(eta) > 0).any())
        noise = seeds = None
        if isinstance(source, str):
            if source not in self._images:
                raise InputError(f"unknown image {source!r}: upload it again")
            image = self._images[source]
            if stochastic:  # edit-friendly DDPM inversion: x_T and the step noise that land on the image
                inv = self.model.invert_ddpm(image, [int(seed)], eta=eta)
                noise = inv.noise.cpu()
            else:
                inv = self.model.invert(image, self.fixed_point_iterations)
            x_T = inv.x_T.cpu()
        else:
            seeds = [int(source)]
            x_T = self.model.initial_noise(seeds)
        out = self.model.sample(seeds, x_T=x_T, noise=noise, eta=eta, return_latents=True)
        target = self._images[source] if isinstance(source, str) else None
        base = _Base(x_T, noise, seeds, out.latents.cpu(), out.images.cpu(), self._score(out.images), target)
        self._bases[key] = base
        while len(self._bases) > _CACHE:
            self._bases.popitem(last=False)
        return base

    def _score(self, images: torch.Tensor) -> dict[str, float]:
        if self.scorer is None:
            return {}
        return {k: float(v[0]) for k, v in self.scorer(images).items()}

    # ------------------------------------------------------------------ one update
    def render(self, source: int | str, sliders: Sequence[Slider] = (), *, asyrp: bool = False,
               window: tuple[int, int] | None = None, eta=None, seed: int = 0) -> View:
        """The unedited and edited image of ``source`` (a seed, or a key from ``add_image``).

        sliders: composed into one delta_h; asyrp: Asyrp's asymmetric edit; window: (first, last)
        step indices edited (default all); eta: the model's by default; seed: of an inverted image's
        noise at eta > 0."""
        t0 = time.perf_counter()
        first, _ = self._window(window)
        delta = self.combination(sliders, window)
        with self._lock:
            base = self._base(source, eta, seed)
            if delta is None:
                edited, scores = base.image, base.scores
            else:  # the steps before `first` are the unedited trajectory's: start from its latent there
                out = self.model.sample(base.seeds, Edit(delta=delta, asyrp=asyrp), x_T=base.latents[:, first],
                                        noise=base.noise, eta=eta, start_step=first)
                edited, scores = out.images.cpu(), self._score(out.images)
        categorical = getattr(self.scorer, "categorical", {}) or {}
        readings = {k: Reading(base.scores[k], scores[k], self.stds.get(k), tuple(categorical[k]) if k in categorical
                               else None) for k in base.scores}
        settings = {"source": source if isinstance(source, str) else int(source),
                    "seed": int(seed) if isinstance(source, str) else int(source),  # the noise's seed of an upload
                    "sliders": [{"file": s.file, "index": int(s.index), "name": self.files[s.file].display_name(int(s.index)),
                                 "scale": float(s.scale)} for s in sliders if float(s.scale) != 0.0],
                    "window": list(self._window(window)), "asyrp": bool(asyrp),
                    "eta": None if eta is None else np.atleast_1d(np.asarray(eta, dtype=float)).tolist()}
        view = View(to_uint8(base.image[0]), to_uint8(edited[0]), readings, time.perf_counter() - t0, edited[0], settings)
        if base.target is not None:
            view.source_image = to_uint8(base.target[0])
            view.inversion_error = float((base.image - base.target).abs().mean() / 2)
        return view

    # ------------------------------------------------------------------ export
    def export_png(self, view: View, size: int | None = None, folder=None) -> Path:
        """The edited image of ``view`` as ``<run_dir>/explore/edited-<time>-<what>.png`` (a new name each
        time; ``folder`` instead of ``<run_dir>/explore``), ``size`` pixels on its longer side (default: the
        model's), with how it was made in its PNG metadata: the text chunk ``hspace`` holds JSON of the
        model, its steps, the source (seed or uploaded image), the sliders, the step window, Asyrp and eta."""
        folder = Path(folder) if folder is not None else self.run_dir / "explore"
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"model": str(self.model.name_or_path), "steps": self.model.num_steps, **view.settings,
                "size": int(size or max(view.edited.shape[:2])), "run_dir": str(self.run_dir.resolve()),
                "created": dt.datetime.now().isoformat(timespec="seconds")}
        what = (f"seed{view.settings['seed']}" if not isinstance(view.settings["source"], str)
                else view.settings["source"].replace(":", "-"))
        what += "".join(f"_{re.sub(r'[^A-Za-z0-9.+-]+', '-', s['name'])}{s['scale']:+g}" for s in view.settings["sliders"])
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        for k in range(1000):
            path = folder / f"edited-{stamp}-{what[:80]}{'' if k == 0 else f'-{k}'}.png"
            if not path.exists():
                break
        return save_png(view.edited, path, size=size, text={"hspace": json.dumps(meta)})

    def export_directions(self, name: str, sliders: Sequence[Slider], window=None, asyrp: bool = False) -> Path:
        """The sliders' combination as ``<run_dir>/directions/<name>.safetensors``: one direction, usable as
        delta_h (zero outside the window). Refuses to overwrite a file another stage wrote."""
        name = str(name).strip()
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise InputError(f"export name {name!r}: use letters, digits, '_', '.', '-'")
        delta = self.combination(sliders, window)
        if delta is None:
            raise InputError("nothing to export: every slider is at 0")
        path = self.run_dir / "directions" / f"{name}.safetensors"
        if path.exists() and load_directions(path).method != EXPORT_METHOD:
            raise InputError(f"{path} exists and was not written by explore; choose another name")
        first, last = self._window(window)
        components = [{"file": s.file, "index": int(s.index), "name": self.files[s.file].display_name(int(s.index)),
                       "scale": float(s.scale)} for s in sliders if float(s.scale) != 0.0]
        d = Directions(delta[None], [name], EXPORT_METHOD, self.model.timesteps.tolist(), model=self.model.name_or_path,
                       source_run=str(self.run_dir.resolve()),
                       params={"components": components, "steps": [first, last], "asyrp": bool(asyrp),
                               "scales": [-1.0, -0.5, 0.0, 0.5, 1.0]})
        with writing(self.run_dir, "explore"):  # the run directory's one writer, while it saves
            save_directions(d, path)
        with self._lock:
            self.files[name] = load_directions(path)
        return path


def round_up(x: float, digits: int = 2) -> float:
    """``x`` > 0 rounded up to ``digits`` significant digits: 1.7321 -> 1.8, 612.3 -> 620."""
    if x <= 0:
        return x
    k = 10 ** (math.floor(math.log10(x)) - digits + 1)
    return float(round(math.ceil(round(x / k, 9)) * k, 12))


def score_stds(files: dict[str, Directions], run_dir) -> dict[str, float]:
    """Per scorer attribute, the standard deviation of its unedited scores, the unit of the readings'
    change: the calibration's (``params.calibration.std``, on the calibration seeds) of any directions
    file, else that of the evaluation's unedited scores (``evaluation/per_sample.parquet``), else none."""
    for d in files.values():
        std = (d.params.get("calibration") or {}).get("std")
        if std:
            return {k: float(v) for k, v in std.items() if v}
    path = Path(run_dir) / "evaluation" / "per_sample.parquet"
    if path.exists():
        import pandas as pd

        table = pd.read_parquet(path).drop_duplicates(["repeat", "seed"])
        return {c[2:]: float(table[c].std(ddof=1)) for c in table.columns if c.startswith("o_") and table[c].std(ddof=1) > 0}
    return {}
