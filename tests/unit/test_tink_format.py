"""The Tink format, with tink (PyPI `tink`, Google's C++ implementation) as the oracle both ways.

Our ciphertext must decrypt with tink; tink's must decrypt with ours (whole and segment by segment);
every tamper must be rejected by tink; the pipeline's output must decrypt with tink.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import re
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import pytest
import tink
from tink import secret_key_access, streaming_aead

from connectors.base import ObjectMeta, SinkLimits, WriteMeta
from connectors.memory import MemoryStore
from engine.budget import MemoryBudget
from engine.crypto.datakeys import DataKey, KeysetError, data_keys, new_keyset
from engine.crypto.segments import FramedLayout, MiB
from engine.crypto.tink_format import (
    FORMAT_ID,
    HEADER_SIZE,
    META_ASSOCIATED_DATA,
    META_FORMAT,
    META_KEY_ID,
    META_PLAINTEXT_SIZE,
    TAG_SIZE,
    TINK_LAYOUT,
    DecryptionError,
    FormatError,
    MetadataError,
    ObjectDecryptor,
    ObjectEncryptor,
    SegmentReuseError,
    TinkFormat,
    TinkLayout,
    associated_data,
    decrypt_object,
    decrypt_segment,
    key_for,
    object_id,
    read_object_metadata,
)
from engine.executors import create_executors
from engine.placement import RESERVED_PREFIX, DoesNotFit, Placement, metadata_bytes, place, source_metadata
from engine.pipeline import copy_object
from engine.planning import plan_object
from engine.settings import TransferSettings

SEG = 1_048_576
FIRST = SEG - HEADER_SIZE - TAG_SIZE  # 1,048,520 plaintext bytes in segment 0
FULL = SEG - TAG_SIZE  # 1,048,560 in every other full segment
DOCS = Path(__file__).resolve().parents[2] / "docs" / "FORMAT.md"

SIZES = [
    0, 1, 1000,
    FIRST - 1, FIRST, FIRST + 1,                    # the first segment boundary ± 1
    FIRST + FULL - 1, FIRST + FULL, FIRST + FULL + 1,  # the second
    FIRST + 3 * FULL - 1, FIRST + 3 * FULL, FIRST + 3 * FULL + 1,
]


class _KeptOpen(io.BytesIO):
    """tink closes the stream it encrypts into; keep the bytes readable."""

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def handle():
    return new_keyset()


@pytest.fixture(scope="module")
def keys(handle):
    return data_keys(handle)


@pytest.fixture(scope="module")
def oracle(handle):
    return handle.primitive(streaming_aead.StreamingAead)


def tink_decrypt(oracle, ciphertext: bytes, aad: bytes) -> bytes:
    with oracle.new_decrypting_stream(io.BytesIO(ciphertext), aad) as stream:
        return stream.read()


def tink_encrypt(oracle, plaintext: bytes, aad: bytes) -> bytes:
    out = _KeptOpen()
    with oracle.new_encrypting_stream(out, aad) as stream:
        stream.write(plaintext)
    return out.getvalue()


def encrypt_shuffled(encryptor: ObjectEncryptor, data: bytes, threads: int = 4, seed: int = 0) -> bytes:
    """Encrypt every segment of `data` on `threads` threads in a shuffled order; join in order."""
    n = TINK_LAYOUT.segment_count(len(data))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    view = memoryview(data)

    def one(i: int) -> tuple[int, bytes]:
        s, e = TINK_LAYOUT.segment_plaintext_range(i, len(data))
        return i, encryptor.encrypt_segment(i, view[s:e], i == n - 1)

    with ThreadPoolExecutor(threads) as pool:
        done = dict(pool.map(one, order))
    return b"".join(done[i] for i in range(n))


def segments_of(ciphertext: bytes) -> list[bytes]:
    """Header + segment 0 as the first item, then each later segment."""
    return [ciphertext[i:i + SEG] for i in range(0, len(ciphertext), SEG)]


AAD = associated_data("claims", "2023/01/claims-0001.parquet")


# ---- layout ---------------------------------------------------------------------------------------


def test_the_layout_is_the_framed_layout_with_tinks_numbers():
    framed = FramedLayout(header_size=40, tag_size=16)
    assert isinstance(TINK_LAYOUT, TinkLayout) and isinstance(TINK_LAYOUT, FramedLayout)
    assert TINK_LAYOUT.max_segments == 2**32
    assert TINK_LAYOUT.first_segment_plaintext == FIRST == 1_048_520
    assert TINK_LAYOUT.segment_plaintext == FULL == 1_048_560
    for size in SIZES + [50 * MiB + 3]:
        n = framed.segment_count(size)
        assert TINK_LAYOUT.segment_count(size) == n
        assert TINK_LAYOUT.output_size(size) == framed.output_size(size) == size + 40 + 16 * n
        assert TINK_LAYOUT.plaintext_size(TINK_LAYOUT.output_size(size)) == size
    assert TINK_LAYOUT.output_size(0) == 56 and TINK_LAYOUT.segment_count(FIRST) == 1
    assert TINK_LAYOUT.segment_count(FIRST + FULL) == 2 and TINK_LAYOUT.segment_count(FIRST + FULL + 1) == 3


@pytest.mark.parametrize("bad", [0, 55, SEG + 1, SEG + 15, 3 * SEG + 7])
def test_a_ciphertext_size_no_plaintext_has_is_refused(bad):
    with pytest.raises(FormatError):
        TINK_LAYOUT.plaintext_size(bad)


def test_run_segments_accepts_only_whole_runs():
    size = FIRST + 3 * FULL + 5
    assert TINK_LAYOUT.run_segments(0, size, size) == 5
    assert TINK_LAYOUT.run_segments(0, FIRST, size) == 1
    assert TINK_LAYOUT.run_segments(1, 2 * FULL, size) == 2
    assert TINK_LAYOUT.run_segments(4, 5, size) == 1
    for first, n in [(0, FIRST - 1), (0, FIRST + 1), (1, FULL + 1), (1, 0), (4, 4), (4, 6), (5, 0)]:
        with pytest.raises(FormatError):
            TINK_LAYOUT.run_segments(first, n, size)


# ---- our encryptor -> tink ------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_our_ciphertext_decrypts_with_tink(keys, oracle, size):
    data = os.urandom(size)
    enc = ObjectEncryptor(keys.primary, AAD)
    ct = encrypt_shuffled(enc, data, threads=4, seed=size)
    assert len(ct) == TINK_LAYOUT.output_size(size)  # the size known before encrypting
    assert ct[:HEADER_SIZE] == enc.header and ct[0] == 0x28
    assert tink_decrypt(oracle, ct, AAD) == data
    # The same object through the format's encoder, as one run: also tink-readable, same size.
    encoder = TinkFormat(keys, "claims").begin(ObjectMeta("2023/01/claims-0001.parquet", size, "e"))
    whole = bytes(encoder.encode(0, data))
    assert len(whole) == len(ct)
    assert tink_decrypt(oracle, whole, AAD) == data


def test_a_multipart_object_encrypted_part_by_part_on_threads_decrypts_with_tink(keys, oracle):
    size = 53 * MiB + 12_345  # at least 50 MiB, four 16 MiB parts
    data = os.urandom(size)
    meta = ObjectMeta("big/object.bin", size, "etag")
    fmt = TinkFormat(keys, "claims")
    plan = plan_object(size, SinkLimits(), layout=fmt.layout, part_size=16 * MiB)
    assert plan.part_count == 4 and plan.output_size == TINK_LAYOUT.output_size(size)
    encoder = fmt.begin(meta)
    parts = list(plan.parts)
    random.Random(7).shuffle(parts)

    def encode(part):
        out = encoder.encode(part.first_segment, memoryview(data)[part.plaintext_start:part.plaintext_end])
        assert len(out) == part.output_size
        return part.number, bytes(out)

    with ThreadPoolExecutor(3) as pool:
        outs = dict(pool.map(encode, parts))
    ct = b"".join(outs[n] for n in range(1, plan.part_count + 1))
    assert len(ct) == plan.output_size
    aad = encoder.metadata[META_ASSOCIATED_DATA].encode()
    assert aad == associated_data("claims", "big/object.bin")
    assert tink_decrypt(oracle, ct, aad) == data

    # A part streamed in slices (the pipeline's streamed body) gives the same bytes as the whole part,
    # and a retried part is encoded again to identical bytes: no nonce is reused with other plaintext.
    part = plan.parts[1]
    sliced = []
    for first in range(part.first_segment, part.first_segment + part.segment_count, 3):
        count = min(3, part.first_segment + part.segment_count - first)
        s = TINK_LAYOUT.segment_plaintext_range(first, size)[0]
        e = TINK_LAYOUT.segment_plaintext_range(first + count - 1, size)[1]
        sliced.append(bytes(encoder.encode(first, data[s:e])))
    assert b"".join(sliced) == outs[2]


# ---- tink -> our decryptor ------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES + [50 * MiB + 1])
def test_tinks_ciphertext_decrypts_with_ours_whole_and_segment_by_segment(keys, oracle, size):
    data = os.urandom(size)
    ct = tink_encrypt(oracle, data, AAD)
    assert len(ct) == TINK_LAYOUT.output_size(size)
    # Whole, from chunks that do not align with segments, and from one chunk.
    chunks = [ct[i:i + 700_001] for i in range(0, len(ct), 700_001)]
    assert b"".join(decrypt_object(keys.primary, AAD, chunks, plaintext_size=size)) == data
    assert b"".join(decrypt_object(keys.primary, AAD, [ct])) == data
    # Any single segment, from the header and that segment's range alone.
    n = TINK_LAYOUT.segment_count(size)
    header = ct[:HEADER_SIZE]
    indices = range(n) if n <= 6 else [0, 1, n // 2, n - 2, n - 1]
    for i in indices:
        start, end = TINK_LAYOUT.ciphertext_segment_range(i, len(ct))
        s, e = TINK_LAYOUT.segment_plaintext_range(i, size)
        assert decrypt_segment(keys.primary, AAD, header, i, ct[start:end], i == n - 1) == data[s:e]


def test_a_segment_read_with_the_wrong_index_or_last_flag_is_rejected(keys, oracle):
    data = os.urandom(FIRST + 2 * FULL + 9)
    ct = tink_encrypt(oracle, data, AAD)
    dec = ObjectDecryptor(keys.primary, AAD, ct[:HEADER_SIZE])
    seg1 = ct[SEG:2 * SEG]
    assert dec.decrypt_segment(1, seg1, False) == data[FIRST:FIRST + FULL]
    with pytest.raises(DecryptionError):
        dec.decrypt_segment(2, seg1, False)
    with pytest.raises(DecryptionError):
        dec.decrypt_segment(1, seg1, True)
    with pytest.raises(DecryptionError):
        ObjectDecryptor(keys.primary, AAD, b"\x29" + ct[1:HEADER_SIZE])


# ---- tampering: tink rejects every case (and so does our reader) ----------------------------------


def _tampered(ct: bytes, other: bytes) -> dict[str, bytes]:
    s = segments_of(ct)  # s[0] = header + segment 0; 4 segments, the last one short
    assert len(s) == 4 and len(s[3]) < SEG

    def flip(data: bytes, at: int) -> bytes:
        b = bytearray(data)
        b[at] ^= 0x01
        return bytes(b)

    return {
        "truncated at a segment boundary": ct[:3 * SEG],
        "truncated at the first boundary": ct[:SEG],
        "truncated off a boundary": ct[:-1],
        "truncated mid segment": ct[:2 * SEG + 1000],
        "truncated into the header": ct[:HEADER_SIZE - 1],
        "header only": ct[:HEADER_SIZE],
        "bytes appended": ct + b"\x00",
        "a segment dropped": s[0] + s[2] + s[3],
        "a segment duplicated": s[0] + s[1] + s[1] + s[2] + s[3],
        "two segments swapped": s[0] + s[2] + s[1] + s[3],
        "spliced from another object, same key": s[0] + segments_of(other)[1] + s[2] + s[3],
        "header length byte flipped": flip(ct, 0),
        "salt bit flipped": flip(ct, 5),
        "nonce prefix bit flipped": flip(ct, HEADER_SIZE - 1),
        "a tag bit flipped": flip(ct, 2 * SEG - 1),
        "the last tag bit flipped": flip(ct, len(ct) - 1),
        "a ciphertext bit flipped": flip(ct, SEG + 100),
    }


def test_every_tamper_is_rejected_by_tink_and_by_our_reader(keys, oracle):
    size = FIRST + 2 * FULL + 4321
    data = os.urandom(size)
    ct = bytes(TinkFormat(keys, "claims").begin(ObjectMeta("2023/01/claims-0001.parquet", size, "e")).encode(0, data))
    other = encrypt_shuffled(ObjectEncryptor(keys.primary, AAD), os.urandom(size))  # same key, same aad
    assert tink_decrypt(oracle, ct, AAD) == data  # untampered: accepted
    cases = _tampered(ct, other)
    for name, bad in cases.items():
        with pytest.raises(tink.TinkError):
            tink_decrypt(oracle, bad, AAD)
            pytest.fail(f"tink accepted: {name}")
        with pytest.raises(DecryptionError):
            b"".join(decrypt_object(keys.primary, AAD, [bad]))
            pytest.fail(f"our reader accepted: {name}")


@pytest.mark.parametrize("wrong", [
    associated_data("claims", "2023/01/claims-0002.parquet"),  # another object
    associated_data("stays", "2023/01/claims-0001.parquet"),   # another dataset
    b"",
])
def test_the_wrong_associated_data_is_rejected(keys, oracle, wrong):
    data = os.urandom(FIRST + 10)
    ct = encrypt_shuffled(ObjectEncryptor(keys.primary, AAD), data)
    with pytest.raises(tink.TinkError):
        tink_decrypt(oracle, ct, wrong)
    with pytest.raises(DecryptionError):
        b"".join(decrypt_object(keys.primary, wrong, [ct]))


def test_the_wrong_key_is_rejected(keys):
    other_handle = new_keyset()
    other = other_handle.primitive(streaming_aead.StreamingAead)
    data = os.urandom(2 * SEG)
    ct = encrypt_shuffled(ObjectEncryptor(keys.primary, AAD), data)
    with pytest.raises(tink.TinkError):
        tink_decrypt(other, ct, AAD)
    with pytest.raises(DecryptionError):
        b"".join(decrypt_object(data_keys(other_handle).primary, AAD, [ct]))


# ---- attempts and misuse --------------------------------------------------------------------------


def test_every_attempt_has_a_fresh_header_and_both_decrypt(keys, oracle):
    data = os.urandom(FIRST + 5)
    fmt = TinkFormat(keys, "claims")
    meta = ObjectMeta("k", len(data), "e")
    a, b = fmt.begin(meta), fmt.begin(meta)
    ca, cb = bytes(a.encode(0, data)), bytes(b.encode(0, data))
    assert a.header != b.header
    assert a.header[1:33] != b.header[1:33] and a.header[33:] != b.header[33:]  # salt and prefix both
    assert ca[HEADER_SIZE:] != cb[HEADER_SIZE:]
    assert tink_decrypt(oracle, ca, associated_data("claims", "k")) == data
    assert tink_decrypt(oracle, cb, associated_data("claims", "k")) == data
    assert a.metadata == b.metadata and a.metadata.items() <= fmt.metadata_for(meta).items()


def test_a_segment_encrypted_again_with_other_plaintext_is_refused_and_never_returned(keys):
    enc = ObjectEncryptor(keys.primary, AAD)
    one, two = os.urandom(FULL), os.urandom(FULL)
    first = enc.encrypt_segment(1, one, False)
    assert enc.encrypt_segment(1, one, False) == first  # a retried segment: same bytes
    with pytest.raises(SegmentReuseError):
        enc.encrypt_segment(1, two, False)
    with pytest.raises(SegmentReuseError):
        enc.encrypt_segment(1, one[:100], True)  # another length and last flag under the same index
    buf = bytearray(FULL + TAG_SIZE)
    with pytest.raises(SegmentReuseError):
        enc.encrypt_segment_into(1, two, False, memoryview(buf))
    assert buf == bytes(len(buf))  # the second ciphertext was wiped
    # The encoder guards the same way across runs.
    size = FIRST + FULL + 7
    data = os.urandom(size)
    encoder = TinkFormat(keys, "claims").begin(ObjectMeta("k", size, "e"))
    assert encoder.encode(1, data[FIRST:FIRST + FULL]) == encoder.encode(1, data[FIRST:FIRST + FULL])
    with pytest.raises(SegmentReuseError):
        encoder.encode(1, os.urandom(FULL))


def test_segments_that_do_not_fit_the_layout_are_refused(keys):
    enc = ObjectEncryptor(keys.primary, AAD, segment_count=3)
    with pytest.raises(FormatError):
        enc.encrypt_segment(0, os.urandom(FIRST - 1), False)  # a non-last segment must be full
    with pytest.raises(FormatError):
        enc.encrypt_segment(1, os.urandom(FULL + 1), False)
    with pytest.raises(FormatError):
        enc.encrypt_segment(1, os.urandom(10), True)  # only segment 2 is last
    with pytest.raises(FormatError):
        enc.encrypt_segment(3, os.urandom(10), True)
    encoder = TinkFormat(keys, "claims").begin(ObjectMeta("k", FIRST + 100, "e"))
    with pytest.raises(FormatError):
        encoder.encode(0, os.urandom(FIRST + 99))  # not a run of whole segments
    with pytest.raises(FormatError):
        encoder.encode(1, b"")


# ---- metadata -------------------------------------------------------------------------------------


def test_associated_data_is_canonical_and_compact():
    key = "2023/01/claims-0001.parquet"
    expected = f"v1|claims|{hashlib.sha256(key.encode()).hexdigest()[:32]}".encode()
    assert associated_data("claims", key) == expected
    assert len(associated_data("d" * 63, "é" * 1000)) == 3 + 63 + 1 + 32
    for bad in ["Claims", "", "a|b", "x" * 64, "clé"]:
        with pytest.raises(FormatError):
            associated_data(bad, key)


def test_metadata_fits_the_2kb_budget_with_a_long_dataset_name_and_key(keys):
    dataset = "d" + "-long-dataset-name" * 3 + "x" * 8  # 63 characters, the longest a config allows
    assert len(dataset) == 63
    fmt = TinkFormat(keys, dataset)
    meta = ObjectMeta("k" * 990 + "é" * 12, 5 * 1024**4, "e", metadata={"owner": "x" * 1500})
    reserved = fmt.metadata_for(meta)
    assert all(name.startswith(RESERVED_PREFIX) and name == name.lower() for name in reserved)
    assert all(value.isascii() and value.isprintable() for value in reserved.values())
    # The format's own entries; the source's times and ETag (issue 12) are bounded on their own.
    source_facts = source_metadata(meta)
    assert metadata_bytes({k: v for k, v in reserved.items() if k not in source_facts}) <= 230
    when = datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=timezone.utc)
    azure_like = ObjectMeta(meta.key, meta.size, "0x8DC2B1F0F3E4A5B", last_modified=when, created=when)
    assert metadata_bytes(source_metadata(azure_like)) <= 150
    placed = place(meta, "", "out/", SinkLimits(), reserved=reserved)  # raises DoesNotFit if over 2 KB
    assert metadata_bytes(placed.write_meta.metadata) <= 2048
    crowded = ObjectMeta(meta.key, meta.size, "e", metadata={"owner": "x" * (2048 - 5 - 100)})
    place(crowded, "", "out/", SinkLimits())  # fits without exitplan's metadata...
    with pytest.raises(DoesNotFit, match="exitplan's own"):
        place(crowded, "", "out/", SinkLimits(), reserved=reserved)  # ...and is refused with it
    assert fmt.begin(meta).metadata.items() <= reserved.items()  # the format's own entries, placed already
    info = read_object_metadata(placed.write_meta.metadata)
    assert info.key_id == keys.primary_id and info.plaintext_size == 5 * 1024**4
    assert info.dataset == dataset and info.object_id == object_id(meta.key)
    info.check_place(dataset, meta.key)
    with pytest.raises(MetadataError):
        info.check_place(dataset, "another/key")


def test_metadata_read_back_names_what_is_missing_or_wrong(keys):
    good = TinkFormat(keys, "claims").metadata_for(ObjectMeta("k", 10, "e"))
    info = read_object_metadata({k.upper(): v for k, v in good.items()})  # header names are case-insensitive
    assert (info.key_id, info.associated_data, info.plaintext_size) == (keys.primary_id, associated_data("claims", "k"), 10)
    assert key_for(keys, info).key_id == keys.primary_id
    cases = {
        "no format": ({k: v for k, v in good.items() if k != META_FORMAT}, META_FORMAT),
        "other format": ({**good, META_FORMAT: "tink-aes128-gcm-hkdf-4kb"}, "tink-aes128"),
        "no key id": ({k: v for k, v in good.items() if k != META_KEY_ID}, META_KEY_ID),
        "bad key id": ({**good, META_KEY_ID: "0x12"}, META_KEY_ID),
        "huge key id": ({**good, META_KEY_ID: str(2**32)}, META_KEY_ID),
        "bad size": ({**good, META_PLAINTEXT_SIZE: "-1"}, META_PLAINTEXT_SIZE),
        "bad aad": ({**good, META_ASSOCIATED_DATA: "v2|claims|00"}, META_ASSOCIATED_DATA),
    }
    for name, (meta, mentioned) in cases.items():
        with pytest.raises(MetadataError, match=re.escape(mentioned)):
            read_object_metadata(meta, what="out/k")
    with pytest.raises(KeysetError):
        key_for(keys, read_object_metadata({**good, META_KEY_ID: "1"}))


def test_a_dataset_id_that_is_not_a_dataset_name_is_refused_at_construction(keys):
    with pytest.raises(FormatError, match="dataset id"):
        TinkFormat(keys, "Claims 2023")


def test_the_key_material_never_shows_in_a_repr(keys):
    enc = ObjectEncryptor(keys.primary, AAD)
    for text in (repr(keys), repr(keys.primary), repr(enc), repr(TinkFormat(keys, "claims"))):
        assert keys.primary.ikm.hex() not in text and repr(keys.primary.ikm) not in text


# ---- through the real pipeline --------------------------------------------------------------------


def _settings(**overrides) -> TransferSettings:
    base = dict(memory_budget=16 * MiB, part_size=2 * MiB, small_object_cutoff=2 * MiB, concurrency=4,
                retry_wait_initial=0, retry_wait_max=0, part_attempts=3)
    base.update(overrides)
    return TransferSettings(**base)


@pytest.mark.parametrize("size,budget,part,shape", [
    (0, 16 * MiB, 2 * MiB, "single"),
    (FIRST + 1, 16 * MiB, 2 * MiB, "single"),
    (5 * MiB + 1, 16 * MiB, 2 * MiB, "multipart"),       # buffered parts of 2 segments, on threads
    (9 * MiB + 77, 4 * MiB, 4 * MiB, "streamed"),        # parts above half the budget: streamed slices
])
def test_the_pipeline_writes_what_tink_decrypts(keys, oracle, size, budget, part, shape):
    src = MemoryStore(label="src")
    dst = MemoryStore(limits=SinkLimits(min_part_size=MiB, max_part_size=64 * MiB), label="dst")
    data = os.urandom(size)
    meta = src.add("in/2023/obj.parquet", data, meta=WriteMeta(metadata={"cohort": "b7"}))
    fmt = TinkFormat(keys, "claims")
    cfg = _settings(memory_budget=budget, part_size=part)
    b = MemoryBudget(budget)
    placement = place(meta, "in/", "out/", dst.limits, reserved=fmt.metadata_for(meta))
    with create_executors(cfg.concurrency, serial=False) as ex:
        out = copy_object(src, dst, meta, placement, settings=cfg, budget=b, executors=ex, output_format=fmt)
    assert out.status == "ok", out.reason
    assert (out.parts == 1) == (shape == "single")
    if shape == "streamed":
        assert plan_object(size, dst.limits, layout=fmt.layout, part_size=part).part_output_size * 2 > budget // 2
    stored = dst.data(placement.dest_key)
    assert len(stored) == out.output_size == out.bytes_sent == TINK_LAYOUT.output_size(size)
    head = dst.head(placement.dest_key)
    info = read_object_metadata(head.metadata)
    info.check_place("claims", meta.key)
    assert head.metadata["cohort"] == "b7" and head.metadata[META_FORMAT] == FORMAT_ID
    assert info.plaintext_size == size and info.key_id == keys.primary_id
    assert tink_decrypt(oracle, stored, info.associated_data) == data
    assert out.sha256 == hashlib.sha256(data).hexdigest()
    assert b.in_use == 0 and b.peak <= budget


def test_a_source_change_restarts_the_object_under_a_new_header(keys, oracle):
    src = MemoryStore(label="src")
    dst = MemoryStore(limits=SinkLimits(min_part_size=MiB, max_part_size=64 * MiB), label="dst")
    new = os.urandom(6 * MiB)
    meta = src.add("k", os.urandom(6 * MiB))
    headers = []
    fmt = TinkFormat(keys, "claims")
    begin = fmt.begin

    def recording_begin(m):
        encoder = begin(m)
        headers.append(encoder.header)
        return encoder

    fmt.begin = recording_begin

    class ChangingSource:
        """The source is rewritten just before the second range read."""

        unsupported = src.unsupported
        label = "changing"
        reads = 0

        def head(self, key):
            return src.head(key)

        def read_range(self, key, start, end, *, if_match=None):
            self.reads += 1
            if self.reads == 2:
                src.add("k", new)
            return src.read_range(key, start, end, if_match=if_match)

    cfg = _settings()
    with create_executors(cfg.concurrency, serial=True) as ex:
        out = copy_object(ChangingSource(), dst, meta, Placement("k", "out/k", WriteMeta()),
                          settings=cfg, budget=MemoryBudget(cfg.memory_budget), executors=ex, output_format=fmt)
    assert out.status == "ok" and out.restarts == 1, out.reason
    assert len(headers) == 2 and headers[0] != headers[1]
    stored = dst.data("out/k")
    assert stored[:HEADER_SIZE] == headers[1]
    assert tink_decrypt(oracle, stored, associated_data("claims", "k")) == new


# ---- the FORMAT.md snippet ------------------------------------------------------------------------


def test_the_format_doc_snippet_decrypts_an_object_fetched_with_boto3(handle, keys):
    import boto3
    from moto import mock_aws

    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), re.S)
    snippet = blocks[0]
    assert "def decrypt_exitplan_object" in snippet
    namespace: dict = {}
    exec(compile(snippet, str(DOCS), "exec"), namespace)

    size = FIRST + 2 * FULL + 999
    data = os.urandom(size)
    meta = ObjectMeta("2023/01/claims-0001.parquet", size, "e")
    fmt = TinkFormat(keys, "claims")
    encoder = fmt.begin(meta)
    ct = bytes(encoder.encode(0, data))
    keyset_json = tink.json_proto_keyset_format.serialize(handle, secret_key_access.TOKEN)
    with mock_aws():
        s3 = boto3.client("s3", region_name="eu-west-3", aws_access_key_id="x", aws_secret_access_key="x")
        s3.create_bucket(Bucket="exit", CreateBucketConfiguration={"LocationConstraint": "eu-west-3"})
        s3.put_object(Bucket="exit", Key="claims/obj", Body=ct, Metadata=encoder.metadata)
        s3.put_object(Bucket="exit", Key="claims/cut", Body=ct[:-SEG // 2], Metadata=encoder.metadata)
        out = io.BytesIO()
        assert namespace["decrypt_exitplan_object"](s3, "exit", "claims/obj", keyset_json, out) == size
        assert out.getvalue() == data
        with pytest.raises(tink.TinkError):
            namespace["decrypt_exitplan_object"](s3, "exit", "claims/cut", keyset_json, io.BytesIO())
        # exitplan's own reader agrees on what boto3 returns as metadata.
        got = s3.get_object(Bucket="exit", Key="claims/obj")
        info = read_object_metadata(got["Metadata"])
        assert info.associated_data == associated_data("claims", meta.key)
        body = got["Body"]
        plain = b"".join(decrypt_object(key_for(keys, info), info.associated_data,
                                        iter(lambda: body.read(300_000), b""), plaintext_size=info.plaintext_size))
        assert plain == data


def test_datakey_for_a_wrong_sized_key_is_refused():
    with pytest.raises(KeysetError):
        DataKey(1, b"short")
