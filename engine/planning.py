"""Part planning: how one object is cut into requests the destination accepts.

Everything is planned in **segments**, the unit of the output format (`engine.crypto.segments`):
a part is a run of whole segments, so a part of m segments is exactly m x 1 MiB of output
(ciphertext, when encrypted) and can be transformed independently of its neighbours
(ARCHITECTURE.md §4, §5).
"""

from __future__ import annotations

from dataclasses import dataclass

from connectors.base import SinkLimits
from engine.crypto.segments import IDENTITY_LAYOUT, MiB, SegmentLayout, sum_output

# Auto part size when the object and provider allow it: large enough that the per-request overhead
# and the per-part MD5 bookkeeping stay small, small enough that several parts fit the default
# 128 MiB budget at once (8 in flight, 4 once encrypted). rclone lands on the same figure (LAB-NOTES.md).
AUTO_PART_SIZE = 16 * MiB


class PlanRefused(ValueError):
    """The object cannot be written to this destination; the message says why (a sentence)."""


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
    max_segments = layout.max_segments
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

