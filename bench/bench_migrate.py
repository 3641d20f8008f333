#!/usr/bin/env python3
"""Benchmark `exitplan migrate` (CLI and Prefect flow) against rclone, the lab's ceiling and a bare hashing loop.

One run, loopback only, everything it starts is stopped at the end (also on Ctrl-C or failure):

1. Starts its own Azurite and moto (S3) on free 127.0.0.1 ports (and a Prefect server when the
   ``exitplan-flow`` tool is measured), seeds two containers with deterministic bytes:
   ``bench-large`` (a few blobs of hundreds of MiB, staged blocks, so without a Content-MD5) and
   ``bench-small`` (many small blobs, Put Blob with a Content-MD5).
2. For each series (large, small) and each repeat, runs, each in its own process (CPU and peak RSS
   from ``os.wait4``), with a freshly restarted moto (it keeps every byte uploaded in memory), each
   repeat in the order of the last one turned by one tool (`rotated`):
     a. ``exitplan migrate --config <generated yaml>`` (fresh state dir, fresh destination prefix),
        plain and encrypted (``exitplan-enc``);
     a'. ``exitplan-flow``: the same plain yaml (plus an ``orchestration`` section) run by the Prefect
        flow ``migrate_flow`` in its own process against the bench's Prefect server, whose CPU during
        the run is recorded too;
     b. ``rclone copy`` with an account-SAS Azure remote and an S3 remote (multipart forced);
     c. the lab's ceiling: boto3 uploading the same bytes from memory (generated before the timer);
   and checks that every tool wrote every object with the right size (boto3 listing).
3. In one child process, the engine alone on in-memory connectors (`copy_objects` and bare
   `copy_object`) next to a bare loop doing the same hashing over the same bytes.
4. Peak RSS of `exitplan migrate` on one big blob (default 2 GiB) versus one 20 MiB blob.

Prints a table, writes ``bench/out/<timestamp>.json``. See bench/README.md for what each figure
means. Run with the project's venv: ``.venv/bin/python bench/bench_migrate.py [--quick]``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
PROJECT_PACKAGES = ("config", "connectors", "engine", "flows", "lab")  # pyproject.toml's packages
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from config.lab import (  # noqa: E402
    AZURITE_ACCOUNT,
    AZURITE_KEY,
    LAB_REGION,
    LAB_S3_ACCESS_KEY,
    LAB_S3_SECRET_KEY,
    LOOPBACK,
    azurite_connection_string,
)
from connectors.base import ContentSettings  # noqa: E402
from lab.seed import SINGLE_SHOT_MAX, DicomLikeBinary, SeedObject, UploadMode  # noqa: E402

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
MB = 1_000_000
GB = 1_000_000_000

BUCKET = "bench"
PART_SIZE = 16 * MiB
CLK_TCK = os.sysconf("SC_CLK_TCK")
OUT_DIR = REPO / "bench" / "out"
EXITPLAN = Path(sys.executable).parent / "exitplan"
PY_SPY = Path(sys.executable).parent / "py-spy"
# py-spy samples per second, of the thread holding the GIL only (`--gil`): Python's CPU, without
# the threads waiting on a socket or a lock, which py-spy's idle detection misses on a loaded box.
PROFILE_RATE = 100
PROFILE_DIR = REPO / "bench" / "profiles"

# ----------------------------------------------------------------------------------------------
# The dataset (shared by the seed, the ceiling child and the in-memory engine child)
# ----------------------------------------------------------------------------------------------


def series_objects(container: str, count: int, size: int) -> list[SeedObject]:
    """`count` blobs of `size` bytes in `container`: deterministic pseudo-random bytes (AES-CTR
    keystream behind a small DICOM-like header), regenerated on demand. Above 8 MiB they are
    written as staged blocks (no Content-MD5 in Azure), below as one Put Blob with a Content-MD5."""
    mode = UploadMode.BLOCKS if size > SINGLE_SHOT_MAX else UploadMode.SINGLE
    return [
        SeedObject(container, f"obj-{i:05d}.bin", DicomLikeBinary(f"bench/{container}/{i}/{size}", size), mode,
                   ContentSettings(content_type="application/octet-stream"))
        for i in range(count)
    ]


@dataclass(frozen=True)
class Series:
    name: str  # "large", "small", "rss-big", "rss-small"
    container: str
    count: int
    size: int

    @property
    def objects(self) -> list[SeedObject]:
        return series_objects(self.container, self.count, self.size)

    @property
    def total(self) -> int:
        return self.count * self.size

    @property
    def has_md5(self) -> bool:
        return self.size <= SINGLE_SHOT_MAX

    def as_dict(self) -> dict:
        return {"name": self.name, "container": self.container, "objects": self.count, "object_bytes": self.size,
                "bytes": self.total, "source_content_md5": self.has_md5}


# ----------------------------------------------------------------------------------------------
# Processes: servers, children, rusage
# ----------------------------------------------------------------------------------------------


def group_cpu(pgid: int | None) -> float:
    """CPU seconds (user + system) of every live process in process group `pgid` (/proc)."""
    if pgid is None:
        return 0.0
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                rest = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        if int(rest[2]) == pgid:
            total += int(rest[11]) + int(rest[12])
    return total / CLK_TCK


def group_rss(pgid: int | None) -> int:
    """Current RSS bytes of process group `pgid`."""
    if pgid is None:
        return 0
    total = 0
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                rest = f.read().rpartition(")")[2].split()
            if int(rest[2]) == pgid:
                with open(f"/proc/{entry.name}/statm") as f:
                    total += int(f.read().split()[1]) * page
        except OSError:
            continue
    return total


class Lab:
    """Azurite + moto on free loopback ports, owned by this process."""

    def __init__(self, workdir: Path):
        from flows.lab_processes import free_port

        self.workdir = workdir
        self.azurite = None
        self.moto = None
        self.prefect = None
        self.azurite_port = free_port()
        self.s3_port = free_port()
        self.prefect_port = free_port()

    @property
    def conn_str(self) -> str:
        return azurite_connection_string(self.azurite_port)

    @property
    def s3_url(self) -> str:
        return f"http://{LOOPBACK}:{self.s3_port}"

    @property
    def prefect_api_url(self) -> str:
        return f"http://{LOOPBACK}:{self.prefect_port}/api"

    def start_azurite(self) -> None:
        from flows.lab_processes import azurite_spec, start_server

        # on_started: the process is recorded before the readiness wait, so Ctrl-C during it still stops it
        self.azurite = start_server(azurite_spec(self.azurite_port), log_path=self.workdir / "azurite.log",
                                    on_started=lambda p: setattr(self, "azurite", p))

    def start_prefect(self) -> None:
        """A Prefect server (API, UI, services; SQLite) with its PREFECT_HOME in the temp dir, analytics
        off, no ephemeral server (flows.lab_processes.prefect_spec)."""
        from flows.lab_processes import prefect_spec, start_server

        spec = prefect_spec(self.prefect_port, self.workdir / "prefect-server-home")
        self.prefect = start_server(spec, log_path=self.workdir / "prefect.log",
                                    on_started=lambda p: setattr(self, "prefect", p))

    def restart_moto(self) -> None:
        """A fresh moto (empty memory) with the bench bucket."""
        from flows.lab_processes import s3_spec, start_server, stop_pid

        if self.moto is not None:
            stop_pid(self.moto.pid)
            self.moto.wait()
            self.moto = None
        self.moto = start_server(s3_spec(self.s3_port), log_path=self.workdir / "moto.log",
                                 on_started=lambda p: setattr(self, "moto", p))
        s3_client(self.s3_url).create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": LAB_REGION})

    def stop(self) -> None:
        from flows.lab_processes import stop_pid

        for proc in (self.moto, self.azurite, self.prefect):
            if proc is not None:
                try:
                    stop_pid(proc.pid)
                    proc.wait(timeout=10)
                except Exception as exc:  # keep stopping the others
                    print(f"warning: could not stop pid {proc.pid}: {exc}", file=sys.stderr)
        self.moto = self.azurite = self.prefect = None

    def server_pgids(self) -> dict[str, int | None]:
        """The servers whose CPU is recorded around each run (each leads its own process group)."""
        pgids = {"azurite": self.azurite.pid if self.azurite else None,
                 "moto": self.moto.pid if self.moto else None}
        if self.prefect is not None:
            pgids["prefect"] = self.prefect.pid
        return pgids


_CHILDREN: set[int] = set()  # pids of running benchmark children, killed on interrupt


@dataclass
class ChildResult:
    argv: list[str]
    rc: int
    wall: float
    cpu_user: float
    cpu_sys: float
    maxrss: int  # bytes
    log: Path
    server_cpu: dict[str, float] = field(default_factory=dict)

    @property
    def cpu(self) -> float:
        return self.cpu_user + self.cpu_sys

    def tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


# A tiny launcher between this process and each measured child. ru_maxrss is the high-water mark
# of the child's address space *including the one it had before exec*: a child spawned directly
# from this (large) process would report at least this process's RSS. The launcher is small
# (python -S, ~10 MiB), forks, execs the tool, and reports the tool's own os.wait4 rusage.
_LAUNCHER = r"""
import json, os, signal, sys, time
out, argv = sys.argv[1], sys.argv[2:]
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(argv[0], argv)
    finally:
        os._exit(127)
signal.signal(signal.SIGTERM, lambda *a: os.kill(pid, signal.SIGTERM))
_, status, ru = os.wait4(pid, 0)
wall = time.perf_counter() - t0
with open(out, "w") as f:
    json.dump({"wall": wall, "utime": ru.ru_utime, "stime": ru.ru_stime, "maxrss_kib": ru.ru_maxrss,
               "rc": os.waitstatus_to_exitcode(status)}, f)
