"""What a dataset must hold, and how far it is from holding it: one definition of "complete", used
by verify, restore, status and the flows (`StateStore.dataset_status`).

**What the dataset must hold** (the expected objects): every source key that the newest migrate
run to go through the dataset's whole source listing listed: that run's `listing` rows when it
listed into the state store (the flows), otherwise its own rows (the CLI records a row for every
object it lists: copied, unchanged, refused or failed). What was removed at the source before that
listing is not expected. A migrate run records in `run_datasets` that it went through a listing,
with the objects and bytes it held; a run killed or stopped mid-listing never does, and such a run
newer than the listing leaves the dataset "not known to be complete".

**Per expected object, one category** (records.py, `STATUS_CATEGORIES`) from two rows of its key:
the newest row written since that listing began (runs from the listing's on), and the newest
"claim" of any run (the newest row saying what the destination holds: uploaded, verified, failed
by a verify, or removed). An object with no row since the listing is at the destination only when
its newest claim is a copy of exactly the version listed (same ETag and size); otherwise it was
never attempted.

Memory: one streamed pass over the expected objects joined with the two newest rows of each key;
only counts, bytes and the first `examples` objects of each category are kept.
"""

from __future__ import annotations

from typing import Any, Mapping

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from .records import (COPIED_COPY, FAILED_PERMANENT, FAILED_TRANSIENT, FOUND_WRONG, NEVER_ATTEMPTED, PENDING_COPY,
                      STATUS_CATEGORIES, VERIFIED_COPY, DatasetStatus, ObjectStatus, RunDataset, StatusCount)
from .schema import (CHANGED, COPIED, FAILED, IN_PROGRESS, PENDING, REMOVED, UNCHANGED, UPLOADED, VERIFIED,
                     VERIFY_REASON, listing, objects, run_datasets, runs)


def run_datasets_of(engine: Engine, dataset: str) -> list[RunDataset]:
    """Every migrate and verify run that started on `dataset`, newest first (a few per day at most)."""
    with engine.connect() as conn:
        inspector = sa.inspect(conn)
        if not inspector.has_table("run_datasets"):  # a read-only store written by an older exitplan
            return []
        # ... or one without the column added since (read-only: not added on open)
        not_carried = (run_datasets.c.not_carried if any(c["name"] == "not_carried" for c in inspector.get_columns("run_datasets"))
                       else sa.null().label("not_carried"))
        query = (sa.select(run_datasets.c.run_id, run_datasets.c.dataset, runs.c.command,
                           runs.c.status.label("run_status"), run_datasets.c.started_at, run_datasets.c.through_at,
                           run_datasets.c.objects, run_datasets.c.bytes, run_datasets.c.stopped, not_carried)
                 .join_from(run_datasets, runs, runs.c.id == run_datasets.c.run_id)
                 .where(run_datasets.c.dataset == dataset).order_by(run_datasets.c.run_id.desc()))
        return [RunDataset(**r) for r in conn.execute(query).mappings()]


def dataset_status(engine: Engine, dataset: str, *, prefix: str = "", examples: int = 20) -> DatasetStatus:
    """`dataset`'s expected objects, each in its category (see the module docstring); only source
    keys starting with `prefix` when one is given. Streamed: bounded memory for any dataset size."""
    history = run_datasets_of(engine, dataset)
    migrations = [r for r in history if r.command == "migrate"]
    listing_run = next((r for r in migrations if r.went_through), None)
    since = listing_run.run_id if listing_run else 0
    unknown = [r.why_not_through() for r in migrations if r.run_id > since and not r.went_through]
    if listing_run is None:
        unknown.insert(0, "no migrate run went through the dataset's source listing yet (the objects counted are "
                          "those the state has rows of)")
    tally = _Tally(examples)
    with engine.connect() as conn:
        expected = _expected(conn, dataset, listing_run, prefix)
        query = _with_newest_rows(expected, dataset, since)
        result = conn.execution_options(stream_results=True, yield_per=5000).execute(query)
        for row in result.mappings():
            category, reason = classify(row, since)
            tally.add(category, row["key"], int(row["size"]), reason)
        kept, deleted = _removed(conn, dataset, expected, prefix) if listing_run else (0, 0)
    if listing_run is not None and not prefix and listing_run.objects is not None:
        # The CLI counts what it listed; a listed object the store could not record has no row.
        missing = listing_run.objects - tally.total
        if missing > 0:
            tally.add(NEVER_ATTEMPTED, f"({missing:,} object(s) whose keys the state does not hold)", 0,
                      f"listed by run {listing_run.run_id}, but their rows were never written (the state store "
                      "failed as they were recorded)", objects=missing)
    return DatasetStatus(dataset, prefix, listing_run, tuple(unknown), tally.counts(), kept, deleted,
                         migrations[0] if migrations else None,
                         next((r for r in history if r.command == "verify"), None))


