"""The values the state store's reads return: frozen, named, never a database row."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Mapping, NamedTuple


@dataclass(frozen=True)
class ObjectRecord:
    id: int
    run_id: int
    dataset: str
    source_key: str
    source_etag: str
    size: int
    state: str
    reason: str | None
    sha256: str | None
    source_md5: str | None
    md5_checked: bool
    dest_key: str | None
    dest_etag: str | None
    output_size: int | None
    part_count: int | None
    restarts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    upload_id: str | None = None
    header: str | None = None  # hex
    key_id: int | None = None
    transient: bool | None = None  # a failed row: whether its cause may pass
    etag_checked: bool | None = None  # the write's ETag compared with the bytes' MD5s (False: opaque ETags)
    storage_class: str | None = None  # what it was written in (None: the bucket's default, or not recorded)
    tags_digest: str | None = None  # of the tags written with it (None: none, or not recorded)


class CurrentCopy(NamedTuple):
    """What a delta pass needs of an object's current copy (`StateStore.current_copies`), made
    once per object of a listing: a tuple, without the row's times."""

    run_id: int
    source_key: str
    source_etag: str
    size: int
    dest_key: str | None
    dest_etag: str | None
    sha256: str | None
    storage_class: str | None
    tags_digest: str | None


@dataclass(frozen=True)
class PartRecord:
    """A part the destination acknowledged (`md5`: hex of the bytes sent, None if unknown)."""

    number: int
    etag: str
    size: int
    md5: str | None


@dataclass(frozen=True)
class ShardRecord:
    """A shard of a run: consecutive listed objects of one dataset, and how its task went."""

    run_id: int
    dataset: str
    shard: int
    objects: int
    bytes: int
    first_key: str
    last_key: str
    status: str
    attempts: int
    seconds: float | None
    reason: str | None
    started_at: datetime | None
    finished_at: datetime | None
    worker: str | None = None


def counts_from_json(raw: str | None) -> dict[str, tuple[int, int]]:
    """The counts a `not_carried` column holds (JSON {reason: [objects, bytes]}; None: none)."""
    return {reason: (int(n[0]), int(n[1])) for reason, n in json.loads(raw).items()} if raw else {}


def counts_to_json(counts: Mapping[str, tuple[int, int]]) -> str | None:
    """`counts` as a `not_carried` column holds them (None when there are none)."""
    return json.dumps({reason: list(n) for reason, n in counts.items()}) if counts else None


@dataclass(frozen=True)
class ListingRangeRecord:
    """One range of a run's listing of a dataset (`schema.listing_ranges`): what it lists, how far
    its listing got, and where its shard cutter stands."""

    run_id: int
    dataset: str
    range_no: int
    prefix: str
    direct: bool
    basis: str
    marker: str | None
    done: bool
    objects: int
    bytes: int
    cut_shard: int
    cut_objects: int
    cut_bytes: int
    not_carried: str | None = None  # JSON {reason: [objects, bytes]}: snapshots, earlier versions

    @property
    def not_carried_counts(self) -> dict[str, tuple[int, int]]:
        """The earlier states of blobs the range's pages named so far: reason -> (objects, bytes)."""
        return counts_from_json(self.not_carried)

    @property
    def shards(self) -> int:
        """The shards cut in this range so far (the current one counts once it holds an object)."""
        return self.cut_shard + (1 if self.cut_objects else 0)


@dataclass(frozen=True)
class ShardCounts:
    """What the state store says of a shard's objects in its run: state -> (objects, bytes), the
    destination bytes written, and the first failures with their reasons."""

    states: Mapping[str, tuple[int, int]]
    output_bytes: int
    failures: tuple[tuple[str, str], ...]
    # The keys among `failures` whose cause may pass (a re-run can succeed); the others are permanent.
    transient_keys: frozenset[str] = frozenset()


@dataclass(frozen=True)
class DatasetTotals:
    """A run's rows of one dataset, added up (`failed` includes rows left in progress; `refused`
    are failed rows whose copy never started)."""

    objects: int
    copied: int
    failed: int
    unchanged: int
    refused: int
    bytes_total: int
    bytes_copied: int
    bytes_written: int
    parts: int
    restarts: int
    failures: tuple[tuple[str, str], ...] = ()
    failures_truncated: bool = False


@dataclass(frozen=True)
class RunRecord:
    id: int
    command: str
    config_path: str | None
    dry_run: bool
    status: str
    started_at: datetime
    finished_at: datetime | None
    objects_total: int
    objects_ok: int
    objects_failed: int
    objects_skipped: int
    bytes_total: int
    bytes_sent: int


@dataclass(frozen=True)
class DatasetFigures:
    """A dataset's objects by their newest copy (per source key, the newest row that copied, was
    verified or failed): how many and how many bytes are at the destination, and how proven."""

    dataset: str
    objects: int
    bytes: int  # plaintext, of every object counted
    verified: int
    unverified: int  # copied, not verified yet
    failed: int
    output_bytes: int  # stored at the destination (ciphertext for encrypted datasets); failed rows excluded
    last_finished: datetime | None  # naive UTC, of the newest copy that did not fail


