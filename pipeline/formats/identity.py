"""One identity scheme for everything in a run directory: what each artefact was made from, and what it holds.

Every artefact a stage writes carries a *record*::

    {"stage": "annotate", "key": <hash of inputs>, "content": <hash of what it holds>, "id": <hash of both>,
     "inputs": {
        "config": {<the configuration sections it read>},
        "assets": {<content hashes of files the config names: model weights, annotator weights>},
        "artefacts": {<run-directory artefacts it read, by name>: <their "id">}}}

``key`` decides freshness: a stage (and ``hspace run``) redoes an artefact whose stored key is not
the key it would write now. ``content`` is the hash of the artefact's own bytes (its data, not the
record), taken when it is written and checked again whenever it is read or judged up to date, so
an artefact damaged or changed after it was written (a column dropped, a directions file
rewritten, a shard truncated) is never taken for the one its record describes. ``id`` is what
readers downstream record: it covers both, so what a stage read is exactly what its record says
it read. The samples dataset's id is the hash of its content identity and of its shards' hashes
(so which sample ids it holds, and their bytes). :func:`verify` checks an artefact's content
and the current ids of what it was made from, transitively, before a stage reads it.

Where the record is stored (one place per artefact, written with the artefact, atomically):

============================  =======================================================
``samples``                   ``samples/manifest.json`` (``record``, and each shard's size and
                              hash); each shard's Arrow schema metadata holds the content
                              identity it was made with
``*.parquet``                 the Parquet schema metadata (``hspace_identity``)
``*.safetensors``             the safetensors metadata (``hspace_identity``)
a folder (``evaluation``...)  ``<folder>/identity.json``, written last, listing the files it covers
============================  =======================================================
"""
from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import struct
from pathlib import Path

from pipeline.errors import DatasetError
from pipeline.io import hash_json

META_KEY = "hspace_identity"
FOLDER_RECORD = "identity.json"
DIRECTIONS_META = "hspace"  # the directions file's own metadata (labels inside it are a user's, not content)

#: what an artefact is called in messages
DESCRIPTIONS = {"samples": "samples dataset", "annotations.parquet": "annotations", "selection.parquet": "selection"}


def describe(name: str) -> str:
    return DESCRIPTIONS.get(name, name)


#: the configuration a model's outputs depend on besides its weights: the model section and the precision it
#: computes in (``HSpaceModel.from_config`` applies it, under a Trainer or not)
MODEL_SECTIONS = ("model", "trainer.precision")
#: keys of the model section that change where it runs, not what it computes
MODEL_DROP = ("model.device",)


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
                artefacts: dict | None = None) -> dict:
    """The record an artefact made from these inputs carries (its content is added by :func:`seal`
    when it is written)."""
    inputs = {"config": config or {}, "assets": assets or {}, "artefacts": artefacts or {}}
    key = hash_json(inputs)
    return {"stage": stage, "key": key, "inputs": inputs}


def seal(record: dict, content: str, id_parts=None) -> dict:
    """``record`` with the hash of what the artefact holds, and its id (``id_parts``: what identifies
    it instead of the key, for the samples dataset)."""
    return {**record, "content": content, "id": hash_json(record["key"] if id_parts is None else id_parts, content)}


# ---------------------------------------------------------------------- content hashes
_digests: dict[tuple, str] = {}  # (path, size, mtime_ns, inode) -> digest: a file is hashed once per process


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, remembered while its size and modification time stay the same."""
    from pipeline.io import hash_file

    st = os.stat(path)
    key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _digests:
        _digests[key] = hash_file(path)
    return _digests[key]


def table_digest(table) -> str:
    """The hash of an Arrow table's schema and values, whatever its metadata and chunking."""
    import pyarrow as pa

    table = table.replace_schema_metadata(None).combine_chunks()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()[:16]


def parquet_digest(source) -> str:
    """The hash of a Parquet file's table (a path or a buffer), not of its metadata."""
    import pyarrow.parquet as pq

    return table_digest(pq.read_table(source))


