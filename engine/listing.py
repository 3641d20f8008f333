"""A dataset's listing: where it comes from, and how the flows store it.

**Where from.** The source listed live, or the Azure Blob Inventory report the dataset names
(`datasets.<name>.inventory`): either way an iterator of `ObjectMeta` under the dataset's prefix
(`dataset_listing`), so that placement, the copy, the dry run and the inventory are the same. A
report is a past listing: each object is still read pinned to the report's ETag, so an object
changed since is re-read at its current version and one deleted since fails with its name
(engine/pipeline.py); objects created since are not in it. docs/DESIGN.md, "Inventory reports".

**Into the state store** (`RangedListing`). The flows list each dataset once into the `listing`
table and copy it shard by shard as its shards are final (`MigrationRun.list_dataset`,
`ready_shards`). At 10^8 blobs one listing request after the other takes hours, and a listing
killed part-way would start over; so:

- **Ranges.** The dataset's prefix is split by its folders: one "/"-delimited listing request per
  level (`RangeLister.folders`), down to `MAX_DEPTH` levels, until there are at least as many
  ranges as are listed at once. Each folder is a range, and the objects directly in a split level
  are one more (listed with the delimiter). Every key below the prefix is in exactly one range.
  A level too large to split (more than `FOLDER_LIMIT` entries, a flat container) stays one range;
  a source without `RangeLister` is always one range, listed with `list`; so is an inventory
  report, whose marker is the number of its rows already stored (its files are pinned to their
  ETags: a report read again gives its rows in the same order).
- **At once.** Each range is listed by a thread of a pool of its own (one request at a time per
  range, as a listing must); pages go through a bounded queue to the calling thread, which
  selects, cuts shards and stores them: memory holds at most a few pages, and the state store has
  one writer.
- **Resumable.** A page's rows and the range's marker after it (Azure's continuation token, or the
  last key) are stored in one transaction (`StateStore.record_listing_page`). A later run of the
  same dataset whose newest listing attempt never went through (killed, or stopped on an error)
  takes over its stored rows and ranges in the database (`StateStore.take_over_listing`), lists on
  from each unfinished range's marker and sends no request for the ranges already done.
- **Shards.** Each range has its own shard cutter, saved with each page; the rows of a range's
  n-th cut shard hold `listing_shard(range_no, n)` (below zero) while it lists, so that no shard
  holds objects of two ranges. A cut shard is final once the cutter has moved past it or its range
  is done: `engine.shards.ShardDefiner` then defines it (alone or merged with its neighbours),
  numbered 0, 1, ..., while the listing goes on, and the flow copies it at once. `seq` numbers
  pages in the order they were stored: in listing order within a range, which is all a shard needs.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from concurrent.futures import Future
from dataclasses import replace
from itertools import islice
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

from config.errors import UserError
from config.models import DatasetConfig, LoadedConfig
from connectors.base import (HISTORY_DIR, NOT_CARRIED, ConnectorError, ListingPage, ListingRange, ObjectMeta,
                             ObjectSource, RangeLister, count_in, history_key, history_of)
from connectors.name_set import NameSet

from .endpoints import open_azure_container
from .executors import create_pool, noted
from .shards import ShardCutter
from .state import ListingRangeRecord, StateStore, counts_to_json
from .state.schema import RANGE_SHARDS, listing_shard

if TYPE_CHECKING:
    from connectors.azure_changefeed import ChangeFeed, FeedReading
    from connectors.azure_inventory import InventoryReport


def dataset_listing(loaded: LoadedConfig, name: str, source: ObjectSource, *,
                    bare: bool = False) -> "LiveListing | ReportListing":
    """The objects of dataset `name` under its prefix: the source listed live (`LiveListing`;
    `bare`: without what a source asks each object for beside its listing), or its inventory
    report's rows (`ReportListing`; the manifest is read and checked here, before any row). Either
    counts, in `not_copied`, what it names that is not carried."""
    ds = loaded.config.datasets[name]
    if ds.inventory is None:
        return LiveListing(source, ds, bare=bare)
    return report_listing(loaded, name)


NotCarried = dict[str, tuple[int, int]]  # reason -> (objects, bytes) a listing names but no run carries


# Why a blob of the source is not copied when its own name has the form of an earlier state's key.
HISTORY_NAME = (f"its name has the form exitplan gives to earlier states of blobs ({HISTORY_DIR}<name>/snapshot-<time> "
                "or version-<id>) and could not be told apart from one; rename it at the source")


def selects(ds: DatasetConfig, meta: ObjectMeta) -> bool:
    """Whether dataset `ds` selects `meta`: by its name, or, for an earlier state of a blob carried
    under its history key, by the blob's name."""
    earlier = history_of(meta.key) if meta.earlier_state else None
    return ds.selects(earlier[0] if earlier else meta.key)


