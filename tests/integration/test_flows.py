"""The Prefect flows on the lab servers, under Prefect's test harness: exit_plan end to end, what
the UI is shown (artifacts), a failing object failing only its shard, and user errors as failed runs."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
import yaml
from azure.storage.blob import BlobServiceClient

from flows.cli import main
from tests.s3client import lab_s3_client

pytestmark = pytest.mark.integration

CS_VAR = "EXITPLAN_TEST_FLOWS_AZURE_CS"
BUCKET = "exitplan-flows"


@pytest.fixture(scope="module")
def s3(s3_server):
    return lab_s3_client(s3_server.url, BUCKET)


@pytest.fixture
def project(tmp_path, monkeypatch, azurite_connection_string, s3_server, s3, prefect_harness):
    """A fresh container of 11 blobs (one multipart-sized) and a config cutting it into shards of 4."""
    monkeypatch.setenv(CS_VAR, azurite_connection_string)
    container = f"flows{uuid.uuid4().hex[:10]}"
    cc = BlobServiceClient.from_connection_string(azurite_connection_string).create_container(container)
    blobs = {f"claims/{i:02d}.csv": f"claim {i}\n".encode() * (100 + i) for i in range(10)}
    blobs["scans/big.bin"] = os.urandom(6 * 1024 * 1024 + 5)
    for name, data in blobs.items():
        cc.upload_blob(name, data)
    cfg = {
        "version": 1,
        "project": "flows",
        "sources": {"az": {"kind": "azure_blob", "connection_string_env": CS_VAR}},
        "destinations": {"lab": {"provider": "lab", "endpoint_url": s3_server.url, "region": "eu-west-3",
                                 "bucket": BUCKET}},
        "datasets": {"claims": {"source": "az", "container": container, "destination": "lab",
                                "dest_prefix": f"{container}/"}},
        "transfer": {"concurrency": 4, "part_size": "5MiB", "small_object_cutoff": "1MiB"},
        "orchestration": {"shard_objects": 4, "parallel_shards": 2, "shard_retries": 0},
        "state": {"path": str(tmp_path / "state")},
        "keys": {"kek": {"backend": "local", "path": str(tmp_path / "kek.json")}},
    }
    path = tmp_path / "exitplan.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    assert main(["keys", "init", "--config", str(path)]) == 0
    return path, container, blobs


def test_exit_plan(project, s3):
    from flows.orchestrate import exit_plan

    path, container, blobs = project
    result = exit_plan(config_path=str(path))
    print(result)
    assert result["copied"] == len(blobs)
