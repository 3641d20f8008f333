"""The storage protocols every stage of exitplan talks to, and the connectors' error classes.

One small protocol per capability: a stage names exactly the operations it uses (the inventory
needs only `Lister`; the verifier only `head` + `read_range` on the destination). No SDK type and no
SDK exception crosses this boundary: connectors translate both.

Byte ranges are half-open everywhere: ``read_range(key, start, end)`` returns ``end - start``
bytes, the bytes at offsets ``start .. end - 1``.
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import BinaryIO, Callable, Iterator, Mapping, Protocol, Sequence, TypeVar, runtime_checkable

T = TypeVar("T")

# Bodies and ranges up to this size go by a connector's direct request where it has one (S3's
# PutObject, Azure's ranged Get Blob): one HTTP request signed by the SDK's own signer and sent on
# a keep-alive pool, without the SDK's per-request machinery (about 1 ms of CPU per request each
# side, most of a small object's cost). Larger ones go through the SDK: their cost is the bytes.
DIRECT_MAX_BYTES = 1024 * 1024

# --------------------------------------------------------------------------------------------
# Values passed between stages
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ContentSettings:
    """The HTTP content headers carried from source to destination."""

    content_type: str | None = None
    content_encoding: str | None = None
    cache_control: str | None = None
    content_disposition: str | None = None
    content_language: str | None = None


@dataclass(frozen=True)
class ObjectMeta:
    """What a listing or a HEAD says about one object.

    `etag` is the opaque version token used for If-Match (quotes stripped). `content_md5` is the
    raw 16-byte MD5 the store keeps for the whole object, or None when it has none (Azure blobs
    uploaded as blocks without one; S3 multipart objects). `tier` is the storage tier or class.
    `metadata` keeps the names as the store spells them (Azure: with their case). `tags`: the
    object's tags (Azure blob index tags). `created`: when the object was created, where the
    store says. Listings may leave `content`, `metadata` and `tags` empty where the store does not
    return them; a `head` always fills them.
    """

    key: str
    size: int
    etag: str
    content_md5: bytes | None = None
    last_modified: datetime | None = None
    tier: str | None = None
    content: ContentSettings = field(default_factory=ContentSettings)
    metadata: Mapping[str, str] = field(default_factory=dict)
    tags: Mapping[str, str] = field(default_factory=dict)
    created: datetime | None = None
    # The source's kind of object where it has several: Azure's "block", "page" or "append" blob.
    kind: str | None = None
    # Why the source cannot give this entry as an object (a symbolic link not followed, a device):
    # a listing names it instead of leaving it out, and placement refuses it with this reason.
    not_copyable: str | None = None
    # An earlier state of a blob that a listing names beside the blob itself: Azure's snapshot
    # (its time stamp) or a version that is not the current one (its version id; the current
    # version carries its id too). A listing keeps earlier states apart (`ListingPage.history`):
    # they are never copied as the blob, and `earlier_state` says which kind one is.
    snapshot: str | None = None
    version_id: str | None = None
    current_version: bool = True
    # An Archive-tier blob being rehydrated: Azure's archive status ("rehydrate-pending-to-hot").
    rehydrating: str | None = None

    @property
    def earlier_state(self) -> str | None:
        """"snapshot" or "version" for an earlier state of a blob, None for the blob itself."""
        if self.snapshot:
            return "snapshot"
        if self.version_id and not self.current_version:
            return "version"
        return None

    @property
    def content_md5_b64(self) -> str | None:
        return base64.b64encode(self.content_md5).decode() if self.content_md5 else None


# Why a listing's earlier states of blobs (`ObjectMeta.earlier_state`) are not copied: the same
# sentence for a live listing and an inventory report's rows, counted and named wherever a dataset's
# figures are shown (inventory, dry run, summary, status, manifest, report).
NOT_CARRIED = {
    "snapshot": "snapshots: each blob's current state is carried, not its snapshots",
    "version": "earlier versions (of blobs present or deleted): each blob's current version is carried, not its "
               "earlier ones",
}


def count_in(counts: dict, key, size: int, objects: int = 1) -> None:
    """Add `objects` objects of `size` bytes in all to `counts[key]`, a (objects, bytes) pair:
    the figures kept per reason not carried, per storage class."""
    before_objects, before_bytes = counts.get(key, (0, 0))
    counts[key] = (before_objects + objects, before_bytes + size)


# Where a blob's earlier states go when a dataset carries them (`history: all`): each is an object
# of its own, named below the dataset's prefix as
#   .exitplan-history/<name below the prefix>/snapshot-<snapshot time>   or   .../version-<version id>
# (Azure's snapshot times and version ids are both ISO 8601 times with 7 decimals, ending in Z).
# The name is the object's key everywhere in exitplan (state, manifest, destination, restore); a
# source reads the earlier state it names (`history_of`). A blob of the source whose own name has
# this form is refused by placement: it could not be told apart.
HISTORY_DIR = ".exitplan-history/"
_HISTORY_ID = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")


def history_key(meta: ObjectMeta, prefix: str) -> str:
    """The key an earlier state of a blob (`meta.earlier_state`) is carried under, below `prefix`
    (the dataset's prefix, which the blob's name starts with)."""
    rel = meta.key[len(prefix):] if meta.key.startswith(prefix) else meta.key
    ident = meta.snapshot if meta.earlier_state == "snapshot" else meta.version_id
    return f"{prefix}{HISTORY_DIR}{rel}/{meta.earlier_state}-{ident}"


def history_of(key: str) -> tuple[str, str, str] | None:
    """(blob name, "snapshot" or "version", its time stamp or version id) for a key made by
    `history_key`, None for any other key."""
    at = key.find(HISTORY_DIR)
    if at < 0:
        return None
    rel, _, last = key[at + len(HISTORY_DIR):].rpartition("/")
    kind, _, ident = last.partition("-")
    if not rel or kind not in ("snapshot", "version") or not _HISTORY_ID.fullmatch(ident):
        return None
    return key[:at] + rel, kind, ident


@dataclass(frozen=True)
class WriteMeta:
    """What is written with an object: content headers, user metadata and tags (already validated:
    at most `SinkLimits.max_tags` tags)."""

    content: ContentSettings = field(default_factory=ContentSettings)
    metadata: Mapping[str, str] = field(default_factory=dict)
    tags: Mapping[str, str] = field(default_factory=dict)
    # The S3 storage class to write the object in (`StorageClass`); None: the bucket's default.
    # A destination without classes (SFTP) ignores it.
    storage_class: str | None = None


@dataclass(frozen=True)
class PartReceipt:
    """The destination's acknowledgement of one multipart part (1-based `number`)."""

    number: int
    etag: str
    size: int


