"""The `ObjectSink` contract, run over every connector that can be a destination (memory, S3 server, SFTP).

Azure is listed too and skips: it states ``"sink"`` in its `unsupported` set. What a sink wrote is
checked through an independent reader (boto3 directly, or the memory store's own bytes).
"""

from __future__ import annotations

import os

import pytest

from connectors.base import (
    BodyDigestMismatch,
    ContentSettings,
    IntegrityError,
    InvalidRequest,
    NotFound,
    ObjectSink,
    PartReceipt,
    TransientError,
    WriteMeta,
    multipart_etag,
)
from tests.contract.contract_support import md5, one_way_stream

MiB = 1024 * 1024

META = WriteMeta(
    ContentSettings(
        content_type="application/vnd.apache.parquet",
        content_encoding="identity",
        cache_control="no-store",
        content_disposition='attachment; filename="claims.parquet"',
        content_language="de-CH",
    ),
    # Non-ASCII values arrive already encoded by the caller (S3 metadata travels in headers).
    {"exitplan-source": "azure%3Adevstoreaccount1%2Fclaims", "owner": "J%C3%BCrg%20M%C3%BCller"},
)


def written_etag(sink, key: str, md5_etag: str) -> str:
    """The ETag a write of `key` must answer: `md5_etag` (the MD5 of the bytes, or S3's
    md5-of-md5s-N) where the sink's ETags are MD5s; else the opaque token its `head` reports."""
    return md5_etag if sink.etag_is_md5 else sink.head(key).etag


def test_connector_implements_the_protocol(sink_harness):
    sink = sink_harness.sink()
    assert isinstance(sink, ObjectSink)
    assert sink.limits.min_part_size == 5 * MiB


def test_put_then_head_roundtrip(sink_harness):
    sink = sink_harness.sink()
    data = os.urandom(4096)

    etag = sink.put("out/claims.parquet", data, len(data), META, md5(data))

    assert etag == written_etag(sink, "out/claims.parquet", md5(data).hex())
    head = sink.head("out/claims.parquet")
    assert head.etag == etag
    assert head.size == len(data)
    assert head.content == META.content
    assert dict(head.metadata) == dict(META.metadata)
    assert sink_harness.raw_read("out/claims.parquet") == data


def test_put_without_md5_and_from_a_memoryview(sink_harness):
    sink = sink_harness.sink()
    data = bytearray(os.urandom(3000))

    assert sink.put("a", bytes(data), len(data), WriteMeta(), None) == written_etag(sink, "a", md5(data).hex())
    assert (sink.put("b", memoryview(data)[1000:2000], 1000, WriteMeta(), md5(data[1000:2000]))
            == written_etag(sink, "b", md5(data[1000:2000]).hex()))
    assert sink_harness.raw_read("b") == data[1000:2000]


def test_put_of_an_empty_object(sink_harness):
    sink = sink_harness.sink()
    assert sink.put("empty", b"", 0, WriteMeta(), md5(b"")) == written_etag(sink, "empty", md5(b"").hex())
    assert sink.head("empty").size == 0
    assert sink_harness.raw_read("empty") == b""


def test_put_streamed_body_is_hashed_as_it_is_sent(sink_harness):
    sink = sink_harness.sink()
    data = os.urandom(3 * MiB + 17)

    etag = sink.put("streamed.bin", one_way_stream(data), len(data), META, None)

    assert etag == written_etag(sink, "streamed.bin", md5(data).hex())
    assert sink_harness.raw_read("streamed.bin") == data
    assert sink.head("streamed.bin").content == META.content


def test_put_with_a_wrong_md5_is_an_integrity_error(sink_harness):
    sink = sink_harness.sink()
    data = os.urandom(1000)
    with pytest.raises(IntegrityError) as info:
        sink.put("wrong-md5", data, len(data), WriteMeta(), md5(b"something else"))
    # A digest a server rejects may be the wire's fault: sent again, the bytes can pass. A sink
    # that hashes the caller's bytes itself (`hashes_writes`) would find the same MD5 again.
    if getattr(sink, "hashes_writes", False):
        assert isinstance(info.value, BodyDigestMismatch) and not info.value.retryable
        assert info.value.computed == md5(data) and info.value.announced == md5(b"something else")
    else:
        assert info.value.retryable


def test_a_stream_shorter_than_announced_is_transient(sink_harness):
    sink = sink_harness.sink()
    with pytest.raises(TransientError):
        sink.put("short-stream", one_way_stream(b"x" * 100), 200, WriteMeta(), None)
    with pytest.raises(NotFound):
        sink.head("short-stream")


def test_multipart_upload_list_complete(sink_harness):
    sink = sink_harness.sink()
    part1, part2 = os.urandom(5 * MiB), os.urandom(MiB + 3)

    upload = sink.open_multipart("big/object.bin", META)
    r1 = upload.upload_part(1, part1, len(part1), md5(part1), offset=0)
    r2 = upload.upload_part(2, part2, len(part2), md5(part2), offset=len(part1))

    assert r1 == PartReceipt(1, md5(part1).hex(), len(part1))
    assert r2 == PartReceipt(2, md5(part2).hex(), len(part2))
    assert upload.list_parts() == [r1, r2]
    etag = upload.complete([r1, r2])
    assert etag == written_etag(sink, "big/object.bin", multipart_etag([md5(part1), md5(part2)]))
    head = sink.head("big/object.bin")
    assert (head.size, head.etag, head.content_md5) == (len(part1) + len(part2), etag, None)
    assert head.content == META.content
    assert dict(head.metadata) == dict(META.metadata)
    assert sink_harness.raw_read("big/object.bin") == part1 + part2
    assert [u.upload_id for u in sink.list_multipart_uploads("big/")] == []


