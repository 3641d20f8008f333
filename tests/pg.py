"""A PostgreSQL server of the tests' own on a free loopback port (Debian's `postgresql` package).

initdb and postgres refuse to run as root: as root (CI), they run as the `postgres` user the
package creates, with `runuser`. Trust authentication on 127.0.0.1 only; fsync off (test data)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from flows import lab_processes as lp

USER = "exitplan"


def _bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        raise RuntimeError(f"PostgreSQL's {name} is not installed: apt-get install postgresql (.ci/run does)")
    return found[-1]


def _as_server_user(argv: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


@dataclass
class Postgres:
    port: int
    directory: Path

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://{USER}:secret-not-checked@{lp.LOOPBACK}:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(host=lp.LOOPBACK, port=self.port, user=USER, dbname="postgres", autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        subprocess.run(_as_server_user([_bin("pg_ctl"), "-D", str(self.directory / "data"), "-m", "immediate",
                                        "stop"]), capture_output=True, timeout=60)


def start_postgres(directory: Path) -> Postgres:
    directory.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(directory, "postgres")
    data = directory / "data"
    subprocess.run(_as_server_user([_bin("initdb"), "-D", str(data), "-A", "trust", "-U", USER, "--no-sync",
                                    "-E", "UTF8"]), check=True, capture_output=True, timeout=120)
    port = lp.free_port()
    subprocess.run(_as_server_user([_bin("pg_ctl"), "-D", str(data), "-l", str(directory / "postgres.log"), "-w",
                                    "-o", f"-p {port} -k {directory} -c listen_addresses={lp.LOOPBACK} -c fsync=off",
                                    "start"]), check=True, capture_output=True, timeout=120)
    return Postgres(port, directory)
