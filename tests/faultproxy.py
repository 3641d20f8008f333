"""A small fault-injecting HTTP reverse proxy for tests, on 127.0.0.1 in front of a lab server.

The lab's S3 server (moto) never rejects a wrong Content-MD5, never throttles and never drops a
connection. Put this proxy between a connector and the server and tell it what to break:

    with FaultProxy("127.0.0.1", s3_server.port) as proxy:
        store = S3Store(..., endpoint_url=proxy.url, ...)
        proxy.flip_next_put(r"partNumber=2")     # corrupt the body of the next matching PUT
        proxy.fail_next(2, status=503)           # answer 503 SlowDown to the next 2 requests
        proxy.cut_next_response(method="GET")    # send half of the next GET body, then hang up
        proxy.drop_next(method="PUT")            # forward the next PUT, then hang up without answering
        proxy.delay_next(2.0, method="GET")      # hold the next GET for 2 s before forwarding it
        proxy.reset_next(method="GET")           # reset the connection (RST) instead of answering
        proxy.slow_next(1.0, method="GET")       # trickle the next GET's body over 1 s
        proxy.count("PUT", "part")               # requests seen, by method and kind of path
        proxy.delay_every(0.020)                 # hold every request 20 ms (a distant provider)
        proxy.arrivals                           # when each request began and ended arriving, its body size

Faults are one-shot rules, consumed in the order they were added by the first request they match
(method and a regular expression searched in the raw request target, path and query). Requests
are forwarded unchanged otherwise (Host header included), one upstream connection per request.
Only plain HTTP; bodies are buffered in memory (fine for test-sized parts).

In front of Azurite, `FaultProxy(..., service="azure")` answers in Azure's words (503 ServerBusy,
500 InternalError, with `x-ms-error-code`) and counts requests by Azure's kinds (`request_kind`).

Random mode (`random_faults`): from then on each request fails, with a given probability per kind
of fault drawn from a seeded generator, in one of `RANDOM_FAULTS`: a 5xx answer, a throttling
answer, a connection reset, a truncated answer, a slow body. `injected` counts what was done, by
kind; `injected_on` by kind, method and kind of request.
"""

from __future__ import annotations

import hashlib
import http.client
import random
import re
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit
from xml.sax.saxutils import escape

__all__ = ["Arrival", "FaultProxy", "QuirkProxy", "RANDOM_FAULTS", "request_kind"]

# The kinds of fault random mode draws from: "5xx" (500 InternalError), "throttle" (503 SlowDown,
# or ServerBusy at Azure), "reset" (the connection reset before any answer; half of the time after
# the server processed the request), "truncate" (the answer cut half-way through its body, or, for
# an answer without a body, the connection closed after the server processed the request) and
# "slow" (the body trickled out over `slow_seconds`: not a failure unless a client times out).
RANDOM_FAULTS = ("5xx", "throttle", "reset", "truncate", "slow")

_HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
    "transfer-encoding", "upgrade", "expect",
}


def request_kind(method: str, target: str, service: str = "s3") -> str:
    """Classify a request target (path-style) for counting; `service` "azure": `azure_kind`.

    "part" (UploadPart), "upload" (ListParts / Complete / Abort), "uploads" (create or list
    multipart uploads), "object" (a key), "bucket" (the bucket itself: list, create, head),
    "service" (the root) or "admin" (moto's own API).
    """
    if service == "azure":
        return azure_kind(target)
    parts = urlsplit(target)
    query = parse_qs(parts.query, keep_blank_values=True)
    path = parts.path
    if path.startswith("/moto-api"):
        return "admin"
    if "uploadId" in query and "partNumber" in query:
        return "part"
    if "uploadId" in query:
        return "upload"
    if "uploads" in query:
        return "uploads"
    segments = [s for s in path.split("/") if s]
    if not segments:
        return "service"
    if len(segments) == 1:
        return "bucket"
    return "object"


