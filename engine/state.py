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

Extending (the resume issue): add a `parts` table keyed by object id (number, etag, size, md5,
sha256) and nullable `upload_id` / `header` columns on `objects`; add states to `TRANSITIONS`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping

import sqlalchemy as sa
from sqlalchemy.engine import Engine

PENDING = "pending"
IN_PROGRESS = "in_progress"
UPLOADED = "uploaded"
VERIFIED = "verified"
FAILED = "failed"
UNCHANGED = "unchanged"
CHANGED = "changed"

STATES = (PENDING, IN_PROGRESS, UPLOADED, VERIFIED, FAILED, UNCHANGED, CHANGED)

# state -> the states it may move to.
TRANSITIONS: Mapping[str, frozenset[str]] = {
    PENDING: frozenset({IN_PROGRESS, UNCHANGED, FAILED}),  # failed here = refused before any byte moved
    IN_PROGRESS: frozenset({UPLOADED, FAILED, CHANGED}),
    CHANGED: frozenset({IN_PROGRESS, FAILED}),  # re-queued: the object restarts from its new version
    UPLOADED: frozenset({VERIFIED, FAILED, CHANGED}),  # verify proved it, found it wrong, or the source moved on
    VERIFIED: frozenset({CHANGED, FAILED}),  # a later verify can still find a discrepancy
    FAILED: frozenset({IN_PROGRESS}),  # retried (within the run that recorded it)
    UNCHANGED: frozenset(),
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
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("started_at", sa.DateTime),
    sa.Column("finished_at", sa.DateTime),
    sa.Column("updated_at", sa.DateTime, nullable=False),
    sa.UniqueConstraint("run_id", "dataset", "source_key", name="uq_objects_run_key"),
    sa.Index("ix_objects_dataset_key", "dataset", "source_key"),
    sa.Index("ix_objects_run_state", "run_id", "state"),
)

# Columns a transition may set besides the state.
_OBJECT_FIELDS = frozenset({
    "reason", "sha256", "source_md5", "md5_checked", "dest_key", "dest_etag", "output_size", "part_count",
    "restarts", "source_etag", "size", "started_at", "finished_at",
})


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
        metadata.create_all(self.engine)

    @staticmethod
    def _connect_args(url: str) -> dict[str, Any]:
        # Connections are used from the engine's worker threads (never two at once: see the lock).
        return {"check_same_thread": False, "timeout": 30} if url.startswith("sqlite") else {}

    def close(self) -> None:
        self.engine.dispose()

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
                   dest_key: str | None = None, source_md5: bytes | None = None) -> int:
        """Record an object of this run as pending; returns its id."""
        now = utcnow()
        with self._write, self.engine.begin() as conn:
            result = conn.execute(objects.insert().values(
                run_id=run_id, dataset=dataset, source_key=source_key, source_etag=source_etag, size=size,
                state=PENDING, dest_key=dest_key, source_md5=source_md5.hex() if source_md5 else None,
                md5_checked=False, restarts=0, created_at=now, updated_at=now,
            ))
            return int(result.inserted_primary_key[0])

    def transition(self, object_id: int, new_state: str, **fields: Any) -> None:
        """Move an object to `new_state` (allowed from its current state) and set `fields` with it."""
        if new_state not in TRANSITIONS:
            raise ValueError(f"unknown object state {new_state!r}")
        unknown = set(fields) - _OBJECT_FIELDS
        if unknown:
            raise ValueError(f"unknown object fields: {sorted(unknown)}")
        allowed_from = [s for s, targets in TRANSITIONS.items() if new_state in targets]
        now = utcnow()
        values = dict(fields, state=new_state, updated_at=now)
        if new_state == IN_PROGRESS and "started_at" not in fields:
            values["started_at"] = now
        if new_state in (UPLOADED, FAILED, UNCHANGED, VERIFIED) and "finished_at" not in fields:
            values["finished_at"] = now
        with self._write, self.engine.begin() as conn:
            result = conn.execute(
                objects.update().where(objects.c.id == object_id, objects.c.state.in_(allowed_from)).values(**values)
            )
            if result.rowcount != 1:
                current = conn.execute(sa.select(objects.c.state).where(objects.c.id == object_id)).scalar()
                if current is None:
                    raise InvalidTransition(f"object {object_id} is not in the state store")
                raise InvalidTransition(f"object {object_id} cannot go from {current!r} to {new_state!r}")

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

    def last_copy(self, dataset: str, source_key: str) -> ObjectRecord | None:
        """The newest row, across runs, saying the destination holds a version of this object."""
        query = (objects.select()
                 .where(objects.c.dataset == dataset, objects.c.source_key == source_key, objects.c.state.in_(COPIED))
                 .order_by(objects.c.id.desc()).limit(1))
        with self.engine.connect() as conn:
            row = conn.execute(query).mappings().first()
        return ObjectRecord(**row) if row else None

    def state_counts(self, run_id: int, dataset: str | None = None) -> dict[str, tuple[int, int]]:
        """state -> (objects, plaintext bytes) for a run (and dataset): the migrate summary's numbers."""
        query = (sa.select(objects.c.state, sa.func.count(), sa.func.coalesce(sa.func.sum(objects.c.size), 0))
                 .where(objects.c.run_id == run_id).group_by(objects.c.state))
        if dataset is not None:
            query = query.where(objects.c.dataset == dataset)
        with self.engine.connect() as conn:
            return {state: (int(n), int(b)) for state, n, b in conn.execute(query)}


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    # NORMAL in WAL mode: a power cut can lose the last transactions but never corrupts the file;
    # a lost transition is re-derived from the destination (an open upload, or an object present).
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()
