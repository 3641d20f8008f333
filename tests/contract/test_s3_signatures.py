"""The direct requests' SigV4 (connectors/signing.py) against a server that checks signatures.

The lab's S3 servers accept any signature; moto checks them once its IAM access control is on
(`INITIAL_NO_AUTH_ACTION_COUNT`: the first requests, which make a user and its key, go unchecked).
So a moto of its own, on a free loopback port: what `S3Store` sends directly (small PUTs and
ranged reads, keys and metadata that canonicalisation gets wrong first) is accepted with the right
secret and refused by name with a wrong one, nothing written.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

import boto3
import pytest

import flows.lab_processes as lp
from connectors.base import AuthError, ContentSettings, SinkLimits, WriteMeta
from connectors.s3 import S3Store
from tests.contract.contract_support import refuse_client_operations

BUCKET = "signed-requests"
KEYS = ["plain.bin", "a b/c  d.bin", "é/日本語.dcm", "x+y=z&w;[]!$'()*,:@~.bin", "deep/" * 5 + "0001.bin"]


@pytest.fixture(scope="module")
def checking_moto(tmp_path_factory):
    """(endpoint URL, access key id, secret) of a moto that checks every request's signature."""
    spec = replace(lp.s3_spec(lp.free_port()), env={"INITIAL_NO_AUTH_ACTION_COUNT": "4"})
    proc = lp.start_server(spec, tmp_path_factory.mktemp("moto-auth") / "moto.log")
    url = f"http://{lp.LOOPBACK}:{spec.port}"
    try:
        iam = boto3.client("iam", endpoint_url=url, region_name="us-east-1",
                           aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
        iam.create_user(UserName="exitplan")
        iam.put_user_policy(UserName="exitplan", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="exitplan")["AccessKey"]
        client = boto3.client("s3", endpoint_url=url, region_name=lp.LAB_REGION,
                              aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"])
        client.create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": lp.LAB_REGION})
        yield url, key["AccessKeyId"], key["SecretAccessKey"], client
    finally:
        lp.stop_pid(proc.pid)


def store(url: str, key_id: str, secret: str) -> S3Store:
    return S3Store(BUCKET, endpoint_url=url, region=lp.LAB_REGION, access_key_id=key_id, secret_access_key=secret,
                   limits=SinkLimits(), max_attempts=1)


def no_client_puts(s3: S3Store, monkeypatch) -> None:
    """Make sure the bodies and the looks at objects go as direct requests: the client's
    PutObject, HeadObject or GetObjectTagging would fail the test."""
    refuse_client_operations(s3, monkeypatch, "put_object", "head_object", "get_object_tagging")


def test_direct_puts_and_reads_are_signed_as_the_server_checks(checking_moto, monkeypatch):
    url, key_id, secret, client = checking_moto
    s3 = store(url, key_id, secret)
    no_client_puts(s3, monkeypatch)
    meta = WriteMeta(content=ContentSettings(content_type="text/csv; charset=utf-8", cache_control="no-cache"),
                     metadata={"study": "  runs   of  spaces ", "site": "Lyon"})
    for i, key in enumerate(KEYS):
        body = f"object {i} ".encode() * 100
        etag = s3.put(key, body, len(body), meta, hashlib.md5(body).digest())
        assert etag == hashlib.md5(body).hexdigest()
        assert client.get_object(Bucket=BUCKET, Key=key)["Body"].read() == body
        assert s3.read_range(key, 7, 20, if_match=etag) == body[7:20]
        head = s3.head(key)
        assert (head.size, head.etag, dict(head.metadata)) == (
            len(body), etag, client.head_object(Bucket=BUCKET, Key=key)["Metadata"])
        assert s3.tags(key) == {}


def test_a_wrong_secret_is_refused_by_name_and_writes_nothing(checking_moto, monkeypatch):
    url, key_id, _secret, client = checking_moto
    s3 = store(url, key_id, "not-the-secret")
    no_client_puts(s3, monkeypatch)
    body = b"never written"
    with pytest.raises(AuthError, match="access refused.*SignatureDoesNotMatch"):
        s3.put("refused.bin", body, len(body), WriteMeta(), hashlib.md5(body).digest())
    with pytest.raises(client.exceptions.ClientError, match="404|Not Found"):
        client.head_object(Bucket=BUCKET, Key="refused.bin")
    with pytest.raises(AuthError, match="access refused"):  # a direct ranged read, as refused
        s3.read_range(KEYS[0], 0, 5)
    with pytest.raises(AuthError, match="access refused"):  # a HEAD: no body, refused by its status
        s3.head(KEYS[0])
    with pytest.raises(AuthError, match="access refused.*SignatureDoesNotMatch"):
        s3.tags(KEYS[0])
