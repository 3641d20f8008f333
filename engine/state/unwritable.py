"""When the state cannot be written: a full disk, a read-only filesystem, a directory or file the
user may not write. The one place a database error or an `OSError` of the state directory becomes
`StateUnwritable`: one sentence naming the path, the cause and the fix.

The exit code follows the cause (ARCHITECTURE.md, exit codes; docs/DESIGN.md "State database"):

- **a full disk is 1**: the run failed part-way, like objects that failed, and the same command
  succeeds once space is freed (what was recorded is kept; copied objects are skipped);
- **a read-only filesystem or a permission is 2**: the state directory the configuration names
  (`state.path`) cannot be used as it is set up; the setup or the configuration must change first,
  as for a state database that cannot be reached.

The cause is read from the filesystem itself (statvfs, access) when the error is vague: SQLite
says "unable to open database file" alike for a read-only filesystem, a missing permission and
a directory that is full.
"""

from __future__ import annotations

import errno
import os
import pwd
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from config.errors import ExitCode, UserError

# SQLite's messages (sqlite3.OperationalError) that mean the file cannot be written or opened.
_SQLITE_FULL = "database or disk is full"
_SQLITE_READ_ONLY = "attempt to write a readonly database"
_SQLITE_CANNOT_OPEN = "unable to open database file"
_SQLITE_IO = "disk I/O error"
# PostgreSQL's SQLSTATEs for the same: disk_full, read_only_sql_transaction, insufficient_privilege.
_PG_FULL, _PG_READ_ONLY, _PG_PRIVILEGE = "53100", "25006", "42501"

_FULL = "full"
_READ_ONLY = "read-only"
_DENIED = "denied"
_IO = "io"

_FIX = {
    _FULL: (ExitCode.FAILED, "free space there (or move {elsewhere}) and run the same command again (what was "
                             "recorded is kept)"),
    _READ_ONLY: (ExitCode.USAGE, "remount it read-write or point {elsewhere} at a writable directory, then run again"),
    _DENIED: (ExitCode.USAGE, "give the user running exitplan write access to it, or point {elsewhere} elsewhere"),
    _IO: (ExitCode.FAILED, "check the disk (`dmesg`, free space) and run the same command again"),
}


class StateUnwritable(UserError):
    """The state store (or another file of the state directory) cannot be written: exit code 1
    for a full disk or an I/O error, 2 for a read-only filesystem or a permission (see above).
    `path` is the file, or the database URL without its password; `cause` one of the causes;
    `elsewhere` the setting that moves the file."""

    def __init__(self, path: str, cause: str, what: str = "the state store", detail: str = "",
                 elsewhere: str = "`state.path`", verb: str = "written"):
        code, fix = _FIX[cause]
        fix = fix.format(elsewhere=elsewhere)
        said = {_FULL: "the disk is full", _READ_ONLY: "its filesystem is read-only",
                _DENIED: "permission denied", _IO: "a disk I/O error"}[cause]
        super().__init__(f"{what} {path} cannot be {verb} ({said}{detail}); {fix}", code)
        self.path = path
        self.cause = cause


def _inspected(path: Path) -> tuple[str | None, str]:
    """(cause, detail) read from the filesystem of `path` (its nearest existing ancestor)."""
    here = path
    while not here.exists() and here != here.parent:
        here = here.parent
    try:
        vfs = os.statvfs(here)
    except OSError:
        return None, ""
    if vfs.f_flag & os.ST_RDONLY:
        return _READ_ONLY, ""
    directory = here if here.is_dir() else here.parent
    if not os.access(directory, os.W_OK) or (here.is_file() and not os.access(here, os.W_OK)):
        return _DENIED, f" for user {_user()}"
    free = vfs.f_bavail * vfs.f_frsize
    if free < 1024 * 1024:
        return _FULL, f": {free // 1024:,} KiB free"
    return None, ""


def _user() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return f"uid {os.getuid()}"


def unwritable_database(error: BaseException, path: Path | None, shown: str, *,
                        read_only: bool = False) -> StateUnwritable | None:
    """The `StateUnwritable` that a DBAPI error `error` (sqlite3's or psycopg's) means, or None
    when it means something else. `path`: the SQLite file (None for a database server); `shown`:
    how to name the database (the file, or the URL without its password); `read_only`: the
    store was opened to be read (SQLite still writes a small `-shm` file beside a WAL database
    to read it), so the sentence says it cannot be opened."""
    verb = "opened" if read_only else "written"
    sqlstate = getattr(error, "sqlstate", None)
    if sqlstate is not None:
        cause = {_PG_FULL: _FULL, _PG_READ_ONLY: _READ_ONLY, _PG_PRIVILEGE: _DENIED}.get(sqlstate)
        return StateUnwritable(shown, cause, "the state database", verb=verb) if cause else None
    message = str(error).lower()
    if not any(m.lower() in message for m in (_SQLITE_FULL, _SQLITE_READ_ONLY, _SQLITE_CANNOT_OPEN, _SQLITE_IO)):
        return None
    found, detail = _inspected(path) if path is not None else (None, "")
    if found is None:
        if _SQLITE_FULL in message:
            found = _FULL
        elif _SQLITE_READ_ONLY in message:
            found = _DENIED
        elif _SQLITE_IO.lower() in message:
            found = _IO
        else:
            return None  # cannot be opened for another reason (a missing directory): not ours to name
    return StateUnwritable(shown, found, detail=detail, verb=verb)


def unwritable_file(error: OSError, path: Path, what: str, elsewhere: str = "`state.path`") -> StateUnwritable | None:
    """The `StateUnwritable` that `error`, met writing `path` (`what` it is: "the audit
    manifest"; `elsewhere`: the setting that moves it), means; None for another error."""
    cause = {errno.ENOSPC: _FULL, errno.EDQUOT: _FULL, errno.EROFS: _READ_ONLY, errno.EACCES: _DENIED,
             errno.EPERM: _DENIED, errno.EIO: _IO}.get(error.errno)
    if cause is None:
        return None
    found, detail = _inspected(path)
    if found != cause:
        detail = f" for user {_user()}" if cause == _DENIED else ""
    return StateUnwritable(str(path), cause, what, detail, elsewhere)


@contextmanager
def writing_file(path: Path, what: str, elsewhere: str = "`state.path`") -> Iterator[None]:
    """Around writes to `path` (`what` it is, and `elsewhere` the setting that moves it, for the
    sentence): an `OSError` that means a full disk, a read-only filesystem or a refused
    permission becomes `StateUnwritable`; any other goes on as it is."""
    try:
        yield
    except OSError as exc:
        stop = unwritable_file(exc, path, what, elsewhere)
        if stop is None:
            raise
        raise stop from None
