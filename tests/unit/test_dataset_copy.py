"""Many objects: state, summary, refusals, skips, progress, the shared budget, dry run."""

from __future__ import annotations

import hashlib
import os
import random
import threading
from functools import partial

import pytest
import sqlalchemy as sa

from connectors.base import AuthError, ContentSettings, ObjectMeta, SinkLimits, WriteMeta
from connectors.memory import MemoryStore
from engine import state as st
from engine.budget import MemoryBudget
from engine.executors import create_executors
from engine.dataset_copy import Refusal, dry_run, copy_objects, place_all, still_current
from engine.placement import DoesNotFit, place
from engine.planning import MiB
from engine.settings import TransferSettings
from engine.state import StateStore

LIMITS = SinkLimits(min_part_size=MiB, max_part_size=64 * MiB, max_parts=10_000, max_key_bytes=40)


def settings(**overrides) -> TransferSettings:
    base = dict(memory_budget=4 * MiB, part_size=MiB, small_object_cutoff=MiB, concurrency=4, object_concurrency=6,
                retry_wait_initial=0, retry_wait_max=0, part_attempts=2)
    base.update(overrides)
    return TransferSettings(**base)


class FailingSink:
    """A MemoryStore sink that refuses every write of the keys in `deny` (a permanent error)."""

    def __init__(self, store: MemoryStore, deny: set[str]):
        self.store, self.deny = store, deny
        self.limits, self.unsupported, self.label = store.limits, store.unsupported, "failing"
        self.etag_is_md5 = store.etag_is_md5
        self.behaviour = store.behaviour
        self.writes = 0

    def head(self, key):
        return self.store.head(key)

    def put(self, key, body, size, meta, md5):
        self.writes += 1
        if key in self.deny:
            raise AuthError(f"AccessDenied on {key}")
        return self.store.put(key, body, size, meta, md5)

    def open_multipart(self, key, meta):
        self.writes += 1
        if key in self.deny:
            raise AuthError(f"AccessDenied on {key}")
        return self.store.open_multipart(key, meta)

    def resume_multipart(self, key, upload_id):
        return self.store.resume_multipart(key, upload_id)

    def list_multipart_uploads(self, prefix=""):
        return self.store.list_multipart_uploads(prefix)

    def delete(self, key):
        self.store.delete(key)


@pytest.fixture
def state(tmp_path):
    s = StateStore(tmp_path / ".exitplan" / "state.db")
    yield s
    s.close()


def seed(src: MemoryStore, n: int, rng: random.Random, big_every: int = 0) -> dict[str, bytes]:
    data = {}
    for i in range(n):
        size = 3 * MiB + rng.randrange(100) if big_every and i % big_every == 0 else rng.randrange(0, 300_000)
        data[f"in/{i:04d}.bin"] = rng.randbytes(size)
        src.add(f"in/{i:04d}.bin", data[f"in/{i:04d}.bin"],
                meta=WriteMeta(ContentSettings(content_type="application/octet-stream"), {"n": str(i)}))
    return data


def placer(meta):
    return place(meta, "in/", "out", LIMITS)


def migrate(src, sink, state, run_id, cfg, *, serial=False, budget=None, progress=None, items=None, **kwargs):
    budget = budget or MemoryBudget(cfg.memory_budget)
    with create_executors(cfg.concurrency, cfg.object_concurrency, serial=serial) as ex:
        summary = copy_objects(
            "claims", src, sink, items if items is not None else place_all(src.list("in/"), placer),
            settings=cfg, budget=budget, executors=ex, state=state, run_id=run_id, progress=progress,
            progress_interval=0, **kwargs,
        )
    assert budget.in_use == 0
    return summary


