"""Starting, probing and stopping the lab's servers (Azurite, the S3 server, the Prefect server) on 127.0.0.1.

Used by `exitplan lab up/down/status` and by the test fixtures, which start their own instances on
free ports. Only subprocesses and sockets here: no cloud SDK.
"""

from __future__ import annotations

import fcntl
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from config.lab import (  # noqa: F401  (re-exported for the lab commands and tests)
    AZURITE_ACCOUNT,
    AZURITE_KEY,
    LAB_REGION,
    LAB_S3_ACCESS_KEY,
    LAB_S3_SECRET_KEY,
    LOOPBACK,
    azurite_connection_string,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
LAB_NODE_DIR = REPO_ROOT / "deploy" / "lab"


class LabError(Exception):
    """A lab server could not be started or reached; the message says what to do."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def port_open(port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout):
            return True
    except OSError:
        return False


def azurite_binary() -> str:
    """The pinned `azurite-blob` from deploy/lab (installed with `npm ci`), else one on PATH."""
    override = os.environ.get("EXITPLAN_AZURITE_BIN")
    if override:
        return override
    pinned = LAB_NODE_DIR / "node_modules" / ".bin" / "azurite-blob"
    if pinned.exists():
        return str(pinned)
    npm = shutil.which("npm")
    npm_failure = ""
    if (LAB_NODE_DIR / "package.json").exists() and npm:
        # First use on a fresh clone: install the pinned version (package-lock.json) locally.
        result = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--prefix", str(LAB_NODE_DIR)],
            capture_output=True, text=True,
        )
        if result.returncode == 0 and pinned.exists():
            return str(pinned)
        last = (result.stderr or result.stdout).strip().splitlines()
        npm_failure = f" (`npm ci` failed: {last[-1] if last else f'exit code {result.returncode}'})"
    found = shutil.which("azurite-blob")
    if found:
        return found
    if not npm:
        raise LabError(
            "Azurite is not installed and npm was not found: install Node.js and npm (Debian/Ubuntu: "
            f"`apt-get install nodejs npm`), then run `npm ci --prefix {LAB_NODE_DIR}`, "
            "or set EXITPLAN_AZURITE_BIN to an azurite-blob executable"
        )
    raise LabError(
        f"Azurite is not installed{npm_failure}: run `npm ci --prefix {LAB_NODE_DIR}` and read its errors, "
        "or set EXITPLAN_AZURITE_BIN to an azurite-blob executable"
    )


@dataclass(frozen=True)
class ServerSpec:
    name: str
    port: int
    argv: tuple[str, ...]
    probe_path: str  # an HTTP path that answers once the server is ready, or `SSH_PROBE`
    # The server's environment: ours without the variables named by `drop_env_prefixes`, plus
    # DO_NOT_TRACK=1, plus `env`.
    env: Mapping[str, str] = field(default_factory=dict, hash=False)
    drop_env_prefixes: tuple[str, ...] = ()
    cwd: str | None = None  # working directory (default: ours)
    ready_timeout: float = 60.0  # seconds `start_server` waits for the probe, unless told otherwise


def azurite_spec(port: int) -> ServerSpec:
    # --skipApiVersionCheck: the Python SDK sends a newer API version than Azurite accepts.
    # --disableTelemetry: no traffic may leave loopback.
    return ServerSpec(
        "azurite",
        port,
        (
            azurite_binary(), "--blobHost", LOOPBACK, "--blobPort", str(port), "--inMemoryPersistence",
            "--skipApiVersionCheck", "--loose", "--disableTelemetry", "--silent",
        ),
        f"/{AZURITE_ACCOUNT}?comp=list",
    )


def s3_spec(port: int) -> ServerSpec:
    return ServerSpec(
        "s3",
        port,
        (sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(port)),
        "/moto-api/",
    )


# The second, independent S3 implementation of the test suite (PyPI `ministack`). It pins an exact
# botocore, older than the one exitplan's connectors are tested with, so it lives in a virtual
# environment of its own, installed from the pinned requirements on first use, like Azurite's
# node_modules.
LAB_MINISTACK_DIR = LAB_NODE_DIR / "ministack"
MINISTACK_REQUIREMENTS = LAB_MINISTACK_DIR / "requirements.txt"
MINISTACK_HEALTH_PATH = "/_ministack/health"


def ministack_binary() -> str:
    """The `ministack` executable: EXITPLAN_MINISTACK_BIN, else the one in deploy/lab/ministack/venv,
    installed there from requirements.txt (pinned) on first use."""
    override = os.environ.get("EXITPLAN_MINISTACK_BIN")
    if override:
        return override
    venv = LAB_MINISTACK_DIR / "venv"
    binary = venv / "bin" / "ministack"
    # Written last: a venv whose install was interrupted is installed again, not used half-made.
    installed = venv / ".installed"
    if installed.exists() and binary.exists():
        return str(binary)
    with open(LAB_MINISTACK_DIR / ".install.lock", "w") as lock:
        # Two test runs in one checkout must not install into the same venv at once.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if installed.exists() and binary.exists():
            return str(binary)
        shutil.rmtree(venv, ignore_errors=True)
        steps = (
            [sys.executable, "-m", "venv", str(venv)],
            [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
             "-r", str(MINISTACK_REQUIREMENTS)],
        )
        for argv in steps:
            result = subprocess.run(argv, capture_output=True, text=True)
            if result.returncode != 0:
                last = (result.stderr or result.stdout).strip().splitlines()
                raise LabError(
                    f"the second S3 server (ministack) could not be installed in {venv}: `{' '.join(argv[-3:])}` "
                    f"failed ({last[-1] if last else f'exit code {result.returncode}'}); fix that, "
                    "or set EXITPLAN_MINISTACK_BIN to a ministack executable"
                )
        installed.touch()
    return str(binary)


def ministack_spec(port: int, workdir: Path) -> ServerSpec:
    """ministack serving S3 alone, in memory, on 127.0.0.1:`port` (it binds 0.0.0.0 unless told).

    `workdir` holds its PID file (it writes one to TMPDIR). Variables that would change what it
    serves or where it keeps data (AWS_*, S3_*, persistence, TLS, another port) are not passed on.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    return ServerSpec(
        "ministack",
        port,
        (ministack_binary(),),
        MINISTACK_HEALTH_PATH,
        env={
            "BIND_HOST": LOOPBACK,
            "GATEWAY_PORT": str(port),
            "SERVICES": "s3",
            "S3_PERSIST": "0",
            "PERSIST_STATE": "0",
            "MINISTACK_REGION": LAB_REGION,
            "LOG_LEVEL": "WARNING",
            "TMPDIR": str(workdir),
        },
        drop_env_prefixes=(
            "AWS_", "S3_", "LOCALSTACK_", "MINISTACK_", "PERSIST_", "STATE_DIR", "EDGE_PORT", "GATEWAY_",
            "USE_SSL", "SERVICES", "SFTP_", "DOCKER_", "AUTH",
        ),
        cwd=str(workdir),
    )


def prefect_spec(port: int, home: Path) -> ServerSpec:
    """`prefect server start` (API and UI) in the foreground, its SQLite database and settings in
    `home` (PREFECT_HOME).

    Prefect settings inherited from the caller (PREFECT_API_URL, PREFECT_PROFILE, a database URL…)
    are not passed on, and it starts in `home` (Prefect also reads prefect.toml/.env from its
    working directory): the lab's server is configured by the lab alone. Analytics off, no
    ephemeral server. With one worker (the default) the API, the UI and the services run in this
    one process; `stop_pid` signals its process group anyway.
    """
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    api_url = f"http://{LOOPBACK}:{port}/api"
    return ServerSpec(
        "prefect",
        port,
        (
            sys.executable, "-m", "prefect", "server", "start", "--host", LOOPBACK, "--port", str(port),
            "--analytics-off",
        ),
        "/api/health",
        env={
            "PREFECT_HOME": str(home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_EPHEMERAL_ENABLED": "false",
            "PREFECT_API_URL": api_url,
            "PREFECT_SERVER_UI_API_URL": api_url,  # what the browser's UI calls
            "PREFECT_UI_URL": f"http://{LOOPBACK}:{port}",
            "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
        },
        drop_env_prefixes=("PREFECT_",),
        cwd=str(home),
        ready_timeout=120.0,  # ready in 4-9 s on an idle machine; database migrations on first start
    )


# `ServerSpec.probe_path` of a server that speaks SSH, not HTTP (the lab's sshd): ready once it
# sends its SSH banner.
SSH_PROBE = "ssh:"


def server_ready(port: int, probe_path: str, timeout: float = 1.0) -> bool:
    """Whether the server on `port` answers: its SSH banner (`SSH_PROBE`) or an HTTP GET of `probe_path`."""
    if probe_path == SSH_PROBE:
        try:
            with socket.create_connection((LOOPBACK, port), timeout=timeout) as sock:
                return sock.recv(8).startswith(b"SSH-")
        except OSError:
            return False
    return http_ready(port, probe_path, timeout)


def http_ready(port: int, path: str, timeout: float = 1.0) -> bool:
    try:
        conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
        conn.request("GET", path)
        conn.getresponse().read()
        conn.close()
        return True
    except OSError:
        return False
    except http.client.HTTPException:
        return False


def start_server(
    spec: ServerSpec,
    log_path: Path | None = None,
    timeout: float | None = None,
    on_started: Callable[[subprocess.Popen], None] | None = None,
) -> subprocess.Popen:
    """Start `spec` detached in its own session and wait until it answers HTTP, or raise LabError.

    `timeout` defaults to the spec's `ready_timeout`.

    `on_started` is called with the process right after it is spawned, before the readiness
    wait: `exitplan lab up` records its PID file there, so an interrupted wait never leaves a
    server running that `lab down` cannot find.
    """
    if port_open(spec.port):
        raise LabError(f"{spec.name}: port {spec.port} on {LOOPBACK} is already in use; stop what holds it or choose another port")
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
    env = {k: v for k, v in os.environ.items() if not k.startswith(spec.drop_env_prefixes)}
    env["DO_NOT_TRACK"] = "1"
    env.update(spec.env)
    if timeout is None:
        timeout = spec.ready_timeout
    try:
        proc = subprocess.Popen(
            spec.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, env=env, cwd=spec.cwd,
        )
    finally:
        if log_path:
            log.close()
    if on_started is not None:
        try:
            on_started(proc)
        except BaseException:
            stop_pid(proc.pid)
            raise
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            where = f"; see {log_path}" if log_path else ""
            raise LabError(f"{spec.name} exited with code {proc.returncode} while starting on port {spec.port}{where}")
        if server_ready(spec.port, spec.probe_path):
            return proc
        time.sleep(0.1)
    stop_pid(proc.pid)
    raise LabError(f"{spec.name} did not answer on {LOOPBACK}:{spec.port} within {timeout:.0f} s")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still "exists"; reap it if it is ours.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        pass
    # Not our child (e.g. started by an earlier `exitplan lab up`): if the PID 1 of a container
    # does not reap orphans, a stopped server lingers as a zombie that signal 0 still finds.
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False  # no /proc (macOS) or already gone: signal 0 said it exists
    return stat.rpartition(")")[2].split()[:1] == ["Z"]


def process_cmdline(pid: int) -> list[str] | None:
    """The command line `pid` runs, or None if it is gone or cannot be read.

    Used to check that a PID recorded in a PID file still is the server we started (PIDs are
    reused) before signalling it. /proc on Linux; `ps` elsewhere (split on spaces: approximate).
    """
    if Path("/proc/self/cmdline").exists():
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        return [a.decode("utf-8", "surrogateescape") for a in raw.split(b"\0")[:-1]] or None
    try:
        out = subprocess.run(["ps", "-o", "args=", "-p", str(pid)], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.split() or None


def stop_pid(pid: int, timeout: float = 10.0) -> bool:
    """Stop the process group led by `pid` (TERM, then KILL). Returns True if it was running."""
    if not pid_alive(pid):
        return False
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    except PermissionError:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return True
