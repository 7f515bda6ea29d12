"""Process-wide settings the command line makes before anything imports torch or numpy."""
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