def test_many_objects_are_copied_recorded_and_summarised_within_the_budget(state):
    rng = random.Random(7)
    src, dst = MemoryStore(page_size=50), MemoryStore(limits=LIMITS)
    data = seed(src, 150, rng, big_every=25)
    cfg = settings()
    budget = MemoryBudget(cfg.memory_budget)
    run = state.start_run("migrate")
    seen = []
    summary = migrate(src, dst, state, run, cfg, budget=budget, progress=seen.append)

    assert (summary.objects, summary.ok, summary.failed, summary.skipped) == (150, 150, 0, 0)
    assert summary.all_ok and summary.bytes_total == summary.bytes_copied == sum(map(len, data.values()))
    for key, body in data.items():
        dest = "out/" + key[3:]
        assert dst.data(dest) == body
        assert dst.head(dest).metadata == {"n": str(int(key[3:7]))}
    assert budget.peak <= cfg.memory_budget
    assert budget.grants >= 150
    rows = list(state.objects(run))
    assert len(rows) == 150 and {r.state for r in rows} == {st.UPLOADED}
    by_key = {r.source_key: r for r in rows}
    assert by_key["in/0001.bin"].sha256 == hashlib.sha256(data["in/0001.bin"]).hexdigest()
    assert by_key["in/0000.bin"].part_count == 4 and by_key["in/0000.bin"].md5_checked
    assert seen[-1].bytes_done == summary.bytes_copied and seen[-1].objects_done == 150
    totals = state.get_run(run)
    assert (totals.objects_total, totals.objects_ok, totals.bytes_sent) == (150, 150, summary.bytes_sent)


def test_one_failing_object_never_stops_the_others(state):
    rng = random.Random(1)
    src, store = MemoryStore(), MemoryStore(limits=LIMITS)
    seed(src, 20, rng, big_every=7)
    sink = FailingSink(store, deny={"out/0003.bin", "out/0007.bin"})
    run = state.start_run("migrate")
    summary = migrate(src, sink, state, run, settings())
    assert (summary.ok, summary.failed) == (18, 2)
    assert {k for k, _ in summary.failures} == {"in/0003.bin", "in/0007.bin"}
    assert all("AccessDenied" in reason for _, reason in summary.failures)
    failed = list(state.objects(run, state=st.FAILED))
    assert {r.source_key for r in failed} == {"in/0003.bin", "in/0007.bin"}
    assert all("AccessDenied" in r.reason for r in failed)
    assert len(store.keys()) == 18 and store.pending_uploads() == 0


def test_objects_that_do_not_fit_are_refused_with_their_reason(state):
    src, dst = MemoryStore(), MemoryStore(limits=LIMITS)
    src.add("in/ok.bin", b"fine")
    src.add("in/" + "x" * 60, b"name too long for 40 bytes")
    src.add("in/big.bin", os.urandom(2 * MiB))
    tight = SinkLimits(min_part_size=MiB, max_object_size=MiB, max_key_bytes=40)
    run = state.start_run("migrate")
    items = place_all(src.list("in/"), partial(place, source_prefix="in/", dest_prefix="out", limits=tight))
    summary = migrate(src, MemoryStore(limits=tight), state, run, settings(), items=items)
    assert (summary.ok, summary.failed, summary.refused) == (1, 2, 2)
    reasons = dict(summary.failures)
    assert "UTF-8 bytes" in reasons["in/" + "x" * 60]
    assert "maximum object size" in reasons["in/big.bin"]
    rows = {r.source_key: r for r in state.objects(run)}
    assert rows["in/big.bin"].state == st.FAILED and "maximum object size" in rows["in/big.bin"].reason
    assert dst.keys() == []


def test_place_all_turns_does_not_fit_into_a_refusal():
    src = MemoryStore()
    src.add("a", b"1")
    src.add("b", b"2")

    def picky(meta):
        if meta.key == "b":
            raise DoesNotFit("metadata name 'x y' is not a valid HTTP header name")
        return place(meta, "", "", LIMITS)

    pairs = list(place_all(src.list(), picky))
    assert pairs[1][1] == Refusal("b", "metadata name 'x y' is not a valid HTTP header name")
    assert pairs[0][1].dest_key == "a"


