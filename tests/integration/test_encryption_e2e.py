"""Encryption end to end on the lab servers: restore, key rotation, KEK rewrap, wrong KEK, tampering.

`exitplan restore` must give back exactly the source bytes; after `keys rotate` objects written
under the old and the new primary key both restore; after `keys rewrap` everything still restores;
a wrong or unreachable KEK is exit code 4 before any object is touched.
"""

from __future__ import annotations

import json
import os
import sqlite3
import uuid
from pathlib import Path

import pytest
import yaml
from azure.storage.blob import BlobServiceClient

from config.errors import ExitCode
from flows.cli import main
from tests.s3client import lab_s3_client

pytestmark = pytest.mark.integration

CS_VAR = "EXITPLAN_TEST_AZURE_CS"
BUCKET = "exitplan-enc"


@pytest.fixture(scope="module")
def s3(s3_server):
    return lab_s3_client(s3_server.url, BUCKET)


@pytest.fixture
def project(tmp_path, monkeypatch, azurite_connection_string, s3_server, s3):
    """A fresh container with a few blobs (one multipart-sized) and a config with a local KEK."""
    monkeypatch.setenv(CS_VAR, azurite_connection_string)
    container = f"enc{uuid.uuid4().hex[:10]}"
    azure = BlobServiceClient.from_connection_string(azurite_connection_string)
    cc = azure.create_container(container)
    blobs = {
        "empty.bin": b"",
        "notes/è ü 日本.txt": "données de santé\n".encode() * 100,
        "scans/big.bin": os.urandom(6 * 1024 * 1024 + 123),
    }
    for name, data in blobs.items():
        cc.upload_blob(name, data)

    def config(kek_path: Path, name: str = "exitplan.yaml", public: bool = False) -> Path:
        cfg = {
            "version": 1,
            # A project of its own: the bucket is shared by the module, and a project's keyset
            # copies in it belong to that project's keyset alone.
            "project": container,
            "sources": {"az": {"kind": "azure_blob", "connection_string_env": CS_VAR}},
            "destinations": {"lab": {"provider": "lab", "endpoint_url": s3_server.url, "region": "eu-west-3", "bucket": BUCKET}},
            "datasets": {"scans": {"source": "az", "container": container, "destination": "lab",
                                   "dest_prefix": f"{container}/", "public": public}},
            "transfer": {"concurrency": 4, "part_size": "5MiB", "small_object_cutoff": "1MiB"},
            "state": {"path": str(tmp_path / "state")},
            "keys": {"kek": {"backend": "local", "path": str(kek_path)}},
        }
        path = tmp_path / name
        path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
        return path

    return container, cc, blobs, config


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def restored_files(root: Path) -> dict[str, bytes]:
    """The objects restored below `root`: every file but restore's list of their properties
    (`SIDECAR`), which must be there, one JSON line per restored object that is a file or more."""
    from engine.restore import SIDECAR

    files = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    lines = files.pop(SIDECAR).decode().splitlines()
    assert {json.loads(line)["path"] for line in lines} >= set(files)
    return files


