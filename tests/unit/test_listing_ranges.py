"""A dataset listed in ranges at once into the state store (engine/listing.py): every object once,
shards within a range, a failing range named, and a killed listing resumed from each range's marker
without a request for the ranges it had finished, ending with the rows an uninterrupted one stores."""

from __future__ import annotations

import threading
import time

import pytest
import sqlalchemy as sa

from config.models import DatasetConfig
from connectors.base import ListingRange, TransientError
from connectors.memory import MemoryStore
from engine.listing import ListingStopped, RangedListing, discover_ranges
from engine.shards import ShardDefiner
from engine.state import StateStore

DS = DatasetConfig(source="az", container="c", destination="d")


def source(page_size=3) -> MemoryStore:
    """Three folders (one with subfolders) and objects at the top: 40 objects."""
    src = MemoryStore(page_size=page_size)
    for i in range(4):
        src.add(f"top{i}.txt", b"x" * i)
    for i in range(12):
        src.add(f"a/{i:02d}", b"a" * (i + 1))
        src.add(f"b/{i:02d}", b"b")
        src.add(f"c/{'dx'[i % 2]}/{i:02d}", b"cc")
    return src


def list_run(store, src, ds=DS, at_once=4, shard_objects=5):
    """One migrate run's listing of dataset `ds`; returns (run id, the listing, keys it yielded)."""
    run = store.start_run("migrate")
    store.dataset_started(run, "ds")
    listing = RangedListing(store, run, "ds", ds, src, shard_bytes=10**9, shard_objects=shard_objects,
                            at_once=at_once)
    yielded = [m.key for m in listing.objects()]
    store.dataset_through(run, "ds", listing.objects_stored, listing.bytes_stored)
    return run, listing, yielded


def rows(store, run, max_shards=1000):
    """(key, etag, size, shard) of each listed object, and the shards' extents, once every shard is defined."""
    ShardDefiner(store, run, max_shards).ready("ds")
    shards = [(s.shard, s.objects, s.first_key, s.last_key) for s in store.shards(run, "ds")]
    listed = {}
    for s, *_ in shards:
        listed.update({m.key: (m.etag, m.size, s) for m in store.listed(run, "ds", s)})
    return listed, shards


def test_the_ranges_are_the_folders_and_the_objects_directly_above_them():
    src = source()
    assert discover_ranges(src, "", 1) == [ListingRange("")]
    assert discover_ranges(src, "", 4) == [ListingRange("", direct=True), ListingRange("a/"), ListingRange("b/"),
                                           ListingRange("c/")]
    # Wanting more splits the next level too; a folder of objects only stays one range.
    assert discover_ranges(src, "", 6) == [ListingRange("", direct=True), ListingRange("a/"), ListingRange("b/"),
                                           ListingRange("c/d/"), ListingRange("c/x/")]
    assert discover_ranges(src, "a/", 4) == [ListingRange("a/")]


def test_a_listing_in_ranges_stores_every_object_once_and_no_shard_holds_two_ranges(store):
    src = source()
    run, listing, yielded = list_run(store, src)
    assert sorted(yielded) == sorted(src._objects)
    assert [r.prefix for r in listing.ranges] == ["", "a/", "b/", "c/"] and all(r.done for r in listing.ranges)
    listed, shards = rows(store, run)
    assert sorted(listed) == sorted(src._objects)
    # Shards numbered 0, 1, ... in range order; each within one range: 4 top, 12 a/, 12 b/, 12 c/ by 5.
    assert [(n, count) for n, count, *_ in shards] == [(0, 4), (1, 5), (2, 5), (3, 2), (4, 5), (5, 5), (6, 2),
                                                        (7, 5), (8, 5), (9, 2)]
    assert [(first, last) for *_, first, last in shards][:4] == [("top0.txt", "top3.txt"), ("a/00", "a/04"),
                                                                 ("a/05", "a/09"), ("a/10", "a/11")]
    # Within a shard, the listing order is the key order.
    assert [m.key for m in store.listed(run, "ds", 8)] == ["c/d/10", "c/x/01", "c/x/03", "c/x/05", "c/x/07"]