def test_a_copy_is_current_until_its_etag_size_key_tags_or_class_differ_and_stays_so_for_an_unreadable_source():
    many = {f"t{i}": str(i) for i in range(LIMITS.max_tags + 2)}  # more tags than the sink takes
    meta = ObjectMeta("a", 5, "0x1", tags=many)
    placed = place(meta, "", "out/", LIMITS, storage_class="STANDARD_IA")
    assert placed.write_meta.tags == {} and placed.tags_digest is not None  # kept in metadata, still compared
    copy = st.CurrentCopy(1, "a", "0x1", 5, "out/a", "e", "ab", "STANDARD_IA", placed.tags_digest)
    assert still_current(copy, meta, placed) and not still_current(copy, meta, placed, run_id=1)
    retagged = ObjectMeta("a", 5, "0x1", tags={**many, "t0": "changed"})
    assert not still_current(copy, retagged, place(retagged, "", "out/", LIMITS, storage_class="STANDARD_IA"))
    assert not still_current(copy, meta, place(meta, "", "out/", LIMITS))  # another class
    assert not still_current(copy, meta, place(meta, "", "elsewhere/", LIMITS, storage_class="STANDARD_IA"))
    assert not still_current(copy._replace(source_etag="0x2"), meta, placed)

    # A source that cannot give the object now: refused, with where it would go; its copy stands
    # while its ETag, size and key are those copied, whatever its tier now.
    archived = ObjectMeta("a", 5, "0x1", tier="Archive", tags=many, not_copyable="in the Archive tier")
    [(_, refusal)] = place_all([archived], partial(place, source_prefix="", dest_prefix="out/", limits=LIMITS))
    assert isinstance(refusal, Refusal) and refusal.placement.dest_key == "out/a"
    assert still_current(copy, archived, refusal) and not still_current(None, archived, refusal)
    assert not still_current(copy._replace(size=6), archived, refusal)
    badly_named = ObjectMeta("a" * 41, 5, "0x1", not_copyable="in the Archive tier")
    [(_, refusal)] = place_all([badly_named], partial(place, source_prefix="", dest_prefix="", limits=LIMITS))
    assert refusal == Refusal("a" * 41, "in the Archive tier")  # nowhere it could go: no copy can be current


def test_a_rerun_skips_what_is_unchanged_and_copies_what_changed(state):
    rng = random.Random(3)
    src = MemoryStore()
    sink = FailingSink(MemoryStore(limits=LIMITS), deny=set())
    seed(src, 10, rng)
    migrate(src, sink, state, state.start_run("migrate"), settings(), serial=True)
    writes = sink.writes
    src.add("in/0004.bin", b"new content")
    run2 = state.start_run("migrate")
    summary = migrate(src, sink, state, run2, settings(), serial=True)
    assert (summary.ok, summary.skipped) == (1, 9)
    assert sink.writes == writes + 1
    assert sink.store.data("out/0004.bin") == b"new content"
    counts = state.state_counts(run2)
    assert counts[st.UNCHANGED][0] == 9 and counts[st.UPLOADED][0] == 1


def test_per_object_look_ups_run_only_when_an_earlier_run_left_something(state, monkeypatch):
    """A first copy has nothing to skip against and nothing to resume: no query per object. Once
    a run copied the dataset, a re-run asks for the objects' copies again, a page of them per query
    (and skips them)."""
    calls = {"current_copies": 0, "resumable": 0}
    for name in calls:
        real = getattr(StateStore, name)

        def counted(self, *args, _real=real, _name=name):
            calls[_name] += 1
            return _real(self, *args)

        monkeypatch.setattr(StateStore, name, counted)
    src = MemoryStore()
    seed(src, 12, random.Random(5))
    first = migrate(src, MemoryStore(limits=LIMITS), state, state.start_run("migrate"), settings())
    assert first.ok == 12 and calls == {"current_copies": 0, "resumable": 0}
    again = migrate(src, MemoryStore(limits=LIMITS), state, state.start_run("migrate"), settings())
    assert again.skipped == 12 and calls["current_copies"] == 1


def test_an_upload_left_open_is_looked_up_for_its_object(state):
    run = state.start_run("migrate")
    oid = state.add_object(run, "claims", "in/big.bin", "0x1", 10, state=st.IN_PROGRESS)
    assert state.earlier_work("claims", run) == (False, False)
    state.record_upload(oid, "up-1", None, None)
    assert state.earlier_work("claims", run) == (False, True)
    state.transition(oid, st.UPLOADED)
    assert state.earlier_work("claims", run) == (False, False)
    assert state.earlier_work("claims", state.start_run("migrate")) == (True, False)
    assert state.earlier_work("other", run) == (False, False)


def test_many_small_objects_share_the_budget(state):
    src, dst = MemoryStore(), MemoryStore(limits=LIMITS)
    for i in range(120):
        src.add(f"in/{i:03d}", os.urandom(400_000))
    cfg = settings(memory_budget=2 * MiB, concurrency=8, object_concurrency=16)
    budget = MemoryBudget(cfg.memory_budget)
    summary = migrate(src, dst, state, state.start_run("migrate"), cfg, budget=budget)
    assert summary.ok == 120
    assert 400_000 <= budget.peak <= 2 * MiB


