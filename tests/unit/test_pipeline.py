"""Copy one object on the in-memory store, with faults injected by thin wrappers around it."""

from __future__ import annotations

import base64
import hashlib
import os
from typing import Callable

import pytest

from connectors.base import (
    AuthError,
    BodyDigestMismatch,
    ContentSettings,
    InvalidRequest,
    ObjectMeta,
    PartReceipt,
    SinkLimits,
    TransientError,
    WriteMeta,
    checked_etag,
    checked_multipart_etag,
    multipart_etag,
)
from connectors.memory import MemoryStore
from engine.budget import MemoryBudget
from engine.copy_events import CopyEvents
from engine.executors import create_executors
from engine.placement import Placement
from engine.outcome import ObjectOutcome
from engine.ordered_digest import OrderedDigest, md5_digest, update as hash_update
from engine.pipeline import copy_object
from engine.planning import MiB
from engine.settings import TransferSettings

LIMITS = SinkLimits(min_part_size=MiB, max_part_size=64 * MiB, max_parts=10_000)
META = WriteMeta(
    content=ContentSettings(content_type="application/x-parquet", content_encoding="gzip", cache_control="no-cache",
                            content_disposition="attachment", content_language="fr"),
    metadata={"patient-cohort": "b7", "label": "=?UTF-8?B?w6l0w6k=?="},
)


def fast(**overrides) -> TransferSettings:
    base = dict(memory_budget=16 * MiB, part_size=2 * MiB, small_object_cutoff=2 * MiB, concurrency=4,
                retry_wait_initial=0, retry_wait_max=0, part_attempts=3)
    base.update(overrides)
    return TransferSettings(**base)


# ---- fault injection ---------------------------------------------------------------------------


class FaultySource:
    """Forwards to a MemoryStore; `before_read(call_no, key, start, end)` may raise or mutate."""

    def __init__(self, store: MemoryStore, before_read: Callable[[int, str, int, int], None] | None = None):
        self.store = store
        self.before_read = before_read
        self.reads: list[tuple[int, int]] = []
        self.unsupported = store.unsupported
        self.label = "faulty-source"

    def list(self, prefix=""):
        return self.store.list(prefix)

    def head(self, key):
        return self.store.head(key)

    def read_range(self, key, start, end, *, if_match=None):
        self.reads.append((start, end))
        if self.before_read:
            self.before_read(len(self.reads), key, start, end)
        return self.store.read_range(key, start, end, if_match=if_match)


class FaultySink:
    """A connector in front of a faulty server (the MemoryStore it forwards to).

    `part_fault(number, attempt)` may raise before a part is stored; `part_etag(number, attempt,
    etag)` and `complete_etag` alter the ETags the server answers, which are then checked as every
    connector checks them where ETags are MD5s (`connectors.base.checked_etag`); `log` records the
    calls in order."""

    def __init__(self, store: MemoryStore, part_fault=None, put_fault=None, complete_etag=None,
                 mid_body_fault=None, part_etag=None):
        self.store = store
        self.limits = store.limits
        self.unsupported = store.unsupported
        self.etag_is_md5 = store.etag_is_md5
        self.behaviour = store.behaviour
        self.label = "faulty-sink"
        self.part_fault = part_fault
        self.put_fault = put_fault
        self.mid_body_fault = mid_body_fault
        self.complete_etag = complete_etag
        self.part_etag = part_etag
        self.part_attempts: dict[int, int] = {}
        self.log: list[str] = []

    def head(self, key):
        return self.store.head(key)

    def put(self, key, body, size, meta, md5):
        self.log.append(f"put {key}")
        if self.put_fault:
            self.put_fault()
        return self.store.put(key, body, size, meta, md5)

    def open_multipart(self, key, meta):
        self.log.append(f"open {key}")
        return FaultyUpload(self, self.store.open_multipart(key, meta))

    def resume_multipart(self, key, upload_id):
        return FaultyUpload(self, self.store.resume_multipart(key, upload_id))

    def list_multipart_uploads(self, prefix=""):
        return self.store.list_multipart_uploads(prefix)

    def delete(self, key):
        self.log.append(f"delete {key}")
        self.store.delete(key)


