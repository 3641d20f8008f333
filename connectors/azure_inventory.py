"""An Azure Blob Inventory report read as a container's listing: the same `ObjectMeta` the live
listing (`connectors.azure_blob.AzureBlobSource.list`) yields, streamed from the report's files.

Azure writes a rule's run into its destination container as ``YYYY/MM/DD/HH-MM-SS/<rule>/``: one
or more CSV or Parquet files, ``<rule>-manifest.json`` (the files with their sizes, the rule's
definition, ``status``, ``summary.objectCount``, ``inventoryCompletionTime``) and, once the run
has completed, ``<rule>-manifest.checksum`` (the MD5 of the manifest). `InventoryReport.open`
reads and checks the manifest before any row is used; `InventoryReport.objects` then streams the
rows of one container under a prefix. Everything is read through the small source protocols
(`head` + `read_range`, each file pinned to its ETag), so a report is read the way the data is.

What is refused, with a sentence (`ConfigError`: the configuration names an unusable report):
a run that did not succeed or has no checksum file; a rule that does not cover the dataset (blob
types, prefixes, a creation-time filter) or lacks a field needed to carry an object faithfully;
a file missing or of another size than the manifest says; and, found while reading, a file whose
MD5 is not the manifest's or rows that do not add up to ``summary.objectCount``.

Rows that are not objects to copy (snapshots, earlier versions, soft-deleted blobs, a repeated
row) are counted in `InventoryReport.not_copied` with the reason, never dropped silently: the
live listing does not carry them either. The report's rows come in no particular order.
"""

from __future__ import annotations

import base64
import binascii
import csv
import hashlib
import io
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from functools import lru_cache
from typing import Any, Iterator, Mapping

from .azure_blob import unreadable_reason
from .base import NOT_CARRIED, ConfigError, count_in, ContentSettings, HeadReader, NotFound, ObjectMeta, RangeReader
from .name_set import NameSet

# Bytes asked for per read of a report file.
READ_CHUNK = 8 * 1024 * 1024
# A read that skips at most this many bytes past what was hashed fetches the gap, so that a
# Parquet file (read footer first, then its row groups) is hashed in one pass.
HASH_GAP_FILL = 1024 * 1024
# Rows per Parquet batch: one batch of dictionaries is held at a time.
PARQUET_BATCH_ROWS = 4096

PYARROW_MISSING = ("this inventory report is in Parquet, which needs pyarrow: install exitplan with its `inventory` "
                   "extra (pip install 'exitplan[inventory]'), or have the inventory rule write CSV")

_KINDS = {"blockblob": "block", "pageblob": "page", "appendblob": "append"}
_BLOB_TYPES = ("blockBlob", "appendBlob", "pageBlob")


def field_key(name: str) -> str:
    """A schema field's name as compared here: Azure spells some two ways (`Content-Type` in
    reports, `ContentType` in rule definitions; `Etag`/`ETag`)."""
    return name.replace("-", "").replace("_", "").lower()


# The fields an object cannot be carried faithfully without (the rule's `schemaFields` must hold
# them); each value is the field name to add to the rule.
REQUIRED_FIELDS = {
    "name": "Name", "contentlength": "Content-Length", "etag": "Etag", "blobtype": "BlobType",
    "accesstier": "AccessTier", "contentmd5": "Content-MD5", "contenttype": "Content-Type",
    "contentencoding": "Content-Encoding", "contentlanguage": "Content-Language", "cachecontrol": "Cache-Control",
    "contentdisposition": "Content-Disposition", "metadata": "Metadata", "tags": "Tags",
}
# Azure's field table spells Content-Disposition "Cache-Disposition" in places: either is accepted.
_ALIASES = {"cachedisposition": "contentdisposition"}


@dataclass(frozen=True)
class ReportFile:
    blob: str
    size: int
    md5: bytes | None  # the manifest's, when it gives one
    etag: str = ""  # as found when the manifest was checked: the file is read pinned to it


