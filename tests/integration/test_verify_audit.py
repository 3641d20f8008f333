"""Verify and the audit manifest end to end on the lab servers (Azurite → the S3 server).

A small encrypted dataset is migrated; quick verify is clean and moves every row to verified;
then destination objects are damaged through boto3 (a byte overwritten with the metadata and size
kept, an object deleted, one truncated) and verify names exactly those objects; a re-run of
migrate repairs them. The manifest's chain and signatures check, locally and in the copy next to
the data; a seeded sample is the same twice.
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

from engine.verify import in_sample
from flows.cli import main
from tests.s3client import lab_s3_client

pytestmark = pytest.mark.integration

CS_VAR = "EXITPLAN_TEST_AZURE_CS"
BUCKET = "exitplan-verify"


@pytest.fixture(scope="module")
def s3(s3_server):
    return lab_s3_client(s3_server.url, BUCKET)


@pytest.fixture
def project(tmp_path, monkeypatch, azurite_connection_string, s3_server, s3):
    """A fresh container, a config with a local KEK, `keys init` done. Returns (config, container, blobs, cc)."""
    monkeypatch.setenv(CS_VAR, azurite_connection_string)
    container = f"ver{uuid.uuid4().hex[:10]}"
    cc = BlobServiceClient.from_connection_string(azurite_connection_string).create_container(container)

    def make(blobs: dict[str, bytes]) -> Path:
        for name, data in blobs.items():
            cc.upload_blob(name, data)
        cfg = {
            "version": 1,
            "project": container,  # a project of its own: the bucket is shared by the module
            "sources": {"az": {"kind": "azure_blob", "connection_string_env": CS_VAR}},
            "destinations": {"lab": {"provider": "lab", "endpoint_url": s3_server.url, "region": "eu-west-3",
                                     "bucket": BUCKET}},
            "datasets": {"scans": {"source": "az", "container": container, "destination": "lab",
                                   "dest_prefix": f"{container}/"}},
            "transfer": {"concurrency": 4, "part_size": "5MiB", "small_object_cutoff": "1MiB"},
            "state": {"path": str(tmp_path / "state")},
            "keys": {"kek": {"backend": "local", "path": str(tmp_path / "kek.key")}},
        }
        path = tmp_path / "exitplan.yaml"
        path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
        assert main(["keys", "init", "--config", str(path)]) == 0
        return path

    return make, container


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def states(tmp_path: Path) -> dict[str, str]:
    """source key -> state of its newest row."""
    with sqlite3.connect(tmp_path / "state" / "state.db") as db:
        rows = db.execute("SELECT source_key, state FROM objects ORDER BY id").fetchall()
    return dict(rows)


def named(err: str, container: str) -> set[str]:
    """Destination keys (below the container prefix) named in verify's discrepancy lines."""
    keys = set()
    for line in err.splitlines():
        line = line.strip()
        if line.startswith(f"scans: {container}/"):
            keys.add(line.split(" (source ")[0][len(f"scans: {container}/"):])
    return keys


