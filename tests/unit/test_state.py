"""The state store: SQLite in WAL mode, runs, objects and their allowed transitions."""

from __future__ import annotations

import threading
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from connectors.base import ContentSettings, ObjectMeta
from engine import state as st
from engine.state import InvalidTransition, StateStore


@pytest.fixture
def store(tmp_path):
    s = StateStore(tmp_path / ".exitplan" / "state.db")
    yield s
    s.close()


def test_creates_the_directory_and_uses_wal(tmp_path, store):
    assert (tmp_path / ".exitplan" / "state.db").exists()
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


def test_a_run_records_its_command_and_totals(store):
    run = store.start_run("migrate", "/etc/exitplan/prod.yaml", dry_run=False)
    assert store.get_run(run).status == "running"
    store.add_run_totals(run, objects_total=3, objects_ok=2, bytes_sent=100)
    store.add_run_totals(run, objects_total=1, objects_failed=1)
    store.finish_run(run, "failed")
    r = store.get_run(run)
    assert (r.command, r.config_path, r.dry_run, r.status) == ("migrate", "/etc/exitplan/prod.yaml", False, "failed")
    assert (r.objects_total, r.objects_ok, r.objects_failed, r.bytes_sent) == (4, 2, 1, 100)
    assert r.finished_at is not None and r.finished_at >= r.started_at
    with pytest.raises(ValueError, match="unknown run totals"):
        store.finish_run(run, "ok", objects_lost=1)


def test_an_object_moves_along_the_happy_path_with_its_fields(store):
    run = store.start_run("migrate")
    oid = store.add_object(run, "claims", "a/b.parquet", "0x1", 10, dest_key="x/a/b.parquet", source_md5=b"\x01" * 16)
    rec = store.get_object(oid)
    assert rec.state == st.PENDING and rec.source_md5 == "01" * 16 and rec.started_at is None
    store.transition(oid, st.IN_PROGRESS, part_count=1, output_size=10)
    assert store.get_object(oid).started_at is not None
    store.transition(oid, st.UPLOADED, sha256="ab" * 32, dest_etag="e", md5_checked=True)
    store.transition(oid, st.VERIFIED)
    rec = store.get_object(oid)
    assert (rec.state, rec.sha256, rec.dest_etag, rec.md5_checked, rec.part_count) == (
        st.VERIFIED, "ab" * 32, "e", True, 1)
    assert rec.finished_at is not None


@pytest.mark.parametrize("path,bad", [
    ([], st.UPLOADED),                       # pending -> uploaded skips in_progress
    ([], st.VERIFIED),
    ([st.IN_PROGRESS], st.VERIFIED),         # not uploaded yet
    ([st.UNCHANGED], st.IN_PROGRESS),        # unchanged is final
    ([st.IN_PROGRESS, st.UPLOADED], st.IN_PROGRESS),
])
def test_transitions_outside_the_table_are_refused(store, path, bad):
    run = store.start_run("migrate")
    oid = store.add_object(run, "d", "k", "0x1", 1)
    for state in path:
        store.transition(oid, state)
    with pytest.raises(InvalidTransition, match=f"cannot go from '{(path or [st.PENDING])[-1]}' to '{bad}'"):
        store.transition(oid, bad)
    assert store.get_object(oid).state == (path or [st.PENDING])[-1]


def test_a_changed_source_goes_round_through_changed(store):
    run = store.start_run("migrate")
    oid = store.add_object(run, "d", "k", "0x1", 1)
    store.transition(oid, st.IN_PROGRESS)
    store.transition(oid, st.CHANGED, source_etag="0x2", size=2)
    store.transition(oid, st.IN_PROGRESS, restarts=1)
    store.transition(oid, st.UPLOADED)
    rec = store.get_object(oid)
    assert (rec.source_etag, rec.size, rec.restarts) == ("0x2", 2, 1)