def test_list_parts_pages_and_keeps_part_order(sink_harness):
    sink = sink_harness.sink(page_size=2)
    upload = sink.open_multipart("parts", WriteMeta())
    bodies = {n: os.urandom(100 + n) for n in (3, 1, 5, 2, 4)}
    for n, body in bodies.items():
        upload.upload_part(n, body, len(body), md5(body), offset=sum(len(bodies[k]) for k in range(1, n)))

    assert upload.list_parts() == [PartReceipt(n, md5(bodies[n]).hex(), len(bodies[n])) for n in range(1, 6)]
    upload.abort()


def test_reuploading_a_part_replaces_it(sink_harness):
    sink = sink_harness.sink()
    upload = sink.open_multipart("again", WriteMeta())
    upload.upload_part(1, b"first", 5, md5(b"first"), offset=0)
    receipt = upload.upload_part(1, b"second", 6, md5(b"second"), offset=0)
    assert upload.list_parts() == [receipt]
    assert upload.complete([receipt]) == written_etag(sink, "again", multipart_etag([md5(b"second")]))
    assert sink_harness.raw_read("again") == b"second"


def test_abort_leaves_no_upload(sink_harness):
    sink = sink_harness.sink()
    upload = sink.open_multipart("aborted/obj", WriteMeta())
    upload.upload_part(1, b"abc", 3, md5(b"abc"), offset=0)
    other = sink.open_multipart("kept/obj", WriteMeta())

    assert upload.upload_id in {u.upload_id for u in sink.list_multipart_uploads()}
    upload.abort()
    upload.abort()  # already gone: not an error

    pending = list(sink.list_multipart_uploads())
    assert upload.upload_id not in {u.upload_id for u in pending}
    assert [(u.key, u.upload_id) for u in pending] == [("kept/obj", other.upload_id)]
    assert list(sink.list_multipart_uploads("aborted/")) == []
    with pytest.raises(NotFound):
        sink.head("aborted/obj")
    # (An UploadPart to an aborted upload gets 500 from moto instead of 404 NoSuchUpload, so the
    # contract checks the resume path, which is what the engine does after a crash.)
    with pytest.raises(NotFound):
        sink.resume_multipart("aborted/obj", upload.upload_id)
    other.abort()


def test_a_small_non_last_part_is_refused_at_complete(sink_harness):
    sink = sink_harness.sink()
    upload = sink.open_multipart("too-small", WriteMeta())
    r1 = upload.upload_part(1, b"x" * 1024, 1024, md5(b"x" * 1024), offset=0)
    r2 = upload.upload_part(2, b"y", 1, md5(b"y"), offset=1024)

    with pytest.raises(InvalidRequest):
        upload.complete([r1, r2])
    upload.abort()


def test_resume_multipart_reattaches_from_another_connector(sink_harness):
    sink = sink_harness.sink()
    part1, part2 = os.urandom(5 * MiB), b"the end"
    upload = sink.open_multipart("resumed.bin", META)
    r1 = upload.upload_part(1, part1, len(part1), md5(part1), offset=0)

    # A new process: a new connector, only the key and upload id kept in the state store.
    again = sink_harness.reopen_sink()
    [pending] = [u for u in again.list_multipart_uploads("resumed")]
    assert (pending.key, pending.upload_id) == ("resumed.bin", upload.upload_id)
    resumed = again.resume_multipart("resumed.bin", pending.upload_id)
    assert (resumed.key, resumed.upload_id) == ("resumed.bin", upload.upload_id)
    assert resumed.list_parts() == [r1]
    r2 = resumed.upload_part(2, part2, len(part2), md5(part2), offset=len(part1))

    assert resumed.complete([r1, r2]) == written_etag(again, "resumed.bin", multipart_etag([md5(part1), md5(part2)]))
    assert sink_harness.raw_read("resumed.bin") == part1 + part2
    assert again.head("resumed.bin").content == META.content


def test_resume_of_an_unknown_upload_is_not_found(sink_harness):
    sink = sink_harness.sink()
    with pytest.raises(NotFound):
        sink.resume_multipart("nothing", "no-such-upload-id")


def test_streamed_part_body(sink_harness):
    sink = sink_harness.sink()
    part1, part2 = os.urandom(5 * MiB + 1), os.urandom(1000)
    upload = sink.open_multipart("streamed-parts", WriteMeta())

    r1 = upload.upload_part(1, one_way_stream(part1), len(part1), None, offset=0)
    r2 = upload.upload_part(2, one_way_stream(part2), len(part2), md5(part2), offset=len(part1))

    # A sink that wants no part MD5 (`part_md5`) answers one only when it was announced.
    assert r1 == PartReceipt(1, md5(part1).hex() if getattr(sink, "part_md5", True) else r1.etag, len(part1))
    assert r2 == PartReceipt(2, md5(part2).hex(), len(part2))
    assert upload.complete([r1, r2]) == written_etag(sink, "streamed-parts", multipart_etag([md5(part1), md5(part2)]))
    assert sink_harness.raw_read("streamed-parts") == part1 + part2


def test_delete(sink_harness):
    sink = sink_harness.sink()
    sink.put("doomed", b"x", 1, WriteMeta(), None)
    sink.delete("doomed")
    with pytest.raises(NotFound):
        sink.head("doomed")
    sink.delete("doomed")  # already gone: not an error
