"""`StateStore`: every read and write of the state database (schema.py defines its tables).

Callers get frozen records (records.py), never rows or connections: nothing outside this package
builds a query or touches the SQLAlchemy engine.
"""

from __future__ import annotations

import json
import operator
import threading
from contextlib import contextmanager, suppress
from dataclasses import asdict, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from connectors.base import ContentSettings, ObjectMeta

from ..private_files import private_directory, private_file
from . import completeness
from .batch import WriteBatch
from .records import (CurrentCopy, CutoverRecord, counts_from_json, counts_to_json, DatasetFigures, DatasetStatus, DatasetTotals, FeedPosition, ListingRangeRecord, ObjectRecord, PartRecord,
                      RunDataset, RunRecord, ShardCounts, ShardRecord)
from .rows import INSERT_COLUMNS, LISTING_COLUMNS, listed_extra, listing_row, object_row, transition_values
from .schema import (ADDED_COLUMNS, COPIED, FAILED, IN_PROGRESS, PENDING, RANGE_SHARDS, REMOVED, REPLACED_INDEXES,
                     STATES, TRANSITIONS, UNCHANGED, UPLOADED, VERIFIED, VERIFY_REASON, InvalidTransition,
                     audit_recorded, cutovers, listing, listing_feed, listing_ranges, metadata, objects, parts, rate_buckets, run_datasets,
                     listing_shard, runs, shards, utcnow)
from .unwritable import StateUnwritable, unwritable_database, writing_file

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
# The rows saying what the destination holds of a key (a copy, a copy verify found wrong, a copy
# deleted on purpose): the newest is what a re-run may skip against, when it is a copy.
_CLAIM = sa.or_(objects.c.state.in_([sa.literal(s) for s in COPIED + (REMOVED,)]),
                sa.and_(objects.c.state == sa.literal(FAILED), objects.c.reason.like(sa.literal(VERIFY_REASON + "%"))))
_NEWEST_CLAIM = (objects.select()
                 .where(objects.c.dataset == sa.bindparam("_dataset"), objects.c.source_key == sa.bindparam("_key"),
                        _CLAIM)
                 .order_by(objects.c.id.desc()).limit(1))
# An `objects` row's columns in `ObjectRecord`'s field order, to build records from positional rows.
_RECORD_COLUMNS = tuple(objects.c[f.name] for f in fields(ObjectRecord))


def _current_copies(keys: Any) -> sa.Select:
    """`current_copies`' statement, for the keys of `keys` (an IN's right-hand side)."""
    return (sa.select(*(objects.c[name] for name in CurrentCopy._fields))
            .where(objects.c.id.in_(sa.select(sa.func.max(objects.c.id))
                                    .where(objects.c.dataset == sa.bindparam("_dataset"),
                                           objects.c.source_key.in_(keys), _CLAIM)
                                    .group_by(objects.c.source_key).scalar_subquery()),
                   objects.c.state.in_([sa.literal(s) for s in COPIED])))


# `current_copies`: one statement compiled once, its keys one parameter. SQLite gets them as one
# JSON array read by `json_each` (an expanding parameter is rendered anew, one bind per key, at
# each execution: a tenth of a delta pass's time); PostgreSQL as an expanding parameter.
_CURRENT_COPIES = _current_copies(sa.bindparam("_keys", expanding=True))
_CURRENT_COPIES_SQLITE = _current_copies(
    sa.select(sa.func.json_each(sa.bindparam("_keys_json")).table_valued("value").c.value).scalar_subquery())
_NO_CONTENT = ContentSettings()
_NEWEST_ROWS = (objects.select()
                .where(objects.c.dataset == sa.bindparam("_dataset"), objects.c.source_key == sa.bindparam("_key"))
                .order_by(objects.c.id.desc()).limit(20))


