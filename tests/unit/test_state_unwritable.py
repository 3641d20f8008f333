"""A state that cannot be written (issue 18, item 7): one `StateUnwritable` naming the path and
the cause, the run's workers stopped instead of each logging a traceback, the state consistent.

SQLite's own limits stand in for the disk here (no root needed): `PRAGMA max_page_count` makes a
write fail with "database or disk is full", `PRAGMA query_only` with "attempt to write a readonly
database". tests/integration/test_state_disk.py runs the real CLI on a full and a read-only tmpfs.
"""

from __future__ import annotations

import errno
import logging
import random
import sqlite3

import pytest
import sqlalchemy as sa

from config.errors import ExitCode
from connectors.memory import MemoryStore
from engine import state as st
from engine.state import StateStore, StateUnwritable, writing_file
from engine.state.unwritable import unwritable_database
from tests.unit.test_dataset_copy import LIMITS, migrate, seed, settings


def limit_writes(state: StateStore, pragma: str) -> None:
    """Every connection of `state` from now on runs `pragma` (connections are opened again)."""
    sa.event.listen(state.engine, "connect", lambda conn, _record: conn.execute(pragma))
    state.engine.dispose()


def page_count(state: StateStore) -> int:
    with state.engine.connect() as conn:
        return conn.exec_driver_sql("PRAGMA page_count").scalar()


@pytest.mark.parametrize("serial", [True, False])
def test_a_full_state_stops_the_dataset_once_without_a_traceback(tmp_path, caplog, serial):
    path = tmp_path / "state.db"
    state = StateStore(path)
    run = state.start_run("migrate")
    src, dst = MemoryStore(page_size=50), MemoryStore(limits=LIMITS)
    seed(src, 300, random.Random(3))
    limit_writes(state, f"PRAGMA max_page_count = {page_count(state) + 4}")

    with caplog.at_level(logging.INFO), pytest.raises(StateUnwritable) as caught:
        # Batches of 20 rows: the disk fills up long before the 300 objects are copied (the
        # default, 500 rows or 0.2 s, can take the whole in-memory dataset in one batch).
        migrate(src, dst, state, run, settings(), serial=serial, state_batch_rows=20)
    state.close()

    assert caught.value.exit_code == ExitCode.FAILED
    assert str(caught.value).startswith(f"the state store {path} cannot be written (the disk is full")
    assert "run the same command again" in str(caught.value)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info] == []
    # No more objects started once the state could not be written.
    assert 0 < len(dst.keys()) < 300
    with StateStore(path) as again:  # consistent: what a kill would leave, every copy it names present
        rows = list(again.objects(run))
        assert 0 < len(rows) < 300
        assert {r.state for r in rows} <= {st.IN_PROGRESS, st.UPLOADED}
        for r in rows:
            if r.state == st.UPLOADED:
                assert dst.head(r.dest_key).size == r.output_size
        with again.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"


def test_a_state_that_refuses_writes_is_exit_2(tmp_path):
    path = tmp_path / "state.db"
    state = StateStore(path)
    limit_writes(state, "PRAGMA query_only = 1")
    with pytest.raises(StateUnwritable) as caught:
        state.start_run("migrate")
    assert caught.value.exit_code == ExitCode.USAGE
    assert str(caught.value).startswith(f"the state store {path} cannot be written (permission denied")
    assert state.unwritable is caught.value
    state.close()


@pytest.mark.parametrize("message, code, said", [
    ("database or disk is full", ExitCode.FAILED, "the disk is full"),
    ("attempt to write a readonly database", ExitCode.USAGE, "permission denied"),
    ("disk I/O error", ExitCode.FAILED, "a disk I/O error"),
])
def test_sqlite_errors_that_mean_an_unwritable_state(tmp_path, message, code, said):
    stop = unwritable_database(sqlite3.OperationalError(message), tmp_path / "state.db", "STATE")
    assert stop is not None and stop.exit_code == code
    assert str(stop).startswith(f"the state store STATE cannot be written ({said}")


@pytest.mark.parametrize("message", ["no such table: objects", "database is locked",
                                     "unable to open database file"])
def test_other_database_errors_are_not_translated(tmp_path, message):
    # "unable to open" on a directory that is fine (writable, space free) is some other problem.
    assert unwritable_database(sqlite3.OperationalError(message), tmp_path / "state.db", "STATE") is None


@pytest.mark.parametrize("number, code, said", [
    (errno.ENOSPC, ExitCode.FAILED, "the disk is full"),
    (errno.EROFS, ExitCode.USAGE, "its filesystem is read-only"),
    (errno.EACCES, ExitCode.USAGE, "permission denied for user"),
])
def test_file_errors_of_the_state_directory(tmp_path, number, code, said):
    target = tmp_path / "audit" / "manifest.jsonl"
    with pytest.raises(StateUnwritable) as caught, writing_file(target, "the audit manifest"):
        raise OSError(number, "refused", str(target))
    assert caught.value.exit_code == code
    assert str(caught.value).startswith(f"the audit manifest {target} cannot be written ({said}")
    assert "`state.path`" in str(caught.value)


def test_other_file_errors_go_on_as_they_are(tmp_path):
    with pytest.raises(FileNotFoundError), writing_file(tmp_path / "x", "the report", "`--out`"):
        raise FileNotFoundError(errno.ENOENT, "gone")
