"""Azure Blob Storage as an `ObjectSource`: paged listing, full properties, ETag-pinned ranged reads.

One `AzureBlobSource` reads one container. Every SDK call is wrapped: azure-core and azure-storage
exceptions are translated into the connectors' error classes (`connectors.base`) and never leak.

Ranges of at most `DIRECT_MAX_BYTES` and listings go as direct requests (`_DirectRequests`: the
SDK's own credential policy and retry settings, one libcurl request, no per-request pipeline; see
docs/DESIGN.md "Direct requests"). Larger ranged reads go through the SDK's generated Download
operation (`BlobClient._client.blob.download`, `azure.storage.blob._generated`), not public API:
`download_blob` holds each range twice, outside the engine's memory budget. pyproject.toml bounds
azure-storage-blob to the versions where it is known to work, and
tests/unit/test_azure_sdk_private_api.py fails loudly on one where it moved.

Things this module deliberately does not do:
- no CRC64 content validation: Azurite ignores ``x-ms-content-crc64`` and the SDK's streaming CRC64
  mode makes it store framed bytes; integrity is checked by the pipeline (lengths, MD5, SHA-256);
- no writes: Azure is only ever the source of an exit.
"""

from __future__ import annotations

import base64
import itertools
import os
import threading
import uuid
from datetime import datetime
from email.utils import parsedate_to_datetime
from types import SimpleNamespace
from typing import Any, Callable, Iterator, TypeVar
from urllib.parse import quote, unquote, urlencode, urlsplit
from xml.etree import ElementTree

import requests
from azure.core import MatchConditions
from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    DecodeError,
    HttpResponseError,
    ResourceModifiedError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.core.pipeline import PipelineContext, PipelineRequest
from azure.core.pipeline.policies import BearerTokenCredentialPolicy
from azure.core.pipeline.transport import HttpRequest, RequestsTransport
from azure.storage.blob import (BlobClient, BlobPrefix, BlobProperties, BlobServiceClient, ContainerClient,
                                ExponentialRetry)
from azure.storage.blob._generated.models import ModifiedAccessConditions
from azure.storage.blob._shared.authentication import SharedKeyCredentialPolicy
from requests.sessions import merge_setting
from requests.utils import get_environ_proxies

from config.azure_connection import ConnectionStringError, blob_endpoints

from .base import (
    DIRECT_MAX_BYTES,
    AuthError,
    ConfigError,
    ConnectorError,
    ContentSettings,
    InvalidRequest,
    ListingPage,
    ListingRange,
    NotFound,
    ObjectMeta,
    RequestPacer,
    SourceChanged,
    Throttled,
    TransientError,
    UNPACED,
    attempts,
    exact_range,
    history_of,
)
from .curl import ERROR_BODY, Answer, CurlFailure, CurlSession, keeps_read_timeout
from .signing import SharedKey, http_date

T = TypeVar("T")

DEFAULT_MAX_CONNECTIONS = 16
DEFAULT_PAGE_SIZE = 1000
# Entries per request when one name is listed with its snapshots and versions (`list_name`): the
# listing stops at the first other name, so a small page wastes nothing.
NAME_PAGE_SIZE = 100


# Bytes read from the socket per step of a download.
READ_BLOCK_SIZE = 1024 * 1024


class _SettledSession(requests.Session):
    """A requests session that reads the environment's proxy settings once per endpoint.

    requests looks them up again for every request (every variable of the environment scanned,
    ``no_proxy`` matched against the host): about a tenth of a small ranged read's CPU. The answer
    only depends on the endpoint (scheme, host, port), which a source never changes, so it is kept
    per endpoint; a CA bundle named by ``REQUESTS_CA_BUNDLE`` / ``CURL_CA_BUNDLE`` is still read
    per request, as requests does (a dictionary look-up)."""

    def __init__(self) -> None:
        super().__init__()
        self._environ_proxies: dict[tuple[str, str | None], dict[str, str]] = {}

    def merge_environment_settings(self, url, proxies, stream, verify, cert):
        if not self.trust_env:
            return super().merge_environment_settings(url, proxies, stream, verify, cert)
        no_proxy = proxies.get("no_proxy") if proxies is not None else None
        endpoint = url.split("/", 3)[:3]
        key = ("/".join(endpoint), no_proxy)
        env_proxies = self._environ_proxies.get(key)
        if env_proxies is None:
            env_proxies = self._environ_proxies[key] = get_environ_proxies(url, no_proxy=no_proxy)
        if proxies is not None:
            for k, v in env_proxies.items():
                proxies.setdefault(k, v)
        if verify is True or verify is None:
            verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or verify
        return {"proxies": merge_setting(proxies, self.proxies), "stream": merge_setting(stream, self.stream),
                "verify": merge_setting(verify, self.verify), "cert": merge_setting(cert, self.cert)}


class _PooledRequestsTransport(RequestsTransport):
    """azure-core's requests transport with a connection pool of a chosen size, on a
    `_SettledSession`.

    requests' default pool keeps 10 connections per host: with more concurrent range readers than
    that, urllib3 discards and reopens connections on every request (a TLS handshake each time on
    real Azure). The adapter type azure-core mounts is kept; only its pool size changes.
    """

    def __init__(self, max_connections: int, **kwargs: Any):
        self._max_connections = max_connections
        super().__init__(**kwargs)

    def open(self) -> None:
        if self.session is None and self._session_owner and not self._has_been_opened:
            self.session = _SettledSession()
            self._init_session(self.session)
        super().open()

    def _init_session(self, session) -> None:
        super()._init_session(session)
        for scheme in self._protocols:
            current = session.adapters[scheme]
            session.mount(
                scheme,
                type(current)(pool_connections=4, pool_maxsize=self._max_connections, max_retries=current.max_retries),
            )