def safetensors_digest(source) -> str:
    """The hash of a safetensors file's tensors and its metadata, but the identity record and the labels
    a user gave its directions (``source``: a path or the file's bytes)."""
    buf = source if isinstance(source, (bytes, bytearray, memoryview)) else None
    f = io.BytesIO(buf) if buf is not None else open(source, "rb")
    with f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        meta = dict(header.pop("__metadata__", None) or {})
        meta.pop(META_KEY, None)
        if DIRECTIONS_META in meta:
            own = json.loads(meta[DIRECTIONS_META])
            own.pop("labels", None)
            meta[DIRECTIONS_META] = own
        h = hashlib.sha256(json.dumps([header, meta], sort_keys=True).encode())
        for block in iter(lambda: f.read(2**20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def folder_files(folder: str | os.PathLike) -> list[str]:
    """The files under ``folder`` (relative, sorted) but its record."""
    root = Path(folder)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != FOLDER_RECORD)


def files_digest(folder: str | os.PathLike, files) -> str:
    """The hash of the named files of a folder (names and bytes)."""
    root = Path(folder)
    return hash_json([(f, file_digest(root / f)) for f in sorted(files)])


def content_of(path: str | os.PathLike, record: dict) -> str:
    """What the artefact at ``path`` holds now, as :func:`seal` recorded it (an OSError if it cannot be read)."""
    path = Path(path)
    if path.is_dir():
        return files_digest(path, record.get("files", []))
    if path.suffix == ".parquet":
        return _cached(path, parquet_digest)
    if path.suffix == ".safetensors":
        return _cached(path, safetensors_digest)
    raise DatasetError(f"{path} is not an artefact hspace knows how to check")


def _cached(path: Path, digest) -> str:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino, digest.__name__)
    if key not in _digests:
        _digests[key] = digest(path)
    return _digests[key]


# ---------------------------------------------------------------------- writing artefacts with their record
def parquet_table(table, record: dict):
    """``table`` with ``record`` (sealed with the table's content) in its schema metadata, ready for
    ``pq.write_table``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    sealed = seal(record, parquet_digest(pa.BufferReader(buf.getvalue())))
    return table.replace_schema_metadata({**(table.schema.metadata or {}), **parquet_metadata(sealed)})


def safetensors_bytes(tensors: dict, metadata: dict[str, str], record: dict | None = None) -> bytes:
    """A safetensors file's bytes with ``metadata`` and, if given, ``record``: sealed with its content
    when a stage writes it; one sealed already (read from the file, to rewrite a person's labels) is
    kept as it is, so that other tensors under an old record are told apart from the stage's."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    data = save(tensors, metadata=metadata)
    if record is None:
        return data
    sealed = record if "content" in record else seal(record, safetensors_digest(data))
    return save(tensors, metadata={**metadata, **safetensors_metadata(sealed)})


def seal_folder(folder: str | os.PathLike, record: dict, files=None) -> dict:
    """Write ``<folder>/identity.json``: ``record`` sealed with the content of ``files`` (default: every
    file in the folder), which it lists. Last, once the folder holds what the record describes."""
    from pipeline.io import write_json_atomic

    files = folder_files(folder) if files is None else sorted(files)
    sealed = {**seal(record, files_digest(folder, files)), "files": files}
    write_json_atomic(Path(folder) / FOLDER_RECORD, sealed)
    return sealed


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
    except (OSError, ValueError, KeyError, RuntimeError, AttributeError):
        return None
    except Exception as e:  # pyarrow / safetensors raise their own types for damaged files
        if type(e).__module__.split(".")[0] in ("pyarrow", "safetensors", "builtins"):
            return None
        raise


# ---------------------------------------------------------------------- checking what is read
def check_content(run_dir, name: str, record: dict) -> None:
    """Raise a DatasetError unless artefact ``name`` holds what its record says (it was not damaged or
    changed after its stage wrote it)."""
    path = Path(run_dir) / name
    stage = record.get("stage", "<stage>")
    if name == "samples":
        from pipeline.formats.samples import check_dataset

        check_dataset(run_dir)
        return
    if "content" not in record:
        raise DatasetError(f"{path} carries no content hash (made by an older version); re-run "
                           f"`hspace {stage} run_dir={run_dir}`")
    try:
        now = content_of(path, record)
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path} cannot be read ({type(e).__name__}: {e}); re-run "
                           f"`hspace {stage} run_dir={run_dir}`") from None
    except Exception as e:  # pyarrow / safetensors raise their own types for damaged files
        if type(e).__module__.split(".")[0] not in ("pyarrow", "safetensors"):
            raise
        raise DatasetError(f"{path} cannot be read ({type(e).__name__}); re-run `hspace {stage} run_dir={run_dir}`") from None
    if now != record["content"]:
        raise DatasetError(f"{path} was changed after `hspace {stage}` wrote it (what it holds is not what its identity "
                           f"record describes); re-run `hspace {stage} run_dir={run_dir}`")


