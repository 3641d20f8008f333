"""The on-object format: Tink streaming AEAD ``AES256_GCM_HKDF_1MB``, written segment by segment.

This is the only cryptography exitplan writes by hand (ARCHITECTURE.md §5); everything it produces
is decrypted by stock Tink (see docs/FORMAT.md and tests/unit/test_tink_format.py, where tink is the
oracle in both directions). The wire format is Tink's ``AesGcmHkdfStreaming`` with first-segment
offset 0:

- header = ``0x28`` (its own length, 40) || salt (32 random bytes) || nonce prefix (7 random bytes);
- per-attempt key = HKDF-SHA256(ikm = the data key, salt, info = associated data), 32 bytes;
- ciphertext segments of 1,048,576 bytes (the last may be shorter); the header shares the first, so
  segment 0 carries 1,048,520 plaintext bytes and every other full segment 1,048,560;
- segment i = AES-256-GCM(key, nonce = prefix || uint32_be(i) || last, aad = empty) with a 16-byte tag.

Each segment depends only on the key, the header and its index, so segments are encrypted
independently: in any order, on any thread, a part of the upload being a run of whole segments.

The pieces:

- `TinkLayout` / `TINK_LAYOUT`: the format's segment layout (a `FramedLayout` of
  `engine.crypto.segments` with Tink's numbers); part planning cuts uploads along it.
- `ObjectEncryptor`: one object *attempt* (fresh salt and prefix); encrypts single segments and
  refuses to encrypt an index twice with different plaintext.
- `TinkFormat` / `TinkEncoder`: the pipeline's `OutputFormat` / `SegmentEncoder`.
- `decrypt_object`, `decrypt_segment`, `ObjectDecryptor`: reading back (restore, deep verify).
- `object_metadata`, `read_object_metadata`, `associated_data`: the metadata stored with each object.
"""

from __future__ import annotations

import hashlib
import re
import ssl
import threading
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from connectors.base import ContentSettings, ObjectMeta
from engine.crypto.datakeys import DataKey, DataKeys
from engine.placement import decode_header_value, encode_header_value, source_metadata
from engine.crypto.segments import SEGMENT_SIZE, FramedLayout, sum_output

# --------------------------------------------------------------------------------------------
# Constants of the wire format (Tink AesGcmHkdfStreaming, AES256_GCM_HKDF_1MB)
# --------------------------------------------------------------------------------------------

SALT_SIZE = 32  # = derived key size, as Tink requires
NONCE_PREFIX_SIZE = 7
HEADER_SIZE = 1 + SALT_SIZE + NONCE_PREFIX_SIZE  # 40; the header's first byte says so (0x28)
TAG_SIZE = 16
KEY_SIZE = 32
MAX_SEGMENTS = 2**32  # the segment index is a uint32 in the nonce

# Metadata written with every object (S3 user metadata: lower-case names, ASCII values).
FORMAT_ID = "tink-aes256-gcm-hkdf-1mb"
META_FORMAT = "exitplan-format"
META_KEY_ID = "exitplan-key-id"
META_PLAINTEXT_SIZE = "exitplan-plaintext-size"
META_ASSOCIATED_DATA = "exitplan-associated-data"
# The source's content headers, carried in metadata: on the ciphertext itself they would mislead
# (an HTTP client honouring `Content-Encoding: gzip` would inflate the Tink bytes and break them).
META_CONTENT = {
    "content_type": "exitplan-content-type",
    "content_encoding": "exitplan-content-encoding",
    "content_language": "exitplan-content-language",
    "content_disposition": "exitplan-content-disposition",
    "cache_control": "exitplan-cache-control",
}
# The content headers of every encrypted object: bytes, to be read as such.
CIPHERTEXT_CONTENT = ContentSettings(content_type="application/octet-stream")

AAD_VERSION = "v1"
# A dataset id is a config dataset name (config.models: lower-case letters, digits, '-', '_', at
# most 63 characters), so the associated data is always short printable ASCII without '|'.
_DATASET_ID = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_AAD = re.compile(r"v1\|([a-z0-9][a-z0-9_-]{0,62})\|([0-9a-f]{32})")
_DECIMAL = re.compile(r"0|[1-9][0-9]{0,19}")