@dataclass(frozen=True)
class FeedPosition:
    """A run's listing of a dataset in the change feed (`schema.listing_feed`)."""

    run_id: int
    dataset: str
    feed_through: str  # every change of a segment that began at or before it is in the listing
    baseline_run: int | None  # the listing it was made from (None: a full listing)
    changed: int | None  # names listed again
    events: int | None

    def sentence(self) -> str:
        if self.baseline_run is None:
            return (f"run {self.run_id} listed the source in full; the change feed is read from {self.feed_through} "
                    "next time")
        return (f"run {self.run_id}'s listing is run {self.baseline_run}'s with the changes of the change feed up to "
                f"{self.feed_through} ({self.events or 0:,} event(s), {self.changed or 0:,} name(s) listed again)")


@dataclass(frozen=True)
class RunDataset:
    """A (run, dataset) a migrate or verify run started on: whether it went through the dataset
    (`through_at`: a migrate run, its whole source listing; a verify run, every expected object)
    or why it stopped (`stopped`); neither: the run is going on, or was killed."""

    run_id: int
    dataset: str
    command: str  # migrate, verify
    run_status: str  # the run's: running, ok, failed, interrupted
    started_at: datetime  # naive UTC
    through_at: datetime | None
    objects: int | None  # what the listing held (migrate), what was checked (verify)
    bytes: int | None
    stopped: str | None
    not_carried: str | None = None  # JSON {reason: [objects, bytes]}: what the listing named, not carried

    @property
    def went_through(self) -> bool:
        return self.through_at is not None

    @property
    def not_carried_counts(self) -> dict[str, tuple[int, int]]:
        """What the run's listing named that is not carried: reason -> (objects, bytes)."""
        return counts_from_json(self.not_carried)

    def why_not_through(self) -> str:
        """Why this run did not go through the dataset, as a clause ("run 7 (migrate, started
        2025-05-01 10:00Z) was interrupted before …")."""
        what = "the source listing" if self.command == "migrate" else "the dataset"
        run = f"run {self.run_id} ({self.command}, started {self.started_at:%Y-%m-%d %H:%M}Z)"
        if self.stopped:
            return f"{run} stopped before it went through {what}: {self.stopped}"
        if self.run_status == "running":
            return f"{run} has not gone through {what}: it is still running, or was killed"
        if self.run_status == "interrupted":  # killed (found by a later run) or stopped by Ctrl-C
            return f"{run} was interrupted before it went through {what}"
        return f"{run} ended ({self.run_status}) before it went through {what}"


@dataclass(frozen=True)
class ObjectStatus:
    """One expected object that is not verified: what the newest rows say of it, in a sentence."""

    source_key: str
    size: int  # plaintext bytes of the version the source listing holds
    category: str  # see `STATUS_CATEGORIES`
    reason: str


# What an object the dataset must hold can be, from its newest rows (`StateStore.dataset_status`):
VERIFIED_COPY = "verified"  # at the destination, and a verify proved it
COPIED_COPY = "copied"  # at the destination (uploaded, or unchanged since a copy), not verified yet
FAILED_PERMANENT = "failed (permanent)"  # refused (name or metadata that cannot fit) or a cause that stays
FAILED_TRANSIENT = "failed (may pass)"  # a cause that may pass (retries outlasted): migrate again
FOUND_WRONG = "found wrong"  # a copy is there, but verify found it differs from what was recorded: migrate again
PENDING_COPY = "pending"  # in progress, or changed at the source mid-copy, when a run ended or was killed
NEVER_ATTEMPTED = "never attempted"  # listed, but no run since tried to copy it
STATUS_CATEGORIES = (VERIFIED_COPY, COPIED_COPY, FAILED_PERMANENT, FAILED_TRANSIENT, FOUND_WRONG, PENDING_COPY,
                     NEVER_ATTEMPTED)
# The listed version is not (intact) at the destination.
NEVER_ARRIVED = (FAILED_PERMANENT, FAILED_TRANSIENT, FOUND_WRONG, PENDING_COPY, NEVER_ATTEMPTED)
# Nothing of it is at the destination under its key (what a restore cannot bring back at all).
NOT_AT_DESTINATION = (FAILED_PERMANENT, FAILED_TRANSIENT, PENDING_COPY, NEVER_ATTEMPTED)


@dataclass(frozen=True)
class StatusCount:
    """Objects of one category: how many, their plaintext bytes, and the first ones (listing order)."""

    objects: int = 0
    bytes: int = 0
    examples: tuple[ObjectStatus, ...] = ()


@dataclass(frozen=True)
class CutoverRecord:
    """A dataset's cutover (`exitplan cutover`, table `cutovers`)."""

    run_id: int
    dataset: str
    at: datetime
    delta_run: int
    verify_run: int
    objects: int
    bytes: int
    digest: str
    manifest_seq: int

    def as_dict(self) -> dict:
        return {"run": self.run_id, "at": f"{self.at:%Y-%m-%dT%H:%M:%S}Z", "delta_run": self.delta_run,
                "verify_run": self.verify_run, "objects": self.objects, "bytes": self.bytes, "digest": self.digest,
                "manifest_line": self.manifest_seq + 1}