class _ExactBuffer:
    """A write-only stream filling a preallocated buffer; refuses to go past its size."""

    def __init__(self, size: int):
        self.buffer = bytearray(size)
        self.pos = 0
        self._view = memoryview(self.buffer)

    def write(self, chunk) -> int:
        n = len(chunk)
        if self.pos + n > len(self.buffer):
            raise TransientError(f"the service sent more than the {len(self.buffer)} bytes asked for")
        self._view[self.pos:self.pos + n] = chunk
        self.pos += n
        return n

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False


class _UseTheSdk(Exception):
    """A direct request met what only the SDK's pipeline answers (an Entra ID challenge): the caller
    sends that request through the SDK instead (`read_range`, `_pages`, `folders`)."""


class _DirectRequests:
    """Ranged Get Blob (ranges up to `DIRECT_MAX_BYTES`) and List Blobs as one HTTP request each.

    Through the SDK, every read builds a blob client (a pipeline of a dozen policies and a
    generated client) and runs one request through all of them and requests: about 2 ms of client
    CPU for a 16 KiB range, three quarters of it around the request itself; a listing deserialises
    each entry through the generated models (about 0.2 ms a blob). Here the request is authorised as
    the container client's own credential policy would (Shared Key signed as that policy signs,
    connectors/signing.py; an Entra ID token by the SDK's token policy itself; a SAS rides in the
    URL, where the SDK put it), sent with libcurl (`connectors/curl.py`) with the
    transport's timeouts and certificate settings, never redirected, and retried on throttling, 5xx
    and dropped connections with the SDK retry policy's own count and backoff; a listing's XML is
    read with ElementTree into the properties the SDK would give (tests compare the two). Built
    only where all of that is known (`for_container`): no proxy for the endpoint, no client
    certificate, one credential policy of a known kind, the exponential retry policy. Otherwise,
    and for an empty range or a snapshot or version, requests go through the SDK.
    """

    def __init__(self, container: ContainerClient, transport: "_PooledRequestsTransport",
                 credential: Any, retry: ExponentialRetry, settings: dict[str, Any]):
        base, _, sas = container.url.partition("?")
        parts = urlsplit(base)
        self.path = parts.path
        self.sas = sas
        self.origin = f"{parts.scheme}://{parts.netloc}"
        self.api_version = container.api_version
        self.credential = credential
        # Shared Key is signed here as the SDK's policy signs (connectors/signing.py); a token
        # policy authorises through the SDK's own `on_request`.
        self.shared_key = (SharedKey(credential.account_name, credential.account_key)
                           if isinstance(credential, SharedKeyCredentialPolicy) else None)
        self.tries = retry.total_retries + 1
        # The SDK's policy counts a first retry as 1 (initial + base**1 seconds).
        self.backoff = lambda n: retry.get_backoff_time({"count": n + 1})
        config = transport.connection_config
        verify = settings.get("verify", True) if parts.scheme == "https" else False
        bundle = None if verify is False else requests.certs.where() if verify in (True, None) else str(verify)
        self.curl = CurlSession(connect_timeout=config.timeout, read_timeout=config.read_timeout,
                                verify=bundle is not None, ca_bundle=bundle)

    @classmethod
    def for_container(cls, container: ContainerClient) -> "_DirectRequests | None":
        pipeline = getattr(container, "_pipeline", None)
        policies = [getattr(p, "_policy", p) for p in getattr(pipeline, "_impl_policies", ())]
        transport = getattr(pipeline, "_transport", None)
        while transport is not None and not isinstance(transport, _PooledRequestsTransport):
            transport = getattr(transport, "_transport", None)
        # Every policy that authorises a request, known or not: an unknown kind means the SDK alone
        # knows how to sign, so nothing goes direct (a request sent unsigned would only be refused).
        credentials = [p for p in policies if "Credential" in type(p).__name__]
        retries = [p for p in policies if isinstance(p, ExponentialRetry)]
        if (transport is None or len(credentials) > 1 or len(retries) != 1
                or not all(isinstance(p, (SharedKeyCredentialPolicy, BearerTokenCredentialPolicy)) for p in credentials)):
            return None
        if transport.session is None:
            transport.open()
        config = transport.connection_config
        url = container.url.partition("?")[0]
        settings = transport.session.merge_environment_settings(url, {}, None, config.verify, config.cert)
        if settings.get("proxies") and requests.utils.select_proxy(url, settings["proxies"]) or settings.get("cert"):
            return None
        if not keeps_read_timeout(config.read_timeout):
            return None
        return cls(container, transport, credentials[0] if credentials else None, retries[0], settings)

    def blob_url(self, key: str) -> str:
        """The URL a direct read of `key` asks for: the one the SDK's blob client has (`_format_url`)."""
        return self.origin + self._target(_blob_path(key), {})

    def _target(self, suffix: str, query: dict[str, str]) -> str:
        """The request target of the container's path + `suffix` with `query` and the SAS, if any."""
        encoded = "&".join(x for x in (urlencode(query, quote_via=quote), self.sas) if x)
        return f"{self.path}{suffix}{'?' + encoded if encoded else ''}"

    def read(self, source: "AzureBlobSource", key: str, start: int, end: int, if_match: str | None) -> bytes:
        headers = {"x-ms-range": f"bytes={start}-{end - 1}"}
        if if_match is not None:
            headers["If-Match"] = _quote(if_match)

        def body(answer: Answer) -> bytes:
            if answer.status == 206:
                total = _total_size(answer.headers.get("Content-Range"), end)
            else:
                total = int(answer.headers.get("Content-Length") or 0) + start
            source._check_bounds(key, start, end, total)
            return exact_range(answer.body, start, end, source.label, key)

        return self.get(source, key, _blob_path(key), {}, headers, body, limit=max(end - start + 1, ERROR_BODY))

    def list_page(self, source: "AzureBlobSource", prefix: str, include: list[str], marker: str | None,
                  page_size: int, delimiter: str | None = None
                  ) -> tuple[list[SimpleNamespace], list[str], str | None]:
        """One List Blobs page: the blobs' properties (shaped as the SDK's `BlobProperties`, for
        `AzureBlobSource._meta`), the folder prefixes (with a `delimiter`) and the next page's marker."""
        query = {"restype": "container", "comp": "list", "prefix": prefix or None, "delimiter": delimiter,
                 "marker": marker or None, "maxresults": str(page_size), "include": ",".join(include)}
        return self.get(source, prefix, "", {k: v for k, v in query.items() if v}, {},
                        lambda answer: _listing_page(answer.body, source.label))

    def get(self, source: "AzureBlobSource", key: str, suffix: str, query: dict[str, str],
            headers: dict[str, str], answer: Callable[[Answer], T], limit: int | None = None) -> T:
        """GET the container's URL + `suffix` with `query` and `headers`, keeping at most `limit`
        bytes of the answer; `answer(...)` reads a 2xx answer, every other one is the error the
        SDK's would be (`AzureBlobSource._translate`)."""
        target = self._target(suffix, query)
        url = f"{self.origin}{target}"
        fixed = {"x-ms-version": self.api_version, "User-Agent": "exitplan", **headers}

        def send() -> T:
            sent = {**fixed, "x-ms-date": http_date(), "x-ms-client-request-id": _request_id()}
            source.pacer.request_starts("get")
            try:
                if self.shared_key is not None:
                    sent["Authorization"] = self.shared_key.authorization("GET", url, sent)
                elif self.credential is not None:
                    request = HttpRequest("GET", url, headers=sent)
                    self.credential.on_request(PipelineRequest(request, PipelineContext(None)))
                    sent = request.headers
                response = self.curl.request("GET", url, sent, limit=limit)
            except CurlFailure as exc:
                source.pacer.request_ended(None)
                raise source._translate(ServiceRequestError(str(exc), error=exc), key) from None
            except AzureError as exc:  # the token could not be had
                source.pacer.request_ended(None)
                raise source._translate(exc, key) from exc
            status = SimpleNamespace(status_code=response.status, reason=response.reason, headers=response.headers)
            source.pacer.request_ended(_throttling(status))
            if 200 <= response.status < 300:
                return answer(response)
            if response.status == 401 and isinstance(self.credential, BearerTokenCredentialPolicy):
                raise _UseTheSdk()
            body = response.body[:ERROR_BODY]  # a listing's answer has no limit
            status.text = lambda encoding=None: body.decode("utf-8", "replace")
            message = _error_message(body) or response.reason or ""
            raise source._translate(HttpResponseError(message=message, response=status), key)

        return attempts(send, tries=self.tries, backoff=self.backoff)


