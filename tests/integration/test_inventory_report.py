"""An Azure Blob Inventory report as a dataset's listing, on Azurite: the lab writes the report
from Azurite's contents as Azure would; the report and the live listing give the same objects and
the same plan; an object changed since the report is copied at its current version, one deleted
since is named; a bad report is one sentence and exit 2."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import pytest
import yaml
from azure.storage.blob import BlobServiceClient, ContentSettings

from config.errors import ExitCode
from config.loader import load_config
from engine import run
from engine.endpoints import open_source
from engine.listing import ReportListing, dataset_listing
from engine.plan import plan
from engine.project import open_state
from flows.cli import main
from lab.inventory_report import write_dataset_report
from tests.projects import project_name
from tests.s3client import lab_s3_client

pytestmark = pytest.mark.integration

CS_VAR = "EXITPLAN_TEST_AZURE_CS"
BUCKET = "inventory-report"  # this module's own: the S3 server and its buckets are shared by the session


@pytest.fixture(scope="module")
def s3(s3_server):
    return lab_s3_client(s3_server.url, BUCKET)


@pytest.fixture
def container(monkeypatch, azurite_connection_string, s3):
    """A fresh container with a blob of each kind the report must carry faithfully."""
    monkeypatch.setenv(CS_VAR, azurite_connection_string)
    name = f"inv{uuid.uuid4().hex[:12]}"
    cc = BlobServiceClient.from_connection_string(azurite_connection_string).create_container(name)
    cc.upload_blob("docs/a.csv", b"id,x\n1,2\n", metadata={"origin": "hopital", "Batch": "7"},
                   content_settings=ContentSettings(content_type="text/csv", content_language="fr",
                                                    cache_control="no-cache", content_disposition="inline"))
    cc.get_blob_client("docs/a.csv").set_blob_tags({"retention": "10y"})
    blocks = cc.get_blob_client("docs/blocks.bin")  # staged blocks: no Content-MD5
    blocks.stage_block("YmxvY2stMQ==", b"b" * 1000)
    blocks.commit_block_list(["YmxvY2stMQ=="])
    cc.upload_blob("docs/empty", b"")
    cc.upload_blob("docs/cool.bin", b"c" * 300)
    cc.get_blob_client("docs/cool.bin").set_standard_blob_tier("Cool")
    cc.upload_blob("pages/disk.vhd", b"p" * 1024, blob_type="PageBlob")
    cc.upload_blob("logs/app.log", b"line\n", blob_type="AppendBlob")
    cc.upload_blob("stale/changed.txt", b"before")
    cc.upload_blob("stale/empty-then-full", b"")
    cc.upload_blob("stale/deleted.txt", b"soon gone")
    return name, cc


def write_config(tmp_path: Path, s3_server, container: str, inventory: dict | None, name: str) -> Path:
    dataset = {"source": "az", "container": container, "destination": "lab", "dest_prefix": f"{container}/"}
    if inventory:
        dataset["inventory"] = inventory
    cfg = {
        "version": 1,
        "project": project_name(tmp_path, "inv"),
        "sources": {"az": {"kind": "azure_blob", "connection_string_env": CS_VAR}},
        "destinations": {"lab": {"provider": "lab", "endpoint_url": s3_server.url, "region": "eu-west-3",
                                 "bucket": BUCKET}},
        "datasets": {"d": dataset},
        "transfer": {"concurrency": 2},
        "state": {"path": str(tmp_path / "state")},
        "keys": {"kek": {"backend": "local", "path": str(tmp_path / "kek.key")}},
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def faithful(meta) -> tuple:
    """Everything of an ObjectMeta that the copy carries (not last_modified's precision)."""
    return (meta.key, meta.size, meta.etag, meta.content_md5, meta.tier, meta.kind, dict(meta.metadata),
            dict(meta.tags), meta.content, meta.not_copyable)


class Quiet:
    def counting(self, *a): pass
    def dataset_started(self, *a): pass
    def dataset_counted(self, *a): pass
    def progress(self, *a): pass
    def dataset_finished(self, *a): pass


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_the_report_and_the_live_listing_give_the_same_plan(tmp_path, capsys, container, s3_server, fmt):
    name, _ = container
    live = write_config(tmp_path, s3_server, name, None, "live.yaml")
    assert main(["keys", "init", "--config", str(live)]) == 0
    written = write_dataset_report(load_config(live), "d", fmt=fmt, container=f"{name}-inv")
    assert written.rows == 9
    from_report = write_config(tmp_path, s3_server, name, {"report": written.path}, "report.yaml")
    live_loaded, report_loaded = load_config(live), load_config(from_report)

    listed = sorted(faithful(m) for m in open_source(live_loaded, "d").list(""))
    listing = dataset_listing(report_loaded, "d", open_source(report_loaded, "d"))
    assert isinstance(listing, ReportListing)
    assert sorted(faithful(m) for m in listing) == listed
    kinds = {m[0]: m[5] for m in listed}
    assert (kinds["pages/disk.vhd"], kinds["logs/app.log"], kinds["docs/a.csv"]) == ("page", "append", "block")

    def planned(loaded):
        objects = []
        summaries = plan(loaded, ["d"], lambda _dataset, p: objects.append(p))
        return sorted((p.source_key, p.dest_key, p.size, p.output_size, p.parts, p.action) for p in objects), summaries

    live_plan, _ = planned(live_loaded)
    report_plan, summaries = planned(report_loaded)
    assert report_plan == live_plan and len(report_plan) == 9
    assert summaries[0].listed_from.startswith(f"inventory report {written.path}") and "9 rows" in summaries[0].listed_from

    capsys.readouterr()
    assert main(["migrate", "--dry-run", "--summary", "--config", str(from_report)]) == 0
    assert f"from inventory report {written.path}" in capsys.readouterr().out
    assert main(["inventory", "--config", str(from_report)]) == 0
    assert "not a live listing" in capsys.readouterr().out


def test_an_object_changed_since_the_report_is_copied_as_it_is_now_and_one_deleted_is_named(
        tmp_path, capsys, container, s3_server):
    name, cc = container
    live = write_config(tmp_path, s3_server, name, None, "live.yaml")
    written = write_dataset_report(load_config(live), "d", container=f"{name}-inv")
    config = write_config(tmp_path, s3_server, name, {"report": written.path}, "report.yaml")
    assert main(["keys", "init", "--config", str(config)]) == 0
    cc.upload_blob("stale/changed.txt", b"after, and longer", overwrite=True)
    cc.upload_blob("stale/empty-then-full", b"now it has bytes", overwrite=True)
    cc.delete_blob("stale/deleted.txt")
    now = {k: cc.get_blob_client(k).get_blob_properties().etag.strip('"') for k in ("stale/changed.txt", "stale/empty-then-full")}

    loaded = load_config(config)
    result = run.migrate(loaded, ["d"], Quiet(), count_first=False)
    assert not result.all_ok
    state = open_state(loaded)
    try:
        rows = {r.source_key: r for r in state.objects(result.run_id)}
    finally:
        state.close()
    assert len(rows) == 9
    for key, body in (("stale/changed.txt", b"after, and longer"), ("stale/empty-then-full", b"now it has bytes")):
        row = rows[key]
        assert (row.state, row.source_etag, row.size) == ("uploaded", now[key], len(body)), key
        assert row.sha256 == hashlib.sha256(body).hexdigest() and row.restarts == 1
    gone = rows["stale/deleted.txt"]
    assert gone.state == "failed" and "deleted since it was listed" in gone.reason
    assert {k for k, r in rows.items() if r.state != "uploaded"} == {"stale/deleted.txt"}

    assert main(["migrate", "--delete-removed", "--config", str(config)]) == ExitCode.USAGE
    assert "--delete-removed cannot be used" in capsys.readouterr().err


def test_a_report_whose_run_failed_is_one_sentence_and_exit_2(tmp_path, capsys, container, s3_server,
                                                              azurite_connection_string):
    name, _ = container
    live = write_config(tmp_path, s3_server, name, None, "live.yaml")
    written = write_dataset_report(load_config(live), "d", container=f"{name}-inv")
    report_cc = BlobServiceClient.from_connection_string(azurite_connection_string).get_container_client(f"{name}-inv")
    manifest_path = f"{written.path.split('/', 1)[1]}/exitplan-manifest.json"
    manifest = json.loads(report_cc.download_blob(manifest_path).readall())
    manifest["status"] = "Failed"
    body = json.dumps(manifest).encode()
    report_cc.upload_blob(manifest_path, body, overwrite=True)
    report_cc.upload_blob(manifest_path.replace(".json", ".checksum"), hashlib.md5(body).hexdigest().encode(),
                          overwrite=True)
    config = write_config(tmp_path, s3_server, name, {"report": written.path}, "report.yaml")
    assert main(["keys", "init", "--config", str(config)]) == 0
    capsys.readouterr()
    assert main(["inventory", "--config", str(config)]) == ExitCode.USAGE
    err = capsys.readouterr().err
    assert "status 'Failed'" in err and "datasets.d.inventory.report" in err
    assert main(["migrate", "--config", str(config)]) == ExitCode.USAGE


def test_the_lab_command_writes_a_report_the_config_can_name(tmp_path, capsys, container, s3_server):
    name, _ = container
    live = write_config(tmp_path, s3_server, name, None, "live.yaml")
    assert main(["lab", "inventory-report", "--config", str(live), "--dataset", "d", "--container", f"{name}-inv",
                 "--format", "parquet"]) == 0
    out = capsys.readouterr().out
    path = out.split("report: ", 1)[1].split()[0]
    assert path.startswith(f"{name}-inv/") and path.endswith("/exitplan")
    report = write_config(tmp_path, s3_server, name, {"report": path}, "report.yaml")
    assert main(["inventory", "--config", str(report), "--format", "json"]) == 0
    inventory = json.loads(capsys.readouterr().out)[0]
    assert inventory["objects"] == 9 and inventory["listed_from"].startswith(f"inventory report {path}")


def test_the_flows_listing_pass_reads_the_report_into_the_state(tmp_path, container, s3_server):
    """What the exit_plan flow's tasks call, without Prefect: the listing pass stores the report's
    objects, cut into shards, and the shards copy them."""
    name, _ = container
    live = write_config(tmp_path, s3_server, name, None, "live.yaml")
    written = write_dataset_report(load_config(live), "d", fmt="parquet", container=f"{name}-inv")
    config = write_config(tmp_path, s3_server, name, {"report": written.path}, "report.yaml")
    assert main(["keys", "init", "--config", str(config)]) == 0
    migration = run.MigrationRun.start(load_config(config), ["d"])
    try:
        inventory, shards = migration.list_dataset("d", shard_bytes=1024**3, shard_objects=4)
        assert (inventory.objects, shards) == (9, 3)
        assert inventory.listed_from.startswith(f"inventory report {written.path}")
        assert sorted(m.key for m in migration.state.listed(migration.run_id, "d"))[:2] == ["docs/a.csv", "docs/blocks.bin"]
        migration.ready_shards("d")  # the listing went through: every shard is final
        shard_plan = migration.shard_plan()
        for shard in shard_plan.shards:
            assert migration.copy_shard("d", shard.shard).ok
        migration.shards_ended(shard_plan, lambda *_: "not run")
    finally:
        result = migration.finish()
    assert result.all_ok and result.summaries[0].ok == 9


def test_a_killed_report_listing_goes_on_from_the_rows_it_stored(tmp_path, container, s3_server, monkeypatch,
                                                                 azurite_connection_string):
    """A report's rows are in no key order, so its listing's marker is a row count: the next run
    takes over a listing killed part-way, skips the rows already stored and ends with each of the
    report's objects exactly once, as an uninterrupted listing does."""
    from engine import listing
    from engine.state import StateStore
    from tests.integration.test_listing_resume import Killed, list_dataset_run

    from connectors.azure_writer import AzureBlobWriter
    from lab.inventory_report import write_report

    name, _ = container
    live = write_config(tmp_path, s3_server, name, None, "live.yaml")
    # Rows in reverse key order over three files: a last key would not say where the listing stopped.
    blobs = sorted(open_source(load_config(live), "d").list(""), key=lambda m: m.key, reverse=True)
    written = write_report(AzureBlobWriter(azurite_connection_string), f"{name}-inv", blobs, name, rows_per_file=4)
    config = write_config(tmp_path, s3_server, name, {"report": written.path}, "report.yaml")
    assert main(["keys", "init", "--config", str(config)]) == 0
    monkeypatch.setattr(listing, "PAGE_SIZE", 2)  # 9 rows: 5 pages
    record_page, stored = StateStore.record_listing_page, []
    kill = True

    def killed_after_two_pages(state, part, entries, start):
        if kill and len(stored) == 2:
            raise Killed()
        record_page(state, part, entries, start)
        stored.append((part.marker, [m.key for _, m in entries]))

    monkeypatch.setattr(StateStore, "record_listing_page", killed_after_two_pages)

    def listing_run():
        return list_dataset_run(load_config(config), "d")

    with pytest.raises(Killed):
        listing_run()
    assert [marker for marker, _ in stored] == ["2", "4"]
    first_keys = [key for _, keys in stored for key in keys]
    kill = False
    resumed, inventory = listing_run()
    assert [marker for marker, _ in stored[2:]] == ["6", "8", None]  # rows 5 to 9 only
    assert inventory.objects == 9
    fresh, _ = listing_run()
    with open_state(load_config(config)) as state:
        resumed_rows = [m.key for m in state.listed(resumed, "d")]
        fresh_rows = [m.key for m in state.listed(fresh, "d")]
    assert resumed_rows[:4] == first_keys == [m.key for m in blobs[:4]]
    assert sorted(resumed_rows) == sorted(fresh_rows) and len(set(resumed_rows)) == 9