class FormatError(ValueError):
    """Something about the encrypted format is wrong; the message is a sentence saying what."""


class DecryptionError(FormatError):
    """The ciphertext did not authenticate: corrupt, truncated, reordered, spliced, or the wrong
    key or associated data. No plaintext of the failing segment is returned."""


class MetadataError(FormatError):
    """The object's exitplan metadata is missing or malformed."""


class SegmentReuseError(RuntimeError):
    """A segment index was about to be encrypted twice under one header with different plaintext
    (a nonce reuse). The second ciphertext is wiped, never returned: the object must restart with
    a new attempt (`TinkFormat.begin`)."""


# --------------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------------


class TinkLayout(FramedLayout):
    """Tink streaming AEAD ``AES256_GCM_HKDF_1MB`` (first segment offset 0).

    Ciphertext segments are 1,048,576 bytes (the last may be shorter). Segment 0 carries the
    header, so it holds 1,048,576 - 40 - 16 = 1,048,520 plaintext bytes; every other full segment
    holds 1,048,560. Empty plaintext is one 56-byte segment (header + tag) marked last; a final
    segment that exactly fills its space is the last one (no empty segment follows).
    Output size = plaintext + 40 + 16 x segments.
    """

    segment_size = SEGMENT_SIZE
    header_size = HEADER_SIZE
    tag_size = TAG_SIZE
    max_segments = MAX_SEGMENTS

    @property
    def first_segment_plaintext(self) -> int:
        """Plaintext bytes of a full segment 0 (1,048,520)."""
        return self._first_capacity

    @property
    def segment_plaintext(self) -> int:
        """Plaintext bytes of any other full segment (1,048,560)."""
        return self._capacity

    def plaintext_size(self, ciphertext_size: int) -> int:
        """The plaintext size of a ciphertext of `ciphertext_size` bytes (the inverse of
        `output_size`); `FormatError` when no plaintext encrypts to that size."""
        seg = self.segment_size
        if ciphertext_size < self.header_size + self.tag_size:
            raise FormatError(f"a ciphertext of {ciphertext_size:,} bytes is shorter than the smallest possible "
                              f"({self.header_size + self.tag_size} bytes: header and one tag)")
        segments = -(-ciphertext_size // seg)
        if ciphertext_size - (segments - 1) * seg < self.tag_size + (self.header_size if segments == 1 else 0):
            raise FormatError(f"a ciphertext of {ciphertext_size:,} bytes ends in a segment too short to hold a tag: "
                              "it is truncated or not in this format")
        return ciphertext_size - self.header_size - self.tag_size * segments

    def ciphertext_segment_range(self, index: int, ciphertext_size: int) -> tuple[int, int]:
        """The ciphertext bytes ``start .. end-1`` of segment `index` in an object of
        `ciphertext_size` bytes (segment 0 starts after the header). For random access: read the
        header (bytes 0-39) and this range, then `decrypt_segment` with ``last = index == count - 1``."""
        count = self.segment_count(self.plaintext_size(ciphertext_size))
        if not 0 <= index < count:
            raise IndexError(f"segment {index} does not exist: the object has {count} segments")
        start = self.header_size if index == 0 else index * self.segment_size
        return start, min((index + 1) * self.segment_size, ciphertext_size)

    def run_segments(self, first_segment: int, run_plaintext: int, plaintext_size: int) -> int:
        """How many whole segments, from `first_segment`, carry exactly `run_plaintext` bytes of an
        object of `plaintext_size`; `FormatError` if that is not a run of whole segments."""
        total = self.segment_count(plaintext_size)
        if not 0 <= first_segment < total:
            raise FormatError(f"segment {first_segment} does not exist: the object of {plaintext_size:,} bytes has "
                              f"{total} segments")
        start = self.segment_plaintext_range(first_segment, plaintext_size)[0]
        end = start + run_plaintext
        if end == plaintext_size:
            return total - first_segment
        if end > plaintext_size or end < self._first_capacity or (end - self._first_capacity) % self._capacity:
            raise FormatError(f"{run_plaintext:,} plaintext bytes from segment {first_segment} are not a run of whole "
                              f"segments of an object of {plaintext_size:,} bytes")
        count = 1 + (end - self._first_capacity) // self._capacity - first_segment
        if count < 1:
            raise FormatError(f"an empty run at segment {first_segment} of an object of {plaintext_size:,} bytes")
        return count


TINK_LAYOUT = TinkLayout()


# --------------------------------------------------------------------------------------------
# Keys, nonces, associated data
# --------------------------------------------------------------------------------------------


def derive_key(ikm: bytes, salt: bytes, associated_data: bytes) -> bytes:
    """Tink's per-object key: HKDF-SHA256(ikm, salt, info = associated data), 32 bytes."""
    return HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=salt, info=associated_data).derive(ikm)


