"""The private corners of the Azure SDK that `connectors/azure_blob.py` relies on, checked offline.

`AzureBlobSource.read_range` calls the SDK's generated Download operation
(`BlobClient._client.blob.download` with `azure.storage.blob._generated.models.ModifiedAccessConditions`)
so that a range streams straight into one buffer of its exact size: the public `download_blob`
holds each range twice, outside the engine's memory budget. Its connection pool is sized through
azure-core's `RequestsTransport._init_session` hook. Lab mode and the sovereignty gate read a
connection string with config/azure_connection.py, which restates the SDK's parsing rules (config
imports no SDK). None of these is public API, so pyproject.toml
bounds azure-storage-blob to the versions they are known to work with, and these tests fail, each
with a sentence naming what moved, on the first SDK version where they do not. Raise the bound only
with these tests green.

No server: the SDK's requests go to a requests adapter that answers like the Blob service.
"""

from __future__ import annotations

import gzip
import inspect
import io
from importlib.metadata import version
from urllib.parse import urlsplit

import pytest
import requests
from azure.core.pipeline.transport import RequestsTransport
from azure.storage.blob import BlobServiceClient, ContainerClient, ExponentialRetry
from requests.structures import CaseInsensitiveDict
from urllib3.response import HTTPResponse

from config.azure_connection import ConnectionStringError, blob_endpoints
from connectors.azure_blob import AzureBlobSource, _PooledRequestsTransport
from connectors.base import ConnectorError, InvalidRequest, NotFound, SourceChanged, TransientError

SDK = f"azure-storage-blob {version('azure-storage-blob')} (azure-core {version('azure-core')})"
MOVED = ("{what} moved in " + SDK + ": connectors/azure_blob.py relies on it ({why}); adapt it, or keep "
         "pyproject.toml's bound on azure-storage-blob below this version")
# Azurite's published development account: nothing leaves the process in these tests.
CONNECTION_STRING = (
    "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
    "AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;"
    "BlobEndpoint=http://127.0.0.1:10000/devstoreaccount1;"
)


class BlobService(requests.adapters.BaseAdapter):
    """Answers every request with one canned response, and keeps the requests it was sent."""

    def __init__(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None):
        super().__init__()
        self.status, self.body, self.headers = status, body, dict(headers or {})
        self.sent: list[requests.PreparedRequest] = []

    def send(self, request, stream=False, timeout=None, verify=True, cert=None, proxies=None):
        self.sent.append(request)
        headers = {"Content-Length": str(len(self.body)), "x-ms-version": "2025-01-05", **self.headers}
        response = requests.Response()
        response.status_code = self.status
        response.headers = CaseInsensitiveDict(headers)
        response.raw = HTTPResponse(body=io.BytesIO(self.body), headers=headers, status=self.status,
                                    preload_content=False)
        response.url, response.request, response.reason = request.url, request, "canned"
        return response

    def close(self) -> None:
        pass


def source_answered_by(service: BlobService) -> AzureBlobSource:
    session = requests.Session()
    for scheme in ("http://", "https://"):
        session.mount(scheme, service)
    client = ContainerClient.from_connection_string(
        CONNECTION_STRING, "claims", transport=RequestsTransport(session=session, session_owner=False),
        retry_policy=ExponentialRetry(retry_total=0),
    )
    return AzureBlobSource(client)


def test_the_generated_download_operation_is_where_read_range_expects_it():
    from azure.storage.blob import _generated

    why = "read_range streams a range through it into one exact buffer"
    assert hasattr(_generated, "models") and hasattr(_generated.models, "ModifiedAccessConditions"), \
        MOVED.format(what="azure.storage.blob._generated.models.ModifiedAccessConditions", why=why)
    blob = ContainerClient.from_connection_string(CONNECTION_STRING, "claims").get_blob_client("k")
    download = getattr(getattr(getattr(blob, "_client", None), "blob", None), "download", None)
    assert callable(download), MOVED.format(what="BlobClient._client.blob.download", why=why)
    parameters = inspect.signature(download).parameters
    assert {"range", "modified_access_conditions"} <= set(parameters), \
        MOVED.format(what="the parameters range / modified_access_conditions of the generated download", why=why)
    assert any(p.kind is p.VAR_KEYWORD for p in parameters.values()), \
        MOVED.format(what="the generated download's **kwargs (it takes `cls`)", why=why)


