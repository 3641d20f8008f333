"""The one place executors are made (STYLE.md #9).

Two pools, because they wait on different things:

- `objects`: one thread per object in progress. It plans, acquires memory in part order, submits
  a multipart object's part work and waits. A single-PUT object (one read, one PUT) is copied on
  its own driver thread: a hand-off would cost more than the request. A dataset's copy runs
  `objects_in_flight` long-lived drivers there, each handed the next object as it finishes one
  (`engine.dataset_copy._Handoff`), rather than a task per object.
- `transfers`: the workers that issue the range reads and part uploads of multipart objects.

Requests in flight are therefore at most `concurrency` (parts) + `objects_in_flight` (single PUTs
and multipart open/complete calls).

A driver waits on transfer futures, never the other way round, so the pools cannot deadlock.
`serial=True` gives inline executors: `submit` runs the call before returning, so a concurrent
pipeline runs in one thread, in a fixed order, and a test of it is deterministic. Restore and
verify get a pool of their own from `create_pool`.

**No future is ever dropped.** A task's exception exists only in its future: a future nobody reads
is an object lost without a word (a restore once printed "restored 1 of 1" for a dataset of two,
the other's `OSError` left in an unread future). So work goes to a pool through `BoundedTasks`,
which bounds what is in flight (the producer blocks: a listing of millions is consumed as tasks
finish) and hands the outcome of every task back to the caller's thread: its result, or its
exception as that object's failure (`on_error`) or, without `on_error`, as the command's error.
The multipart pipeline, whose bound is bytes rather than tasks, waits on every part future it
submitted on every path, the error paths included.
"""

from __future__ import annotations

import logging
import queue
from concurrent.futures import CancelledError, Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterable, TypeVar

log = logging.getLogger(__name__)

Item = TypeVar("Item")  # what a task is about (an object), handed back with its outcome
Result = TypeVar("Result")


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


def create_pool(workers: int, name: str, *, serial: bool = False) -> Executor:
    """A pool of `workers` threads named `name`-N (restore, verify), or an inline executor when
    `serial`. Submit to it through `BoundedTasks`; shut it down with `with` or `shutdown()`."""
    if serial:
        return SerialExecutor()
    if workers < 1:
        raise ValueError(f"a pool needs at least 1 worker, not {workers}")
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)


def noted(error: BaseException, others: Iterable[BaseException], what: str = "another task") -> BaseException:
    """`error`, with a note naming each of `others` (each also logged with its traceback): when one
    exception is raised for several, the others stay visible in the traceback and the log."""
    for other in others:
        if other is error:
            continue
        error.add_note(f"{what} failed too: {type(other).__name__}: {other}")
        log.error("%s failed too", what, exc_info=(type(other), other, other.__traceback__))
    return error


class BoundedTasks(Generic[Item, Result]):
    """Tasks submitted to `executor`, at most `limit` in flight, the outcome of every one handed back.

    ``submit(item, fn, *args)`` runs ``fn(*args)`` on the executor; `item` (what the task is about,
    e.g. the object's metadata) comes back with its outcome. `submit` blocks while `limit` tasks
    are submitted and not yet handed back (backpressure). Outcomes are handed back in the thread
    that submits, as tasks finish (at each `submit`, while it waits, and when the ``with`` block
    ends), so the caller's counters need no lock:

    - a result to ``on_result(item, result)``;
    - an exception to ``on_error(item, exc)``: the task concerns one object, and the object fails
      with it (the caller counts it and names it);
    - without `on_error`, an exception is the command's error: the next `submit` (or the end of
      the block) raises it, nothing more is submitted, the tasks in flight are waited for, and their
      exceptions are added to it as notes and logged.

    Leaving the ``with`` block waits for every task and hands back every outcome, on a normal end
    as when the block raised (the caller's summary then still counts every object that ran; an
    exception of a task or a handler met on the way is noted on the one being raised). Use it
    from one thread; several `BoundedTasks` may share an executor.
    """

    def __init__(self, executor: Executor, limit: int, *,
                 on_result: Callable[[Item, Result], None] | None = None,
                 on_error: Callable[[Item, BaseException], None] | None = None) -> None:
        if limit < 1:
            raise ValueError(f"at least 1 task must be allowed in flight, not {limit}")
        self._executor = executor
        self._limit = limit
        self._on_result = on_result
        self._on_error = on_error
        self._items: dict[Future, Item] = {}
        # Finished futures, put there by their done-callback (any thread) and read only here, by
        # the submitting thread: no outcome is ever read in a callback, where an error would vanish.
        self._finished: queue.SimpleQueue[Future] = queue.SimpleQueue()
        self._error: BaseException | None = None  # the first task error without `on_error`
        self._raised = False
        self._failing: BaseException | None = None  # what the `with` block is raising, if anything

    @property
    def in_flight(self) -> int:
        """Tasks submitted and not yet handed back."""
        return len(self._items)

    def submit(self, item: Item, fn: Callable[..., Result], /, *args: Any, **kwargs: Any) -> None:
        """Run ``fn(*args, **kwargs)`` for `item`; blocks while `limit` tasks are in flight. Raises
        the first task error (without `on_error`), and again at every later call: nothing more is
        submitted once the command fails."""
        if self._error is not None:
            self._raised = True
            raise self._error
        self._hand_back(block=False)
        while len(self._items) >= self._limit:
            self._hand_back(block=True)
            self._raise_error()
        future = self._executor.submit(fn, *args, **kwargs)
        self._items[future] = item
        future.add_done_callback(self._finished.put)  # at once when already done (serial executors)
        self._hand_back(block=False)
        self._raise_error()

    def wait(self) -> None:
        """Wait for every task in flight and hand back its outcome; raise the first task error
        (when there is no `on_error`)."""
        while self._items:
            self._hand_back(block=True)
        self._raise_error()

    def __enter__(self) -> "BoundedTasks[Item, Result]":
        return self

    def __exit__(self, exc_type, exc: BaseException | None, tb) -> bool:
        if exc is None:
            self.wait()
            return False
        self._failing = exc
        while self._items:
            try:
                self._hand_back(block=True)
            except BaseException as later:  # a handler failed while the block fails: keep both
                noted(exc, [later], "handing back a task's outcome")
        if self._error is not None and not self._raised:
            noted(exc, [self._error])
        return False

    # ---- internals --------------------------------------------------------------------------------

    def _hand_back(self, *, block: bool) -> None:
        """Hand back the outcomes of finished tasks: at least one when `block`, then every one
        already finished."""
        if block:
            self._outcome(self._finished.get())
        while True:
            try:
                future = self._finished.get_nowait()
            except queue.Empty:
                return
            self._outcome(future)

    def _outcome(self, future: Future) -> None:
        item = self._items.pop(future)
        if future.cancelled():  # shut down under it (`shutdown(cancel_futures=True)`): it never ran
            error: BaseException | None = CancelledError("the task was cancelled before it ran")
        else:
            error = future.exception()
        if error is None:
            if self._on_result is not None:
                self._on_result(item, future.result())
        elif self._on_error is not None:
            self._on_error(item, error)
        elif self._error is None and self._failing is None:
            self._error = error
        else:  # the command already fails with another error: this one goes with it
            noted(self._error or self._failing, [error])

    def _raise_error(self) -> None:
        if self._error is not None and not self._raised:
            self._raised = True
            raise self._error
