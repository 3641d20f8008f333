"""The one place executors are made (STYLE.md #9).

Two pools, because they wait on different things:

- `objects`: one thread per object in progress. It plans, acquires memory in part order, submits
  a multipart object's part work and waits. A single-PUT object (one read, one PUT) is copied on
  its own driver thread: a hand-off would cost more than the request.
- `transfers`: the workers that issue the range reads and part uploads of multipart objects.

Requests in flight are therefore at most `concurrency` (parts) + `objects_in_flight` (single PUTs
and multipart open/complete calls).

A driver waits on transfer futures, never the other way round, so the pools cannot deadlock.
`serial=True` gives inline executors: `submit` runs the call before returning, so a concurrent
pipeline runs in one thread, in a fixed order, and a test of it is deterministic.
"""

from __future__ import annotations

from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable


class SerialExecutor(Executor):
    """Runs each submitted call at once, in the caller's thread; returns a finished Future."""

    def __init__(self) -> None:
        self._shutdown = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        if self._shutdown:
            raise RuntimeError("cannot submit to an executor that was shut down")
        future: Future = Future()
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:  # the Future carries it, as a thread pool would
            future.set_exception(exc)
        else:
            future.set_result(result)
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._shutdown = True


@dataclass(frozen=True)
class Executors:
    """The executors of one process (or one test): see the module docstring."""

    objects: Executor
    transfers: Executor
    serial: bool

    def shutdown(self) -> None:
        self.objects.shutdown(wait=True)
        self.transfers.shutdown(wait=True)

    def __enter__(self) -> "Executors":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def create_executors(concurrency: int, object_concurrency: int | None = None, *, serial: bool = False) -> Executors:
    """`concurrency` transfer workers and `object_concurrency` (default: `concurrency`) object drivers;
    inline executors when `serial`. Use as a context manager, or call `shutdown()`."""
    if serial:
        return Executors(SerialExecutor(), SerialExecutor(), True)
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, not {concurrency}")
    objects = object_concurrency or concurrency
    return Executors(
        ThreadPoolExecutor(max_workers=objects, thread_name_prefix="exitplan-object"),
        ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="exitplan-transfer"),
        False,
    )
