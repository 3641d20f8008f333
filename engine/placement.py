"""How a source object is named and described at the destination, and what does not fit.

S3 keys are at most 1,024 UTF-8 *bytes* (Azure names 1,024 *characters*); S3 user metadata is at
most 2 KB in total and travels in HTTP headers, so non-ASCII values are encoded (RFC 2047, as S3
itself returns them). Whatever does not fit is refused with a reason, never truncated.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Mapping
from urllib.parse import parse_qsl, quote, urlencode

from connectors.base import ContentSettings, ObjectMeta, SinkLimits, WriteMeta, file_path_problem

# Metadata names exitplan itself writes on objects (the encrypted format's among them: `metadata_for`).
# Counted against the 2 KB budget before the user's metadata.
RESERVED_PREFIX = "exitplan-"
# Where exitplan keeps its own files in a bucket (keyset copies, the audit manifest): no dataset
# object is ever written there, so restore and verify can pass over it.
CONTROL_PREFIX = "_exitplan/"


class DoesNotFit(ValueError):
    """The object cannot be written to the destination as it is; the message says why. `placement`:
    where it would go, for an object the source cannot give now (`ObjectMeta.not_copyable`, an
    Archive blob) whose name and metadata fit: an earlier copy of it there may still be current."""

    def __init__(self, reason: str, placement: Placement | None = None):
        super().__init__(reason)
        self.placement = placement


@dataclass(frozen=True)
class Placement:
    """Where one source object goes and what is written with it."""

    source_key: str
    dest_key: str
    write_meta: WriteMeta

    @property
    def tags_digest(self) -> str | None:
        """`tags_digest` of the tags written with the object, those kept in exitplan's metadata
        (more than the destination takes) included."""
        kept = self.write_meta.metadata.get(META_TAGS)
        return tags_digest({**self.write_meta.tags, META_TAGS: kept} if kept else self.write_meta.tags)


def tags_digest(tags: Mapping[str, str]) -> str | None:
    """What the state keeps of the tags written with an object, to see them change: None when there
    are none. Azure sets a blob's tags without giving it a new ETag."""
    if not tags:
        return None
    return hashlib.sha256(json.dumps(sorted(tags.items()), ensure_ascii=False).encode()).hexdigest()[:32]


def destination_key(source_key: str, source_prefix: str, dest_prefix: str) -> str:
    """`dest_prefix` + the part of `source_key` below `source_prefix` (the dataset's own prefix)."""
    rel = source_key[len(source_prefix):] if source_prefix and source_key.startswith(source_prefix) else source_key
    if dest_prefix and not dest_prefix.endswith("/") and rel and not rel.startswith("/"):
        return f"{dest_prefix}/{rel}"
    return f"{dest_prefix}{rel}"


def dest_key_prefix(dest_prefix: str) -> str:
    """What every destination key of a dataset below `dest_prefix` begins with: the prefix, with
    the `/` that `destination_key` puts after a prefix that does not end with one."""
    return f"{dest_prefix}/" if dest_prefix and not dest_prefix.endswith("/") else dest_prefix


def source_key_of(dest_key: str, source_prefix: str, dest_prefix: str) -> str:
    """The source key that `destination_key` named `dest_key` (restore writes objects back under
    their source names). Where `destination_key` is ambiguous (a key below a prefix without `/`
    that itself begins with `/`), the encrypted object's associated data tells the truth."""
    start = dest_key_prefix(dest_prefix)
    if dest_key == dest_prefix:
        rel = ""
    elif dest_key.startswith(start):
        rel = dest_key[len(start):]
    else:
        rel = dest_key
    return f"{source_prefix}{rel}"


def relative_key(source_key: str, source_prefix: str) -> str:
    """The key of `source_key` below its dataset's `source_prefix`: its path when restored (a
    prefix `data` holds `data/x`: the file is `x`)."""
    rel = source_key[len(source_prefix):] if source_key.startswith(source_prefix) else source_key
    return rel.removeprefix("/") if source_prefix and not source_prefix.endswith("/") else rel


