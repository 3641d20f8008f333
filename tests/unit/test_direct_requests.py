"""The connectors' direct requests (a small PutObject, a small ranged Get Blob) send what their SDK
would send: the same URL, the same headers, signed the same way. No server: botocore's request is
captured at its `before-send` event, the direct one at the libcurl session."""

from __future__ import annotations

import base64
import hashlib
from datetime import datetime, timedelta, timezone

import pytest
from azure.core.credentials import AccessToken
from azure.core.pipeline.policies import BearerTokenCredentialPolicy
from azure.storage.blob._shared.authentication import SharedKeyCredentialPolicy
from botocore.awsrequest import AWSResponse

from connectors.azure_blob import AzureBlobSource, _DirectRequests
from connectors.base import DIRECT_MAX_BYTES, ContentSettings, SinkBehaviour, SinkLimits, TransientError, WriteMeta
from connectors.curl import Answer, Headers
from connectors.s3 import S3Store

# Azurite's well-known development account key (public), as any emulator connection string has it.
DEV_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


class _Raw:
    def __init__(self, body: bytes = b""):
        self.body = body

    def stream(self, *_args, **_kwargs):
        yield self.body


def _ok(url: str, etag: str) -> AWSResponse:
    return AWSResponse(url, 200, {"ETag": f'"{etag}"'}, _Raw())


class _Curl:
    """Stands for a store's libcurl session: keeps what it was asked to send, answers `answer`."""

    def __init__(self, answer: Answer):
        self.answer = answer
        self.sent = []

    def request(self, method, url, headers, *, body=None, limit=None):
        from types import SimpleNamespace

        self.sent.append(SimpleNamespace(method=method, url=url, headers=dict(headers), body=body, limit=limit))
        return self.answer

    def close(self):
        pass


def _answer(status: int, headers: dict[str, str], body: bytes = b"", cut: bool = False) -> Answer:
    return Answer(status, "", Headers((k.lower(), v) for k, v in headers.items()), body, cut)


def _store(endpoint: str, style: str = "path", **kwargs) -> S3Store:
    return S3Store("bucket-1", endpoint_url=endpoint, region="gra", access_key_id="AKEXAMPLE",
                   secret_access_key="secret", addressing_style=style, limits=SinkLimits(), **kwargs)


def _through_botocore(store: S3Store, key: str, body: bytes, meta: WriteMeta, md5: bytes):
    """The request botocore sends for the connector's own PutObject parameters."""
    from connectors.s3 import _write_params

    seen = []

    def before_send(request, **_):
        seen.append(request)
        return _ok(request.url, md5.hex())

    store._client.meta.events.register_first("before-send.s3", before_send)
    store._client.put_object(Bucket=store.bucket, Key=key, Body=body, ContentLength=len(body),
                             ContentMD5=base64.b64encode(md5).decode(), **_write_params(meta, "t", key))
    return seen[0]


def _direct(store: S3Store, key: str, body: bytes, meta: WriteMeta, md5: bytes):
    store._curl = _Curl(_answer(200, {"ETag": f'"{md5.hex()}"'}))
    assert store.put(key, body, len(body), meta, md5) == md5.hex()
    assert store._curl.sent[0].method == "PUT" and store._curl.sent[0].body == body
    return store._curl.sent[0]


def _comparable(request) -> tuple[str, dict[str, str], list[str]]:
    headers = {k.lower(): (v.decode() if isinstance(v, bytes) else v) for k, v in request.headers.items()}
    signed = headers["authorization"].split("SignedHeaders=")[1].split(",")[0].split(";")
    # Left out on purpose by the direct PUT: `Expect: 100-continue` (one more round trip before a
    # body of at most `DIRECT_MAX_BYTES`, which the server may refuse after reading it all the same).
    for varying in ("authorization", "x-amz-date", "user-agent", "amz-sdk-invocation-id", "amz-sdk-request",
                    "expect"):
        headers.pop(varying, None)
    return request.url, headers, signed


KEYS = ["plain.csv", "dir/sub dir/a+b=c&d.txt", "ünïcödé/é.dcm", "a//b/./c/../d", "~tilde/%41/#hash?q",
        "/leading/slash", "semi;colon,comma'quote\"(paren)*star!"]
META = WriteMeta(
    content=ContentSettings(content_type="application/dicom", content_encoding="gzip", cache_control="no-cache",
                            content_disposition='attachment; filename="x.dcm"', content_language="fr-FR"),
    metadata={"exitplan-sha256": "ab" * 32, "Mixed-Case": "v a l"},
    tags={"project": "hdh", "phase 2": "a&b=c"},
    storage_class="STANDARD_IA",
)


