"""Snapshots and earlier versions of blobs: never carried silently dropped. The live listing names
them beside the blobs; inventory, the dry run, migrate's summary, `status`, the audit manifest and
the report count them (objects and bytes) as not carried, with the reason, and the run still copies
each blob's current state (Azurite keeps snapshots; it has no versioning, see test_azure_versions.py
for recorded version listings)."""

from __future__ import annotations

import html
import json

import pytest

from config.loader import load_config
from connectors.base import NOT_CARRIED
from engine.audit import NOT_CARRIED as NOT_CARRIED_RECORD
from engine.audit import manifest_path
from engine.project import open_state
from engine.state import StateStore
from tests.integration.test_completeness import BUCKET, cli, project, s3, status_json  # noqa: F401 - fixtures
from tests.integration.test_listing_resume import Killed, list_dataset_run
from tests.s3client import keys_below

pytestmark = pytest.mark.integration

SNAPSHOTS = NOT_CARRIED["snapshot"]


def seed(project) -> int:
    """Blobs with snapshots (two of a.txt, one of d/b.txt, one of the excluded skip/x.txt) and one
    without; returns the bytes of the selected blobs' snapshots."""
    cc = project.cc
    cc.upload_blob("a.txt", b"first")
    cc.get_blob_client("a.txt").create_snapshot()
    cc.upload_blob("a.txt", b"second!", overwrite=True)
    cc.get_blob_client("a.txt").create_snapshot()
    cc.upload_blob("a.txt", b"the current a", overwrite=True)
    cc.upload_blob("d/b.txt", b"b before")
    cc.get_blob_client("d/b.txt").create_snapshot()
    cc.upload_blob("d/b.txt", b"b now", overwrite=True)
    cc.upload_blob("c.txt", b"no snapshot")
    cc.upload_blob("skip/x.txt", b"excluded, snapshot and all")
    cc.get_blob_client("skip/x.txt").create_snapshot()
    return len(b"first") + len(b"second!") + len(b"b before")


def test_snapshots_are_counted_and_named_everywhere_and_the_current_blobs_copied(project, capsys, s3, tmp_path):
    snapshot_bytes = seed(project)
    cfg = project.make(exclude=["skip/*"])
    capsys.readouterr()  # keys init's

    code, out, _ = cli(capsys, "inventory", "--config", cfg, "--format", "json")
    (inv,) = json.loads(out)
    assert code == 0 and inv["objects"] == 3
    assert inv["not_copied"] == {SNAPSHOTS: [3, snapshot_bytes]}

    code, out, _ = cli(capsys, "inventory", "--config", cfg)
    assert f"docs: not carried: 3 ({snapshot_bytes} B) {SNAPSHOTS}" in out

    code, out, _ = cli(capsys, "migrate", "--config", cfg, "--dry-run", "--summary")
    assert code == 0 and f"docs: not carried: 3 ({snapshot_bytes} B) {SNAPSHOTS}" in out

    code, out, err = cli(capsys, "migrate", "--config", cfg)
    assert code == 0, err
    assert f"docs: not carried: 3 ({snapshot_bytes} B) {SNAPSHOTS}" in out
    # the current state of each selected blob, once: no snapshot written over it or beside it
    assert keys_below(s3, BUCKET, f"{project.container}/") == {"a.txt", "c.txt", "d/b.txt"}
    code, out, _ = cli(capsys, "restore", "--config", cfg, "--dataset", "docs", "--to", tmp_path / "back")
    assert code == 0 and (tmp_path / "back" / "a.txt").read_bytes() == b"the current a"

    code, status = status_json(capsys, cfg)
    assert status["listing"]["not_carried"] == [{"reason": SNAPSHOTS, "objects": 3, "bytes": snapshot_bytes}]
    code, out, _ = cli(capsys, "status", "--config", cfg)
    assert f"not carried: 3 ({snapshot_bytes} B) {SNAPSHOTS}" in out

    loaded = load_config(cfg)
    manifest = manifest_path(loaded)
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    (named,) = [r for r in records if r["type"] == NOT_CARRIED_RECORD]
    assert named["dataset"] == "docs" and named["not_carried"] == [
        {"reason": SNAPSHOTS, "objects": 3, "bytes": snapshot_bytes}]

    code, _, _ = cli(capsys, "report", "--config", cfg, "--out", tmp_path / "report.html")
    assert code == 0 and f"not carried: 3 ({snapshot_bytes} B) {SNAPSHOTS}" in html.unescape(
        (tmp_path / "report.html").read_text())

    # the second run copies nothing and names the snapshots again
    code, out, _ = cli(capsys, "migrate", "--config", cfg)
    assert code == 0 and f"docs: not carried: 3 ({snapshot_bytes} B) {SNAPSHOTS}" in out


def test_the_flows_listing_counts_snapshots_in_ranges_and_keeps_the_count_across_a_kill(project, monkeypatch):
    """The flows list a dataset into the state in ranges at once (engine/listing.py): the snapshots
    of each range are stored with its pages, so a listing killed part-way and taken over by the
    next run counts each snapshot once."""
    snapshot_bytes = seed(project)
    for i in range(6):  # more folders, so that the listing has ranges of several pages
        project.cc.upload_blob(f"e/{i}.txt", b"e" * (i + 1))
        project.cc.get_blob_client(f"e/{i}.txt").create_snapshot()
    snapshot_bytes += sum(i + 1 for i in range(6))
    loaded = load_config(project.make(exclude=["skip/*"]))
    expected = {SNAPSHOTS: (9, snapshot_bytes)}

    run_id, inventory = list_dataset_run(loaded, "docs")
    assert inventory.not_copied == expected
    state = open_state(loaded)
    try:
        assert state.not_carried(run_id, "docs") == expected
    finally:
        state.close()

    from connectors.azure_blob import AzureBlobSource
    list_pages, record_page = AzureBlobSource.list_pages, StateStore.record_listing_page
    stored = []

    def small_pages(self, part, marker=None):
        self.page_size = 2
        return list_pages(self, part, marker)

    def killed_after_three_pages(state, part, entries, start):
        if len(stored) == 3:
            raise Killed()
        record_page(state, part, entries, start)
        stored.append(part.range_no)

    monkeypatch.setattr(AzureBlobSource, "list_pages", small_pages)
    monkeypatch.setattr(StateStore, "record_listing_page", killed_after_three_pages)
    # a new basis (another exclude) so that this listing is not the finished one above
    loaded = load_config(project.make(exclude=["skip/*", "none"]))
    with pytest.raises(Killed):
        list_dataset_run(loaded, "docs")
    stored.append("go on")  # no more kills
    resumed, inventory = list_dataset_run(loaded, "docs")
    assert inventory.not_copied == expected and inventory.objects == 3 + 6