def azure_kind(target: str) -> str:
    """Classify an Azure Blob request target (`/account/container/blob?…`, Azurite's path style):
    "list" (a container listing), "container" (the container itself), "blob" (a blob: read, HEAD,
    PUT), "block" / "blocklist" (Put Block / Put Block List) or "service" (the account)."""
    parts = urlsplit(target)
    query = parse_qs(parts.query, keep_blank_values=True)
    comp = (query.get("comp") or [""])[0]
    segments = [s for s in parts.path.split("/") if s]
    if comp == "list" and len(segments) <= 2:
        return "list"
    if comp in ("block", "blocklist"):
        return comp
    if len(segments) <= 1:
        return "service"
    if len(segments) == 2:
        return "container"
    return "blob"


@dataclass(frozen=True)
class Arrival:
    """One request as the server side saw it: when its first line came in and when its body was
    complete (`time.monotonic()` seconds), and the body's size."""

    method: str
    target: str
    started: float
    finished: float
    size: int


@dataclass
class _Rule:
    action: str                 # "flip" | "status" | "cut" | "drop" | "delay" | "reset" | "slow"
    methods: frozenset[str] | None
    pattern: re.Pattern[str] | None
    remaining: int
    status: int = 503
    code: str = "SlowDown"
    offset: int | None = None   # flip: byte offset in the body (default: the middle)
    fraction: float = 0.5       # cut: how much of the response body is sent before hanging up
    forward: bool = True        # drop, reset: whether the server sees the request before the hang-up
    seconds: float = 0.0        # delay: how long the request is held; slow: how long the body takes

    def matches(self, method: str, target: str) -> bool:
        if self.methods is not None and method not in self.methods:
            return False
        return self.pattern is None or self.pattern.search(target) is not None