@dataclass(frozen=True)
class DatasetStatus:
    """Whether a dataset is complete: every object it must hold is at the destination and verified.

    What it must hold is the newest complete listing (`listing`: the newest migrate run that went
    through the dataset's whole source listing), every object of it; what was removed at the source
    before that listing is not expected. Each expected object is in one category of
    `STATUS_CATEGORIES` (`counts`). The dataset is not known to be complete while no run went
    through its listing, or a newer migrate run did not (`unknown`: one clause each, naming the
    run and why; without a listing, the objects the state holds rows of are counted instead). `prefix`: only source keys starting with it were counted (restore --prefix)."""

    dataset: str
    prefix: str
    listing: RunDataset | None
    unknown: tuple[str, ...]
    counts: Mapping[str, StatusCount]
    removed_kept: int  # gone from the source before the listing; the destination still holds a copy
    removed_deleted: int  # gone from the source; the destination copy was deleted (--delete-removed)
    last_migrate: RunDataset | None
    last_verify: RunDataset | None
    # The dataset's last cutover, if it was cut over (its source then found unchanged since the
    # last delta): a migrate after it copies what changed since, and says so.
    cut_over: CutoverRecord | None = None

    def count(self, category: str) -> StatusCount:
        return self.counts.get(category, StatusCount())

    @property
    def expected(self) -> int:
        return sum(c.objects for c in self.counts.values())

    @property
    def expected_bytes(self) -> int:
        return sum(c.bytes for c in self.counts.values())

    @property
    def verified(self) -> int:
        return self.count(VERIFIED_COPY).objects

    @property
    def never_arrived(self) -> int:
        """Expected objects whose listed version is not at the destination."""
        return sum(self.count(c).objects for c in NEVER_ARRIVED)

    @property
    def known(self) -> bool:
        """A listing defines what the dataset must hold, and no newer run left it in doubt."""
        return not self.unknown

    @property
    def complete(self) -> bool:
        """Every expected object is at the destination and verified."""
        return self.known and self.verified == self.expected

    def not_verified(self) -> list[ObjectStatus]:
        """The named objects that are not verified, never-arrived ones first (the first of each category)."""
        return [e for c in NEVER_ARRIVED + (COPIED_COPY,) for e in self.count(c).examples]

    @property
    def not_at_destination(self) -> int:
        """Expected objects of which no copy is at the destination, as far as the state knows (a
        failed newest version whose older copy is still there counts: that copy is not what was listed)."""
        return sum(self.count(c).objects for c in NOT_AT_DESTINATION)

    def missing(self) -> list[ObjectStatus]:
        """The named objects counted by `not_at_destination` (the first of each category)."""
        return [e for c in NOT_AT_DESTINATION for e in self.count(c).examples]

    def as_dict(self) -> dict:
        """Figures and named objects, plain JSON types (`exitplan status --format json`, the flows' tables)."""
        def run(r: RunDataset | None) -> dict | None:
            return None if r is None else {
                "run": r.run_id, "status": r.run_status, "started_at": f"{r.started_at:%Y-%m-%dT%H:%M:%S}Z",
                "through": r.went_through, "stopped": r.stopped}

        listing = run(self.listing)
        if listing is not None:
            listing.update(objects=self.listing.objects, bytes=self.listing.bytes,
                           not_carried=[{"reason": reason, "objects": n, "bytes": size} for reason, (n, size)
                                        in sorted(self.listing.not_carried_counts.items())])
        return {
            "dataset": self.dataset, "prefix": self.prefix or None, "complete": self.complete, "known": self.known,
            "expected": {"objects": self.expected, "bytes": self.expected_bytes}, "listing": listing,
            "not_known_because": list(self.unknown),
            "counts": {c: {"objects": n.objects, "bytes": n.bytes} for c, n in self.counts.items()},
            "never_arrived": self.never_arrived,
            "removed_at_source": {"kept": self.removed_kept, "deleted": self.removed_deleted},
            "last_migrate": run(self.last_migrate), "last_verify": run(self.last_verify),
            "cut_over": self.cut_over.as_dict() if self.cut_over else None,
            "not_verified": [{"source_key": e.source_key, "size": e.size, "status": e.category, "reason": e.reason}
                             for e in self.not_verified()],
        }

    def sentence(self) -> str:
        """The dataset in one sentence: "N of M objects verified; K never arrived (…)"; why it is
        not known to be complete follows."""
        parts = [f"{self.verified:,} of {self.expected:,} objects verified"]
        if self.never_arrived:
            detail = ", ".join(f"{self.count(c).objects:,} {c}" for c in NEVER_ARRIVED if self.count(c).objects)
            parts.append(f"{self.never_arrived:,} never arrived ({detail})")
        copied = self.count(COPIED_COPY).objects
        if copied:
            parts.append(f"{copied:,} at the destination but not verified yet")
        text = f"{self.dataset}: " + "; ".join(parts)
        if self.unknown:
            text += "; not known to be complete: " + "; ".join(self.unknown)
        return text + ("; complete" if self.complete else "")
