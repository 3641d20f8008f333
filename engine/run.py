"""A whole migration run over the datasets of a configuration: what the CLI and the flows call.

Opens the connectors and the state store, streams each dataset's listing through placement into
`migrate_dataset` (or `dry_run`), shares one memory budget and one pair of executors across every
dataset, and reports through a small observer so that the CLI (a progress bar) and Prefect (an
artifact) can show the same run.
"""

from __future__ import annotations

import fcntl
import os
import socket
import threading
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Protocol

import sqlalchemy as sa

from config.errors import ConfigFileError, ExitCode, UserError
from config.models import LoadedConfig
from config.policy import DestinationVerdict, check_sovereignty
from connectors.base import AuthError, ConfigError, ConnectorError, NotFound, ObjectMeta, ObjectSource, SinkLimits

from .allocator import tune_malloc
from .audit import AuditOutcome, MigrationAudit, audit_signing_key
from .budget import MemoryBudget
from .endpoints import destination_limits, open_sink, open_source
from .executors import create_executors
from .inventory import DatasetInventory, inventory_dataset, selected
from .migrate import (DatasetSummary, DryRunSummary, PlannedObject, Progress, ProgressCallback, Refusal, dry_run,
                      migrate_dataset, place_all)
from .naming import Placement, place
from .pipeline import IDENTITY, OutputFormat
from .settings import TransferSettings
from . import state as st
from .state import StateStore

STATE_FILE = "state.db"


class RunError(UserError):
    """The run could not start or go on: a source or destination unreachable, denied or missing.

    Exit code 2 when the configuration must change (credentials refused, container or bucket
    missing, endpoint unusable), 1 otherwise (the service failed; running again may succeed).
    """

    def __init__(self, message: str, cause: ConnectorError | None = None):
        fix_config = isinstance(cause, (AuthError, ConfigError, NotFound))
        super().__init__(message, ExitCode.USAGE if fix_config else ExitCode.FAILED)


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
    )


def state_path(loaded: LoadedConfig) -> Path:
    return loaded.state_dir / STATE_FILE


def state_url(loaded: LoadedConfig) -> str | None:
    """The database URL of `state.url_env` (None: the SQLite file of the state directory)."""
    var = loaded.config.state.url_env
    if var is None:
        return None
    url = os.environ.get(var)
    if not url:
        raise ConfigFileError(f"{loaded.path}: field `state.url_env` names the environment variable {var}, which is "
                              "not set; export it (postgresql+psycopg://user:password@host:5432/db)")
    return url


@contextmanager
def state_database_errors(loaded: LoadedConfig) -> Iterator[None]:
    """A state database that cannot be used becomes a `RunError` (exit 2) naming it, without its password."""
    try:
        yield
    except sa.exc.ArgumentError as exc:
        raise RunError(f"{loaded.path}: field `state.url_env`: ${loaded.config.state.url_env} is not a database URL "
                       f"({exc})", ConfigError(str(exc))) from None
    except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
        raise RunError(f"the state database {state_location(loaded)} cannot be used: "
                       f"{str(exc.orig).strip().splitlines()[0]}", ConfigError(str(exc.orig))) from None


def state_location(loaded: LoadedConfig) -> str:
    """Where the state is, for messages: the SQLite file, or the database URL without its password."""
    url = state_url(loaded)
    if url is None:
        return str(state_path(loaded))
    return sa.engine.make_url(url).render_as_string(hide_password=True)