class FaultProxy:
    """A threaded reverse proxy on a free 127.0.0.1 port forwarding to ``upstream_host:upstream_port``.

    Use as a context manager (or `start()` / `stop()`); `url` is what a client should use as its
    endpoint. All methods are thread-safe.
    """

    # The request handler; a subclass of `_ProxyHandler` changes what the "server" answers (QuirkProxy).
    handler_class: type["_ProxyHandler"]

    def __init__(self, upstream_host: str, upstream_port: int, *, timeout: float = 30.0, service: str = "s3"):
        if service not in ("s3", "azure"):
            raise ValueError(f"service must be 's3' or 'azure', not {service!r}")
        self.upstream = (upstream_host, upstream_port)
        self.timeout = timeout
        self.service = service
        self._random: _RandomFaults | None = None
        self.injected: Counter[str] = Counter()
        self.injected_on: Counter[tuple[str, str, str]] = Counter()   # (fault, method, request kind)
        self._lock = threading.Lock()
        self._rules: list[_Rule] = []
        self._counts: Counter[tuple[str, str]] = Counter()
        self.log: list[tuple[str, str, int]] = []   # (method, target, status sent) for debugging
        # (method, target) of every request received, in order, whether or not it was answered
        # (a client killed mid-request never gets, and the log never shows, its answer).
        self.received: list[tuple[str, str]] = []
        self.arrivals: list[Arrival] = []  # every request received, in order of its body's end
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.constant_delay = 0.0  # seconds every request is held (`delay_every`)

    # ---- lifecycle --------------------------------------------------------------------------

    def start(self) -> "FaultProxy":
        """Bind a free port on 127.0.0.1 and serve in a background thread."""
        proxy = self

        class Handler(self.handler_class):
            owner = proxy

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="faultproxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; idle keep-alive handler threads end on their socket timeout."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "proxy not started"
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ---- faults -----------------------------------------------------------------------------

    def flip_next_put(self, pattern: str | None = None, *, offset: int | None = None, times: int = 1) -> None:
        """Flip one byte (XOR 0xFF) of the body of the next `times` PUTs whose target matches `pattern`.

        The body is altered after the client computed its Content-MD5 and signature, as a faulty
        network or middlebox would. `offset` defaults to the middle of the body.
        """
        self._add(_Rule("flip", frozenset({"PUT"}), _compile(pattern), times, offset=offset))

    def fail_next(self, n: int = 1, *, status: int = 503, code: str | None = None, method: str | None = None,
                  pattern: str | None = None) -> None:
        """Answer the next `n` matching requests with `status` and an S3-style XML error `code`.

        The request is not forwarded. `code` defaults to SlowDown for 503, InternalError for 500,
        else a generic name.
        """
        default_code = _error_code(self.service, status)
        self._add(_Rule("status", _methods(method), _compile(pattern), n, status=status, code=code or default_code))

    def cut_next_response(self, *, method: str | None = "GET", pattern: str | None = None, fraction: float = 0.5,
                          times: int = 1) -> None:
        """Forward the next matching request, then send the full headers and only `fraction` of the
        response body before closing the connection (the Content-Length still announces it all)."""
        self._add(_Rule("cut", _methods(method), _compile(pattern), times, fraction=fraction))

    def drop_next(self, *, method: str | None = None, pattern: str | None = None, forward: bool = True,
                  times: int = 1) -> None:
        """Close the connection instead of answering the next matching request.

        With `forward` (the default) the server has processed the request first: the client loses
        a response to something that happened (a part stored, an upload completed).
        """
        self._add(_Rule("drop", _methods(method), _compile(pattern), times, forward=forward))

    def delay_next(self, seconds: float, *, method: str | None = None, pattern: str | None = None,
                   times: int = 1) -> None:
        """Hold the next matching request for `seconds` before forwarding it (client timeouts)."""
        self._add(_Rule("delay", _methods(method), _compile(pattern), times, seconds=seconds))

    def delay_every(self, seconds: float) -> None:
        """Hold every request `seconds` before forwarding it, on top of any fault (a latency-true
        simulation of a provider `seconds` away; 0 turns it off). Not a one-shot rule."""
        if seconds < 0:
            raise ValueError("a delay cannot be negative")
        self.constant_delay = seconds

    def reset_next(self, *, method: str | None = None, pattern: str | None = None, forward: bool = False,
                   times: int = 1) -> None:
        """Reset the connection (TCP RST) instead of answering the next matching request; with
        `forward`, after the server processed it."""
        self._add(_Rule("reset", _methods(method), _compile(pattern), times, forward=forward))

    def slow_next(self, seconds: float, *, method: str | None = "GET", pattern: str | None = None,
                  times: int = 1) -> None:
        """Send the next matching answer's body in small pieces spread over `seconds`."""
        self._add(_Rule("slow", _methods(method), _compile(pattern), times, seconds=seconds))

    def random_faults(self, rate: float, *, seed: int, kinds: tuple[str, ...] = RANDOM_FAULTS,
                      method: str | None = None, pattern: str | None = None, slow_seconds: float = 0.5) -> None:
        """From now on, each matching request (`method`, `pattern` as for the one-shot faults; the
        one-shot rules go first) fails with probability `rate` in each of `kinds`: at 0.05 with the
        five kinds, a quarter of the requests, 5 % in each way. Draws come from `random.Random(seed)`
        in the order requests arrive (concurrent clients make that order, not the draws, vary)."""
        unknown = set(kinds) - set(RANDOM_FAULTS)
        if unknown or not kinds or not 0 <= rate * len(kinds) <= 1:
            raise ValueError(f"kinds must be among {RANDOM_FAULTS} and rate × kinds at most 1")
        with self._lock:
            self._random = _RandomFaults(random.Random(seed), rate, tuple(kinds), _methods(method),
                                         _compile(pattern), slow_seconds)

    def stop_random_faults(self) -> None:
        with self._lock:
            self._random = None

    def clear(self) -> None:
        """Drop every pending fault (random mode included)."""
        with self._lock:
            self._rules.clear()
            self._random = None

    def pending_faults(self) -> int:
        """How many fault firings are still armed."""
        with self._lock:
            return sum(r.remaining for r in self._rules)

    # ---- counters ---------------------------------------------------------------------------

    def count(self, method: str | None = None, kind: str | None = None) -> int:
        """Requests received so far, filtered by method and/or `request_kind`."""
        with self._lock:
            return sum(n for (m, k), n in self._counts.items()
                       if (method is None or m == method) and (kind is None or k == kind))

    @property
    def counts(self) -> dict[tuple[str, str], int]:
        """A snapshot of the counters, keyed by (method, kind)."""
        with self._lock:
            return dict(self._counts)

    def reset_counts(self) -> None:
        with self._lock:
            self._counts.clear()
            self.log.clear()
            self.received.clear()
            self.arrivals.clear()

    # ---- internals --------------------------------------------------------------------------

    def _add(self, rule: _Rule) -> None:
        if rule.remaining < 1:
            raise ValueError("a fault must fire at least once")
        with self._lock:
            self._rules.append(rule)

    def _take(self, method: str, target: str, started: float, size: int) -> _Rule | None:
        with self._lock:
            kind = request_kind(method, target, self.service)
            self._counts[(method, kind)] += 1
            self.received.append((method, target))
            self.arrivals.append(Arrival(method, target, started, time.monotonic(), size))
            for rule in self._rules:
                if rule.remaining > 0 and rule.matches(method, target):
                    rule.remaining -= 1
                    if rule.remaining == 0:
                        self._rules.remove(rule)
                    return rule
            if self._random is None or kind == "admin":
                return None
            drawn = self._random.draw(method, target, self.service)
            if drawn is not None:
                fault, rule = drawn
                self.injected[fault] += 1
                self.injected_on[(fault, method, kind)] += 1
            return drawn[1] if drawn else None

    def _record(self, method: str, target: str, status: int) -> None:
        with self._lock:
            self.log.append((method, target, status))


