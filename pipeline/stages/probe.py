"""`hspace probe`: where semantics live, as per-timestep linear probes.

For every attribute and every sampling step, how well a linear model reads the attribute from h_t
(the stored trajectories) and, for comparison, from x_t (the latent entering that step: stored
by ``generate`` with ``generate.record_x_t``, the default, else recomputed by sampling the same
seeds again, a second ``generate``'s worth of U-Net work). Held-out
accuracy for binary attributes, R^2 for continuous ones, on a fixed train/test split by sample id
(:mod:`pipeline.methods.probes`). Writes ``<run_dir>/probes/``: ``probes.csv`` (attribute, space, step,
metric, score, chance, encoded), ``probes.png`` (the curves over the steps) and its identity
record. ``encoded`` marks the steps where the h probe says the attribute is encoded
(``probe.encoded_fraction``); ``supervised.restrict_steps`` restricts the supervised directions
to them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.engine.model import HSpaceModel
from pipeline.errors import ConfigError, DatasetError
from pipeline.formats.identity import seal_folder, verify
from pipeline.formats.samples import h_layout, has_x_t, iter_samples, read_manifest
from pipeline.io import atomic_path
from pipeline.methods.probes import encoded_steps_of, is_binary, probe_table, split_by_id
from pipeline.registry import COMMANDS
from pipeline.stages.annotate import load_annotations

PROBES = "probes"


def probe_attributes(cfg, annotations: pd.DataFrame) -> list[str]:
    """probe.attributes, else select.attributes, else every annotation column."""
    columns = [c for c in annotations.columns if c != "sample_id"]
    attrs = list(cfg.probe.attributes) or list(cfg.select.attributes) or columns
    unknown = sorted(set(attrs) - set(columns))
    if unknown:
        raise ConfigError(f"probe.attributes {unknown} are not annotation columns ({columns})")
    return attrs


def gather_features(cfg, ids, resample: bool = False) -> dict[str, np.ndarray]:
    """{"h": (N, T', D) float16 (the recorded steps), "x_t": (N, T, D') float32} for the samples ``ids`` (in that order);
    x_t as the samples dataset stores it (``generate.record_x_t``), else (or with ``resample``) from
    sampling their seeds again with the run's model."""
    spaces = list(dict.fromkeys(cfg.probe.spaces))
    stored = "x_t" in spaces and not resample and has_x_t(cfg.run_dir)
    order = {int(i): k for k, i in enumerate(ids)}
    out = {}
    seeds = np.empty(len(ids), dtype=np.int64)
    prompts: list = [None] * len(ids)
    h = x_t = None
    for b in iter_samples(cfg.run_dir, batch_size=256, ids=ids, h="h" in spaces, x_t=stored):
        rows = [order[int(i)] for i in b["sample_id"]]
        seeds[rows] = b["seed"]
        for r, p in zip(rows, b.get("prompt", [None] * len(rows))):
            prompts[r] = p
        if "h" in spaces:
            if h is None:
                h = np.empty((len(ids), b["h"].shape[1], int(np.prod(b["h"].shape[2:]))), dtype=np.float16)
            h[rows] = b["h"].reshape(len(rows), b["h"].shape[1], -1).numpy()
        if stored:
            if x_t is None:
                x_t = np.empty((len(ids), b["x_t"].shape[1], int(np.prod(b["x_t"].shape[2:]))), dtype=np.float32)
            x_t[rows] = b["x_t"].reshape(len(rows), b["x_t"].shape[1], -1).numpy()
    if "h" in spaces:
        out["h"] = h
    if stored:
        out["x_t"] = x_t
    elif "x_t" in spaces:
        model = HSpaceModel.from_config(cfg)
        bs, xs = cfg.probe.batch_size, []
        for start in range(0, len(ids), bs):
            kwargs = {}
            if prompts[0] is not None:
                kwargs["prompt"] = prompts[start:start + bs]
            res = model.sample(seeds[start:start + bs].tolist(), return_latents=True, **kwargs)
            xs.append(res.latents.flatten(2).float().cpu().numpy())
        out["x_t"] = np.concatenate(xs)
    return out


