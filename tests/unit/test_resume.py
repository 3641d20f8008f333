"""Resume of a killed run, on the in-memory connectors, with tink as the oracle for the bytes.

A kill is simulated by `Killed` (a BaseException, as KeyboardInterrupt is: the engine must not
abort the upload for it) raised by the sink at a chosen point; from then on every sink call
raises it, as nothing reaches the destination from a dead process. A second run (a new run id on
the same state store) must finish every object, send only the parts that are missing, and write
bytes that tink decrypts to the source.
"""

from __future__ import annotations

import hashlib
import io
import random
import threading
from collections import Counter

import pytest
from tink import streaming_aead

from connectors.base import ObjectMeta, SinkLimits
from connectors.memory import MemoryStore
from engine import state as st
from engine.budget import MemoryBudget
from engine.crypto.datakeys import data_keys, new_keyset
from engine.crypto.tink_format import HEADER_SIZE, TinkFormat, associated_data
from engine.executors import create_executors
from engine.dataset_copy import copy_objects, place_all, resume_point
from engine.placement import place
from engine.planning import MiB
from engine.settings import TransferSettings
from engine.state import PartRecord, StateStore

LIMITS = SinkLimits(min_part_size=MiB, max_part_size=64 * MiB, max_parts=10_000)
DATASET = "claims"


class Killed(BaseException):
    """The process died here."""


class KillingSink:
    """A MemoryStore sink that dies at a chosen point and counts the part uploads that reached it.

    `kill_at`: ("open", 0) dies right after the upload is opened (its first part never leaves);
    ("part", k) lets k parts through, then dies before sending the next; ("sent", k) lets k parts
    through, then sends the next and dies before its answer comes back (uploaded, never recorded).
    None: never dies.
    """

    def __init__(self, store: MemoryStore, kill_at: tuple[str, int] | None = None):
        self.store = store
        self.kill_at = kill_at
        self.limits, self.unsupported, self.label = store.limits, store.unsupported, "killing"
        self.etag_is_md5 = store.etag_is_md5
        self.behaviour = store.behaviour
        self.dead = False
        self.parts_sent: Counter[str] = Counter()  # source key -> parts stored by the destination
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()

    def _alive(self) -> None:
        if self.dead:
            raise Killed()

    def die(self) -> None:
        self.dead = True
        raise Killed()

    def head(self, key):
        return self.store.head(key)

    def put(self, key, body, size, meta, md5):
        self._alive()
        return self.store.put(key, body, size, meta, md5)

    def open_multipart(self, key, meta):
        self._alive()
        upload = self.store.open_multipart(key, meta)
        if self.kill_at is not None and self.kill_at[0] == "open":
            return _KillingUpload(self, upload, die_first=True)
        return _KillingUpload(self, upload)

    def resume_multipart(self, key, upload_id):
        self._alive()
        return _KillingUpload(self, self.store.resume_multipart(key, upload_id))

    def list_multipart_uploads(self, prefix=""):
        return self.store.list_multipart_uploads(prefix)

    def delete(self, key):
        self.store.delete(key)


class _KillingUpload:
    def __init__(self, sink: KillingSink, inner, die_first: bool = False):
        self.sink, self.inner, self.die_first = sink, inner, die_first
        self.key, self.upload_id = inner.key, inner.upload_id

    def upload_part(self, number, body, size, md5, offset=None):
        sink = self.sink
        sink._alive()
        if self.die_first:
            sink.die()
        with sink._lock:
            sent = sum(sink.parts_sent.values())
            mode, k = sink.kill_at or ("", -1)
            if mode == "part" and sent >= k:
                sink.dead = True
            sink.in_flight += 1
            sink.max_in_flight = max(sink.max_in_flight, sink.in_flight)
        try:
            sink._alive()
            receipt = self.inner.upload_part(number, body, size, md5, offset)
            with sink._lock:
                sink.parts_sent["in/" + self.key[len("out/"):]] += 1
                if mode == "sent" and sum(sink.parts_sent.values()) > k:
                    sink.dead = True
            sink._alive()  # the part is stored, but its answer is lost
            return receipt
        finally:
            with sink._lock:
                sink.in_flight -= 1

    def list_parts(self):
        self.sink._alive()
        return self.inner.list_parts()

    def complete(self, parts):
        self.sink._alive()
        etag = self.inner.complete(parts)
        if self.sink.kill_at is not None and self.sink.kill_at[0] == "complete":
            self.sink.die()  # completed, but the answer never came back
        return etag

    def abort(self):
        self.sink._alive()
        self.inner.abort()