sys.exit(0)
"""


def run_child(argv: list[str], *, env: dict[str, str], log: Path, lab: Lab | None = None,
              timeout: float = 1800.0, cwd: Path | None = None) -> ChildResult:
    """Run `argv` to completion; wall time, its own rusage (os.wait4) and the servers' CPU delta."""
    before = {}
    if lab is not None:
        before = {name: group_cpu(pgid) for name, pgid in lab.server_pgids().items()}
    rusage_file = log.with_suffix(".rusage.json")
    with open(log, "wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-S", "-c", _LAUNCHER, str(rusage_file), *argv], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                                cwd=cwd)
        _CHILDREN.add(proc.pid)
        timer = threading.Timer(timeout, lambda: _kill(proc.pid))
        timer.start()
        try:
            proc.wait()
        finally:
            timer.cancel()
        outer_wall = time.perf_counter() - start
        _CHILDREN.discard(proc.pid)
    try:
        ru = json.loads(rusage_file.read_text())
    except (OSError, ValueError):
        ru = {"wall": outer_wall, "utime": 0.0, "stime": 0.0, "maxrss_kib": 0, "rc": proc.returncode or -1}
    result = ChildResult(list(argv), ru["rc"], ru["wall"], ru["utime"], ru["stime"], ru["maxrss_kib"] * 1024, log)
    if lab is not None:
        result.server_cpu = {name: group_cpu(pgid) - before.get(name, 0.0) for name, pgid in lab.server_pgids().items()}
    return result


