"""`exitplan deploy` and a process worker, end to end: a real Prefect server started here, the
deployments of deploy/prefect.yaml registered by `exitplan deploy`, a worker started with the
documented command, an `exit-plan` run triggered, completed, and the data in the bucket; then the
worker and the server stopped, and nothing of theirs left running."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest

from flows import lab_processes as lp
from tests.projects import write_project
from tests.s3client import keys_below, lab_s3_client

pytestmark = pytest.mark.integration

CS_VAR = "EXITPLAN_TEST_DEPLOY_AZURE_CS"
STATE_VAR = "EXITPLAN_TEST_DEPLOY_STATE_URL"
BUCKET = "exitplan-deploy"
MARK = "EXITPLAN_TEST_DEPLOY_MARK"  # in the environment of every process this test starts
BIN = Path(sys.executable).parent  # the venv's exitplan and prefect
RUN_TIMEOUT = 180.0


def _processes_marked(mark: str) -> list[int]:
    """PIDs of live processes whose environment holds MARK=mark (children inherit it, whatever their
    process group or session)."""
    found = []
    needle = f"{MARK}={mark}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if needle in environ.split(b"\0") and stat.rpartition(")")[2].split()[:1] != ["Z"]:
            found.append(int(entry.name))
    return found


def _wait_gone(mark: str, timeout: float = 15.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := _processes_marked(mark)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


@contextmanager
def _client(api_url: str):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        yield client


@pytest.fixture(scope="module")
def s3(s3_server):
    return lab_s3_client(s3_server.url, BUCKET)


TOO_LONG = "claims/" + "é" * 600 + ".csv"  # 600 characters for Azure, 1,211 bytes for S3 (over 1,024)


@pytest.mark.parametrize("spread", ["threads", "shard-workers", "failing"])
def test_deploy_worker_runs_exit_plan(tmp_path, monkeypatch, azurite_connection_string, s3_server, s3, spread,
                                     request):
    """`shard-workers`: the run's shards are flow runs of the `shards` deployment, taken by the
    worker as runs of their own (each its own process), the state in a PostgreSQL database.
    `failing`: one object's name is too long for the destination; the run ends Failed with its
    one-sentence reason, and neither the run's log nor the worker's terminal holds a traceback."""
    began = time.monotonic()
    monkeypatch.setenv(CS_VAR, azurite_connection_string)
    extra_env: dict[str, str] = {}
    orchestration = {}
    if spread == "shard-workers":
        extra_env[STATE_VAR] = request.getfixturevalue("postgres").create_database(f"deploy_{uuid.uuid4().hex[:12]}")
        monkeypatch.setenv(STATE_VAR, extra_env[STATE_VAR])
        orchestration = {"shard_workers": 2}
    config, container, blobs = write_project(tmp_path, azurite_connection_string, s3_server.url, project="deploy",
                                             bucket=BUCKET, cs_var=CS_VAR, orchestration=orchestration,
                                             state={"url_env": STATE_VAR} if extra_env else None,
                                             extra_blobs={TOO_LONG: b"x"} if spread == "failing" else None)
    mark = uuid.uuid4().hex

    # A Prefect server of our own: its own PREFECT_HOME (SQLite), a free loopback port.
    spec = lp.prefect_spec(lp.free_port(), tmp_path / "server-home")
    spec = dataclasses.replace(spec, env={**spec.env, MARK: mark})
    api_url = f"http://{lp.LOOPBACK}:{spec.port}/api"
    server = lp.start_server(spec, tmp_path / "prefect-server.log")
    worker = None
    worker_log = tmp_path / "worker.log"
    try:
        # What a worker host (and CI) has: the API URL, no ephemeral server, analytics off, the
        # credential the configuration names; nothing else of Prefect's from the test's shell.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update({"PREFECT_API_URL": api_url, "PREFECT_SERVER_EPHEMERAL_ENABLED": "false", "DO_NOT_TRACK": "1",
                    "PREFECT_HOME": str(tmp_path / "client-home"), CS_VAR: azurite_connection_string, MARK: mark,
                    **extra_env})

        deployed = subprocess.run([str(BIN / "exitplan"), "deploy", "--config", str(config)], env=env,
                                  cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        worker_cmd = f"PREFECT_API_URL={api_url} exitplan worker --pool exitplan --config {config.resolve()}"
        assert worker_cmd in deployed.stdout, deployed.stdout
        assert CS_VAR in deployed.stdout and azurite_connection_string not in deployed.stdout

        with _client(api_url) as client:
            pool = client.read_work_pool("exitplan")
            assert pool.type == "process"
            assert client.read_global_concurrency_limit_by_name("exitplan-provider-lab").limit >= 1
            deps = {name: client.read_deployment_by_name(name) for name in
                    ("exit-plan/exit-plan", "exitplan-migrate/nightly-delta", "exitplan-verify/weekly-verify")}
        for dep in deps.values():
            assert dep.work_pool_name == "exitplan"
            assert dep.parameters["config_path"] == str(config.resolve())
            assert dep.pull_steps == [{"prefect.deployments.steps.set_working_directory":
                                       {"directory": str(lp.REPO_ROOT)}}]
        assert deps["exit-plan/exit-plan"].schedules == []
        for name, params in (("exitplan-migrate/nightly-delta", {"delete_removed": False}),
                             ("exitplan-verify/weekly-verify", {"deep": True, "sample": 0.05})):
            (sched,) = deps[name].schedules
            assert sched.active and sched.schedule.cron and sched.schedule.timezone == "Europe/Paris"
            assert params.items() <= deps[name].parameters.items()
            assert deps[name].global_concurrency_limit.limit == 1

        # The documented worker command, started elsewhere than the checkout (the pull step moves
        # the run there); it asks for work every second instead of every 10 s.
        with open(worker_log, "wb") as log:
            worker = subprocess.Popen(
                [str(BIN / "exitplan"), "worker", "--pool", "exitplan", "--config", str(config),
                 "--work-dir", str(tmp_path / "worker")],
                env=dict(env, PREFECT_WORKER_QUERY_SECONDS="1"), cwd=tmp_path, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

        from prefect.deployments import run_deployment

        with _client(api_url):
            run = run_deployment("exit-plan/exit-plan", timeout=0)
        deadline = time.monotonic() + RUN_TIMEOUT
        with _client(api_url) as client:
            while True:
                state = client.read_flow_run(run.id).state
                if state.is_final() or time.monotonic() > deadline or worker.poll() is not None:
                    break
                time.sleep(1)
            logs = client.read_logs(log_filter=_logs_of(run.id))
        detail = ("\n".join(f"{l.level} {l.message}" for l in logs) + "\n--- worker ---\n"
                  + worker_log.read_text(errors="replace")[-6000:])
        assert azurite_connection_string not in detail  # no credential in the run's logs
        if spread == "failing":
            assert state.is_failed(), f"{state.type} {state.message}\n{detail}"
            assert state.message.startswith("1 object(s) failed in 1 shard(s)"), state.message
            assert "Traceback" not in detail and "unexpected exception" not in detail, detail
            assert "Finished in state Completed()" not in detail  # no line per completed task
            assert TOO_LONG in detail  # the failed object named in the run's log, with its reason
            assert set(blobs) - keys_below(s3, BUCKET, f"{container}/") == {TOO_LONG}
            return
        assert state.is_completed(), f"{state.type} {state.message}\n{detail}"
        assert set(blobs) <= keys_below(s3, BUCKET, f"{container}/")
        assert azurite_connection_string not in detail  # no credential in the run's logs
        if spread == "shard-workers":
            from prefect.client.schemas.filters import FlowFilter, FlowFilterName

            from engine.state import StateStore

            with _client(api_url) as client:
                shard_runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["exitplan-shards"])))
            assert sorted(r.state.type.value for r in shard_runs) == ["COMPLETED"] * 3, detail
            assert all(r.parent_task_run_id for r in shard_runs)  # subflows of the exit-plan run in the UI
            with StateStore(extra_env[STATE_VAR]) as store:
                shards = store.shards(1)
            # each shard ran in the process of its own flow run, on the worker
            assert [s.status for s in shards] == ["ok"] * 3 and len({s.worker for s in shards}) == 3
    finally:
        if worker is not None:
            lp.stop_pid(worker.pid)
            worker.wait(timeout=15)
        lp.stop_pid(server.pid)
        server.wait(timeout=15)
    if Path("/proc/self/environ").exists():
        assert _wait_gone(mark) == [], "a process started by the worker or the server is still running"
    print(f"deploy + worker + exit-plan run in {time.monotonic() - began:.1f} s")


def _logs_of(flow_run_id):
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    return LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
