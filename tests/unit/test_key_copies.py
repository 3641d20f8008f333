"""Key material is write-once: the keyset copies next to the data (a bucket in memory here; the
same on the lab's servers in tests/integration/test_key_custody.py) and the versions kept in the
state directory. Append-only copies, the refusals, `keys init`'s check and `keys import`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from config.errors import ExitCode, UserError
from config.loader import load_config
from connectors.base import WriteMeta
from connectors.memory import MemoryStore
from engine import endpoints, key_copies, keys

PROJECT = "custody"


def make_config(tmp_path: Path, state: str, kek: str = "kek.key") -> Path:
    data = {
        "version": 1,
        "project": PROJECT,
        "sources": {"azurite": {"kind": "azure_blob", "connection_string_env": "EP_TEST_NO_CONN",
                                "emulator": "azurite"}},
        "destinations": {"lab-s3": {"provider": "lab", "endpoint_url": "http://127.0.0.1:5000", "region": "eu-west-3",
                                    "bucket": "exitplan-lab"}},
        "datasets": {"claims": {"source": "azurite", "container": "claims", "destination": "lab-s3"}},
        "keys": {"kek": {"backend": "local", "path": str(tmp_path / kek)}},
        "state": {"path": str(tmp_path / state)},
    }
    path = tmp_path / f"{state}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


class CountingBucket(MemoryStore):
    """A bucket in memory that counts its PUTs."""

    def __init__(self) -> None:
        super().__init__(label="mem")
        self.puts: list[str] = []

    def put(self, key: str, body, size: int, meta: WriteMeta, md5: bytes | None) -> str:
        self.puts.append(key)
        return super().put(key, body, size, meta, md5)


@pytest.fixture
def bucket(monkeypatch) -> CountingBucket:
    """The destination `lab-s3` of every config here, in memory."""
    store = CountingBucket()
    for module in (key_copies, endpoints):  # `keys init`'s check; the sinks a run or an import opens
        monkeypatch.setattr(module, "open_sink", lambda loaded, destination, **options: store)
    monkeypatch.delenv("EP_TEST_NO_CONN", raising=False)
    return store


def state(tmp_path: Path, name: str, kek: str = "kek.key", *, init: bool = True):
    loaded = load_config(make_config(tmp_path, name, kek))
    if init:
        key_copies.init_keys(loaded)
    return loaded


def wrapped(loaded) -> bytes:
    return keys.KeyFiles.of(loaded).keyset.read_bytes()


def version(data: bytes) -> str:
    return f"_exitplan/{PROJECT}/keysets/{hashlib.sha256(data).hexdigest()}.json"


LATEST = f"_exitplan/{PROJECT}/keyset.json"


def ids(data: bytes) -> set[int]:
    return {k["keyId"] for k in json.loads(data)["keysetInfo"]["keyInfo"]}


def copies(bucket: MemoryStore) -> dict[str, bytes]:
    return {k: bucket.data(k) for k in bucket.keys() if k.startswith(f"_exitplan/{PROJECT}/")}


# ---------------------------------------------------------------------------------------------
# The copies next to the data
# ---------------------------------------------------------------------------------------------


def test_every_version_is_written_once_and_the_latest_only_grows(tmp_path, bucket):
    loaded = state(tmp_path, "a")
    first = wrapped(loaded)
    assert key_copies.publish_keysets(loaded, ["claims"]) == [f"mem/{version(first)}"]
    assert copies(bucket) == {version(first): first, LATEST: first}

    bucket.puts.clear()
    key_copies.publish_keysets(loaded, ["claims"])  # the next run: nothing to write
    assert bucket.puts == []

    keys.rotate_keys(loaded)
    second = wrapped(loaded)
    key_copies.publish_keysets(loaded, ["claims"])
    new_kek = make_config(tmp_path, "a", kek="kek-2.key")
    keys.rewrap_keys(load_config(new_kek), keys.resolve_kek(loaded))
    loaded = load_config(new_kek)
    third = wrapped(loaded)
    key_copies.publish_keysets(loaded, ["claims"])

    assert copies(bucket) == {version(first): first, version(second): second, version(third): third, LATEST: third}
    assert ids(first) < ids(second) == ids(third)


def test_a_latest_copy_written_before_versions_is_kept_under_its_hash_before_it_is_replaced(tmp_path, bucket):
    loaded = state(tmp_path, "a")
    old = wrapped(loaded)
    bucket.add(LATEST, old)  # what earlier versions of exitplan wrote: keyset.json alone
    keys.rotate_keys(loaded)
    key_copies.publish_keysets(loaded, ["claims"])
    assert copies(bucket) == {version(old): old, version(wrapped(loaded)): wrapped(loaded), LATEST: wrapped(loaded)}


def test_a_keyset_the_copies_do_not_know_is_refused_and_nothing_is_written(tmp_path, bucket):
    a = state(tmp_path, "a")
    b = state(tmp_path, "b", kek="kek-b.key")  # made before a wrote anything: init could not know
    key_copies.publish_keysets(a, ["claims"])
    before = copies(bucket)
    (a_id,) = ids(wrapped(a))
    for attempt in (lambda: key_copies.publish_keysets(b, ["claims"]), lambda: key_copies.check_keysets(b, ["claims"]),
                    lambda: key_copies.publish_copy(b, bucket, key_copies.read_keysets(bucket, PROJECT, "lab-s3"),
                                                    wrapped(b))):
        with pytest.raises(keys.KeyStoreError) as refused:
            attempt()
        assert refused.value.exit_code == ExitCode.KEY_ERROR
        message = str(refused.value)
        assert f"destination `lab-s3` holds keyset copies of project `{PROJECT}` with data key(s) {a_id}" in message
        assert "exitplan keys import" in message
    assert copies(bucket) == before


def test_a_public_run_writes_no_copy(tmp_path, bucket):
    data = yaml.safe_load(make_config(tmp_path, "p").read_text())
    data["datasets"]["claims"]["public"] = True
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(data))
    assert key_copies.publish_keysets(load_config(tmp_path / "p.yaml"), ["claims"]) == []
    assert bucket.keys() == []


def test_an_altered_version_is_refused_by_name(tmp_path, bucket):
    loaded = state(tmp_path, "a")
    key_copies.publish_keysets(loaded, ["claims"])
    name = version(wrapped(loaded))
    doc = json.loads(bucket.data(name))
    doc["keysetInfo"]["keyInfo"][0]["status"] = "DESTROYED"
    bucket.add(name, json.dumps(doc).encode())
    with pytest.raises(keys.KeyStoreError, match="does not hold the keyset version its name says"):
        key_copies.publish_keysets(loaded, ["claims"])
    bucket.add(name, b"not a keyset")
    with pytest.raises(keys.KeyStoreError, match="not JSON"):
        key_copies.read_keysets(bucket, PROJECT, "lab-s3")


def test_a_version_the_listing_missed_is_checked_not_written_again(tmp_path, bucket):
    loaded = state(tmp_path, "a")
    data = wrapped(loaded)
    stale = key_copies.read_keysets(bucket, PROJECT, "lab-s3")  # read before another writer's PUT
    bucket.add(version(data), data)
    key_copies.publish_copy(loaded, bucket, stale, data)
    assert bucket.puts == [LATEST]
    bucket.add(version(data), b"{}")
    with pytest.raises(keys.KeyStoreError, match="was altered"):
        key_copies.publish_copy(loaded, bucket, stale, data)


# ---------------------------------------------------------------------------------------------
# The versions kept in the state directory
# ---------------------------------------------------------------------------------------------


def test_rotate_and_rewrap_keep_every_local_version(tmp_path, bucket):
    loaded = state(tmp_path, "a")
    files = keys.KeyFiles.of(loaded)
    seen = [wrapped(loaded)]
    keys.rotate_keys(loaded)
    seen.append(wrapped(loaded))
    new_kek = make_config(tmp_path, "a", kek="kek-2.key")
    keys.rewrap_keys(load_config(new_kek), keys.resolve_kek(loaded))
    seen.append(wrapped(loaded))
    kept = {p.name: p for p in files.keyset_versions.iterdir()}
    assert {p.read_bytes() for p in kept.values()} == set(seen) and len(set(seen)) == 3
    assert all(name == hashlib.sha256(p.read_bytes()).hexdigest() + ".json" for name, p in kept.items())
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in kept.values())
    assert files.keyset_versions.stat().st_mode & 0o777 == 0o700
    assert len(list(files.audit_versions.iterdir())) == 2  # the audit key before and after the rewrap
    assert keys.show_keys(load_config(new_kek)).versions_kept == 3

    # Write-once: keeping the same bytes again changes nothing; an altered kept version is refused.
    assert keys.keep_version(files.keyset_versions, seen[0]) == kept[keys.version_name(seen[0])]
    kept[keys.version_name(seen[0])].write_bytes(b"{}")
    with pytest.raises(keys.KeyStoreError, match="was altered"):
        keys.keep_version(files.keyset_versions, seen[0])


# ---------------------------------------------------------------------------------------------
# keys init, keys import
# ---------------------------------------------------------------------------------------------


def test_init_refuses_when_a_destination_holds_the_projects_keyset(tmp_path, bucket):
    key_copies.publish_keysets(state(tmp_path, "a"), ["claims"])
    second = load_config(make_config(tmp_path, "b", kek="kek-b.key"))
    with pytest.raises(UserError) as refused:
        key_copies.init_keys(second)
    assert refused.value.exit_code == ExitCode.USAGE
    assert f"destination `lab-s3` already holds the keyset of project `{PROJECT}`" in str(refused.value)
    assert "exitplan keys import" in str(refused.value)
    assert not (tmp_path / "b").exists() and not (tmp_path / "kek-b.key").exists()


def test_init_names_a_destination_it_could_not_check(tmp_path, monkeypatch):
    def unreachable(loaded, destination, **options):
        from connectors.base import TransientError

        raise TransientError("connection refused")

    monkeypatch.setattr(key_copies, "open_sink", unreachable)
    report = key_copies.init_keys(load_config(make_config(tmp_path, "a")))
    assert any("destination `lab-s3` could not be checked" in n and "connection refused" in n for n in report.notes)


def test_import_recovers_a_lost_state_directory(tmp_path, bucket):
    a = state(tmp_path, "a")
    keys.rotate_keys(a)
    key_copies.publish_keysets(a, ["claims"])
    lost = wrapped(a)
    recovered = state(tmp_path, "recovered", init=False)  # the same KEK (kek.key)
    result = key_copies.import_keyset(recovered)
    assert result.changed and result.origin == f"mem/{version(lost)}"
    assert wrapped(recovered) == lost
    assert keys.load_data_keys(recovered).keys.keys() == keys.load_data_keys(a).keys.keys()
    assert keys.KeyFiles.of(recovered).audit.exists() and any("new audit-signing key" in n for n in result.report.notes)
    assert not key_copies.import_keyset(recovered).changed


def test_import_refuses_copies_that_diverge_unless_merging(tmp_path, bucket):
    a = state(tmp_path, "a")
    b = state(tmp_path, "b")  # same KEK, its own keyset: as two state directories before this rule
    bucket.add(version(wrapped(a)), wrapped(a))
    bucket.add(version(wrapped(b)), wrapped(b))
    every = ids(wrapped(a)) | ids(wrapped(b))
    c = state(tmp_path, "c", init=False)
    with pytest.raises(UserError) as refused:
        key_copies.import_keyset(c)
    assert refused.value.exit_code == ExitCode.USAGE
    assert "diverge" in str(refused.value) and "--merge" in str(refused.value)
    assert not keys.KeyFiles.of(c).keyset.exists()

    result = key_copies.import_keyset(c, merge=True)
    assert result.changed and set(keys.load_data_keys(c).keys) == every
    assert {i: k.ikm for i, k in keys.load_data_keys(c).keys.items()} == {
        **{i: k.ikm for i, k in keys.load_data_keys(a).keys.items()},
        **{i: k.ikm for i, k in keys.load_data_keys(b).keys.items()}}


def test_import_never_drops_a_local_key(tmp_path, bucket):
    a = state(tmp_path, "a")
    b = state(tmp_path, "b")  # its own keyset (same KEK), made before a wrote anything
    key_copies.publish_keysets(a, ["claims"])
    own = wrapped(b)
    with pytest.raises(UserError) as refused:
        key_copies.import_keyset(b)
    assert refused.value.exit_code == ExitCode.USAGE and "--merge" in str(refused.value)
    assert wrapped(b) == own

    key_copies.import_keyset(b, merge=True)
    assert set(keys.load_data_keys(b).keys) == ids(own) | ids(wrapped(a))
    assert keys.load_data_keys(b).primary_id == keys.load_data_keys(a).primary_id
    assert (keys.KeyFiles.of(b).keyset_versions / keys.version_name(own)).read_bytes() == own
    key_copies.publish_keysets(b, ["claims"])  # now a superset of the copies: published
    assert bucket.data(LATEST) == wrapped(b)


def test_import_refuses_a_copy_whose_clear_key_ids_lie(tmp_path, bucket):
    a = state(tmp_path, "a")
    doc = json.loads(wrapped(a))
    doc["keysetInfo"]["keyInfo"].append(dict(doc["keysetInfo"]["keyInfo"][0], keyId=12345))
    bucket.add(LATEST, json.dumps(doc).encode())
    with pytest.raises(keys.KeyStoreError, match="does not describe the keys it holds"):
        key_copies.import_keyset(state(tmp_path, "c", init=False))


def test_import_with_nothing_to_import_is_a_key_error(tmp_path, bucket):
    with pytest.raises(keys.KeyStoreError) as missing:
        key_copies.import_keyset(state(tmp_path, "c", init=False))
    assert "no keyset copy of project" in str(missing.value) and "exitplan keys init" in str(missing.value)
