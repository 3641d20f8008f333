"""Drive many objects of one dataset through the pipeline, recording each in the state store.

The caller (CLI or Prefect task) lists the source, places each object (`engine.placement.place`) and
streams ``(ObjectMeta, Placement | Refusal)`` pairs in; `place_all` does the placing and turns a
`DoesNotFit` into a `Refusal`, so nothing is refused silently. Objects are submitted to the
`objects` executor as slots free up (backpressure: at most `object_concurrency` objects are held
at once, so a listing of millions is never materialised). One failing object never stops the
others: each ends as an `ObjectOutcome` in the state store and in the `DatasetSummary`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field, replace
from itertools import islice
from typing import Callable, Iterable, Iterator, Mapping

from connectors.base import MultipartUpload, ObjectMeta, ObjectSink, ObjectSource, PartReceipt, SinkLimits, count_in
from engine import state as st
from engine.budget import MemoryBudget
from engine.executors import BoundedTasks, Executors
from engine.placement import DoesNotFit, Placement
from engine.copy_events import CopyEvents
from engine.outcome import ObjectOutcome
from engine.output_format import IDENTITY, OutputFormat
from engine.pipeline import copy_object, single_put_cutoff
from engine.planning import ObjectPlan, PartPlan, PlanRefused, plan_object
from engine.resume_point import RecordedPart, ResumePoint
from engine.settings import TransferSettings
from engine.state import StateStore, StateUnwritable, WriteBatch
from engine.state.rows import object_row

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Refusal:
    """An object that cannot be written as it is (its name or metadata does not fit, the source
    cannot give it now); `reason` is the sentence the user reads. Passed in place of a `Placement`.
    `placement`: where it would go (`DoesNotFit.placement`), for one the source cannot give now."""

    source_key: str
    reason: str
    placement: Placement | None = None


def still_current(previous: st.CurrentCopy | st.ObjectRecord | None, meta: ObjectMeta, placed: Placement | Refusal,
                  run_id: int | None = None) -> bool:
    """Whether `previous`, an object's current copy made before run `run_id`, is still the copy of
    `meta` as `placed` would write it: the same ETag and size at the same key, with the same tags and
    storage class (Azure changes a blob's tags and tier without a new ETag). An object the source
    cannot give now (an Archive blob) whose copy is current needs no copy: its tier is not compared
    (the tier it left is the one its copy was written from)."""
    placement = placed.placement if isinstance(placed, Refusal) else placed
    if placement is None or not copy_holds(previous, meta, placement.dest_key) or previous.run_id == run_id:
        return False
    return isinstance(placed, Refusal) or (previous.tags_digest == placement.tags_digest
                                           and previous.storage_class == placement.write_meta.storage_class)


def copy_holds(previous: st.CurrentCopy | st.ObjectRecord | None, meta: ObjectMeta, dest_key: str) -> bool:
    """Whether `previous` (a current copy, or None) holds `meta`'s bytes at `dest_key`: the same ETag
    and size there. What `still_current` and `rehydrate` start from."""
    return previous is not None and (previous.source_etag, previous.size, previous.dest_key) == (
        meta.etag, meta.size, dest_key)


def unchanged_reason(previous: st.CurrentCopy, placed: Placement | Refusal) -> str:
    """Why an object `still_current` is not copied: said with the reason the source cannot give it
    now, when it cannot."""
    reason = f"unchanged since run {previous.run_id}"
    return f"{reason}; its copy stands ({placed.reason})" if isinstance(placed, Refusal) else reason


def place_all(metas: Iterable[ObjectMeta], placer: Callable[[ObjectMeta], Placement]
              ) -> Iterator[tuple[ObjectMeta, Placement | Refusal]]:
    """Pair each object with its placement, or with a `Refusal` when `placer` raises `DoesNotFit`.
    Lazy: one object at a time. E.g. ``place_all(src.list(prefix), partial(place, source_prefix=...,
    dest_prefix=..., limits=sink.limits))``."""
    for meta in metas:
        try:
            yield meta, placer(meta)
        except DoesNotFit as exc:
            yield meta, Refusal(meta.key, str(exc), exc.placement)


@dataclass(frozen=True)
class Progress:
    """A snapshot for a progress display. `bytes_done` counts plaintext bytes acknowledged by the
    destination (it can step back when an object restarts); `objects_done` counts objects copied or
    skipped as unchanged; `objects_failed` includes refused ones."""

    dataset: str
    bytes_done: int
    objects_done: int
    objects_failed: int
    objects_skipped: int
    bytes_skipped: int = 0  # plaintext bytes of the objects skipped as unchanged
    # Endpoints whose requests in flight are cut after throttling answers (engine.pacing.Throttling).
    throttling: tuple = ()


ProgressCallback = Callable[[Progress], None]


@dataclass(frozen=True)
class DatasetSummary:
    """The end of one dataset's migration. `failures` lists the first `max_reported_failures`
    (source key, reason) pairs; all of them are in the state store."""

    dataset: str
    run_id: int
    objects: int
    ok: int
    failed: int
    skipped: int
    refused: int
    bytes_total: int  # plaintext bytes of every object seen (refused and skipped included)
    bytes_copied: int  # plaintext bytes of the objects copied in this run
    bytes_sent: int  # output bytes the destination acknowledged (final attempts)
    parts: int
    restarts: int
    failures: tuple[tuple[str, str], ...]
    failures_truncated: bool
    elapsed_seconds: float
    transient_failures: int = 0  # failures whose cause may pass (trying again later can succeed)
    requests_retried: int = 0  # requests the engine sent again after a retryable failure
    bodies_resent: int = 0  # of which part uploads and single PUTs (their bytes sent again)
    # Objects started over because the upload an earlier run left could not be continued (the
    # provider does not list parts); counted by the run that copied them (0 in a sharded run's summary).
    uploads_restarted: int = 0

    @property
    def all_ok(self) -> bool:
        return self.failed == 0


class _Tally:
    """Counts outcomes and emits `Progress` at most every `interval` seconds (plus a final call)."""

    def __init__(self, dataset: str, run_id: int, callback: ProgressCallback | None, interval: float,
                 max_failures: int):
        self.dataset = dataset
        self.run_id = run_id
        self.callback = callback
        self.interval = interval
        self.max_failures = max_failures
        self.lock = threading.Lock()
        self.objects = self.ok = self.failed = self.skipped = self.refused = self.transient = 0
        self.bytes_total = self.bytes_copied = self.bytes_sent = self.bytes_done = self.bytes_skipped = 0
        self.parts = self.restarts = self.retried = self.resent = self.uploads_restarted = 0
        self.failures: list[tuple[str, str]] = []
        self.truncated = False
        self._last_emit = 0.0
        self.started = time.monotonic()

    def seen(self, size: int) -> None:
        with self.lock:
            self.objects += 1
            self.bytes_total += size

    def bytes_moved(self, n: int) -> None:
        with self.lock:
            self.bytes_done += n
        self._maybe_emit()

    def done(self, outcome: ObjectOutcome) -> None:
        with self.lock:
            self._count(outcome, 1)
        self._maybe_emit()

    def replace(self, counted: ObjectOutcome, outcome: ObjectOutcome) -> None:
        """`counted`, already given to `done`, turned out to be `outcome` (the state store could
        not record it)."""
        with self.lock:
            self._count(counted, -1)
            self._count(outcome, 1)

    def _count(self, outcome: ObjectOutcome, sign: int) -> None:
        self.restarts += sign * outcome.restarts
        self.retried += sign * outcome.retried
        self.resent += sign * outcome.resent
        if outcome.status == "ok":
            self.ok += sign
            self.bytes_copied += sign * outcome.size
            self.bytes_sent += sign * outcome.bytes_sent
            self.parts += sign * outcome.parts
            self.uploads_restarted += sign * outcome.upload_restarted
        elif outcome.status == "skipped":
            self.skipped += sign
            self.bytes_skipped += sign * outcome.size
        else:
            self.failed += sign
            self.refused += sign * outcome.refused
            self.transient += sign * outcome.transient
            entry = (outcome.source_key, outcome.reason or "unknown")
            if sign < 0:
                if entry in self.failures:
                    self.failures.remove(entry)
            elif len(self.failures) < self.max_failures:
                self.failures.append(entry)
            else:
                self.truncated = True

    def _maybe_emit(self, force: bool = False) -> None:
        if self.callback is None:
            return
        with self.lock:
            now = time.monotonic()
            if not force and now - self._last_emit < self.interval:
                return
            self._last_emit = now
            snapshot = Progress(self.dataset, self.bytes_done, self.ok + self.skipped, self.failed, self.skipped,
                                self.bytes_skipped)
            # Under the lock so that snapshots arrive in order; the callback must be quick.
            try:
                self.callback(snapshot)
            except Exception:
                log.warning("the progress callback failed", exc_info=True)

    def summary(self) -> DatasetSummary:
        self._maybe_emit(force=True)
        with self.lock:
            return DatasetSummary(
                dataset=self.dataset, run_id=self.run_id, objects=self.objects, ok=self.ok, failed=self.failed,
                skipped=self.skipped, refused=self.refused, bytes_total=self.bytes_total,
                bytes_copied=self.bytes_copied, bytes_sent=self.bytes_sent, parts=self.parts,
                restarts=self.restarts, failures=tuple(self.failures), failures_truncated=self.truncated,
                transient_failures=self.transient, requests_retried=self.retried, bodies_resent=self.resent,
                uploads_restarted=self.uploads_restarted,
                elapsed_seconds=time.monotonic() - self.started,
            )


class _StateEvents(CopyEvents):
    """Records one object: each transition before the side effect it announces.

    The row is created before any byte moves, directly as in_progress: when the first attempt
    starts, or, with several object drivers, before the object is handed to one (`written_ahead`:
    the rows of the objects handed together are written in one transaction; the attempt's start
    time and plan then go with its end). The end of an object that only ever took single PUTs
    (uploaded, failed) goes through the dataset's `WriteBatch`: losing it to a kill only means the
    object is copied again. A multipart object's end is written at once (its upload is what a
    resume looks at), and so are its upload id and header (right after the upload is opened,
    before any part is sent) and each part receipt (after the destination acknowledged the part; a
    part acknowledged but not yet recorded when the process dies is found again by ListParts on
    resume)."""

    def __init__(self, store: StateStore, batch: WriteBatch, run_id: int, dataset: str, placement: Placement,
                 tally: _Tally):
        self.store = store
        self.batch = batch
        self.run_id = run_id
        self.dataset = dataset
        self.dest_key = placement.dest_key
        self.storage_class = placement.write_meta.storage_class
        self.tags_digest = placement.tags_digest
        self.tally = tally
        self.object_id: int | None = None
        self.multipart = False
        # Of a row written ahead (in_progress, no start time yet): None until its first attempt
        # starts, then that attempt's start and plan, written with the object's end.
        self._ahead: dict | None = None

    def written_ahead(self, object_id: int) -> None:
        """The object's row was written in_progress before it was handed over (`ahead_rows`)."""
        self.object_id = object_id
        self._ahead = {}

    def attempt_started(self, meta: ObjectMeta, plan: ObjectPlan, restarts: int) -> None:
        self.multipart = self.multipart or not plan.single_put
        fields = dict(output_size=plan.output_size, part_count=plan.part_count, restarts=restarts)
        if self._ahead == {} and restarts == 0:  # the first attempt of a row written ahead
            self._ahead = dict(fields, started_at=st.utcnow())
        elif self.object_id is None:
            self.object_id = self.store.add_object(
                self.run_id, self.dataset, meta.key, meta.etag, meta.size, dest_key=self.dest_key,
                source_md5=meta.content_md5, state=st.IN_PROGRESS, **fields)
        else:  # a restart: the previous attempt's upload was aborted
            self._ahead = None  # this attempt's start and plan are written now
            self.store.transition(self.object_id, st.IN_PROGRESS, upload_id=None, header=None, key_id=None, **fields)
        self.batch.flush_if_due()

    def upload_opened(self, upload: MultipartUpload, header: bytes | None, key_id: int | None) -> None:
        self.store.record_upload(self.object_id, upload.upload_id, header, key_id)

    def part_uploaded(self, part: PartPlan, receipt: PartReceipt, md5: bytes | None) -> None:
        self._record_part(receipt, md5)

    def part_kept(self, part: PartPlan, receipt: PartReceipt, md5: bytes | None) -> None:
        self._record_part(receipt, md5)

    def _record_part(self, receipt: PartReceipt, md5: bytes | None) -> None:
        self.store.record_parts(self.object_id, [st.PartRecord(receipt.number, receipt.etag, receipt.size,
                                                               md5.hex() if md5 is not None else None)])

    def source_changed(self, old: ObjectMeta, new: ObjectMeta) -> None:
        self.store.transition(self.object_id, st.CHANGED, source_etag=new.etag, size=new.size,
                              source_md5=new.content_md5.hex() if new.content_md5 else None,
                              reason=f"source changed from ETag {old.etag} to {new.etag}; restarting")

    def bytes_moved(self, n: int) -> None:
        self.tally.bytes_moved(n)

    def finished(self, meta: ObjectMeta, outcome: ObjectOutcome) -> None:
        """Record the object's outcome (at once, or queued in the batch; see the class docstring)."""
        if outcome.status == "ok":
            state, fields = st.UPLOADED, dict(
                sha256=outcome.sha256, md5_checked=outcome.md5_checked, etag_checked=outcome.etag_checked,
                dest_key=outcome.dest_key,
                dest_etag=outcome.dest_etag, output_size=outcome.output_size, part_count=outcome.parts,
                restarts=outcome.restarts, source_etag=outcome.source_etag, size=outcome.size, reason=None,
                storage_class=self.storage_class, tags_digest=self.tags_digest)
        else:
            state, fields = st.FAILED, dict(reason=outcome.reason, restarts=outcome.restarts, transient=outcome.transient)
        if self._ahead:  # what the first attempt would have written when it started, its outcome's fields over it
            fields = {**self._ahead, **fields}
        if self.object_id is None:  # it failed before its first attempt started (refused by the planner)
            self.batch.add_object(self.run_id, self.dataset, meta.key, meta.etag, meta.size, dest_key=self.dest_key,
                                  source_md5=meta.content_md5, state=state,
                                  on_written=_unrecorded(self.tally, outcome), **fields)
        elif self.multipart:
            self.store.transition(self.object_id, state, **fields)
        else:
            self.batch.transition(self.object_id, state, on_written=_unrecorded(self.tally, outcome), **fields)