@dataclass(frozen=True)
class PendingUpload:
    """A multipart upload the destination still holds open (found by `list_multipart_uploads`)."""

    key: str
    upload_id: str
    initiated: datetime | None = None


@dataclass(frozen=True)
class SinkLimits:
    """What the destination accepts, taken from the provider profile (never constants in the engine).

    Sizes in bytes. `max_key_bytes` counts the UTF-8 encoding of the key. `max_metadata_bytes` is
    the total of user-metadata names and values as S3 counts them. `max_tags`: object tags the
    destination keeps per object (0: none). `keys_are_paths`: keys become file paths (an SFTP
    destination), so a key `file_path_problem` refuses cannot be written.
    """

    min_part_size: int = 5 * 1024**2
    max_part_size: int = 5 * 1024**3
    max_parts: int = 10_000
    max_object_size: int = 5 * 1024**4
    max_single_put_size: int = 5 * 1024**3
    max_key_bytes: int = 1024
    max_metadata_bytes: int = 2048
    max_tags: int = 10
    keys_are_paths: bool = False


@dataclass(frozen=True)
class SinkBehaviour:
    """How the destination's multipart API answers, taken from the provider profile (`multipart`,
    `flexible_checksums`) like `SinkLimits`; what exitplan may ask of it and what it may conclude.

    - `list_parts`: ListParts is answered. False: an upload left by an earlier run cannot be
      continued (its parts cannot be listed), so the object is restarted.
    - `abort`: AbortMultipartUpload is answered. False: an upload given up is left (recorded in the
      state; the bucket's lifecycle rule removes it) instead of aborted.
    - `list_uploads`: ListMultipartUploads is answered. False: `cleanup` knows only the uploads the
      state store recorded.
    - `flexible_checksums`: the service accepts the `x-amz-checksum-*` headers the SDK sends when
      an operation supports them; False (the default): Content-MD5 only.
    - `direct_requests`: small PUTs and ranged GETs (`DIRECT_MAX_BYTES`) may go as direct
      requests; False: every request through the SDK client.

    Whether ETags are MD5s is `ObjectSink.etag_is_md5` (the profile's `multipart.etag`).
    """

    list_parts: bool = True
    abort: bool = True
    list_uploads: bool = True
    flexible_checksums: bool = False
    direct_requests: bool = True


