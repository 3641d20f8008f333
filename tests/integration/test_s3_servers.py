"""The whole exit on each S3 implementation: seed Azurite → `exitplan migrate`, killed mid-object →
`migrate` again (the upload continued) → `verify --deep` → `restore`, byte for byte.

It runs on moto and on ministack (a second, independent S3 server), each behind the counting fault
proxy, which holds every part of the first run for a moment so it can be killed with an upload half
sent.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml
from azure.storage.blob import BlobServiceClient

from engine.restore import SIDECAR
from flows.cli import main
from tests.faultproxy import FaultProxy, QuirkProxy
from tests.projects import project_name
from tests.s3client import lab_s3_client

pytestmark = pytest.mark.integration

CS_VAR = "EXITPLAN_TEST_AZURE_CS"
MiB = 1024 * 1024
PART_DELAY = 0.4  # seconds the proxy holds each part of the first run, so it can be killed mid-object
SERVERS = {"moto": "s3_server", "ministack": "ministack_server"}


@pytest.fixture(params=sorted(SERVERS))
def s3_endpoint(request):
    """Each S3 server of the session in turn."""
    return request.getfixturevalue(SERVERS[request.param])


@dataclass
class Exit:
    """A project of the test's own: a fresh container of blobs, a fresh bucket behind `proxy`."""

    config: Path
    container: str
    bucket: str
    blobs: dict[str, bytes]
    db: Path

    @classmethod
    def create(cls, tmp_path: Path, azurite_cs: str, proxy: FaultProxy, *, provider_overrides: dict | None = None
               ) -> "Exit":
        container = f"srv{uuid.uuid4().hex[:10]}"
        bucket = f"exit-{uuid.uuid4().hex[:10]}"
        rng = random.Random(container)
        blobs = {"big.bin": rng.randbytes(12 * MiB + 123), "other-big.bin": rng.randbytes(6 * MiB)}
        blobs.update({f"small/{i}.txt": rng.randbytes(rng.randrange(1, 100_000)) for i in range(4)})
        cc = BlobServiceClient.from_connection_string(azurite_cs).create_container(container)
        for name, data in blobs.items():
            cc.upload_blob(name, data)
        lab_s3_client(f"http://{proxy.upstream[0]}:{proxy.upstream[1]}", bucket)
        destination = {"provider": "lab", "endpoint_url": proxy.url, "region": "eu-west-3", "bucket": bucket}
        if provider_overrides:
            destination["provider_overrides"] = provider_overrides
        cfg = {
            "version": 1,
            "project": project_name(tmp_path, "srv"),
            "sources": {"az": {"kind": "azure_blob", "connection_string_env": CS_VAR}},
            "destinations": {"dest": destination},
            "datasets": {"files": {"source": "az", "container": container, "destination": "dest",
                                   "dest_prefix": f"{container}/"}},
            "transfer": {"concurrency": 2, "object_concurrency": 2, "part_size": "5MiB",
                         "small_object_cutoff": "1MiB", "part_attempts": 2},
            "state": {"path": str(tmp_path / "state")},
            "keys": {"kek": {"backend": "local", "path": str(tmp_path / "kek.key")}},
        }
        config = tmp_path / "exitplan.yaml"
        config.write_text(yaml.safe_dump(cfg), encoding="utf-8")
        assert main(["keys", "init", "--config", str(config)]) == 0
        return cls(config, container, bucket, blobs, tmp_path / "state" / "state.db")

    def run(self, capsys, *argv: str) -> tuple[int, str, str]:
        code = main([*argv, "--config", str(self.config)])
        # (stderr may hold the proxy's own report of a connection the killed run left half-open)
        out, err = capsys.readouterr()
        return code, out, err

    def kill_migrate_mid_object(self, key: str) -> str:
        """Start `migrate` in a process of its own and SIGKILL it once a part of `key`'s upload is
        recorded; the upload id it left."""
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "migrate", "--config", str(self.config)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(os.environ))
        deadline = time.monotonic() + 90
        upload_id = None
        while upload_id is None:
            assert time.monotonic() < deadline, "no part of the upload was recorded in time"
            assert proc.poll() is None, f"the migration ended before it could be killed: {proc.stderr.read().decode()}"
            upload_id = self._upload_with_a_part(key)
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
        return upload_id

    def _upload_with_a_part(self, key: str) -> str | None:
        if not self.db.exists():
            return None
        try:
            con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=1)
            try:
                row = con.execute("SELECT o.upload_id FROM parts p JOIN objects o ON o.id = p.object_id "
                                  "WHERE o.source_key = ? LIMIT 1", (key,)).fetchone()
            finally:
                con.close()
        except sqlite3.Error:
            return None
        return row[0] if row else None

    def runs_of_upload(self, upload_id: str) -> int:
        con = sqlite3.connect(self.db)
        try:
            return con.execute("SELECT count(DISTINCT run_id) FROM objects WHERE upload_id = ?", (upload_id,)).fetchone()[0]
        finally:
            con.close()

    def restored(self, capsys, directory: Path) -> dict[str, bytes]:
        code, out, err = self.run(capsys, "restore", "--dataset", "files", "--to", str(directory))
        assert code == 0, out + err
        files = {str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()}
        # Each restored object's other properties (content headers, source times…) are in the sidecar.
        sidecar = files.pop(SIDECAR)
        assert {json.loads(line)["path"] for line in sidecar.splitlines()} == set(files)
        return files