def segment_nonce(prefix: bytes, index: int, last: bool) -> bytes:
    """The 12-byte GCM nonce of segment `index`: prefix (7) || uint32_be(index) || last (1)."""
    if not 0 <= index < MAX_SEGMENTS:
        raise FormatError(f"segment index {index} is outside 0..2^32-1")
    return prefix + index.to_bytes(4, "big") + (b"\x01" if last else b"\x00")


def object_id(source_key: str) -> str:
    """The object's id in its associated data: the first 16 bytes of SHA-256 of the source key
    (the blob name in its container, UTF-8), in lower-case hex (32 characters)."""
    return hashlib.sha256(source_key.encode("utf-8")).hexdigest()[:32]


def associated_data(dataset: str, source_key: str) -> bytes:
    """The canonical associated data of an object: ``v1|<dataset id>|<object id>`` in ASCII.

    It binds the ciphertext to its dataset and source object (a ciphertext moved to another
    object's name or dataset does not decrypt with the associated data recomputed for that place),
    and stays at most 99 bytes whatever the object's name, so it fits S3's 2 KB of metadata."""
    if not _DATASET_ID.fullmatch(dataset):
        raise FormatError(f"dataset id {dataset!r} is not a dataset name (lower-case letters, digits, '-' or '_', "
                          "at most 63 characters)")
    return f"{AAD_VERSION}|{dataset}|{object_id(source_key)}".encode("ascii")


# --------------------------------------------------------------------------------------------
# Encryption
# --------------------------------------------------------------------------------------------


