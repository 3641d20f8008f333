"""A storage account's change feed written the way Azure writes one, into Azurite (which has no
change feed of its own), so that the change-feed path (connectors/azure_changefeed.py) can be
rehearsed and tested: ``$blobchangefeed/meta/segments.json``, one ``idx/segments/YYYY/MM/DD/HHMM/
meta.json`` per hour, and the events of each shard of the hour as Avro records in append blobs under
``log/<shard>/YYYY/MM/DD/HHMM/``, with the fields Azure documents for a change feed record
(schema version 3: ``subject``, ``eventType``, ``eventTime``, ``id``, ``data`` with ``api``,
``etag``, ``contentLength``, ``blobType``, ``sequencer``...).

These are recorded by hand (`LabChangeFeed.write_segment` is given the events), not by the
storage service: they follow Azure's documented layout and fields, and nothing more is known of
them.
"""

from __future__ import annotations

import hashlib
import io
import json
import uuid
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Sequence

from connectors.azure_writer import AzureBlobWriter
from connectors.base import ContentSettings

FEED_CONTAINER = "$blobchangefeed"

# The Avro schema of a change feed record, as Azure documents its fields (schema version 3).
_DATA = {
    "type": "record", "name": "BlobChangeEventData",
    "fields": [
        {"name": "api", "type": "string"},
        {"name": "clientRequestId", "type": "string"},
        {"name": "requestId", "type": "string"},
        {"name": "etag", "type": "string"},
        {"name": "contentType", "type": "string"},
        {"name": "contentLength", "type": "long"},
        {"name": "blobType", "type": "string"},
        {"name": "blobVersion", "type": ["null", "string"], "default": None},
        {"name": "containerVersion", "type": ["null", "string"], "default": None},
        {"name": "blobTier", "type": ["null", "string"], "default": None},
        {"name": "url", "type": "string"},
        {"name": "sequencer", "type": "string"},
        {"name": "isRecursive", "type": ["null", "boolean"], "default": None},
        {"name": "destinationUrl", "type": ["null", "string"], "default": None},
        {"name": "storageDiagnostics", "type": {"type": "map", "values": "string"}},
    ],
}
SCHEMA = {
    "type": "record", "name": "BlobChangeEvent", "namespace": "com.microsoft.azure.storage.changefeed",
    "fields": [
        {"name": "schemaVersion", "type": "int"},
        {"name": "topic", "type": "string"},
        {"name": "subject", "type": "string"},
        {"name": "eventType", "type": "string"},
        {"name": "eventTime", "type": "string"},
        {"name": "id", "type": "string"},
        {"name": "data", "type": _DATA},
    ],
}


def feed_time_text(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


@dataclass
class Change:
    """One event of the feed: blob `name` of `container`, what happened to it (`event_type`, `api`)."""

    container: str
    name: str
    event_type: str = "BlobCreated"
    api: str = "PutBlob"
    size: int = 0
    etag: str = "0x8D000000000000"
    data: dict[str, Any] = field(default_factory=dict)  # further `data` fields (isRecursive, destinationUrl)

    def record(self, at: datetime, account: str, seq: int) -> dict[str, Any]:
        return {
            "schemaVersion": 3,
            "topic": f"/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/lab/providers/"
                     f"Microsoft.Storage/storageAccounts/{account}",
            "subject": f"/blobServices/default/containers/{self.container}/blobs/{self.name}",
            "eventType": self.event_type,
            "eventTime": feed_time_text(at),
            "id": str(uuid.uuid4()),
            "data": {
                "api": self.api, "clientRequestId": str(uuid.uuid4()), "requestId": str(uuid.uuid4()),
                "etag": self.etag, "contentType": "application/octet-stream", "contentLength": self.size,
                "blobType": "BlockBlob", "url": "", "sequencer": f"{seq:032x}",
                "storageDiagnostics": {"batchId": str(uuid.uuid4())}, **self.data,
            },
        }


class LabChangeFeed:
    """The change feed of the account `writer` (`connectors.azure_writer.AzureBlobWriter`) writes to."""

    def __init__(self, writer: AzureBlobWriter, account: str = "devstoreaccount1"):
        self.writer, self.account = writer, account
        writer.ensure_container(FEED_CONTAINER)
        self._placeholder()

    def _placeholder(self) -> None:
        """Azure's index starts with a placeholder dated 1601."""
        self._put("idx/segments/1601/01/01/0000/meta.json", json.dumps({"version": 0}).encode())

    def clear(self) -> None:
        """Remove every segment (a new feed)."""
        for name in self.writer.names(FEED_CONTAINER):
            self.writer.delete(FEED_CONTAINER, name)
        self._placeholder()

    def write_segment(self, begin: datetime, changes: Sequence[Change], *, shards: int = 1,
                      status: str = "Finalized", consumable: bool = True) -> None:
        """The hour starting at `begin`: `changes` spread over `shards` Avro files (a blob's events
        all in one shard, as Azure does), its manifest, and `lastConsumable` moved to it."""
        import fastavro

        hour = begin.astimezone(timezone.utc).strftime("%Y/%m/%d/%H%M")
        folders = [f"log/{n:02d}/{hour}/" for n in range(shards)]
        by_shard: list[list[dict[str, Any]]] = [[] for _ in range(shards)]
        for seq, change in enumerate(changes):
            at = begin + timedelta(seconds=min(seq, 3599))
            by_shard[zlib.crc32(change.name.encode()) % shards].append(change.record(at, self.account, seq))
        for folder, records in zip(folders, by_shard):
            body = io.BytesIO()
            fastavro.writer(body, SCHEMA, records, codec="null", sync_interval=4096)
            self.writer.put_append(FEED_CONTAINER, f"{folder}00000.avro", body.getvalue())
        manifest = {"version": 0, "begin": feed_time_text(begin), "intervalSecs": 3600, "status": status,
                    "config": {"version": 0, "configVersionEtag": "0x8d000000000000", "numShards": shards,
                               "recordsFormat": "avro", "formatSchemaVersion": 3, "shardDistFnVersion": 1},
                    "chunkFilePaths": [f"{FEED_CONTAINER}/{f}" for f in folders],
                    "storageDiagnostics": {"version": 0, "lastModifiedTime": feed_time_text(begin), "data": {}}}
        self._put(f"idx/segments/{hour}/meta.json", json.dumps(manifest).encode())
        if consumable:
            self.set_last_consumable(begin)

    def set_last_consumable(self, begin: datetime) -> None:
        self._put("meta/segments.json", json.dumps({
            "version": 0, "lastConsumable": feed_time_text(begin),
            "storageDiagnostics": {"version": 0, "lastModifiedTime": feed_time_text(begin), "data": {}}}).encode())

    def remove_segment(self, begin: datetime) -> None:
        """What the feed's retention does to an old hour: its manifest and its files go."""
        hour = begin.astimezone(timezone.utc).strftime("%Y/%m/%d/%H%M")
        for name in self.writer.names(FEED_CONTAINER):
            if hour in name:
                self.writer.delete(FEED_CONTAINER, name)

    def delete(self, name: str) -> None:
        self.writer.delete(FEED_CONTAINER, name)

    def _put(self, name: str, body: bytes) -> None:
        self.writer.put_single(FEED_CONTAINER, name, body, ContentSettings(content_type="application/json"), {},
                               hashlib.md5(body).digest())
