"""`exitplan worker` on a real Prefect server: the process worker's temporary files (which hold a
run's environment, credentials included) stay in a private directory that is emptied before and
after; a SIGTERM cancels the run being executed (Cancelled in the API, not left Running) before the
worker stops; credentials the configuration reads from the environment are named, never shown."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from flows import lab_processes as lp

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
SECRET = f"secret-{uuid.uuid4().hex}"  # the value of a credential variable in the worker's environment
SECRET_VAR = "EXITPLAN_TEST_WORKER_SECRET"

SLOW_FLOW = '''
import time
from prefect import flow

@flow(name="slow-for-worker-test")
def slow(seconds: float = 120.0):
    time.sleep(seconds)
'''


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    home = tmp_path_factory.mktemp("worker-prefect")
    spec = lp.prefect_spec(lp.free_port(), home / "server")
    server = lp.start_server(spec, home / "server.log")
    try:
        yield f"http://{lp.LOOPBACK}:{spec.port}/api", home
    finally:
        lp.stop_pid(server.pid)
        server.wait(timeout=15)


def _env(api: str, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_API_URL=api, PREFECT_SERVER_EPHEMERAL_ENABLED="false", DO_NOT_TRACK="1",
               PREFECT_HOME=str(home / "client"), PREFECT_WORKER_QUERY_SECONDS="1")
    return env


def _deploy_slow_flow(tmp_path: Path, env: dict[str, str], pool: str) -> None:
    (tmp_path / "slowflow.py").write_text(SLOW_FLOW, encoding="utf-8")
    code = (f"from prefect.client.orchestration import get_client\n"
            f"from prefect.client.schemas.actions import WorkPoolCreate\n"
            f"from prefect.workers.process import ProcessWorker\n"
            f"from prefect import flow\n"
            f"with get_client(sync_client=True) as c:\n"
            f"    c.create_work_pool(WorkPoolCreate(name={pool!r}, type='process',"
            f" base_job_template=ProcessWorker.get_default_base_job_template()))\n"
            f"flow.from_source(source={str(tmp_path)!r}, entrypoint='slowflow.py:slow')"
            f".deploy(name='slow', work_pool_name={pool!r})\n")
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def _lab_config(tmp_path: Path) -> Path:
    cfg = {
        "version": 1, "project": "worker-test",
        "sources": {"az": {"kind": "azure_blob", "connection_string_env": SECRET_VAR}},
        "destinations": {"lab": {"provider": "lab", "endpoint_url": "http://127.0.0.1:9", "region": "eu-west-3",
                                 "bucket": "worker-test"}},
        "datasets": {"d": {"source": "az", "container": "claims", "destination": "lab", "public": True}},
        "state": {"path": str(tmp_path / "state")},
    }
    path = tmp_path / "exitplan.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def test_worker_private_files_and_clean_stop(tmp_path, prefect_api):
    api, home = prefect_api
    env = _env(api, home)
    pool = f"p-{uuid.uuid4().hex[:8]}"
    _deploy_slow_flow(tmp_path, env, pool)
    work_dir = tmp_path / "worker"
    left = work_dir / "tmp" / "prefect-workspace-attempt-old"  # what a killed worker leaves
    left.mkdir(parents=True)
    (left / "workspace.json").write_text(f'{{"environment": {{"{SECRET_VAR}": "{SECRET}"}}}}')
    os.chmod(work_dir, 0o755)  # made private again by the worker
    cs = f"BlobEndpoint=http://127.0.0.1:9/devstoreaccount1;AccountName=devstoreaccount1;AccountKey={SECRET}"
    log = tmp_path / "worker.log"
    with open(log, "wb") as out:
        worker = subprocess.Popen(
            [str(BIN / "exitplan"), "worker", "--pool", pool, "--work-dir", str(work_dir),
             "--config", str(_lab_config(tmp_path)), "--stop-timeout", "60"],
            env=dict(env, **{SECRET_VAR: cs}), cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)
    try:
        _wait(lambda: "starting the process worker" in log.read_text(), 60, "the worker to start")
        assert not left.exists()
        assert stat.S_IMODE(work_dir.stat().st_mode) == 0o700
        assert stat.S_IMODE((work_dir / "tmp").stat().st_mode) == 0o700

        from prefect.client.orchestration import get_client
        from prefect.deployments import run_deployment
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: api}):
            run = run_deployment("slow-for-worker-test/slow", timeout=0)
            with get_client(sync_client=True) as client:
                _wait(lambda: client.read_flow_run(run.id).state.is_running(), 120, "the flow run to run")
                workspace = _wait(lambda: list((work_dir / "tmp").glob("prefect-workspace-attempt-*/workspace.json")),
                                  30, "the run's workspace file in the private directory")
                assert SECRET in workspace[0].read_text()  # Prefect's own file: why it must stay private
                assert stat.S_IMODE(workspace[0].stat().st_mode) & 0o077 == 0

                worker.send_signal(signal.SIGTERM)
                worker.wait(timeout=120)
                state = client.read_flow_run(run.id).state
        output = log.read_text()
        assert worker.returncode == 0, output
        assert state.is_cancelled(), f"{state.type}: {state.message}\n{output}"
        assert "cancelling 1 flow run(s)" in output, output
        assert list((work_dir / "tmp").iterdir()) == []
        assert SECRET_VAR in output and "connection_string_env" in output and "*_block" in output
        assert SECRET not in output
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()


def test_worker_refuses_a_directory_in_use(tmp_path, prefect_api):
    api, home = prefect_api
    env = _env(api, home)
    work_dir = tmp_path / "worker"
    first = subprocess.Popen([str(BIN / "exitplan"), "worker", "--pool", "nobody-pool", "--work-dir", str(work_dir)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait(lambda: (work_dir / "worker.lock").exists(), 60, "the first worker")
        time.sleep(1.0)
        second = subprocess.run([str(BIN / "exitplan"), "worker", "--pool", "nobody-pool", "--work-dir",
                                 str(work_dir)], env=env, capture_output=True, text=True, timeout=60)
        assert second.returncode == 2, second.stdout + second.stderr
        assert "another exitplan worker uses" in second.stderr and "--work-dir" in second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=60)
    assert first.returncode == 0