def open_state(loaded: LoadedConfig, *, read_only: bool = False) -> StateStore | None:
    """The project's state store; read-only returns None when it does not exist yet (writes nothing).
    A database that cannot be reached is a `RunError` (exit 2) naming it, never with its password."""
    url = state_url(loaded)
    if url is not None:
        with state_database_errors(loaded):
            return StateStore(url)
    path = state_path(loaded)
    if read_only:
        if not path.exists():
            return None
        return StateStore(f"sqlite:///file:{path.resolve()}?mode=ro&uri=true")
    return StateStore(path)


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
    """Places one object of dataset `name`; the 2 KB metadata budget counts the format's own metadata."""
    ds = loaded.config.datasets[name]
    reserved = getattr(fmt, "metadata_for", None)

    def place_one(meta: ObjectMeta) -> Placement:
        return place(meta, ds.prefix, ds.dest_prefix, limits, reserved=reserved(meta) if reserved else None)

    return place_one


def dataset_items(loaded: LoadedConfig, name: str, source: ObjectSource, limits: SinkLimits,
                  fmt: OutputFormat = IDENTITY) -> Iterator[tuple[ObjectMeta, Placement | Refusal]]:
    """The dataset's selected objects, listed lazily, each placed at the destination or refused."""
    ds = loaded.config.datasets[name]
    return place_all(selected(source.list(ds.prefix), ds), placer(loaded, name, limits, fmt))


def preflight_destinations(loaded: LoadedConfig, datasets: list[str]) -> None:
    """One listing request per dataset destination before any object moves: a missing bucket or
    refused credentials stop the run with one sentence (exit 2) instead of failing every object."""
    for name in datasets:
        ds = loaded.config.datasets[name]
        sink = _wrap(f"destination `{ds.destination}`", open_sink, loaded, ds.destination)
        _wrap(f"dataset `{name}`: destination `{ds.destination}`", lambda: next(iter(sink.list(ds.dest_prefix)), None))


def publish_keysets(loaded: LoadedConfig, datasets: list[str], formats: dict[str, OutputFormat]) -> list[str]:
    """Put the wrapped keyset next to the data in each destination that receives encrypted objects,
    append-only (`engine.key_copies`): whoever holds the bucket and the KEK can read it back. First
    refuses (exit 4, nothing written) when a destination's copies hold a key id the local keyset lacks."""
    from .key_copies import publish_keysets as publish

    return publish(loaded, [n for n in datasets if formats[n] is not IDENTITY])


def count_dataset(loaded: LoadedConfig, name: str, source: ObjectSource) -> tuple[int, int]:
    """(objects, bytes) the dataset selects now: one listing pass, for progress and ETA."""
    ds = loaded.config.datasets[name]
    objects = total = 0
    for meta in selected(source.list(ds.prefix), ds):
        objects += 1
        total += meta.size
    return objects, total


class RunObserver(Protocol):
    def dataset_started(self, dataset: str, objects: int, bytes_total: int) -> None: ...
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

    @property
    def all_ok(self) -> bool:
        return all(s.all_ok for s in self.summaries) and not any(r.failures for r in self.removed)


def _wrap(what: str, fn: Callable, *args):
    """Call `fn`; a connector error (unreachable, denied, missing) becomes a `RunError` saying `what`."""
    try:
        return fn(*args)
    except ConnectorError as exc:
        raise RunError(f"{what}: {exc}", exc) from None


def inventory(loaded: LoadedConfig, datasets: list[str]) -> list[DatasetInventory]:
    """The inventory of each dataset (one streamed listing each)."""
    results = []
    for name in datasets:
        ds = loaded.config.datasets[name]
        source = _wrap(f"dataset `{name}`: source", open_source, loaded, name)
        limits = destination_limits(loaded, ds.destination)
        results.append(_wrap(f"dataset `{name}`: listing {source.label}", lambda: inventory_dataset(
            name, ds, source.list(ds.prefix), limits, source_label=source.label)))
    return results


@dataclass(frozen=True)
class RemovedAtSource:
    """Objects copied earlier that a dataset's listing no longer has (deleted at the source or no
    longer selected). Kept at the destination unless the run was asked to delete them."""

    dataset: str
    count: int
    examples: tuple[str, ...]  # the first source keys, for the summary
    deleted: int  # destination copies deleted (with --delete-removed)
    failures: tuple[tuple[str, str], ...] = ()  # (destination key, reason) of deletions that failed


