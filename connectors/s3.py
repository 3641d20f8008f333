"""An S3-compatible endpoint as `ObjectSink` (the destination) and as `ObjectSource` (verify, restore).

Works with any S3-compatible provider (OVHcloud, Scaleway, Outscale, IONOS, the lab's moto server).
The boto3 client is built so that nothing provider-hostile is sent: checksums only when an operation
requires one (boto3 ≥ 1.36 otherwise sends CRC32 trailers in `aws-chunked` bodies over https, which
several providers store raw), the provider's addressing style, a connection pool as large as the
upload concurrency.

Integrity on upload: a part or object sent from memory carries the caller's Content-MD5 (the server
checks it) and the ETag that comes back is compared with it too, since some servers (moto among them)
do not check Content-MD5. A streamed body (a file-like object, for parts larger than the memory
budget) is hashed while it is sent and the returned ETag compared with that digest; a completed
multipart upload's ETag is compared with the one its parts make. These are the only ETag checks of
a write (`connectors.base.checked_etag`); they are skipped when the provider's ETag is not an MD5
(`etag_is_md5=False`: SSE-C, SSE-KMS, a provider profile's `multipart.etag: opaque`); a completed
multipart upload's size is then checked instead (HEAD), and its bytes rest on every part's
Content-MD5 having been accepted by the server.

What the provider's multipart API answers comes from its profile (`SinkBehaviour`): an operation
it does not implement is not sent (`Unsupported`), and a 405 / 501 answer is `Unsupported` too.

A PutObject of at most `DIRECT_MAX_BYTES` from memory, a GetObject of a range that small, and the
HeadObject and GetObjectTagging a source sends for each listed object go as one direct request each
(`_direct_put`, `_direct_get`, `_direct_head`, `_direct_tags`): signed as botocore signs
(connectors/signing.py), sent on libcurl with botocore's HTTP session's settings, the headers
botocore would send, its standard retries; the small-object path's cost was mostly
botocore's per-request machinery (docs/DESIGN.md). A profile's `direct_requests: false` turns them off.

Every SDK call is wrapped: botocore exceptions never leave this module.
"""

from __future__ import annotations

import base64
import hashlib
import random
import re
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from email.utils import parsedate_to_datetime
from typing import Any, BinaryIO, Callable, Iterator, Mapping, Sequence, TypeVar
from urllib.parse import quote, urlencode, urlsplit
from xml.etree import ElementTree

import botocore.loaders
import botocore.session
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionError as BotoConnectionError,
    DataNotFoundError,
    NoCredentialsError,
    ParamValidationError,
    PartialCredentialsError,
    SSLError,
)
from botocore.httpsession import get_cert_path as botocore_cert_path

from .base import (
    DIRECT_MAX_BYTES,
    AuthError,
    ConfigError,
    ConnectorError,
    ContentSettings,
    IntegrityError,
    InvalidRequest,
    NotFound,
    ObjectMeta,
    PartBody,
    PartReceipt,
    PendingUpload,
    SinkBehaviour,
    RequestPacer,
    SinkLimits,
    SourceChanged,
    Throttled,
    TransientError,
    Unsupported,
    UNPACED,
    WriteMeta,
    attempts,
    exact_range,
    checked_etag,
    checked_multipart_etag,
)
from .curl import ERROR_BODY, Answer, CurlFailure, CurlSession, keeps_read_timeout
from .signing import SigV4

log = logging.getLogger(__name__)
T = TypeVar("T")

_MD5_HEX = re.compile(r"^[0-9a-f]{32}$")

_NOT_FOUND = {"NoSuchKey", "404", "NotFound", "NoSuchUpload", "NoSuchVersion"}
_CHANGED = {"PreconditionFailed", "412"}
_THROTTLED = {"SlowDown", "Throttling", "ThrottlingException", "TooManyRequests", "RequestLimitExceeded",
              "ServiceUnavailable", "503", "429"}
_TRANSIENT = {"RequestTimeout", "InternalError", "500", "502", "504"}
_DIGEST = {"BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch"}
_AUTH = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
         "AllAccessDisabled", "AccountProblem", "403", "401"}
_UNSUPPORTED = {"MethodNotAllowed", "NotImplemented", "405", "501"}
_INVALID = {"EntityTooSmall", "EntityTooLarge", "InvalidPart", "InvalidPartOrder", "InvalidRequest",
            "InvalidArgument", "InvalidRange", "MalformedXML", "KeyTooLongError", "MetadataTooLarge",
            "InvalidStorageClass", "400", "416"}


def _unquote(etag: str | None) -> str:
    return (etag or "").strip('"')


def _quote(etag: str) -> str:
    return etag if etag.startswith('"') else f'"{etag}"'


class BucketNotFound(NotFound):
    """The bucket itself does not exist (a configuration problem, not a missing object)."""


class _ShortBody(Exception):
    """A streamed body ended before the announced size (raised from inside botocore's send)."""


class _HashingReader:
    """A read-only view of exactly `size` bytes of a caller's stream, MD5-hashed as botocore reads it.

    It deliberately has no `seek`: the request that carries it is never retried by botocore (see
    `S3Store._stream_client`), so the digest always covers exactly the bytes sent once. A stream
    that ends early raises `_ShortBody` instead of letting the server wait for the missing bytes.
    """

    def __init__(self, raw: BinaryIO, size: int, pacer: RequestPacer = UNPACED):
        self._raw = raw
        self._remaining = size
        self.size = size
        self.md5 = hashlib.md5()
        self._pacer = pacer

    def __len__(self) -> int:
        return self.size

    def read(self, n: int = -1) -> bytes:
        if self._remaining <= 0:
            return b""
        want = self._remaining if n is None or n < 0 else min(n, self._remaining)
        chunk = self._raw.read(want)
        if not chunk:
            raise _ShortBody(f"the body ended {self._remaining} bytes before its announced size of {self.size}")
        chunk = bytes(chunk)
        self._remaining -= len(chunk)
        self.md5.update(chunk)
        self._pacer.body_bytes(len(chunk))
        return chunk

    @property
    def exhausted(self) -> bool:
        return self._remaining == 0


class _ViewReader:
    """A seekable file-like object over a memoryview, so botocore streams it without a copy.

    Retries stay safe: botocore rewinds with ``seek(0)``, which is the start of this view.
    """

    def __init__(self, view: memoryview, pacer: RequestPacer = UNPACED):
        self._view = view.cast("B") if view.c_contiguous else memoryview(view.tobytes())
        self._pos = 0
        self._pacer = pacer

    def __len__(self) -> int:
        return len(self._view)

    def read(self, n: int = -1) -> bytes:
        end = len(self._view) if n is None or n < 0 else min(self._pos + n, len(self._view))
        chunk = self._view[self._pos:end].tobytes()
        self._pos = end
        self._pacer.body_bytes(len(chunk))  # a retry sends the bytes again: they count again
        return chunk

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: len(self._view)}[whence]
        self._pos = max(0, min(base + offset, len(self._view)))
        return self._pos

    def tell(self) -> int:
        return self._pos


