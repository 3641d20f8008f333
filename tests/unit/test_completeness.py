"""What a dataset must hold and how far it is (`StateStore.dataset_status`), on SQLite and on
PostgreSQL: the expected objects come from the newest run that went through the source listing,
each object gets one category from its newest rows, and a newer run that stopped mid-listing
leaves the dataset not known to be complete."""

from __future__ import annotations

from connectors.base import ObjectMeta
from engine import state as st


def copied(store, run, key, etag="e1", size=10, verified=False) -> int:
    oid = store.add_object(run, "d", key, etag, size, dest_key=f"x/{key}", state=st.IN_PROGRESS)
    store.transition(oid, st.UPLOADED, dest_etag="t", output_size=size + 40, sha256="ab" * 32)
    if verified:
        store.transition(oid, st.VERIFIED)
    return oid


def migrate_run(store, *, through: int | None = None, stopped: str | None = None) -> int:
    """A migrate run that started on dataset `d`; went through a listing of `through` objects, or stopped."""
    run = store.start_run("migrate")
    store.dataset_started(run, "d")
    if stopped:
        store.dataset_stopped(run, "d", stopped)
    return run


def through(store, run, objects, bytes_=0) -> None:
    store.dataset_through(run, "d", objects, bytes_)


def category(status, key) -> str:
    found = [c for c, n in status.counts.items() for e in n.examples if e.source_key == key]
    return found[0] if found else "?"


def reason(status, key) -> str:
    return next(e.reason for n in status.counts.values() for e in n.examples if e.source_key == key)


def test_each_listed_object_gets_one_category_from_its_newest_rows(store):
    old = migrate_run(store)
    copied(store, old, "f.txt", etag="ef")
    copied(store, old, "g.txt", etag="g-old")
    through(store, old, 2)
    run = migrate_run(store)
    copied(store, run, "a.txt", verified=True)
    copied(store, run, "b.txt")
    store.add_object(run, "d", "c" * 1100, "e1", 7, state=st.FAILED, reason="name too long", transient=False)
    oid = store.add_object(run, "d", "d.txt", "e1", 8, dest_key="x/d.txt", state=st.IN_PROGRESS)
    store.transition(oid, st.FAILED, reason="SlowDown after 5 attempts", transient=True)
    oid = store.add_object(run, "d", "e.txt", "e1", 9, dest_key="x/e.txt", state=st.IN_PROGRESS)
    store.transition(oid, st.FAILED, reason="source Content-MD5 differs", transient=False)
    store.add_object(run, "d", "h.txt", "e1", 11, dest_key="x/h.txt", state=st.IN_PROGRESS)  # a kill left it
    store.add_object(run, "d", "f.txt", "ef", 10, dest_key="x/f.txt", state=st.UNCHANGED, reason="unchanged since run 1")
    oid = store.add_object(run, "d", "g.txt", "g-new", 12, dest_key="x/g.txt", state=st.IN_PROGRESS)
    store.transition(oid, st.FAILED, reason="metadata too large", transient=False)
    through(store, run, 8)

    s = store.dataset_status("d")
    assert s.listing.run_id == run and s.known and not s.complete
    assert {c: n.objects for c, n in s.counts.items()} == {
        st.VERIFIED_COPY: 1, st.COPIED_COPY: 2, st.FAILED_PERMANENT: 3, st.FAILED_TRANSIENT: 1, st.FOUND_WRONG: 0,
        st.PENDING_COPY: 1, st.NEVER_ATTEMPTED: 0}
    assert (s.expected, s.expected_bytes, s.verified, s.never_arrived) == (8, 10 + 10 + 7 + 8 + 9 + 11 + 10 + 12, 1, 5)
    assert category(s, "b.txt") == category(s, "f.txt") == st.COPIED_COPY
    assert reason(s, "f.txt") == f"copied in run {old}, not verified yet"
    assert category(s, "c" * 1100) == st.FAILED_PERMANENT and reason(s, "c" * 1100).startswith(f"refused in run {run}")
    assert category(s, "d.txt") == st.FAILED_TRANSIENT and "SlowDown" in reason(s, "d.txt")
    assert category(s, "e.txt") == st.FAILED_PERMANENT
    assert category(s, "h.txt") == st.PENDING_COPY and "killed" in reason(s, "h.txt")
    # The newest version failed: named as failed, and the older copy at the destination is said.
    assert category(s, "g.txt") == st.FAILED_PERMANENT
    assert reason(s, "g.txt").endswith(f"an older version is at the destination (copied in run {old})")
    assert s.sentence().startswith("d: 1 of 8 objects verified; 5 never arrived (3 failed (permanent), "
                                   "1 failed (may pass), 1 pending); 2 at the destination but not verified yet")
    assert (s.last_migrate.run_id, s.last_verify) == (run, None)


