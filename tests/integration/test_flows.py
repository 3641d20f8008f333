"""The Prefect flows on the lab servers, under Prefect's test harness: exit_plan end to end, what
the UI is shown (artifacts), a failing object failing only its shard, and user errors as failed runs."""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

import pytest

from engine import run as engine_run
from flows.cli import main
from tests import projects
from tests.faultproxy import FaultProxy
from tests.s3client import keys_below, lab_s3_client

pytestmark = pytest.mark.integration

CS_VAR = "EXITPLAN_TEST_FLOWS_AZURE_CS"
BUCKET = "exitplan-flows"


@pytest.fixture(scope="module")
def s3(s3_server):
    return lab_s3_client(s3_server.url, BUCKET)


def write_project(tmp_path: Path, cs: str, s3_url: str, **options):
    return projects.write_project(tmp_path, cs, s3_url, project="flows", bucket=BUCKET, cs_var=CS_VAR, **options)


@pytest.fixture
def env(monkeypatch, azurite_connection_string, prefect_harness):
    monkeypatch.setenv(CS_VAR, azurite_connection_string)
    return azurite_connection_string


def artifacts_of(flow_run_id) -> dict[str, list]:
    """The artifacts a flow run created, by type, oldest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    by_type: dict[str, list] = {}
    for a in sorted(found, key=lambda a: a.created):
        by_type.setdefault(a.type, []).append(a)
    return by_type


def logs_of(flow_run_id) -> list[str]:
    """The messages of a flow run's log (its tasks' included), once the log worker has sent them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # sends what is queued, and waits
    with get_client(sync_client=True) as client:
        return [log.message for log in client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))]


def task_tags(flow_run_id) -> dict[str, set[str]]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {t.name: set(t.tags) for t in runs}


def task_states(flow_run_id) -> list[tuple[str, str]]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return sorted((t.name, t.state.type.value) for t in runs)


def stored_keys(s3, container: str) -> set[str]:
    return keys_below(s3, BUCKET, f"{container}/")


