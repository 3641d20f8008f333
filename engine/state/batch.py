"""Object writes committed many at a time (`WriteBatch`), for the writes whose loss is harmless."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from .rows import object_row, transition_values
from .schema import PENDING

# Writes a batch in one transaction: (full rows to insert, (new state, transition values) to
# apply) -> the updates the transition table refused, by position (`StateStore._write_batch`).
BatchWriter = Callable[[list[dict[str, Any]], list[tuple[str, dict[str, Any]]]], dict[int, Exception]]

log = logging.getLogger(__name__)


class WriteBatch:
    """Object writes committed many at a time: one transaction per `max_rows` writes or per
    `max_age` seconds, and at `flush()`. Thread-safe.

    Only for writes whose loss is harmless, because a kill loses what is queued: the end of a
    single PUT (a lost "uploaded" or "failed" leaves the row in_progress, so the next run copies
    the object again, and a PUT is idempotent), or a row decided without a copy (unchanged,
    refused: a lost row means the next run decides again). Never for a transition that announces
    a side effect (in_progress before bytes move, a multipart upload's state): those are written
    at once with `StateStore.transition` / `add_object`.

    Each write names a callback, called once it is committed (`None`) or could not be (the
    `InvalidTransition` the table gave, or the database error): a caller that reported the write
    as done can correct itself. `flush` never raises for a write; `flush_if_due` is the cheap
    check to call often. The age is only checked when a write is queued or `flush_if_due` runs.
    """

    def __init__(self, write: BatchWriter, max_rows: int = 500, max_age: float = 0.2):
        self._write = write
        self.max_rows = max_rows
        self.max_age = max_age
        self._lock = threading.Lock()
        self._inserts: list[tuple[dict[str, Any], Callable[[Exception | None], None]]] = []
        self._updates: list[tuple[str, dict[str, Any], Callable[[Exception | None], None]]] = []
        self._since = 0.0  # monotonic time of the oldest queued write

    def add_object(self, run_id: int, dataset: str, source_key: str, source_etag: str, size: int, *,
                   on_written: Callable[[Exception | None], None], dest_key: str | None = None,
                   source_md5: bytes | None = None, state: str = PENDING, **fields: Any) -> None:
        """Queue `StateStore.add_object` (checked now; the id is not returned: nothing may refer to it)."""
        row = object_row(run_id, dataset, source_key, source_etag, size, dest_key, source_md5, state, fields)
        with self._lock:
            self._stamp()
            self._inserts.append((row, on_written))
        self.flush_if_due()

    def transition(self, object_id: int, new_state: str, *, on_written: Callable[[Exception | None], None],
                   **fields: Any) -> None:
        """Queue `StateStore.transition` (fields checked now, the move when written)."""
        values = transition_values(object_id, new_state, fields)
        with self._lock:
            self._stamp()
            self._updates.append((new_state, values, on_written))
        self.flush_if_due()

    def __len__(self) -> int:
        with self._lock:
            return len(self._inserts) + len(self._updates)

    def _stamp(self) -> None:
        if not self._inserts and not self._updates:
            self._since = time.monotonic()

    def flush_if_due(self) -> None:
        with self._lock:
            n = len(self._inserts) + len(self._updates)
            due = n >= self.max_rows or (n > 0 and time.monotonic() - self._since >= self.max_age)
        if due:
            self.flush()

    def flush(self) -> None:
        """Write everything queued now, in one transaction; then call each write's callback."""
        with self._lock:
            inserts, self._inserts = self._inserts, []
            updates, self._updates = self._updates, []
        if not inserts and not updates:
            return
        try:
            refused = self._write([row for row, _ in inserts], [(state, v) for state, v, _ in updates])
        except Exception as exc:  # the database itself failed: nothing of this batch is written
            for *_, callback in inserts + updates:
                _call(callback, exc)
            return
        for _, callback in inserts:
            _call(callback, None)
        for i, (*_, callback) in enumerate(updates):
            _call(callback, refused.get(i))

    def __enter__(self) -> "WriteBatch":
        return self

    def __exit__(self, *exc: object) -> None:
        self.flush()


def _call(callback: Callable[[Exception | None], None], error: Exception | None) -> None:
    try:
        callback(error)
    except Exception:  # one caller's bookkeeping must not stop the others' from being told
        log.exception("a state write callback failed")
