"""A migration with faults on both sides (issue 13, item 5): the fault proxy in front of Azurite and
in front of the S3 server, each failing 5 % of the requests in each of its ways (a 5xx answer, a
throttling answer, a connection reset, a truncated answer, a slow body: a quarter of all requests).
The run completes, every object verifies deep, and what was sent again is counted: by the proxies
(faults injected, by kind and request) and by exitplan's own summary ("N parts or objects re-sent").
The same run without faults, through the same proxies, is the time it is compared with."""

from __future__ import annotations

import os
import sys
import re
import time

import pytest

from config.lab import azurite_connection_string
from flows import lab_processes as lp
from flows.cli import main
from tests import projects
from tests.faultproxy import RANDOM_FAULTS, FaultProxy
from tests.s3client import keys_below, lab_s3_client

pytestmark = pytest.mark.integration

CS_VAR = "EXITPLAN_TEST_BOTH_SIDES_CS"
BUCKET = "exitplan-both-sides"
RATE = 0.05
# Small objects (one PUT each) and two multipart ones (2 and 3 parts of 5 MiB), encrypted.
EXTRA = {**{f"notes/{i:03d}.txt": f"note {i}\n".encode() * (20 + i) for i in range(50)},
         "scans/bigger.bin": os.urandom(11 * 1024 * 1024 + 3)}
RESENT = re.compile(r"recovered from faults: ([\d,]+) parts or objects re-sent \(([\d,]+) by the S3 SDK's own "
                    r"retries\), ([\d,]+) requests retried by exitplan")


def _migrate(tmp_path, name: str, az: FaultProxy, s3: FaultProxy, capsys) -> tuple[str, str, float, int]:
    """A project of its own (the lab project of tests/projects.py plus `EXTRA`), read and written
    through the proxies; (config path, container, seconds of `migrate`, objects)."""
    directory = tmp_path / name
    directory.mkdir()
    path, container, blobs = projects.write_project(
        directory, azurite_connection_string(az.upstream[1]), s3.url, project="both", bucket=BUCKET, cs_var=CS_VAR,
        extra_blobs=EXTRA, orchestration={"shard_objects": 100})
    capsys.readouterr()
    began = time.monotonic()
    code = main(["migrate", "--config", str(path)])
    seconds = time.monotonic() - began
    assert code == 0, capsys.readouterr()
    return str(path), container, seconds, len(blobs)


def test_a_migration_with_five_percent_of_faults_in_each_way_on_both_sides(tmp_path, azurite, s3_server, monkeypatch,
                                                                          capsys):
    s3_client = lab_s3_client(s3_server.url, BUCKET)
    with FaultProxy(lp.LOOPBACK, azurite.port, service="azure") as az, \
            FaultProxy(lp.LOOPBACK, s3_server.port) as s3:
        monkeypatch.setenv(CS_VAR, azurite_connection_string(az.port))
        _, _, clean_seconds, objects = _migrate(tmp_path, "clean", az, s3, capsys)
        assert RESENT.search(capsys.readouterr().out) is None   # nothing to recover from
        az.reset_counts()
        s3.reset_counts()

        az.random_faults(RATE, seed=20261213)
        s3.random_faults(RATE, seed=20261214)
        path, container, faulty_seconds, _ = _migrate(tmp_path, "faulty", az, s3, capsys)
        out = capsys.readouterr().out
        az.stop_random_faults()
        s3.stop_random_faults()

        # Every way of failing happened on each side.
        assert set(az.injected) == set(RANDOM_FAULTS), az.injected
        assert set(s3.injected) == set(RANDOM_FAULTS), s3.injected
        # What exitplan says it sent again, against what the S3 proxy broke: every part upload or
        # PUT that failed (a slow body is not a failure) was sent again, by the SDK or by exitplan.
        resent, by_sdk, retried = (int(x.replace(",", "")) for x in RESENT.search(out).groups())
        broken_bodies = sum(n for (fault, method, kind), n in s3.injected_on.items()
                            if method == "PUT" and kind in ("part", "object") and fault != "slow")
        assert resent >= 1 and by_sdk <= resent
        assert resent <= broken_bodies
        print(f"\nfaults on both sides: {objects} objects; Azure side {dict(az.injected)} of "
              f"{az.count()} requests, S3 side {dict(s3.injected)} of {s3.count()} requests; "
              f"{resent} parts or objects re-sent ({by_sdk} by the SDK) of {broken_bodies} broken on the way, "
              f"{retried} requests retried by exitplan; {faulty_seconds:.1f} s against {clean_seconds:.1f} s "
              "fault-free", file=sys.stderr)

        # Every object is there and reads back, decrypted, to the SHA-256 recorded at copy time.
        assert main(["verify", "--config", path, "--deep"]) == 0, capsys.readouterr()
    assert len(keys_below(s3_client, BUCKET, f"{container}/")) == objects