def test_exit_plan_migrates_verifies_and_shows_it(tmp_path, env, s3_server, s3):
    from flows.orchestrate import exit_plan

    path, container, blobs = write_project(tmp_path, env, s3_server.url)
    state = exit_plan(config_path=str(path), return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert (result["objects"], result["copied"], result["failed"]) == (11, 11, 0)
    assert (result["shards"], result["failed_shards"], result["verified"], result["discrepancies"]) == (3, 0, 11, 0)
    assert result["bytes_copied"] == sum(len(b) for b in blobs.values())
    assert set(blobs) <= stored_keys(s3, container)

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        name = client.read_flow_run(state.state_details.flow_run_id).name
    assert re.fullmatch(rf"exit-plan {container} all-datasets \d{{4}}-\d\d-\d\d \d\d:\d\dZ", name), name  # what, when
    found = artifacts_of(state.state_details.flow_run_id)
    progress = {a.key: a.data for a in found["progress"]}
    # the copy's bytes, and the verify's objects: each phase shows how far it is
    assert progress == {f"exitplan-{container}-progress": 100.0, f"exitplan-{container}-verify-progress": 100.0}
    assert any(m.startswith("verify claims: 11 objects to check") for m in logs_of(state.state_details.flow_run_id))
    tables = {a.key: json.loads(a.data) for a in found["table"]}
    (inventory,) = tables[f"exitplan-{container}-inventory"]
    assert (inventory["dataset"], inventory["objects"], inventory["bytes"]) == ("claims", 11, result["bytes_copied"])
    shards = tables[f"exitplan-{container}-shards"]
    assert [(s["shard"], s["objects"], s["copied"], s["status"]) for s in shards] == [
        (0, 4, 4, "ok"), (1, 4, 4, "ok"), (2, 3, 3, "ok")]
    assert sum(s["bytes_copied"] for s in shards) == result["bytes_copied"]
    assert shards[2]["seconds"] > 0 and shards[2]["mb_per_s"] > 0  # the shard with the 6 MiB object
    # The report and the manifest, next to the data, and linked from the run.
    links = {a.key: a.data for a in found["markdown"]}  # Prefect keeps a link artifact as markdown
    report_key = f"_exitplan/{container}/reports/exit-plan-run-{result['run_id']}.html"
    assert f"({s3_server.url}/{BUCKET}/{report_key})" in links[f"exitplan-{container}-report"]
    assert f"({s3_server.url}/{BUCKET}/_exitplan/{container}/manifest.jsonl)" in links[f"exitplan-{container}-manifest"]
    report = s3.get_object(Bucket=BUCKET, Key=report_key)
    assert report["ContentType"].startswith("text/html") and b"<html" in report["Body"].read()
    (verified,) = tables[f"exitplan-{container}-verify"]
    assert (verified["objects"], verified["ok"], verified["read_back"]) == (11, 11, 11)
    summary = links[f"exitplan-{container}-summary"]
    assert "11 copied" in summary and "**0 failed**" in summary
    assert "| claims | exitplan lab (its S3 server, moto, and its OpenSSH SFTP server) |" in summary
    assert "**lab**" in summary
    assert f"| bucket {BUCKET} | `{container}/` |" in summary  # the bucket and the prefix below it
    assert "## Who holds the keys" in summary and "- claims: Tink AES256_GCM_HKDF_1MB" in summary
    everything = json.dumps([a.data for a in sum(found.values(), [])]) + json.dumps(result)
    assert env not in everything and "AccountKey" not in everything  # no credential shown anywhere
    # each task run named after what it does, as the UI lists them
    assert task_states(state.state_details.flow_run_id) == [
        ("copy claims shard 0", "COMPLETED"), ("copy claims shard 1", "COMPLETED"),
        ("copy claims shard 2", "COMPLETED"), ("list claims", "COMPLETED"), ("sovereignty gate", "COMPLETED"),
        ("verify every dataset (deep)", "COMPLETED")]
    tagged = task_tags(state.state_details.flow_run_id)
    assert all("dataset:claims" in tagged[n] for n in tagged if n.startswith(("copy claims", "list claims"))), tagged

    # A second run is a delta: nothing changed, nothing copied.
    again = exit_plan(config_path=str(path), deep_verify=False, return_state=True)
    assert again.is_completed(), again.message
    assert (again.result()["copied"], again.result()["unchanged"]) == (0, 11)


def test_a_shard_places_an_object_as_a_live_listing_does(tmp_path, env, s3_server, s3):
    """What the listing pass stores for a shard keeps what the source listed beyond size and ETag:
    tags, creation time, blob kind, and why a blob cannot be read (an Archive one is refused by its
    reason, never read and failed)."""
    from azure.storage.blob import BlobServiceClient, StandardBlobTier

    from flows.orchestrate import migrate_flow

    path, container, blobs = write_project(tmp_path, env, s3_server.url)
    cc = BlobServiceClient.from_connection_string(env).get_container_client(container)
    cc.upload_blob("claims/tagged.csv", b"a,b\n", tags={"Dept": "Cardio", "study": "x y"})
    log = cc.get_blob_client("claims/log.txt")
    log.create_append_blob()
    log.append_block(b"one\n")
    cc.upload_blob("claims/frozen.csv", b"old\n", standard_blob_tier=StandardBlobTier.ARCHIVE)
    state = migrate_flow(config_path=str(path), return_state=True)
    assert state.is_failed() and "1 object(s) failed" in state.message, state.message
    tables = {a.key: json.loads(a.data) for a in artifacts_of(state.state_details.flow_run_id)["table"]}
    (failure,) = tables[f"exitplan-{container}-failures"]
    assert failure["object"] == "claims/frozen.csv" and "Archive tier" in failure["reason"]
    assert "exitplan rehydrate" in failure["reason"]
    tags = s3.get_object_tagging(Bucket=BUCKET, Key=f"{container}/claims/tagged.csv")["TagSet"]
    assert {t["Key"]: t["Value"] for t in tags} == {"Dept": "Cardio", "study": "x y"}
    head = s3.head_object(Bucket=BUCKET, Key=f"{container}/claims/log.txt")["Metadata"]
    assert head["exitplan-source-kind"] == "append" and "exitplan-source-created" in head


def test_the_exit_plan_rehydrates_archive_blobs_first_when_asked(tmp_path, env, s3_server, s3):
    """With `rehydrate`, the Archive-tier blobs are asked back online and waited for before the copy,
    so the run copies them (Azurite rehydrates at once)."""
    from azure.storage.blob import BlobServiceClient, StandardBlobTier

    from flows.orchestrate import exit_plan

    path, container, blobs = write_project(tmp_path, env, s3_server.url)
    cc = BlobServiceClient.from_connection_string(env).get_container_client(container)
    cc.upload_blob("claims/archived.csv", b"old,row\n", standard_blob_tier=StandardBlobTier.ARCHIVE)
    state = exit_plan(config_path=str(path), deep_verify=False, rehydrate=True, rehydrate_poll_minutes=0.001,
                      return_state=True)
    assert state.is_completed(), state.message
    assert state.result()["copied"] == len(blobs) + 1 and "claims/archived.csv" in stored_keys(s3, container)
    run_id = state.state_details.flow_run_id
    assert ("rehydrate the Archive blobs", "COMPLETED") in task_states(run_id)
    tables = {a.key: json.loads(a.data) for a in artifacts_of(run_id)["table"]}
    (row,) = tables[f"exitplan-{container}-rehydration"]
    assert (row["dataset"], row["still_in_archive"], row["asked_now"], row["refused"]) == ("claims", 0, 0, 0)
    assert any("rehydration after 0 min: 0 blob(s)" in m for m in logs_of(run_id))


def test_a_failing_object_fails_its_shard_only(tmp_path, env, s3_server, s3):
    """An object that cannot be written (its name is over the destination's 1,024 bytes) fails its
    shard with the reason; the other shards complete; the run ends Failed, naming it."""
    from flows.orchestrate import migrate_flow

    too_long = "claims/" + "é" * 600 + ".csv"  # 600 characters for Azure, 1,211 bytes for S3
    path, container, blobs = write_project(tmp_path, env, s3_server.url, extra_blobs={too_long: b"x"})
    state = migrate_flow(config_path=str(path), return_state=True)
    assert state.is_failed()
    assert "1 object(s) failed in 1 shard(s)" in state.message
    figures = state.result(raise_on_failure=False).figures
    assert (figures["copied"], figures["failed"], figures["failed_shards"]) == (len(blobs) - 1, 1, 1)
    stored = stored_keys(s3, container)
    assert set(blobs) - stored == {too_long}
    run_id = state.state_details.flow_run_id
    assert [t for t in task_states(run_id) if t[0].startswith("copy ")] == [
        ("copy claims shard 0", "COMPLETED"), ("copy claims shard 1", "COMPLETED"), ("copy claims shard 2", "FAILED")]
    found = artifacts_of(run_id)
    tables = {a.key: json.loads(a.data) for a in found["table"]}
    (failure,) = tables[f"exitplan-{container}-failures"]
    assert failure["object"] == too_long and "1024" in failure["reason"].replace(",", "")
    assert failure["again"].startswith("permanent: fix it at the source") and list(failure)[:2] == ["reason", "again"]
    failed_shards = [s for s in tables[f"exitplan-{container}-shards"] if s["status"] != "ok"]
    assert len(failed_shards) == 1 and too_long in failed_shards[0]["reason"]
    assert "**1 failed**" in found["markdown"][0].data


def test_a_transient_failure_is_retried_as_a_shard(tmp_path, env, s3_server, s3):
    """A destination answering 503 to a part of one object beyond the engine's own attempts fails
    the object as transient; the shard task's retry copies it. (An 8 MiB budget makes the 5 MiB
    parts streamed: one SDK attempt each, so the engine's `part_attempts` are the only retries.)"""
    from flows.orchestrate import migrate_flow

    with FaultProxy("127.0.0.1", s3_server.port) as proxy:
        path, container, blobs = write_project(tmp_path, env, proxy.url, transfer={"part_attempts": 2, "memory_budget": "8MiB"},
                                               orchestration={"shard_retries": 1, "shard_retry_delay": 0})
        proxy.fail_next(2, status=503, method="PUT", pattern=r"big\.bin\?(?=.*partNumber=1\b)")
        state = migrate_flow(config_path=str(path), return_state=True)
        assert proxy.pending_faults() == 0
    assert state.is_completed(), state.message
    assert state.result()["copied"] == len(blobs)
    assert set(blobs) <= stored_keys(s3, container)
    shards = {a.key: json.loads(a.data) for a in artifacts_of(state.state_details.flow_run_id)["table"]}
    assert [s["attempts"] for s in shards[f"exitplan-{container}-shards"]] == [1, 1, 2]
    # The engine's own retry lines, logged from its threads, are in the run's log in the UI.
    lines = logs_of(state.state_details.flow_run_id)
    assert any("engine.pipeline: " in m and "big.bin" in m and "attempt 1 failed" in m and "retrying" in m
               for m in lines), lines


def test_a_configuration_error_fails_the_run_with_one_sentence(tmp_path, env, s3_server):
    from flows.orchestrate import exit_plan

    path, _, _ = write_project(tmp_path, env, s3_server.url)
    state = exit_plan(config_path=str(path), datasets=["nope"], return_state=True)
    assert state.is_failed()
    assert "no dataset named 'nope'" in state.message and "Traceback" not in state.message


def test_runs_share_the_provider_connection_limit(tmp_path, env, s3_server, s3):
    """Connections to a provider are slots of its global concurrency limit: a run cut to the limit
    waits while another holder has the slots, and copies once they are released."""
    import threading
    import time

    from prefect.client.orchestration import get_client
    from prefect.concurrency.sync import concurrency

    from flows.orchestrate import migrate_flow
    from flows.provider_limits import provider_limit_name

    path, container, blobs = write_project(tmp_path, env, s3_server.url, transfer={"concurrency": 8},
                                           orchestration={"provider_connections": {"lab": 4}})
    assert main(["migrate", "--config", str(path), "--dry-run"]) == 0  # the limit is created by the flow, not here
    holding, release = threading.Event(), threading.Event()

    def other_run() -> None:  # e.g. another project's run writing to the same provider
        with get_client(sync_client=True) as client:
            client.upsert_global_concurrency_limit_by_name(provider_limit_name("lab"), 4)
        with concurrency(provider_limit_name("lab"), occupy=4, strict=True):
            holding.set()
            release.wait(60)

    holder = threading.Thread(target=other_run)
    holder.start()
    assert holding.wait(30)
    states = []
    flow_thread = threading.Thread(target=lambda: states.append(migrate_flow(config_path=str(path), return_state=True)))
    flow_thread.start()
    time.sleep(4)
    assert stored_keys(s3, container) == set()  # waiting for slots: nothing moved
    release.set()
    holder.join(30)
    flow_thread.join(120)
    (state,) = states
    assert state.is_completed(), state.message
    assert set(blobs) <= stored_keys(s3, container)
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(provider_limit_name("lab"))
    assert (limit.limit, limit.active_slots) == (4, 0)


def test_inventory_and_verify_flows(tmp_path, env, s3_server, s3):
    """The inventory flow's table; the verify flow after a migration, then after an object was
    corrupted at the destination: Failed, with the object in the discrepancies table."""
    from flows.orchestrate import inventory_flow, migrate_flow, verify_flow

    path, container, blobs = write_project(tmp_path, env, s3_server.url)
    state = inventory_flow(config_path=str(path), return_state=True)
    assert state.is_completed(), state.message
    (row,) = state.result()
    assert (row["dataset"], row["objects"], row["bytes"]) == ("claims", 11, sum(len(b) for b in blobs.values()))
    tables = {a.key: json.loads(a.data) for a in artifacts_of(state.state_details.flow_run_id)["table"]}
    assert tables[f"exitplan-{container}-inventory"] == [row]

    assert migrate_flow(config_path=str(path), return_state=True).is_completed()
    state = verify_flow(config_path=str(path), deep=True, return_state=True)
    assert state.is_completed(), state.message
    assert state.result()["datasets"][0]["ok"] == 11

    key = f"{container}/claims/05.csv"
    body = bytearray(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    body[-1] ^= 1
    s3.put_object(Bucket=BUCKET, Key=key, Body=bytes(body))
    state = verify_flow(config_path=str(path), deep=True, return_state=True)
    assert state.is_failed() and "1 object(s) with discrepancies" in state.message
    tables = {a.key: json.loads(a.data) for a in artifacts_of(state.state_details.flow_run_id)["table"]}
    found = tables[f"exitplan-{container}-discrepancies"]  # an object rewritten: several findings, one object
    assert {(d["object"], d["source"]) for d in found} == {(key, "claims/05.csv")}
    (summary,) = artifacts_of(state.state_details.flow_run_id)["markdown"]
    assert "**10 objects match**" in summary.data and "**1 with discrepancies**" in summary.data
    assert f"`{key}` (source `claims/05.csv`)" in summary.data


def test_two_migrations_of_one_project_never_run_at_once(tmp_path, env, s3_server, s3, capsys):
    """While a migration of the project holds its lock, another one (CLI or flow) refuses to start,
    naming the holder; once it is released, the next one runs."""
    from config.loader import load_config
    from engine.project import lock_project
    from flows.orchestrate import migrate_flow

    path, container, blobs = write_project(tmp_path, env, s3_server.url)
    held = lock_project(load_config(path))
    try:
        assert main(["migrate", "--config", str(path)]) == 1
        err = capsys.readouterr().err
        assert f"another migration of project `{container}` is running (pid " in err and "Traceback" not in err
        state = migrate_flow(config_path=str(path), return_state=True)
        assert state.is_failed() and f"another migration of project `{container}` is running" in state.message
        assert stored_keys(s3, container) == set()
    finally:
        held.close()
    assert main(["migrate", "--config", str(path)]) == 0
    assert set(blobs) <= stored_keys(s3, container)


def test_a_dry_run_flow_writes_nothing(tmp_path, env, s3_server, s3):
    from flows.orchestrate import migrate_flow

    too_long = "claims/" + "é" * 600 + ".csv"
    path, container, blobs = write_project(tmp_path, env, s3_server.url, extra_blobs={too_long: b"x"})
    state = migrate_flow(config_path=str(path), dry_run=True, return_state=True)
    assert state.is_completed(), state.message
    (row,) = state.result()
    assert (row["objects_to_write"], row["refused"], row["unchanged"]) == (len(blobs) - 1, 1, 0)
    assert row["bytes"] == sum(len(b) for k, b in blobs.items() if k != too_long) and too_long in row["refusals"]
    tables = {a.key: json.loads(a.data) for a in artifacts_of(state.state_details.flow_run_id)["table"]}
    assert tables[f"exitplan-{container}-plan"] == [row]
    # The estimate beside the plan: its table and what each figure rests on.
    estimate = {a.key: a.data for a in artifacts_of(state.state_details.flow_run_id)["markdown"]}[f"exitplan-{container}-estimate"]
    assert "| dataset | to copy |" in estimate and "- assumes throughput: 50.0 MB/s (assumed:" in estimate
    assert stored_keys(s3, container) == set()
    assert not (tmp_path / "state" / "state.db").exists()


def test_shards_in_processes_of_their_own(tmp_path, env, s3_server, s3):
    """With `shard_processes`, shard tasks run in other processes of the host, attached to the run
    the flow opened: every object is copied and verified, the connections are split between them,
    and a failing object still fails only its shard."""
    import os as _os

    from flows.orchestrate import exit_plan

    too_long = "claims/" + "é" * 600 + ".csv"
    path, container, blobs = write_project(tmp_path, env, s3_server.url, extra_blobs={too_long: b"x"},
                                           orchestration={"shard_processes": 2, "provider_connections": {"lab": 8}})
    state = exit_plan(config_path=str(path), return_state=True)
    assert state.is_failed() and "1 object(s) failed in 1 shard(s)" in state.message
    figures = state.result(raise_on_failure=False).figures
    assert (figures["copied"], figures["failed"], figures["verified"]) == (len(blobs) - 1, 1, len(blobs) - 1)
    assert set(blobs) - stored_keys(s3, container) == {too_long}
    run_id = state.state_details.flow_run_id
    tables = {a.key: json.loads(a.data) for a in artifacts_of(run_id)["table"]}
    shards = tables[f"exitplan-{container}-shards"]
    assert [(s["status"], s["objects"]) for s in shards] == [("ok", 4), ("ok", 4), ("failed", 4)]
    workers = {s["worker"].rsplit(":", 1)[1] for s in shards}
    assert str(_os.getpid()) not in workers and len(workers) >= 1
    (failure,) = tables[f"exitplan-{container}-failures"]
    assert failure["object"] == too_long
    # 8 connections for the run: two processes of 2 transfer workers + 2 object drivers each.
    assert any("8 connection(s) per provider over 2 shard processes" in m for m in logs_of(run_id))


def test_a_shard_that_stops_on_an_error_fails_the_run(tmp_path, env, s3_server, s3, monkeypatch):
    """A shard task that stops on an error (here the state store failing under it) is shown as
    such, the other shards finish, and the run is recorded as failed, not ok."""
    from engine.state import StateStore
    from flows.orchestrate import migrate_flow

    path, container, blobs = write_project(tmp_path, env, s3_server.url)
    real = engine_run.MigrationRun._copy

    def failing(self, name, items, progress, retry_rows=None):
        first = next(iter(items))
        if first[0].key == "claims/04.csv":  # the first object of shard 1
            raise OSError("disk I/O error")
        return real(self, name, iter([first, *items]), progress, retry_rows)

    monkeypatch.setattr(engine_run.MigrationRun, "_copy", failing)
    state = migrate_flow(config_path=str(path), return_state=True)
    assert state.is_failed()
    shards = {a.key: json.loads(a.data) for a in artifacts_of(state.state_details.flow_run_id)["table"]}
    assert [(s["shard"], s["status"]) for s in shards[f"exitplan-{container}-shards"]] == [(0, "ok"), (1, "error"), (2, "ok")]
    assert "OSError: disk I/O error" in shards[f"exitplan-{container}-shards"][1]["reason"]
    assert stored_keys(s3, container) == set(blobs) - {f"claims/{i:02d}.csv" for i in range(4, 8)}
    with StateStore(tmp_path / "state" / "state.db") as store:
        assert store.get_run(1).status == "failed"


def test_a_run_that_cannot_take_its_connections_starts_no_listing(tmp_path, env, s3_server, s3, monkeypatch):
    """The listing tasks start once the run holds the provider's connections: when taking them
    fails, the run closes with no listing task left writing into it."""
    from contextlib import contextmanager

    from engine.state import StateStore
    from flows import orchestrate

    path, container, blobs = write_project(tmp_path, env, s3_server.url)
    listed: list[str] = []
    real = engine_run.MigrationRun.list_dataset
    monkeypatch.setattr(engine_run.MigrationRun, "list_dataset",
                        lambda self, name, **kw: (listed.append(name), real(self, name, **kw))[1])

    @contextmanager
    def refused(names, **kw):
        time.sleep(1.0)  # as a limit refused after a while: a listing task started before would be going
        raise RuntimeError("the Prefect API refused the provider's concurrency limit")
        yield

    monkeypatch.setattr(orchestrate, "concurrency", refused)
    state = orchestrate.migrate_flow(config_path=str(path), return_state=True)
    assert state.is_failed()
    assert listed == []
    with StateStore(tmp_path / "state" / "state.db") as store:
        assert store.get_run(1).status != "running"
        assert store.listing_length(1, "claims") == 0
    assert stored_keys(s3, container) == set()


def test_a_listing_that_cannot_be_submitted_stops_those_submitted_before_it(tmp_path, env, s3_server, s3,
                                                                           monkeypatch):
    """The Prefect API refuses the second dataset's listing task: the run fails with that error,
    and the first dataset's listing has ended (or stopped) before the run closes."""
    import yaml

    from flows import orchestrate

    path, container, blobs = write_project(tmp_path, env, s3_server.url)
    cfg = yaml.safe_load(path.read_text())
    cfg["datasets"]["scans"] = {**cfg["datasets"]["claims"], "prefix": "scans/", "dest_prefix": f"{container}-scans/"}
    path.write_text(yaml.safe_dump(cfg))
    ended: list[str] = []
    real = engine_run.MigrationRun.list_dataset

    def slow_listing(self, name, **kw):
        time.sleep(1.0)  # still listing when the next submission fails
        try:
            return real(self, name, **kw)
        finally:
            ended.append(name)

    real_task = orchestrate.list_dataset

    class Refusing:
        def with_options(self, **kw):
            task = real_task.with_options(**kw)
            if kw.get("tags") == {orchestrate.dataset_tag("scans")}:
                class Refused:
                    def submit(self, *a, **k):
                        raise ConnectionError("the Prefect API did not answer")
                return Refused()
            return task

    real_finish = engine_run.MigrationRun.finish

    def finish(self, *a, **kw):
        ended.append("the run closed")
        return real_finish(self, *a, **kw)

    monkeypatch.setattr(engine_run.MigrationRun, "list_dataset", slow_listing)
    monkeypatch.setattr(engine_run.MigrationRun, "finish", finish)
    monkeypatch.setattr(orchestrate, "list_dataset", Refusing())
    state = orchestrate.migrate_flow(config_path=str(path), return_state=True)
    assert state.is_failed() and "the Prefect API did not answer" in state.message, state.message
    assert ended == ["claims", "the run closed"]  # the listing ended first, not left running into a closed run


def test_a_run_with_more_shards_than_allowed_merges_neighbours(tmp_path, env, s3_server, s3):
    from flows.orchestrate import migrate_flow

    path, container, blobs = write_project(tmp_path, env, s3_server.url, orchestration={"max_shards": 2})
    state = migrate_flow(config_path=str(path), return_state=True)
    assert state.is_completed(), state.message
    shards = {a.key: json.loads(a.data) for a in artifacts_of(state.state_details.flow_run_id)["table"]}
    # Cut into 4 + 4 + 3 while listing; with max_shards 2, the shards double in size with each one
    # defined (engine.shards.ShardDefiner): the first cut shard alone, then the next two merged.
    assert [(s["shard"], s["objects"], s["copied"]) for s in shards[f"exitplan-{container}-shards"]] == [(0, 4, 4), (1, 7, 7)]
    assert set(blobs) <= stored_keys(s3, container)


def test_shards_are_copied_while_the_listing_goes_on(tmp_path, env, s3_server, s3, monkeypatch):
    """The first shard is copied before the last page is listed (issue 16: no listing pass before
    the first copy): pages of 2 blobs, each taking 2 s (the first shard is final after
    6 s, the listing after 12: room for a slow task start on a loaded machine; with 1 s pages, one
    full run in two workers saw the first shard's task start 2.6 s after the listing ended);
    shards of 4 objects."""
    from config.loader import load_config
    from connectors.azure_blob import AzureBlobSource
    from engine.project import open_state
    from flows import orchestrate

    listing = AzureBlobSource.list_pages
    built = AzureBlobSource.__init__

    def small_pages(self, container_client, **kw):
        built(self, container_client, **{**kw, "page_size": 2})

    def slow_pages(self, part, marker=None):
        for page in listing(self, part, marker):
            time.sleep(2.0)
            yield page

    monkeypatch.setattr(AzureBlobSource, "__init__", small_pages)
    monkeypatch.setattr(AzureBlobSource, "list_pages", slow_pages)
    monkeypatch.setattr(orchestrate, "PROGRESS_EVERY", 0.1)
    path, container, blobs = write_project(tmp_path, env, s3_server.url)
    state = orchestrate.migrate_flow(config_path=str(path), return_state=True)
    assert state.is_completed(), state.message
    assert set(blobs) <= stored_keys(s3, container)
    store = open_state(load_config(path), read_only=True)
    try:
        (listed,) = store.run_datasets("claims")
        shards = store.shards(listed.run_id, "claims")
    finally:
        store.close()
    assert [s.objects for s in shards] == [4, 4, 3] and all(s.status == "ok" for s in shards)
    assert shards[0].started_at < listed.through_at, (shards[0].started_at, listed.through_at)
    logs = logs_of(state.state_details.flow_run_id)
    assert any(m == "every dataset listed: 3 shard(s) in all" for m in logs), logs


def test_a_listing_that_fails_stops_the_run_and_the_other_listings_which_the_next_run_goes_on_with(
        tmp_path, env, s3_server, s3, monkeypatch):
    """Copying no longer waits for every listing: a dataset whose listing fails still fails the run
    with its own sentence, the other dataset's listing stops at its next page, and the next run
    lists that one on from where it got and copies everything."""
    import yaml

    from config.loader import load_config
    from connectors.azure_blob import AzureBlobSource
    from connectors.base import TransientError
    from engine.project import open_state
    from flows import orchestrate

    path, container, blobs = write_project(tmp_path, env, s3_server.url)
    cfg = yaml.safe_load(path.read_text())
    cfg["datasets"]["scans"] = {**cfg["datasets"]["claims"], "prefix": "scans/", "dest_prefix": f"{container}-scans/"}
    cfg["datasets"]["claims"]["prefix"] = "claims/"
    path.write_text(yaml.safe_dump(cfg))
    listing, built, broken = AzureBlobSource.list_pages, AzureBlobSource.__init__, [True]

    def small_pages(self, container_client, **kw):
        built(self, container_client, **{**kw, "page_size": 2})

    def pages(self, part, marker=None):
        for page in listing(self, part, marker):
            if part.prefix.startswith("scans/") and broken:
                time.sleep(0.5)  # claims has stored a page
                raise TransientError("azure: the connection was reset")
            time.sleep(1.0 if broken else 0.0)  # claims lists for 5 s
            yield page

    monkeypatch.setattr(AzureBlobSource, "__init__", small_pages)
    monkeypatch.setattr(AzureBlobSource, "list_pages", pages)
    monkeypatch.setattr(orchestrate, "PROGRESS_EVERY", 0.1)
    state = orchestrate.migrate_flow(config_path=str(path), return_state=True)
    assert state.is_failed() and "dataset `scans`" in state.message and "the connection was reset" in state.message, \
        state.message
    store = open_state(load_config(path), read_only=True)
    try:
        (claims,) = store.run_datasets("claims")
    finally:
        store.close()
    assert claims.through_at is None and "the run stopped before the listing ended" in claims.stopped, claims

    broken.clear()
    again = orchestrate.migrate_flow(config_path=str(path), return_state=True)
    assert again.is_completed(), again.message
    assert any(f"the listing goes on from run {claims.run_id}'s" in m for m in logs_of(again.state_details.flow_run_id))
    # the dataset's prefix is not part of the destination key
    assert {k.removeprefix("claims/") for k in blobs if k.startswith("claims/")} <= stored_keys(s3, container)


def test_a_killed_flow_run_is_resumed_mid_object_by_the_next(tmp_path, env, s3_server, s3):
    """A worker's flow run killed (SIGKILL) while a multipart object is half sent: the next flow run
    takes the project's lock, continues the same multipart upload (the parts sent are kept), and
    the object reads back and decrypts to its source bytes. (The killed run's `lab` connection
    slots stay leased for up to 5 minutes: tests after this one must not need them all.)"""
    import os as _os
    import signal
    import sqlite3
    import subprocess
    import sys
    import time

    from prefect.settings import PREFECT_API_URL

    from flows.orchestrate import migrate_flow, verify_flow

    with FaultProxy("127.0.0.1", s3_server.port) as proxy:
        proxy.delay_next(0.8, method="PUT", pattern=r"partNumber=", times=10**6)
        path, container, blobs = write_project(
            tmp_path, env, proxy.url, transfer={"concurrency": 1, "object_concurrency": 1},
            orchestration={"parallel_shards": 1}, extra_blobs={"scans/huge.bin": _os.urandom(21 * 1024 * 1024)})
        child = subprocess.Popen(
            [sys.executable, "-c", f"from flows.orchestrate import migrate_flow; migrate_flow(config_path={str(path)!r})"],
            env={**_os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True)
        db = tmp_path / "state" / "state.db"
        query = ("SELECT o.upload_id FROM parts p JOIN objects o ON o.id = p.object_id "
                 "WHERE o.source_key = 'scans/huge.bin' LIMIT 1")
        deadline, upload_id = time.monotonic() + 90, None
        while upload_id is None and time.monotonic() < deadline and child.poll() is None:
            try:
                con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
                row = con.execute(query).fetchone()
                con.close()
                upload_id = row[0] if row else None
            except sqlite3.Error:
                pass
            time.sleep(0.05)
        assert upload_id, "the first flow run never got a part of the big object acknowledged"
        _os.killpg(child.pid, signal.SIGKILL)
        child.wait(30)

        state = migrate_flow(config_path=str(path), return_state=True)
        assert state.is_completed(), state.message
        proxy.clear()
        checked = verify_flow(config_path=str(path), deep=True, return_state=True)  # read back, decrypt, SHA-256
        assert checked.is_completed(), checked.message
        assert checked.result()["datasets"][0]["ok"] == len(blobs)
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    rows = con.execute("SELECT r.id, o.state, o.upload_id FROM objects o JOIN runs r ON r.id = o.run_id "
                       "WHERE o.source_key = 'scans/huge.bin' ORDER BY o.id").fetchall()
    con.close()
    assert rows[0][1:] == ("in_progress", upload_id)  # the killed run's row
    assert rows[-1][1:] == ("verified", upload_id)  # continued (not started over), then verified
    assert set(blobs) <= stored_keys(s3, container)


def test_the_cutover_flow_records_a_ready_dataset_and_names_what_stops_one(tmp_path, env, s3_server, s3):
    """The `cutover` deployment's flow: after a migration, the dataset is cut over (a signed record,
    its digest in the flow's result and artifact); a copy corrupted at the destination since fails
    the next one at its deep verify, naming the step and the object; no dataset named is a
    configuration error."""
    from engine.audit import CUTOVER
    from flows.orchestrate import cutover_flow, migrate_flow

    path, container, blobs = write_project(tmp_path, env, s3_server.url)
    assert migrate_flow(config_path=str(path), return_state=True).is_completed()
    state = cutover_flow(config_path=str(path), datasets=["claims"], return_state=True)
    assert state.is_completed(), state.message
    (figures,) = state.result()
    assert figures["cut_over"] and len(figures["objects_sha256"]) == 64
    manifest = tmp_path / "state" / "audit" / "manifest.jsonl"
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    (record,) = [r for r in records if r.get("type") == CUTOVER]
    assert record["objects"] == len(blobs) and record["objects_sha256"] == figures["objects_sha256"]
    (summary,) = [a for a in artifacts_of(state.state_details.flow_run_id)["markdown"]
                  if a.key == f"exitplan-{container}-cutover"]
    assert "## claims: cut over" in summary.data and figures["objects_sha256"] in summary.data

    key = f"{container}/claims/03.csv"
    body = bytearray(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    body[-1] ^= 1
    s3.put_object(Bucket=BUCKET, Key=key, Body=bytes(body))
    state = cutover_flow(config_path=str(path), datasets=["claims"], return_state=True)
    assert state.is_failed()
    assert "claims: not cut over (verify): the deep verify did not pass" in state.message, state.message
    logs = "\n".join(logs_of(state.state_details.flow_run_id))
    assert "1/3 the last delta" in logs and "2/3 a deep verify" in logs and "3/3" not in logs
    (summary,) = [a for a in artifacts_of(state.state_details.flow_run_id)["markdown"]
                  if a.key == f"exitplan-{container}-cutover"]
    assert "## claims: not cut over (step: verify)" in summary.data and "claims/03.csv" in summary.data

    state = cutover_flow(config_path=str(path), datasets=[], return_state=True)
    assert state.is_failed() and "a cutover names its datasets" in state.message


def test_the_verify_progress_is_shown_from_the_verify_threads(prefect_harness, caplog, monkeypatch):
    """The verify calls its observer from the threads of its own pool, which start with an empty
    context: no Prefect settings given as a context (the demo gives the API's URL so, and its
    deep verify logged "No Prefect API URL provided" for every update), no run context. Each call
    runs in a copy of the context the observer was made in; the artifact is updated from there."""
    import contextvars
    import threading

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterId

    import flows.tasks as tasks
    from engine.verify import VerifyProgress

    made_in = contextvars.ContextVar("made_in")
    made_in.set("the task's context")
    seen = []
    real = tasks.show_progress
    monkeypatch.setattr(tasks, "show_progress", lambda *args: seen.append(made_in.get(None)) or real(*args))
    shown = tasks.VerifyProgressShown("threads", 2, logging.getLogger("exitplan.test.verify-progress"))
    shown.UPDATE_EVERY = 0.0
    thread = threading.Thread(target=shown.progress, args=(VerifyProgress("claims", 5, 10, 0, 500),))
    thread.start()
    thread.join()
    assert seen == ["the task's context"]
    assert "could not be updated" not in caplog.text
    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(artifact_filter=ArtifactFilter(id=ArtifactFilterId(any_=[shown.artifact])))
    assert artifact.data == 25.0  # half of the first of two datasets