class ObjectEncryptor:
    """Encrypts the segments of one object *attempt*: a fresh random salt and nonce prefix (so a
    fresh derived key) every time one is made. Thread-safe: segments may be encrypted in any order
    on any number of threads.

    Re-encrypting an index with the same plaintext gives the same bytes (a retried part); with
    different plaintext (or length, or last flag) it raises `SegmentReuseError` and the second
    ciphertext is never returned. The check costs nothing per byte: the GCM tag, computed anyway,
    is the fingerprint; 9 bytes per segment are kept (9 MB per TB of object).

    `segment_count`, when known, preallocates that record and checks that only the final index is
    marked last; without it, the record grows with the highest index seen.

    `header` (resume only): continue an attempt whose header was recorded, instead of starting a
    fresh one. Same key, header and plaintext give the same ciphertext, so the parts already sent
    can be checked and the missing ones sent. Safe only while the source is pinned to the version
    that attempt read (same ETag): different plaintext under a recorded header would reuse nonces
    across processes, which the in-process reuse check cannot see.
    """

    def __init__(self, data_key: DataKey, associated_data: bytes, *, segment_count: int | None = None,
                 header: bytes | None = None):
        if header is None:
            # OpenSSL's CSPRNG (seeded by the OS, reseeded in a forked child; OpenSSL's own key
            # generation draws from it), which keeps the GIL: os.urandom lets it go, and among
            # eight copying threads every let-go is a hand-over of the GIL and a wake-up, once per
            # object.
            fresh = ssl.RAND_bytes(SALT_SIZE + NONCE_PREFIX_SIZE)
            salt, self._prefix = fresh[:SALT_SIZE], fresh[SALT_SIZE:]
        else:
            header = bytes(header)
            if len(header) != HEADER_SIZE or header[0] != HEADER_SIZE:
                raise FormatError(f"a recorded header must be {HEADER_SIZE} bytes starting with 0x28, "
                                  f"not {len(header)} bytes starting with {header[:1].hex() or 'nothing'}")
            salt, self._prefix = header[1:1 + SALT_SIZE], header[1 + SALT_SIZE:]
        self.header = bytes([HEADER_SIZE]) + salt + self._prefix
        self.key_id = data_key.key_id
        self.associated_data = bytes(associated_data)
        self._aead = AESGCM(derive_key(data_key.ikm, salt, self.associated_data))
        if segment_count is not None and not 1 <= segment_count <= MAX_SEGMENTS:
            raise FormatError(f"an object has 1 to 2^32 segments, not {segment_count}")
        self.segment_count = segment_count
        n = segment_count or 0
        self._lock = threading.Lock()
        self._seen = bytearray(n)
        self._fingerprints = bytearray(8 * n)

    def __repr__(self) -> str:  # never the key; the header is public (it is on the object)
        return f"ObjectEncryptor(key_id={self.key_id}, header={self.header.hex()[:16]}...)"

    def output_size(self, index: int, plaintext_size: int) -> int:
        """Ciphertext bytes of segment `index` carrying `plaintext_size` bytes (header included in 0)."""
        return plaintext_size + TAG_SIZE + (HEADER_SIZE if index == 0 else 0)

    def _check(self, index: int, size: int, last: bool) -> None:
        capacity = TINK_LAYOUT.first_segment_plaintext if index == 0 else TINK_LAYOUT.segment_plaintext
        if size > capacity or (not last and size != capacity):
            raise FormatError(f"segment {index} cannot carry {size:,} plaintext bytes "
                              f"({'at most' if last else 'exactly'} {capacity:,} for a {'last' if last else 'full'} segment)")
        if self.segment_count is not None and (index >= self.segment_count or last != (index == self.segment_count - 1)):
            raise FormatError(f"segment {index} {'marked' if last else 'not marked'} last in an object of "
                              f"{self.segment_count} segments")

    def encrypt_segment(self, index: int, plaintext: bytes | bytearray | memoryview, last: bool) -> bytes:
        """Ciphertext of segment `index` (for index 0, preceded by the header)."""
        self._check(index, len(plaintext), last)
        ct = self._aead.encrypt(segment_nonce(self._prefix, index, last), plaintext, None)
        self._remember(index, ct[-TAG_SIZE:])
        return self.header + ct if index == 0 else ct

    def encrypt_segment_into(self, index: int, plaintext: bytes | bytearray | memoryview, last: bool,
                             out: memoryview) -> None:
        """Like `encrypt_segment`, writing into `out`, which must be exactly `output_size` bytes."""
        self._check(index, len(plaintext), last)
        body = out
        if index == 0:
            out[:HEADER_SIZE] = self.header
            body = out[HEADER_SIZE:]
        self._aead.encrypt_into(segment_nonce(self._prefix, index, last), plaintext, None, body)
        try:
            self._remember(index, body[-TAG_SIZE:])
        except SegmentReuseError:
            out[:] = bytes(len(out))  # the second ciphertext under a reused nonce must not leave
            raise

    def _remember(self, index: int, tag: bytes | memoryview) -> None:
        fingerprint = bytes(tag[:8])
        at = 8 * index
        with self._lock:
            if index >= len(self._seen):
                grow = index + 1 - len(self._seen)
                self._seen.extend(bytes(grow))
                self._fingerprints.extend(bytes(8 * grow))
            if not self._seen[index]:
                self._seen[index] = 1
                self._fingerprints[at:at + 8] = fingerprint
            elif self._fingerprints[at:at + 8] != fingerprint:
                raise SegmentReuseError(
                    f"segment {index} was already encrypted under this header with different plaintext; "
                    "encrypting it again would reuse its nonce. Start the object over with a new attempt."
                )


# --------------------------------------------------------------------------------------------
# The pipeline's output format
# --------------------------------------------------------------------------------------------


def encrypted_metadata(key_id: int, dataset: str, meta: ObjectMeta) -> dict[str, str]:
    """The exitplan metadata of `meta` encrypted under key `key_id` for `dataset`, the source's
    content headers, metadata names' case, times and ETag included (`placement.source_metadata`):
    what `TinkFormat.metadata_for` gives, and what inventory counts without unwrapping any key."""
    return {**object_metadata(key_id, associated_data(dataset, meta.key), meta.size), **content_metadata(meta.content),
            **source_metadata(meta)}


