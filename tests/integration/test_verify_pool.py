"""Verify's pool on the lab servers: a check that raises (the state store or the audit trail failed)
is the command's error, raised at once, with every other such error kept on it."""

from __future__ import annotations

import threading

import pytest

import engine.verify as verify_module
from config.loader import load_config
from flows.cli import main
from tests.projects import project_name, write_project
from tests.s3client import lab_s3_client

pytestmark = pytest.mark.integration

CS_VAR = "EXITPLAN_TEST_AZURE_CS"
BUCKET = "exitplan-verify-pool"


def test_errors_of_two_checks_are_both_kept_and_verify_stops_submitting(tmp_path, monkeypatch,
                                                                         azurite_connection_string, s3_server):
    monkeypatch.setenv(CS_VAR, azurite_connection_string)
    lab_s3_client(s3_server.url, BUCKET)  # creates the bucket
    cfg, _, blobs = write_project(tmp_path, azurite_connection_string, s3_server.url,
                                  project=project_name(tmp_path, "vpool"), bucket=BUCKET,
                                  cs_var=CS_VAR, extra_blobs={f"more/{i:02d}.txt": b"more\n" * i for i in range(40)})
    assert main(["migrate", "--config", str(cfg)]) == 0
    real = verify_module._record_state
    both_failing = threading.Barrier(2, timeout=20)  # neither fails before the other was submitted
    failing = ("claims/00.csv", "claims/01.csv")  # the first two rows checked
    recorded: list[str] = []

    def record_state(store, row, result):
        if row.source_key in failing:
            both_failing.wait()
            raise RuntimeError(f"the state store refused the row of {row.source_key}")
        recorded.append(row.source_key)
        return real(store, row, result)

    monkeypatch.setattr(verify_module, "_record_state", record_state)
    with pytest.raises(RuntimeError, match="the state store refused the row of claims/0[01].csv") as raised:
        verify_module.verify(load_config(cfg), ["claims"])
    other = failing[1] if str(raised.value).endswith(failing[0]) else failing[0]
    assert any(f"the state store refused the row of {other}" in note for note in raised.value.__notes__)
    # Nothing was submitted once the error was seen: at most the checks in flight then
    # (2 x transfer.concurrency = 8) went on, not the whole dataset.
    assert len(blobs) == 51 and len(recorded) <= 8