def resume_point(state: StateStore, dataset: str, source_key: str) -> ResumePoint | None:
    """What a killed run left of this object: its newest row, when that is an unfinished multipart
    upload (in_progress with an upload id), with its recorded parts. The pipeline decides whether
    it can be continued (same source ETag and destination key) or must be aborted."""
    row = state.resumable(dataset, source_key)
    if row is None:
        return None
    recorded = tuple(RecordedPart(p.number, p.etag, p.size, bytes.fromhex(p.md5) if p.md5 else None)
                     for p in state.parts(row.id))
    return ResumePoint(dest_key=row.dest_key or "", upload_id=row.upload_id, source_etag=row.source_etag,
                       size=row.size, header=bytes.fromhex(row.header) if row.header else None,
                       key_id=row.key_id, parts=recorded)


def _unrecorded(tally: _Tally, outcome: ObjectOutcome) -> Callable[[Exception | None], None]:
    """The callback of a batched write: if the state store could not record `outcome`, the
    summary counts the object as failed, as it does for a write that fails at once."""

    def written(error: Exception | None) -> None:
        if isinstance(error, StateUnwritable):  # the run stops with that one sentence (copy_objects)
            return
        if error is not None:
            log.error("recording %s failed: %s", outcome.source_key, error)
            tally.replace(outcome, _internal_error(outcome, error))

    return written


