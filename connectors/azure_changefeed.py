"""An Azure storage account's change feed read as "which blob names changed since then".

Azure writes the feed into the account's `$blobchangefeed` container:

- ``meta/segments.json``: ``lastConsumable``, the start of the newest hour whose changes are all
  written (every segment up to it is final);
- ``idx/segments/YYYY/MM/DD/HHMM/meta.json``: one segment per hour (``begin``, ``status``,
  ``chunkFilePaths``: one folder per shard of the segment);
- ``log/<shard>/YYYY/MM/DD/HHMM/<n>.avro``: the events, as Avro records (``subject``
  ``/blobServices/default/containers/<container>/blobs/<name>``, ``eventType``, ``eventTime``,
  ``data.api``...).

exitplan does not replay events: it only asks which names of a container an event touched
(`ChangeFeed.changed_names`) and lists each of those names again (what the blob, its properties,
tags and earlier states are *now*). Order, duplicates and the kind of event therefore do not
matter, and reading a segment twice is harmless: the position kept between runs is a segment's
start time (`lastConsumable` when the reading began), not an offset inside an Avro block.

Refused (`FeedUnusable`: the caller lists the container in full instead, saying why): an account
without a change feed; a feed whose oldest segment begins after the position asked for (retention
removed changes that were never read, or the feed was switched on after that time); a segment up
to `lastConsumable` that is not final; an operation on a folder of a hierarchical namespace (a
rename or a recursive delete changes many names with one event). Read errors are connector errors
of their own and stop the reading (nothing is swallowed).

The Avro files are decoded by fastavro, streamed by ranges pinned to each file's ETag
(`connectors.azure_inventory.RangedBlobFile`): memory holds one Avro block at a time.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Iterator

from .azure_inventory import READ_CHUNK, RangedBlobFile
from .base import ConnectorError, NotFound, ObjectSource

FEED_CONTAINER = "$blobchangefeed"
SEGMENTS = "meta/segments.json"
SEGMENT_INDEX = "idx/segments/"
# Azure's first entry in the index is a placeholder dated 1601 (the Windows epoch), not a segment.
PLACEHOLDER_YEAR = 1601
# The hour a segment covers when its manifest does not say.
DEFAULT_INTERVAL = timedelta(hours=1)

_SEGMENT_PATH = re.compile(r"^idx/segments/(\d{4})/(\d{2})/(\d{2})/(\d{2})(\d{2})/meta\.json$")
_SUBJECT = re.compile(r"^/blobServices/default/containers/([^/]+)/blobs/(.+)$", re.DOTALL)
# Operations of a hierarchical namespace on a folder: one event for many names.
_FOLDER_APIS = {"RenameDirectory", "DeleteDirectory", "RenameFile"}


class FeedUnusable(Exception):
    """The change feed cannot say everything that changed since the position asked for: the
    sentence says why; the caller lists in full."""


@dataclass(frozen=True)
class Segment:
    begin: datetime
    path: str  # idx/segments/YYYY/MM/DD/HHMM/meta.json


@dataclass
class FeedReading:
    """What one reading of the feed went through, for the run's records and messages."""

    segments: int = 0
    chunks: int = 0
    events: int = 0  # every event of the segments read
    matching: int = 0  # events on a blob of the container and prefix asked for


