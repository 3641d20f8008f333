"""`exitplan lab up | down | status | env | seed`: the local rehearsal of an exit, on 127.0.0.1 only.

`up` starts Azurite (the Azure Blob emulator), the lab's S3 server, an OpenSSH sshd serving SFTP
(`flows.lab_sftp`: its keys and the directory it serves in `<lab dir>/sftp`) and a Prefect server
(API and UI) as detached processes, waits until each answers, records a PID file and a log per server in the lab
state directory, and creates the destination bucket. `down` stops exactly what `up` recorded, after
checking that each PID still runs the command line we started (PIDs are reused). `env` prints the
exports the SDKs (and Prefect) read, and where the lab's SFTP key and known_hosts are; `seed` fills
Azurite with the synthetic datasets of `lab.seed`, and the sshd's directory with its partner delivery.

The state directory is `EXITPLAN_LAB_DIR`, else `$XDG_STATE_HOME/exitplan/lab`, else
`~/.local/state/exitplan/lab`. Ports: `EXITPLAN_LAB_AZURITE_PORT` (10000), `EXITPLAN_LAB_S3_PORT`
(5000), `EXITPLAN_LAB_SFTP_PORT` (2222), `EXITPLAN_LAB_PREFECT_PORT` (4200). Azurite and the S3 server keep their data in memory:
`down` forgets it, `up` + `seed` rebuild it. The Prefect server keeps its SQLite database (flow-run
history) in `<lab dir>/prefect`, across `down` and `up`. `prefect_api_url()` / `prefect_ui_url()`
give the running lab's Prefect URLs to other code.

Orchestration only: processes come from `flows.lab_processes`; data, the seed writes and the bucket
come from `lab.seed` (which reaches the SDKs through `connectors.azure_writer` and
`connectors.s3`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import socket
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlsplit

from config.errors import ExitCode, UserError
from config.lab import DEFAULT_PORTS, LAB_BUCKET, LAB_SFTP_SUBDIR, PORT_ENV, SEED_PROFILES, SFTP_DIR_ENV, SFTP_USER_ENV
from config.sizes import format_size
from flows import lab_processes as lp
from flows import lab_sftp

STATE_DIR_ENV = "EXITPLAN_LAB_DIR"

# Buckets `up` creates on the lab's S3 server: the destination of config/examples/lab.yaml.
LAB_BUCKETS = (LAB_BUCKET,)


def lab_dir() -> Path:
    """Where PID files and server logs live (see the module docstring for the lookup order)."""
    explicit = os.environ.get(STATE_DIR_ENV)
    if explicit:
        return Path(explicit).expanduser()
    state_home = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state_home) / "exitplan" / "lab"


@dataclass(frozen=True)
class LabServer:
    """One server of the lab: its short name (PID file stem, `config.lab` port key) and how to
    build its command line for a port."""

    name: str
    label: str
    spec: Callable[[int], lp.ServerSpec]

    @property
    def port_env(self) -> str:
        return PORT_ENV[self.name]

    def requested_port(self) -> int:
        """The port asked for by the environment override, else the lab default."""
        raw = os.environ.get(self.port_env, "").strip()
        if not raw:
            return DEFAULT_PORTS[self.name]
        if not raw.isdigit() or not 1 <= int(raw) <= 65535:
            raise UserError(f"{self.port_env}={raw!r} is not a port number; set it to a free port between 1 and 65535")
        return int(raw)

    def url(self, port: int) -> str:
        scheme = "sftp" if self.name == "sftp" else "http"
        return f"{scheme}://{lp.LOOPBACK}:{port}"


def prefect_home(directory: Path) -> Path:
    """PREFECT_HOME of the lab's Prefect server: its SQLite database and settings."""
    return directory / "prefect"


def _prefect_spec(port: int) -> lp.ServerSpec:
    return lp.prefect_spec(port, prefect_home(lab_dir()))


def sftp_dir(directory: Path | None = None) -> Path:
    """The lab sshd's directory: its keys, known_hosts, and `root/` (what it serves)."""
    return (lab_dir() if directory is None else Path(directory)) / LAB_SFTP_SUBDIR