def parts_sent(proxy: FaultProxy, upload_id: str) -> Counter:
    """Part number -> how many times a part of `upload_id` was received by the proxy."""
    sent: Counter = Counter()
    for method, target in proxy.received:
        query = parse_qs(urlsplit(target).query)
        if method == "PUT" and query.get("uploadId") == [upload_id] and "partNumber" in query:
            sent[int(query["partNumber"][0])] += 1
    return sent


def test_migrate_killed_then_resumed_verifies_deep_and_restores(s3_endpoint, tmp_path, capsys, monkeypatch,
                                                                azurite_connection_string):
    monkeypatch.setenv(CS_VAR, azurite_connection_string)
    with FaultProxy("127.0.0.1", s3_endpoint.port) as proxy:
        proxy.delay_next(PART_DELAY, method="PUT", pattern=r"partNumber=", times=10**6)
        exit_ = Exit.create(tmp_path, azurite_connection_string, proxy)
        upload_id = exit_.kill_migrate_mid_object("big.bin")
        time.sleep(PART_DELAY + 0.1)  # let the proxy forward what it held
        proxy.clear()

        code, out, err = exit_.run(capsys, "migrate")
        assert code == 0, out + err
        # Continued, not restarted: the same upload across both runs, no part sent twice but
        # those in flight at the kill (at most the two of the part concurrency).
        assert exit_.runs_of_upload(upload_id) == 2
        sent = parts_sent(proxy, upload_id)
        assert set(sent) == {1, 2, 3} and sum(sent.values()) <= 3 + 2, sent

        code, out, err = exit_.run(capsys, "verify", "--deep")
        assert code == 0, out + err
        assert exit_.restored(capsys, tmp_path / "restored") == exit_.blobs
        assert not lab_s3_client(proxy.url).list_multipart_uploads(Bucket=exit_.bucket).get("Uploads")


# ---- a provider that differs from AWS: the quirk proxy in front of moto ------------------------

QUIRKY = {"multipart": {"etag": "opaque", "list_parts": False, "abort": False, "list_uploads": False}}


def etag_checks(db: Path) -> set:
    con = sqlite3.connect(db)
    try:
        return {c for (c,) in con.execute("SELECT etag_checked FROM objects WHERE state IN ('uploaded', 'verified')")}
    finally:
        con.close()


