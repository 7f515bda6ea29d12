"""Lightning wiring shared by the distributed stages (generate, annotate, pca, jacobian, evaluate): the
Trainer and its settings checked before anything is written (:func:`check_trainer`), the one runner of a
stage's predict sequence (:func:`predict_parts`), work sharing, the part writer and the meeting of the ranks."""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from tqdm.auto import tqdm

from pipeline.errors import ConfigError, Interrupted
from pipeline.io import atomic_path, launching_rank  # noqa: F401 (launching_rank: re-exported)


def make_trainer(trainer_cfg, callbacks: list, **kwargs) -> L.Trainer:
    """A predict-only Trainer from the ``trainer`` section; each stage brings its own sampler.

    Lightning's start-up banner is silenced (our stages print their own one-line summaries)."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*Couldn't infer the batch indices.*")
    warnings.filterwarnings("ignore", message=".*predict returned None.*")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
    return L.Trainer(
        accelerator=trainer_cfg.accelerator,
        devices=trainer_cfg.devices,
        num_nodes=trainer_cfg.num_nodes,
        strategy=trainer_cfg.strategy,
        precision=trainer_cfg.precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[*callbacks, StopRanksOnInterrupt()],
        **kwargs,
    )


#: the variables with which a user starts the processes of a multi-node job by hand (Lightning's own environment)
MANUAL_CLUSTER = ("MASTER_ADDR", "NODE_RANK")


def check_trainer(trainer_cfg) -> None:
    """Refuse ``trainer`` settings that cannot work, as a ConfigError naming them, before a stage writes
    anything: Lightning's own checks of the accelerator, devices and strategy (a Trainer is built, not
    run), and several nodes where no cluster environment would start the others (the first node would
    wait for them forever)."""
    settings = (f"trainer.accelerator={trainer_cfg.accelerator} trainer.devices={trainer_cfg.devices} "
                f"trainer.strategy={trainer_cfg.strategy} trainer.num_nodes={trainer_cfg.num_nodes}")
    try:
        trainer = make_trainer(trainer_cfg, [])
    except Exception as e:  # noqa: BLE001 (Lightning raises ValueError, TypeError, MisconfigurationException...)
        why = " ".join(str(e).split()).split(" Example choices")[0].split(" Find a complete list")[0]
        raise ConfigError(f"{settings}: {why}; see `hspace config` for what each key accepts") from None
    environment = type(trainer._accelerator_connector.cluster_environment).__name__
    manual = all(os.environ.get(v) for v in MANUAL_CLUSTER)
    if int(trainer_cfg.num_nodes) > 1 and environment == "LightningEnvironment" and not manual:
        raise ConfigError(f"trainer.num_nodes={trainer_cfg.num_nodes}: no cluster environment found (SLURM, torchrun, "
                          f"LSF, Kubeflow, MPI), so no other node would join and this one would wait for them forever; "
                          f"start the command on every node through your scheduler (e.g. srun), or set MASTER_ADDR, "
                          f"MASTER_PORT and NODE_RANK on each node, or set trainer.num_nodes=1")


def predict_parts(trainer_cfg, module: L.LightningModule, data: L.LightningDataModule, *, tag: str,
                  merge: Callable[[], object], parts: Path | None = None, name: Callable | None = None,
                  write: Callable | None = None, progress: "ItemsProgress | None" = None,
                  clean: Callable[[], object] | None = None, fsync: bool = False, queue_size: int = 0,
                  **trainer_kwargs) -> L.Trainer:
    """The one predict sequence of a distributed stage: rank 0 cleans up what no longer belongs
    (``clean``), every rank agrees once it has, then ``Trainer.predict`` with the part writer (one part
    per batch in ``parts``: ``name(prediction)`` and ``write(prediction, path)``), the progress bar and
    ``merge`` on rank 0 once every rank has finished (:class:`AfterAllRanks`). -> the Trainer."""
    rank0_first(clean)
    callbacks = [PartWriter(parts, name, write, fsync=fsync, queue_size=queue_size)] if parts is not None else []
    callbacks += [progress] if progress is not None else []
    trainer = make_trainer(trainer_cfg, [*callbacks, AfterAllRanks(merge, tag)], **trainer_kwargs)
    trainer.predict(module, datamodule=data, return_predictions=False)
    return trainer


def rank0_first(fn: Callable[[], object] | None):
    """``fn()`` on rank 0 (a clean-up of what no longer belongs), then every rank goes on -> rank 0's
    result on every rank."""
    return agreed(fn() if fn is not None and launching_rank() == 0 else None)


def join_launched_ranks(trainer_cfg) -> None:
    """Under a launcher that starts every rank at once (torchrun, srun), form the process group
    before the stage's first file is read, so that :func:`agreed` holds from the start (Lightning
    then uses this group). Only when the ``trainer`` section asks for several processes, so that a
    single process inside a SLURM allocation does not wait for ranks that never come. gloo: it
    carries these few small messages on CPU and GPU alike."""
    import torch.distributed as dist
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
    from lightning.fabric.utilities.distributed import _init_dist_connection

    if not dist.is_available() or dist.is_initialized():
        return
    devices = trainer_cfg.devices
    single = (len(devices) == 1) if isinstance(devices, Sequence) and not isinstance(devices, str) else str(devices) == "1"
    if single and int(trainer_cfg.num_nodes) == 1:
        return
    env = next((E() for E in (TorchElasticEnvironment, SLURMEnvironment) if E.detect()), None)
    if env is not None and env.world_size() > 1:
        _init_dist_connection(env, "gloo")  # what Lightning's DDP strategy calls, with its own environment


def agreed(decision):
    """Rank 0's ``decision`` on every rank, once rank 0 has got here (a barrier that carries a value).

    For decisions read from files that rank 0 may still be changing (identity records, parts it deletes
    or quarantines). A no-op in one process, and before Lightning has started the other
    processes, which then begin the command from the top with rank 0's files in place."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return decision
    box = [decision]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def share_cpu_threads(trainer: L.Trainer) -> None:
    """Several CPU processes on one machine: split the cores instead of oversubscribing them
    (unless OMP_NUM_THREADS says otherwise)."""
    if trainer.strategy.root_device.type == "cpu" and trainer.world_size > 1 and "OMP_NUM_THREADS" not in os.environ:
        per_node = max(1, trainer.world_size // max(1, trainer.num_nodes))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // per_node))


class ItemsList(torch.utils.data.Dataset):
    """A list of work items (e.g. lists of seeds), one item per batch."""

    def __init__(self, items: list):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def loader(items: list) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(ItemsList(items), batch_size=None, shuffle=False,
                                       collate_fn=lambda x: x)


IDLE = None  # the work item of a rank with nothing to do: predict_step returns None for it


class RankShare(L.LightningDataModule):
    """Work items for ``Trainer.predict``, each rank taking ``items[rank::world_size]``.

    Subclasses list the work still to do in ``plan()`` (called on every rank after they have all
    started). A rank whose share is empty (fewer items than processes: one Jacobian sample on two
    GPUs, the last parts of a resumed run) gets one ``IDLE`` item instead: Lightning refuses an
    empty dataloader, and a rank that predicts nothing would skip the end-of-predict hooks where
    the ranks meet (``AfterAllRanks``)."""

    def plan(self) -> list:
        raise NotImplementedError

    def setup(self, stage: str) -> None:
        self.items = self.plan()[self.trainer.global_rank::self.trainer.world_size] or [IDLE]

    def predict_dataloader(self):
        return loader(self.items)


class ItemModule(L.LightningModule):
    """A predict-only module over :class:`RankShare` items: subclasses write ``predict_item(item)``;
    the ``IDLE`` item of a rank with nothing to do predicts nothing."""

    def predict_step(self, item, batch_idx: int):
        return None if item is IDLE else self.predict_item(item)

    def predict_item(self, item):
        raise NotImplementedError


class ItemsProgress(L.Callback):
    """A progress bar on rank 0 counting items (samples/images) per second across all ranks
    (estimated as rank 0's rate times the world size); ``total_items``: a number, or a function giving it
    when predicting starts (after the clean-up)."""

    def __init__(self, desc: str, total_items, count=len, unit: str = "samples"):
        self.desc, self.total, self.count, self.unit = desc, total_items, count, unit
        self.bar = None

    def on_predict_start(self, trainer, pl_module):
        if callable(self.total):
            self.total = self.total()
        if trainer.is_global_zero:
            self.bar = tqdm(total=self.total, desc=self.desc, unit=self.unit, dynamic_ncols=True, smoothing=0.1)
            self.start = time.perf_counter()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if self.bar is not None and batch is not IDLE:
            self.bar.update(min(self.count(batch) * trainer.world_size, self.total - self.bar.n))

    def on_predict_end(self, trainer, pl_module):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Background:
    """One worker thread running jobs in the order given, with at most ``maxsize`` waiting
    (``submit`` blocks beyond that, so memory stays bounded). The first job that fails stops
    the others; its exception is raised in the submitting thread at the next ``submit`` or at
    ``close``."""

    def __init__(self, maxsize: int, name: str = "hspace-writer"):
        self.jobs: queue.Queue = queue.Queue(maxsize=max(1, maxsize))
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if self.error is None:
                try:
                    job()
                except BaseException as e:  # noqa: BLE001 (handed to the submitting thread)
                    self.error = e

    def _raise(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def submit(self, job: Callable[[], None]) -> None:
        self._raise()
        self.jobs.put(job)

    def close(self, raise_error: bool = True) -> None:
        """Wait for the jobs submitted so far, stop the thread, raise a job's error."""
        if self.thread.is_alive():
            self.jobs.put(None)
            self.thread.join()
        if raise_error:
            self._raise()


class PartWriter(BasePredictionWriter):
    """The one writer of the distributed stages' batches: each rank writes one part per predicted
    batch, atomically (a temporary name renamed into place), so a killed run leaves only whole
    parts and a re-run skips them; nothing is gathered in memory. ``name(prediction)`` -> file
    name, ``write(prediction, path)`` writes it (shards, annotation, Jacobian and evaluation
    parts); ``fsync``: flush each part to disk before the rename. ``queue_size`` > 0: the parts
    are written by a :class:`Background` thread while the next batches are predicted (at most
    that many waiting), in the same order and with the same bytes; every part is on disk when
    predicting ends (before the callbacks after this one, e.g. :class:`AfterAllRanks`, run)."""

    def __init__(self, directory: Path, name: Callable[[object], str], write: Callable[[object, Path], None],
                 fsync: bool = False, queue_size: int = 0):
        super().__init__(write_interval="batch")
        self.directory, self.name, self.write, self.fsync = Path(directory), name, write, fsync
        self.queue_size, self.background = int(queue_size), None

    def write_part(self, prediction) -> None:
        with atomic_path(self.directory / self.name(prediction), fsync=self.fsync) as tmp:
            self.write(prediction, tmp)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        if batch is IDLE:
            return
        if self.queue_size <= 0:
            self.write_part(prediction)
            return
        if self.background is None:
            self.background = Background(self.queue_size)
        self.background.submit(lambda: self.write_part(prediction))

    def _finish(self, raise_error: bool) -> None:
        background, self.background = self.background, None
        if background is not None:
            background.close(raise_error)

    def on_predict_end(self, trainer, pl_module):
        self._finish(raise_error=True)

    def on_exception(self, trainer, pl_module, exception):
        self._finish(raise_error=False)  # the parts already queued are whole: written, then the error goes on


class StopRanksOnInterrupt(L.Callback):
    """On SIGINT/SIGTERM (:class:`~pipeline.errors.Interrupted`) in the process the user started,
    stop the processes Lightning launched too, as Lightning does for a KeyboardInterrupt
    (their temporary files are swept by the next run)."""

    def on_exception(self, trainer, pl_module, exception):
        from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
        from lightning.pytorch.trainer.connectors.signal_connector import _get_sigkill_signal

        launcher = trainer.strategy.launcher
        if isinstance(exception, Interrupted) and isinstance(launcher, _SubprocessScriptLauncher):
            launcher.kill(_get_sigkill_signal())


class AfterAllRanks(L.Callback):
    """When every rank has finished predicting, ``fn()`` on rank 0 only (merge the parts, write
    the result), then every rank goes on: nothing is gathered in memory.

    ``part()``, if given, runs on every rank first: a stage whose ranks each fold all their items
    into one result (PCA's partial sums) writes it there, where the others have written one part per
    batch with :class:`PartWriter`. ``then()``, if given, runs on every rank after ``fn()``: to learn
    what rank 0 decided (another pass of an iterative method, or an error), e.g. with :func:`agreed`."""

    def __init__(self, fn: Callable[[], object], tag: str, part: Callable[[], object] | None = None,
                 then: Callable[[], object] | None = None):
        self.fn, self.tag, self.part, self.then = fn, tag, part, then

    def on_predict_end(self, trainer, pl_module):
        if self.part is not None:
            self.part()
        trainer.strategy.barrier(f"hspace-{self.tag}-end")
        if trainer.is_global_zero:
            self.fn()
        trainer.strategy.barrier(f"hspace-{self.tag}-done")
        if self.then is not None:
            self.then()