def test_shards_grow_as_the_run_defines_them_each_within_its_range(store):
    """max_shards 10: the cut shards merged by 1, 2, 4, 8, ... as the run defines shards (one
    more each time here), never across two ranges."""
    src = source()
    run, _, _ = list_run(store, src)
    _, shards = rows(store, run, max_shards=10)
    assert [(n, count, first[:2]) for n, count, first, _ in shards] == [(0, 4, "to"), (1, 10, "a/"), (2, 2, "a/"),
                                                                        (3, 12, "b/"), (4, 12, "c/")]


class Gate(MemoryStore):
    """Holds the listing of range `held` before its page `at` until `release` is set."""

    def __init__(self, held: str, at: int, **kw):
        super().__init__(**kw)
        self.held, self.at = held, at
        self.reached, self.release = threading.Event(), threading.Event()

    def list_pages(self, part, marker=None):
        for n, page in enumerate(super().list_pages(part, marker)):
            if part.prefix == self.held and n == self.at:
                self.reached.set()
                assert self.release.wait(10)
            yield page


def wait_stored(store, run):
    """Until "", a/ and b/ are done and c/ has its first two pages stored (the gate holds the third)."""
    deadline = time.monotonic() + 10
    while not all(r.done if r.prefix != "c/" else r.objects == 6 for r in store.listing_ranges(run, "ds")):
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_the_final_shards_are_defined_while_the_listing_goes_on(store):
    """Copying starts before the listing ends: a shard is defined once its range's cutter moved
    past it or the range is done, never one still filling; the ones left once it is done."""
    src = Gate("c/", 2, page_size=3)
    src._objects.update(source()._objects)
    run = store.start_run("migrate")
    store.dataset_started(run, "ds")
    listing = RangedListing(store, run, "ds", DS, src, shard_bytes=10**9, shard_objects=5, at_once=4)
    definer = ShardDefiner(store, run, 1000)
    listed: list[str] = []
    lister = threading.Thread(target=lambda: listed.extend(m.key for m in listing.objects()))
    lister.start()
    try:
        assert src.reached.wait(10)
        wait_stored(store, run)
        early = definer.ready("ds")
    finally:
        src.release.set()
        lister.join(10)
    # "", a/ and b/ are done; c/ has stored two pages (6 objects): its first cut shard of 5 is final.
    assert [(s.shard, s.objects, s.first_key) for s in early] == [
        (0, 4, "top0.txt"), (1, 5, "a/00"), (2, 5, "a/05"), (3, 2, "a/10"), (4, 5, "b/00"), (5, 5, "b/05"),
        (6, 2, "b/10"), (7, 5, "c/d/00")]
    late = definer.ready("ds")
    assert [(s.shard, s.objects) for s in late] == [(8, 5), (9, 2)] and definer.ready("ds") == []
    held = {m.key: s.shard for s in early + late for m in store.listed(run, "ds", s.shard)}
    assert sorted(held) == sorted(listed) == sorted(src._objects)


def test_a_listing_taken_over_keeps_the_shards_its_run_defined(store):
    """A run killed while it listed and copied: its defined shards are the new run's as they are
    (their objects already copied are found unchanged), the rest defined on from there."""
    src = Gate("c/", 2, page_size=3)
    src._objects.update(source()._objects)
    run = store.start_run("migrate")
    store.dataset_started(run, "ds")
    listing = RangedListing(store, run, "ds", DS, src, shard_bytes=10**9, shard_objects=5, at_once=4)
    def list_all():
        with pytest.raises(ListingStopped):
            list(listing.objects())

    lister = threading.Thread(target=list_all)
    lister.start()
    assert src.reached.wait(10)
    wait_stored(store, run)
    killed = ShardDefiner(store, run, 1000).ready("ds")
    listing.stop = threading.Event()
    listing.stop.set()  # as good as a kill here: nothing more is stored
    src.release.set()
    lister.join(10)
    store.finish_run(run, "interrupted")
    assert len(killed) == 8

    src.held = None
    resumed, listing2, yielded = list_run(store, src)
    assert listing2.taken_over == run
    listed, shards = rows(store, resumed)
    assert [s[:3] for s in shards[:8]] == [(s.shard, s.objects, s.first_key) for s in killed]
    assert [n for n, *_ in shards] == list(range(10)) and sorted(listed) == sorted(src._objects) == sorted(yielded)


