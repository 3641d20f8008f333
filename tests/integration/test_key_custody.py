"""Key custody on the lab servers (Azurite, the S3 server): the project's keys are never replaced.

Two state directories of one project writing to one bucket: the second `keys init` is refused; a
keyset that does not hold the project's keys (the refusal bypassed) cannot migrate, and a dry run
says so; `keys import` brings the keys back from the copies next to the data, into a new state
directory (the first one lost) or into a second operator's after a rotation, and what the first
wrote restores. Every version of the wrapped keyset stays in the bucket under its hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import pytest
import yaml
from azure.storage.blob import BlobServiceClient

from config.errors import ExitCode
from tests.integration.test_encryption_e2e import cli, restored_files
from tests.s3client import keys_below, lab_s3_client

pytestmark = pytest.mark.integration

CS_VAR = "EXITPLAN_TEST_CUSTODY_AZURE_CS"
BUCKET = "exitplan-custody"
OTHER_BUCKET = "exitplan-custody-other"


@pytest.fixture(scope="module")
def s3(s3_server):
    client = lab_s3_client(s3_server.url, BUCKET)
    client.create_bucket(Bucket=OTHER_BUCKET, CreateBucketConfiguration={"LocationConstraint": "eu-west-3"})
    return client


@pytest.fixture
def project(tmp_path, monkeypatch, azurite_connection_string, s3_server, s3):
    """A fresh container with a few blobs (one multipart-sized), a project name of its own, and
    `config(state, kek, bucket)`: a config of that project with its own state directory."""
    monkeypatch.setenv(CS_VAR, azurite_connection_string)
    container = f"custody{uuid.uuid4().hex[:10]}"
    cc = BlobServiceClient.from_connection_string(azurite_connection_string).create_container(container)
    blobs = {"a.csv": b"id,amount\n1,10\n" * 50, "notes/b.txt": "données\n".encode() * 40,
             "scans/big.bin": os.urandom(6 * 1024 * 1024 + 7)}
    for name, data in blobs.items():
        cc.upload_blob(name, data)

    def config(state: str, kek: str, bucket: str = BUCKET) -> Path:
        cfg = {
            "version": 1,
            "project": container,
            "sources": {"az": {"kind": "azure_blob", "connection_string_env": CS_VAR}},
            "destinations": {"lab": {"provider": "lab", "endpoint_url": s3_server.url, "region": "eu-west-3",
                                     "bucket": bucket}},
            "datasets": {"scans": {"source": "az", "container": container, "destination": "lab",
                                   "dest_prefix": f"{container}/"}},
            "transfer": {"concurrency": 4, "part_size": "5MiB", "small_object_cutoff": "1MiB"},
            "state": {"path": str(tmp_path / state)},
            "keys": {"kek": {"backend": "local", "path": str(tmp_path / kek)}},
        }
        path = tmp_path / f"{state}.yaml"
        path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
        return path

    return container, cc, blobs, config


def copies(s3, project: str) -> dict[str, bytes]:
    """The keyset copies of `project` in the bucket, by key below `_exitplan/<project>/`."""
    prefix = f"_exitplan/{project}/"
    return {k: s3.get_object(Bucket=BUCKET, Key=prefix + k)["Body"].read() for k in keys_below(s3, BUCKET, prefix)
            if k.startswith("keyset")}


def key_ids(wrapped: bytes) -> set[int]:
    return {k["keyId"] for k in json.loads(wrapped)["keysetInfo"]["keyInfo"]}


def etags(s3, container: str) -> dict[str, str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{container}/")
    return {o["Key"]: o["ETag"] for page in pages for o in page.get("Contents", [])}


def test_a_second_state_directory_cannot_replace_the_projects_keys(tmp_path, capsys, project, s3):
    container, cc, blobs, config = project
    first = config("first", "kek-first.key")
    assert cli(capsys, "keys", "init", "--config", first)[0] == 0
    code, first_run, err = cli(capsys, "migrate", "--config", first)
    assert code == 0, err
    first_keyset = (tmp_path / "first" / "keyset.json").read_bytes()
    version = f"keysets/{hashlib.sha256(first_keyset).hexdigest()}.json"

    # A second state directory of the same project: `keys init` is refused, nothing is created.
    second = config("second", "kek-second.key")
    code, out, err = cli(capsys, "keys", "init", "--config", second)
    assert code == ExitCode.USAGE, out + err
    assert f"destination `lab` already holds the keyset of project `{container}`" in err
    assert "exitplan keys import" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "second" / "keyset.json").exists() and not (tmp_path / "kek-second.key").exists()

    # The refusal bypassed (the keyset made against another bucket): migrate and its dry run are
    # refused before anything is written, naming the destination, the key id and the fix.
    assert cli(capsys, "keys", "init", "--config", config("second", "kek-second.key", bucket=OTHER_BUCKET))[0] == 0
    second = config("second", "kek-second.key")
    cc.upload_blob("a.csv", b"changed at the source\n", overwrite=True)  # a run would rewrite it
    before = etags(s3, container)
    (first_id,) = key_ids(first_keyset)
    for argv in (("migrate", "--config", second), ("migrate", "--config", second, "--dry-run")):
        code, out, err = cli(capsys, *argv)
        assert code == ExitCode.KEY_ERROR, (argv, out + err)
        assert f"destination `lab` holds keyset copies of project `{container}` with data key(s) {first_id}" in err
        assert "exitplan keys import" in err and "would write" not in out
    assert etags(s3, container) == before
    # The project's keyset next to the data: every version under its hash, and the latest.
    assert copies(s3, container) == {"keyset.json": first_keyset, version: first_keyset}
    assert f"lab:{BUCKET}/_exitplan/{container}/{version}" in first_run
    assert not (tmp_path / "second" / "state.db").exists()
    # Its own KEK does not open the project's keyset: importing it is a key error.
    code, out, err = cli(capsys, "keys", "import", "--config", second)
    assert code == ExitCode.KEY_ERROR and "do not open with the configured KEK" in err, out + err
    assert key_ids((tmp_path / "second" / "keyset.json").read_bytes()) != {first_id}  # left as it was

    # The first state directory is lost; with the KEK (in its KMS), a new one imports the keyset
    # from the bucket and everything the first wrote restores.
    shutil.rmtree(tmp_path / "first")
    recovered = config("recovered", "kek-first.key")
    code, out, err = cli(capsys, "keys", "import", "--config", recovered)
    assert code == 0, err
    assert f"from lab:{BUCKET}/_exitplan/{container}/{version}" in out and "new audit-signing key" in out
    assert (tmp_path / "recovered" / "keyset.json").read_bytes() == first_keyset
    assert (tmp_path / "recovered" / version).read_bytes() == first_keyset
    assert ((tmp_path / "recovered" / "keyset.json").stat().st_mode & 0o777) == 0o600
    code, out, err = cli(capsys, "restore", "--config", recovered, "--dataset", "scans", "--to", tmp_path / "r")
    assert code == 0, err
    assert restored_files(tmp_path / "r") == dict(blobs)  # as the first wrote them (before the change)
    # It holds the project's keys: migrate goes on, and a second import changes nothing.
    code, out, err = cli(capsys, "migrate", "--config", recovered)
    assert code == 0, err
    code, out, err = cli(capsys, "keys", "import", "--config", recovered)
    assert code == 0 and "nothing to import" in out, err


def test_a_second_operator_imports_the_keys_of_a_rotation(tmp_path, capsys, project, s3):
    container, cc, blobs, config = project
    alice = config("alice", "kek.key")
    bob = config("bob", "kek.key")  # one KEK (in the lab: one key file), two state directories
    assert cli(capsys, "keys", "init", "--config", alice)[0] == 0
    assert cli(capsys, "migrate", "--config", alice)[0] == 0
    code, out, err = cli(capsys, "keys", "import", "--config", bob)  # joins the project
    assert code == 0, err
    assert cli(capsys, "migrate", "--config", bob)[0] == 0
    (old_id,) = key_ids((tmp_path / "bob" / "keyset.json").read_bytes())

    # Alice rotates; a changed blob is rewritten with the new data key.
    code, out, err = cli(capsys, "keys", "rotate", "--config", alice)
    assert code == 0, err
    rotated = (tmp_path / "alice" / "keyset.json").read_bytes()
    (new_id,) = key_ids(rotated) - {old_id}
    blobs["a.csv"] = b"version 2\n" * 30
    cc.upload_blob("a.csv", blobs["a.csv"], overwrite=True)
    assert cli(capsys, "migrate", "--config", alice)[0] == 0
    held = copies(s3, container)
    assert held["keyset.json"] == rotated
    assert [key_ids(v) for k, v in sorted(held.items()) if k.startswith("keysets/")] in (
        [{old_id}, {old_id, new_id}], [{old_id, new_id}, {old_id}])

    # Bob's keyset lacks the new key: verify and restore say which, and point at `keys import`;
    # migrate refuses.
    code, out, err = cli(capsys, "verify", "--config", bob)
    assert code == ExitCode.FAILED and f"key id {new_id}" in out + err and "exitplan keys import" in out + err
    code, out, err = cli(capsys, "restore", "--config", bob, "--dataset", "scans", "--to", tmp_path / "r1")
    assert code == ExitCode.FAILED and f"no enabled data key with id {new_id}" in err
    assert "exitplan keys import" in err
    code, out, err = cli(capsys, "migrate", "--config", bob)
    assert code == ExitCode.KEY_ERROR and f"data key(s) {new_id} that the keyset" in err

    code, out, err = cli(capsys, "keys", "import", "--config", bob, "--destination", "lab")
    assert code == 0, err
    assert (tmp_path / "bob" / "keyset.json").read_bytes() == rotated
    # The version Bob had is kept beside it.
    kept = {p.read_bytes() for p in (tmp_path / "bob" / "keysets").iterdir()}
    assert len(kept) == 2 and rotated in kept
    code, out, err = cli(capsys, "restore", "--config", bob, "--dataset", "scans", "--to", tmp_path / "r2")
    assert code == 0, err
    assert restored_files(tmp_path / "r2") == blobs
    assert cli(capsys, "migrate", "--config", bob)[0] == 0


def test_the_flows_refuse_a_keyset_the_bucket_does_not_know(tmp_path, capsys, project, s3, prefect_harness):
    """The exit-plan flow and the migrate flow (and its dry run) open their run as `migrate` does:
    a keyset the destination's copies do not know fails the flow run, naming the key and the fix."""
    from flows.orchestrate import exit_plan, migrate_flow

    container, cc, blobs, config = project
    first = config("first", "kek-first.key")
    assert cli(capsys, "keys", "init", "--config", first)[0] == 0
    assert cli(capsys, "migrate", "--config", first)[0] == 0
    (first_id,) = key_ids((tmp_path / "first" / "keyset.json").read_bytes())
    assert cli(capsys, "keys", "init", "--config", config("second", "kek-second.key", bucket=OTHER_BUCKET))[0] == 0
    second = config("second", "kek-second.key")
    cc.upload_blob("a.csv", b"changed at the source\n", overwrite=True)
    before, held = etags(s3, container), copies(s3, container)
    for run in (lambda: exit_plan(config_path=str(second), return_state=True),
                lambda: migrate_flow(config_path=str(second), return_state=True),
                lambda: migrate_flow(config_path=str(second), dry_run=True, return_state=True)):
        state = run()
        assert state.is_failed(), state.message
        assert f"data key(s) {first_id} that the keyset" in state.message and "exitplan keys import" in state.message
    assert etags(s3, container) == before and copies(s3, container) == held
