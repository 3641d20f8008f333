"""The state store: what exists, what moved, what was proven (ARCHITECTURE.md §7, STYLE.md #11).

SQLAlchemy Core over SQLite in WAL mode by default (the caller passes `.exitplan/state.db` beside
the config); the same tables work on PostgreSQL when several workers share a run.

Objects move along `TRANSITIONS`, an explicit table of allowed state changes. A transition is
written *before* the side effect it announces (in_progress before the first byte moves), so a kill
at any line leaves a row that says what might have happened. A transition not in the table raises
`InvalidTransition`; the check and the write are one UPDATE (``WHERE state IN allowed``), so two
writers cannot both win.

One `objects` row per (run, dataset, source key): a run's rows are its history; the newest
uploaded/verified row of a key across runs is what a re-run compares against (`last_copy`).

A row may be inserted directly in a state one step from pending (`add_object(state=...)`): the
same as inserting it pending and moving it at once, in one statement. Writes whose loss is
harmless (a single PUT's "uploaded": a lost mark only means the object is copied again) can be
queued in a `WriteBatch` and committed many at a time; see its docstring for when that is allowed.

Resume: a multipart object's row carries the upload id, the 40-byte encryption header and the
data key id of its current attempt (all public: the header is written on the object, the key id in
its metadata; never key material), recorded with `record_upload` right after the upload is opened
and before any part is sent. The `parts` table holds the receipt of every part the destination
acknowledged (number, ETag, size, MD5), recorded after the acknowledgement; a part uploaded but not
recorded when the process died is found again with ListParts. `resumable` finds the row a killed
run left behind.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from connectors.base import ContentSettings, ObjectMeta

log = logging.getLogger(__name__)

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
    sa.Column("content", sa.JSON),  # ContentSettings fields that are set
    sa.Column("meta", sa.JSON),  # user metadata
    sa.Index("ix_listing_shard", "run_id", "dataset", "shard"),
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

# Columns added after the first release of the store: added to an existing database on open.
_ADDED_COLUMNS = ("upload_id", "header", "key_id")

# Columns a transition may set besides the state.
_OBJECT_FIELDS = frozenset({
    "reason", "sha256", "source_md5", "md5_checked", "dest_key", "dest_etag", "output_size", "part_count",
    "restarts", "source_etag", "size", "started_at", "finished_at", "upload_id", "header", "key_id",
})


# Every column an `objects` row is inserted with (a batch of inserts is one executemany: same keys).
_INSERT_COLUMNS = tuple(c.name for c in objects.columns if c.name != "id")

# Statements built once: building and cache-keying a Core statement costs more than running it
# on SQLite. Updates name their SET columns through the parameters' keys (compiled once per key set).
_INSERT_OBJECT = objects.insert()
_UPDATE_OBJECT = {
    new_state: objects.update().where(
        objects.c.id == sa.bindparam("_object_id"),
        # Literal binds rather than an expanding IN: an expanding parameter cannot be used with
        # executemany, which the batch relies on.
        objects.c.state.in_([sa.literal(s) for s, targets in TRANSITIONS.items() if new_state in targets]),
    )
    for new_state in STATES
}
_LAST_COPY = (objects.select()
              .where(objects.c.dataset == sa.bindparam("_dataset"), objects.c.source_key == sa.bindparam("_key"),
                     objects.c.state.in_([sa.literal(s) for s in COPIED]))
              .order_by(objects.c.id.desc()).limit(1))
_NEWEST_ROWS = (objects.select()
                .where(objects.c.dataset == sa.bindparam("_dataset"), objects.c.source_key == sa.bindparam("_key"))
                .order_by(objects.c.id.desc()).limit(20))

# States an object row may be created in: pending, or one step from it (the insert then stands for
# "pending, then at once this"), e.g. in_progress for an object whose first attempt starts now.
INITIAL_STATES = frozenset({PENDING}) | TRANSITIONS[PENDING]


class InvalidTransition(RuntimeError):
    """A state change the table does not allow (a bug, or a row changed by another writer)."""


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


@dataclass(frozen=True)
class ShardCounts:
    """What the state store says of a shard's objects in its run: state -> (objects, bytes), the
    destination bytes written, and the first failures with their reasons."""

    states: Mapping[str, tuple[int, int]]
    output_bytes: int
    failures: tuple[tuple[str, str], ...]


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


def utcnow() -> datetime:
    """Times are stored as naive UTC (SQLite has no time zones)."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