@pytest.mark.parametrize("endpoint,style", [
    ("http://127.0.0.1:9000", "path"),
    ("https://s3.gra.io.cloud.ovh.net", "virtual"),
    ("https://s3.fr-par.scw.cloud/", "path"),
    ("https://objects.example.eu:8443/prefix", "path"),
])
@pytest.mark.parametrize("key", KEYS)
def test_a_direct_put_is_the_request_botocore_sends(endpoint, style, key):
    body = b"x" * 1000
    md5 = hashlib.md5(body).digest()
    ours = _comparable(_direct(_store(endpoint, style), key, body, META, md5))
    theirs = _comparable(_through_botocore(_store(endpoint, style), key, body, META, md5))
    assert ours == theirs


@pytest.mark.parametrize("endpoint,style", [("http://127.0.0.1:9000", "path"), ("https://s3.gra.io.cloud.ovh.net", "virtual")])
@pytest.mark.parametrize("key", KEYS)
def test_a_direct_ranged_get_is_the_request_botocore_sends(endpoint, style, key):
    import io

    import urllib3

    body = b"0123456789"

    def partial(request) -> AWSResponse:
        raw = urllib3.HTTPResponse(io.BytesIO(body[2:6]), preload_content=False, headers={"Content-Length": "4"})
        return AWSResponse(request.url, 206, {"Content-Range": f"bytes 2-5/{len(body)}", "Content-Length": "4"}, raw)

    theirs = []
    direct = _store(endpoint, style)
    direct._curl = _Curl(_answer(206, {"Content-Range": f"bytes 2-5/{len(body)}", "Content-Length": "4"}, body[2:6]))
    assert direct.read_range(key, 2, 6, if_match="e") == body[2:6]
    ours = direct._curl.sent
    assert ours[0].method == "GET" and ours[0].limit >= 5  # one byte past the range at least
    through_client = _store(endpoint, style)
    through_client._curl = None
    through_client._client.meta.events.register_first(
        "before-send.s3", lambda request, **_: theirs.append(request) or partial(request))
    assert through_client.read_range(key, 2, 6, if_match="e") == body[2:6]
    assert _comparable(ours[0]) == _comparable(theirs[0])


def test_a_direct_put_carries_a_session_token_as_botocore_does():
    body, md5 = b"y", hashlib.md5(b"y").digest()
    meta = WriteMeta(content=ContentSettings(), metadata={})
    ours = _comparable(_direct(_store("https://s3.example.eu", session_token="tok"), "k", body, meta, md5))
    theirs = _comparable(_through_botocore(_store("https://s3.example.eu", session_token="tok"), "k", body, meta, md5))
    assert ours == theirs and ours[1]["x-amz-security-token"] == "tok"


@pytest.mark.parametrize("why,store_kwargs,size,body_kind,with_md5", [
    ("no MD5 to send", {}, 100, bytes, False),
    ("a body larger than a direct request takes", {}, DIRECT_MAX_BYTES + 1, bytes, True),
    ("a streamed body", {}, 100, "stream", True),
    ("flexible checksums (botocore computes them)", {"behaviour": SinkBehaviour(flexible_checksums=True)}, 100,
     bytes, True),
    ("direct requests turned off (provider_overrides)", {"behaviour": SinkBehaviour(direct_requests=False)}, 100,
     bytes, True),
])
def test_what_goes_through_botocore_instead(why, store_kwargs, size, body_kind, with_md5):
    import io

    store = _store("http://127.0.0.1:9000", **store_kwargs)
    data = b"z" * size
    md5 = hashlib.md5(data).digest()
    body = io.BytesIO(data) if body_kind == "stream" else data

    class Refuse:
        def request(self, *_args, **_kwargs):
            raise AssertionError(f"sent directly despite {why}")

    store._curl = Refuse()
    client = store._client if body_kind is bytes else store._stream_client()

    def answer(request, **_):
        if hasattr(request.body, "read"):
            request.body.read()  # what sending it would do
        return _ok(request.url, md5.hex())

    client.meta.events.register_first("before-send.s3", answer)
    store.put("k", body, size, WriteMeta(content=ContentSettings(), metadata={}), md5 if with_md5 else None)


def test_an_endpoint_only_botocore_can_resolve_has_no_direct_put():
    assert _store(None)._direct_base is None
    assert _store("https://s3.example.eu")._curl is not None  # botocore still has its session there


