"""The samples dataset: ``<run_dir>/samples/``, sharded h trajectories that survive interruption.

Layout::

    samples/manifest.json                 model, scheduler, timesteps, eta, hook, h shape/dtype, the
                                          steps h was recorded at, content hash, package versions, shard list
    samples/shards/part-<first>-<last>-n<count>.arrow

Each shard is an Arrow IPC stream in the Hugging Face ``datasets`` cache format (its schema
carries the features), so ``datasets.Dataset.from_file`` reads it memory-mapped. Columns:
``sample_id`` (int64; equals the seed for generated samples), ``seed`` (int64), ``image``
(``datasets.Image``, PNG bytes) and ``h`` of shape (T', *h_shape): h at the T' recorded steps
(``generate.h_steps``; all T by default), ``datasets.Array4D`` for a U-Net's (C, H, W) feature map,
``Array3D`` for a transformer's (N, C) tokens (:func:`array_feature`), float16 by default; bfloat16
is stored bit-exact as uint16 since Arrow has no bfloat16. With ``generate.record_x_t`` also ``x_t``
((T, *latent_shape) at every step, float32: the latent entering every step, exactly as the sampler
held it), which the probe stage reads instead of sampling the seeds again. The manifest's
``h_shape_t`` is the whole trajectory's shape (T, *h_shape), ``h_steps`` the recorded step indices
(absent in datasets written before it: all); :class:`HLayout` reads both.

Why ArrayND: it keeps h's shape for ``datasets`` users and reads faster through ``datasets``' numpy
formatting than a flat fixed-size list, for a little more disk (its nested lists carry offsets;
figures in docs/benchmarks.md). Our own reader ignores the offsets and views the float16 values in
place (zero-copy from the memory map), whatever the format.

Shards are written to a temporary name, fsynced and renamed, so a crash never leaves a shard
that a reader accepts; a shard that fails validation (truncated, wrong row count, wrong ids)
is reported by name. Each shard's schema metadata keeps the content identity it was made with
(model, scheduler, eta, hook, dtypes), so the manifest can always be rebuilt from the shards and
checked. The manifest lists every shard with its size and sha256 (``shard_hashes``), and its
``record`` (see :mod:`pipeline.formats.identity`) identifies the dataset by that content identity
and those hashes (so exactly which sample ids it holds, and their bytes). Every reader goes through
:func:`shard_paths`, which checks the dataset first (:func:`check_dataset`: the manifest against its
record, each shard against its size, and its hash when its modification time changed), so a
damaged, deleted or unlisted shard is never read as if it were the dataset the record describes.
"""
from __future__ import annotations

import io
import json
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import torch

from pipeline.dtypes import dtype_entry
from pipeline.errors import ConfigError, DatasetError
from pipeline.formats.identity import META_KEY, file_digest, read_record, seal
from pipeline.io import atomic_path, hash_json, write_json_atomic  # noqa: F401 (write_json_atomic: re-exported)

SHARD_RE = re.compile(r"^part-(\d{10,})-(\d{10,})-n(\d+)\.arrow$")  # seeds of any width up to 2**63 - 1
MANIFEST = "manifest.json"
FORMAT = "hspace-samples/1"
X_T = "x_t"  # the optional column of the latents entering every step


def samples_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "samples"


def shard_name(sample_ids: Sequence[int]) -> str:
    return f"part-{min(sample_ids):010d}-{max(sample_ids):010d}-n{len(sample_ids)}.arrow"


def array_feature(shape: Sequence[int], dtype: str):
    """``datasets``' fixed-shape array feature of ``shape`` (2 to 5 dimensions): Array4D for h (T, C, H, W),
    Array3D for token h (T, N, C)."""
    import datasets

    if not 2 <= len(shape) <= 5:
        raise DatasetError(f"the samples format stores arrays of 2 to 5 dimensions, not shape {tuple(shape)}")
    return getattr(datasets, f"Array{len(shape)}D")(shape=tuple(int(n) for n in shape), dtype=dtype)


