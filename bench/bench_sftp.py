#!/usr/bin/env python3
"""Benchmark exitplan's SFTP connector against rclone's sftp backend, in the same run.

Loopback only; everything it starts is stopped at the end. It starts a private OpenSSH sshd
(`flows.lab_sftp`) and the lab's S3 servers (`--s3`: moto, and/or ministack; each restarted before
every measured run: they keep every byte in memory) on free 127.0.0.1 ports, writes one mixed set of files below the sshd's root
(a few large files, many 1 MiB and 16 KiB ones), then measures, each tool in its own process (wall
time, user+system CPU and peak RSS from `os.wait4`, through bench_migrate's launcher):

1. SFTP → S3: `exitplan migrate` (an SFTP source; `exitplan` a plain copy, as rclone's,
   `exitplan-enc` encrypted, exitplan's default) and `rclone copy sftp: s3:`;
2. S3 → SFTP: the same files put in a bucket first (not timed), then `exitplan migrate` (an S3
   source, an SFTP destination; plain and encrypted) and `rclone copy s3: sftp:`;
   1 and 2 against each S3 server named (the servers' costs differ by request pattern: `S3Server`);
3. peak RSS of `exitplan migrate` SFTP → S3 on one large file (`--rss-mib`, default 2048) against
   one 512 MiB and one 20 MiB file: bounded by the memory budget, not by the file.

Both tools run with the same concurrency (`--concurrency`: rclone's --transfers, exitplan's
`transfer.concurrency` and `object_concurrency`; exitplan's SFTP `connections`, its sessions, is
twice that, one per request it may have in flight, as rclone opens what it needs) and 16 MiB parts.
With `--latency-ms`, both tools reach the sshd through `bench/tcp_delay.py`, which holds every byte that
many ms each way: a far SFTP server, as a provider's is (the S3 server stays near).
Every run's output is checked (every file, with its size, at the destination). `exitplan` does
what rclone does (a copy; plus SHA-256 of every byte for the audit manifest); `exitplan-enc` also
encrypts (Tink streaming AEAD), which rclone does not. With `--repeat N`, each direction is run N
times on each server, the tools interleaved, and each ratio is the median of each repeat's own
pair [lowest-highest]: one run's ratio moves by ~10 % from run to run on the lab box. Prints a table
and writes `bench/out/sftp-<timestamp>.json`. Run: `.venv/bin/python bench/bench_sftp.py [--quick]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for path in (str(REPO), str(REPO / "bench")):
    if path not in sys.path:
        sys.path.insert(0, path)

import boto3  # noqa: E402
import yaml  # noqa: E402
from botocore.config import Config  # noqa: E402

from bench_migrate import ChildResult, child_env, compile_bytecode, run_child  # noqa: E402
from config.lab import LAB_REGION, LAB_S3_ACCESS_KEY, LAB_S3_SECRET_KEY, LOOPBACK  # noqa: E402
from flows import lab_processes as lp  # noqa: E402
from flows.lab_sftp import SshdLayout, prepare_sshd, sshd_spec  # noqa: E402

MiB = 1024 * 1024
EXITPLAN = str(Path(sys.executable).with_name("exitplan"))


def s3_client(url: str):
    return boto3.client("s3", endpoint_url=url, region_name=LAB_REGION, aws_access_key_id=LAB_S3_ACCESS_KEY,
                        aws_secret_access_key=LAB_S3_SECRET_KEY,
                        config=Config(s3={"addressing_style": "path"}, max_pool_connections=16,
                                      request_checksum_calculation="when_required",
                                      response_checksum_validation="when_required"))


class S3Server:
    """One of the lab's S3 servers, `kind` moto or ministack, restarted on demand (their memory only
    grows). They cost differently per request: moto answers a ranged GET by reading the whole
    object (8 ranges of a 128 MiB object cost it 6.5× one full GET), ministack a full GET dearer
    than ranges; exitplan reads large objects in ranges, rclone 1.60 in one GET."""

    def __init__(self, directory: Path, kind: str = "moto"):
        self.directory, self.kind = directory, kind
        self.proc = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def restart(self) -> None:
        self.stop()
        self.port = lp.free_port()
        spec = lp.s3_spec(self.port) if self.kind == "moto" else lp.ministack_spec(self.port, self.directory / "ms")
        self.proc = lp.start_server(spec, self.directory / f"{self.kind}.log")

    def stop(self) -> None:
        if self.proc is not None:
            lp.stop_pid(self.proc.pid)
            self.proc = None


def write_files(top: Path, big: int, big_mib: int, mid: int, small: int) -> dict[str, int]:
    """The mixed set below `top`: {key: size}. Random bytes (incompressible), written once."""
    sizes = {f"large/{i:02d}.bin": big_mib * MiB + i for i in range(big)}
    sizes.update({f"mid/{i // 50:02d}/{i:04d}.bin": MiB for i in range(mid)})
    sizes.update({f"small/{i // 100:02d}/{i:05d}.csv": 16 * 1024 for i in range(small)})
    for key, size in sizes.items():
        path = top / key
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            for start in range(0, size, 8 * MiB):
                f.write(os.urandom(min(8 * MiB, size - start)))
    return sizes


def sftp_endpoint(layout: SshdLayout, root: Path, concurrency: int, transport: str = "openssh") -> dict:
    # One SFTP session per request exitplan may have in flight (range reads or part writes of
    # multipart objects, plus whole small objects): rclone 1.60 opens as many as it needs too.
    return {"kind": "sftp", "host": LOOPBACK, "port": layout.port, "username": layout.username, "root": str(root),
            "known_hosts": str(layout.known_hosts), "private_key_file": str(layout.user_key),
            "connections": 2 * concurrency, "transport": transport}


def far_sshd(layout: SshdLayout, delay_ms: float) -> tuple[subprocess.Popen, SshdLayout]:
    """A far SFTP server: `bench/tcp_delay.py` in front of the sshd of `layout`, its host key pinned
    for the proxy's port too; the proxy's process and the layout to connect through it."""
    proc = subprocess.Popen([sys.executable, str(REPO / "bench" / "tcp_delay.py"), "--to", str(layout.port),
                             "--delay-ms", str(delay_ms)], stdout=subprocess.PIPE, text=True)
    ready = proc.stdout.readline().split()
    if len(ready) != 2 or ready[0] != "listening":
        proc.kill()
        raise SystemExit(f"bench/tcp_delay.py did not start (it said {' '.join(ready)!r})")
    port = int(ready[1])
    pinned = layout.known_hosts.read_text()
    proxied = pinned.splitlines()[0].replace(f"]:{layout.port} ", f"]:{port} ", 1)
    layout.known_hosts.write_text(f"{pinned}{proxied}\n")
    return proc, dataclasses.replace(layout, port=port)


def transport_of(tool: str) -> str:
    """The SSH transport of an exitplan tool name: paramiko for `exitplan-paramiko`, else OpenSSH."""
    return "paramiko" if tool == "exitplan-paramiko" else "openssh"


def exitplan_config(path: Path, source: dict, destination: dict, container: str, concurrency: int,
                    state: Path, *, encrypted: bool = True) -> Path:
    """A one-dataset configuration; `encrypted` False: a plain copy (`public: true`), as rclone's."""
    cfg = {
        "version": 1, "project": f"bench-{path.stem.lower()}",
        "sources": {"src": source}, "destinations": {"dst": destination},
        "datasets": {"set": {"source": "src", "container": container, "destination": "dst",
                             "dest_prefix": "exitplan/", **({} if encrypted else {"public": True})}},
        "transfer": {"concurrency": concurrency, "object_concurrency": concurrency, "part_size": "16MiB",
                     "small_object_cutoff": "16MiB", "memory_budget": "256MiB"},
        "state": {"path": str(state)},
        "keys": {"kek": {"backend": "local", "path": str(state / "kek.key")}},
    }
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def run_exitplan(config: Path, log: Path) -> ChildResult:
    env = child_env(AWS_ACCESS_KEY_ID=LAB_S3_ACCESS_KEY, AWS_SECRET_ACCESS_KEY=LAB_S3_SECRET_KEY)
    init = run_child([EXITPLAN, "keys", "init", "--config", str(config)], env=env, log=log.with_suffix(".init.log"))
    if init.rc != 0:
        raise SystemExit(f"exitplan keys init failed; see {init.log}")
    return run_child([EXITPLAN, "migrate", "--config", str(config)], env=env, log=log)


