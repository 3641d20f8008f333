"""The connectors ask their pacer before every HTTP attempt, the SDKs' own retries included, and
tell it of every throttling answer: S3 SlowDown through the fault proxy in front of the lab S3
server, Azure ServerBusy in front of Azurite. A bandwidth limit makes the S3 connector hand a
body over chunk by chunk."""

from __future__ import annotations

import threading

from azure.storage.blob import BlobServiceClient

from connectors.azure_blob import AzureBlobSource
from connectors.base import WriteMeta
from tests.contract.contract_support import make_s3_store, md5, unique_name


class RecordingPacer:
    """A `connectors.base.RequestPacer` that writes down what it is told."""

    def __init__(self, *, paces_bytes: bool = False) -> None:
        self.paces_bytes = paces_bytes
        self.events: list[tuple[str, object]] = []
        self._lock = threading.Lock()

    def request_starts(self, kind: str) -> None:
        with self._lock:
            self.events.append(("starts", kind))

    def request_ended(self, throttled: str | None) -> None:
        with self._lock:
            self.events.append(("ended", throttled))

    def body_bytes(self, nbytes: int) -> None:
        with self._lock:
            self.events.append(("bytes", nbytes))

    def of(self, what: str) -> list:
        return [value for kind, value in self.events if kind == what]


def test_s3_every_attempt_is_paced_and_slowdown_is_reported(fault_proxy, s3_bucket):
    pacer = RecordingPacer()
    with make_s3_store(fault_proxy.url, s3_bucket, max_attempts=3, pacer=pacer) as store:
        fault_proxy.fail_next(2, status=503, method="PUT")
        store.put("k", b"payload", 7, WriteMeta(), md5(b"payload"))
        assert pacer.events == [("starts", "put"), ("ended", "SlowDown (HTTP 503)"),
                                ("starts", "put"), ("ended", "SlowDown (HTTP 503)"),
                                ("starts", "put"), ("ended", None)]
        pacer.events.clear()
        assert store.read_range("k", 0, 7) == b"payload"
        assert [e for e in pacer.events if e[0] != "bytes"] == [("starts", "get"), ("ended", None)]
        assert fault_proxy.count() == 4  # what the server counted is what was paced


def test_s3_a_body_under_a_bandwidth_limit_goes_chunk_by_chunk(fault_proxy, s3_bucket):
    body = bytes(range(256)) * 4096  # 1 MiB
    pacer = RecordingPacer(paces_bytes=True)
    with make_s3_store(fault_proxy.url, s3_bucket, pacer=pacer) as store:
        store.put("big", body, len(body), WriteMeta(), md5(body))
        chunks = pacer.of("bytes")
        assert sum(chunks) == len(body) and len(chunks) > 1
        pacer.events.clear()
        assert store.read_range("big", 0, len(body)) == body
        assert pacer.of("bytes") == [len(body)]


def test_azure_every_attempt_is_paced_and_server_busy_is_reported(azurite_via_proxy, azurite_connection_string):
    proxy, conn_str = azurite_via_proxy
    name = unique_name()
    BlobServiceClient.from_connection_string(azurite_connection_string).create_container(name).upload_blob("k", b"x" * 10)
    pacer = RecordingPacer()
    source = AzureBlobSource.from_connection_string(conn_str, name, retry_total=2, retry_initial_backoff=0.05,
                                                    retry_increment_base=0, pacer=pacer)
    proxy.fail_next(1, status=503, code="ServerBusy", method="GET")
    assert source.read_range("k", 0, 10) == b"x" * 10
    assert pacer.events == [("starts", "get"), ("ended", "ServerBusy (HTTP 503: Service Unavailable)"),
                            ("starts", "get"), ("ended", None)]
    assert proxy.count() == 2