# x-ms-client-request-id (opaque, up to 1 KiB, for the account's logs): this process's random id and
# a count, instead of a fresh uuid4 per request (os.urandom lets the GIL go, a wake-up per request).
_REQUEST_IDS = itertools.count()
_PROCESS_ID = uuid.uuid4()


def _request_id() -> str:
    return f"{_PROCESS_ID}-{next(_REQUEST_IDS)}"


def _new_process_id() -> None:  # a forked child numbers its requests under an id of its own
    global _PROCESS_ID, _REQUEST_IDS
    _PROCESS_ID, _REQUEST_IDS = uuid.uuid4(), itertools.count()


os.register_at_fork(after_in_child=_new_process_id)


def _blob_path(key: str) -> str:
    # A blob's name below its container's path, quoted as the SDK quotes it (`_format_url`).
    return f"/{quote(key, safe='~/')}"


def _listing_page(body: bytes, label: str = "azure") -> tuple[list[SimpleNamespace], list[str], str | None]:
    """List Blobs' XML answer: each `<Blob>` as the SDK's `BlobProperties` would have it (the
    fields `AzureBlobSource._meta` reads), each `<BlobPrefix>`'s name, and `<NextMarker>` (None on
    the last page)."""
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError as exc:
        raise TransientError(f"{label}: a listing answer is not well-formed XML ({exc})") from exc
    entries = []
    for blob in root.iterfind("Blobs/Blob"):
        properties = blob.find("Properties")
        p = {child.tag: child.text for child in properties} if properties is not None else {}
        md5 = p.get("Content-MD5")
        metadata = blob.find("Metadata")
        tags = blob.find("Tags/TagSet")
        entries.append(SimpleNamespace(
            name=_name_of(blob.find("Name")),
            size=int(p.get("Content-Length") or 0),
            etag=p.get("Etag"),
            last_modified=_rfc1123(p.get("Last-Modified")),
            creation_time=_rfc1123(p.get("Creation-Time")),
            blob_tier=p.get("AccessTier"),
            archive_status=p.get("ArchiveStatus"),
            blob_type=p.get("BlobType"),
            copy=SimpleNamespace(status=p.get("CopyStatus"), progress=p.get("CopyProgress")),
            content_settings=SimpleNamespace(
                content_type=p.get("Content-Type"), content_encoding=p.get("Content-Encoding"),
                cache_control=p.get("Cache-Control"), content_disposition=p.get("Content-Disposition"),
                content_language=p.get("Content-Language"), content_md5=base64.b64decode(md5) if md5 else None),
            metadata={m.tag: m.text for m in metadata} if metadata is not None else {},
            tags={t.findtext("Key"): t.findtext("Value") or "" for t in tags.iterfind("Tag")} if tags is not None else None,
            snapshot=blob.findtext("Snapshot"),
            version_id=blob.findtext("VersionId"),
            is_current_version=True if blob.findtext("IsCurrentVersion") == "true" else None,
        ))
    prefixes = [_name_of(p.find("Name")) for p in root.iterfind("Blobs/BlobPrefix")]
    return entries, prefixes, root.findtext("NextMarker") or None