def classify(row: Mapping[str, Any], since: int) -> tuple[str, str]:
    """(category, reason) of one expected object from its newest rows: `n_*` the newest row since
    run `since` (None: no row), `c_*` the newest claim of any run (None: none); `etag`/`size` are
    the listed version."""
    state, claim = row["n_state"], row["c_state"]
    older = (f"; an older version is at the destination (copied in run {row['c_run']})"
             if claim in COPIED and row["c_run"] != row["n_run"] else "")
    if state is None:
        if claim in COPIED and row["c_etag"] == row["etag"] and row["c_size"] == row["size"]:
            return (VERIFIED_COPY if claim == VERIFIED else COPIED_COPY), f"copied in run {row['c_run']}"
        return NEVER_ATTEMPTED, f"listed by run {since}, but no run since tried to copy it" + older
    if state == VERIFIED:
        return VERIFIED_COPY, f"copied in run {row['n_run']}, verified"
    if state == UPLOADED:
        return COPIED_COPY, f"copied in run {row['n_run']}, not verified yet"
    if state == UNCHANGED:  # restates the copy the run compared against: the newest claim says how it stands
        if claim == VERIFIED:
            return VERIFIED_COPY, f"copied in run {row['c_run']}, verified"
        if claim == UPLOADED:
            return COPIED_COPY, f"copied in run {row['c_run']}, not verified yet"
        if claim == FAILED:
            return FOUND_WRONG, f"{row['c_reason']} (run `exitplan migrate` to copy it again)"
        return NEVER_ATTEMPTED, (f"run {row['n_run']} found it unchanged, but no copy of it is at the destination"
                                 + (f" (deleted in run {row['c_run']})" if claim == REMOVED else ""))
    if state == FAILED:
        reason = row["n_reason"] or "no reason recorded"
        if reason.startswith(VERIFY_REASON):
            return FOUND_WRONG, f"{reason} (run `exitplan migrate` to copy it again)"
        if row["n_started"] is None:
            return FAILED_PERMANENT, f"refused in run {row['n_run']}: {reason}" + older
        if row["n_transient"] is False:
            return FAILED_PERMANENT, f"failed in run {row['n_run']}: {reason}" + older
        return FAILED_TRANSIENT, f"failed in run {row['n_run']}: {reason}" + older
    if state == CHANGED:
        return PENDING_COPY, (f"changed at the source while run {row['n_run']} copied it, and that run ended or was "
                              "killed before the new version was copied" + older)
    if state in (IN_PROGRESS, PENDING):
        return PENDING_COPY, f"in progress in run {row['n_run']}, which ended or was killed before it finished" + older
    return NEVER_ATTEMPTED, f"its newest row says {state!r} (run {row['n_run']})" + older


class _Tally:
    """Counts, bytes and the first `examples` objects per category, as the rows stream by."""

    def __init__(self, examples: int):
        self.limit = examples
        self.objects = dict.fromkeys(STATUS_CATEGORIES, 0)
        self.bytes = dict.fromkeys(STATUS_CATEGORIES, 0)
        self.examples: dict[str, list[ObjectStatus]] = {c: [] for c in STATUS_CATEGORIES}

    @property
    def total(self) -> int:
        return sum(self.objects.values())

    def add(self, category: str, key: str, size: int, reason: str, objects: int = 1) -> None:
        self.objects[category] += objects
        self.bytes[category] += size
        if category != VERIFIED_COPY and len(self.examples[category]) < self.limit:
            self.examples[category].append(ObjectStatus(key, size, category, reason))

    def counts(self) -> dict[str, StatusCount]:
        return {c: StatusCount(self.objects[c], self.bytes[c], tuple(self.examples[c])) for c in STATUS_CATEGORIES}