MAX_REMOVED_EXAMPLES = 20


def handle_removed(state: StateStore, run_id: int, dataset: str, sink, *, delete: bool) -> RemovedAtSource:
    """Find what `dataset`'s complete listing in this run no longer has; with `delete`, delete each
    destination copy and record a `removed` row (written after the delete succeeded)."""
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
            delete_removed: bool = False) -> MigrationResult:
    """Copy every object of `datasets`; one failing object never stops the others.

    Objects copied by earlier runs that a dataset's (complete) listing no longer has are reported
    in `MigrationResult.removed`; the destination copies are deleted only with `delete_removed`.

    With `count_first`, each dataset is listed once before the copy so that progress can show a
    total and an ETA (`observer.dataset_started` gets the counts; otherwise -1, -1): one extra
    listing pass, about 0.1 ms of CPU per object.
    """
    run = MigrationRun.start(loaded, datasets, delete_removed=delete_removed)
    try:
        for name in datasets:
            run.copy_dataset(name, observer, count_first=count_first)
        run.completed = True
    finally:
        result = run.finish()
    return result


@dataclass(frozen=True)
class ShardResult:
    """What a shard's task made of its objects (this run's rows for them, over every attempt)."""

    run_id: int
    dataset: str
    shard: int
    objects: int
    bytes: int
    copied: int
    unchanged: int
    failed: int
    bytes_copied: int
    bytes_written: int  # output bytes at the destination (ciphertext for encrypted datasets)
    seconds: float
    attempt: int
    failures: tuple[tuple[str, str], ...]  # the first (source key, reason) pairs
    transient: bool  # some failure's cause may pass: trying the shard again can succeed

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.copied + self.unchanged == self.objects


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
        self.completed = False  # set by the caller when every dataset was gone through
        self._summaries: list[DatasetSummary] = []
        self._removed: list[RemovedAtSource] = []
        self._sharded: list[str] = []  # datasets listed into the state store (copied shard by shard)
        self._shard_counts: dict[str, int] = {}  # dataset -> shards as cut while listing
        # (dataset, shard) -> why its task stopped on an error (not an object failure): the run failed
        self.shard_errors: dict[tuple[str, int], str] = {}
        self.keyset_copies: list[str] = []
        self._lock = threading.Lock()
        self._endpoints: dict[tuple[str, str], object] = {}
        self.state: StateStore | None = None
        self.run_id = 0  # set by `start`, with the trail, the executors and the project's lock
        self.trail: MigrationAudit | None = None
        self._executors = None
        self.executors = None
        self._lock_file = None
        self.attached = False  # joined from another process (`attach`): copies shards, never finishes

    @classmethod
    def start(cls, loaded: LoadedConfig, datasets: list[str], *, delete_removed: bool = False,
              settings: TransferSettings | None = None) -> "MigrationRun":
        """Open the run (`settings`: the configuration's transfer settings unless given)."""
        run = cls(loaded, datasets, delete_removed=delete_removed, settings=settings)
        run._lock_file = lock_project(loaded)
        try:
            run._open()
        except BaseException:
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
        run._executors = create_executors(run.settings.concurrency, run.settings.object_concurrency)
        run.executors = run._executors.__enter__()
        return run

    def close(self) -> None:
        """Release an attached run's executors and state connection."""
        try:
            if self._executors is not None:
                self._executors.__exit__(None, None, None)
                self._executors = None
        finally:
            if self.state is not None:
                self.state.close()

    def _open(self) -> None:
        loaded, datasets = self.loaded, self.datasets
        preflight_destinations(loaded, datasets)
        self.keyset_copies = publish_keysets(loaded, datasets, self.formats)
        tune_malloc(self.settings.memory_budget)
        self.state = open_state(loaded)
        self.run_id = self.state.start_run("migrate", loaded.path)
        # The audit hook: transfer records are read back from the state rows after each dataset
        # and at the end (engine/audit.py), so the copy engine itself knows nothing of the manifest.
        self.trail = MigrationAudit(loaded, self.state, self.run_id, datasets, self.verdicts,
                                    {n: fmt.keys.primary_id for n, fmt in self.formats.items() if fmt is not IDENTITY},
                                    self.signing_key)
        self._executors = create_executors(self.settings.concurrency, self.settings.object_concurrency)
        self.executors = self._executors.__enter__()

    # ---- endpoints, opened once per run ---------------------------------------------------------

    def source(self, name: str) -> ObjectSource:
        return self._endpoint("source", name, f"dataset `{name}`: source", open_source, name)

    def sink(self, name: str):
        dest = self.loaded.config.datasets[name].destination
        return self._endpoint("sink", dest, f"dataset `{name}`: destination `{dest}`", open_sink, dest)

    def _endpoint(self, kind: str, name: str, what: str, opener: Callable, arg: str):
        with self._lock:
            if (kind, name) not in self._endpoints:
                self._endpoints[(kind, name)] = _wrap(what, opener, self.loaded, arg)
            return self._endpoints[(kind, name)]

    # ---- the CLI's way: a dataset at a time, streamed from its listing ----------------------------

    def copy_dataset(self, name: str, observer: RunObserver, *, count_first: bool = True) -> DatasetSummary:
        source, sink = self.source(name), self.sink(name)
        objects, total = (_wrap(f"dataset `{name}`: listing {source.label}", count_dataset, self.loaded, name, source)
                          if count_first else (-1, -1))
        observer.dataset_started(name, objects, total)
        try:
            summary = self._copy(name, dataset_items(self.loaded, name, source, sink.limits, self.formats[name]),
                                 observer.progress)
        except ConnectorError as exc:  # the listing itself failed part-way
            raise RunError(f"dataset `{name}`: {exc}", exc) from None
        self.dataset_done(name)
        observer.dataset_finished(summary)
        return summary

    def _copy(self, name: str, items, progress, retry_rows=None) -> DatasetSummary:
        sink, fmt = self.sink(name), self.formats[name]
        summary = migrate_dataset(
            name, self.source(name), sink, items, settings=self.settings, budget=self.budget,
            executors=self.executors, state=self.state, run_id=self.run_id, progress=progress, output_format=fmt,
            replace_placement=placer(self.loaded, name, sink.limits, fmt), retry_rows=retry_rows,
        )
        with self._lock:
            self._summaries.append(summary)
        return summary

    def dataset_done(self, name: str) -> None:
        """Every object of `name` was gone through: objects gone from the source are found (and
        their copies deleted on request) and the dataset's transfers go into the audit trail."""
        self._removed.append(handle_removed(self.state, self.run_id, name, self.sink(name),
                                            delete=self.delete_removed))
        self.trail.record_transfers(name, self.source(name), self.sink(name))

    # ---- the flows' way: list into the state store, then shard by shard ----------------------------

    def list_dataset(self, name: str, *, shard_bytes: int, shard_objects: int) -> tuple[DatasetInventory, int]:
        """List `name` once into the state store, cut into shards of consecutive objects (a shard
        closes at `shard_bytes` or `shard_objects`); returns the dataset's inventory and its number
        of shards. `define_shards` then fixes the run's shards once every dataset is listed."""
        ds = self.loaded.config.datasets[name]
        source = self.source(name)
        limits = destination_limits(self.loaded, ds.destination)
        cutter = ShardCutter(shard_bytes, shard_objects)
        page: list[tuple[int, ObjectMeta]] = []
        stored = 0

        def flush() -> None:
            nonlocal stored
            self.state.record_listing(self.run_id, name, page, start=stored)
            stored += len(page)
            page.clear()

        def listed() -> Iterator[ObjectMeta]:
            for meta in selected(source.list(ds.prefix), ds):
                page.append((cutter.shard_of(meta.size), meta))
                if len(page) >= 1000:
                    flush()
                yield meta

        with self._lock:
            self._sharded.append(name)
        inventory = _wrap(f"dataset `{name}`: listing {source.label}",
                          lambda: inventory_dataset(name, ds, listed(), limits, source_label=source.label))
        flush()
        with self._lock:
            self._shard_counts[name] = cutter.shards
        return inventory, cutter.shards

    def define_shards(self, max_shards: int) -> dict[str, tuple[st.ShardRecord, ...]]:
        """The shards of every listed dataset, written to the state store. When the run would have
        more than `max_shards` shards in all, each dataset's neighbouring shards are merged by the
        same factor, leaving at most about `max_shards` (one more per dataset at worst)."""
        total = sum(self._shard_counts.values())
        factor = -(-total // max_shards) if total > max_shards else 1
        shards = {}
        for name in self._sharded:
            if factor > 1:
                self.state.merge_shards(self.run_id, name, factor)
            shards[name] = tuple(self.state.define_shards(self.run_id, name))
        return shards

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
                self.shard_errors[(dataset, shard)] = reason
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
                           transient and failed > 0)

    # ---- the end -------------------------------------------------------------------------------

    def finish(self) -> MigrationResult:
        """Close the run (status ok, failed, or interrupted when `completed` was not set), record
        the audit trail and publish the manifest. Call once, whatever happened before."""
        if self._sharded:  # one summary per dataset from its rows (shard attempts overlap)
            elapsed = time.monotonic() - self.started
            summaries = tuple(summary_from_rows(self.state, self.run_id, name, elapsed) for name in self._sharded)
        else:
            summaries = tuple(self._summaries)
        status = "interrupted"
        if self.completed:
            status = "ok" if all(s.all_ok for s in summaries) and not self.shard_errors else "failed"
        try:
            if self._executors is not None:
                self._executors.__exit__(None, None, None)
        finally:
            try:
                self.state.finish_run(self.run_id, status)
                md5_checked = sum(1 for r in self.state.objects(self.run_id) if r.md5_checked)
                try:
                    self.trail.end(status)
                finally:
                    self.state.close()
            finally:
                _ACTIVE.pop(self.run_id, None)
                self._lock_file.close()  # releases the project's migration lock
        loaded, datasets = self.loaded, self.datasets
        copies, notes = self.trail.publish([loaded.config.datasets[ds].destination for ds in datasets])
        return MigrationResult(self.run_id, summaries, md5_checked, time.monotonic() - self.started,
                               state_location(loaded),
                               {ds: self.verdicts[loaded.config.datasets[ds].destination] for ds in datasets},
                               {ds: key_holder(loaded, self.formats[ds]) for ds in datasets},
                               tuple(self.keyset_copies), self.trail.outcome(copies, notes), tuple(self._removed))