def page_entries(page: ListingPage, ds: DatasetConfig) -> tuple[list[ObjectMeta], list[ObjectMeta]]:
    """A listed page as (the objects dataset `ds` carries, in key order; the earlier states of blobs
    it does not carry). With `history: all`, each snapshot and earlier version is an object of its
    own under its history key (`connectors.base.history_key`); a blob whose own name has that form
    is named as not copyable rather than taken for one."""
    objects = [replace(m, not_copyable=m.not_copyable or HISTORY_NAME) if HISTORY_DIR in m.key and history_of(m.key)
               else m for m in page.objects]
    if ds.history != "all" or not page.history:
        return objects, page.history
    carried = [replace(m, key=history_key(m, ds.prefix)) for m in page.history]
    return sorted(objects + carried, key=lambda m: m.key), []


def count_not_carried(counts: NotCarried, history: Iterable[ObjectMeta], ds: DatasetConfig) -> NotCarried:
    """`counts` with the earlier states of blobs in `history` (snapshots, earlier versions) that
    dataset `ds` selects added, under their reasons (`connectors.base.NOT_CARRIED`)."""
    for meta in history:
        if ds.selects(meta.key):
            count_in(counts, NOT_CARRIED[meta.earlier_state or "snapshot"], meta.size)
    return counts


class LiveListing:
    """A dataset's objects listed live from its source (iterate it once); `not_copied`: the
    snapshots and earlier versions of its selected blobs, counted as the pages come."""

    origin = None  # a live listing, not a report

    def __init__(self, source: ObjectSource, ds: DatasetConfig, *, bare: bool = False):
        self.source, self.ds = source, ds
        self.bare = bare  # keys, sizes and markers only (connectors/base.py, `Lister`), where the source can
        self.not_copied: NotCarried = {}

    def __iter__(self) -> Iterator[ObjectMeta]:
        if not isinstance(self.source, RangeLister):
            if self.bare and getattr(self.source, "source_details", False):
                yield from self.source.list(self.ds.prefix, details=False)
            else:
                yield from self.source.list(self.ds.prefix)
            return
        for page in self.source.list_pages(ListingRange(self.ds.prefix)):
            objects, history = page_entries(page, self.ds)
            count_not_carried(self.not_copied, history, self.ds)
            yield from objects


def report_listing(loaded: LoadedConfig, name: str) -> "ReportListing | None":
    """Dataset `name`'s inventory report as a listing (its manifest read and checked), or None
    when the dataset is listed live."""
    ds = loaded.config.datasets[name]
    return None if ds.inventory is None else ReportListing(open_report(loaded, name), ds.container, ds.prefix)


def open_report(loaded: LoadedConfig, name: str) -> "InventoryReport":
    """Dataset `name`'s inventory report, its manifest checked (a `ConfigError` says why not)."""
    from connectors.azure_inventory import InventoryReport  # the Azure SDK, only when a report is used

    ds = loaded.config.datasets[name]
    inv = ds.inventory
    reader = open_azure_container(loaded, inv.source or ds.source, inv.container)
    return InventoryReport.open(reader, inv.container, inv.manifest_path, dataset_container=ds.container,
                                dataset_prefix=ds.prefix, field_name=f"datasets.{name}.inventory.report")


class ReportListing:
    """A dataset's objects read from its inventory report (iterate it once); `origin` and
    `not_copied` for the inventory and the dry run to show."""

    def __init__(self, report: "InventoryReport", container: str, prefix: str):
        self.report = report
        self._objects = report.objects(container, prefix)

    def __iter__(self) -> Iterator[ObjectMeta]:
        return self._objects

    @property
    def origin(self) -> str:
        return self.report.origin

    @property
    def not_copied(self) -> NotCarried:
        return dict(self.report.not_copied)