def test_the_listing_is_consumed_lazily(state):
    src, dst = MemoryStore(), MemoryStore(limits=LIMITS)
    for i in range(40):
        src.add(f"in/{i:03d}", b"x" * 1000)
    pulled = 0
    ahead = []
    threads = set()

    def items():
        nonlocal pulled
        for pair in place_all(src.list("in/"), placer):
            pulled += 1
            ahead.append(pulled - len(dst.keys()))
            threads.add(threading.get_ident())
            yield pair

    cfg = settings(object_concurrency=3)
    summary = migrate(src, dst, state, state.start_run("migrate"), cfg, items=items())
    assert summary.ok == 40
    # At most the objects in flight, as many waiting for a driver, and the one being pulled are
    # ahead of the finished ones.
    assert max(ahead) <= 2 * cfg.objects_in_flight + 1
    # Read on the calling thread only: a listing may hold what belongs to its thread (an
    # inventory report's SQLite name set).
    assert threads == {threading.get_ident()}


def test_a_serial_run_is_deterministic(tmp_path):
    orders = []
    for i in range(2):
        src, dst = MemoryStore(), MemoryStore(limits=LIMITS)
        seed(src, 12, random.Random(5), big_every=4)
        with StateStore(tmp_path / f"state{i}.db") as state:
            run = state.start_run("migrate")
            progress = []
            migrate(src, dst, state, run, settings(), serial=True, progress=lambda p: progress.append(p.bytes_done))
            orders.append(([(r.source_key, r.state, r.sha256) for r in state.objects(run)], progress))
    assert orders[0] == orders[1]
    assert {s for _, s, _ in orders[0][0]} == {st.UPLOADED}
    assert orders[0][1] == sorted(orders[0][1])  # no restarts: progress only grows


def test_dry_run_reports_what_would_be_written_without_a_sink(state):
    src = MemoryStore()
    src.add("in/a", b"a" * 10)
    src.add("in/b", os.urandom(5 * MiB + 1))
    src.add("in/" + "y" * 60, b"too long")
    planned = []
    summary = dry_run("claims", place_all(src.list("in/"), placer), LIMITS, settings(), on_object=planned.append)
    assert (summary.objects, summary.refused, summary.multipart_objects) == (2, 1, 1)
    assert summary.bytes == 10 + 5 * MiB + 1 and summary.output_bytes == summary.bytes
    assert summary.parts == 1 + 6
    assert [p.dest_key for p in planned if p.action == "write"] == ["out/a", "out/b"]
    assert "UTF-8 bytes" in summary.refusals[0][1]

    # With the state of a previous run, unchanged objects are skips.
    dst = MemoryStore(limits=LIMITS)
    migrate(src, dst, state, state.start_run("migrate"), settings(), serial=True)
    again = dry_run("claims", place_all(src.list("in/"), placer), LIMITS, settings(), state=state)
    assert (again.objects, again.skipped, again.refused) == (0, 2, 1)


def test_streamed_and_buffered_objects_on_one_worker_do_not_deadlock(state):
    import threading

    src, dst = MemoryStore(), MemoryStore(limits=LIMITS)
    data = {}
    for i in range(8):
        size = 9 * MiB if i % 3 == 0 else 2 * MiB  # 8 MiB parts: streamed; one 2 MiB part: buffered
        data[f"in/{i}"] = os.urandom(size)
        src.add(f"in/{i}", data[f"in/{i}"])

    # Big objects get 8 MiB parts (above half of the 4 MiB budget); the others one part of 2 MiB, and
    # two of those fill the budget while their transfers queue behind a streamed part.
    cfg = settings(memory_budget=4 * MiB, concurrency=1, object_concurrency=4, part_size=8 * MiB)
    summary = []
    runner = threading.Thread(target=lambda: summary.append(
        migrate(src, dst, state, state.start_run("migrate"), cfg)), daemon=True)
    runner.start()
    runner.join(30)
    assert not runner.is_alive(), "the migration deadlocked"
    assert summary[0].ok == 8
    assert all(dst.data("out/" + k[3:]) == v for k, v in data.items())


# ---- batched state writes ------------------------------------------------------------------------


def mixed_source(rng: random.Random) -> MemoryStore:
    """Small objects (single PUTs), two multipart ones, one refused by name."""
    src = MemoryStore()
    seed(src, 30, rng, big_every=15)
    src.add("in/" + "z" * 60, b"a name too long for the destination")
    return src


