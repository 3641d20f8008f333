"""What exitplan writes locally is private whatever the umask: the state directory and database
(with SQLite's -wal/-shm), the migration lock and the report are 0700/0600 under umask 022."""

from __future__ import annotations

import os
import stat

import pytest

from engine.private_files import open_private, private_directory, private_file
from engine.state import StateStore


@pytest.fixture
def loose_umask():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_state_directory_and_database_are_private(tmp_path, loose_umask):
    state_dir = tmp_path / "project" / ".exitplan"
    store = StateStore(state_dir / "state.db")
    try:
        run = store.start_run("migrate")
        store.finish_run(run, "ok")
    finally:
        store.close()
    assert mode(state_dir) == 0o700
    files = [p for p in state_dir.iterdir() if p.name.startswith("state.db")]
    assert files and all(mode(p) == 0o600 for p in files), {p.name: oct(mode(p)) for p in files}


def test_an_existing_directory_and_file_of_ours_are_narrowed(tmp_path, loose_umask):
    d = tmp_path / "state"
    d.mkdir(mode=0o755)
    f = d / "state.db"
    f.write_bytes(b"")
    os.chmod(f, 0o644)
    private_file(private_directory(d) / "state.db")
    assert (mode(d), mode(f)) == (0o700, 0o600)


def test_a_shared_directory_is_never_narrowed(tmp_path, loose_umask):
    """A state or key path written in /tmp must not lock every other user out of /tmp: a sticky
    directory is never changed (its files are still 0600)."""
    from engine.keys import _write_private

    shared = tmp_path / "tmp"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    private_directory(shared)
    _write_private(shared / "kek.key", b"k")
    assert (stat.S_IMODE(os.stat(shared).st_mode), mode(shared / "kek.key")) == (0o1777, 0o600)


def test_open_private_creates_0600(tmp_path, loose_umask):
    with open_private(tmp_path / "lock", "a+") as fh:
        fh.write("pid 1\n")
    with open_private(tmp_path / "page.html", "w") as fh:
        fh.write("é")
    assert mode(tmp_path / "lock") == 0o600 and mode(tmp_path / "page.html") == 0o600
    assert (tmp_path / "page.html").read_text(encoding="utf-8") == "é"


def test_key_files_and_the_audit_manifest_are_private(tmp_path, loose_umask, monkeypatch):
    """`keys init`, a rotation and a manifest written under umask 022: every directory of the state
    is 0700 and every file 0600 (the kept keyset versions, the audit key, the manifest and its lock)."""
    from config.loader import load_config
    from connectors.memory import MemoryStore
    from engine import key_copies, keys
    from engine.audit import AuditManifest, manifest_path
    from tests.unit.test_key_copies import make_config

    monkeypatch.setattr(key_copies, "open_sink", lambda loaded, destination, **options: MemoryStore(label="mem"))
    monkeypatch.delenv("EP_TEST_NO_CONN", raising=False)
    loaded = load_config(make_config(tmp_path, "state"))
    key_copies.init_keys(loaded)
    keys.rotate_keys(loaded)
    with AuditManifest(manifest_path(loaded), loaded.config.project, None) as manifest:
        manifest.append({"type": "note"})
    state_dir = tmp_path / "state"
    found = {p.relative_to(tmp_path).as_posix(): oct(mode(p)) for p in [state_dir, *state_dir.rglob("*")]}
    assert {"state/audit/manifest.jsonl", "state/audit/manifest.jsonl.lock", "state/keysets"} <= set(found)
    wide = {name: m for name, m in found.items()
            if m != (oct(0o700) if (tmp_path / name).is_dir() else oct(0o600))}
    assert not wide, wide


def test_the_worker_refuses_a_shared_work_dir(tmp_path):
    """`exitplan worker --work-dir /tmp` would make /tmp 0700 (the worker narrows its directory):
    a sticky directory is refused instead, and left as it was."""
    from config.errors import UserError
    from flows.worker import WorkerDirectory

    shared = tmp_path / "tmp"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    with pytest.raises(UserError) as info:
        with WorkerDirectory(shared):
            pass
    assert "shared directory" in str(info.value) and str(shared) in str(info.value)
    assert stat.S_IMODE(os.stat(shared).st_mode) == 0o1777
