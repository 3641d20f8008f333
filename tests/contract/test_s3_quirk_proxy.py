"""The quirk mode of the fault proxy (tests/faultproxy.py `QuirkProxy`) and the second S3 server:
what they answer, checked with a plain boto3 client, so the tests that rely on them rest on facts."""

from __future__ import annotations

import base64
import hashlib

import pytest
from botocore.exceptions import ClientError

from flows import lab_processes as lp
from tests.contract.contract_support import lab_boto3_client, unique_name
from tests.faultproxy import QuirkProxy, opaque_etag

pytestmark = pytest.mark.integration

PART = 5 * 1024 * 1024  # the smallest non-last part S3 accepts


def _multipart(client, bucket: str, key: str, parts: list[bytes]) -> dict:
    upload = client.create_multipart_upload(Bucket=bucket, Key=key)
    etags = [client.upload_part(Bucket=bucket, Key=key, UploadId=upload["UploadId"], PartNumber=n, Body=data)["ETag"]
             for n, data in enumerate(parts, 1)]
    return client.complete_multipart_upload(
        Bucket=bucket, Key=key, UploadId=upload["UploadId"],
        MultipartUpload={"Parts": [{"PartNumber": n, "ETag": e} for n, e in enumerate(etags, 1)]})


def _error(info: pytest.ExceptionInfo) -> tuple[int, str]:
    response = info.value.response
    return response["ResponseMetadata"]["HTTPStatusCode"], response["Error"]["Code"]


@pytest.fixture
def quirky(s3_server):
    """A QuirkProxy in front of moto with every quirk on, a client through it and a fresh bucket."""
    with QuirkProxy(lp.LOOPBACK, s3_server.port) as proxy:
        client = lab_boto3_client(proxy.url)
        bucket = unique_name()
        client.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": lp.LAB_REGION})
        yield proxy, client, bucket


def test_multipart_etags_are_opaque_and_the_same_in_every_answer(quirky, s3_server):
    proxy, client, bucket = quirky
    parts = [b"a" * PART, b"b" * 10]
    real = lab_boto3_client(s3_server.url)
    completed = _multipart(client, bucket, "big", parts)["ETag"]
    upstream = real.head_object(Bucket=bucket, Key="big")["ETag"]
    md5_of_md5s = hashlib.md5(b"".join(hashlib.md5(p).digest() for p in parts)).hexdigest()
    assert upstream == f'"{md5_of_md5s}-2"'
    shown = f'"{opaque_etag(upstream.strip(chr(34)).encode()).decode()}"'
    assert completed == shown and "-" not in shown
    assert shown.strip('"') not in (md5_of_md5s, hashlib.md5(b"".join(parts)).hexdigest())
    assert client.head_object(Bucket=bucket, Key="big")["ETag"] == shown
    assert client.get_object(Bucket=bucket, Key="big", Range="bytes=0-0")["ETag"] == shown
    assert [o["ETag"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]] == [shown]
    # A conditional read with the shown ETag holds (translated back), a stale one does not.
    assert client.get_object(Bucket=bucket, Key="big", IfMatch=shown)["Body"].read() == b"".join(parts)
    with pytest.raises(ClientError) as info:
        client.get_object(Bucket=bucket, Key="big", IfMatch=f'"{"0" * 32}"')
    assert _error(info)[0] == 412
    # Single-PUT ETags stay the object's MD5.
    small = client.put_object(Bucket=bucket, Key="small", Body=b"xyz")["ETag"]
    assert small == f'"{hashlib.md5(b"xyz").hexdigest()}"'


def test_list_parts_abort_and_list_uploads_are_refused(quirky, s3_server):
    proxy, client, bucket = quirky
    upload = client.create_multipart_upload(Bucket=bucket, Key="k")["UploadId"]
    client.upload_part(Bucket=bucket, Key="k", UploadId=upload, PartNumber=1, Body=b"x")
    with pytest.raises(ClientError) as info:
        client.list_parts(Bucket=bucket, Key="k", UploadId=upload)
    assert _error(info) == (405, "MethodNotAllowed")
    with pytest.raises(ClientError) as info:
        client.abort_multipart_upload(Bucket=bucket, Key="k", UploadId=upload)
    assert _error(info) == (405, "MethodNotAllowed")
    with pytest.raises(ClientError) as info:
        client.list_multipart_uploads(Bucket=bucket)
    assert _error(info) == (501, "NotImplemented")
    assert proxy.refused == {"ListParts": 1, "AbortMultipartUpload": 1, "ListMultipartUploads": 1}
    # Refused, not forwarded: the upload is still there behind the proxy.
    real = lab_boto3_client(s3_server.url)
    assert [u["UploadId"] for u in real.list_multipart_uploads(Bucket=bucket)["Uploads"]] == [upload]


def test_each_quirk_switches_on_its_own(s3_server):
    with QuirkProxy(lp.LOOPBACK, s3_server.port, opaque_etags=False, list_parts=True, abort=True,
                    list_uploads=True) as proxy:
        client = lab_boto3_client(proxy.url)
        bucket = unique_name()
        client.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": lp.LAB_REGION})
        assert _multipart(client, bucket, "big", [b"a" * PART, b"b"])["ETag"].endswith('-2"')
        upload = client.create_multipart_upload(Bucket=bucket, Key="k")["UploadId"]
        assert client.list_parts(Bucket=bucket, Key="k", UploadId=upload)["UploadId"] == upload
        assert [u["UploadId"] for u in client.list_multipart_uploads(Bucket=bucket)["Uploads"]] == [upload]
        client.abort_multipart_upload(Bucket=bucket, Key="k", UploadId=upload)
        assert not proxy.refused


def test_the_second_server_behaves_like_s3_where_moto_does_not(ministack_server):
    """ministack refuses a wrong Content-MD5 (moto does not) and gives md5-of-md5s-N multipart ETags."""
    client = lab_boto3_client(ministack_server.url)
    bucket = unique_name()
    client.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": lp.LAB_REGION})
    wrong = base64.b64encode(hashlib.md5(b"other").digest()).decode()
    with pytest.raises(ClientError) as info:
        client.put_object(Bucket=bucket, Key="k", Body=b"data", ContentMD5=wrong)
    assert _error(info) == (400, "BadDigest")
    parts = [b"a" * PART, b"b"]
    expected = hashlib.md5(b"".join(hashlib.md5(p).digest() for p in parts)).hexdigest()
    assert _multipart(client, bucket, "big", parts)["ETag"] == f'"{expected}-2"'