def rclone_config(path: Path, layout: SshdLayout, server: S3Server) -> Path:
    path.write_text(f"""\
[sftp]
type = sftp
host = {LOOPBACK}
port = {layout.port}
user = {layout.username}
key_file = {layout.user_key}
known_hosts_file = {layout.known_hosts}
shell_type = none
disable_hashcheck = true

[s3]
type = s3
provider = Other
endpoint = {server.url}
force_path_style = true
access_key_id = {LAB_S3_ACCESS_KEY}
secret_access_key = {LAB_S3_SECRET_KEY}
region = {LAB_REGION}
""")
    return path


def run_rclone(conf: Path, src: str, dst: str, concurrency: int, log: Path) -> ChildResult:
    argv = ["rclone", "--config", str(conf), "copy", src, dst, "--transfers", str(concurrency),
            "--checkers", str(2 * concurrency), "--s3-upload-concurrency", "4", "--s3-chunk-size", "16M",
            "--s3-upload-cutoff", "16M", "--s3-no-head", "--log-level", "NOTICE", "--stats", "0"]
    return run_child(argv, env=child_env(), log=log)


def s3_sizes(server: S3Server, bucket: str, prefix: str) -> dict[str, int]:
    out = {}
    for page in s3_client(server.url).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out.update({o["Key"][len(prefix):]: o["Size"] for o in page.get("Contents", [])})
    return out


