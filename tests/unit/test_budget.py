"""The process-wide memory budget: blocking, FIFO fairness, peak, refusal of impossible requests."""

from __future__ import annotations

import threading
import time

import pytest

from engine.budget import Lease, MemoryBudget


def test_acquire_release_tracks_in_use_and_peak():
    b = MemoryBudget(100)
    b.acquire(30)
    b.acquire(50)
    assert b.in_use == 80 and b.peak == 80
    b.release(50)
    b.acquire(10)
    assert b.in_use == 40 and b.peak == 80
    b.release(40)
    assert b.in_use == 0


def test_acquire_blocks_until_enough_is_released():
    b = MemoryBudget(100)
    b.acquire(90)
    got = threading.Event()

    def taker():
        b.acquire(20)
        got.set()

    t = threading.Thread(target=taker)
    t.start()
    assert not got.wait(0.1)
    b.release(90)
    assert got.wait(2)
    t.join()
    assert b.in_use == 20 and b.peak == 90


def test_a_large_request_is_not_starved_by_small_ones():
    b = MemoryBudget(10)
    b.acquire(6)
    order = []

    def take(n, name):
        b.acquire(n)
        order.append(name)

    big = threading.Thread(target=take, args=(8, "big"))
    big.start()
    time.sleep(0.05)  # "big" is now first in line
    small = threading.Thread(target=take, args=(3, "small"))
    small.start()
    time.sleep(0.05)
    # 4 bytes are free and "small" wants 3, but it queued behind "big".
    assert order == []
    b.release(6)
    big.join(2)
    assert order == ["big"]
    b.release(8)
    small.join(2)
    assert order == ["big", "small"]


def test_a_request_larger_than_the_budget_is_refused_at_once():
    b = MemoryBudget(100)
    with pytest.raises(ValueError, match="stream it in slices"):
        b.acquire(101)
    assert b.acquire(100)  # exactly the budget is fine
    b.release(100)


def test_a_cancelled_wait_holds_nothing():
    b = MemoryBudget(10)
    b.acquire(10)
    cancel = threading.Event()
    result = []
    t = threading.Thread(target=lambda: result.append(b.acquire(5, cancel=cancel)))
    t.start()
    time.sleep(0.05)
    cancel.set()
    t.join(2)
    assert result == [False]
    b.release(10)
    assert b.in_use == 0
    assert b.acquire(10)  # the cancelled ticket left the queue


def test_lease_returns_the_bytes_once_every_holder_is_done():
    b = MemoryBudget(10)
    b.acquire(4)
    lease = Lease(b, 4, ("hash", "upload"))
    lease.done("upload")
    assert b.in_use == 4
    lease.done("upload")  # twice for one holder changes nothing
    assert b.in_use == 4
    lease.done("hash")
    assert b.in_use == 0
    lease.release_all()
    assert b.in_use == 0


def test_releasing_more_than_held_is_a_bug_and_says_so():
    b = MemoryBudget(10)
    b.acquire(3)
    with pytest.raises(RuntimeError, match="only 3"):
        b.release(4)


def test_hold_context_manager():
    b = MemoryBudget(10)
    with b.hold(7):
        assert b.in_use == 7
    assert b.in_use == 0 and b.peak == 7
