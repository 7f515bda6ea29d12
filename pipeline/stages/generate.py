"""`hspace generate`: bulk generation with h recording into a sharded samples dataset.

``Trainer.predict`` over batches of seeds, on whatever the ``trainer`` section says (1 CPU,
8 GPUs, several nodes). Each rank writes its own shards through a prediction-writer
callback; nothing is gathered on rank 0. Every sample's noise comes from its seed, so the
dataset is the same whatever the number of processes or the batch size.

Restarts: the seeds are cut into batches aligned to ``first_seed``; a re-run skips every
batch whose shard exists and is valid, so a killed run completes with no duplicates and,
with the same batch size, bit-identical to an uninterrupted one. A run directory whose
manifest or shards were written by a different configuration (model, weights, scheduler, eta,
hook, dtypes) is refused instead of mixing samples: every shard keeps that configuration in its
metadata, so shards found without a manifest are adopted only when it matches, and the
manifest is rebuilt from them. Shards that are truncated or whose bytes are not those the manifest
listed are moved to ``samples/corrupt`` and their samples regenerated.

Generate makes the dataset the configuration asks for by adding samples, never by removing them:
a run directory holding sample ids that ``first_seed`` and ``num_samples`` leave out (a smaller
count, another first seed) is refused before anything is written, with the settings that keep it
and the deletion that would make the one asked for.

Throughput: with ``generate.writer_queue`` > 0 the shards (PNG encoding, Arrow, fsync) are written by
a writer thread with a bounded queue while the U-Net makes the next batch, in batch order, byte
for byte what writing in the loop gives; a failed write stops the stage with its error. Off by
default: on an interrupt the process waits for the queued shards (a write that never returns
would hold it), which the fault tests of the in-loop writer do not expect.
"""
from __future__ import annotations

import shutil
import sys
from importlib import metadata
from pathlib import Path

from pipeline.config import to_dict
from pipeline.dtypes import DTYPES
from pipeline.engine.model import HSpaceModel
from pipeline.errors import ConfigError, DatasetError
from pipeline.formats.identity import differences
from pipeline.formats.images import to_uint8
from pipeline.formats.samples import (
    FORMAT,
    MANIFEST,
    finalise_manifest,
    h_layout,
    read_manifest,
    read_record,
    sample_bytes,
    samples_dir,
    scan_shards,
    shard_entry,
    shard_name,
    shard_overhead,
    shard_table,
    write_table,
)
from pipeline.io import hash_json, write_json_atomic
from pipeline.registry import COMMANDS
from pipeline.stages.lightning_utils import (
    ItemModule,
    ItemsProgress,
    RankShare,
    agreed,
    launching_rank,
    predict_parts,
    share_cpu_threads,
)


# ---------------------------------------------------------------------- planning (pure)
def plan_batches(first_seed: int, num_samples: int, batch_size: int, done: set[int]) -> list[list[int]]:
    """Seeds still to generate, cut into batches aligned to ``first_seed`` (so a restart with the
    same batch size reproduces the same batches); finished seeds are left out."""
    batches = []
    for start in range(first_seed, first_seed + num_samples, batch_size):
        todo = [s for s in range(start, min(start + batch_size, first_seed + num_samples)) if s not in done]
        if todo:
            batches.append(todo)
    return batches


def run_bytes(manifest: dict, content: dict, prompts: bool, record_x_t: bool, batches: list[list[int]]) -> tuple[int, int]:
    """(bytes per sample, bytes of the shards still to write) by the samples format's estimate: h at the
    recorded steps in generate.h_dtype, the PNG, x_t when recorded, and each shard's schema."""
    layout = h_layout(manifest)
    x_t_shape = (layout.num_steps, *manifest["latent_shape"]) if record_x_t else None
    per_sample = sample_bytes(layout.stored, layout.dtype, manifest["image_shape"], x_t_shape)
    per_shard = shard_overhead(layout.stored, layout.dtype, content, prompts, x_t_shape)
    return per_sample, sum(len(b) for b in batches) * per_sample + len(batches) * per_shard


