"""The S3 connector under injected faults: corrupted bodies, 5xx and throttling, cut responses.

moto accepts any Content-MD5 and never fails on its own, so `tests.faultproxy.FaultProxy` sits
between the connector and the server and breaks exactly one thing at a time.
"""

from __future__ import annotations

import io
import time
import os

import pytest

from connectors.base import (
    AuthError,
    IntegrityError,
    InvalidRequest,
    NotFound,
    Throttled,
    TransientError,
    WriteMeta,
    multipart_etag,
)
from tests.contract.contract_support import lab_boto3_client, make_s3_store, md5, one_way_stream

MiB = 1024 * 1024


@pytest.fixture
def store(fault_proxy, s3_bucket):
    """An S3Store talking to the lab server through the fault proxy; 3 attempts per request."""
    with make_s3_store(fault_proxy.url, s3_bucket, max_attempts=3, page_size=3) as s:
        yield s


@pytest.fixture
def oracle(s3_server, s3_bucket):
    """Read what landed on the server, bypassing the proxy."""
    client = lab_boto3_client(s3_server.url)
    return lambda key: client.get_object(Bucket=s3_bucket, Key=key)["Body"].read()


def test_a_part_corrupted_on_the_way_is_an_integrity_error(store, fault_proxy, oracle):
    body = os.urandom(5 * MiB)
    upload = store.open_multipart("corrupt", WriteMeta())
    fault_proxy.flip_next_put(r"partNumber=1")

    with pytest.raises(IntegrityError) as info:
        upload.upload_part(1, body, len(body), md5(body))
    assert info.value.retryable
    assert fault_proxy.pending_faults() == 0

    # The engine's retry: the same bytes again, this time untouched.
    r1 = upload.upload_part(1, body, len(body), md5(body))
    r2 = upload.upload_part(2, b"end", 3, md5(b"end"))
    assert upload.complete([r1, r2]) == multipart_etag([md5(body), md5(b"end")])
    assert oracle("corrupt") == body + b"end"


def test_a_put_corrupted_on_the_way_is_an_integrity_error(store, fault_proxy):
    body = os.urandom(10_000)
    fault_proxy.flip_next_put(r"/single$", offset=0)
    with pytest.raises(IntegrityError):
        store.put("single", body, len(body), WriteMeta(), md5(body))
    assert store.put("single", body, len(body), WriteMeta(), md5(body)) == md5(body).hex()


def test_a_streamed_part_corrupted_on_the_way_is_caught_by_the_streamed_md5(store, fault_proxy):
    body = os.urandom(2 * MiB + 5)
    upload = store.open_multipart("streamed-corrupt", WriteMeta())
    fault_proxy.flip_next_put(r"partNumber=1")
    with pytest.raises(IntegrityError):
        upload.upload_part(1, one_way_stream(body), len(body), None)
    upload.abort()


def test_server_busy_is_retried_by_the_sdk(store, fault_proxy):
    store.put("k", b"value", 5, WriteMeta(), None)
    fault_proxy.reset_counts()
    fault_proxy.fail_next(2, status=503)

    assert store.read_range("k", 0, 5) == b"value"
    assert fault_proxy.count("GET", "object") == 3


def test_a_retried_put_resends_the_whole_body(store, fault_proxy, oracle):
    """The SDK rewinds a body it retries: a slice of a larger buffer must be re-sent from its start."""
    buffer = bytearray(os.urandom(3 * MiB))
    part = memoryview(buffer)[MiB:2 * MiB + 9]
    upload = store.open_multipart("retried", WriteMeta())
    fault_proxy.reset_counts()
    fault_proxy.fail_next(2, status=503, method="PUT")

    r1 = upload.upload_part(1, part, len(part), md5(part))
    etag = store.put("retried-put", part, len(part), WriteMeta(), md5(part))

    assert fault_proxy.count("PUT") == 4
    assert r1.etag == etag == md5(part).hex()
    assert upload.complete([r1]) == multipart_etag([md5(part)])
    assert oracle("retried") == oracle("retried-put") == bytes(part)


