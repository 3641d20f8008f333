"""`exitplan probe` against real S3 servers: the lab's (moto), and moto behind the fault proxy made to
answer as a quirky provider does. Each table is asserted on the rows that differ, the exit code on
the verdict, and the bucket on being left as it was found (nothing under the probe's prefix, no
multipart upload open)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from config.lab import LAB_S3_SECRET_KEY
from config.loader import load_config
from engine.probe import PROBE_PREFIX, ProbeInterrupted, probe_destination
from flows import lab_processes as lp
from flows.cli import main
from tests.faultproxy import FaultProxy, QuirkProxy
from tests.s3client import lab_s3_client

# The source is never read by a probe; the loader only needs its variable to be named.
SOURCE_VAR = "EXITPLAN_PROBE_TEST_SOURCE"


@pytest.fixture(autouse=True)
def _source_variable(monkeypatch):
    monkeypatch.setenv(SOURCE_VAR, "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=a2V5;"
                                   "BlobEndpoint=http://127.0.0.1:9/devstoreaccount1")


@pytest.fixture
def bucket(s3_server, request) -> str:
    name = f"probe-{abs(hash(request.node.name)) % 10**10:010d}"
    lab_s3_client(s3_server.url, name)
    return name


def write_config(tmp_path: Path, endpoint: str, bucket: str, *, provider: str = "lab", region: str = "eu-west-3",
                 overrides: dict | None = None) -> Path:
    dest = {"provider": provider, "endpoint_url": endpoint, "region": region, "bucket": bucket}
    if overrides:
        dest["provider_overrides"] = overrides
    cfg = {"version": 1, "project": "probe",
           "sources": {"az": {"kind": "azure_blob", "connection_string_env": SOURCE_VAR}},
           "destinations": {"bucket": dest},
           "datasets": {"open": {"source": "az", "container": "open", "destination": "bucket", "public": True}},
           "state": {"path": str(tmp_path / "state")}}
    path = tmp_path / "exitplan.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def probe_json(capsys, path: Path, *extra: str) -> tuple[int, dict]:
    code = main(["probe", "--config", str(path), "--json", *extra])
    out = capsys.readouterr().out
    assert LAB_S3_SECRET_KEY not in out and "AccountKey" not in out   # no credential in the output
    reports = json.loads(out) if out.strip() else []
    return code, (reports[0] if reports else {})


def rows(report: dict) -> dict[str, dict]:
    return {c["check"]: c for c in report["checks"]}


def assert_nothing_left(url: str, bucket: str) -> None:
    client = lab_s3_client(url)
    assert client.list_objects_v2(Bucket=bucket, Prefix=PROBE_PREFIX).get("KeyCount", 0) == 0
    assert client.list_multipart_uploads(Bucket=bucket, Prefix=PROBE_PREFIX).get("Uploads", []) == []


def test_moto_holds_a_migration_and_the_probe_leaves_nothing(s3_server, bucket, tmp_path, capsys):
    code, report = probe_json(capsys, write_config(tmp_path, s3_server.url, bucket))

    assert code == 0 and report["safe"]
    r = rows(report)
    assert r["multipart ETag"]["measured"].startswith("md5-of-md5s-") and r["multipart ETag"]["verdict"] == "ok"
    assert (r["ListParts"]["measured"], r["ListMultipartUploads"]["measured"]) == ("answered", "answered")
    # moto takes any Content-MD5 (LAB-NOTES); its ETags are MD5s, which exitplan compares, so: warn.
    assert r["wrong Content-MD5"]["verdict"] == "warn"
    assert r["tags per object"]["measured"] == "10 accepted, 11 refused"
    assert r["TLS"]["measured"] == "plain http"
    assert r["virtual-style addressing"]["measured"].startswith("not testable")
    direct = r["direct PUT and GET (≤ 1 MiB)"]
    assert (direct["measured"], direct["catalog"], direct["verdict"]) == ("work, object as botocore makes it", "yes", "ok")
    assert report["suggested_overrides"] == {} and report["left_behind"] == []
    assert report["prefix"].startswith(PROBE_PREFIX)
    assert_nothing_left(s3_server.url, bucket)


def test_the_table_names_each_check_and_the_verdict(s3_server, bucket, tmp_path, capsys):
    assert main(["probe", "--config", str(write_config(tmp_path, s3_server.url, bucket))]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("check"))
    assert header.split() == ["check", "measured", "catalog", "says", "verdict"]
    assert "the bucket can hold a migration as configured" in out
    assert "provider_overrides" not in out


def test_a_quirky_server_fails_and_its_suggested_overrides_make_it_pass(s3_server, bucket, tmp_path, capsys):
    """The quirk proxy: opaque multipart ETags, 405 to ListParts and abort, 501 to ListMultipartUploads."""
    with QuirkProxy(lp.LOOPBACK, s3_server.port) as proxy:
        path = write_config(tmp_path, proxy.url, bucket)
        code, report = probe_json(capsys, path)

        assert code == 1 and not report["safe"]
        r = rows(report)
        assert r["multipart ETag"]["measured"].startswith("opaque (") and r["multipart ETag"]["verdict"] == "FAIL"
        assert r["part ETag"]["verdict"] == "ok"   # parts keep their MD5 ETags
        assert (r["ListParts"]["measured"], r["ListParts"]["verdict"]) == ("refused: 405 MethodNotAllowed", "FAIL")
        assert r["ListMultipartUploads"]["measured"] == "refused: 501 NotImplemented"
        assert r["abort multipart upload"]["measured"] == "refused: 405 MethodNotAllowed"
        assert report["suggested_overrides"] == {
            "multipart": {"etag": "opaque", "list_parts": False, "list_uploads": False, "abort": False}}
        # Abort refused: the upload the probe left open is named, not silently left.
        (left,) = report["left_behind"]
        assert "could not be aborted (refused: 405 MethodNotAllowed)" in left

        # The runbook: paste the suggestion into the destination, probe again.
        pasted = yaml.safe_load(main_output(capsys, path))["destinations"]["bucket"]["provider_overrides"]
        code, report = probe_json(capsys, write_config(tmp_path, proxy.url, bucket, overrides=pasted))
        assert code == 0, report
        r = rows(report)
        assert r["multipart ETag"]["catalog"] == "opaque (override)" and r["multipart ETag"]["verdict"] == "ok"
        assert r["ListParts"]["catalog"] == "not answered (override)" and r["ListParts"]["verdict"] == "ok"
        assert report["suggested_overrides"] == {}
    abort_uploads_left(s3_server.url, bucket)
    assert_nothing_left(s3_server.url, bucket)


def test_ministack_refuses_a_wrong_content_md5(ministack_server, tmp_path, capsys):
    """The second S3 implementation checks Content-MD5 where moto does not."""
    bucket = "probe-ministack"
    lab_s3_client(ministack_server.url, bucket)
    code, report = probe_json(capsys, write_config(tmp_path, ministack_server.url, bucket))

    assert code == 0, report
    r = rows(report)
    assert (r["wrong Content-MD5"]["measured"], r["wrong Content-MD5"]["verdict"]) == ("refused (BadDigest)", "ok")
    assert r["multipart ETag"]["measured"].startswith("md5-of-md5s-")
    assert (r["ListParts"]["measured"], r["ListMultipartUploads"]["measured"]) == ("answered", "answered")
    assert report["left_behind"] == []
    assert_nothing_left(ministack_server.url, bucket)


def abort_uploads_left(url: str, bucket: str) -> None:
    client = lab_s3_client(url)
    for upload in client.list_multipart_uploads(Bucket=bucket, Prefix=PROBE_PREFIX).get("Uploads", []):
        client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])


def main_output(capsys, path: Path) -> str:
    """The YAML block the table prints under "suggested provider_overrides", as printed."""
    main(["probe", "--config", str(path)])
    out = capsys.readouterr().out
    block = out.split("suggested provider_overrides", 1)[1].split("\n\n", 1)[1].split("\n\n", 1)[0]
    return "\n".join(line[2:] for line in block.splitlines())


def test_a_part_slower_than_the_providers_longest_request_fails(s3_server, bucket, tmp_path, capsys):
    path = write_config(tmp_path, s3_server.url, bucket, overrides={"limits": {"max_request_seconds": 0.001}})
    code, report = probe_json(capsys, path)

    assert code == 1
    assert rows(report)["parallel parts"]["verdict"] == "FAIL"
    assert "transfer.part_size" in rows(report)["parallel parts"]["note"]


def test_an_interrupted_probe_aborts_its_upload_and_empties_its_prefix(s3_server, bucket, tmp_path):
    loaded = load_config(write_config(tmp_path, s3_server.url, bucket))

    def interrupt(destination: str, check: str) -> None:
        if check == "list uploads":  # an upload is open now
            raise KeyboardInterrupt

    with pytest.raises(ProbeInterrupted) as info:
        probe_destination(loaded, "bucket", step=interrupt)
    assert info.value.left_behind == ()
    assert "removed everything it wrote" in str(info.value)
    assert_nothing_left(s3_server.url, bucket)


def test_an_interrupted_probe_names_the_upload_it_could_not_abort(s3_server, bucket, tmp_path):
    with FaultProxy(lp.LOOPBACK, s3_server.port) as proxy:
        loaded = load_config(write_config(tmp_path, proxy.url, bucket))
        proxy.fail_next(1000, status=501, code="NotImplemented", method="DELETE", pattern="uploadId=")

        def interrupt(destination: str, check: str) -> None:
            if check == "list uploads":
                raise KeyboardInterrupt

        with pytest.raises(ProbeInterrupted) as info:
            probe_destination(loaded, "bucket", step=interrupt)
    (left,) = info.value.left_behind
    assert "could not be aborted (refused: 501 NotImplemented)" in left
    client = lab_s3_client(s3_server.url)
    (upload,) = client.list_multipart_uploads(Bucket=bucket, Prefix=PROBE_PREFIX)["Uploads"]
    assert upload["UploadId"] in left
    abort_uploads_left(s3_server.url, bucket)
    assert_nothing_left(s3_server.url, bucket)


def test_the_gate_refuses_before_any_request(s3_server, bucket, tmp_path, capsys):
    with FaultProxy(lp.LOOPBACK, s3_server.port) as proxy:
        path = write_config(tmp_path, proxy.url, bucket, provider="ovhcloud", region="gra")
        assert main(["probe", "--config", str(path)]) == 3
        assert proxy.count() == 0
    assert "is not a known OVHcloud host" in capsys.readouterr().err


def test_an_unknown_destination_is_a_usage_error(s3_server, bucket, tmp_path, capsys):
    path = write_config(tmp_path, s3_server.url, bucket)
    assert main(["probe", "--config", str(path), "--destination", "nowhere"]) == 2
    assert "no destination `nowhere`" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The probe as the first step of the exit plan (Prefect's test harness)
# ---------------------------------------------------------------------------------------------

def _flow_artifacts(flow_run_id) -> dict[str, str]:
    from tests.integration.test_flows import artifacts_of

    return {a.key: a.data for a in artifacts_of(flow_run_id).get("markdown", [])}


def test_exit_plan_stops_before_listing_when_the_probe_finds_the_bucket_unsafe(s3_server, bucket, tmp_path,
                                                                             prefect_harness):
    from flows.orchestrate import exit_plan
    from tests.integration.test_flows import task_states

    with QuirkProxy(lp.LOOPBACK, s3_server.port, abort=True, list_uploads=True) as proxy:
        path = write_config(tmp_path, proxy.url, bucket)
        state = exit_plan(config_path=str(path), probe=True, return_state=True)

    assert state.is_failed()
    assert "destination(s) bucket cannot hold the migration as configured" in state.message
    run_id = state.state_details.flow_run_id
    assert task_states(run_id) == [("probe the destination buckets", "COMPLETED"), ("sovereignty gate", "COMPLETED")]
    markdown = _flow_artifacts(run_id)["exitplan-probe-probe"]
    assert "| ListParts | refused: 405 MethodNotAllowed | answered | **FAIL** |" in markdown
    assert "list_parts: false" in markdown and "etag: opaque" in markdown
    assert_nothing_left(s3_server.url, bucket)


def test_exit_plan_with_the_probe_first_migrates_a_safe_bucket(s3_server, tmp_path, prefect_harness, monkeypatch,
                                                              azurite_connection_string):
    from flows.orchestrate import exit_plan
    from tests import projects

    monkeypatch.setenv("EXITPLAN_TEST_PROBE_CS", azurite_connection_string)
    lab_s3_client(s3_server.url, "exitplan-probe-flow")
    path, container, _ = projects.write_project(tmp_path, azurite_connection_string, s3_server.url, project="probe",
                                                bucket="exitplan-probe-flow", cs_var="EXITPLAN_TEST_PROBE_CS")
    state = exit_plan(config_path=str(path), probe=True, deep_verify=False, return_state=True)

    assert state.is_completed(), state.message
    assert state.result()["copied"] == 11
    markdown = _flow_artifacts(state.state_details.flow_run_id)[f"exitplan-{container}-probe"]
    assert "can hold a migration as configured" in markdown and "| multipart ETag | md5-of-md5s-2 | md5 | ok |" in markdown
    assert_nothing_left(s3_server.url, "exitplan-probe-flow")