@dataclass
class InventoryReport:
    """One rule's run, its manifest checked (`open`). `origin` says where the listing came from,
    for the inventory and the dry run; `not_copied` (reason -> (rows, bytes)) and `rows` grow as
    `objects` reads."""

    reader: Any  # HeadReader + RangeReader over the report's container
    path: str  # <container>/<manifest path>, for messages
    files: tuple[ReportFile, ...]
    format: str  # "csv" or "parquet"
    object_count: int
    completed: str
    rule: str
    not_copied: dict[str, tuple[int, int]] = field(default_factory=dict)
    rows: int = 0

    @property
    def origin(self) -> str:
        return f"inventory report {self.path} (completed {self.completed}, {self.object_count:,} rows)"

    # ---- the manifest -------------------------------------------------------------------------

    @classmethod
    def open(cls, reader: HeadReader | RangeReader, container: str, manifest_path: str, *,
             dataset_container: str, dataset_prefix: str, field_name: str) -> "InventoryReport":
        """Read and check the manifest at `manifest_path` in the report's container (`reader`),
        for the objects of `dataset_container` under `dataset_prefix`. `field_name` is the
        configuration field named in refusals (``datasets.claims.inventory.report``)."""
        path = f"{container}/{manifest_path}"

        def refuse(problem: str, fix: str = "name the folder of a completed run of a rule that covers the dataset") -> ConfigError:
            return ConfigError(f"inventory report {path} ({field_name}): {problem}; {fix}")

        try:
            manifest_meta = reader.head(manifest_path)
        except NotFound:
            raise refuse("no such manifest blob", "check the path: Azure writes <container>/YYYY/MM/DD/HH-MM-SS/<rule>/"
                                                  "<rule>-manifest.json") from None
        raw = _read_whole(reader, manifest_path, manifest_meta)
        checksum_path = manifest_path[: -len(".json")] + ".checksum"
        try:
            checksum = _read_whole(reader, checksum_path, reader.head(checksum_path))
        except NotFound:
            raise refuse(f"{checksum_path.rsplit('/', 1)[-1]} is missing, so the run has not completed",
                         "wait for the run to complete, or name an earlier completed run") from None
        if _digest_text(checksum.decode("ascii", "replace")) != hashlib.md5(raw).digest():
            raise refuse("the manifest does not match its checksum file (changed or cut since Azure wrote it)")
        try:
            manifest = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise refuse(f"the manifest is not JSON ({exc})") from None
        if not isinstance(manifest, dict):
            raise refuse("the manifest is not a JSON object")
        if manifest.get("status") != "Succeeded":
            raise refuse(f"the run ended with status {manifest.get('status')!r}, not 'Succeeded'",
                         "name a run whose status is Succeeded")
        if manifest.get("destinationContainer") not in (None, container):
            raise refuse(f"the manifest belongs to container {manifest.get('destinationContainer')!r}, not {container!r}",
                         "check the container part of the path")
        definition = manifest.get("ruleDefinition") or {}
        _check_rule(definition, f"{dataset_container}/{dataset_prefix}", refuse)
        fmt = str(definition.get("format", "")).lower()
        if fmt not in ("csv", "parquet"):
            raise refuse(f"format {definition.get('format')!r} is neither csv nor parquet")
        try:
            count = int(manifest["summary"]["objectCount"])
            files = tuple(ReportFile(str(f["blob"]), int(f["size"]), _digest_text(f["md5"]) if f.get("md5") else None)
                          for f in manifest["files"])
        except (KeyError, TypeError, ValueError) as exc:
            raise refuse(f"the manifest lacks `files[].blob`, `files[].size` or `summary.objectCount` ({exc!r})") from None
        found = []
        for f in files:
            try:
                held = reader.head(f.blob)
            except NotFound:
                raise refuse(f"report file {f.blob} named by the manifest is missing") from None
            if held.size != f.size:
                raise refuse(f"report file {f.blob} has {held.size:,} bytes, the manifest says {f.size:,}")
            found.append(ReportFile(f.blob, f.size, f.md5, held.etag))
        files = tuple(found)
        if fmt == "parquet":
            _pyarrow(refuse)
        return cls(reader, path, files, fmt, count, str(manifest.get("inventoryCompletionTime") or "at an unknown time"),
                   str(manifest.get("ruleName") or ""))

    # ---- the rows -----------------------------------------------------------------------------

    def objects(self, container: str, prefix: str = "") -> Iterator[ObjectMeta]:
        """The current, non-deleted base blobs of `container` under `prefix`, once each, as the
        live listing gives them (in the report's order, not by name). Rows of other containers
        or prefixes are passed over; the other rows are counted in `not_copied`. Raises
        `ConfigError` at the end of a file whose MD5 is wrong, or of the report when its rows do
        not add up to the manifest's count."""
        under = f"{container}/{prefix}"
        self.rows = 0
        self.not_copied = {}
        with NameSet("inventory") as seen:
            for f in self.files:
                rows = self._csv_rows(f) if self.format == "csv" else self._parquet_rows(f)
                for row in rows:
                    self.rows += 1
                    name = str(row.get("name") or "")
                    if not name.startswith(under):
                        continue
                    reason = row_not_copied(row)
                    if reason is None and not seen.first(name):
                        reason = "repeated rows of one blob (Azure's reports may list a blob twice): carried once"
                    if reason is not None:
                        count_in(self.not_copied, reason, _size(row))
                        continue
                    try:
                        meta = object_meta(row, container)
                    except ConfigError as exc:
                        raise ConfigError(f"inventory report {self.path}: {f.blob}, row {self.rows:,}: {exc}; "
                                          "name another run") from None
                    yield meta
        if self.rows != self.object_count:
            raise ConfigError(f"inventory report {self.path}: its files hold {self.rows:,} rows, its manifest says "
                              f"{self.object_count:,} (summary.objectCount); the report is incomplete or altered, "
                              "name another run")

    def _csv_rows(self, f: ReportFile) -> Iterator[dict[str, Any]]:
        raw = RangedBlobFile(self.reader, f.blob, f.size, f.etag)
        text = io.TextIOWrapper(io.BufferedReader(raw, READ_CHUNK), encoding="utf-8-sig", newline="")
        reader = csv.reader(text)
        header = next(reader, None)
        if header is None:
            raise ConfigError(f"inventory report {self.path}: {f.blob} is empty (no header row)")
        keys = [_ALIASES.get(field_key(h), field_key(h)) for h in header]
        self._check_header(f, keys)
        for cells in reader:
            yield dict(zip(keys, cells))
        self._check_md5(f, raw)

    def _parquet_rows(self, f: ReportFile) -> Iterator[dict[str, Any]]:
        import pyarrow.parquet as pq

        raw = RangedBlobFile(self.reader, f.blob, f.size, f.etag)
        try:
            parquet = pq.ParquetFile(raw)
        except Exception as exc:  # pyarrow's own errors: not a Parquet file
            raise ConfigError(f"inventory report {self.path}: {f.blob} is not a readable Parquet file ({exc})") from None
        names = parquet.schema_arrow.names
        keys = [_ALIASES.get(field_key(n), field_key(n)) for n in names]
        self._check_header(f, keys)
        rename = dict(zip(names, keys))
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS):
            for row in batch.to_pylist():
                yield {rename[k]: v for k, v in row.items()}
        self._check_md5(f, raw)

    def _check_header(self, f: ReportFile, keys: list[str]) -> None:
        missing = [REQUIRED_FIELDS[k] for k in REQUIRED_FIELDS if k not in keys]
        if missing:
            raise ConfigError(f"inventory report {self.path}: {f.blob} has no {', '.join(missing)} column; add these "
                              "fields to the inventory rule's schemaFields and use its next run")

    def _check_md5(self, f: ReportFile, raw: "RangedBlobFile") -> None:
        got = raw.md5()
        if f.md5 is not None and got != f.md5:
            raise ConfigError(f"inventory report {self.path}: {f.blob}'s MD5 is {got.hex()}, the manifest says "
                              f"{f.md5.hex()}; the file was altered or cut, name another run")


