"""Nothing lost, nothing silent: verify, restore and status count every object a dataset must hold
(its newest complete source listing), on the lab servers (Azurite → the S3 server).

Before, `verify` only checked the copies the state claimed and `restore` restored what the bucket
held: after a run in which most objects failed, or a run killed part-way, both exited 0. Each test
here fails on that code (verify or restore exit 0, no `status` command, or an object skipped as
unchanged although its copy had been deleted).
"""

from __future__ import annotations

import gc
import html
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from azure.storage.blob import BlobServiceClient

from flows.cli import main
from tests.faultproxy import FaultProxy
from tests.integration.test_encryption_e2e import restored_files
from tests.s3client import keys_below, lab_s3_client

pytestmark = pytest.mark.integration

CS_VAR = "EXITPLAN_TEST_AZURE_CS"
BUCKET = "exitplan-complete"
BIG_METADATA = {"note": "x" * 2100}  # over the 2 KB an S3 object's user metadata may hold


@pytest.fixture(scope="module")
def s3(s3_server):
    return lab_s3_client(s3_server.url, BUCKET)


@pytest.fixture
def project(tmp_path, monkeypatch, azurite_connection_string, s3_server, s3):
    """make(endpoint=None, **dataset options) -> config path, for a fresh container (`.container`,
    `.cc`) and a project of its own with a local KEK, `keys init` done."""
    monkeypatch.setenv(CS_VAR, azurite_connection_string)
    container = f"cmp{uuid.uuid4().hex[:10]}"
    cc = BlobServiceClient.from_connection_string(azurite_connection_string).create_container(container)

    class Project:
        pass

    p = Project()
    p.container, p.cc, p.dir = container, cc, tmp_path

    def make(endpoint: str | None = None, transfer: dict | None = None, **dataset) -> Path:
        cfg = {
            "version": 1,
            "project": container,
            "sources": {"az": {"kind": "azure_blob", "connection_string_env": CS_VAR}},
            "destinations": {"lab": {"provider": "lab", "endpoint_url": endpoint or s3_server.url,
                                     "region": "eu-west-3", "bucket": BUCKET}},
            "datasets": {"docs": {"source": "az", "container": container, "destination": "lab",
                                  "dest_prefix": f"{container}/", **dataset}},
            "transfer": {"concurrency": 4, "part_size": "5MiB", "small_object_cutoff": "1MiB", **(transfer or {})},
            "orchestration": {"shard_objects": 3},
            "state": {"path": str(tmp_path / "state")},
            "keys": {"kek": {"backend": "local", "path": str(tmp_path / "kek.key")}},
        }
        path = tmp_path / "exitplan.yaml"
        first = not path.exists()
        path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
        if first:
            assert main(["keys", "init", "--config", str(path)]) == 0
        return path

    p.make = make
    return p


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def status_json(capsys, cfg) -> tuple[int, dict]:
    code, out, err = cli(capsys, "status", "--config", cfg, "--format", "json", "--examples", "50")
    (status,) = json.loads(out)
    return code, status


def named(err: str) -> set[str]:
    """Source keys named on the lines that list objects not verified (`  <status> '<key>': <reason>`)."""
    keys = set()
    for line in err.splitlines():
        if line.startswith("  ") and "'" in line and ": " in line:
            start = line.index("'")
            keys.add(line[start + 1:line.index("': ", start)])
    return keys