class RequestPacer(Protocol):
    """How fast a connector may talk to its endpoint; built by the engine (engine/pacing.py) from
    the provider's published request rates, the source's setting and the bandwidth timetable, and
    passed in the way `SinkLimits` is. A connector calls it around every HTTP attempt, its SDK's own
    retries included, so that what is paced is what the server counts.
    """

    paces_bytes: bool
    """True when a bandwidth limit applies to this endpoint's bodies: the connector then hands
    them over in chunks through `body_bytes` (otherwise it sends them whole, without a copy)."""

    def request_starts(self, kind: str) -> None:
        """Block until one more request of `kind` (`put`: a write, `get`: a read, list or head) may
        be sent: a token of each rate that applies, then a place among the requests in flight."""
        ...

    def request_ended(self, throttled: str | None) -> None:
        """The attempt begun by this thread's last `request_starts` ended: with a throttling answer
        (`throttled` names it: "SlowDown (HTTP 503)"), or None for any other outcome."""
        ...

    def body_bytes(self, nbytes: int) -> None:
        """Block until `nbytes` more body bytes may go (the run's bandwidth limit)."""
        ...


class Unpaced:
    """A `RequestPacer` that never waits: connectors built without one (tests, one-off checks)."""

    paces_bytes = False

    def request_starts(self, kind: str) -> None:
        pass

    def request_ended(self, throttled: str | None) -> None:
        pass

    def body_bytes(self, nbytes: int) -> None:
        pass


UNPACED = Unpaced()


# Where a connector that writes files keeps its own (connectors/sftp.py): never an object's path.
FILE_CONTROL_DIR = ".exitplan-sftp"


def file_path_problem(key: str) -> str | None:
    """Why `key` cannot be a file path below a destination root (it would leave the root, or is
    not a file name), or None."""
    if not key:
        return "it is empty"
    if key.startswith("/"):
        return "it is absolute (starts with `/`)"
    if any(ord(c) < 32 or ord(c) == 127 for c in key):
        return "it contains a control character"
    parts = key.split("/")
    if any(p in ("..", ".") for p in parts):
        return "it has a `..` or `.` segment that would leave or confuse the destination root"
    if any(p == "" for p in parts):
        return "it has an empty segment (`//` or a trailing `/`)"
    if parts[0] == FILE_CONTROL_DIR:
        return f"`{FILE_CONTROL_DIR}/` is where the connector keeps its own files"
    return None


# --------------------------------------------------------------------------------------------
# Errors: classified by what the caller can do about them
# --------------------------------------------------------------------------------------------


class ConnectorError(Exception):
    """Base of every error a connector raises. `retryable` says whether trying again can help."""

    retryable: bool = False

    def __init__(self, message: str, *, key: str | None = None):
        super().__init__(message)
        self.key = key


class NotFound(ConnectorError):
    """The object, container or bucket does not exist."""


class SourceChanged(ConnectorError):
    """The object no longer has the ETag the read was pinned to (If-Match failed).

    Never retried blindly: the object is restarted from its new version with a new header.
    """


class Throttled(ConnectorError):
    """The service asked us to slow down (HTTP 429/503 SlowDown). Retry after a backoff."""

    retryable = True


