#!/usr/bin/env python3
"""Benchmark reading an Azure Blob Inventory report as a dataset's listing (connectors/azure_inventory.py).

Everything in memory, one process, no servers: a synthetic report of `--rows` blobs is written by
the lab generator (`lab.inventory_report.write_report`) into an in-memory store, in CSV and in
Parquet, then read back. Per format it prints rows per second for:

1. the peer: the bare format reader over the same bytes (`csv.reader` over a `BytesIO`; pyarrow's
   `iter_batches(...).to_pylist()`), which no reader of the format can beat in Python;
2. `InventoryReport.objects`: ranged reads pinned to the file's ETag, the file's MD5, the repeated
   names' SQLite set and one `ObjectMeta` per row (what the listing hands to placement);

and the ratio between them, with the peak of Python allocations during the read (`tracemalloc`,
the report's own bytes in the store excluded): it stays flat whatever the number of rows.
Timings are ratios against the peer measured in the same run, never test thresholds.
Run: ``.venv/bin/python bench/bench_inventory_report.py [--rows 200000]``.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
import time
import tracemalloc
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from connectors.azure_inventory import InventoryReport  # noqa: E402
from connectors.base import ContentSettings, ObjectMeta  # noqa: E402
from connectors.memory import MemoryStore  # noqa: E402
from lab.inventory_report import MemoryReportWriter, write_report  # noqa: E402



def synthetic(rows: int):
    now = datetime(2026, 11, 30, tzinfo=timezone.utc)
    for i in range(rows):
        yield ObjectMeta(key=f"2024/{i % 12:02d}/region={i % 13}/claims-{i:09d}.csv", size=1000 + i % 5000,
                         etag=f"0x8D9{i:013X}", content_md5=i.to_bytes(16, "big"), last_modified=now, created=now,
                         tier="Hot", content=ContentSettings(content_type="text/csv"),
                         metadata={"batch": str(i % 100)}, kind="block")


def measure(fmt: str, rows: int) -> tuple[float, float, int]:
    store = MemoryStore()
    written = write_report(MemoryReportWriter(store), "inventory", synthetic(rows), "claims", fmt=fmt)
    body = store.data(written.files[0])
    started = time.perf_counter()
    if fmt == "csv":
        peer_rows = sum(1 for _ in csv.reader(io.TextIOWrapper(io.BytesIO(body), encoding="utf-8", newline=""))) - 1
    else:
        import pyarrow.parquet as pq

        peer_rows = sum(len(b.to_pylist()) for b in pq.ParquetFile(io.BytesIO(body)).iter_batches(batch_size=4096))
    peer = time.perf_counter() - started
    manifest = f"{written.path.split('/', 1)[1]}/exitplan-manifest.json"

    def read() -> int:
        report = InventoryReport.open(store, "inventory", manifest, dataset_container="claims", dataset_prefix="",
                                      field_name="bench")
        return sum(1 for _ in report.objects("claims"))

    started = time.perf_counter()
    ours = read()
    elapsed = time.perf_counter() - started
    # A second pass for the allocations only: tracemalloc slows Python down several times.
    tracemalloc.start()
    read()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peer_rows == ours == rows, (peer_rows, ours, rows)
    return rows / peer, rows / elapsed, peak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200_000, help="blobs in the synthetic report (default 200,000)")
    args = parser.parse_args()
    print(f"{'format':<8} {'peer rows/s':>12} {'exitplan rows/s':>16} {'ratio':>6} {'peak alloc':>11}")
    for fmt in ("csv", "parquet"):
        peer, ours, peak = measure(fmt, args.rows)
        print(f"{fmt:<8} {peer:>12,.0f} {ours:>16,.0f} {ours / peer:>6.2f} {peak / 2**20:>8.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
