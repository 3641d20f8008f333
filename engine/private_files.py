"""What exitplan writes on the local disk is private to the user running it, whatever the umask.

The state names every object of a health dataset, the audit manifest describes each one, the
report summarises them, and a restore writes their plaintext: directories are created 0700 and
files 0600 (ARCHITECTURE.md §5, README "Security"). A directory of exitplan's own that exists
with wider permissions (made by an earlier version, or under a looser umask) is narrowed when it
is opened again; a directory the user named (`--to`, `--out`'s parent) is created private but
never changed, and a shared directory (sticky bit, as /tmp: a key or state path written there) is
never changed at all: narrowing /tmp would lock every other user and service out of it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


def private_directory(path: Path) -> Path:
    """Create `path` (and missing parents) 0700; an existing directory of this user is made 0700,
    unless it is a shared one (sticky bit)."""
    path.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) & 0o077 and not st.st_mode & stat.S_ISVTX:
        os.chmod(path, stat.S_IMODE(st.st_mode) & 0o700)
    return path


def private_file(path: Path) -> Path:
    """Create `path` empty and 0600 if it does not exist (before a library opens it with the
    umask's mode: SQLite gives its -wal and -shm files the database file's mode); an existing file
    of this user is made 0600."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE))
    except FileExistsError:
        st = path.stat()
        if st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) & 0o177:
            os.chmod(path, PRIVATE_FILE)
    return path


def open_private(path: Path, mode: str = "a+"):
    """`open(path, mode)` for a file created 0600 when missing (text modes `a+`/`w` in UTF-8,
    binary `ab`/`a+b`)."""
    flags = os.O_CREAT | (os.O_RDWR if "+" in mode else os.O_WRONLY)
    if "a" in mode:
        flags |= os.O_APPEND
    elif "w" in mode:
        flags |= os.O_TRUNC
    return os.fdopen(os.open(path, flags, PRIVATE_FILE), mode, encoding=None if "b" in mode else "utf-8")