def features(h_shape_t: Sequence[int], h_dtype: str, prompt: bool = False, x_t_shape: Sequence[int] | None = None):
    """The ``datasets.Features`` of a shard: h_shape_t = (T', *h_shape) as stored; text models' samples
    also have a ``prompt`` column, and with ``x_t_shape`` ((T, *latent_shape)) an ``x_t`` column (float32)."""
    from datasets import Features, Image, Value

    arrow_dtype = np.dtype(dtype_entry(h_dtype).storage).name  # bfloat16: its bits, uint16
    return Features({"sample_id": Value("int64"), "seed": Value("int64"), "image": Image(),
                     "h": array_feature(h_shape_t, arrow_dtype),
                     **({"prompt": Value("string")} if prompt else {}),
                     **({"x_t": array_feature(x_t_shape, "float32")} if x_t_shape is not None else {})})


def _array_type(feature):
    from datasets.features import features as ft

    return getattr(ft, f"Array{len(feature.shape)}DExtensionType")(shape=feature.shape, dtype=feature.dtype)


def encode_png(image: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def shard_table(sample_ids: Sequence[int], seeds: Sequence[int], images: np.ndarray, h: torch.Tensor,
                h_dtype: str = "float16", identity: dict | None = None,
                prompts: Sequence[str] | None = None, x_t: torch.Tensor | None = None) -> pa.Table:
    """One shard's table. images: (B, H, W, 3) uint8; h: (B, T', *h_shape); ``identity``: the content
    identity of the samples (model, scheduler, eta, dtypes), kept in the schema metadata so that
    shards found without a manifest can be checked before they are adopted; prompts: (B,) of a
    text model's samples; x_t: (B, T, *latent_shape), stored as float32."""
    feats = features(h.shape[1:], h_dtype, prompt=prompts is not None,
                     x_t_shape=None if x_t is None else x_t.shape[1:])
    table = pa.Table.from_arrays(
        [pa.array(np.asarray(sample_ids, dtype=np.int64)), pa.array(np.asarray(seeds, dtype=np.int64)),
         pa.array([{"bytes": encode_png(im), "path": None} for im in images], type=feats["image"].pa_type),
         pa.ExtensionArray.from_storage(_array_type(feats["h"]), _h_to_arrow_storage(h, h_dtype)),
         *([pa.array(list(prompts), pa.string())] if prompts is not None else []),
         *([pa.ExtensionArray.from_storage(_array_type(feats["x_t"]), _h_to_arrow_storage(x_t, "float32"))]
           if x_t is not None else [])],
        schema=feats.arrow_schema,
    )
    if identity is not None:
        stored = {"content_hash": hash_json(identity), "content": identity}
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), META_KEY.encode(): json.dumps(stored).encode()})
    return table


def write_table(table: pa.Table, path: str | os.PathLike) -> None:
    """Write a table as one Arrow IPC stream (the shard format) to ``path`` as it is."""
    with open(path, "wb") as f, pa.ipc.new_stream(f, table.schema) as writer:
        writer.write_table(table)


def write_shard(
    directory: str | os.PathLike, sample_ids: Sequence[int], seeds: Sequence[int],
    images: np.ndarray, h: torch.Tensor, h_dtype: str = "float16", identity: dict | None = None,
    prompts: Sequence[str] | None = None, x_t: torch.Tensor | None = None,
) -> Path:
    """Write one shard atomically (see :func:`shard_table`)."""
    table = shard_table(sample_ids, seeds, images, h, h_dtype, identity, prompts, x_t)
    path = Path(directory) / shard_name(sample_ids)
    with atomic_path(path, fsync=True) as tmp:
        write_table(table, tmp)
    return path


def shard_content_hash(path: str | os.PathLike) -> str | None:
    """The content identity hash a shard was written with (None: not recorded)."""
    stored = read_record(path)
    return None if stored is None else stored.get("content_hash")


def _h_to_arrow_storage(h: torch.Tensor, h_dtype: str) -> pa.Array:
    """(B, T', *h_shape) -> nested list storage of an ArrayND, built from one flat buffer."""
    x = h.detach().to("cpu", dtype_entry(h_dtype).tensor).contiguous()
    flat = x.view(torch.int16).numpy().view(np.uint16) if h_dtype == "bfloat16" else x.numpy()
    arr: pa.Array = pa.array(flat.reshape(-1))
    for size in reversed(x.shape[2:]):  # W, H, C (or C, N): the per-sample list levels below T
        n = len(arr) // size
        arr = pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * size), arr)
    n = len(arr) // x.shape[1]
    return pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * x.shape[1]), arr)


