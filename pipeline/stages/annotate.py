"""`hspace annotate`: score every generated sample with the configured annotators.

``Trainer.predict`` over batches of the samples dataset (multi-process like generation);
each rank writes one small Parquet part per batch (atomically) to
``<run_dir>/annotations/parts/``; rank 0 then merges them into
``<run_dir>/annotations.parquet``: ``sample_id`` plus one float column per score, sorted by
sample_id. A re-run skips batches whose part exists. The annotations record which samples
dataset and which annotators made them; a run against a different samples dataset or other
annotators is refused instead of mixing scores.

Column names are the annotators' attribute names; when two annotators share a name
(face_pose and hopenet both give yaw), both get their annotator's name as a prefix
(``face_pose.yaw``, ``hopenet.yaw``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from annotators.base import build_annotator, check_columns, column_names

from ..config import config_hash, to_dict
from ..errors import DatasetError
from ..images import from_uint8
from ..io import atomic_path
from ..samples import decode_images, read_manifest, shard_paths, write_json_atomic, open_shard
from .lightning_utils import (AfterAllRanks, ItemModule, ItemsProgress, PartWriter, RankShare, make_trainer,
                              share_cpu_threads)


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
    done = set()
    for p in parts_dir(run_dir).glob("part-*.parquet"):
        try:
            done |= set(pq.read_table(p, columns=["sample_id"]).column("sample_id").to_pylist())
        except (pa.ArrowInvalid, OSError):
            p.unlink()  # a part that cannot be read is redone
    return done


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
            for attr, v in ann(images).items():
                out[self.columns[(name, attr)]] = v.numpy().astype(np.float32)
        return out


class AnnotateData(RankShare):
    def __init__(self, run_dir, batch_size: int):
        super().__init__()
        self.run_dir, self.batch_size = run_dir, batch_size

    def plan(self) -> list:
        return plan_items(self.run_dir, self.batch_size, scan_parts(self.run_dir))


def merge_parts(run_dir, identity: dict) -> pd.DataFrame:
    parts = sorted(parts_dir(run_dir).glob("part-*.parquet"))
    df = pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True).sort_values("sample_id")
    if df["sample_id"].duplicated().any():
        raise DatasetError(f"duplicate sample ids in {parts_dir(run_dir)}; delete that folder and re-run hspace annotate")
    want = read_manifest(run_dir)["num_samples"]
    table = pa.Table.from_pandas(df.reset_index(drop=True), preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                           b"hspace": json.dumps(identity).encode()})
    with atomic_path(annotations_path(run_dir)) as tmp:
        pq.write_table(table, tmp)
    if len(df) != want:
        raise DatasetError(f"annotations cover {len(df)} of {want} samples; re-run hspace annotate to finish")
    return df


def annotation_identity(run_dir, ann_cfg) -> dict:
    manifest = read_manifest(run_dir)
    return {"samples_identity_hash": manifest["identity_hash"],
            "annotators": list(ann_cfg.annotators),
            "options": to_dict(ann_cfg.options)}


def check_existing(run_dir, identity: dict) -> None:
    """Refuse annotations (parts or merged table) made for other samples or by other annotators."""
    meta_path = Path(run_dir) / "annotations" / "identity.json"
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        if config_hash(old) != config_hash(identity):
            what = "samples dataset" if old.get("samples_identity_hash") != identity["samples_identity_hash"] \
                else "annotators or their options"
            raise DatasetError(f"{Path(run_dir) / 'annotations'} was made for a different {what} "
                               f"({old.get('annotators')} vs {identity['annotators']}); delete "
                               f"{annotations_path(run_dir)} and {Path(run_dir) / 'annotations'} to re-annotate")


def load_annotations(run_dir) -> pd.DataFrame:
    """The annotations table, checked to belong to the samples dataset in ``run_dir``."""
    path = annotations_path(run_dir)
    if not path.exists():
        raise DatasetError(f"{path} does not exist; run `hspace annotate run_dir={run_dir}` first")
    meta = pq.read_schema(path).metadata or {}
    ident = json.loads(meta.get(b"hspace", b"{}"))
    if ident.get("samples_identity_hash") != read_manifest(run_dir)["identity_hash"]:
        raise DatasetError(f"{path} belongs to a different samples dataset; re-run hspace annotate")
    return pd.read_parquet(path)


def run_annotate(cfg) -> pd.DataFrame:
    run_dir = str(cfg.run_dir)
    identity = annotation_identity(run_dir, cfg.annotate)
    check_existing(run_dir, identity)
    check_columns(cfg, "annotate")
    annotators = build_annotators(cfg.annotate)  # fails fast on bad names or missing weights
    write_json_atomic(Path(run_dir) / "annotations" / "identity.json", identity)
    done = scan_parts(run_dir)
    todo = sum(len(i["ids"]) for i in plan_items(run_dir, cfg.annotate.batch_size, done))
    if todo == 0 and annotations_path(run_dir).exists():
        print(f"hspace annotate: {annotations_path(run_dir)} is complete")
        return load_annotations(run_dir)
    if todo == 0:  # every part exists: only the merge is left (a run killed just before it)
        merge_parts(run_dir, identity)
    else:
        progress = ItemsProgress("annotate", todo, count=lambda item: len(item["ids"]))
        writer = PartWriter(parts_dir(run_dir), lambda p: part_name(p["sample_id"]),
                            lambda p, path: pq.write_table(pa.table(p), path))
        merge = AfterAllRanks(lambda: merge_parts(run_dir, identity), "annotate")
        trainer = make_trainer(cfg.trainer, [writer, progress, merge])
        trainer.predict(AnnotateModule(annotators), datamodule=AnnotateData(run_dir, cfg.annotate.batch_size),
                        return_predictions=False)
        if not trainer.is_global_zero:
            return None
    df = load_annotations(run_dir)
    print(f"hspace annotate: {len(df)} samples x {len(df.columns) - 1} scores -> {annotations_path(run_dir)}")
    return df