def _name_of(name: Any) -> str:
    # Azure percent-encodes a name XML cannot carry (`Encoded="true"`), as the SDK reads it.
    text = name.text or "" if name is not None else ""
    return unquote(text) if name is not None and name.get("Encoded") == "true" else text


def _rfc1123(value: str | None) -> datetime | None:
    return parsedate_to_datetime(value) if value else None


def _error_message(body: bytes) -> str:
    # <Error><Code>…</Code><Message>first line\nRequestId:…\nTime:…</Message></Error>
    try:
        text = ElementTree.fromstring(body).findtext("Message") if body else None
    except ElementTree.ParseError:
        text = None
    return (text or "").strip().split("\n")[0]


# The SDK's blob types as `ObjectMeta.kind`.
_KINDS = {"BlockBlob": "block", "PageBlob": "page", "AppendBlob": "append"}
# Why an Archive-tier blob is listed but not copied: a permanent outcome until someone rehydrates it
# (hours at Azure), never a read retried until it gives up.
ARCHIVED = ("it is in the Archive tier and cannot be read until it is rehydrated (`exitplan rehydrate`, or az storage "
            "blob set-tier --tier Hot --rehydrate-priority Standard); the first migrate after that copies it")
# An Archive-tier blob whose rehydration was asked for and has not ended (Azure: up to 15 hours).
REHYDRATING = ("it is being rehydrated out of the Archive tier ({status}) and cannot be read yet; the first migrate "
               "once it is readable copies it (`exitplan rehydrate --wait` waits for that)")


# A blob that a Copy Blob from elsewhere is still filling (`x-ms-copy-status: pending`): its bytes
# are not all there yet. Its ETag changes when the copy ends, so the run after that copies it.
COPY_PENDING = ("a copy into it is still in progress at the source (Copy Blob, status pending, {progress} bytes) and "
                "its bytes are not all there; the first migrate after the copy has ended copies it")


def unreadable_reason(tier: str | None, archive_status: str | None, copy_status: str | None = None,
                      copy_progress: str | None = None) -> str | None:
    """Why a blob cannot be copied now: `archived_reason`, or a copy into it still pending."""
    if (copy_status or "").lower() == "pending":
        return COPY_PENDING.format(progress=copy_progress or "? of ?")
    return archived_reason(tier, archive_status)


def archived_reason(tier: str | None, archive_status: str | None) -> str | None:
    """Why a blob of `tier` cannot be read (Archive: `ARCHIVED`, or `REHYDRATING` while its
    rehydration runs), None when it can."""
    if (tier or "").lower() != "archive":
        return None
    return REHYDRATING.format(status=archive_status) if archive_status else ARCHIVED


def _unquote(etag: str | None) -> str:
    return (etag or "").strip('"')


def _quote(etag: str) -> str:
    # Azure answers ETags quoted and expects them quoted in If-Match (RFC 9110).
    return etag if etag.startswith('"') else f'"{etag}"'


def _tier(value: Any) -> str | None:
    if value is None:
        return None
    return getattr(value, "value", None) or str(value)