def checked_record(run_dir, name: str) -> dict | None:
    """The record of artefact ``name`` once its content is checked (None: missing or without a record)."""
    record = read_record(Path(run_dir) / name)
    if record is not None:
        check_content(run_dir, name, record)
    return record


def current_id(run_dir, name: str) -> str | None:
    record = checked_record(run_dir, name)
    return None if record is None else record.get("id")


def artefact_ids(run_dir, names, known: dict | None = None) -> dict[str, str]:
    """name -> current id, for artefacts a stage is about to read (a missing or damaged one is an error).
    ``known``: ids to use instead of reading the run directory (predicting a whole run's records)."""
    out = {}
    for name in names:
        if known is not None and name in known:
            out[name] = known[name]
            continue
        record = checked_record(run_dir, name)
        if record is None or "id" not in record:
            raise DatasetError(f"{Path(run_dir) / name} is missing or has no identity record; run the stage that "
                               f"writes it first (or again: files from an older version carry none)")
        out[name] = record["id"]
    return out


def verify(run_dir, name: str, record: dict | None = None) -> dict:
    """The record of artefact ``name``, after checking that it holds what it held when written and that
    everything it was made from is, in ``run_dir`` now, what it was then (transitively). Raises a
    DatasetError naming the first input that changed and the stage to re-run."""
    path = Path(run_dir) / name
    record = record if record is not None else read_record(path)
    if record is None:
        raise DatasetError(f"{path} is missing or has no identity record; re-run the stage that writes it")
    if "inputs" not in record:
        raise DatasetError(f"{path} has no identity record (made by an older version); re-run the stage that writes it")
    check_content(run_dir, name, record)
    for upstream, wanted in record["inputs"].get("artefacts", {}).items():
        now = read_record(Path(run_dir) / upstream)
        if now is not None and now.get("id") == wanted:
            verify(run_dir, upstream, now)
            continue
        state = "which is missing now" if now is None else f"not the {describe(upstream)} in {run_dir} now"
        raise DatasetError(f"{path} was made from a different {describe(upstream)} ({state}); re-run "
                           f"`hspace {record.get('stage', '<stage>')} run_dir={run_dir}`")
    return record


def present(run_dir, names, known: dict | None = None) -> list[str]:
    """The optional artefacts among ``names`` that exist (or are predicted, in ``known``): a file, or a
    folder holding its record (a folder a person made under that name is not the stage's artefact)."""
    def exists(path: Path) -> bool:
        return (path / FOLDER_RECORD).exists() or (path / "manifest.json").exists() if path.is_dir() else path.exists()

    return [n for n in names if (known is not None and n in known) or exists(Path(run_dir) / n)]


def is_fresh(run_dir, name: str, expected: dict) -> bool:
    """The artefact exists, holds what it held when written, with the record a stage would write now."""
    record = read_record(Path(run_dir) / name)
    if record is None or record.get("key") != expected["key"]:
        return False
    try:
        check_content(run_dir, name, record)
    except DatasetError:
        return False
    return True


def differences(a, b, prefix: str = "") -> list[str]:
    """'key: old vs new' for every leaf where two nested dicts differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += differences(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix[:-1]}: {a!r} (existing) vs {b!r} (now)"]