def test_a_stopped_run_stops_its_listing_at_the_next_page_and_keeps_what_it_stored(store):
    src = Gate("c/", 1, page_size=3)
    src._objects.update(source()._objects)
    run = store.start_run("migrate")
    store.dataset_started(run, "ds")
    stop = threading.Event()
    listing = RangedListing(store, run, "ds", DS, src, shard_bytes=10**9, shard_objects=5, at_once=4, stop=stop)
    outcome: list[BaseException] = []

    def list_all():
        try:
            list(listing.objects())
        except ListingStopped as exc:
            outcome.append(exc)

    lister = threading.Thread(target=list_all)
    lister.start()
    assert src.reached.wait(10)
    stop.set()
    src.release.set()
    lister.join(10)
    assert [str(e) for e in outcome] == ["ds: the run stopped before the listing ended; the next run lists on from "
                                         "where it got"]
    assert not all(r.done for r in store.listing_ranges(run, "ds"))


def test_a_failing_range_fails_the_listing_naming_the_range(store):
    class Failing(MemoryStore):
        def list_pages(self, part, marker=None):
            for n, page in enumerate(super().list_pages(part, marker)):
                if part.prefix == "b/" and n == 2:
                    raise TransientError("memory: the connection was reset")
                yield page

    src = Failing(page_size=3)
    for key, stored in source()._objects.items():
        src._objects[key] = stored
    run = store.start_run("migrate")
    listing = RangedListing(store, run, "ds", DS, src, shard_bytes=10**9, shard_objects=5, at_once=4)
    with pytest.raises(TransientError, match=r"^the range 'b/': memory: the connection was reset$"):
        list(listing.objects())


class Killed(BaseException):
    """The process dies (what a kill looks like to the code after it: nothing more runs)."""


def test_a_killed_listing_goes_on_from_each_range_without_listing_a_finished_range_again(store):
    class KilledAfter(MemoryStore):
        """Dies when the listing of c/ asks for its third page (a/ and b/ done by then)."""

        def list_pages(self, part, marker=None):
            for n, page in enumerate(super().list_pages(part, marker)):
                if part.prefix == "c/" and n == 2 and kill:
                    while not all(r.done for r in listing.ranges if r.prefix in ("", "a/", "b/")):
                        pass  # the other ranges finish first, so that the test knows which are done
                    raise Killed()
                yield page

    whole = source()
    src = KilledAfter(page_size=3)
    src._objects.update(whole._objects)
    kill = True
    run = store.start_run("migrate")
    store.dataset_started(run, "ds")
    listing = RangedListing(store, run, "ds", DS, src, shard_bytes=10**9, shard_objects=5, at_once=4)
    with pytest.raises(Killed):
        list(listing.objects())
    store.finish_run(run, "interrupted")
    stopped = {r.prefix: (r.done, r.marker, r.objects) for r in store.listing_ranges(run, "ds")}
    assert stopped == {"": (True, None, 4), "a/": (True, None, 12), "b/": (True, None, 12), "c/": (False, "c/d/10", 6)}

    kill = False
    src.page_requests.clear()
    resumed, listing2, yielded = list_run(store, src)
    assert listing2.taken_over == run
    # Only c/ was listed, from its marker: no request for the ranges done before the kill.
    assert src.page_requests == [(ListingRange("c/"), "c/d/10"), (ListingRange("c/"), "c/x/05"),
                                 (ListingRange("c/"), "c/x/11")]
    assert sorted(yielded) == sorted(whole._objects)

    fresh, _, _ = list_run(store, whole)
    assert store.listing_to_resume("ds", listing2.ranges[0].basis, fresh + 1) is None  # the newest went through
    assert rows(store, resumed) == rows(store, fresh)


