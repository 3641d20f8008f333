"""The output seam of a copy: how an object's plaintext becomes the bytes written to the destination.

Per object *attempt*, an `OutputFormat` gives a `SegmentEncoder` that turns a run of whole
segments of plaintext (its `layout`, `engine.crypto.segments`) into output bytes. `IDENTITY`
writes the plaintext as is (a dataset marked `public`); `engine.crypto.tink_format.TinkFormat`
encrypts (every other dataset).
"""

from __future__ import annotations

from typing import Mapping, Protocol

from connectors.base import ContentSettings, ObjectMeta
from engine.crypto.segments import IDENTITY_LAYOUT, SegmentLayout
from engine.placement import source_metadata


class SegmentEncoder(Protocol):
    """Transforms plaintext into output for one object *attempt* (a fresh header each attempt)."""

    metadata: Mapping[str, str]
    """Metadata written with the object for this attempt (e.g. the key id); merged into the placement's."""

    header: bytes | None
    """The attempt's header (Tink: the 40 bytes that open the object), recorded with a multipart
    upload so that a later run can continue it with the same output; None when the format has none."""

    key_id: int | None
    """The data key that encrypts this attempt, recorded with the header; None when not encrypted."""

    def encode(self, first_segment: int, plaintext: bytes | memoryview) -> bytes | memoryview:
        """Output bytes for the run of whole segments starting at `first_segment` whose plaintext is
        `plaintext` (segment 0's output includes the header; the object's last segment is final).
        Called concurrently for different runs of one attempt; may be called again for the same run
        (a retried part) and must then return the same bytes."""
        ...


class OutputFormat(Protocol):
    """How the objects of one dataset are written: the segment layout parts are planned on, and
    an encoder per object attempt."""

    layout: SegmentLayout

    copies: bool
    """False only for the identity: `encode` returns its input, so a part costs its plaintext size
    in the budget and a single PUT reuses the object MD5 as its Content-MD5. True: a part holds its
    plaintext and its output at once, so its budget charge is both."""

    def metadata_for(self, meta: ObjectMeta) -> dict[str, str]:
        """The metadata every attempt at `meta` writes (the encoder's `metadata`), known before any
        attempt: placing the object counts it in the destination's metadata limit."""
        ...

    def content_for(self, meta: ObjectMeta) -> ContentSettings:
        """The content headers written with `meta`'s output: the source's for the identity; for an
        encrypted format, those of bytes (the source's then travel in `metadata_for`)."""
        ...

    def begin(self, meta: ObjectMeta, *, header: bytes | None = None, key_id: int | None = None) -> SegmentEncoder:
        """Start an attempt at writing `meta` (called again, with the new version, on a restart).
        With `header` / `key_id` (a resumed upload): continue the recorded attempt instead, so
        that the same plaintext gives the same output bytes as before the interruption."""
        ...


class _IdentityEncoder:
    metadata: Mapping[str, str] = {}
    header: bytes | None = None
    key_id: int | None = None

    def encode(self, first_segment: int, plaintext: bytes | memoryview) -> bytes | memoryview:
        return plaintext


class IdentityFormat:
    """Output = plaintext: how a dataset marked `public` is written."""

    layout: SegmentLayout = IDENTITY_LAYOUT
    copies = False

    def metadata_for(self, meta: ObjectMeta) -> dict[str, str]:
        """What S3 metadata would lose of the source (names' case, times, ETag: `source_metadata`)."""
        return source_metadata(meta)

    def content_for(self, meta: ObjectMeta) -> ContentSettings:
        return meta.content

    def begin(self, meta: ObjectMeta, *, header: bytes | None = None, key_id: int | None = None) -> SegmentEncoder:
        return _IdentityEncoder()


IDENTITY = IdentityFormat()
