"""An Azure Blob Inventory report of the lab's blobs, written the way Azure writes one: what
`exitplan lab inventory-report` does, so that the inventory-report path can be rehearsed (and
tested) against Azurite, which has no inventory service.

From a container's listing (`ObjectMeta`), one rule's run: the report file(s) in CSV or Parquet
with Azure's field names, ``<rule>-manifest.json`` (destinationContainer, endpoint, files with
their size and MD5, inventoryStartTime / inventoryCompletionTime, ruleDefinition, ruleName,
status, summary) and then ``<rule>-manifest.checksum`` (the manifest's MD5, written last: it
marks the run complete), under ``YYYY/MM/DD/HH-MM-SS/<rule>/`` of the report's container.

Each file is built in memory before it is written: the lab's containers are small.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Iterable, Protocol, Sequence

from connectors.base import ConnectorError, ContentSettings, ObjectMeta

# The rule's schemaFields, in the order Azure writes the columns; the names are Azure's.
SCHEMA_FIELDS = (
    "Name", "Creation-Time", "Last-Modified", "Etag", "Content-Length", "Content-Type", "Content-Encoding",
    "Content-Language", "Content-MD5", "Cache-Control", "Content-Disposition", "BlobType", "AccessTier",
    "Metadata", "Tags",
)
_BLOB_TYPES = {"block": "BlockBlob", "page": "PageBlob", "append": "AppendBlob"}


class ReportWriter(Protocol):
    """Where the report goes; `connectors.azure_writer.AzureBlobWriter` is one."""

    def ensure_container(self, container: str) -> None: ...

    def put_single(self, container: str, name: str, body: bytes, content: ContentSettings,
                   metadata: dict[str, str], md5: bytes) -> None: ...


class MemoryReportWriter:
    """A `ReportWriter` into a `connectors.memory.MemoryStore` standing for the report's container
    (one container: the name is the blob's name), for the unit tests and the bench."""

    def __init__(self, store):
        self.store = store

    def ensure_container(self, container: str) -> None:
        pass

    def put_single(self, container: str, name: str, body: bytes, content: ContentSettings,
                   metadata: dict[str, str], md5: bytes) -> None:
        self.store.add(name, body)


@dataclass(frozen=True)
class WrittenReport:
    path: str  # <container>/YYYY/MM/DD/HH-MM-SS/<rule>: what `datasets.<name>.inventory.report` names
    rows: int
    files: tuple[str, ...]


def report_row(meta: ObjectMeta, container: str) -> dict[str, object]:
    """One blob's row as Azure's report holds it (Metadata and Tags as JSON objects, Content-MD5
    in base64, times as timestamps)."""
    c = meta.content
    return {
        "Name": f"{container}/{meta.key}", "Creation-Time": meta.created, "Last-Modified": meta.last_modified,
        "Etag": meta.etag, "Content-Length": meta.size, "Content-Type": c.content_type or "",
        "Content-Encoding": c.content_encoding or "", "Content-Language": c.content_language or "",
        "Content-MD5": base64.b64encode(meta.content_md5).decode() if meta.content_md5 else "",
        "Cache-Control": c.cache_control or "", "Content-Disposition": c.content_disposition or "",
        "BlobType": _BLOB_TYPES.get(meta.kind or "block", meta.kind or ""), "AccessTier": meta.tier or "",
        "Metadata": json.dumps(dict(meta.metadata), ensure_ascii=False) if meta.metadata else "",
        "Tags": json.dumps(dict(meta.tags), ensure_ascii=False) if meta.tags else "",
    }


def _csv_time(value: object) -> object:
    # Azure's CSV writes ISO 8601 times with seven decimals.
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f0Z")
    return "" if value is None else value


def render_csv(rows: Sequence[dict[str, object]]) -> bytes:
    out = io.StringIO(newline="")
    w = csv.writer(out, lineterminator="\r\n")
    w.writerow(SCHEMA_FIELDS)
    for row in rows:
        w.writerow([_csv_time(row[f]) for f in SCHEMA_FIELDS])
    return out.getvalue().encode("utf-8")


def render_parquet(rows: Sequence[dict[str, object]]) -> bytes:
    """The rows as Parquet (times as `timestamp_millis`, UTC, as Azure writes them); needs pyarrow."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    times = ("Creation-Time", "Last-Modified")
    types = {f: pa.timestamp("ms", tz="UTC") if f in times else pa.int64() if f == "Content-Length" else pa.string()
             for f in SCHEMA_FIELDS}
    table = pa.table({f: pa.array([row[f] for row in rows], type=types[f]) for f in SCHEMA_FIELDS})
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def write_report(writer: ReportWriter, report_container: str, metas: Iterable[ObjectMeta], source_container: str, *,
                 rule: str = "exitplan", fmt: str = "csv", started: datetime | None = None,
                 rows_per_file: int = 0, endpoint: str = "") -> WrittenReport:
    """Write one run of inventory rule `rule` over `source_container` (its blobs: `metas`) into
    `report_container`; `rows_per_file` > 0 splits the report into several files."""
    started = (started or datetime.now(timezone.utc)).astimezone(timezone.utc).replace(microsecond=0)
    folder = f"{started:%Y/%m/%d/%H-%M-%S}/{rule}"
    rows = [report_row(m, source_container) for m in metas]
    chunks = ([rows[i:i + rows_per_file] for i in range(0, len(rows), rows_per_file)] if rows_per_file > 0 else [rows])
    render = render_parquet if fmt == "parquet" else render_csv
    writer.ensure_container(report_container)
    files = []
    for i, chunk in enumerate(chunks or [[]]):
        name = f"{folder}/{rule}{f'_{i}' if len(chunks) > 1 else ''}.{fmt}"
        body = render(chunk)
        md5 = hashlib.md5(body).digest()
        writer.put_single(report_container, name, body, ContentSettings(), {}, md5)
        files.append({"blob": name, "size": len(body), "md5": md5.hex()})
    manifest = {
        "destinationContainer": report_container,
        "endpoint": endpoint,
        "files": files,
        "inventoryCompletionTime": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "inventoryStartTime": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "ruleDefinition": {
            "filters": {"blobTypes": ["blockBlob", "appendBlob", "pageBlob"], "includeBlobVersions": False,
                        "includeSnapshots": False, "prefixMatch": [source_container]},
            "format": fmt, "objectType": "blob", "schedule": "daily", "schemaFields": list(SCHEMA_FIELDS),
        },
        "ruleName": rule,
        "status": "Succeeded",
        "summary": {"objectCount": len(rows), "totalObjectSize": sum(int(r["Content-Length"]) for r in rows)},
        "version": "1.0",
    }
    body = json.dumps(manifest, indent=2).encode()
    writer.put_single(report_container, f"{folder}/{rule}-manifest.json", body, ContentSettings(), {},
                      hashlib.md5(body).digest())
    checksum = hashlib.md5(body).hexdigest().encode()
    writer.put_single(report_container, f"{folder}/{rule}-manifest.checksum", checksum, ContentSettings(), {},
                      hashlib.md5(checksum).digest())
    return WrittenReport(f"{report_container}/{folder}", len(rows), tuple(f["blob"] for f in files))


def write_dataset_report(loaded, dataset: str, *, fmt: str = "csv", container: str = "inventory",
                         rule: str = "exitplan", rows_per_file: int = 0) -> WrittenReport:
    """A report of everything dataset `dataset`'s container holds now in the lab's Azurite, written
    into `container` of the same account. Refuses (ValueError) a source that is not the local
    emulator: the lab never writes into a real account. `lab.seed.LabStoreError` when Azurite
    refuses or does not answer."""
    from config.loader import source_connection_string
    from connectors.azure_writer import AzureBlobWriter
    from engine.endpoints import open_source

    from .seed import LabStoreError, emulator_blob_endpoint

    ds = loaded.config.datasets[dataset]
    src = loaded.config.sources[ds.source]
    if src.kind != "azure_blob":
        raise ValueError(f"dataset `{dataset}` reads source `{ds.source}` ({src.kind}): an inventory report describes "
                         "an Azure Blob container")
    conn = source_connection_string(src, where=loaded, name=ds.source)
    if not conn:
        raise ValueError(f"source `{ds.source}` has no connection string here: the lab generator writes into Azurite "
                         "through the source's connection string (`exitplan lab env`)")
    endpoint = emulator_blob_endpoint(conn)
    try:
        source = open_source(loaded, dataset)
        return write_report(AzureBlobWriter(conn), container, source.list(""), ds.container, rule=rule, fmt=fmt,
                            rows_per_file=rows_per_file, endpoint=endpoint)
    except ConnectorError as exc:
        raise LabStoreError(str(exc)) from exc
