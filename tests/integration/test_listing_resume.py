"""A migration run's listing on Azurite, in ranges at once, killed part-way and taken over by the
next run (engine/listing.py): the next run sends no listing request for the ranges finished before
the kill, lists the unfinished one on from its continuation token, and stores exactly the rows an
uninterrupted listing stores."""

from __future__ import annotations

import threading

import pytest

from config.loader import load_config
from connectors.azure_blob import AzureBlobSource
from engine.run import MigrationRun
from engine.state import StateStore
from tests.integration.test_completeness import project, s3  # noqa: F401 - fixtures

pytestmark = pytest.mark.integration

PAGE = 4  # blobs per listing request, so that each range takes several


class Killed(KeyboardInterrupt):
    """What a kill looks like to the code after it: the run stops where it is."""


def list_dataset_run(loaded, dataset: str):
    """A run of the flows' listing pass alone (4 ranges at once, shards of 3 objects): (its run id,
    the dataset's inventory). A `Killed` on the way leaves it recorded as interrupted."""
    run = MigrationRun.start(loaded, [dataset])
    try:
        inventory, _ = run.list_dataset(dataset, shard_bytes=10**9, shard_objects=3, ranges_at_once=4)
        run.ready_shards(dataset)
    finally:
        run.finish()  # not completed: recorded as interrupted
    return run.run_id, inventory


def listed_rows(loaded, run_id):
    """(key, etag, size, shard) of each object of run `run_id`'s listing, after its shards are fixed."""
    from engine.project import open_state

    state = open_state(loaded)
    try:
        return sorted((m.key, m.etag, m.size, shard.shard) for shard in state.shards(run_id, "docs")
                      for m in state.listed(run_id, "docs", shard.shard))
    finally:
        state.close()


def test_a_killed_listing_goes_on_from_each_unfinished_range_without_listing_the_finished_ones(
        project, monkeypatch):  # noqa: F811
    for i in range(3):
        project.cc.upload_blob(f"top{i}.txt", b"t" * i)
    for folder, n in (("a", 9), ("b", 6), ("c", 14)):
        for i in range(n):
            project.cc.upload_blob(f"{folder}/{i // 5}/{i:02d}.bin", folder.encode() * (i + 1))
    loaded = load_config(project.make())
    requests: list[tuple[str, bool, str | None]] = []
    kill = threading.Event()
    kill.set()
    others_done = threading.Event()  # "", a/ and b/ are listed and stored
    stored: dict[str, int] = {}  # range prefix -> pages stored
    done: set[str] = set()  # ranges whose last page is stored
    list_pages, record_page = AzureBlobSource.list_pages, StateStore.record_listing_page

    def counted(self, part, marker=None):
        self.page_size = PAGE
        for n, page in enumerate(list_pages(self, part, marker)):
            requests.append((part.prefix, part.direct, marker if n == 0 else "(next)"))
            if part.prefix == "c/" and n == 2 and kill.is_set():
                others_done.wait(60)  # so that the test knows which ranges the kill finds done
            yield page

    def killed_after_two_pages_of_c(state, part, entries, start):
        if part.prefix == "c/" and stored.get("c/") == 2 and kill.is_set():
            raise Killed()  # the process dies before c/'s third page is stored
        record_page(state, part, entries, start)
        stored[part.prefix] = stored.get(part.prefix, 0) + 1
        if part.done:
            done.add(part.prefix)
        if {"", "a/", "b/"} <= done:
            others_done.set()

    monkeypatch.setattr(AzureBlobSource, "list_pages", counted)
    monkeypatch.setattr(StateStore, "record_listing_page", killed_after_two_pages_of_c)

    def listing_run():
        return list_dataset_run(loaded, "docs")

    with pytest.raises(Killed):
        listing_run()
    assert {(prefix, direct) for prefix, direct, _ in requests} == {("", True), ("a/", False), ("b/", False),
                                                                     ("c/", False)}

    requests.clear()
    kill.clear()
    resumed, inventory = listing_run()
    # c/ only, from the continuation token stored with its second page; nothing for "", a/ or b/.
    assert [(prefix, direct) for prefix, direct, _ in requests] == [("c/", False)] * 2
    assert requests[0][2] not in (None, "(next)")
    assert inventory.objects == 3 + 9 + 6 + 14

    requests.clear()
    fresh, _ = listing_run()
    assert {prefix for prefix, *_ in requests} == {"", "a/", "b/", "c/"}
    assert listed_rows(loaded, resumed) == listed_rows(loaded, fresh)
    assert len(listed_rows(loaded, fresh)) == 32