def content_metadata(content: ContentSettings) -> dict[str, str]:
    """The source's content headers as exitplan metadata (`META_CONTENT`; values header-safe)."""
    return {name: encode_header_value(value) for field_name, name in META_CONTENT.items()
            if (value := getattr(content, field_name)) is not None}


def content_of(metadata: Mapping[str, str]) -> ContentSettings:
    """The source's content headers an encrypted object's metadata carries (`content_metadata`
    read back; names compared case-insensitively, values decoded)."""
    lower = {k.lower(): v for k, v in metadata.items()}
    return ContentSettings(**{field_name: decode_header_value(lower[name]) for field_name, name in META_CONTENT.items()
                              if name in lower})


def object_metadata(key_id: int, associated_data_: bytes, plaintext_size: int) -> dict[str, str]:
    """The exitplan metadata of an encrypted object (names lower-case, values ASCII)."""
    return {
        META_FORMAT: FORMAT_ID,
        META_KEY_ID: str(key_id),
        META_PLAINTEXT_SIZE: str(plaintext_size),
        META_ASSOCIATED_DATA: associated_data_.decode("ascii"),
    }


class TinkEncoder:
    """The `SegmentEncoder` of one object attempt: encrypts runs of whole segments."""

    def __init__(self, encryptor: ObjectEncryptor, plaintext_size: int, metadata: Mapping[str, str],
                 layout: TinkLayout = TINK_LAYOUT):
        self.encryptor = encryptor
        self.plaintext_size = plaintext_size
        self.metadata = dict(metadata)
        self.layout = layout
        self._segments = layout.segment_count(plaintext_size)

    @property
    def header(self) -> bytes:
        return self.encryptor.header

    @property
    def key_id(self) -> int:
        return self.encryptor.key_id

    def encode(self, first_segment: int, plaintext: bytes | bytearray | memoryview) -> bytearray:
        """Ciphertext of the run of whole segments from `first_segment` whose plaintext is
        `plaintext` (segment 0's includes the header; the object's final segment is marked last).

        Returns one buffer of exactly the planned output size: each segment is encrypted straight
        into it (no per-segment allocation, no join), one AES-GCM call per segment (~1 MiB)."""
        layout = self.layout
        size = self.plaintext_size
        view = memoryview(plaintext)
        if view.format != "B":
            view = view.cast("B")
        count = layout.run_segments(first_segment, len(view), size)
        last_index = self._segments - 1
        base = layout.segment_plaintext_range(first_segment, size)[0]
        out = bytearray(sum_output(layout, first_segment, count, size))
        target = memoryview(out)
        pos = 0
        for index in range(first_segment, first_segment + count):
            start, end = layout.segment_plaintext_range(index, size)
            n = end - start + TAG_SIZE + (HEADER_SIZE if index == 0 else 0)
            self.encryptor.encrypt_segment_into(index, view[start - base:end - base], index == last_index,
                                                target[pos:pos + n])
            pos += n
        assert pos == len(out)
        return out


class TinkFormat:
    """The pipeline's `OutputFormat` for Tink ``AES256_GCM_HKDF_1MB``.

    `keys` are the project's data keys (the primary encrypts); `dataset` is the dataset's name in
    the config, bound into every object's associated data. Each `begin` is a new attempt with a
    fresh header. `copies` is True: a part holds its plaintext and its ciphertext at once.
    """

    layout: TinkLayout = TINK_LAYOUT
    copies = True

    def __init__(self, keys: DataKeys, dataset: str):
        associated_data(dataset, "")  # validates the dataset id now, not at the first object
        self.keys = keys
        self.dataset = dataset

    def __repr__(self) -> str:
        return f"TinkFormat(dataset={self.dataset!r}, key_id={self.keys.primary_id})"

    def metadata_for(self, meta: ObjectMeta) -> dict[str, str]:
        """The exitplan metadata every attempt at `meta` writes (the format's entries, which
        `begin`'s encoder carries again, and the source's: content headers, names' case, times,
        ETag): pass it to `placement.place(reserved=...)`, which writes it and counts it in the
        2 KB budget. It does not depend on the attempt (the header is in the data)."""
        return encrypted_metadata(self.keys.primary_id, self.dataset, meta)

    def content_for(self, meta: ObjectMeta) -> ContentSettings:
        """The ciphertext's own content headers (`CIPHERTEXT_CONTENT`): the source's travel in metadata."""
        return CIPHERTEXT_CONTENT

    def begin(self, meta: ObjectMeta, *, header: bytes | None = None, key_id: int | None = None) -> TinkEncoder:
        """A new attempt (fresh header, primary key), or with `header` and `key_id` the recorded
        attempt of a resumed upload (see `ObjectEncryptor`; `KeysetError` if the key is gone)."""
        key = self.keys.primary if header is None or key_id is None else self.keys.get(key_id)
        aad = associated_data(self.dataset, meta.key)
        encryptor = ObjectEncryptor(key, aad, segment_count=self.layout.segment_count(meta.size), header=header)
        # The format's own entries: the source's (`source_metadata`, `content_metadata`) are in the
        # placement's metadata already (`metadata_for`), which the encoder's is merged into.
        return TinkEncoder(encryptor, meta.size, object_metadata(key.key_id, aad, meta.size), self.layout)


