"""A whole migration run over the datasets of a configuration: what the CLI and the flows call.

Opens the connectors and the state store, streams each dataset's listing through placement into
`copy_objects`, shares one memory budget and one pair of executors across every dataset, and
reports through a small observer so that the CLI (a progress bar) and Prefect (an artifact) can
show the same run. The dry run is `engine.plan`; the project's state and lock, `engine.project`.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Callable, Iterable, Iterator, Protocol

from config.bandwidth import BandwidthTimetable
from config.errors import UserError
from config.models import LoadedConfig
from config.policy import DestinationVerdict, check_sovereignty
from connectors.base import ConnectorError, ObjectMeta, ObjectSource, SinkLimits

from .allocator import freeze_long_lived, thaw_long_lived, tune_malloc
from .audit import AuditOutcome, MigrationAudit, audit_signing_key
from .budget import MemoryBudget
from .endpoints import (DestinationSinks, OpenedAhead, close_endpoint, destination_limits, open_azure_container,
                        open_source, open_source_ahead, opened_ahead, storage_classes)
from .errors import RunError, call_endpoint
from .executors import create_executors
from . import key_copies
from .inventory import DatasetInventory, inventory_dataset, selected
from .listing import RangedListing, dataset_listing, listed_from, refuse_delete_removed, report_listing
from .dataset_copy import DatasetSummary, Progress, ProgressCallback, Refusal, copy_objects, place_all
from .placement import Placement, place
from .output_format import IDENTITY, OutputFormat
from .pacing import RunPacing, run_bandwidth
from .project import lock_project, open_state, state_location
from .settings import TransferSettings
from .shards import (WENT_THROUGH, PlannedShard, ShardDefiner, ShardOutcome, ShardPlan, ShardResult, ShardsEnded,
                     failure_sentence, shard_outcome)
from . import state as st
from .state import StateStore, StateUnwritable

log = logging.getLogger(__name__)


def transfer_settings(loaded: LoadedConfig) -> TransferSettings:
    t = loaded.config.transfer
    return TransferSettings(
        concurrency=t.concurrency,
        object_concurrency=t.object_concurrency,
        memory_budget=t.memory_budget,
        part_size=None if t.part_size == "auto" else t.part_size,
        small_object_cutoff=t.small_object_cutoff,
        max_source_restarts=t.max_source_restarts,
        part_attempts=t.part_attempts,
        bandwidth=t.bandwidth_timetable,
    )


def output_formats(loaded: LoadedConfig, datasets: list[str]) -> dict[str, OutputFormat]:
    """How each dataset is written: Tink-encrypted with the project's primary data key, or as is
    for a dataset marked `public`. Unwraps the keyset first (a wrong or unreachable KEK is a
    `UserError`, exit code 4), so no object is touched before the keys are known to work."""
    formats: dict[str, OutputFormat] = {name: IDENTITY for name in datasets if loaded.config.datasets[name].public}
    encrypted = [name for name in datasets if name not in formats]
    if encrypted:
        from .crypto.tink_format import TinkFormat
        from .keys import load_data_keys

        keys = load_data_keys(loaded)
        formats.update({name: TinkFormat(keys, name) for name in encrypted})
    return formats


def placer(loaded: LoadedConfig, name: str, limits: SinkLimits, fmt: OutputFormat
           ) -> Callable[[ObjectMeta], Placement]:
    """Places one object of dataset `name`; the 2 KB metadata budget counts the format's own
    metadata; the storage class follows the object's tier (`endpoints.storage_classes`)."""
    ds = loaded.config.datasets[name]
    class_of = storage_classes(loaded, name)

    def place_one(meta: ObjectMeta) -> Placement:
        return place(meta, ds.prefix, ds.dest_prefix, limits, reserved=fmt.metadata_for(meta),
                     content=fmt.content_for(meta), storage_class=class_of(meta.tier))

    return place_one


def dataset_items(loaded: LoadedConfig, name: str, listing: Iterable[ObjectMeta], limits: SinkLimits,
                  fmt: OutputFormat = IDENTITY) -> Iterator[tuple[ObjectMeta, Placement | Refusal]]:
    """The dataset's selected objects of `listing` (`dataset_listing`), listed lazily, each placed
    at the destination or refused."""
    ds = loaded.config.datasets[name]
    return place_all(selected(listing, ds), placer(loaded, name, limits, fmt))


def preflight_destinations(loaded: LoadedConfig, datasets: list[str], sinks: DestinationSinks) -> None:
    """One listing request per dataset destination before any object moves: a missing bucket or
    refused credentials stop the run with one sentence (exit 2) instead of failing every object."""
    for name in datasets:
        ds = loaded.config.datasets[name]
        sink = call_endpoint(f"destination `{ds.destination}`", sinks, ds.destination)
        call_endpoint(f"dataset `{name}`: destination `{ds.destination}`",
                      lambda: next(iter(sink.list(ds.dest_prefix)), None))