def manifest_records(tmp_path: Path) -> list[dict]:
    lines = (tmp_path / "state" / "audit" / "manifest.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def rewrite(s3, key: str, change) -> None:
    """Overwrite `key` with `change(body)`, keeping its metadata and content type."""
    obj = s3.get_object(Bucket=BUCKET, Key=key)
    body = obj["Body"].read()
    s3.put_object(Bucket=BUCKET, Key=key, Body=change(body), Metadata=obj["Metadata"],
                  ContentType=obj.get("ContentType") or "application/octet-stream")


def test_quick_and_deep_verify_name_exactly_the_damaged_objects(tmp_path, capsys, project, s3):
    make, container = project
    blobs = {f"notes/n{i}.txt": f"note {i}\n".encode() * (200 + i) for i in range(5)}
    blobs["scans/big.bin"] = os.urandom(6 * 1024 * 1024 + 123)  # multipart at 5 MiB parts
    blobs["empty.bin"] = b""
    cfg = make(blobs)
    code, out, err = cli(capsys, "migrate", "--config", cfg)
    assert code == 0, err
    assert "audit manifest:" in out and "signed" in out

    # Quick verify: clean, and every row moves to verified.
    code, out, err = cli(capsys, "verify", "--config", cfg)
    assert code == 0, err
    assert set(states(tmp_path).values()) == {"verified"}
    assert f"{len(blobs)}" in out

    # One byte overwritten in the middle, metadata and size kept.
    victim = "notes/n2.txt"
    before = s3.head_object(Bucket=BUCKET, Key=f"{container}/{victim}")
    rewrite(s3, f"{container}/{victim}", lambda b: b[:100] + bytes([b[100] ^ 0x01]) + b[101:])
    after = s3.head_object(Bucket=BUCKET, Key=f"{container}/{victim}")
    assert (after["ContentLength"], after["Metadata"]) == (before["ContentLength"], before["Metadata"])
    # S3's ETag is the MD5 of the bytes, so quick verify sees it too: by its ETag.
    code, out, err = cli(capsys, "verify", "--config", cfg)
    assert code == 1
    assert named(err, container) == {victim}
    assert "etag: expected" in err
    assert states(tmp_path)[victim] == "failed"
    # Deep reads it back: it no longer decrypts, and it is the only one named.
    code, out, err = cli(capsys, "verify", "--config", cfg, "--deep")
    assert code == 1
    assert named(err, container) == {victim}
    assert "decrypt: expected an object that decrypts and authenticates" in err and "etag: expected" in err

    # Deleted and truncated: quick names them (missing; size), and only them.
    s3.delete_object(Bucket=BUCKET, Key=f"{container}/notes/n0.txt")
    rewrite(s3, f"{container}/scans/big.bin", lambda b: b[:-1000])
    code, out, err = cli(capsys, "verify", "--config", cfg)
    assert code == 1
    assert named(err, container) == {victim, "notes/n0.txt", "scans/big.bin"}
    assert f"{container}/notes/n0.txt (source 'notes/n0.txt'): missing: expected" in err
    assert f"{container}/scans/big.bin (source 'scans/big.bin'): size: expected {6 * 1024 * 1024 + 123 + 40 + 7 * 16:,} bytes" in err

    # migrate copies what verify found wrong again; then everything verifies, deep too.
    code, out, err = cli(capsys, "migrate", "--config", cfg)
    assert code == 0, err
    code, out, err = cli(capsys, "verify", "--config", cfg, "--deep")
    assert code == 0, err
    assert "read back" in out

    # The manifest: one transfer per copy (7, then the 3 repaired), one verify record per object
    # checked, every run signed; `audit verify` agrees, and the copy next to the data is the same file.
    records = manifest_records(tmp_path)
    transfers = [r for r in records if r["type"] == "transfer"]
    assert sorted(r["source"]["key"] for r in transfers) == sorted(list(blobs) + [victim, "notes/n0.txt", "scans/big.bin"])
    big = next(r for r in transfers if r["source"]["key"] == "scans/big.bin")
    assert big["source"]["size"] == len(blobs["scans/big.bin"]) and big["source"]["container"] == container
    assert big["destination"]["jurisdiction"] and big["destination"]["bucket"] == BUCKET
    assert big["encryption"]["key_id"] > 0 and len(big["plaintext_sha256"]) == 64
    assert sum(r["type"] == "verify" for r in records) == 5 * len(blobs)
    assert sum(r["type"] == "run_end" for r in records) == 7 and records[-1]["type"] == "run_end"
    pem = tmp_path / "audit.pem"
    code, out, err = cli(capsys, "keys", "show", "--config", cfg, "--audit-public-key")
    pem.write_text(out)
    manifest = tmp_path / "state" / "audit" / "manifest.jsonl"
    code, out, err = cli(capsys, "audit", "verify", manifest, "--public-key", pem)
    assert code == 0, err
    assert "OK" in out
    copy = s3.get_object(Bucket=BUCKET, Key=f"_exitplan/{container}/manifest.jsonl")["Body"].read()
    assert copy == manifest.read_bytes()


def test_a_seeded_sample_is_the_same_twice(tmp_path, capsys, project):
    make, container = project
    blobs = {f"f{i:02d}.bin": os.urandom(100 + i) for i in range(24)}
    cfg = make(blobs)
    assert cli(capsys, "migrate", "--config", cfg)[0] == 0

    def sampled_run(*extra) -> set[str]:
        before = len(manifest_records(tmp_path))
        code, out, err = cli(capsys, "verify", "--config", cfg, *extra)
        assert code == 0, err
        return {r["source_key"] for r in manifest_records(tmp_path)[before:]
                if r["type"] == "verify" and "plaintext_sha256" in r["checks"]}

    first = sampled_run("--sample", "0.5", "--seed", "1")
    assert first == sampled_run("--sample", "0.5", "--seed", "1")
    assert first == {k for k in blobs if in_sample(1, "scans", k, 0.5)}
    assert 0 < len(first) < len(blobs)
    assert sampled_run("--sample", "0.5", "--seed", "2") != first
    assert len(sampled_run("--deep")) == len(blobs)