def _internal_error(outcome: ObjectOutcome, exc: BaseException) -> ObjectOutcome:
    """`outcome` as a failure because the state store failed, or a defect (`exc`); a failure keeps
    its reason."""
    reason = f"internal error: {type(exc).__name__}: {exc}"
    if outcome.status == "failed" and outcome.reason:
        reason = f"{outcome.reason} (and recording it failed: {reason})"
    return ObjectOutcome(outcome.source_key, outcome.dest_key, outcome.source_etag, outcome.size, "failed",
                         reason=reason, refused=outcome.refused)


class _Handoff:
    """Objects handed by the thread that reads the listing to long-lived driver threads, instead
    of a task, a future and a callback per object (which cost about as much as a 16 KiB object's
    PUT). The listing stays on the thread that reads it (its iterators may hold resources of that
    thread, such as a SQLite connection).

    At most `2 × drivers` objects are held (handed and not finished): one for each driver and as
    many waiting in the queue, so a driver that finishes an object finds the next one there
    without waking anyone, and the reader, once it has filled the queue, sleeps until `drivers`
    objects are finished and refills it (one wake-up per `drivers` objects rather than one per
    object); places freed while it refills are filled before it sleeps again, so a refill after the
    first can be of one or two objects (waiting for `drivers` free places each time left drivers
    without an object: 0.54 -> 0.60-0.66 CPU-s per 4,000 objects, engine alone). The listing is
    consumed as objects finish."""

    def __init__(self, drivers: int):
        self._drivers = drivers
        self._capacity = 2 * drivers
        self._held = 0
        self._broken = False
        self._room = threading.Condition(threading.Lock())
        self._items: queue.SimpleQueue = queue.SimpleQueue()

    def give(self, item: tuple[ObjectMeta, Placement, int | None]) -> bool:
        """Hand `item` to the drivers; blocks while the queue is full, until half of the objects
        held are finished. False, and nothing handed, once a driver stopped on an error (`broken`):
        no object may wait for drivers that are gone."""
        with self._room:
            if not self._free():
                return False
            self._held += 1
        self._items.put(item)
        return True

    def room(self) -> int:
        """How many objects `give` takes now without blocking; blocks while there is no room (as
        `give` does), and 0 once a driver stopped on an error."""
        with self._room:
            return self._free()

    def _free(self) -> int:
        """(With `_room` held.) Waits while the queue is full; the free places, 0 once broken."""
        while self._held >= self._capacity and not self._broken:
            self._room.wait()
        return 0 if self._broken else self._capacity - self._held

    def take(self) -> tuple[ObjectMeta, Placement, int | None] | None:
        """The next object to copy, or None: no more (`close`)."""
        return self._items.get()

    def finished(self) -> None:
        """A driver finished the object it took."""
        with self._room:
            self._held -= 1
            if self._held == self._capacity - self._drivers:
                self._room.notify()

    def broken(self) -> None:
        """A driver stopped on an error of its own (a defect: an object's failures are its outcome)."""
        with self._room:
            self._broken = True
            self._room.notify_all()

    def close(self, *, drop_waiting: bool = False) -> None:
        """No more objects: each driver ends once the objects handed before are taken, or, with
        `drop_waiting` (an interrupt), once it finished the one it holds: those still waiting in
        the queue are not started."""
        if drop_waiting:
            while True:
                try:
                    self._items.get_nowait()
                except queue.Empty:
                    break
        for _ in range(self._drivers):
            self._items.put(None)


