"""The state database's schema: object states and their allowed transitions, and every table.

Every table of the state database is defined here, the audit manifest's `audit_recorded` included,
so that a column change is made in one place; `StateStore` (store.py) is the only code that
queries them.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Mapping

import sqlalchemy as sa

PENDING = "pending"
IN_PROGRESS = "in_progress"
UPLOADED = "uploaded"
VERIFIED = "verified"
FAILED = "failed"
UNCHANGED = "unchanged"
CHANGED = "changed"
REMOVED = "removed"  # gone from the source; its destination copy was deleted on request (--delete-removed)

STATES = (PENDING, IN_PROGRESS, UPLOADED, VERIFIED, FAILED, UNCHANGED, CHANGED, REMOVED)

# state -> the states it may move to.
TRANSITIONS: Mapping[str, frozenset[str]] = {
    PENDING: frozenset({IN_PROGRESS, UNCHANGED, FAILED, REMOVED}),  # failed here = refused before any byte moved
    IN_PROGRESS: frozenset({UPLOADED, FAILED, CHANGED}),
    CHANGED: frozenset({IN_PROGRESS, FAILED}),  # re-queued: the object restarts from its new version
    UPLOADED: frozenset({VERIFIED, FAILED, CHANGED}),  # verify proved it, found it wrong, or the source moved on
    VERIFIED: frozenset({CHANGED, FAILED}),  # a later verify can still find a discrepancy
    FAILED: frozenset({IN_PROGRESS}),  # retried (within the run that recorded it)
    UNCHANGED: frozenset(),
    REMOVED: frozenset(),
}

# Object states that count as "the destination holds this source version".
COPIED = (UPLOADED, VERIFIED)

# The reason prefix of a row that `verify` found wrong (failed): such a row still claims a copy
# at the destination (verify keeps naming it) until `migrate` copies the object again.
VERIFY_REASON = "verify: "

# States an object row may be created in: pending, or one step from it (the insert then stands for
# "pending, then at once this"), e.g. in_progress for an object whose first attempt starts now.
INITIAL_STATES = frozenset({PENDING}) | TRANSITIONS[PENDING]


class InvalidTransition(RuntimeError):
    """A state change the table does not allow (a bug, or a row changed by another writer)."""


def utcnow() -> datetime:
    """Times are stored as naive UTC (SQLite has no time zones)."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


metadata = sa.MetaData()

runs = sa.Table(
    "runs", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("command", sa.String, nullable=False),
    sa.Column("config_path", sa.String),
    sa.Column("dry_run", sa.Boolean, nullable=False, default=False),
    sa.Column("status", sa.String, nullable=False),  # running, ok, failed, interrupted
    sa.Column("started_at", sa.DateTime, nullable=False),
    sa.Column("finished_at", sa.DateTime),
    sa.Column("objects_total", sa.Integer, nullable=False, default=0),
    sa.Column("objects_ok", sa.Integer, nullable=False, default=0),
    sa.Column("objects_failed", sa.Integer, nullable=False, default=0),
    sa.Column("objects_skipped", sa.Integer, nullable=False, default=0),
    sa.Column("bytes_total", sa.BigInteger, nullable=False, default=0),
    sa.Column("bytes_sent", sa.BigInteger, nullable=False, default=0),
)