def test_a_dataset_is_complete_when_every_listed_object_is_verified(store):
    run = migrate_run(store)
    for key in ("a", "b"):
        copied(store, run, key, verified=True)
    through(store, run, 2, 20)
    s = store.dataset_status("d")
    assert s.complete and s.sentence() == "d: 2 of 2 objects verified; complete"
    # A later run that stopped mid-listing leaves it in doubt: what the source holds now is not known.
    later = migrate_run(store, stopped="interrupted (Ctrl-C or a stop signal)")
    s = store.dataset_status("d")
    assert not s.complete and not s.known and s.verified == 2
    assert s.unknown == (f"run {later} (migrate, started {s.last_migrate.started_at:%Y-%m-%d %H:%M}Z) stopped before "
                         "it went through the source listing: interrupted (Ctrl-C or a stop signal)",)
    # A run killed mid-listing wrote nothing more: it is said to be running or killed.
    killed = migrate_run(store)
    assert f"run {killed} (migrate" in store.dataset_status("d").unknown[0]
    assert "still running, or was killed" in store.dataset_status("d").unknown[0]
    # The next run that goes through the listing settles it.
    last = migrate_run(store)
    for key in ("a", "b"):
        store.add_object(last, "d", key, "e1", 10, dest_key=f"x/{key}", state=st.UNCHANGED)
    through(store, last, 2)
    assert store.dataset_status("d").complete


def test_without_a_complete_listing_the_dataset_is_not_known_and_its_rows_are_counted(store):
    run = migrate_run(store)
    copied(store, run, "a", verified=True)
    store.add_object(run, "d", "b", "e1", 5, dest_key="x/b", state=st.IN_PROGRESS)
    s = store.dataset_status("d")
    assert s.listing is None and not s.known and not s.complete
    assert (s.expected, s.verified, s.count(st.PENDING_COPY).objects) == (2, 1, 1)
    assert s.unknown[0].startswith("no migrate run went through the dataset's source listing yet")
    assert "still running, or was killed" in s.unknown[1]


def test_objects_of_a_stored_listing_that_no_shard_reached_are_never_attempted(store):
    old = migrate_run(store)
    copied(store, old, "same", etag="s1", verified=True)
    copied(store, old, "changed", etag="c1")
    through(store, old, 2)
    run = migrate_run(store)
    metas = [ObjectMeta(key=k, size=10, etag=e) for k, e in
             (("same", "s1"), ("changed", "c2"), ("new", "n1"), ("done", "d1"))]
    store.record_listing(run, "d", [(0, m) for m in metas])
    through(store, run, 4, 40)
    copied(store, run, "done", etag="d1")
    s = store.dataset_status("d")
    assert category(s, "changed") == category(s, "new") == st.NEVER_ATTEMPTED
    assert reason(s, "new") == f"listed by run {run}, but no run since tried to copy it"
    assert reason(s, "changed").endswith(f"an older version is at the destination (copied in run {old})")
    assert s.verified == 1 and category(s, "done") == st.COPIED_COPY  # "same": the copy listed is verified
    assert [e.source_key for e in s.not_verified()] == ["changed", "new", "done"]


