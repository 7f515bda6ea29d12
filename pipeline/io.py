"""Files written whole or not at all, stale temporary files swept, a run-directory lock, content hashes.

Every file or folder the pipeline writes goes through :func:`atomic_path`: the content is written
to a temporary name in the same folder (``.<name>.<pid>-<host>.tmp<suffix>``) and renamed into
place, so a reader sees the old version or the new one, never half of one. On any failure (a
full disk, a signal, a bug) the temporary is removed; an operating-system ``OSError`` becomes a
one-line :class:`~pipeline.errors.StorageError` naming the path, while the pipeline's own errors
(:class:`~pipeline.errors.HSpaceError`, some of them ``OSError`` subclasses) pass through unchanged.
Temporaries of processes killed with SIGKILL (which no handler sees) are removed by
:func:`sweep_temp_files` when the next stage starts.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

from pipeline.errors import HSpaceError, RunLockedError, StorageError

_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname().split(".")[0]) or "host"
#: .<name>.<pid>-<host>.tmp<suffix>: the writer's pid and host, so a sweep knows whose it is
_TEMP_RE = re.compile(r"^\..+\.(\d+)-([A-Za-z0-9-]+)\.tmp(\.[A-Za-z0-9]+)?$")
#: what a library that writes its own temporary leaves (safetensors' ``save_file``, Rust's tempfile: ``.tmpXXXXXX``);
#: the pipeline writes none of these itself, so under the run directory's lock any one is stale
_FOREIGN_TEMP_RE = re.compile(r"^\.tmp[A-Za-z0-9]{6}$")


def temp_name(path: Path) -> Path:
    """The temporary sibling of ``path`` this process writes (keeps the suffix: some writers
    choose the format by it)."""
    return path.with_name(f".{path.name}.{os.getpid()}-{_HOST}.tmp{path.suffix}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def storage_error(e: OSError, path: Path) -> StorageError:
    """A one-line error naming the path (a full disk says so)."""
    why = "no space left on the device" if e.errno == errno.ENOSPC else (e.strerror or type(e).__name__)
    return StorageError(f"cannot write {path}: {why}; free space or fix the folder, then re-run the same command")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = False) -> Iterator[Path]:
    """Yields a temporary path next to ``path``; write the file (or folder) there. On success it is
    renamed onto ``path`` (a folder replaces the old folder); on any exception it is removed and an
    operating-system ``OSError`` is re-raised as :class:`StorageError` (an :class:`HSpaceError` raised
    inside the ``with``, e.g. a :class:`DatasetError`, is re-raised as it is: it already says what is
    wrong). ``fsync``: flush a file to disk first."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise storage_error(e, path) from None
    tmp = temp_name(path)
    _remove(tmp)
    try:
        yield tmp
        if fsync and tmp.is_file():
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        if tmp.is_dir() and path.is_dir():  # os.replace cannot replace a non-empty folder
            old = path.with_name(f".{path.name}.{os.getpid()}-{_HOST}.tmp.old")
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
    except BaseException as e:
        _remove(tmp)
        if isinstance(e, OSError) and not isinstance(e, HSpaceError):
            raise storage_error(e, path) from None
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes, fsync: bool = False) -> Path:
    with atomic_path(path, fsync) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode())


def write_json_atomic(path: str | os.PathLike, data) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2, default=str))


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """A ``.safetensors`` file written through :func:`atomic_path` (safetensors' own ``save_file`` writes a
    temporary of its own, which a sweep would not know and an OS error would not name)."""
    with atomic_path(path) as tmp:
        write_safetensors(tensors, tmp, metadata)
    return Path(path)