def test_the_transition_table_names_only_known_states():
    assert set(st.TRANSITIONS) == set(st.STATES)
    for targets in st.TRANSITIONS.values():
        assert targets <= set(st.STATES)
    with pytest.raises(ValueError):
        StateStore.transition(None, 1, "teleported")  # checked before touching the database


def test_only_one_of_two_racing_transitions_wins(store):
    run = store.start_run("migrate")
    oid = store.add_object(run, "d", "k", "0x1", 1)
    store.transition(oid, st.IN_PROGRESS)
    results = []

    def go(target):
        try:
            store.transition(oid, target)
            results.append(target)
        except InvalidTransition:
            results.append("refused")

    threads = [threading.Thread(target=go, args=(t,)) for t in (st.UPLOADED, st.UPLOADED)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["refused", st.UPLOADED]


def test_last_copy_is_the_newest_uploaded_or_verified_row_across_runs(store):
    r1 = store.start_run("migrate")
    a = store.add_object(r1, "d", "k", "0x1", 1, dest_key="x/k")
    store.transition(a, st.IN_PROGRESS)
    store.transition(a, st.UPLOADED)
    r2 = store.start_run("migrate")
    b = store.add_object(r2, "d", "k", "0x2", 2, dest_key="x/k")
    store.transition(b, st.IN_PROGRESS)
    store.transition(b, st.FAILED, reason="boom")
    assert store.last_copy("d", "k").id == a  # the failed newer row does not count
    r3 = store.start_run("migrate")
    c = store.add_object(r3, "d", "k", "0x2", 2, dest_key="x/k")
    store.transition(c, st.IN_PROGRESS)
    store.transition(c, st.UPLOADED)
    assert store.last_copy("d", "k").id == c
    assert store.last_copy("other", "k") is None


def test_current_copies_finds_every_key_whatever_its_characters_and_however_many(store):
    hard = ['a"b', "a\\b", "é/ü/名前", "tab\tnew\nline", "[1,2]", "' OR 1=1 --", "x" * 1024]
    nul = ["nul\x00after", "nul"]  # json_each would end the first at its NUL, making it the second
    many = [f"k/{i:05}" for i in range(40_000)]  # more keys than SQLite has bind variables
    run = store.start_run("migrate")
    for key in hard + nul + many[::997]:
        oid = store.add_object(run, "d", key, "0x1", 1, dest_key="x/" + key, state=st.IN_PROGRESS)
        store.transition(oid, st.UPLOADED)
    store.add_object(run, "d", "pending-only", "0x1", 1, dest_key="x/pending-only")
    copies = store.current_copies("d", hard + many + ["pending-only", "absent"])
    assert sorted(copies) == sorted(hard + many[::997])
    assert all(copy.source_key == key for key, copy in copies.items())
    assert store.current_copies("other", hard) == {}
    copies = store.current_copies("d", nul + ["nul\x00other"])
    assert sorted(copies) == sorted(nul) and all(copy.source_key == key for key, copy in copies.items())


def test_verify_expects_each_keys_newest_claim_in_destination_key_byte_order(store):
    run = store.start_run("migrate")

    def copied(key: str, dest_key: str, then: str | None = None, **fields) -> int:
        oid = store.add_object(run, "d", key, "0x1", 1, dest_key=dest_key, state=st.IN_PROGRESS)
        store.transition(oid, st.UPLOADED)
        if then is not None:
            store.transition(oid, then, **fields)
        return oid

    lower = copied("a", "x/a", st.FAILED, reason=st.VERIFY_REASON + "etag: expected e, found f")
    upper = copied("B", "x/B")
    copied("gone", "x/gone")
    # Its copy deleted on request by a later run: no longer expected.
    store.add_object(store.start_run("migrate"), "d", "gone", "0x1", 1, dest_key="x/gone", state=st.REMOVED)
    failed = store.add_object(run, "d", "broken", "0x1", 1, dest_key="x/broken", state=st.IN_PROGRESS)
    store.transition(failed, st.FAILED, reason="the copy failed")  # never said to be at the destination
    copied("k", "x/k")
    store.add_object(run, "other dataset", "k", "0x1", 1, dest_key="x/k", state=st.IN_PROGRESS)
    rows = list(store.expected_at_destination("d"))
    # "B" sorts before "a" in byte order (S3's listing order); a verify-failed row stays expected.
    assert [(r.id, r.dest_key) for r in rows][:2] == [(upper, "x/B"), (lower, "x/a")]
    assert [r.source_key for r in rows] == ["B", "a", "k"]
    assert store.count_expected_at_destination("d") == 3


def test_rows_marked_audited_are_not_offered_again(store):
    run = store.start_run("migrate")
    a = store.add_object(run, "d", "a", "0x1", 1, state=st.IN_PROGRESS)
    b = store.add_object(run, "d", "b", "0x1", 1, state=st.IN_PROGRESS)
    store.add_object(run, "d", "c", "0x1", 1, state=st.UNCHANGED)
    for oid in (a, b):
        store.transition(oid, st.UPLOADED)
    assert [r.id for r in store.unaudited("d", st.COPIED, page=1)] == [a, b]
    store.mark_audited(a, seq=7)
    assert [r.id for r in store.unaudited("d", st.COPIED)] == [b]
    assert list(store.unaudited("other", st.COPIED)) == []
    store.mark_audited(lines=[(b, 8)])
    assert list(store.unaudited("d", st.COPIED)) == []


def test_many_rows_are_marked_audited_in_one_transaction(store):
    run = store.start_run("migrate")
    ids = [store.add_object(run, "d", f"k{i}", "0x1", 1, state=st.IN_PROGRESS) for i in range(5)]
    for oid in ids:
        store.transition(oid, st.UPLOADED)
    store.mark_audited(lines=[(oid, 10 + i) for i, oid in enumerate(ids[:4])])
    assert [r.id for r in store.unaudited("d", st.COPIED)] == ids[4:]
    store.mark_audited(lines=[])  # nothing to mark: no transaction, no error


def test_objects_of_a_run_stream_across_pages_and_counts_add_up(store):
    run = store.start_run("migrate")
    # Bulk insert (the public path is one row at a time; a page boundary is what matters here).
    now = st.utcnow()
    with store.engine.begin() as conn:
        conn.execute(st.objects.insert(), [
            dict(run_id=run, dataset="d", source_key=f"k{i:05d}", source_etag="e", size=i, state=st.PENDING,
                 md5_checked=False, restarts=0, created_at=now, updated_at=now)
            for i in range(2_345)
        ])
    keys = [r.source_key for r in store.objects(run)]
    assert len(keys) == 2_345 and keys == sorted(keys)
    assert store.state_counts(run) == {st.PENDING: (2_345, sum(range(2_345)))}
    assert list(store.objects(run, state=st.FAILED)) == []


def test_state_survives_reopening(tmp_path):
    path = tmp_path / "state.db"
    with StateStore(path) as s:
        run = s.start_run("migrate")
        oid = s.add_object(run, "d", "k", "0x1", 5)
        s.transition(oid, st.IN_PROGRESS)
    with StateStore(path) as s:
        assert s.get_object(oid).state == st.IN_PROGRESS
        assert sa.inspect(s.engine).has_table("runs")


def test_an_object_can_be_recorded_straight_in_a_state_one_step_from_pending(store):
    run = store.start_run("migrate")
    a = store.add_object(run, "d", "a", "0x1", 1, state=st.IN_PROGRESS, part_count=1, output_size=1)
    b = store.add_object(run, "d", "b", "0x1", 1, state=st.UNCHANGED, reason="unchanged since run 1")
    rec_a, rec_b = store.get_object(a), store.get_object(b)
    assert (rec_a.state, rec_a.part_count) == (st.IN_PROGRESS, 1)
    assert rec_a.started_at is not None and rec_a.finished_at is None
    assert (rec_b.state, rec_b.reason) == (st.UNCHANGED, "unchanged since run 1") and rec_b.finished_at is not None
    store.transition(a, st.UPLOADED)  # and on along the table from there
    for skipping in (st.UPLOADED, st.VERIFIED, st.CHANGED):  # more than one step from pending
        with pytest.raises(InvalidTransition, match=f"cannot be recorded as '{skipping}'"):
            store.add_object(run, "d", "c", "0x1", 1, state=skipping)
    with pytest.raises(ValueError, match="unknown object fields"):
        store.add_object(run, "d", "c", "0x1", 1, colour="blue")
    assert store.state_counts(run) == {st.UPLOADED: (1, 1), st.UNCHANGED: (1, 1)}


def test_a_batch_writes_nothing_until_flushed_then_everything(store):
    run = store.start_run("migrate")
    ids = [store.add_object(run, "d", f"k{i}", "0x1", 1, state=st.IN_PROGRESS) for i in range(5)]
    told = []
    batch = store.batch(max_rows=100, max_age=3600)
    for i, oid in enumerate(ids):
        batch.transition(oid, st.UPLOADED, sha256=f"{i:064x}", on_written=told.append)
    batch.add_object(run, "d", "refused", "0x1", 7, state=st.FAILED, reason="too big", on_written=told.append)
    assert len(batch) == 6 and told == []
    assert store.state_counts(run) == {st.IN_PROGRESS: (5, 5)}  # queued, not written
    batch.flush()
    assert told == [None] * 6 and len(batch) == 0
    assert store.state_counts(run) == {st.UPLOADED: (5, 5), st.FAILED: (1, 7)}
    assert [store.get_object(oid).sha256 for oid in ids] == [f"{i:064x}" for i in range(5)]
    assert all(store.get_object(oid).finished_at is not None for oid in ids)
    batch.flush()  # nothing queued: nothing happens
    assert told == [None] * 6


def test_a_batch_flushes_when_it_is_full_or_old_enough(store):
    run = store.start_run("migrate")
    ids = [store.add_object(run, "d", f"k{i}", "0x1", 1, state=st.IN_PROGRESS) for i in range(4)]
    full = store.batch(max_rows=3, max_age=3600)
    for oid in ids[:2]:
        full.transition(oid, st.UPLOADED, on_written=lambda e: None)
    assert store.state_counts(run)[st.IN_PROGRESS][0] == 4
    full.transition(ids[2], st.UPLOADED, on_written=lambda e: None)  # the third: written now
    assert store.state_counts(run) == {st.UPLOADED: (3, 3), st.IN_PROGRESS: (1, 1)}
    old = store.batch(max_rows=100, max_age=0)
    old.transition(ids[3], st.UPLOADED, on_written=lambda e: None)
    assert store.state_counts(run) == {st.UPLOADED: (4, 4)}


def test_a_batch_tells_which_transitions_the_table_refused_and_writes_the_others(store):
    run = store.start_run("migrate")
    ids = [store.add_object(run, "d", f"k{i}", "0x1", 1, state=st.IN_PROGRESS) for i in range(4)]
    store.transition(ids[1], st.FAILED, reason="moved by someone else")
    told = {}
    with store.batch(max_rows=100, max_age=3600) as batch:
        for oid in ids:
            batch.transition(oid, st.UPLOADED, on_written=lambda e, oid=oid: told.setdefault(oid, e))
    assert [told[oid] is None for oid in ids] == [True, False, True, True]
    assert isinstance(told[ids[1]], InvalidTransition) and "cannot go from 'failed' to 'uploaded'" in str(told[ids[1]])
    assert [store.get_object(oid).state for oid in ids] == [st.UPLOADED, st.FAILED, st.UPLOADED, st.UPLOADED]
    with pytest.raises(ValueError, match="unknown object state"):
        batch.transition(ids[0], "teleported", on_written=lambda e: None)  # checked when queued


def test_a_batch_the_database_refuses_is_written_not_at_all_and_every_write_is_told(store):
    run = store.start_run("migrate")
    oid = store.add_object(run, "d", "k", "0x1", 1, state=st.IN_PROGRESS)
    store.add_object(run, "d", "taken", "0x1", 1)
    told = []
    batch = store.batch(max_rows=100, max_age=3600)
    batch.transition(oid, st.UPLOADED, on_written=told.append)
    batch.add_object(run, "d", "taken", "0x1", 1, state=st.FAILED, on_written=told.append)  # unique (run, key)
    batch.flush()  # never raises: the callbacks hear it
    assert len(told) == 2 and all(isinstance(e, sa.exc.IntegrityError) for e in told)
    assert store.get_object(oid).state == st.IN_PROGRESS  # one transaction: the good write is not half-done


def test_the_store_reopens_its_writer_after_close(tmp_path):
    with StateStore(tmp_path / "state.db") as s:
        run = s.start_run("migrate")
        oid = s.add_object(run, "d", "k", "0x1", 5, state=st.IN_PROGRESS)
    s.transition(oid, st.UPLOADED)  # a write after close opens a new connection
    assert s.get_object(oid).state == st.UPLOADED
    s.close()


def test_the_direct_insert_stores_what_sqlalchemy_stores(tmp_path, store):
    # On SQLite `add_object` runs its insert on the DBAPI connection; a store without that path
    # (as on PostgreSQL) inserts through SQLAlchemy. The same calls read back the same rows.
    assert store._direct_insert is not None
    core = StateStore(tmp_path / "core.db")
    core._direct_insert = None
    try:
        rows = []
        for s in (store, core):
            run = s.start_run("migrate")
            ids = [s.add_object(run, "ds", "a/b é", "0x8D", 5, dest_key="x/a/b é", source_md5=bytes(range(16)),
                                state=st.IN_PROGRESS, restarts=2, transient=True, upload_id="u-1", key_id=7),
                   s.add_object(run, "ds", "c", "e2", 0),
                   s.add_object(run, "ds", "d", "e3", 9, state=st.FAILED, reason="refused", transient=False,
                                etag_checked=True)]
            s.transition(ids[0], st.UPLOADED, sha256="ab" * 32, dest_etag="d1", output_size=5, md5_checked=True)
            with s.engine.connect() as conn:
                raw = conn.exec_driver_sql("SELECT * FROM objects ORDER BY id").all()
            records = [s.get_object(i) for i in ids]
            rows.append((raw, records))
        (raw_direct, direct), (raw_core, via_core) = rows
        times = {"created_at", "started_at", "finished_at", "updated_at"}
        # Same column values (times compared by form: SQLite keeps them as text), same records.
        for a, b in zip(raw_direct, raw_core, strict=True):
            assert len(a) == len(b)
            for name, x, y in zip(a._fields, a, b):
                if name in times:
                    assert (x is None) == (y is None) and (x is None or len(x) == len(y)), name
                else:
                    assert x == y, name
        for a, b in zip(direct, via_core, strict=True):
            assert {k: v for k, v in a.__dict__.items() if k not in times} == \
                   {k: v for k, v in b.__dict__.items() if k not in times}
            assert type(a.created_at) is type(b.created_at)
    finally:
        core.close()


def test_listing_rows_inserted_directly_are_what_sqlalchemy_stores(tmp_path, store):
    # On SQLite a listing's pages are one executemany of the compiled insert; a store without that
    # path (as on PostgreSQL) inserts them through SQLAlchemy. Same rows, same objects read back.
    assert store._direct_listing is not None
    core = StateStore(tmp_path / "core.db")
    core._direct_listing = None
    paris = timezone(timedelta(hours=1))
    metas = [ObjectMeta("a/é 1.csv", 10, "0x8D", content_md5=bytes(range(16)),
                        last_modified=datetime(2026, 11, 29, 10, 0, 0, 123456, tzinfo=paris), tier="Cool",
                        content=ContentSettings(content_type="text/csv", cache_control="no-cache"),
                        metadata={"Kind": "claims", "n": "1"}, tags={"team": "a b"},
                        created=datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc), kind="block"),
             ObjectMeta("b", 0, "e2"),
             ObjectMeta("c", 5, "e3", snapshot="2026-11-29T10:00:00.0000000Z", current_version=False,
                        version_id="v1", not_copyable="a snapshot", rehydrating="rehydrate-pending-to-hot",
                        last_modified=datetime(2026, 11, 29, 10, 0))]
    try:
        got = []
        for s in (store, core):
            run = s.start_run("migrate")
            s.record_listing(run, "ds", [(0, metas[0]), (1, metas[1])])
            (part,) = s.start_listing_ranges(run, "ds", "b", [("", False)])
            s.record_listing_page(part, [(2, metas[2])], 2)
            with s.engine.connect() as conn:
                raw = conn.exec_driver_sql("SELECT * FROM listing ORDER BY seq").all()
            got.append((raw, list(s.listed(run, "ds"))))
        (raw_direct, direct), (raw_core, via_core) = got
        assert raw_direct == raw_core
        assert direct == via_core
        assert direct[0].content == metas[0].content and direct[0].tags == {"team": "a b"}
        assert direct[0].last_modified == metas[0].last_modified and direct[2].version_id == "v1"
    finally:
        core.close()