def listed_from(inventory, listing) -> None:
    """Note on a `DatasetInventory` (or anything with `listed_from` and `not_copied`) where
    `listing` came from (an inventory report, or None: live) and what it named but does not carry."""
    inventory.listed_from = listing.origin
    inventory.not_copied = dict(listing.not_copied)


def refuse_delete_removed(loaded: LoadedConfig, datasets: list[str]) -> None:
    """`--delete-removed` deletes the copies of objects a listing no longer has; a report is a past
    listing (objects created since are not in it), so it is refused for datasets read from one."""
    from_reports = [n for n in datasets if loaded.config.datasets[n].inventory is not None]
    if from_reports:
        raise UserError(f"--delete-removed cannot be used with dataset(s) {', '.join(from_reports)}: they are read from "
                        "an inventory report, which does not have the objects created after it was made; run without "
                        "--delete-removed, or remove `inventory` to list the source live")


# ---- into the state store ----------------------------------------------------------------------

log = logging.getLogger(__name__)

FOLDER_LIMIT = 5000  # entries a level may hold to be split into its folders (one listing request)
MAX_DEPTH = 2  # levels below the dataset's prefix that may be split
MAX_RANGES = 256  # a dataset has at least as many shards as ranges (`listing_shard` numbers stay within 32 bits)
PAGE_SIZE = 1000  # objects per page for a source listed with `list`
CHANGED_AT_ONCE = 16  # names the change feed says changed, listed again at once
CHANGES_BATCH = 500  # ... and stored per transaction


def listing_basis(ds: DatasetConfig) -> str:
    """What a dataset's listing selects: a later run takes over a stored listing only when its
    own basis is the same (the same objects would be listed and selected)."""
    basis = {"source": ds.source, "container": ds.container, "prefix": ds.prefix,
             "include": list(ds.include), "exclude": list(ds.exclude)}
    if ds.inventory is not None:  # another report gives other rows in another order
        basis["inventory"] = ds.inventory.model_dump(mode="json")
    if ds.history != "current":  # earlier states listed as objects (the current basis stays as it was)
        basis["history"] = ds.history
    return json.dumps(basis, sort_keys=True)


def discover_ranges(source: ObjectSource, prefix: str, wanted: int) -> list[ListingRange]:
    """The ranges to list `prefix` in: split by folders, a level at a time (one request per folder
    split), until there are `wanted` ranges or `MAX_DEPTH` levels were split. One range when
    `wanted` is 1 or the source cannot list a range on its own."""
    ranges = [ListingRange(prefix)]
    if wanted <= 1 or not isinstance(source, RangeLister):
        return ranges
    for _ in range(MAX_DEPTH):
        if len(ranges) >= wanted:
            break
        split: list[ListingRange] = []
        for part in ranges:
            level = None if part.direct else source.folders(part.prefix, FOLDER_LIMIT)
            if not level or not level[0]:  # objects only, too many entries, or already direct
                split.append(part)
                continue
            folders, direct = level
            split += ([ListingRange(part.prefix, direct=True)] if direct else []) + [ListingRange(f) for f in folders]
        if len(split) > MAX_RANGES or split == ranges:
            break
        ranges = split
    return ranges


def range_label(part: ListingRange | ListingRangeRecord) -> str:
    """A range as a user reads it: `'claims/2024/'`, or `objects directly in 'claims/'`."""
    return f"objects directly in {part.prefix!r}" if part.direct else repr(part.prefix)


class ListingStopped(Exception):
    """The run stopped while a dataset listed (`RangedListing.stop`): the pages stored are kept, and
    the next run lists on from them."""