def summary_from_rows(state: StateStore, run_id: int, dataset: str, elapsed: float) -> DatasetSummary:
    """A dataset's summary from the run's rows (what a sharded run reports: its shards overlapped
    in time, and a retried shard counts each object once)."""
    t = state.dataset_totals(run_id, dataset)
    return DatasetSummary(dataset=dataset, run_id=run_id, objects=t.objects, ok=t.copied, failed=t.failed,
                          skipped=t.unchanged, refused=t.refused, bytes_total=t.bytes_total,
                          bytes_copied=t.bytes_copied, bytes_sent=t.bytes_written, parts=t.parts,
                          restarts=t.restarts, failures=t.failures, failures_truncated=t.failures_truncated,
                          elapsed_seconds=elapsed)


LOCK_FILE = "migrate.lock"


class _DatabaseLock:
    """A PostgreSQL session advisory lock on the project, held by a connection of its own (ended,
    with the lock, by `close` or by the process's death)."""

    def __init__(self, loaded: LoadedConfig, url: str):
        self.engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
        with state_database_errors(loaded):
            self.conn = self.engine.connect()
        key = zlib.crc32(f"exitplan-migrate|{loaded.config.project}".encode())
        if not self.conn.execute(sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar():
            self.close()
            raise RunError(f"another migration of project `{loaded.config.project}` is running (it holds the "
                           f"project's lock in the state database {state_location(loaded)}); wait for it to end, "
                           "then run again")
        self.conn.commit()

    def close(self) -> None:
        self.conn.close()
        self.engine.dispose()


def lock_project(loaded: LoadedConfig):
    """Take the project's migration lock (an exclusive `flock` on `<state dir>/migrate.lock`, held
    until the returned file is closed; with a state database, an advisory lock in it, so that runs
    on different hosts exclude each other too): two migrations of one project at once would copy
    the same objects and interleave their state. A held lock is a `RunError` naming who holds it."""
    url = state_url(loaded)
    if url is not None and url.startswith("postgresql"):
        return _DatabaseLock(loaded, url)
    loaded.state_dir.mkdir(parents=True, exist_ok=True)
    path = loaded.state_dir / LOCK_FILE
    f = open(path, "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise RunError(f"another migration of project `{loaded.config.project}` is running ({holder}, lock {path}); "
                       "wait for it to end, then run again") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}, started {datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S}Z\n")
    f.flush()
    return f


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