# --------------------------------------------------------------------------------------------
# Metadata read back
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TinkObjectInfo:
    """What an encrypted object's metadata says: which key, which associated data, how big."""

    key_id: int
    associated_data: bytes
    plaintext_size: int

    @property
    def dataset(self) -> str:
        return self.associated_data.decode("ascii").split("|")[1]

    @property
    def object_id(self) -> str:
        return self.associated_data.decode("ascii").split("|")[2]

    @property
    def ciphertext_size(self) -> int:
        return TINK_LAYOUT.output_size(self.plaintext_size)

    def check_place(self, dataset: str, source_key: str) -> None:
        """Raise `MetadataError` unless the object was written for `dataset` / `source_key`."""
        expected = associated_data(dataset, source_key)
        if expected != self.associated_data:
            raise MetadataError(
                f"the object was encrypted for {self.associated_data.decode()!r}, not for dataset {dataset!r} and source "
                f"key {source_key!r} ({expected.decode()!r}): it was copied or moved from another object's place"
            )


def read_object_metadata(metadata: Mapping[str, str], *, what: str = "the object") -> TinkObjectInfo:
    """Parse the exitplan metadata of an encrypted object (names compared case-insensitively, as
    HTTP headers are); `MetadataError` saying what is missing or wrong. `what` names the object in
    messages (e.g. its destination key)."""
    lower = {k.lower(): v for k, v in metadata.items()}

    def get(name: str) -> str:
        value = lower.get(name)
        if value is None:
            raise MetadataError(f"{what} has no {name!r} metadata: it was not written by exitplan's encrypted format, "
                                "or its metadata was lost when it was copied (copy it with its metadata)")
        return value.strip()

    fmt = get(META_FORMAT)
    if fmt != FORMAT_ID:
        raise MetadataError(f"{what} is in format {fmt!r}; this version of exitplan reads {FORMAT_ID!r}")
    key_id, size, aad = get(META_KEY_ID), get(META_PLAINTEXT_SIZE), get(META_ASSOCIATED_DATA)
    if not _DECIMAL.fullmatch(key_id) or int(key_id) >= 2**32:
        raise MetadataError(f"{what}: {META_KEY_ID} {key_id!r} is not a Tink key id (a decimal number below 2^32)")
    if not _DECIMAL.fullmatch(size):
        raise MetadataError(f"{what}: {META_PLAINTEXT_SIZE} {size!r} is not a decimal byte count")
    if not _AAD.fullmatch(aad):
        raise MetadataError(f"{what}: {META_ASSOCIATED_DATA} {aad!r} is not 'v1|<dataset>|<32 hex digits>'")
    return TinkObjectInfo(int(key_id), aad.encode("ascii"), int(size))


def key_for(keys: DataKeys, info: TinkObjectInfo) -> DataKey:
    """The data key that encrypted the object (`KeysetError` naming the id if the keyset lacks it)."""
    return keys.get(info.key_id)


# --------------------------------------------------------------------------------------------
# Decryption
# --------------------------------------------------------------------------------------------