# ---------------------------------------------------------------------------------------------
# Names as files: the one rule for directory markers, `//` and a file that is also a directory
# ---------------------------------------------------------------------------------------------
#
# An object store's keys are not paths: `dir/` (a 0-byte "directory marker"), `a//b` and `d` beside
# `d/file` are distinct objects there. Migrate and verify carry and check every one of them as it is
# (S3 accepts them all; renaming could collide with another key and loses the original). Only
# where a key must become a file path (restore into a directory) do they differ, and that is
# decided here, once: inventory names up front what restore will name as not restorable.

# The metadata ADLS Gen2 (and the tools that imitate it) puts on a blob that stands for a directory.
FOLDER_METADATA = "hdi_isfolder"


class NotAPath(ValueError):
    """A key that cannot be written as a file path below a directory; the message says why."""


def is_directory_marker(key: str, size: int, metadata: Mapping[str, str]) -> bool:
    """Whether an object stands for a directory: it holds no bytes, and its name ends in `/` (Azure
    tools, S3 consoles) or it carries `hdi_isfolder=true` (ADLS Gen2: the name has no `/`).
    `size` is the plaintext size; metadata names are compared case-insensitively."""
    if size != 0:
        return False
    if key.endswith("/"):
        return True
    return any(k.lower() == FOLDER_METADATA and v.strip().lower() == "true" for k, v in metadata.items())


def restore_path(rel_key: str, size: int, metadata: Mapping[str, str]) -> tuple[tuple[str, ...], bool]:
    """(path components, whether a directory) of the object `rel_key` (its key below the dataset,
    `size` plaintext bytes) restored below a directory: a directory marker (`is_directory_marker`)
    becomes a directory, any other object a file. `NotAPath` when it cannot be either: a key ending
    in `/` that holds bytes, an empty segment (`a//b`), a `.` or `..` segment, an absolute key, a
    NUL byte."""
    directory = is_directory_marker(rel_key, size, metadata)
    if rel_key.endswith("/") and not directory:
        raise NotAPath(f"its key ends with '/', so it can only be restored as the directory {rel_key[:-1]!r}, "
                       f"but it holds {size:,} bytes")
    name = rel_key[:-1] if rel_key.endswith("/") else rel_key
    unsafe = f"{rel_key!r} cannot be written as a file safely"
    if "\x00" in rel_key:
        raise NotAPath(f"{unsafe}: it contains a NUL byte")
    if not name or name.startswith("/"):
        raise NotAPath(f"{unsafe}: it is empty, or absolute")
    parts = name.split("/")
    if any(p == "" for p in parts):
        raise NotAPath(f"{unsafe}: it has an empty segment (`//`), which no file path can hold")
    if any(p in (".", "..") for p in parts):
        raise NotAPath(f"{unsafe}: it has a `.` or `..` segment, which would leave or confuse the directory")
    return tuple(parts), directory


def clash_sentence(rel_key: str, below: str) -> str:
    """Why the file `rel_key` is not restored: `below`, another key, continues below its name."""
    return (f"{rel_key!r} is a file, and the key {below!r} continues below that name, so it is a directory "
            "too; on a filesystem the directory wins and this file is not restored (it is at the destination)")


class FileBesideDirectory:
    """Finds, in one pass over keys in listing order (S3's and Azure's: by code point), each key
    that is a file while other keys continue below its name (`d` beside `d/file`, or `d/`): on a
    filesystem the directory wins, and that file is named as not restorable.

    `add(key, item, file=...)` returns the items whose fate is now known, as (item, the first key
    found below it, or None). A possible file is held until the listing passes its name; every key
    held is a prefix of the last key added, so memory stays bounded by the longest key whatever
    the listing's size. `finish()` releases the rest. Keys out of order only make it miss a clash
    (the restore then names it as it meets it)."""

    def __init__(self) -> None:
        self._held: list[tuple[str, object]] = []

    def add(self, key: str, item: object, *, file: bool) -> list[tuple[object, str | None]]:
        released: list[tuple[object, str | None]] = []
        still: list[tuple[str, object]] = []
        for name, held in self._held:
            if key.startswith(name + "/"):
                released.append((held, key))
            elif key.startswith(name):
                still.append((name, held))
            else:
                released.append((held, None))
        self._held = still
        if file and not key.endswith("/"):
            self._held.append((key, item))
        else:
            released.append((item, None))
        return released

    def finish(self) -> list[tuple[object, str | None]]:
        released = [(held, None) for _, held in self._held]
        self._held = []
        return released