class FaultyUpload:
    def __init__(self, sink: FaultySink, inner):
        self.sink = sink
        self.inner = inner
        self.key = inner.key
        self.upload_id = inner.upload_id

    def upload_part(self, number, body, size, md5, offset=None):
        attempt = self.sink.part_attempts.get(number, 0) + 1
        self.sink.part_attempts[number] = attempt
        self.sink.log.append(f"part {number}")
        if self.sink.part_fault:
            self.sink.part_fault(number, attempt)
        if self.sink.mid_body_fault and not isinstance(body, (bytes, bytearray, memoryview)):
            # A connection dropping after half the body was sent.
            if self.sink.mid_body_fault(number, attempt):
                body.read(size // 2)
                raise TransientError("connection reset by peer while sending the body")
        receipt = self.inner.upload_part(number, body, size, md5, offset)
        if self.sink.part_etag:
            answered = self.sink.part_etag(number, attempt, receipt.etag)
            if self.sink.etag_is_md5:
                checked_etag(answered, bytes.fromhex(receipt.etag), what=f"part {number}", key=self.key)
            receipt = PartReceipt(number, answered, receipt.size)
        return receipt

    def list_parts(self):
        return self.inner.list_parts()

    def complete(self, parts):
        self.sink.log.append("complete")
        etag = self.inner.complete(parts)
        if self.sink.complete_etag:
            etag = self.sink.complete_etag
            if self.sink.etag_is_md5:
                checked_multipart_etag(etag, parts, what=repr(self.key), key=self.key)
        return etag

    def abort(self):
        self.sink.log.append("abort")
        self.inner.abort()


class Recorder(CopyEvents):
    def __init__(self):
        self.bytes = 0
        self.started = []
        self.changed = []

    def attempt_started(self, meta, plan, restarts):
        self.started.append((meta.etag, restarts))

    def source_changed(self, old, new):
        self.changed.append((old.etag, new.etag))

    def bytes_moved(self, n):
        self.bytes += n


def run(source, sink, meta: ObjectMeta, *, settings=None, budget=None, serial=True, events=None,
        dest="out/obj", placement_meta=META) -> ObjectOutcome:
    settings = settings or fast()
    budget = budget or MemoryBudget(settings.memory_budget)
    with create_executors(settings.concurrency, serial=serial) as ex:
        outcome = copy_object(source, sink, meta, Placement(meta.key, dest, placement_meta), settings=settings,
                              budget=budget, executors=ex, events=events)
    assert budget.in_use == 0, "every byte acquired from the budget was given back"
    return outcome


@pytest.fixture
def stores():
    return MemoryStore(label="src"), MemoryStore(limits=LIMITS, label="dst")


# ---- byte-exact copies ---------------------------------------------------------------------------


SIZES = [0, 1, MiB - 1, MiB, MiB + 1, 2 * MiB - 1, 2 * MiB, 2 * MiB + 1, 4 * MiB - 1, 4 * MiB, 4 * MiB + 1, 9 * MiB + 5]


@pytest.mark.parametrize("serial", [True, False], ids=["serial", "threads"])
@pytest.mark.parametrize("size", SIZES)
def test_copies_are_byte_exact_with_headers_and_metadata(stores, size, serial):
    src, dst = stores
    data = os.urandom(size)
    meta = src.add("in/obj", data)
    events = Recorder()
    out = run(src, dst, meta, serial=serial, events=events)

    assert out.status == "ok", out.reason
    assert dst.data("out/obj") == data
    head = dst.head("out/obj")
    assert head.content == META.content
    assert dict(head.metadata) == dict(META.metadata)
    assert out.sha256 == hashlib.sha256(data).hexdigest()
    assert out.md5_checked
    assert out.size == size and out.bytes_sent == size and out.output_size == size
    assert events.bytes == size
    assert dst.pending_uploads() == 0
    if size <= 2 * MiB:
        assert out.parts == 1 and out.dest_etag == hashlib.md5(data).hexdigest()
    else:
        n = -(-size // (2 * MiB))
        assert out.parts == n
        expected = multipart_etag([hashlib.md5(data[i:i + 2 * MiB]).digest() for i in range(0, size, 2 * MiB)])
        assert out.dest_etag == expected == head.etag


def test_a_source_without_content_md5_is_copied_but_not_md5_checked(stores):
    src, dst = stores
    data = os.urandom(3 * MiB)
    meta = src.add("k", data, content_md5=False)
    out = run(src, dst, meta)
    assert out.status == "ok" and not out.md5_checked
    assert dst.data("out/obj") == data


def test_serial_executor_makes_the_order_of_requests_deterministic(stores):
    src, _ = stores
    data = os.urandom(7 * MiB)
    meta = src.add("k", data)
    logs = []
    for _ in range(2):
        sink = FaultySink(MemoryStore(limits=LIMITS))
        source = FaultySource(src)
        out = run(source, sink, meta, serial=True)
        assert out.status == "ok"
        logs.append((source.reads, sink.log))
    assert logs[0] == logs[1]
    reads, calls = logs[0]
    # Part order, each part read then uploaded before the next is read.
    assert reads == [(0, 2 * MiB), (2 * MiB, 4 * MiB), (4 * MiB, 6 * MiB), (6 * MiB, 7 * MiB)]
    assert calls == ["open out/obj", "part 1", "part 2", "part 3", "part 4", "complete"]


# ---- retries ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("serial", [True, False], ids=["serial", "threads"])
def test_a_part_upload_that_fails_once_is_retried(stores, serial):
    src, dst = stores
    data = os.urandom(7 * MiB)
    meta = src.add("k", data)

    def fault(number, attempt):
        if number == 2 and attempt == 1:
            raise TransientError("503 Service Unavailable")

    sink = FaultySink(dst, part_fault=fault)
    out = run(src, sink, meta, serial=serial)
    assert out.status == "ok", out.reason
    assert sink.part_attempts == {1: 1, 2: 2, 3: 1, 4: 1}
    assert dst.data("out/obj") == data
    assert out.sha256 == hashlib.sha256(data).hexdigest()


def test_a_connection_dropping_mid_read_is_retried(stores):
    src, dst = stores
    data = os.urandom(5 * MiB)
    meta = src.add("k", data)

    def drop(call, key, start, end):
        if call == 2:
            raise TransientError("connection reset while reading the body")

    source = FaultySource(src, before_read=drop)
    out = run(source, dst, meta)
    assert out.status == "ok", out.reason
    assert source.reads.count((2 * MiB, 4 * MiB)) == 2
    assert dst.data("out/obj") == data


def test_a_small_object_put_is_retried(stores):
    src, dst = stores
    data = os.urandom(1000)
    meta = src.add("k", data)
    failures = [TransientError("timeout")]
    sink = FaultySink(dst, put_fault=lambda: failures and (_ for _ in ()).throw(failures.pop()))
    out = run(src, sink, meta)
    assert out.status == "ok" and sink.log == ["put out/obj", "put out/obj"]
    assert dst.data("out/obj") == data


def test_retries_are_bounded_and_the_reason_says_so(stores):
    src, dst = stores
    meta = src.add("k", os.urandom(5 * MiB))

    def always(number, attempt):
        if number == 3:
            raise TransientError("503 Service Unavailable")

    sink = FaultySink(dst, part_fault=always)
    out = run(src, sink, meta, settings=fast(part_attempts=4))
    assert out.status == "failed"
    assert "part 3" in out.reason and "4 attempts" in out.reason
    assert sink.part_attempts[3] == 4
    assert "abort" in sink.log
    assert dst.keys() == [] and dst.pending_uploads() == 0


def test_a_wrong_part_etag_from_the_server_is_retried(stores):
    src, dst = stores
    data = os.urandom(3 * MiB)
    meta = src.add("k", data)
    lied = []

    def lie_once(number, attempt, etag):
        if lied:
            return etag
        lied.append(number)
        return "0" * 32

    sink = FaultySink(dst, part_etag=lie_once)
    out = run(src, sink, meta)
    assert out.status == "ok", out.reason
    assert sink.part_attempts[1] == 2
    assert dst.data("out/obj") == data


# ---- failures that must not publish anything ---------------------------------------------------


@pytest.mark.parametrize("size", [1000, 5 * MiB], ids=["single-put", "multipart"])
def test_a_wrong_stored_md5_fails_the_object_and_names_it(stores, size):
    src, dst = stores
    data = os.urandom(size)
    meta = src.add("k", data)
    bad = ObjectMeta(meta.key, meta.size, meta.etag, content_md5=hashlib.md5(b"something else").digest(),
                     content=meta.content, metadata=meta.metadata)
    sink = FaultySink(dst)
    out = run(src, sink, bad)
    assert out.status == "failed"
    assert "corrupt or its stored MD5 is wrong" in out.reason
    assert base64.b64encode(bad.content_md5).decode() in out.reason
    assert dst.keys() == [] and dst.pending_uploads() == 0
    assert "complete" not in sink.log and not any(c.startswith("put") for c in sink.log)


class HashingSink(FaultySink):
    """A sink that hashes the body of every `put` itself (`hashes_writes`, as the SFTP connector
    does) and refuses one whose MD5 is not the announced one before storing anything; `announced`
    records what each `put` was told."""

    hashes_writes = True

    def __init__(self, store: MemoryStore):
        super().__init__(store)
        self.announced: list[bytes | None] = []

    def put(self, key, body, size, meta, md5):
        self.log.append(f"put {key}")
        self.announced.append(md5)
        computed = hashlib.md5(bytes(body)).digest()
        if md5 is not None and computed != md5:
            raise BodyDigestMismatch("wrong MD5", key=key, computed=computed, announced=md5)
        return self.store.put(key, body, size, meta, None)


def test_a_sink_that_hashes_its_writes_checks_a_plain_copy_against_the_stored_md5(stores):
    """The engine announces the source's stored MD5 without hashing the bytes with MD5 itself
    (the sink hashes them as it writes); an encrypted copy's output is announced with none."""
    src, dst = stores
    data = os.urandom(1000)
    meta = src.add("k", data)
    sink = HashingSink(dst)
    out = run(src, sink, meta)
    assert out.status == "ok", out.reason
    assert out.md5_checked and out.sha256 == hashlib.sha256(data).hexdigest()
    assert sink.announced[0] is meta.content_md5, "the stored MD5 itself, not one computed here"
    assert len(sink.announced) == 1 and dst.data("out/obj") == data

    with create_executors(2, serial=True) as ex:
        out = copy_object(src, sink, meta, Placement("k", "out/enc", META), settings=fast(),
                          budget=MemoryBudget(fast().memory_budget), executors=ex, output_format=FakeFramedFormat())
    assert out.status == "ok", out.reason
    assert sink.announced[1] is None and out.md5_checked


def test_a_wrong_stored_md5_found_by_a_hashing_sink_fails_the_object_at_once(stores):
    src, dst = stores
    data = os.urandom(1000)
    meta = src.add("k", data)
    bad = ObjectMeta(meta.key, meta.size, meta.etag, content_md5=hashlib.md5(b"something else").digest(),
                     content=meta.content, metadata=meta.metadata)
    sink = HashingSink(dst)
    out = run(src, sink, bad)
    assert out.status == "failed" and not out.transient
    assert "corrupt or its stored MD5 is wrong" in out.reason
    assert base64.b64encode(bad.content_md5).decode() in out.reason
    assert base64.b64encode(hashlib.md5(data).digest()).decode() in out.reason
    assert sink.log == ["put out/obj"], "no retry: the same bytes would hash the same"
    assert dst.keys() == []


@pytest.mark.parametrize("error", [InvalidRequest("EntityTooSmall"), AuthError("AccessDenied")])
@pytest.mark.parametrize("serial", [True, False], ids=["serial", "threads"])
def test_a_permanent_part_failure_aborts_the_upload(stores, error, serial):
    src, dst = stores
    meta = src.add("k", os.urandom(9 * MiB))

    def fault(number, attempt):
        if number == 2:
            raise error

    sink = FaultySink(dst, part_fault=fault)
    out = run(src, sink, meta, serial=serial)
    assert out.status == "failed" and type(error).__name__ in out.reason
    assert sink.part_attempts[2] == 1  # not retryable: not retried
    assert "abort" in sink.log and "complete" not in sink.log
    assert dst.keys() == [] and dst.pending_uploads() == 0
    if serial:  # later parts are not even read once a part failed
        assert 3 not in sink.part_attempts


def test_a_wrong_etag_after_complete_deletes_the_object(stores):
    src, dst = stores
    meta = src.add("k", os.urandom(5 * MiB))
    sink = FaultySink(dst, complete_etag="0123456789abcdef0123456789abcdef-3")
    out = run(src, sink, meta)
    assert out.status == "failed" and "ETag" in out.reason
    assert sink.log[-1] == "delete out/obj"
    assert dst.keys() == [] and dst.pending_uploads() == 0


def test_an_object_the_destination_cannot_hold_is_refused_before_any_request(stores):
    src, _ = stores
    meta = src.add("k", os.urandom(3 * MiB))
    sink = FaultySink(MemoryStore(limits=SinkLimits(min_part_size=MiB, max_object_size=2 * MiB)))
    out = run(src, sink, meta)
    assert out.status == "failed" and out.refused
    assert "maximum object size" in out.reason
    assert sink.log == []


# ---- the source changes ----------------------------------------------------------------------------


def test_a_source_change_mid_object_restarts_from_the_new_version(stores):
    src, dst = stores
    old = os.urandom(7 * MiB)
    new = os.urandom(6 * MiB + 3)
    meta = src.add("k", old)

    def rewrite(call, key, start, end):
        if call == 3:  # the third range read: parts 1 and 2 of the old version are already sent
            src.add("k", new)

    events = Recorder()
    sink = FaultySink(dst)
    out = run(FaultySource(src, before_read=rewrite), sink, meta, events=events)
    assert out.status == "ok", out.reason
    assert out.restarts == 1
    assert out.source_etag == src.head("k").etag != meta.etag
    assert dst.data("out/obj") == new
    assert out.sha256 == hashlib.sha256(new).hexdigest() and out.size == len(new)
    assert events.changed == [(meta.etag, out.source_etag)]
    assert [r for _, r in events.started] == [0, 1]
    assert events.bytes == len(new)  # progress of the abandoned attempt was taken back
    assert sink.log.count("abort") == 1 and dst.pending_uploads() == 0


def test_a_source_that_keeps_changing_fails_after_max_restarts(stores):
    src, dst = stores
    meta = src.add("k", os.urandom(5 * MiB))

    def rewrite(call, key, start, end):
        if start == 2 * MiB:  # every attempt: rewritten while its second part is read
            src.add("k", os.urandom(5 * MiB))

    sink = FaultySink(dst)
    out = run(FaultySource(src, before_read=rewrite), sink, meta, settings=fast(max_source_restarts=2))
    assert out.status == "failed"
    assert "changed during the copy 3 times" in out.reason and "2 restarts" in out.reason
    assert out.restarts == 2
    assert sink.log.count("abort") == 3
    assert dst.keys() == [] and dst.pending_uploads() == 0


def test_a_source_deleted_during_the_copy_fails_with_that_reason(stores):
    src, dst = stores
    meta = src.add("k", os.urandom(5 * MiB))

    def remove(call, key, start, end):
        if call == 2:
            src.add("k", b"x")  # change it, then remove it before the new head
            src.delete("k")

    out = run(FaultySource(src, before_read=remove), dst, meta)
    assert out.status == "failed" and "deleted" in out.reason
    assert dst.keys() == [] and dst.pending_uploads() == 0


# ---- the memory bound --------------------------------------------------------------------------------


def test_budget_holds_for_an_object_many_times_the_budget_buffered(stores):
    src, dst = stores
    data = os.urandom(64 * MiB)
    meta = src.add("k", data)
    settings = fast(memory_budget=4 * MiB, part_size=MiB, concurrency=8)
    budget = MemoryBudget(settings.memory_budget)
    out = run(src, dst, meta, settings=settings, budget=budget, serial=False)
    assert out.status == "ok" and out.parts == 64
    assert dst.data("out/obj") == data
    assert budget.peak <= 4 * MiB
    assert budget.grants == 64


def test_budget_holds_for_parts_larger_than_the_budget_streamed(stores):
    src, dst = stores
    data = os.urandom(40 * MiB + 17)
    meta = src.add("k", data)
    settings = fast(memory_budget=4 * MiB, part_size=16 * MiB, stream_slice_size=8 * MiB, concurrency=4)
    budget = MemoryBudget(settings.memory_budget)
    source = FaultySource(src)
    out = run(source, dst, meta, settings=settings, budget=budget, serial=False)
    assert out.status == "ok", out.reason
    assert out.parts == 3
    assert dst.data("out/obj") == data
    assert out.sha256 == hashlib.sha256(data).hexdigest()
    assert budget.peak <= 2 * MiB  # one slice of at most half the budget at a time
    assert max(end - start for start, end in source.reads) == 2 * MiB


def test_a_streamed_part_dropped_mid_body_is_resent_and_hashed_once(stores):
    src, dst = stores
    data = os.urandom(20 * MiB)
    meta = src.add("k", data)
    settings = fast(memory_budget=4 * MiB, part_size=8 * MiB)
    sink = FaultySink(dst, mid_body_fault=lambda number, attempt: number == 2 and attempt == 1)
    source = FaultySource(src)
    out = run(source, sink, meta, settings=settings)
    assert out.status == "ok", out.reason
    assert sink.part_attempts[2] == 2
    assert dst.data("out/obj") == data
    # The part's bytes were read twice but hashed once.
    assert out.sha256 == hashlib.sha256(data).hexdigest()
    assert source.reads.count((8 * MiB, 10 * MiB)) == 2


def test_a_source_change_inside_a_streamed_part_restarts_the_object(stores):
    src, dst = stores
    new = os.urandom(20 * MiB)
    meta = src.add("k", os.urandom(20 * MiB))

    def rewrite(call, key, start, end):
        if call == 5:
            src.add("k", new)

    out = run(FaultySource(src, before_read=rewrite), dst, meta, settings=fast(memory_budget=4 * MiB, part_size=8 * MiB))
    assert out.status == "ok", out.reason
    assert out.restarts == 1 and dst.data("out/obj") == new
    assert dst.pending_uploads() == 0


def test_a_sink_whose_etags_are_not_md5_is_not_etag_checked(stores):
    src, dst = stores
    meta = src.add("k", os.urandom(5 * MiB))
    sink = FaultySink(dst, complete_etag="opaque-sse-kms-etag")
    sink.etag_is_md5 = False
    out = run(src, sink, meta)
    assert out.status == "ok" and out.dest_etag == "opaque-sse-kms-etag"


class RecordingEvents(Recorder):
    def __init__(self):
        super().__init__()
        self.parts = []

    def part_uploaded(self, part, receipt, md5):
        self.parts.append((receipt.number, receipt.etag, md5))


def _spy_parts(monkeypatch) -> tuple[list, dict, list]:
    """The MD5 sent with each part, each part's offset and the receipts, as `FaultyUpload.upload_part`
    sees them."""
    sent, offsets, receipts = [], {}, []
    real = FaultyUpload.upload_part

    def spy(self, number, body, size, md5, offset=None):
        sent.append(md5)
        offsets[number] = offset
        receipts.append(real(self, number, body, size, md5, offset))
        return receipts[-1]

    monkeypatch.setattr(FaultyUpload, "upload_part", spy)
    return sent, offsets, receipts


@pytest.mark.parametrize("budget", [None, 4 * MiB], ids=["buffered", "streamed"])
def test_a_sink_that_wants_no_part_md5_is_sent_none_and_its_receipts_are_recorded(stores, monkeypatch, budget):
    """`part_md5 = False` (the SFTP connector): no part is hashed or sent with an MD5, buffered or
    streamed; each receipt is recorded as it came, with no MD5. Each part goes with its offset in
    the object (the SFTP connector writes it there)."""
    src, dst = stores
    data = os.urandom(5 * MiB)
    meta = src.add("k", data)
    sink = FaultySink(dst)
    sink.part_md5 = False
    sink.etag_is_md5 = False
    sent, offsets, receipts = _spy_parts(monkeypatch)
    events = RecordingEvents()
    settings = fast(memory_budget=budget) if budget else None
    out = run(src, sink, meta, events=events, settings=settings)
    assert out.status == "ok" and dst.read_range("out/obj", 0, len(data)) == data
    assert sent == [None, None, None] and offsets == {1: 0, 2: 2 * MiB, 3: 4 * MiB}
    assert sorted(events.parts) == sorted((r.number, r.etag, None) for r in receipts)


def test_a_sink_whose_etags_are_md5s_is_sent_part_md5s_whatever_it_says(stores, monkeypatch):
    src, dst = stores
    data = os.urandom(5 * MiB)
    meta = src.add("k", data)
    sink = FaultySink(dst)
    sink.part_md5 = False
    sent, _, _ = _spy_parts(monkeypatch)
    events = RecordingEvents()
    out = run(src, sink, meta, events=events)
    assert out.status == "ok"
    md5s = [hashlib.md5(data[(n - 1) * 2 * MiB:n * 2 * MiB]).digest() for n in (1, 2, 3)]
    assert sorted(sent) == sorted(md5s) and [m for _, _, m in sorted(events.parts)] == md5s


def test_attempts_count_every_request_when_nothing_fails(stores):
    src, dst = stores
    meta = src.add("k", os.urandom(7 * MiB))
    out = run(src, dst, meta)
    assert out.attempts == 4 + 4 + 2  # reads, part uploads, open + complete


# ---- the output seam: a framed format with Tink's sizes (not Tink's crypto) -----------------------


class FakeFramedFormat:
    """Tink's framing with fake 'encryption': a 40-byte header, plaintext as is, a 16-byte tag per
    segment. Enough to prove the pipeline plans, charges and streams non-identity output right."""

    from engine.crypto.segments import FramedLayout as _FL

    layout = _FL(header_size=40, tag_size=16)
    copies = True

    def __init__(self):
        self.begun = 0

    def metadata_for(self, meta):
        return {"exitplan-format": "fake-framed"}

    def begin(self, meta):
        self.begun += 1
        return FakeEncoder(self.layout, meta.size, header=bytes([self.begun]) * 40)


class FakeEncoder:
    key_id = None

    def __init__(self, layout, size, header):
        self.layout, self.size, self.header = layout, size, header
        self.metadata = {"exitplan-format": "fake-framed"}

    def encode(self, first_segment, plaintext):
        out = []
        base = self.layout.segment_plaintext_range(first_segment, self.size)[0]
        seg, consumed = first_segment, 0
        while consumed < len(plaintext) or (seg == first_segment and not plaintext):
            start, end = self.layout.segment_plaintext_range(seg, self.size)
            chunk = bytes(plaintext[start - base:end - base])
            out.append((self.header if seg == 0 else b"") + chunk + seg.to_bytes(16, "big"))
            consumed += len(chunk)
            seg += 1
        return b"".join(out)


def framed(data: bytes, header: bytes) -> bytes:
    layout = FakeFramedFormat.layout
    n = layout.segment_count(len(data))
    parts = []
    for i in range(n):
        s, e = layout.segment_plaintext_range(i, len(data))
        parts.append((header if i == 0 else b"") + data[s:e] + i.to_bytes(16, "big"))
    return b"".join(parts)


@pytest.mark.parametrize("size,budget,part", [
    (0, 16 * MiB, 2 * MiB),
    (MiB - 56, 16 * MiB, 2 * MiB),        # exactly one full segment
    (5 * MiB + 1, 16 * MiB, 2 * MiB),     # buffered multipart, parts of 2 segments
    (9 * MiB, 4 * MiB, 4 * MiB),          # parts above the budget: streamed, charged twice
])
def test_a_non_identity_format_is_planned_charged_and_written_exactly(stores, size, budget, part):
    src, dst = stores
    data = os.urandom(size)
    meta = src.add("k", data)
    fmt = FakeFramedFormat()
    cfg = fast(memory_budget=budget, part_size=part)
    b = MemoryBudget(budget)
    with create_executors(cfg.concurrency, serial=False) as ex:
        out = copy_object(src, dst, meta, Placement("k", "out/obj", META), settings=cfg, budget=b, executors=ex,
                          output_format=fmt)
    assert out.status == "ok", out.reason
    expected = framed(data, bytes([1]) * 40)
    assert dst.data("out/obj") == expected
    assert out.output_size == out.bytes_sent == len(expected) == fmt.layout.output_size(size)
    assert out.sha256 == hashlib.sha256(data).hexdigest()
    assert dst.head("out/obj").metadata["exitplan-format"] == "fake-framed"
    assert b.peak <= budget and b.in_use == 0


def test_a_single_put_runs_on_its_driver_within_the_budget(stores):
    """No hand-off to a transfer worker for a small object: the driver reads and PUTs it itself,
    holding its bytes in the budget meanwhile; multipart parts still go to the workers."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from engine.executors import Executors

    class CountingPool(ThreadPoolExecutor):
        submitted = 0

        def submit(self, fn, /, *args, **kwargs):
            CountingPool.submitted += 1
            return super().submit(fn, *args, **kwargs)

    src, dst = stores
    small, big = os.urandom(MiB), os.urandom(5 * MiB)
    budget = MemoryBudget(fast().memory_budget)
    held = []
    driver = []

    class Watch(FaultySource):
        def read_range(self, key, start, end, *, if_match=None):
            held.append(budget.in_use)
            driver.append(threading.current_thread().name)
            return super().read_range(key, start, end, if_match=if_match)

    source = Watch(src)
    with Executors(ThreadPoolExecutor(2, thread_name_prefix="driver"), CountingPool(2), False) as ex:
        for key, data in (("small", small), ("big", big)):
            meta = src.add(key, data)
            out = ex.objects.submit(copy_object, source, dst, meta, Placement(key, f"out/{key}", META),
                                    settings=fast(), budget=budget, executors=ex).result()
            assert out.status == "ok" and dst.data(f"out/{key}") == data
    assert driver[0].startswith("driver") and held[0] == MiB  # the small one: on its driver, charged
    assert CountingPool.submitted == 3  # the big one's three parts, nothing for the small one
    assert budget.in_use == 0 and budget.grants == 4


def test_parts_already_submitted_end_before_the_upload_is_aborted_when_submitting_fails(stores):
    """A part still uploading when its upload is aborted may survive the abort (S3 says so): when
    handing a part to the transfer workers fails, the parts handed over before end first."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from engine.executors import Executors

    class RefusingAfterTwo(ThreadPoolExecutor):
        def __init__(self):
            super().__init__(4)
            self.calls = 0

        def submit(self, fn, /, *args, **kwargs):
            self.calls += 1
            if self.calls == 3:
                raise RuntimeError("cannot schedule new futures after shutdown")
            return super().submit(fn, *args, **kwargs)

    src, dst = stores
    events: list[str] = []
    lock = threading.Lock()

    def slow_part(number, attempt):
        with lock:
            events.append(f"part {number} starts")
        time.sleep(0.3)
        with lock:
            events.append(f"part {number} ends")

    sink = FaultySink(dst, part_fault=slow_part)
    sink.log = events  # one timeline: the sink's calls and the parts' ends
    meta = src.add("k", os.urandom(7 * MiB))
    with Executors(ThreadPoolExecutor(1), RefusingAfterTwo(), False) as ex:
        out = copy_object(src, sink, meta, Placement("k", "out/obj", META), settings=fast(),
                          budget=MemoryBudget(fast().memory_budget), executors=ex)
        with lock:
            events.append("copy_object returned")
    assert out.status == "failed" and "cannot schedule new futures" in out.reason
    assert sorted(e for e in events if e.endswith(("starts", "ends"))) == [
        "part 1 ends", "part 1 starts", "part 2 ends", "part 2 starts"]
    assert events[-2:] == ["abort", "copy_object returned"]  # both parts had ended before the abort
    assert list(dst.list_multipart_uploads("out/")) == [] and "out/obj" not in dst.keys()


@pytest.mark.parametrize("size", [0, 1, 2047, 2048, 5000, 16 * 1024, 32 * 1024, 32 * 1024 + 1, 100_000])
def test_small_buffers_hashed_in_slices_give_the_same_digests(size):
    # Buffers up to 32 KiB are hashed in slices that keep the GIL (engine/ordered_digest.py): the
    # digests must be the ones of the whole buffer, whatever its type.
    data = os.urandom(size)
    for body in (data, bytearray(data), memoryview(data), memoryview(bytearray(data)).cast("B")):
        assert md5_digest(body) == hashlib.md5(data).digest()
        sha = hashlib.sha256()
        hash_update(sha, body)
        assert sha.digest() == hashlib.sha256(data).digest()
    if size % 4 == 0 and size:
        words = memoryview(data).cast("I")  # a view whose items are not bytes
        assert md5_digest(words) == hashlib.md5(data).digest()
    digest = OrderedDigest(want_md5=True)
    digest.update(data[: size // 3])
    digest.update(memoryview(data)[size // 3:])
    assert (digest.sha256.digest(), digest.md5.digest(), digest.count) == (
        hashlib.sha256(data).digest(), hashlib.md5(data).digest(), size)
