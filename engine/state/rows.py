"""The rows the store writes, built and checked before any write: an object's insert row, a
transition's parameters, a listing row. The store and its write batch share them."""

from __future__ import annotations

from dataclasses import fields
from datetime import datetime, timezone
from typing import Any, Mapping

from connectors.base import ContentSettings, ObjectMeta

from .schema import (FAILED, IN_PROGRESS, INITIAL_STATES, TRANSITIONS, UNCHANGED, UPLOADED, VERIFIED, InvalidTransition,
                     listing, objects, utcnow)

# Columns a transition may set besides the state.
_OBJECT_FIELDS = frozenset({
    "reason", "sha256", "source_md5", "md5_checked", "dest_key", "dest_etag", "output_size", "part_count",
    "restarts", "source_etag", "size", "started_at", "finished_at", "upload_id", "header", "key_id", "transient",
    "etag_checked", "storage_class", "tags_digest",
})

# Every column an `objects` row is inserted with (a batch of inserts is one executemany: same keys).
INSERT_COLUMNS = tuple(c.name for c in objects.columns if c.name != "id")
# Every column of a `listing` row (`listing_row`).
LISTING_COLUMNS = tuple(c.name for c in listing.columns)


def object_row(run_id: int, dataset: str, source_key: str, source_etag: str, size: int, dest_key: str | None,
               source_md5: bytes | None, state: str, fields: Mapping[str, Any]) -> dict[str, Any]:
    """A full `objects` row (every column of `INSERT_COLUMNS`) created in `state` with `fields`."""
    if state not in INITIAL_STATES:
        raise InvalidTransition(f"an object cannot be recorded as {state!r} straight away "
                                f"(allowed: {', '.join(sorted(INITIAL_STATES))})")
    _check_fields(fields)
    now = utcnow()
    row = dict.fromkeys(INSERT_COLUMNS)
    row.update(run_id=run_id, dataset=dataset, source_key=source_key, source_etag=source_etag, size=size,
               dest_key=dest_key, source_md5=source_md5.hex() if source_md5 else None, md5_checked=False,
               restarts=0, created_at=now)
    row.update(_stamped(state, fields, now))
    return row


_CONTENT_FIELDS = tuple(f.name for f in fields(ContentSettings))


def listing_row(run_id: int, dataset: str, seq: int, shard: int, meta: ObjectMeta) -> dict[str, Any]:
    """A `listing` row: one listed object of a run's dataset, at position `seq`, in `shard`."""
    # Attribute by attribute: `asdict` (recursive, deep-copying) cost more than the rest of the row.
    content = {k: v for k in _CONTENT_FIELDS if (v := getattr(meta.content, k)) is not None}
    modified = meta.last_modified
    if modified is not None and modified.tzinfo is not None:
        modified = modified.astimezone(timezone.utc).replace(tzinfo=None)
    created = meta.created
    if created is not None and created.tzinfo is not None:
        created = created.astimezone(timezone.utc).replace(tzinfo=None)
    extra = {k: v for k in LISTED_EXTRA if (v := getattr(meta, k))}
    if meta.tags:
        extra["tags"] = dict(meta.tags)
    if not meta.current_version:
        extra["current_version"] = False
    return dict(run_id=run_id, dataset=dataset, seq=seq, shard=shard, source_key=meta.key, etag=meta.etag,
                size=meta.size, content_md5=meta.content_md5.hex() if meta.content_md5 else None,
                last_modified=modified, tier=meta.tier, content=content or None, meta=dict(meta.metadata) or None,
                created=created, kind=meta.kind, extra=extra or None)


# `ObjectMeta` fields kept as they are in a listing row's `extra` when set (tags and
# `current_version` too, by `listing_row`; read back by `listed_extra`).
LISTED_EXTRA = ("not_copyable", "snapshot", "version_id", "rehydrating")


def listed_extra(extra: Mapping[str, Any] | None) -> dict[str, Any]:
    """The `ObjectMeta` keyword arguments of a listing row's `extra` (None for most rows)."""
    if not extra:
        return {}
    out = {k: extra[k] for k in LISTED_EXTRA if k in extra}
    if "tags" in extra:
        out["tags"] = extra["tags"]
    if "current_version" in extra:
        out["current_version"] = extra["current_version"]
    return out


def _check_fields(fields: Mapping[str, Any]) -> None:
    unknown = set(fields) - _OBJECT_FIELDS
    if unknown:
        raise ValueError(f"unknown object fields: {sorted(unknown)}")


def _stamped(new_state: str, fields: Mapping[str, Any], now: datetime) -> dict[str, Any]:
    """`fields` with the state and the times a move to `new_state` sets."""
    values = dict(fields, state=new_state, updated_at=now)
    if new_state == IN_PROGRESS and "started_at" not in fields:
        values["started_at"] = now
    if new_state in (UPLOADED, FAILED, UNCHANGED, VERIFIED) and "finished_at" not in fields:
        values["finished_at"] = now
    return values


def transition_values(object_id: int, new_state: str, fields: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters of the store's update to `new_state` for a move with `fields` (checked first)."""
    if new_state not in TRANSITIONS:
        raise ValueError(f"unknown object state {new_state!r}")
    _check_fields(fields)
    values = _stamped(new_state, fields, utcnow())
    values["_object_id"] = object_id
    return values
