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
        proxy.count("PUT", "part")               # requests seen, by method and kind of path
        proxy.arrivals                           # when each request began and ended arriving, its body size

Faults are one-shot rules, consumed in the order they were added by the first request they match
(method and a regular expression searched in the raw request target, path and query). Requests
are forwarded unchanged otherwise (Host header included), one upstream connection per request.
Only plain HTTP; bodies are buffered in memory (fine for test-sized parts).
"""

from __future__ import annotations

import http.client
import re
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit
from xml.sax.saxutils import escape

__all__ = ["Arrival", "FaultProxy", "request_kind"]

_HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
    "transfer-encoding", "upgrade", "expect",
}


def request_kind(method: str, target: str) -> str:
    """Classify an S3 request target (path-style) for counting.

    "part" (UploadPart), "upload" (ListParts / Complete / Abort), "uploads" (create or list
    multipart uploads), "object" (a key), "bucket" (the bucket itself: list, create, head),
    "service" (the root) or "admin" (moto's own API).
    """
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
    action: str                 # "flip" | "status" | "cut" | "drop" | "delay"
    methods: frozenset[str] | None
    pattern: re.Pattern[str] | None
    remaining: int
    status: int = 503
    code: str = "SlowDown"
    offset: int | None = None   # flip: byte offset in the body (default: the middle)
    fraction: float = 0.5       # cut: how much of the response body is sent before hanging up
    forward: bool = True        # drop: whether the server sees the request before the hang-up
    seconds: float = 0.0        # delay: how long the request is held before it is forwarded

    def matches(self, method: str, target: str) -> bool:
        if self.methods is not None and method not in self.methods:
            return False
        return self.pattern is None or self.pattern.search(target) is not None


class FaultProxy:
    """A threaded reverse proxy on a free 127.0.0.1 port forwarding to ``upstream_host:upstream_port``.

    Use as a context manager (or `start()` / `stop()`); `url` is what a client should use as its
    endpoint. All methods are thread-safe.
    """

    def __init__(self, upstream_host: str, upstream_port: int, *, timeout: float = 30.0):
        self.upstream = (upstream_host, upstream_port)
        self.timeout = timeout
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

    # ---- lifecycle --------------------------------------------------------------------------

    def start(self) -> "FaultProxy":
        """Bind a free port on 127.0.0.1 and serve in a background thread."""
        proxy = self

        class Handler(_ProxyHandler):
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
        default_code = {503: "SlowDown", 500: "InternalError", 429: "TooManyRequests"}.get(status, "InjectedFault")
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

    def clear(self) -> None:
        """Drop every pending fault."""
        with self._lock:
            self._rules.clear()

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
            self._counts[(method, request_kind(method, target))] += 1
            self.received.append((method, target))
            self.arrivals.append(Arrival(method, target, started, time.monotonic(), size))
            for rule in self._rules:
                if rule.remaining > 0 and rule.matches(method, target):
                    rule.remaining -= 1
                    if rule.remaining == 0:
                        self._rules.remove(rule)
                    return rule
        return None

    def _record(self, method: str, target: str, status: int) -> None:
        with self._lock:
            self.log.append((method, target, status))


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
        if rule is not None and rule.action == "drop":
            if rule.forward:
                try:
                    self._forward(method, target, body)
                except (OSError, http.client.HTTPException):
                    pass
            self.owner._record(method, target, 0)
            self._hang_up()
            return
        try:
            status, reason, headers, payload = self._forward(method, target, body)
        except (OSError, http.client.HTTPException) as exc:
            self._send_error_response(_Rule("status", None, None, 1, status=502, code="BadGateway"),
                                      message=f"faultproxy: upstream unreachable: {exc}")
            self.owner._record(method, target, 502)
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
        if method != "HEAD":
            self.wfile.write(payload)
        self.wfile.flush()
        self.owner._record(method, target, status)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_OPTIONS = do_PATCH = _handle

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
