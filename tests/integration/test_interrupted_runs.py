"""Finding 4 of issue 10 on the lab servers: runs killed with SIGKILL are visible to the auditor.

Seven `exitplan migrate` processes are killed part-way (one of them mid-way through a manifest
line), then one completes: `audit verify` passes, lists the seven runs without a run_end, each
recorded as interrupted by the completing run, and the torn line's repair; the state store says
`interrupted` for the seven.
"""

from __future__ import annotations

import random

import pytest

from tests.faults.support import KillableProject

pytestmark = pytest.mark.integration

BUCKET = "exitplan-interrupted"


@pytest.fixture
def project(tmp_path, monkeypatch, azurite_connection_string, s3_server) -> KillableProject:
    return KillableProject.with_keys(tmp_path, monkeypatch, azurite_connection_string, s3_server.url, BUCKET)


# Where each of the seven runs dies: after or before its n-th PUT (objects, keyset copies), or
# half-way through writing its run_start line (a torn write the next run cuts and records; the
# run is then known from the state store, which holds it as running).
TORN = "engine.audit:AuditManifest.append:1:torn"
KILLS = ["connectors.s3:S3Store.put:3:after", "connectors.s3:S3Store.put:2:after",
         "connectors.s3:S3Store.put:4:before", TORN, "connectors.s3:S3Store.put:2:after",
         "connectors.s3:S3Store.put:3:after", "connectors.s3:S3Store.put:1:before"]


def test_seven_killed_migrations_are_listed_and_recorded_by_the_run_that_completes(project):
    rng = random.Random(7)
    for i in range(40):
        project.put_blob(f"claims/{i:02d}.csv", rng.randbytes(rng.randrange(1, 20_000)))
    killed: list[int] = []
    torn_run = None
    for moment in KILLS:
        outcome = project.exitplan("migrate", kill_at=moment)
        assert outcome.killed, (moment, outcome.code, outcome.err)
        assert len(outcome.new_runs) == 1, f"{moment}: the killed process had opened its run"
        killed += outcome.new_runs
        torn_run = outcome.new_runs[0] if moment == TORN else torn_run
    done = project.exitplan("migrate")
    assert done.code == 0, done.err
    assert f"recorded as interrupted (started, never ended): runs {', '.join(map(str, killed))}" in done.out

    statuses = {run: status for run, _command, status in project.runs()}
    assert [statuses[r] for r in killed] == ["interrupted"] * 7
    assert statuses[project.last_run_id()] == "ok"

    code, report = project.audit_verify()
    assert code == 0 and report["ok"], report["problems"]
    listed = report["runs_without_end"]
    assert [r["run"] for r in listed] == killed
    completing = project.last_run_id()
    for r in listed:
        assert r["command"] == "migrate" and completing in [b["run"] for b in r["recorded_by"]], r
        if r["run"] == torn_run:  # its run_start was cut: the state store named it
            assert r["first_line"] is None
        else:
            assert r["first_line"] is not None and r["last_line"] >= r["first_line"]
    assert [r["repair"].startswith("a torn last line") for r in report["repairs"]] == [True]
    text = project.run("audit", "verify", str(project.manifest), "--public-key",
                       str(project.tmp_path / "audit-public-key.pem"))
    assert text.code == 0 and "runs without a run_end (interrupted): 7" in text.out
    for run in killed:
        assert f"  run {run} (migrate, started " in text.out
