"""In-memory source and sink, for the engine's unit tests and fault injection.

They behave like the real stores where the engine can tell the difference: listings are paged and
sorted, ETags change on every write, If-Match is enforced, multipart uploads enforce the minimum
part size, check Content-MD5 and produce S3's `md5-of-md5s-N` ETag.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Iterator, Sequence

from .base import (
    IntegrityError,
    InvalidRequest,
    ListingPage,
    ListingRange,
    NotFound,
    ObjectMeta,
    PartBody,
    PartReceipt,
    PendingUpload,
    SinkBehaviour,
    SinkLimits,
    SourceChanged,
    TransientError,
    WriteMeta,
    multipart_etag,
)


def _body_bytes(body: PartBody, size: int) -> bytes:
    if isinstance(body, (bytes, bytearray, memoryview)):
        data = bytes(body)
    else:
        chunks = []
        while True:
            chunk = body.read(1024 * 1024)
            if not chunk:
                break
            chunks.append(chunk)
        data = b"".join(chunks)
    if len(data) != size:
        raise TransientError(f"body was {len(data)} bytes, {size} announced")
    return data


@dataclass
class _Stored:
    data: bytes
    meta: ObjectMeta


class MemoryStore:
    """A bucket in memory, usable as source (`ObjectSource`) and sink (`ObjectSink`)."""

    unsupported: frozenset[str] = frozenset()
    etag_is_md5: bool = True
    behaviour: SinkBehaviour = SinkBehaviour()

    def __init__(self, limits: SinkLimits | None = None, page_size: int = 1000, label: str = "memory"):
        self.limits = limits or SinkLimits()
        self.page_size = page_size
        self.label = label
        self._objects: dict[str, _Stored] = {}
        self._uploads: dict[str, _MemoryUpload] = {}
        self._lock = threading.Lock()
        self._versions = itertools.count(1)
        self.list_calls = 0
        self.page_requests: list[tuple[ListingRange, str | None]] = []  # (range, marker) per listing page

    # ---- writing helpers for tests -------------------------------------------------------

    def add(self, key: str, data: bytes, *, content_md5: bool = True, tier: str | None = "Hot",
            meta: WriteMeta | None = None) -> ObjectMeta:
        """Store `data` under `key` (a new ETag each time), optionally without a Content-MD5."""
        meta = meta or WriteMeta()
        om = ObjectMeta(
            key=key,
            size=len(data),
            etag=f"0x{next(self._versions):016X}",
            content_md5=hashlib.md5(data).digest() if content_md5 else None,
            last_modified=datetime.now(timezone.utc),
            tier=tier,
            content=meta.content,
            metadata=dict(meta.metadata),
            tags=dict(meta.tags),
        )
        with self._lock:
            self._objects[key] = _Stored(bytes(data), om)
        return om

    def data(self, key: str) -> bytes:
        return self._get(key).data

    def keys(self) -> list[str]:
        with self._lock:
            return sorted(self._objects)

    def pending_uploads(self) -> int:
        with self._lock:
            return len(self._uploads)

    # ---- ObjectSource ----------------------------------------------------------------------

    def _get(self, key: str) -> _Stored:
        with self._lock:
            stored = self._objects.get(key)
        if stored is None:
            raise NotFound(f"{self.label}: no object {key!r}", key=key)
        return stored

    def list(self, prefix: str = "") -> Iterator[ObjectMeta]:
        marker = ""
        while True:
            self.list_calls += 1
            with self._lock:
                page = sorted(k for k in self._objects if k.startswith(prefix) and k > marker)[: self.page_size]
                metas = [self._objects[k].meta for k in page]
            yield from metas
            if len(page) < self.page_size:
                return
            marker = page[-1]

    def folders(self, prefix: str, limit: int) -> tuple[list[str], bool] | None:
        self.list_calls += 1
        with self._lock:
            below = {k[len(prefix):] for k in self._objects if k.startswith(prefix)}
        found = sorted({prefix + rest[:rest.index("/") + 1] for rest in below if "/" in rest})
        direct = any("/" not in rest for rest in below)
        return None if len(found) + direct > limit else (found, direct)

    def list_pages(self, part: ListingRange, marker: str | None = None) -> Iterator[ListingPage]:
        """Pages of `part` with the last key as the marker; every request is in `page_requests`."""
        marker = marker or ""
        while True:
            self.list_calls += 1
            self.page_requests.append((part, marker or None))
            with self._lock:
                keys = sorted(k for k in self._objects if k.startswith(part.prefix) and k > marker
                              and not (part.direct and "/" in k[len(part.prefix):]))[: self.page_size]
                metas = [self._objects[k].meta for k in keys]
            last = len(keys) < self.page_size
            yield ListingPage(metas, None if last else keys[-1])
            if last:
                return
            marker = keys[-1]

    def head(self, key: str) -> ObjectMeta:
        return self._get(key).meta

    def read_range(self, key: str, start: int, end: int, *, if_match: str | None = None) -> bytes:
        stored = self._get(key)
        if if_match is not None and stored.meta.etag != if_match:
            raise SourceChanged(f"{self.label}: {key!r} changed (ETag {stored.meta.etag}, expected {if_match})", key=key)
        if start < 0 or end > stored.meta.size or start > end:
            raise InvalidRequest(f"{self.label}: range {start}-{end} outside {key!r} ({stored.meta.size} bytes)", key=key)
        return stored.data[start:end]

    def tags(self, key: str) -> dict[str, str]:
        return dict(self._get(key).meta.tags)

    # ---- ObjectSink ------------------------------------------------------------------------

    def put(self, key: str, body: PartBody, size: int, meta: WriteMeta, md5: bytes | None) -> str:
        data = _body_bytes(body, size)
        digest = hashlib.md5(data).digest()
        if md5 is not None and md5 != digest:
            raise IntegrityError(f"{self.label}: Content-MD5 mismatch for {key!r}", key=key)
        om = self.add(key, data, meta=meta, tier=meta.storage_class)  # as S3 reports its class
        etag = digest.hex()
        with self._lock:
            self._objects[key].meta = replace(om, etag=etag)
        return etag

    def open_multipart(self, key: str, meta: WriteMeta) -> "_MemoryUpload":
        upload = _MemoryUpload(self, key, f"mem-{next(self._versions)}", meta)
        with self._lock:
            self._uploads[upload.upload_id] = upload
        return upload

    def resume_multipart(self, key: str, upload_id: str) -> "_MemoryUpload":
        with self._lock:
            upload = self._uploads.get(upload_id)
        if upload is None or upload.key != key:
            raise NotFound(f"{self.label}: no multipart upload {upload_id} for {key!r}", key=key)
        return upload

    def list_multipart_uploads(self, prefix: str = "") -> Iterator[PendingUpload]:
        with self._lock:
            uploads = sorted(self._uploads.values(), key=lambda u: (u.key, u.upload_id))
        for u in uploads:
            if u.key.startswith(prefix):
                yield PendingUpload(u.key, u.upload_id, u.initiated)

    def delete(self, key: str) -> None:
        with self._lock:
            self._objects.pop(key, None)


@dataclass
class _MemoryUpload:
    store: MemoryStore
    key: str
    upload_id: str
    meta: WriteMeta
    parts: dict[int, tuple[bytes, str]] = field(default_factory=dict)
    initiated: datetime = field(default_factory=lambda: datetime.now(timezone.utc))

    def upload_part(self, number: int, body: PartBody, size: int, md5: bytes | None,
                    offset: int | None = None) -> PartReceipt:
        if not 1 <= number <= self.store.limits.max_parts:
            raise InvalidRequest(f"part number {number} outside 1..{self.store.limits.max_parts}", key=self.key)
        data = _body_bytes(body, size)
        digest = hashlib.md5(data)
        if md5 is not None and md5 != digest.digest():
            raise IntegrityError(f"{self.store.label}: Content-MD5 mismatch on part {number} of {self.key!r}", key=self.key)
        with self.store._lock:
            if self.upload_id not in self.store._uploads:
                raise NotFound(f"{self.store.label}: upload {self.upload_id} is gone", key=self.key)
            self.parts[number] = (data, digest.hexdigest())
        return PartReceipt(number, digest.hexdigest(), len(data))

    def list_parts(self) -> list[PartReceipt]:
        with self.store._lock:
            return [PartReceipt(n, etag, len(d)) for n, (d, etag) in sorted(self.parts.items())]

    def complete(self, parts: Sequence[PartReceipt]) -> str:
        with self.store._lock:
            if self.upload_id not in self.store._uploads:
                raise NotFound(f"{self.store.label}: upload {self.upload_id} is gone", key=self.key)
            numbers = [p.number for p in parts]
            if numbers != sorted(set(numbers)) or not numbers:
                raise InvalidRequest("parts must be listed once each, in ascending order", key=self.key)
            chunks, md5s = [], []
            for i, receipt in enumerate(parts):
                held = self.parts.get(receipt.number)
                if held is None or held[1] != receipt.etag:
                    raise InvalidRequest(f"part {receipt.number} unknown or its ETag differs", key=self.key)
                if i < len(parts) - 1 and len(held[0]) < self.store.limits.min_part_size:
                    raise InvalidRequest(f"part {receipt.number} is below the minimum part size", key=self.key)
                chunks.append(held[0])
                md5s.append(bytes.fromhex(held[1]))
            del self.store._uploads[self.upload_id]
        om = self.store.add(self.key, b"".join(chunks), content_md5=False, tier=self.meta.storage_class, meta=self.meta)
        etag = multipart_etag(md5s)
        with self.store._lock:
            self.store._objects[self.key].meta = replace(om, etag=etag)
        return etag

    def abort(self) -> None:
        with self.store._lock:
            self.store._uploads.pop(self.upload_id, None)
