"""Part planning: segment layouts, provider limits, refusals."""

from __future__ import annotations

import pytest

from connectors.base import SinkLimits
from engine.crypto.segments import IDENTITY_LAYOUT, FramedLayout, MiB, sum_output
from engine.planning import ObjectPlan, PlanRefused, plan_object

GiB = 1024**3
TiB = 1024**4
TB = 10**12

SCALEWAY = SinkLimits(min_part_size=5 * MiB, max_part_size=5 * GiB, max_parts=1_000, max_object_size=5 * TiB)
OVHCLOUD = SinkLimits(min_part_size=5 * MiB, max_part_size=5 * GiB, max_parts=10_000, max_object_size=5 * TiB)
SMALL = SinkLimits(min_part_size=MiB, max_part_size=64 * MiB, max_parts=10_000)

# The Tink AES256_GCM_HKDF_1MB numbers (ARCHITECTURE.md §5), through the generic framed layout.
TINK = FramedLayout(header_size=40, tag_size=16, max_segments=2**32)
P0 = MiB - 40 - 16
P = MiB - 16


def check_plan(plan: ObjectPlan, size: int, limits: SinkLimits, layout=IDENTITY_LAYOUT) -> None:
    """Every invariant a plan must hold."""
    assert plan.size == size
    assert plan.output_size == layout.output_size(size)
    assert 1 <= plan.part_count <= limits.max_parts
    assert [p.number for p in plan.parts] == list(range(1, plan.part_count + 1))
    assert plan.parts[0].plaintext_start == 0 and plan.parts[0].first_segment == 0
    assert plan.parts[-1].plaintext_end == size
    assert sum(p.segment_count for p in plan.parts) == layout.segment_count(size)
    assert sum(p.output_size for p in plan.parts) == plan.output_size
    for a, b in zip(plan.parts, plan.parts[1:]):
        assert a.plaintext_end == b.plaintext_start
        assert a.first_segment + a.segment_count == b.first_segment
    if not plan.single_put:
        for p in plan.parts[:-1]:
            assert p.output_size == plan.part_output_size
            assert p.output_size % layout.segment_size == 0
            assert limits.min_part_size <= p.output_size <= limits.max_part_size
        assert plan.parts[-1].output_size <= limits.max_part_size


# ---- layouts --------------------------------------------------------------------------------


@pytest.mark.parametrize("size,segments", [(0, 1), (1, 1), (MiB - 1, 1), (MiB, 1), (MiB + 1, 2), (3 * MiB, 3)])
def test_identity_layout_counts_whole_mebibytes(size, segments):
    assert IDENTITY_LAYOUT.segment_count(size) == segments
    assert IDENTITY_LAYOUT.output_size(size) == size
    last = segments - 1
    assert IDENTITY_LAYOUT.segment_plaintext_range(last, size)[1] == size
    assert IDENTITY_LAYOUT.segment_plaintext_range(last, size)[0] == last * MiB


@pytest.mark.parametrize("size,segments,output", [
    (0, 1, 56),                       # empty: header + tag, one segment
    (1, 1, 57),
    (P0, 1, MiB),                     # segment 0 exactly full: it is the last one
    (P0 + 1, 2, P0 + 1 + 40 + 32),
    (P0 + P, 2, 2 * MiB),             # a final segment that fills its space is last: no empty one
    (P0 + P + 1, 3, P0 + P + 1 + 40 + 48),
])
def test_tink_numbers_through_the_framed_layout(size, segments, output):
    assert TINK.segment_count(size) == segments
    assert TINK.output_size(size) == output
    assert sum(TINK.segment_output_size(i, size) for i in range(segments)) == output
    assert TINK.segment_plaintext_range(0, size) == (0, min(size, P0))
    if segments > 1:
        assert TINK.segment_plaintext_range(1, size)[0] == P0


def test_sum_output_of_runs_matches_segment_sizes():
    size = 5 * MiB + 123
    for layout in (IDENTITY_LAYOUT, TINK):
        n = layout.segment_count(size)
        for first in range(n):
            for count in range(1, n - first + 1):
                expected = sum(layout.segment_output_size(i, size) for i in range(first, first + count))
                assert sum_output(layout, first, count, size) == expected