def assert_state_matches(state, run, summary):
    counts = {k: n for k, (n, _) in state.state_counts(run).items()}
    assert counts.get(st.UPLOADED, 0) == summary.ok
    assert counts.get(st.FAILED, 0) == summary.failed
    assert counts.get(st.UNCHANGED, 0) == summary.skipped
    assert sum(counts.values()) == summary.objects


@pytest.mark.parametrize("serial", [True, False])
def test_a_normal_end_writes_every_batched_row_and_the_summary_agrees(state, serial):
    src, dst = mixed_source(random.Random(11)), MemoryStore(limits=LIMITS)
    run = state.start_run("migrate")
    with create_executors(4, 6, serial=serial) as ex:
        summary = copy_objects(  # thresholds that are never reached: only the end flushes
            "claims", src, FailingSink(dst, deny={"out/0004.bin"}), place_all(src.list("in/"), placer),
            settings=settings(), budget=MemoryBudget(4 * MiB), executors=ex, state=state, run_id=run,
            state_batch_rows=10_000, state_batch_seconds=3600)
    assert (summary.objects, summary.ok, summary.failed, summary.refused) == (31, 29, 2, 1)
    assert_state_matches(state, run, summary)
    rows = {r.source_key: r for r in state.objects(run)}
    assert "AccessDenied" in rows["in/0004.bin"].reason and "UTF-8 bytes" in rows["in/" + "z" * 60].reason
    assert rows["in/0000.bin"].part_count == 4 and rows["in/0000.bin"].state == st.UPLOADED

    src.add("in/0001.bin", b"changed")
    run2 = state.start_run("migrate")
    with create_executors(4, 6, serial=serial) as ex:
        again = copy_objects(
            "claims", src, dst, place_all(src.list("in/"), placer), settings=settings(),
            budget=MemoryBudget(4 * MiB), executors=ex, state=state, run_id=run2,
            state_batch_rows=10_000, state_batch_seconds=3600)
    assert (again.ok, again.skipped, again.failed) == (2, 28, 1)  # 0001 changed, 0004 failed before
    assert_state_matches(state, run2, again)


@pytest.mark.parametrize("serial", [True, False])
def test_a_failure_mid_dataset_still_writes_every_finished_object(state, serial):
    src, dst = mixed_source(random.Random(12)), MemoryStore(limits=LIMITS)

    def listing_that_breaks():
        for n, pair in enumerate(place_all(src.list("in/"), placer)):
            if n == 20:
                raise AuthError("the listing token expired")
            yield pair

    run = state.start_run("migrate")
    with create_executors(4, 6, serial=serial) as ex, pytest.raises(AuthError):
        copy_objects("claims", src, dst, listing_that_breaks(), settings=settings(),
                        budget=MemoryBudget(4 * MiB), executors=ex, state=state, run_id=run,
                        state_batch_rows=10_000, state_batch_seconds=3600)
    rows = list(state.objects(run))
    assert len(rows) == 20 and {r.state for r in rows} == {st.UPLOADED}  # nothing left in_progress
    assert sorted(dst.keys()) == sorted(r.dest_key for r in rows)


@pytest.mark.parametrize("serial", [True, False])
def test_a_kill_before_the_batch_is_written_only_means_copying_again(state, monkeypatch, serial):
    """A kill loses what the batch holds; the rows written before each copy say what to redo
    (with drivers, the rows written ahead of the hand-over)."""
    from engine.state import WriteBatch

    src, dst = mixed_source(random.Random(13)), MemoryStore(limits=LIMITS)
    run = state.start_run("migrate")
    with monkeypatch.context() as m:
        m.setattr(WriteBatch, "flush", lambda self: None)  # the process dies before any batch is written
        m.setattr(WriteBatch, "flush_if_due", lambda self: None)
        migrate(src, dst, state, run, settings(), serial=serial)
    rows = {r.source_key: r for r in state.objects(run)}
    # Written before their side effect: every copied object is there, in_progress at least; the
    # multipart ones (their end is written at once) are uploaded; the refused one is simply lost.
    assert len(rows) == 30 and "in/" + "z" * 60 not in rows
    assert {k for k, r in rows.items() if r.state == st.UPLOADED} == {"in/0000.bin", "in/0015.bin"}
    assert {r.state for k, r in rows.items() if k not in ("in/0000.bin", "in/0015.bin")} == {st.IN_PROGRESS}
    # The next run copies the single PUTs again (nothing says they were done), skips the multipart ones.
    run2 = state.start_run("migrate")
    summary = migrate(src, dst, state, run2, settings(), serial=True)
    assert (summary.ok, summary.skipped, summary.refused) == (28, 2, 1)
    assert_state_matches(state, run2, summary)


