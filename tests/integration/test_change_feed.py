"""Deltas from the storage account's change feed (`changes: feed`, engine/listing.py) on Azurite.

Azurite has no change feed: the segments are written into its `$blobchangefeed` container in
Azure's documented layout and record fields (lab/changefeed.py), naming the changes the test
makes to the blobs. What is checked: a run after the first lists only the names the feed gives
(no listing request over the container), and its listing is the one a full listing makes; the
copy, the objects gone from the source and the next feed run go on from it; and each case where
the feed cannot say everything that changed lists in full, saying why.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from config.loader import load_config
from connectors.azure_blob import AzureBlobSource
from connectors.azure_writer import AzureBlobWriter
from engine.project import open_state
from engine.report import render
from engine.run import MigrationRun
from lab.changefeed import Change, LabChangeFeed
from tests.integration.test_completeness import project, s3  # noqa: F401 - fixtures

pytestmark = pytest.mark.integration

T0 = datetime(2026, 11, 30, 1, 0, tzinfo=timezone.utc)
HOUR = timedelta(hours=1)


@pytest.fixture
def feed(azurite_connection_string):
    """The account's change feed, empty but for a first hour whose lastConsumable is `T0`."""
    lab = LabChangeFeed(AzureBlobWriter(azurite_connection_string))
    lab.clear()
    lab.write_segment(T0, [Change("another-container", "x.bin")])
    yield lab
    lab.clear()


def run_pass(loaded, *, full_listing: bool = False, copy: bool = True):
    """One flow-like run of dataset `docs` without Prefect (listing, shards, copy, end): (run id,
    the inventory, the run's result)."""
    run = MigrationRun.start(loaded, ["docs"])
    try:
        inventory, _ = run.list_dataset("docs", shard_bytes=10**9, shard_objects=3, ranges_at_once=2,
                                        full_listing=full_listing)
        run.ready_shards("docs")
        plan = run.shard_plan()
        if copy:
            for shard in plan.shards:
                run.copy_shard("docs", shard.shard)
            run.shards_ended(plan, lambda *_: "not run")
    finally:
        result = run.finish()
    return run.run_id, inventory, result


def listed(loaded, run_id):
    """Everything run `run_id`'s listing holds of each object, by key."""
    state = open_state(loaded)
    try:
        return {m.key: (m.etag, m.size, m.tier, m.content_md5, dict(m.metadata), dict(m.tags or {}))
                for m in state.listed(run_id, "docs")}
    finally:
        state.close()


def feed_row(loaded, run_id):
    import sqlalchemy as sa

    from engine.state.schema import listing_feed

    state = open_state(loaded)
    try:
        with state.engine.connect() as conn:
            return conn.execute(sa.select(listing_feed).where(listing_feed.c.run_id == run_id)).mappings().first()
    finally:
        state.close()


@pytest.fixture
def listing_requests(monkeypatch):
    """The container-wide listing requests (`list_pages`) and the names listed one by one."""
    seen = {"ranges": [], "names": []}
    list_pages, list_name = AzureBlobSource.list_pages, AzureBlobSource.list_name

    def pages(self, part, marker=None):
        if not self.label.endswith("$blobchangefeed"):
            seen["ranges"].append(part.prefix)
        return list_pages(self, part, marker)

    def name(self, key):
        seen["names"].append(key)
        return list_name(self, key)

    monkeypatch.setattr(AzureBlobSource, "list_pages", pages)
    monkeypatch.setattr(AzureBlobSource, "list_name", name)
    return seen


def seed(cc):
    for folder, n in (("a", 5), ("b", 4)):
        for i in range(n):
            cc.upload_blob(f"{folder}/{i}.bin", f"{folder}{i}".encode() * (i + 1), metadata={"n": str(i)})


def test_a_run_after_the_first_lists_only_what_the_feed_names_and_holds_what_a_full_listing_holds(
        project, feed, listing_requests):  # noqa: F811
    cc = project.cc
    seed(cc)
    loaded = load_config(project.make(changes="feed"))

    first, inventory, result = run_pass(loaded)
    assert result.all_ok and inventory.objects == 9
    assert "a full listing" in inventory.listed_from and "no earlier listing" in inventory.listed_from
    assert feed_row(loaded, first)["feed_through"] == "2026-11-30T01:00:00Z"
    assert listing_requests["ranges"] and not listing_requests["names"]

    # What happens at the source during the next hour, and what the feed records of it.
    cc.upload_blob("a/1.bin", b"rewritten", overwrite=True)
    cc.delete_blob("a/2.bin")
    cc.upload_blob("c/new.bin", b"new object")
    cc.get_blob_client("b/0.bin").set_blob_metadata({"n": "changed"})
    cc.get_blob_client("b/1.bin").set_blob_tags({"project": "exit"})
    cc.upload_blob("tmp.bin", b"created, then deleted within the hour")
    cc.delete_blob("tmp.bin")
    feed.write_segment(T0 + HOUR, [
        Change(project.container, "a/1.bin", api="PutBlob"),
        Change(project.container, "a/2.bin", "BlobDeleted", "DeleteBlob"),
        Change(project.container, "c/new.bin"),
        Change(project.container, "b/0.bin", "BlobPropertiesUpdated", "SetBlobMetadata"),
        Change(project.container, "b/1.bin", "BlobPropertiesUpdated", "SetBlobTags"),
        Change(project.container, "tmp.bin"),
        Change(project.container, "tmp.bin", "BlobDeleted", "DeleteBlob"),
        Change(project.container, "a/1.bin", "BlobPropertiesUpdated", "SetBlobProperties"),  # a name twice
        Change("another-container", "a/3.bin"),  # not this dataset's
    ], shards=2)
    listing_requests["ranges"].clear()

    second, inventory, result = run_pass(loaded)
    assert listing_requests["ranges"] == []  # no listing of the container
    assert sorted(listing_requests["names"]) == ["a/1.bin", "a/2.bin", "b/0.bin", "b/1.bin", "c/new.bin", "tmp.bin"]
    row = feed_row(loaded, second)
    assert (row["baseline_run"], row["feed_through"], row["changed"]) == (first, "2026-11-30T02:00:00Z", 6)
    assert inventory.listed_from.startswith(f"run {first}'s listing and the change feed from 2026-11-30T01:00:00Z")
    assert inventory.objects == 9
    assert result.all_ok
    assert sum(s.ok for s in result.summaries) == 4  # a/1 rewritten, c/new new, b/0 metadata, b/1 tags
    assert [(r.count, r.examples) for r in result.removed] == [(1, ("a/2.bin",))]
    html, _, _ = render(loaded, ["docs"])
    assert (f"docs: run {second}&#x27;s listing is run {first}&#x27;s with the changes of the change feed up to "
            "2026-11-30T02:00:00Z (9 event(s), 6 name(s) listed again)") in html

    full, inventory, _ = run_pass(loaded, full_listing=True, copy=False)
    assert listed(loaded, second) == listed(loaded, full)
    assert listed(loaded, second)["b/1.bin"][5] == {"project": "exit"}
    # A full listing asked for notes where the feed stands, for the run after it.
    assert feed_row(loaded, full)["feed_through"] == "2026-11-30T02:00:00Z"