class StateStore:
    """The state of every run. Thread-safe: writes are serialised by a lock (SQLite has one writer)."""

    def __init__(self, url_or_path: str | Path):
        url = str(url_or_path)
        if "://" not in url:
            path = Path(url)
            with writing_file(path, "the state store"):
                private_file(private_directory(path.parent) / path.name)
            url = f"sqlite:///{path}"
        self.url = url
        self.engine: Engine = sa.create_engine(url, connect_args=self._connect_args(url))
        self._file = _sqlite_file(self.engine)
        # Set by the first write (or open) that finds the state unwritable; the engine stops at it.
        self.unwritable: StateUnwritable | None = None
        sa.event.listen(self.engine, "handle_error", self._unwritable)
        if url.startswith("sqlite"):
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        self._write = threading.Lock()
        self._conn: Connection | None = None  # the writer's connection, opened on the first write
        # One object row per attempt is written before its bytes move: on SQLite that insert runs
        # on the writer's DBAPI connection (`_DirectInsert`), below SQLAlchemy's statement path,
        # which cost several times the insert and its commit. A listing's rows (the flows list
        # every object into the store before a shard copies it) take the same compiled path.
        sqlite = self.engine.dialect.name == "sqlite"
        self._direct_insert = _DirectInsert(self.engine.dialect, objects, INSERT_COLUMNS) if sqlite else None
        self._direct_listing = _DirectInsert(self.engine.dialect, listing, LISTING_COLUMNS) if sqlite else None
        try:
            metadata.create_all(self.engine)
        except (sa.exc.OperationalError, StateUnwritable):
            if "mode=ro" not in url:  # read-only: an older store may lack a table; reads still work
                raise
            self.unwritable = None  # opened read-only on purpose: not a reason to stop
        self._add_missing_columns()
        self._add_missing_indexes()

    def _add_missing_indexes(self) -> None:
        """A state store written by an older exitplan lacks the `listing` indexes added since: create
        them (one pass over the table, once) and drop those they replace."""
        if "mode=ro" in self.url:
            return
        have = {i["name"] for i in sa.inspect(self.engine).get_indexes("listing")}
        missing = [index for index in listing.indexes if index.name not in have]
        replaced = [name for name in REPLACED_INDEXES if name in have]
        if missing or replaced:
            with self._write, self.engine.begin() as conn:
                for index in missing:
                    index.create(conn)
                for name in replaced:
                    conn.execute(sa.text(f"DROP INDEX {name}"))

    def _add_missing_columns(self) -> None:
        """A state store written by an older exitplan lacks the columns added since: add them (nullable)."""
        if "mode=ro" in self.url:
            return
        inspector = sa.inspect(self.engine)
        for table, names in ADDED_COLUMNS.items():
            have = {c["name"] for c in inspector.get_columns(table)}
            missing = [name for name in names if name not in have]
            if missing:
                with self._write, self.engine.begin() as conn:
                    for name in missing:
                        col = metadata.tables[table].c[name]
                        conn.execute(sa.text(f"ALTER TABLE {table} ADD COLUMN {name} "
                                             f"{col.type.compile(dialect=self.engine.dialect)}"))

    def _unwritable(self, context: sa.engine.ExceptionContext) -> None:
        """SQLAlchemy's `handle_error` hook: a full disk, a read-only filesystem or a refused
        permission becomes `StateUnwritable` (one sentence, no traceback), here and only here, for
        every statement, commit and connection of this store (and `_insert_direct`, which runs
        below SQLAlchemy); it is also kept in `unwritable`."""
        stop = self._stop(context.original_exception)
        if stop is not None:
            raise stop

    def _stop(self, error: BaseException) -> StateUnwritable | None:
        """The `StateUnwritable` a DBAPI error means (kept in `unwritable`), or None."""
        shown = str(self._file) if self._file else self.engine.url.render_as_string(hide_password=True)
        stop = unwritable_database(error, self._file, shown, read_only="mode=ro" in self.url)
        if stop is not None and self.unwritable is None:
            self.unwritable = stop
        return stop

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
            conn = self._writer()
            with conn.begin():
                yield conn

    def _writer(self) -> Connection:
        """The writer's connection, opened on the first write (call with the write lock held)."""
        if self._conn is None:
            self._conn = self.engine.connect()
        return self._conn

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

    @property
    def shared(self) -> bool:
        """The state is a database that processes of other hosts, with other state directories (and
        so other audit manifests), may use at once (PostgreSQL); False for a SQLite file."""
        return self.engine.dialect.name != "sqlite"

    def running_runs(self, command: str | None = None) -> list[RunRecord]:
        """Runs (of `command`, or of any) whose row still says running (live, or killed before they
        ended), oldest first."""
        query = runs.select().where(runs.c.status == "running").order_by(runs.c.id)
        if command is not None:
            query = query.where(runs.c.command == command)
        with self.engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        return [RunRecord(**row) for row in rows]

    def mark_interrupted(self, run_ids: Sequence[int]) -> list[int]:
        """Say `interrupted` for those of `run_ids` whose row still says running: the caller knows
        they are dead (the audit manifest has their run_start and no run_end, or the project's lock
        is held). Their `finished_at` stays empty (when they died is unknown). Returns the ids changed."""
        if not run_ids:
            return []
        with self._write, self.engine.begin() as conn:
            changed = conn.execute(sa.select(runs.c.id).where(runs.c.id.in_(list(run_ids)),
                                                              runs.c.status == "running")).scalars().all()
            if changed:
                conn.execute(runs.update().where(runs.c.id.in_(changed)).values(status="interrupted"))
        return sorted(changed)

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
        row = object_row(run_id, dataset, source_key, source_etag, size, dest_key, source_md5, state, fields)
        return self.add_object_rows([row])[0]

    def add_object_rows(self, rows: Sequence[dict[str, Any]]) -> list[int]:
        """Insert full object rows (`rows.object_row`) in one transaction; their ids, in order.
        All of them are written or none."""
        if self._direct_insert is not None:
            return self._insert_direct(rows)
        with self._writing() as conn:
            return [int(conn.execute(_INSERT_OBJECT, row).inserted_primary_key[0]) for row in rows]

    def _insert_direct(self, rows: Sequence[dict[str, Any]]) -> list[int]:
        """`add_object_rows`'s inserts and commit on the writer's DBAPI connection (SQLite). A
        driver error is what SQLAlchemy would have raised: `StateUnwritable` for a full disk or a
        read-only file, else a `DBAPIError`; the transaction is rolled back either way."""
        insert = self._direct_insert
        ids = []
        with self._write:
            driver = self._writer().connection.dbapi_connection
            params = None
            try:
                for row in rows:
                    params = insert.params(row)
                    ids.append(int(driver.execute(insert.sql, params).lastrowid))
                driver.commit()
            except insert.error as exc:
                with suppress(insert.error):  # the error raised is the insert's, not a failed rollback's
                    driver.rollback()
                raise (self._stop(exc) or sa.exc.DBAPIError.instance(insert.sql, params, exc, insert.error)) from None
            return ids

    def batch(self, max_rows: int = 500, max_age: float = 0.2) -> "WriteBatch":
        """A `WriteBatch` on this store (see there for what may be queued)."""
        return WriteBatch(self._write_batch, max_rows, max_age)

    def transition(self, object_id: int, new_state: str, **fields: Any) -> None:
        """Move an object to `new_state` (allowed from its current state) and set `fields` with it."""
        values = transition_values(object_id, new_state, fields)
        with self._writing() as conn:
            if conn.execute(_UPDATE_OBJECT[new_state], values).rowcount != 1:
                raise _refusal(conn, object_id, new_state)

    def _write_batch(self, inserts: list[dict[str, Any]], updates: list[tuple[str, dict[str, Any]]]
                     ) -> dict[int, InvalidTransition]:
        """Insert `inserts` (full rows) and apply `updates` ((new state, `transition_values`)) in one
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
        where = [objects.c.run_id == run_id]
        if dataset is not None:
            where.append(objects.c.dataset == dataset)
        if state is not None:
            where.append(objects.c.state == state)
        return self._object_pages(where)

    def _object_pages(self, where: list, page: int = 1000) -> Iterator[ObjectRecord]:
        """The `objects` rows matching `where`, in id order, read a page at a time (no cursor stays
        open between pages, so the caller may write while it iterates)."""
        last = 0
        while True:
            query = sa.select(*_RECORD_COLUMNS).where(*where, objects.c.id > last).order_by(objects.c.id).limit(page)
            with self.engine.connect() as conn:
                rows = conn.execute(query).all()
            if not rows:
                return
            for row in rows:
                yield ObjectRecord(*row)
            last = rows[-1].id

    def removed_at_source(self, dataset: str, run_id: int) -> Iterator[ObjectRecord]:
        """Objects the destination holds (newest copied row, not since removed) that run `run_id`
        did not see at the source: deleted there (or no longer selected) since they were copied.
        Meaningful only once the run listed the whole dataset. Streamed, in source-key order."""
        o = objects
        newest = (sa.select(sa.func.max(o.c.id).label("id"))
                  .where(o.c.dataset == dataset, o.c.state.in_(COPIED + (REMOVED,)))
                  .group_by(o.c.source_key).subquery())
        # NOT EXISTS, each an index probe (ix_objects_dataset_key, ix_listing_key): PostgreSQL
        # rescans a `NOT IN (subquery)` per row once the run's keys outgrow work_mem.
        mine = o.alias("mine")
        seen_copied = (sa.select(mine.c.id).where(mine.c.dataset == dataset, mine.c.source_key == o.c.source_key,
                                                  mine.c.run_id == run_id))
        seen_listed = (sa.select(listing.c.seq).where(listing.c.run_id == run_id, listing.c.dataset == dataset,
                                                       listing.c.source_key == o.c.source_key))
        query = (o.select().join_from(o, newest, o.c.id == newest.c.id)
                 .where(o.c.state.in_(COPIED), o.c.run_id != run_id, ~seen_copied.exists(), ~seen_listed.exists())
                 .order_by(o.c.source_key))
        with self.engine.connect() as conn:
            if self.engine.dialect.name == "postgresql":
                # Streamed through a cursor, which PostgreSQL plans for its first 10% of rows: nested
                # loops where hashing the run's keys once is a hundred times faster (44 s against
                # 0.4 s for 200,000 objects). The whole result is wanted: plan for all of it.
                conn.exec_driver_sql("SET LOCAL cursor_tuple_fraction = 1.0")
            result = conn.execution_options(stream_results=True, yield_per=1000).execute(query)
            for row in result.mappings():
                yield ObjectRecord(**row)

    def last_copy(self, dataset: str, source_key: str) -> ObjectRecord | None:
        """The newest row, across runs, saying a version of this object was copied (uploaded or
        verified), even if a newer row says that copy was deleted or found wrong: its plaintext
        SHA-256 is what a restore compares with."""
        with self.engine.connect() as conn:
            row = conn.execute(_LAST_COPY, {"_dataset": dataset, "_key": source_key}).mappings().first()
        return ObjectRecord(**row) if row else None

    def current_copy(self, dataset: str, source_key: str) -> ObjectRecord | None:
        """The copy of this object the destination holds as far as the state knows: the newest
        uploaded or verified row, unless a newer row says that copy was deleted (removed at the
        source, `--delete-removed`) or found wrong by verify. What a re-run may skip against: an
        object whose copy was deleted is copied again when the source selects it again."""
        with self.engine.connect() as conn:
            row = conn.execute(_NEWEST_CLAIM, {"_dataset": dataset, "_key": source_key}).mappings().first()
        return ObjectRecord(**row) if row and row["state"] in COPIED else None

    def current_copies(self, dataset: str, keys: Sequence[str]) -> dict[str, CurrentCopy]:
        """`current_copy` of many keys in one query (a page of a listing, a few hundred keys):
        source key -> what a delta pass needs of its copy, for the keys that have one."""
        if not keys:
            return {}
        with self.engine.connect() as conn:
            keys_json = json.dumps(list(keys)) if conn.dialect.name == "sqlite" else ""
            # SQLite's json_each ends a text value at a NUL ("\u0000" once encoded): such a page
            # goes as bound parameters.
            if keys_json and "\\u0000" not in keys_json:
                rows = conn.execute(_CURRENT_COPIES_SQLITE, {"_dataset": dataset, "_keys_json": keys_json}).all()
            else:
                rows = conn.execute(_CURRENT_COPIES, {"_dataset": dataset, "_keys": list(keys)}).all()
        # Positional rows: a mapping per row costs more than the query at a few hundred keys.
        return {row[1]: CurrentCopy(*row) for row in rows}

    # ---- a run's listing and its shards (the flows' unit of work) -----------------------------

    def record_listing(self, run_id: int, dataset: str, entries: Iterable[tuple[int, ObjectMeta]], *,
                       start: int = 0, page: int = 1000) -> None:
        """Store part of `dataset`'s listing for `run_id`: (shard, ObjectMeta) pairs in listing order,
        numbered from `start`, written a page at a time (a listing of millions is never held in memory)."""
        rows: list[dict[str, Any]] = []
        seq = start
        for shard, meta in entries:
            rows.append(listing_row(run_id, dataset, seq, shard, meta))
            seq += 1
            if len(rows) >= page:
                with self._writing() as conn:
                    self._insert_listing(conn, rows)
                rows = []
        if rows:
            with self._writing() as conn:
                self._insert_listing(conn, rows)

    def _insert_listing(self, conn: Connection, rows: list[dict[str, Any]]) -> None:
        """Insert listing rows (`listing_row`) in `conn`'s transaction: on SQLite one executemany of
        the compiled insert (`_DirectInsert`: SQLAlchemy's per-row parameter handling cost more than
        the insert), still through SQLAlchemy's connection and its error handling."""
        if self._direct_listing is None:
            conn.execute(listing.insert(), rows)
        else:
            conn.exec_driver_sql(self._direct_listing.sql, [self._direct_listing.params(row) for row in rows])

    def listed(self, run_id: int, dataset: str, shard: int | None = None) -> Iterator[ObjectMeta]:
        """The ObjectMeta of a run's listing (one shard of it), in listing order, streamed in pages."""
        last = -1
        columns = self._listing_columns()
        while True:
            query = sa.select(*columns).where(listing.c.run_id == run_id, listing.c.dataset == dataset,
                                              listing.c.seq > last)
            if shard is not None:
                query = query.where(listing.c.shard == shard)
            with self.engine.connect() as conn:
                rows = conn.execute(query.order_by(listing.c.seq).limit(1000)).all()
            if not rows:
                return
            # Positional rows (the table's column order): a mapping per row costs as much as the read.
            for (_, _, _, _, key, etag, size, md5, modified, tier, content, meta, created, kind, extra) in rows:
                yield ObjectMeta(
                    key=key, size=size, etag=etag, content_md5=bytes.fromhex(md5) if md5 else None,
                    last_modified=_utc(modified) if modified else None,
                    tier=tier, content=ContentSettings(**_json(content)) if content else _NO_CONTENT,
                    metadata=_json(meta) if meta else {}, created=_utc(created) if created else None, kind=kind,
                    **(listed_extra(_json(extra)) if extra else {}))
            last = rows[-1][2]

    def _listing_columns(self) -> list[Any]:
        """The listing table's columns as `listed` reads them. On SQLite, SQLAlchemy parses the
        stored times with a regular expression and calls a JSON decoder per column and row, even
        for the SQL NULL of most rows (together half of a delta pass's time): times and JSON are
        read as the text SQLite stores, and decoded by `_utc` and `_json`."""
        if self.engine.dialect.name != "sqlite":
            return list(listing.c)
        return [sa.type_coerce(c, sa.String).label(c.name) if isinstance(c.type, (sa.DateTime, sa.JSON)) else c
                for c in listing.c]

    # ---- a run's listing in ranges, resumable (engine/listing.py) ---------------------------------

    def start_listing_ranges(self, run_id: int, dataset: str, basis: str,
                             ranges: Sequence[tuple[str, bool]]) -> list[ListingRangeRecord]:
        """Record the ranges (prefix, direct) `dataset`'s listing is cut into, none listed yet."""
        rows = [dict(run_id=run_id, dataset=dataset, range_no=n, prefix=prefix, direct=direct, basis=basis,
                     marker=None, done=False, objects=0, bytes=0, cut_shard=0, cut_objects=0, cut_bytes=0,
                     not_carried=None)
                for n, (prefix, direct) in enumerate(ranges)]
        with self._writing() as conn:
            conn.execute(listing_ranges.insert(), rows)
        return [ListingRangeRecord(**r) for r in rows]

    def listing_ranges(self, run_id: int, dataset: str) -> list[ListingRangeRecord]:
        """The ranges of a run's listing of `dataset`, in range order (none for a listing not cut in ranges)."""
        r = listing_ranges
        with self.engine.connect() as conn:
            rows = conn.execute(r.select().where(r.c.run_id == run_id, r.c.dataset == dataset)
                                .order_by(r.c.range_no)).mappings().all()
        return [ListingRangeRecord(**row) for row in rows]

    def record_listing_page(self, part: ListingRangeRecord, entries: Sequence[tuple[int, ObjectMeta]],
                            start: int) -> None:
        """Store one listed page of a range: its (shard, ObjectMeta) entries numbered from `start`,
        and, in the same transaction, the range as it stands after the page (`part`: marker, done,
        counts, cutter): a listing killed at any point resumes exactly after its last stored page."""
        rows = [listing_row(part.run_id, part.dataset, start + i, shard, meta) for i, (shard, meta) in enumerate(entries)]
        r = listing_ranges
        with self._writing() as conn:
            if rows:
                self._insert_listing(conn, rows)
            conn.execute(r.update().where(r.c.run_id == part.run_id, r.c.dataset == part.dataset,
                                          r.c.range_no == part.range_no)
                         .values(marker=part.marker, done=part.done, objects=part.objects, bytes=part.bytes,
                                 cut_shard=part.cut_shard, cut_objects=part.cut_objects, cut_bytes=part.cut_bytes,
                                 not_carried=part.not_carried))

    def listing_to_resume(self, dataset: str, basis: str, run_id: int) -> int | None:
        """The run whose listing of `dataset` run `run_id` may take over: the newest other run that
        started on the dataset, if it listed it in ranges selecting the same (`basis`), never went
        through that listing (killed, or stopped on an error) and is no longer running. None otherwise."""
        rd, r = run_datasets, listing_ranges
        with self.engine.connect() as conn:
            newest = conn.execute(
                sa.select(rd.c.run_id, rd.c.through_at, runs.c.status).join_from(rd, runs, runs.c.id == rd.c.run_id)
                .where(rd.c.dataset == dataset, rd.c.run_id != run_id, runs.c.command == "migrate")
                .order_by(rd.c.run_id.desc()).limit(1)).first()
            if newest is None or newest.through_at is not None or newest.status == "running":
                return None
            bases = set(conn.execute(sa.select(r.c.basis).where(r.c.run_id == newest.run_id,
                                                                 r.c.dataset == dataset)).scalars())
        return newest.run_id if bases == {basis} else None

    def take_over_listing(self, earlier: int, run_id: int, dataset: str) -> None:
        """Copy run `earlier`'s stored listing of `dataset` (its rows, its ranges with their markers)
        to run `run_id`, in the database (nothing goes through this process): run `run_id` lists on
        from there. Run `earlier`'s rows stay as they were."""
        with self._writing() as conn:
            for table in (listing, listing_ranges, listing_feed):
                columns = [c.name for c in table.columns]
                taken = [sa.literal(run_id, sa.Integer).label("run_id") if c == "run_id" else table.c[c]
                         for c in columns]
                conn.execute(table.insert().from_select(columns, sa.select(*taken).where(
                    table.c.run_id == earlier, table.c.dataset == dataset)))

    # ---- a listing made from an earlier one and the change feed (engine/listing.py) -------------

    def record_feed_position(self, run_id: int, dataset: str, feed_through: str) -> None:
        """Before a full listing of `dataset`: every change of a feed segment that began at or before
        `feed_through` will be in it (the next run reads the feed from there)."""
        with self._writing() as conn:
            conn.execute(listing_feed.delete().where(listing_feed.c.run_id == run_id, listing_feed.c.dataset == dataset))
            conn.execute(listing_feed.insert().values(run_id=run_id, dataset=dataset, feed_through=feed_through))

    def feed_position(self, run_id: int, dataset: str) -> FeedPosition | None:
        """Where run `run_id`'s listing of `dataset` stands in the change feed (None: not noted, or
        a store opened read-only from before the change feed)."""
        f = listing_feed
        with self.engine.connect() as conn:
            if not sa.inspect(conn).has_table(f.name):
                return None
            row = conn.execute(f.select().where(f.c.run_id == run_id, f.c.dataset == dataset)).mappings().first()
        return FeedPosition(**row) if row else None

    def feed_baseline(self, dataset: str, basis: str, run_id: int) -> tuple[int, str] | None:
        """The listing run `run_id` may make its own from the change feed instead of listing in
        full: the newest other migrate run that went through its listing of `dataset`, when that
        listing selected the same (`basis`) and knows its place in the feed. (run, feed position),
        or None."""
        rd, r, f = run_datasets, listing_ranges, listing_feed
        with self.engine.connect() as conn:
            newest = conn.execute(
                sa.select(rd.c.run_id).join_from(rd, runs, runs.c.id == rd.c.run_id)
                .where(rd.c.dataset == dataset, rd.c.run_id != run_id, runs.c.command == "migrate",
                       rd.c.through_at.is_not(None))
                .order_by(rd.c.run_id.desc()).limit(1)).scalar()
            if newest is None:
                return None
            bases = set(conn.execute(sa.select(r.c.basis).where(r.c.run_id == newest, r.c.dataset == dataset)).scalars())
            through = conn.execute(sa.select(f.c.feed_through).where(f.c.run_id == newest, f.c.dataset == dataset)).scalar()
        return (newest, through) if bases == {basis} and through is not None else None

    def start_from_listing(self, baseline: int, run_id: int, dataset: str) -> int:
        """Copy run `baseline`'s listing rows of `dataset` to run `run_id` in the database (nothing
        goes through this process), its shards numbered 0, 1, ... in their order (the shards it
        defined, then any cut shard it had not, in listing order); returns how many shards they fill."""
        l = listing
        columns = [c.name for c in l.columns]
        in_order = (l.c.shard < 0, sa.func.abs(l.c.shard))
        renumbered = {"run_id": sa.literal(run_id, sa.Integer).label("run_id"),
                      "shard": (sa.func.dense_rank().over(order_by=in_order) - 1).label("shard")}
        with self._writing() as conn:
            conn.execute(l.insert().from_select(columns, sa.select(*[renumbered.get(c, l.c[c]) for c in columns])
                                                .where(l.c.run_id == baseline, l.c.dataset == dataset)))
            last = conn.execute(sa.select(sa.func.max(l.c.shard)).where(l.c.run_id == run_id,
                                                                        l.c.dataset == dataset)).scalar()
        return 0 if last is None else int(last) + 1

    def forget_listed(self, run_id: int, dataset: str, keys: Sequence[str]) -> None:
        """Remove `keys` from a run's listing of `dataset` (names listed again from the change feed)."""
        if keys:
            with self._writing() as conn:
                conn.execute(listing.delete().where(listing.c.run_id == run_id, listing.c.dataset == dataset,
                                                    listing.c.source_key.in_(list(keys))))

    def finish_listing_from_feed(self, run_id: int, dataset: str, prefix: str, basis: str, not_carried: str | None, *,
                                 feed_through: str, baseline: int, changed: int, events: int) -> ListingRangeRecord:
        """Close a listing made from run `baseline`'s and the change feed: one range, done, holding
        what the listing holds, and the feed position the next run reads on from, in one transaction
        (a listing killed before this is never taken over: it has no range)."""
        l = listing
        with self._writing() as conn:
            count, size, last = conn.execute(
                sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(l.c.size), 0), sa.func.max(l.c.shard))
                .where(l.c.run_id == run_id, l.c.dataset == dataset)).one()
            # The cutter "stands" in the last shard, which holds objects: `shards` counts up to it.
            cut_shard, cut_objects = (int(last), 1) if count else (0, 0)
            part = ListingRangeRecord(run_id, dataset, 0, prefix, False, basis, None, True, int(count), int(size),
                                      cut_shard, cut_objects, 0, not_carried)
            conn.execute(listing_ranges.insert().values(**asdict(part)))
            conn.execute(listing_feed.insert().values(run_id=run_id, dataset=dataset, feed_through=feed_through,
                                                      baseline_run=baseline, changed=changed, events=events))
        return part

    def listing_length(self, run_id: int, dataset: str) -> int:
        """The position after the last stored row of a run's listing of `dataset` (0 when none)."""
        with self.engine.connect() as conn:
            last = conn.execute(sa.select(sa.func.max(listing.c.seq)).where(listing.c.run_id == run_id,
                                                                            listing.c.dataset == dataset)).scalar()
        return 0 if last is None else int(last) + 1

    def _define(self, conn, run_id: int, dataset: str, where) -> list[ShardRecord]:
        """Write the `shards` rows (status pending) of the numbered listing rows `where` selects."""
        l = listing
        query = (sa.select(l.c.shard, sa.func.count(), sa.func.coalesce(sa.func.sum(l.c.size), 0),
                           sa.func.min(l.c.source_key), sa.func.max(l.c.source_key))
                 .where(l.c.run_id == run_id, l.c.dataset == dataset, where).group_by(l.c.shard).order_by(l.c.shard))
        rows = [dict(run_id=run_id, dataset=dataset, shard=int(n), objects=int(c), bytes=int(b), first_key=lo,
                     last_key=hi, status="pending", attempts=0)
                for n, c, b, lo, hi in conn.execute(query)]
        if rows:
            conn.execute(shards.insert(), rows)
        return [ShardRecord(**r, seconds=None, reason=None, started_at=None, finished_at=None) for r in rows]

    def adopt_shards(self, run_id: int, dataset: str) -> list[ShardRecord]:
        """Define every shard of a run's listing of `dataset` whose rows already hold their number
        (0 or more; a listing's own cut shards are numbered below zero until defined): the shards
        of a listing taken over from a run that had defined them, or of a listing made from an
        earlier one and the change feed. Returns them."""
        with self._writing() as conn:
            return self._define(conn, run_id, dataset, listing.c.shard >= 0)

    def define_shard(self, run_id: int, dataset: str, cut: tuple[int, int], number: int) -> ShardRecord | None:
        """Define shard `number` of a run's listing of `dataset`: the rows whose listing shard
        number is within `cut` (both ends included, `schema.listing_shard`) take that number, and
        the shard its row, in one transaction. None when they hold no row."""
        l = listing
        low, high = min(cut), max(cut)
        with self._writing() as conn:
            conn.execute(l.update().where(l.c.run_id == run_id, l.c.dataset == dataset, l.c.shard >= low,
                                          l.c.shard <= high).values(shard=number))
            defined = self._define(conn, run_id, dataset, l.c.shard == number)
        return defined[0] if defined else None

    def first_cut_undefined(self, run_id: int, dataset: str, range_no: int) -> int | None:
        """The lowest n whose cut shard of range `range_no` has rows not in a defined shard (None: none)."""
        l = listing
        with self.engine.connect() as conn:
            top = conn.execute(sa.select(sa.func.max(l.c.shard)).where(
                l.c.run_id == run_id, l.c.dataset == dataset, l.c.shard <= listing_shard(range_no, 0),
                l.c.shard >= listing_shard(range_no, RANGE_SHARDS - 1))).scalar()
        return None if top is None else listing_shard(range_no, 0) - int(top)

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
            failed = conn.execute(
                sa.select(o.c.source_key, o.c.reason, o.c.transient).select_from(l.join(o, joined))
                .where(*where, o.c.state == FAILED).order_by(l.c.seq).limit(max_failures)).all()
        return ShardCounts(states, int(output or 0), tuple((k, r or "unknown") for k, r, _ in failed),
                           frozenset(k for k, _, transient in failed if transient))

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

    def earlier_work(self, dataset: str, run_id: int) -> tuple[bool, bool]:
        """(whether another run than `run_id` left a copied row of `dataset`, whether a row of it
        is an unfinished multipart upload). Where one is False, `current_copy` finds no copy of
        another run and `resumable` finds nothing for any of the dataset's keys until this run
        writes such rows itself: two queries per dataset instead of two per object."""
        o = objects
        copied = (sa.select(o.c.id).where(o.c.dataset == dataset, o.c.state.in_(COPIED), o.c.run_id != run_id)
                  .limit(1))
        open_upload = (sa.select(o.c.id).where(o.c.dataset == dataset, o.c.state == IN_PROGRESS,
                                              o.c.upload_id.is_not(None)).limit(1))
        with self.engine.connect() as conn:
            return (conn.execute(copied).first() is not None, conn.execute(open_upload).first() is not None)

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

    def uploads_left(self, dataset: str) -> list[tuple[str, str]]:
        """(destination key, upload id) of each multipart upload a row of `dataset` opened that no
        copy was completed from and that the next `migrate` would not continue (not the upload
        `resumable` returns for its object): uploads given up (a restart where the provider cannot
        abort) or whose abort failed. What `cleanup` can name where the provider does not list
        multipart uploads. An upload aborted since is still named (the state cannot tell)."""
        o = objects
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(o.c.source_key, o.c.dest_key, o.c.upload_id, o.c.state)
                                .where(o.c.dataset == dataset, o.c.upload_id.is_not(None)).order_by(o.c.id)).all()
        completed = {u for _, _, u, state in rows if state in COPIED}
        continued: dict[str, str | None] = {}
        left: dict[str, tuple[str, str]] = {}
        for key, dest_key, upload_id, _ in rows:
            if upload_id in completed or not dest_key:
                continue
            if key not in continued:
                resume = self.resumable(dataset, key)
                continued[key] = resume.upload_id if resume else None
            if upload_id != continued[key]:
                left.setdefault(upload_id, (dest_key, upload_id))
        return list(left.values())

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

    def md5_checked(self, run_id: int) -> int:
        """How many objects of a run had their source Content-MD5 checked against the bytes read."""
        query = sa.select(sa.func.count()).where(objects.c.run_id == run_id, objects.c.md5_checked.is_(True))
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar() or 0)

    # ---- which runs went through which datasets, and what a dataset must hold ---------------------

    def dataset_started(self, run_id: int, dataset: str) -> None:
        """Run `run_id` starts on `dataset` (a migrate run: its source listing; a verify run: its
        expected objects). Written before the first object of it is looked at."""
        with self._writing() as conn:
            conn.execute(run_datasets.insert().values(run_id=run_id, dataset=dataset, started_at=utcnow()))

    def dataset_through(self, run_id: int, dataset: str, objects: int, bytes_: int,
                        not_carried: Mapping[str, tuple[int, int]] | None = None) -> None:
        """Run `run_id` went through `dataset`: a migrate run, its whole source listing (`objects`
        and `bytes_` are what the listing held, `not_carried` what it named but does not carry:
        reason -> (objects, bytes)); a verify run, every expected object (what it checked)."""
        values = dict(through_at=utcnow(), objects=objects, bytes=bytes_)
        if not_carried is not None:
            values["not_carried"] = counts_to_json(not_carried)
        with self._writing() as conn:
            conn.execute(run_datasets.update()
                         .where(run_datasets.c.run_id == run_id, run_datasets.c.dataset == dataset)
                         .values(**values))

    def not_carried(self, run_id: int, dataset: str) -> dict[str, tuple[int, int]]:
        """What run `run_id`'s listing of `dataset` named but does not carry: reason -> (objects, bytes)."""
        with self.engine.connect() as conn:
            raw = conn.execute(sa.select(run_datasets.c.not_carried).where(
                run_datasets.c.run_id == run_id, run_datasets.c.dataset == dataset)).scalar()
        return counts_from_json(raw)

    def dataset_stopped(self, run_id: int, dataset: str, reason: str) -> None:
        """Run `run_id` stopped before it went through `dataset`: `reason`, one sentence."""
        with self._writing() as conn:
            conn.execute(run_datasets.update()
                         .where(run_datasets.c.run_id == run_id, run_datasets.c.dataset == dataset,
                                run_datasets.c.through_at.is_(None))
                         .values(stopped=reason[:2000]))

    def run_datasets(self, dataset: str) -> list[RunDataset]:
        """Every migrate and verify run that started on `dataset`, newest first."""
        return completeness.run_datasets_of(self.engine, dataset)

    def dataset_status(self, dataset: str, *, prefix: str = "", examples: int = 20) -> DatasetStatus:
        """Whether `dataset` is complete: what it must hold (its newest complete source listing)
        and, per expected object, whether it is verified, copied, failed, pending or never attempted,
        with the first `examples` of each (engine/state/completeness.py). Only source keys starting
        with `prefix` when one is given. Streamed: bounded memory whatever the dataset's size."""
        status = completeness.dataset_status(self.engine, dataset, prefix=prefix, examples=examples)
        cut_over = self.last_cutover(dataset)
        return replace(status, cut_over=cut_over) if cut_over else status

    def record_cutover(self, record: CutoverRecord) -> None:
        with self._writing() as conn:
            conn.execute(cutovers.insert().values(**record.__dict__))

    def last_cutover(self, dataset: str) -> CutoverRecord | None:
        """The dataset's newest cutover; None, also in a read-only store written before cutovers."""
        with self.engine.connect() as conn:
            if not sa.inspect(conn).has_table("cutovers"):
                return None
            row = conn.execute(cutovers.select().where(cutovers.c.dataset == dataset)
                               .order_by(cutovers.c.run_id.desc()).limit(1)).mappings().first()
        return CutoverRecord(**row) if row else None

    # ---- what verify checks ----------------------------------------------------------------------

    def expected_at_destination(self, dataset: str) -> Iterator[ObjectRecord]:
        """Per source key of `dataset`, the newest row saying a version is at the destination
        (uploaded or verified, or failed by an earlier verify), unless a newer row says its copy was
        removed; in destination-key order (byte order: S3's listing order), streamed on one cursor."""
        with self.engine.connect() as conn:
            result = conn.execution_options(stream_results=True, yield_per=1000).execute(self._claims(dataset))
            for row in result.mappings():
                yield ObjectRecord(**row)

    def count_expected_at_destination(self, dataset: str) -> int:
        """How many rows `expected_at_destination` gives."""
        sub = self._claims(dataset).subquery()
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(sub)).scalar() or 0)

    def _claims(self, dataset: str) -> sa.Select:
        o = objects
        # A `removed` row newer than the copy means the destination copy was deleted on purpose.
        claims = sa.or_(o.c.state.in_(COPIED + (REMOVED,)),
                        sa.and_(o.c.state == FAILED, o.c.reason.like(VERIFY_REASON + "%")))
        newest = (sa.select(sa.func.max(o.c.id).label("id"))
                  .where(o.c.dataset == dataset, o.c.dest_key.is_not(None), claims)
                  .group_by(o.c.source_key).subquery())
        order = o.c.dest_key.collate("C") if self.engine.dialect.name == "postgresql" else o.c.dest_key  # SQLite: BINARY
        return (o.select().join_from(o, newest, o.c.id == newest.c.id).where(o.c.state != REMOVED)
                .order_by(order, o.c.id))

    # ---- which rows the audit manifest records ---------------------------------------------------

    def unaudited(self, dataset: str, states: Sequence[str], page: int = 1000) -> Iterator[ObjectRecord]:
        """Rows of `dataset` in `states` that the audit manifest does not record yet (no
        `mark_audited`), in id order, streamed in pages."""
        o = objects
        return self._object_pages([o.c.dataset == dataset, o.c.state.in_(states),
                                   ~sa.exists().where(audit_recorded.c.object_id == o.c.id)], page)

    def mark_audited(self, object_id: int | None = None, seq: int | None = None, *,
                     lines: Sequence[tuple[int, int]] = ()) -> None:
        """Record that manifest line `seq` records the row `object_id`, or for each (object_id, seq)
        of `lines` (one transaction for all). Written after the lines: a mark lost to a kill makes
        the next run record those rows again, never leaves a row unrecorded."""
        rows = [dict(object_id=o, seq=s) for o, s in lines]
        if object_id is not None and seq is not None:
            rows.append(dict(object_id=object_id, seq=seq))
        if not rows:
            return
        with self._writing() as conn:
            conn.execute(audit_recorded.insert(), rows)

    # ---- shared rate limits (engine/pacing.py) ------------------------------------------------------

    def lease_tokens(self, name: str, rate: float, burst: float, amount: float) -> float:
        """Reserve `amount` tokens of the shared bucket `name`, refilled at `rate` per second up to
        `burst`; returns the seconds to wait before spending them (0 when they were there).

        One UPDATE on the database's own clock (hosts sharing a PostgreSQL state need not agree on
        the time), so concurrent leases from any number of processes never hand out a token twice:
        over any span T, at most ``burst + rate x T`` tokens are spent. A new bucket starts empty
        (no burst at the start of a run)."""
        now = _DB_EPOCH[self.engine.dialect.name]
        b = rate_buckets.c
        elapsed = sa.case((now > b.at, now - b.at), else_=sa.literal(0.0))
        refilled = b.tokens + elapsed * sa.literal(float(rate))
        capped = sa.case((refilled > sa.literal(float(burst)), sa.literal(float(burst))), else_=refilled)
        update = (rate_buckets.update().where(b.name == name)
                  .values(tokens=capped - sa.literal(float(amount)), at=now, rate=float(rate))
                  .returning(b.tokens))
        for _ in range(2):  # a second pass when another process created the row at the same moment
            try:
                with self._writing() as conn:
                    left = conn.execute(update).scalar()
                    if left is None:
                        conn.execute(rate_buckets.insert().from_select(
                            ["name", "tokens", "at", "rate"],
                            sa.select(sa.literal(name), sa.literal(-float(amount)), now, sa.literal(float(rate)))))
                        left = -float(amount)
                return max(0.0, -left / rate)
            except sa.exc.IntegrityError:
                continue
        raise RuntimeError(f"the shared rate limit {name!r} could not be leased")

    # ---- the report's figures ----------------------------------------------------------------------

    def dataset_figures(self, dataset: str) -> DatasetFigures:
        """`dataset`'s objects counted by their newest copy (see `DatasetFigures`)."""
        o = objects
        newest = _newest_copies(dataset)
        query = (sa.select(o.c.state, sa.func.count(), sa.func.coalesce(sa.func.sum(o.c.size), 0),
                           sa.func.coalesce(sa.func.sum(o.c.output_size), 0), sa.func.max(o.c.finished_at))
                 .join_from(o, newest, o.c.id == newest.c.id).group_by(o.c.state))
        counts = {UPLOADED: 0, VERIFIED: 0, FAILED: 0}
        total = out = 0
        last = None
        with self.engine.connect() as conn:
            for state, n, size, output, finished in conn.execute(query):
                counts[state] = int(n)
                total += int(size)
                out += int(output) if state != FAILED else 0
                if state != FAILED and finished is not None:
                    last = max(last, finished) if last else finished
        return DatasetFigures(dataset, sum(counts.values()), total, counts[VERIFIED], counts[UPLOADED], counts[FAILED],
                              out, last)

    def moved_over_time(self, datasets: Sequence[str], bins: int) -> list[tuple[datetime, int]]:
        """(end of bin, plaintext bytes copied by then) for `bins` equal time bins from the first copy
        of `datasets` to the last (every copy ever made, verify's failures included: those bytes did
        move); empty when nothing was copied. One streamed pass, fixed-size bins."""
        o = objects
        with self.engine.connect() as conn:
            lo, hi = conn.execute(sa.select(sa.func.min(o.c.finished_at), sa.func.max(o.c.finished_at))
                                  .where(o.c.dataset.in_(list(datasets)), o.c.state.in_(COPIED + (FAILED,)))).one()
        if lo is None:
            return []
        span = max((hi - lo).total_seconds(), 1e-3)
        moved = sa.or_(o.c.state.in_(COPIED), sa.and_(o.c.state == FAILED, o.c.reason.like(VERIFY_REASON + "%")))
        query = (sa.select(o.c.finished_at, o.c.size)
                 .where(o.c.dataset.in_(list(datasets)), moved, o.c.finished_at.is_not(None)))
        per_bin = [0] * bins
        with self.engine.connect() as conn:
            for finished, size in conn.execution_options(stream_results=True, yield_per=5000).execute(query):
                i = min(int((finished - lo).total_seconds() / span * bins), bins - 1)
                per_bin[max(i, 0)] += int(size)
        out, acc = [], 0
        for i, b in enumerate(per_bin):
            acc += b
            out.append((lo + (hi - lo) * ((i + 1) / bins), acc))
        return out

    def size_histogram(self, datasets: Sequence[str], bounds: Sequence[int]) -> list[int]:
        """How many objects of `datasets` (by their newest copy, copied or verified) fall below each
        of `bounds` (ascending, exclusive) and not below the one before; the last count is the
        objects of `bounds[-1]` bytes or more. One streamed pass per dataset."""
        o = objects
        counts = [0] * (len(bounds) + 1)
        for name in datasets:
            newest = _newest_copies(name)
            query = sa.select(o.c.size).join_from(o, newest, o.c.id == newest.c.id).where(o.c.state.in_(COPIED))
            with self.engine.connect() as conn:
                for (size,) in conn.execution_options(stream_results=True, yield_per=5000).execute(query):
                    counts[next((k for k, bound in enumerate(bounds) if size < bound), len(bounds))] += 1
        return counts

    def recent_runs(self, limit: int = 30) -> list[RunRecord]:
        """The last `limit` runs of any command, oldest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(runs.select().order_by(runs.c.id.desc()).limit(limit)).mappings().all()
        return [RunRecord(**r) for r in reversed(rows)]


# Seconds since the epoch on the database's clock, as SQL.
_DB_EPOCH = {
    "sqlite": sa.literal_column("((julianday('now') - 2440587.5) * 86400.0)", sa.Float),
    "postgresql": sa.literal_column("extract(epoch from clock_timestamp())", sa.Float),
}


def _newest_copies(dataset: str) -> sa.Subquery:
    """Per source key of `dataset`, the id of its newest row that copied, was verified, or failed
    (a later unchanged row only restates an earlier copy)."""
    o = objects
    return (sa.select(sa.func.max(o.c.id).label("id"))
            .where(o.c.dataset == dataset, o.c.state.in_((UPLOADED, VERIFIED, FAILED)))
            .group_by(o.c.source_key).subquery())


def _shard_key(run_id: int, dataset: str, shard: int) -> tuple:
    return shards.c.run_id == run_id, shards.c.dataset == dataset, shards.c.shard == shard


class _DirectInsert:
    """An insert into `table` of rows with every one of `columns`, compiled once for a dialect
    with a positional parameter style (SQLite's): its SQL, and a row's parameters in order through
    the columns' own bind processors (booleans, times and JSON stored exactly as SQLAlchemy stores
    them)."""

    def __init__(self, dialect: sa.Dialect, table: sa.Table, columns: Sequence[str]):
        compiled = table.insert().compile(dialect=dialect, column_keys=list(columns))
        if compiled.positiontup is None or set(compiled.positiontup) != set(columns):
            raise RuntimeError(f"the {table.name} insert did not compile to positional parameters on {dialect.name}")
        self.sql = str(compiled)
        self.error: type[Exception] = dialect.dbapi.Error
        self._values = operator.itemgetter(*compiled.positiontup)
        processors = (table.c[name].type.dialect_impl(dialect).bind_processor(dialect)
                      for name in compiled.positiontup)
        self._processors = tuple((i, process) for i, process in enumerate(processors) if process is not None)

    def params(self, row: Mapping[str, Any]) -> tuple:
        values = list(self._values(row))
        for i, process in self._processors:
            values[i] = process(values[i])
        return tuple(values)


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


def _sqlite_file(engine: Engine) -> Path | None:
    """The SQLite file of `engine` (None for a database server or an in-memory database)."""
    if engine.dialect.name != "sqlite" or not engine.url.database or engine.url.database == ":memory:":
        return None
    name = engine.url.database
    return Path(name[len("file:"):] if name.startswith("file:") else name)


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    # NORMAL in WAL mode: a power cut can lose the last transactions but never corrupts the file;
    # a lost transition is re-derived from the destination (an open upload, or an object present).
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def _utc(value: datetime | str) -> datetime:
    """A stored time (naive UTC) as an aware datetime; SQLite's as the text it stores."""
    if isinstance(value, str):
        return datetime.fromisoformat(value + "+00:00")
    return value.replace(tzinfo=timezone.utc)


def _json(value: Any) -> Any:
    """A JSON column's value; SQLite's as the text it stores."""
    return json.loads(value) if isinstance(value, str) else value
