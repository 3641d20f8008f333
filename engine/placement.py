"""How a source object is named and described at the destination, and what does not fit.

S3 keys are at most 1,024 UTF-8 *bytes* (Azure names 1,024 *characters*); S3 user metadata is at
most 2 KB in total and travels in HTTP headers, so non-ASCII values are encoded (RFC 2047, as S3
itself returns them). Whatever does not fit is refused with a reason, never truncated.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

from connectors.base import ContentSettings, ObjectMeta, SinkLimits, WriteMeta, file_path_problem

# Metadata names exitplan itself writes on objects (the encrypted format's among them: `metadata_for`).
# Counted against the 2 KB budget before the user's metadata.
RESERVED_PREFIX = "exitplan-"
# Where exitplan keeps its own files in a bucket (keyset copies, the audit manifest): no dataset
# object is ever written there, so restore and verify can pass over it.
CONTROL_PREFIX = "_exitplan/"


class DoesNotFit(ValueError):
    """The object cannot be written to the destination as it is; the message says why."""


@dataclass(frozen=True)
class Placement:
    """Where one source object goes and what is written with it."""

    source_key: str
    dest_key: str
    write_meta: WriteMeta


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


def encode_header_value(value: str) -> str:
    """Header-safe form of a metadata value: printable ASCII as is, anything else RFC 2047 base64."""
    if value.isascii() and value.isprintable() and value == value.strip():
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
          reserved: dict[str, str] | None = None, content: ContentSettings | None = None) -> Placement:
    """Name and describe `meta` at the destination; raise `DoesNotFit` with the reason. `reserved`:
    the metadata the output format writes itself; `content`: the content headers it writes (the
    source's, by default)."""
    if meta.not_copyable:
        raise DoesNotFit(meta.not_copyable)
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
            raise DoesNotFit(f"metadata name {name!r} uses the prefix {RESERVED_PREFIX!r} reserved by exitplan")
        user[lname] = encode_header_value(value)
    total = dict(reserved or {})
    total.update(user)
    size = metadata_bytes(total)
    if size > limits.max_metadata_bytes:
        raise DoesNotFit(
            f"user metadata is {size} bytes once encoded (exitplan's own included), over the limit of {limits.max_metadata_bytes}"
        )
    return Placement(meta.key, dest_key, WriteMeta(content=meta.content if content is None else content, metadata=total))
