"""Fixtures of the unit tests that need a state store."""

from __future__ import annotations

import uuid

import pytest

from engine.state import StateStore


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    """The state store on SQLite, and on PostgreSQL (a fresh database of the session's server each time)."""
    if request.param == "sqlite":
        s = StateStore(tmp_path / "state.db")
    else:
        s = StateStore(request.getfixturevalue("postgres").create_database(f"unit_{uuid.uuid4().hex[:12]}"))
    yield s
    s.close()
