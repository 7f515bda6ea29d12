"""`hspace calibrate`: the calibrated strength of every supervised and disentangled direction.

A direction's calibrated strength is the scale at which it moves its own attribute by
``calibrate.target`` standard deviations of the unedited scores on the calibration seeds
(:mod:`pipeline.methods.calibration`). This stage measures it for ``directions/supervised.safetensors``
and ``directions/disentangled.safetensors`` and writes ``<run_dir>/calibration/strengths.json``:
per file, its content hash and the calibration record (scales, effects, rounds). The directions files
stay as they are; a reader that wants the strengths takes them with
:func:`pipeline.formats.directions.with_calibration` (edit, sample, explore, the figures stage, the
calibrated evaluation), which finds them by the file's content, so they never apply to another file.
It is a further analysis: ``hspace run`` runs it after the paper's pipeline and its first report.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.config import to_dict
from pipeline.engine.model import HSpaceModel
from pipeline.errors import ConfigError
from pipeline.formats.directions import CALIBRATION, Directions, calibration_entry, load_directions
from pipeline.formats.identity import seal_folder, verify
from pipeline.io import atomic_path, write_json_atomic
from pipeline.methods.calibration import calibrate, unedited_scores
from pipeline.registry import COMMANDS, DISENTANGLED, SUPERVISED, calibration_key


class Calibrator:
    """Calibrates directions with the run's model and scorer (built once, on first use): the scale at
    which each moves its own attribute by ``calibrate.target`` standard deviations
    (:mod:`pipeline.methods.calibration`); the unedited scores of the calibration seeds are sampled once
    for every file."""

    def __init__(self, cfg):
        self.cfg, self.model, self.scorer, self.unedited = cfg, None, None, None
        self.key = calibration_key(cfg)

    def current(self, record: dict | None) -> bool:
        """Whether a calibration ``record`` was measured with these settings; if so its unedited
        scores of the calibration seeds are used again (not sampled a second time)."""
        if not record or record.get("key") != self.key:
            return False
        if "unedited" in record and self.unedited is None:
            self.unedited = {a: np.asarray(v, dtype=np.float64) for a, v in record["unedited"].items()}
        return True

    def __call__(self, d: Directions) -> dict:
        from annotators.base import build_annotator

        c, ev = self.cfg.calibrate, self.cfg.evaluate
        if self.model is None:
            self.model = HSpaceModel.from_config(self.cfg)
            self.scorer = build_annotator(ev.scorer, ev.scorer_options, self.model.device)
        std_seeds = list(range(c.first_seed, c.first_seed + c.std_samples))
        if self.unedited is None:
            self.unedited = unedited_scores(self.model, self.scorer, std_seeds, c.batch_size, self.model.device)
        try:
            record = calibrate(self.model, self.scorer, d.names, list(d.directions), std_seeds[:c.num_samples], std_seeds,
                               ev.scale, c.target, c.rtol, c.max_iter, to_dict(ev.own_attribute), c.batch_size,
                               self.model.device, self.unedited)
        except KeyError as e:
            raise ConfigError(f"calibrate: {e.args[0]}") from None
        record["key"] = self.key
        record["unedited"] = {a: v.tolist() for a, v in self.unedited.items()}  # float64: exact through JSON
        print(f"  calibrated {d.method} directions ({record['rounds']} rounds, {c.num_samples} seeds): " + ", ".join(
            f"{n} x{s:.2f}" if s is not None else f"{n} (none)" for n, s in record["scales"].items()))
        return record


def run_calibrate(cfg) -> Path:
    """Every strength is measured before anything is written; the folder is replaced whole."""
    run_dir = Path(cfg.run_dir)
    stage = COMMANDS["calibrate"]
    names = stage.read_names(cfg)
    for name in names:
        verify(run_dir, name)
    record = stage.identity(cfg)
    calibrator = Calibrator(cfg) if cfg.calibrate.enabled else None
    files = {}
    for name in (SUPERVISED, DISENTANGLED):
        if name in names and calibrator is not None:
            d = load_directions(run_dir / name)
            files[Path(name).stem] = {**calibration_entry(run_dir / name), "record": calibrator(d)}
    out = run_dir / Path(CALIBRATION).parent
    with atomic_path(out) as tmp:
        tmp.mkdir()
        write_json_atomic(tmp / Path(CALIBRATION).name, {"files": files})
        seal_folder(tmp, record)
    how = "calibrate.enabled is false: none measured" if calibrator is None else f"{len(files)} directions files"
    print(f"hspace calibrate: calibrated strengths ({how}) -> {run_dir / CALIBRATION}")
    return run_dir / CALIBRATION