class RangedListing:
    """One run's listing of one dataset into the state store (see the module docstring).

    Iterate `objects()` to list: it yields each selected object once it is stored (the objects of
    a taken-over listing first, read back from the state), for the caller's inventory. Then
    `shards` is how many shards were cut and `objects_stored` / `bytes_stored` what the listing holds.
    """

    def __init__(self, state: StateStore, run_id: int, name: str, ds: DatasetConfig, source: ObjectSource, *,
                 shard_bytes: int, shard_objects: int, at_once: int, report: ReportListing | None = None,
                 feed: "ChangeFeed | None" = None, full_listing: bool = False,
                 stop: threading.Event | None = None):
        self.state, self.run_id, self.name, self.ds, self.source = state, run_id, name, ds, source
        self.stop = stop  # once set, the listing stops at its next page (`ListingStopped`)
        self.report = report  # the dataset's inventory report, listed instead of the source (one range)
        # The account's change feed, for a dataset with `changes: feed`: the listing is made from the
        # last one and the names the feed says changed since (`_from_feed`) when it can be.
        self.feed = feed
        self.full_listing = full_listing  # asked for: list in full, noting where the feed stands
        self.feed_origin: str | None = None  # how the feed was used, or why it could not be
        self.shard_bytes, self.shard_objects, self.at_once = shard_bytes, shard_objects, at_once
        self.taken_over: int | None = None  # the run whose listing this one went on with
        self._ranges: dict[int, ListingRangeRecord] = {}  # range number -> how far it got

    @property
    def ranges(self) -> list[ListingRangeRecord]:
        return [self._ranges[n] for n in sorted(self._ranges)]

    @property
    def shards(self) -> int:
        return sum(r.shards for r in self.ranges)

    @property
    def objects_stored(self) -> int:
        return sum(r.objects for r in self.ranges)

    @property
    def bytes_stored(self) -> int:
        return sum(r.bytes for r in self.ranges)

    @property
    def not_copied(self) -> NotCarried:
        """The snapshots and earlier versions the ranges named (stored with each page), with an
        inventory report's rows that are not objects."""
        counts: NotCarried = dict(self.report.not_copied) if self.report is not None else {}
        for part in self.ranges:
            for reason, (objects, size) in part.not_carried_counts.items():
                count_in(counts, reason, size, objects)
        return counts

    @property
    def origin(self) -> str | None:
        return self.report.origin if self.report is not None else self.feed_origin

    def objects(self) -> Iterator[ObjectMeta]:
        basis = listing_basis(self.ds)
        self.taken_over = self.state.listing_to_resume(self.name, basis, self.run_id)
        if self.taken_over is not None:
            self.state.take_over_listing(self.taken_over, self.run_id, self.name)
            self._ranges = {r.range_no: r for r in self.state.listing_ranges(self.run_id, self.name)}
            log.info("%s: the listing goes on from run %d's (%d of %d range(s) done, %s object(s) stored)",
                     self.name, self.taken_over, sum(r.done for r in self.ranges), len(self.ranges),
                     f"{self.objects_stored:,}")
            yield from self.state.listed(self.run_id, self.name)
        else:
            if self.feed is not None:
                stored = self._from_feed(basis)
                if stored is not None:
                    yield from stored
                    return
            parts = discover_ranges(self.source, self.ds.prefix, 1 if self.report is not None else self.at_once)
            self._ranges = {r.range_no: r for r in self.state.start_listing_ranges(
                self.run_id, self.name, basis, [(p.prefix, p.direct) for p in parts])}
        yield from self._list_ranges([r for r in self.ranges if not r.done])

    # ---- from the last listing and the change feed ----------------------------------------------

    def _from_feed(self, basis: str) -> Iterator[ObjectMeta] | None:
        """The listing made from the last one that went through and the names the change feed says
        changed since (each listed again: what it is now), stored; None when the feed cannot say
        everything that changed (`_in_full`: the caller lists in full)."""
        from connectors.azure_changefeed import FeedReading, FeedUnusable, feed_time, time_text

        try:
            through = self.feed.last_consumable()
        except FeedUnusable as why:
            return self._in_full(why, None)
        try:
            if self.full_listing:
                self.feed_origin = "a full listing, as asked (the next run reads the change feed from now)"
                self.state.record_feed_position(self.run_id, self.name, time_text(through))
                return None
            baseline = self.state.feed_baseline(self.name, basis, self.run_id)
            if baseline is None:
                raise FeedUnusable("no earlier listing of these objects went through with a position in the feed "
                                   "(the first run, or the dataset's selection changed)")
            base_run, after = baseline
            counted = [r for r in self.state.listing_ranges(base_run, self.name) if r.not_carried_counts]
            if counted:
                raise FeedUnusable(f"run {base_run}'s listing counted snapshots or earlier versions, which the feed "
                                   "does not keep count of")
            reading = FeedReading()
            with NameSet("changes") as changed:
                for key in self.feed.changed_names(self.ds.container, self.ds.prefix, feed_time(after), through,
                                                   reading):
                    changed.first(key)
                return self._apply_changes(basis, base_run, changed, reading, after, time_text(through))
        except FeedUnusable as why:
            return self._in_full(why, through)

    def _in_full(self, why: Exception, now) -> None:
        """The feed cannot be used: say why (logged, and in `origin` for the inventory and the
        report) and, when the feed is readable, note its position `now` (before the full listing's
        first request), from which the next run reads it."""
        from connectors.azure_changefeed import time_text

        self.feed_origin = f"a full listing: the change feed could not be used ({why})"
        log.warning("%s: listing in full: the change feed cannot be used: %s", self.name, why)
        if now is not None:
            self.state.record_feed_position(self.run_id, self.name, time_text(now))
        return None

    def _apply_changes(self, basis: str, base_run: int, changed: "NameSet", reading: "FeedReading",
                       after: str, through: str) -> Iterator[ObjectMeta]:
        """Run `base_run`'s listing copied in the database, less the `changed` names, plus what
        each of them is now (listed again, `CHANGED_AT_ONCE` at a time); then the range and the new
        feed position, in one transaction."""
        base_shards = self.state.start_from_listing(base_run, self.run_id, self.name)
        cutter = ShardCutter(self.shard_bytes, self.shard_objects)
        cutter.current = base_shards
        not_carried: NotCarried = {}
        seq = self.state.listing_length(self.run_id, self.name)
        pool = create_pool(CHANGED_AT_ONCE, f"changed-{self.name}")
        try:
            for names in changed.batches(CHANGES_BATCH):
                entries = []
                for page in pool.map(self.source.list_name, names):
                    objects, history = page_entries(page, self.ds)
                    count_not_carried(not_carried, history, self.ds)
                    entries += [(cutter.shard_of(m.size), m) for m in objects if selects(self.ds, m)]
                self.state.forget_listed(self.run_id, self.name, names)
                self.state.record_listing(self.run_id, self.name, entries, start=seq)
                seq += len(entries)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        part = self.state.finish_listing_from_feed(
            self.run_id, self.name, self.ds.prefix, basis, counts_to_json(not_carried) or None, feed_through=through,
            baseline=base_run, changed=changed.count, events=reading.events)
        self._ranges = {0: part}
        self.feed_origin = (f"run {base_run}'s listing and the change feed from {after} to {through} "
                            f"({reading.segments} segment(s), {reading.events:,} event(s), "
                            f"{changed.count:,} name(s) listed again)")
        log.info("%s: listed from %s", self.name, self.feed_origin)
        return self.state.listed(self.run_id, self.name)

    def _list_ranges(self, todo: list[ListingRangeRecord]) -> Iterator[ObjectMeta]:
        """List the ranges `todo` at once, each from its marker; store each page as it comes."""
        if not todo:
            return
        pages: queue.Queue = queue.Queue(maxsize=2 * min(self.at_once, len(todo)))
        stop = threading.Event()
        futures: list[tuple[ListingRangeRecord, Future]] = []
        seq = self.state.listing_length(self.run_id, self.name)
        open_ranges = {r.range_no for r in todo}
        pool = create_pool(min(self.at_once, len(todo)), f"listing-{self.name}")
        try:
            futures = [(r, pool.submit(self._produce, r, pages, stop)) for r in todo]
            while open_ranges:
                if self.stop is not None and self.stop.is_set():
                    raise ListingStopped(f"{self.name}: the run stopped before the listing ended; the next run "
                                         "lists on from where it got")
                try:
                    range_no, page = pages.get(timeout=1.0)
                except queue.Empty:
                    self._check_producers(futures)
                    continue
                if isinstance(page, BaseException):
                    raise _range_failed(self._ranges[range_no], page)
                stored = self._store(self._ranges[range_no], page, seq)
                seq += len(stored)
                if page.marker is None:
                    open_ranges.discard(range_no)
                yield from stored
        finally:
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
            self._collect(futures)

    def _produce(self, part: ListingRangeRecord, pages: queue.Queue, stop: threading.Event) -> None:
        """A listing thread: the pages of one range, from its marker, into `pages` (or its error)."""
        try:
            for page in self._pages(part):
                if not _put(pages, (part.range_no, page), stop):
                    return
                if page.marker is None:
                    return
            # a source that ended without a last page (no marker-less page): the range is done
            _put(pages, (part.range_no, ListingPage([], None)), stop)
        except BaseException as exc:
            _put(pages, (part.range_no, exc), stop)
            raise

    def _pages(self, part: ListingRangeRecord) -> Iterator[ListingPage]:
        what = ListingRange(part.prefix, part.direct)
        if self.report is not None:
            return _report_pages(self.report, part.marker)
        if isinstance(self.source, RangeLister):
            return self.source.list_pages(what, part.marker)
        return _pages_of(self.source, what, part.marker)

    def _store(self, part: ListingRangeRecord, page: ListingPage, seq: int) -> list[ObjectMeta]:
        """Select, cut and store one page of a range, with the range's new marker; returns what was stored."""
        cutter = ShardCutter(self.shard_bytes, self.shard_objects)
        cutter.current, cutter.objects, cutter.bytes = part.cut_shard, part.cut_objects, part.cut_bytes
        objects, history = page_entries(page, self.ds)
        entries = [(listing_shard(part.range_no, cutter.shard_of(m.size)), m) for m in objects if selects(self.ds, m)]
        not_carried = part.not_carried
        if history:
            not_carried = counts_to_json(count_not_carried(part.not_carried_counts, history, self.ds)) or not_carried
        after = ListingRangeRecord(
            part.run_id, part.dataset, part.range_no, part.prefix, part.direct, part.basis, page.marker,
            page.marker is None, part.objects + len(entries), part.bytes + sum(m.size for _, m in entries),
            min(cutter.current, RANGE_SHARDS - 1), cutter.objects, cutter.bytes, not_carried)
        self.state.record_listing_page(after, entries, seq)
        self._ranges[part.range_no] = after
        return [m for _, m in entries]

    def _check_producers(self, futures: list[tuple[ListingRangeRecord, Future]]) -> None:
        """While no page comes: a listing thread that ended on an error it could not hand over."""
        for part, future in futures:
            if future.done() and not future.cancelled() and future.exception() is not None:
                raise _range_failed(part, future.exception())

    def _collect(self, futures: list[tuple[ListingRangeRecord, Future]]) -> None:
        """Read every listing thread's outcome (each error is already raised or noted: log the rest)."""
        errors = [future.exception() for _, future in futures if not future.cancelled() and future.exception()]
        if errors:
            noted(errors[0], errors[1:], "another listing range")