class TransientError(ConnectorError):
    """A network failure, timeout, 5xx or short read: the same request may succeed next time."""

    retryable = True


class IntegrityError(ConnectorError):
    """Bytes did not match what was promised (a digest the server rejected, a wrong ETag back).

    Retryable: the bytes are re-read and re-sent; a persistent mismatch fails the object.
    """

    retryable = True


class BodyDigestMismatch(IntegrityError):
    """A sink that hashes the body it is given (`hashes_writes`) found its MD5 is not the one
    announced with it (`computed`, `announced`); nothing was published. The hash is of the caller's
    bytes, not of anything that crossed a wire: sent again, they would hash the same, so it is not
    retried."""

    retryable = False

    def __init__(self, message: str, *, key: str | None = None, computed: bytes, announced: bytes):
        super().__init__(message, key=key)
        self.computed, self.announced = computed, announced


def attempts(send: Callable[[], T], *, tries: int, backoff: Callable[[int], float],
             on_retry: Callable[[ConnectorError], None] | None = None) -> T:
    """`send()` until it returns, raises anything but `Throttled` / `TransientError`, or has been
    tried `tries` times (the last error is raised); `backoff(n)` seconds are slept before retry n
    (0-based) and `on_retry` told of the error. The retry layer of a connector's direct requests,
    standing for the one its SDK has: the engine's retries come on top, as they do over the SDK's."""
    for n in range(tries):
        try:
            return send()
        except (Throttled, TransientError) as exc:
            if n + 1 >= tries:
                raise
            if on_retry is not None:
                on_retry(exc)
            time.sleep(backoff(n))
    raise ValueError(f"tries must be at least 1, not {tries}")


def exact_range(data: bytes, start: int, end: int, label: str, key: str) -> bytes:
    """`data`, read for bytes `start .. end-1` (to a bound past them, so that a longer answer
    shows): itself when it is exactly that long, else `TransientError` saying whether the answer
    was short or longer than asked."""
    n = end - start
    if len(data) < n:
        raise TransientError(f"{label}: short read of {key!r} range {start}-{end}: {len(data)} of {n} bytes", key=key)
    if len(data) > n:
        raise TransientError(f"{label}: {key!r}: the server sent more than the {n} bytes asked for", key=key)
    return data


class AuthError(ConnectorError):
    """Credentials missing, wrong or without the needed permission."""


class ConfigError(ConnectorError):
    """The endpoint, account, bucket or option is unusable as configured."""


class Unsupported(ConnectorError):
    """The connector cannot do this operation (see its `unsupported` set), or the service does not
    implement it (HTTP 405 / 501, or its `SinkBehaviour` says so). `operation` names it (S3's
    name: "ListParts", "AbortMultipartUpload", "ListMultipartUploads"), when known."""

    def __init__(self, message: str, *, key: str | None = None, operation: str | None = None):
        super().__init__(message, key=key)
        self.operation = operation


class InvalidRequest(ConnectorError):
    """The service refused the request as malformed (e.g. a part below the minimum size)."""


# --------------------------------------------------------------------------------------------
# Protocols
# --------------------------------------------------------------------------------------------


@runtime_checkable
class Lister(Protocol):
    def list(self, prefix: str = "") -> Iterator[ObjectMeta]:
        """Yield every object under `prefix` in key order, page by page (never all in memory)."""
        ...

    # Optional: a source that asks each listed object for more than its listing says
    # (`source_details`: an S3 source's HEAD and GetObjectTagging, an SFTP source's metadata
    # files) also takes `list(prefix, details=False)`: keys, sizes and markers only, for what needs
    # no more (the progress count beside a copy: `engine.listing.LiveListing(bare=True)`).


@dataclass(frozen=True)
class ListingRange:
    """A part of a listing that is listed on its own (a dataset listed as several at once): every
    object whose key starts with `prefix`; with `direct`, only those with no "/" after `prefix`
    (the objects directly in a folder, listed with the "/" delimiter, its subfolders left out)."""

    prefix: str
    direct: bool = False


