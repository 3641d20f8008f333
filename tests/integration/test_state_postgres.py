"""The state in a PostgreSQL database (`state.url_env`) instead of the SQLite file: the CLI and the
flows on a real server, the project's lock across processes, and an unreachable database."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from flows.cli import main
from tests import projects
from tests.s3client import keys_below, lab_s3_client

pytestmark = pytest.mark.integration

CS_VAR = "EXITPLAN_TEST_PG_AZURE_CS"
DB_VAR = "EXITPLAN_TEST_STATE_URL"
BUCKET = "exitplan-pg"


@pytest.fixture(scope="module")
def s3(s3_server):
    return lab_s3_client(s3_server.url, BUCKET)


@pytest.fixture
def project(tmp_path, monkeypatch, azurite_connection_string, s3_server, s3, postgres):
    """A small project whose state is a fresh PostgreSQL database (its bucket made by `s3`)."""
    monkeypatch.setenv(CS_VAR, azurite_connection_string)
    monkeypatch.setenv(DB_VAR, postgres.create_database(f"state_{uuid.uuid4().hex[:12]}"))

    def make(**options) -> tuple[Path, str, dict[str, bytes]]:
        return projects.write_project(tmp_path, azurite_connection_string, s3_server.url, project="pgstate",
                                      bucket=BUCKET, cs_var=CS_VAR, state={"url_env": DB_VAR}, **options)

    return make


def stored_keys(s3, container: str) -> set[str]:
    return keys_below(s3, BUCKET, f"{container}/")


def test_the_cli_keeps_its_state_in_postgresql(tmp_path, capsys, project, s3):
    path, container, blobs = project()
    assert main(["migrate", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "state: postgresql+psycopg://exitplan:***@127.0.0.1:" in out and "secret-not-checked" not in out
    assert set(blobs) <= stored_keys(s3, container)
    assert main(["migrate", "--config", str(path)]) == 0  # a delta: everything unchanged, from the database
    assert "0 objects, 0 B copied" in capsys.readouterr().out
    assert main(["verify", "--config", str(path), "--deep"]) == 0
    assert main(["report", "--config", str(path), "--out", str(tmp_path / "r.html")]) == 0
    assert not (tmp_path / "state" / "state.db").exists()  # nothing in SQLite


def test_flows_and_shard_processes_share_the_database(project, s3, prefect_harness):
    from flows.orchestrate import exit_plan

    # (No tight provider limit here: a flow run killed by another test may still hold a few of the
    # session's `lab` slots until its lease runs out.)
    path, container, blobs = project(orchestration={"shard_processes": 2})
    state = exit_plan(config_path=str(path), return_state=True)
    assert state.is_completed(), state.message
    figures = state.result()
    assert (figures["copied"], figures["verified"], figures["shards"]) == (len(blobs), len(blobs), 3)
    assert set(blobs) <= stored_keys(s3, container)


def test_the_projects_lock_is_held_in_the_database(project, capsys):
    from config.loader import load_config
    from engine.project import lock_project

    path, container, blobs = project()
    held = lock_project(load_config(path))  # e.g. a run on another host
    try:
        assert main(["migrate", "--config", str(path)]) == 1
        err = capsys.readouterr().err
        assert f"another migration of project `{container}` is running" in err and "state database" in err
    finally:
        held.close()
    assert main(["migrate", "--config", str(path)]) == 0


def test_an_unreachable_state_database_is_one_sentence_without_the_password(project, capsys, monkeypatch):
    from flows import lab_processes as lp

    path, _, _ = project()
    monkeypatch.setenv(DB_VAR, f"postgresql+psycopg://exitplan:hunter2@127.0.0.1:{lp.free_port()}/nope")
    assert main(["migrate", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "the state database postgresql+psycopg://exitplan:***@127.0.0.1:" in err
    assert "hunter2" not in err and "Traceback" not in err


def test_shard_workers_without_the_shards_deployment_refuse_before_the_run(project, s3, prefect_harness):
    from flows.orchestrate import migrate_flow

    path, container, blobs = project(orchestration={"shard_workers": 2})
    state = migrate_flow(config_path=str(path), return_state=True)
    assert state.is_failed() and "exitplan-shards/shards, which is not on this Prefect server" in state.message
    assert stored_keys(s3, container) == set()