def copy_objects(
    dataset: str,
    source: ObjectSource,
    sink: ObjectSink,
    items: Iterable[tuple[ObjectMeta, Placement | Refusal]],
    *,
    settings: TransferSettings,
    budget: MemoryBudget,
    executors: Executors,
    state: StateStore,
    run_id: int,
    progress: ProgressCallback | None = None,
    progress_interval: float = 0.5,
    output_format: OutputFormat = IDENTITY,
    skip_unchanged: bool = True,
    replace_placement: Callable[[ObjectMeta], Placement] | None = None,
    retry_rows: Mapping[str, int] | None = None,
    max_reported_failures: int = 100,
    state_batch_rows: int = 500,
    state_batch_seconds: float = 0.2,
) -> DatasetSummary:
    """Copy every object of `items` (consumed lazily) and return the dataset's summary.

    Each object gets a row in `state` for `run_id`: created as in_progress before its copy starts
    (with drivers, written ahead in groups as objects are handed over; then uploaded, or failed
    with its reason), or straight as failed (refused) or unchanged. With
    `skip_unchanged`, an object whose copy at the destination (`StateStore.current_copy`: the newest
    uploaded/verified row of any run, unless since deleted or found wrong) has the same source ETag,
    size and destination key is recorded as unchanged and not copied.

    Writes whose loss is harmless (the end of a single PUT, refused and unchanged rows) are
    committed together, per `state_batch_rows` rows or `state_batch_seconds` seconds (checked as
    objects start and end), and every one of them before this returns or raises: a kill loses at
    most those, and the next run copies such objects again (or decides them again). A write the
    store refuses turns the object into a failure in the summary, so the summary and the rows agree.
    A state that cannot be written at all (`StateUnwritable`: a full disk, a read-only filesystem)
    is not an object's failure: no more objects start, those in flight end, and it is raised once.

    `progress` gets a `Progress` at most every `progress_interval` seconds and once at the end,
    from worker threads: keep it quick. The run's counters in `runs` are increased by this
    dataset's totals; closing the run is the caller's (`state.finish_run`).

    `retry_rows`: source key -> id of this run's failed row of an object tried again in the same
    run (a shard task's retry); its attempt moves that row back to in_progress instead of adding one.
    """
    tally = _Tally(dataset, run_id, progress, progress_interval, max_reported_failures)
    batch = state.batch(max_rows=state_batch_rows, max_age=state_batch_seconds)
    # Most runs have nothing to skip against or to resume (a first copy; a delta after a run that
    # ended cleanly): then the two per-object look-ups answer nothing and are left out.
    earlier_copies, open_uploads = state.earlier_work(dataset, run_id)

    def one(meta: ObjectMeta, placement: Placement, ahead: int | None = None) -> None:
        """Copy, count and record one object (`ahead`: the id of its row written ahead). `copy_object`
        turns the object's own failures into its outcome; an exception here is the state store's
        (or a defect), and fails the object alone. `one` raises only before the object was counted
        (an exception that is not an `Exception`), and then `escaped` counts it."""
        try:
            events = _StateEvents(state, batch, run_id, dataset, placement, tally)
            if ahead is not None:
                events.written_ahead(ahead)
            elif retry_rows:
                events.object_id = retry_rows.get(meta.key)
            outcome = copy_object(
                source, sink, meta, placement, settings=settings, budget=budget, executors=executors,
                output_format=output_format, events=events, replace_placement=replace_placement,
                resume=resume_point(state, dataset, meta.key) if open_uploads else None,
            )
        except StateUnwritable:  # kept in `state.unwritable`: the dataset stops and raises it once
            return
        except Exception as exc:
            log.exception("copying %s failed", meta.key)
            tally.done(_internal_error(ObjectOutcome(meta.key, placement.dest_key, meta.etag, meta.size, "failed"), exc))
            return
        # Counted before it is recorded: a batched write that fails later corrects the count.
        tally.done(outcome)
        try:
            events.finished(meta, outcome)
        except StateUnwritable:
            return
        except BaseException as exc:  # counted already: the count is corrected, nothing is raised twice
            log.exception("recording %s failed", meta.key)
            tally.replace(outcome, _internal_error(outcome, exc))

    def escaped(item: tuple[ObjectMeta, Placement, int | None], exc: BaseException) -> None:
        """An exception that escaped `one` (not an `Exception`): the object fails with it."""
        if isinstance(exc, StateUnwritable):
            return
        meta, placement, _ = item
        log.error("copying %s failed", meta.key, exc_info=(type(exc), exc, exc.__traceback__))
        tally.done(_internal_error(ObjectOutcome(meta.key, placement.dest_key, meta.etag, meta.size, "failed"), exc))

    def decided(meta: ObjectMeta, dest_key: str | None, outcome: ObjectOutcome, state_: str, **fields) -> None:
        """An object decided without a copy (refused, unchanged): counted, and its row batched."""
        tally.done(outcome)
        batch.add_object(run_id, dataset, meta.key, meta.etag, meta.size, dest_key=dest_key,
                         source_md5=meta.content_md5, state=state_, on_written=_unrecorded(tally, outcome), **fields)

    def ahead_rows(group: list[tuple[ObjectMeta, Placement]]) -> list[tuple[ObjectMeta, Placement, int | None]]:
        """The objects of `group`, each with the id of its row, written in_progress in one
        transaction before any of them is handed over (without a start time: the first attempt's
        goes with the object's end). An object tried again in this run keeps its row (`retry_rows`);
        when the rows cannot be written together, each is written as its attempt starts, as
        without drivers, and what fails then fails that object."""
        fresh = [i for i, (meta, _) in enumerate(group) if not (retry_rows and meta.key in retry_rows)]
        ids: list[int | None] = [None] * len(group)
        if fresh:
            try:
                written = state.add_object_rows([object_row(
                    run_id, dataset, meta.key, meta.etag, meta.size, placement.dest_key, meta.content_md5,
                    st.IN_PROGRESS, {"started_at": None}) for meta, placement in (group[i] for i in fresh)])
            except StateUnwritable:
                return []  # `to_copy` starts nothing more; the dataset raises it once
            except Exception as exc:
                log.warning("%s: the rows of %d objects could not be written together (%s); each is written "
                            "as its copy starts", dataset, len(fresh), exc)
            else:
                for i, object_id in zip(fresh, written):
                    ids[i] = object_id
        return [(meta, placement, object_id) for (meta, placement), object_id in zip(group, ids)]

    def hand(handoff: _Handoff, group: list[tuple[ObjectMeta, Placement]]) -> bool:
        """Hand over the objects of `group`, their rows written ahead; False once a driver failed."""
        return all(handoff.give(item) for item in ahead_rows(group))

    def to_copy() -> Iterator[tuple[ObjectMeta, Placement]]:
        """The objects to copy, in listing order; those decided without a copy (unchanged,
        refused) are counted and batched on the way. Stops once the state cannot be written."""
        for meta, placed, copies in _with_copies(items, state, dataset, skip_unchanged and earlier_copies):
            if state.unwritable is not None:  # nothing more can be recorded: no more objects start
                return
            tally.seen(meta.size)
            previous = copies.get(meta.key)
            if skip_unchanged and still_current(previous, meta, placed, run_id):
                reason = unchanged_reason(previous, placed)
                decided(meta, previous.dest_key,
                        ObjectOutcome(meta.key, previous.dest_key, meta.etag, meta.size, "skipped",
                                      reason=reason, sha256=previous.sha256, dest_etag=previous.dest_etag),
                        st.UNCHANGED, reason=reason, dest_etag=previous.dest_etag, sha256=previous.sha256,
                        storage_class=previous.storage_class, tags_digest=previous.tags_digest)
                continue
            if isinstance(placed, Refusal):
                decided(meta, None, ObjectOutcome(meta.key, "", meta.etag, meta.size, "failed",
                                                  reason=placed.reason, refused=True),
                        st.FAILED, reason=placed.reason, transient=False)
                continue
            yield meta, placed

    def copy(item: tuple[ObjectMeta, Placement, int | None]) -> None:
        """Copy one object; an exception that escapes `one` is that object's failure (`escaped`)."""
        try:
            one(*item)
        except BaseException as exc:
            escaped(item, exc)

    def driver(handoff: _Handoff) -> None:
        """One of `objects_in_flight` object drivers: copies the objects handed to it until there
        are no more. Its own error (a defect) stops the hand-off and is the dataset's error."""
        try:
            while (item := handoff.take()) is not None:
                try:
                    copy(item)
                finally:
                    handoff.finished()
        except BaseException:
            handoff.broken()
            raise

    try:
        if executors.serial:  # one thread, in listing order (deterministic tests)
            for meta, placement in to_copy():
                copy((meta, placement, None))
        else:
            handoff = _Handoff(settings.objects_in_flight)
            with BoundedTasks(executors.objects, settings.objects_in_flight) as drivers:
                for _ in range(settings.objects_in_flight):
                    drivers.submit(None, driver, handoff)
                try:
                    # As many objects as there is room for in the hand-off, their rows written
                    # ahead together (one transaction for up to `2 x drivers` objects, not one each).
                    listed = to_copy()
                    while room := handoff.room():
                        group: list[tuple[ObjectMeta, Placement]] = []
                        try:
                            group.extend(islice(listed, room))
                        except Exception:  # the objects listed before the listing's error are copied
                            hand(handoff, group)
                            raise
                        if not hand(handoff, group) or len(group) < room:
                            break  # the listing's end, or a driver failed: its error is raised when the block ends
                except Exception:  # the listing's error: the objects handed before it are copied
                    handoff.close()
                    raise
                except BaseException:  # an interrupt: no object starts after it
                    handoff.close(drop_waiting=True)
                    raise
                handoff.close()
    finally:
        # Every object submitted has ended (the block waits for them); everything queued is
        # written, on a normal end as on an error or an interrupt.
        batch.flush()
    if state.unwritable is not None:
        # The state cannot be written (a full disk, a read-only filesystem): the objects in flight
        # ended, each transaction was whole or not at all, and what a kill would leave is left.
        raise state.unwritable

    summary = tally.summary()
    state.add_run_totals(run_id, objects_total=summary.objects, objects_ok=summary.ok,
                         objects_failed=summary.failed, objects_skipped=summary.skipped,
                         bytes_total=summary.bytes_total, bytes_sent=summary.bytes_sent)
    return summary