def test_a_listing_selecting_other_objects_is_not_taken_over(store):
    src = source()
    run = store.start_run("migrate")
    store.dataset_started(run, "ds")
    listing = RangedListing(store, run, "ds", DS, src, shard_bytes=10**9, shard_objects=5, at_once=4)
    next(iter(listing.objects()))
    store.finish_run(run, "interrupted")
    narrower = DatasetConfig(source="az", container="c", destination="d", exclude=("b/*",))
    _, listing2, yielded = list_run(store, src, ds=narrower)
    assert listing2.taken_over is None
    assert sorted(yielded) == sorted(k for k in src._objects if not k.startswith("b/"))


def test_a_state_store_of_the_previous_version_gets_the_ranges_table_and_the_shard_index(store):
    """The previous version had no `listing_ranges` and indexed a shard without its listing order."""
    with store.engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE listing_ranges"))
        conn.execute(sa.text("DROP INDEX ix_listing_shard_seq"))
        conn.execute(sa.text("DROP INDEX ix_listing_key"))
        conn.execute(sa.text("CREATE INDEX ix_listing_shard ON listing (run_id, dataset, shard)"))
    store.close()
    reopened = StateStore(store.url)
    try:
        inspector = sa.inspect(reopened.engine)
        assert {i["name"]: i["column_names"] for i in inspector.get_indexes("listing")} == {
            "ix_listing_shard_seq": ["run_id", "dataset", "shard", "seq"],
            "ix_listing_key": ["run_id", "dataset", "source_key"]}
        assert "listing_ranges" in inspector.get_table_names()
        run, _, yielded = list_run(reopened, source())
        assert len(yielded) == 40
    finally:
        reopened.close()


def test_the_copies_of_a_page_of_keys_are_what_current_copy_says_of_each(store):
    """The delta pass's look-up, a page of keys per query, answers what `current_copy` answers per
    key: the newest copy, none once that copy was deleted or found wrong by verify, none for a new key."""
    from engine import state as st

    first, second = store.start_run("migrate"), store.start_run("migrate")
    for key in ("copied", "deleted", "found-wrong", "copied-twice"):
        oid = store.add_object(first, "ds", key, "e1", 1, dest_key=key, state=st.IN_PROGRESS)
        store.transition(oid, st.UPLOADED)
    store.add_object(second, "ds", "deleted", "e1", 1, dest_key="deleted", state=st.REMOVED)
    wrong = next(r for r in store.objects(first) if r.source_key == "found-wrong")
    store.transition(wrong.id, st.FAILED, reason=st.VERIFY_REASON + "size differs")
    oid = store.add_object(second, "ds", "copied-twice", "e2", 2, dest_key="copied-twice", state=st.IN_PROGRESS)
    store.transition(oid, st.UPLOADED)
    keys = ["copied", "deleted", "found-wrong", "copied-twice", "new"]
    copies = store.current_copies("ds", keys)
    assert {k: (r.run_id, r.source_etag) for k, r in copies.items()} == {"copied": (first, "e1"),
                                                                          "copied-twice": (second, "e2")}
    fields = st.CurrentCopy._fields
    assert copies == {k: st.CurrentCopy(*(getattr(c, f) for f in fields))
                      for k in keys if (c := store.current_copy("ds", k))}


def test_the_listing_bench_runs_at_a_tiny_size(tmp_path):
    """bench/bench_listing.py's synthetic part, 2,000 objects on SQLite: kept from rotting."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "bench_listing.py"
    spec = importlib.util.spec_from_file_location("bench_listing", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.synthetic(2000, 4, str(tmp_path / "state.db"), "sqlite")
    assert [what.split(" (")[0].split(":")[0] for _, what, *_ in rows] == [
        "previous copies recorded", "listing into the state, 4 ranges", "shards fixed",
        "delta pass, one query per object", "delta pass, one query per page", "gone from the source",
        "full listing with the feed's position noted", "listing from run 3's and the change feed"]
    assert rows[4][1] == "delta pass, one query per page: 1,976 unchanged, 12 changed, 12 new"
    assert rows[5][1] == "gone from the source: 4"
    assert rows[7][1] == "listing from run 3's and the change feed (20 names listed again, 2,000 objects)"