def feed_time(text: str) -> datetime:
    """A time as the feed writes it (``2020-06-01T21:00:00.000Z``), in UTC."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(timezone.utc)


def time_text(moment: datetime) -> str:
    """A feed position as stored between runs."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class ChangeFeed:
    """The change feed of the account `reader` (an `AzureBlobSource` opened on `$blobchangefeed`)."""

    def __init__(self, reader: ObjectSource):
        self.reader = reader

    @property
    def label(self) -> str:
        return f"the change feed ({getattr(self.reader, 'label', FEED_CONTAINER)})"

    def last_consumable(self) -> datetime:
        """The start of the newest segment whose changes are all written. `FeedUnusable` when the
        account has no change feed."""
        try:
            meta = self.reader.head(SEGMENTS)
        except NotFound:
            raise FeedUnusable("the storage account has no change feed (no $blobchangefeed/meta/segments.json); "
                               "enable it on the account (Data protection, 'Enable blob change feed')") from None
        doc = self._json(SEGMENTS, meta.size, meta.etag)
        try:
            return feed_time(doc["lastConsumable"])
        except (KeyError, TypeError, ValueError):
            raise FeedUnusable(f"{FEED_CONTAINER}/{SEGMENTS} has no readable lastConsumable") from None

    def changed_names(self, container: str, prefix: str, after: datetime, through: datetime,
                      reading: FeedReading | None = None) -> Iterator[str]:
        """The names of blobs of `container` under `prefix` that an event of a segment beginning
        after `after` and at or before `through` touched (a name may come more than once).
        `FeedUnusable` (raised before any name when it concerns the segments, or as the event is
        met) when the feed cannot say everything that changed."""
        reading = reading if reading is not None else FeedReading()
        segments = self._segments_between(after, through)
        for segment in segments:
            reading.segments += 1
            for chunk in self._chunks(segment):
                reading.chunks += 1
                for event in self._events(chunk):
                    reading.events += 1
                    name = self._name(event, container)
                    if name is not None and name.startswith(prefix):
                        reading.matching += 1
                        yield name

    # ---- segments ---------------------------------------------------------------------------

    def _segments_between(self, after: datetime, through: datetime) -> list[Segment]:
        """The segments beginning after `after` and at or before `through`, oldest first; checks
        that the feed still holds every segment after `after`."""
        segments = sorted((s for s in self._index() if s.begin.year != PLACEHOLDER_YEAR), key=lambda s: s.begin)
        if not segments or segments[0].begin > after + DEFAULT_INTERVAL:
            oldest = time_text(segments[0].begin) if segments else "none"
            raise FeedUnusable(f"the change feed's oldest segment ({oldest}) begins after the last position read "
                               f"({time_text(after)}): changes in between may have been removed by the feed's "
                               "retention, or the feed was enabled since")
        return [s for s in segments if after < s.begin <= through]

    def _index(self) -> Iterator[Segment]:
        for meta in self.reader.list(SEGMENT_INDEX):
            found = _SEGMENT_PATH.match(meta.key)
            if found:
                y, mo, d, h, mi = (int(g) for g in found.groups())
                yield Segment(datetime(y, mo, d, h, mi, tzinfo=timezone.utc), meta.key)

    def _chunks(self, segment: Segment) -> Iterator[tuple[str, int, str]]:
        """The Avro files of a segment, shard by shard: (name, size, ETag)."""
        head = self.reader.head(segment.path)
        doc = self._json(segment.path, head.size, head.etag)
        if doc.get("status") != "Finalized":
            raise FeedUnusable(f"the change feed segment {segment.path} is {doc.get('status')!r}, not 'Finalized', "
                               "although meta/segments.json says it is consumable")
        for shard in doc.get("chunkFilePaths") or []:
            folder = str(shard).removeprefix(f"{FEED_CONTAINER}/")
            for meta in self.reader.list(folder):
                if meta.key.endswith(".avro"):
                    yield meta.key, meta.size, meta.etag

    def _events(self, chunk: tuple[str, int, str]) -> Iterator[dict[str, Any]]:
        import fastavro

        key, size, etag = chunk
        if size == 0:
            return
        raw = io.BufferedReader(RangedBlobFile(self.reader, key, size, etag), READ_CHUNK)
        try:
            records = fastavro.reader(raw)
        except Exception as exc:  # fastavro's own errors: not an Avro file
            raise ConnectorError(f"{self.label}: {key} is not an Avro file ({type(exc).__name__}: {exc})",
                                 key=key) from None
        try:
            yield from records
        except ConnectorError:
            raise
        except Exception as exc:
            raise ConnectorError(f"{self.label}: {key} cannot be decoded ({type(exc).__name__}: {exc})",
                                 key=key) from None

    def _name(self, event: dict[str, Any], container: str) -> str | None:
        """The blob of `container` an event names, or None (another container, or no blob)."""
        found = _SUBJECT.match(str(event.get("subject") or ""))
        if found is None or found.group(1) != container:
            return None
        data = event.get("data") or {}
        if data.get("isRecursive") or data.get("destinationUrl") or data.get("api") in _FOLDER_APIS:
            raise FeedUnusable(f"the change feed has a {data.get('api') or event.get('eventType')} of "
                               f"{found.group(2)!r} ({event.get('eventTime')}), an operation of a hierarchical "
                               "namespace that changes more names than it names")
        return found.group(2)

    def _json(self, key: str, size: int, etag: str) -> dict[str, Any]:
        try:
            doc = json.loads(bytes(self.reader.read_range(key, 0, size, if_match=etag)))
        except ValueError:
            raise FeedUnusable(f"{FEED_CONTAINER}/{key} is not JSON") from None
        if not isinstance(doc, dict):
            raise FeedUnusable(f"{FEED_CONTAINER}/{key} is not a JSON object")
        return doc
