"""`exitplan lab …` as a user runs it: the real console script in subprocesses, real servers.

Each lab gets its own state directory and free ports through EXITPLAN_LAB_DIR and the port
overrides, so these tests neither see nor disturb a lab the developer has running. What was
seeded is checked with the Azure SDK and boto3 (independent of exitplan's own connectors) against
`lab.seed.expected_objects` (and the partner delivery on the SFTP server against
`expected_deliveries`).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import boto3
import pytest
from azure.storage.blob import BlobServiceClient
from botocore.config import Config

from config.lab import DEFAULT_PORTS
from lab import seed as lab_seed
from flows import lab as lab_module
from flows import lab_processes as lp

pytestmark = pytest.mark.integration

EXITPLAN = str(Path(sys.executable).with_name("exitplan")) if Path(sys.executable).with_name("exitplan").exists() \
    else shutil.which("exitplan")
SDK_VARS = ("AZURE_STORAGE_CONNECTION_STRING", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
            "AWS_DEFAULT_REGION", "PREFECT_API_URL", "DO_NOT_TRACK")
SERVERS = ("azurite", "s3", "sftp", "prefect")


@dataclass
class Lab:
    """One isolated lab: its environment for the CLI, its state directory and ports."""

    env: dict[str, str]
    directory: Path
    azurite_port: int
    s3_port: int
    prefect_port: int
    sftp_port: int

    def run(self, *args: str, check_rc: int | None = 0, timeout: float = 120) -> subprocess.CompletedProcess:
        result = subprocess.run([EXITPLAN, "lab", *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check_rc is not None:
            assert result.returncode == check_rc, (
                f"exitplan lab {' '.join(args)} exited {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
            )
        return result

    def pids(self) -> dict[str, int]:
        out = {}
        for name in SERVERS:
            path = self.directory / f"{name}.pid"
            if path.exists():
                out[name] = json.loads(path.read_text())["pid"]
        return out

    def force_cleanup(self) -> None:
        """Backstop if a test failed half-way: stop what the PID files name, if still ours."""
        self.run("down", check_rc=None)
        for pid in self.pids().values():
            if lp.pid_alive(pid):
                lp.stop_pid(pid)


def _new_lab(directory: Path) -> Lab:
    env = {k: v for k, v in os.environ.items() if k not in SDK_VARS and not k.startswith("EXITPLAN_LAB_")}
    ports: list[int] = []
    while len(ports) < 4:  # never the defaults (10000, 5000, 2222, 4200): a developer's lab may be there
        port = lp.free_port()
        if port not in ports and port not in DEFAULT_PORTS.values():
            ports.append(port)
    azurite_port, s3_port, prefect_port, sftp_port = ports
    env.update(
        EXITPLAN_LAB_DIR=str(directory),
        EXITPLAN_LAB_AZURITE_PORT=str(azurite_port),
        EXITPLAN_LAB_S3_PORT=str(s3_port),
        EXITPLAN_LAB_PREFECT_PORT=str(prefect_port),
        EXITPLAN_LAB_SFTP_PORT=str(sftp_port),
        DO_NOT_TRACK="1",
        PREFECT_SERVER_EPHEMERAL_ENABLED="false",
    )
    return Lab(env, directory, azurite_port, s3_port, prefect_port, sftp_port)


def _get(port: int, path: str, **headers: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(lp.LOOPBACK, port, timeout=5)
    try:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _prefect_processes(lab: Lab) -> list[str]:
    """Live processes (children included: they inherit the environment) of this lab's Prefect
    server, found by the PREFECT_HOME `lab up` gave it."""
    marker = f"PREFECT_HOME={lab_module.prefect_home(lab.directory)}".encode()
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if marker in (proc / "environ").read_bytes().split(b"\0") and lp.pid_alive(int(proc.name)):
                found.append(f"{proc.name}: {' '.join(lp.process_cmdline(int(proc.name)) or [])}")
        except OSError:
            continue  # gone meanwhile, or not ours to read
    return found


def _assert_gone(lab: Lab, pids: dict[str, int]) -> None:
    for name, pid in pids.items():
        assert not lp.pid_alive(pid), f"{name} (pid {pid}) still runs after `lab down`"
    assert not lp.port_open(lab.azurite_port), "Azurite's port still answers after `lab down`"
    assert not lp.port_open(lab.s3_port), "the S3 server's port still answers after `lab down`"
    assert not lp.port_open(lab.prefect_port), "the Prefect server's port still answers after `lab down`"
    assert not lp.port_open(lab.sftp_port), "the SFTP server's port still answers after `lab down`"
    if Path("/proc/self/environ").exists():
        assert _prefect_processes(lab) == [], "Prefect processes left behind by `lab down`"
    assert not list(lab.directory.glob("*.pid")), "PID files left behind"


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A lab brought up once for the env and seed tests, and brought down (and checked) after."""
    the_lab = _new_lab(tmp_path_factory.mktemp("lab-state"))
    try:
        the_lab.run("up")
        pids = the_lab.pids()
        yield the_lab
        down = the_lab.run("down")
        assert "stopped" in down.stdout
        _assert_gone(the_lab, pids)
    finally:
        the_lab.force_cleanup()