def test_a_range_is_read_through_the_private_operation_pinned_to_its_etag():
    body = b"hello"
    service = BlobService(206, body, {"Content-Range": "bytes 0-4/10", "ETag": '"0x8DC"',
                                       "x-ms-blob-type": "BlockBlob"})
    source = source_answered_by(service)

    data = source.read_range("dir/k.csv", 0, 5, if_match="0x8DC")

    why = "read_range asks for a range, pinned with If-Match, and reads its body and Content-Range"
    assert bytes(data) == body, MOVED.format(what="the body the generated download hands to `cls`", why=why)
    [sent] = service.sent
    assert sent.method == "GET" and sent.url.endswith("/claims/dir/k.csv"), MOVED.format(what="the request", why=why)
    assert sent.headers.get("x-ms-range") == "bytes=0-4", \
        MOVED.format(what="the `range` parameter of the generated download", why=why)
    assert sent.headers.get("If-Match") == '"0x8DC"', \
        MOVED.format(what="ModifiedAccessConditions(if_match=...)", why=why)


def test_a_content_encoded_range_is_handed_over_as_stored():
    stored = gzip.compress(b"const answer = 42;\n" * 1000)
    service = BlobService(206, stored, {"Content-Range": f"bytes 0-{len(stored) - 1}/{len(stored)}",
                                        "Content-Encoding": "gzip", "ETag": '"0x8DC"'})
    why = "read_range copies a gzip-encoded blob's stored bytes, not its inflated content"
    try:
        data = source_answered_by(service).read_range("app.js", 0, len(stored))
    except TransientError as exc:
        pytest.fail(MOVED.format(what=f"the generated download's `decompress` keyword ({exc})", why=why))
    assert bytes(data) == stored, MOVED.format(what="the generated download's `decompress` keyword", why=why)


def test_the_content_range_total_reaches_read_range():
    """The blob's size comes from the Content-Range header the generated operation passes to `cls`."""
    service = BlobService(206, b"hello", {"Content-Range": "bytes 0-4/4", "ETag": '"0x8DC"'})
    why = "read_range checks the range against the blob's size"
    try:
        source_answered_by(service).read_range("k", 0, 5)
    except InvalidRequest as exc:
        assert "outside" in str(exc)
    else:
        pytest.fail(MOVED.format(what="the Content-Range response header handed to `cls`", why=why))


@pytest.mark.parametrize("status,code,error",
                         [(412, "ConditionNotMet", SourceChanged), (404, "BlobNotFound", NotFound)])
def test_errors_of_the_private_operation_still_map_to_connector_errors(status, code, error):
    service = BlobService(status, b"", {"x-ms-error-code": code})
    with pytest.raises(error):
        source_answered_by(service).read_range("k", 0, 5, if_match="0x8DC")


def test_the_connection_pool_is_sized_through_azure_cores_session_hook():
    transport = _PooledRequestsTransport(7)
    transport.open()
    try:
        for scheme in ("http://", "https://"):
            adapter = transport.session.adapters[scheme]
            why = "AzureBlobSource keeps max_connections connections instead of requests' 10"
            assert adapter.poolmanager.connection_pool_kw.get("maxsize") == 7, \
                MOVED.format(what="RequestsTransport._init_session / _protocols", why=why)
            assert adapter.max_retries.total is False, MOVED.format(
                what="the adapter RequestsTransport._init_session mounts (urllib3 retries off)", why=why)
    finally:
        transport.close()