def test_verify_restore_and_status_name_every_object_that_never_arrived(project, capsys, s3, tmp_path):
    """The issue's scenario: 16 objects, 14 cannot be written (7 names over 1,024 UTF-8 bytes, 7 with
    metadata over 2 KB). Before: migrate exit 1, then verify "2 ok" exit 0 and restore "restored 2 of
    2" exit 0."""
    good = {"a.txt": b"alpha\n" * 50, "b/c.txt": b"gamma\n" * 70}
    long_names = {f"long-{i}-" + "é" * 600: f"long {i}".encode() for i in range(7)}
    big_meta = {f"meta/{i}.txt": f"meta {i}\n".encode() * 20 for i in range(7)}
    for name, data in {**good, **long_names}.items():
        project.cc.upload_blob(name, data)
    for name, data in big_meta.items():
        project.cc.upload_blob(name, data, metadata=BIG_METADATA)
    cfg = project.make()
    failing = set(long_names) | set(big_meta)

    code, out, err = cli(capsys, "migrate", "--config", cfg)
    assert code == 1

    code, out, err = cli(capsys, "verify", "--config", cfg)
    assert code == 1
    assert "docs: 2 of 16 objects verified; 14 never arrived (14 failed (permanent))" in out
    assert named(err) == failing
    assert all(f"refused in run 1:" in line for line in err.splitlines() if line.startswith("  failed (permanent)"))

    code, out, err = cli(capsys, "restore", "--config", cfg, "--dataset", "docs", "--to", tmp_path / "out")
    assert code == 1
    assert "docs: restored 2 of 2 objects" in out
    assert "14 object(s) of the dataset's newest complete source listing could not be restored" in err
    assert named(err) == failing
    assert sorted(restored_files(tmp_path / "out")) == ["a.txt", "b/c.txt"]

    code, status = status_json(capsys, cfg)
    assert code == 1 and not status["complete"] and status["known"]
    assert status["expected"]["objects"] == 16 and status["listing"]["run"] == 1
    assert status["counts"]["verified"]["objects"] == 2 and status["counts"]["failed (permanent)"]["objects"] == 14
    assert {e["source_key"] for e in status["not_verified"]} == failing
    code, out, err = cli(capsys, "status", "--config", cfg)
    assert code == 1 and "docs: 2 of 16 objects verified; 14 never arrived" in out and named(err) == failing
    # The report names each of them with its reason (before: only a count of failed objects).
    assert cli(capsys, "report", "--config", cfg, "--out", tmp_path / "report.html")[0] == 0
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "<h2>Objects that did not arrive</h2>" in page
    assert all(f"<code>{html.escape(name)}</code>" in page for name in failing)
    assert page.count("failed (permanent)</td>") == 14 and "over the limit of 1024" in page

    # Fixed at the source: the long names go (they can never be written as they are), the metadata
    # is cut down. The next run copies the 7, and the dataset is complete.
    for name in long_names:
        project.cc.delete_blob(name)
    for name in big_meta:
        project.cc.get_blob_client(name).set_blob_metadata({"note": "short"})
    code, out, err = cli(capsys, "migrate", "--config", cfg)
    assert code == 0, err
    code, out, err = cli(capsys, "verify", "--config", cfg)
    assert code == 0, err
    assert "docs: 9 of 9 objects verified; complete" in out
    code, out, err = cli(capsys, "restore", "--config", cfg, "--dataset", "docs", "--to", tmp_path / "again")
    assert code == 0, err
    code, status = status_json(capsys, cfg)
    assert code == 0 and status["complete"] and status["expected"]["objects"] == 9 and status["listing"]["run"] == 3
    assert status["last_verify"]["run"] == 4


def test_a_killed_run_leaves_the_dataset_not_known_to_be_complete(project, capsys, s3, s3_server):
    """A dataset copied and verified; new objects arrive and the next migrate is killed (SIGKILL)
    part-way. Before: verify checked the copies the state claimed, all fine, and exited 0."""
    for i in range(3):
        project.cc.upload_blob(f"old/{i}.txt", f"old {i}\n".encode() * 30)
    host, port = urlsplit(s3_server.url).hostname, urlsplit(s3_server.url).port
    with FaultProxy(host, port) as proxy:
        cfg = project.make(endpoint=proxy.url, transfer={"concurrency": 1, "object_concurrency": 1})
        assert cli(capsys, "migrate", "--config", cfg)[0] == 0
        code, out, err = cli(capsys, "verify", "--config", cfg)
        assert code == 0, err

        for i in range(12):
            project.cc.upload_blob(f"new/{i:02d}.txt", f"new {i}\n".encode() * 30)
        proxy.delay_next(0.7, method="PUT", pattern=r"/new/", times=10**6)  # each new object takes 0.7 s
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
        log = open(project.dir / "killed-migrate.log", "wb")  # noqa: SIM115 (closed below)
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "migrate", "--config", str(cfg)], env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and _rows(project.dir, 3, "new/%") < 2:
                time.sleep(0.1)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            log.close()
        assert 2 <= _rows(project.dir, 3, "new/%") < 12  # killed part-way through the new objects
        time.sleep(1.0)  # the proxy answers the dead process's last request (and logs its hang-up) first
    capsys.readouterr()
    cfg = project.make(transfer={"concurrency": 1, "object_concurrency": 1})  # straight to the S3 server now
    code, out, err = cli(capsys, "verify", "--config", cfg)
    assert code == 1
    assert "docs: 3 of 3 objects verified; not known to be complete: run 3 (migrate, started" in out
    # the verify found the killed run dead (its run_start without a run_end in the manifest)
    assert "was interrupted before it went through the source listing" in out
    code, out, err = cli(capsys, "status", "--config", cfg)
    assert code == 1 and "not known" in out and "3 interrupted" in out
    code, out, err = cli(capsys, "restore", "--config", cfg, "--dataset", "docs", "--to", project.dir / "out")
    assert code == 1 and "not known to be complete: run 3" in err

    code, out, err = cli(capsys, "migrate", "--config", cfg)
    assert code == 0, err
    code, out, err = cli(capsys, "verify", "--config", cfg)
    assert code == 0 and "docs: 15 of 15 objects verified; complete" in out, err
    assert cli(capsys, "status", "--config", cfg)[0] == 0