def test_persistent_throttling_is_throttled(store, fault_proxy):
    store.put("k", b"value", 5, WriteMeta(), None)
    fault_proxy.reset_counts()
    fault_proxy.fail_next(3, status=503)

    with pytest.raises(Throttled) as info:
        store.head("k")
    assert info.value.retryable
    assert fault_proxy.count("HEAD", "object") == 3
    fault_proxy.fail_next(3, status=429, method="GET")
    with pytest.raises(Throttled):
        store.read_range("k", 0, 1)


def test_persistent_server_errors_are_transient(store, fault_proxy):
    store.put("k", b"value", 5, WriteMeta(), None)
    fault_proxy.fail_next(3, status=500, method="GET")
    with pytest.raises(TransientError):
        store.read_range("k", 0, 5)


def test_a_streamed_body_is_never_resent_by_the_sdk(store, fault_proxy, s3_server, s3_bucket):
    """One attempt only: a retry would rewind the caller's stream to its start (or fail half-way)."""
    body = os.urandom(300_000)
    upload = store.open_multipart("stream-once", WriteMeta())
    fault_proxy.reset_counts()
    fault_proxy.fail_next(1, status=503, method="PUT")

    # A seekable stream positioned after a prefix that is not part of this part.
    source = io.BytesIO(b"PREFIX-NOT-IN-THE-PART" + body)
    source.seek(22)
    with pytest.raises(Throttled):
        upload.upload_part(1, source, len(body), None)
    assert fault_proxy.count("PUT", "part") == 1

    source.seek(22)
    receipt = upload.upload_part(1, source, len(body), None)
    assert receipt.etag == md5(body).hex()
    assert upload.list_parts() == [receipt]
    upload.abort()


def test_a_response_cut_half_way_is_transient(store, fault_proxy):
    # A range of more than 1 MiB goes through botocore, which does not read a body again.
    body = os.urandom(2 * MiB)
    store.put("cut", body, len(body), WriteMeta(), md5(body))
    fault_proxy.cut_next_response(method="GET", fraction=0.5)

    with pytest.raises(TransientError) as info:
        store.read_range("cut", 0, len(body))
    assert info.value.retryable
    assert store.read_range("cut", 0, len(body)) == body


def test_a_small_range_cut_half_way_is_read_again_then_transient(store, fault_proxy):
    # A range of at most 1 MiB is a direct request, retried as a whole (the store's 3 attempts).
    body = os.urandom(MiB)
    store.put("cut-small", body, len(body), WriteMeta(), md5(body))
    fault_proxy.cut_next_response(method="GET", fraction=0.5)
    assert store.read_range("cut-small", 0, len(body)) == body

    fault_proxy.cut_next_response(method="GET", fraction=0.5, times=3)
    with pytest.raises(TransientError) as info:
        store.read_range("cut-small", 0, len(body))
    assert info.value.retryable
    assert store.read_range("cut-small", 0, len(body)) == body


@pytest.mark.parametrize(
    "status,code,error",
    [
        (403, "AccessDenied", AuthError),
        (403, "SignatureDoesNotMatch", AuthError),
        (403, "InvalidAccessKeyId", AuthError),
        (400, "BadDigest", IntegrityError),
        (400, "InvalidDigest", IntegrityError),
        (400, "InvalidPart", InvalidRequest),
        (400, "EntityTooSmall", InvalidRequest),
        (400, "RequestTimeout", TransientError),
        (404, "NoSuchKey", NotFound),
        (404, "NoSuchUpload", NotFound),
        (503, "SlowDown", Throttled),
    ],
)
def test_error_codes_map_to_connector_errors(store, fault_proxy, status, code, error):
    fault_proxy.fail_next(5, status=status, code=code, method="PUT")
    with pytest.raises(error):
        store.put("mapped", b"abc", 3, WriteMeta(), md5(b"abc"))
    fault_proxy.clear()


