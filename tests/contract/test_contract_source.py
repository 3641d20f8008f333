"""The `ObjectSource` contract, run over every connector (memory, Azurite, the S3 server).

Objects are seeded with the store's own SDK (or the memory store's helpers), then read through
the connector: listing (paged, ordered, filtered, streamed), head fields, ranged reads pinned to an
ETag, and the errors a caller must be able to tell apart.
"""

from __future__ import annotations

import gzip
import hashlib
from datetime import datetime

import pytest

from connectors.base import ContentSettings, InvalidRequest, NotFound, ObjectSource, SourceChanged
from tests.contract.contract_support import require

# Names that break naive URL handling: space, an encoded-looking %20, plus, hash, question mark,
# non-ASCII, and "directories".
AWKWARD_NAMES = [
    "plain.txt",
    "with space.csv",
    "per%20cent",
    "plus+sign",
    "hash#tag",
    "question?mark",
    "dir/nested/leaf.json",
    "é/日本語.parquet",
    "Zürich & co",
]


def _data(key: str, n: int = 100) -> bytes:
    seed = hashlib.sha256(key.encode()).digest()
    return (seed * (n // len(seed) + 1))[:n]


def test_connector_implements_the_protocol(source_harness):
    source = source_harness.source()
    assert isinstance(source, ObjectSource)
    assert source.label and isinstance(source.unsupported, frozenset)


def test_list_pages_through_everything_in_key_order(source_harness):
    for i, key in enumerate(AWKWARD_NAMES):
        source_harness.seed(key, _data(key, 10 + i))
    source = source_harness.source(page_size=2)  # far fewer than the objects: many pages

    listed = list(source.list())

    assert [m.key for m in listed] == sorted(AWKWARD_NAMES)
    for meta in listed:
        assert meta.size == 10 + AWKWARD_NAMES.index(meta.key)
        assert meta.etag and '"' not in meta.etag
        assert meta.etag == source.head(meta.key).etag


def test_list_filters_by_prefix(source_harness):
    keys = ["a/1", "a/2", "a b/1", "a+b/1", "ab", "b/1", "é/1", "é/2"]
    for key in keys:
        source_harness.seed(key, b"x")
    source = source_harness.source(page_size=2)

    assert [m.key for m in source.list("a/")] == ["a/1", "a/2"]
    assert [m.key for m in source.list("a b/")] == ["a b/1"]
    assert [m.key for m in source.list("a+")] == ["a+b/1"]
    assert [m.key for m in source.list("é/")] == ["é/1", "é/2"]
    assert [m.key for m in source.list("a")] == sorted(k for k in keys if k.startswith("a"))
    assert list(source.list("nothing-here/")) == []
    assert [m.key for m in source.list("")] == sorted(keys)


def test_list_is_streamed_page_by_page(source_harness):
    """A key written after the first page was consumed still shows up: pages are fetched lazily."""
    for i in range(5):
        source_harness.seed(f"k{i}", b"x")
    source = source_harness.source(page_size=2)
    require(source, "listing-pages")

    listing = source.list()
    first_page = [next(listing).key, next(listing).key]
    source_harness.seed("zz-written-while-listing", b"y")
    rest = [m.key for m in listing]

    assert first_page == ["k0", "k1"]
    assert rest == ["k2", "k3", "k4", "zz-written-while-listing"]


def test_empty_store_lists_nothing(source_harness):
    assert list(source_harness.source(page_size=2).list()) == []


def test_head_returns_size_etag_md5_content_settings_and_metadata(source_harness):
    data = _data("report", 1234)
    content = ContentSettings(
        content_type="text/csv; charset=utf-8",
        content_encoding="gzip",
        cache_control="max-age=3600",
        content_disposition='attachment; filename="report.csv"',
        content_language="fr-FR",
    )
    # Metadata values arrive already encoded by the caller (headers carry ASCII only); names are
    # C# identifiers on Azure, lowercase on S3.
    metadata = {"patient_site": "Z%C3%BCrich", "batch": "2024-06"}
    source_harness.seed("reports/report.csv", data, content=content, metadata=metadata)
    source = source_harness.source()

    meta = source.head("reports/report.csv")

    assert meta.key == "reports/report.csv"
    assert meta.size == len(data)
    assert meta.etag and '"' not in meta.etag
    assert meta.content_md5 == hashlib.md5(data).digest()
    assert meta.content_md5_b64 is not None
    assert meta.content == content
    assert dict(meta.metadata) == metadata
    assert isinstance(meta.last_modified, datetime) and meta.last_modified.tzinfo is not None
    if "tiers" not in source.unsupported:
        assert isinstance(meta.tier, str) and meta.tier
    [listed] = list(source.list("reports/"))
    assert (listed.key, listed.size, listed.etag) == (meta.key, meta.size, meta.etag)


def test_head_has_no_md5_when_the_store_keeps_none(source_harness):
    """Azure block uploads without Content-MD5 and S3 multipart objects have no object MD5."""
    data = _data("blocks", 300)
    source_harness.seed("blocks.bin", data, with_md5=False)
    source = source_harness.source()

    meta = source.head("blocks.bin")

    assert meta.content_md5 is None
    assert meta.size == 300
    assert source.read_range("blocks.bin", 0, 300, if_match=meta.etag) == data


def test_head_of_special_names(source_harness):
    for key in AWKWARD_NAMES:
        source_harness.seed(key, _data(key))
    source = source_harness.source()
    for key in AWKWARD_NAMES:
        meta = source.head(key)
        assert meta.key == key
        assert source.read_range(key, 0, meta.size, if_match=meta.etag) == _data(key)


@pytest.mark.parametrize(
    "start,end",
    [(0, 10), (400, 600), (990, 1000), (0, 1000), (999, 1000), (500, 500), (1000, 1000)],
    ids=["start", "middle", "end", "whole", "last-byte", "empty-middle", "empty-at-end"],
)
def test_read_range_returns_exactly_the_bytes_asked(source_harness, start, end):
    data = _data("ranged", 1000)
    source_harness.seed("ranged.bin", data)
    source = source_harness.source()
    etag = source.head("ranged.bin").etag

    assert source.read_range("ranged.bin", start, end, if_match=etag) == data[start:end]
    assert source.read_range("ranged.bin", start, end) == data[start:end]


def test_read_of_an_empty_object(source_harness):
    source_harness.seed("empty", b"")
    source = source_harness.source()
    meta = source.head("empty")

    assert meta.size == 0
    assert source.read_range("empty", 0, 0, if_match=meta.etag) == b""
    assert source.read_range("empty", 0, 0) == b""


@pytest.mark.parametrize("with_md5", [True, False], ids=["single-shot", "blocks"])
def test_a_content_encoded_object_is_read_as_stored(source_harness, with_md5):
    """Content-Encoding is carried to the destination, never applied on the way: the bytes read are
    the stored (compressed) ones, whole or in ranges."""
    data = gzip.compress(b"const answer = 42;\n" * 20_000)
    content = ContentSettings(content_type="text/javascript", content_encoding="gzip")
    source_harness.seed("site/app.js", data, content=content, with_md5=with_md5)
    source = source_harness.source()
    meta = source.head("site/app.js")

    assert meta.size == len(data) and meta.content == content
    assert source.read_range("site/app.js", 0, meta.size, if_match=meta.etag) == data
    assert source.read_range("site/app.js", 100, 700, if_match=meta.etag) == data[100:700]


def test_read_range_beyond_the_object_is_refused(source_harness):
    source_harness.seed("short", b"0123456789")
    source = source_harness.source()
    with pytest.raises(InvalidRequest):
        source.read_range("short", 5, 20)
    with pytest.raises(InvalidRequest):
        source.read_range("short", 15, 20)
    with pytest.raises(InvalidRequest):
        source.read_range("short", 11, 11)


def test_stale_etag_raises_source_changed(source_harness):
    source_harness.seed("moving", b"version one")
    source = source_harness.source()
    old = source.head("moving").etag
    source_harness.seed("moving", b"version two!")
    new = source.head("moving").etag

    assert new != old
    with pytest.raises(SourceChanged) as info:
        source.read_range("moving", 0, 5, if_match=old)
    assert not info.value.retryable
    with pytest.raises(SourceChanged):
        source.read_range("moving", 0, 0, if_match=old)
    assert source.read_range("moving", 0, 12, if_match=new) == b"version two!"


def test_missing_key_raises_not_found(source_harness):
    source_harness.seed("present", b"x")
    source = source_harness.source()
    with pytest.raises(NotFound) as info:
        source.head("absent")
    assert "absent" in str(info.value)
    with pytest.raises(NotFound):
        source.read_range("absent", 0, 1)
    with pytest.raises(NotFound):
        source.read_range("absent", 0, 0)
    # Pinned to an ETag, a missing object may also read as changed (Azure answers 412 there, as
    # RFC 9110 allows): either way the engine re-heads the object and finds it gone.
    with pytest.raises((NotFound, SourceChanged)):
        source.read_range("absent", 0, 1, if_match="0x8D0000000000000")


def test_missing_container_or_bucket_raises_not_found_naming_it(source_harness):
    source = source_harness.missing_source()
    for call in (lambda: list(source.list()), lambda: source.head("k"), lambda: source.read_range("k", 0, 1)):
        with pytest.raises(NotFound) as info:
            call()
        assert "missing-" in str(info.value)
        assert "does not exist" in str(info.value)
