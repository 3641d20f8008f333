"""Shards: cutting a listing, sharing a provider's connections, storing the listing, reading a shard
back, a shard's figures from its rows, and how its task ended."""

from __future__ import annotations

from datetime import datetime, timezone

from connectors.base import ContentSettings, ObjectMeta
from engine import state as st
from config.models import OrchestrationConfig
from engine.run import summary_from_rows
from engine.settings import TransferSettings, within_connections
from engine.shards import ShardCutter, ShardResult, share_connections, shard_outcome
from engine.state.schema import listing_shard


def shards_of(sizes, max_bytes, max_objects):
    cutter = ShardCutter(max_bytes, max_objects)
    return [cutter.shard_of(n) for n in sizes], cutter.shards


def test_a_shard_closes_at_its_bytes_or_its_count():
    assert shards_of([], 10, 3) == ([], 0)
    assert shards_of([1, 1, 1, 1, 1, 1, 1], 100, 3) == ([0, 0, 0, 1, 1, 1, 2], 3)
    assert shards_of([4, 4, 4, 1], 10, 100) == ([0, 0, 1, 1], 2)
    # An object larger than a shard is a shard of its own; the next one starts a new shard.
    assert shards_of([1, 50, 1], 10, 100) == ([0, 1, 2], 3)
    assert shards_of([0, 0, 0], 10, 2) == ([0, 0, 1], 2)


def test_connections_are_cut_to_the_limit():
    s = TransferSettings(concurrency=8)
    assert s.requests_in_flight == 16
    assert within_connections(s, 16) is s
    cut = within_connections(s, 5)
    assert (cut.concurrency, cut.objects_in_flight, cut.requests_in_flight) == (2, 3, 5)
    assert within_connections(TransferSettings(concurrency=8, object_concurrency=2), 10).requests_in_flight == 10
    assert within_connections(s, 2).requests_in_flight == 2


def share(limits, settings=TransferSettings(concurrency=8), **orchestration):
    c = share_connections(OrchestrationConfig(**orchestration), settings, limits)
    return c.spread, c.processes, c.per_process, c.slots


def test_a_runs_connections_are_shared_between_its_shard_processes():
    # In threads of one process: the smallest limit of the run's providers caps that process.
    assert share({"lab": 64, "ovh": 4}) == (None, 0, 4, 4)
    assert share({"lab": 64}) == (None, 0, 16, 16)  # 8 transfer workers + 8 object drivers fit
    # Two shard processes under a limit of 8: 4 connections each, 8 slots taken for the run.
    assert share({"lab": 8}, shard_processes=2) == ("processes", 2, 4, 8)
    # Each process needs 2 connections: never more processes than half the limit.
    assert share({"lab": 6}, shard_processes=16) == ("processes", 3, 2, 6)
    # Worker flow runs each get their share; what fits already is not cut.
    assert share({"lab": 64}, shard_workers=3) == ("workers", 3, 16, 48)
    assert share({"lab": 64}, shard_workers=3, shard_processes=2) == ("processes", 2, 16, 32)


def meta(key: str, size: int, **kw) -> ObjectMeta:
    return ObjectMeta(key=key, size=size, etag=f"e-{key}", **kw)


def test_a_listing_round_trips_through_the_store_by_shard(store):
    run = store.start_run("migrate")
    when = datetime(2026, 11, 29, 10, 0, tzinfo=timezone.utc)
    rich = meta("a/é 1.csv", 10, content_md5=bytes(range(16)), last_modified=when, tier="Cool",
                content=ContentSettings(content_type="text/csv", cache_control="no-cache"), metadata={"k": "v"})
    store.record_listing(run, "ds", [(0, rich), (0, meta("b", 20))])
    store.record_listing(run, "ds", [(1, meta("c", 30)), (2, meta("d", 0))], start=2)
    store.record_listing(run, "other", [(0, meta("z", 5))])
    assert list(store.listed(run, "ds", 0)) == [rich, meta("b", 20)]
    assert [m.key for m in store.listed(run, "ds")] == ["a/é 1.csv", "b", "c", "d"]
    shards = store.adopt_shards(run, "ds")  # rows holding their shard numbers already
    assert [(s.shard, s.objects, s.bytes, s.first_key, s.last_key, s.status) for s in shards] == [
        (0, 2, 30, "a/é 1.csv", "b", "pending"), (1, 1, 30, "c", "c", "pending"), (2, 1, 0, "d", "d", "pending")]