def file_sizes(top: Path) -> dict[str, int]:
    return {p.relative_to(top).as_posix(): p.stat().st_size for p in top.rglob("*") if p.is_file()} \
        if top.is_dir() else {}


def row(tool: str, direction: str, server: str, res: ChildResult, nbytes: int, ok: bool, repeat: int = 0) -> dict:
    cpu = res.cpu
    return {"tool": tool, "direction": direction, "server": server, "repeat": repeat, "ok": ok and res.rc == 0,
            "rc": res.rc,
            "seconds": res.wall,
            "mb_s": nbytes / res.wall / 1e6 if res.wall else None, "cpu_s": cpu,
            "cpu_s_per_gb": cpu / (nbytes / 1e9) if nbytes else None, "peak_rss_mib": res.maxrss / MiB}


def ratio_lines(rows: list[dict]) -> list[str]:
    """Per direction, server and exitplan tool: its MB/s and CPU per GB over rclone's in the same
    repeat, the median over repeats [lowest-highest] when there are several."""
    def shown(values: list[float]) -> str:
        if len(values) == 1:
            return f"{values[0]:.2f}"
        return f"{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]"

    lines = []
    for direction, server in dict.fromkeys((r["direction"], r["server"]) for r in rows):
        runs = [x for x in rows if (x["direction"], x["server"]) == (direction, server)]
        rclone = {x["repeat"]: x for x in runs if x["tool"] == "rclone"}
        for tool in dict.fromkeys(x["tool"] for x in runs if x["tool"] != "rclone"):
            pairs = [(x, rclone[x["repeat"]]) for x in runs if x["tool"] == tool and x["repeat"] in rclone]
            if pairs:
                lines.append(f"{direction} ({server}): {tool}/rclone MB/s {shown([e['mb_s'] / r['mb_s'] for e, r in pairs])}, "
                             f"CPU per GB {shown([e['cpu_s_per_gb'] / r['cpu_s_per_gb'] for e, r in pairs])}"
                             + (f" ({len(pairs)} pairs)" if len(pairs) > 1 else ""))
    return lines


def sizes_ok(found: dict[str, int], sizes: dict[str, int], encrypted: bool) -> bool:
    """Every file arrived with its size (encrypted: at least as large as its plaintext, Tink's
    overhead added)."""
    if not encrypted:
        return found == sizes
    return set(found) == set(sizes) and all(found[k] >= sizes[k] for k in sizes)


TOOLS = ("exitplan", "exitplan-enc", "exitplan-paramiko", "rclone")