def test_the_environments_proxies_are_read_once_per_endpoint_and_still_used(monkeypatch):
    """The transport's session answers what requests would (proxy, no_proxy, CA bundle) without
    scanning the environment again for every request to the same endpoint."""
    import connectors.azure_blob as azure_blob

    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/lab-ca.pem")
    lookups = []
    real = azure_blob.get_environ_proxies
    monkeypatch.setattr(azure_blob, "get_environ_proxies", lambda url, no_proxy=None: lookups.append(url) or real(
        url, no_proxy=no_proxy))
    transport = _PooledRequestsTransport(2)
    transport.open()
    try:
        session = transport.session
        plain = requests.Session()
        for url in ("https://acct.blob.core.windows.net/c/a?x=1", "https://acct.blob.core.windows.net/c/b",
                    "http://127.0.0.1:10000/acct/c/a"):
            for _ in range(3):
                assert session.merge_environment_settings(url, {}, None, True, None) == \
                    plain.merge_environment_settings(url, {}, None, True, None), url
        assert session.merge_environment_settings("https://acct.blob.core.windows.net/c/a", {}, None, True, None)[
            "proxies"]["https"] == "http://proxy.example:3128"
        assert len(lookups) == 2  # one per endpoint
    finally:
        transport.close()


# ---------------------------------------------------------------------------------------------
# Connection strings: config/azure_connection.py and the SDK must find the same endpoint
# ---------------------------------------------------------------------------------------------

KEY = "AccountKey=eA=="
# Every shape of connection string the parser reads, none with a repeated key or a refused URL.
CONNECTION_STRINGS = [
    CONNECTION_STRING,
    "UseDevelopmentStorage=true",
    f"UseDevelopmentStorage=True;AccountName=acct;{KEY}",  # only `true` means the emulator
    f"DefaultEndpointsProtocol=http;AccountName=acct;{KEY};EndpointSuffix=core.windows.net",
    f"DefaultEndpointsProtocol=http;AccountName=acct;{KEY}",  # no suffix: https, whatever the protocol says
    f"AccountName=acct;{KEY};EndpointSuffix=core.chinacloudapi.cn",
    f"AccountName=acct;{KEY}",
    f"AccountName=acct;{KEY};BlobEndpoint=",  # empty: as if absent
    f"accountname=acct;accountkey=eA==;blobendpoint=https://other.blob.core.windows.net;",  # keys ignore case
    f"AccountName=acct;{KEY};BlobEndpoint=127.0.0.1:10000/acct",  # no scheme: https
    f"AccountName=acct;{KEY};BlobEndpoint=HTTP://127.0.0.1:10000/acct",
    f"AccountName=acct;{KEY};BlobEndpo\u0131nt=http://127.0.0.1:10000/acct",  # dotless ı upper-cases to I
    f"AccountName=acct;{KEY}; BlobEndpoint=http://127.0.0.1:10000/acct",  # a key with a space is another key
    f"AccountName=acct;{KEY};BlobEndpoint=https://acct.blob.core.windows.net;"
    "BlobSecondaryEndpoint=https://acct-secondary.blob.core.windows.net",
    "AccountName=acct;SharedAccessSignature=sv=2024-01-01&sig=x;BlobEndpoint=http://[::1]:10000/acct",
    f"AccountName=acct;{KEY};;",
]
# What the SDK refuses, the parser refuses too (and what it accepts, the parser does not refuse
# for being malformed: see CONNECTION_STRINGS).
REFUSED_BY_BOTH = ["", ";", f"AccountName=acct;{KEY};;BlobEndpoint=https://x.example", "AccountKey=eA==",
                   f"AccountName=acct;{KEY};BlobSecondaryEndpoint=https://acct-secondary.blob.core.windows.net"]


def _host(url: str | None) -> tuple[str | None, int | None]:
    if not url:
        return None, None
    parts = urlsplit(url if "//" in url else "//" + url)
    return parts.hostname, parts.port