def _kill(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RCLONE_", "AWS_", "AZURE_", "EXITPLAN_")) and k != "REQUESTS_CA_BUNDLE"}
    env["DO_NOT_TRACK"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


# ----------------------------------------------------------------------------------------------
# S3 helpers
# ----------------------------------------------------------------------------------------------


def s3_client(endpoint: str, pool: int = 10):
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint, aws_access_key_id=LAB_S3_ACCESS_KEY, aws_secret_access_key=LAB_S3_SECRET_KEY,
        config=Config(region_name=LAB_REGION, request_checksum_calculation="when_required",
                      response_checksum_validation="when_required", max_pool_connections=pool,
                      retries={"max_attempts": 3, "mode": "standard"}, s3={"addressing_style": "path"}),
    )


def verify_prefix(endpoint: str, prefix: str, series: Series, encrypted: bool = False) -> tuple[bool, str]:
    """Every object of `series` is under `prefix` with its size (its exact ciphertext size when
    `encrypted`) and nothing else."""
    from engine.crypto.tink_format import TINK_LAYOUT

    s3 = s3_client(endpoint)
    sizes: dict[str, int] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for o in page.get("Contents", []):
            sizes[o["Key"][len(prefix):]] = o["Size"]
    want = {o.name: TINK_LAYOUT.output_size(o.size) if encrypted else o.size for o in series.objects}
    missing = sorted(set(want) - set(sizes))
    wrong = sorted(k for k in want if k in sizes and sizes[k] != want[k])
    extra = sorted(set(sizes) - set(want))
    ok = not (missing or wrong or extra)
    detail = (f"{len(sizes)}/{len(want)} objects, {sum(sizes.values()):,}/{series.total:,} bytes"
              + (f"; missing {missing[:3]}" if missing else "") + (f"; wrong size {wrong[:3]}" if wrong else "")
              + (f"; unexpected {extra[:3]}" if extra else ""))
    return ok, detail


# ----------------------------------------------------------------------------------------------
# Latency-true simulation: the servers behind proxies that hold every request
# ----------------------------------------------------------------------------------------------

# One child process (its own process group, so its CPU is counted as a server's) running a
# tests/faultproxy.py proxy in front of each given port, each holding every request `delay`
# seconds (`delay_every`). A listen backlog of 1,024: the standard library's 5 would make
# hundreds of connections opened at once wait for SYN retries.
_PROXY_CHILD = r"""
import http.server, sys
sys.path.insert(0, sys.argv[1])
http.server.ThreadingHTTPServer.request_queue_size = 1024
from tests.faultproxy import FaultProxy
proxies = [FaultProxy("127.0.0.1", int(port), timeout=120).start() for port in sys.argv[3:]]
for proxy in proxies:
    proxy.delay_every(float(sys.argv[2]))
print(" ".join(str(proxy.port) for proxy in proxies), flush=True)
sys.stdin.read()  # until the bench closes this pipe
"""


class ProxiedLab:
    """The lab as a client sees it through the delaying proxies: Azurite and S3 URLs point at the
    proxies; moto restarts and server CPU are the lab's, plus the proxies' CPU ("proxy")."""

    def __init__(self, lab: Lab, delay_s: float):
        self.lab = lab
        self.delay_s = delay_s
        self.proc = subprocess.Popen([sys.executable, "-c", _PROXY_CHILD, str(REPO), str(delay_s),
                                      str(lab.azurite_port), str(lab.s3_port)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     start_new_session=True, env=child_env())
        _CHILDREN.add(self.proc.pid)
        self.azurite_port, s3_port = (int(x) for x in self.proc.stdout.readline().split())
        self.s3_url = f"http://{LOOPBACK}:{s3_port}"

    @property
    def conn_str(self) -> str:
        return azurite_connection_string(self.azurite_port)

    def restart_moto(self) -> None:
        self.lab.restart_moto()

    def server_pgids(self) -> dict[str, int | None]:
        return dict(self.lab.server_pgids(), proxy=self.proc.pid)

    def stop(self) -> None:
        self.proc.stdin.close()
        _kill(self.proc.pid)
        self.proc.wait()
        _CHILDREN.discard(self.proc.pid)


def latency_series(lab: Lab, series: Series, args: argparse.Namespace, tmp: Path) -> list[dict]:
    """Each tool of `--latency-tools` at each `--latency-concurrency` on `series` through proxies
    holding every request `--latency-ms`: objects/s against concurrency / latency, CPU per object."""
    delay = args.latency_ms / 1000
    far = ProxiedLab(lab, delay)
    rows: list[dict] = []
    print(f"latency-true simulation: every request held {args.latency_ms:g} ms by a proxy "
          f"(Azurite :{far.azurite_port}, S3 {far.s3_url}); {series.count:,} x {series.size / KiB:g} KiB", flush=True)
    try:
        conf = rclone_config(tmp / "rclone-far.conf", far)  # type: ignore[arg-type]
        for c in args.latency_concurrency:
            for tool in args.latency_tools:
                tag = f"far{args.latency_ms:g}-c{c}"
                far.restart_moto()
                if tool == "rclone":
                    res = run_rclone(far, conf, series, tag, c, tmp)  # type: ignore[arg-type]
                else:
                    res = run_exitplan(far, series, tag, c, tmp, encrypted=tool == "exitplan-enc")  # type: ignore[arg-type]
                ok, detail = (verify_prefix(lab.s3_url, res.prefix, series, encrypted=tool == "exitplan-enc")
                              if res.rc == 0 else (False, f"exit {res.rc}"))
                row = measure(tool, series, res, ok, detail)
                ideal = c / (2 * delay)  # two requests per object (a GET, a PUT), each held `delay`
                row.update(concurrency=c, latency_ms=args.latency_ms, objects_s=series.count / res.wall,
                           ideal_objects_s=ideal, of_ideal=series.count / res.wall / ideal)
                rows.append(row)
                print(f"  c={c:4} {tool:13} {row['objects_s']:7.1f} obj/s (ideal {ideal:7.1f}, "
                      f"{100 * row['of_ideal']:5.1f}%)  cpu {row['cpu_ms_per_object']:6.2f} ms/obj  "
                      f"rss {row['peak_rss_mib']:5.0f} MiB  proxy cpu {res.server_cpu.get('proxy', 0):5.1f} s  "
                      f"moto cpu {res.server_cpu.get('moto', 0):5.1f} s  {'ok' if ok else 'FAILED'}: {detail}",
                      flush=True)
    finally:
        far.stop()
    return rows


# ----------------------------------------------------------------------------------------------
# The tools
# ----------------------------------------------------------------------------------------------


# The flow's shards (`orchestration`): 4 shards per series whatever its size (4 x 256 MiB large
# blobs -> one per shard; 8,000 small blobs -> 2,000 per shard), 2 shard tasks at once (the default).
FLOW_SHARDS = 4
FLOW_SHARD_BYTES = 256 * MiB
FLOW_PARALLEL_SHARDS = 2


def flow_shard_objects(series: "Series") -> int:
    return max(1, -(-series.count // FLOW_SHARDS))


def exitplan_config(path: Path, lab: Lab, series: Series, prefix: str, concurrency: int, state_dir: Path,
                    budget: int = 128 * MiB, encrypted: bool = False, orchestration: bool = False,
                    shard_processes: int = 0) -> Path:
    # Plain (`public: true`) is what rclone copy does; encrypted is exitplan's default.
    public = "false" if encrypted else "true"
    keys = f"keys:\n  kek:\n    backend: local\n    path: {state_dir}/kek.key\n" if encrypted else ""
    orch = (f"orchestration:\n  shard_bytes: {FLOW_SHARD_BYTES // MiB}MiB\n"
            f"  shard_objects: {flow_shard_objects(series)}\n"
            f"  parallel_shards: {FLOW_PARALLEL_SHARDS}\n  shard_processes: {shard_processes}\n") if orchestration else ""
    text = f"""\
# generated by bench/bench_migrate.py
version: 1
project: bench
sources:
  azurite:
    kind: azure_blob
    connection_string_env: EXITPLAN_BENCH_AZURE_CONNECTION_STRING
    emulator: azurite
destinations:
  bench-s3:
    provider: lab
    endpoint_url: {lab.s3_url}
    region: {LAB_REGION}
    bucket: {BUCKET}
    credentials:
      access_key_id_env: EXITPLAN_BENCH_S3_KEY_ID
      secret_access_key_env: EXITPLAN_BENCH_S3_SECRET
datasets:
  {series.name}:
    source: azurite
    container: {series.container}
    destination: bench-s3
    dest_prefix: {prefix}
    public: {public}
{keys}transfer:
  concurrency: {concurrency}
  part_size: {PART_SIZE // MiB}MiB
  memory_budget: {budget // MiB}MiB
state:
  path: {state_dir}
{orch}"""
    path.write_text(text)
    return path


def run_exitplan(lab: Lab, series: Series, tag: str, concurrency: int, tmp: Path, encrypted: bool = False,
                 profile: Path | None = None) -> ChildResult:
    """`exitplan migrate` of `series`; with `profile`, under py-spy, its raw stacks written there."""
    name = "exitplan-enc" if encrypted else "exitplan"
    prefix = f"{name}-{tag}/"
    cfg = exitplan_config(tmp / f"{name}-{tag}.yaml", lab, series, prefix, concurrency, tmp / f"state-{name}-{tag}",
                          encrypted=encrypted)
    env = child_env(EXITPLAN_BENCH_AZURE_CONNECTION_STRING=lab.conn_str,
                    EXITPLAN_BENCH_S3_KEY_ID=LAB_S3_ACCESS_KEY, EXITPLAN_BENCH_S3_SECRET=LAB_S3_SECRET_KEY)
    if encrypted:  # the keyset is made once per project, not timed
        subprocess.run([str(EXITPLAN), "keys", "init", "--config", str(cfg)], env=env, check=True,
                       stdout=subprocess.DEVNULL)
    argv = [str(EXITPLAN), "migrate", "--config", str(cfg)]
    if profile is not None:  # py-spy samples the run (it costs the run a few % of CPU)
        argv = [str(PY_SPY), "record", "--gil", "--rate", str(PROFILE_RATE), "--format", "raw",
                "--output", str(profile), "--", *argv]
    res = run_child(argv, env=env, log=tmp / f"{name}-{tag}.log", lab=lab)
    res.prefix = prefix  # type: ignore[attr-defined]
    return res


# The exitplan-flow child: migrate_flow called in-process (a flow run on the bench's Prefect server,
# PREFECT_API_URL in its environment), its shard tasks in threads of this process, as a process
# worker would run it. Non-zero exit unless the flow run's final state is Completed.
_FLOW_CHILD = r"""
import sys
from flows.orchestrate import migrate_flow
state = migrate_flow(config_path=sys.argv[1], return_state=True)
print(f"flow run final state: {state.type.value} {state.name!r} {state.message or ''}", flush=True)
sys.exit(0 if state.is_completed() else 1)
"""


def flow_env(lab: Lab, tmp: Path, **extra: str) -> dict[str, str]:
    """A flow run's environment: the bench's Prefect server and nothing inherited from ours."""
    env = {k: v for k, v in child_env(**extra).items() if not k.startswith("PREFECT_")}
    home = tmp / "prefect-client-home"
    home.mkdir(exist_ok=True)
    env.update(PREFECT_API_URL=lab.prefect_api_url, PREFECT_HOME=str(home), PREFECT_SERVER_EPHEMERAL_ENABLED="false",
               PREFECT_SERVER_ANALYTICS_ENABLED="false")
    return env


# The flow with its shards in processes of their own (`orchestration.shard_processes`): the run's
# connections are split between them, so the requests in flight stay those of the other tools.
FLOW_SHARD_PROCESSES = 2
FLOW_PROCESSES_TOOL = f"exitplan-flow-{FLOW_SHARD_PROCESSES}p"


def rotated(tools: list[str], rep: int) -> list[str]:
    """The tools of repeat `rep` (from 1), each repeat starting one tool further: a tool's place in
    the order (Azurite is not restarted between runs, and its CPU for the same requests moves by
    a third from run to run) is not always the same across repeats."""
    at = (rep - 1) % len(tools) if tools else 0
    return tools[at:] + tools[:at]


def uses_flow(tools: list[str]) -> bool:
    """Whether a flow tool is measured (then the bench starts a Prefect server)."""
    return any(t.startswith("exitplan-flow") for t in tools)


def run_exitplan_flow(lab: Lab, series: Series, tag: str, concurrency: int, tmp: Path, processes: int = 0,
                      profile: Path | None = None) -> ChildResult:
    """`migrate_flow` on the same plain config as `exitplan` (plus shards), in its own process;
    with `processes`, its shard tasks in that many processes of their own; with `profile`, under
    py-spy (the flow's process only)."""
    name = f"exitplan-flow-{processes}p" if processes else "exitplan-flow"
    prefix = f"{name}-{tag}/"
    cfg = exitplan_config(tmp / f"{name}-{tag}.yaml", lab, series, prefix, concurrency, tmp / f"state-{name}-{tag}",
                          orchestration=True, shard_processes=processes)
    env = flow_env(lab, tmp, EXITPLAN_BENCH_AZURE_CONNECTION_STRING=lab.conn_str,
                   EXITPLAN_BENCH_S3_KEY_ID=LAB_S3_ACCESS_KEY, EXITPLAN_BENCH_S3_SECRET=LAB_S3_SECRET_KEY)
    # cwd: Prefect also reads prefect.toml / .env from its working directory
    argv = [sys.executable, "-c", _FLOW_CHILD, str(cfg)]
    if profile is not None:
        argv = [str(PY_SPY), "record", "--gil", "--rate", str(PROFILE_RATE), "--format", "raw",
                "--output", str(profile), "--", *argv]
    res = run_child(argv, env=env, log=tmp / f"{name}-{tag}.log", lab=lab, cwd=tmp)
    res.prefix = prefix  # type: ignore[attr-defined]
    return res


def account_sas_url(lab: Lab) -> str:
    from azure.storage.blob import AccountSasPermissions, ResourceTypes, generate_account_sas

    sas = generate_account_sas(
        AZURITE_ACCOUNT, AZURITE_KEY, ResourceTypes(service=True, container=True, object=True),
        AccountSasPermissions(read=True, list=True),
        expiry=dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=6),
    )
    return f"http://{LOOPBACK}:{lab.azurite_port}/{AZURITE_ACCOUNT}?{sas}"


def rclone_config(path: Path, lab: Lab) -> Path:
    path.write_text(f"""\
[az]
type = azureblob
sas_url = {account_sas_url(lab)}

[s3]
type = s3
provider = Other
endpoint = {lab.s3_url}
force_path_style = true
access_key_id = {LAB_S3_ACCESS_KEY}
secret_access_key = {LAB_S3_SECRET_KEY}
region = {LAB_REGION}
""")
    return path


def rclone_flags(concurrency: int) -> list[str]:
    return ["--transfers", str(concurrency), "--checkers", str(2 * concurrency), "--s3-upload-concurrency", "4",
            "--s3-chunk-size", "16M", "--s3-upload-cutoff", "16M", "--s3-no-head"]


def rclone_probe(lab: Lab, conf: Path, series: list[Series], tmp: Path) -> None:
    """Check that rclone reaches Azurite through the account SAS URL and sees every seeded blob."""
    for s in series:
        r = subprocess.run(["rclone", "--config", str(conf), "size", "--json", f"az:{s.container}"],
                           env=child_env(), capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise SystemExit(f"rclone cannot read Azurite through the SAS URL ({s.container}): {r.stderr.strip()[-800:]}")
        got = json.loads(r.stdout)
        if got.get("count") != s.count or got.get("bytes") != s.total:
            raise SystemExit(f"rclone sees {got} in {s.container}, expected {s.count} objects, {s.total} bytes")


def run_rclone(lab: Lab, conf: Path, series: Series, tag: str, concurrency: int, tmp: Path) -> ChildResult:
    prefix = f"rclone-{tag}/"
    argv = ["rclone", "--config", str(conf), "copy", f"az:{series.container}", f"s3:{BUCKET}/{prefix.rstrip('/')}",
            *rclone_flags(concurrency), "--log-level", "NOTICE", "--stats", "0"]
    res = run_child(argv, env=child_env(), log=tmp / f"rclone-{tag}.log", lab=lab)
    res.prefix = prefix  # type: ignore[attr-defined]
    return res


def run_ceiling(lab: Lab, series: Series, tag: str, concurrency: int, tmp: Path) -> tuple[ChildResult, dict]:
    prefix = f"ceiling-{tag}/"
    out = tmp / f"ceiling-{tag}.json"
    argv = [sys.executable, str(Path(__file__).resolve()), "_ceiling", "--endpoint", lab.s3_url, "--prefix", prefix,
            "--container", series.container, "--count", str(series.count), "--size", str(series.size),
            "--concurrency", str(concurrency), "--out", str(out)]
    res = run_child(argv, env=child_env(), log=tmp / f"ceiling-{tag}.log", lab=lab)
    res.prefix = prefix  # type: ignore[attr-defined]
    inner = json.loads(out.read_text()) if out.exists() else {}
    return res, inner


# ----------------------------------------------------------------------------------------------
# Child: the lab's ceiling (boto3 from memory)
# ----------------------------------------------------------------------------------------------


def ceiling_child(args: argparse.Namespace) -> int:
    objs = series_objects(args.container, args.count, args.size)
    s3 = s3_client(args.endpoint, pool=args.concurrency + 4)
    big = args.size > PART_SIZE  # same rule as exitplan: up to the cutoff one PUT, above it multipart
    gen_start = time.perf_counter()
    if big:
        data = [[o.read_range(a, min(a + PART_SIZE, o.size)) for a in range(0, o.size, PART_SIZE)] for o in objs]
    else:
        data = [o.read() for o in objs]
    gen_wall = time.perf_counter() - gen_start

    cpu0, t0 = time.process_time(), time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
        if big:
            uploads = [s3.create_multipart_upload(Bucket=BUCKET, Key=args.prefix + o.name)["UploadId"] for o in objs]

            def part(i: int, n: int) -> dict:
                r = s3.upload_part(Bucket=BUCKET, Key=args.prefix + objs[i].name, UploadId=uploads[i], PartNumber=n + 1,
                                   Body=data[i][n])
                return {"PartNumber": n + 1, "ETag": r["ETag"]}

            futures = [[pool.submit(part, i, n) for n in range(len(parts))] for i, parts in enumerate(data)]
            for i, fs in enumerate(futures):
                s3.complete_multipart_upload(Bucket=BUCKET, Key=args.prefix + objs[i].name, UploadId=uploads[i],
                                             MultipartUpload={"Parts": [f.result() for f in fs]})
        else:
            list(pool.map(lambda i: s3.put_object(Bucket=BUCKET, Key=args.prefix + objs[i].name, Body=data[i]),
                          range(len(objs))))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    Path(args.out).write_text(json.dumps({"upload_wall": wall, "upload_cpu": cpu, "generate_wall": gen_wall}))
    return 0


# ----------------------------------------------------------------------------------------------
# Child: the engine on in-memory connectors versus a bare hashing loop
# ----------------------------------------------------------------------------------------------


def engine_child(args: argparse.Namespace) -> int:
    from functools import partial

    from connectors.base import PartReceipt, multipart_etag
    from connectors.memory import MemoryStore
    from engine.budget import MemoryBudget
    from engine.executors import create_executors
    from engine.dataset_copy import copy_objects, place_all
    from engine.placement import place
    from engine.pipeline import copy_object
    from engine.settings import TransferSettings
    from engine.state import StateStore

    class _Upload:
        def __init__(self, key: str):
            self.key, self.upload_id, self.parts = key, f"bench-{key}", {}

        def upload_part(self, number: int, body, size: int, md5: bytes | None,
                        offset: int | None = None) -> PartReceipt:
            if md5 is None:  # a streamed part: read it (as a server would) and hash it
                h, n = hashlib.md5(), 0
                while chunk := body.read(8 * MiB):
                    h.update(chunk)
                    n += len(chunk)
                md5, size = h.digest(), n
            self.parts[number] = (md5, size)
            return PartReceipt(number, md5.hex(), size)

        def list_parts(self):
            return [PartReceipt(n, m.hex(), s) for n, (m, s) in sorted(self.parts.items())]

        def complete(self, parts) -> str:
            return multipart_etag([self.parts[p.number][0] for p in parts])

        def abort(self) -> None:
            self.parts.clear()

    class DiscardSink(MemoryStore):
        """A MemoryStore sink that keeps no bytes and trusts the Content-MD5 the engine sends (a real
        server checks it on its own CPU): what remains is the engine's own work."""

        def put(self, key, body, size, meta, md5):
            if md5 is None:
                md5 = hashlib.md5(bytes(body)).digest()
            return md5.hex()

        def open_multipart(self, key, meta):
            return _Upload(key)

    results: dict[str, Any] = {}
    for spec in args.series:
        name, container, count, size = spec.split(":")
        count, size = int(count), int(size)
        objs = series_objects(container, count, size)
        has_md5 = size <= SINGLE_SHOT_MAX
        src = MemoryStore(label="bench-source")
        for o in objs:
            src.add(o.name, o.read(), content_md5=has_md5)
        total = count * size
        settings = TransferSettings(concurrency=args.concurrency, memory_budget=args.budget, part_size=PART_SIZE)
        cutoff = settings.small_object_cutoff
        row: dict[str, Any] = {"objects": count, "bytes": total}

        # The bare loop: exactly the hashing the pipeline does (engine/pipeline.py), one thread.
        #  - SHA-256 of the whole plaintext, always (`_OrderedDigest`);
        #  - MD5 of the whole plaintext when the source has a Content-MD5 (checked before publishing);
        #  - multipart: MD5 of every part (its Content-MD5 and ETag check);
        #  - single PUT: its Content-MD5 is the whole-object MD5 (reused if computed, else computed).
        def bare() -> None:
            for o in objs:
                view = memoryview(src.data(o.name))
                sha = hashlib.sha256()
                whole = hashlib.md5() if has_md5 else None
                if size <= cutoff:
                    sha.update(view)
                    if whole is not None:
                        whole.update(view)
                    else:
                        hashlib.md5(view).digest()
                else:
                    for a in range(0, size, PART_SIZE):
                        p = view[a:a + PART_SIZE]
                        sha.update(p)
                        if whole is not None:
                            whole.update(p)
                        hashlib.md5(p).digest()
                sha.hexdigest()

        def with_migrate(tmpdir: Path) -> None:
            sink = DiscardSink(label="bench-sink")
            state = StateStore(tmpdir / "state.db")
            run_id = state.start_run("migrate")
            try:
                with create_executors(settings.concurrency, settings.object_concurrency) as ex:
                    placer = partial(place, source_prefix="", dest_prefix="bench/", limits=sink.limits)
                    summary = copy_objects(name, src, sink, place_all(src.list(""), placer), settings=settings,
                                              budget=MemoryBudget(settings.memory_budget), executors=ex, state=state,
                                              run_id=run_id)
                if summary.ok != count:
                    raise RuntimeError(f"engine (copy_objects): {summary.ok}/{count} ok: {summary.failures[:3]}")
            finally:
                state.finish_run(run_id, "ok")
                state.close()

        def with_copy_object(tmpdir: Path) -> None:
            sink = DiscardSink(label="bench-sink")
            budget = MemoryBudget(settings.memory_budget)
            slots = threading.Semaphore(settings.objects_in_flight)
            outcomes = []
            with create_executors(settings.concurrency, settings.object_concurrency) as ex:
                futures = []
                for meta in src.list(""):
                    slots.acquire()
                    f = ex.objects.submit(copy_object, src, sink, meta, place(meta, "", "bench/", sink.limits),
                                          settings=settings, budget=budget, executors=ex)
                    f.add_done_callback(lambda _f: slots.release())
                    futures.append(f)
                outcomes = [f.result() for f in futures]
            bad = [o for o in outcomes if o.status != "ok"]
            if bad:
                raise RuntimeError(f"engine (copy_object): {len(bad)} failed: {bad[0].reason}")

        for label, fn in (("bare_loop", bare), ("copy_object", with_copy_object), ("copy_objects", with_migrate)):
            best = None
            for _ in range(args.repeat):
                with tempfile.TemporaryDirectory(prefix="exitplan-bench-engine-") as d:
                    c0, t0 = time.process_time(), time.perf_counter()
                    fn(Path(d)) if fn is not bare else fn()
                    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
                if best is None or cpu < best[0]:
                    best = (cpu, wall)
            row[label] = {"cpu": best[0], "wall": best[1]}
        results[name] = row
        del src
    Path(args.out).write_text(json.dumps(results))
    return 0


# ----------------------------------------------------------------------------------------------
# The main run
# ----------------------------------------------------------------------------------------------


def compile_bytecode() -> None:
    """Compile exitplan's own modules to bytecode before any timed run, as an installed exitplan
    has them (pip compiles a package's modules when it installs them). An editable checkout run
    with PYTHONDONTWRITEBYTECODE (or on a read-only tree) would otherwise compile every module
    again in each run: about 0.2 CPU-s per process start counted as the tool's own."""
    import compileall

    ok = all(compileall.compile_dir(REPO / package, quiet=1) for package in PROJECT_PACKAGES)
    if not ok:
        print("warning: some of exitplan's modules could not be compiled to bytecode; their start-up "
              "costs include compiling them", file=sys.stderr)


def seed(lab: Lab, series: list[Series]) -> float:
    from lab.seed import seed_azurite

    t0 = time.perf_counter()
    objs = [o for s in series for o in s.objects]
    seed_azurite(lab.conn_str, objs, workers=8)
    return time.perf_counter() - t0


def measure(tool: str, series: Series, res: ChildResult, ok: bool, detail: str, extra: dict | None = None) -> dict:
    gb = series.total / GB
    row = {
        "tool": tool, "series": series.name, "rc": res.rc, "verified": ok, "verify_detail": detail,
        "wall_s": res.wall, "mb_s": series.total / MB / res.wall if res.wall else None,
        "cpu_s": res.cpu, "cpu_user_s": res.cpu_user, "cpu_sys_s": res.cpu_sys,
        "cpu_s_per_gb": res.cpu / gb if gb else None, "cpu_ms_per_object": 1000 * res.cpu / series.count,
        "peak_rss_mib": res.maxrss / MiB, "server_cpu_s": res.server_cpu,
    }
    if extra:
        row.update(extra)
    return row


def keep_profile(raw: Path, tool: str, series: Series, res: ChildResult, concurrency: int) -> None:
    """The profiled run's breakdown (text) under bench/profiles/, its shares scaled by `res` (the
    same run, not profiled), and for the encrypted small series its flame graph (SVG); the raw
    stacks stay in the temp dir."""
    from bench.profile_stacks import flame_svg, read_raw, summary_text

    stacks = read_raw(raw)
    name = f"{series.name}-{tool}-c{concurrency}"
    title = (f"{tool} migrate, {series.count:,} x {series.size / KiB:g} KiB, concurrency {concurrency}, "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load {os.getloadavg()[0]:.2f}")
    PROFILE_DIR.mkdir(parents=True, exist_ok=True)
    text = summary_text(title, stacks, 1000 * res.cpu / series.count)
    (PROFILE_DIR / f"{name}.txt").write_text(text)
    print(text, flush=True)
    if series.name == "small" and tool == "exitplan-enc":
        (PROFILE_DIR / f"{name}.svg").write_text(flame_svg(stacks, title))


# The issue's small-object targets, as ratios within each repeat: the tools of a repeat run one after
# the other, so a box that slows down between repeats moves both sides of a pair alike.
# (label, tool, reference, figure, target)
PAIRED_TARGETS = (
    ("exitplan/rclone CPU per object", "exitplan", "rclone", "cpu", "< 1: cheaper"),
    ("exitplan-enc/rclone CPU per object", "exitplan-enc", "rclone", "cpu", "target <= 1.5"),
    ("exitplan-enc/ceiling CPU per object", "exitplan-enc", "ceiling", "cpu", "target <= 1 (the ceiling's upload CPU)"),
    ("exitplan/rclone objects/s", "exitplan", "rclone", "rate", "target >= 1"),
    ("exitplan-enc/rclone objects/s", "exitplan-enc", "rclone", "rate", "target >= 1"),
    ("exitplan-flow/exitplan CPU per object", "exitplan-flow", "exitplan", "cpu", "whole runs, start-up in"),
    # Per object beyond the first quarter (`marginal_line`): every tool's fixed cost out, as the
    # ceiling's upload CPU already has its own (its imports and the bytes' generation) out.
    ("exitplan/rclone CPU per object", "exitplan", "rclone", "marginal", "< 1: cheaper"),
    ("exitplan-enc/rclone CPU per object", "exitplan-enc", "rclone", "marginal", "target <= 1.5"),
    ("exitplan-enc/ceiling CPU per object", "exitplan-enc", "ceiling", "marginal", "target <= 1"),
    # Objects/s beyond the first quarter (`marginal_rate`): the rate a long run keeps once started;
    # the whole run's ratio above also carries each tool's start-up (exitplan's ~0.7 s, rclone's ~0.05).
    ("exitplan/rclone objects/s", "exitplan", "rclone", "marginal-rate", "start-up out"),
    ("exitplan-enc/rclone objects/s", "exitplan-enc", "rclone", "marginal-rate", "start-up out"),
)
# The tools run again on the small series' first quarter (`small-base`): those with a per-object cost.
BASE_TOOLS = ("exitplan", "exitplan-enc", "exitplan-flow", "rclone", "ceiling")


def run_cpu(row: dict) -> float | None:
    """A run's client CPU seconds: the ceiling's upload loop alone (its bytes are generated before
    its timer), every other tool's whole process."""
    return row.get("upload_cpu_s") if row["tool"] == "ceiling" else row.get("cpu_s")


def marginal_line(runs: list[dict], tool: str, rep: int, small: Series, base: Series,
                  figure: Callable[[dict], float | None] = run_cpu) -> tuple[float, float] | None:
    """(per object beyond the first `base.count`, fixed per run) of a run's `figure` (its client
    CPU seconds by default) for `tool` in repeat `rep`: the line through its small-base and small
    runs; None unless both ran, were verified and have the figure."""
    full = [r for r in runs if (r["tool"], r["series"], r["repeat"]) == (tool, small.name, rep) and r["verified"]]
    part = [r for r in runs if (r["tool"], r["series"], r["repeat"]) == (tool, base.name, rep) and r["verified"]]
    at_full, at_part = (figure(full[0]), figure(part[0])) if full and part else (None, None)
    if at_full is None or at_part is None:
        return None
    slope = (at_full - at_part) / (small.count - base.count)
    return slope, at_full - slope * small.count


def marginal_rate(runs: list[dict], tool: str, rep: int, small: Series, base: Series) -> float | None:
    """Objects per second of `tool` in repeat `rep` beyond the first `base.count` (its start-up and
    end out): the objects of the small run beyond the base run's over the wall time they added."""
    m = marginal_line(runs, tool, rep, small, base, figure=lambda row: row.get("wall_s"))
    return 1 / m[0] if m and m[0] > 0 else None


def paired_ratios(runs: list[dict], args: argparse.Namespace, rat: dict[str, Any],
                  small: Series | None = None, base: Series | None = None) -> None:
    """For each of `PAIRED_TARGETS` both tools ran: the median over repeats of the ratio within a
    repeat, and the range of those ratios (small series); kept in `rat` too."""
    def figure(row: dict, kind: str) -> float | None:
        if kind == "rate":
            return 1 / row["wall_s"] if row.get("wall_s") else None
        if kind == "marginal":
            m = marginal_line(runs, row["tool"], row["repeat"], small, base) if small and base else None
            return m[0] if m else None
        if kind == "marginal-rate":
            return marginal_rate(runs, row["tool"], row["repeat"], small, base) if small and base else None
        return run_cpu(row)

    by = {(r["tool"], r["repeat"]): r for r in runs if r["series"] == "small" and r.get("verified")}
    printed = False
    for label, tool, ref, kind, note in PAIRED_TARGETS:
        pairs = [ratio(figure(by[(tool, rep)], kind), figure(by[(ref, rep)], kind))
                 for rep in range(1, args.repeat + 1) if (tool, rep) in by and (ref, rep) in by]
        pairs = [p for p in pairs if p is not None]
        if not pairs:
            continue
        if not printed:
            print("  small series, the same repeat's pair (median over repeats [lowest-highest], pairs "
                  "where both runs were verified; marginal: beyond the first quarter, fixed costs out):")
            printed = True
        if kind in ("marginal", "marginal-rate"):
            label = f"{label}, marginal"
        value = rat[f"{label}, small, paired"] = statistics.median(pairs)
        print(f"    {label:50} {value:6.2f}  [{min(pairs):.2f}-{max(pairs):.2f}] of {len(pairs)}  {note}")


def median_row(rows: list[dict]) -> dict:
    """Per metric, the median over repeats (the best run's numbers are in the JSON too)."""
    out = dict(rows[0])
    for k in ("wall_s", "mb_s", "cpu_s", "cpu_s_per_gb", "cpu_ms_per_object", "peak_rss_mib", "upload_wall_s"):
        vals = [r[k] for r in rows if r.get(k) is not None]
        if vals:
            out[k] = statistics.median(vals)
    for srv in ("azurite", "moto", "prefect"):
        vals = [r["server_cpu_s"][srv] for r in rows if srv in r["server_cpu_s"]]
        if not vals:
            continue
        out.setdefault("server_cpu_s", {})
        out["server_cpu_s"] = dict(out["server_cpu_s"], **{srv: statistics.median(vals)})
    out["verified"] = all(r["verified"] for r in rows)
    out["runs"] = len(rows)
    return out


def fmt(v: float | None, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def ratio(a: float | None, b: float | None) -> float | None:
    return None if not a or not b else a / b


def main_run(args: argparse.Namespace) -> int:
    started = dt.datetime.now()
    large = Series("large", "bench-large", args.large_count, args.large_mib * MiB)
    small = Series("small", "bench-small", args.small_count, args.small_kib * KiB)
    rss_big = Series("rss-big", "bench-rss-big", 1, args.rss_big_mib * MiB)
    rss_small = Series("rss-small", "bench-rss-small", 1, 20 * MiB)
    series = [s for s in (large, small) if s.name in args.series]
    # The small series again at a quarter of its objects, for every tool with a per-object cost: the
    # difference between the two runs is what each costs per object, start-up and per-run costs out.
    base = (Series("small-base", "bench-small-base", max(1, small.count // 4), small.size)
            if small in series and any(t in BASE_TOOLS for t in args.tools) else None)
    n = args.concurrency
    tmp = Path(tempfile.mkdtemp(prefix="exitplan-bench-"))
    lab = Lab(tmp)
    report: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"), "args": vars(args), "concurrency": n,
        "part_size": PART_SIZE, "memory_budget": 128 * MiB, "series": [s.as_dict() for s in series],
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "ports": {"azurite": lab.azurite_port, "s3": lab.s3_port},
    }
    if uses_flow(args.tools):
        report["ports"]["prefect"] = lab.prefect_port
        report["flow_orchestration"] = {"shard_bytes": FLOW_SHARD_BYTES, "shards_per_series": FLOW_SHARDS,
                                        "parallel_shards": FLOW_PARALLEL_SHARDS}
    print(f"exitplan bench: concurrency {n}, part {PART_SIZE // MiB} MiB; temp dir {tmp}", flush=True)
    print(f"  large: {large.count} x {large.size / MiB:g} MiB = {large.total / MiB:,.0f} MiB (staged blocks, no Content-MD5)")
    print(f"  small: {small.count} x {small.size / KiB:g} KiB = {small.total / MiB:,.1f} MiB (Put Blob, with Content-MD5)")
    compile_bytecode()
    try:
        # --- the engine alone first: CPU only, no server running yet ---------------------------
        engine: dict = {}
        if not args.skip_engine:
            print("engine on in-memory connectors vs bare hashing loop ...", flush=True)
            out = tmp / "engine.json"
            argv = [sys.executable, str(Path(__file__).resolve()), "_engine", "--concurrency", str(n),
                    "--budget", str(128 * MiB), "--repeat", str(args.engine_repeat), "--out", str(out),
                    *[f"--series={s.name}:{s.container}:{s.count}:{s.size}" for s in series]]
            res = run_child(argv, env=child_env(), log=tmp / "engine.log")
            if res.rc != 0:
                raise SystemExit(f"the engine benchmark failed (exit {res.rc}):\n{res.tail(30)}")
            engine = json.loads(out.read_text())
            report["engine"] = engine

        # --- servers and seed --------------------------------------------------------------------
        print(f"starting Azurite on {LOOPBACK}:{lab.azurite_port}, moto on {LOOPBACK}:{lab.s3_port} ...", flush=True)
        lab.start_azurite()
        lab.restart_moto()
        if uses_flow(args.tools):
            t0 = time.perf_counter()
            lab.start_prefect()
            print(f"Prefect server on {LOOPBACK}:{lab.prefect_port} ready in {time.perf_counter() - t0:.1f} s",
                  flush=True)
        seeded = series + ([base] if base else [])
        took = seed(lab, seeded)
        print(f"seeded {sum(s.count for s in seeded):,} blobs, {sum(s.total for s in seeded) / MiB:,.0f} MiB "
              f"in {took:.1f} s", flush=True)
        report["seed_seconds"] = took
        conf = rclone_config(tmp / "rclone.conf", lab)
        rclone_probe(lab, conf, series, tmp)
        print("rclone reads Azurite through the account SAS URL: every seeded blob listed with its size", flush=True)

        # exitplan's fixed cost: importing the CLI and SDKs (a process that only imports)
        imp = run_child([sys.executable, "-c", "import flows.cli, flows.commands, engine.run, connectors.azure_blob, "
                         "connectors.s3"], env=child_env(), log=tmp / "import.log")
        report["exitplan_import_cpu_s"] = imp.cpu
        report["exitplan_import_rss_mib"] = imp.maxrss / MiB
        if uses_flow(args.tools):  # the flow path's: Prefect and the flows module on top
            imp = run_child([sys.executable, "-c", "import flows.orchestrate, engine.run, connectors.azure_blob, "
                             "connectors.s3"], env=flow_env(lab, tmp), log=tmp / "import-flow.log", cwd=tmp)
            report["flow_import_cpu_s"] = imp.cpu
            report["flow_import_rss_mib"] = imp.maxrss / MiB

        # --- the timed series --------------------------------------------------------------------
        runs: list[dict] = []
        for rep in range(1, args.repeat + 1):
            for s in seeded:
                for tool in rotated(args.tools if s is not base else [t for t in args.tools if t in BASE_TOOLS], rep):
                    tag = f"{s.name}-r{rep}"
                    lab.restart_moto()
                    extra = None
                    if tool in ("exitplan", "exitplan-enc"):
                        res = run_exitplan(lab, s, tag, n, tmp, encrypted=tool == "exitplan-enc")
                    elif tool == "exitplan-flow":
                        res = run_exitplan_flow(lab, s, tag, n, tmp)
                    elif tool == FLOW_PROCESSES_TOOL:
                        res = run_exitplan_flow(lab, s, tag, n, tmp, processes=FLOW_SHARD_PROCESSES)
                    elif tool == "rclone":
                        res = run_rclone(lab, conf, s, tag, n, tmp)
                    else:
                        res, inner = run_ceiling(lab, s, tag, n, tmp)
                        extra = {"upload_wall_s": inner.get("upload_wall"), "upload_cpu_s": inner.get("upload_cpu"),
                                 "generate_wall_s": inner.get("generate_wall")}
                    ok, detail = (verify_prefix(lab.s3_url, res.prefix, s, encrypted=tool == "exitplan-enc")
                                  if res.rc == 0 else (False, f"exit {res.rc}"))
                    row = measure(tool, s, res, ok, detail, extra)
                    if tool == "ceiling" and extra and extra["upload_wall_s"]:
                        # the ceiling's rate is over the upload alone (bytes were generated before the timer)
                        row["mb_s"] = s.total / MB / extra["upload_wall_s"]
                        row["wall_s"] = extra["upload_wall_s"]
                        row["process_wall_s"] = res.wall
                    row["repeat"] = rep
                    runs.append(row)
                    flag = "ok" if ok else "FAILED"
                    pf = f"  prefect cpu {res.server_cpu['prefect']:5.1f} s" if "prefect" in res.server_cpu else ""
                    print(f"  [{rep}] {s.name:5} {tool:13} {row['wall_s']:7.1f} s {fmt(row['mb_s']):>7} MB/s "
                          f"cpu {res.cpu:6.1f} s  rss {res.maxrss / MiB:6.0f} MiB{pf}  {flag}: {detail}", flush=True)
                    if not ok:
                        print(f"    log tail ({res.log}):\n" + "\n".join("      " + line for line in res.tail().splitlines()),
                              flush=True)
                    if args.profile and rep == 1 and s is not base and tool in ("exitplan", "exitplan-enc",
                                                                               "exitplan-flow"):
                        # A second run under py-spy, not timed: its shares, scaled by this run's CPU.
                        raw = tmp / f"profile-{tool}-{tag}.txt"
                        lab.restart_moto()
                        if tool == "exitplan-flow":
                            run_exitplan_flow(lab, s, f"{tag}-profiled", n, tmp, profile=raw)
                        else:
                            run_exitplan(lab, s, f"{tag}-profiled", n, tmp, encrypted=tool == "exitplan-enc",
                                         profile=raw)
                        if raw.exists():
                            keep_profile(raw, tool, s, res, n)
        report["runs"] = runs
        if args.latency_ms:
            report["latency"] = latency_series(lab, small, args, tmp)

        # --- peak RSS: one big blob versus one 20 MiB blob -------------------------------------------
        rss: dict = {}
        if not args.skip_2g:
            print(f"peak RSS: seeding one {rss_big.size / MiB:,.0f} MiB blob and one 20 MiB blob ...", flush=True)
            seed(lab, [rss_big, rss_small])
            for s in (rss_small, rss_big):
                lab.restart_moto()
                res = run_exitplan(lab, s, s.name, n, tmp)
                ok, detail = verify_prefix(lab.s3_url, res.prefix, s) if res.rc == 0 else (False, f"exit {res.rc}")
                rss[s.name] = measure("exitplan", s, res, ok, detail)
                print(f"  {s.name:9} {s.size / MiB:7,.0f} MiB  {res.wall:6.1f} s  peak RSS {res.maxrss / MiB:6.0f} MiB  "
                      f"{'ok' if ok else 'FAILED'}: {detail}", flush=True)
            report["rss"] = rss
        report["finished"] = dt.datetime.now().isoformat(timespec="seconds")
        summary = print_summary(report, series, args, base)
        report["summary"] = summary
        OUT_DIR.mkdir(parents=True, exist_ok=True)
        out_path = OUT_DIR / f"{started.strftime('%Y%m%dT%H%M%S')}.json"
        out_path.write_text(json.dumps(report, indent=2, default=str))
        print(f"\nresults: {out_path.relative_to(REPO)}")
        failed = ([r for r in runs + report.get("latency", []) if not r["verified"]]
                  + [r for r in rss.values() if not r["verified"]])
        return 1 if failed else 0
    finally:
        for pid in list(_CHILDREN):
            _kill(pid)
        lab.stop()
        if args.keep_tmp:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def print_summary(report: dict, series: list[Series], args: argparse.Namespace, base: Series | None = None) -> dict:
    runs = report.get("runs", [])
    med: dict[tuple[str, str], dict] = {}
    for s in series:
        for tool in args.tools:
            rows = [r for r in runs if r["series"] == s.name and r["tool"] == tool]
            if rows:
                med[(tool, s.name)] = median_row(rows)
    n_rep = args.repeat
    print(f"\n=== results (concurrency {args.concurrency}; median of {n_rep} run{'s' if n_rep > 1 else ''}; "
          "MB = 10^6 bytes, GB = 10^9 bytes) ===")
    show_prefect = uses_flow(args.tools)
    head = (f"{'series':7} {'tool':13} {'wall s':>7} {'MB/s':>7} {'CPU s/GB':>9} {'CPU ms/obj':>10} {'peak RSS MiB':>12} "
            f"{'azurite CPU s':>13} {'moto CPU s':>10}" + (f" {'prefect CPU s':>13}" if show_prefect else "")
            + "  verified")
    print(head)
    print("-" * len(head))
    for s in series:
        for tool in args.tools:
            r = med.get((tool, s.name))
            if not r:
                continue
            cpu_gb = fmt(r["cpu_s_per_gb"], ".2f") if s.name == "large" else ""
            cpu_obj = fmt(r["cpu_ms_per_object"], ".2f") if s.name == "small" else ""
            if tool == "ceiling":  # its process CPU includes generating the bytes: show upload CPU only
                up = r.get("upload_cpu_s")
                cpu_gb = fmt(up / (s.total / GB), ".2f") + "*" if s.name == "large" and up is not None else cpu_gb
                cpu_obj = fmt(1000 * up / s.count, ".2f") + "*" if s.name == "small" and up is not None else cpu_obj
            pf = f" {fmt(r['server_cpu_s'].get('prefect'), '.1f'):>13}" if show_prefect else ""
            print(f"{s.name:7} {tool:13} {fmt(r['wall_s']):>7} {fmt(r['mb_s']):>7} {cpu_gb:>9} {cpu_obj:>10} "
                  f"{fmt(r['peak_rss_mib'], '.0f'):>12} {fmt(r['server_cpu_s'].get('azurite'), '.1f'):>13} "
                  f"{fmt(r['server_cpu_s'].get('moto'), '.1f'):>10}{pf}  {'yes' if r['verified'] else 'NO'}")
    if "ceiling" in args.tools:
        print("  * ceiling: CPU of the upload loop only (its process also generated the bytes before the timer)")
    if show_prefect:
        print("  prefect CPU s: the bench's Prefect server during the run; for exitplan-flow the orchestration's "
              "cost outside the flow's process (not in its CPU columns), for the other tools the idle server")
    if report.get("exitplan_import_cpu_s") is not None:
        print(f"  exitplan's fixed cost per process (imports only): {report['exitplan_import_cpu_s']:.2f} CPU s, "
              f"{report['exitplan_import_rss_mib']:.0f} MiB RSS (included in its rows)")
    if report.get("flow_import_cpu_s") is not None:
        print(f"  exitplan-flow's (Prefect + flows imported): {report['flow_import_cpu_s']:.2f} CPU s, "
              f"{report['flow_import_rss_mib']:.0f} MiB RSS (included in its rows)")

    summary: dict[str, Any] = {"median": {f"{t}/{s}": r for (t, s), r in med.items()}, "ratios": {}}
    rat = summary["ratios"]
    print("\nratios")

    def line(label: str, value: float | None, note: str = "") -> None:
        rat[label] = value
        print(f"  {label:44} {fmt(value, '.2f'):>6}{'  ' + note if note else ''}")

    e_l, r_l, c_l = med.get(("exitplan", "large")), med.get(("rclone", "large")), med.get(("ceiling", "large"))
    e_s, r_s, c_s = med.get(("exitplan", "small")), med.get(("rclone", "small")), med.get(("ceiling", "small"))
    g = lambda r, k: r.get(k) if r else None  # noqa: E731
    line("exitplan/rclone MB/s, large", ratio(g(e_l, "mb_s"), g(r_l, "mb_s")), "> 1: exitplan faster")
    line("exitplan/rclone MB/s, small", ratio(g(e_s, "mb_s"), g(r_s, "mb_s")), "> 1: exitplan faster")
    line("exitplan/rclone CPU per GB, large", ratio(g(e_l, "cpu_s_per_gb"), g(r_l, "cpu_s_per_gb")), "< 1: exitplan cheaper")
    line("exitplan/rclone CPU per object, small", ratio(g(e_s, "cpu_ms_per_object"), g(r_s, "cpu_ms_per_object")),
         "< 1: exitplan cheaper")
    line("exitplan/rclone peak RSS, large", ratio(g(e_l, "peak_rss_mib"), g(r_l, "peak_rss_mib")))
    line("exitplan/ceiling MB/s, large", ratio(g(e_l, "mb_s"), g(c_l, "mb_s")), "1 = as fast as the lab allows")
    line("exitplan/ceiling MB/s, small", ratio(g(e_s, "mb_s"), g(c_s, "mb_s")))
    line("rclone/ceiling MB/s, large", ratio(g(r_l, "mb_s"), g(c_l, "mb_s")))
    line("rclone/ceiling MB/s, small", ratio(g(r_s, "mb_s"), g(c_s, "mb_s")))
    x_l, x_s = med.get(("exitplan-enc", "large")), med.get(("exitplan-enc", "small"))
    line("encrypted/plain exitplan MB/s, large", ratio(g(x_l, "mb_s"), g(e_l, "mb_s")))
    enc_cost = (g(x_l, "cpu_s_per_gb") - g(e_l, "cpu_s_per_gb")) if x_l and e_l else None
    rat["encryption CPU s/GB added, large"] = enc_cost
    print(f"  {'encryption CPU s/GB added, large':44} {fmt(enc_cost, '.2f'):>6}  target <= 0.2")
    line("encrypted exitplan/rclone MB/s, large", ratio(g(x_l, "mb_s"), g(r_l, "mb_s")))
    line("encrypted/plain exitplan CPU per object, small", ratio(g(x_s, "cpu_ms_per_object"), g(e_s, "cpu_ms_per_object")))

    small_series = next((s for s in series if s.name == "small"), None)
    f_l, f_s = med.get(("exitplan-flow", "large")), med.get(("exitplan-flow", "small"))
    if f_l or f_s:
        line("flow/CLI exitplan wall, large", ratio(g(f_l, "wall_s"), g(e_l, "wall_s")), "> 1: the flow slower")
        line("flow/CLI exitplan wall, small", ratio(g(f_s, "wall_s"), g(e_s, "wall_s")))
        line("flow/CLI exitplan CPU per GB, large", ratio(g(f_l, "cpu_s_per_gb"), g(e_l, "cpu_s_per_gb")),
             "flow process only; > 1: the flow costlier")
        line("flow/CLI exitplan CPU per object, small", ratio(g(f_s, "cpu_ms_per_object"), g(e_s, "cpu_ms_per_object")))
        line("flow/CLI exitplan peak RSS, large", ratio(g(f_l, "peak_rss_mib"), g(e_l, "peak_rss_mib")))
        line("flow/CLI exitplan peak RSS, small", ratio(g(f_s, "peak_rss_mib"), g(e_s, "peak_rss_mib")))
        line("exitplan-flow/rclone MB/s, large", ratio(g(f_l, "mb_s"), g(r_l, "mb_s")), "> 1: the flow faster")
        line("exitplan-flow/rclone MB/s, small", ratio(g(f_s, "mb_s"), g(r_s, "mb_s")))
        line("exitplan-flow/rclone CPU per GB, large", ratio(g(f_l, "cpu_s_per_gb"), g(r_l, "cpu_s_per_gb")),
             "< 1: the flow cheaper")
        line("exitplan-flow/rclone CPU per object, small", ratio(g(f_s, "cpu_ms_per_object"), g(r_s, "cpu_ms_per_object")))
        # what the flow path adds per run, in the flow's process and on the Prefect server
        for label, f, e in (("large", f_l, e_l), ("small", f_s, e_s)):
            if not f:
                continue
            added = (f["cpu_s"] - e["cpu_s"]) if e else None
            srv = f["server_cpu_s"].get("prefect")
            rat[f"flow CPU s added over CLI, {label}"] = added
            rat[f"prefect server CPU s per flow run, {label}"] = srv
            print(f"  {'flow CPU s added over CLI, ' + label:44} {fmt(added, '.2f'):>6}  in the flow's process")
            print(f"  {'prefect server CPU s per flow run, ' + label:44} {fmt(srv, '.2f'):>6}  outside it")
        if f_s and small_series and f_s["server_cpu_s"].get("prefect") is not None:
            per_obj = f_s["cpu_ms_per_object"] + 1000 * f_s["server_cpu_s"]["prefect"] / small_series.count
            rat["flow + prefect server CPU ms per object, small"] = per_obj
            rat["(flow + prefect server)/CLI CPU per object, small"] = ratio(per_obj, g(e_s, "cpu_ms_per_object"))
            print(f"  {'flow + prefect server CPU ms/obj, small':44} {fmt(per_obj, '.2f'):>6}  "
                  f"(x{fmt(ratio(per_obj, g(e_s, 'cpu_ms_per_object')), '.2f')} the CLI's)")
        # Per object, each process's start-up (its imports, measured apart) taken out: what a run
        # of millions of objects pays per object, where 2,000 objects carry a second of imports.
        imp_cli, imp_flow = report.get("exitplan_import_cpu_s"), report.get("flow_import_cpu_s")
        if f_s and e_s and small_series and imp_cli is not None and imp_flow is not None:
            flow_obj = f_s["cpu_ms_per_object"] - 1000 * imp_flow / small_series.count
            cli_obj = e_s["cpu_ms_per_object"] - 1000 * imp_cli / small_series.count
            line("flow/CLI CPU per object, small, start-up out", ratio(flow_obj, cli_obj))
    if small_series and base:
        # Per object beyond the first quarter: (CPU with N objects - CPU with N/4) / (3N/4), the
        # same repeat's pair, median over repeats; what is left is each run's fixed cost.
        per_obj: dict[str, float] = {}
        shown = []
        for tool in (t for t in BASE_TOOLS if t in args.tools):
            got = [m for rep in range(1, args.repeat + 1) if (m := marginal_line(runs, tool, rep, small_series, base))]
            if not got:
                continue
            per_obj[tool] = 1000 * statistics.median(m[0] for m in got)
            fixed = statistics.median(m[1] for m in got)
            rat[f"{tool} CPU ms per object, marginal ({base.count:,} -> {small_series.count:,})"] = per_obj[tool]
            rat[f"{tool} fixed CPU s per run"] = fixed
            shown.append(f"{tool} {per_obj[tool]:.2f} ({fixed:.1f} s fixed)")
        if shown:
            print(f"  CPU ms/obj beyond the first {base.count:,} (median over repeats; CPU s fixed per run"
                  f"{f', the flow with {FLOW_SHARDS} shards' if 'exitplan-flow' in per_obj else ''}):")
            print("    " + ", ".join(shown))
        if "exitplan-flow" in per_obj and "exitplan" in per_obj:
            line("flow/CLI CPU per object, small, marginal", ratio(per_obj["exitplan-flow"], per_obj["exitplan"]),
                 "target <= 1.1")
    paired_ratios(runs, args, rat, small_series, base)
    p_l, p_s = med.get((FLOW_PROCESSES_TOOL, "large")), med.get((FLOW_PROCESSES_TOOL, "small"))
    if p_l or p_s:
        tag = f"flow with {FLOW_SHARD_PROCESSES} shard processes"
        line(f"{tag}/CLI MB/s, small", ratio(g(p_s, "mb_s"), g(e_s, "mb_s")), "> 1: faster than the CLI")
        line(f"{tag}/CLI MB/s, large", ratio(g(p_l, "mb_s"), g(e_l, "mb_s")))
        line(f"{tag}/rclone MB/s, small", ratio(g(p_s, "mb_s"), g(r_s, "mb_s")), "> 1: faster than rclone")
        line(f"{tag}/rclone MB/s, large", ratio(g(p_l, "mb_s"), g(r_l, "mb_s")))
        line(f"{tag}/CLI CPU per object, small", ratio(g(p_s, "cpu_ms_per_object"), g(e_s, "cpu_ms_per_object")),
             "all processes; peak RSS is the largest process's")

    engine = report.get("engine")
    if engine:
        print("\nengine alone on in-memory connectors (CPU seconds; one process, time.process_time)")
        print(f"  {'series':7} {'bare loop':>10} {'copy_object':>12} {'copy_objects':>16} "
              f"{'bare s/GB':>10} {'engine s/GB':>12} {'engine ms/obj':>14}")
        for s in series:
            e = engine.get(s.name)
            if not e:
                continue
            gb = e["bytes"] / GB
            print(f"  {s.name:7} {e['bare_loop']['cpu']:10.2f} {e['copy_object']['cpu']:12.2f} "
                  f"{e['copy_objects']['cpu']:16.2f} {e['bare_loop']['cpu'] / gb:10.2f} "
                  f"{e['copy_objects']['cpu'] / gb:12.2f} {1000 * e['copy_objects']['cpu'] / e['objects']:14.3f}")
        el = engine.get("large")
        es = engine.get("small")
        if el:
            line("engine/bare loop CPU, large (copy_objects)",
                 ratio(el["copy_objects"]["cpu"], el["bare_loop"]["cpu"]), "target <= 1.3")
            line("engine/bare loop CPU, large (copy_object)", ratio(el["copy_object"]["cpu"], el["bare_loop"]["cpu"]))
        if es:
            line("engine/bare loop CPU, small (copy_objects)",
                 ratio(es["copy_objects"]["cpu"], es["bare_loop"]["cpu"]), "per-object costs, not hashing")
            line("engine/bare loop CPU, small (copy_object)", ratio(es["copy_object"]["cpu"], es["bare_loop"]["cpu"]))

    far = report.get("latency")
    if far:
        print(f"\nlatency-true simulation (every request held {far[0]['latency_ms']:g} ms; ideal = concurrency / "
              "(2 x latency): a GET then a PUT per object)")
        print(f"  {'concurrency':>11} {'tool':13} {'obj/s':>8} {'ideal':>8} {'of ideal':>8} {'CPU ms/obj':>10} "
              f"{'peak RSS MiB':>12}  verified")
        for r in far:
            print(f"  {r['concurrency']:11d} {r['tool']:13} {r['objects_s']:8.1f} {r['ideal_objects_s']:8.1f} "
                  f"{100 * r['of_ideal']:7.1f}% {r['cpu_ms_per_object']:10.2f} {r['peak_rss_mib']:12.0f}  "
                  f"{'yes' if r['verified'] else 'NO'}")
        for c in sorted({r["concurrency"] for r in far}):
            by = {r["tool"]: r for r in far if r["concurrency"] == c}
            if "rclone" not in by:
                continue
            for tool in ("exitplan", "exitplan-enc"):
                if tool in by:
                    line(f"{tool}/rclone obj/s, {far[0]['latency_ms']:g} ms, c={c}",
                         ratio(by[tool]["objects_s"], by["rclone"]["objects_s"]), "> 1: exitplan faster")
                    line(f"{tool}/rclone CPU per object, {far[0]['latency_ms']:g} ms, c={c}",
                         ratio(by[tool]["cpu_ms_per_object"], by["rclone"]["cpu_ms_per_object"]), "< 1: cheaper")

    rss = report.get("rss")
    if rss and "rss-big" in rss and "rss-small" in rss:
        big, sm = rss["rss-big"], rss["rss-small"]
        margin = 32.0
        if not (big["verified"] and sm["verified"]):
            print("\npeak RSS of exitplan migrate: NOT measured, a run failed "
                  f"({sm['verify_detail']}; {big['verify_detail']})")
            summary["rss"] = {"failed": True}
            return summary
        big_mib = big["peak_rss_mib"]
        print(f"\npeak RSS of exitplan migrate (memory budget 128 MiB, concurrency {args.concurrency})")
        print(f"  one {args.rss_big_mib:,} MiB blob: {big_mib:6.0f} MiB   ({big['wall_s']:.1f} s, {fmt(big['mb_s'])} MB/s)")
        print(f"  one     20 MiB blob: {sm['peak_rss_mib']:6.0f} MiB   ({sm['wall_s']:.1f} s)")
        diff = big_mib - sm["peak_rss_mib"]
        ok_margin = diff <= margin
        ok_total = big_mib <= 300
        print(f"  difference {diff:+.0f} MiB (target <= +{margin:.0f} MiB: {'met' if ok_margin else 'NOT met'}); "
              f"big-blob peak {big_mib:.0f} MiB (target <= 300 MiB: {'met' if ok_total else 'NOT met'})")
        summary["rss"] = {"big_mib": big_mib, "small_mib": sm["peak_rss_mib"], "difference_mib": diff,
                          "margin_target_mib": margin, "margin_met": ok_margin, "total_target_met": ok_total}
    return summary


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    if argv[:1] == ["_ceiling"]:
        p = argparse.ArgumentParser(prog="bench_migrate.py _ceiling")
        for a in ("--endpoint", "--prefix", "--container", "--out"):
            p.add_argument(a, required=True)
        for a in ("--count", "--size", "--concurrency"):
            p.add_argument(a, type=int, required=True)
        ns = p.parse_args(argv[1:])
        ns.mode = "ceiling"
        return ns
    if argv[:1] == ["_engine"]:
        p = argparse.ArgumentParser(prog="bench_migrate.py _engine")
        p.add_argument("--series", action="append", required=True)
        p.add_argument("--concurrency", type=int, required=True)
        p.add_argument("--budget", type=int, required=True)
        p.add_argument("--repeat", type=int, default=1)
        p.add_argument("--out", required=True)
        ns = p.parse_args(argv[1:])
        ns.mode = "engine"
        return ns
    p = argparse.ArgumentParser(
        prog="bench_migrate.py",
        description="Time exitplan migrate (CLI and Prefect flow) against rclone copy, the lab's ceiling and a bare "
                    "hashing loop (loopback only; starts and stops its own Azurite, moto and Prefect server).",
    )
    p.add_argument("--quick", action="store_true",
                   help="a smaller run to check the script works (~1 min): 2 x 64 MiB, 300 x 16 KiB, 256 MiB RSS blob")
    p.add_argument("--concurrency", type=int, default=8, help="transfers in flight for every tool (default 8)")
    p.add_argument("--large-count", type=int, help="large blobs (default 4; quick 2)")
    p.add_argument("--large-mib", type=int, help="MiB per large blob (default 256; quick 64)")
    p.add_argument("--small-count", type=int, help="small blobs (default 2000; quick 300)")
    p.add_argument("--small-kib", type=int, help="KiB per small blob (default 16)")
    p.add_argument("--rss-big-mib", type=int, help="the big blob of the RSS comparison, MiB (default 2048; quick 256)")
    p.add_argument("--repeat", type=int, help="runs of each tool and series, interleaved; the table shows medians "
                                              "(default 2; quick 1)")
    p.add_argument("--engine-repeat", type=int, default=2, help="in-memory engine runs, best CPU kept (default 2)")
    p.add_argument("--tools", default="exitplan,exitplan-flow,exitplan-enc,rclone,ceiling",
                   help="comma-separated subset of exitplan (plain copy, like rclone), exitplan-flow (the same "
                        "plain copy as a Prefect flow run on a Prefect server the bench starts), "
                        f"{FLOW_PROCESSES_TOOL} (the same flow, its shards in {FLOW_SHARD_PROCESSES} processes; not in "
                        "the default set), exitplan-enc "
                        "(encrypted, exitplan's default), rclone, ceiling (default all)")
    p.add_argument("--series", default="large,small", help="comma-separated subset of large, small (default both)")
    p.add_argument("--profile", action="store_true",
                   help="after the first timed run of exitplan, exitplan-enc and exitplan-flow, run it again under py-spy (pip "
                        "install py-spy into the venv) and write where its CPU went to bench/profiles/")
    p.add_argument("--latency-ms", type=float, default=0,
                   help="also run the small series through proxies holding every request this many ms (a "
                        "latency-true simulation; default 0: off)")
    p.add_argument("--latency-concurrency", default="8,64,256",
                   help="concurrencies of the latency series (default 8,64,256)")
    p.add_argument("--latency-tools", default="exitplan,exitplan-enc,rclone",
                   help="tools of the latency series (default exitplan,exitplan-enc,rclone)")
    p.add_argument("--skip-2g", action="store_true", help="skip the peak-RSS comparison (big blob vs 20 MiB)")
    p.add_argument("--skip-engine", action="store_true", help="skip the in-memory engine vs bare loop")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs) for inspection")
    ns = p.parse_args(argv)
    quick = ns.quick
    for name, default, q in (("large_count", 4, 2), ("large_mib", 256, 64), ("small_count", 2000, 300),
                             ("small_kib", 16, 16), ("rss_big_mib", 2048, 256), ("repeat", 2, 1)):
        if getattr(ns, name) is None:
            setattr(ns, name, q if quick else default)
    ns.tools = [t.strip() for t in ns.tools.split(",") if t.strip()]
    ns.series = [t.strip() for t in ns.series.split(",") if t.strip()]
    ns.latency_concurrency = [int(c) for c in ns.latency_concurrency.split(",") if c.strip()]
    ns.latency_tools = [t.strip() for t in ns.latency_tools.split(",") if t.strip()]
    if set(ns.latency_tools) - {"exitplan", "exitplan-enc", "rclone"}:
        p.error("--latency-tools takes exitplan, exitplan-enc, rclone")
    if ns.latency_ms and "small" not in ns.series:
        p.error("--latency-ms runs the small series: keep small in --series")
    if set(ns.series) - {"large", "small"} or not ns.series:
        p.error("--series takes large, small or both")
    if ns.profile and not PY_SPY.exists():
        p.error(f"--profile needs py-spy in the venv ({PY_SPY}): .venv/bin/pip install py-spy")
    unknown = set(ns.tools) - {"exitplan", "exitplan-flow", FLOW_PROCESSES_TOOL, "exitplan-enc", "rclone", "ceiling"}
    if unknown:
        p.error(f"unknown tool(s): {', '.join(sorted(unknown))}")
    if ns.large_mib * MiB <= PART_SIZE:
        p.error(f"--large-mib must be above {PART_SIZE // MiB} (the large series must be multipart)")
    if ns.small_kib * KiB > SINGLE_SHOT_MAX:
        p.error("--small-kib must be at most 8192 (small blobs are single Put Blobs with a Content-MD5)")
    ns.mode = "main"
    return ns


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.mode == "ceiling":
        return ceiling_child(args)
    if args.mode == "engine":
        return engine_child(args)
    if shutil.which("rclone") is None and "rclone" in args.tools:
        print("rclone is not installed (Debian: apt-get install rclone), or use --tools exitplan,ceiling",
              file=sys.stderr)
        return 2
    # Also when started in the background by a shell that ignores SIGINT: Ctrl-C / kill -INT must clean up.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)
    try:
        return main_run(args)
    except KeyboardInterrupt:
        print("\ninterrupted; everything this run started was stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
