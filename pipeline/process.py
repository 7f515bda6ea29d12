"""Process-wide settings the command line makes before anything imports torch or numpy, and the
command line itself (the report shows it)."""
from __future__ import annotations

import os


def passive_openmp_waits() -> None:
    """Threads waiting for work sleep instead of spinning, unless the environment says otherwise:
    torch's OpenMP pool (``OMP_WAIT_POLICY=PASSIVE``) and numpy's OpenBLAS pool
    (``OPENBLAS_THREAD_TIMEOUT=4``, the shortest spin it allows). Effective only before torch and
    numpy are imported (the command line calls it first). On a machine shared with other jobs,
    spinning threads waiting for a descheduled one multiply the time (figures: docs/benchmarks.md)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")


#: the command this process runs, as the command line recorded it (None: not started by `hspace`)
_COMMAND: dict | None = None


def record_command(argv: list[str], config: str | None) -> None:
    """Remember the command line (``argv`` without the program name), the working directory and the
    configuration file read (None: the built-in defaults), for the pages that say how they were made."""
    global _COMMAND
    _COMMAND = {"argv": ["hspace", *map(str, argv)], "cwd": os.getcwd(),
                "config": os.path.abspath(config) if config is not None else None}


def command() -> dict | None:
    """What :func:`record_command` recorded in this process, or None."""
    return None if _COMMAND is None else dict(_COMMAND)