def test_a_listing_page_on_an_unwritable_state_is_state_unwritable_and_stores_nothing(store):
    # The listing's direct insert still goes through SQLAlchemy's connection: its error handling
    # names the cause, and the page and its range's new marker are one transaction.
    run = store.start_run("migrate")
    (part,) = store.start_listing_ranges(run, "ds", "b", [("", False)])
    with store._write:
        store._writer().connection.dbapi_connection.execute("PRAGMA query_only = 1")
    page = replace(part, marker="m1", objects=1, bytes=5)
    with pytest.raises(st.StateUnwritable, match="cannot be written"):
        store.record_listing_page(page, [(0, ObjectMeta("a", 5, "e1"))], 0)
    assert store.unwritable is not None
    assert list(store.listed(run, "ds")) == []
    assert [(r.marker, r.objects) for r in store.listing_ranges(run, "ds")] == [(None, 0)]


def test_a_direct_insert_the_database_refuses_raises_and_leaves_the_store_usable(store):
    run = store.start_run("migrate")
    with pytest.raises(sa.exc.IntegrityError, match="FOREIGN KEY"):
        store.add_object(run + 1, "ds", "k", "e", 1)  # no such run
    assert store.add_object(run, "ds", "k", "e", 1) > 0
    assert [r.source_key for r in store.objects(run)] == ["k"]
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM objects").scalar() == 1


def test_a_direct_insert_on_an_unwritable_state_is_state_unwritable(store):
    run = store.start_run("migrate")
    store.add_object(run, "ds", "k", "e", 1)
    with store._write:  # the writer's connection, as the direct insert uses it
        store._conn.connection.dbapi_connection.execute("PRAGMA query_only = 1")
    with pytest.raises(st.StateUnwritable, match="cannot be written"):
        store.add_object(run, "ds", "k2", "e", 1)
    assert store.unwritable is not None


def test_md5_checked_counts_the_runs_objects_whose_source_md5_was_checked(store):
    run, other = store.start_run("migrate"), store.start_run("migrate")
    a = store.add_object(run, "ds", "a", "e", 1, state=st.IN_PROGRESS)
    store.add_object(run, "ds", "b", "e", 1, state=st.IN_PROGRESS)
    store.add_object(run, "ds2", "c", "e", 1, state=st.IN_PROGRESS, md5_checked=True)
    store.add_object(other, "ds", "a", "e", 1, state=st.IN_PROGRESS, md5_checked=True)
    store.transition(a, st.UPLOADED, md5_checked=True)
    assert store.md5_checked(run) == 2
    assert store.md5_checked(other) == 1
    assert store.md5_checked(other + 1) == 0
