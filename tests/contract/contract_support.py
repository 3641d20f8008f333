"""Harnesses that put every connector through the same contract cases (used by conftest.py and the tests).

A harness gives a test a fresh container or bucket, the connector under test over it, and a way to
seed and read objects *without* the connector (the SDK directly, or the in-memory store's own
helpers), so the cases check the connector against an independent view of the store.

Every harness offers: `source(page_size)`, `sink(page_size)`, `reopen_sink()` (a new connector on
the same store, as another process would build), `missing_source()` (a connector over a container or
bucket that does not exist, or a skip with the reason), `seed(...)` and `raw_read(key)`.
"""

from __future__ import annotations

import hashlib
import io
import uuid
from typing import Mapping

import boto3
import pytest
from botocore.config import Config

from connectors.base import ContentSettings, SinkLimits, WriteMeta
from connectors.memory import MemoryStore
from flows import lab_processes as lp


def require(connector, capability: str) -> None:
    """Skip the running case when `connector` lists `capability` in its `unsupported` set."""
    if capability in connector.unsupported:
        pytest.skip(f"{connector.label} states {capability!r} in its unsupported set")


def unique_name(prefix: str = "ct") -> str:
    # Lowercase letters, digits and dashes, 3-63 characters: valid for Azure containers and S3 buckets.
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


class MemoryHarness:
    name = "memory"

    def __init__(self):
        self.store = MemoryStore(limits=SinkLimits(), label="memory:contract")

    def source(self, page_size: int = 1000):
        self.store.page_size = page_size
        return self.store

    def sink(self, page_size: int = 1000):
        self.store.page_size = page_size
        return self.store

    def reopen_sink(self):
        # A memory store lives in this process only: "another process" is the same object.
        return self.store

    def missing_source(self):
        pytest.skip("MemoryStore is one bucket in memory: there is no container that could be missing")

    def seed(self, key: str, data: bytes, *, content: ContentSettings = ContentSettings(),
             metadata: Mapping[str, str] | None = None, with_md5: bool = True) -> None:
        self.store.add(key, data, content_md5=with_md5, meta=WriteMeta(content, dict(metadata or {})))

    def raw_read(self, key: str) -> bytes:
        return self.store.data(key)


class AzuriteHarness:
    name = "azurite"

    def __init__(self, connection_string: str):
        from azure.storage.blob import BlobServiceClient

        self.connection_string = connection_string
        self.service = BlobServiceClient.from_connection_string(connection_string)
        self.container = unique_name()
        self.client = self.service.create_container(self.container)

    def source(self, page_size: int = 1000):
        from connectors.azure_blob import AzureBlobSource

        return AzureBlobSource.from_connection_string(self.connection_string, self.container, page_size=page_size,
                                                      retry_total=1, retry_initial_backoff=0.05, retry_increment_base=0)

    sink = reopen_sink = source

    def missing_source(self):
        from connectors.azure_blob import AzureBlobSource

        return AzureBlobSource.from_connection_string(self.connection_string, unique_name("missing"), retry_total=0)

    def seed(self, key: str, data: bytes, *, content: ContentSettings = ContentSettings(),
             metadata: Mapping[str, str] | None = None, with_md5: bool = True) -> None:
        from azure.storage.blob import BlobBlock, ContentSettings as AzureContentSettings

        settings = AzureContentSettings(
            content_type=content.content_type, content_encoding=content.content_encoding,
            cache_control=content.cache_control, content_disposition=content.content_disposition,
            content_language=content.content_language,
        )
        blob = self.client.get_blob_client(key)
        if with_md5:
            # A single-shot Put Blob: the service computes and keeps the Content-MD5.
            blob.upload_blob(data, overwrite=True, content_settings=settings, metadata=dict(metadata or {}))
        else:
            # Put Block + Put Block List without a Content-MD5: the blob has none (as on Azure).
            block_id = "YmxvY2stMDAwMQ=="
            blob.stage_block(block_id, data)
            blob.commit_block_list([BlobBlock(block_id)], content_settings=settings, metadata=dict(metadata or {}))

    def raw_read(self, key: str) -> bytes:
        return self.client.get_blob_client(key).download_blob().readall()


def lab_boto3_client(endpoint_url: str, *, verify: bool = True):
    """A plain boto3 client for the lab server: the independent oracle for what S3Store wrote."""
    return boto3.client(
        "s3", endpoint_url=endpoint_url, region_name=lp.LAB_REGION,
        aws_access_key_id=lp.LAB_S3_ACCESS_KEY, aws_secret_access_key=lp.LAB_S3_SECRET_KEY, verify=verify,
        config=Config(s3={"addressing_style": "path"}, request_checksum_calculation="when_required",
                      response_checksum_validation="when_required"),
    )


def make_s3_store(endpoint_url: str, bucket: str, **kwargs):
    from connectors.s3 import S3Store

    kwargs.setdefault("limits", SinkLimits())
    kwargs.setdefault("max_attempts", 2)
    return S3Store(
        bucket, endpoint_url=endpoint_url, region=lp.LAB_REGION, access_key_id=lp.LAB_S3_ACCESS_KEY,
        secret_access_key=lp.LAB_S3_SECRET_KEY, **kwargs,
    )


