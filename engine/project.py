"""A project's state and its lock: where the state store is, how it is opened, and the lock that
keeps two migrations of one project from running at once.

The state is the SQLite file `state.db` of the project's state directory, or the database that
`state.url_env` names (PostgreSQL when several hosts share a run); the lock is a `flock` on
`migrate.lock` beside it, or an advisory lock in that database.
"""

from __future__ import annotations

import fcntl
import os
import zlib
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Iterator

import sqlalchemy as sa

from config.errors import ConfigFileError
from config.models import LoadedConfig
from connectors.base import ConfigError

from .errors import RunError
from .private_files import open_private, private_directory
from .state import StateStore, writing_file

STATE_FILE = "state.db"
LOCK_FILE = "migrate.lock"


def state_path(loaded: LoadedConfig) -> Path:
    """The project's SQLite state file (the state, unless `state.url_env` names a database)."""
    return loaded.state_dir / STATE_FILE


def state_url(loaded: LoadedConfig) -> str | None:
    """The database URL of `state.url_env` (None: the SQLite file of the state directory)."""
    var = loaded.config.state.url_env
    if var is None:
        return None
    url = os.environ.get(var)
    if not url:
        raise ConfigFileError(f"{loaded.path}: field `state.url_env` names the environment variable {var}, which is "
                              "not set; export it (postgresql+psycopg://user:password@host:5432/db)")
    return url


@contextmanager
def state_database_errors(loaded: LoadedConfig) -> Iterator[None]:
    """A state database that cannot be used becomes a `RunError` (exit 2) naming it, without its password."""
    try:
        yield
    except sa.exc.ArgumentError as exc:
        raise RunError(f"{loaded.path}: field `state.url_env`: ${loaded.config.state.url_env} is not a database URL "
                       f"({exc})", ConfigError(str(exc))) from None
    except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
        raise RunError(f"the state database {state_location(loaded)} cannot be used: "
                       f"{str(exc.orig).strip().splitlines()[0]}", ConfigError(str(exc.orig))) from None


def state_location(loaded: LoadedConfig) -> str:
    """Where the state is, for messages: the SQLite file, or the database URL without its password."""
    url = state_url(loaded)
    if url is None:
        return str(state_path(loaded))
    return sa.engine.make_url(url).render_as_string(hide_password=True)


def open_state(loaded: LoadedConfig, *, read_only: bool = False) -> StateStore | None:
    """The project's state store; read-only returns None when it does not exist yet (writes nothing:
    no file, no table; a state database that holds the tables is opened as usual, which adds the
    columns a newer exitplan needs).
    A database that cannot be reached is a `RunError` (exit 2) naming it, never with its password."""
    url = state_url(loaded)
    if url is not None:
        with state_database_errors(loaded):
            if read_only and not _holds_state(url):
                return None
            return StateStore(url)
    path = state_path(loaded)
    if read_only:
        if not path.exists():
            return None
        return StateStore(f"sqlite:///file:{path.resolve()}?mode=ro&uri=true")
    return StateStore(path)


def _holds_state(url: str) -> bool:
    """Whether the database holds exitplan's tables (a read-only look creates none)."""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            return sa.inspect(conn).has_table("runs")
    finally:
        engine.dispose()


class _DatabaseLock:
    """A PostgreSQL session advisory lock on the project, held by a connection of its own (ended,
    with the lock, by `close` or by the process's death)."""

    def __init__(self, loaded: LoadedConfig, url: str):
        self.engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
        with state_database_errors(loaded):
            self.conn = self.engine.connect()
        key = zlib.crc32(f"exitplan-migrate|{loaded.config.project}".encode())
        if not self.conn.execute(sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar():
            self.close()
            raise RunError(f"another migration of project `{loaded.config.project}` is running (it holds the "
                           f"project's lock in the state database {state_location(loaded)}); wait for it to end, "
                           "then run again")
        self.conn.commit()

    def close(self) -> None:
        self.conn.close()
        self.engine.dispose()


def lock_project(loaded: LoadedConfig) -> IO[str] | _DatabaseLock:
    """Take the project's migration lock (an exclusive `flock` on `<state dir>/migrate.lock`, held
    until the returned file is closed; with a state database, an advisory lock in it, so that runs
    on different hosts exclude each other too): two migrations of one project at once would copy
    the same objects and interleave their state. A held lock is a `RunError` naming who holds it."""
    url = state_url(loaded)
    if url is not None and url.startswith("postgresql"):
        return _DatabaseLock(loaded, url)
    path = loaded.state_dir / LOCK_FILE
    with writing_file(path, "the project's lock file"):
        f = open_private(private_directory(loaded.state_dir) / LOCK_FILE, "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise RunError(f"another migration of project `{loaded.config.project}` is running ({holder}, lock {path}); "
                       "wait for it to end, then run again") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}, started {datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S}Z\n")
    f.flush()
    return f