# --------------------------------------------------------------------------------------------
# Dry run
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedObject:
    """What a run would do with one object. `action`: "write", "skip" (unchanged since a previous
    run) or "refuse" (with `reason`)."""

    source_key: str
    dest_key: str | None
    size: int
    output_size: int
    parts: int
    single_put: bool
    action: str
    reason: str | None = None
    # The source's tier and kind of object (`ObjectMeta.tier`, `.kind`), for the estimate.
    tier: str | None = None
    kind: str | None = None
    # The storage class it would land in (`WriteMeta.storage_class`; None: the bucket's default).
    storage_class: str | None = None


@dataclass(frozen=True)
class DryRunSummary:
    dataset: str
    objects: int  # objects that would be written
    bytes: int  # their plaintext bytes
    output_bytes: int  # what the destination would hold for them
    parts: int  # upload requests (a single PUT counts as one)
    multipart_objects: int
    skipped: int
    refused: int
    refusals: tuple[tuple[str, str], ...]  # first `max_reported` (source key, reason)
    # Where the listing came from when it is not a live one, and what the listing named that is not
    # carried (snapshots, earlier versions, report rows that are not objects): reason -> (objects, bytes).
    listed_from: str | None = None
    not_copied: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    # The objects that would be written, by the storage class they land in (None: the bucket's
    # default): class -> (objects, plaintext bytes).
    classes: Mapping[str | None, tuple[int, int]] = field(default_factory=dict)