def publish_keysets(loaded: LoadedConfig, datasets: list[str], formats: dict[str, OutputFormat],
                    sinks: DestinationSinks) -> list[str]:
    """Put the wrapped keyset next to the data in each destination that receives encrypted objects,
    append-only (`engine.key_copies`): whoever holds the bucket and the KEK can read it back. First
    refuses (exit 4, nothing written) when a destination's copies hold a key id the local keyset lacks."""
    return key_copies.publish_keysets(loaded, [n for n in datasets if formats[n] is not IDENTITY], sinks)


def count_dataset(loaded: LoadedConfig, name: str, source: ObjectSource,
                  counted: Callable[[int, int], None] | None = None, every: int = 1000) -> tuple[int, int]:
    """(objects, bytes) the dataset selects now: one listing pass, for progress and ETA, of names
    and sizes only (an S3 source's objects are not each asked for their metadata and tags, nor an
    SFTP source's metadata files read: two requests per object, a count needs neither);
    `counted(objects, bytes)` is told the figures so far every `every` objects."""
    ds = loaded.config.datasets[name]
    objects = total = 0
    for meta in selected(dataset_listing(loaded, name, source, bare=True), ds):
        objects += 1
        total += meta.size
        if counted is not None and objects % every == 0:
            counted(objects, total)
    return objects, total


class _CountStopped(Exception):
    """The copy ended before its background count did (`BackgroundCount`)."""


