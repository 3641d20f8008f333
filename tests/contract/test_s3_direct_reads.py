"""A source's per-object look (HeadObject and GetObjectTagging) sent as direct requests reads what
the client reads, on both lab S3 servers: content headers, user metadata, storage class, sizes,
times and tags, and the same errors for a missing key, a missing bucket and a stale ETag."""

from __future__ import annotations

import pytest

import flows.lab_processes as lp
from connectors.base import NotFound, SourceChanged
from connectors.s3 import BucketNotFound
from tests.contract.contract_support import lab_boto3_client, make_s3_store, refuse_client_operations, unique_name

KEYS = ["plain.csv", "dir/sub dir/a+b=c&d.txt", "ünïcödé/é.dcm", "semi;colon,comma'quote(paren)*star!"]
# What AWS and moto allow in a tag: letters, digits, spaces and `_ . : / = + - @ %`.
TAGS = "project=hdh&phase%202=a%3Db%2Bc&empty=&site=Lyon%3A%2F69"


@pytest.fixture(params=["s3_server", "ministack_server"])
def server_bucket(request):
    url = request.getfixturevalue(request.param).url
    client = lab_boto3_client(url)
    bucket = unique_name()
    client.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": lp.LAB_REGION})
    return url, bucket, client


def _stores(url: str, bucket: str, monkeypatch):
    """(direct, through the client): the first refuses to send a HEAD or a tagging read through
    botocore, the second has no libcurl session."""
    direct = make_s3_store(url, bucket, source_details=True)
    refuse_client_operations(direct, monkeypatch, "head_object", "get_object_tagging")
    sdk = make_s3_store(url, bucket, source_details=True)
    sdk._curl = None
    assert direct._direct_ok() and not sdk._direct_ok()
    return direct, sdk


def test_head_and_tags_sent_directly_read_what_the_client_reads(server_bucket, monkeypatch):
    url, bucket, client = server_bucket
    for i, key in enumerate(KEYS):
        client.put_object(Bucket=bucket, Key=key, Body=b"x" * (i * 1000), ContentType="application/dicom",
                          ContentEncoding="gzip", CacheControl="no-cache", ContentLanguage="fr-FR",
                          ContentDisposition='attachment; filename="x.dcm"', StorageClass="STANDARD_IA",
                          Metadata={"exitplan-sha256": "ab" * 32, "Mixed-Case": "v a l", "encoded": "Z%C3%BCrich",
                                    "padded": "  runs   of  spaces "},
                          Tagging=TAGS)
    client.put_object(Bucket=bucket, Key="bare.bin", Body=b"")  # nothing set: no tag, no metadata
    direct, sdk = _stores(url, bucket, monkeypatch)
    with direct, sdk:
        for key in KEYS + ["bare.bin"]:
            ours, theirs = direct.head(key), sdk.head(key)
            assert ours == theirs, key
            assert ours.last_modified.utcoffset().total_seconds() == 0
            assert direct.tags(key) == sdk.tags(key)
        assert direct.head(KEYS[1]).metadata["exitplan-sha256"] == "ab" * 32
        assert direct.tags(KEYS[0]) == {"project": "hdh", "phase 2": "a=b+c", "empty": "", "site": "Lyon:/69"}
        assert direct.tags("bare.bin") == {}
        assert list(direct.list("")) == list(sdk.list(""))  # the listing's look at each object


def test_a_direct_head_fails_as_the_client_does(server_bucket, monkeypatch):
    url, bucket, client = server_bucket
    client.put_object(Bucket=bucket, Key="k.bin", Body=b"0123456789")
    direct, sdk = _stores(url, bucket, monkeypatch)
    with direct, sdk:
        for store in (direct, sdk):
            with pytest.raises(NotFound):
                store.head("missing.bin")
            with pytest.raises(NotFound):
                store.tags("missing.bin")
            with pytest.raises(SourceChanged):  # an empty range proves the object at that ETag with a HEAD
                store.read_range("k.bin", 0, 0, if_match="0" * 32)
            assert store.read_range("k.bin", 3, 3, if_match=store.head("k.bin").etag) == b""
    gone = make_s3_store(url, unique_name("missing"))
    with gone:
        with pytest.raises(BucketNotFound, match="does not exist"):
            gone.head("k.bin")


def test_a_page_s_first_objects_are_yielded_while_the_rest_are_looked_at(s3_server):
    """A source's listing hands each object on once it and those before it are looked at: the
    copy of a page's first objects does not wait for the whole page's HEADs and tag reads (up to
    1,000 objects, two requests each). The order stays the listing's."""
    import threading

    client = lab_boto3_client(s3_server.url)
    bucket = unique_name()
    client.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": lp.LAB_REGION})
    keys = [f"k{i:02d}" for i in range(12)]
    for key in keys:
        client.put_object(Bucket=bucket, Key=key, Body=key.encode())
    store = make_s3_store(s3_server.url, bucket, source_details=True)
    first_taken = threading.Event()
    look = store._details

    def details(listed):
        if listed.key == keys[-1]:  # the page's last object waits until the first was handed on
            assert first_taken.wait(10), "the listing held the page's first object back"
        return look(listed)

    store._details = details
    with store:
        listing = store.list("")
        got = [next(listing).key]
        first_taken.set()
        got += [m.key for m in listing]
    assert got == keys
