"""What `engine.pipeline.copy_object` announces while it copies one object (the state store and
progress listen)."""

from __future__ import annotations

from connectors.base import MultipartUpload, ObjectMeta, PartReceipt
from engine.planning import ObjectPlan, PartPlan


class CopyEvents:
    """Hooks called by `copy_object`, each *before* the side effect it announces where there is one.
    Methods may be called from transfer threads; keep them quick and thread-safe."""

    def attempt_started(self, meta: ObjectMeta, plan: ObjectPlan, restarts: int) -> None:
        """Before any byte of this attempt moves (also after a restart, with the new version)."""

    def source_changed(self, old: ObjectMeta, new: ObjectMeta) -> None:
        """The source changed under us; the object restarts from `new`."""

    def upload_opened(self, upload: MultipartUpload, header: bytes | None, key_id: int | None) -> None:
        """A multipart upload exists (opened, or re-attached to on resume), before any part is
        sent; `header` / `key_id` are the attempt's encryption header and data key (None when the
        output is not encrypted). Its abort on failure is already registered."""

    def part_uploaded(self, part: PartPlan, receipt: PartReceipt, md5: bytes | None) -> None:
        """The destination acknowledged a part of a multipart upload (`md5`: of the bytes sent; None
        for a sink that is sent none, `ObjectSink.part_md5`). A single PUT is not announced here."""

    def part_kept(self, part: PartPlan, receipt: PartReceipt, md5: bytes | None) -> None:
        """Resume: a part already on the destination (listed) was checked and is kept, not re-sent."""

    def bytes_moved(self, n: int) -> None:
        """`n` plaintext bytes were acknowledged by the destination (negative: undone by a restart)."""
