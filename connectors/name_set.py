"""A set of names too large for memory (10^8 rows of an inventory report, the names a change feed
says changed), in a temporary SQLite file that is removed when the set is closed."""

from __future__ import annotations

import os
import sqlite3
import tempfile
from itertools import islice
from typing import Iterator


class NameSet:
    """Use as a context manager: `first(name)` adds a name, `batches(n)` gives them back in name order."""

    def __init__(self, purpose: str = "names"):
        self.purpose = purpose
        self.count = 0

    def __enter__(self) -> "NameSet":
        handle, self._path = tempfile.mkstemp(prefix=f"exitplan-{self.purpose}-", suffix=".sqlite")
        os.close(handle)
        self._db = sqlite3.connect(self._path)
        self._db.execute("PRAGMA journal_mode=OFF")
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.execute("CREATE TABLE seen (name TEXT PRIMARY KEY) WITHOUT ROWID")
        return self

    def first(self, name: str) -> bool:
        """True the first time `name` is given."""
        added = self._db.execute("INSERT OR IGNORE INTO seen VALUES (?)", (name,)).rowcount == 1
        self.count += added
        return added

    def batches(self, size: int) -> Iterator[list[str]]:
        """The names, in name order, `size` at a time (read from the file as they are asked for)."""
        names = (name for (name,) in self._db.execute("SELECT name FROM seen ORDER BY name"))
        while batch := list(islice(names, size)):
            yield batch

    def __exit__(self, *exc_info) -> None:
        self._db.close()
        os.unlink(self._path)
