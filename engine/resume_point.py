"""Where an object's copy can continue: the unfinished multipart upload an earlier run left, as its
state row records it (`engine.dataset_copy` builds it; `engine.pipeline.copy_object` continues it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RecordedPart:
    """A part receipt recorded by an earlier run (`md5`: of the bytes sent, when known)."""

    number: int
    etag: str
    size: int
    md5: bytes | None = None


@dataclass(frozen=True)
class ResumePoint:
    """An unfinished multipart upload left by an earlier (killed) run, as its state row says.

    It is continued only if the source still has `source_etag` and `size` and the object still
    goes to `dest_key`; otherwise the upload is aborted and the object starts over with a new
    header. `header` / `key_id` are the attempt's encryption header and data key (None: not
    encrypted). `parts` are the receipts that run recorded; parts it sent but did not record are
    found with ListParts."""

    dest_key: str
    upload_id: str
    source_etag: str
    size: int
    header: bytes | None = None
    key_id: int | None = None
    parts: tuple[RecordedPart, ...] = ()