def plan_sized_object(size: int, limits: SinkLimits, settings: TransferSettings,
                      output_format: OutputFormat = IDENTITY) -> ObjectPlan:
    """The parts `copy_object` would write an object of `size` plaintext bytes in (`PlanRefused`)."""
    return plan_object(size, limits, layout=output_format.layout, part_size=settings.part_size,
                       single_put_cutoff=single_put_cutoff(settings, settings.memory_budget, output_format.copies))


def plan_placed_object(meta: ObjectMeta, placed: Placement | Refusal, limits: SinkLimits,
                       settings: TransferSettings, output_format: OutputFormat = IDENTITY) -> PlannedObject:
    """The plan of one placed object, exactly as `copy_object` would make it."""
    source = {"tier": meta.tier, "kind": meta.kind}
    if isinstance(placed, Refusal):
        return PlannedObject(meta.key, None, meta.size, 0, 0, False, "refuse", placed.reason, **source)
    try:
        plan = plan_sized_object(meta.size, limits, settings, output_format)
    except PlanRefused as exc:
        return PlannedObject(meta.key, placed.dest_key, meta.size, 0, 0, False, "refuse", str(exc), **source)
    return PlannedObject(meta.key, placed.dest_key, meta.size, plan.output_size, plan.part_count, plan.single_put,
                         "write", **source, storage_class=placed.write_meta.storage_class)