def test_up_twice_status_down_twice(tmp_path):
    lab = _new_lab(tmp_path / "state")
    try:
        first = lab.run("up")
        pids = lab.pids()
        assert set(pids) == set(SERVERS)
        assert lp.port_open(lab.azurite_port) and lp.port_open(lab.s3_port)
        assert _get(lab.prefect_port, "/api/health") == (200, b"true")  # the Prefect API
        # Its UI, at the flow-run links the demo prints, talking to this API.
        run_page = "/runs/flow-run/00000000-0000-0000-0000-000000000000"
        ui_status, ui_page = _get(lab.prefect_port, run_page, Accept="text/html")
        assert ui_status == 200 and b"<html" in ui_page.lower()
        ui_settings = json.loads(_get(lab.prefect_port, "/ui-settings")[1])
        assert ui_settings["api_url"] == f"http://127.0.0.1:{lab.prefect_port}/api"
        assert (lab.directory / "prefect" / "prefect.db").exists()  # its SQLite database, in the lab
        assert "started" in first.stdout and "exitplan-lab" in first.stdout

        second = lab.run("up")  # harmless: says so, starts nothing new
        assert second.stdout.count("already running") == len(SERVERS)
        assert lab.pids() == pids

        status = lab.run("status")
        for name, pid in pids.items():
            line = next(l for l in status.stdout.splitlines() if l.startswith(name))
            assert " up " in line and str(pid) in line
        assert all(str(port) in status.stdout for port in (lab.azurite_port, lab.s3_port, lab.prefect_port,
                                                           lab.sftp_port))

        lab.run("down")
        _assert_gone(lab, pids)
        again = lab.run("down")  # harmless when nothing runs
        assert again.stdout.count("not running") == len(SERVERS)
        assert lab.run("status").stdout.count(" down ") == len(SERVERS)
    finally:
        lab.force_cleanup()


def test_port_in_use_is_refused_with_a_sentence(tmp_path):
    lab = _new_lab(tmp_path / "state")
    squatter = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        squatter.bind((lp.LOOPBACK, lab.s3_port))
        squatter.listen()
        result = lab.run("up", check_rc=2)
        assert f"port {lab.s3_port}" in result.stderr and "already in use" in result.stderr
        assert "EXITPLAN_LAB_S3_PORT" in result.stderr
        assert "Traceback" not in result.stderr
        # Refused before starting anything: no half-started lab.
        assert not lp.port_open(lab.azurite_port) and not lp.port_open(lab.prefect_port)
        assert lab.pids() == {}
    finally:
        squatter.close()
        lab.force_cleanup()


