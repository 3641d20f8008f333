"""What happened to one object copied by `engine.pipeline.copy_object`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Status = Literal["ok", "failed", "skipped"]


@dataclass(frozen=True)
class ObjectOutcome:
    """What happened to one object. `size` is the plaintext size of the version copied (or tried).

    `parts` is 1 for a single PUT; `bytes_sent` counts output bytes acknowledged by the destination
    in the final attempt; `restarts` counts source changes; `attempts` counts the requests the
    engine issued for the object (range reads, heads, PUT / open / part uploads / complete),
    retries and restarts included: with no fault it is reads + uploads + 2 for a multipart object. `refused` marks an
    object that never started because it cannot be written (too large, a name or metadata that
    does not fit): its status is "failed". `retried`: of those, the requests sent again after a
    retryable failure; `resent`: the part uploads and single PUTs among them (bytes sent again by the
    engine; the SDK's own retries are counted by the connector). `resumed`: the final attempt continued an upload left
    by an earlier run; `parts_kept` of its parts were already there (checked, not re-sent).
    """

    source_key: str
    dest_key: str
    source_etag: str
    size: int
    status: Status
    reason: str | None = None
    sha256: str | None = None
    md5_checked: bool = False
    # Whether the destination's answers were compared with the MD5s of the bytes sent (ETags that
    # are MD5s); False where they are opaque: the server's Content-MD5 check and the sizes only.
    etag_checked: bool = False
    dest_etag: str | None = None
    parts: int = 0
    bytes_sent: int = 0
    restarts: int = 0
    attempts: int = 0
    retried: int = 0
    resent: int = 0
    output_size: int = 0
    refused: bool = False
    resumed: bool = False
    parts_kept: int = 0
    # An upload an earlier run left was given up and the object started over, because the provider
    # cannot list its parts (`multipart.list_parts: false`).
    upload_restarted: bool = False
    transient: bool = False  # a failure whose cause may pass: trying again later can succeed
