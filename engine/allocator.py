"""Keep glibc's allocator from handing every part buffer back to the kernel.

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
import logging
import sys

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