def _error_code(service: str, status: int) -> str:
    if service == "azure":
        return {503: "ServerBusy", 500: "InternalError", 429: "ServerBusy"}.get(status, "InjectedFault")
    return {503: "SlowDown", 500: "InternalError", 429: "TooManyRequests"}.get(status, "InjectedFault")


@dataclass
class _RandomFaults:
    """Random mode's settings and its generator (used under the proxy's lock)."""

    rng: random.Random
    rate: float
    kinds: tuple[str, ...]
    methods: frozenset[str] | None
    pattern: re.Pattern[str] | None
    slow_seconds: float

    def draw(self, method: str, target: str, service: str) -> tuple[str, _Rule] | None:
        if self.methods is not None and method not in self.methods:
            return None
        if self.pattern is not None and self.pattern.search(target) is None:
            return None
        u = self.rng.random()
        if u >= self.rate * len(self.kinds):
            return None
        fault = self.kinds[int(u / self.rate)]
        forward = self.rng.random() < 0.5
        if fault in ("5xx", "throttle"):
            status = 500 if fault == "5xx" else 503
            return fault, _Rule("status", None, None, 1, status=status, code=_error_code(service, status))
        if fault == "reset":
            return fault, _Rule("reset", None, None, 1, forward=forward)
        if fault == "truncate":
            return fault, _Rule("cut", None, None, 1, fraction=0.5)
        return fault, _Rule("slow", None, None, 1, seconds=self.slow_seconds)


def _compile(pattern: str | None) -> re.Pattern[str] | None:
    return re.compile(pattern) if pattern else None


def _methods(method: str | None) -> frozenset[str] | None:
    return frozenset({method.upper()}) if method else None