class RowCheckingSink(MemoryStore):
    """A sink that, as each write starts, reads the state for the row of the object written
    (`in/<name>` is written as `out/<name>`)."""

    def __init__(self, state, run, **kwargs):
        super().__init__(**kwargs)
        self.state, self.run, self.seen = state, run, {}

    def _look(self, key):
        source_key = "in/" + key.removeprefix("out/")
        self.seen[source_key] = [r.state for r in self.state.objects(self.run) if r.source_key == source_key]

    def put(self, key, body, size, meta, md5):
        self._look(key)
        return super().put(key, body, size, meta, md5)

    def open_multipart(self, key, meta):
        self._look(key)
        return super().open_multipart(key, meta)


def test_with_drivers_the_rows_are_written_ahead_together_before_any_byte_moves(state, monkeypatch):
    src = mixed_source(random.Random(21))
    run = state.start_run("migrate")
    dst = RowCheckingSink(state, run, limits=LIMITS)
    groups = []
    add_rows = StateStore.add_object_rows
    monkeypatch.setattr(StateStore, "add_object_rows", lambda self, rows: groups.append(len(rows)) or add_rows(self, rows))
    summary = migrate(src, dst, state, run, settings(object_concurrency=4))

    assert (summary.ok, summary.refused) == (30, 1)
    # every object's row was there, in_progress, when its first write started
    assert len(dst.seen) == 30 and all(seen == [st.IN_PROGRESS] for seen in dst.seen.values())
    # the rows went in groups, the first of 2 x drivers, not one each (the refills' sizes follow
    # how many places the drivers freed meanwhile: on a loaded machine, often one or two)
    assert sum(groups) == 30 and groups[0] == max(groups) == 8 and len(groups) < 30
    rows = list(state.objects(run, state=st.UPLOADED))
    assert len(rows) == 30
    for r in rows:  # the first attempt's start and plan were written with its end
        assert r.started_at is not None and r.started_at <= r.finished_at
        assert r.output_size == r.size and r.part_count >= 1
    assert_state_matches(state, run, summary)


def test_rows_that_cannot_be_written_together_are_written_as_each_copy_starts(state, monkeypatch, caplog):
    src = mixed_source(random.Random(22))
    run = state.start_run("migrate")
    dst = RowCheckingSink(state, run, limits=LIMITS)
    add_rows = StateStore.add_object_rows

    def only_one(self, rows):
        if len(rows) > 1:
            raise sa.exc.OperationalError("INSERT INTO objects", {}, Exception("database is locked"))
        return add_rows(self, rows)

    monkeypatch.setattr(StateStore, "add_object_rows", only_one)
    summary = migrate(src, dst, state, run, settings(object_concurrency=4))
    assert (summary.ok, summary.failed, summary.refused) == (30, 1, 1)
    assert all(seen == [st.IN_PROGRESS] for seen in dst.seen.values())
    assert "could not be written together (" in caplog.text and "database is locked" in caplog.text
    assert_state_matches(state, run, summary)


def test_an_object_the_planner_refuses_after_its_row_was_written_ahead_is_a_refusal(state):
    """Its row never got a start time, as a row written when the attempt starts never does: the
    status calls it refused, and a shard's retry does not try it again (`MigrationRun` retries
    failed rows that started)."""
    src = MemoryStore()
    src.add("in/small.bin", b"x" * 1000)
    src.add("in/large.bin", b"y" * 300_000)
    run = state.start_run("migrate")
    dst = MemoryStore(limits=SinkLimits(min_part_size=MiB, max_part_size=64 * MiB, max_parts=10_000,
                                        max_key_bytes=40, max_object_size=200_000))
    summary = migrate(src, dst, state, run, settings(object_concurrency=4))
    assert (summary.ok, summary.failed) == (1, 1)
    rows = {r.source_key: r for r in state.objects(run)}
    assert rows["in/large.bin"].state == st.FAILED and rows["in/large.bin"].started_at is None
    assert "over the destination's maximum object size" in rows["in/large.bin"].reason
    assert rows["in/small.bin"].state == st.UPLOADED and rows["in/small.bin"].started_at is not None


