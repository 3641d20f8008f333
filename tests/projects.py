"""A small exitplan project on the lab servers, for the flow and deployment tests: a fresh Azurite
container of ten CSV blobs and one multipart-sized blob, a config with a local KEK that cuts it into
shards of four, and its keyset."""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

import yaml
from azure.storage.blob import BlobServiceClient

from flows.cli import main


def project_name(tmp_path: Path, prefix: str) -> str:
    """A project name of the test's own, the same for every config it writes in `tmp_path`: the S3
    server and its buckets are shared by the session, and a project's keyset copies in a bucket
    hold its one keyset, so two tests are two projects."""
    return f"{prefix}-{hashlib.sha256(str(tmp_path).encode()).hexdigest()[:10]}"


def write_project(tmp_path: Path, cs: str, s3_url: str, *, project: str, bucket: str, cs_var: str,
                  orchestration: dict | None = None, transfer: dict | None = None,
                  extra_blobs: dict[str, bytes] | None = None, state: dict | None = None,
                  alerts: dict | None = None) -> tuple[Path, str, dict[str, bytes]]:
    """(config path, container, {key: bytes}); the config reads the connection string from `cs_var`.

    The project is named after its container (`project` and a unique suffix): the S3 server and
    its buckets are shared by the session, and a project's keyset copies in a bucket hold its
    one keyset, so two tests are two projects."""
    container = f"{project}{uuid.uuid4().hex[:10]}"
    cc = BlobServiceClient.from_connection_string(cs).create_container(container)
    blobs = {f"claims/{i:02d}.csv": f"claim {i}\n".encode() * (100 + i) for i in range(10)}
    blobs["scans/big.bin"] = os.urandom(6 * 1024 * 1024 + 5)
    blobs.update(extra_blobs or {})
    for name, data in blobs.items():
        cc.upload_blob(name, data)
    cfg = {
        "version": 1,
        "project": container,
        "sources": {"az": {"kind": "azure_blob", "connection_string_env": cs_var}},
        "destinations": {"lab": {"provider": "lab", "endpoint_url": s3_url, "region": "eu-west-3", "bucket": bucket}},
        "datasets": {"claims": {"source": "az", "container": container, "destination": "lab",
                                "dest_prefix": f"{container}/"}},
        "transfer": {"concurrency": 4, "part_size": "5MiB", "small_object_cutoff": "1MiB", **(transfer or {})},
        # One listing range: these tests count and name the shards of one listing in key order
        # (a dataset listed in ranges: tests/integration/test_listing_resume.py, tests/unit/test_listing_ranges.py).
        "orchestration": {"shard_objects": 4, "parallel_shards": 2, "shard_retries": 0, "listing_ranges": 1,
                          **(orchestration or {})},
        "state": {"path": str(tmp_path / "state"), **(state or {})},
        "keys": {"kek": {"backend": "local", "path": str(tmp_path / "kek.json")}},
        **({"alerts": alerts} if alerts else {}),
    }
    path = tmp_path / "exitplan.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    assert main(["keys", "init", "--config", str(path)]) == 0
    return path, container, blobs