def test_a_run_with_nothing_new_in_the_feed_keeps_the_listing_and_copies_nothing(project, feed,
                                                                                 listing_requests):  # noqa: F811
    seed(project.cc)
    loaded = load_config(project.make(changes="feed"))
    first, _, _ = run_pass(loaded)
    second, inventory, result = run_pass(loaded)  # lastConsumable has not moved
    assert listing_requests["names"] == [] and feed_row(loaded, second)["baseline_run"] == first
    assert inventory.objects == 9 and result.all_ok and sum(s.ok for s in result.summaries) == 0
    assert listed(loaded, first) == listed(loaded, second)


@pytest.mark.parametrize("case", ["retention", "folder rename", "not final", "selection changed"])
def test_when_the_feed_cannot_say_everything_that_changed_the_run_lists_in_full_and_says_why(
        project, feed, listing_requests, case):  # noqa: F811
    seed(project.cc)
    loaded = load_config(project.make(changes="feed"))
    run_pass(loaded, copy=False)
    project.cc.upload_blob("a/9.bin", b"new")
    if case == "retention":  # the hours after the first listing are gone: the oldest now begins later
        feed.write_segment(T0 + 2 * HOUR, [Change(project.container, "a/9.bin")])
        feed.remove_segment(T0)
        why = "oldest segment (2026-11-30T03:00:00Z) begins after the last position read"
    elif case == "folder rename":
        feed.write_segment(T0 + HOUR, [Change(project.container, "a", "BlobCreated", "RenameDirectory",
                                              data={"isRecursive": True, "destinationUrl": "https://x/a2"})])
        why = "a RenameDirectory of 'a'"
    elif case == "not final":
        feed.write_segment(T0 + HOUR, [Change(project.container, "a/9.bin")], status="Publishing")
        why = "is 'Publishing', not 'Finalized'"
    else:
        loaded = load_config(project.make(changes="feed", include=["a/*"]))
        feed.write_segment(T0 + HOUR, [Change(project.container, "a/9.bin")])
        why = "no earlier listing of these objects"
    listing_requests["ranges"].clear()
    run_id, inventory, _ = run_pass(loaded, copy=False)
    assert listing_requests["ranges"]  # listed in full
    assert "a/9.bin" in listed(loaded, run_id)
    assert inventory.listed_from.startswith("a full listing: the change feed could not be used") and why in \
        inventory.listed_from, inventory.listed_from
    assert feed_row(loaded, run_id)["baseline_run"] is None


def test_an_account_without_a_change_feed_is_listed_in_full_each_run(project, feed, listing_requests):  # noqa: F811
    feed.delete("meta/segments.json")
    seed(project.cc)
    loaded = load_config(project.make(changes="feed"))
    first, inventory, _ = run_pass(loaded, copy=False)
    assert "the storage account has no change feed" in inventory.listed_from
    assert feed_row(loaded, first) is None
    listing_requests["ranges"].clear()
    _, inventory, _ = run_pass(loaded, copy=False)
    assert listing_requests["ranges"] and "no change feed" in inventory.listed_from


def test_a_run_killed_while_applying_the_feed_is_done_again_from_the_same_listing(
        project, feed, monkeypatch):  # noqa: F811
    from tests.integration.test_listing_resume import Killed

    seed(project.cc)
    loaded = load_config(project.make(changes="feed"))
    first, _, _ = run_pass(loaded)
    project.cc.upload_blob("a/0.bin", b"changed", overwrite=True)
    feed.write_segment(T0 + HOUR, [Change(project.container, "a/0.bin")])
    list_name = AzureBlobSource.list_name

    def killed(self, key):
        raise Killed()

    monkeypatch.setattr(AzureBlobSource, "list_name", killed)
    with pytest.raises(Killed):
        run_pass(loaded)
    monkeypatch.setattr(AzureBlobSource, "list_name", list_name)
    again, inventory, result = run_pass(loaded)
    assert feed_row(loaded, again)["baseline_run"] == first  # not the killed run's partial listing
    assert inventory.objects == 9 and result.all_ok and sum(s.ok for s in result.summaries) == 1