@pytest.mark.parametrize("conn", CONNECTION_STRINGS)
def test_a_connection_string_is_read_as_the_sdk_reads_it(conn):
    why = "lab mode and the gate are decided on the endpoint config/azure_connection.py reads from a connection string"
    ours = blob_endpoints(conn)
    service = BlobServiceClient.from_connection_string(conn)
    used = urlsplit(service.primary_endpoint)
    mine = urlsplit(ours.primary)
    assert (mine.scheme.lower(), mine.hostname, mine.port) == (used.scheme, used.hostname, used.port), \
        MOVED.format(what="the SDK's reading of a connection string's blob endpoint (parse_connection_str)", why=why)
    if ours.secondary:
        assert _host(ours.secondary) == _host(service.secondary_hostname), \
            MOVED.format(what="the SDK's reading of a connection string's BlobSecondaryEndpoint", why=why)


def test_the_connectors_clients_never_read_from_a_secondary_endpoint():
    """The parser leaves out the secondary host the SDK derives for an account on Azure: exitplan's
    clients never send a request there (no retry to the secondary, the primary location mode)."""
    why = "lab mode is decided on the primary endpoint alone"
    options = AzureBlobSource._client_options(4, 4, 1.0, 2, 20, 60)
    assert options["retry_policy"].retry_to_secondary is False, \
        MOVED.format(what="ExponentialRetry's retry_to_secondary default", why=why)
    service = BlobServiceClient.from_connection_string(CONNECTION_STRING, **options)
    assert service.location_mode == "primary", MOVED.format(what="the clients' default location mode", why=why)


@pytest.mark.parametrize("conn", REFUSED_BY_BOTH)
def test_a_connection_string_the_sdk_refuses_is_refused(conn):
    with pytest.raises(ValueError):
        BlobServiceClient.from_connection_string(conn)
    with pytest.raises(ConnectionStringError):
        blob_endpoints(conn)


def test_the_sdk_keeps_the_last_of_a_repeated_key_which_is_why_a_repeat_is_refused():
    conn = f"BlobEndpoint=http://127.0.0.1:10000/acct;AccountName=acct;{KEY};BLOBENDPOINT=https://acct.blob.core.windows.net"
    used = urlsplit(BlobServiceClient.from_connection_string(conn).primary_endpoint)
    assert used.hostname == "acct.blob.core.windows.net", MOVED.format(
        what="which of a repeated connection-string key the SDK keeps",
        why="config/azure_connection.py documents that it keeps the last")
    with pytest.raises(ConnectionStringError, match="`BlobEndpoint` twice"):
        blob_endpoints(conn)


def test_the_connector_refuses_a_client_aimed_elsewhere_than_the_string_was_judged(monkeypatch):
    """The run-time check in `AzureBlobSource.from_connection_string`: were the SDK ever to read a
    string otherwise, the source is refused before any request."""
    import config.azure_connection as parser
    from connectors import azure_blob
    from connectors.base import ConfigError

    judged = parser.BlobEndpoints("http://127.0.0.1:10000/devstoreaccount1", None)
    monkeypatch.setattr(azure_blob, "blob_endpoints", lambda conn: judged)
    with pytest.raises(ConfigError, match="not to 127.0.0.1:10000"):
        AzureBlobSource.from_connection_string(f"AccountName=acct;{KEY}", "claims")
    assert AzureBlobSource.from_connection_string(CONNECTION_STRING, "claims") is not None


def test_a_redirect_from_the_blob_service_is_not_followed():
    """A redirect would send the next request, signed with the account key, to a host the gate
    never judged: the connector's clients refuse redirects (azure-core's `permit_redirects`)."""
    service = BlobService(307, b"", {"Location": "https://elsewhere.example/claims/k"})
    session = requests.Session()
    for scheme in ("http://", "https://"):
        session.mount(scheme, service)
    options = AzureBlobSource._client_options(4, 0, 0.1, 2, 5, 5)
    options["transport"] = RequestsTransport(session=session, session_owner=False)
    source = AzureBlobSource(ContainerClient.from_connection_string(CONNECTION_STRING, "claims", **options))
    with pytest.raises(ConnectorError):
        source.read_range("k", 0, 5)
    assert [urlsplit(r.url).hostname for r in service.sent] == ["127.0.0.1"], MOVED.format(
        what="azure-core's RedirectPolicy keyword permit_redirects", why="no request may follow a redirect")