# ---------------------------------------------------------------------- reading
def open_shard(path: Path) -> pa.Table:
    """A shard's table, memory-mapped (zero-copy); a clear error naming the file if it is damaged."""
    try:
        with pa.memory_map(str(path), "r") as source:
            return pa.ipc.open_stream(source).read_all()
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as e:
        raise DatasetError(f"shard {path} is corrupt or truncated ({e}); re-run `hspace generate` with the same "
                           f"configuration (or `hspace run`): it moves it aside and regenerates its samples") from None


def validate_shard(path: str | os.PathLike) -> np.ndarray:
    """The shard's sample ids, after checking that it reads completely and matches its name."""
    path = Path(path)
    m = SHARD_RE.match(path.name)
    if not m:
        raise DatasetError(f"{path} is not a shard name (expected part-<first>-<last>-n<count>.arrow)")
    ids = open_shard(path).column("sample_id").to_numpy()
    first, last, count = (int(g) for g in m.groups())
    if len(ids) != count or len(ids) == 0 or ids.min() != first or ids.max() != last or len(np.unique(ids)) != count:
        raise DatasetError(f"shard {path} holds {len(ids)} rows / ids {ids.min() if len(ids) else '-'}.."
                           f"{ids.max() if len(ids) else '-'}, not what its name says; it is corrupt: delete it "
                           f"and re-run `hspace generate`")
    return ids


@dataclass
class ShardScan:
    """What a samples directory holds: valid shards with their ids, corrupt ones, and (when a
    content hash was given) valid shards made with another configuration."""

    valid: dict[Path, np.ndarray]
    corrupt: dict[Path, str]
    foreign: dict[Path, str | None]

    @property
    def sample_ids(self) -> np.ndarray:
        return np.concatenate(list(self.valid.values())) if self.valid else np.zeros(0, np.int64)


def scan_shards(run_dir: str | os.PathLike, content_hash: str | None = None) -> ShardScan:
    valid, corrupt, foreign = {}, {}, {}
    for path in sorted((samples_dir(run_dir) / "shards").glob("part-*.arrow")):
        try:
            ids = validate_shard(path)
        except DatasetError as e:
            corrupt[path] = str(e)
            continue
        stored = shard_content_hash(path) if content_hash is not None else None
        if content_hash is not None and stored != content_hash:
            foreign[path] = stored
        else:
            valid[path] = ids
    return ShardScan(valid, corrupt, foreign)


def read_manifest(run_dir: str | os.PathLike) -> dict:
    path = samples_dir(run_dir) / MANIFEST
    if not path.exists():
        raise DatasetError(f"no samples dataset in {run_dir} ({path} is missing); run `hspace generate run_dir={run_dir}` first")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path} is not valid JSON ({e}); delete that file alone and re-run `hspace generate` with "
                           f"the same configuration: it rebuilds it from the shards, each checked first") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DatasetError(f"{path} is not an {FORMAT} manifest; delete that file alone and re-run `hspace generate` "
                           f"with the same configuration: it rebuilds it from the shards, each checked first")
    return manifest


@dataclass(frozen=True)
class HLayout:
    """Where h is in a dataset: the sampler's T steps, the recorded step indices ``steps`` (sorted), h's
    per-sample ``shape`` ((C, H, W) or (N, C)) and its stored ``dtype``. The shards hold (T', *shape) with
    T' = len(steps); directions files hold every step (T, *shape): :meth:`scatter` puts what the stages
    compute at the recorded steps there, zero at the others (no edit at those steps)."""

    num_steps: int
    steps: tuple[int, ...]
    shape: tuple[int, ...]
    dtype: str

    @property
    def stored(self) -> tuple[int, ...]:
        """(T', *shape): one sample's h as the shards hold it."""
        return (len(self.steps), *self.shape)

    @property
    def complete(self) -> bool:
        return len(self.steps) == self.num_steps

    def scatter(self, x: torch.Tensor, axis: int = 1) -> torch.Tensor:
        """x with ``axis`` over the recorded steps (T') -> the same with ``axis`` over every step (T), zero at
        the unrecorded ones; x itself when every step is recorded."""
        if self.complete:
            return x
        out = x.new_zeros(*x.shape[:axis], self.num_steps, *x.shape[axis + 1:])
        out.index_copy_(axis, torch.tensor(self.steps), x)
        return out

    def require(self, needed, what: str, key: str) -> None:
        """A ConfigError (one line, exit 2) when steps ``needed`` are not all recorded."""
        lacking = sorted(set(int(i) for i in needed) - set(self.steps))
        if lacking:
            raise ConfigError(f"{what} needs h at steps {_steps_text(lacking)} ({key}), which generate.h_steps="
                              f"{list(self.steps)} did not record; choose recorded steps, or add them to generate.h_steps "
                              f"and generate again in a new run_dir")