def settings(**overrides) -> TransferSettings:
    base = dict(memory_budget=16 * MiB, part_size=MiB, small_object_cutoff=MiB, concurrency=3, object_concurrency=2,
                retry_wait_initial=0, retry_wait_max=0, part_attempts=2)
    base.update(overrides)
    return TransferSettings(**base)


@pytest.fixture(scope="module")
def handle():
    return new_keyset()


@pytest.fixture(scope="module")
def fmt(handle):
    return TinkFormat(data_keys(handle), DATASET)


@pytest.fixture
def state(tmp_path):
    s = StateStore(tmp_path / ".exitplan" / "state.db")
    yield s
    s.close()


def placer(meta):
    return place(meta, "in/", "out", LIMITS)


def migrate(src, sink, state, fmt, cfg, *, serial=False):
    run_id = state.start_run("migrate")
    budget = MemoryBudget(cfg.memory_budget)
    with create_executors(cfg.concurrency, cfg.object_concurrency, serial=serial) as ex:
        summary = copy_objects(DATASET, src, sink, place_all(src.list("in/"), placer), settings=cfg, budget=budget,
                                  executors=ex, state=state, run_id=run_id, output_format=fmt)
    assert budget.in_use == 0
    return run_id, summary


def decrypt(handle, key: str, ciphertext: bytes) -> bytes:
    oracle = handle.primitive(streaming_aead.StreamingAead)
    with oracle.new_decrypting_stream(io.BytesIO(ciphertext), associated_data(DATASET, key)) as stream:
        return stream.read()


def seed(src: MemoryStore, rng: random.Random) -> dict[str, bytes]:
    data = {
        "in/big-a.bin": rng.randbytes(7 * MiB + 123),  # 8 parts of 1 MiB of ciphertext
        "in/big-b.bin": rng.randbytes(5 * MiB + 7),
        "in/small-1.bin": rng.randbytes(1000),
        "in/small-2.bin": b"",
    }
    for key, value in data.items():
        src.add(key, value)
    return data


def assert_all_copied(handle, state, run_id, dst, data):
    rows = {r.source_key: r for r in state.objects(run_id)}
    for key, value in data.items():
        assert rows[key].state in (st.UPLOADED, st.UNCHANGED), (key, rows[key].reason)
        out = dst.data("out/" + key[len("in/"):])
        assert decrypt(handle, key, out) == value, key
        assert rows[key].sha256 == hashlib.sha256(value).hexdigest()
    assert dst.pending_uploads() == 0


def planned_parts(src, key, cfg, fmt) -> int:
    from engine.pipeline import single_put_cutoff
    from engine.planning import plan_object

    return plan_object(src.head(key).size, LIMITS, layout=fmt.layout, part_size=cfg.part_size,
                       single_put_cutoff=single_put_cutoff(cfg, cfg.memory_budget, fmt.copies)).part_count


@pytest.mark.parametrize("serial", [True, False], ids=["serial", "threads"])
@pytest.mark.parametrize("kill_at", [("open", 0), ("part", 3), ("sent", 3), ("sent", 10)],
                         ids=["after-open", "after-3-parts", "between-upload-and-record", "second-object"])