def _check_rule(definition: Mapping[str, Any], space: str, refuse) -> None:
    """Refuse a rule whose report may leave out objects of `space` (``container/prefix``) or
    lacks fields needed to carry them."""
    if str(definition.get("objectType", "blob")).lower() != "blob":
        raise refuse(f"the rule lists {definition.get('objectType')!r} objects, not blobs")
    filters = definition.get("filters") or {}
    types = {str(t).lower() for t in filters.get("blobTypes") or ()}
    left_out = [t for t in _BLOB_TYPES if t.lower() not in types]
    if left_out:
        raise refuse(f"the rule's blobTypes leave out {', '.join(left_out)}, so blobs of that kind would be missed",
                     "list blockBlob, appendBlob and pageBlob in the rule's filters")
    if filters.get("creationTime"):
        raise refuse("the rule keeps only recently created blobs (filters.creationTime)",
                     "remove the creationTime filter from the rule")
    prefixes = [str(p) for p in filters.get("prefixMatch") or () if p]
    if prefixes and not any(space.startswith(p) for p in prefixes):
        raise refuse(f"the rule's prefixMatch {prefixes} does not cover {space}",
                     f"add {space.split('/', 1)[0]!r} to the rule's prefixMatch")
    for excluded in (str(p) for p in filters.get("excludePrefix") or () if p):
        if excluded.startswith(space) or space.startswith(excluded):
            raise refuse(f"the rule's excludePrefix {excluded!r} leaves out part of {space}",
                         "remove it from the rule")
    fields = {_ALIASES.get(field_key(f), field_key(f)) for f in definition.get("schemaFields") or ()}
    missing = [REQUIRED_FIELDS[k] for k in REQUIRED_FIELDS if k not in fields]
    if missing:
        raise refuse(f"the rule's schemaFields lack {', '.join(missing)}, needed to carry each object with its "
                     "properties", "add them to the rule's schemaFields and use its next run")


