"""Session fixtures: real servers on free loopback ports, started and stopped by the tests."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest

from flows import lab_processes as lp

# Never let a test (or an SDK it drives) reach a real cloud or a stray Prefect server.
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
for _var in ("AWS_PROFILE", "AWS_CA_BUNDLE", "AZURE_STORAGE_CONNECTION_STRING"):
    os.environ.pop(_var, None)


@dataclass(frozen=True)
class Server:
    name: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{lp.LOOPBACK}:{self.port}"


def _serve(spec: lp.ServerSpec, tmp_path_factory):
    log = tmp_path_factory.mktemp(spec.name) / f"{spec.name}.log"
    proc = lp.start_server(spec, log)
    try:
        yield Server(spec.name, spec.port)
    finally:
        lp.stop_pid(proc.pid)


@pytest.fixture(scope="session")
def azurite(tmp_path_factory):
    """An Azurite blob service; `.connection_string` for the SDK."""
    yield from _serve(lp.azurite_spec(lp.free_port()), tmp_path_factory)


@pytest.fixture(scope="session")
def azurite_connection_string(azurite) -> str:
    return lp.azurite_connection_string(azurite.port)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """The lab's S3 server (moto) on a free port."""
    yield from _serve(lp.s3_spec(lp.free_port()), tmp_path_factory)


@pytest.fixture(scope="session")
def prefect_harness():
    """Prefect's own test harness (a temporary SQLite-backed API server on a free loopback port),
    shared by the session. Flow heartbeats are off: they add about a second per flow run. The
    server gets 180 s to start (Prefect's default, 30 s, is too short on a loaded 2-core machine,
    where it was seen to take 59 s)."""
    from prefect.settings import temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with temporary_settings(updates={"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": None}), prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def seeded(azurite_connection_string):
    """The lab's `tiny` seed in the session's Azurite (containers claims, stays, imaging); the
    objects written, from `lab.seed.expected_objects`."""
    from lab import seed as lab_seed

    objects = lab_seed.expected_objects("tiny")
    lab_seed.seed_azurite(azurite_connection_string, objects)
    return objects


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server on a free loopback port (see tests/pg.py); `.create_database(name)` gives a URL."""
    import shutil
    import tempfile
    from pathlib import Path

    from tests.pg import start_postgres

    # Not under pytest's temp root: it is private to root, and the server runs as `postgres` there.
    directory = Path(tempfile.mkdtemp(prefix="exitplan-pg-"))
    server = start_postgres(directory)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    """A private OpenSSH sshd (SFTP only, key login) on a free loopback port: its `SshdLayout`
    (host key, user key, known_hosts, the `root` directory it serves)."""
    from flows.lab_sftp import prepare_sshd, sshd_spec

    directory = tmp_path_factory.mktemp("sshd")
    layout = prepare_sshd(directory, lp.free_port())
    proc = lp.start_server(sshd_spec(layout), directory / "sshd.log")
    try:
        yield layout
    finally:
        lp.stop_pid(proc.pid)


@pytest.fixture(scope="session")
def ministack_server(tmp_path_factory):
    """The second, independent S3 implementation (ministack, S3 only, in memory) on a free
    loopback port: the contract suite and the end-to-end test run on it as well as on moto."""
    workdir = tmp_path_factory.mktemp("ministack-run")
    yield from _serve(lp.ministack_spec(lp.free_port(), workdir), tmp_path_factory)