class _ProxyHandler(BaseHTTPRequestHandler):
    owner: FaultProxy
    # HTTP/1.1: keep-alive like a real server, and "Expect: 100-continue" is answered here.
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.owner.timeout)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - signature of the base class
        pass

    def _handle(self) -> None:
        started = time.monotonic()
        method = self.command
        target = self.path
        body = self._read_body()
        rule = self.owner._take(method, target, started, len(body))
        if self.owner.constant_delay:
            time.sleep(self.owner.constant_delay)
        if rule is not None and rule.action == "status":
            self._send_error_response(rule)
            self.owner._record(method, target, rule.status)
            return
        if rule is not None and rule.action == "flip" and body:
            i = rule.offset if rule.offset is not None else len(body) // 2
            body = bytearray(body)
            body[i] ^= 0xFF
            body = bytes(body)
        if rule is not None and rule.action == "delay":
            time.sleep(rule.seconds)
        if rule is not None and rule.action in ("drop", "reset"):
            if rule.forward:
                try:
                    self._forward(method, target, body)
                except (OSError, http.client.HTTPException):
                    pass
            self.owner._record(method, target, 0)
            self._reset() if rule.action == "reset" else self._hang_up()
            return
        try:
            status, reason, headers, payload = self._forward(method, target, body)
        except (OSError, http.client.HTTPException) as exc:
            self._send_error_response(_Rule("status", None, None, 1, status=502, code="BadGateway"),
                                      message=f"faultproxy: upstream unreachable: {exc}")
            self.owner._record(method, target, 502)
            return
        if rule is not None and rule.action == "cut" and (method == "HEAD" or not payload):
            # Nothing to cut in an answer without a body: the client loses the whole answer, to a
            # request the server processed.
            self.owner._record(method, target, -status)
            self._hang_up()
            return
        self.send_response_only(status, reason)
        length = None
        for name, value in headers:
            if name.lower() in _HOP_BY_HOP:
                continue
            if name.lower() == "content-length":
                length = value
            self.send_header(name, value)
        if method != "HEAD" and length is None:
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if rule is not None and rule.action == "cut" and method != "HEAD":
            self.wfile.write(payload[: int(len(payload) * rule.fraction)])
            self.wfile.flush()
            self.owner._record(method, target, -status)
            # Hang up mid-body: the client sees fewer bytes than Content-Length announced.
            self._hang_up()
            return
        if rule is not None and rule.action == "slow" and method != "HEAD" and payload:
            pieces = 10
            step = -(-len(payload) // pieces)
            for start in range(0, len(payload), step):
                self.wfile.write(payload[start:start + step])
                self.wfile.flush()
                time.sleep(rule.seconds / pieces)
        elif method != "HEAD":
            self.wfile.write(payload)
        self.wfile.flush()
        self.owner._record(method, target, status)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_OPTIONS = do_PATCH = _handle

    def _reset(self) -> None:
        """Close the connection with a TCP RST (SO_LINGER 0) instead of an orderly FIN."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.rfile.close()   # the socket closes only once its file objects are closed
            self.connection.close()
        except OSError:
            pass

    def _hang_up(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _forward(self, method: str, target: str, body: bytes):
        conn = http.client.HTTPConnection(*self.owner.upstream, timeout=self.owner.timeout)
        try:
            conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() in _HOP_BY_HOP or name.lower() == "content-length":
                    continue
                conn.putheader(name, value)
            if body or method in ("PUT", "POST"):
                conn.putheader("Content-Length", str(len(body)))
            conn.putheader("Connection", "close")
            conn.endheaders(body or None)
            resp = conn.getresponse()
            payload = resp.read() if method != "HEAD" else b""
            return resp.status, resp.reason, resp.getheaders(), payload
        finally:
            conn.close()

    def _send_error_response(self, rule: _Rule, message: str = "injected by faultproxy") -> None:
        payload = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{rule.code}</Code><Message>{escape(message)}</Message>"
            "<RequestId>faultproxy</RequestId></Error>"
        ).encode()
        self.send_response_only(rule.status)
        self.send_header("Content-Type", "application/xml")
        # Azure reads the error code from this header (a HEAD error has no body); S3 ignores it.
        self.send_header("x-ms-error-code", rule.code)
        self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(payload)))
        if rule.status in (429, 503):
            self.send_header("Retry-After", "0")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)
        self.wfile.flush()


FaultProxy.handler_class = _ProxyHandler


# ---- quirk mode: an S3 provider that differs from AWS -----------------------------------------
#
# Real S3-compatible services differ from moto in ways that change what a migration can prove:
# with server-side encryption (and at several providers) the multipart ETag is not
# md5-of-part-md5s-N; some answer 405 to ListParts and abort and 501 to ListMultipartUploads
# (npm `s3rver` does all of these). `QuirkProxy` puts those answers in front of a faithful server.

_MULTIPART_ETAG = re.compile(rb"[0-9a-f]{32}-[0-9]+")
_S3_METHOD_NOT_ALLOWED = (405, "MethodNotAllowed", "The specified method is not allowed against this resource.")
_S3_NOT_IMPLEMENTED = (501, "NotImplemented", "A header or operation you provided implies functionality that is not implemented.")


def opaque_etag(upstream_etag: bytes) -> bytes:
    """The opaque ETag the quirk proxy shows for a multipart ETag of the server behind it: 32 hex
    digits without a part count, derived from the real one so every answer about the object agrees,
    and equal neither to the object's MD5 nor to md5-of-part-md5s."""
    return hashlib.md5(b"quirk-proxy-opaque:" + upstream_etag).hexdigest().encode()


class QuirkProxy(FaultProxy):
    """A `FaultProxy` that also behaves like a quirky S3 provider, each quirk switched on its own:

    - `opaque_etags`: every multipart ETag (`<32 hex>-N`) in an answer (CompleteMultipartUpload,
      HEAD, GET, ListObjects…) is replaced by `opaque_etag` of it, consistently; an If-Match /
      If-None-Match carrying an opaque value is translated back before forwarding.
    - `list_parts=False`: ListParts answers 405 MethodNotAllowed.
    - `abort=False`: AbortMultipartUpload answers 405 MethodNotAllowed (the upload stays).
    - `list_uploads=False`: ListMultipartUploads answers 501 NotImplemented.

    A refused request is not forwarded. The one-shot faults of `FaultProxy` still apply on top.
    `refused` counts the refusals by operation name.
    """

    def __init__(self, upstream_host: str, upstream_port: int, *, opaque_etags: bool = True,
                 list_parts: bool = False, abort: bool = False, list_uploads: bool = False,
                 timeout: float = 30.0):
        super().__init__(upstream_host, upstream_port, timeout=timeout)
        self.opaque_etags = opaque_etags
        self.list_parts = list_parts
        self.abort = abort
        self.list_uploads = list_uploads
        self.refused: Counter[str] = Counter()
        self._upstream_etag: dict[bytes, bytes] = {}   # opaque value -> the server's ETag

    def refusal(self, method: str, target: str) -> tuple[str, tuple[int, str, str]] | None:
        """The operation name and (status, code, message) this provider answers instead of the
        server, or None when the request is forwarded."""
        query = parse_qs(urlsplit(target).query, keep_blank_values=True)
        if "uploadId" in query and "partNumber" not in query:
            if method == "GET" and not self.list_parts:
                return "ListParts", _S3_METHOD_NOT_ALLOWED
            if method == "DELETE" and not self.abort:
                return "AbortMultipartUpload", _S3_METHOD_NOT_ALLOWED
        if method == "GET" and "uploads" in query and not self.list_uploads:
            return "ListMultipartUploads", _S3_NOT_IMPLEMENTED
        return None

    def show_etags(self, data: bytes) -> bytes:
        """`data` (a header value or a body) with every multipart ETag made opaque."""
        if not self.opaque_etags:
            return data

        def replace(match: re.Match[bytes]) -> bytes:
            shown = opaque_etag(match.group(0))
            with self._lock:
                self._upstream_etag[shown] = match.group(0)
            return shown

        return _MULTIPART_ETAG.sub(replace, data)

    def upstream_etags(self, value: str) -> str:
        """A conditional header's value with every opaque ETag this proxy showed put back."""
        with self._lock:
            known = dict(self._upstream_etag)
        raw = value.encode("latin-1")
        for shown, upstream in known.items():
            raw = raw.replace(shown, upstream)
        return raw.decode("latin-1")


_CONDITIONAL_HEADERS = {"if-match", "if-none-match", "x-amz-copy-source-if-match", "x-amz-copy-source-if-none-match"}


class _QuirkHandler(_ProxyHandler):
    owner: QuirkProxy

    def _forward(self, method: str, target: str, body: bytes):
        refused = self.owner.refusal(method, target)
        if refused is not None:
            operation, (status, code, message) = refused
            with self.owner._lock:
                self.owner.refused[operation] += 1
            payload = (
                '<?xml version="1.0" encoding="UTF-8"?>\n'
                f"<Error><Code>{code}</Code><Message>{escape(message)}</Message>"
                "<RequestId>quirkproxy</RequestId></Error>"
            ).encode()
            headers = [("Content-Type", "application/xml"), ("Content-Length", str(len(payload)))]
            return status, http.client.responses.get(status, ""), headers, payload if method != "HEAD" else b""
        for name in list(self.headers.keys()):
            if name.lower() in _CONDITIONAL_HEADERS:
                value = self.headers[name]
                del self.headers[name]
                self.headers[name] = self.owner.upstream_etags(value)
        status, reason, headers, payload = super()._forward(method, target, body)
        payload = self.owner.show_etags(payload)
        shown = []
        for name, value in headers:
            if name.lower() == "etag":
                value = self.owner.show_etags(value.encode("latin-1")).decode("latin-1")
            elif name.lower() == "content-length" and method != "HEAD":
                value = str(len(payload))
            shown.append((name, value))
        return status, reason, shown, payload


QuirkProxy.handler_class = _QuirkHandler