class StateStore:
    """The state of every run. Thread-safe: writes are serialised by a lock (SQLite has one writer)."""

    def __init__(self, url_or_path: str | Path):
        url = str(url_or_path)
        if "://" not in url:
            path = Path(url)
            path.parent.mkdir(parents=True, exist_ok=True)
            url = f"sqlite:///{path}"
        self.url = url
        self.engine: Engine = sa.create_engine(url, connect_args=self._connect_args(url))
        if url.startswith("sqlite"):
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        self._write = threading.Lock()
        self._conn: Connection | None = None  # the writer's connection, opened on the first write
        try:
            metadata.create_all(self.engine)
        except sa.exc.OperationalError:
            if "mode=ro" not in url:  # read-only: an older store may lack a table; reads still work
                raise
        self._add_missing_columns()

    def _add_missing_columns(self) -> None:
        """A state store written by an older exitplan lacks the resume columns: add them (nullable)."""
        if "mode=ro" in self.url:
            return
        have = {c["name"] for c in sa.inspect(self.engine).get_columns("objects")}
        missing = [name for name in _ADDED_COLUMNS if name not in have]
        if missing:
            with self._write, self.engine.begin() as conn:
                for name in missing:
                    col = objects.c[name]
                    conn.execute(sa.text(f"ALTER TABLE objects ADD COLUMN {name} "
                                         f"{col.type.compile(dialect=self.engine.dialect)}"))

    @staticmethod
    def _connect_args(url: str) -> dict[str, Any]:
        # Connections are used from the engine's worker threads (never two at once: see the lock).
        return {"check_same_thread": False, "timeout": 30} if url.startswith("sqlite") else {}

    def close(self) -> None:
        with self._write:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
        self.engine.dispose()

    @contextmanager
    def _writing(self) -> Iterator[Connection]:
        """One write transaction on the writer's connection, under the write lock. The connection
        is kept between transactions (a pool check-out per write costs as much as the write)."""
        with self._write:
            if self._conn is None:
                self._conn = self.engine.connect()
            conn = self._conn
            with conn.begin():
                yield conn

    def __enter__(self) -> "StateStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- runs --------------------------------------------------------------------------------

    def start_run(self, command: str, config_path: str | Path | None = None, dry_run: bool = False) -> int:
        with self._write, self.engine.begin() as conn:
            result = conn.execute(runs.insert().values(
                command=command, config_path=str(config_path) if config_path else None, dry_run=dry_run,
                status="running", started_at=utcnow(),
            ))
            return int(result.inserted_primary_key[0])

    def finish_run(self, run_id: int, status: str, **totals: int) -> None:
        """Close a run: `status` (ok, failed, interrupted) and totals (objects_ok=..., bytes_sent=...)."""
        unknown = set(totals) - {c.name for c in runs.columns if c.name.startswith(("objects_", "bytes_"))}
        if unknown:
            raise ValueError(f"unknown run totals: {sorted(unknown)}")
        with self._write, self.engine.begin() as conn:
            conn.execute(runs.update().where(runs.c.id == run_id).values(status=status, finished_at=utcnow(), **totals))

    def add_run_totals(self, run_id: int, **totals: int) -> None:
        """Add to a run's counters (several datasets contribute to one run)."""
        values = {name: getattr(runs.c, name) + n for name, n in totals.items()}
        with self._write, self.engine.begin() as conn:
            conn.execute(runs.update().where(runs.c.id == run_id).values(**values))

    def get_run(self, run_id: int) -> RunRecord:
        with self.engine.connect() as conn:
            row = conn.execute(runs.select().where(runs.c.id == run_id)).mappings().one()
        return RunRecord(**row)

    # ---- objects -------------------------------------------------------------------------------

    def add_object(self, run_id: int, dataset: str, source_key: str, source_etag: str, size: int, *,
                   dest_key: str | None = None, source_md5: bytes | None = None, state: str = PENDING,
                   **fields: Any) -> int:
        """Record an object of this run; returns its id. `state` is pending (the default) or a state
        one step from it (`INITIAL_STATES`): in_progress when its first attempt starts now, failed or
        unchanged when it is decided without a copy; `fields` are set with it, as `transition` does."""
        row = _object_row(run_id, dataset, source_key, source_etag, size, dest_key, source_md5, state, fields)
        with self._writing() as conn:
            result = conn.execute(_INSERT_OBJECT, row)
            return int(result.inserted_primary_key[0])

    def batch(self, max_rows: int = 500, max_age: float = 0.2) -> "WriteBatch":
        """A `WriteBatch` on this store (see there for what may be queued)."""
        return WriteBatch(self, max_rows, max_age)

    def transition(self, object_id: int, new_state: str, **fields: Any) -> None:
        """Move an object to `new_state` (allowed from its current state) and set `fields` with it."""
        values = _transition_values(object_id, new_state, fields)
        with self._writing() as conn:
            if conn.execute(_UPDATE_OBJECT[new_state], values).rowcount != 1:
                raise _refusal(conn, object_id, new_state)

    def _write_batch(self, inserts: list[dict[str, Any]], updates: list[tuple[str, dict[str, Any]]]
                     ) -> dict[int, InvalidTransition]:
        """Insert `inserts` (full rows) and apply `updates` ((new state, `_transition_values`)) in one
        transaction; returns the updates the table refused, by position (the others are written)."""
        try:
            with self._writing() as conn:
                return _apply(conn, inserts, updates, many=True)
        except _SomeRowRefused:
            pass  # rolled back: redo it row by row, to know which ones
        with self._writing() as conn:
            return _apply(conn, inserts, updates, many=False)

    def get_object(self, object_id: int) -> ObjectRecord:
        with self.engine.connect() as conn:
            row = conn.execute(objects.select().where(objects.c.id == object_id)).mappings().one()
        return ObjectRecord(**row)

    def objects(self, run_id: int, *, dataset: str | None = None, state: str | None = None) -> Iterator[ObjectRecord]:
        """The objects of a run in id order, streamed in pages (never the whole run in memory)."""
        last = 0
        while True:
            query = objects.select().where(objects.c.run_id == run_id, objects.c.id > last)
            if dataset is not None:
                query = query.where(objects.c.dataset == dataset)
            if state is not None:
                query = query.where(objects.c.state == state)
            with self.engine.connect() as conn:
                rows = conn.execute(query.order_by(objects.c.id).limit(1000)).mappings().all()
            if not rows:
                return
            for row in rows:
                yield ObjectRecord(**row)
            last = rows[-1]["id"]

    def removed_at_source(self, dataset: str, run_id: int) -> Iterator[ObjectRecord]:
        """Objects the destination holds (newest copied row, not since removed) that run `run_id`
        did not see at the source: deleted there (or no longer selected) since they were copied.
        Meaningful only once the run listed the whole dataset. Streamed, in source-key order."""
        o = objects
        newest = (sa.select(sa.func.max(o.c.id).label("id"))
                  .where(o.c.dataset == dataset, o.c.state.in_(COPIED + (REMOVED,)))
                  .group_by(o.c.source_key).subquery())
        seen = sa.union(sa.select(o.c.source_key).where(o.c.run_id == run_id, o.c.dataset == dataset),
                        sa.select(listing.c.source_key).where(listing.c.run_id == run_id, listing.c.dataset == dataset))
        query = (o.select().join_from(o, newest, o.c.id == newest.c.id)
                 .where(o.c.state.in_(COPIED), o.c.run_id != run_id, o.c.source_key.not_in(seen))
                 .order_by(o.c.source_key))
        with self.engine.connect() as conn:
            result = conn.execution_options(stream_results=True, yield_per=1000).execute(query)
            for row in result.mappings():
                yield ObjectRecord(**row)

    def last_copy(self, dataset: str, source_key: str) -> ObjectRecord | None:
        """The newest row, across runs, saying the destination holds a version of this object."""
        with self.engine.connect() as conn:
            row = conn.execute(_LAST_COPY, {"_dataset": dataset, "_key": source_key}).mappings().first()
        return ObjectRecord(**row) if row else None

    # ---- a run's listing and its shards (the flows' unit of work) -----------------------------

    def record_listing(self, run_id: int, dataset: str, entries: Iterable[tuple[int, ObjectMeta]], *,
                       start: int = 0, page: int = 1000) -> None:
        """Store part of `dataset`'s listing for `run_id`: (shard, ObjectMeta) pairs in listing order,
        numbered from `start`, written a page at a time (a listing of millions is never held in memory)."""
        rows: list[dict[str, Any]] = []
        seq = start
        for shard, meta in entries:
            rows.append(_listing_row(run_id, dataset, seq, shard, meta))
            seq += 1
            if len(rows) >= page:
                self._insert(listing, rows)
                rows = []
        if rows:
            self._insert(listing, rows)

    def _insert(self, table: sa.Table, rows: list[dict[str, Any]]) -> None:
        with self._writing() as conn:
            conn.execute(table.insert(), rows)

    def listed(self, run_id: int, dataset: str, shard: int | None = None) -> Iterator[ObjectMeta]:
        """The ObjectMeta of a run's listing (one shard of it), in listing order, streamed in pages."""
        last = -1
        while True:
            query = listing.select().where(listing.c.run_id == run_id, listing.c.dataset == dataset,
                                           listing.c.seq > last)
            if shard is not None:
                query = query.where(listing.c.shard == shard)
            with self.engine.connect() as conn:
                rows = conn.execute(query.order_by(listing.c.seq).limit(1000)).mappings().all()
            if not rows:
                return
            for r in rows:
                yield ObjectMeta(
                    key=r["source_key"], size=r["size"], etag=r["etag"],
                    content_md5=bytes.fromhex(r["content_md5"]) if r["content_md5"] else None,
                    last_modified=r["last_modified"].replace(tzinfo=timezone.utc) if r["last_modified"] else None,
                    tier=r["tier"], content=ContentSettings(**(r["content"] or {})), metadata=r["meta"] or {})
            last = rows[-1]["seq"]

    def merge_shards(self, run_id: int, dataset: str, factor: int) -> None:
        """Renumber a dataset's listed shards `n` -> `n // factor` (merging neighbours)."""
        with self._writing() as conn:
            conn.execute(listing.update().where(listing.c.run_id == run_id, listing.c.dataset == dataset)
                         .values(shard=listing.c.shard // factor))

    def define_shards(self, run_id: int, dataset: str) -> list[ShardRecord]:
        """Write the `shards` rows of a dataset from its stored listing (status pending); returns them."""
        l = listing
        query = (sa.select(l.c.shard, sa.func.count(), sa.func.coalesce(sa.func.sum(l.c.size), 0),
                           sa.func.min(l.c.source_key), sa.func.max(l.c.source_key))
                 .where(l.c.run_id == run_id, l.c.dataset == dataset).group_by(l.c.shard).order_by(l.c.shard))
        with self._writing() as conn:
            rows = [dict(run_id=run_id, dataset=dataset, shard=int(n), objects=int(c), bytes=int(b), first_key=lo,
                         last_key=hi, status="pending", attempts=0)
                    for n, c, b, lo, hi in conn.execute(query)]
            if rows:
                conn.execute(shards.insert(), rows)
        return [ShardRecord(**r, seconds=None, reason=None, started_at=None, finished_at=None) for r in rows]

    def shard_started(self, run_id: int, dataset: str, shard: int, worker: str | None = None) -> None:
        with self._writing() as conn:
            conn.execute(shards.update().where(*_shard_key(run_id, dataset, shard))
                         .values(status="running", attempts=shards.c.attempts + 1, started_at=utcnow(),
                                 finished_at=None, reason=None, worker=worker))

    def shard_finished(self, run_id: int, dataset: str, shard: int, status: str, seconds: float,
                       reason: str | None = None) -> None:
        with self._writing() as conn:
            conn.execute(shards.update().where(*_shard_key(run_id, dataset, shard))
                         .values(status=status, seconds=seconds, reason=reason, finished_at=utcnow()))

    def shards(self, run_id: int, dataset: str | None = None) -> list[ShardRecord]:
        query = shards.select().where(shards.c.run_id == run_id)
        if dataset is not None:
            query = query.where(shards.c.dataset == dataset)
        with self.engine.connect() as conn:
            return [ShardRecord(**r) for r in conn.execute(query.order_by(shards.c.dataset, shards.c.shard)).mappings()]

    def shard(self, run_id: int, dataset: str, shard: int) -> ShardRecord:
        with self.engine.connect() as conn:
            return ShardRecord(**conn.execute(shards.select().where(*_shard_key(run_id, dataset, shard))).mappings().one())

    def shard_rows(self, run_id: int, dataset: str, shard: int) -> dict[str, ObjectRecord]:
        """source key -> this run's row, for the objects of a shard that have one."""
        o, l = objects, listing
        query = (o.select().join_from(o, l, sa.and_(l.c.run_id == o.c.run_id, l.c.dataset == o.c.dataset,
                                                     l.c.source_key == o.c.source_key))
                 .where(l.c.run_id == run_id, l.c.dataset == dataset, l.c.shard == shard))
        with self.engine.connect() as conn:
            return {r["source_key"]: ObjectRecord(**r) for r in conn.execute(query).mappings()}

    def shard_counts(self, run_id: int, dataset: str, shard: int, max_failures: int = 20) -> ShardCounts:
        o, l = objects, listing
        joined = sa.and_(l.c.run_id == o.c.run_id, l.c.dataset == o.c.dataset, l.c.source_key == o.c.source_key)
        where = (l.c.run_id == run_id, l.c.dataset == dataset, l.c.shard == shard)
        with self.engine.connect() as conn:
            states = {state: (int(n), int(b)) for state, n, b in conn.execute(
                sa.select(o.c.state, sa.func.count(), sa.func.coalesce(sa.func.sum(o.c.size), 0))
                .select_from(l.join(o, joined)).where(*where).group_by(o.c.state))}
            output = conn.execute(sa.select(sa.func.coalesce(sa.func.sum(o.c.output_size), 0))
                                  .select_from(l.join(o, joined)).where(*where, o.c.state.in_(COPIED))).scalar()
            failures = tuple((k, r or "unknown") for k, r in conn.execute(
                sa.select(o.c.source_key, o.c.reason).select_from(l.join(o, joined))
                .where(*where, o.c.state == FAILED).order_by(l.c.seq).limit(max_failures)))
        return ShardCounts(states, int(output or 0), failures)

    # ---- multipart uploads and their parts (resume) --------------------------------------------

    def record_upload(self, object_id: int, upload_id: str, header: bytes | None, key_id: int | None) -> None:
        """Record the multipart upload of the object's current attempt (written right after it is
        opened, before any part is sent) and forget the parts of any earlier attempt. The object
        must be in_progress; this is not a state change, it says what the in_progress is doing."""
        values = dict(upload_id=upload_id, header=header.hex() if header is not None else None, key_id=key_id,
                      updated_at=utcnow())
        with self._writing() as conn:
            done = conn.execute(objects.update().where(objects.c.id == object_id, objects.c.state == IN_PROGRESS)
                                .values(**values)).rowcount
            if done != 1:
                raise _refusal(conn, object_id, IN_PROGRESS)
            conn.execute(parts.delete().where(parts.c.object_id == object_id))

    def record_parts(self, object_id: int, receipts: Iterable[PartRecord]) -> None:
        """Record part receipts of the object's current upload (a part number recorded again is replaced)."""
        now = utcnow()
        rows = [dict(object_id=object_id, number=r.number, etag=r.etag, size=r.size, md5=r.md5, recorded_at=now)
                for r in receipts]
        if not rows:
            return
        with self._writing() as conn:
            conn.execute(parts.delete().where(parts.c.object_id == object_id,
                                              parts.c.number.in_([r["number"] for r in rows])))
            conn.execute(parts.insert(), rows)

    def parts(self, object_id: int) -> list[PartRecord]:
        """The recorded parts of an object, in part-number order."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(parts.c.number, parts.c.etag, parts.c.size, parts.c.md5)
                                .where(parts.c.object_id == object_id).order_by(parts.c.number)).all()
        return [PartRecord(int(n), e, int(z), m) for n, e, z, m in rows]

    def resumable(self, dataset: str, source_key: str) -> ObjectRecord | None:
        """The newest row of this object across runs that is an unfinished multipart upload
        (in_progress with an upload id), unless a later row finished or failed the object: what a
        killed run left behind. None otherwise."""
        with self.engine.connect() as conn:
            rows = conn.execute(_NEWEST_ROWS, {"_dataset": dataset, "_key": source_key}).mappings().all()
        for row in rows:
            if row["state"] != IN_PROGRESS:
                return None
            if row["upload_id"]:
                return ObjectRecord(**row)
            # in_progress without an upload: a later run killed before it recorded one (or a
            # single PUT); the upload an earlier run left may still be there.
        return None

    def upload_ids(self) -> set[str]:
        """Every multipart upload id any row refers to (for `exitplan cleanup`)."""
        with self.engine.connect() as conn:
            return {u for (u,) in conn.execute(sa.select(objects.c.upload_id).where(objects.c.upload_id.is_not(None))
                                                .distinct())}

    def dataset_totals(self, run_id: int, dataset: str, max_failures: int = 100) -> DatasetTotals:
        """What a run's rows of a dataset add up to (a shard retried in the run counts each object
        once, as it ended)."""
        o = objects
        where = (o.c.run_id == run_id, o.c.dataset == dataset)
        copied = o.c.state.in_(COPIED)
        failed = o.c.state.not_in(COPIED + (UNCHANGED, REMOVED))
        n = lambda cond: sa.func.coalesce(sa.func.sum(sa.case((cond, 1), else_=0)), 0)  # noqa: E731
        total = lambda col, cond: sa.func.coalesce(sa.func.sum(sa.case((cond, col), else_=0)), 0)  # noqa: E731
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(
                n(o.c.state != REMOVED), n(copied), n(failed), n(o.c.state == UNCHANGED),
                n(sa.and_(o.c.state == FAILED, o.c.started_at.is_(None))), total(o.c.size, o.c.state != REMOVED),
                total(o.c.size, copied), total(o.c.output_size, copied), total(o.c.part_count, copied),
                sa.func.coalesce(sa.func.sum(o.c.restarts), 0)).where(*where)).one()
            failures = tuple((k, r or "unknown") for k, r in conn.execute(
                sa.select(o.c.source_key, o.c.reason).where(*where, failed).order_by(o.c.id).limit(max_failures + 1)))
        return DatasetTotals(*map(int, row), failures=failures[:max_failures],
                             failures_truncated=len(failures) > max_failures)

    def state_counts(self, run_id: int, dataset: str | None = None) -> dict[str, tuple[int, int]]:
        """state -> (objects, plaintext bytes) for a run (and dataset): the migrate summary's numbers."""
        query = (sa.select(objects.c.state, sa.func.count(), sa.func.coalesce(sa.func.sum(objects.c.size), 0))
                 .where(objects.c.run_id == run_id).group_by(objects.c.state))
        if dataset is not None:
            query = query.where(objects.c.dataset == dataset)
        with self.engine.connect() as conn:
            return {state: (int(n), int(b)) for state, n, b in conn.execute(query)}


class WriteBatch:
    """Object writes committed many at a time: one transaction per `max_rows` writes or per
    `max_age` seconds, and at `flush()`. Thread-safe.

    Only for writes whose loss is harmless, because a kill loses what is queued: the end of a
    single PUT (a lost "uploaded" or "failed" leaves the row in_progress, so the next run copies
    the object again, and a PUT is idempotent), or a row decided without a copy (unchanged,
    refused: a lost row means the next run decides again). Never for a transition that announces
    a side effect (in_progress before bytes move, a multipart upload's state): those are written
    at once with `StateStore.transition` / `add_object`.

    Each write names a callback, called once it is committed (`None`) or could not be (the
    `InvalidTransition` the table gave, or the database error): a caller that reported the write
    as done can correct itself. `flush` never raises for a write; `flush_if_due` is the cheap
    check to call often. The age is only checked when a write is queued or `flush_if_due` runs.
    """

    def __init__(self, store: StateStore, max_rows: int = 500, max_age: float = 0.2):
        self.store = store
        self.max_rows = max_rows
        self.max_age = max_age
        self._lock = threading.Lock()
        self._inserts: list[tuple[dict[str, Any], Callable[[Exception | None], None]]] = []
        self._updates: list[tuple[str, dict[str, Any], Callable[[Exception | None], None]]] = []
        self._since = 0.0  # monotonic time of the oldest queued write

    def add_object(self, run_id: int, dataset: str, source_key: str, source_etag: str, size: int, *,
                   on_written: Callable[[Exception | None], None], dest_key: str | None = None,
                   source_md5: bytes | None = None, state: str = PENDING, **fields: Any) -> None:
        """Queue `StateStore.add_object` (checked now; the id is not returned: nothing may refer to it)."""
        row = _object_row(run_id, dataset, source_key, source_etag, size, dest_key, source_md5, state, fields)
        with self._lock:
            self._stamp()
            self._inserts.append((row, on_written))
        self.flush_if_due()

    def transition(self, object_id: int, new_state: str, *, on_written: Callable[[Exception | None], None],
                   **fields: Any) -> None:
        """Queue `StateStore.transition` (fields checked now, the move when written)."""
        values = _transition_values(object_id, new_state, fields)
        with self._lock:
            self._stamp()
            self._updates.append((new_state, values, on_written))
        self.flush_if_due()

    def __len__(self) -> int:
        with self._lock:
            return len(self._inserts) + len(self._updates)

    def _stamp(self) -> None:
        if not self._inserts and not self._updates:
            self._since = time.monotonic()

    def flush_if_due(self) -> None:
        with self._lock:
            n = len(self._inserts) + len(self._updates)
            due = n >= self.max_rows or (n > 0 and time.monotonic() - self._since >= self.max_age)
        if due:
            self.flush()

    def flush(self) -> None:
        """Write everything queued now, in one transaction; then call each write's callback."""
        with self._lock:
            inserts, self._inserts = self._inserts, []
            updates, self._updates = self._updates, []
        if not inserts and not updates:
            return
        try:
            refused = self.store._write_batch([row for row, _ in inserts], [(state, v) for state, v, _ in updates])
        except Exception as exc:  # the database itself failed: nothing of this batch is written
            for *_, callback in inserts + updates:
                _call(callback, exc)
            return
        for _, callback in inserts:
            _call(callback, None)
        for i, (*_, callback) in enumerate(updates):
            _call(callback, refused.get(i))

    def __enter__(self) -> "WriteBatch":
        return self

    def __exit__(self, *exc: object) -> None:
        self.flush()


def _call(callback: Callable[[Exception | None], None], error: Exception | None) -> None:
    try:
        callback(error)
    except Exception:  # one caller's bookkeeping must not stop the others' from being told
        log.exception("a state write callback failed")


def _object_row(run_id: int, dataset: str, source_key: str, source_etag: str, size: int, dest_key: str | None,
                source_md5: bytes | None, state: str, fields: Mapping[str, Any]) -> dict[str, Any]:
    """A full `objects` row (every column of `_INSERT_COLUMNS`) created in `state` with `fields`."""
    if state not in INITIAL_STATES:
        raise InvalidTransition(f"an object cannot be recorded as {state!r} straight away "
                                f"(allowed: {', '.join(sorted(INITIAL_STATES))})")
    _check_fields(fields)
    now = utcnow()
    row = dict.fromkeys(_INSERT_COLUMNS)
    row.update(run_id=run_id, dataset=dataset, source_key=source_key, source_etag=source_etag, size=size,
               dest_key=dest_key, source_md5=source_md5.hex() if source_md5 else None, md5_checked=False,
               restarts=0, created_at=now)
    row.update(_stamped(state, fields, now))
    return row


def _listing_row(run_id: int, dataset: str, seq: int, shard: int, meta: ObjectMeta) -> dict[str, Any]:
    content = {k: v for k, v in asdict(meta.content).items() if v is not None}
    modified = meta.last_modified
    if modified is not None and modified.tzinfo is not None:
        modified = modified.astimezone(timezone.utc).replace(tzinfo=None)
    return dict(run_id=run_id, dataset=dataset, seq=seq, shard=shard, source_key=meta.key, etag=meta.etag,
                size=meta.size, content_md5=meta.content_md5.hex() if meta.content_md5 else None,
                last_modified=modified, tier=meta.tier, content=content or None, meta=dict(meta.metadata) or None)


def _shard_key(run_id: int, dataset: str, shard: int) -> tuple:
    return shards.c.run_id == run_id, shards.c.dataset == dataset, shards.c.shard == shard


def _check_fields(fields: Mapping[str, Any]) -> None:
    unknown = set(fields) - _OBJECT_FIELDS
    if unknown:
        raise ValueError(f"unknown object fields: {sorted(unknown)}")


def _stamped(new_state: str, fields: Mapping[str, Any], now: datetime) -> dict[str, Any]:
    """`fields` with the state and the times a move to `new_state` sets."""
    values = dict(fields, state=new_state, updated_at=now)
    if new_state == IN_PROGRESS and "started_at" not in fields:
        values["started_at"] = now
    if new_state in (UPLOADED, FAILED, UNCHANGED, VERIFIED) and "finished_at" not in fields:
        values["finished_at"] = now
    return values


def _transition_values(object_id: int, new_state: str, fields: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters of `_UPDATE_OBJECT[new_state]` for a move with `fields` (checked first)."""
    if new_state not in TRANSITIONS:
        raise ValueError(f"unknown object state {new_state!r}")
    _check_fields(fields)
    values = _stamped(new_state, fields, utcnow())
    values["_object_id"] = object_id
    return values


class _SomeRowRefused(Exception):
    """An executemany update moved fewer rows than it was given (rolls its transaction back)."""


def _apply(conn: Connection, inserts: list[dict[str, Any]], updates: list[tuple[str, dict[str, Any]]],
           many: bool) -> dict[int, InvalidTransition]:
    if inserts:
        conn.execute(_INSERT_OBJECT, inserts)
    groups: dict[tuple[str, tuple[str, ...]], list[int]] = {}  # executemany needs one key set
    for i, (new_state, values) in enumerate(updates):
        groups.setdefault((new_state, tuple(values)), []).append(i)
    refused: dict[int, InvalidTransition] = {}
    for (new_state, _), positions in groups.items():
        stmt = _UPDATE_OBJECT[new_state]
        if many and len(positions) > 1 and conn.dialect.supports_sane_multi_rowcount:
            if conn.execute(stmt, [updates[i][1] for i in positions]).rowcount != len(positions):
                raise _SomeRowRefused()
            continue
        for i in positions:
            values = updates[i][1]
            if conn.execute(stmt, values).rowcount != 1:
                refused[i] = _refusal(conn, values["_object_id"], new_state)
    return refused


def _refusal(conn: Connection, object_id: int, new_state: str) -> InvalidTransition:
    current = conn.execute(sa.select(objects.c.state).where(objects.c.id == object_id)).scalar()
    if current is None:
        return InvalidTransition(f"object {object_id} is not in the state store")
    return InvalidTransition(f"object {object_id} cannot go from {current!r} to {new_state!r}")


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    # NORMAL in WAL mode: a power cut can lose the last transactions but never corrupts the file;
    # a lost transition is re-derived from the destination (an open upload, or an object present).
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()
