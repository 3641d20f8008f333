"""The S3 connector over https, against moto's self-signed TLS mode (`moto_server -s`).

Over plain http boto3 never switches to `aws-chunked` bodies with trailing checksums, so only an
https server shows whether the client is built right (LAB-NOTES). moto itself decodes aws-chunked
bodies correctly, so a byte-for-byte read-back alone would not notice a wrongly built client: the
requests as sent are inspected too (no aws-chunked encoding, no checksum trailer or header).
"""

from __future__ import annotations

import http.client
import os
import ssl
import subprocess
import sys
import time

import pytest

from connectors.base import ConfigError, WriteMeta, multipart_etag
from flows import lab_processes as lp
from tests.contract.contract_support import lab_boto3_client, make_s3_store, md5, one_way_stream, unique_name

MiB = 1024 * 1024

# The lab server's certificate is self-signed; the warning for it is expected here and only here.
pytestmark = pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")


def _https_ready(port: int) -> bool:
    try:
        conn = http.client.HTTPSConnection(lp.LOOPBACK, port, timeout=1, context=ssl._create_unverified_context())
        conn.request("GET", "/moto-api/")
        conn.getresponse().read()
        conn.close()
        return True
    except (OSError, http.client.HTTPException):
        return False


@pytest.fixture(scope="module")
def https_s3(tmp_path_factory):
    """moto with a self-signed certificate on a free port; yields its https URL."""
    port = lp.free_port()
    log = open(tmp_path_factory.mktemp("moto-tls") / "moto.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", lp.LOOPBACK, "-p", str(port), "-s"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not _https_ready(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"moto -s did not start on port {port} (see {log.name})")
            time.sleep(0.1)
        yield f"https://{lp.LOOPBACK}:{port}"
    finally:
        lp.stop_pid(proc.pid)
        log.close()


def test_bytes_streams_and_parts_arrive_unchanged_over_https(https_s3):
    bucket = unique_name()
    # verify_tls=False only because the lab server's certificate is self-signed.
    with make_s3_store(https_s3, bucket, verify_tls=False) as store:
        store.ensure_bucket()
        sent: list[dict[str, str]] = []

        def record(request, **_):
            sent.append({k.lower(): (v.decode() if isinstance(v, bytes) else str(v)) for k, v in request.headers.items()})

        # The connector's two clients (retrying, and single-attempt for streamed bodies): white-box
        # on purpose, the headers on the wire are the property under test.
        for client in (store._client, store._stream_client()):
            client.meta.events.register("before-send.s3", record)
        oracle = lab_boto3_client(https_s3, verify=False)
        small, streamed = os.urandom(100_000), os.urandom(MiB + 7)
        part1, part2 = os.urandom(5 * MiB), os.urandom(1234)

        assert store.put("small", small, len(small), WriteMeta(), md5(small)) == md5(small).hex()
        assert store.put("streamed", one_way_stream(streamed), len(streamed), WriteMeta(), None) == md5(streamed).hex()
        upload = store.open_multipart("multi", WriteMeta())
        r1 = upload.upload_part(1, one_way_stream(part1), len(part1), None)
        r2 = upload.upload_part(2, part2, len(part2), md5(part2))
        assert upload.complete([r1, r2]) == multipart_etag([md5(part1), md5(part2)])

        for key, data in (("small", small), ("streamed", streamed), ("multi", part1 + part2)):
            assert oracle.get_object(Bucket=bucket, Key=key)["Body"].read() == data
            assert store.read_range(key, 0, len(data)) == data
            assert store.head(key).size == len(data)
        assert len(sent) >= 6  # the streamed puts, the upload's requests, the large reads (HEADs go direct)
        for headers in sent:
            assert "aws-chunked" not in headers.get("content-encoding", "")
            assert "chunked" not in headers.get("transfer-encoding", "")
            assert not any(name.startswith(("x-amz-checksum", "x-amz-trailer", "x-amz-sdk-checksum"))
                           for name in headers), headers
            assert "TRAILER" not in headers.get("x-amz-content-sha256", "")


def test_a_self_signed_certificate_is_refused_when_verifying(https_s3):
    with make_s3_store(https_s3, "whatever", max_attempts=1) as store:
        with pytest.raises(ConfigError) as info:
            store.head("k")
    assert "certificate" in str(info.value)


def test_direct_requests_go_over_https_and_refuse_a_self_signed_certificate_when_verifying(https_s3):
    """A small PUT and a small ranged read go as direct requests (libcurl): over https with the
    check off (the lab's certificate), and refused by name, before any byte of the object is sent,
    when the certificate is checked."""
    bucket = unique_name()
    body = os.urandom(3000)
    with make_s3_store(https_s3, bucket, verify_tls=False) as store:
        store.ensure_bucket()
        assert store._direct_ok()
        assert store.put("direct", body, len(body), WriteMeta(), md5(body)) == md5(body).hex()
        assert store.read_range("direct", 10, 2010) == body[10:2010]
    with make_s3_store(https_s3, bucket, max_attempts=1) as store:
        assert store._direct_ok()
        with pytest.raises(ConfigError, match="certificate"):
            store.put("refused", body, len(body), WriteMeta(), md5(body))
        with pytest.raises(ConfigError, match="certificate"):
            store.read_range("direct", 0, 100)
    assert "Contents" not in lab_boto3_client(https_s3, verify=False).list_objects_v2(Bucket=bucket, Prefix="refused")