def test_rows_the_store_cannot_write_are_failures_in_the_summary(state, monkeypatch):
    src, dst = mixed_source(random.Random(14)), MemoryStore(limits=LIMITS)

    def broken(self, inserts, updates):
        raise sa.exc.OperationalError("UPDATE objects", {}, Exception("disk I/O error"))

    monkeypatch.setattr(StateStore, "_write_batch", broken)
    run = state.start_run("migrate")
    summary = migrate(src, dst, state, run, settings())
    # The multipart ones were written at once; the batched ends of the others were lost and say so.
    assert (summary.objects, summary.ok, summary.failed, summary.refused) == (31, 2, 29, 1)
    assert summary.bytes_copied == sum(r.size for r in state.objects(run, state=st.UPLOADED))
    reasons = dict(summary.failures)
    assert len(reasons) == 29 and all("disk I/O error" in r for r in reasons.values())
    assert "UTF-8 bytes" in reasons["in/" + "z" * 60]  # the refusal keeps its own reason too
    assert {k: n for k, (n, _) in state.state_counts(run).items()} == {st.UPLOADED: 2, st.IN_PROGRESS: 28}


@pytest.mark.parametrize("serial", [True, False])
def test_an_exception_escaping_an_objects_task_fails_that_object_and_is_counted(state, serial, monkeypatch):
    """The object pool never drops a task's exception: one raised before the copy started (its
    state events could not be made) and one that is not an `Exception` at all each fail their
    object, named, and the summary still adds up."""
    import engine.dataset_copy as migrate_module

    class WorkerStopped(BaseException):
        pass

    real_copy, real_events = migrate_module.copy_object, migrate_module._StateEvents

    def copy(source, sink, meta, placement, **kwargs):
        if meta.key == "in/0003.bin":
            raise WorkerStopped("the worker was told to stop")
        return real_copy(source, sink, meta, placement, **kwargs)

    class Events(real_events):
        def __init__(self, store, batch, run_id, dataset, placement, tally):
            if placement.dest_key == "out/0005.bin":
                raise RuntimeError("the state store connection is closed")
            super().__init__(store, batch, run_id, dataset, placement, tally)

    monkeypatch.setattr(migrate_module, "copy_object", copy)
    monkeypatch.setattr(migrate_module, "_StateEvents", Events)
    src, dst = MemoryStore(), MemoryStore(limits=LIMITS)
    seed(src, 12, random.Random(5))
    run = state.start_run("migrate")
    summary = migrate(src, dst, state, run, settings(), serial=serial)
    assert (summary.objects, summary.ok, summary.failed) == (12, 10, 2)
    reasons = dict(summary.failures)
    assert "WorkerStopped: the worker was told to stop" in reasons["in/0003.bin"]
    assert "RuntimeError: the state store connection is closed" in reasons["in/0005.bin"]
    assert sorted(dst.keys()) == sorted(f"out/{i:04d}.bin" for i in range(12) if i not in (3, 5))


def test_an_object_that_would_land_among_exitplans_own_files_is_refused_by_name(state):
    """With an empty `dest_prefix`, a blob named `_exitplan/<project>/keyset` would replace the
    project's keyset copy; restore and verify pass over that area, so it would also vanish there."""
    src = MemoryStore()
    src.add("_exitplan/claims/keyset", b"not a keyset")
    src.add("_exitplanish.txt", b"fine: not below the directory")
    src.add("data/a.bin", b"fine")
    limits = SinkLimits(min_part_size=MiB)
    run = state.start_run("migrate")
    items = place_all(src.list(""), partial(place, source_prefix="", dest_prefix="", limits=limits))
    dst = MemoryStore(limits=limits)
    summary = migrate(src, dst, state, run, settings(), items=items)
    assert (summary.ok, summary.failed, summary.refused) == (2, 1, 1)
    assert "falls under _exitplan/, where exitplan keeps its own files" in dict(summary.failures)["_exitplan/claims/keyset"]
    assert sorted(dst.keys()) == ["_exitplanish.txt", "data/a.bin"]
    moved = place(src.head("_exitplan/claims/keyset"), "", "backup/", limits)  # below a prefix: fine
    assert moved.dest_key == "backup/_exitplan/claims/keyset"