# ---- plans ------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, MiB, 2 * MiB - 1, 2 * MiB, 2 * MiB + 1, 10 * MiB + 7, 100 * MiB])
def test_plans_hold_every_invariant(size):
    for layout in (IDENTITY_LAYOUT, TINK):
        plan = plan_object(size, SMALL, layout=layout, part_size=2 * MiB, single_put_cutoff=2 * MiB)
        check_plan(plan, size, SMALL, layout)


def test_single_put_at_and_below_the_cutoff_multipart_above():
    assert plan_object(0, SMALL, single_put_cutoff=0).single_put
    assert plan_object(4 * MiB, SMALL, single_put_cutoff=4 * MiB).single_put
    plan = plan_object(4 * MiB + 1, SMALL, single_put_cutoff=4 * MiB, part_size=2 * MiB)
    assert not plan.single_put
    assert [p.output_size for p in plan.parts] == [2 * MiB, 2 * MiB, 1]


def test_single_put_never_above_the_provider_maximum():
    limits = SinkLimits(min_part_size=MiB, max_single_put_size=3 * MiB)
    plan = plan_object(4 * MiB, limits, single_put_cutoff=100 * MiB, part_size=MiB)
    assert not plan.single_put and plan.part_count == 4


def test_configured_part_size_is_rounded_up_to_whole_segments():
    plan = plan_object(20 * MiB, SMALL, part_size=5 * MiB + 1, single_put_cutoff=0)
    assert plan.part_output_size == 6 * MiB
    assert [p.output_size for p in plan.parts] == [6 * MiB] * 3 + [2 * MiB]


def test_part_size_below_the_provider_minimum_is_raised():
    plan = plan_object(30 * MiB, SCALEWAY, part_size=MiB, single_put_cutoff=0)
    assert plan.part_output_size == 5 * MiB
    check_plan(plan, 30 * MiB, SCALEWAY)


def test_part_size_is_raised_to_stay_within_max_parts():
    limits = SinkLimits(min_part_size=MiB, max_part_size=GiB, max_parts=10)
    plan = plan_object(100 * MiB + 1, limits, part_size=MiB, single_put_cutoff=0)
    assert plan.part_count <= 10
    assert plan.part_output_size == 11 * MiB  # ceil(101 segments / 10 parts)
    check_plan(plan, 100 * MiB + 1, limits)


def test_part_size_above_the_provider_maximum_is_lowered():
    plan = plan_object(300 * MiB, SMALL, part_size=GiB, single_put_cutoff=0)
    assert plan.part_output_size == 64 * MiB
    check_plan(plan, 300 * MiB, SMALL)


def test_five_terabytes_on_scaleway_plans_in_1000_parts_of_about_5_gb():
    plan = plan_object(5 * TB, SCALEWAY)
    check_plan(plan, 5 * TB, SCALEWAY)
    assert plan.part_count == 1_000
    assert 4.9e9 < plan.part_output_size <= 5 * GiB
    assert plan.part_output_size == 4_769 * MiB


def test_five_terabytes_encrypted_on_scaleway_still_plans():
    plan = plan_object(5 * TB, SCALEWAY, layout=TINK)
    check_plan(plan, 5 * TB, SCALEWAY, TINK)
    assert plan.part_count <= 1_000


def test_five_tebibytes_on_scaleway_is_refused_with_the_numbers():
    with pytest.raises(PlanRefused) as err:
        plan_object(5 * TiB, SCALEWAY)
    message = str(err.value)
    assert "1,000 parts" in message and "maximum part size" in message and "5.00 GiB" in message


def test_five_tebibytes_on_ovhcloud_plans_within_10000_parts():
    plan = plan_object(5 * TiB, OVHCLOUD)
    check_plan(plan, 5 * TiB, OVHCLOUD)
    assert plan.part_output_size == 525 * MiB
    assert plan.part_count == 9_987


def test_an_object_over_the_maximum_object_size_is_refused():
    with pytest.raises(PlanRefused, match="maximum object size"):
        plan_object(5 * TiB + 1, OVHCLOUD)
    # Encryption overhead counts: exactly 5 TiB of plaintext no longer fits once framed.
    with pytest.raises(PlanRefused, match="as written"):
        plan_object(5 * TiB, OVHCLOUD, layout=TINK)


def test_inconsistent_provider_limits_are_refused_not_violated():
    limits = SinkLimits(min_part_size=10 * MiB, max_part_size=8 * MiB)
    with pytest.raises(PlanRefused, match="part limits"):
        plan_object(100 * MiB, limits, single_put_cutoff=0)