# ---------------------------------------------------------------------------------------------
# The source's properties S3 metadata cannot hold as they are, kept as exitplan metadata
# ---------------------------------------------------------------------------------------------

# The names of the source's metadata that are not all lower-case, comma-separated, as the source
# spells them: S3 lower-cases metadata names, so restore gives back `PatientId`, not `patientid`.
META_NAMES = "exitplan-metadata-names"
# The source blob's creation and last-modified times (ISO 8601, UTC) and its ETag, for an auditor
# to match the copy with the source.
META_SOURCE_CREATED = "exitplan-source-created"
META_SOURCE_MODIFIED = "exitplan-source-modified"
META_SOURCE_ETAG = "exitplan-source-etag"
# The source's tags, URL-encoded (`a=1&b=2`), when the destination keeps fewer tags per object
# than the source has (`SinkLimits.max_tags`); otherwise they are the object's own tags.
META_TAGS = "exitplan-tags"
# The source's kind of blob when it is not a block blob (`page`, `append`), and its access tier when
# it is not the default one (`Cool`, `Cold`): the destination's objects have neither.
META_SOURCE_KIND = "exitplan-source-kind"
META_SOURCE_TIER = "exitplan-source-tier"
DEFAULT_KINDS = {None, "block"}
DEFAULT_TIERS = {None, "", "hot", "standard"}


def tier_label(tier: str | None, kind: str | None) -> str:
    """A tier as the inventory and the estimate count it: the object's own; Hot for a block blob (or
    an object of a store without kinds) that states none, Azure's default; "none" for the kinds
    that have no access tier (page and append blobs)."""
    return tier or ("Hot" if kind in DEFAULT_KINDS else "none")


def source_metadata(meta: ObjectMeta) -> dict[str, str]:
    """The exitplan metadata that keeps what S3 metadata would lose of `meta`: its metadata names'
    case, its creation and last-modified times, its ETag, its kind and tier where they are not the
    default ones. Part of exitplan's own metadata (both
    output formats write it: `OutputFormat.metadata_for`), so placement counts it in the limit."""
    out: dict[str, str] = {}
    cased = [name for name in meta.metadata if name != name.lower()]
    if cased:
        out[META_NAMES] = ",".join(cased)
    if meta.created is not None:
        out[META_SOURCE_CREATED] = _utc(meta.created)
    if meta.last_modified is not None:
        out[META_SOURCE_MODIFIED] = _utc(meta.last_modified)
    if meta.etag:
        out[META_SOURCE_ETAG] = encode_header_value(meta.etag)
    if meta.kind not in DEFAULT_KINDS:
        out[META_SOURCE_KIND] = encode_header_value(meta.kind)
    if (meta.tier or "").lower() not in DEFAULT_TIERS:
        out[META_SOURCE_TIER] = encode_header_value(meta.tier)
    return out