class AzureBlobSource:
    """One Azure Blob container as an `ObjectSource`.

    Build it with one of the constructors (`from_connection_string`, `from_sas`,
    `from_default_credential`). Keyword options common to all three:

    - ``max_connections`` (default 16): size of the HTTP connection pool; set it to at least the
      number of concurrent readers (the engine's read concurrency), or connections get churned.
    - ``page_size`` (default 1000, Azure's maximum 5000): blobs per listing request; one page at a
      time is held in memory.
    - ``retry_total`` (default 4) and ``retry_initial_backoff`` (seconds, default 1.0): the SDK's own
      retries of throttled / 5xx / connection failures and cut downloads. ``retry_increment_base``
      (default 2): the wait before retry n is ``initial + base**n`` seconds, ± half of initial as
      jitter (3, 5, 9, 17 s by default; base 0 gives a constant wait of `initial`).
      The engine retries whole ranges on top of these, so the SDK's layer is kept short.
    - ``connection_timeout`` / ``read_timeout`` (seconds, defaults 20 / 60): per request.
    - ``pacer``: how fast to talk to the account (`connectors.base.RequestPacer`), asked before
      every HTTP attempt (the SDK's retries included) and told of every `ServerBusy` / 503 / 429
      answer ("egress is over the account limit" among them); default: never waits.
    """

    # Everything a source does is supported; Azure is never a destination.
    unsupported: frozenset[str] = frozenset({"sink"})

    def __init__(self, container_client: ContainerClient, *, page_size: int = DEFAULT_PAGE_SIZE,
                 pacer: RequestPacer = UNPACED):
        """Wrap an already built `ContainerClient` (prefer the `from_*` constructors, which also
        hook `pacer` into the client's requests)."""
        if page_size < 1:
            raise ConfigError(f"page_size must be at least 1, not {page_size}")
        self._container = container_client
        self.container = container_client.container_name
        self.account = container_client.account_name or _account_from_url(container_client.url)
        self.page_size = page_size
        self.label = f"azure:{self.account}/{self.container}"
        self.pacer = pacer
        self._direct: _DirectRequests | None | bool = False  # False: not looked for yet
        self._direct_lock = threading.Lock()

    # ---- constructors ---------------------------------------------------------------------

    @staticmethod
    def _client_options(max_connections: int, retry_total: int, retry_initial_backoff: float,
                        retry_increment_base: float, connection_timeout: float,
                        read_timeout: float, pacer: RequestPacer = UNPACED) -> dict[str, Any]:
        if max_connections < 1:
            raise ConfigError(f"max_connections must be at least 1, not {max_connections}")
        return {
            # The SDK applies its 256 KiB read size only to a transport it builds itself; ours would
            # otherwise read bodies in azure-core's 4 KiB pieces (about 2 CPU-s/GB more).
            "transport": _PooledRequestsTransport(
                max_connections, connection_timeout=connection_timeout, read_timeout=read_timeout,
                connection_data_block_size=READ_BLOCK_SIZE,
            ),
            "retry_policy": ExponentialRetry(
                initial_backoff=retry_initial_backoff, increment_base=retry_increment_base,
                retry_total=retry_total, random_jitter_range=retry_initial_backoff / 2,
            ),
            # The Blob service never redirects; a redirect would send the next request, signed with
            # the account key or carrying the SAS, to a host the sovereignty gate never judged.
            "permit_redirects": False,
            # The storage SDK calls these for every attempt, inside its retry policy.
            "raw_request_hook": lambda _request: pacer.request_starts("get"),
            "raw_response_hook": lambda response: pacer.request_ended(_throttling(response.http_response)),
        }

    @classmethod
    def from_connection_string(
        cls,
        conn_str: str,
        container: str,
        *,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        page_size: int = DEFAULT_PAGE_SIZE,
        retry_total: int = 4,
        retry_initial_backoff: float = 1.0,
        retry_increment_base: float = 2,
        connection_timeout: float = 20,
        read_timeout: float = 60,
        pacer: RequestPacer = UNPACED,
    ) -> "AzureBlobSource":
        """A source for `container` of the account a connection string names (Azurite, or a key).

        The string is read by `config.azure_connection` first (a repeated key is refused there), and
        the client the SDK builds must talk to the host that reading found: lab mode and the
        sovereignty gate were decided on it."""
        options = cls._client_options(max_connections, retry_total, retry_initial_backoff, retry_increment_base,
                                      connection_timeout, read_timeout, pacer)
        try:
            expected = urlsplit(blob_endpoints(conn_str).primary)
            service = BlobServiceClient.from_connection_string(conn_str, **options)
        except ConnectionStringError as exc:
            raise ConfigError(f"azure: unusable connection string for container {container!r}: {exc}") from None
        except (ValueError, AzureError) as exc:
            # Never echo the connection string: it holds the account key.
            raise ConfigError(
                f"azure: unusable connection string for container {container!r}: {type(exc).__name__}"
            ) from None
        used = urlsplit(service.primary_endpoint)
        if (used.hostname, used.port) != (expected.hostname, expected.port):
            raise ConfigError(
                f"azure: the SDK would send container {container!r}'s requests to {used.hostname}:{used.port}, not to "
                f"{expected.hostname}:{expected.port} where the connection string was judged; refusing (an Azure SDK "
                "change: see config/azure_connection.py)"
            )
        return cls(service.get_container_client(container), page_size=page_size, pacer=pacer)

    @classmethod
    def from_sas(
        cls,
        account_url: str,
        sas_token: str,
        container: str,
        *,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        page_size: int = DEFAULT_PAGE_SIZE,
        retry_total: int = 4,
        retry_initial_backoff: float = 1.0,
        retry_increment_base: float = 2,
        connection_timeout: float = 20,
        read_timeout: float = 60,
        pacer: RequestPacer = UNPACED,
    ) -> "AzureBlobSource":
        """A source for `container` under `account_url`, authorised by an account or container SAS.

        The SAS needs read and list permissions on the container.
        """
        options = cls._client_options(max_connections, retry_total, retry_initial_backoff, retry_increment_base,
                                      connection_timeout, read_timeout, pacer)
        try:
            service = BlobServiceClient(account_url, credential=sas_token.lstrip("?"), **options)
        except (ValueError, AzureError) as exc:
            raise ConfigError(
                f"azure: unusable account URL {account_url!r} or SAS token: {type(exc).__name__}"
            ) from None
        return cls(service.get_container_client(container), page_size=page_size, pacer=pacer)

    @classmethod
    def from_default_credential(
        cls,
        account_url: str,
        container: str,
        *,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        page_size: int = DEFAULT_PAGE_SIZE,
        retry_total: int = 4,
        retry_initial_backoff: float = 1.0,
        retry_increment_base: float = 2,
        connection_timeout: float = 20,
        read_timeout: float = 60,
        credential: Any = None,
        pacer: RequestPacer = UNPACED,
    ) -> "AzureBlobSource":
        """A source authorised by Microsoft Entra ID through azure-identity's `DefaultAzureCredential`.

        Environment credentials, workload or managed identity, Azure CLI login…: whichever the
        environment provides. The identity needs the "Storage Blob Data Reader" role. `credential`
        overrides the default chain (any azure-core `TokenCredential`).
        """
        options = cls._client_options(max_connections, retry_total, retry_initial_backoff, retry_increment_base,
                                      connection_timeout, read_timeout, pacer)
        if credential is None:
            from azure.identity import DefaultAzureCredential

            credential = DefaultAzureCredential()
        try:
            service = BlobServiceClient(account_url, credential=credential, **options)
        except (ValueError, AzureError) as exc:
            raise ConfigError(f"azure: unusable account URL {account_url!r}: {type(exc).__name__}: {exc}") from None
        return cls(service.get_container_client(container), page_size=page_size, pacer=pacer)

    def close(self) -> None:
        """Close the HTTP connections."""
        direct, self._direct = self._direct, False
        if direct:
            direct.curl.close()
        try:
            self._container.close()
        except AzureError:
            pass

    def __enter__(self) -> "AzureBlobSource":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ---- ObjectSource ---------------------------------------------------------------------

    def list(self, prefix: str = "") -> Iterator[ObjectMeta]:
        """Yield every blob under `prefix` in name order, one page (`page_size` blobs) at a time."""
        for page, _marker in self._pages(prefix, ["metadata", "tags", "copy"], None, self.page_size):
            yield from page

    def _pages(self, prefix: str, include: list[str], marker: str | None, page_size: int,
               delimiter: str | None = None) -> Iterator[tuple[list[ObjectMeta], str | None]]:
        """The blobs of each page of a listing from `marker` on (folder prefixes left out), with
        the marker of the page after it (None after the last): direct requests where the source
        has them (`_DirectRequests`), the SDK's pager otherwise."""
        direct = self._direct_requests()
        while direct is not None:
            try:
                entries, _folders, after = direct.list_page(self, prefix, include, marker, page_size, delimiter)
            except _UseTheSdk:
                break  # the SDK's pager goes on from `marker`
            yield [self._meta(props) for props in entries], after
            if after is None:
                return
            marker = after
        options = dict(name_starts_with=prefix or None, include=include, results_per_page=page_size)
        paged = (self._container.walk_blobs(delimiter=delimiter, **options) if delimiter
                 else self._container.list_blobs(**options))
        pages = self._call(lambda: paged.by_page(continuation_token=marker), prefix)
        while True:
            # Requests happen lazily while iterating: each page fetch is wrapped too.
            page = self._call(lambda: _next_page(pages), prefix)
            if page is None:
                return
            yield [self._meta(p) for p in page if not isinstance(p, BlobPrefix)], pages.continuation_token or None

    def folders(self, prefix: str, limit: int) -> tuple[list[str], bool] | None:
        """The folder prefixes directly below `prefix` and whether blobs sit directly there (one
        "/"-delimited listing request of at most `limit` entries, 5000 at most); None when the
        level holds more (`RangeLister`)."""
        direct = self._direct_requests()
        try:
            if direct is not None:
                blobs, found, marker = direct.list_page(self, prefix, [], None, min(limit, 5000), "/")
                return None if marker or len(blobs) + len(found) > limit else (found, bool(blobs))
        except _UseTheSdk:
            pass
        pages = self._container.walk_blobs(name_starts_with=prefix or None, delimiter="/",
                                           results_per_page=min(limit, 5000)).by_page()
        page = self._call(lambda: _next_page(pages), prefix)
        if pages.continuation_token or len(page or ()) > limit:
            return None
        found = page or []
        return [p.name for p in found if isinstance(p, BlobPrefix)], any(not isinstance(p, BlobPrefix) for p in found)

    def list_pages(self, part: ListingRange, marker: str | None = None) -> Iterator[ListingPage]:
        """The pages of `part`, each with its continuation token as the marker (`RangeLister`):
        a range is listed on from where an earlier listing stopped, without listing its start again.
        Snapshots and earlier versions are listed too, apart (`ListingPage.history`), so that what
        is not carried is counted and named instead of left unseen."""
        include = ["metadata", "tags", "copy", "snapshots", "versions"]
        for entries, token in self._pages(part.prefix, include, marker, self.page_size, "/" if part.direct else None):
            if token is not None and entries and token == entries[-1].key:
                entries += self._rest_of_name(entries, include)
            yield ListingPage([m for m in entries if m.earlier_state is None], token,
                              [m for m in entries if m.earlier_state is not None])
            if token is None:
                return

    def _rest_of_name(self, entries: list[ObjectMeta], include: list[str]) -> list[ObjectMeta]:
        """The entries of the page's last name that the page left out. Azure's continuation token is
        opaque and goes on inside a name's snapshots and versions; Azurite's is the last name itself
        and goes on after it, so that the rest of that name's entries (its other snapshots, or the
        blob itself) would never be listed. A token equal to the last name is answered by listing
        that name's entries once more."""
        name = entries[-1].key
        seen = {(m.snapshot, m.version_id) for m in entries if m.key == name}
        return [m for m in self._entries_of(name, include) if (m.snapshot, m.version_id) not in seen]

    def list_name(self, name: str) -> ListingPage:
        """Blob `name` as a listing of the whole container would give it: the blob (if it exists)
        and its snapshots and earlier versions, apart. For a name the change feed says changed
        (`connectors.azure_changefeed`): what it is now, without listing its neighbours."""
        entries = self._entries_of(name, ["metadata", "tags", "snapshots", "versions"])
        return ListingPage([m for m in entries if m.earlier_state is None], None,
                           [m for m in entries if m.earlier_state is not None])

    def _entries_of(self, name: str, include: list[str]) -> list[ObjectMeta]:
        """Every listing entry of exactly `name` (the blob, its snapshots, its versions): the names
        starting with `name` are listed in order until another name comes."""
        found: list[ObjectMeta] = []
        for page, _marker in self._pages(name, include, None, NAME_PAGE_SIZE):
            for meta in page:
                if meta.key != name:
                    return found
                found.append(meta)
        return found

    def rehydrate(self, key: str, tier: str = "Hot", priority: str = "Standard") -> None:
        """Ask for Archive-tier blob `key` to be rehydrated to `tier` (Hot, Cool or Cold) at
        `priority` (Standard: up to 15 hours; High: under an hour for small blobs, at a higher price).
        The blob stays unreadable until Azure has finished; its listing says so (`rehydrating`)."""
        self._call(lambda: self._container.get_blob_client(key).set_standard_blob_tier(tier, rehydrate_priority=priority),
                   key)

    def head(self, key: str) -> ObjectMeta:
        """Full properties of blob `key` (size, ETag, Content-MD5, tier, content headers, metadata,
        index tags: one more request when it has tags)."""
        blob = self._blob(key)
        props = self._call(blob.get_blob_properties, key)
        tags = self._call(blob.get_blob_tags, key) if props.tag_count else {}
        return self._meta(props, tags)

    def read_range(self, key: str, start: int, end: int, *, if_match: str | None = None) -> bytes:
        """Bytes ``start .. end-1`` of `key`, pinned to ETag `if_match` when given.

        Raises `SourceChanged` when the blob no longer has that ETag, `InvalidRequest` for a range
        outside the blob or an Archive-tier blob, `TransientError` on a short body.
        """
        if start < 0 or end < start:
            raise InvalidRequest(f"{self.label}: invalid range {start}-{end} for {key!r}", key=key)
        if 0 < end - start <= DIRECT_MAX_BYTES and history_of(key) is None:
            direct = self._direct_requests()
            if direct is not None:
                try:
                    return direct.read(self, key, start, end, if_match)
                except _UseTheSdk:
                    pass
        conditions: dict[str, Any] = {}
        if if_match is not None:
            conditions = {"etag": _quote(if_match), "match_condition": MatchConditions.IfNotModified}
        blob = self._blob(key)
        if start == end:
            # An empty range cannot be expressed as an HTTP Range (and Azure answers 416 to any
            # range on a 0-byte blob): still prove the blob exists at that ETag, then return b"".
            props = self._call(lambda: blob.get_blob_properties(**conditions), key)
            self._check_bounds(key, start, end, props.size)
            return b""
        # The generated operation streams the body in READ_BLOCK_SIZE blocks straight into one
        # buffer of the exact size. `download_blob` first holds the whole first response in memory
        # and then copies it (twice the range, outside the engine's memory budget). Private API:
        # see the module docstring for the version bound and the test that watches it.
        access = ModifiedAccessConditions(if_match=_quote(if_match)) if if_match is not None else None

        def fetch():
            return blob._client.blob.download(  # noqa: SLF001 - see above
                range=f"bytes={start}-{end - 1}", modified_access_conditions=access,
                snapshot=blob.snapshot, version_id=blob.version_id,
                # The stored bytes, as stored: a blob with Content-Encoding gzip is copied compressed
                # (its header goes with it), never inflated on the way (the operation's default).
                decompress=False,
                cls=lambda _response, body, headers: (body, headers),
            )

        body, headers = self._call(fetch, key)
        self._check_bounds(key, start, end, _total_size(headers.get("Content-Range"), end))
        into = _ExactBuffer(end - start)

        def drain() -> None:
            for chunk in body:
                into.write(chunk)

        self._call(drain, key)
        if into.pos != end - start:
            raise TransientError(
                f"{self.label}: short read of {key!r} range {start}-{end}: {into.pos} of {end - start} bytes",
                key=key,
            )
        return into.buffer

    # ---- internals ------------------------------------------------------------------------

    def use_sdk_only(self) -> None:
        """Send every request through the SDK's pipeline (the source's `direct_requests: false`)."""
        direct, self._direct = self._direct, None
        if direct:
            direct.curl.close()

    def _direct_requests(self) -> _DirectRequests | None:
        """The source's direct requests (looked for once), or None: everything through the SDK."""
        if self._direct is False:
            with self._direct_lock:
                if self._direct is False:
                    self._direct = _DirectRequests.for_container(self._container)
        return self._direct

    def _blob(self, key: str) -> BlobClient:
        """The client of blob `key`, or of the earlier state of a blob a history key names
        (`connectors.base.history_of`: a snapshot, or a version)."""
        earlier = history_of(key)
        if earlier is None:
            return self._container.get_blob_client(key)
        name, kind, ident = earlier
        if kind == "snapshot":
            return self._container.get_blob_client(name, snapshot=ident)
        return self._container.get_blob_client(name, version_id=ident)

    def _check_bounds(self, key: str, start: int, end: int, size: int) -> None:
        if end > size:
            raise InvalidRequest(f"{self.label}: range {start}-{end} is outside {key!r} ({size} bytes)", key=key)

    def _meta(self, props: BlobProperties, tags: dict[str, str] | None = None) -> ObjectMeta:
        cs = props.content_settings
        md5 = cs.content_md5 if cs is not None else None
        tier = _tier(props.blob_tier)
        archive_status = _tier(getattr(props, "archive_status", None)) or None
        copy = getattr(props, "copy", None)
        return ObjectMeta(
            key=props.name,
            size=props.size,
            etag=_unquote(props.etag),
            content_md5=bytes(md5) if md5 else None,
            last_modified=props.last_modified if isinstance(props.last_modified, datetime) else None,
            tier=tier,
            content=ContentSettings(
                content_type=cs.content_type if cs else None,
                content_encoding=cs.content_encoding if cs else None,
                cache_control=cs.cache_control if cs else None,
                content_disposition=cs.content_disposition if cs else None,
                content_language=cs.content_language if cs else None,
            ),
            metadata=dict(props.metadata or {}),
            tags=dict(tags if tags is not None else props.tags or {}),
            created=props.creation_time if isinstance(props.creation_time, datetime) else None,
            kind=_KINDS.get(_tier(props.blob_type) or "", _tier(props.blob_type)),
            not_copyable=unreadable_reason(tier, archive_status, _tier(getattr(copy, "status", None)),
                                           getattr(copy, "progress", None)),
            rehydrating=archive_status,
            snapshot=getattr(props, "snapshot", None) or None,
            version_id=getattr(props, "version_id", None) or None,
            # Azure marks only the current version (`IsCurrentVersion` true); without a version id
            # (no versioning, or a listing without versions) the blob is its current state.
            current_version=not getattr(props, "version_id", None) or getattr(props, "is_current_version", None) is True,
        )

    def _call(self, fn: Callable[[], T], key: str) -> T:
        try:
            return fn()
        except ConnectorError:
            raise
        except AzureError as exc:
            # An attempt that got no answer never reached the response hook: it ended all the same.
            self.pacer.request_ended(None)
            raise self._translate(exc, key) from exc
        except ValueError as exc:
            # The SDK validates some arguments itself (e.g. a malformed ETag or range).
            raise InvalidRequest(f"{self.label}: {key!r}: {exc}", key=key) from exc
        except OSError as exc:
            raise TransientError(f"{self.label}: {key!r}: {type(exc).__name__}: {exc}", key=key) from exc

    def _translate(self, exc: AzureError, key: str) -> ConnectorError:
        status = getattr(getattr(exc, "response", None), "status_code", None) or getattr(exc, "status_code", None)
        raw_code = getattr(exc, "error_code", None)
        headers = getattr(getattr(exc, "response", None), "headers", None) or {}
        # The generated operations do not parse x-ms-error-code into the exception: read it here.
        code = str(getattr(raw_code, "value", raw_code) or headers.get("x-ms-error-code") or "")
        what = f"{self.label}: {key!r}" if key else self.label
        reason = f"{code or type(exc).__name__}{f' (HTTP {status})' if status else ''}"
        if isinstance(exc, DecodeError):
            # IncompleteReadError among them: the body was cut or garbled on the way.
            return TransientError(f"{what}: {type(exc).__name__}: {_first_line(exc)}", key=key)
        if code == "BlobArchived" or (status == 409 and "archive" in str(exc).lower()):
            return InvalidRequest(
                f"{what} is in the Archive tier and cannot be read; rehydrate it to Hot or Cool first "
                f"(az storage blob set-tier --tier Hot --rehydrate-priority Standard) and run again",
                key=key,
            )
        if code == "ContainerNotFound":
            return NotFound(f"azure: container {self.container!r} does not exist in account {self.account!r}", key=key)
        if status == 404 or code in ("BlobNotFound", "ResourceNotFound"):
            return NotFound(f"{what}: no such blob ({reason})", key=key)
        if isinstance(exc, ResourceModifiedError) or status == 412 or code == "ConditionNotMet":
            return SourceChanged(f"{what} changed since it was listed (If-Match failed: {reason})", key=key)
        if status in (429, 503) or code in ("ServerBusy", "OperationTimedOut"):
            return Throttled(f"{what}: the service is busy ({reason}); retry later", key=key)
        if isinstance(exc, ClientAuthenticationError) or status in (401, 403):
            return AuthError(f"{what}: access refused ({reason}); check the credentials and their permissions "
                             f"(read and list on the container)", key=key)
        if isinstance(exc, (ServiceRequestError, ServiceResponseError)) or status is None:
            return TransientError(f"{what}: {type(exc).__name__}: {_first_line(exc)}", key=key)
        if status >= 500:
            return TransientError(f"{what}: server error {reason}", key=key)
        if status == 416 or code == "InvalidRange":
            return InvalidRequest(f"{what}: range not satisfiable ({reason})", key=key)
        if isinstance(exc, HttpResponseError):
            return InvalidRequest(f"{what}: request refused: {reason}: {_first_line(exc)}", key=key)
        return TransientError(f"{what}: {type(exc).__name__}: {_first_line(exc)}", key=key)


