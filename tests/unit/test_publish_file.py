"""`engine.endpoints.publish_file`: a small file (the audit manifest of a small run, a report) goes
from memory with its MD5; a large one is streamed."""

from __future__ import annotations

import hashlib
import os
from types import SimpleNamespace

import pytest

import connectors.base
from engine.endpoints import publish_file


class _Recorder:
    label = "rec"

    def __init__(self):
        self.puts = []

    def put(self, key, body, size, meta, md5):
        data = bytes(body) if isinstance(body, (bytes, bytearray, memoryview)) else body.read()
        self.puts.append((key, type(body).__name__, data, size, md5, meta.content.content_type))
        return "etag"


def _loaded():
    dest = SimpleNamespace(kind="s3", endpoint_url="https://s3.example", bucket="b")
    return SimpleNamespace(config=SimpleNamespace(destinations={"d": dest}))


@pytest.mark.parametrize("size, streamed", [(0, False), (1000, False), (2048, True)])
def test_a_small_file_is_sent_from_memory_with_its_md5_a_large_one_streamed(tmp_path, monkeypatch, size, streamed):
    monkeypatch.setattr(connectors.base, "DIRECT_MAX_BYTES", 1024)
    path = tmp_path / "manifest.jsonl"
    data = os.urandom(size)
    path.write_bytes(data)
    sink = _Recorder()
    written, notes = publish_file(_loaded(), ["d"], path, "_exitplan/p/manifest.jsonl", "the manifest",
                                  content_type="application/x-ndjson", sinks=lambda dest: sink)
    assert notes == [] and written == [("rec/_exitplan/p/manifest.jsonl", "https://s3.example/b/_exitplan/p/manifest.jsonl")]
    ((key, kind, sent, announced, md5, content_type),) = sink.puts
    assert (sent, announced, content_type) == (data, size, "application/x-ndjson")
    if streamed:
        assert kind == "BufferedReader" and md5 is None
    else:
        assert kind == "bytes" and md5 == hashlib.md5(data).digest()