def test_direct_requests_verify_certificates_as_botocore_does():
    import botocore.httpsession

    store = _store("https://s3.example.eu")
    botocore_verify = store._client._endpoint.http_session._verify
    assert store._curl.verify is True
    assert store._curl.ca_bundle == botocore.httpsession.get_cert_path(botocore_verify)
    assert _store("http://127.0.0.1:9000", verify_tls=False)._curl.verify is False


def test_a_proxied_s3_endpoint_is_sent_to_through_the_client(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example.eu:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert _store("https://s3.example.eu")._curl is None
    monkeypatch.setenv("NO_PROXY", "s3.example.eu")
    assert _store("https://s3.example.eu")._curl is not None


def test_a_whole_object_answered_to_a_range_is_not_taken_for_the_range():
    store = _store("http://127.0.0.1:9000", max_attempts=1)
    store._curl = _Curl(_answer(200, {"Content-Length": "100"}, b"x" * 3, cut=True))
    with pytest.raises(TransientError, match="whole object"):
        store.read_range("k", 2, 4)
    store._curl = _Curl(_answer(206, {"Content-Range": "bytes 0-1/100"}, b"xyz", cut=True))
    with pytest.raises(TransientError, match="more than"):
        store.read_range("k", 0, 2)


# ---- Azure ----------------------------------------------------------------------------------


def _account_url(port: int = 10000) -> str:
    return f"http://127.0.0.1:{port}/devstoreaccount1"


def _from_key() -> AzureBlobSource:
    cs = (f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={DEV_KEY};"
          f"BlobEndpoint={_account_url()};")
    return AzureBlobSource.from_connection_string(cs, "health-data")


@pytest.mark.parametrize("key", KEYS + ["sp ace", "percent%20encoded", "x" * 300])
def test_the_direct_read_asks_for_the_url_the_sdk_blob_client_has(key):
    source = _from_key()
    direct = source._direct_requests()
    assert direct is not None
    assert direct.blob_url(key) == source._container.get_blob_client(key).url


def test_a_sas_source_reads_directly_with_the_sas_in_the_url():
    source = AzureBlobSource.from_sas(_account_url(), "?sv=2023-01-03&sp=rl&sig=abc%2Fdef", "health-data")
    direct = source._direct_requests()
    assert direct is not None and direct.credential is None
    assert direct.blob_url("a b") == source._container.get_blob_client("a b").url
    assert "sig=abc%2Fdef" in direct.blob_url("a b")


def test_a_key_source_signs_with_the_sdk_shared_key_policy_and_its_retry_settings():
    cs = (f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={DEV_KEY};"
          f"BlobEndpoint={_account_url()};")
    source = AzureBlobSource.from_connection_string(cs, "c1", retry_total=2, retry_initial_backoff=1.0,
                                                    retry_increment_base=3)
    direct = source._direct_requests()
    assert isinstance(direct.credential, SharedKeyCredentialPolicy)
    assert direct.tries == 3
    waits = [direct.backoff(n) for n in range(2)]
    assert 3.5 <= waits[0] <= 4.5 and 9.5 <= waits[1] <= 10.5  # 1 + 3**1, 1 + 3**2, jitter ±0.5


class _Token:
    def __init__(self):
        self.asked = 0

    def get_token(self, *scopes, **kwargs):
        self.asked += 1
        return AccessToken("t0ken", int((datetime.now(timezone.utc) + timedelta(hours=1)).timestamp()))


def test_an_entra_id_source_reads_directly_with_the_sdk_token_policy():
    from azure.core.pipeline import PipelineContext, PipelineRequest
    from azure.core.pipeline.transport import HttpRequest

    token = _Token()
    source = AzureBlobSource.from_default_credential("https://acct.blob.core.windows.net", "c1", credential=token)
    direct = source._direct_requests()
    assert isinstance(direct.credential, BearerTokenCredentialPolicy)
    request = HttpRequest("GET", direct.blob_url("k"))
    direct.credential.on_request(PipelineRequest(request, PipelineContext(None)))
    assert request.headers["Authorization"] == "Bearer t0ken" and token.asked == 1


def test_a_proxied_endpoint_is_read_through_the_sdk(monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.internal:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert _DirectRequests.for_container(_from_key()._container) is None


# An answer in the shape Azure documents for List Blobs (version 2021-08-06 and later), with a name
# holding a character XML 1.0 cannot carry, which Azure sends percent-encoded (`Encoded="true"`).
RECORDED_LISTING = b"""<?xml version="1.0" encoding="utf-8"?>
<EnumerationResults ServiceEndpoint="https://acct.blob.core.windows.net/" ContainerName="c1">
  <Prefix>x/</Prefix><MaxResults>2</MaxResults>
  <Blobs>
    <Blob>
      <Name Encoded="true">x/ctl%01char%20%25</Name>
      <VersionId>2026-11-30T10:00:00.1234567Z</VersionId>
      <IsCurrentVersion>true</IsCurrentVersion>
      <Properties>
        <Creation-Time>Mon, 30 Nov 2026 10:00:00 GMT</Creation-Time>
        <Last-Modified>Tue, 01 Dec 2026 11:12:13 GMT</Last-Modified>
        <Etag>0x8DD11AAAA</Etag>
        <Content-Length>13</Content-Length>
        <Content-Type>application/dicom</Content-Type>
        <Content-Encoding />
        <Content-Language />
        <Content-MD5>1B2M2Y8AsgTpgAmY7PhCfg==</Content-MD5>
        <Cache-Control />
        <Content-Disposition />
        <BlobType>BlockBlob</BlobType>
        <AccessTier>Archive</AccessTier>
        <ArchiveStatus>rehydrate-pending-to-hot</ArchiveStatus>
        <CopyStatus>pending</CopyStatus>
        <CopyProgress>5/13</CopyProgress>
        <TagCount>1</TagCount>
      </Properties>
      <Metadata><Origin>hdh</Origin></Metadata>
      <Tags><TagSet><Tag><Key>project</Key><Value>hdh</Value></Tag></TagSet></Tags>
    </Blob>
    <BlobPrefix><Name>x/folder/</Name></BlobPrefix>
    <Blob>
      <Name>x/plain</Name>
      <Snapshot>2026-11-29T09:00:00.0000000Z</Snapshot>
      <Properties>
        <Last-Modified>Sun, 29 Nov 2026 09:00:00 GMT</Last-Modified>
        <Etag>"0x8DD11BBBB"</Etag>
        <Content-Length>0</Content-Length>
        <BlobType>AppendBlob</BlobType>
      </Properties>
    </Blob>
  </Blobs>
  <NextMarker>2!96!MDAwMDE4IXgvcGxhaW4=</NextMarker>
</EnumerationResults>"""


def test_a_recorded_azure_listing_answer_reads_as_the_sdk_reads_it():
    from connectors.azure_blob import _listing_page

    entries, folders, marker = _listing_page(RECORDED_LISTING)
    assert marker == "2!96!MDAwMDE4IXgvcGxhaW4=" and folders == ["x/folder/"]
    source = _from_key()
    first, second = (source._meta(e) for e in entries)
    assert first.key == "x/ctl\x01char %"
    assert (first.size, first.etag, first.content_md5) == (13, "0x8DD11AAAA", base64.b64decode("1B2M2Y8AsgTpgAmY7PhCfg=="))
    assert first.last_modified == datetime(2026, 12, 1, 11, 12, 13, tzinfo=timezone.utc)
    assert first.created == datetime(2026, 11, 30, 10, tzinfo=timezone.utc)
    assert (first.tier, first.kind, first.rehydrating) == ("Archive", "block", "rehydrate-pending-to-hot")
    assert first.content.content_type == "application/dicom" and first.content.content_encoding is None
    assert first.metadata == {"Origin": "hdh"} and first.tags == {"project": "hdh"}
    assert first.version_id == "2026-11-30T10:00:00.1234567Z" and first.current_version
    assert "5/13 bytes" in first.not_copyable  # the copy in progress is named first
    assert (second.key, second.etag, second.size, second.kind) == ("x/plain", "0x8DD11BBBB", 0, "append")
    assert second.snapshot == "2026-11-29T09:00:00.0000000Z" and second.tags == {} and second.metadata == {}
    assert second.earlier_state is not None and first.earlier_state is None


def test_direct_reads_over_https_verify_the_certificate_as_the_sdk_would(monkeypatch, tmp_path):
    import requests

    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    source = AzureBlobSource.from_default_credential("https://acct.blob.core.windows.net", "c1", credential=_Token())
    curl = source._direct_requests().curl
    assert curl.verify is True and curl.ca_bundle == requests.certs.where()

    bundle = tmp_path / "corporate-ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(bundle))
    source = AzureBlobSource.from_default_credential("https://acct.blob.core.windows.net", "c1", credential=_Token())
    assert source._direct_requests().curl.ca_bundle == str(bundle)



def test_a_request_only_the_sdk_can_answer_goes_on_through_the_sdk_from_where_it_was(monkeypatch):
    """An Entra ID challenge (401 to a token) is the SDK pipeline's to answer: the listing goes on
    through the SDK's pager from the marker the direct pages reached, folders too."""
    from types import SimpleNamespace

    from connectors.azure_blob import _UseTheSdk

    source = _from_key()
    direct = source._direct_requests()
    calls = []

    def list_page(_source, prefix, include, marker, page_size, delimiter=None):
        calls.append(marker)
        if marker is None and delimiter is None:
            return [SimpleNamespace(**_props("a"))], [], "m1"
        raise _UseTheSdk()

    monkeypatch.setattr(direct, "list_page", list_page)

    class Pager:
        def __init__(self, token):
            self.asked, self.continuation_token = token, None
            self.pages = iter([[SimpleNamespace(**_props("b"))]])

        def __next__(self):
            return next(self.pages)

    tokens = []

    class Paged:
        def by_page(self, continuation_token=None):
            tokens.append(continuation_token)
            return Pager(continuation_token)

    asked = {}
    monkeypatch.setattr(source._container, "list_blobs", lambda **kw: asked.update(kw) or Paged())
    assert [m.key for m in source.list()] == ["a", "b"] and calls == [None, "m1"]
    assert asked["name_starts_with"] is None and tokens == ["m1"]  # the SDK's pager took over at m1

    monkeypatch.setattr(source._container, "walk_blobs", lambda **kw: Paged())
    assert source.folders("", 10) == ([], True)


def _props(name: str) -> dict:
    from types import SimpleNamespace

    return dict(name=name, size=1, etag="e", last_modified=None, creation_time=None, blob_tier="Hot",
                archive_status=None, blob_type="BlockBlob", copy=SimpleNamespace(status=None, progress=None),
                content_settings=SimpleNamespace(content_type=None, content_encoding=None, cache_control=None,
                                                 content_disposition=None, content_language=None, content_md5=None),
                metadata={}, tags=None, snapshot=None, version_id=None, is_current_version=None)


def test_a_credential_policy_of_an_unknown_kind_keeps_every_request_in_the_sdk(monkeypatch):
    source = _from_key()
    pipeline = source._container._pipeline

    class AzureNamedKeyCredentialPolicy:  # a kind of signing the direct requests do not know
        def on_request(self, request):
            raise AssertionError("not to be called")

    monkeypatch.setattr(pipeline, "_impl_policies", [*pipeline._impl_policies, AzureNamedKeyCredentialPolicy()])
    assert _DirectRequests.for_container(source._container) is None


def test_the_s3_session_knows_s3_alone_and_honours_aws_data_path(tmp_path, monkeypatch):
    # `connectors.s3._S3Loader`: botocore's check of a service name against every service it ships
    # (a listing of ~1,400 directories) is S3's alone; a model found under AWS_DATA_PATH still wins.
    import json

    import botocore.exceptions

    from connectors import s3 as s3_module

    session = s3_module._s3_session()
    loader = session.get_component("data_loader")
    assert loader.list_available_services("service-2") == ["s3"]
    assert loader.list_available_services("waiters-2") == ["s3"]
    assert loader.list_available_services("no-such-model-1") == []
    with pytest.raises(botocore.exceptions.UnknownServiceError):
        session.create_client("sts", region_name="eu-west-3")

    real = loader.load_service_model("s3", "service-2")
    version = loader.determine_latest_version("s3", "service-2")
    shadow = tmp_path / "s3" / version
    shadow.mkdir(parents=True)
    (shadow / "service-2.json").write_text(json.dumps({**real, "documentation": "from AWS_DATA_PATH"}))
    monkeypatch.setenv("AWS_DATA_PATH", str(tmp_path))
    loader = s3_module._s3_session().get_component("data_loader")
    assert loader.load_service_model("s3", "service-2")["documentation"] == "from AWS_DATA_PATH"


def test_every_direct_azure_request_has_an_id_of_its_own_and_a_forked_child_another_prefix():
    """`x-ms-client-request-id` is the process's random id and a count (no `os.urandom` per
    request): unique within the process, and a forked child numbers under an id of its own."""
    import os

    from connectors import azure_blob

    ids = [azure_blob._request_id() for _ in range(1000)]
    assert len(set(ids)) == 1000 and len({i.rsplit("-", 1)[0] for i in ids}) == 1
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its first id and leave at once
        os.write(write, azure_blob._request_id().encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child = os.read(read, 200).decode()
    os.close(read)
    assert child.rsplit("-", 1)[0] != ids[0].rsplit("-", 1)[0] and child not in ids