def _pyarrow(refuse) -> None:
    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise refuse("it is in Parquet and pyarrow is not installed", PYARROW_MISSING) from None


# --------------------------------------------------------------------------------------------
# One row
# --------------------------------------------------------------------------------------------


def row_not_copied(row: Mapping[str, Any]) -> str | None:
    """Why a report row is not an object to copy (a snapshot, an earlier version, a soft-deleted
    blob), or None for a current base blob: what the live listing yields."""
    if row.get("snapshot"):
        return NOT_CARRIED["snapshot"]
    if _flag(row.get("deleted")):
        return "soft-deleted blobs: only blobs present at the source are carried"
    if row.get("versionid") and not _flag(row.get("iscurrentversion")):
        return NOT_CARRIED["version"]
    return None


def _size(row: Mapping[str, Any]) -> int:
    """A row's Content-Length, 0 where it states none (a row counted, not copied)."""
    try:
        return int(row.get("contentlength") or 0)
    except (TypeError, ValueError):
        return 0


def object_meta(row: Mapping[str, Any], container: str) -> ObjectMeta:
    """The `ObjectMeta` of one report row (field names as `field_key` spells them), the way
    `AzureBlobSource.list` makes it: ETag without quotes, Content-MD5 as raw bytes, the blob type
    as block/page/append, an Archive-tier blob named as not copyable."""
    name = str(row["name"])
    try:
        size = int(row["contentlength"])
        md5 = _md5(row.get("contentmd5"))
        metadata = _mapping(row.get("metadata"), "Metadata")
        tags = _mapping(row.get("tags"), "Tags")
        last_modified = _time(row.get("lastmodified"))
        created = _time(row.get("creationtime"))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"blob {name!r}: {exc}") from None
    tier = _text(row.get("accesstier"))
    blob_type = _text(row.get("blobtype"))
    return ObjectMeta(
        key=name[len(container) + 1:],
        size=size,
        etag=(_text(row.get("etag")) or "").strip('"'),
        content_md5=md5,
        last_modified=last_modified,
        tier=tier,
        content=_content(_text(row.get("contenttype")), _text(row.get("contentencoding")),
                         _text(row.get("cachecontrol")), _text(row.get("contentdisposition")),
                         _text(row.get("contentlanguage"))),
        metadata=metadata,
        tags=tags,
        created=created,
        kind=_KINDS.get((blob_type or "").lower(), blob_type),
        not_copyable=unreadable_reason(tier, _text(row.get("archivestatus")), _text(row.get("copystatus")),
                                       _text(row.get("copyprogress"))),
        rehydrating=_text(row.get("archivestatus")),
    )


@lru_cache(maxsize=4096)
def _content(content_type, content_encoding, cache_control, content_disposition, content_language) -> ContentSettings:
    # Few distinct header sets in a report of millions: one (immutable) value each.
    return ContentSettings(content_type=content_type, content_encoding=content_encoding, cache_control=cache_control,
                           content_disposition=content_disposition, content_language=content_language)


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value)
    return text or None