class ShardCutter:
    """Cuts a listing into shards as it streams by: a shard closes once it holds `max_bytes` or
    `max_objects` (an object larger than `max_bytes` is a shard of its own)."""

    def __init__(self, max_bytes: int, max_objects: int):
        self.max_bytes, self.max_objects = max_bytes, max_objects
        self.current = 0
        self.objects = self.bytes = 0

    @property
    def shards(self) -> int:
        return self.current + (1 if self.objects else 0)

    def shard_of(self, size: int) -> int:
        if self.objects and (self.objects >= self.max_objects or self.bytes + size > self.max_bytes):
            self.current += 1
            self.objects = self.bytes = 0
        self.objects += 1
        self.bytes += size
        return self.current


def failure_sentence(result: ShardResult) -> str:
    """A shard's failures in one sentence (the first three named)."""
    shown = "; ".join(f"{key}: {reason}" for key, reason in result.failures[:3])
    more = f" (and {result.failed - 3} more)" if result.failed > 3 else ""
    return f"{result.failed} of {result.objects} objects failed: {shown}{more}"


def key_holder(loaded: LoadedConfig, fmt: OutputFormat) -> str:
    """Who holds the keys of a dataset written with `fmt`, for the plan and the report."""
    if fmt is IDENTITY:
        return "not encrypted (dataset marked public)"
    kek = loaded.config.keys.kek
    where = {"local": "a local key file (lab only)", "openbao": "OpenBao/Vault transit", "pkcs11": "a PKCS#11 HSM",
             "ovhcloud-kms": "OVHcloud KMS", "scaleway-kms": "Scaleway Key Manager"}.get(kek.backend, kek.backend)
    return f"Tink AES256_GCM_HKDF_1MB, data key {fmt.keys.primary_id}, keyset wrapped by {where}"