def test_a_killed_run_resumes_sending_only_the_missing_parts(handle, fmt, state, kill_at, serial):
    cfg = settings()
    src, dst = MemoryStore(label="src"), MemoryStore(limits=LIMITS, label="dst")
    data = seed(src, random.Random(7))
    killing = KillingSink(dst, kill_at)
    migrate(src, killing, state, fmt, cfg, serial=serial)
    assert killing.dead
    assert dst.pending_uploads() >= 1, "an interrupted upload is kept for the next run"
    first = killing.parts_sent
    in_flight = killing.max_in_flight

    # What the killed run left is resumable: upload id and header recorded, parts recorded.
    left = {k: resume_point(state, DATASET, k) for k in data}
    interrupted = {k for k, r in left.items() if r is not None}
    assert interrupted
    for key in interrupted:
        assert left[key].header is not None and len(left[key].header) == HEADER_SIZE
        assert len(left[key].parts) <= first[key]

    again = KillingSink(dst)
    run_id, summary = migrate(src, again, state, fmt, cfg, serial=serial)
    assert summary.failed == 0, summary.failures
    assert_all_copied(handle, state, run_id, dst, data)
    for key in interrupted:
        total = first[key] + again.parts_sent[key]
        resent = total - planned_parts(src, key, cfg, fmt)
        assert 0 <= resent <= in_flight, (key, first[key], again.parts_sent[key])
        # The object carries the header recorded by the killed run: the upload was continued.
        assert dst.data("out/" + key[len("in/"):])[:HEADER_SIZE] == left[key].header
        row = next(r for r in state.objects(run_id) if r.source_key == key)
        assert row.upload_id == left[key].upload_id
    assert sum(first.values()) > 0 or kill_at[0] == "open"


def test_a_part_uploaded_but_not_recorded_is_checked_and_kept(handle, fmt, state):
    cfg = settings()
    src, dst = MemoryStore(label="src"), MemoryStore(limits=LIMITS, label="dst")
    data = {"in/big.bin": random.Random(1).randbytes(6 * MiB)}
    src.add("in/big.bin", data["in/big.bin"])
    killing = KillingSink(dst, ("sent", 2))  # parts 1, 2 recorded; part 3 stored, its answer lost
    migrate(src, killing, state, fmt, cfg, serial=True)
    left = resume_point(state, DATASET, "in/big.bin")
    assert [p.number for p in left.parts] == [1, 2]
    assert [p.number for p in dst.resume_multipart("out/big.bin", left.upload_id).list_parts()] == [1, 2, 3]

    again = KillingSink(dst)
    run_id, summary = migrate(src, again, state, fmt, cfg, serial=True)
    assert summary.failed == 0
    assert again.parts_sent["in/big.bin"] == planned_parts(src, "in/big.bin", cfg, fmt) - 3
    assert_all_copied(handle, state, run_id, dst, data)


def test_a_listed_part_that_is_not_ours_is_sent_again(handle, fmt, state):
    cfg = settings()
    src, dst = MemoryStore(label="src"), MemoryStore(limits=LIMITS, label="dst")
    data = {"in/big.bin": random.Random(2).randbytes(6 * MiB)}
    src.add("in/big.bin", data["in/big.bin"])
    migrate(src, KillingSink(dst, ("part", 3)), state, fmt, cfg, serial=True)
    left = resume_point(state, DATASET, "in/big.bin")
    upload = dst.resume_multipart("out/big.bin", left.upload_id)
    body, _ = upload.parts[2]
    bad = bytes([body[0] ^ 1]) + body[1:]
    upload.parts[2] = (bad, hashlib.md5(bad).hexdigest())  # a part that is not what we sent

    again = KillingSink(dst)
    run_id, summary = migrate(src, again, state, fmt, cfg, serial=True)
    assert summary.failed == 0
    assert again.parts_sent["in/big.bin"] == planned_parts(src, "in/big.bin", cfg, fmt) - 2
    assert_all_copied(handle, state, run_id, dst, data)