def _sftp_spec(port: int) -> lp.ServerSpec:
    return lab_sftp.sshd_spec(lab_sftp.prepare_sshd(sftp_dir(), port))


# The lab's servers, in start order (`down` stops them in reverse). A server added here is
# started, stopped and shown by up/down/status with nothing else to change; its exports go in
# `env_exports`.
LAB_SERVERS: tuple[LabServer, ...] = (
    LabServer("azurite", "Azurite (Azure Blob emulator)", lp.azurite_spec),
    LabServer("s3", "S3 server (moto)", lp.s3_spec),
    LabServer("sftp", "SFTP server (OpenSSH sshd)", _sftp_spec),
    LabServer("prefect", "Prefect server (API and UI)", _prefect_spec),
)
PREFECT_SERVER = next(s for s in LAB_SERVERS if s.name == "prefect")


# --------------------------------------------------------------------------------------------
# PID files
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PidRecord:
    """What `up` wrote about a server it started: enough for `down` to recognise it later."""

    name: str
    pid: int
    port: int
    argv: tuple[str, ...]
    log: str
    started_at: str
    probe_path: str = "/"  # an HTTP path that answers when the server is ready

    @staticmethod
    def path(directory: Path, name: str) -> Path:
        return directory / f"{name}.pid"

    @classmethod
    def load(cls, directory: Path, name: str) -> PidRecord | None:
        """The record, or None when absent or unreadable (a half-written file counts as absent)."""
        try:
            data = json.loads(cls.path(directory, name).read_text(encoding="utf-8"))
            return cls(data["name"], int(data["pid"]), int(data["port"]), tuple(data["argv"]),
                       data.get("log", ""), data.get("started_at", ""), data.get("probe_path", "/"))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def save(self, directory: Path) -> None:
        # Write then rename: a reader never sees half a file.
        path = self.path(directory, self.name)
        tmp = path.with_suffix(".pid.tmp")
        tmp.write_text(json.dumps(asdict(self), ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, path)

    def is_ours(self) -> bool:
        """True if the PID is alive and still runs the command line we started.

        Compared as a part of the live command line: a script started through its shebang
        (azurite-blob → `node …/azurite-blob ARGS`) gains an interpreter in front, and sshd rewrites
        its own (`sshd: /usr/sbin/sshd -D -e -f CONFIG [listener] …`).
        """
        if not lp.pid_alive(self.pid):
            return False
        live = lp.process_cmdline(self.pid)
        if not live:
            return False
        live_line = " ".join(live)
        return " ".join(self.argv[1:]) in live_line and Path(self.argv[0]).name in live_line


def _remove_pid_file(directory: Path, name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        PidRecord.path(directory, name).unlink()


class ServerState(Enum):
    RUNNING = "up"  # PID file, process alive and ours
    STALE = "stale"  # PID file, process gone
    FOREIGN = "foreign"  # PID file, but the PID now runs something else
    ABSENT = "down"  # no PID file


def inspect_server(directory: Path, server: LabServer) -> tuple[ServerState, PidRecord | None]:
    rec = PidRecord.load(directory, server.name)
    if rec is None:
        if PidRecord.path(directory, server.name).exists():
            return ServerState.STALE, None
        return ServerState.ABSENT, None
    if rec.is_ours():
        return ServerState.RUNNING, rec
    if lp.pid_alive(rec.pid):
        return ServerState.FOREIGN, rec
    return ServerState.STALE, rec


@contextlib.contextmanager
def _lab_lock(directory: Path) -> Iterator[None]:
    """Serialise `up` and `down`: two at once would race on the same ports and PID files."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, the PID files still protect most cases
        yield
        return
    with open(directory / "lab.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _ensure_dir() -> Path:
    directory = lab_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise UserError(f"cannot create the lab state directory {directory} ({exc.strerror}); set {STATE_DIR_ENV} to a writable directory")
    return directory


def _wait_port_closed(port: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not lp.port_open(port):
            return True
        time.sleep(0.05)
    return not lp.port_open(port)


# --------------------------------------------------------------------------------------------
# up / down / status / env
# --------------------------------------------------------------------------------------------


def _provision(s3_port: int) -> list[str]:
    """Create the lab's destination bucket(s); idempotent. Returns one line per bucket."""
    from lab.seed import ensure_lab_buckets

    created = ensure_lab_buckets(
        f"http://{lp.LOOPBACK}:{s3_port}", LAB_BUCKETS, access_key=lp.LAB_S3_ACCESS_KEY,
        secret_key=lp.LAB_S3_SECRET_KEY, region=lp.LAB_REGION,
    )
    return [f"bucket {b}: {'created' if new else 'already there'} on the S3 server" for b, new in created.items()]


def _start(directory: Path, server: LabServer, port: int) -> PidRecord:
    if server.name == "azurite" and not os.environ.get("EXITPLAN_AZURITE_BIN") and shutil.which("npm") and \
            not (lp.LAB_NODE_DIR / "node_modules" / ".bin" / "azurite-blob").exists():
        print(f"Azurite is not installed yet: running `npm ci` in {lp.LAB_NODE_DIR} (once)…", flush=True)
    spec = server.spec(port)
    log = directory / f"{server.name}.log"
    record: list[PidRecord] = []

    def record_pid(proc) -> None:
        rec = PidRecord(server.name, proc.pid, port, tuple(spec.argv), str(log),
                        datetime.now(timezone.utc).isoformat(timespec="seconds"), spec.probe_path)
        rec.save(directory)
        record.append(rec)

    lp.start_server(spec, log, on_started=record_pid)
    return record[0]


def _stop(directory: Path, rec: PidRecord) -> None:
    lp.stop_pid(rec.pid)
    if lp.pid_alive(rec.pid):
        raise UserError(f"{rec.name}: pid {rec.pid} did not stop even after SIGKILL; see {rec.log}", ExitCode.FAILED)
    _remove_pid_file(directory, rec.name)
    _wait_port_closed(rec.port)


def cmd_up(args: argparse.Namespace) -> int:
    """Start what is not running, refuse ports held by others, create the bucket(s)."""
    directory = _ensure_dir()
    with _lab_lock(directory):
        ports = {s.name: s.requested_port() for s in LAB_SERVERS}
        running: dict[str, PidRecord] = {}
        to_start: list[LabServer] = []
        problems: list[str] = []
        for server in LAB_SERVERS:
            port = ports[server.name]
            state, rec = inspect_server(directory, server)
            if state is ServerState.RUNNING:
                assert rec is not None
                if rec.port != port:
                    problems.append(
                        f"{server.label} is already running on port {rec.port}, but {server.port_env} asks for {port}; "
                        f"run `exitplan lab down` first to move it"
                    )
                running[server.name] = rec
                continue
            if state is not ServerState.ABSENT:
                _remove_pid_file(directory, server.name)  # stale, or the PID was reused: not ours
            if lp.port_open(port):
                problems.append(
                    f"{server.label}: port {port} on {lp.LOOPBACK} is already in use by another program; "
                    f"stop it, or choose a free port with {server.port_env}=PORT"
                )
            else:
                to_start.append(server)
        if problems:
            # Before starting anything: a half-started lab is worse than none.
            raise UserError("; ".join(problems), ExitCode.USAGE)

        started: list[PidRecord] = []
        try:
            for server in to_start:
                started.append(_start(directory, server, ports[server.name]))
            bucket_lines = _provision(ports["s3"])
        except BaseException as exc:
            # Undo this call's starts (the one that failed included): leave the lab as we found it.
            for server in to_start:
                rec = PidRecord.load(directory, server.name)
                if rec is not None and rec.is_ours():
                    lp.stop_pid(rec.pid)
                _remove_pid_file(directory, server.name)
            if isinstance(exc, lp.LabError):
                raise UserError(str(exc), ExitCode.USAGE) from exc
            from lab.seed import LabStoreError

            if isinstance(exc, LabStoreError):
                raise UserError(f"the lab's S3 server started but is unusable: {exc}", ExitCode.USAGE) from exc
            raise

    for server in LAB_SERVERS:
        if server.name in running:
            rec = running[server.name]
            print(f"{server.name:<8} already running  pid {rec.pid:<7} {server.url(rec.port)}")
        else:
            rec = next(r for r in started if r.name == server.name)
            print(f"{server.name:<8} started          pid {rec.pid:<7} {server.url(rec.port)}  log {rec.log}")
    for line in bucket_lines:
        print(line)
    print(f"Lab state in {directory}. Next: eval \"$(exitplan lab env)\" && exitplan lab seed")
    return ExitCode.OK


def cmd_down(args: argparse.Namespace) -> int:
    """Stop what `up` recorded, and nothing else; harmless when nothing runs."""
    directory = lab_dir()
    if not directory.is_dir():
        for server in reversed(LAB_SERVERS):
            print(f"{server.name:<8} not running")
        return ExitCode.OK
    with _lab_lock(directory):
        for server in reversed(LAB_SERVERS):
            state, rec = inspect_server(directory, server)
            if state is ServerState.RUNNING:
                assert rec is not None
                _stop(directory, rec)
                print(f"{server.name:<8} stopped (pid {rec.pid}, port {rec.port})")
            elif state is ServerState.FOREIGN:
                assert rec is not None
                _remove_pid_file(directory, server.name)
                print(f"{server.name:<8} pid {rec.pid} no longer runs the lab's {server.name}: left it alone, removed the PID file")
            elif state is ServerState.STALE:
                _remove_pid_file(directory, server.name)
                print(f"{server.name:<8} was not running (removed its stale PID file)")
            else:
                print(f"{server.name:<8} not running")
    return ExitCode.OK


def cmd_status(args: argparse.Namespace) -> int:
    """One line per server: up/down, pid, port, URL. Always exit 0: it reports, it does not judge."""
    directory = lab_dir()
    for server in LAB_SERVERS:
        state, rec = inspect_server(directory, server)
        if state is ServerState.RUNNING:
            assert rec is not None
            answering = lp.server_ready(rec.port, rec.probe_path)
            status = "up" if answering else "up (not answering)"
            print(f"{server.name:<8} {status:<5} pid {rec.pid:<7} port {rec.port:<6} {server.url(rec.port)}")
        else:
            port = server.requested_port()
            note = f"  (port {port} is held by another program)" if lp.port_open(port) else ""
            print(f"{server.name:<8} {'down':<5} pid {'-':<7} port {port:<6}{note}".rstrip())
    print(f"lab state: {directory}")
    return ExitCode.OK


def env_exports(directory: Path) -> tuple[dict[str, str], bool]:
    """The variables `env` prints (SDK names), with ports of the running lab, else the requested
    ones; and whether every server is running."""
    ports, all_up = {}, True
    for server in LAB_SERVERS:
        state, rec = inspect_server(directory, server)
        if state is ServerState.RUNNING and rec is not None:
            ports[server.name] = rec.port
        else:
            ports[server.name] = server.requested_port()
            all_up = False
    exports = {
        "AZURE_STORAGE_CONNECTION_STRING": lp.azurite_connection_string(ports["azurite"]),
        "AWS_ENDPOINT_URL": f"http://{lp.LOOPBACK}:{ports['s3']}",
        "AWS_ACCESS_KEY_ID": lp.LAB_S3_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": lp.LAB_S3_SECRET_KEY,
        "AWS_DEFAULT_REGION": lp.LAB_REGION,
        "PREFECT_API_URL": _prefect_api(ports["prefect"]),
        # The lab's sshd, for the SFTP dataset of config/examples/lab.yaml (its user key and
        # known_hosts are files in this directory).
        PORT_ENV["sftp"]: str(ports["sftp"]),
        SFTP_DIR_ENV: str(sftp_dir(directory)),
        SFTP_USER_ENV: lab_sftp.login_name(),
        "DO_NOT_TRACK": "1",  # no Prefect analytics from the shell's prefect and exitplan commands
    }
    return exports, all_up


def _prefect_api(port: int) -> str:
    return f"{PREFECT_SERVER.url(port)}/api"


def _running_prefect_port(directory: Path | None) -> int | None:
    state, rec = inspect_server(lab_dir() if directory is None else Path(directory), PREFECT_SERVER)
    return rec.port if state is ServerState.RUNNING and rec is not None else None


def prefect_api_url(directory: Path | str | None = None) -> str | None:
    """The API URL of the lab's running Prefect server (e.g. http://127.0.0.1:4200/api), for
    PREFECT_API_URL; None when it is not running. `directory`: the lab directory (default
    `lab_dir()`). "Running" means its PID file names a live process that is still ours; the server
    is not probed."""
    port = _running_prefect_port(directory)
    return None if port is None else _prefect_api(port)


def prefect_ui_url(directory: Path | str | None = None) -> str | None:
    """The UI of the lab's running Prefect server (e.g. http://127.0.0.1:4200), None when it is not
    running; a flow run's page is f"{ui}/runs/flow-run/{flow_run_id}"."""
    port = _running_prefect_port(directory)
    return None if port is None else PREFECT_SERVER.url(port)


def cmd_env(args: argparse.Namespace) -> int:
    """Shell exports for `eval "$(exitplan lab env)"`; notes go to stderr so eval ignores them."""
    exports, all_up = env_exports(lab_dir())
    if not all_up:
        print("# exitplan: the lab is not (fully) running; start it with `exitplan lab up`", file=sys.stderr)
    for name, value in exports.items():
        print(f"export {name}={shlex.quote(value)}")
    return ExitCode.OK


# --------------------------------------------------------------------------------------------
# seed
# --------------------------------------------------------------------------------------------


def _seed_connection_string(args: argparse.Namespace) -> tuple[str, str]:
    """The connection string to seed into and where it came from: --connection-string, else the
    running lab's Azurite, else AZURE_STORAGE_CONNECTION_STRING."""
    if args.connection_string:
        return args.connection_string, "--connection-string"
    state, rec = inspect_server(lab_dir(), LAB_SERVERS[0])
    if state is ServerState.RUNNING and rec is not None:
        return lp.azurite_connection_string(rec.port), "the running lab"
    env = os.environ.get("AZURE_STORAGE_CONNECTION_STRING")
    if env:
        return env, "AZURE_STORAGE_CONNECTION_STRING"
    raise UserError(
        "the lab is not running and AZURE_STORAGE_CONNECTION_STRING is not set: start the lab with "
        "`exitplan lab up`, or pass --connection-string"
    )


def _reachable(endpoint: str) -> bool:
    parts = urlsplit(endpoint)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or lp.LOOPBACK, port), timeout=1.0):
            return True
    except OSError:
        return False