def _utc(when: datetime) -> str:
    when = when.astimezone(timezone.utc) if when.tzinfo else when.replace(tzinfo=timezone.utc)
    return when.isoformat(timespec="microseconds" if when.microsecond else "seconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class SourceProperties:
    """What an object's metadata (and tags) at the destination say of its source: the user
    metadata with the source's names and values, the tags, the source's times and ETag."""

    metadata: dict[str, str]
    tags: dict[str, str]
    created: str | None
    last_modified: str | None
    etag: str | None
    kind: str | None = None
    tier: str | None = None


def source_properties(metadata: Mapping[str, str], tags: Mapping[str, str]) -> SourceProperties:
    """Read back what `place` wrote: `metadata` as the destination returns it (names lower-case),
    `tags` the object's own tags. exitplan's own entries are taken out of the user metadata."""
    lower = {k.lower(): v for k, v in metadata.items()}
    cased = {name.lower(): name for name in lower.get(META_NAMES, "").split(",") if name}
    user = {cased.get(name, name): decode_header_value(value) for name, value in lower.items()
            if not name.startswith(RESERVED_PREFIX)}
    found_tags = dict(tags)
    if META_TAGS in lower:
        found_tags.update(parse_qsl(lower[META_TAGS], keep_blank_values=True))
    def decoded(name: str) -> str | None:
        return decode_header_value(lower[name]) if name in lower else None

    return SourceProperties(user, found_tags, lower.get(META_SOURCE_CREATED), lower.get(META_SOURCE_MODIFIED),
                            decoded(META_SOURCE_ETAG), decoded(META_SOURCE_KIND), decoded(META_SOURCE_TIER))


def encode_header_value(value: str) -> str:
    """Header-safe form of a metadata value: printable ASCII as is, anything else RFC 2047 base64
    (a value that itself looks encoded too, so `decode_header_value` gives back the very bytes)."""
    if value.isascii() and value.isprintable() and value == value.strip() and not value.startswith("=?"):
        return value
    return "=?UTF-8?B?" + base64.b64encode(value.encode("utf-8")).decode("ascii") + "?="


def decode_header_value(value: str) -> str:
    if value.startswith("=?UTF-8?B?") and value.endswith("?="):
        try:
            return base64.b64decode(value[10:-2], validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            return value
    return value


def metadata_bytes(metadata: dict[str, str]) -> int:
    """Size of user metadata as S3 counts it: UTF-8 bytes of every name and value."""
    return sum(len(k.encode("utf-8")) + len(v.encode("utf-8")) for k, v in metadata.items())


def check_key(dest_key: str, limits: SinkLimits) -> str | None:
    """The reason `dest_key` cannot be written, or None."""
    n = len(dest_key.encode("utf-8"))
    if n > limits.max_key_bytes:
        return f"destination key is {n} UTF-8 bytes, over the limit of {limits.max_key_bytes}"
    if not dest_key:
        return "destination key is empty"
    if limits.keys_are_paths:
        problem = file_path_problem(dest_key)
        if problem:
            return f"destination key {dest_key!r} cannot be a file path at the destination: {problem}"
    if dest_key.startswith(CONTROL_PREFIX):
        return (f"destination key {dest_key!r} falls under {CONTROL_PREFIX}, where exitplan keeps its own files "
                "(keyset copies, the audit manifest); give the dataset a `dest_prefix`")
    return None


def place(meta: ObjectMeta, source_prefix: str, dest_prefix: str, limits: SinkLimits,
          reserved: dict[str, str] | None = None, content: ContentSettings | None = None,
          storage_class: str | None = None) -> Placement:
    """Name and describe `meta` at the destination; raise `DoesNotFit` with the reason. `reserved`:
    the metadata the output format writes itself; `content`: the content headers it writes (the
    source's, by default); `storage_class`: the class it lands in (None: the bucket's default)."""
    if meta.not_copyable:
        try:
            would_be = place(replace(meta, not_copyable=None), source_prefix, dest_prefix, limits, reserved, content,
                             storage_class)
        except DoesNotFit:
            would_be = None
        raise DoesNotFit(meta.not_copyable, would_be)
    dest_key = destination_key(meta.key, source_prefix, dest_prefix)
    reason = check_key(dest_key, limits)
    if reason:
        raise DoesNotFit(reason)
    user = {}
    for name, value in meta.metadata.items():
        lname = name.lower()
        if not lname.isascii() or not all(c.isalnum() or c in "-_" for c in lname):
            raise DoesNotFit(f"metadata name {name!r} is not a valid HTTP header name")
        if lname.startswith(RESERVED_PREFIX):
            ours = any(n.lower() == RESERVED_PREFIX + "format" for n in meta.metadata)
            written = ("; the object is one exitplan wrote (encrypted, or a copy of its own): bring it back with "
                       "`exitplan restore`, not by migrating it" if ours else "")
            raise DoesNotFit(f"metadata name {name!r} uses the prefix {RESERVED_PREFIX!r} reserved by exitplan{written}")
        user[lname] = encode_header_value(value)
    total = dict(reserved or {})
    total.update(user)
    tags = dict(meta.tags)
    if len(tags) > limits.max_tags:  # kept, in exitplan's metadata, rather than dropped
        total[META_TAGS] = urlencode(tags, quote_via=quote)
        tags = {}
    size = metadata_bytes(total)
    if size > limits.max_metadata_bytes:
        raise DoesNotFit(
            f"user metadata is {size} bytes once encoded (exitplan's own included), over the limit of {limits.max_metadata_bytes}"
        )
    return Placement(meta.key, dest_key, WriteMeta(content=meta.content if content is None else content, metadata=total,
                                                   tags=tags, storage_class=storage_class))