def test_a_shard_defined_from_cut_shards_keeps_the_listing_order(store):
    run = store.start_run("migrate")
    store.record_listing(run, "ds", [(listing_shard(1, i), meta(f"k{i:02d}", i)) for i in range(7)])
    assert store.first_cut_undefined(run, "ds", 1) == 0 and store.first_cut_undefined(run, "ds", 0) is None
    defined = [store.define_shard(run, "ds", (listing_shard(1, first), listing_shard(1, last)), n)
               for n, (first, last) in enumerate([(0, 2), (3, 5), (6, 9)])]
    assert [(s.shard, s.objects, s.first_key, s.last_key) for s in defined] == [
        (0, 3, "k00", "k02"), (1, 3, "k03", "k05"), (2, 1, "k06", "k06")]
    assert [m.key for m in store.listed(run, "ds", 1)] == ["k03", "k04", "k05"]
    assert store.first_cut_undefined(run, "ds", 1) is None
    assert store.define_shard(run, "ds", (listing_shard(1, 10), listing_shard(1, 20)), 3) is None  # no row: no shard
    assert [s.shard for s in store.shards(run, "ds")] == [0, 1, 2]


def test_a_shards_figures_come_from_this_runs_rows(store):
    run = store.start_run("migrate")
    store.record_listing(run, "ds", [(0, meta("a", 10)), (0, meta("b", 20)), (0, meta("c", 30)), (1, meta("d", 40))])
    store.adopt_shards(run, "ds")
    a = store.add_object(run, "ds", "a", "e-a", 10, state=st.IN_PROGRESS)
    store.transition(a, st.UPLOADED, output_size=99)
    store.add_object(run, "ds", "b", "e-b", 20, state=st.UNCHANGED)
    store.add_object(run, "ds", "c", "e-c", 30, state=st.FAILED, reason="refused: too long")
    other = store.start_run("migrate")
    store.add_object(other, "ds", "c", "e-c", 30, state=st.IN_PROGRESS)  # another run's row is not counted
    counts = store.shard_counts(run, "ds", 0)
    assert counts.states == {st.UPLOADED: (1, 10), st.UNCHANGED: (1, 20), st.FAILED: (1, 30)}
    assert counts.output_bytes == 99
    assert counts.failures == (("c", "refused: too long"),)
    assert set(store.shard_rows(run, "ds", 0)) == {"a", "b", "c"}
    assert store.shard_rows(run, "ds", 1) == {}
    store.shard_started(run, "ds", 0)
    store.shard_finished(run, "ds", 0, "failed", 1.5, "1 of 3 objects failed")
    rec = store.shard(run, "ds", 0)
    assert (rec.status, rec.attempts, rec.seconds, rec.reason) == ("failed", 1, 1.5, "1 of 3 objects failed")
    summary = summary_from_rows(store, run, "ds", 2.0)
    assert (summary.objects, summary.ok, summary.skipped, summary.failed, summary.refused) == (3, 1, 1, 1, 1)
    assert (summary.bytes_total, summary.bytes_copied, summary.bytes_sent) == (60, 10, 99)
    assert summary.failures == (("c", "refused: too long"),) and summary.elapsed_seconds == 2.0


def test_objects_listed_by_a_run_are_not_removed_at_the_source(store):
    first = store.start_run("migrate")
    for key in ("a", "b"):
        oid = store.add_object(first, "ds", key, f"e-{key}", 1, dest_key=key, state=st.IN_PROGRESS)
        store.transition(oid, st.UPLOADED)
    second = store.start_run("migrate")
    store.record_listing(second, "ds", [(0, meta("a", 1))])  # listed, but its shard never ran
    assert [r.source_key for r in store.removed_at_source("ds", second)] == ["b"]


def ended(status: str, reason: str | None = None, worker: str | None = "host:1"):
    record = st.ShardRecord(run_id=1, dataset="ds", shard=0, objects=2, bytes=30, first_key="a", last_key="b",
                            status=status, attempts=1, seconds=1.0, reason=reason, started_at=None,
                            finished_at=None, worker=worker)
    result = ShardResult(1, "ds", 0, 2, 30, 1, 0, 1, 10, 10, 1.0, 1, (("b", "refused"),), False)
    asked = []
    outcome = shard_outcome(record, result, lambda: asked.append(1) or "CancelledError: cancelled")
    return outcome.status, outcome.reason, outcome.worker, outcome.went_through, len(asked)


def test_a_shard_ended_on_its_objects_or_on_an_error():
    assert ended("ok") == ("ok", "", "host:1", True, 0)
    assert ended("failed", "1 of 2 objects failed: b: refused") == (
        "failed", "1 of 2 objects failed: b: refused", "host:1", True, 0)
    # Stopped on an error: the reason recorded by the engine, else what the orchestrator saw.
    assert ended("error", "OSError: disk I/O error") == ("error", "OSError: disk I/O error", "host:1", False, 0)
    assert ended("running") == ("error", "CancelledError: cancelled", "host:1", False, 1)  # its process died
    assert ended("pending", worker=None) == ("error", "CancelledError: cancelled", "", False, 1)  # never ran