def _range_failed(part: ListingRangeRecord, exc: BaseException) -> BaseException:
    """`exc` of a listing thread, its sentence naming the range (a connector error keeps its class)."""
    if not isinstance(exc, ConnectorError):
        exc.add_note(f"while listing the range {range_label(part)}")
        return exc
    try:
        named = type(exc)(f"the range {range_label(part)}: {exc}", key=exc.key)
    except TypeError:
        named = ConnectorError(f"the range {range_label(part)}: {exc}", key=exc.key)
    named.__cause__ = exc
    return named


def _put(pages: queue.Queue, item: tuple, stop: threading.Event) -> bool:
    """Hand `item` to the storing thread; False when the listing stopped meanwhile."""
    while not stop.is_set():
        try:
            pages.put(item, timeout=0.5)
            return True
        except queue.Full:
            continue
    return False


def _pages_of(source: ObjectSource, part: ListingRange, marker: str | None) -> Iterator[ListingPage]:
    """The listing of a source without `RangeLister` as pages whose marker is the last key: a
    resumed listing lists from the start again and skips the keys up to the marker."""
    objects = (m for m in source.list(part.prefix) if marker is None or m.key > marker)
    return _paged(objects, lambda page: page[-1].key)


def _report_pages(report: ReportListing, marker: str | None) -> Iterator[ListingPage]:
    """An inventory report's rows as pages whose marker is the number of rows stored so far: a
    resumed listing reads the report again (the same rows in the same order: its files are pinned
    to their ETags) and skips that many. A report's rows are in no key order, so a last key would
    not do."""
    done = int(marker) if marker else 0

    def count(page: list[ObjectMeta]) -> str:
        nonlocal done
        done += len(page)
        return str(done)

    return _paged(islice(iter(report), done, None), count)


def _paged(objects: Iterator[ObjectMeta], marker_after: Callable[[list[ObjectMeta]], str]) -> Iterator[ListingPage]:
    """`objects` in pages of `PAGE_SIZE`, each with the marker a resumed listing goes on from
    (`marker_after(page)`), the last one with none."""
    page = list(islice(objects, PAGE_SIZE))
    while True:
        following = list(islice(objects, PAGE_SIZE))
        yield ListingPage(page, marker_after(page) if following else None)
        if not following:
            return
        page = following