def test_an_upload_completed_but_not_recorded_is_not_sent_again(handle, fmt, state):
    cfg = settings()
    src, dst = MemoryStore(label="src"), MemoryStore(limits=LIMITS, label="dst")
    data = {"in/big.bin": random.Random(6).randbytes(5 * MiB)}
    src.add("in/big.bin", data["in/big.bin"])
    migrate(src, KillingSink(dst, ("complete", 0)), state, fmt, cfg, serial=True)
    left = resume_point(state, DATASET, "in/big.bin")
    assert left is not None and dst.pending_uploads() == 0  # completed, the state does not know it

    again = KillingSink(dst)
    run_id, summary = migrate(src, again, state, fmt, cfg, serial=True)
    assert summary.failed == 0, summary.failures
    assert again.parts_sent["in/big.bin"] == 0
    assert_all_copied(handle, state, run_id, dst, data)
    assert dst.data("out/big.bin")[:HEADER_SIZE] == left.header


def test_a_source_changed_between_runs_restarts_under_a_new_header(handle, fmt, state):
    cfg = settings()
    src, dst = MemoryStore(label="src"), MemoryStore(limits=LIMITS, label="dst")
    rng = random.Random(3)
    src.add("in/big.bin", rng.randbytes(6 * MiB))
    migrate(src, KillingSink(dst, ("part", 2)), state, fmt, cfg, serial=False)
    left = resume_point(state, DATASET, "in/big.bin")
    assert left is not None
    new = rng.randbytes(6 * MiB + 5)
    src.add("in/big.bin", new)  # a new version: a new ETag

    again = KillingSink(dst)
    run_id, summary = migrate(src, again, state, fmt, cfg)
    assert summary.failed == 0
    assert_all_copied(handle, state, run_id, dst, {"in/big.bin": new})
    assert dst.data("out/big.bin")[:HEADER_SIZE] != left.header
    assert again.parts_sent["in/big.bin"] == planned_parts(src, "in/big.bin", cfg, fmt)
    assert dst.pending_uploads() == 0, "the old upload was aborted"


def test_an_upload_gone_meanwhile_restarts_the_object(handle, fmt, state):
    cfg = settings()
    src, dst = MemoryStore(label="src"), MemoryStore(limits=LIMITS, label="dst")
    data = {"in/big.bin": random.Random(4).randbytes(4 * MiB)}
    src.add("in/big.bin", data["in/big.bin"])
    migrate(src, KillingSink(dst, ("part", 2)), state, fmt, cfg, serial=True)
    left = resume_point(state, DATASET, "in/big.bin")
    dst.resume_multipart("out/big.bin", left.upload_id).abort()  # a lifecycle rule removed it

    again = KillingSink(dst)
    run_id, summary = migrate(src, again, state, fmt, cfg, serial=True)
    assert summary.failed == 0
    assert_all_copied(handle, state, run_id, dst, data)
    assert dst.data("out/big.bin")[:HEADER_SIZE] != left.header


def test_a_definitive_failure_still_aborts_the_upload(fmt, state):
    class Refusing(KillingSink):
        def open_multipart(self, key, meta):
            upload = super().open_multipart(key, meta)
            upload.upload_part = lambda *a: (_ for _ in ()).throw(
                __import__("connectors.base", fromlist=["AuthError"]).AuthError("AccessDenied"))
            return upload

    cfg = settings()
    src, dst = MemoryStore(label="src"), MemoryStore(limits=LIMITS, label="dst")
    src.add("in/big.bin", random.Random(5).randbytes(3 * MiB))
    _, summary = migrate(src, Refusing(dst), state, fmt, cfg, serial=True)
    assert summary.failed == 1
    assert dst.pending_uploads() == 0
    assert resume_point(state, DATASET, "in/big.bin") is None