def _rows(state_dir: Path, run: int, like: str) -> int:
    db = state_dir / "state" / "state.db"
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            return conn.execute("SELECT count(*) FROM objects WHERE run_id = ? AND source_key LIKE ?",
                                (run, like)).fetchone()[0]
    except sqlite3.OperationalError:  # the run has not created its tables yet
        return 0


def test_objects_of_a_listed_run_that_no_shard_reached_are_named_never_attempted(project, capsys, s3):
    """The flows' way (listing into the state store, then shard by shard), stopped after its first
    shard: the objects of the other shards are listed, and never attempted."""
    from config.loader import load_config
    from engine.run import MigrationRun

    blobs = {f"f{i:02d}.txt": f"file {i}\n".encode() * 40 for i in range(8)}
    for name, data in blobs.items():
        project.cc.upload_blob(name, data)
    cfg = project.make()
    loaded = load_config(cfg)
    run = MigrationRun.start(loaded, ["docs"])
    # While the run is open, what it holds is out of the collector's full passes; not after.
    assert gc.get_freeze_count() > 0
    try:
        run.list_dataset("docs", shard_bytes=10**9, shard_objects=3)
        run.ready_shards("docs")
        plan = run.shard_plan()
        assert len(plan.shards) == 3
        assert run.copy_shard("docs", 0).copied == 3
    finally:
        run.finish()  # not completed: the run is recorded as interrupted
    assert gc.get_freeze_count() == 0

    code, out, err = cli(capsys, "verify", "--config", cfg)
    assert code == 1
    assert "docs: 3 of 8 objects verified; 5 never arrived (5 never attempted)" in out
    assert named(err) == {f"f{i:02d}.txt" for i in range(3, 8)}
    assert "listed by run 1, but no run since tried to copy it" in err
    code, status = status_json(capsys, cfg)
    assert code == 1 and status["counts"]["never attempted"] == {"objects": 5, "bytes": sum(
        len(blobs[f"f{i:02d}.txt"]) for i in range(3, 8))}

    assert cli(capsys, "migrate", "--config", cfg)[0] == 0
    code, out, err = cli(capsys, "verify", "--config", cfg)
    assert code == 0 and "docs: 8 of 8 objects verified; complete" in out, err


def test_an_object_selected_again_after_its_copy_was_deleted_is_copied_again(project, capsys, s3, tmp_path):
    """An exclude pattern takes `drafts/x.txt` out of the dataset; `--delete-removed` deletes its
    copy. Before, once the pattern was dropped, the next run found the object "unchanged" (its
    ETag had not changed) and skipped it: the destination never got it back, and verify, which
    no longer expected it, said nothing."""
    project.cc.upload_blob("keep.txt", b"keep\n" * 10)
    project.cc.upload_blob("drafts/x.txt", b"draft\n" * 10)
    cfg = project.make()
    assert cli(capsys, "migrate", "--config", cfg)[0] == 0
    cfg = project.make(exclude=["drafts/*"])
    code, out, err = cli(capsys, "migrate", "--config", cfg, "--delete-removed")
    assert code == 0, err
    assert keys_below(s3, BUCKET, f"{project.container}/") == {"keep.txt"}

    cfg = project.make()
    code, out, err = cli(capsys, "migrate", "--config", cfg)
    assert code == 0, err
    assert keys_below(s3, BUCKET, f"{project.container}/") == {"keep.txt", "drafts/x.txt"}
    code, out, err = cli(capsys, "verify", "--config", cfg)
    assert code == 0 and "docs: 2 of 2 objects verified; complete" in out, err
    code, out, err = cli(capsys, "restore", "--config", cfg, "--dataset", "docs", "--to", tmp_path / "out")
    assert code == 0 and (tmp_path / "out" / "drafts" / "x.txt").read_bytes() == b"draft\n" * 10
    # While it was excluded, status counted it as removed at the source (its copy deleted).
    cfg = project.make(exclude=["drafts/*"])
    assert cli(capsys, "migrate", "--config", cfg, "--delete-removed")[0] == 0
    code, status = status_json(capsys, cfg)
    assert status["removed_at_source"] == {"kept": 0, "deleted": 1} and status["expected"]["objects"] == 1


def test_status_without_state_is_one_sentence_and_writes_nothing(project, capsys):
    cfg = project.make()
    code, out, err = cli(capsys, "status", "--config", cfg)
    assert code == 2 and "no state at" in err and "exitplan migrate --config" in err
    assert not (project.dir / "state" / "state.db").exists()