class BackgroundCount:
    """The listing pass that gives progress its totals, run beside the copy instead of before it
    (over 10^8 blobs it would hold the first byte back for hours): `counting(objects, bytes)` is
    told the figures so far, `counted(objects, bytes)` the totals once the pass is through. It is
    for display only: the copy's own listing is what the run goes by, so a count that fails is
    logged with its reason and progress simply goes on without totals."""

    def __init__(self, loaded: LoadedConfig, name: str, source: ObjectSource, counting: Callable[[int, int], None],
                 counted: Callable[[int, int], None]):
        self._stop = threading.Event()

        def so_far(objects: int, total: int) -> None:
            if self._stop.is_set():
                raise _CountStopped()
            counting(objects, total)

        def count() -> None:
            try:
                objects, total = count_dataset(loaded, name, source, so_far)
            except _CountStopped:
                return
            except Exception as exc:  # noqa: BLE001 - display only; said, never silent
                log.warning("dataset `%s`: the listing pass that gives progress its totals failed (%s); progress "
                            "goes on without them, the copy's own listing is unaffected", name, exc)
                return
            if not self._stop.is_set():
                counted(objects, total)

        self._thread = threading.Thread(target=count, name=f"exitplan-count-{name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """The copy has ended: the count stops at its next figure (a listing page at most)."""
        self._stop.set()
        self._thread.join(timeout=5.0)


class RunObserver(Protocol):
    def counting(self, dataset: str, objects: int, bytes_total: int) -> None: ...
    def dataset_started(self, dataset: str, objects: int, bytes_total: int) -> None: ...
    def dataset_counted(self, dataset: str, objects: int, bytes_total: int) -> None: ...
    def progress(self, snapshot: Progress) -> None: ...
    def dataset_finished(self, summary: DatasetSummary) -> None: ...


@dataclass(frozen=True)
class MigrationResult:
    run_id: int
    summaries: tuple[DatasetSummary, ...]
    md5_checked: int  # objects whose source Content-MD5 was checked against the bytes read
    elapsed_seconds: float
    state_path: str  # the SQLite file, or the state database's URL without its password
    destinations: dict[str, DestinationVerdict]
    key_holders: dict[str, str]  # dataset -> who holds its keys, as a sentence
    keyset_copies: tuple[str, ...] = ()
    audit: AuditOutcome | None = None  # the run's records in the audit manifest, and its copies
    removed: tuple[RemovedAtSource, ...] = ()
    # Part uploads and single PUTs the S3 SDK sent again on its own in this process (the engine's
    # own retries are in each summary's `bodies_resent`).
    bodies_resent_by_sdk: int = 0
    # dataset -> what its listing named that is not carried (snapshots, earlier versions, report
    # rows that are not objects): reason -> (objects, bytes).
    not_carried: dict[str, dict[str, tuple[int, int]]] = field(default_factory=dict)

    @property
    def all_ok(self) -> bool:
        return all(s.all_ok for s in self.summaries) and not any(r.failures or r.not_looked_for for r in self.removed)


@dataclass(frozen=True)
class RemovedAtSource:
    """Objects copied earlier that a dataset's listing no longer has (deleted at the source or no
    longer selected). Kept at the destination unless the run was asked to delete them."""

    dataset: str
    count: int
    examples: tuple[str, ...]  # the first source keys, for the summary
    deleted: int  # destination copies deleted (with --delete-removed)
    failures: tuple[tuple[str, str], ...] = ()  # (destination key, reason) of deletions that failed
    not_looked_for: str | None = None  # why this run could not tell what is gone from the source


MAX_REMOVED_EXAMPLES = 20


def handle_removed(state: StateStore, run_id: int, dataset: str, sink, *, delete: bool,
                   listed: int | None = None) -> RemovedAtSource:
    """Find what `dataset`'s complete listing in this run no longer has; with `delete`, delete each
    destination copy and record a `removed` row (written after the delete succeeded).

    `listed`: how many objects the run listed, when its rows are the only record of the listing
    (the CLI's run; the flows store the listing itself). Fewer rows than that means some listed
    objects could not be recorded: they would look gone from the source, and their copies would
    be deleted. Nothing is looked for then, and `not_looked_for` says why."""
    if listed is not None:
        recorded = state.dataset_totals(run_id, dataset, max_failures=0).objects
        if recorded < listed:
            return RemovedAtSource(dataset, 0, (), 0, (), (
                f"{listed - recorded:,} of the {listed:,} objects this run listed have no row in the state store (it "
                "failed as they were recorded), so objects gone from the source were not looked for"))
    count = deleted = 0
    examples: list[str] = []
    failures: list[tuple[str, str]] = []
    for row in state.removed_at_source(dataset, run_id):
        count += 1
        if len(examples) < MAX_REMOVED_EXAMPLES:
            examples.append(row.source_key)
        if not delete:
            continue
        try:
            sink.delete(row.dest_key)
        except ConnectorError as exc:
            failures.append((row.dest_key, str(exc)))
            continue
        state.add_object(run_id, dataset, row.source_key, row.source_etag, row.size, dest_key=row.dest_key,
                         state=st.REMOVED)
        deleted += 1
    return RemovedAtSource(dataset, count, tuple(examples), deleted, tuple(failures))


def migrate(loaded: LoadedConfig, datasets: list[str], observer: RunObserver, *, count_first: bool = True,
            delete_removed: bool = False, bandwidth: BandwidthTimetable | None = None,
            ahead: OpenedAhead | None = None) -> MigrationResult:
    """Copy every object of `datasets`; one failing object never stops the others.

    `bandwidth`: the uploads' limit (the command line's `--bwlimit`), instead of `transfer.bandwidth`.
    `ahead`: the SFTP servers the caller started opening (`MigrationRun.start`).

    Objects copied by earlier runs that a dataset's (complete) listing no longer has are reported
    in `MigrationResult.removed`; the destination copies are deleted only with `delete_removed`.

    With `count_first`, each dataset is listed once more, beside the copy (`BackgroundCount`), so
    that progress can show a total and an ETA once that pass is through (`observer.dataset_counted`;
    `dataset_started` always gets -1, -1): about 0.1 ms of CPU per object, and no wait before the
    first copy.
    """
    settings = transfer_settings(loaded)
    if bandwidth is not None:
        settings = replace(settings, bandwidth=bandwidth)
    run = MigrationRun.start(loaded, datasets, delete_removed=delete_removed, settings=settings, ahead=ahead)
    try:
        for name in datasets:
            run.copy_dataset(name, observer, count_first=count_first)
        run.completed = True
    finally:
        result = run.finish()
    return result


class MigrationRun:
    """One migration run, opened once and fed dataset by dataset (the CLI) or shard by shard (the
    Prefect flows), then finished once.

    `start` does everything that must hold before any object moves: the sovereignty verdicts, the
    keys (a KEK error is exit 4 here), a listing request per destination, the keyset copies; then it
    opens the state store, the run's row, its audit trail, one memory budget and one pair of
    executors shared by everything the run copies in this process (several shards at once share
    them, so memory stays within `transfer.memory_budget`). `finish` closes the run, writes its
    audit records, publishes the manifest and returns the `MigrationResult`.

    Thread-safe for `copy_shard` (shards of one run may be copied at once from several threads);
    `list_dataset` and `finish` are called by one thread.
    """

    def __init__(self, loaded: LoadedConfig, datasets: list[str], *, delete_removed: bool,
                 settings: TransferSettings | None = None):
        self.loaded = loaded
        self.datasets = list(datasets)
        self.delete_removed = delete_removed
        self.started = time.monotonic()
        self.verdicts = {v.name: v for v in check_sovereignty(loaded)}
        self.formats = output_formats(loaded, datasets)
        # Unwrapped before any object moves: a KEK error is exit 4 now.
        self.signing_key = audit_signing_key(loaded, datasets)
        self.settings = settings or transfer_settings(loaded)
        self.budget = MemoryBudget(self.settings.memory_budget)
        self.completed = False  # every dataset was gone through (set by `migrate`, or by `shards_ended`)
        self._summaries: list[DatasetSummary] = []
        self._removed: list[RemovedAtSource] = []
        self._sharded: list[str] = []  # datasets listed into the state store (copied shard by shard)
        self._definer: ShardDefiner | None = None  # defines the shards as the listing goes on
        self._listing_stop = threading.Event()  # `stop_listing`
        # (dataset, shard) -> why its task stopped on an error (not an object failure): the run failed
        self._shard_errors: dict[tuple[str, int], str] = {}
        self.keyset_copies: list[str] = []
        self._lock = threading.Lock()
        self._sources: dict[str, ObjectSource] = {}  # opened once per run (`_source`), closed at its end
        self._opening: dict[str, Future] = {}  # sources being opened ahead (`_open_source_early`)
        self.state: StateStore | None = None
        self.run_id = 0  # set by `start`, with the trail, the executors and the project's lock
        self.trail: MigrationAudit | None = None
        self._executors = None
        self.executors = None
        self._lock_file = None
        self.attached = False  # joined from another process (`attach`): copies shards, never finishes
        self.pacing: RunPacing | None = None  # with the state store: its shared limits live there
        self.sinks: DestinationSinks | None = None  # the destinations' sinks, opened once (paced by `_pace`)
        self._frozen = False  # holds the collector's long-lived objects frozen (`_freeze`)

    @classmethod
    def start(cls, loaded: LoadedConfig, datasets: list[str], *, delete_removed: bool = False,
              settings: TransferSettings | None = None, ahead: OpenedAhead | None = None) -> "MigrationRun":
        """Open the run (`settings`: the configuration's transfer settings unless given). `ahead`:
        the SFTP servers the caller started opening for these datasets, taken over by the run
        once it holds the project's lock (the caller closes them if it does not get that far)."""
        if delete_removed:
            refuse_delete_removed(loaded, datasets)
        run = cls(loaded, datasets, delete_removed=delete_removed, settings=settings)
        run._lock_file = lock_project(loaded)
        if ahead is not None:  # from here on, closed by the run (`_close_endpoints`)
            run.sinks = ahead.sinks
            run._opening, ahead.sources = ahead.sources, {}
        try:
            run._open()
        except BaseException:
            try:
                run._close_endpoints()
                if run.state is not None:
                    run.state.close()
            finally:
                run._lock_file.close()
            raise
        return run

    @classmethod
    def attach(cls, loaded: LoadedConfig, datasets: list[str], run_id: int, *,
               settings: TransferSettings | None = None) -> "MigrationRun":
        """Join run `run_id`, opened by `start` in another process of this host (the flows' shard
        processes), to copy some of its shards: the keys are unwrapped here, and this process
        gets a memory budget and executors of its own. Only `copy_shard` and `shard_result` are
        for an attached run; `close` it when done (the run itself is finished by its opener)."""
        run = cls(loaded, datasets, delete_removed=False, settings=settings)
        run.attached = True
        tune_malloc(run.settings.memory_budget)
        run.state = open_state(loaded)
        if run.state.get_run(run_id).status != "running":
            run.state.close()
            raise RunError(f"migration run {run_id} is not running any more; its shards cannot be copied")
        run.run_id = run_id
        run._pace()
        run._executors = create_executors(run.settings.concurrency, run.settings.object_concurrency)
        run.executors = run._executors.__enter__()
        run._freeze()
        return run

    def close(self) -> None:
        """Release an attached run's executors, endpoints and state connection."""
        try:
            if self._executors is not None:
                self._executors.__exit__(None, None, None)
                self._executors = None
        finally:
            self._thaw()
            try:
                self._close_endpoints()
            finally:
                if self.state is not None:
                    self.state.close()

    def _freeze(self) -> None:
        """The run is open: what it holds until it ends leaves the collector's full passes."""
        if not self._frozen:
            self._frozen = True
            freeze_long_lived()

    def _thaw(self) -> None:
        if self._frozen:
            self._frozen = False
            thaw_long_lived()

    def _open(self) -> None:
        loaded, datasets = self.loaded, self.datasets
        self._open_source_early()
        # The destinations' sinks are opened once for the whole run: the check and the keyset
        # copies go unpaced (nothing is written to the state before they pass), then `_pace`
        # paces them for the copy and the manifest.
        if self.sinks is None:
            self.sinks = DestinationSinks(loaded)
        preflight_destinations(loaded, datasets, self.sinks)
        self.keyset_copies = publish_keysets(loaded, datasets, self.formats, self.sinks)
        tune_malloc(self.settings.memory_budget)
        self.state = open_state(loaded)
        # The audit hook opens the run (manifest first, then the run's row: engine/audit.py);
        # transfer records are read back from the state rows after each dataset and at the end,
        # so the copy engine itself knows nothing of the manifest.
        self.trail = MigrationAudit(loaded, self.state, datasets, self.verdicts,
                                    {n: fmt.keys.primary_id for n, fmt in self.formats.items() if fmt is not IDENTITY},
                                    self.signing_key)
        self.run_id = self.trail.run_id
        self._pace()
        self._executors = create_executors(self.settings.concurrency, self.settings.object_concurrency)
        self.executors = self._executors.__enter__()
        self._freeze()

    def _pace(self) -> None:
        """The run's pacers: request rates and bandwidth shared through the state store with the
        run's other processes, requests in flight up to what the settings open."""
        self.pacing = RunPacing(self.loaded, self.state, self.settings.requests_in_flight,
                                bandwidth=run_bandwidth(self.loaded, self.settings.bandwidth))
        if self.sinks is None:
            self.sinks = DestinationSinks(self.loaded)
        self.sinks.pace(self.pacing.for_sink)

    # ---- endpoints, opened once per run ---------------------------------------------------------

    def source(self, name: str) -> ObjectSource:
        pacer = self.pacing.for_source(self.loaded.config.datasets[name].source)
        return self._source(name, f"dataset `{name}`: source", open_source, name, pacer)

    def sink(self, name: str):
        dest = self.loaded.config.datasets[name].destination
        return call_endpoint(f"dataset `{name}`: destination `{dest}`", self.sinks, dest)

    def _source(self, name: str, what: str, opener: Callable, arg: str, pacer):
        with self._lock:
            if name not in self._sources:
                early = self._opening.pop(name, None)
                self._sources[name] = (early.result() if early is not None
                                       else call_endpoint(what, partial(opener, pacer=pacer), self.loaded, arg))
            return self._sources[name]

    def _open_source_early(self) -> None:
        """Start opening the first dataset's source now, unless the caller did (`start`), while
        the destinations are checked and the run opened (`open_source_ahead`: an SFTP server's).
        `source` takes it from there, and raises what failed as an open there would have."""
        if self.datasets and self.datasets[0] not in self._opening:
            early = open_source_ahead(self.loaded, self.datasets[0])
            if early is not None:
                self._opening[self.datasets[0]] = early

    def _close_endpoints(self) -> None:
        """Close the run's sources and sinks (connections, `ssh` processes): the run is over here."""
        with self._lock:
            sources, self._sources = list(self._sources.values()), {}
            opening, self._opening = self._opening, {}
        # opened ahead, never asked for (the run stopped before): closed too
        sources += opened_ahead(opening, "the source of dataset").values()
        if self.sinks is not None:
            self.sinks.close()
        for source in sources:
            close_endpoint(source, "a source")

    # ---- the CLI's way: a dataset at a time, streamed from its listing ----------------------------

    def copy_dataset(self, name: str, observer: RunObserver, *, count_first: bool = True) -> DatasetSummary:
        source, sink = self.source(name), self.sink(name)
        observer.dataset_started(name, -1, -1)
        # The totals come from a listing pass of their own, beside the copy (not before it).
        count = (BackgroundCount(self.loaded, name, source, partial(observer.counting, name),
                                 partial(observer.dataset_counted, name)) if count_first else None)
        self.state.dataset_started(self.run_id, name)
        try:
            listing = call_endpoint(f"dataset `{name}`: listing {source.label}", dataset_listing, self.loaded, name,
                                    source)
            summary = self._copy(name, dataset_items(self.loaded, name, listing, sink.limits, self.formats[name]),
                                 observer.progress)
        except ConnectorError as exc:  # the listing itself failed part-way
            self._listing_stopped(name, exc)
            raise RunError(f"dataset `{name}`: {exc}", exc) from None
        except BaseException as exc:
            self._listing_stopped(name, exc)
            raise
        finally:
            if count is not None:
                count.stop()
        # Every listed object was handed to the copy and has its row (or is counted as failed):
        # this listing now defines what the dataset must hold.
        self.state.dataset_through(self.run_id, name, summary.objects, summary.bytes_total, listing.not_copied)
        self.dataset_done(name, listed=summary.objects)
        observer.dataset_finished(summary)
        return summary

    def _listing_stopped(self, name: str, exc: BaseException) -> None:
        """Record why the run stopped before it went through `name`'s listing; the exception that
        stopped it goes on whatever happens here (the state store may be what failed)."""
        if isinstance(exc, StateUnwritable):  # nothing can be recorded; the next run says interrupted
            return
        reason = ("interrupted (Ctrl-C or a stop signal)" if isinstance(exc, (KeyboardInterrupt, SystemExit))
                  else f"the listing failed: {exc}" if isinstance(exc, ConnectorError)
                  else str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}")
        try:
            self.state.dataset_stopped(self.run_id, name, reason)
        except Exception:
            log.warning("recording that run %d stopped on dataset %s failed", self.run_id, name, exc_info=True)

    def _copy(self, name: str, items, progress, retry_rows=None) -> DatasetSummary:
        sink, fmt = self.sink(name), self.formats[name]
        if progress is not None:  # each snapshot says which endpoints throttle now
            progress = partial(_with_throttling, progress, self.pacing)
        summary = copy_objects(
            name, self.source(name), sink, items, settings=self.settings, budget=self.budget,
            executors=self.executors, state=self.state, run_id=self.run_id, progress=progress, output_format=fmt,
            replace_placement=placer(self.loaded, name, sink.limits, fmt), retry_rows=retry_rows,
        )
        with self._lock:
            self._summaries.append(summary)
        return summary

    def dataset_done(self, name: str, listed: int | None = None) -> None:
        """Every object of `name` was gone through: objects gone from the source are found (and
        their copies deleted on request) and the dataset's transfers go into the audit trail.
        `listed`: how many objects the CLI's listing held (see `handle_removed`)."""
        self._removed.append(handle_removed(self.state, self.run_id, name, self.sink(name),
                                            delete=self.delete_removed, listed=listed))
        self.trail.record_transfers(name, self.source(name), self.sink(name))
        self.trail.record_not_carried(name, self.state.not_carried(self.run_id, name))

    # ---- the flows' way: list into the state store, then shard by shard ----------------------------

    def list_dataset(self, name: str, *, shard_bytes: int, shard_objects: int,
                     ranges_at_once: int = 1, full_listing: bool = False) -> tuple[DatasetInventory, int]:
        """List `name` once into the state store, cut into shards of consecutive objects (a shard
        closes at `shard_bytes` or `shard_objects`); returns the dataset's inventory and the number
        of shards cut. Meanwhile, another thread may define its final shards (`ready_shards`).

        The listing is split into up to `ranges_at_once` ranges listed at once, and goes on from
        where an earlier run's listing of the dataset was killed, if it was (`engine.listing`).
        A dataset with `changes: feed` is listed from the last listing and the account's change
        feed when it can be, unless `full_listing`."""
        ds = self.loaded.config.datasets[name]
        source = self.source(name)
        limits = destination_limits(self.loaded, ds.destination)
        report = call_endpoint(f"dataset `{name}`: listing {source.label}", report_listing, self.loaded, name)
        listing = RangedListing(self.state, self.run_id, name, ds, source, shard_bytes=shard_bytes,
                                shard_objects=shard_objects, at_once=ranges_at_once, report=report,
                                feed=self._change_feed(name) if ds.changes == "feed" else None,
                                full_listing=full_listing, stop=self._listing_stop)
        with self._lock:
            self._sharded.append(name)
        self.state.dataset_started(self.run_id, name)
        try:
            inventory = call_endpoint(f"dataset `{name}`: listing {source.label}",
                                      lambda: inventory_dataset(name, ds, listing.objects(), limits,
                                                                source_label=source.label,
                                                                reserved=self.formats[name].metadata_for,
                                                                storage_class=storage_classes(self.loaded, name)))
        except BaseException as exc:
            self._listing_stopped(name, exc)
            raise
        listed_from(inventory, listing)
        # The whole listing is in the state store: it defines what the dataset must hold (objects
        # the shards never reach are "never attempted").
        self.state.dataset_through(self.run_id, name, listing.objects_stored, inventory.bytes, inventory.not_copied)
        return inventory, listing.shards

    def _change_feed(self, name: str):
        """The change feed of the account dataset `name` reads (same credentials and pacing)."""
        from connectors.azure_changefeed import FEED_CONTAINER, ChangeFeed

        src = self.loaded.config.datasets[name].source
        return ChangeFeed(self._source(f"{src} {FEED_CONTAINER}", f"dataset `{name}`: change feed",
                                       lambda loaded, arg, pacer: open_azure_container(loaded, arg, FEED_CONTAINER,
                                                                                       pacer=pacer),
                                       src, self.pacing.for_source(src)))

    def ready_shards(self, name: str) -> list[PlannedShard]:
        """Define the shards of dataset `name` that its listing has made final since the last call
        (every one left once the listing went through) and return them: copying may start on them
        while the listing goes on. At most about `orchestration.max_shards` in all (their sizes
        grow as the run defines them: `engine.shards.ShardDefiner`). Called by one thread."""
        if self._definer is None:
            self._definer = ShardDefiner(self.state, self.run_id, self.loaded.config.orchestration.max_shards)
        return [PlannedShard(name, r.shard, r.objects, r.bytes) for r in self._definer.ready(name)]

    def listed_bytes(self) -> int:
        """The bytes the run's listings held when `ready_shards` last looked, every dataset together."""
        return sum(self._definer.listed_bytes.values()) if self._definer is not None else 0

    def stop_listing(self) -> None:
        """Stop every listing of the run at its next page (the flow stopped while datasets listed):
        the pages stored are kept for the next run."""
        self._listing_stop.set()

    def shard_plan(self) -> ShardPlan:
        """Every shard the run defined, dataset by dataset in the order they began listing."""
        with self._lock:
            names = tuple(self._sharded)
        return ShardPlan(names, tuple(PlannedShard(name, r.shard, r.objects, r.bytes)
                                      for name in names for r in self.state.shards(self.run_id, name)))

    def copy_shard(self, dataset: str, shard: int, progress: ProgressCallback | None = None) -> ShardResult:
        """Copy the objects of one listed shard. Run again (a task retry), it tries again only the
        objects this run has not copied yet or that failed after their copy started; the result
        counts the shard's objects over every attempt."""
        state = self.state
        began = time.monotonic()
        state.shard_started(self.run_id, dataset, shard, f"{socket.gethostname()}:{os.getpid()}")
        rows = state.shard_rows(self.run_id, dataset, shard)
        retry_rows = {key: row.id for key, row in rows.items() if row.state == st.FAILED and row.started_at}
        done = {key for key, row in rows.items() if key not in retry_rows}
        sink, fmt = self.sink(dataset), self.formats[dataset]
        items = place_all((m for m in state.listed(self.run_id, dataset, shard) if m.key not in done),
                          placer(self.loaded, dataset, sink.limits, fmt))
        status, reason, transient = "error", None, True
        try:
            summary = self._copy(dataset, items, progress, retry_rows)
            transient = summary.transient_failures > 0
        except Exception as exc:  # the shard stopped (not an object failure): status "error"
            reason = f"{type(exc).__name__}: {exc}"
            with self._lock:
                self._shard_errors[(dataset, shard)] = reason
            raise
        finally:
            seconds = time.monotonic() - began
            result = self.shard_result(dataset, shard, seconds, transient)
            if reason is None:
                status = "ok" if result.ok else "failed"
                reason = None if result.ok else failure_sentence(result)
            state.shard_finished(self.run_id, dataset, shard, status, seconds, reason)
        return result

    def shard_result(self, dataset: str, shard: int, seconds: float = 0.0, transient: bool = False) -> ShardResult:
        """A shard's figures from this run's rows of its objects."""
        record = self.state.shard(self.run_id, dataset, shard)
        counts = self.state.shard_counts(self.run_id, dataset, shard)
        get = lambda *states: (sum(counts.states.get(s, (0, 0))[0] for s in states),  # noqa: E731
                               sum(counts.states.get(s, (0, 0))[1] for s in states))
        copied, bytes_copied = get(*st.COPIED)
        unchanged, _ = get(st.UNCHANGED)
        failed, _ = get(st.FAILED, st.IN_PROGRESS, st.CHANGED)
        return ShardResult(self.run_id, dataset, shard, record.objects, record.bytes, copied, unchanged, failed,
                           bytes_copied, counts.output_bytes, seconds, record.attempts, counts.failures,
                           transient and failed > 0, counts.transient_keys)

    def shards_ended(self, plan: ShardPlan, why_stopped: Callable[[str, int], str]) -> ShardsEnded:
        """Every shard task of `plan` has ended: read how each ended from the state store, and
        close the run's copying (`finish` then records it ok or failed).

        A dataset whose shards all went through is done (`dataset_done`: objects gone from the
        source, its audit records). A shard that did not (its task stopped on an error, its process
        died, or it never ran) fails the run; `why_stopped(dataset, shard)` names what the caller
        saw when the state holds no reason."""
        outcomes: list[ShardOutcome] = []
        unfinished: list[str] = []
        for name in (d for d in self.datasets if d in plan.datasets):
            records = [self.state.shard(self.run_id, name, s.shard) for s in plan.of(name)]
            if all(r.status in WENT_THROUGH for r in records):
                self.dataset_done(name)
            else:
                unfinished.append(name)
            ended = [shard_outcome(r, self.shard_result(name, r.shard, r.seconds or 0.0),
                                   partial(why_stopped, name, r.shard)) for r in records]
            with self._lock:
                for o in ended:
                    if not o.went_through:
                        self._shard_errors.setdefault((name, o.result.shard), o.reason)
            outcomes += ended
        self.completed = True
        return ShardsEnded(tuple(outcomes), tuple(unfinished))

    # ---- the end -------------------------------------------------------------------------------

    def _stop_unwritable(self) -> None:
        """End a run whose state cannot be written: as a kill would, without a word more in the
        state or the manifest (the run's row still says running and its trail has no run_end; the
        next run records it as interrupted), the lock released; raise `StateUnwritable`."""
        try:
            self.trail.abandon()
            self.state.close()
        finally:
            _ACTIVE.pop(self.run_id, None)
            self._lock_file.close()
        raise self.state.unwritable

    def finish(self) -> MigrationResult:
        """Close the run (status ok, failed, or interrupted when `completed` was not set), record
        the audit trail and publish the manifest. Call once, whatever happened before."""
        self._thaw()
        if self._sharded:  # one summary per dataset from its rows (shard attempts overlap)
            elapsed = time.monotonic() - self.started
            summaries = tuple(summary_from_rows(self.state, self.run_id, name, elapsed) for name in self._sharded)
        else:
            summaries = tuple(self._summaries)
        status = "interrupted"
        if self.completed:
            status = "ok" if all(s.all_ok for s in summaries) and not self._shard_errors else "failed"
        try:
            if self._executors is not None:
                self._executors.__exit__(None, None, None)
        finally:
            if self.state.unwritable is not None:
                self._stop_unwritable()
            loaded, datasets = self.loaded, self.datasets
            try:
                self.state.finish_run(self.run_id, status)
                md5_checked = self.state.md5_checked(self.run_id)
                not_carried = {ds: self.state.not_carried(self.run_id, ds) for ds in self.datasets}
                try:
                    self.trail.end(status)
                except StateUnwritable:  # the manifest's disk, this time
                    self.trail.abandon()
                    raise
                # Through the run's sinks (paced, with the state store still open).
                copies, notes = self.trail.publish([loaded.config.datasets[ds].destination for ds in datasets],
                                                   self.sinks)
                resent = sum(getattr(sink, "bodies_resent_by_sdk", 0) for sink in self.sinks.opened())
            finally:
                try:
                    self._close_endpoints()
                finally:
                    self.state.close()
                    _ACTIVE.pop(self.run_id, None)
                    self._lock_file.close()  # releases the project's migration lock
        return MigrationResult(self.run_id, summaries, md5_checked, time.monotonic() - self.started,
                               state_location(loaded),
                               {ds: self.verdicts[loaded.config.datasets[ds].destination] for ds in datasets},
                               {ds: key_holder(loaded, self.formats[ds]) for ds in datasets},
                               tuple(self.keyset_copies), self.trail.outcome(copies, notes), tuple(self._removed),
                               resent, {ds: counts for ds, counts in not_carried.items() if counts})


def _with_throttling(progress: ProgressCallback, pacing: RunPacing, snapshot: Progress) -> None:
    progress(replace(snapshot, throttling=pacing.throttling()))


def summary_from_rows(state: StateStore, run_id: int, dataset: str, elapsed: float) -> DatasetSummary:
    """A dataset's summary from the run's rows (what a sharded run reports: its shards overlapped
    in time, and a retried shard counts each object once)."""
    t = state.dataset_totals(run_id, dataset)
    return DatasetSummary(dataset=dataset, run_id=run_id, objects=t.objects, ok=t.copied, failed=t.failed,
                          skipped=t.unchanged, refused=t.refused, bytes_total=t.bytes_total,
                          bytes_copied=t.bytes_copied, bytes_sent=t.bytes_written, parts=t.parts,
                          restarts=t.restarts, failures=t.failures, failures_truncated=t.failures_truncated,
                          elapsed_seconds=elapsed)


# Runs open in this process, by run id: the flows' shard tasks find theirs here (they run in the
# flow's process, in threads, and so share its memory budget and transfer threads).
_ACTIVE: dict[int, MigrationRun] = {}


def register_run(run: MigrationRun) -> None:
    _ACTIVE[run.run_id] = run


def active_run(run_id: int, *, missing_ok: bool = False) -> MigrationRun | None:
    """The run `run_id` opened by `start` in this process (None with `missing_ok` when it is not)."""
    run = _ACTIVE.get(run_id)
    if run is None and not missing_ok:
        raise RuntimeError(f"migration run {run_id} is not open in this process")
    return run


def key_holder(loaded: LoadedConfig, fmt: OutputFormat) -> str:
    """Who holds the keys of a dataset written with `fmt`, for the plan and the report."""
    if fmt is IDENTITY:
        return "not encrypted (dataset marked public)"
    kek = loaded.config.keys.kek
    where = {"local": "a local key file (lab only)", "openbao": "OpenBao/Vault transit", "pkcs11": "a PKCS#11 HSM",
             "ovhcloud-kms": "OVHcloud KMS", "scaleway-kms": "Scaleway Key Manager"}.get(kek.backend, kek.backend)
    return f"Tink AES256_GCM_HKDF_1MB, data key {fmt.keys.primary_id}, keyset wrapped by {where}"
