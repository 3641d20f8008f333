"""`connectors.curl.CurlSession`, the direct requests' transport, against a small HTTP/1.1 server on
loopback that records what reaches it: what is sent (and what is not), connections kept, an
answer's length bounded, timeouts, redirects and proxies left alone."""

from __future__ import annotations

import http.server
import socket
import threading
import time

import pytest

from connectors.curl import CurlFailure, CurlSession
from flows import lab_processes as lp


class _Recorder(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: list[dict] = []

    def log_message(self, *_args):
        pass

    def _record(self, body: bytes) -> None:
        self.seen.append({"method": self.command, "path": self.path, "headers": list(self.headers.items()),
                          "body": body, "peer": self.client_address})

    def do_PUT(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self._record(body)
        self.send_response(200)
        self.send_header("ETag", '"abc"')
        self.send_header("x-amz-meta-twice", "one")
        self.send_header("X-Amz-Meta-Twice", "two")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_HEAD(self):
        self._record(b"")
        self.send_response(200)
        self.send_header("ETag", '"abc"')
        self.send_header("Content-Length", "10")  # the object's: no body follows a HEAD's answer
        self.end_headers()

    def do_GET(self):
        self._record(b"")
        if self.path == "/big":
            self._send(200, b"x" * 1_000_000)
        elif self.path == "/redirect":
            self._send(302, b"", {"Location": "/elsewhere"})
        elif self.path == "/stall":
            self.send_response(200)
            self.send_header("Content-Length", "10")
            self.end_headers()
            self.wfile.write(b"12345")
            self.wfile.flush()
            time.sleep(12)
        else:
            self._send(206, b"0123", {"Content-Range": "bytes 0-3/10"})

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture()
def server():
    _Recorder.seen = []
    httpd = http.server.ThreadingHTTPServer((lp.LOOPBACK, 0), _Recorder)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{lp.LOOPBACK}:{httpd.server_address[1]}", _Recorder.seen
    finally:
        httpd.shutdown()
        httpd.server_close()


def _session(read_timeout: float = 5) -> CurlSession:
    return CurlSession(connect_timeout=2, read_timeout=read_timeout, verify=False)


def test_only_the_given_headers_and_the_body_are_sent_and_the_method_does_not_carry_over(server):
    url, seen = server
    curl = _session()
    answer = curl.request("PUT", f"{url}/k", {"Content-MD5": "bWQ1", "Content-Length": "5", "x-amz-meta-a": "b"},
                          body=memoryview(b"hello"))
    assert (answer.status, answer.reason, answer.headers["etag"], answer.headers.get("ETAG")) == (200, "OK", '"abc"', '"abc"')
    assert answer.headers["x-amz-meta-twice"] == "one, two" and "X-AMZ-META-TWICE" in answer.headers
    answer = curl.request("GET", f"{url}/k", {"Range": "bytes=0-3"})
    assert (answer.status, answer.body, answer.headers["Content-Range"], answer.cut) == (206, b"0123", "bytes 0-3/10", False)
    put, get = seen
    assert put["method"] == "PUT" and put["body"] == b"hello"
    assert sorted(name.lower() for name, _ in put["headers"]) == [
        "content-length", "content-md5", "host", "user-agent", "x-amz-meta-a"]
    assert dict(put["headers"])["Content-Length"] == "5" and dict(put["headers"])["User-Agent"] == "exitplan"
    assert get["method"] == "GET" and sorted(name.lower() for name, _ in get["headers"]) == ["host", "range", "user-agent"]
    with pytest.raises(ValueError, match="GET, HEAD and PUT"):
        curl.request("DELETE", f"{url}/k", {})


def test_a_head_reads_no_body_and_the_requests_after_it_are_not_heads(server):
    url, seen = server
    curl = _session()
    answer = curl.request("HEAD", f"{url}/k", {"x-amz-date": "d"})
    assert (answer.status, answer.body, answer.headers["content-length"], answer.headers["etag"]) == (200, b"", "10", '"abc"')
    answer = curl.request("GET", f"{url}/k", {"Range": "bytes=0-3"})
    assert (answer.status, answer.body) == (206, b"0123")
    curl.request("HEAD", f"{url}/k", {})
    assert curl.request("PUT", f"{url}/k", {}, body=b"after").status == 200
    assert [(r["method"], r["body"]) for r in seen] == [("HEAD", b""), ("GET", b""), ("HEAD", b""), ("PUT", b"after")]
    assert len({r["peer"] for r in seen}) == 1  # one connection throughout: every answer was read whole


def test_a_thread_keeps_its_connection_and_threads_have_their_own(server):
    url, seen = server
    curl = _session()
    for _ in range(3):
        curl.request("GET", f"{url}/k", {})
    other = threading.Thread(target=lambda: curl.request("GET", f"{url}/k", {}))
    other.start()
    other.join()
    assert len({s["peer"] for s in seen[:3]}) == 1
    assert seen[3]["peer"] != seen[0]["peer"]
    curl.close()
    curl.request("GET", f"{url}/k", {})  # a closed session opens anew
    assert seen[4]["peer"] not in (seen[0]["peer"], seen[3]["peer"])


def test_an_answer_longer_than_the_limit_is_cut_and_its_connection_not_reused(server):
    url, seen = server
    curl = _session()
    answer = curl.request("GET", f"{url}/big", {}, limit=10)
    assert (answer.status, answer.body, answer.cut) == (200, b"x" * 10, True)
    assert curl.request("GET", f"{url}/k", {}).body == b"0123"
    assert seen[1]["peer"] != seen[0]["peer"]
    assert curl.request("GET", f"{url}/big", {}, limit=1_000_000).cut is False


def test_a_redirect_is_not_followed_and_a_proxy_in_the_environment_is_not_used(server, monkeypatch):
    url, seen = server
    for name in ("http_proxy", "HTTP_PROXY", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, f"http://{lp.LOOPBACK}:9")  # the discard port: nothing answers there
    curl = _session()
    answer = curl.request("GET", f"{url}/redirect", {})
    assert (answer.status, answer.headers["Location"]) == (302, "/elsewhere")
    assert [s["path"] for s in seen] == ["/redirect"]


def test_a_silent_server_times_out_and_a_closed_port_fails_by_code(server):
    url, _seen = server
    curl = _session(read_timeout=1)
    started = time.monotonic()
    with pytest.raises(CurlFailure) as info:
        curl.request("GET", f"{url}/stall", {})
    # libcurl notices a stall once its rolling speed average (a few seconds) drops below 1 byte/s.
    assert time.monotonic() - started < 9 and not info.value.certificate
    with socket.socket() as s:
        s.bind((lp.LOOPBACK, 0))
        port = s.getsockname()[1]
    with pytest.raises(CurlFailure) as info:
        curl.request("GET", f"http://{lp.LOOPBACK}:{port}/k", {})
    assert info.value.code == 7 and "libcurl error 7" in str(info.value)


def test_verifying_needs_a_ca_bundle():
    with pytest.raises(ValueError, match="CA bundle"):
        CurlSession(connect_timeout=1, read_timeout=1, verify=True)
