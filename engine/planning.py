"""Part planning: how one object is cut into requests the destination accepts.

Everything is planned in **segments**, the unit of the output format. A part is a run of whole
segments, so when encryption arrives a part of m segments is exactly m x 1 MiB of ciphertext and
can be encrypted independently of its neighbours (ARCHITECTURE.md §4, §5).

A `SegmentLayout` answers, for a plaintext size: how many segments, each segment's plaintext range
and output size, and the exact output size. `IdentityLayout` (no encryption: a segment is 1 MiB of
plaintext and 1 MiB of output) is the only layout today.

TODO(encryption): add the Tink layout as a subclass of `FramedLayout`; only the numbers change::

    class TinkLayout(FramedLayout):
        '''Tink streaming AEAD AES256_GCM_HKDF_1MB (first segment offset 0).'''
        header_size = 40     # 0x28 || salt (32) || nonce prefix (7)
        tag_size = 16        # AES-GCM tag per segment
        max_segments = 2**32

    Ciphertext segments are 1,048,576 bytes (the last may be shorter). Segment 0 carries the header,
    so it holds 1,048,576 - 40 - 16 = 1,048,520 plaintext bytes; every other full segment holds
    1,048,576 - 16 = 1,048,560. Empty plaintext is one 56-byte segment (header + tag) marked last;
    a final segment that exactly fills its space is the last one (no empty segment follows).
    Output size = plaintext + 40 + 16 x segments. `tests/unit/test_planning.py` already checks
    these formulas through `FramedLayout(header_size=40, tag_size=16)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from connectors.base import SinkLimits

MiB = 1024 * 1024
SEGMENT_SIZE = MiB  # output bytes per full segment, whatever the layout (Tink: 1 MiB of ciphertext)

# Auto part size when the object and provider allow it: large enough that the per-request overhead
# and the per-part MD5 bookkeeping stay small, small enough that several parts fit the default
# 128 MiB budget at once (8 in flight, 4 once encrypted). rclone lands on the same figure (LAB-NOTES.md).
AUTO_PART_SIZE = 16 * MiB


class PlanRefused(ValueError):
    """The object cannot be written to this destination; the message says why (a sentence)."""


# --------------------------------------------------------------------------------------------
# Segment layouts
# --------------------------------------------------------------------------------------------


@runtime_checkable
class SegmentLayout(Protocol):
    """How an output format cuts a plaintext into segments. Sizes in bytes; ranges half-open."""

    segment_size: int  # output bytes of every segment but the last

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


# --------------------------------------------------------------------------------------------
# Plans
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PartPlan:
    """One request of an object's upload: a run of whole segments.

    `number` is the 1-based S3 part number (1 for a single PUT). The plaintext range is half-open.
    """

    number: int
    first_segment: int
    segment_count: int
    plaintext_start: int
    plaintext_end: int
    output_size: int

    @property
    def plaintext_size(self) -> int:
        return self.plaintext_end - self.plaintext_start


@dataclass(frozen=True)
class ObjectPlan:
    """How one object is written: a single PUT (one part) or a multipart upload."""

    size: int
    output_size: int
    single_put: bool
    part_output_size: int  # output bytes of every part but the last
    parts: tuple[PartPlan, ...]

    @property
    def part_count(self) -> int:
        return len(self.parts)


def _fmt(n: int) -> str:
    """A byte count for a sentence: exact bytes and a readable unit."""
    for unit, scale in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", MiB)):
        if n >= scale:
            return f"{n:,} bytes ({n / scale:.2f} {unit})"
    return f"{n:,} bytes"


def plan_object(size: int, limits: SinkLimits, *, layout: SegmentLayout = IDENTITY_LAYOUT,
                part_size: int | None = None, single_put_cutoff: int = AUTO_PART_SIZE) -> ObjectPlan:
    """Plan the parts of an object of `size` plaintext bytes for a destination with `limits`.

    - An object whose output is at most ``min(single_put_cutoff, limits.max_single_put_size)``
      bytes is one PUT (an empty object always is).
    - Otherwise parts are whole segments of output; every part but the last has the same size,
      at least ``limits.min_part_size`` and at most ``limits.max_part_size``; there are at most
      ``limits.max_parts`` of them.
    - `part_size` (output bytes, rounded up to whole segments) is a preference: it is raised when
      the object would otherwise need more than ``max_parts`` parts, or parts below the minimum.
      None means auto: 16 MiB, raised the same way.

    Raises `PlanRefused` (a sentence naming the numbers) when the object is larger than the
    destination accepts or would need parts above its maximum part size.
    """
    if size < 0:
        raise ValueError(f"object size cannot be negative ({size})")
    seg = layout.segment_size
    output = layout.output_size(size)
    nseg = layout.segment_count(size)
    max_segments = getattr(layout, "max_segments", None)
    if max_segments is not None and nseg > max_segments:
        raise PlanRefused(f"the object is {_fmt(size)}, more than the output format's {max_segments:,} segments hold")
    if output > limits.max_object_size:
        raise PlanRefused(
            f"the object is {_fmt(size)} ({_fmt(output)} as written), over the destination's maximum "
            f"object size of {_fmt(limits.max_object_size)}"
        )

    if output <= min(single_put_cutoff, limits.max_single_put_size) or size == 0:
        part = PartPlan(1, 0, nseg, 0, size, output)
        return ObjectPlan(size, output, True, output, (part,))

    min_m = -(-limits.min_part_size // seg)  # segments per part, so that non-last parts reach the minimum
    max_m = limits.max_part_size // seg
    needed_m = -(-nseg // limits.max_parts)  # fewest segments per part that fit in max_parts
    if needed_m > max_m:
        raise PlanRefused(
            f"the object is {_fmt(size)}: in at most {limits.max_parts:,} parts each part would be at least "
            f"{_fmt(needed_m * seg)}, over the destination's maximum part size of {_fmt(limits.max_part_size)}"
        )
    if min_m > max_m:
        raise PlanRefused(
            f"the destination's part limits cannot be met in whole {_fmt(seg)} segments "
            f"(minimum {_fmt(limits.min_part_size)}, maximum {_fmt(limits.max_part_size)})"
        )
    preferred = part_size if part_size is not None else AUTO_PART_SIZE
    m = max(-(-preferred // seg), needed_m, min_m)
    m = min(m, max_m)  # a preference above the provider maximum is lowered to it
    m = min(m, nseg)  # never plan a part larger than the object

    parts = []
    first = 0
    number = 1
    while first < nseg:
        count = min(m, nseg - first)
        start = layout.segment_plaintext_range(first, size)[0]
        end = layout.segment_plaintext_range(first + count - 1, size)[1]
        out = sum_output(layout, first, count, size)
        parts.append(PartPlan(number, first, count, start, end, out))
        first += count
        number += 1
    assert len(parts) <= limits.max_parts
    return ObjectPlan(size, output, False, m * seg, tuple(parts))


def sum_output(layout: SegmentLayout, first: int, count: int, size: int) -> int:
    """Output bytes of segments ``first .. first+count-1`` (full segments are `segment_size`)."""
    last = layout.segment_count(size) - 1
    end = first + count - 1
    if end < last:
        return count * layout.segment_size
    # The run includes the last segment: full segments before it, then the last one's exact size.
    return (count - 1) * layout.segment_size + layout.segment_output_size(last, size)