def test_a_copy_deleted_as_removed_at_the_source_is_not_a_copy_to_skip_against(store):
    first = migrate_run(store)
    copied(store, first, "k", etag="e1")
    copied(store, first, "gone", etag="g1")
    through(store, first, 2)
    assert store.current_copy("d", "k").run_id == first
    # The object left the selection (an exclude pattern); --delete-removed deleted its copy.
    second = migrate_run(store)
    store.add_object(second, "d", "gone", "g1", 10, dest_key="x/gone", state=st.UNCHANGED)
    store.add_object(second, "d", "k", "e1", 10, dest_key="x/k", state=st.REMOVED)
    through(store, second, 1)
    assert store.current_copy("d", "k") is None
    assert store.last_copy("d", "k").run_id == first  # its recorded digest is still what a restore compares with
    s = store.dataset_status("d")
    assert (s.expected, s.removed_kept, s.removed_deleted) == (1, 0, 1)
    # Selected again, and wrongly found unchanged (as exitplan did before `current_copy`): it never arrived.
    third = migrate_run(store)
    store.add_object(third, "d", "k", "e1", 10, dest_key="x/k", state=st.UNCHANGED)
    store.add_object(third, "d", "gone", "g1", 10, dest_key="x/gone", state=st.UNCHANGED)
    through(store, third, 2)
    s = store.dataset_status("d")
    assert category(s, "k") == st.NEVER_ATTEMPTED
    assert reason(s, "k") == f"run {third} found it unchanged, but no copy of it is at the destination (deleted in run {second})"


def test_a_copy_verify_found_wrong_is_failed_until_copied_again(store):
    run = migrate_run(store)
    oid = copied(store, run, "k")
    through(store, run, 1)
    store.transition(oid, st.FAILED, reason=st.VERIFY_REASON + "etag: expected t, found u")
    assert store.current_copy("d", "k") is None
    s = store.dataset_status("d")
    assert category(s, "k") == st.FOUND_WRONG and "verify: etag" in reason(s, "k")
    assert (s.never_arrived, s.not_at_destination) == (1, 0)  # a copy is there (a restore judges it), but wrong
    later = migrate_run(store)
    store.add_object(later, "d", "k", "e1", 10, dest_key="x/k", state=st.UNCHANGED)  # before current_copy: skipped
    through(store, later, 1)
    assert category(store.dataset_status("d"), "k") == st.FOUND_WRONG


def test_removed_at_the_source_is_counted_apart_and_a_prefix_narrows_everything(store):
    first = migrate_run(store)
    for key in ("p/a", "p/b", "q/c", "q/old"):
        copied(store, first, key, verified=True)
    through(store, first, 4)
    second = migrate_run(store)
    for key in ("p/a", "p/b", "q/c"):
        store.add_object(second, "d", key, "e1", 10, dest_key=f"x/{key}", state=st.UNCHANGED)
    store.add_object(second, "d", "p/new", "e1", 10, dest_key="x/p/new", state=st.IN_PROGRESS)
    through(store, second, 4)
    s = store.dataset_status("d")
    assert (s.expected, s.verified, s.removed_kept, s.removed_deleted) == (4, 3, 1, 0)
    p = store.dataset_status("d", prefix="p/")
    assert (p.expected, p.verified, p.count(st.PENDING_COPY).objects, p.removed_kept) == (3, 2, 1, 0)
    assert store.dataset_status("d", prefix="p%").expected == 0  # a LIKE wildcard is a plain character


def test_listed_objects_the_state_could_not_record_are_counted_as_never_attempted(store):
    run = migrate_run(store)
    copied(store, run, "a", verified=True)
    through(store, run, 3)  # the CLI counted 3 objects listed; 2 rows were never written
    s = store.dataset_status("d")
    n = s.count(st.NEVER_ATTEMPTED)
    assert (s.expected, n.objects) == (3, 2) and not s.complete
    assert "rows were never written" in n.examples[0].reason


def test_a_large_dataset_keeps_only_the_first_examples(store):
    run = migrate_run(store)
    metas = [ObjectMeta(key=f"k{i:05d}", size=i, etag="e") for i in range(3000)]
    store.record_listing(run, "d", [(i // 1000, m) for i, m in enumerate(metas)])
    through(store, run, 3000)
    s = store.dataset_status("d", examples=5)
    n = s.count(st.NEVER_ATTEMPTED)
    assert (n.objects, n.bytes) == (3000, sum(range(3000)))
    assert [e.source_key for e in n.examples] == [f"k{i:05d}" for i in range(5)]


def test_verify_runs_are_recorded_and_the_newest_is_named(store):
    run = migrate_run(store)
    copied(store, run, "a", verified=True)
    through(store, run, 1)
    check = store.start_run("verify")
    store.dataset_started(check, "d")
    store.dataset_through(check, "d", 1, 0)
    s = store.dataset_status("d")
    assert (s.last_migrate.run_id, s.last_verify.run_id, s.last_verify.went_through) == (run, check, True)
    assert [r.run_id for r in store.run_datasets("d")] == [check, run]