def encrypts(tool: str) -> bool:
    return tool in ("exitplan-enc", "exitplan-paramiko")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--big", type=int, default=4, help="large files (default 4)")
    p.add_argument("--big-mib", type=int, default=128, help="size of each large file in MiB (default 128)")
    p.add_argument("--mid", type=int, default=200, help="1 MiB files (default 200)")
    p.add_argument("--small", type=int, default=1000, help="16 KiB files (default 1000)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--tools", default="exitplan,exitplan-enc,rclone",
                   help="comma-separated: exitplan (a plain copy, as rclone's; SSH by the OpenSSH client), "
                        "exitplan-enc (encrypted), exitplan-paramiko (encrypted, SSH by paramiko), rclone "
                        "(default: exitplan,exitplan-enc,rclone)")
    p.add_argument("--s3", default="moto", help="the S3 servers to measure against, comma-separated: moto, ministack")
    p.add_argument("--rss-mib", type=int, default=2048, help="the large file of the memory test, MiB (0: skip)")
    p.add_argument("--latency-ms", type=float, default=0,
                   help="hold every byte to and from the SFTP server this many ms each way (bench/tcp_delay.py: "
                        "a far server; both tools connect through it; default 0: off)")
    p.add_argument("--repeat", type=int, default=1,
                   help="runs of each tool per direction and server, interleaved (tool after tool, then again); the "
                        "ratios are then the median over repeats of each repeat's own pair [lowest-highest] (default 1)")
    p.add_argument("--quick", action="store_true", help="a small set, for a smoke run")
    p.add_argument("--memory-only", action="store_true", help="only the peak-RSS runs (3.)")
    args = p.parse_args(argv)
    if args.quick:
        args.big, args.big_mib, args.mid, args.small, args.rss_mib = 2, 64, 50, 200, 256
    if not shutil.which("rclone"):
        raise SystemExit("rclone is not installed (Debian: apt-get install rclone)")

    tools = [t for t in args.tools.split(",") if t]
    if not tools or any(t not in TOOLS for t in tools):
        raise SystemExit(f"--tools: {', '.join(TOOLS)}, not {args.tools!r}")
    kinds = [kind for kind in args.s3.split(",") if kind]
    if not kinds or any(kind not in ("moto", "ministack") for kind in kinds):
        raise SystemExit(f"--s3: moto and/or ministack, not {args.s3!r}")
    compile_bytecode()
    tmp = Path(tempfile.mkdtemp(prefix="exitplan-bench-sftp-"))
    layout = prepare_sshd(tmp / "sshd", lp.free_port())
    sshd = lp.start_server(sshd_spec(layout), tmp / "sshd.log")
    delay = None
    servers = [S3Server(tmp, kind) for kind in kinds]
    rows: list[dict] = []
    try:
        if args.latency_ms:
            delay, layout = far_sshd(layout, args.latency_ms)
            print(f"every byte to and from the SFTP server held {args.latency_ms:g} ms each way (a round trip: "
                  f"{2 * args.latency_ms:g} ms)", flush=True)
        src = layout.root / "src"
        if args.memory_only:
            args.big = args.mid = args.small = 0
        sizes = write_files(src, args.big, args.big_mib, args.mid, args.small)
        total = sum(sizes.values())
        print(f"set: {len(sizes)} files, {total / 1e6:.0f} MB; concurrency {args.concurrency}", flush=True)
        lab_dest = {"provider": "lab", "endpoint_url": "", "region": LAB_REGION, "bucket": "bench"}

        for server, repeat in ((server, n) for server in servers for n in range(max(1, args.repeat))):
            # 1. SFTP → S3
            for tool in tools if sizes else ():
                server.restart()
                s3_client(server.url).create_bucket(Bucket="bench",
                                                  CreateBucketConfiguration={"LocationConstraint": LAB_REGION})
                if tool != "rclone":
                    cfg = exitplan_config(tmp / "sftp-to-s3.yaml",
                                          sftp_endpoint(layout, layout.root, args.concurrency, transport_of(tool)),
                                          {**lab_dest, "endpoint_url": server.url}, "src", args.concurrency,
                                          tmp / f"state-a-{server.kind}-{tool}-{repeat}", encrypted=encrypts(tool))
                    res = run_exitplan(cfg, tmp / "exitplan-sftp-to-s3.log")
                    ok = sizes_ok(s3_sizes(server, "bench", "exitplan/"), sizes, encrypts(tool))
                else:
                    conf = rclone_config(tmp / "rclone.conf", layout, server)
                    res = run_rclone(conf, f"sftp:{src}", "s3:bench/rclone", args.concurrency, tmp / "rclone-a.log")
                    ok = s3_sizes(server, "bench", "rclone/") == sizes
                rows.append(row(tool, "sftp->s3", server.kind, res, total, ok, repeat))
                print(json.dumps(rows[-1]), flush=True)

            # 2. S3 → SFTP (the same files in a bucket first)
            for tool in tools if sizes else ():
                server.restart()
                client = s3_client(server.url)
                client.create_bucket(Bucket="source", CreateBucketConfiguration={"LocationConstraint": LAB_REGION})
                for key in sizes:
                    client.upload_file(str(src / key), "source", key)
                out = layout.root / f"out-{tool}"
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir()
                if tool != "rclone":
                    source = {"kind": "s3", "endpoint_url": server.url, "region": LAB_REGION}
                    dest = {**sftp_endpoint(layout, out, args.concurrency, transport_of(tool)), "provider": "lab",
                            "region": "lab"}
                    cfg = exitplan_config(tmp / "s3-to-sftp.yaml", source, dest, "source", args.concurrency,
                                          tmp / f"state-b-{server.kind}-{tool}-{repeat}", encrypted=encrypts(tool))
                    res = run_exitplan(cfg, tmp / "exitplan-s3-to-sftp.log")
                    ok = sizes_ok(file_sizes(out / "exitplan"), sizes, encrypts(tool))
                else:
                    conf = rclone_config(tmp / "rclone.conf", layout, server)
                    res = run_rclone(conf, "s3:source", f"sftp:{out}", args.concurrency, tmp / "rclone-b.log")
                    ok = file_sizes(out) == sizes
                rows.append(row(tool, "s3->sftp", server.kind, res, total, ok, repeat))
                print(json.dumps(rows[-1]), flush=True)
                shutil.rmtree(out, ignore_errors=True)

        server = servers[0]  # the memory runs'
        # 3. Peak RSS: one large file against one 20 MiB file, SFTP → S3.
        memory = []
        # 20 MiB uses a fraction of the budget; 512 MiB and the large file use all of it: the two
        # must cost the same.
        points = [("20MiB", 20), ("512MiB", 512), (f"{args.rss_mib}MiB", args.rss_mib)] if args.rss_mib else []
        for label, size_mib in points:
            one = layout.root / f"one-{label}"
            write_files(one, 1, size_mib, 0, 0)
            server.restart()
            s3_client(server.url).create_bucket(Bucket="bench",
                                              CreateBucketConfiguration={"LocationConstraint": LAB_REGION})
            cfg = exitplan_config(tmp / f"rss-{label}.yaml", sftp_endpoint(layout, layout.root, args.concurrency),
                                  {**lab_dest, "endpoint_url": server.url}, one.name, args.concurrency,
                                  tmp / f"state-{label}")
            res = run_exitplan(cfg, tmp / f"exitplan-rss-{label}.log")
            memory.append({"file": label, "rc": res.rc, "peak_rss_mib": res.maxrss / MiB,
                           "mb_s": size_mib * MiB / res.wall / 1e6})
            print(json.dumps(memory[-1]), flush=True)
            shutil.rmtree(one, ignore_errors=True)
    finally:
        for server in servers:
            server.stop()
        lp.stop_pid(sshd.pid)
        if delay is not None:
            delay.kill()
            delay.wait()

    print(f"\n{'direction':<10} {'server':<10} {'tool':<17} {'ok':<4} {'MB/s':>7} {'CPU-s/GB':>9} {'peak RSS MiB':>13}")
    for r in rows:
        print(f"{r['direction']:<10} {r['server']:<10} {r['tool']:<17} {'yes' if r['ok'] else 'NO':<4} {r['mb_s']:>7.1f} "
              f"{r['cpu_s_per_gb']:>9.2f} {r['peak_rss_mib']:>13.0f}")
    for line in ratio_lines(rows):
        print(line)
    for m in memory:
        print(f"peak RSS, one {m['file']} file: {m['peak_rss_mib']:.0f} MiB (budget 256 MiB)")
    out_dir = REPO / "bench" / "out"
    out_dir.mkdir(exist_ok=True)
    report = out_dir / f"sftp-{dt.datetime.now(dt.timezone.utc).strftime('%Y%m%dT%H%M%SZ')}.json"
    report.write_text(json.dumps({"args": vars(args), "files": len(sizes), "bytes": total, "runs": rows,
                                  "memory": memory}, indent=2))
    print(f"written {report}")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0 if all(r["ok"] for r in rows) and all(m["rc"] == 0 for m in memory) else 1


if __name__ == "__main__":
    sys.exit(main())