def _flag(value: Any) -> bool:
    return value is True or str(value).strip().lower() == "true"


def _md5(value: Any) -> bytes | None:
    if value is None or value == "" or value == b"":
        return None
    if isinstance(value, (bytes, bytearray)) and len(value) == 16:
        return bytes(value)
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 16:
        raise ValueError(f"Content-MD5 {value!r} is not a base64 MD5")
    return raw


def _mapping(value: Any, what: str) -> dict[str, str]:
    """Metadata or Tags: a JSON object in CSV (as exitplan reads and the lab writes them), a map
    or a JSON string in Parquet."""
    if value is None or value == "":
        return {}
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()}
    if isinstance(value, str) and value[:1] == "{":
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = None
        if type(parsed) is dict and all(type(v) is str for v in parsed.values()):
            return parsed
    if isinstance(value, list):  # pyarrow's map type: a list of (key, value) pairs
        return {str(k): str(v) for k, v in value}
    try:
        parsed = json.loads(value)
    except (TypeError, json.JSONDecodeError):
        parsed = None
    if not isinstance(parsed, dict):
        raise ValueError(f"{what} {value!r} is not a JSON object of names and values")
    return {str(k): str(v) for k, v in parsed.items()}


def _time(value: Any) -> datetime | None:
    """A report time: a timestamp (Parquet), ISO 8601 with up to 7 decimals, or RFC 1123 (CSV)."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    return _text_time(str(value))


@lru_cache(maxsize=1024)
def _text_time(text: str) -> datetime:
    # Cached: a row's times often repeat (created = last modified), and a blob written in bulk
    # shares its second with thousands of others.
    text = text.strip()
    if len(text) == 28 and text[19] == "." and text[27] == "Z":  # Azure's own: 2021-05-26T13:25:36.1234567Z
        return datetime.fromisoformat(f"{text[:26]}+00:00")
    if text[:1].isdigit():
        head, _, rest = text.partition(".")
        fraction = "".join(c for c in rest if c.isdigit())[:6]
        parsed = datetime.fromisoformat(head.rstrip("Z"))
        if fraction:
            parsed = parsed.replace(microsecond=int(fraction.ljust(6, "0")))
        return parsed.replace(tzinfo=timezone.utc) if parsed.tzinfo is None else parsed
    return parsedate_to_datetime(text)


def _digest_text(text: str) -> bytes:
    """An MD5 written as hex or base64 (with or without quotes and whitespace)."""
    text = str(text).strip().strip('"').strip()
    if len(text) == 32:
        try:
            return bytes.fromhex(text)
        except ValueError:
            pass
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return b""


def _read_whole(reader: RangeReader, key: str, meta: ObjectMeta) -> bytes:
    return bytes(reader.read_range(key, 0, meta.size, if_match=meta.etag))


# --------------------------------------------------------------------------------------------
# Streaming a report file
# --------------------------------------------------------------------------------------------


class RangedBlobFile(io.RawIOBase):
    """A report file read by ranges (pinned to its ETag) as a seekable binary file, never held
    whole; its MD5 is computed over the bytes as they are read in order (`md5` reads whatever
    was skipped)."""

    def __init__(self, reader: RangeReader, key: str, size: int, etag: str):
        super().__init__()
        self.reader, self.key, self.size, self.etag = reader, key, size, etag
        self.pos = 0
        self._hash = hashlib.md5()
        self._hashed = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.size - self.pos)
        if n <= 0:
            return 0
        data = self._fetch(self.pos, self.pos + n)
        buffer[:n] = data
        self.pos += n
        return n

    def _fetch(self, start: int, end: int) -> bytes:
        if self._hashed < start <= self._hashed + HASH_GAP_FILL:
            self._fetch(self._hashed, start)
        data = self.reader.read_range(self.key, start, end, if_match=self.etag)
        if start <= self._hashed < end:
            self._hash.update(memoryview(data)[self._hashed - start:])
            self._hashed = end
        return data

    def md5(self) -> bytes:
        """The MD5 of the whole file (the bytes not read yet are read now)."""
        while self._hashed < self.size:
            self._fetch(self._hashed, min(self.size, self._hashed + READ_CHUNK))
        return self._hash.digest()
