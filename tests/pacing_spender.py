"""A process that spends tokens of a shared rate limit as fast as it is let (tests/unit/test_pacing.py):
a module of its own so that a spawned process imports only what it needs."""

from __future__ import annotations

import time

from engine.pacing import SharedRate
from engine.state import StateStore


def spend(url: str, name: str, rate: float, seconds: float, start, out) -> None:
    """Take tokens of `name` for `seconds` from when every process passed the `start` barrier;
    put how many on `out`."""
    store = StateStore(url)
    limit = SharedRate(name, lambda: rate, store)
    start.wait(timeout=120)
    taken, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        limit.take()
        taken += 1
    store.close()
    out.put(taken)