def test_a_quirky_provider_under_its_profile_migrates_resumes_verifies_and_cleans_up(
        s3_server, tmp_path, capsys, monkeypatch, azurite_connection_string):
    monkeypatch.setenv(CS_VAR, azurite_connection_string)
    with QuirkProxy("127.0.0.1", s3_server.port) as proxy:
        proxy.delay_next(PART_DELAY, method="PUT", pattern=r"partNumber=", times=10**6)
        exit_ = Exit.create(tmp_path, azurite_connection_string, proxy, provider_overrides=QUIRKY)
        left = exit_.kill_migrate_mid_object("big.bin")
        time.sleep(PART_DELAY + 0.1)
        proxy.clear()

        code, out, err = exit_.run(capsys, "migrate")
        assert code == 0, out + err
        # Started over (its parts cannot be listed), the old upload left open (it cannot be aborted).
        assert exit_.runs_of_upload(left) == 1
        # big.bin, and other-big.bin when the kill found it in flight too
        assert re.search(r"\b[12] objects? (was|were) started over: .*list_parts: false", out), out
        assert "ETags are opaque at the destination of files" in out
        assert etag_checks(exit_.db) == {0}
        manifest = [json.loads(line) for line in (exit_.db.parent / "audit" / "manifest.jsonl").read_text().splitlines()
                    if line.strip()]
        transfers = [r for r in manifest if r.get("type") == "transfer"]
        assert transfers and all(r["destination"]["etag_checked"] is False for r in transfers)
        # Nothing the profile says the provider does not answer was asked.
        assert not proxy.refused

        code, out, err = exit_.run(capsys, "verify")
        assert code == 0, out + err
        assert "ETags are opaque at this destination" in out and "only `exitplan verify --deep` proves" in out
        # An opaque ETag may differ between the completion's answer and the listing (it proves
        # nothing about the bytes either way): not a discrepancy there.
        con = sqlite3.connect(exit_.db)
        with con:
            con.execute("UPDATE objects SET dest_etag = 'another-opaque-value' WHERE source_key = 'big.bin' "
                        "AND state IN ('uploaded', 'verified')")
        con.close()
        code, out, err = exit_.run(capsys, "verify")
        assert code == 0, out + err
        code, out, err = exit_.run(capsys, "verify", "--deep")
        assert code == 0, out + err
        assert exit_.restored(capsys, tmp_path / "restored") == exit_.blobs

        code, out, err = exit_.run(capsys, "cleanup", "--abort")
        assert code == 0, out + err
        assert "does not list multipart uploads" in out and left in out and "cannot be aborted" in out
        assert not proxy.refused
        # Honest: the uploads are still there behind the provider (they could not be aborted), and
        # cleanup named each of them.
        uploads = lab_s3_client(s3_server.url).list_multipart_uploads(Bucket=exit_.bucket).get("Uploads", [])
        assert left in {u["UploadId"] for u in uploads} and all(u["UploadId"] in out for u in uploads)


def test_a_quirky_provider_under_the_default_profile_fails_loudly_naming_the_setting(
        s3_server, tmp_path, capsys, monkeypatch, azurite_connection_string):
    monkeypatch.setenv(CS_VAR, azurite_connection_string)
    with QuirkProxy("127.0.0.1", s3_server.port) as proxy:
        proxy.delay_next(PART_DELAY, method="PUT", pattern=r"partNumber=", times=10**6)
        exit_ = Exit.create(tmp_path, azurite_connection_string, proxy)
        exit_.kill_migrate_mid_object("big.bin")
        time.sleep(PART_DELAY + 0.1)
        proxy.clear()
        # An object no killed run left an upload for: its completion meets the opaque ETag.
        BlobServiceClient.from_connection_string(azurite_connection_string).get_container_client(
            exit_.container).upload_blob("late-big.bin", os.urandom(6 * MiB))

        code, out, err = exit_.run(capsys, "migrate")
        assert code == 1, out + err
        said = out + err
        assert "provider_overrides: {multipart: {list_parts: false}}" in said  # big.bin could not be resumed
        assert "provider_overrides: {multipart: {etag: opaque}}" in said  # late-big.bin: ETag not md5-of-md5s
        assert proxy.refused["ListParts"] >= 1

        code, out, err = exit_.run(capsys, "cleanup")
        assert code == 1, out + err
        assert "provider_overrides: {multipart: {list_uploads: false}}" in out + err