def test_the_verify_and_exit_plan_flows_fail_while_a_dataset_is_not_complete(tmp_path, monkeypatch,
                                                                               azurite_connection_string, s3_server,
                                                                               s3, prefect_harness):
    """A dataset with one object that cannot be written: the verify flow found no discrepancy, and
    before it ended Completed. Now it ends Failed with the dataset's sentence, and shows the status
    table and the object; the exit-plan flow likewise, until the object is gone from the source."""
    from flows.orchestrate import exit_plan, migrate_flow, verify_flow
    from tests import projects
    from tests.integration.test_flows import artifacts_of

    monkeypatch.setenv(CS_VAR, azurite_connection_string)
    too_long = "claims/" + "é" * 600 + ".csv"
    path, container, blobs = projects.write_project(tmp_path, azurite_connection_string, s3_server.url,
                                                    project="complete", bucket=BUCKET, cs_var=CS_VAR,
                                                    extra_blobs={too_long: b"x"})
    assert migrate_flow(config_path=str(path), return_state=True).is_failed()
    state = verify_flow(config_path=str(path), return_state=True)
    sentence = f"claims: {len(blobs) - 1} of {len(blobs)} objects verified; 1 never arrived (1 failed (permanent))"
    assert state.is_failed() and sentence in state.message and "discrepancies" not in state.message
    found = artifacts_of(state.state_details.flow_run_id)
    tables = {a.key: json.loads(a.data) for a in found["table"]}
    (row,) = tables[f"exitplan-{container}-status"]
    assert (row["complete"], row["expected"], row["verified"], row["failed (permanent)"]) == ("no", len(blobs),
                                                                                              len(blobs) - 1, 1)
    (missing,) = tables[f"exitplan-{container}-not-verified"]
    assert missing["object"] == too_long and missing["status"] == "failed (permanent)"
    (summary,) = found["markdown"]
    assert "## Complete?" in summary.data and sentence in summary.data and f"`{too_long}`" in summary.data

    state = exit_plan(config_path=str(path), deep_verify=False, return_state=True)
    assert state.is_failed() and sentence in state.message
    assert state.result(raise_on_failure=False).figures["complete"] is False

    BlobServiceClient.from_connection_string(azurite_connection_string).get_container_client(container) \
        .delete_blob(too_long)
    state = exit_plan(config_path=str(path), deep_verify=False, return_state=True)
    assert state.is_completed(), state.message
    assert state.result()["complete"] is True
    tables = {a.key: json.loads(a.data) for a in artifacts_of(state.state_details.flow_run_id)["table"]}
    assert tables[f"exitplan-{container}-status"][0]["complete"] == "yes"


def test_a_folder_marker_copied_from_the_source_is_verified_not_reported_missing(project, capsys):
    """Azure tools leave zero-byte "folder/" blobs; exitplan copies them like any object. verify
    used to skip destination keys ending in "/" while listing, so such a copy was "missing" at
    every verify, failed, copied again by migrate, and missing again."""
    project.cc.upload_blob("folder/", b"", metadata={"hdi_isfolder": "true"})
    project.cc.upload_blob("folder/a.txt", b"a\n" * 10)
    cfg = project.make()
    assert cli(capsys, "migrate", "--config", cfg)[0] == 0
    code, out, err = cli(capsys, "verify", "--config", cfg)
    assert code == 0 and "docs: 2 of 2 objects verified; complete" in out, err


def test_cleanup_never_aborts_uploads_while_a_migration_of_the_project_runs(project, capsys, s3):
    """A running migration opens uploads and records them as it goes: one it opened after cleanup
    read the state looked unknown, and `cleanup --abort` aborted it under the migration."""
    from config.loader import load_config
    from engine.project import lock_project

    project.cc.upload_blob("a.txt", b"a")
    cfg = project.make()
    assert cli(capsys, "migrate", "--config", cfg)[0] == 0
    key = f"{project.container}/big.bin"
    upload_id = s3.create_multipart_upload(Bucket=BUCKET, Key=key)["UploadId"]  # as a running migration would

    def open_uploads() -> set[str]:
        return {u["UploadId"] for u in s3.list_multipart_uploads(Bucket=BUCKET, Prefix=key).get("Uploads", [])}

    held = lock_project(load_config(cfg))
    try:
        code, out, err = cli(capsys, "cleanup", "--config", cfg, "--abort")
        assert code == 1 and f"another migration of project `{project.container}` is running" in err
        assert upload_id in open_uploads()
        assert cli(capsys, "cleanup", "--config", cfg)[0] == 0  # listing them is harmless
    finally:
        held.close()
    code, out, err = cli(capsys, "cleanup", "--config", cfg, "--abort")
    assert code == 0 and upload_id in out and upload_id not in open_uploads()
