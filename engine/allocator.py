"""Keep glibc's allocator from handing every part buffer back to the kernel, and the cyclic garbage
collector from walking, again and again, what a run holds from start to end.

The pipeline allocates and frees buffers of a part size (16 MiB by default) over and over, from
several threads. With glibc's defaults each such buffer is a fresh mmap (above the 128 KiB mmap
threshold, which only rises dynamically up to 32 MiB) and is unmapped on free, so every part pays
its page faults again (measured: about 0.4 CPU-s/GB of system time), and per-thread arenas keep
fragments of their own. Serving part buffers from one heap that is not trimmed below the memory
budget removes that cost and lowers peak RSS; the heap never grows past what the budget lets the
engine hold at once, plus the interpreter's own.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import sys
import threading

log = logging.getLogger(__name__)

# mallopt(3) parameters (glibc malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc refuses larger values (HEAP_MAX / 2 on 64-bit)


def tune_malloc(memory_budget: int) -> bool:
    """Apply the settings above (Linux with glibc only; elsewhere a no-op). Returns True if applied.

    Call it early, before worker threads start: arenas that already exist are not merged.
    """
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(M_ARENA_MAX, 1) == 1
    ok &= mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1
    ok &= mallopt(M_TRIM_THRESHOLD, max(min(memory_budget, 2**31 - 1), 0)) == 1
    if not ok:
        log.debug("mallopt refused part of the allocator settings (not glibc?)")
    return bool(ok)


# How many runs of this process hold the collector's long-lived objects frozen (`freeze_long_lived`).
_frozen = 0
_frozen_lock = threading.Lock()


def freeze_long_lived() -> None:
    """Once a run is open (modules imported, clients, keys and the state store opened): leave
    everything alive out of the cyclic collector's full passes (`gc.freeze`, a constant-time move
    of the collector's lists). No collection first: a dead cycle frozen with the run is freed when
    the run thaws, and a collection per run opened would cost a large process (a test session) a
    pass over every object it holds.

    Those objects (a hundred thousand and more: SQLAlchemy, botocore, the Azure SDK, Prefect) live
    as long as the run, yet each full collection walked them all again (about 60 ms each, a few
    per thousand small objects copied: 3 % of a small-object run's CPU, measured). Reference
    counting still frees them. Call `thaw_long_lived` when the run ends: a process that runs
    several (tests, a flow's process) gets them back under the collector then."""
    global _frozen
    with _frozen_lock:
        _frozen += 1
        gc.freeze()


def thaw_long_lived() -> None:
    """The end of a run that called `freeze_long_lived`: once no run of the process is left, what
    was frozen is back under the collector (cycles it has left since are collected)."""
    global _frozen
    with _frozen_lock:
        _frozen = max(_frozen - 1, 0)
        if _frozen == 0:
            gc.unfreeze()