def cmd_seed(args: argparse.Namespace) -> int:
    """Write the profile's synthetic datasets into Azurite; idempotent (same names, same bytes)."""
    from lab import seed as lab_seed

    if not lab_seed.parquet_available():
        raise UserError(lab_seed.PYARROW_MISSING)
    connection_string, origin = _seed_connection_string(args)
    try:
        endpoint = lab_seed.emulator_blob_endpoint(connection_string)
    except ValueError as exc:
        raise UserError(f"{exc} (from {origin}); `lab seed` writes synthetic data into a local emulator only") from exc
    if not _reachable(endpoint):
        raise UserError(f"nothing answers at {endpoint} (from {origin}): start the lab with `exitplan lab up`")

    objects = lab_seed.expected_objects(args.profile)
    total = sum(o.size for o in objects)
    print(f"seeding profile {args.profile!r}: {len(objects):,} blobs, {format_size(total)} into {endpoint}", flush=True)
    started = time.monotonic()
    try:
        summaries = lab_seed.seed_azurite(connection_string, objects, workers=args.workers)
    except lab_seed.LabStoreError as exc:
        raise UserError(f"seeding stopped: {exc}; running `exitplan lab seed` again is safe", ExitCode.FAILED) from exc
    sftp_root = sftp_dir() / "root"
    if sftp_root.is_dir():
        # The partner delivery, in the directory the lab's sshd serves (made by `lab up`).
        summaries.append(lab_seed.write_deliveries(sftp_root, lab_seed.expected_deliveries(args.profile)))
    else:
        print(f"(no SFTP delivery: {sftp_root} does not exist; `exitplan lab up` creates it)")
    for s in summaries:
        print(f"{s.container:<10} {s.blobs:>6,} files  {format_size(s.bytes):>10}  ({s.bytes:,} bytes)")
    print(
        f"done in {time.monotonic() - started:.1f} s. Re-seeding is idempotent: it overwrites the same names "
        "with the same bytes and leaves other blobs in these containers alone."
    )
    return ExitCode.OK