def _throttling(response: Any) -> str | None:
    """What a throttling answer says ("ServerBusy (HTTP 503: Egress is over the account limit.)"),
    or None for any other answer. Azure puts the error's message in the status line's reason."""
    status = getattr(response, "status_code", None)
    code = (getattr(response, "headers", None) or {}).get("x-ms-error-code") or ""
    if status not in (429, 503) and code != "ServerBusy":
        return None
    reason = getattr(response, "reason", None)
    return f"{code or 'throttled'} (HTTP {status}{f': {reason}' if reason else ''})"


def _next_page(pages: Iterator[Any]) -> list[BlobProperties] | None:
    try:
        return list(next(pages))
    except StopIteration:
        return None


def _total_size(content_range: str | None, fallback: int) -> int:
    # "bytes START-END/TOTAL": the blob's size, which the downloader's own `size` (the range) is not.
    try:
        return int(str(content_range).rsplit("/", 1)[1])
    except (IndexError, ValueError):
        return fallback


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _account_from_url(url: str) -> str:
    # Azurite / IP-style URLs carry the account as the first path segment; real Azure in the host.
    parts = urlsplit(url)
    host = parts.hostname or ""
    if host.replace(".", "").isdigit() or host == "localhost":
        return parts.path.strip("/").split("/")[0]
    return host.split(".")[0]
