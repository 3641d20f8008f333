"""The one check of a write's answer (connectors.base): an ETag against the MD5 of the bytes sent."""

from __future__ import annotations

import hashlib

import pytest

from connectors.base import IntegrityError, PartReceipt, checked_etag, checked_multipart_etag, multipart_etag


def md5(data: bytes) -> bytes:
    return hashlib.md5(data).digest()


def test_an_etag_that_is_the_md5_of_the_bytes_sent_passes_quoted_or_in_capitals():
    digest = md5(b"part")
    assert checked_etag(digest.hex(), digest, what="part 1") == digest.hex()
    assert checked_etag(f'"{digest.hex().upper()}"', digest, what="part 1") == f'"{digest.hex().upper()}"'


@pytest.mark.parametrize("etag", ["0" * 32, "opaque-etag", "", md5(b"part").hex() + "-1"])
def test_any_other_etag_is_a_retryable_integrity_error_naming_the_write(etag):
    with pytest.raises(IntegrityError) as info:
        checked_etag(etag, md5(b"part"), what="s3:bucket: part 2 of 'k'", key="k")
    assert info.value.retryable and info.value.key == "k"
    assert "part 2 of 'k'" in str(info.value) and md5(b"part").hex() in str(info.value)


def test_a_completed_object_must_have_the_etag_its_parts_make():
    parts = [PartReceipt(1, md5(b"one").hex(), 3), PartReceipt(2, f'"{md5(b"two").hex()}"', 3)]
    expected = multipart_etag([md5(b"one"), md5(b"two")])
    assert checked_multipart_etag(expected, parts, what="'k'") == expected
    with pytest.raises(IntegrityError) as info:
        checked_multipart_etag(multipart_etag([md5(b"two"), md5(b"one")]), parts, what="'k'", key="k")
    assert expected in str(info.value)


def test_a_part_etag_that_is_not_an_md5_cannot_vouch_for_the_object():
    parts = [PartReceipt(1, "opaque", 3)]
    with pytest.raises(IntegrityError) as info:
        checked_multipart_etag(multipart_etag([md5(b"one")]), parts, what="'k'")
    assert "part 1" in str(info.value)