def test_env_exports_eval_and_connect(lab):
    # Through a real shell: the quoting must survive `eval`.
    shell = subprocess.run(
        ["bash", "-c", f'eval "$({EXITPLAN} lab env)" && env -0'],
        env={k: v for k, v in lab.env.items() if k != "DO_NOT_TRACK"}, capture_output=True, text=True, check=True,
    )
    exported = dict(item.split("=", 1) for item in shell.stdout.split("\0") if "=" in item)
    assert {k: exported.get(k) for k in SDK_VARS} == {
        "AZURE_STORAGE_CONNECTION_STRING": lp.azurite_connection_string(lab.azurite_port),
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{lab.s3_port}",
        "AWS_ACCESS_KEY_ID": lp.LAB_S3_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": lp.LAB_S3_SECRET_KEY,
        "AWS_DEFAULT_REGION": lp.LAB_REGION,
        "PREFECT_API_URL": f"http://127.0.0.1:{lab.prefect_port}/api",
        "DO_NOT_TRACK": "1",
    }

    service = BlobServiceClient.from_connection_string(exported["AZURE_STORAGE_CONNECTION_STRING"])
    list(service.list_containers())  # answers, with the exported key
    s3 = boto3.client(
        "s3", endpoint_url=exported["AWS_ENDPOINT_URL"], aws_access_key_id=exported["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=exported["AWS_SECRET_ACCESS_KEY"], region_name=exported["AWS_DEFAULT_REGION"],
        config=Config(request_checksum_calculation="when_required", response_checksum_validation="when_required"),
    )
    assert "exitplan-lab" in [b["Name"] for b in s3.list_buckets()["Buckets"]]
    prefect_api = urlsplit(exported["PREFECT_API_URL"])
    assert _get(prefect_api.port, f"{prefect_api.path}/health") == (200, b"true")

    # The SFTP server: its host key pinned by the exported known_hosts, the exported key logs in.
    import paramiko

    sftp_dir = Path(exported["EXITPLAN_LAB_SFTP_DIR"])
    assert exported["EXITPLAN_LAB_SFTP_PORT"] == str(lab.sftp_port)
    client = paramiko.SSHClient()
    client.load_host_keys(str(sftp_dir / "known_hosts"))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(lp.LOOPBACK, port=lab.sftp_port, username=exported["EXITPLAN_LAB_SFTP_USER"],
                   key_filename=str(sftp_dir / "id_ed25519"), allow_agent=False, look_for_keys=False)
    try:
        assert client.open_sftp().stat(str(sftp_dir / "root")).st_mode
    finally:
        client.close()
    with pytest.raises(paramiko.AuthenticationException):  # key only
        client.connect(lp.LOOPBACK, port=lab.sftp_port, username=exported["EXITPLAN_LAB_SFTP_USER"],
                       password="guess", allow_agent=False, look_for_keys=False)


def test_prefect_urls_for_other_code(lab, tmp_path):
    assert lab_module.prefect_api_url(lab.directory) == f"http://127.0.0.1:{lab.prefect_port}/api"
    assert lab_module.prefect_ui_url(lab.directory) == f"http://127.0.0.1:{lab.prefect_port}"
    assert lab_module.prefect_api_url(tmp_path) is None and lab_module.prefect_ui_url(tmp_path) is None


def _listing(lab: Lab) -> dict[tuple[str, str], object]:
    service = BlobServiceClient.from_connection_string(lp.azurite_connection_string(lab.azurite_port))
    return {
        (c, b.name): b
        for c in lab_seed.CONTAINERS
        for b in service.get_container_client(c).list_blobs(include=["metadata"])
    }


def test_seed_tiny_writes_what_the_engine_expects(lab):
    result = lab.run("seed", "--profile", "tiny")
    expected = lab_seed.expected_objects("tiny")
    for s in lab_seed.summarize(expected):
        assert any(line.startswith(s.container) and f"({s.bytes:,} bytes)" in line for line in result.stdout.splitlines())
    assert "idempotent" in result.stdout
    deliveries = lab_seed.expected_deliveries("tiny")
    root = lab.directory / "sftp" / "root"
    assert {p.relative_to(root).as_posix(): p.read_bytes() for p in (root / "deliveries").rglob("*") if p.is_file()} \
        == {f"deliveries/{o.name}": o.read() for o in deliveries}

    listing = _listing(lab)
    assert set(listing) == {(o.container, o.name) for o in expected}
    service = BlobServiceClient.from_connection_string(lp.azurite_connection_string(lab.azurite_port))
    for obj in expected:
        blob = listing[(obj.container, obj.name)]
        where = f"{obj.container}/{obj.name}"
        assert blob.size == obj.size, where
        digests = obj.digests()
        stored_md5 = blob.content_settings.content_md5
        if obj.upload is lab_seed.UploadMode.SINGLE:
            assert stored_md5 is not None and bytes(stored_md5) == digests.md5, where
        else:
            assert not stored_md5, f"{where}: uploaded in blocks, should have no Content-MD5"
        assert (blob.metadata or {}) == obj.metadata, where
        assert blob.content_settings.content_type == obj.content.content_type, where
        assert blob.blob_tier == (obj.tier or "Hot"), where
        body = service.get_blob_client(obj.container, obj.name).download_blob().readall()
        assert hashlib.sha256(body).hexdigest() == digests.sha256, where
    # The edge cases the copy engine must meet are really there.
    sizes = {o.size for o in expected}
    assert {0, 5 * 2**20 - 1, 5 * 2**20 + 1, 8 * 2**20 - 1, 8 * 2**20 + 1} <= sizes
    assert any(b.metadata and "hôpital" in " ".join(b.metadata.values()) for b in listing.values())
    assert [k for k, b in listing.items() if b.blob_tier == "Cool"]


def test_reseed_is_idempotent(lab):
    lab.run("seed", "--profile", "tiny")  # the first seed, unless the test above ran
    before = {k: (b.size, b.content_settings.content_md5, b.metadata) for k, b in _listing(lab).items()}
    lab.run("seed", "--profile", "tiny")
    after = {k: (b.size, b.content_settings.content_md5, b.metadata) for k, b in _listing(lab).items()}
    assert after == before
    assert sum(b.blob_tier == "Cool" for b in _listing(lab).values()) == 1


def test_seed_refuses_a_real_account(lab):
    result = lab.run(
        "seed", "--profile", "tiny", "--connection-string",
        "DefaultEndpointsProtocol=https;AccountName=prodhealth;AccountKey=eHh4;EndpointSuffix=core.windows.net",
        check_rc=2,
    )
    assert "prodhealth" in result.stderr and "Traceback" not in result.stderr


def test_missing_npm_is_explained(tmp_path, monkeypatch):
    # A fresh clone on a machine without Node.js: no pinned Azurite, no npm, no azurite-blob.
    node_dir = tmp_path / "deploy-lab"
    node_dir.mkdir()
    (node_dir / "package.json").write_text("{}")
    monkeypatch.setattr(lp, "LAB_NODE_DIR", node_dir)
    monkeypatch.delenv("EXITPLAN_AZURITE_BIN", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(lp.LabError, match="npm was not found") as info:
        lp.azurite_binary()
    assert "Node.js" in str(info.value) and "EXITPLAN_AZURITE_BIN" in str(info.value)


def test_demo_ends_with_a_completed_exit_plan_flow_run(tmp_path):
    """The README's first command, as a user runs it (on the tiny seed): the lab comes up, the
    exit_plan flow runs on the lab's Prefect server, every seeded object is migrated and deep
    verified, and the run's URL names a completed flow run with its summary and tables."""
    the_lab = _new_lab(tmp_path / "lab")
    try:
        demo = subprocess.run([EXITPLAN, "demo", "--profile", "tiny"], env=the_lab.env, capture_output=True,
                              text=True, timeout=600)
        assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
        total = len(lab_seed.expected_objects("tiny")) + len(lab_seed.expected_deliveries("tiny"))
        assert f"{total:,} copied" in demo.stdout and "**0 failed**" in demo.stdout
        assert f"**Verified** (deep): {total:,} objects match" in demo.stdout
        assert "Traceback" not in demo.stdout + demo.stderr
        url = next(line.split(", ")[-1] for line in demo.stdout.splitlines() if line.startswith("flow run '"))
        assert url.startswith(f"http://127.0.0.1:{the_lab.prefect_port}/runs/flow-run/")
        run_id = url.rsplit("/", 1)[1]
        status, body = _get(the_lab.prefect_port, f"/api/flow_runs/{run_id}")
        assert status == 200 and json.loads(body)["state"]["type"] == "COMPLETED"
        conn = http.client.HTTPConnection(lp.LOOPBACK, the_lab.prefect_port, timeout=10)
        conn.request("POST", "/api/artifacts/filter", body=json.dumps({"artifacts": {"flow_run_id": {"any_": [run_id]}}}),
                     headers={"Content-Type": "application/json"})
        artifacts = json.loads(conn.getresponse().read())
        conn.close()
        kinds = sorted({(a["type"], a["key"]) for a in artifacts})
        assert kinds == [("markdown", "exitplan-lab-exit-manifest"), ("markdown", "exitplan-lab-exit-report"),
                         ("markdown", "exitplan-lab-exit-summary"), ("progress", "exitplan-lab-exit-progress"),
                         ("progress", "exitplan-lab-exit-verify-progress"), ("table", "exitplan-lab-exit-inventory"), ("table", "exitplan-lab-exit-shards"),
                         ("table", "exitplan-lab-exit-status"), ("table", "exitplan-lab-exit-verify")]
        (status_table,) = [json.loads(a["data"]) for a in artifacts if a["key"] == "exitplan-lab-exit-status"]
        assert {row["complete"] for row in status_table} == {"yes"}  # every lab dataset, whole and verified
        assert [a["data"] for a in artifacts if a["type"] == "progress"] == [100.0, 100.0]
    finally:
        pids = the_lab.pids()
        the_lab.force_cleanup()
        _assert_gone(the_lab, pids)


def _listening_addresses(port: int) -> set[str]:
    """The local IPv4/IPv6 addresses (hex as in /proc/net/tcp*) with a socket listening on `port`."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, port_hex = fields[1].rsplit(":", 1)
            if int(port_hex, 16) == port and fields[3] == "0A":  # 0A: LISTEN
                found.add(address)
    return found


def test_the_second_s3_server_listens_on_loopback_only(ministack_server):
    # ministack binds every interface unless told; the fixture must keep it on 127.0.0.1.
    assert _listening_addresses(ministack_server.port) == {"0100007F"}  # 127.0.0.1, little-endian hex