def test_state_records_the_upload_and_its_parts(state):
    run = state.start_run("migrate")
    oid = state.add_object(run, DATASET, "k", "e1", 10, dest_key="d", state=st.IN_PROGRESS)
    header = bytes([HEADER_SIZE]) + bytes(range(39))
    state.record_upload(oid, "up-1", header, 7)
    state.record_parts(oid, [PartRecord(1, "a" * 32, 5, "a" * 32), PartRecord(2, "b" * 32, 5, "b" * 32)])
    state.record_parts(oid, [PartRecord(2, "c" * 32, 5, "c" * 32)])  # a part sent again replaces its receipt
    row = state.resumable(DATASET, "k")
    assert (row.upload_id, bytes.fromhex(row.header), row.key_id) == ("up-1", header, 7)
    assert [(p.number, p.etag) for p in state.parts(oid)] == [(1, "a" * 32), (2, "c" * 32)]
    assert state.upload_ids() == {"up-1"}
    # A later run killed before it recorded an upload does not hide this one.
    run2 = state.start_run("migrate")
    state.add_object(run2, DATASET, "k", "e1", 10, dest_key="d", state=st.IN_PROGRESS)
    assert state.resumable(DATASET, "k").id == oid
    # A finished object is not resumable.
    state.transition(oid, st.UPLOADED)
    assert state.resumable(DATASET, "k") is None
    # record_upload is refused for an object that is not in progress.
    with pytest.raises(st.InvalidTransition):
        state.record_upload(oid, "up-2", None, None)


def test_an_older_state_store_gains_the_resume_columns(tmp_path):
    import sqlite3

    path = tmp_path / "old.db"
    with StateStore(path) as s:
        s.start_run("migrate")
    conn = sqlite3.connect(path)
    conn.execute("DROP TABLE parts")
    for col in ("upload_id", "header", "key_id"):
        conn.execute(f"ALTER TABLE objects DROP COLUMN {col}")
    conn.commit()
    conn.close()
    with StateStore(path) as s:
        run = s.start_run("migrate")
        oid = s.add_object(run, DATASET, "k", "e", 1, state=st.IN_PROGRESS)
        s.record_upload(oid, "u", None, None)
        assert s.get_object(oid).upload_id == "u"


def test_an_encryptor_built_from_a_recorded_header_gives_the_same_ciphertext(handle, fmt):
    from engine.crypto.tink_format import FormatError, ObjectEncryptor

    data = random.Random(8).randbytes(3 * MiB + 11)
    meta = ObjectMeta("in/x.bin", len(data), "e1")
    first = fmt.begin(meta)
    again = fmt.begin(meta, header=first.header, key_id=first.key_id)
    fresh = fmt.begin(meta)
    assert again.header == first.header and fresh.header != first.header
    assert bytes(again.encode(0, data)) == bytes(first.encode(0, data))
    assert decrypt(handle, "in/x.bin", bytes(again.encode(0, data))) == data
    with pytest.raises(FormatError):
        ObjectEncryptor(fmt.keys.primary, b"aad", header=b"\x28" + bytes(10))


@pytest.mark.parametrize("kill_at", [("part", 2), ("sent", 2)], ids=["before-send", "between-upload-and-record"])
def test_streamed_parts_resume_too(handle, fmt, state, kill_at):
    from engine.pipeline import buffer_limit

    cfg = settings(memory_budget=4 * MiB, part_size=2 * MiB, stream_slice_size=MiB)
    assert 2 * 2 * MiB > buffer_limit(cfg.memory_budget), "parts of this size are streamed"
    src, dst = MemoryStore(label="src"), MemoryStore(limits=LIMITS, label="dst")
    data = {"in/big.bin": random.Random(9).randbytes(9 * MiB + 3)}
    src.add("in/big.bin", data["in/big.bin"])
    first = KillingSink(dst, kill_at)
    migrate(src, first, state, fmt, cfg, serial=True)
    assert first.dead and resume_point(state, DATASET, "in/big.bin") is not None

    again = KillingSink(dst)
    run_id, summary = migrate(src, again, state, fmt, cfg, serial=True)
    assert summary.failed == 0, summary.failures
    total = first.parts_sent["in/big.bin"] + again.parts_sent["in/big.bin"]
    assert total == planned_parts(src, "in/big.bin", cfg, fmt), "no part was sent twice"
    assert_all_copied(handle, state, run_id, dst, data)