@dataclass(frozen=True)
class ListingPage:
    """One listing request's answer: its objects in key order, and the marker that lists on after
    them (a continuation token, or the last key), None after the range's last page; `history`: the
    snapshots and earlier versions listed with them."""

    objects: list[ObjectMeta]
    marker: str | None
    # The earlier states of blobs the request named beside them (`ObjectMeta.earlier_state`):
    # counted and named as not carried, never copied as objects.
    history: list[ObjectMeta] = field(default_factory=list)


@runtime_checkable
class RangeLister(Protocol):
    """A source that lists a part of a container on its own and resumes a listing from a marker
    (optional: a source without it is listed as one range, from its start)."""

    def folders(self, prefix: str, limit: int) -> tuple[list[str], bool] | None:
        """One "/"-delimited listing of the level below `prefix`: the folder prefixes there (in key
        order) and whether objects sit directly at that level; None when the level holds more than
        `limit` entries (too many to split this way)."""
        ...

    def list_pages(self, part: ListingRange, marker: str | None = None) -> Iterator[ListingPage]:
        """The pages of `part`, from its start or from `marker` (a page's marker of an earlier
        listing); one request per page, made as the page is asked for."""
        ...


@runtime_checkable
class HeadReader(Protocol):
    def head(self, key: str) -> ObjectMeta:
        """Full metadata of one object; raises `NotFound`."""
        ...


@runtime_checkable
class RangeReader(Protocol):
    def read_range(self, key: str, start: int, end: int, *, if_match: str | None = None) -> bytes:
        """Return exactly bytes ``start .. end-1``; `SourceChanged` if `if_match` is stale.

        A short body raises `TransientError` (never returns fewer bytes).
        """
        ...


@runtime_checkable
class TagReader(Protocol):
    def tags(self, key: str) -> dict[str, str]:
        """The object's tags (empty when it has none); raises `NotFound`."""
        ...


@runtime_checkable
class ObjectReader(Lister, HeadReader, RangeReader, Protocol):
    """Objects listed, headed and read back: what verify asks of a destination."""

    # A short human label for messages: "azure:devstoreaccount1/claims".
    label: str


@runtime_checkable
class ObjectSource(ObjectReader, Protocol):
    """Anything objects can be read from: Azure Blob, and the S3 destination for verify/restore."""

    unsupported: frozenset[str]


# A part body: bytes in memory, or a file-like object streamed by the connector (for parts larger
# than the memory budget). A stream must yield exactly `size` bytes.
PartBody = bytes | memoryview | BinaryIO


@runtime_checkable
class MultipartUpload(Protocol):
    key: str
    upload_id: str

    def upload_part(self, number: int, body: PartBody, size: int, md5: bytes | None,
                    offset: int | None = None) -> PartReceipt:
        """Upload part `number` (1-based). With `md5`, the server checks the body against it.
        `offset`: where the part's bytes start in the object (the sizes of the parts before it):
        the engine always gives it; a sink that writes the parts in place needs it (SFTP), the
        others do without.

        Raises `IntegrityError` when the server reports a digest mismatch, or (where ETags are
        MD5s) answers an ETag that is not the MD5 of the bytes sent (`checked_etag`).
        """
        ...

    def list_parts(self) -> list[PartReceipt]:
        """The parts the server holds for this upload, in part-number order."""
        ...

    def complete(self, parts: Sequence[PartReceipt]) -> str:
        """Assemble the object from `parts`; return its ETag (quotes stripped).

        Raises `IntegrityError` when (where ETags are MD5s) the object's ETag is not the one its
        parts make (`checked_multipart_etag`): the object then exists at the destination, wrong.
        """
        ...

    def abort(self) -> None:
        """Discard the upload and its parts. Aborting an upload that is gone is not an error."""
        ...


