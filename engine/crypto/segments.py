"""Segment layouts: how an output format cuts a plaintext into segments, and what each weighs.

A format writes an object as a run of segments of fixed output size (the last may be shorter),
segment 0 carrying the format's header. Part planning (`engine.planning`) cuts uploads along
segment boundaries, so a part of m segments is exactly m x `segment_size` output bytes and can be
transformed independently of its neighbours (ARCHITECTURE.md §4, §5).

A `SegmentLayout` answers, for a plaintext size: how many segments, each segment's plaintext range
and output size, and the exact output size. `FramedLayout` is the arithmetic of every layout with
a header in segment 0 and a fixed overhead per segment: the identity (`IDENTITY_LAYOUT`, no
header, no tag) and Tink's (`engine.crypto.tink_format.TinkLayout`, a 40-byte header and a
16-byte tag per segment) differ only in their numbers.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

MiB = 1024 * 1024
SEGMENT_SIZE = MiB  # output bytes per full segment, whatever the layout (Tink: 1 MiB of ciphertext)


@runtime_checkable
class SegmentLayout(Protocol):
    """How an output format cuts a plaintext into segments. Sizes in bytes; ranges half-open."""

    segment_size: int  # output bytes of every segment but the last

    max_segments: int | None
    """The most segments an object may have (Tink: 2^32, the segment index is a uint32 in the
    nonce); None: no limit. A larger object is refused before any byte moves."""

    def segment_count(self, plaintext_size: int) -> int:
        """Number of segments (at least 1: an empty plaintext is one, possibly empty, segment)."""
        ...

    def segment_plaintext_range(self, index: int, plaintext_size: int) -> tuple[int, int]:
        """The plaintext bytes ``start .. end-1`` that segment `index` (0-based) carries."""
        ...

    def segment_output_size(self, index: int, plaintext_size: int) -> int:
        """Output bytes of segment `index`."""
        ...

    def output_size(self, plaintext_size: int) -> int:
        """Exact output size of the whole object (what the destination will hold)."""
        ...


class FramedLayout:
    """Fixed-size output segments with a header in segment 0 and a fixed overhead per segment.

    With ``header_size = tag_size = 0`` this is the identity. Segment 0 holds
    ``segment_size - header_size - tag_size`` plaintext bytes, the others ``segment_size - tag_size``.
    """

    segment_size: int = SEGMENT_SIZE
    header_size: int = 0
    tag_size: int = 0
    max_segments: int | None = None

    def __init__(self, *, segment_size: int | None = None, header_size: int | None = None,
                 tag_size: int | None = None, max_segments: int | None = None):
        if segment_size is not None:
            self.segment_size = segment_size
        if header_size is not None:
            self.header_size = header_size
        if tag_size is not None:
            self.tag_size = tag_size
        if max_segments is not None:
            self.max_segments = max_segments
        if self._first_capacity <= 0:
            raise ValueError("the segment is too small to hold the header and a tag")

    @property
    def _first_capacity(self) -> int:
        return self.segment_size - self.header_size - self.tag_size

    @property
    def _capacity(self) -> int:
        return self.segment_size - self.tag_size

    def segment_count(self, plaintext_size: int) -> int:
        if plaintext_size <= self._first_capacity:
            return 1
        rest = plaintext_size - self._first_capacity
        return 1 + -(-rest // self._capacity)

    def segment_plaintext_range(self, index: int, plaintext_size: int) -> tuple[int, int]:
        if index == 0:
            start = 0
            end = self._first_capacity
        else:
            start = self._first_capacity + (index - 1) * self._capacity
            end = start + self._capacity
        return min(start, plaintext_size), min(end, plaintext_size)

    def segment_output_size(self, index: int, plaintext_size: int) -> int:
        start, end = self.segment_plaintext_range(index, plaintext_size)
        return (end - start) + self.tag_size + (self.header_size if index == 0 else 0)

    def output_size(self, plaintext_size: int) -> int:
        return plaintext_size + self.header_size + self.tag_size * self.segment_count(plaintext_size)

    def plaintext_offset(self, first_segment: int, plaintext_size: int) -> int:
        """Where segment `first_segment` starts in the plaintext (== size past the last segment)."""
        return self.segment_plaintext_range(first_segment, plaintext_size)[0]


class IdentityLayout(FramedLayout):
    """No transformation: a segment is 1 MiB of plaintext and 1 MiB of output."""

    header_size = 0
    tag_size = 0


IDENTITY_LAYOUT = IdentityLayout()


def sum_output(layout: SegmentLayout, first: int, count: int, size: int) -> int:
    """Output bytes of segments ``first .. first+count-1`` (full segments are `segment_size`)."""
    last = layout.segment_count(size) - 1
    end = first + count - 1
    if end < last:
        return count * layout.segment_size
    # The run includes the last segment: full segments before it, then the last one's exact size.
    return (count - 1) * layout.segment_size + layout.segment_output_size(last, size)
