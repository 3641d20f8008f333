"""One byte budget for every payload buffer the process holds (ARCHITECTURE.md §4, STYLE.md #6).

Peak in-flight payload <= `capacity`, whatever the object sizes and however many objects run at
once. "Payload" is every buffer the engine holds for a transfer: a part's plaintext read from the
source, its output (ciphertext) when the output format makes a copy, and the slice a streamed part
is currently sending. Fixed per-thread overhead (stacks, SDK request state) and the interpreter
are outside the budget; the README's formula (copied from `engine.settings.TransferSettings`) adds
them.

Policy for a request larger than the whole budget: it is refused with `ValueError` (it could never
be granted). The pipeline never makes one: a part whose buffer would exceed half the budget is
streamed in slices of whole segments, and only one slice's worth is held for it, so the bound holds
for a 5 GB part with a 256 MiB budget.

With the engine's settings (see `engine.settings.TransferSettings`)::

    peak in-flight payload <= memory_budget
    peak process memory    ~= memory_budget + (concurrency + object_concurrency) x per-thread overhead
                              + process baseline

Grants are first come, first served: a large request waiting at the head of the queue is not
overtaken by a stream of small ones (which would starve it). No deadlock: only object drivers
acquire (before they submit work), in part order within an object; transfer workers never wait on
the budget, so every holder can finish and release without asking for more.
"""

from __future__ import annotations

import threading
from collections import deque


class MemoryBudget:
    """A counting semaphore in bytes, FIFO, with peak tracking for tests and metrics."""

    def __init__(self, capacity: int):
        if capacity <= 0:
            raise ValueError(f"the memory budget must be a positive number of bytes, not {capacity}")
        self.capacity = capacity
        self._in_use = 0
        self._peak = 0
        self._cond = threading.Condition()
        self._queue: deque[object] = deque()
        self.grants = 0  # number of successful acquisitions (tests check the budget was exercised)

    @property
    def in_use(self) -> int:
        with self._cond:
            return self._in_use

    @property
    def peak(self) -> int:
        """The largest number of bytes ever held at once since creation (or `reset_peak`)."""
        with self._cond:
            return self._peak

    def reset_peak(self) -> None:
        with self._cond:
            self._peak = self._in_use

    def acquire(self, n: int, cancel: threading.Event | None = None) -> bool:
        """Block until `n` bytes are available, then hold them. Returns False only if `cancel` was set
        while waiting (nothing is held then). ``n == 0`` returns at once."""
        if n < 0:
            raise ValueError(f"cannot acquire a negative number of bytes ({n})")
        if n > self.capacity:
            raise ValueError(
                f"a request for {n:,} bytes can never fit in the memory budget of {self.capacity:,} bytes; "
                "stream it in slices instead"
            )
        if n == 0:
            return True
        ticket = object()
        with self._cond:
            self._queue.append(ticket)
            try:
                while self._queue[0] is not ticket or self._in_use + n > self.capacity:
                    if cancel is not None and cancel.is_set():
                        return False
                    # A timeout only so that `cancel` is noticed without a release to wake us.
                    self._cond.wait(timeout=0.05 if cancel is not None else None)
                self._in_use += n
                self.grants += 1
                if self._in_use > self._peak:
                    self._peak = self._in_use
                return True
            finally:
                self._queue.remove(ticket)
                # The next in line may fit now (or the head changed because we gave up).
                self._cond.notify_all()

    def release(self, n: int) -> None:
        if n == 0:
            return
        with self._cond:
            if n > self._in_use:
                raise RuntimeError(f"released {n:,} bytes but only {self._in_use:,} are held")
            self._in_use -= n
            self._cond.notify_all()

    def hold(self, n: int) -> "_Hold":
        """``with budget.hold(n):`` acquire `n` bytes for the block."""
        return _Hold(self, n)


class _Hold:
    def __init__(self, budget: MemoryBudget, n: int):
        self.budget = budget
        self.n = n

    def __enter__(self) -> "_Hold":
        self.budget.acquire(self.n)
        return self

    def __exit__(self, *exc) -> None:
        self.budget.release(self.n)


class Lease:
    """Bytes held for one part until every named holder is done with them (e.g. the in-order hasher
    and the upload). Releasing twice for the same holder is harmless; the bytes go back once."""

    def __init__(self, budget: MemoryBudget, n: int, holders: tuple[str, ...]):
        self._budget = budget
        self._n = n
        self._pending = set(holders)
        self._lock = threading.Lock()

    def done(self, holder: str) -> None:
        with self._lock:
            if holder not in self._pending:
                return
            self._pending.discard(holder)
            last = not self._pending
        if last:
            self._budget.release(self._n)

    def release_all(self) -> None:
        with self._lock:
            had = bool(self._pending)
            self._pending.clear()
        if had:
            self._budget.release(self._n)