def cmd_inventory_report(args: argparse.Namespace) -> int:
    """Write an Azure Blob Inventory report of a dataset's container, from Azurite's contents."""
    from config.loader import load_config
    from lab import inventory_report, seed as lab_seed

    loaded = load_config(args.config)
    if args.dataset not in loaded.config.datasets:
        raise UserError(f"--dataset {args.dataset}: no such dataset in {args.config} "
                        f"({', '.join(loaded.config.datasets)})")
    if args.format == "parquet" and not lab_seed.parquet_available():
        raise UserError(lab_seed.PYARROW_MISSING)
    try:
        written = inventory_report.write_dataset_report(loaded, args.dataset, fmt=args.format, container=args.container,
                                                        rule=args.rule)
    except ValueError as exc:
        raise UserError(f"--dataset {args.dataset}: {exc}") from None
    except lab_seed.LabStoreError as exc:
        raise UserError(f"writing the inventory report failed: {exc}", ExitCode.FAILED) from None
    print(f"inventory report of {written.rows:,} blobs written: {written.path} ({', '.join(written.files)})")
    print(f"use it with, under datasets.{args.dataset}:\n  inventory:\n    report: {written.path}")
    return ExitCode.OK


def _workers(raw: str) -> int:
    n = int(raw)
    if not 1 <= n <= 64:
        raise argparse.ArgumentTypeError("must be between 1 and 64")
    return n


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `exitplan lab …` to the CLI."""
    lab = subparsers.add_parser(
        "lab", help="run the local lab: Azurite, an S3 server, an SFTP server and a Prefect server on 127.0.0.1",
        description=__doc__.split("\n\n")[0],
    )
    sub = lab.add_subparsers(dest="lab_command", metavar="ACTION")
    sub.required = True

    p = sub.add_parser(
        "up", help="start Azurite, the S3 server, the SFTP server and the Prefect server (ports: "
                   "EXITPLAN_LAB_AZURITE_PORT, EXITPLAN_LAB_S3_PORT, EXITPLAN_LAB_SFTP_PORT, EXITPLAN_LAB_PREFECT_PORT)",
    )
    p.set_defaults(func=cmd_up)
    p = sub.add_parser("down", help="stop what `lab up` started")
    p.set_defaults(func=cmd_down)
    p = sub.add_parser("status", help="show each lab server: up/down, pid, port")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("env", help='print shell exports for the SDKs and Prefect: eval "$(exitplan lab env)"')
    p.set_defaults(func=cmd_env)
    p = sub.add_parser("seed", help="write the synthetic datasets (claims, stays, imaging) into Azurite and the "
                                    "partner delivery into the SFTP server's directory")
    p.add_argument(
        "--profile", choices=SEED_PROFILES, default="standard",
        help="tiny: seconds, for tests; standard: the demo (~0.6 GiB, 300 MiB largest); bench: ~1.2 GiB "
             "(default: standard)",
    )
    p.add_argument(
        "--connection-string", metavar="CS",
        help="Azurite connection string (default: the running lab, else AZURE_STORAGE_CONNECTION_STRING)",
    )
    p.add_argument("--workers", type=_workers, default=8, help="uploads in flight (default: 8)")
    p.set_defaults(func=cmd_seed)
    p = sub.add_parser("inventory-report", help="write an Azure Blob Inventory report (CSV or Parquet, with its "
                                                "manifest) of a dataset's container from Azurite's contents")
    p.add_argument("--config", required=True, help="the configuration file")
    p.add_argument("--dataset", required=True, help="the dataset whose container the report lists")
    p.add_argument("--format", choices=("csv", "parquet"), default="csv", help="the report's format (default: csv)")
    p.add_argument("--container", default="inventory", help="the container the report goes into (default: inventory)")
    p.add_argument("--rule", default="exitplan", help="the inventory rule's name (default: exitplan)")
    p.set_defaults(func=cmd_inventory_report)
