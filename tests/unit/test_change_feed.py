"""The change feed reader (connectors/azure_changefeed.py) over a feed written as Azure lays it out
(lab/changefeed.py) into an in-memory container, and the configuration's refusals."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from pydantic import ValidationError

from config.models import DatasetConfig
from connectors.azure_changefeed import ChangeFeed, FeedReading, FeedUnusable
from connectors.base import ConnectorError
from connectors.memory import MemoryStore
from lab.changefeed import FEED_CONTAINER, Change, LabChangeFeed

T0 = datetime(2026, 11, 30, 1, 0, tzinfo=timezone.utc)
HOUR = timedelta(hours=1)


class MemoryFeedWriter:
    """What `LabChangeFeed` writes with, over one in-memory container."""

    def __init__(self, store: MemoryStore):
        self.store = store

    def ensure_container(self, container: str) -> None:
        assert container == FEED_CONTAINER

    def put_append(self, container: str, name: str, body: bytes) -> None:
        self.store.add(name, body)

    def put_single(self, container: str, name: str, body: bytes, content, metadata, md5) -> None:
        self.store.add(name, body)

    def names(self, container: str) -> list[str]:
        return self.store.keys()

    def delete(self, container: str, name: str) -> None:
        self.store.delete(name)


@pytest.fixture
def store():
    return MemoryStore(label=f"memory:{FEED_CONTAINER}")


@pytest.fixture
def lab(store):
    return LabChangeFeed(MemoryFeedWriter(store))


def names(feed: ChangeFeed, after=T0, through=T0 + 3 * HOUR, container="c", prefix="", reading=None):
    return list(feed.changed_names(container, prefix, after, through, reading))


def test_the_names_of_the_container_and_prefix_in_the_segments_after_the_position(store, lab):
    lab.write_segment(T0, [Change("c", "before.bin")])
    lab.write_segment(T0 + HOUR, [Change("c", "data/a b.csv"), Change("other", "data/x.bin"),
                                  Change("c", "data/sub/é.bin", "BlobDeleted", "DeleteBlob"),
                                  Change("c", "elsewhere/y.bin")], shards=3)
    lab.write_segment(T0 + 2 * HOUR, [Change("c", "data/a b.csv", "BlobTierChanged", "SetBlobTier")])
    lab.write_segment(T0 + 3 * HOUR, [Change("c", "data/later.bin")])
    feed = ChangeFeed(store)
    assert feed.last_consumable() == T0 + 3 * HOUR
    reading = FeedReading()
    found = names(feed, through=T0 + 2 * HOUR, prefix="data/", reading=reading)
    assert sorted(found) == ["data/a b.csv", "data/a b.csv", "data/sub/é.bin"]
    assert (reading.segments, reading.chunks, reading.events, reading.matching) == (2, 4, 5, 3)
    assert sorted(names(feed)) == ["data/a b.csv", "data/a b.csv", "data/later.bin", "data/sub/é.bin",
                                   "elsewhere/y.bin"]


def test_an_account_without_a_change_feed(store):
    with pytest.raises(FeedUnusable, match="has no change feed"):
        ChangeFeed(store).last_consumable()


def test_segments_removed_by_retention_are_a_gap(store, lab):
    lab.write_segment(T0, [])
    lab.write_segment(T0 + HOUR, [Change("c", "a")])
    lab.write_segment(T0 + 2 * HOUR, [Change("c", "b")])
    assert names(ChangeFeed(store)) == ["a", "b"]  # the segment at T0 is the position itself
    lab.remove_segment(T0)
    assert names(ChangeFeed(store)) == ["a", "b"]  # the next hour is still there
    lab.remove_segment(T0 + HOUR)
    with pytest.raises(FeedUnusable, match=r"oldest segment \(2026-11-30T03:00:00Z\) begins after the last position "
                                           r"read \(2026-11-30T01:00:00Z\)"):
        names(ChangeFeed(store))


def test_a_consumable_segment_that_is_not_final(store, lab):
    lab.write_segment(T0, [])
    lab.write_segment(T0 + HOUR, [Change("c", "a")], status="Publishing")
    with pytest.raises(FeedUnusable, match="is 'Publishing', not 'Finalized'"):
        names(ChangeFeed(store))


@pytest.mark.parametrize("data", [{"isRecursive": True}, {"destinationUrl": "https://account/c/b2"}, {}])
def test_an_operation_on_a_folder_of_a_hierarchical_namespace(store, lab, data):
    lab.write_segment(T0, [])
    lab.write_segment(T0 + HOUR, [Change("c", "a/b", "BlobDeleted", "DeleteDirectory" if not data else "DeleteBlob",
                                         data=data)])
    with pytest.raises(FeedUnusable, match="an operation of a hierarchical namespace"):
        names(ChangeFeed(store))


def test_an_avro_file_that_cannot_be_read_is_an_error_naming_it(store, lab):
    lab.write_segment(T0, [])
    lab.write_segment(T0 + HOUR, [Change("c", "a")])
    store.add("log/00/2026/11/30/0200/00000.avro", b"not avro at all")
    with pytest.raises(ConnectorError, match=r"log/00/2026/11/30/0200/00000.avro is not an Avro file"):
        names(ChangeFeed(store))


def test_the_configuration_refuses_what_the_feed_cannot_keep_in_step():
    with pytest.raises(ValidationError, match="`changes: feed` starts from the last live listing"):
        DatasetConfig(source="az", container="c", destination="d", changes="feed",
                      inventory={"report": "inv/2026/11/30/01-00-00/rule"})
    with pytest.raises(ValidationError, match="cannot keep each snapshot and earlier version in step"):
        DatasetConfig(source="az", container="c", destination="d", changes="feed", history="all")
    assert DatasetConfig(source="az", container="c", destination="d").changes == "listing"