def plan(loaded: LoadedConfig, datasets: list[str], on_object: Callable[[str, PlannedObject], None]
         ) -> list[DryRunSummary]:
    """What `migrate` would write, per dataset, touching nothing: the state store is only read (if
    it exists), and of the destination only its keyset copies, refused (exit 4) as `migrate` would
    refuse them. The keyset is unwrapped (a read), so a dry run also proves the KEK works."""
    from .key_copies import check_keysets

    formats = output_formats(loaded, datasets)
    check_keysets(loaded, [n for n in datasets if formats[n] is not IDENTITY])
    settings = transfer_settings(loaded)
    state = open_state(loaded, read_only=True)
    results = []
    try:
        for name in datasets:
            ds = loaded.config.datasets[name]
            source = _wrap(f"dataset `{name}`: source", open_source, loaded, name)
            limits = destination_limits(loaded, ds.destination)
            try:
                results.append(dry_run(name, dataset_items(loaded, name, source, limits, formats[name]), limits,
                                       settings, output_format=formats[name], state=state,
                                       on_object=partial(on_object, name)))
            except ConnectorError as exc:
                raise RunError(f"dataset `{name}`: listing {source.label}: {exc}", exc) from None
    finally:
        if state is not None:
            state.close()
    return results


def restore(loaded: LoadedConfig, dataset: str, to_dir: Path, *, prefix: str = "",
            on_object: Callable | None = None):
    """Read `dataset` back from its destination into `to_dir`, decrypted and checked against the
    plaintext SHA-256 recorded at copy time (see `engine.restore`). Keys are unwrapped first."""
    from .restore import RestoreError, restore_dataset

    keys = None
    if not loaded.config.datasets[dataset].public:
        from .keys import load_data_keys

        keys = load_data_keys(loaded)
    state = open_state(loaded, read_only=True)

    def recorded(source_key: str) -> str | None:
        if state is None:
            return None
        row = state.last_copy(dataset, source_key)
        return row.sha256 if row else None

    try:
        return restore_dataset(loaded, dataset, to_dir, prefix=prefix, keys=keys, recorded=recorded, on_object=on_object)
    except RestoreError as exc:
        raise RunError(str(exc), exc.cause) from None
    finally:
        if state is not None:
            state.close()


