"""One identity scheme for everything in a run directory: what each artefact was made from.

Every artefact a stage writes carries a *record*::

    {"stage": "annotate", "key": <hash of inputs>, "id": <hash of what it holds>, "inputs": {
        "config": {<the configuration sections it read>},
        "assets": {<content hashes of files the config names: model weights, annotator weights>},
        "artefacts": {<run-directory artefacts it read, by name>: <their "id">}}}

``key`` decides freshness: a stage (and ``hspace run``) redoes an artefact whose stored key is not
the key it would write now. ``id`` is what readers downstream record; it equals ``key`` except
for the samples dataset, whose id is the hash of its content identity and of exactly which
sample ids it holds (so a re-generated dataset with other seeds is another dataset, and one
generated again with the same seeds is the same). :func:`verify` checks an artefact against
the current ids of what it was made from, transitively, before a stage reads it.

Where the record is stored (one place per artefact, written with the artefact, atomically):

============================  =======================================================
``samples``                   ``samples/manifest.json`` (``record``); each shard's Arrow
                              schema metadata holds the content identity it was made with
``*.parquet``                 the Parquet schema metadata (``hspace_identity``)
``*.safetensors``             the safetensors metadata (``hspace_identity``)
a folder (``evaluation``...)  ``<folder>/identity.json``, written last
============================  =======================================================
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

from pipeline.errors import DatasetError
from pipeline.io import hash_json

META_KEY = "hspace_identity"
FOLDER_RECORD = "identity.json"

#: what an artefact is called in messages
DESCRIPTIONS = {"samples": "samples dataset", "annotations.parquet": "annotations", "selection.parquet": "selection"}


def describe(name: str) -> str:
    return DESCRIPTIONS.get(name, name)


#: the configuration a model's outputs depend on besides its weights: the model section and the precision it
#: computes in (``HSpaceModel.from_config`` applies it, under a Trainer or not)
MODEL_SECTIONS = ("model", "trainer.precision")


def config_sections(cfg, *names: str, drop: tuple[str, ...] = ()) -> dict:
    """{dotted name: plain value} of the configuration sections an artefact depends on; ``drop``:
    dotted keys inside them that do not change it (batch sizes). ``cfg``: the configuration model
    (anything with ``model_dump``) or a plain mapping."""
    tree = cfg.model_dump() if hasattr(cfg, "model_dump") else dict(cfg)
    out = {}
    for name in names:
        node = tree
        for part in name.split("."):
            node = node[part]
        out[name] = copy.deepcopy(node)
    for key in drop:
        section, _, leaf = key.rpartition(".")
        if isinstance(out.get(section), dict):
            out[section].pop(leaf, None)
    return out


def make_record(stage: str, config: dict | None = None, assets: dict | None = None,
                artefacts: dict | None = None, content=None) -> dict:
    """The record an artefact made from these inputs carries; ``content``: what it holds, when that
    (not its inputs) is what identifies it for readers (the samples dataset)."""
    inputs = {"config": config or {}, "assets": assets or {}, "artefacts": artefacts or {}}
    key = hash_json(inputs)
    return {"stage": stage, "key": key, "id": key if content is None else hash_json(content), "inputs": inputs}


# ---------------------------------------------------------------------- storage
def parquet_metadata(record: dict) -> dict[bytes, bytes]:
    return {META_KEY.encode(): json.dumps(record).encode()}


def safetensors_metadata(record: dict) -> dict[str, str]:
    return {META_KEY: json.dumps(record)}


def read_record(path: str | os.PathLike) -> dict | None:
    """The record stored with the artefact at ``path`` (None if it has none or cannot be read)."""
    path = Path(path)
    try:
        if path.is_dir():
            if (path / "manifest.json").exists():  # the samples dataset
                return json.loads((path / "manifest.json").read_text()).get("record")
            return json.loads((path / FOLDER_RECORD).read_text())
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            meta = pq.read_schema(path).metadata or {}
            raw = meta.get(META_KEY.encode())
        elif path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                raw = (f.metadata() or {}).get(META_KEY)
        elif path.suffix == ".arrow":
            import pyarrow as pa

            with pa.memory_map(str(path), "r") as source:
                raw = (pa.ipc.open_stream(source).schema.metadata or {}).get(META_KEY.encode())
        else:
            return None
        return json.loads(raw) if raw else None
    except (OSError, ValueError, KeyError, RuntimeError):
        return None
    except Exception as e:  # pyarrow / safetensors raise their own types for damaged files
        if type(e).__module__.split(".")[0] in ("pyarrow", "safetensors", "builtins"):
            return None
        raise


def current_id(run_dir, name: str) -> str | None:
    record = read_record(Path(run_dir) / name)
    return None if record is None else record["id"]


def artefact_ids(run_dir, names, known: dict | None = None) -> dict[str, str]:
    """name -> current id, for artefacts a stage is about to read (a missing one is an error).
    ``known``: ids to use instead of reading the run directory (predicting a whole run's records)."""
    out = {}
    for name in names:
        if known is not None and name in known:
            out[name] = known[name]
            continue
        record = read_record(Path(run_dir) / name)
        if record is None:
            raise DatasetError(f"{Path(run_dir) / name} is missing or has no identity record; run the stage that "
                               f"writes it first (or again: files from an older version carry none)")
        out[name] = record["id"]
    return out


def verify(run_dir, name: str, record: dict | None = None) -> dict:
    """The record of artefact ``name``, after checking that everything it was made from is, in
    ``run_dir`` now, what it was then (transitively). Raises a DatasetError naming the first
    input that changed and the stage to re-run."""
    path = Path(run_dir) / name
    record = record if record is not None else read_record(path)
    if record is None:
        raise DatasetError(f"{path} is missing or has no identity record; re-run the stage that writes it")
    if "inputs" not in record:
        raise DatasetError(f"{path} has no identity record (made by an older version); re-run the stage that writes it")
    for upstream, wanted in record["inputs"].get("artefacts", {}).items():
        now = read_record(Path(run_dir) / upstream)
        if now is None or now["id"] != wanted:
            state = "which is missing now" if now is None else f"not the {describe(upstream)} in {run_dir} now"
            raise DatasetError(f"{path} was made from a different {describe(upstream)} ({state}); re-run "
                               f"`hspace {record.get('stage', '<stage>')} run_dir={run_dir}`")
        verify(run_dir, upstream, now)
    return record


def present(run_dir, names, known: dict | None = None) -> list[str]:
    """The optional artefacts among ``names`` that exist (or are predicted, in ``known``)."""
    return [n for n in names if (known is not None and n in known) or (Path(run_dir) / n).exists()]


def is_fresh(run_dir, name: str, expected: dict) -> bool:
    """The artefact exists with the record a stage would write now."""
    record = read_record(Path(run_dir) / name)
    return record is not None and record.get("key") == expected["key"]


def differences(a, b, prefix: str = "") -> list[str]:
    """'key: old vs new' for every leaf where two nested dicts differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += differences(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix[:-1]}: {a!r} (existing) vs {b!r} (now)"]
