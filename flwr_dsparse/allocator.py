"""The allocator settings every training process runs with: the one place they are defined.

glibc's malloc keeps freed blocks for reuse and adapts its mmap threshold upwards as large
blocks are freed, so after a few steps most of a step's tensors live in the heap and stay
resident after they die: a peak RSS that wanders by tens of MB between identical runs. With
a *fixed* mmap threshold every block larger than it is its own mapping, returned to the OS
the moment the tensor dies, and a fixed trim threshold gives the heap's free top back too:
the workspace of a step is then its live tensors, stable from run to run, and small.

Two ways in, both from :data:`MALLOC_SETTINGS`:

* :func:`tune_allocator` calls ``mallopt`` through ctypes: it takes effect at once, in the
  running process. Every training process calls it at start (the memory probe, the
  ClientApp's train handler, collective ranks, simulation actors).
* :func:`allocator_env` gives the ``MALLOC_*_`` environment variables for a process about to
  be started (glibc reads them once, at process start).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Mapping

__all__ = ["ALLOCATORS", "MALLOC_SETTINGS", "allocator_env", "allocator_is_tuned", "tune_allocator"]

#: ``mallopt`` parameter -> (its number in glibc's malloc.h, value, environment variable).
#: 128 KiB is glibc's own initial mmap threshold: fixing it there stops the upward drift.
#: Two arenas: the training threads (1-2 intra-op threads) need no more, and each extra arena
#: is a heap that holds freed memory of its own.
MALLOC_SETTINGS: Mapping[str, tuple[int, int, str]] = {
    "M_MMAP_THRESHOLD": (-3, 128 * 1024, "MALLOC_MMAP_THRESHOLD_"),
    "M_TRIM_THRESHOLD": (-1, 128 * 1024, "MALLOC_TRIM_THRESHOLD_"),
    "M_ARENA_MAX": (-8, 2, "MALLOC_ARENA_MAX"),
}

#: How a process's allocator can be set, for the cost model's calibration: ``"tuned"``
#: (:data:`MALLOC_SETTINGS`, how every training process runs) or ``"stock"`` (glibc as is).
ALLOCATORS = ("tuned", "stock")

_tuned = False


def allocator_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default ``os.environ``) plus the ``MALLOC_*`` variables of :data:`MALLOC_SETTINGS`."""
    environment = dict(os.environ if base is None else base)
    environment.update({variable: str(value) for _, value, variable in MALLOC_SETTINGS.values()})
    return environment


def tune_allocator() -> bool:
    """Apply :data:`MALLOC_SETTINGS` to this process with ``mallopt``; idempotent.

    Returns False (and changes nothing) where the C library is not glibc.
    """
    global _tuned
    if _tuned:
        return True
    try:
        libc = _load_libc()
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _tuned = all(mallopt(number, value) == 1 for number, value, _ in MALLOC_SETTINGS.values())
    return _tuned


def _load_libc() -> ctypes.CDLL:
    # glibc's soname first: ``find_library`` runs ``ldconfig -p`` in a subprocess, which a rank
    # forked from a large process on a loaded machine can wait seconds for.
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so")


def allocator_is_tuned() -> bool:
    """Whether :func:`tune_allocator` succeeded in this process, or the environment set the same values."""
    return _tuned or all(os.environ.get(variable) == str(value) for _, value, variable in MALLOC_SETTINGS.values())