def _steps_text(steps: Sequence[int]) -> str:
    return ", ".join(map(str, steps[:8])) + (f" and {len(steps) - 8} more" if len(steps) > 8 else "")


def h_layout(manifest: dict) -> HLayout:
    """The :class:`HLayout` of a dataset's manifest (``h_steps`` absent: every step)."""
    T, *shape = manifest["h_shape_t"]
    steps = manifest.get("h_steps")
    return HLayout(int(T), tuple(range(T)) if steps is None else tuple(int(s) for s in steps), tuple(shape),
                   manifest["h_dtype"])


def sample_bytes(stored: Sequence[int], h_dtype: str, image_shape: Sequence[int],
                 x_t_shape: Sequence[int] | None = None) -> int:
    """Upper estimate of one sample in a shard: h (T', *h_shape) in ``h_dtype`` and its list offsets (int32
    per list below the sample), the PNG (at most the raw image plus its headers and row filters), the ids,
    and x_t ((T, *latent_shape), float32) when recorded."""
    def array(shape, itemsize):
        lists = sum(math.prod(shape[:k]) for k in range(len(shape)))  # the sample's list and those below it
        return math.prod(shape) * itemsize + 4 * (lists + 1)

    C, H, W = image_shape
    raw = C * H * W + H  # the rows and their filter bytes; compress_level 1 never grows them beyond deflate's
    png = raw + 5 * (raw // 16384 + 1) + 128  # stored blocks (5 bytes each) and the PNG chunks around them
    x_t = array(x_t_shape, 4) if x_t_shape is not None else 0
    return array(stored, np.dtype(dtype_entry(h_dtype).storage).itemsize) + png + x_t + 2 * 8 + 64


def shard_overhead(stored: Sequence[int], h_dtype: str, identity: dict | None = None, prompt: bool = False,
                   x_t_shape: Sequence[int] | None = None) -> int:
    """Bytes of a shard besides its samples: the stream's schema (with the features and the identity in its
    metadata) and the framing of its record batch."""
    schema = features(stored, h_dtype, prompt=prompt, x_t_shape=x_t_shape).arrow_schema
    if identity is not None:
        stored_id = {"content_hash": hash_json(identity), "content": identity}
        schema = schema.with_metadata({**(schema.metadata or {}), META_KEY.encode(): json.dumps(stored_id).encode()})
    return schema.serialize().size + 512


def shard_entry(path: Path, old: dict | None = None) -> dict:
    """What the manifest records of one shard: its size, modification time and sha256 (the old entry's
    hash reused while size and modification time are the same)."""
    st = path.stat()
    if old and old.get("bytes") == st.st_size and old.get("mtime_ns") == st.st_mtime_ns:
        return dict(old)
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": file_digest(path)}


def shards_content(names: Sequence[str], entries: dict) -> str:
    """The hash of a dataset's shards: their names (so the ids they hold) and bytes."""
    return hash_json([(n, (entries.get(n) or {}).get("bytes"), (entries.get(n) or {}).get("sha256")) for n in names])


def repair(run_dir) -> str:
    return (f"re-run `hspace generate run_dir={run_dir}` with the configuration that made it (or `hspace run`): it "
            f"moves damaged shards to {samples_dir(run_dir) / 'corrupt'}, regenerates their samples and rewrites the manifest")


def check_dataset(run_dir: str | os.PathLike, manifest: dict | None = None) -> dict:
    """The manifest of the complete dataset in ``run_dir``, checked to describe the shards on disk: its
    shard list and count against its record, each shard's size, and its hash when its modification
    time is not the one recorded (a copied run). A DatasetError names what differs and the repair."""
    manifest = read_manifest(run_dir) if manifest is None else manifest
    path = samples_dir(run_dir) / MANIFEST
    if not manifest.get("complete", False):
        raise DatasetError(f"the samples dataset in {run_dir} is incomplete (generation was interrupted); "
                           f"re-run the same `hspace generate` command to finish it")
    record, entries, names = manifest.get("record") or {}, manifest.get("shard_hashes") or {}, manifest.get("shards") or []
    if "content" not in record:
        raise DatasetError(f"{path} records no shard hashes (written by an older version); {repair(run_dir)}")
    counts = [int(m.group(3)) if (m := SHARD_RE.match(n)) else -1 for n in names]
    if shards_content(names, entries) != record["content"] or sum(counts) != manifest.get("num_samples") \
            or -1 in counts:
        raise DatasetError(f"{path} was changed after `hspace generate` wrote it (it lists {len(names)} shards and "
                           f"{manifest.get('num_samples')} samples, not the ones its record describes); {repair(run_dir)}")
    for name in names:
        shard, entry = samples_dir(run_dir) / "shards" / name, entries[name]
        try:
            st = shard.stat()
        except FileNotFoundError:
            raise DatasetError(f"shard {shard} listed in the manifest is missing; {repair(run_dir)}") from None
        if st.st_size != entry["bytes"] or (st.st_mtime_ns != entry["mtime_ns"] and file_digest(shard) != entry["sha256"]):
            raise DatasetError(f"shard {shard} is truncated or was changed after it was written ({st.st_size} bytes, "
                               f"written with {entry['bytes']}); {repair(run_dir)}")
    return manifest


def finalise_manifest(run_dir: str | os.PathLike, manifest: dict, wanted: set[int], record: dict,
                      listed: dict | None = None) -> dict:
    """Rewrite the manifest from the shards on disk: their list, sizes and hashes (``listed``: the entries
    of the manifest before, reused for unchanged shards), count, completeness and the dataset's identity
    record (content identity + the shards' hashes, so exactly which sample ids and their bytes)."""
    scan = scan_shards(run_dir)
    ids = scan.sample_ids
    if len(ids) != len(set(ids.tolist())):
        dup = sorted({int(i) for i in ids if (ids == i).sum() > 1})[:5]
        raise DatasetError(f"samples {dup} appear in more than one shard of {samples_dir(run_dir)}; remove the "
                           f"older shard(s) by hand")
    have = set(ids.tolist())
    names = [p.name for p in sorted(scan.valid)]
    entries = {p.name: shard_entry(p, listed.get(p.name)) for p in sorted(scan.valid)}
    record = {**seal(record, shards_content(names, entries), id_parts=manifest["identity_hash"]), "num_samples": len(have)}
    manifest = {**manifest, "shards": names, "shard_hashes": entries, "num_samples": len(ids),
                "complete": wanted <= have, "record": record}
    write_json_atomic(samples_dir(run_dir) / MANIFEST, manifest)
    return manifest


def shard_paths(run_dir: str | os.PathLike, require_complete: bool = True) -> list[Path]:
    """The manifest's shards; with ``require_complete`` the dataset must be finished, and is checked
    (:func:`check_dataset`) before anyone reads it."""
    manifest = check_dataset(run_dir) if require_complete else read_manifest(run_dir)
    paths = [samples_dir(run_dir) / "shards" / name for name in manifest["shards"]]
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise DatasetError(f"shard {missing[0]} listed in the manifest is missing ({len(missing)} missing); "
                           f"{repair(run_dir)}")
    return paths


def dataset_ids(run_dir: str | os.PathLike) -> np.ndarray:
    """The sample ids of the (complete) dataset, in shard order."""
    parts = [open_shard(p).column("sample_id").to_numpy() for p in shard_paths(run_dir)]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def load_samples(run_dir: str | os.PathLike):
    """The samples dataset as one memory-mapped ``datasets.Dataset`` (sample_id, seed, image, h)."""
    from datasets import Dataset, concatenate_datasets

    parts = []
    for path in shard_paths(run_dir):
        try:
            parts.append(Dataset.from_file(str(path)))
        except Exception as e:  # datasets wraps arrow errors in several types
            raise DatasetError(f"shard {path} is corrupt or truncated ({type(e).__name__}: {e}); delete it and "
                               f"re-run `hspace generate`") from None
    return concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def h_view(column: pa.ChunkedArray | pa.Array, h_shape_t: Sequence[int], h_dtype: str) -> torch.Tensor:
    """Zero-copy (B, *h_shape_t) view of an ArrayND column's values (read-only: it is the memory map);
    h_shape_t: the stored (T', *h_shape) (:attr:`HLayout.stored`)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    storage = arr.storage if isinstance(arr, pa.ExtensionArray) else arr
    values = storage
    for _ in range(len(h_shape_t)):
        values = values.flatten()
    flat = values.to_numpy(zero_copy_only=True)
    with warnings.catch_warnings():  # the memory map is read-only, and so is this view
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(flat.view(np.int16) if h_dtype == "bfloat16" else flat)
    if h_dtype == "bfloat16":
        t = t.view(torch.bfloat16)
    return t.view(len(arr), *h_shape_t)


def decode_images(column) -> np.ndarray:
    """An image column (PNG structs) -> (B, H, W, 3) uint8."""
    from PIL import Image

    return np.stack([np.asarray(Image.open(io.BytesIO(v["bytes"])).convert("RGB")) for v in column.to_pylist()])


def has_x_t(run_dir: str | os.PathLike) -> bool:
    """Whether every shard of the (complete) dataset stores x_t (``generate.record_x_t``)."""
    return all(X_T in open_shard(p).column_names for p in shard_paths(run_dir))


def iter_samples(
    run_dir: str | os.PathLike, batch_size: int = 256, images: bool = False, h: bool = True,
    ids: Sequence[int] | None = None, x_t: bool = False,
) -> Iterator[dict]:
    """Stream the dataset in batches: {"sample_id": (B,), "seed": (B,), "h": (B, T', *h_shape) torch (h at
    the recorded steps, :func:`h_layout`),
    "images": (B, H, W, 3) uint8 (if asked), "prompt": (B,) str (text models), "x_t": (B, T,
    *latent_shape) float32 (if asked; :func:`has_x_t` says whether the shards hold it)}; h and x_t are
    read-only views of the memory-mapped shard.

    ``ids``: only these sample ids (in dataset order). Memory stays at one batch.
    """
    manifest = read_manifest(run_dir)
    layout = h_layout(manifest)
    h_shape_t, h_dtype = layout.stored, layout.dtype
    x_t_shape = (layout.num_steps, *manifest["latent_shape"]) if x_t else None
    wanted = None if ids is None else set(int(i) for i in ids)
    for path in shard_paths(run_dir):
        table = open_shard(path)
        sid = table.column("sample_id").to_numpy()
        rows = np.arange(len(sid)) if wanted is None else np.flatnonzero([int(i) in wanted for i in sid])
        for start in range(0, len(rows), batch_size):
            sel = rows[start:start + batch_size]
            part = table.take(pa.array(sel)) if wanted is not None else table.slice(int(sel[0]), len(sel))
            out = {"sample_id": part.column("sample_id").to_numpy(), "seed": part.column("seed").to_numpy()}
            if h:
                out["h"] = h_view(part.column("h"), h_shape_t, h_dtype)
            if images:
                out["images"] = decode_images(part.column("image"))
            if "prompt" in part.column_names:
                out["prompt"] = part.column("prompt").to_pylist()
            if x_t:
                if X_T not in part.column_names:
                    raise DatasetError(f"shard {path} stores no x_t (generated with generate.record_x_t=false)")
                out["x_t"] = h_view(part.column(X_T), x_t_shape, "float32")
            yield out


def read_prompts(run_dir: str | os.PathLike, ids: Sequence[int]) -> dict[int, str]:
    """The stored prompts of samples ``ids`` (a text model's); empty for unconditional models."""
    out = {}
    for batch in iter_samples(run_dir, h=False, ids=ids):
        out.update(zip(map(int, batch["sample_id"]), batch.get("prompt", [])))
    return out

