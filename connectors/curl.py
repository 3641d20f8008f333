"""The connectors' direct requests on libcurl (pycurl): one HTTP/1.1 request per call, with no
per-request work in Python beyond the options that change.

A 16 KiB object costs two requests (a ranged read at the source, a PUT at the destination), and on
a small-object run what the client spends around them decides the speed (bench/README.md): a
16 KiB GET costs 0.38 ms of client CPU through a bare urllib3 pool (http.client builds and parses
it in Python) and 0.08 ms through libcurl, a signed PUT 0.69 and 0.39 (`bench/bench_put.py`).
libcurl parses the answer and moves the bytes without the GIL.

What a `CurlSession` keeps of the pool it replaces (`connectors/s3.py`, `connectors/azure_blob.py`
build it from their SDK's own settings):

- one easy handle per thread, kept between requests: its connection stays open (keep-alive), as
  a pool of as many connections as there are threads would;
- connect timeout, and a read timeout as "no byte for that many seconds" (urllib3's meaning;
  libcurl averages the speed over its last few seconds, so a stall right after a burst of bytes
  is noticed up to about 5 s later);
- TLS: the peer's certificate and name checked against the given CA bundle, or not checked at
  all when `verify` is False (the lab); HTTP/2 never negotiated;
- no redirect followed, no proxy (callers build a session only for an endpoint no proxy applies
  to: libcurl's own reading of the proxy variables is turned off), no cookie, no compression;
- an answer is read to at most `limit` bytes: the rest is never held in memory, and the
  connection is dropped rather than reused with bytes of the answer unread;
- only the headers given are sent, besides Host, Content-Length and a User-Agent of
  "exitplan" where none is given (libcurl's Accept and Expect are removed).

Failures are `CurlFailure` with libcurl's code: the caller translates them as it translates its
SDK's connection errors.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from typing import Any

import pycurl

# The most of an error answer's body a caller needs to keep (its message; the rest is dropped with
# the connection), and so the least `limit` of a request whose answer may be an error.
ERROR_BODY = 64 * 1024

# libcurl's codes for a certificate that cannot be verified (the peer's, its name, the CA bundle).
_CERTIFICATE_CODES = frozenset({
    pycurl.E_PEER_FAILED_VERIFICATION, pycurl.E_SSL_CACERT_BADFILE, pycurl.E_SSL_CERTPROBLEM,
    getattr(pycurl, "E_SSL_CACERT", 60), getattr(pycurl, "E_SSL_ISSUER_ERROR", 83),
})


class CurlFailure(Exception):
    """A request that got no complete answer: no connection, a timeout, a reset, a TLS failure.
    `code` is libcurl's (`CURLE_*`); `certificate` says whether the server's certificate could not
    be verified (a configuration matter, not one a retry mends)."""

    def __init__(self, code: int, message: str):
        super().__init__(f"libcurl error {code}: {message}")
        self.code = code
        self.certificate = code in _CERTIFICATE_CODES


class Headers(dict):
    """An answer's headers by lower-cased name, looked up in any case; a repeated header's values
    joined by ", " (RFC 9110's reading of a repeated field)."""

    def __getitem__(self, name: str) -> str:
        return dict.__getitem__(self, name.lower())

    def get(self, name: str, default: Any = None) -> Any:
        return dict.get(self, name.lower(), default)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and dict.__contains__(self, name.lower())


class Answer:
    """A request's answer: `status`, `reason`, `headers` (case-insensitive), `body` (at most the
    request's `limit` bytes; `cut` when the server sent more than that)."""

    __slots__ = ("status", "reason", "headers", "body", "cut")

    def __init__(self, status: int, reason: str, headers: Headers, body: bytes, cut: bool):
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body
        self.cut = cut


class _Handle:
    """A libcurl easy handle and the buffers its callbacks fill, for one thread."""

    __slots__ = ("curl", "lines", "chunks", "room", "cut", "upload", "sent", "head")

    def __init__(self, session: "CurlSession"):
        self.lines: list[bytes] = []
        self.chunks: list[bytes] = []
        self.room = 0
        self.cut = False
        self.upload: memoryview | None = None
        self.sent = 0
        self.head = False  # the last request was a HEAD (its no-body setting is still on)
        c = self.curl = pycurl.Curl()
        c.setopt(pycurl.NOSIGNAL, 1)
        c.setopt(pycurl.PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS)
        c.setopt(pycurl.FOLLOWLOCATION, 0)
        c.setopt(pycurl.PROXY, "")
        c.setopt(pycurl.HTTP_VERSION, pycurl.CURL_HTTP_VERSION_1_1)
        c.setopt(pycurl.TCP_KEEPALIVE, 1)
        c.setopt(pycurl.USERAGENT, "exitplan")
        c.setopt(pycurl.CONNECTTIMEOUT_MS, max(1, int(session.connect_timeout * 1000)))
        # urllib3's read timeout: no byte for that long. libcurl's equivalent: under 1 byte/s for
        # that many (whole) seconds.
        c.setopt(pycurl.LOW_SPEED_LIMIT, 1)
        c.setopt(pycurl.LOW_SPEED_TIME, max(1, round(session.read_timeout)))
        if session.verify is False:
            c.setopt(pycurl.SSL_VERIFYPEER, 0)
            c.setopt(pycurl.SSL_VERIFYHOST, 0)
        else:
            c.setopt(pycurl.SSL_VERIFYPEER, 1)
            c.setopt(pycurl.SSL_VERIFYHOST, 2)
            c.setopt(pycurl.CAPATH if os.path.isdir(session.ca_bundle) else pycurl.CAINFO, session.ca_bundle)
        c.setopt(pycurl.HEADERFUNCTION, self.lines.append)
        c.setopt(pycurl.WRITEFUNCTION, self._write)
        c.setopt(pycurl.READFUNCTION, self._read)

    def _write(self, chunk: bytes) -> int | None:
        if len(chunk) > self.room:
            self.chunks.append(chunk[:self.room])
            self.room = 0
            self.cut = True
            return 0  # libcurl stops the transfer (CURLE_WRITE_ERROR) and closes the connection
        self.chunks.append(chunk)
        self.room -= len(chunk)
        return None

    def _read(self, size: int) -> bytes:
        start = self.sent
        self.sent = min(start + size, len(self.upload))
        return bytes(self.upload[start:self.sent])


def keeps_read_timeout(read_timeout: float) -> bool:
    """Whether libcurl holds a request to `read_timeout` as the SDKs' HTTP sessions do: it counts
    the time without a byte in whole seconds (`LOW_SPEED_TIME`), so a timeout under one second
    would be stretched to one. Where it is not kept, the SDK sends the requests."""
    return read_timeout >= 1


class CurlSession:
    """Requests on per-thread libcurl handles (module docstring). `verify`: True (the CA bundle
    `ca_bundle`, a file or a directory), or False (no check: the lab only)."""

    def __init__(self, *, connect_timeout: float, read_timeout: float, verify: bool, ca_bundle: str | None = None):
        if verify and not ca_bundle:
            raise ValueError("a CA bundle is needed to verify certificates")
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.verify = verify
        self.ca_bundle = ca_bundle
        self._local = threading.local()
        self._handles: list[_Handle] = []
        self._lock = threading.Lock()

    def _handle(self) -> _Handle:
        handle = getattr(self._local, "handle", None)
        if handle is None:
            handle = self._local.handle = _Handle(self)
            with self._lock:
                self._handles.append(handle)
        return handle

    def request(self, method: str, url: str, headers: Mapping[str, Any], *, body: bytes | bytearray | memoryview | None = None,
                limit: int | None = None) -> Answer:
        """Send a GET, a HEAD, or a PUT of `body` (with its Content-Length), to `url` with `headers`;
        return the answer with at most `limit` bytes of its body (no limit: all of it; a HEAD's is
        empty). `CurlFailure` when no complete answer came."""
        h = self._handle()
        c = h.curl
        h.lines.clear()
        h.chunks.clear()
        h.room = limit if limit is not None else 1 << 62
        h.cut = False
        sent = [b"Accept:", b"Expect:"]
        for name, value in headers.items():
            if name.lower() != "content-length":
                sent.append(f"{name}: {value}".encode("latin-1"))
        c.setopt(pycurl.URL, url)
        if method == "PUT":
            if h.head:
                c.setopt(pycurl.NOBODY, 0)
                h.head = False
            h.upload = memoryview(body if body is not None else b"").cast("B")
            h.sent = 0
            c.setopt(pycurl.UPLOAD, 1)
            c.setopt(pycurl.INFILESIZE_LARGE, h.upload.nbytes)
        elif method in ("GET", "HEAD") and body is None:
            c.setopt(pycurl.HTTPGET, 1)  # which also turns a HEAD's no-body setting off
            h.head = method == "HEAD"
            if h.head:
                c.setopt(pycurl.NOBODY, 1)
        else:
            raise ValueError(f"a CurlSession sends GET, HEAD and PUT (with a body), not {method}")
        c.setopt(pycurl.HTTPHEADER, sent)
        try:
            c.perform()
        except pycurl.error as exc:
            if not (h.cut and exc.args[0] == pycurl.E_WRITE_ERROR):
                raise CurlFailure(exc.args[0], exc.args[1] if len(exc.args) > 1 else "") from None
        finally:
            h.upload = None
        return Answer(c.getinfo(pycurl.RESPONSE_CODE), *_header_block(h.lines), b"".join(h.chunks), h.cut)

    def close(self) -> None:
        """Close every handle's connection. Only while no request runs; a later request opens anew."""
        with self._lock:
            handles, self._handles = self._handles, []
            self._local = threading.local()
        for handle in handles:
            handle.curl.close()


def _header_block(lines: list[bytes]) -> tuple[str, Headers]:
    """The reason and headers of the last answer's header block (a `100 Continue` or other
    interim answer before it has a block of its own)."""
    start = 0
    for i, line in enumerate(lines):
        if line.startswith(b"HTTP/"):
            start = i
    status_line = lines[start].decode("latin-1").rstrip("\r\n") if lines else ""
    reason = status_line.split(" ", 2)[2] if status_line.count(" ") >= 2 else ""
    headers = Headers()
    for line in b"".join(lines[start + 1:]).decode("latin-1").split("\r\n"):
        name, sep, value = line.partition(":")
        if sep:
            # As http.client reads a field (and so the SDKs): the spaces after the colon go, a
            # value's own trailing spaces stay (S3 metadata values keep them).
            name, value = name.strip().lower(), value.lstrip(" \t")
            dict.__setitem__(headers, name, f"{dict.__getitem__(headers, name)}, {value}"
                             if dict.__contains__(headers, name) else value)
    return reason, headers