class ObjectDecryptor:
    """Decrypts single segments of one object, given its 40-byte header: random access."""

    def __init__(self, data_key: DataKey, associated_data_: bytes, header: bytes | memoryview):
        header = bytes(header)
        if len(header) != HEADER_SIZE or header[0] != HEADER_SIZE:
            raise DecryptionError(
                f"the ciphertext does not start with a Tink AES-GCM-HKDF streaming header (first byte "
                f"{header[:1].hex() or 'missing'}, {len(header)} bytes; expected 0x28 and 40 bytes)"
            )
        self._prefix = header[1 + SALT_SIZE:]
        self._aead = AESGCM(derive_key(data_key.ikm, header[1:1 + SALT_SIZE], bytes(associated_data_)))

    def decrypt_segment(self, index: int, ciphertext: bytes | bytearray | memoryview, last: bool) -> bytes:
        """Plaintext of segment `index` (its ciphertext without the header); `DecryptionError` if it
        does not authenticate at that index with that last flag."""
        limit = SEGMENT_SIZE - (HEADER_SIZE if index == 0 else 0)
        if not TAG_SIZE <= len(ciphertext) <= limit or (not last and len(ciphertext) != limit):
            raise DecryptionError(f"segment {index} has {len(ciphertext):,} bytes of ciphertext, which no "
                                  f"{'last' if last else 'full'} segment has: the object is truncated or corrupt")
        try:
            return self._aead.decrypt(segment_nonce(self._prefix, index, last), ciphertext, None)
        except InvalidTag:
            raise DecryptionError(
                f"segment {index} does not authenticate: the object is corrupt, truncated, reordered or spliced, "
                "or the key or associated data is wrong"
            ) from None


def decrypt_segment(data_key: DataKey, associated_data_: bytes, header: bytes | memoryview, index: int,
                    ciphertext: bytes | bytearray | memoryview, last: bool) -> bytes:
    """Plaintext of one segment, given the object's header (bytes 0-39) and the segment's
    ciphertext (`TinkLayout.ciphertext_segment_range`). For many segments of one object, make one
    `ObjectDecryptor` instead (the key derivation is then done once)."""
    return ObjectDecryptor(data_key, associated_data_, header).decrypt_segment(index, ciphertext, last)


def decrypt_object(data_key: DataKey, associated_data_: bytes, ciphertext_chunks: Iterable[bytes | memoryview], *,
                   plaintext_size: int | None = None) -> Iterator[bytes]:
    """The plaintext of a whole object, one segment (about 1 MiB) at a time, from its ciphertext in
    chunks of any sizes, in order.

    Every segment is authenticated before it is yielded, and the end of the stream must be the
    segment marked last, so truncation, reordering, duplication and splicing raise
    `DecryptionError`. As with any streaming AEAD, the object as a whole is proven only when the
    iterator finishes without error: a consumer must not act on (publish) the plaintext before
    that. With `plaintext_size` (from the metadata), the total is checked too."""
    buf = bytearray()
    chunks = iter(ciphertext_chunks)
    decryptor: ObjectDecryptor | None = None
    index = 0
    produced = 0
    for chunk in chunks:
        buf += chunk
        if decryptor is None:
            if len(buf) < HEADER_SIZE:
                continue
            decryptor = ObjectDecryptor(data_key, associated_data_, buf[:HEADER_SIZE])
            del buf[:HEADER_SIZE]
        pos = 0
        with memoryview(buf) as view:
            while True:
                full = SEGMENT_SIZE - (HEADER_SIZE if index == 0 else 0)
                if len(buf) - pos <= full:  # not provably followed by more: may be the last one
                    break
                if index >= MAX_SEGMENTS - 1:
                    raise DecryptionError("the object has more than 2^32 segments")
                plain = decryptor.decrypt_segment(index, view[pos:pos + full], False)
                produced += len(plain)
                yield plain
                pos += full
                index += 1
        if pos:
            del buf[:pos]  # once per chunk: the remainder moves once, not once per segment
    if decryptor is None:
        raise DecryptionError(f"the ciphertext is {len(buf)} bytes, shorter than the {HEADER_SIZE}-byte header")
    plain = decryptor.decrypt_segment(index, buf, True)
    produced += len(plain)
    if plaintext_size is not None and produced != plaintext_size:
        raise DecryptionError(f"the object decrypted to {produced:,} bytes, its metadata says {plaintext_size:,}")
    yield plain