@runtime_checkable
class ObjectSink(HeadReader, Protocol):
    limits: SinkLimits
    unsupported: frozenset[str]
    label: str

    behaviour: SinkBehaviour
    """Which multipart operations the destination answers (`SinkBehaviour`)."""

    etag_is_md5: bool
    """True when the destination's ETags are MD5s: of the bytes for a single PUT or a part, S3's
    md5-of-md5s-N (`multipart_etag`) for a multipart object. False where they are opaque (SSE-C,
    SSE-KMS): then no ETag can be compared with the bytes sent."""

    # Optional: `hashes_writes = True` on a sink that hashes the body of every `put` itself (the
    # SFTP connector) and checks it against an announced `md5` before publishing anything (raising
    # `BodyDigestMismatch`): the engine then hashes no body twice. It sends `md5=None` for a body
    # whose MD5 it does not know, and for a plain copy of a source whose stored MD5 is known it
    # sends that MD5 without hashing the bytes itself (the sink's check is the source's check).
    # `part_md5 = False` on a sink whose parts need no MD5 (its ETags are not MD5s, its transport
    # checks the bytes, a part's receipt names the write: the SFTP connector): the engine then
    # neither hashes a part's output nor sends an MD5 with it, and records none.

    def put(self, key: str, body: PartBody, size: int, meta: WriteMeta, md5: bytes | None) -> str:
        """Write a whole object in one request; return its ETag (quotes stripped).

        Raises `IntegrityError` like `MultipartUpload.upload_part`.
        """
        ...

    def open_multipart(self, key: str, meta: WriteMeta) -> MultipartUpload:
        ...

    def resume_multipart(self, key: str, upload_id: str) -> MultipartUpload:
        """Re-attach to an upload opened earlier (by this or a previous process)."""
        ...

    def list_multipart_uploads(self, prefix: str = "") -> Iterator[PendingUpload]:
        ...

    def delete(self, key: str) -> None:
        """Remove an object. Deleting a missing object is not an error."""
        ...


# --------------------------------------------------------------------------------------------
# ETags
# --------------------------------------------------------------------------------------------
#
# A write's answer is checked against what was sent in one place: the connector that sent it, with
# the two functions below, when its destination's ETags are MD5s (`ObjectSink.etag_is_md5`). Only
# the connector sees every write (the pipeline's parts and objects, but also the keyset and audit
# manifest copies) and the bytes that actually left, streamed ones included; and some servers
# accept a wrong Content-MD5 without a word (moto, s3rver: LAB-NOTES.md), so the answer is the only
# proof. Callers trust a returned ETag; the engine compares ETags only to recognise its own parts
# and objects when it resumes an upload.


def multipart_etag(part_md5s: Sequence[bytes]) -> str:
    """The ETag S3 gives a multipart object: hex MD5 of the concatenated part MD5s, dash, count."""
    return f"{hashlib.md5(b''.join(part_md5s)).hexdigest()}-{len(part_md5s)}"


def checked_etag(etag: str, md5: bytes, *, what: str, key: str | None = None) -> str:
    """`etag`, a destination's answer to a PUT or a part upload, once it is known to be the MD5 of
    the bytes sent (`md5`); `IntegrityError` (retryable: the bytes are sent again) otherwise.
    `what` names the write in the message ("s3:bucket: part 3 of 'k'")."""
    if etag.strip('"').lower() != md5.hex():
        raise IntegrityError(f"{what}: the server's ETag {etag} is not the MD5 of the bytes sent ({md5.hex()}); "
                             "the body was altered on the way", key=key)
    return etag


def checked_multipart_etag(etag: str, parts: Sequence[PartReceipt], *, what: str, key: str | None = None) -> str:
    """`etag`, a destination's answer to completing a multipart upload, once it is known to be the
    one `parts` (their ETags checked by `checked_etag`) make; `IntegrityError` otherwise, and then
    the object exists at the destination but is not what was sent."""
    md5s = []
    for part in parts:
        part_etag = part.etag.strip('"').lower()
        if not _MD5_HEX.fullmatch(part_etag):
            raise IntegrityError(f"{what}: part {part.number}'s ETag {part.etag} is not an MD5, so the object's "
                                 "ETag cannot be checked", key=key)
        md5s.append(bytes.fromhex(part_etag))
    expected = multipart_etag(md5s)
    if etag.strip('"').lower() != expected:
        raise IntegrityError(f"{what} completed with ETag {etag}, expected {expected} from the parts sent", key=key)
    return etag


_MD5_HEX = re.compile(r"[0-9a-f]{32}")
