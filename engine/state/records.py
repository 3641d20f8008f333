"""The values the state store's reads return: frozen, named, never a database row."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Mapping


@dataclass(frozen=True)
class ObjectRecord:
    id: int
    run_id: int
    dataset: str
    source_key: str
    source_etag: str
    size: int
    state: str
    reason: str | None
    sha256: str | None
    source_md5: str | None
    md5_checked: bool
    dest_key: str | None
    dest_etag: str | None
    output_size: int | None
    part_count: int | None
    restarts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    upload_id: str | None = None
    header: str | None = None  # hex
    key_id: int | None = None


@dataclass(frozen=True)
class PartRecord:
    """A part the destination acknowledged (`md5`: hex of the bytes sent, None if unknown)."""

    number: int
    etag: str
    size: int
    md5: str | None


@dataclass(frozen=True)
class ShardRecord:
    """A shard of a run: consecutive listed objects of one dataset, and how its task went."""

    run_id: int
    dataset: str
    shard: int
    objects: int
    bytes: int
    first_key: str
    last_key: str
    status: str
    attempts: int
    seconds: float | None
    reason: str | None
    started_at: datetime | None
    finished_at: datetime | None
    worker: str | None = None


@dataclass(frozen=True)
class ShardCounts:
    """What the state store says of a shard's objects in its run: state -> (objects, bytes), the
    destination bytes written, and the first failures with their reasons."""

    states: Mapping[str, tuple[int, int]]
    output_bytes: int
    failures: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class DatasetTotals:
    """A run's rows of one dataset, added up (`failed` includes rows left in progress; `refused`
    are failed rows whose copy never started)."""

    objects: int
    copied: int
    failed: int
    unchanged: int
    refused: int
    bytes_total: int
    bytes_copied: int
    bytes_written: int
    parts: int
    restarts: int
    failures: tuple[tuple[str, str], ...] = ()
    failures_truncated: bool = False


@dataclass(frozen=True)
class RunRecord:
    id: int
    command: str
    config_path: str | None
    dry_run: bool
    status: str
    started_at: datetime
    finished_at: datetime | None
    objects_total: int
    objects_ok: int
    objects_failed: int
    objects_skipped: int
    bytes_total: int
    bytes_sent: int


@dataclass(frozen=True)
class DatasetFigures:
    """A dataset's objects by their newest copy (per source key, the newest row that copied, was
    verified or failed): how many and how many bytes are at the destination, and how proven."""

    dataset: str
    objects: int
    bytes: int  # plaintext, of every object counted
    verified: int
    unverified: int  # copied, not verified yet
    failed: int
    output_bytes: int  # stored at the destination (ciphertext for encrypted datasets); failed rows excluded
    last_finished: datetime | None  # naive UTC, of the newest copy that did not fail