@dataclass(frozen=True)
class OrphanUpload:
    """A multipart upload open under a dataset's destination prefix that no state row refers to
    (a run killed between CreateMultipartUpload and recording it, or a state store lost)."""

    dataset: str
    destination: str
    key: str
    upload_id: str
    initiated: datetime | None
    aborted: bool = False

    @property
    def age_seconds(self) -> float | None:
        if self.initiated is None:
            return None
        initiated = self.initiated if self.initiated.tzinfo else self.initiated.replace(tzinfo=timezone.utc)
        return (datetime.now(timezone.utc) - initiated).total_seconds()


def cleanup(loaded: LoadedConfig, datasets: list[str], *, abort: bool = False) -> list[OrphanUpload]:
    """The multipart uploads under each dataset's destination prefix that no state row refers to
    (uploads a row refers to are kept: an in-progress one is what the next `migrate` resumes).
    With `abort`, each is aborted; otherwise nothing is touched. The state store is only read."""
    state = open_state(loaded, read_only=True)
    try:
        known = state.upload_ids() if state is not None else set()
    finally:
        if state is not None:
            state.close()
    found: list[OrphanUpload] = []
    seen: set[tuple[str, str]] = set()
    for name in datasets:
        ds = loaded.config.datasets[name]
        sink = _wrap(f"destination `{ds.destination}`", open_sink, loaded, ds.destination)
        pending = _wrap(f"dataset `{name}`: listing the multipart uploads of {sink.label}",
                        lambda: list(sink.list_multipart_uploads(ds.dest_prefix)))
        for upload in pending:
            if upload.upload_id in known or (ds.destination, upload.upload_id) in seen:
                continue
            seen.add((ds.destination, upload.upload_id))
            if abort:
                _wrap(f"dataset `{name}`: aborting upload {upload.upload_id} of {upload.key}", _abort, sink, upload)
            found.append(OrphanUpload(name, ds.destination, upload.key, upload.upload_id, upload.initiated, abort))
    return found


def _abort(sink, upload) -> None:
    try:
        handle = sink.resume_multipart(upload.key, upload.upload_id)
    except NotFound:
        return  # gone since it was listed (completed or aborted by someone else): nothing to do
    handle.abort()