class S3Store:
    """One bucket of an S3-compatible endpoint: `ObjectSink` and `ObjectSource`.

    Arguments (all plain values; the config layer builds them from the provider profile):

    - ``bucket``: the bucket name.
    - ``endpoint_url``: e.g. ``https://s3.gra.io.cloud.ovh.net``; ``region``: the signing region.
    - ``access_key_id`` / ``secret_access_key`` / ``session_token``: credentials (never logged).
    - ``addressing_style``: ``"path"`` (bucket in the path; default, what most non-AWS providers
      and the lab need) or ``"virtual"`` (bucket in the host name).
    - ``limits``: the provider's `SinkLimits` (part sizes, part count, key and metadata sizes).
    - ``max_pool_connections`` (default 32): HTTP connections kept per client; make it at least the
      number of requests in flight (upload concurrency + verify readers), else connections churn.
    - ``verify_tls`` (default True): check the server certificate; False only for the lab's
      self-signed server.
    - ``label``: a short name for messages; default ``s3:BUCKET``.
    - ``etag_is_md5`` (default True): the provider's ETags are MD5s (of the object, or S3's
      md5-of-md5s for multipart), so returned ETags are compared with what was sent. Set False
      under SSE-C / SSE-KMS, where ETags are opaque, and for a profile's `multipart.etag: opaque`.
    - ``behaviour``: which multipart operations the provider answers and whether it accepts
      flexible checksum headers (`SinkBehaviour`; default: all of them, Content-MD5 only).
    - ``max_attempts`` (default 5): botocore's own attempts per request, the first included
      (standard retry mode: throttling, 5xx, connection errors; exponential backoff with jitter).
      Requests with a streamed (file-like) body get one attempt only: the engine re-reads and
      re-sends the part.
    - ``page_size`` (default 1000): keys per ListObjectsV2 request, parts per ListParts request.
    - ``connect_timeout`` / ``read_timeout`` (seconds, defaults 10 / 60).
    - ``pacer``: how fast to talk to the bucket (`connectors.base.RequestPacer`: request rates,
      requests in flight, bandwidth), asked before every HTTP attempt (botocore's retries
      included) and told of every throttling answer; default: never waits.
    """

    unsupported: frozenset[str] = frozenset()

    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None,
        region: str,
        access_key_id: str,
        secret_access_key: str,
        session_token: str | None = None,
        addressing_style: str = "path",
        limits: SinkLimits,
        max_pool_connections: int = 32,
        verify_tls: bool = True,
        label: str | None = None,
        etag_is_md5: bool = True,
        behaviour: SinkBehaviour = SinkBehaviour(),
        max_attempts: int = 5,
        page_size: int = 1000,
        connect_timeout: float = 10,
        read_timeout: float = 60,
        pacer: RequestPacer = UNPACED,
        source_details: bool = False,
    ):
        if addressing_style not in ("path", "virtual"):
            raise ConfigError(f"addressing_style must be 'path' or 'virtual', not {addressing_style!r}")
        if not 1 <= page_size <= 1000:
            raise ConfigError(f"page_size must be between 1 and 1000, not {page_size}")
        if max_pool_connections < 1 or max_attempts < 1:
            raise ConfigError("max_pool_connections and max_attempts must be at least 1")
        self.bucket = bucket
        self.limits = limits
        self.label = label or f"s3:{bucket}"
        self.etag_is_md5 = etag_is_md5
        self.behaviour = behaviour
        self.page_size = page_size
        self.endpoint_url = endpoint_url
        self.pacer = pacer
        self.source_details = source_details
        self._details_pool: ThreadPoolExecutor | None = None
        self._details_at_once = max(1, min(16, max_pool_connections // 2))
        self._client_kwargs: dict[str, Any] = {
            "endpoint_url": endpoint_url,
            "region_name": region,
            "verify": verify_tls,
            "aws_access_key_id": access_key_id,
            "aws_secret_access_key": secret_access_key,
            "aws_session_token": session_token,
        }
        self._config_kwargs: dict[str, Any] = {
            # A provider that accepts the x-amz-checksum-* headers may get them where an operation
            # supports them (boto3's default); the others get Content-MD5 alone (module docstring).
            "request_checksum_calculation": "when_supported" if behaviour.flexible_checksums else "when_required",
            "response_checksum_validation": "when_required",
            "max_pool_connections": max_pool_connections,
            "connect_timeout": connect_timeout,
            "read_timeout": read_timeout,
            "tcp_keepalive": True,
        }
        self._addressing_style = addressing_style
        try:
            self._client = _new_client(
                "s3",
                config=Config(
                    **self._config_kwargs,
                    # Every body carries a Content-MD5 (or, streamed, has its ETag checked against
                    # the MD5 computed while sending): a SHA-256 of the payload for the signature
                    # would cost another pass over every byte. Over https botocore skips it anyway
                    # when a Content-MD5 is present; over the lab's plain http it would not.
                    s3={"addressing_style": addressing_style, "payload_signing_enabled": False},
                    retries={"mode": "standard", "total_max_attempts": max_attempts},
                ),
                **self._client_kwargs,
            )
        except (BotoCoreError, ValueError) as exc:
            raise ConfigError(f"{self.label}: cannot build an S3 client for {endpoint_url!r}: {exc}") from None
        self._paced(self._client)
        self._max_attempts = max_attempts
        self._direct_base = _bucket_url(endpoint_url, bucket, addressing_style)
        # Small PUTs and ranged GETs go as direct requests (`_direct_put`, `_direct_get`) on
        # libcurl (connectors/curl.py) with botocore's HTTP session's TLS and timeout settings.
        # Private attribute: where a botocore release moves it, or a proxy applies to the endpoint,
        # every request goes through the client (the unit tests say so).
        self._curl = _curl_session(getattr(getattr(self._client, "_endpoint", None), "http_session", None),
                                   self._direct_base, connect_timeout, read_timeout)
        self._signer = SigV4(access_key_id, secret_access_key, session_token, region)
        self._stream_client_lock = threading.Lock()
        self._stream_client_instance = None
        self._resent_lock = threading.Lock()
        self._resent_by_sdk = 0

    def _stream_client(self):
        """The client for streamed bodies: one attempt, no payload pre-read.

        A retry would rewind the body with ``seek(0)`` (the start of the caller's file, not of the
        part) or fail half-way on a non-seekable stream, and SigV4 payload signing over http would
        read the whole body before sending it. So: no retries (a failure is a `TransientError`,
        the engine re-reads the part) and UNSIGNED-PAYLOAD (the body is still covered by the MD5
        computed while it is sent, checked against the returned ETag).
        """
        with self._stream_client_lock:
            if self._stream_client_instance is None:
                self._stream_client_instance = _new_client(
                    "s3",
                    config=Config(
                        **self._config_kwargs,
                        s3={"addressing_style": self._addressing_style, "payload_signing_enabled": False},
                        retries={"mode": "standard", "total_max_attempts": 1},
                    ),
                    **self._client_kwargs,
                )
                self._paced(self._stream_client_instance)
            return self._stream_client_instance

    @property
    def bodies_resent_by_sdk(self) -> int:
        """PUT and UploadPart requests botocore sent again on its own (throttling, 5xx, a dropped
        connection) since this store was made: their bytes crossed the network again. The engine's
        own retries are counted by the engine (`ObjectOutcome.resent`)."""
        with self._resent_lock:
            return self._resent_by_sdk

    def _count_sdk_retries(self, response: Mapping[str, Any] | None) -> None:
        retries = ((response or {}).get("ResponseMetadata") or {}).get("RetryAttempts") or 0
        if retries:
            with self._resent_lock:
                self._resent_by_sdk += retries

    def probe_client(self, *, addressing_style: str | None = None, verify_tls: bool | None = None,
                     checksums: bool = False):
        """A boto3 client for this store's endpoint and credentials, one attempt per request, for
        `connectors.s3_probe` only: it must see each answer as the server gave it (no retry hides a
        refusal), try the other addressing style or certificate check, and, with `checksums`, send
        the `x-amz-checksum-*` headers boto3 sends by default (`when_supported`)."""
        kwargs = dict(self._client_kwargs)
        if verify_tls is not None:
            kwargs["verify"] = verify_tls
        config = dict(self._config_kwargs)
        if checksums:
            config["request_checksum_calculation"] = "when_supported"
        return _new_client(
            "s3",
            config=Config(**config, s3={"addressing_style": addressing_style or self._addressing_style},
                          retries={"mode": "standard", "total_max_attempts": 1}),
            **kwargs,
        )

    def _paced(self, client) -> None:
        """Ask the pacer before each HTTP attempt of `client` and tell it how each one ended: at
        botocore's send, below its retry loop, so a retried request is paced and counted again."""
        events = client.meta.events
        events.register("before-send.s3", self._request_starts)
        events.register("response-received.s3", self._request_ended)

    def _request_starts(self, request, **_: Any) -> None:
        # Returns None: botocore then sends the request itself.
        self.pacer.request_starts("put" if request.method in ("PUT", "POST", "DELETE") else "get")

    def _request_ended(self, response_dict: Mapping[str, Any] | None = None,
                       parsed_response: Mapping[str, Any] | None = None, **_: Any) -> None:
        throttled = None
        if response_dict is not None:
            status = response_dict.get("status_code")
            code = str(((parsed_response or {}).get("Error") or {}).get("Code") or "")
            if status in (429, 503) or (code in _THROTTLED and not code.isdigit()):
                throttled = f"{code or 'throttled'} (HTTP {status})"
        self.pacer.request_ended(throttled)

    def close(self) -> None:
        """Close the HTTP connections of both clients and of the direct requests, once the looks
        at listed objects still running have ended (a listing stopped by an error leaves some:
        their libcurl handles cannot be closed under them)."""
        if self._details_pool is not None:
            self._details_pool.shutdown(wait=True, cancel_futures=True)
        if self._curl is not None:
            self._curl.close()
        for client in (self._client, self._stream_client_instance):
            if client is not None:
                try:
                    client.close()
                except Exception:  # closing is best effort; nothing useful to report
                    pass

    def __enter__(self) -> "S3Store":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ---- bucket ---------------------------------------------------------------------------

    def ensure_bucket(self) -> bool:
        """Create the bucket if it does not exist (the lab and tests; production buckets pre-exist).

        Returns True when it was created now, False when it was there already.
        """
        try:
            self._client.head_bucket(Bucket=self.bucket)
            return False
        except ClientError as exc:
            if _code(exc) not in ("404", "NoSuchBucket", "NotFound"):
                raise self._translate(exc, "") from exc
        except BotoCoreError as exc:
            raise self._translate(exc, "") from exc
        params: dict[str, Any] = {"Bucket": self.bucket}
        region = self._client.meta.region_name
        if region and region != "us-east-1":
            params["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            self._client.create_bucket(**params)
            return True
        except ClientError as exc:
            if _code(exc) not in ("BucketAlreadyOwnedByYou",):
                raise self._translate(exc, "") from exc
            return False
        except BotoCoreError as exc:
            raise self._translate(exc, "") from exc

    # ---- ObjectSource ---------------------------------------------------------------------

    def _pages(self, operation: str, prefix: str) -> Iterator[dict]:
        """The pages of a paginated listing under `prefix`, one request at a time, errors mapped."""
        pages = self._call(
            lambda: iter(self._client.get_paginator(operation).paginate(
                Bucket=self.bucket, Prefix=prefix, PaginationConfig={"PageSize": self.page_size},
            )),
            prefix,
        )
        while True:
            page = self._call(lambda: next(pages, None), prefix)
            if page is None:
                return
            yield page

    def list(self, prefix: str = "", *, details: bool | None = None) -> Iterator[ObjectMeta]:
        """Yield every object under `prefix` in key order, one ListObjectsV2 page at a time.

        Listings carry size, ETag, last-modified and storage class; content headers, metadata and
        tags are left empty (a `head` fills them), unless the store reads a source
        (`source_details`): then each listed object is also asked for with HEAD and
        GetObjectTagging (up to `_details_at_once` at a time, the page's order kept), so that
        everything it is gets carried. An object deleted between the page and its HEAD is left
        out (the listing would not hold it a moment later), logged. `details` overrides
        `source_details` for this listing.
        """
        for page in self._pages("list_objects_v2", prefix):
            listed = []
            for item in page.get("Contents", ()):
                etag = _unquote(item.get("ETag"))
                listed.append(ObjectMeta(
                    key=item["Key"],
                    size=item["Size"],
                    etag=etag,
                    content_md5=self._md5_from_etag(etag),
                    last_modified=item.get("LastModified"),
                    tier=item.get("StorageClass") or "STANDARD",
                ))
            if (self.source_details if details is None else details) and listed:
                if self._details_pool is None:
                    self._details_pool = ThreadPoolExecutor(self._details_at_once, thread_name_prefix="s3-details")
                # Each object as soon as it and those before it are looked at: the copy of a page's
                # first objects starts while the rest of the page is still being asked for.
                yield from (m for m in self._details_pool.map(self._details, listed) if m is not None)
            else:
                yield from listed

    def _details(self, listed: ObjectMeta) -> ObjectMeta | None:
        """The listed object with its content headers, metadata and tags (None: deleted since)."""
        try:
            full = self.head(listed.key)
            tags = self.tags(listed.key)
        except NotFound:
            log.info("%s: %r was listed, then deleted before it was looked at; left out", self.label, listed.key)
            return None
        except AuthError as exc:
            raise AuthError(f"{exc}; exitplan reads each object's metadata and tags of an S3 source (HEAD and "
                            "GetObjectTagging: s3:GetObject and s3:GetObjectTagging)", key=listed.key) from None
        return replace(full, tags=tags)

    def head(self, key: str) -> ObjectMeta:
        """Full metadata of `key`: size, ETag, storage class, content headers and user metadata."""
        # No VersionId: moto answers `x-amz-version-id: null` and a HEAD with it fails (LAB-NOTES).
        resp = self._head(key, {"Bucket": self.bucket, "Key": key})
        return self._meta_from_head(key, resp)

    def _head(self, key: str, params: dict[str, Any]) -> Mapping[str, Any]:
        try:
            if self._direct_ok():
                return self._direct_head(key, params.get("IfMatch"))
            return self._call(lambda: self._client.head_object(**params), key)
        except BucketNotFound:
            raise
        except NotFound:
            # A HEAD error has no body, so a missing bucket looks like a missing key: ask once,
            # only on this (rare) path, so that the message names the real problem.
            try:
                self._client.head_bucket(Bucket=self.bucket)
            except ClientError as exc:
                if _code(exc) in ("404", "NoSuchBucket", "NotFound"):
                    raise self._translate(_no_such_bucket(exc), key) from None
            except BotoCoreError:
                pass
            raise

    def read_range(self, key: str, start: int, end: int, *, if_match: str | None = None) -> bytes:
        """Bytes ``start .. end-1`` of `key`, pinned to ETag `if_match` when given.

        `SourceChanged` if the ETag is stale; `InvalidRequest` for a range outside the object;
        `TransientError` if the body is cut short.
        """
        if start < 0 or end < start:
            raise InvalidRequest(f"{self.label}: invalid range {start}-{end} for {key!r}", key=key)
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if if_match is not None:
            params["IfMatch"] = _quote(if_match)
        if start == end:
            # An empty range has no HTTP Range form (and any range on a 0-byte object is
            # unsatisfiable): prove the object exists at that ETag and that the offset is inside.
            resp = self._head(key, params)
            self._check_bounds(key, start, end, resp["ContentLength"])
            return b""
        self.pacer.body_bytes(end - start)
        if end - start <= DIRECT_MAX_BYTES and self._direct_ok():
            return self._direct_get(key, start, end, if_match)
        resp = self._call(lambda: self._client.get_object(Range=f"bytes={start}-{end - 1}", **params), key)
        body = resp["Body"]
        try:
            total = _total_from_content_range(resp.get("ContentRange"))
            if total is not None:
                self._check_bounds(key, start, end, total)
            data = self._call(body.read, key)
        finally:
            body.close()
        return exact_range(data, start, end, self.label, key)

    # ---- ObjectSink -----------------------------------------------------------------------

    def put(self, key: str, body: PartBody, size: int, meta: WriteMeta, md5: bytes | None) -> str:
        """Write `key` in one PUT; return its ETag.

        With `md5`, Content-MD5 is sent and the returned ETag must equal it. A file-like `body`
        without `md5` is hashed as it is sent and the returned ETag must equal that digest.
        Raises `IntegrityError` on a mismatch.
        """
        if self._direct_fits(body, size, md5):
            return self._direct_put(key, body, size, _write_params(meta, self.label, key), md5)
        params = {"Bucket": self.bucket, "Key": key, **_write_params(meta, self.label, key)}
        return self._send_body("put_object", params, key, body, size, md5, f"{key!r}")

    def _direct_possible(self) -> bool:
        """Whether direct requests can be sent here: the bucket URL is known without botocore's
        resolver, and botocore's HTTP session was found with no proxy for the endpoint (`exitplan
        probe` tries them on that alone)."""
        return self._direct_base is not None and self._curl is not None

    def _object_url(self, key: str) -> str:
        """The URL of object `key` for a direct request (path-encoded as botocore encodes it)."""
        return f"{self._direct_base}/{quote(key, safe='/~')}"

    def _direct_ok(self) -> bool:
        """Whether this store sends direct requests: possible here, and its profile allows them
        (`direct_requests`)."""
        return self.behaviour.direct_requests and self._direct_possible()

    def _direct_fits(self, body: PartBody, size: int, md5: bytes | None) -> bool:
        """Whether PutObject may go as a direct request: a small body in memory with its MD5, no
        bandwidth limit to hand it over in chunks, no flexible checksum headers to add (botocore
        computes those), a bucket URL known without botocore's endpoint resolver."""
        return (self._direct_ok() and md5 is not None
                and 0 <= size <= DIRECT_MAX_BYTES and isinstance(body, (bytes, bytearray, memoryview))
                and memoryview(body).nbytes == size and not self.pacer.paces_bytes
                and not self.behaviour.flexible_checksums)

    def _direct_send(self, method: str, url: str, key: str, headers: dict[str, str], *, body: Any = None,
                     limit: int | None = None) -> Answer:
        """One attempt of a direct request: paced, signed as botocore signs for this client's
        configuration (`signing.SigV4`, UNSIGNED-PAYLOAD), sent with libcurl (at most `limit` bytes
        of the answer kept); a connection failure translated as botocore's would be. The caller
        reads the answer and tells the pacer how it ended (`_direct_refused` for an error)."""
        self.pacer.request_starts("put" if method == "PUT" else "get")
        try:
            return self._curl.request(method, url, self._signer.sign(method, url, headers), body=body, limit=limit)
        except CurlFailure as exc:
            self.pacer.request_ended(None)
            raise self._translate(exc, key) from exc

    def _direct_refused(self, answer: Answer, operation: str, key: str) -> ConnectorError:
        """The error of a direct request's answer other than success, as the client would raise it
        (its XML parsed, the pacer told of throttling)."""
        error = {"Error": _error_of(answer.body), "ResponseMetadata": {"HTTPStatusCode": answer.status}}
        self._request_ended({"status_code": answer.status}, error)
        return self._translate(ClientError(error, operation), key)

    def _direct_get(self, key: str, start: int, end: int, if_match: str | None) -> bytes:
        """GetObject of a range of at most `DIRECT_MAX_BYTES` as one request, as `_direct_put`
        sends a PutObject (SigV4 as botocore signs, libcurl, its standard retries, the client's error
        translation). At most one byte past the range is read (64 KiB of an error answer), so a
        server that ignored the Range cannot make it hold a whole object."""
        url = self._object_url(key)
        headers = {"Range": f"bytes={start}-{end - 1}"}
        if if_match is not None:
            headers["If-Match"] = _quote(if_match)

        def send() -> bytes:
            answer = self._direct_send("GET", url, key, headers, limit=max(end - start + 1, ERROR_BODY))
            status = answer.status
            if status not in (200, 206):
                raise self._direct_refused(answer, "GetObject", key)
            self.pacer.request_ended(None)
            total = (_total_from_content_range(answer.headers.get("Content-Range")) if status == 206
                     else int(answer.headers.get("Content-Length") or 0))
            if total is not None:
                self._check_bounds(key, start, end, total)
            if status == 200 and start != 0:
                raise TransientError(f"{self.label}: {key!r}: the server answered the whole object to a "
                                     f"range request ({start}-{end})", key=key)
            return exact_range(answer.body, start, end, self.label, key)

        return attempts(send, tries=self._max_attempts, backoff=_standard_backoff)

    def _direct_head(self, key: str, if_match: str | None) -> dict[str, Any]:
        """HeadObject as one request (a source's per-object look, beside GetObjectTagging): what
        the client's `head_object` answers, the fields `_meta_from_head` reads, from the answer's
        headers as botocore parses them; its errors (a HEAD's have no body: by status) translated
        as the client's."""
        url = self._object_url(key)
        headers = {} if if_match is None else {"If-Match": _quote(if_match)}

        def send() -> dict[str, Any]:
            answer = self._direct_send("HEAD", url, key, headers, limit=0)
            if answer.status != 200:
                raise self._direct_refused(answer, "HeadObject", key)
            self.pacer.request_ended(None)
            return _head_fields(answer.headers, self.label, key)

        return attempts(send, tries=self._max_attempts, backoff=_standard_backoff)

    def _direct_tags(self, key: str) -> dict[str, str]:
        """GetObjectTagging as one request, its XML read as botocore reads it."""
        url = self._object_url(key) + "?tagging"

        def send() -> dict[str, str]:
            answer = self._direct_send("GET", url, key, {}, limit=TAGGING_BODY)
            if answer.status != 200:
                raise self._direct_refused(answer, "GetObjectTagging", key)
            self.pacer.request_ended(None)
            if answer.cut:
                raise TransientError(f"{self.label}: {key!r}: the tag set answered is over {TAGGING_BODY} bytes, "
                                     "more than S3's 10 tags can take", key=key)
            return _tag_set(answer.body, self.label, key)

        return attempts(send, tries=self._max_attempts, backoff=_standard_backoff)

    def _direct_put(self, key: str, body: bytes | bytearray | memoryview, size: int, params: dict[str, Any],
                    md5: bytes) -> str:
        """PutObject as one request: the headers botocore sends for `params` (Content-MD5 among them;
        tests/unit/test_direct_requests.py compares the two), signed as botocore's SigV4 signer signs
        with the client's configuration (UNSIGNED-PAYLOAD: the Content-MD5 covers the body), sent
        with libcurl, paced per attempt, and retried as botocore's standard mode retries (throttling, 5xx, a
        dropped connection: `max_attempts` in all, backoff up to 20 s), each retry counted in
        `bodies_resent_by_sdk`. Errors are translated as the client's are; the ETag is checked."""
        url = self._object_url(key)
        headers = _headers_of(params)
        headers["Content-MD5"] = base64.b64encode(md5).decode()
        headers["Content-Length"] = str(size)

        def send() -> str:
            answer = self._direct_send("PUT", url, key, headers, body=body, limit=ERROR_BODY)
            if answer.status != 200:
                raise self._direct_refused(answer, "PutObject", key)
            self.pacer.request_ended(None)
            return _unquote(answer.headers.get("ETag"))

        def resent(_exc: ConnectorError) -> None:
            with self._resent_lock:
                self._resent_by_sdk += 1

        etag = attempts(send, tries=self._max_attempts, backoff=_standard_backoff, on_retry=resent)
        if self.etag_is_md5:
            checked_etag(etag, md5, what=f"{self.label}: {key!r}", key=key)
        return etag

    def open_multipart(self, key: str, meta: WriteMeta) -> "S3MultipartUpload":
        """Start a multipart upload of `key` with its content headers and metadata."""
        params = {"Bucket": self.bucket, "Key": key, **_write_params(meta, self.label, key)}
        resp = self._call(lambda: self._client.create_multipart_upload(**params), key)
        return S3MultipartUpload(self, key, resp["UploadId"])

    def resume_multipart(self, key: str, upload_id: str) -> "S3MultipartUpload":
        """Re-attach to upload `upload_id` of `key`; `NotFound` if the server no longer holds it.

        Without ListParts (`behaviour.list_parts` False) nothing can tell whether the upload is
        still there: the handle is returned unchecked (abort it, or leave it; never continue it).
        """
        if not self.behaviour.list_parts:
            return S3MultipartUpload(self, key, upload_id)
        self._call(
            lambda: self._client.list_parts(Bucket=self.bucket, Key=key, UploadId=upload_id, MaxParts=1),
            key, upload_id=upload_id,
        )
        return S3MultipartUpload(self, key, upload_id)

    def list_multipart_uploads(self, prefix: str = "") -> Iterator[PendingUpload]:
        """Yield the multipart uploads still open under `prefix` (key order), page by page;
        `Unsupported` where the provider does not answer ListMultipartUploads."""
        if not self.behaviour.list_uploads:
            raise Unsupported(f"{self.label}: the provider does not list multipart uploads (ListMultipartUploads)",
                              key=prefix, operation="ListMultipartUploads")
        for page in self._pages("list_multipart_uploads", prefix):
            for item in page.get("Uploads", ()):
                yield PendingUpload(item["Key"], item["UploadId"], item.get("Initiated"))

    def tags(self, key: str) -> dict[str, str]:
        """The tags of `key` (GetObjectTagging); `NotFound` when it is gone."""
        if self._direct_ok():
            return self._direct_tags(key)
        resp = self._call(lambda: self._client.get_object_tagging(Bucket=self.bucket, Key=key), key)
        return {t["Key"]: t["Value"] for t in resp.get("TagSet", ())}

    def delete(self, key: str) -> None:
        """Remove `key`; a missing key is not an error (a missing bucket is `NotFound`)."""
        try:
            self._call(lambda: self._client.delete_object(Bucket=self.bucket, Key=key), key)
        except BucketNotFound:
            raise
        except NotFound:
            pass

    # ---- internals ------------------------------------------------------------------------

    def _md5_from_etag(self, etag: str) -> bytes | None:
        # A single-PUT object's ETag is the MD5 of its bytes where the provider says so.
        if self.etag_is_md5 and _MD5_HEX.match(etag):
            return bytes.fromhex(etag)
        return None

    def _meta_from_head(self, key: str, resp: Mapping[str, Any]) -> ObjectMeta:
        etag = _unquote(resp.get("ETag"))
        return ObjectMeta(
            key=key,
            size=resp["ContentLength"],
            etag=etag,
            content_md5=self._md5_from_etag(etag),
            last_modified=resp.get("LastModified"),
            tier=resp.get("StorageClass") or "STANDARD",
            content=ContentSettings(
                content_type=resp.get("ContentType"),
                content_encoding=resp.get("ContentEncoding"),
                cache_control=resp.get("CacheControl"),
                content_disposition=resp.get("ContentDisposition"),
                content_language=resp.get("ContentLanguage"),
            ),
            metadata=dict(resp.get("Metadata") or {}),
        )

    def _check_bounds(self, key: str, start: int, end: int, size: int) -> None:
        if end > size:
            raise InvalidRequest(f"{self.label}: range {start}-{end} is outside {key!r} ({size} bytes)", key=key)

    def _send_body(self, operation: str, params: dict[str, Any], key: str, body: PartBody, size: int,
                   md5: bytes | None, what: str) -> str:
        """PutObject / UploadPart with a body in memory or streamed; returns the checked ETag."""
        if size < 0:
            raise InvalidRequest(f"{self.label}: negative size for {what}", key=key)
        params = dict(params, ContentLength=size)
        if md5 is not None:
            params["ContentMD5"] = base64.b64encode(md5).decode()
        reader: _HashingReader | None = None
        if isinstance(body, (bytes, bytearray, memoryview)):
            view = memoryview(body)
            if view.nbytes != size:
                raise InvalidRequest(f"{self.label}: {what} body is {view.nbytes} bytes, {size} announced", key=key)
            # bytes/bytearray go as they are; a memoryview (a slice of the engine's buffer) is
            # streamed from in place: a copy would double the part outside the memory budget.
            # Under a bandwidth limit every body goes through a reader that asks for each chunk.
            whole = isinstance(body, (bytes, bytearray)) and not self.pacer.paces_bytes
            params["Body"] = body if whole else _ViewReader(view, self.pacer)
            client = self._client
        else:
            reader = _HashingReader(body, size, self.pacer)
            params["Body"] = reader
            client = self._stream_client()
        # A stream that ends early surfaces as botocore's HTTPClientError wrapping _ShortBody:
        # a TransientError whose message carries the reason.
        try:
            resp = self._call(lambda: getattr(client, operation)(**params), key)
        except ConnectorError as exc:
            if isinstance(exc.__cause__, ClientError):
                self._count_sdk_retries(exc.__cause__.response)
            raise
        self._count_sdk_retries(resp)
        etag = _unquote(resp.get("ETag"))
        sent = md5
        if reader is not None:
            if not reader.exhausted:
                raise TransientError(f"{self.label}: {what}: the body was not fully sent", key=key)
            sent = reader.md5.digest()
            if md5 is not None and sent != md5:
                raise IntegrityError(f"{self.label}: {what}: the streamed bytes do not match the given MD5", key=key)
        if sent is not None and self.etag_is_md5:
            checked_etag(etag, sent, what=f"{self.label}: {what}", key=key)
        return etag

    def _call(self, fn: Callable[[], T], key: str, *, upload_id: str | None = None) -> T:
        try:
            return fn()
        except ConnectorError:
            raise
        except (ClientError, BotoCoreError) as exc:
            raise self._translate(exc, key, upload_id=upload_id) from exc
        except _ShortBody as exc:
            raise TransientError(f"{self.label}: {key!r}: {exc}", key=key) from exc
        except OSError as exc:
            raise TransientError(f"{self.label}: {key!r}: {type(exc).__name__}: {exc}", key=key) from exc

    def _translate(self, exc: Exception, key: str, *, upload_id: str | None = None) -> ConnectorError:
        what = f"{self.label}: {key!r}" if key else self.label
        if isinstance(exc, ClientError):
            code = _code(exc)
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            message = exc.response.get("Error", {}).get("Message") or ""
            reason = f"{code}{f' (HTTP {status})' if status and str(status) != code else ''}"
            if code == "NoSuchBucket":
                return BucketNotFound(
                    f"{self.label}: bucket {self.bucket!r} does not exist at {self.endpoint_url}; create it or "
                    f"check the bucket name and endpoint", key=key)
            if code == "NoSuchUpload":
                upload = f"multipart upload {upload_id}" if upload_id else "the multipart upload"
                return NotFound(f"{what}: {upload} is gone (completed, aborted or expired)", key=key)
            if code in _UNSUPPORTED or status in (405, 501):
                operation = getattr(exc, "operation_name", None) or "this request"
                return Unsupported(f"{what}: the server does not support {operation} ({reason})", key=key,
                                   operation=getattr(exc, "operation_name", None))
            if code in _NOT_FOUND or status == 404:
                return NotFound(f"{what}: no such object ({reason})", key=key)
            if code in _CHANGED or status == 412:
                return SourceChanged(f"{what} changed (If-Match failed: {reason})", key=key)
            if code in _DIGEST:
                return IntegrityError(f"{what}: the server rejected the body's digest ({reason}: {message})", key=key)
            if code in _THROTTLED or status in (429, 503):
                return Throttled(f"{what}: the server asks to slow down ({reason})", key=key)
            if code in _AUTH or status in (401, 403):
                return AuthError(f"{what}: access refused ({reason}); check the access key, secret and the "
                                 f"bucket policy", key=key)
            if code in _TRANSIENT or (status is not None and status >= 500):
                return TransientError(f"{what}: server error {reason}", key=key)
            if code in _INVALID or (status is not None and 400 <= status < 500):
                return InvalidRequest(f"{what}: request refused: {reason}: {message}", key=key)
            return TransientError(f"{what}: {reason}: {message}", key=key)
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            return AuthError(f"{self.label}: no usable credentials ({exc})", key=key)
        if (isinstance(exc, SSLError) and "CERTIFICATE_VERIFY_FAILED" in str(exc)
                or isinstance(exc, CurlFailure) and exc.certificate):
            return ConfigError(f"{self.label}: the TLS certificate of {self.endpoint_url} cannot be verified ({exc})",
                               key=key)
        if isinstance(exc, ParamValidationError):
            return InvalidRequest(f"{what}: {exc}", key=key)
        if isinstance(exc, (BotoConnectionError, CurlFailure)):
            return TransientError(f"{what}: {type(exc).__name__}: {exc}", key=key)
        # The rest of botocore's errors raised during a request are read/stream failures
        # (IncompleteReadError, ResponseStreamingError, UnseekableStreamError, …): try again.
        return TransientError(f"{what}: {type(exc).__name__}: {exc}", key=key)


class S3MultipartUpload:
    """One open multipart upload on an `S3Store` (see `connectors.base.MultipartUpload`)."""

    def __init__(self, store: S3Store, key: str, upload_id: str):
        self.store = store
        self.key = key
        self.upload_id = upload_id

    def upload_part(self, number: int, body: PartBody, size: int, md5: bytes | None,
                    offset: int | None = None) -> PartReceipt:
        """Upload part `number` (1-based); the returned ETag is checked against `md5` (or the streamed MD5)."""
        limits = self.store.limits
        if not 1 <= number <= limits.max_parts:
            raise InvalidRequest(f"{self.store.label}: part number {number} outside 1..{limits.max_parts}",
                                 key=self.key)
        if size > limits.max_part_size:
            raise InvalidRequest(f"{self.store.label}: part {number} of {size} bytes exceeds the provider's "
                                 f"maximum of {limits.max_part_size}", key=self.key)
        params = {"Bucket": self.store.bucket, "Key": self.key, "UploadId": self.upload_id, "PartNumber": number}
        etag = self.store._send_body("upload_part", params, self.key, body, size, md5,
                                     f"part {number} of {self.key!r}")
        return PartReceipt(number, etag, size)

    def list_parts(self) -> list[PartReceipt]:
        """The parts the server holds, in part-number order (all ListParts pages); `Unsupported`
        where the provider does not answer ListParts."""
        if not self.store.behaviour.list_parts:
            raise Unsupported(f"{self.store.label}: the provider does not list the parts of an upload (ListParts)",
                              key=self.key, operation="ListParts")
        client = self.store._client
        pages = self.store._call(
            lambda: iter(client.get_paginator("list_parts").paginate(
                Bucket=self.store.bucket, Key=self.key, UploadId=self.upload_id,
                PaginationConfig={"PageSize": self.store.page_size},
            )),
            self.key, upload_id=self.upload_id,
        )
        receipts: list[PartReceipt] = []
        while True:
            page = self.store._call(lambda: next(pages, None), self.key, upload_id=self.upload_id)
            if page is None:
                break
            receipts.extend(PartReceipt(p["PartNumber"], _unquote(p["ETag"]), p["Size"]) for p in page.get("Parts", ()))
        return sorted(receipts, key=lambda r: r.number)

    def complete(self, parts: Sequence[PartReceipt]) -> str:
        """Assemble the object; return its ETag, checked against the parts' MD5s when ETags are MD5s."""
        if not parts:
            raise InvalidRequest(f"{self.store.label}: cannot complete {self.key!r} without parts", key=self.key)
        # S3 refuses this at completion (EntityTooSmall); some compatible servers accept it, so the
        # rule of the provider's profile is held here, whatever the server does.
        min_size = self.store.limits.min_part_size
        for part in parts[:-1]:
            if part.size < min_size:
                raise InvalidRequest(f"{self.store.label}: part {part.number} of {self.key!r} is {part.size} bytes, "
                                     f"below the provider's minimum part size of {min_size} (only the last part "
                                     "may be smaller)", key=self.key)
        resp = self.store._call(
            lambda: self.store._client.complete_multipart_upload(
                Bucket=self.store.bucket, Key=self.key, UploadId=self.upload_id,
                MultipartUpload={"Parts": [{"PartNumber": p.number, "ETag": _quote(p.etag)} for p in parts]},
            ),
            self.key, upload_id=self.upload_id,
        )
        etag = _unquote(resp.get("ETag"))
        if self.store.etag_is_md5:
            checked_multipart_etag(etag, parts, what=f"{self.store.label}: {self.key!r}", key=self.key)
        else:
            self._check_completed_size(sum(p.size for p in parts))
        return etag

    def _check_completed_size(self, expected: int) -> None:
        """Where ETags are opaque, the completed object's size is what the parts add up to;
        `IntegrityError` otherwise (the object then exists at the destination, wrong)."""
        size = self.store.head(self.key).size
        if size != expected:
            raise IntegrityError(f"{self.store.label}: {self.key!r} completed with {size:,} bytes, expected "
                                 f"{expected:,} from the parts sent", key=self.key)

    def abort(self) -> None:
        """Discard the upload and its parts; an upload already gone is not an error. `Unsupported`
        (nothing sent) where the provider does not answer AbortMultipartUpload."""
        if not self.store.behaviour.abort:
            raise Unsupported(f"{self.store.label}: the provider cannot abort the multipart upload {self.upload_id} "
                              f"of {self.key!r} (AbortMultipartUpload)", key=self.key, operation="AbortMultipartUpload")
        try:
            self.store._call(
                lambda: self.store._client.abort_multipart_upload(
                    Bucket=self.store.bucket, Key=self.key, UploadId=self.upload_id,
                ),
                self.key, upload_id=self.upload_id,
            )
        except BucketNotFound:
            raise
        except NotFound:
            pass


class _S3Loader(botocore.loaders.Loader):
    """botocore's data loader for a session that makes S3 clients only. Before loading a model,
    botocore checks the service's name against every service it ships, by listing each one's
    directory (~1,400 directory listings per kind of model: the service, its endpoint rules, its
    paginators), 27-30 ms of CPU at a process's first client; here the list holds S3 alone, found
    as botocore finds it (its own data and `AWS_DATA_PATH`)."""

    def list_available_services(self, type_name: str) -> list[str]:
        try:
            self.list_api_versions("s3", type_name)
        except DataNotFoundError:
            return []
        return ["s3"]


def _s3_session() -> botocore.session.Session:
    session = botocore.session.Session()
    data_path = session.get_config_variable("data_path")  # AWS_DATA_PATH, as botocore's create_loader reads it
    extra = [os.path.expanduser(os.path.expandvars(p)) for p in data_path.split(os.pathsep)] if data_path else None
    session.register_component("data_loader", _S3Loader(extra_search_paths=extra) if extra else _S3Loader())
    return session


_shared_session: botocore.session.Session | None = None
_shared_session_lock = threading.Lock()


def _new_client(service: str, **kwargs: Any):
    """A botocore client from one process-wide session (credentials are per client); `service`
    is "s3", the only service that session's loader knows (`_S3Loader`). botocore's own session,
    not boto3's: boto3 adds its resources and transfer manager, which exitplan does not use, and
    their imports (16 ms of every run's start-up).

    A fresh session per store would load and parse the S3 service model again each time (tens of
    milliseconds); sessions are not safe for concurrent client creation, hence the lock.
    """
    global _shared_session
    with _shared_session_lock:
        if _shared_session is None:
            _shared_session = _s3_session()
        return _shared_session.create_client(service, **kwargs)


def _code(exc: ClientError) -> str:
    error = exc.response.get("Error", {})
    return str(error.get("Code") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or "")


def _no_such_bucket(exc: ClientError) -> ClientError:
    response = dict(exc.response)
    response["Error"] = dict(response.get("Error", {}), Code="NoSuchBucket")
    return ClientError(response, exc.operation_name)


def _total_from_content_range(content_range: str | None) -> int | None:
    # "bytes START-END/TOTAL"; TOTAL may be "*" when unknown.
    if not content_range or "/" not in content_range:
        return None
    total = content_range.rsplit("/", 1)[1]
    return int(total) if total.isdigit() else None


def _bucket_url(endpoint_url: str | None, bucket: str, addressing_style: str) -> str | None:
    """The bucket's URL as botocore's requests name it under `addressing_style`, or None where
    only botocore's endpoint resolver knows it (no endpoint: AWS itself)."""
    if not endpoint_url:
        return None
    parts = urlsplit(endpoint_url)
    if parts.query or parts.fragment or not parts.hostname:
        return None
    path = parts.path.rstrip("/")
    if addressing_style == "path":
        return f"{parts.scheme}://{parts.netloc}{path}/{bucket}"
    return f"{parts.scheme}://{bucket}.{parts.netloc}{path}"


def _curl_session(http: Any, base: str | None, connect_timeout: float, read_timeout: float) -> CurlSession | None:
    """The libcurl session of the direct requests, with botocore's HTTP session's certificate
    settings (`verify`: False, True for botocore's CA bundle or AWS_CA_BUNDLE's, a bundle's path),
    or None where it cannot stand for that session: none found (a botocore release that moved it),
    a client certificate, a proxy for the bucket's URL (botocore would go through it), or a read
    timeout libcurl would stretch (`keeps_read_timeout`)."""
    verify = getattr(http, "_verify", None)
    proxies = getattr(http, "_proxy_config", None)
    if base is None or verify is None or proxies is None or getattr(http, "_cert_file", None):
        return None
    if not keeps_read_timeout(read_timeout):
        return None
    if proxies.proxy_url_for(base):
        return None
    if verify is False:
        return CurlSession(connect_timeout=connect_timeout, read_timeout=read_timeout, verify=False)
    return CurlSession(connect_timeout=connect_timeout, read_timeout=read_timeout, verify=True,
                       ca_bundle=str(botocore_cert_path(verify)))


# boto3's PutObject parameters (those `_write_params` gives) as the HTTP headers botocore sends.
_HEADER_OF = {"ContentType": "Content-Type", "ContentEncoding": "Content-Encoding", "CacheControl": "Cache-Control",
              "ContentDisposition": "Content-Disposition", "ContentLanguage": "Content-Language",
              "StorageClass": "x-amz-storage-class", "Tagging": "x-amz-tagging"}


def _headers_of(params: Mapping[str, Any]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, value in params.items():
        if name == "Metadata":
            headers.update((f"x-amz-meta-{k}", v) for k, v in value.items())
        else:
            headers[_HEADER_OF[name]] = value
    return headers


# A GetObjectTagging answer's body at most: 10 tags of a 128-character key and a 256-character
# value are under 8 KiB of XML even with every character escaped.
TAGGING_BODY = 64 * 1024
# What HeadObject's answer headers become in the client's response, as `_meta_from_head` reads it.
_HEAD_HEADERS = (("ETag", "etag"), ("StorageClass", "x-amz-storage-class"), ("ContentType", "content-type"),
                 ("ContentEncoding", "content-encoding"), ("CacheControl", "cache-control"),
                 ("ContentDisposition", "content-disposition"), ("ContentLanguage", "content-language"))
_META_PREFIX = "x-amz-meta-"


def _head_fields(headers: Mapping[str, str], label: str, key: str) -> dict[str, Any]:
    """HeadObject's answer `headers` as the client's response holds them (the fields `_meta_from_head`
    reads): sizes as integers, Last-Modified as an aware datetime, user metadata by name after
    the `x-amz-meta-` prefix."""
    try:
        fields: dict[str, Any] = {"ContentLength": int(headers["content-length"])}
        if "last-modified" in headers:
            fields["LastModified"] = parsedate_to_datetime(headers["last-modified"])
    except (KeyError, ValueError, TypeError) as exc:
        raise TransientError(f"{label}: {key!r}: the HEAD answer's Content-Length or Last-Modified cannot be read "
                             f"({exc})", key=key) from None
    for field, header in _HEAD_HEADERS:
        value = headers.get(header)
        if value is not None:
            fields[field] = value
    fields["Metadata"] = {name[len(_META_PREFIX):]: value for name, value in headers.items()
                          if name.startswith(_META_PREFIX)}
    return fields


def _tag_set(content: bytes, label: str, key: str) -> dict[str, str]:
    """The tags of a GetObjectTagging answer's XML (any namespace, as botocore reads it)."""
    try:
        root = ElementTree.fromstring(content)
    except ElementTree.ParseError as exc:
        raise TransientError(f"{label}: {key!r}: the tag set answered is not XML ({exc})", key=key) from None
    tags = {}
    for tag in root.iter():
        if tag.tag.rpartition("}")[2] == "Tag":
            fields = {child.tag.rpartition("}")[2]: child.text or "" for child in tag}
            tags[fields.get("Key", "")] = fields.get("Value", "")
    return tags


def _error_of(content: bytes | None) -> dict[str, str]:
    """Code and Message of an S3 error answer's XML body ({} when it has none, a HEAD's)."""
    try:
        root = ElementTree.fromstring(content) if content else None
    except ElementTree.ParseError:
        root = None
    if root is None:
        return {}
    return {"Code": root.findtext("Code") or "", "Message": root.findtext("Message") or ""}


def _standard_backoff(retry: int) -> float:
    # botocore's standard retry mode: full jitter over 2^n seconds, at most 20.
    return random.random() * min(20.0, 2.0 ** retry)


def _write_params(meta: WriteMeta, label: str, key: str) -> dict[str, Any]:
    """Content headers and user metadata as boto3 parameters (metadata must already be ASCII)."""
    params: dict[str, Any] = {}
    c = meta.content
    for name, value in (
        ("ContentType", c.content_type),
        ("ContentEncoding", c.content_encoding),
        ("CacheControl", c.cache_control),
        ("ContentDisposition", c.content_disposition),
        ("ContentLanguage", c.content_language),
    ):
        if value is not None:
            params[name] = value
    metadata = dict(meta.metadata)
    for name, value in metadata.items():
        if not (name.isascii() and value.isascii()):
            # S3 metadata travels in HTTP headers; the caller encodes non-ASCII values (FORMAT.md).
            raise InvalidRequest(f"{label}: metadata {name!r} of {key!r} is not ASCII; encode it before writing",
                                 key=key)
    if metadata:
        params["Metadata"] = metadata
    if meta.storage_class:
        params["StorageClass"] = meta.storage_class
    if meta.tags:
        # The `x-amz-tagging` header of PutObject and CreateMultipartUpload: a URL-encoded query.
        params["Tagging"] = urlencode(dict(meta.tags), quote_via=quote)
    return params
