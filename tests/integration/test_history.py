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


def test_history_all_carries_each_snapshot_as_an_object_of_its_own(project, capsys, s3, tmp_path):
    """`history: all`: each snapshot is copied under `.exitplan-history/<name>/snapshot-<time>`, with
    its own state row and manifest record, verified, restored beside the blob, and copied once."""
    seed(project)
    cfg = project.make(exclude=["skip/*"], history="all")
    capsys.readouterr()
    snapshots = {b.name: [] for b in project.cc.list_blobs(include=["snapshots"]) if b.snapshot}
    for b in project.cc.list_blobs(include=["snapshots"]):
        if b.snapshot and b.name in snapshots:
            snapshots[b.name].append(b.snapshot)
    history = {f".exitplan-history/{name}/snapshot-{ts}" for name, stamps in snapshots.items() for ts in stamps
               if not name.startswith("skip/")}
    assert len(history) == 3

    code, out, _ = cli(capsys, "inventory", "--config", cfg, "--format", "json")
    (inv,) = json.loads(out)
    assert code == 0 and inv["objects"] == 6 and inv["not_copied"] == {} and inv["earlier_states"] == {"snapshot": 3}
    code, out, _ = cli(capsys, "migrate", "--config", cfg, "--dry-run")
    assert code == 0 and all(f"would write  docs: {project.container}/{key}  (" in out for key in history), out

    code, out, err = cli(capsys, "migrate", "--config", cfg)
    assert code == 0, err
    assert "not carried" not in out
    assert keys_below(s3, BUCKET, f"{project.container}/") == {"a.txt", "c.txt", "d/b.txt"} | history
    code, out, err = cli(capsys, "verify", "--config", cfg, "--deep")
    assert code == 0, (out, err)

    to = tmp_path / "back"
    code, out, err = cli(capsys, "restore", "--config", cfg, "--dataset", "docs", "--to", to)
    assert code == 0, err
    a_snapshots = sorted(snapshots["a.txt"])
    assert (to / ".exitplan-history" / "a.txt" / f"snapshot-{a_snapshots[0]}").read_bytes() == b"first"
    assert (to / ".exitplan-history" / "a.txt" / f"snapshot-{a_snapshots[1]}").read_bytes() == b"second!"
    assert (to / "a.txt").read_bytes() == b"the current a"

    records = [json.loads(line) for line in manifest_path(load_config(cfg)).read_text().splitlines()]
    carried = {r["source"]["key"]: r["source"] for r in records if r["type"] == "transfer"}
    first = carried[f".exitplan-history/a.txt/snapshot-{a_snapshots[0]}"]
    assert first["blob"] == "a.txt" and first["snapshot"] == a_snapshots[0] and first["size"] == len(b"first")

    code, out, err = cli(capsys, "migrate", "--config", cfg)  # snapshots never change: nothing to copy
    assert code == 0 and "0 objects, 0 B copied" in out, out


def test_a_blob_named_like_an_earlier_state_is_refused_by_name(project, capsys, s3):
    project.cc.upload_blob("x.txt", b"x")
    project.cc.upload_blob(".exitplan-history/x.txt/snapshot-2026-11-04T10:00:00.0000000Z", b"impostor")
    cfg = project.make(history="all")
    capsys.readouterr()
    code, out, err = cli(capsys, "migrate", "--config", cfg)
    assert code == 1 and "could not be told apart from one; rename it at the source" in err, (out, err)
    assert keys_below(s3, BUCKET, f"{project.container}/") == {"x.txt"}


def test_the_flows_listing_stores_earlier_states_as_objects_with_history_all(project):
    seed(project)
    loaded = load_config(project.make(exclude=["skip/*"], history="all"))
    run_id, inventory = list_dataset_run(loaded, "docs")
    assert inventory.not_copied == {} and inventory.objects == 6 and inventory.earlier_states == {"snapshot": 3}
    state = open_state(loaded)
    try:
        listed = sorted(m.key for m in state.listed(run_id, "docs"))
        assert [k for k in listed if k.startswith(".exitplan-history/a.txt/snapshot-")] and len(listed) == 6
        assert all(m.snapshot for m in state.listed(run_id, "docs") if m.key.startswith(".exitplan-history/"))
    finally:
        state.close()
