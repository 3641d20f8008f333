"""Signing the direct requests: AWS Signature Version 4 for S3 (`SigV4`) and Azure Storage's
Shared Key (`SharedKey`), each exactly as the SDK signs the same request.

The direct requests (`S3Store._direct_send`, `azure_blob._DirectRequests`) are small GETs and PUTs
sent with libcurl. Signed through the SDKs they went through general request objects first:
botocore's `AWSRequest` (email.message headers, walked three times, the URL split twice, the
signing key derived with four HMACs per request) and azure-core's `HttpRequest` and pipeline
request (the URL parsed again, the x-ms headers sorted with a Python collation function, the key
decoded from base64 per request): 60 and 40 µs of CPU a request on one thread, two to three times
that under a run's contention. These take what a direct request has (a method, a URL, a header
dict), derive once what does not change (the SigV4 signing key per day, the decoded account key,
the order of a set of x-ms header names) and build the same canonical strings.

"The same" is tested, not assumed: tests/unit/test_signing.py signs varied requests (keys with
spaces, unicode and reserved characters, queries, session tokens, conditional headers, listing
parameters) with these and with botocore's `S3SigV4Auth` and azure-storage-blob's
`SharedKeyCredentialPolicy` at the same instant and compares every header byte for byte. Servers
check them too: Azurite checks Shared Key signatures (the contract and integration suites go
through `SharedKey`); the lab's S3 servers accept any signature, so
tests/contract/test_s3_signatures.py runs a moto of its own with its IAM access control on, which
accepts the direct PUTs and reads with the right secret and refuses a wrong one (`exitplan probe`
tries them on a real bucket). What these do not cover goes through the SDK: payload signing (the
direct PUT sends UNSIGNED-PAYLOAD with its Content-MD5, as the store's client is configured to),
Entra ID tokens, SAS (which needs no signature).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from datetime import datetime, timezone
from email.utils import formatdate
from typing import Mapping
from urllib.parse import SplitResult, unquote, urlparse, urlsplit

UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"

# botocore.auth.SIGNED_HEADERS_BLACKLIST: headers a proxy or the HTTP layer may change.
_NOT_SIGNED = frozenset({
    "baggage", "connection", "expect", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
    "traceparent", "tracestate", "trailer", "transfer-encoding", "upgrade", "user-agent", "x-amzn-trace-id",
})
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _host(parts: SplitResult) -> str:
    """The Host value SigV4 signs for a URL split in `parts` (botocore's `_host_from_url`): lower
    case, the port unless it is the scheme's default, no user info."""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if parts.port is not None and parts.port != _DEFAULT_PORTS.get(parts.scheme):
        host = f"{host}:{parts.port}"
    return host


def _canonical_query(query: str) -> str:
    """A URL's query as SigV4 signs it (botocore's `_canonical_query_string_url`: the pairs as
    they are encoded in the URL, sorted)."""
    if not query:
        return ""
    return "&".join(f"{k}={v}" for k, v in sorted(pair.partition("=")[::2] for pair in query.split("&")))


class SigV4:
    """AWS Signature Version 4 for one service, region and set of static credentials, the payload
    unsigned (`X-Amz-Content-SHA256: UNSIGNED-PAYLOAD`). `sign` returns the headers to send."""

    def __init__(self, access_key: str, secret_key: str, token: str | None, region: str, service: str = "s3"):
        self._access_key, self._token = access_key, token
        self._secret = f"AWS4{secret_key}".encode()
        self._region, self._service = region, service
        self._keys: tuple[str, bytes] = ("", b"")  # (day, its signing key): replaced whole, never mutated

    def _signing_key(self, day: str) -> bytes:
        cached_day, key = self._keys
        if cached_day != day:
            key = self._secret
            for part in (day, self._region, self._service, "aws4_request"):
                key = hmac.new(key, part.encode(), hashlib.sha256).digest()
            self._keys = (day, key)
        return key

    def sign(self, method: str, url: str, headers: Mapping[str, str], now: datetime | None = None) -> dict[str, str]:
        """`headers` with X-Amz-Date, X-Amz-Content-SHA256, X-Amz-Security-Token (with a session
        token) and Authorization added, for `method` on `url` at `now` (the current time)."""
        stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%SZ")
        day = stamp[:8]
        out = {k: v for k, v in headers.items()
               if k.lower() not in ("authorization", "x-amz-date", "x-amz-content-sha256", "x-amz-security-token")}
        out["X-Amz-Date"] = stamp
        if self._token:
            out["X-Amz-Security-Token"] = self._token
        out["X-Amz-Content-SHA256"] = UNSIGNED_PAYLOAD
        parts = urlsplit(url)
        signed: dict[str, list[str]] = {}
        for name, value in out.items():
            lname = name.lower()
            if lname not in _NOT_SIGNED:
                signed.setdefault(lname, []).append(" ".join(value.split()))
        if "host" not in signed:
            signed["host"] = [_host(parts)]
        names = sorted(signed)
        signed_names = ";".join(names)
        canonical = "\n".join((
            method.upper(), parts.path, _canonical_query(parts.query),
            "\n".join(f"{n}:{','.join(signed[n])}" for n in names) + "\n",
            signed_names, UNSIGNED_PAYLOAD,
        ))
        scope = f"{day}/{self._region}/{self._service}/aws4_request"
        to_sign = f"AWS4-HMAC-SHA256\n{stamp}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
        signature = hmac.new(self._signing_key(day), to_sign.encode(), hashlib.sha256).hexdigest()
        out["Authorization"] = (f"AWS4-HMAC-SHA256 Credential={self._access_key}/{scope}, "
                                f"SignedHeaders={signed_names}, Signature={signature}")
        return out


# The standard headers Shared Key signs, in order (as the SDK lists them: its "byte_range" is no
# header, so that line is always empty; a range goes in x-ms-range, among the x-ms headers).
_STANDARD = ("content-encoding", "content-language", "content-length", "content-md5", "content-type", "date",
             "if-modified-since", "if-match", "if-none-match", "if-unmodified-since", "byte_range")


class SharedKey:
    """Azure Storage's Shared Key authorisation for one account (the SDK's
    `SharedKeyCredentialPolicy.on_request`). `authorization` returns the Authorization value."""

    def __init__(self, account_name: str, account_key: str):
        self._account = account_name
        self._mac = hmac.new(base64.b64decode(account_key), digestmod=hashlib.sha256)
        self._orders: dict[tuple[str, ...], tuple[str, ...]] = {}  # x-ms header names -> the service's order

    def _order(self, names: tuple[str, ...]) -> tuple[str, ...]:
        order = self._orders.get(names)
        if order is None:
            # The SDK's own collation (imported here: an S3-only run never loads the Azure SDK).
            from azure.storage.blob._shared.authentication import _storage_header_sort

            order = tuple(name for name, _ in _storage_header_sort([(n, "") for n in names]))
            self._orders[names] = order
        return order

    def authorization(self, method: str, url: str, headers: Mapping[str, str]) -> str:
        """The Authorization header of `method` on `url` (its path and query as sent) with `headers`."""
        lower = {name.lower(): value for name, value in headers.items() if value}
        if lower.get("content-length") == "0":
            del lower["content-length"]
        x_ms = {name.lower(): value for name, value in headers.items() if name.startswith("x-ms-")}
        parts = urlparse(url)
        query = ""
        if parts.query:
            pairs = sorted(dict(pair.partition("=")[::2] for pair in parts.query.split("&")).items())
            query = "".join(f"\n{name.lower()}:{unquote(value)}" for name, value in pairs)
        to_sign = "".join((
            method, "\n",
            "\n".join(lower.get(name, "") for name in _STANDARD), "\n",
            "".join(f"{name}:{x_ms[name]}\n" for name in self._order(tuple(sorted(x_ms))) if x_ms[name] is not None),
            "/", self._account, parts.path,
            query,
        ))
        mac = self._mac.copy()
        mac.update(to_sign.encode())
        return f"SharedKey {self._account}:{base64.b64encode(mac.digest()).decode()}"


_date: tuple[int, str] = (0, "")


def http_date() -> str:
    """Now as an HTTP date (RFC 7231, GMT), made once per second."""
    global _date
    second = int(time.time())
    if _date[0] != second:
        _date = (second, formatdate(second, usegmt=True))
    return _date[1]