def test_listing_really_pages(store, fault_proxy):
    for i in range(7):
        store.put(f"p/{i}", b"x", 1, WriteMeta(), None)
    fault_proxy.reset_counts()

    assert [m.key for m in store.list("p/")] == [f"p/{i}" for i in range(7)]
    assert fault_proxy.count("GET", "bucket") == 3  # page size 3


def test_a_lost_response_is_retried_by_the_sdk(store, fault_proxy, oracle):
    """The server stored the object but the answer never came: the SDK sends it again, same bytes."""
    fault_proxy.drop_next(method="PUT")
    fault_proxy.reset_counts()
    assert store.put("lost-answer", b"payload", 7, WriteMeta(), md5(b"payload")) == md5(b"payload").hex()
    assert fault_proxy.count("PUT", "object") == 2
    assert oracle("lost-answer") == b"payload"


def test_a_slow_server_times_out_as_transient(fault_proxy, s3_bucket):
    with make_s3_store(fault_proxy.url, s3_bucket, max_attempts=1, read_timeout=0.2) as impatient:
        fault_proxy.delay_next(1.0, method="HEAD")
        with pytest.raises(TransientError):
            impatient.head("anything")


def test_a_constant_delay_holds_every_request(store, fault_proxy):
    """`delay_every` (the bench's latency simulation) holds each request, not only the next one."""
    fault_proxy.delay_every(0.3)
    began = time.monotonic()
    for i in range(3):
        store.put(f"far-{i}", b"x", 1, WriteMeta(), md5(b"x"))
    assert time.monotonic() - began >= 3 * 0.3
    fault_proxy.delay_every(0)
    began = time.monotonic()
    store.put("near", b"x", 1, WriteMeta(), md5(b"x"))
    assert time.monotonic() - began < 0.3


def test_unreachable_endpoint_is_transient(s3_bucket):
    from flows.lab_processes import free_port

    with make_s3_store(f"http://127.0.0.1:{free_port()}", s3_bucket, max_attempts=1, connect_timeout=2) as dead:
        with pytest.raises(TransientError):
            dead.head("k")


def test_an_s3_source_lists_what_each_object_is_with_its_tags(fault_proxy, s3_bucket, s3_server):
    """A source's listing (`source_details`): content headers, metadata and tags of every object,
    in key order; an object deleted between its page and its HEAD is left out; a refused
    GetObjectTagging stops the listing with a sentence naming the permission."""
    client = lab_boto3_client(s3_server.url)
    for i in range(5):
        client.put_object(Bucket=s3_bucket, Key=f"src/{i}.csv", Body=b"x" * i, ContentType="text/csv",
                          Metadata={"n": str(i)}, Tagging=f"i={i}")
    with make_s3_store(fault_proxy.url, s3_bucket, page_size=3, source_details=True) as store:
        listed = list(store.list("src/"))
        assert [m.key for m in listed] == [f"src/{i}.csv" for i in range(5)]
        assert all(m.content.content_type == "text/csv" and m.metadata == {"n": m.key[4]} and
                   m.tags == {"i": m.key[4]} for m in listed)
        # A bare listing (the progress count's): the pages only, no HEAD or tagging per object.
        fault_proxy.reset_counts()
        bare = list(store.list("src/", details=False))
        assert [(m.key, m.size, m.etag) for m in bare] == [(m.key, m.size, m.etag) for m in listed]
        assert fault_proxy.count("HEAD") == 0 and fault_proxy.count("GET") == 2  # two pages of 3

        fault_proxy.fail_next(1, status=404, code="NoSuchKey", method="HEAD", pattern=r"/src/3\.csv")
        assert [m.key for m in store.list("src/")] == ["src/0.csv", "src/1.csv", "src/2.csv", "src/4.csv"]

        fault_proxy.fail_next(1, status=403, code="AccessDenied", method="GET", pattern=r"tagging")
        with pytest.raises(AuthError) as info:
            list(store.list("src/"))
        assert "s3:GetObjectTagging" in str(info.value)