def package_versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for pkg in ("hspace", "torch", "diffusers", "lightning", "datasets", "pyarrow"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def prompts_from_config(g) -> list[str]:
    """generate.prompts, or the lines of generate.prompts_file (checked: one per sample)."""
    if not g.prompts_file:
        return list(g.prompts)
    path = Path(g.prompts_file)
    if not path.is_file():
        raise ConfigError(f"generate.prompts_file={g.prompts_file}: no such file")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = e.object[:e.start].count(b"\n") + 1
        raise ConfigError(f"generate.prompts_file={g.prompts_file}: line {line} is not UTF-8 (byte {e.object[e.start]:#04x}); "
                          f"save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
    except OSError as e:
        raise ConfigError(f"generate.prompts_file={g.prompts_file}: cannot be read ({e.strerror or e})") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if len(prompts) != g.num_samples:
        raise ConfigError(f"generate.prompts_file={g.prompts_file} has {len(prompts)} prompts for "
                          f"generate.num_samples={g.num_samples}; give one line per sample")
    return prompts


def sample_prompts(cfg, model: HSpaceModel, prompts: list[str]) -> dict | None:
    """A text model's prompt assignment: {"first_seed", "prompts"} (one for all, or one per sample,
    from :func:`prompts_from_config`, else model.prompt); None for other models."""
    if model.prompt is None:
        if prompts:
            raise ConfigError(f"generate.prompts / generate.prompts_file apply to text-to-image models; "
                              f"{cfg.model.name_or_path} is a {model.kind} model")
        return None
    return {"first_seed": cfg.generate.first_seed, "prompts": prompts or [model.prompt]}


def prompt_function(assignment: dict | None):
    """seed -> prompt of an assignment from :func:`sample_prompts` (None: no prompts)."""
    if assignment is None:
        return None
    first, prompts = assignment["first_seed"], assignment["prompts"]
    return lambda seed: prompts[0] if len(prompts) == 1 else prompts[int(seed) - first]


# ---------------------------------------------------------------------- Lightning
class GenerateModule(ItemModule):
    """predict_item: seeds -> images and h trajectories of an HSpaceModel (and x_t with ``record_x_t``)."""

    def __init__(self, model: HSpaceModel, h_dtype: str, prompt_of=None, record_x_t: bool = False, h_steps=None):
        super().__init__()
        self.hmodel = model
        self.unet = model.unet  # registered, so Lightning moves it to the rank's device
        self.h_dtype, self.prompt_of, self.record_x_t, self.h_steps = h_dtype, prompt_of, record_x_t, h_steps

    def setup(self, stage: str) -> None:
        share_cpu_threads(self.trainer)

    def predict_item(self, seeds: list[int]):
        self.hmodel.to(self.device)
        prompts = None if self.prompt_of is None else [self.prompt_of(s) for s in seeds]
        # h goes straight into a CPU buffer of the stored dtype: the batch's trajectories are held once
        out = self.hmodel.sample(seeds, prompt=prompts, h_dtype=DTYPES[self.h_dtype].tensor, h_device="cpu",
                                 h_steps=self.h_steps, return_latents=self.record_x_t)
        x_t = out.latents.float().cpu() if self.record_x_t else None
        return {"seeds": seeds, "images": to_uint8(out.images), "h": out.h, "prompts": prompts, "x_t": x_t}


class GenerateData(RankShare):
    """Plans on every rank after the process group exists and before anyone writes (Lightning
    puts a barrier after setup), then deals batches round-robin to the ranks."""

    def __init__(self, run_dir: str, gen_cfg):
        super().__init__()
        self.run_dir, self.cfg = run_dir, gen_cfg

    def plan(self) -> list:
        done = set(scan_shards(self.run_dir).sample_ids.tolist())
        return plan_batches(self.cfg.first_seed, self.cfg.num_samples, self.cfg.batch_size, done)


# ---------------------------------------------------------------------- the stage
def check_existing(run_dir: str, identity: dict) -> dict:
    """Refuse a manifest or shards made with another content identity (listing what differs) -> the
    shard entries the manifest lists (name -> size, hash), to tell a shard changed since it was listed."""
    path = samples_dir(run_dir) / MANIFEST
    listed = {}
    if path.exists():
        old = read_manifest(run_dir)  # a corrupt one: the message says to delete it alone
        listed = old.get("shard_hashes") or {}
        if old.get("identity_hash") != hash_json(identity):
            diff = differences(old.get("identity", {}), identity)
            raise DatasetError(
                f"{samples_dir(run_dir)} holds samples made with a different configuration "
                f"({'; '.join(diff[:4]) or 'identity differs'}); use another run_dir, or delete that folder to start over"
            )
    # shards written by an older version record nothing: a matching manifest vouches for them, nothing else does
    foreign = {p: h for p, h in scan_shards(run_dir, hash_json(identity)).foreign.items()
               if h is not None or not path.exists()}
    if foreign:
        shard = next(iter(foreign))
        stored = read_record(shard)
        diff = differences(stored.get("content", {}), identity) if stored else ["no configuration recorded in it"]
        raise DatasetError(
            f"{shard} (and {len(foreign) - 1} more) holds samples made with a different configuration "
            f"({'; '.join(diff[:4]) or 'identity differs'}); use another run_dir, or delete {samples_dir(run_dir)} "
            f"to start over")
    return listed


def check_requested(run_dir: str, g, have: set[int]) -> None:
    """Generate adds samples and never removes them: a dataset holding ids the configuration does not ask
    for (a smaller ``num_samples``, another ``first_seed``) is refused, with the commands that would keep
    it or make the one asked for."""
    extra = sorted(have - set(range(g.first_seed, g.first_seed + g.num_samples)))
    if not extra:
        return
    lo, hi = min(have), max(have)
    raise DatasetError(
        f"{samples_dir(run_dir)} holds {len(have)} samples (ids {lo}..{hi}) and generate.first_seed={g.first_seed} "
        f"generate.num_samples={g.num_samples} asks for ids {g.first_seed}..{g.first_seed + g.num_samples - 1}, without "
        f"{len(extra)} of them (e.g. {extra[0]}); generate never removes samples: to keep this dataset run with "
        f"generate.first_seed={lo} generate.num_samples={hi - lo + 1} (or more, to extend it); to make the one asked "
        f"for, delete {samples_dir(run_dir)} or choose another run_dir, and run the same command again")


def changed_shards(scan, listed: dict) -> dict:
    """Valid shards whose bytes are not those the manifest listed (same name, another hash): damaged or
    replaced since they were written -> path: why."""
    out = {}
    for path in scan.valid:
        entry = listed.get(path.name)
        if entry and shard_entry(path, entry)["sha256"] != entry["sha256"]:
            out[path] = f"shard {path} is not the one the manifest listed (its bytes changed since it was written)"
    return out


def quarantine(run_dir: str, bad: dict) -> None:
    """Move damaged shards to samples/corrupt (their samples are then regenerated)."""
    for path, why in bad.items():
        folder = samples_dir(run_dir) / "corrupt"
        folder.mkdir(exist_ok=True)
        shutil.move(str(path), folder / path.name)
        print(f"hspace generate: {why.split(';')[0]}; moved to {folder} and regenerating its samples", file=sys.stderr)


def check_disk(run_dir: str, n: int, per_sample: int, need: int) -> None:
    """Say before sampling what a sample and the run will take (``need``: bytes of the shards to write), and
    refuse when the disk has less free."""
    target = samples_dir(run_dir)
    target.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(target).free
    print(f"hspace generate: {n} samples to write, about {_size(per_sample)} per sample, {_size(need)} in all; "
          f"{_size(free)} free in {target}")
    if need > free:
        raise DatasetError(f"not enough disk space in {target}: the run needs about {_size(need)} but only "
                           f"{_size(free)} are free; free space, choose another run_dir, or lower "
                           f"generate.num_samples, record h at fewer steps (generate.h_steps) or use generate.h_dtype=float16")


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} bytes"


def run_generate(cfg) -> dict:
    g = cfg.generate
    run_dir = str(cfg.run_dir)
    prompts = prompts_from_config(g)  # before the model loads: a wrong prompts file is a quick one-line error
    stage = COMMANDS["generate"]
    record = stage.identity(cfg)
    content = stage.part_inputs(cfg)  # what every shard's samples are made from (not which seeds)
    model = HSpaceModel.from_config(cfg, under_trainer=True)
    prompts = sample_prompts(cfg, model, prompts)
    listed = check_existing(run_dir, content)

    rank0 = launching_rank() == 0
    wanted = set(range(g.first_seed, g.first_seed + g.num_samples))
    manifest = {
        "format": FORMAT, "identity": content, "identity_hash": hash_json(content),
        "model": model.describe(), "h_shape_t": [model.num_steps, *model.h_shape], "h_dtype": g.h_dtype,
        "h_steps": list(range(model.num_steps)) if g.h_steps is None else sorted(g.h_steps),
        "image_shape": list(model.image_shape), "latent_shape": list(model.latent_shape),
        "config": to_dict(cfg), "packages": package_versions(),
        "requested": {"first_seed": g.first_seed, "num_samples": g.num_samples},
    }
    scan = scan_shards(run_dir)
    check_requested(run_dir, g, set(scan.sample_ids.tolist()))
    bad = {**scan.corrupt, **changed_shards(scan, listed)}
    if rank0:
        quarantine(run_dir, bad)  # then regenerated
    have = set(scan.sample_ids.tolist()) - {int(i) for p in bad if p in scan.valid for i in scan.valid[p]}
    todo = agreed(len(wanted - have))  # after rank 0 moved damaged shards away
    if todo == 0:
        final = finalise_manifest(run_dir, manifest, wanted, record, listed) if rank0 else manifest
        print(f"hspace generate: all {g.num_samples} samples already in {samples_dir(run_dir)}")
        return final
    batches = plan_batches(g.first_seed, g.num_samples, g.batch_size, have)
    check_disk(run_dir, todo, *run_bytes(manifest, content, prompts is not None, g.record_x_t, batches))
    if rank0:
        write_json_atomic(samples_dir(run_dir) / MANIFEST, {**manifest, "shards": [p.name for p in sorted(scan.valid)
                                                                                   if p not in bad], "complete": False})
    trainer = predict_parts(
        cfg.trainer, GenerateModule(model, g.h_dtype, prompt_function(prompts), g.record_x_t, manifest["h_steps"]),
        GenerateData(run_dir, g), tag="generate", merge=lambda: finalise_manifest(run_dir, manifest, wanted, record, listed),
        parts=samples_dir(run_dir) / "shards", name=lambda p: shard_name(p["seeds"]),
        write=lambda p, path: write_table(shard_table(p["seeds"], p["seeds"], p["images"], p["h"], g.h_dtype, content,
                                                      p.get("prompts"), p.get("x_t")), path),
        progress=ItemsProgress("generate", todo), fsync=True, queue_size=g.writer_queue)
    if trainer.is_global_zero:
        print(f"hspace generate: {g.num_samples} samples in {samples_dir(run_dir)}")
    return manifest
