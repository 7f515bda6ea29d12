"""`hspace annotate`: score every generated sample with the configured annotators.

``Trainer.predict`` over batches of the samples dataset (multi-process like generation);
each rank writes one small Parquet part per batch (atomically) to
``<run_dir>/annotations/parts/``; rank 0 then merges them into
``<run_dir>/annotations.parquet``: ``sample_id`` plus one float column per score, sorted by
sample_id. A re-run skips batches whose part exists. Parts and table carry identity records
(:mod:`pipeline.formats.identity`): a run against samples with another content identity or with other
annotators is refused instead of mixing scores; when the dataset holds other sample ids (made
again with other seeds, or extended), the parts of samples no longer in it are removed, the
missing ones annotated, and the table describes exactly the samples on disk.

Column names are the annotators' attribute names; when two annotators share a name
(face_pose and hopenet both give yaw), both get their annotator's name as a prefix
(``face_pose.yaw``, ``hopenet.yaw``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from annotators.base import build_annotator, check_columns, column_names
from pipeline.errors import DatasetError
from pipeline.formats.identity import is_fresh, parquet_metadata, parquet_table, read_record, verify
from pipeline.formats.images import from_uint8
from pipeline.formats.samples import dataset_ids, decode_images, open_shard, shard_paths
from pipeline.io import atomic_path
from pipeline.registry import COMMANDS
from pipeline.stages.lightning_utils import (
    ItemModule,
    ItemsProgress,
    RankShare,
    predict_parts,
    rank0_first,
    share_cpu_threads,
)


def annotations_path(run_dir) -> Path:
    return Path(run_dir) / "annotations.parquet"


def parts_dir(run_dir) -> Path:
    return Path(run_dir) / "annotations" / "parts"


def build_annotators(ann_cfg, device="cpu") -> dict:
    return {name: build_annotator(name, ann_cfg.options.get(name), device) for name in ann_cfg.annotators}


def plan_items(run_dir, batch_size: int, done: set[int]) -> list[dict]:
    """Batches of rows, each within one shard: {"shard", "start", "stop", "ids"}; done ids skipped."""
    items = []
    for path in shard_paths(run_dir):
        ids = open_shard(path).column("sample_id").to_numpy()
        for start in range(0, len(ids), batch_size):
            chunk = ids[start:start + batch_size]
            if not set(chunk.tolist()) <= done:
                items.append({"shard": str(path), "start": start, "stop": start + len(chunk), "ids": chunk.tolist()})
    return items


def part_name(ids) -> str:
    return f"part-{min(ids):010d}-{max(ids):010d}-n{len(ids)}.parquet"


def scan_parts(run_dir) -> set[int]:
    """The sample ids the parts on disk cover (a part that cannot be read is removed and redone)."""
    done = set()
    for p in parts_dir(run_dir).glob("part-*.parquet"):
        try:
            done |= set(pq.read_table(p, columns=["sample_id"]).column("sample_id").to_pylist())
        except (pa.ArrowInvalid, OSError):
            p.unlink()
    return done


def _refusal(path: Path, stored: dict, now: dict, run_dir) -> DatasetError:
    if stored.get("artefacts", {}).get("samples") != now["artefacts"]["samples"]:
        what = "samples dataset"
        was, now_ = (f"id {str(x.get('artefacts', {}).get('samples'))[:12]}" for x in (stored, now))
    else:
        what = "annotators or their options"
        was, now_ = (x.get("config", {}).get("annotate", {}).get("annotators") for x in (stored, now))
    return DatasetError(f"{path} was made for a different {what} ({was} vs {now_}); delete {annotations_path(run_dir)} "
                        f"and {Path(run_dir) / 'annotations'} to re-annotate")


def clean_existing(cfg, inputs: dict, dataset_ids: set[int]) -> None:
    """Refuse annotations made for other samples or by other annotators (parts or the merged
    table); remove the parts of samples that are no longer in the dataset (their scores stay
    right for their seeds, but no longer belong to this run)."""
    run_dir = cfg.run_dir
    merged = read_record(annotations_path(run_dir)) if annotations_path(run_dir).exists() else None
    if merged is not None and merged.get("part_inputs", inputs) != inputs:
        raise _refusal(annotations_path(run_dir), merged["part_inputs"], inputs, run_dir)
    stale = []
    for p in sorted(parts_dir(run_dir).glob("part-*.parquet")):
        stored = read_record(p)
        if stored is None:  # unreadable or from an older version: redone
            p.unlink()
            continue
        if stored["inputs"] != inputs:
            raise _refusal(p, stored["inputs"], inputs, run_dir)
        if not set(stored["sample_ids"]) <= dataset_ids:
            stale.append(p)
    for p in stale:
        p.unlink()
    if stale:
        print(f"hspace annotate: removed {len(stale)} annotation part(s) of samples that are no longer in the dataset")


class AnnotateModule(ItemModule):
    """predict_item: a batch of rows of one shard -> {sample_id, one array per score}."""

    def __init__(self, annotators: dict):
        super().__init__()
        self.annotators = annotators
        self.columns = column_names(annotators)

    def setup(self, stage: str) -> None:
        share_cpu_threads(self.trainer)
        for ann in self.annotators.values():
            ann.to(self.trainer.strategy.root_device)

    def predict_item(self, item: dict):
        table = open_shard(Path(item["shard"])).slice(item["start"], item["stop"] - item["start"])
        images = from_uint8(decode_images(table.column("image")))
        out = {"sample_id": np.asarray(item["ids"], dtype=np.int64)}
        for name, ann in self.annotators.items():
            for attr, v in ann(images, sample_ids=item["ids"]).items():
                out[self.columns[(name, attr)]] = v.numpy().astype(np.float32)
        return out


class AnnotateData(RankShare):
    def __init__(self, run_dir, batch_size: int):
        super().__init__()
        self.run_dir, self.batch_size = run_dir, batch_size

    def plan(self) -> list:
        return plan_items(self.run_dir, self.batch_size, scan_parts(self.run_dir))


def merge_parts(run_dir, record: dict, inputs: dict) -> pd.DataFrame:
    """Rank 0: the parts -> annotations.parquet (sorted by sample_id), with its identity record."""
    parts = sorted(parts_dir(run_dir).glob("part-*.parquet"))
    df = pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True).sort_values("sample_id")
    if df["sample_id"].duplicated().any():
        raise DatasetError(f"duplicate sample ids in {parts_dir(run_dir)}; delete that folder and re-run hspace annotate")
    missing = set(dataset_ids(run_dir).tolist()) - set(df.sample_id.tolist())
    if missing:
        raise DatasetError(f"annotations cover {len(df) - len(missing)} of the {len(df)} samples (e.g. not "
                           f"{min(missing)}); re-run hspace annotate to finish")
    table = pa.Table.from_pandas(df.reset_index(drop=True), preserve_index=False)
    with atomic_path(annotations_path(run_dir)) as tmp:
        pq.write_table(parquet_table(table, {**record, "part_inputs": inputs}), tmp)
    return df


def write_part(prediction: dict, path: Path, inputs: dict) -> None:
    table = pa.table(prediction)
    meta = parquet_metadata({"inputs": inputs, "sample_ids": prediction["sample_id"].tolist()})
    pq.write_table(table.replace_schema_metadata({**(table.schema.metadata or {}), **meta}), path)


def load_annotations(run_dir) -> pd.DataFrame:
    """The annotations table, checked to describe exactly the samples dataset in ``run_dir``."""
    path = annotations_path(run_dir)
    if not path.exists():
        raise DatasetError(f"{path} does not exist; run `hspace annotate run_dir={run_dir}` first")
    verify(run_dir, path.name)
    return pd.read_parquet(path)


def run_annotate(cfg) -> pd.DataFrame:
    run_dir = str(cfg.run_dir)
    check_columns(cfg, "annotate")  # before anything is removed
    shard_paths(run_dir)  # the samples dataset must be complete and intact
    stage = COMMANDS["annotate"]
    inputs, record = stage.part_inputs(cfg), stage.identity(cfg)
    annotators = build_annotators(cfg.annotate)  # fails fast on bad names or missing weights
    ids = set(dataset_ids(run_dir).tolist())
    rank0_first(lambda: clean_existing(cfg, inputs, ids))  # the other ranks plan after rank 0's clean-up
    if is_fresh(run_dir, annotations_path(run_dir).name, record):
        print(f"hspace annotate: {annotations_path(run_dir)} is complete")
        return load_annotations(run_dir)
    todo = sum(len(i["ids"]) for i in plan_items(run_dir, cfg.annotate.batch_size, scan_parts(run_dir)))
    if todo == 0:  # every part exists: only the merge is left (a run killed just before it, or other samples)
        merge_parts(run_dir, record, inputs)
    else:
        trainer = predict_parts(
            cfg.trainer, AnnotateModule(annotators), AnnotateData(run_dir, cfg.annotate.batch_size), tag="annotate",
            merge=lambda: merge_parts(run_dir, record, inputs), parts=parts_dir(run_dir),
            name=lambda p: part_name(p["sample_id"]), write=lambda p, path: write_part(p, path, inputs),
            progress=ItemsProgress("annotate", todo, count=lambda item: len(item["ids"])))
        if not trainer.is_global_zero:
            return None
    df = load_annotations(run_dir)
    print(f"hspace annotate: {len(df)} samples x {len(df.columns) - 1} scores -> {annotations_path(run_dir)}")
    return df