def key_ids(s3, container: str) -> dict[str, str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{container}/")
    keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
    return {k[len(container) + 1:]: s3.head_object(Bucket=BUCKET, Key=k)["Metadata"]["exitplan-key-id"] for k in keys}


def test_restore_rotate_rewrap(tmp_path, capsys, project, s3):
    container, cc, blobs, config = project
    cfg = config(tmp_path / "kek-1.key")
    assert cli(capsys, "keys", "init", "--config", cfg)[0] == 0
    code, out, err = cli(capsys, "migrate", "--config", cfg)
    assert code == 0, err

    code, out, err = cli(capsys, "restore", "--config", cfg, "--dataset", "scans", "--to", tmp_path / "r1")
    assert code == 0, err
    assert restored_files(tmp_path / "r1") == blobs
    assert f"{len(blobs)} matched the SHA-256 recorded" in out
    first_ids = set(key_ids(s3, container).values())
    assert len(first_ids) == 1

    # Rotate: the changed blob is written under the new primary; the others keep the old key.
    assert cli(capsys, "keys", "rotate", "--config", cfg)[0] == 0
    blobs["notes/è ü 日本.txt"] = b"version 2\n" * 1000
    cc.upload_blob("notes/è ü 日本.txt", blobs["notes/è ü 日本.txt"], overwrite=True)
    code, out, err = cli(capsys, "migrate", "--config", cfg)
    assert code == 0, err
    ids = key_ids(s3, container)
    assert ids["scans/big.bin"] in first_ids and ids["notes/è ü 日本.txt"] not in first_ids
    code, out, err = cli(capsys, "restore", "--config", cfg, "--dataset", "scans", "--to", tmp_path / "r2")
    assert code == 0, err
    assert restored_files(tmp_path / "r2") == blobs

    # Rewrap under another KEK: no object touched, everything still restores.
    etags = {o["Key"]: o["ETag"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{container}/")["Contents"]}
    new_cfg = config(tmp_path / "kek-2.key", name="exitplan-new.yaml")
    (tmp_path / "kek-2.key").write_bytes(os.urandom(32))
    os.chmod(tmp_path / "kek-2.key", 0o600)
    code, out, err = cli(capsys, "keys", "rewrap", "--config", new_cfg, "--old-config", cfg)
    assert code == 0, err
    (tmp_path / "kek-1.key").unlink()  # the old KEK is gone for good
    assert {o["Key"]: o["ETag"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{container}/")["Contents"]} == etags
    code, out, err = cli(capsys, "restore", "--config", new_cfg, "--dataset", "scans", "--to", tmp_path / "r3")
    assert code == 0, err
    assert restored_files(tmp_path / "r3") == blobs


def test_wrong_or_missing_kek_is_exit_4_before_any_object_is_touched(tmp_path, capsys, project, s3):
    container, cc, blobs, config = project
    cfg = config(tmp_path / "kek.key")
    assert cli(capsys, "keys", "init", "--config", cfg)[0] == 0
    (tmp_path / "kek.key").write_bytes(os.urandom(32))  # a different key under the same name
    for argv in (("migrate", "--config", cfg), ("migrate", "--config", cfg, "--dry-run"),
                 ("restore", "--config", cfg, "--dataset", "scans", "--to", tmp_path / "r")):
        code, out, err = cli(capsys, *argv)
        assert code == ExitCode.KEY_ERROR, (argv, err)
        assert "kek.key" in err or "key-encryption key" in err.lower() or "KEK" in err
    (tmp_path / "kek.key").unlink()
    code, out, err = cli(capsys, "migrate", "--config", cfg)
    assert code == ExitCode.KEY_ERROR, err
    assert s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{container}/").get("KeyCount", 0) == 0
    assert not (tmp_path / "r").exists()
    state = tmp_path / "state" / "state.db"
    assert not state.exists() or sqlite3.connect(state).execute("SELECT count(*) FROM runs").fetchone() == (0,)


def test_a_tampered_object_fails_restore_by_name_and_leaves_no_partial_file(tmp_path, capsys, project, s3):
    container, cc, blobs, config = project
    cfg = config(tmp_path / "kek.key")
    assert cli(capsys, "keys", "init", "--config", cfg)[0] == 0
    assert cli(capsys, "migrate", "--config", cfg)[0] == 0
    key = f"{container}/scans/big.bin"
    got = s3.get_object(Bucket=BUCKET, Key=key)
    data = bytearray(got["Body"].read())
    data[3 * 1024 * 1024] ^= 0x01  # one bit, in the middle of segment 3
    s3.put_object(Bucket=BUCKET, Key=key, Body=bytes(data), Metadata=got["Metadata"])
    # Another object's ciphertext moved into this one's place is refused too (associated data).
    other = s3.get_object(Bucket=BUCKET, Key=f"{container}/empty.bin")
    s3.put_object(Bucket=BUCKET, Key=f"{container}/notes/moved.bin", Body=other["Body"].read(), Metadata=other["Metadata"])

    code, out, err = cli(capsys, "restore", "--config", cfg, "--dataset", "scans", "--to", tmp_path / "r")
    assert code == ExitCode.FAILED
    assert "scans/big.bin" in err and "authenticate" in err
    assert "notes/moved.bin" in err and "encrypted for" in err
    files = restored_files(tmp_path / "r")
    assert files == {"empty.bin": b"", "notes/è ü 日本.txt": blobs["notes/è ü 日本.txt"]}
    assert not list((tmp_path / "r").rglob("*.exitplan-partial"))


def test_a_public_dataset_is_written_as_is(tmp_path, capsys, project, s3):
    container, cc, blobs, config = project
    cfg = config(tmp_path / "kek.key", public=True)
    code, out, err = cli(capsys, "migrate", "--config", cfg)
    assert code == 0, err
    assert "not encrypted (dataset marked public)" in out
    assert s3.get_object(Bucket=BUCKET, Key=f"{container}/scans/big.bin")["Body"].read() == blobs["scans/big.bin"]
    code, out, err = cli(capsys, "restore", "--config", cfg, "--dataset", "scans", "--to", tmp_path / "r")
    assert code == 0, err
    assert restored_files(tmp_path / "r") == blobs


def test_objects_deleted_at_the_source_are_reported_and_removed_only_on_request(tmp_path, capsys, project, s3):
    container, cc, blobs, config = project
    cfg = config(tmp_path / "kek.key")
    assert cli(capsys, "keys", "init", "--config", cfg)[0] == 0
    assert cli(capsys, "migrate", "--config", cfg)[0] == 0
    cc.delete_blob("scans/big.bin")
    dest = f"{container}/scans/big.bin"

    code, out, err = cli(capsys, "migrate", "--config", cfg)
    assert code == 0, err
    assert "1 object(s) gone from the source" in out and "scans/big.bin" in out and "kept" in out
    assert s3.head_object(Bucket=BUCKET, Key=dest)["ContentLength"] > 0  # never deleted unasked

    code, out, err = cli(capsys, "migrate", "--config", cfg, "--delete-removed")
    assert code == 0, err
    assert "1 destination copies deleted" in out
    assert s3.list_objects_v2(Bucket=BUCKET, Prefix=dest).get("KeyCount", 0) == 0
    # Verify knows the copy was removed on purpose; the next run has nothing left to report.
    code, out, err = cli(capsys, "verify", "--config", cfg)
    assert code == 0, err + out
    code, out, err = cli(capsys, "migrate", "--config", cfg)
    assert code == 0 and "gone from the source" not in out
    # The deletion is in the audit manifest, once, and the chain still checks.
    manifest = tmp_path / "state" / "audit" / "manifest.jsonl"
    records = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines()]
    (removal,) = [r for r in records if r["type"] == "removal"]
    assert (removal["dataset"], removal["source"]["key"], removal["destination"]["key"]) == ("scans", "scans/big.bin", dest)
    assert removal["source"]["etag"] == next(r["source"]["etag"] for r in records
                                             if r["type"] == "transfer" and r["source"]["key"] == "scans/big.bin")
    code, out, err = cli(capsys, "keys", "show", "--config", cfg, "--audit-public-key")
    pem = tmp_path / "audit.pem"
    pem.write_text(out)
    code, out, err = cli(capsys, "audit", "verify", manifest, "--public-key", pem)
    assert code == 0, out + err