def refuse_client_operations(store, monkeypatch, *operations: str) -> None:
    """Fail the test if `store` sends any of `operations` (boto3 method names) through its client
    rather than as a direct request."""
    for operation in operations:
        def refused(*_args, _operation=operation, **_kwargs):
            raise AssertionError(f"{_operation} went through the client, not as a direct request")
        monkeypatch.setattr(store._client, operation, refused)


class S3Harness:
    """A fresh bucket on an S3 server (`name`: "s3" for moto, "ministack" for the second server)."""

    def __init__(self, endpoint_url: str, name: str = "s3"):
        self.name = name
        self.endpoint_url = endpoint_url
        self.bucket = unique_name()
        self.client = lab_boto3_client(endpoint_url)
        self.client.create_bucket(Bucket=self.bucket,
                                  CreateBucketConfiguration={"LocationConstraint": lp.LAB_REGION})

    def source(self, page_size: int = 1000):
        return make_s3_store(self.endpoint_url, self.bucket, page_size=page_size)

    sink = source

    def reopen_sink(self):
        return make_s3_store(self.endpoint_url, self.bucket)

    def missing_source(self):
        return make_s3_store(self.endpoint_url, unique_name("missing"))

    def seed(self, key: str, data: bytes, *, content: ContentSettings = ContentSettings(),
             metadata: Mapping[str, str] | None = None, with_md5: bool = True) -> None:
        params = {"Bucket": self.bucket, "Key": key, "Metadata": dict(metadata or {})}
        for name, value in (("ContentType", content.content_type), ("ContentEncoding", content.content_encoding),
                            ("CacheControl", content.cache_control),
                            ("ContentDisposition", content.content_disposition),
                            ("ContentLanguage", content.content_language)):
            if value is not None:
                params[name] = value
        if with_md5:
            self.client.put_object(Body=data, **params)
            return
        # A one-part multipart upload: its ETag is md5-of-md5s-1, so S3 keeps no object MD5.
        upload = self.client.create_multipart_upload(**params)
        part = self.client.upload_part(Bucket=self.bucket, Key=key, UploadId=upload["UploadId"], PartNumber=1,
                                       Body=data)
        self.client.complete_multipart_upload(
            Bucket=self.bucket, Key=key, UploadId=upload["UploadId"],
            MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": part["ETag"]}]},
        )

    def raw_read(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()


class SftpHarness:
    """A fresh directory on the test sshd, read and written through `SftpStore` with its sessions
    carried by `transport`; seeded and read back on the server's own file system (the sshd serves
    this machine's disk), with the sidecar metadata file written as connectors/sftp.py documents it."""

    def __init__(self, layout, transport: str = "openssh"):
        self.layout = layout
        self.transport = transport  # what carries the SSH connections: "openssh" or "paramiko"
        self.name = "sftp" if transport == "openssh" else f"sftp-{transport}"
        self.dir = layout.root / unique_name()
        self.dir.mkdir()

    def _store(self, root, **kwargs):
        from connectors.sftp import HostKeyPin, SftpLogin, SftpStore

        kwargs.setdefault("limits", SinkLimits())
        kwargs.setdefault("transport", self.transport)
        return SftpStore(lp.LOOPBACK, self.layout.port, str(root),
                         SftpLogin(self.layout.username, self.layout.user_key.read_text()),
                         HostKeyPin(known_hosts=str(self.layout.known_hosts)), connections=2, **kwargs)

    def source(self, page_size: int = 1000):
        store = self._store(self.dir)
        store.source_details = True  # as a dataset's source is opened (engine/endpoints.py)
        return store

    def sink(self, page_size: int = 1000):
        return self._store(self.dir)

    reopen_sink = sink

    def missing_source(self):
        return self._store(self.layout.root / unique_name("missing"))

    def seed(self, key: str, data: bytes, *, content: ContentSettings = ContentSettings(),
             metadata: Mapping[str, str] | None = None, with_md5: bool = True) -> None:
        import json

        path = self.dir / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        st = path.stat()
        sidecar = {"marker": f"s{st.st_size}-t{int(st.st_mtime)}",
                   "content": {k: v for k, v in vars(content).items() if v is not None},
                   "metadata": dict(metadata or {})}
        if with_md5:
            sidecar["content_md5"] = hashlib.md5(data).hexdigest()
        meta_path = self.dir / ".exitplan-sftp" / "meta" / f"{key}.json"
        meta_path.parent.mkdir(parents=True, exist_ok=True)
        meta_path.write_text(json.dumps(sidecar))

    def raw_read(self, key: str) -> bytes:
        return (self.dir / key).read_bytes()


def md5(data: bytes) -> bytes:
    return hashlib.md5(data).digest()


class OneWayStream(io.RawIOBase):
    """A non-seekable stream handing out `data` in uneven chunks, like a socket."""

    def __init__(self, data: bytes, chunk: int = 65_537):
        self._data = memoryview(data)
        self._pos = 0
        self._chunk = chunk

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self._chunk, len(self._data) - self._pos)
        buffer[:n] = self._data[self._pos:self._pos + n]
        self._pos += n
        return n


def one_way_stream(data: bytes):
    """A buffered, non-seekable reader over `data` (what the engine hands over for huge parts)."""
    return io.BufferedReader(OneWayStream(data), buffer_size=16_384)
