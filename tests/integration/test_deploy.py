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
import json
import threading
from contextlib import ExitStack, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

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
    # `failing` also carries alerts: a failed run and a run running too long (0.003 h: 10.8 s) are sent
    # to a webhook block pointing at a receiver of ours.
    alerts = ({"notify": "custom-webhook/ops", "running_longer_than_hours": 0.003, "late_after_minutes": None}
              if spread == "failing" else None)
    config, container, blobs = write_project(tmp_path, azurite_connection_string, s3_server.url, project="deploy",
                                             bucket=BUCKET, cs_var=CS_VAR, orchestration=orchestration,
                                             state={"url_env": STATE_VAR} if extra_env else None,
                                             extra_blobs={TOO_LONG: b"x"} if spread == "failing" else None,
                                             alerts=alerts)
    mark = uuid.uuid4().hex

    # A Prefect server of our own: its own PREFECT_HOME (SQLite), a free loopback port.
    spec = lp.prefect_spec(lp.free_port(), tmp_path / "server-home")
    spec = dataclasses.replace(spec, env={**spec.env, MARK: mark})
    api_url = f"http://{lp.LOOPBACK}:{spec.port}/api"
    server = lp.start_server(spec, tmp_path / "prefect-server.log")
    worker = None
    worker_log = tmp_path / "worker.log"
    stack = ExitStack()
    try:
        # What a worker host (and CI) has: the API URL, no ephemeral server, analytics off, the
        # credential the configuration names; nothing else of Prefect's from the test's shell.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update({"PREFECT_API_URL": api_url, "PREFECT_SERVER_EPHEMERAL_ENABLED": "false", "DO_NOT_TRACK": "1",
                    "PREFECT_HOME": str(tmp_path / "client-home"), CS_VAR: azurite_connection_string, MARK: mark,
                    **extra_env})

        if alerts:
            hook = stack.enter_context(WebhookReceiver())
            missing = subprocess.run([str(BIN / "exitplan"), "deploy", "--config", str(config)], env=env,
                                     cwd=tmp_path, capture_output=True, text=True, timeout=300)
            assert missing.returncode == 2 and "no block 'custom-webhook/ops'" in missing.stderr, missing.stderr
            from prefect.blocks.notifications import CustomWebhookNotificationBlock

            with _client(api_url):
                CustomWebhookNotificationBlock(name="ops", url=hook.url, method="POST",
                                               json_data={"subject": "{{subject}}", "body": "{{body}}"}).save("ops")
        deployed = subprocess.run([str(BIN / "exitplan"), "deploy", "--config", str(config)], env=env,
                                  cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        if alerts:
            project = yaml.safe_load(config.read_text())["project"]
            assert f"alert: exitplan {project}: run failed -> custom-webhook/ops" in deployed.stdout
            assert f"alert: exitplan {project}: run too long -> custom-webhook/ops" in deployed.stdout
            assert "run late" not in deployed.stdout  # switched off: never created
        worker_cmd = f"PREFECT_API_URL={api_url} exitplan worker --pool exitplan --config {config.resolve()}"
        assert worker_cmd in deployed.stdout, deployed.stdout
        assert CS_VAR in deployed.stdout and azurite_connection_string not in deployed.stdout

        with _client(api_url) as client:
            pool = client.read_work_pool("exitplan")
            assert pool.type == "process"
            assert client.read_global_concurrency_limit_by_name("exitplan-provider-lab").limit >= 1
            deps = {name: client.read_deployment_by_name(name) for name in
                    ("exit-plan/exit-plan", "exitplan-migrate/nightly-delta", "exitplan-verify/weekly-verify")}
        names = ", ".join(sorted(yaml.safe_load(config.read_text())["datasets"]))
        for dep in deps.values():
            assert dep.work_pool_name == "exitplan"
            described = dep.parameter_openapi_schema["properties"]["datasets"]["description"]
            assert described.endswith(f"empty: all of them. This configuration's: {names}."), described
            assert dep.parameters["config_path"] == str(config.resolve())
            assert dep.pull_steps == [{"prefect.deployments.steps.set_working_directory":
                                       {"directory": str(lp.REPO_ROOT)}}]
        assert deps["exit-plan/exit-plan"].schedules == []
        with _client(api_url) as client:
            cut = client.read_deployment_by_name("exitplan-cutover/cutover")
        assert cut.schedules == [] and cut.global_concurrency_limit.limit == 1
        assert "datasets" in cut.parameter_openapi_schema.get("required", [])
        assert cut.parameter_openapi_schema["properties"]["datasets"]["description"].endswith(
            f"This configuration's: {names}.")
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
            # The alert: the failure's one sentence, sent by the server's automation to the webhook.
            sent = hook.wait_for(lambda m: m["subject"].endswith("run failed"), 60)
            assert state.message in sent["body"] and str(run.id) in sent["body"], sent  # with a link to the run
            # A run that started and never ended: "still running" after 10.8 s (Prefect checks
            # proactive triggers every few seconds).
            from prefect.states import Running

            with _client(api_url) as client:
                stuck = client.create_flow_run_from_deployment(deps["exit-plan/exit-plan"].id, state=Running())
            sent = hook.wait_for(lambda m: m["subject"].endswith("run still running"), 90)
            assert stuck.name in sent["body"], sent
            # What the verify flows emit when copies differ from what was recorded, sent from a process
            # of its own as a flow run's process sends it (and drains its events when it ends): this
            # process's events worker may still be bound to an earlier test's server.
            emit = ("from flows.alerts import discrepancy_event; "
                    f"discrepancy_event({project!r}, {{'run_id': 7, 'datasets': [{{'dataset': 'claims', 'failed': 3}}, "
                    "{'dataset': 'stays', 'failed': 0}]})")
            emitted = subprocess.run([sys.executable, "-c", emit], env=env, cwd=lp.REPO_ROOT, capture_output=True,
                                     text=True, timeout=120)
            assert emitted.returncode == 0, emitted.stderr
            sent = hook.wait_for(lambda m: m["subject"].endswith("verify found discrepancies"), 90)
            assert sent["body"].startswith("3 object(s)") and "(claims)" in sent["body"], sent
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
        stack.close()
        if worker is not None:
            lp.stop_pid(worker.pid)
            worker.wait(timeout=15)
        lp.stop_pid(server.pid)
        server.wait(timeout=15)
    if Path("/proc/self/environ").exists():
        assert _wait_gone(mark) == [], "a process started by the worker or the server is still running"
    print(f"deploy + worker + exit-plan run in {time.monotonic() - began:.1f} s")


class WebhookReceiver:
    """An HTTP server on 127.0.0.1 keeping the JSON bodies POSTed to it (what a notification block
    of type custom-webhook sends)."""

    def __init__(self):
        received = self.received = []
        cond = self.cond = threading.Condition()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with cond:
                    received.append(json.loads(body))
                    cond.notify_all()
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer((lp.LOOPBACK, 0), Handler)
        self.url = f"http://{lp.LOOPBACK}:{self.server.server_port}/hook"

    def __enter__(self) -> "WebhookReceiver":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def wait_for(self, matches, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                found = [m for m in self.received if matches(m)]
                if found:
                    return found[0]
                left = deadline - time.monotonic()
                assert left > 0, f"no such notification within {timeout} s; received: {self.received}"
                self.cond.wait(left)


def _logs_of(flow_run_id):
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    return LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