def test_a_single_put_whose_source_changes_has_its_row_written_with_the_change(state):
    """A single PUT whose source changes under it is recorded as changed, restarts from the new
    version and ends uploaded with one restart, in one row."""
    from tests.unit.test_pipeline import FaultySource

    src, dst = MemoryStore(), MemoryStore(limits=LIMITS)
    src.add("in/a.bin", b"old bytes")
    src.add("in/b.bin", b"never changes")
    items = list(place_all(src.list("in/"), placer))

    def rewrite(call, key, start, end):
        if key == "in/a.bin" and call == 1:
            src.add("in/a.bin", b"new bytes, longer")

    run = state.start_run("migrate")
    summary = migrate(FaultySource(src, before_read=rewrite), dst, state, run, settings(), serial=True, items=items)
    assert (summary.ok, summary.failed, summary.restarts) == (2, 0, 1)
    rows = {r.source_key: r for r in state.objects(run)}
    assert len(rows) == 2 and {r.state for r in rows.values()} == {st.UPLOADED}
    a, b = rows["in/a.bin"], rows["in/b.bin"]
    assert (a.restarts, a.source_etag, a.size) == (1, src.head("in/a.bin").etag, len(b"new bytes, longer"))
    assert dst.data("out/a.bin") == b"new bytes, longer"
    assert a.started_at is not None and b.started_at is not None and b.started_at <= b.finished_at
    assert b.restarts == 0 and b.sha256 == hashlib.sha256(b"never changes").hexdigest()


def test_an_interrupt_stops_the_drivers_once_the_objects_they_hold_are_done(state):
    """Ctrl-C while the drivers copy: no object starts after it, those in flight end and are recorded.

    The KeyboardInterrupt is raised where Ctrl-C meets the main thread, on the thread reading the
    listing, once 20 objects are sent: raised by the listing itself rather than by a signal, whose
    arrival in the main thread a loaded test process does not time."""
    import time

    src = MemoryStore()
    for i in range(300):
        src.add(f"in/{i:03d}", b"x" * 100)
    sent = []
    counting = threading.Lock()

    class Slow(MemoryStore):
        def put(self, key, *args, **kwargs):
            time.sleep(0.002)  # a request's wait (the GIL released)
            etag = super().put(key, *args, **kwargs)
            with counting:
                sent.append(key)
            return etag

    at_interrupt = []

    def listing():
        for item in place_all(src.list("in/"), placer):
            with counting:
                if len(sent) >= 20:
                    at_interrupt.append(len(sent))
                    raise KeyboardInterrupt
            yield item

    dst = Slow(limits=LIMITS)
    run = state.start_run("migrate")
    cfg = settings(object_concurrency=4)
    with pytest.raises(KeyboardInterrupt):
        migrate(src, dst, state, run, cfg, items=listing())
    # The objects queued for the drivers are dropped: only those a driver held go on (without the
    # drop, up to twice as many; without the drivers stopping, all 300).
    assert len(sent) - at_interrupt[0] <= cfg.objects_in_flight
    rows = list(state.objects(run))
    assert sorted(r.dest_key for r in rows) == sorted(dst.keys()) and {r.state for r in rows} == {st.UPLOADED}


def test_a_driver_failing_of_itself_stops_the_copy_with_its_error_instead_of_hanging(state, monkeypatch):
    """A defect in a driver (here: counting an escaped exception fails) ends the hand-off: the
    reader hands nothing more to drivers that are gone, and the error is the dataset's."""
    import engine.dataset_copy as dc

    class Escaping(BaseException):
        pass

    class Broken(MemoryStore):
        def put(self, *args, **kwargs):
            raise Escaping("not an Exception: it escapes the object's own handling")

    def defect(*_args, **_kwargs):
        raise RuntimeError("a defect while counting the object")

    monkeypatch.setattr(dc, "_internal_error", defect)
    src = MemoryStore()
    for i in range(300):
        src.add(f"in/{i:03d}", b"x" * 100)
    run = state.start_run("migrate")
    outcome = []

    def go():
        try:
            migrate(src, Broken(limits=LIMITS), state, run, settings(object_concurrency=4))
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=go, daemon=True)
    worker.start()
    worker.join(20)
    assert not worker.is_alive(), "the copy hung once its drivers were gone"
    assert isinstance(outcome[0], RuntimeError) and "a defect while counting" in str(outcome[0])