objects = sa.Table(
    "objects", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id"), nullable=False),
    sa.Column("dataset", sa.String, nullable=False),
    sa.Column("source_key", sa.String, nullable=False),
    sa.Column("source_etag", sa.String, nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("state", sa.String, nullable=False),
    sa.Column("reason", sa.Text),
    sa.Column("sha256", sa.String(64)),  # hex, of the plaintext
    sa.Column("source_md5", sa.String(32)),  # hex, the source's stored Content-MD5 (None when it has none)
    sa.Column("md5_checked", sa.Boolean, nullable=False, default=False),
    # How the destination's answer to the write was checked: True, its ETags compared with the MD5s
    # of the bytes sent; False, ETags opaque there (the server's Content-MD5 check and the size:
    # only a deep verify proves the bytes); None on rows written before it was recorded.
    sa.Column("etag_checked", sa.Boolean),
    sa.Column("dest_key", sa.String),
    sa.Column("dest_etag", sa.String),
    sa.Column("output_size", sa.BigInteger),
    sa.Column("part_count", sa.Integer),
    sa.Column("restarts", sa.Integer, nullable=False, default=0),
    # The current attempt's multipart upload (None for a single PUT) and its encryption header
    # (hex of the 40 public bytes; None when not encrypted) and data key id.
    sa.Column("upload_id", sa.String),
    sa.Column("header", sa.String(80)),
    sa.Column("key_id", sa.BigInteger),
    # A failed row: whether its cause may pass (trying again later can succeed); None otherwise,
    # and on rows written before it was recorded.
    sa.Column("transient", sa.Boolean),
    # The storage class the object was written in (`WriteMeta.storage_class`); None: the bucket's
    # default, and on rows written before it was recorded. Quick verify compares it.
    sa.Column("storage_class", sa.String),
    # A digest of the tags written with it (`engine.placement.tags_digest`; None: no tags). Azure
    # sets a blob's tags without giving it a new ETag: a delta pass compares this to see them change.
    sa.Column("tags_digest", sa.String(32)),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("started_at", sa.DateTime),
    sa.Column("finished_at", sa.DateTime),
    sa.Column("updated_at", sa.DateTime, nullable=False),
    sa.UniqueConstraint("run_id", "dataset", "source_key", name="uq_objects_run_key"),
    sa.Index("ix_objects_dataset_key", "dataset", "source_key"),
    sa.Index("ix_objects_run_state", "run_id", "state"),
)

# The receipts of the parts of the current attempt of a multipart object.
parts = sa.Table(
    "parts", metadata,
    sa.Column("object_id", sa.Integer, sa.ForeignKey("objects.id"), primary_key=True),
    sa.Column("number", sa.Integer, primary_key=True),  # 1-based
    sa.Column("etag", sa.String, nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),  # output bytes
    sa.Column("md5", sa.String(32)),  # hex, of the output bytes sent
    sa.Column("recorded_at", sa.DateTime, nullable=False),
)

# A run's listing, cut into shards (the Prefect flows' unit of work): what the source held when the
# run listed it, so that each shard task reads its objects here instead of listing again.
listing = sa.Table(
    "listing", metadata,
    sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id"), primary_key=True),
    sa.Column("dataset", sa.String, primary_key=True),
    sa.Column("seq", sa.Integer, primary_key=True),  # listing order
    sa.Column("shard", sa.Integer, nullable=False),
    sa.Column("source_key", sa.String, nullable=False),
    sa.Column("etag", sa.String, nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("content_md5", sa.String(32)),  # hex
    sa.Column("last_modified", sa.DateTime),
    sa.Column("tier", sa.String),
    # SQL NULL when empty (most objects): nothing to decode when a shard is read back.
    sa.Column("content", sa.JSON(none_as_null=True)),  # ContentSettings fields that are set
    sa.Column("meta", sa.JSON(none_as_null=True)),  # user metadata
    # The rest of what the source listed, so that a shard places the object as a live listing would:
    # creation time and kind (set for every Azure blob: columns of their own, read back cheaply), and
    # what only some objects have (`rows.LISTED_EXTRA`: tags, why it cannot be copied, snapshot or version).
    sa.Column("created", sa.DateTime),
    sa.Column("kind", sa.String),
    sa.Column("extra", sa.JSON(none_as_null=True)),
    # A shard's objects in listing order, read a page at a time (`StateStore.listed`): a seek, not
    # a walk of the dataset's listing from its start for each page of each shard.
    sa.Index("ix_listing_shard_seq", "run_id", "dataset", "shard", "seq"),
    # Whether a run listed a key (`StateStore.removed_at_source`): a probe per copied object, not a
    # scan of the run's listing (or, in PostgreSQL, a `NOT IN` rescanned per row).
    sa.Index("ix_listing_key", "run_id", "dataset", "source_key"),
)

# One row per shard of a run: its extent, then what its task made of it.
shards = sa.Table(
    "shards", metadata,
    sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id"), primary_key=True),
    sa.Column("dataset", sa.String, primary_key=True),
    sa.Column("shard", sa.Integer, primary_key=True),
    sa.Column("objects", sa.Integer, nullable=False),
    sa.Column("bytes", sa.BigInteger, nullable=False),
    sa.Column("first_key", sa.String, nullable=False),
    sa.Column("last_key", sa.String, nullable=False),
    sa.Column("status", sa.String, nullable=False),  # pending, running, ok, failed (objects), error (stopped)
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("seconds", sa.Float),  # of the last attempt
    sa.Column("reason", sa.Text),
    sa.Column("worker", sa.String),  # host:pid of the process that ran the last attempt
    sa.Column("started_at", sa.DateTime),
    sa.Column("finished_at", sa.DateTime),
)

# One row per (run, dataset) that a migrate or verify run started on: whether the run went through
# the dataset (a migrate run: its whole source listing, `objects` and `bytes` counting what the
# listing held; a verify run: every object the dataset was expected to hold), or why it stopped.
# The newest migrate run that went through a listing defines what the dataset must hold
# (`StateStore.dataset_status`); a row without `through_at` nor `stopped` belongs to a run that is
# going on, or was killed.
run_datasets = sa.Table(
    "run_datasets", metadata,
    sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id"), primary_key=True),
    sa.Column("dataset", sa.String, primary_key=True),
    sa.Column("started_at", sa.DateTime, nullable=False),
    sa.Column("through_at", sa.DateTime),
    sa.Column("objects", sa.BigInteger),
    sa.Column("bytes", sa.BigInteger),
    sa.Column("stopped", sa.Text),
    # What the listing named but the run does not carry (snapshots, earlier versions, rows of an
    # inventory report that are not objects): JSON {reason: [objects, bytes]}, set with `through_at`.
    sa.Column("not_carried", sa.Text),
    sa.Index("ix_run_datasets_dataset", "dataset", "run_id"),
)

# Which `objects` rows the audit manifest records (engine/audit.py): a copied or removed row
# without one gets its record from the next run, marked late.
audit_recorded = sa.Table(
    "audit_recorded", metadata,
    sa.Column("object_id", sa.Integer, primary_key=True),  # `objects.id`
    sa.Column("seq", sa.BigInteger, nullable=False),  # the manifest line that records it
)

# One row per request-rate or bandwidth limit shared by the processes of a run (engine/pacing.py):
# a token bucket every process leases batches from (`StateStore.lease_tokens`). `tokens` is what
# was left at `at` (seconds since the epoch on the database's clock); negative: reserved ahead, to
# be paid back by the refill at `rate` per second before the one who reserved them may spend them.
rate_buckets = sa.Table(
    "rate_buckets", metadata,
    sa.Column("name", sa.String, primary_key=True),  # what is limited: "put s3://endpoint/bucket", "bandwidth"
    sa.Column("tokens", sa.Float, nullable=False),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("rate", sa.Float, nullable=False),  # per second, as the last lease asked
)

# The ranges a run lists a dataset in (engine/listing.py), listed at once, each resumable: how far
# its listing got (`marker`, None before its first page; `done` once its last page is stored,
# in the same transaction as that page's `listing` rows) and the shard cutter's position, so that a
# later run of the same dataset takes over the stored rows and lists on from each marker.
# While a range lists, its n-th cut shard's rows hold the shard number `listing_shard(range_no, n)`,
# below zero (a shard never holds objects of two ranges); a shard is defined (`shards`) once final,
# its rows then renumbered 0, 1, ... in the order the run defines them (`engine.shards.ShardDefiner`).
listing_ranges = sa.Table(
    "listing_ranges", metadata,
    sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id"), primary_key=True),
    sa.Column("dataset", sa.String, primary_key=True),
    sa.Column("range_no", sa.Integer, primary_key=True),
    sa.Column("prefix", sa.String, nullable=False),
    sa.Column("direct", sa.Boolean, nullable=False),  # only the objects directly below `prefix`
    # What the listing selects (source, container, prefix, include/exclude): a later run takes
    # over this listing only when it selects the same.
    sa.Column("basis", sa.Text, nullable=False),
    sa.Column("marker", sa.Text),
    sa.Column("done", sa.Boolean, nullable=False),
    sa.Column("objects", sa.BigInteger, nullable=False),  # selected objects stored so far
    sa.Column("bytes", sa.BigInteger, nullable=False),
    sa.Column("cut_shard", sa.Integer, nullable=False),  # the shard cutter: its current shard (within the range)
    sa.Column("cut_objects", sa.Integer, nullable=False),  # ... and what that shard holds so far
    sa.Column("cut_bytes", sa.BigInteger, nullable=False),
    # The range's listed entries that are not objects to carry (snapshots, earlier versions) so
    # far: JSON {reason: [objects, bytes]}, stored with each page.
    sa.Column("not_carried", sa.Text),
)

# Where a run's listing of a dataset stands in the storage account's change feed (a dataset with
# `changes: feed`, engine/listing.py): every change of a feed segment that began at or before
# `feed_through` is in the listing. A full listing records the feed's `lastConsumable` read before
# its first request; a listing made from an earlier one (`baseline_run`) plus the names the feed
# says changed records the `lastConsumable` its reading went to. The next run reads the feed
# from there.
listing_feed = sa.Table(
    "listing_feed", metadata,
    sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id"), primary_key=True),
    sa.Column("dataset", sa.String, primary_key=True),
    sa.Column("feed_through", sa.String, nullable=False),  # ISO 8601, UTC: a segment's start
    sa.Column("baseline_run", sa.Integer),  # None: a full listing
    sa.Column("changed", sa.BigInteger),  # names listed again (a listing from the feed)
    sa.Column("events", sa.BigInteger),  # events of the segments read
)

# A dataset's cutover (`exitplan cutover`): the last delta, its deep verify and the source found
# unchanged after them; the signed `cutover` record at line `manifest_seq` of the audit manifest.
cutovers = sa.Table(
    "cutovers", metadata,
    sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id"), primary_key=True),
    sa.Column("dataset", sa.String, primary_key=True),
    sa.Column("at", sa.DateTime, nullable=False),
    sa.Column("delta_run", sa.Integer, nullable=False),
    sa.Column("verify_run", sa.Integer, nullable=False),
    sa.Column("objects", sa.BigInteger, nullable=False),
    sa.Column("bytes", sa.BigInteger, nullable=False),
    sa.Column("digest", sa.String, nullable=False),  # `engine.cutover.objects_digest`
    sa.Column("manifest_seq", sa.Integer, nullable=False),
)

# Cut shards a range may number while its dataset lists (`listing_ranges`).
RANGE_SHARDS = 1_000_000


def listing_shard(range_no: int, n: int) -> int:
    """The shard number the rows of range `range_no`'s n-th cut shard hold until the shard is
    defined: below zero, decreasing with n (numbers a run defines are 0, 1, ...)."""
    return -1 - range_no * RANGE_SHARDS - min(n, RANGE_SHARDS - 1)

# An index of `listing` that a newer one replaced: dropped when an older state store is opened
# (`create_all` creates a table's indexes only with the table: the store adds the missing ones).
REPLACED_INDEXES = ("ix_listing_shard",)  # (run_id, dataset, shard): a prefix of ix_listing_shard_seq

# Columns added after the first release of the store, per table: added to an existing database on open.
ADDED_COLUMNS = {
    "objects": ("upload_id", "header", "key_id", "transient", "etag_checked", "storage_class", "tags_digest"),
    "listing": ("created", "kind", "extra"),
    "run_datasets": ("not_carried",),
    "listing_ranges": ("not_carried",),
}