def run_probes(cfg) -> pd.DataFrame:
    """The probe table of the run (with an ``encoded`` column from the h probes)."""
    pc = cfg.probe
    annotations = load_annotations(cfg.run_dir).sort_values("sample_id")
    if pc.num_samples is not None:
        annotations = annotations.head(pc.num_samples)
    attrs = probe_attributes(cfg, annotations)
    ids = annotations.sample_id.astype(int).tolist()
    test = split_by_id(ids, pc.test_fraction, pc.seed)
    binary = [a for a in attrs if (is_binary(annotations[a]) if pc.binary == "auto" else a in pc.binary)]
    features = gather_features(cfg, ids)
    table = probe_table(features, {a: annotations[a].to_numpy() for a in attrs}, test, binary, pc.threshold,
                        pc.pca_components or None, n_jobs=pc.n_jobs)
    h_steps = np.asarray(h_layout(read_manifest(cfg.run_dir)).steps)
    table.loc[table.space == "h", "step"] = h_steps[table.loc[table.space == "h", "step"].to_numpy(int)]
    table["encoded"] = False
    if "h" in features:
        for attr in attrs:
            mask = encoded_steps_of(table, attr, "h", pc.encoded_fraction)
            rows = table[(table.attribute == attr) & (table.space == "h")].sort_values("step").index
            table.loc[rows, "encoded"] = mask
    return table


def load_probes(run_dir) -> pd.DataFrame:
    """The run's probe table, checked to come from its samples and annotations now."""
    path = Path(run_dir) / PROBES / "probes.csv"
    if not path.exists():
        raise DatasetError(f"{path} does not exist; run `hspace probe run_dir={run_dir}` first")
    verify(run_dir, PROBES)
    return pd.read_csv(path)


def encoded_mask(probes: pd.DataFrame, attribute: str, steps: int) -> np.ndarray:
    """(T,) bool: the steps the probe stage marked as encoding ``attribute`` (from the h probes)."""
    rows = probes[(probes.attribute == attribute) & (probes.space == "h")].sort_values("step")
    if rows.empty or int(rows.step.max()) >= steps:
        raise DatasetError(f"the probes hold {len(rows)} h steps of {attribute!r} (up to step "
                           f"{rows.step.max() if len(rows) else '-'}), the directions {steps}; add it to "
                           f"probe.attributes and run hspace probe again")
    mask = np.zeros(steps, bool)  # steps h was not recorded at (generate.h_steps) have no probe: not encoded
    mask[rows.step.to_numpy(int)] = rows.encoded.to_numpy(bool)
    return mask


def plot_probes(table: pd.DataFrame, timesteps, out: Path) -> Path:
    """Each attribute's held-out probe score against the step, from h_t and from x_t; encoded steps circled."""
    from pipeline.formats.figures import curves_by_attribute

    return curves_by_attribute(table, "score", out, x="step", ylabel="held-out score", spaces=(("h", "h"), ("x_t", "x_t")),
                               timesteps=timesteps, baseline="chance", highlight="encoded",
                               title=lambda attr, rows: f"{attr} ({rows.metric.iloc[0]})", sharey=False)


def run_probe(cfg) -> Path:
    run_dir = Path(cfg.run_dir)
    record = COMMANDS["probe"].identity(cfg)
    table = run_probes(cfg)
    timesteps = read_manifest(run_dir)["model"]["timesteps"]
    out = run_dir / PROBES
    with atomic_path(out) as tmp:
        tmp.mkdir()
        table.to_csv(tmp / "probes.csv", index=False)
        plot_probes(table, timesteps, tmp / "probes.png")
        seal_folder(tmp, record)
    for (attr, space), c in table.groupby(["attribute", "space"], sort=False):
        best = c.loc[c.score.idxmax()] if c.score.notna().any() else None
        line = "no score" if best is None else f"best {best.metric} {best.score:.3f} at step {int(best.step)}"
        if space == "h":
            line += f", encoded at steps {c[c.encoded.astype(bool)].step.tolist()}"
        print(f"  {attr} from {space}: {line}")
    print(f"hspace probe: {table.attribute.nunique()} attributes x {table.space.nunique()} spaces x "
          f"{table.step.nunique()} steps -> {out}")
    return out