def write_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Serialise ``tensors`` (name -> torch tensor) to ``path`` as it is (a temporary of
    :func:`atomic_path`, or a part of a :class:`PartWriter`); an OS error stays an ``OSError``."""
    from safetensors.torch import save

    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)
    with open(path, "wb") as f:
        f.write(data)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_temp_files(root: str | os.PathLike) -> list[Path]:
    """Remove the temporaries under ``root`` left by processes of this host that are gone, and those a
    library left (``.tmpXXXXXX``) -> their paths. Called under the run directory's lock."""
    removed = []
    root = Path(root)
    if not root.is_dir():
        return removed
    for path in root.rglob(".tmp*"):
        if _FOREIGN_TEMP_RE.match(path.name) and path.is_file():
            _remove(path)
            removed.append(path)
    for path in root.rglob(".*.tmp*"):
        m = _TEMP_RE.match(path.name)
        if m and m.group(2) == _HOST and not _alive(int(m.group(1))):
            _remove(path)
            removed.append(path)
    return removed


# ---------------------------------------------------------------------- the run-directory lock
LOCK = ".lock"
_held: dict[str, str] = {}  # resolved run directory -> the command of this process that holds its lock


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike, command: str, enabled: bool = True) -> Iterator[Path | None]:
    """Hold ``<run_dir>/.lock`` for the duration: one writer per run directory, whatever it writes (a
    stage, ``hspace run``, explore's saving); readers take nothing. Another holder ->
    :class:`RunLockedError` naming its command, pid and host. The kernel releases the lock when its
    process dies, so the lock of a dead process is simply taken over. Re-entrant within a process
    (``hspace run`` holds it for each of its stages). ``enabled=False`` (the other ranks of a
    multi-process job, which rank 0's lock covers) holds nothing."""
    key = str(Path(run_dir).resolve())
    if not enabled or key in _held:
        yield None
        return
    path = Path(run_dir) / LOCK
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise storage_error(e, path) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
            except ValueError:
                holder = {}
            raise RunLockedError(
                f"{Path(run_dir)} is in use: `hspace {holder.get('command', '?')}` is writing there in process "
                f"{holder.get('pid', '?')} on host {holder.get('host', '?')} (since {holder.get('since', '?')}); wait "
                f"for it to finish or stop it, or use another run_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"command": command, "pid": os.getpid(), "host": socket.gethostname(),
                                  "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
        _held[key] = command
        try:
            yield path
        finally:
            del _held[key]
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def holds_lock(run_dir: str | os.PathLike) -> bool:
    """Whether this process holds the run directory's writer lock."""
    return str(Path(run_dir).resolve()) in _held


def launching_rank() -> int:
    """This process's global rank before any Trainer exists: 0 in the process the user started;
    Lightning's launchers and cluster schedulers set these variables in the others."""
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(var):
            return int(os.environ[var])
    return 0


@contextlib.contextmanager
def writing(run_dir: str | os.PathLike, command: str, rank0: bool = True) -> Iterator[None]:
    """What every command that writes a run directory does first (rank 0 only; the other ranks of a
    multi-process job run under rank 0's lock): take the run directory's lock, then remove the
    temporary files of processes that are gone."""
    fresh = rank0 and not holds_lock(run_dir)
    with run_lock(run_dir, command, enabled=rank0):
        if fresh:
            swept = sweep_temp_files(run_dir)
            if swept:
                print(f"hspace {command}: removed {len(swept)} temporary file(s) left by an interrupted run "
                      f"(e.g. {swept[0]})", file=sys.stderr)
        yield


# ---------------------------------------------------------------------- content hashes
def hash_json(*parts) -> str:
    """A short stable hash of JSON-able values (sorted keys)."""
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def hash_file(path: str | os.PathLike, h=None) -> str:
    """sha256 of a file's bytes (streamed)."""
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def hash_tree(folder: str | os.PathLike, big: int = 256 * 2**20) -> str:
    """A content hash of every file under ``folder`` (names and bytes; files over ``big`` bytes by
    size and modification time, which is what a copy or download changes)."""
    h = hashlib.sha256()
    root = Path(folder)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        st = path.stat()
        h.update(f"{path.relative_to(root)}:{st.st_size}:".encode())
        if st.st_size > big:
            h.update(str(st.st_mtime_ns).encode())
        else:
            hash_file(path, h)
    return h.hexdigest()[:16]