def _expected(conn, dataset: str, listing_run: RunDataset | None, prefix: str) -> sa.Subquery:
    """(key, etag, size, ord) of every expected object: the listing run's `listing` rows, or its
    own rows (the CLI's); without a listing, the newest row of every key the state holds."""
    o, l = objects, listing
    if listing_run is not None:
        run_id = listing_run.run_id
        listed = conn.execute(sa.select(l.c.seq).where(l.c.run_id == run_id, l.c.dataset == dataset).limit(1)).first()
        if listed is not None:
            where = [l.c.run_id == run_id, l.c.dataset == dataset]
            if prefix:
                where.append(l.c.source_key.startswith(prefix, autoescape=True))
            return (sa.select(l.c.source_key.label("key"), l.c.etag.label("etag"), l.c.size.label("size"),
                              l.c.seq.label("ord")).where(*where).subquery("expected"))
        where = [o.c.run_id == run_id, o.c.dataset == dataset, o.c.state != REMOVED]
    else:
        newest = (sa.select(sa.func.max(o.c.id).label("id")).where(o.c.dataset == dataset, o.c.state != REMOVED)
                  .group_by(o.c.source_key).subquery("newest"))
        where = [o.c.id.in_(sa.select(newest.c.id))]
    if prefix:
        where.append(o.c.source_key.startswith(prefix, autoescape=True))
    return (sa.select(o.c.source_key.label("key"), o.c.source_etag.label("etag"), o.c.size.label("size"),
                      o.c.id.label("ord")).where(*where).subquery("expected"))


def _claims(dataset: str) -> sa.Subquery:
    """Per key, the id of its newest claim: the newest row saying what the destination holds
    (a copy, uploaded or verified; a copy a verify found wrong; a copy deleted on purpose)."""
    o = objects
    claim = sa.or_(o.c.state.in_(COPIED + (REMOVED,)), sa.and_(o.c.state == FAILED, o.c.reason.like(VERIFY_REASON + "%")))
    return (sa.select(o.c.source_key.label("key"), sa.func.max(o.c.id).label("id"))
            .where(o.c.dataset == dataset, claim).group_by(o.c.source_key).subquery("claims"))


def _with_newest_rows(expected: sa.Subquery, dataset: str, since: int) -> sa.Select:
    """The expected objects in listing order, each with its newest row since run `since` (`n_*`)
    and its newest claim (`c_*`)."""
    o = objects
    current = (sa.select(o.c.source_key.label("key"), sa.func.max(o.c.id).label("id"))
               .where(o.c.dataset == dataset, o.c.run_id >= since).group_by(o.c.source_key).subquery("current"))
    claims = _claims(dataset)
    n, c = o.alias("n"), o.alias("c")
    return (sa.select(expected.c.key, expected.c.etag, expected.c.size,
                      n.c.state.label("n_state"), n.c.run_id.label("n_run"), n.c.reason.label("n_reason"),
                      n.c.started_at.label("n_started"), n.c.transient.label("n_transient"),
                      c.c.state.label("c_state"), c.c.run_id.label("c_run"), c.c.source_etag.label("c_etag"),
                      c.c.size.label("c_size"), c.c.reason.label("c_reason"))
            .select_from(expected.outerjoin(current, current.c.key == expected.c.key)
                         .outerjoin(n, n.c.id == current.c.id)
                         .outerjoin(claims, claims.c.key == expected.c.key)
                         .outerjoin(c, c.c.id == claims.c.id))
            .order_by(expected.c.ord))


def _removed(conn, dataset: str, expected: sa.Subquery, prefix: str) -> tuple[int, int]:
    """(kept, deleted): keys not expected whose newest claim is a copy still at the destination,
    or a copy deleted because the object was gone from the source."""
    o = objects
    claims = _claims(dataset)
    where = [claims.c.key.not_in(sa.select(expected.c.key))]
    if prefix:
        where.append(claims.c.key.startswith(prefix, autoescape=True))
    query = (sa.select(o.c.state, sa.func.count()).join_from(claims, o, o.c.id == claims.c.id)
             .where(*where).group_by(o.c.state))
    counts = {state: int(n) for state, n in conn.execute(query)}
    deleted = counts.pop(REMOVED, 0)
    return sum(counts.values()), deleted
