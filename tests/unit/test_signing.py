"""The direct requests' signers against the SDKs' own: the same request signed at the same instant
gives the same headers, byte for byte (connectors/signing.py)."""

from __future__ import annotations

import base64
import itertools
from datetime import datetime, timedelta, timezone
from unittest import mock
from urllib.parse import quote, urlencode

import pytest
from azure.core.pipeline import PipelineContext, PipelineRequest
from azure.core.pipeline.transport import HttpRequest
from azure.storage.blob._shared.authentication import SharedKeyCredentialPolicy
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials

from connectors.signing import SharedKey, SigV4, http_date

KEYS = ["a", "some/deep/key 0001.bin", "é/ü/日本語.dcm", "x+y=z&w?#%;[]!$'()*,:@", "~tilde/-_./", " lead  trail "]
BASES = ["http://127.0.0.1:9000/bucket", "https://bucket.s3.gra.io.cloud.ovh.net", "https://S3.Example.EU:443/b",
         "http://[::1]:8080/b"]
NOW = datetime(2026, 12, 4, 23, 59, 59, tzinfo=timezone.utc)


def botocore_headers(method, url, headers, credentials, region, now):
    request = AWSRequest(method, url, data=b"body", headers=dict(headers))
    request.context["client_config"] = Config(s3={"payload_signing_enabled": False})
    with mock.patch("botocore.auth.get_current_datetime", return_value=now.replace(tzinfo=None)):
        S3SigV4Auth(credentials, "s3", region).add_auth(request)
    return dict(request.headers.items())


@pytest.mark.parametrize("token", [None, "FwoGZXIvYXdzE//session+token=="])
def test_sigv4_signs_as_botocore_does(token):
    credentials = Credentials("AKIAEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", token)
    ours = SigV4("AKIAEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", token, "eu-west-par")
    header_sets = [
        {"Range": "bytes=0-16383"},
        {"Range": "bytes=5-9", "If-Match": '"abc"'},
        {"Content-MD5": "1B2M2Y8AsgTpgAmY7PhCfg==", "Content-Length": "16384", "Content-Type": "text/csv",
         "x-amz-meta-study": "  two   spaces  ", "x-amz-meta-EMPTY": "", "Cache-Control": "no-cache",
         "x-amz-storage-class": "STANDARD_IA", "User-Agent": "exitplan", "x-amz-tagging": "a=b&c=d"},
    ]
    checked = 0
    for base, key, headers, method in itertools.product(BASES, KEYS, header_sets, ["GET", "PUT"]):
        url = f"{base}/{quote(key, safe='/~')}"
        for now in (NOW, NOW + timedelta(seconds=1)):  # across midnight: a new day's signing key
            assert ours.sign(method, url, headers, now) == botocore_headers(method, url, headers, credentials,
                                                                            "eu-west-par", now)
            checked += 1
    # A query in the URL is signed as botocore signs it (sorted pairs, as encoded).
    url = "http://127.0.0.1:9000/bucket/k?uploadId=a%2Bb&partNumber=3&x"
    assert ours.sign("PUT", url, {}, NOW) == botocore_headers("PUT", url, {}, credentials, "eu-west-par", NOW)
    assert checked == len(BASES) * len(KEYS) * len(header_sets) * 2 * 2


def test_sigv4_replaces_headers_a_retry_carries_over():
    ours = SigV4("AK", "SK", None, "eu")
    first = ours.sign("GET", "http://h/b/k", {"Range": "bytes=0-1"}, NOW)
    again = ours.sign("GET", "http://h/b/k", first, NOW + timedelta(seconds=5))
    assert again == ours.sign("GET", "http://h/b/k", {"Range": "bytes=0-1"}, NOW + timedelta(seconds=5))
    assert again["Authorization"] != first["Authorization"]


def sdk_authorization(method, url, headers, account, key):
    request = HttpRequest(method, url, headers=dict(headers))
    SharedKeyCredentialPolicy(account, key).on_request(PipelineRequest(request, PipelineContext(None)))
    return request.headers["Authorization"]


def test_shared_key_signs_as_the_sdk_does():
    account, key = "devstoreaccount1", base64.b64encode(bytes(range(64))).decode()
    ours = SharedKey(account, key)
    base = f"http://127.0.0.1:10000/{account}/container"
    header_sets = [
        {"x-ms-range": "bytes=0-16383", "x-ms-version": "2025-01-05", "User-Agent": "exitplan",
         "x-ms-date": "Fri, 04 Dec 2026 11:20:00 GMT", "x-ms-client-request-id": "3f1e"},
        {"x-ms-range": "bytes=0-4", "If-Match": '"0x8DCAFE"', "x-ms-version": "2025-01-05",
         "x-ms-date": "Fri, 04 Dec 2026 11:20:00 GMT", "x-ms-client-request-id": "9a"},
        {"x-ms-version": "2025-01-05", "x-ms-date": "Fri, 04 Dec 2026 11:20:00 GMT", "Content-Length": "0",
         "Content-Type": "application/xml", "x-ms-meta-Study": "a", "x-ms-blob-type": "BlockBlob"},
    ]
    queries = [{}, {"restype": "container", "comp": "list", "maxresults": "5000", "include": "metadata,tags"},
               {"restype": "container", "comp": "list", "prefix": "é/a b+c&d=e/", "marker": "2!80!MDAwMDQ2IWEvYg--",
                "delimiter": "/"}]
    for key_name, headers, query in itertools.product(KEYS, header_sets, queries):
        encoded = urlencode(query, quote_via=quote)
        url = f"{base}/{quote(key_name, safe='~/')}" + (f"?{encoded}" if encoded else "")
        assert ours.authorization("GET", url, headers) == sdk_authorization("GET", url, headers, account, key)


def test_http_date_is_now_in_http_form():
    before = datetime.now(timezone.utc).replace(microsecond=0)
    value = datetime.strptime(http_date(), "%a, %d %b %Y %H:%M:%S GMT").replace(tzinfo=timezone.utc)
    assert before <= value <= datetime.now(timezone.utc)
