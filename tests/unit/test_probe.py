"""The probe's arithmetic without a server: where a limit lies, and the overrides it suggests."""

from __future__ import annotations

import pytest

from connectors.s3_probe import ACCEPTED, Answer, SizeLimit, _limit
from engine.probe import _Suggestions


def refusing_above(largest: int):
    tried: list[int] = []

    def attempt(n: int) -> Answer:
        tried.append(n)
        return ACCEPTED if n <= largest else Answer(False, 400, "InvalidTag")

    return attempt, tried


def test_a_limit_at_the_profiles_value_is_tried_one_above():
    attempt, tried = refusing_above(10)
    found = _limit(attempt, 10)
    assert (found.largest_accepted, found.first_refused, str(found.refusal)) == (10, 11, "refused: 400 InvalidTag")
    assert tried == [10, 11]


def test_a_lower_limit_is_searched_below_the_profiles_value():
    attempt, tried = refusing_above(7)
    found = _limit(attempt, 2048)
    assert (found.largest_accepted, found.first_refused) == (7, 8)
    assert len(tried) <= 13   # a binary search, not a walk


def test_nothing_accepted_is_said_as_such():
    attempt, _ = refusing_above(0)
    found = _limit(attempt, 10)
    assert (found.largest_accepted, found.first_refused) == (None, 1)


def test_more_than_the_profile_says_is_no_refusal():
    attempt, _ = refusing_above(10**6)
    assert _limit(attempt, 10) == SizeLimit(11, None, None)


def test_suggestions_keep_the_destinations_current_overrides():
    s = _Suggestions()
    s.add("multipart.etag", "opaque")
    s.add("flexible_checksums", False)
    current = {"multipart": {"list_parts": False}, "limits": {"max_tags": 5}}
    assert s.merged_with(current) == {"multipart": {"list_parts": False, "etag": "opaque"}, "limits": {"max_tags": 5},
                                      "flexible_checksums": False}
    assert current == {"multipart": {"list_parts": False}, "limits": {"max_tags": 5}}   # not changed in place
    assert _Suggestions().merged_with(current) == {}   # nothing to change: nothing to paste


@pytest.mark.parametrize("measured, said, verdict, suggested", [
    ((Answer(True), True), True, "ok", None),
    ((Answer(False, 400, "InvalidRequest"), None), True, "FAIL", False),
    ((Answer(True), False), True, "FAIL", False),           # accepted, but the object is not botocore's
    ((Answer(False, 400, "InvalidRequest"), None), False, "ok", None),
    ((Answer(True), True), False, "differs", True),
    ((None, None), True, "ok", None),                        # an endpoint only botocore resolves
])
def test_the_direct_requests_check(measured, said, verdict, suggested):
    from engine.probe import _direct_check

    sugg = _Suggestions()
    assert _direct_check(measured, said, sugg).verdict == verdict
    assert sugg.values.get("direct_requests") == suggested
