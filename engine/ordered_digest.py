"""The object's plaintext digests, computed in order while its parts finish in any order.

Parts of a multipart object are read and uploaded concurrently and finish in any order, but the
object's SHA-256 (and MD5, checked against the source's Content-MD5) needs the plaintext in order.
Finished parts wait in a small reorder buffer, and whoever fills the gap hashes the run. Because
the pipeline acquires the parts' memory in part order, a part in the buffer never waits for memory
held by a later one: no deadlock (STYLE.md #7).
"""

from __future__ import annotations

import hashlib
import threading
from typing import Callable


# hashlib lets go of the GIL for every update of 2 KiB or more (CPython's HASHLIB_GIL_MINSIZE,
# 2048). For a small object's bytes the hand-off costs more than it frees: another driver takes
# the GIL, and this one waits to have it back, three times per object (SHA-256 and MD5 of the
# plaintext, MD5 of the ciphertext). Hashed in slices below the threshold, GIL held, a 16 KiB
# object cost 7-9 % less CPU on the engine alone with eight drivers (bench/README.md). Larger
# buffers still let go: their hashing runs beside the other threads' work.
_SLICE = 2047
HELD_UP_TO = 32 * 1024


def update(hasher, data: bytes | bytearray | memoryview) -> None:
    """`hasher.update(data)`, without letting go of the GIL for small buffers (above)."""
    n = len(data) if not isinstance(data, memoryview) else data.nbytes
    if n <= _SLICE or n > HELD_UP_TO:
        hasher.update(data)
        return
    view = memoryview(data)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    for at in range(0, n, _SLICE):
        hasher.update(view[at:at + _SLICE])


def md5_digest(data: bytes | bytearray | memoryview) -> bytes:
    """The MD5 of `data`, hashed as `update` hashes."""
    hasher = hashlib.md5()
    update(hasher, data)
    return hasher.digest()


class OrderedDigest:
    """SHA-256 (always) and MD5 (when asked) of the plaintext, fed in any order, hashed in order."""

    def __init__(self, want_md5: bool):
        self.sha256 = hashlib.sha256()
        self.md5 = hashlib.md5() if want_md5 else None
        self.count = 0  # plaintext bytes hashed
        self._next = 0
        self._pending: dict[int, tuple[bytes | memoryview, Callable[[], None]]] = {}
        self._lock = threading.Lock()
        self._draining = False
        self._abandoned = False

    def update(self, data: bytes | memoryview) -> None:
        """Hash `data` now (the caller guarantees order: single PUTs and streamed parts)."""
        update(self.sha256, data)
        if self.md5 is not None:
            update(self.md5, data)
        self.count += len(data)

    def feed(self, index: int, data: bytes | memoryview, done: Callable[[], None]) -> None:
        """Hash chunk `index` (0-based) once every chunk before it is hashed; call `done` after."""
        with self._lock:
            if self._abandoned:
                abandoned = True
            else:
                abandoned = False
                self._pending[index] = (data, done)
                if self._draining:
                    return
                self._draining = True
        if abandoned:
            done()
            return
        while True:
            with self._lock:
                item = None if self._abandoned else self._pending.pop(self._next, None)
                if item is None:
                    self._draining = False
                    return
                self._next += 1
            self.update(item[0])
            item[1]()

    @property
    def chunks_hashed(self) -> int:
        with self._lock:
            return self._next

    def abandon(self) -> None:
        """The attempt failed: drop what waits for hashing and give its memory back."""
        with self._lock:
            self._abandoned = True
            items = list(self._pending.values())
            self._pending.clear()
        for _, done in items:
            done()

    def snapshot(self) -> tuple:
        return (self.sha256.copy(), self.md5.copy() if self.md5 is not None else None, self.count)

    def restore(self, snap: tuple) -> None:
        sha, md5, count = snap
        self.sha256 = sha.copy()
        self.md5 = md5.copy() if md5 is not None else None
        self.count = count