def dry_run(
    dataset: str,
    items: Iterable[tuple[ObjectMeta, Placement | Refusal]],
    limits: SinkLimits,
    settings: TransferSettings,
    *,
    output_format: OutputFormat = IDENTITY,
    state: StateStore | None = None,
    on_object: Callable[[PlannedObject], None] | None = None,
    max_reported: int = 100,
) -> DryRunSummary:
    """What `copy_objects` would write, without touching the destination (only its `limits` are
    used). With `state`, objects unchanged since a previous copy count as skipped. `on_object`
    receives every `PlannedObject` as it is planned (stream it to a file or a table; nothing is kept
    here but totals and the first `max_reported` refusals)."""
    objects = total = output = parts = multipart = skipped = refused = 0
    refusals: list[tuple[str, str]] = []
    classes: dict[str | None, tuple[int, int]] = {}
    for meta, placed, copies in _with_copies(items, state, dataset, state is not None):
        planned = plan_placed_object(meta, placed, limits, settings, output_format)
        if still_current(previous := copies.get(meta.key), meta, placed):
            planned = replace(planned, dest_key=previous.dest_key, parts=0, action="skip",
                              reason=unchanged_reason(previous, placed))
        if planned.action == "write":
            objects += 1
            total += planned.size
            output += planned.output_size
            parts += planned.parts
            multipart += not planned.single_put
            count_in(classes, planned.storage_class, planned.size)
        elif planned.action == "skip":
            skipped += 1
        else:
            refused += 1
            if len(refusals) < max_reported:
                refusals.append((meta.key, planned.reason or ""))
        if on_object is not None:
            on_object(planned)
    return DryRunSummary(dataset, objects, total, output, parts, multipart, skipped, refused, tuple(refusals),
                         classes=classes)


COPIES_PAGE = 500  # objects whose earlier copies are looked up in one query


def _with_copies(items: Iterable[tuple[ObjectMeta, Placement | Refusal]], state: StateStore | None, dataset: str,
                 look_up: bool) -> Iterator[tuple[ObjectMeta, Placement | Refusal, Mapping[str, st.CurrentCopy]]]:
    """Each item with the current copies (`StateStore.current_copies`) of its page of `COPIES_PAGE`
    items: one query per page instead of one per object (the delta pass of a run over millions of
    objects copied before). With `look_up` False (nothing to skip against), no query at all."""
    if not look_up or state is None:
        for meta, placed in items:
            yield meta, placed, {}
        return
    iterator = iter(items)
    while True:
        page = list(islice(iterator, COPIES_PAGE))
        if not page:
            return
        copies = state.current_copies(dataset, [meta.key for meta, placed in page
                                                if not isinstance(placed, Refusal) or placed.placement is not None])
        for meta, placed in page:
            yield meta, placed, copies
