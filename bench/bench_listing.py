#!/usr/bin/env python3
"""Benchmark a dataset's listing into the state store, and the state at 10^7 objects.

Two parts, loopback only; everything the script starts is stopped at the end:

- ``azurite``: starts its own Azurite, seeds a container with ``--blobs`` empty blobs in
  ``--folders`` folders (``upload_blob`` from ``--seed-threads`` threads, or ``--seed database``:
  Azurite's database written directly, for 10^6; the seeding time is printed), then lists it (a)
  with a bare SDK loop (`ContainerClient.list_blobs(...).by_page()`, metadata and tags included, as
  the connector asks) and (b) with `engine.listing.RangedListing` into a fresh SQLite state,
  ``--ranges`` at once (1, 2 and 4); objects/s and the ratio to the bare loop. ``--killed``: a
  listing killed half-way in a process of its own, and the run that takes it over.
- ``synthetic``: ``--objects`` generated objects (a `RangeLister` that makes them up, in
  ``--folders`` folders) through the listing into the state (4 ranges), the shards fixed, a previous
  run's copies recorded for them (1 in 200 with another ETag, 1 in 200 never copied, 1 in 1000
  gone from the source), then the delta pass: each shard read back and each object decided as
  copy_objects does (`StateStore.current_copy`: unchanged, changed, new), and the objects gone from
  the source (`removed_at_source`). Then the change-feed path (`changes: feed`): a full listing that
  notes the feed's position, and the next run made from it and a feed naming 1 in 100 objects of
  each folder as changed (each listed again). Objects/s and the process's peak RSS after each
  phase, on SQLite and (``--postgres``) on a private PostgreSQL server (tests/pg.py).

``synthetic --killed`` does the same kill on the synthetic source in 4 ranges (SQLite).

Run: ``.venv/bin/python bench/bench_listing.py azurite --blobs 100000`` and
``.venv/bin/python bench/bench_listing.py synthetic --objects 10000000 [--postgres]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from config.models import DatasetConfig  # noqa: E402
from connectors.base import ListingPage, ListingRange, ObjectMeta  # noqa: E402
from engine.dataset_copy import COPIES_PAGE  # noqa: E402
from engine.listing import RangedListing  # noqa: E402
from engine.shards import ShardDefiner  # noqa: E402
from engine.state import StateStore  # noqa: E402

DS = DatasetConfig(source="bench", container="bench", destination="bench")
MODIFIED = datetime(2026, 1, 1, tzinfo=timezone.utc)

if TYPE_CHECKING:
    from flows.lab_processes import ServerSpec


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class SyntheticSource:
    """`--objects` objects made up as they are listed, in folders `f000/` ...: a `RangeLister`
    (the marker is the index of the last object of a page) that holds nothing in memory."""

    label = "synthetic"
    unsupported: frozenset[str] = frozenset()

    def __init__(self, objects: int, folders: int, page_size: int = 5000):
        self.objects, self.folder_count, self.page_size = objects, folders, page_size

    def per_folder(self, folder: int) -> int:
        return self.objects // self.folder_count + (1 if folder < self.objects % self.folder_count else 0)

    @staticmethod
    def meta(folder: int, i: int) -> ObjectMeta:
        key = f"f{folder:03d}/{i:09d}.dcm"
        return ObjectMeta(key=key, size=(i * 7919) % 1_000_000, etag=f"0x8D{folder:03d}{i:012d}",
                          content_md5=hashlib.md5(key.encode()).digest(), last_modified=MODIFIED, tier="Hot",
                          created=MODIFIED, kind="block")  # as Azure lists a block blob

    def folders(self, prefix: str, limit: int) -> tuple[list[str], bool] | None:
        return ([f"f{n:03d}/" for n in range(self.folder_count)], False) if prefix == "" else ([], True)

    def list_pages(self, part: ListingRange, marker: str | None = None) -> Iterator[ListingPage]:
        folder = int(part.prefix[1:4])
        start, end = (int(marker) + 1 if marker else 0), self.per_folder(folder)
        while start < end:
            stop = min(start + self.page_size, end)
            yield ListingPage([self.meta(folder, i) for i in range(start, stop)], str(stop - 1) if stop < end else None)
            start = stop
        if end == 0:
            yield ListingPage([], None)

    def list(self, prefix: str = "") -> Iterator[ObjectMeta]:
        raise NotImplementedError("listed by range only")

    def list_name(self, name: str) -> ListingPage:
        """One name as the change-feed path lists it again: changed since (another ETag)."""
        meta = self.meta(int(name[1:4]), int(name[5:14]))
        return ListingPage([ObjectMeta(**{**meta.__dict__, "etag": meta.etag + "-changed"})], None)


class SyntheticFeed:
    """A change feed (`connectors.azure_changefeed.ChangeFeed`'s two calls) naming `every`-th
    object of each folder of `source` as changed, in one hour after the baseline's."""

    def __init__(self, source: SyntheticSource, every: int):
        self.source, self.every, self.now = source, every, datetime(2026, 11, 30, 1, tzinfo=timezone.utc)

    def last_consumable(self) -> datetime:
        return self.now

    def changed_names(self, container, prefix, after, through, reading=None) -> Iterator[str]:
        for folder in range(self.source.folder_count):
            for i in range(5, self.source.per_folder(folder), self.every):
                yield self.source.meta(folder, i).key


def _add(rows: list, row: tuple) -> None:
    """A row of the table, also printed at once (a run at 10^7 objects takes a while)."""
    rows.append(row)
    print(" | ".join(str(c) for c in row), file=sys.stderr, flush=True)


def timed(what: str, fn):
    began = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - began
    return result, seconds


def list_into(state: StateStore, source, at_once: int, shard_objects: int = 5000,
              feed=None) -> tuple[int, int, RangedListing]:
    """A migrate run's listing of the bench dataset into `state`; (run id, objects, the listing).
    With `feed`, the dataset has `changes: feed` (engine/listing.py)."""
    run = state.start_run("migrate")
    state.dataset_started(run, "bench")
    listing = RangedListing(state, run, "bench", DS, source, shard_bytes=4 * 1024**3, shard_objects=shard_objects,
                            at_once=at_once, feed=feed)
    n = sum(1 for _ in listing.objects())
    state.dataset_through(run, "bench", listing.objects_stored, listing.bytes_stored)
    return run, n, listing


# ---- synthetic: the state at 10^7 --------------------------------------------------------------


def record_previous_copies(state: StateStore, source: SyntheticSource, run: int) -> int:
    """A previous run's copied rows for the synthetic objects (written in the database's batches, as
    the copy's `WriteBatch` does): 1 in 200 with another ETag, 1 in 200 never copied, and 1 in 1000
    of a key the source no longer has. Returns the rows written."""
    from engine.state import objects as objects_table
    from engine.state.rows import object_row

    written = 0
    rows: list[dict] = []

    def flush():
        nonlocal written
        with state.engine.begin() as conn:  # the bench writes history directly: no copy ran
            conn.execute(objects_table.insert(), rows)
        written += len(rows)
        rows.clear()

    for folder in range(source.folder_count):
        for i in range(source.per_folder(folder)):
            if i % 200 == 1:
                continue  # new since
            meta = source.meta(folder, i)
            etag = meta.etag + ("-old" if i % 200 == 2 else "")
            row = object_row(run, "bench", meta.key, etag, meta.size, meta.key, meta.content_md5, "pending", {})
            row.update(state="uploaded", sha256="0" * 64, dest_etag="d")
            rows.append(row)
            if i % 1000 == 3:
                gone = object_row(run, "bench", meta.key + ".gone", "e", 1, meta.key + ".gone", None, "pending", {})
                gone.update(state="uploaded")
                rows.append(gone)
            if len(rows) >= 5000:
                flush()
    if rows:
        flush()
    return written


def delta_pass(state: StateStore, run: int, per_object: int = 0) -> dict[str, int]:
    """Each listed object of `run`, shard by shard, decided as copy_objects decides it: its page's
    current copies in one query (`StateStore.current_copies`, pages of `COPIES_PAGE`), or, for the
    first `per_object` objects only, one `current_copy` query each (what it did before)."""
    counts = {"unchanged": 0, "changed": 0, "new": 0}

    def decide(meta, previous):
        if previous is None:
            counts["new"] += 1
        elif previous.source_etag == meta.etag and previous.size == meta.size:
            counts["unchanged"] += 1
        else:
            counts["changed"] += 1

    for shard in state.shards(run, "bench"):
        listed = state.listed(run, "bench", shard.shard)
        while True:
            page = list(islice(listed, COPIES_PAGE))
            if not page:
                break
            if per_object:
                for meta in page:
                    decide(meta, state.current_copy("bench", meta.key))
                per_object = max(0, per_object - len(page))
                if not per_object:
                    return counts
                continue
            copies = state.current_copies("bench", [m.key for m in page])
            for meta in page:
                decide(meta, copies.get(meta.key))
    return counts


def synthetic(objects: int, folders: int, url: str, label: str) -> list[tuple[str, str, str, str]]:
    source = SyntheticSource(objects, folders)
    rows = []
    state = StateStore(url)
    try:
        copied_by = state.start_run("migrate")
        state.finish_run(copied_by, "ok")
        written, seconds = timed("history", lambda: record_previous_copies(state, source, copied_by))
        _add(rows, (label, "previous copies recorded (bench setup)", f"{written / seconds:,.0f} rows/s",
                     f"{peak_rss_mib():.0f}"))
        (run, n, listing), seconds = timed("listing", lambda: list_into(state, source, 4))
        _add(rows, (label, f"listing into the state, 4 ranges ({n:,} objects)", f"{n / seconds:,.0f} obj/s",
                     f"{peak_rss_mib():.0f}"))
        defined, seconds = timed("shards", lambda: ShardDefiner(state, run, 500).ready("bench"))
        _add(rows, (label, f"shards fixed ({listing.shards:,} cut, {len(defined):,} defined)", f"{seconds:.1f} s",
                     f"{peak_rss_mib():.0f}"))
        few = min(n, 20_000)
        _, seconds = timed("delta", lambda: delta_pass(state, run, per_object=few))
        _add(rows, (label, f"delta pass, one query per object (the first {few:,})", f"{few / seconds:,.0f} obj/s",
                     f"{peak_rss_mib():.0f}"))
        counts, seconds = timed("delta", lambda: delta_pass(state, run))
        _add(rows, (label, "delta pass, one query per page: " + ", ".join(f"{v:,} {k}" for k, v in counts.items()),
                     f"{n / seconds:,.0f} obj/s", f"{peak_rss_mib():.0f}"))
        gone, seconds = timed("gone", lambda: sum(1 for _ in state.removed_at_source("bench", run)))
        _add(rows, (label, f"gone from the source: {gone:,}", f"{seconds:.1f} s", f"{peak_rss_mib():.0f}"))
        # The next run from the change feed: the listing above noted no feed position (it had no
        # feed); a full listing with the feed notes one, then a run lists 1% of the names again.
        feed = SyntheticFeed(source, 100)
        (base, n, _), seconds = timed("listing", lambda: list_into(state, source, 4, feed=feed))
        _add(rows, (label, f"full listing with the feed's position noted ({n:,} objects)",
                    f"{n / seconds:,.0f} obj/s", f"{peak_rss_mib():.0f}"))
        changed = sum(1 for _ in feed.changed_names("", "", None, None))
        (run, n, listing), seconds = timed("feed", lambda: list_into(state, source, 4, feed=feed))
        assert listing.origin.startswith(f"run {base}'s listing and the change feed"), listing.origin
        _add(rows, (label, f"listing from run {base}'s and the change feed ({changed:,} names listed again, "
                           f"{n:,} objects)", f"{seconds:.1f} s ({n / seconds:,.0f} obj/s)", f"{peak_rss_mib():.0f}"))
    finally:
        state.close()
    return rows


# ---- Azurite: listing into the state against a bare SDK loop ---------------------------------------


CONTAINER = "bench-listing"
AZURITE_DB = "__azurite_db_blob__.json"  # Azurite's metadata database under --location (LokiJS, JSON)


def blob_name(folder: int, i: int) -> str:
    return f"f{folder:03d}/{i:09d}.dcm"


def azurite_on_disk(port: int, location: Path) -> "ServerSpec":
    """Azurite keeping its data under `location` instead of in memory (the lab's flags otherwise),
    with room for a database of 10^6 blobs: V8's default heap stops near 4 GiB."""
    from dataclasses import replace

    from flows.lab_processes import azurite_spec

    spec = azurite_spec(port)
    argv = [a for a in spec.argv if a != "--inMemoryPersistence"] + ["--location", str(location)]
    return replace(spec, argv=tuple(argv), env={**spec.env, "NODE_OPTIONS": "--max-old-space-size=8192"},
                   ready_timeout=900.0)


def seed_azurite_database(location: Path, blobs: int, folders: int) -> None:
    """Azurite's metadata database under `location` holding container `CONTAINER` with `blobs`
    empty block blobs (`blob_name`, in `folders` folders), written directly: Azurite's own Put Blob
    scans every blob of the account per request (LokiJS looks a blob up by its account's index),
    so seeding through the API slows as the container grows (~30 blobs/s on average past 50,000).

    Azurite writes the database itself first (the container and one blob through the API, then
    stopped: it saves on the way out); its blob document is the template of every blob, without
    the optional fields an empty blob can go without (its MD5, content type, encryption flag, data
    extent), so that 10^6 documents stay within the largest string V8 can parse (~512 MiB). The
    documents are written in name order, so each of the collection's four binary indices (account,
    container, name, snapshot) is the positions in order."""
    from azure.storage.blob import BlobServiceClient

    from config.lab import azurite_connection_string
    from flows.lab_processes import free_port, start_server, stop_pid

    port = free_port()
    server = start_server(azurite_on_disk(port, location), log_path=location.parent / "azurite-template.log")
    try:
        container = BlobServiceClient.from_connection_string(azurite_connection_string(port)).create_container(CONTAINER)
        container.upload_blob(blob_name(0, 0), b"")
    finally:
        stop_pid(server.pid, timeout=60)
    path = location / AZURITE_DB
    db = json.loads(path.read_text())
    coll = next(c for c in db["collections"] if c["name"] == "$BLOBS_COLLECTION$")
    if len(coll["data"]) != 1:
        raise SystemExit(f"{path}: Azurite saved {len(coll['data'])} blob documents, not the one put: "
                         "its database format changed; seed with --seed api")
    template = coll["data"][0]
    for field in ("deleted", "persistency"):
        template.pop(field, None)
    for field in ("contentMD5", "contentType", "serverEncrypted", "accessTierInferred", "accessTierChangeTime"):
        template["properties"].pop(field, None)
    template["meta"] = {"revision": 0, "created": template["meta"]["created"], "version": 0}
    names = sorted(blob_name(i % folders, i) for i in range(blobs))
    coll["data"], coll["maxId"], coll["idIndex"] = "@DOCS@", blobs, None
    for index in coll["binaryIndices"].values():
        index["dirty"], index["values"] = False, "@POSITIONS@"
    head, tail = json.dumps(db, separators=(",", ":")).split('"@DOCS@"')
    tail = tail.replace('"@POSITIONS@"', "[" + ",".join(map(str, range(blobs))) + "]")
    with path.open("w") as out:
        out.write(head + "[")
        for n, name in enumerate(names, start=1):
            doc = {**template, "name": name, "properties": {**template["properties"], "etag": f'"0x8DE{n:013X}"'},
                   "$loki": n}
            out.write(("," if n > 1 else "") + json.dumps(doc, separators=(",", ":")))
        out.write("]" + tail)


def wait_until_idle(pid: int, quiet: float = 3.0, limit: float = 1800.0) -> float:
    """Seconds until process `pid` used under 5 % of a core for `quiet` seconds (Azurite's
    garbage collection goes through every blob once at start)."""
    began = time.perf_counter()
    tick = os.sysconf("SC_CLK_TCK")

    def cpu() -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tick

    while time.perf_counter() - began < limit:
        before = cpu()
        time.sleep(quiet)
        if cpu() - before < 0.05 * quiet:
            break
    return time.perf_counter() - began


def azurite(blobs: int, folders: int, seed_threads: int, seed: str, ranges: list[int], killed: bool,
            workdir: Path) -> list[tuple[str, str, str, str]]:
    from azure.storage.blob import BlobServiceClient

    from config.lab import azurite_connection_string
    from connectors.azure_blob import AzureBlobSource
    from flows.lab_processes import azurite_spec, free_port, start_server, stop_pid

    port = free_port()
    started = []
    rows = []
    location = workdir / "azurite"
    if seed == "database":
        location.mkdir()
        began = time.perf_counter()
        seed_azurite_database(location, blobs, folders)
        written = time.perf_counter() - began
        server = start_server(azurite_on_disk(port, location), log_path=workdir / "azurite.log",
                              on_started=started.append)
        loaded = time.perf_counter() - began - written
        idle = wait_until_idle(server.pid)
        _add(rows, ("azurite", f"seed: {blobs:,} empty blobs written into Azurite's database "
                               f"({(location / AZURITE_DB).stat().st_size / 2**20:,.0f} MiB)",
                    f"{written:.0f} s written, {loaded:.0f} s loaded", f"{idle:.0f} s until idle"))
    else:
        server = start_server(azurite_spec(port), log_path=workdir / "azurite.log", on_started=started.append)
    try:
        cs = azurite_connection_string(port)
        service = BlobServiceClient.from_connection_string(cs)
        container = service.get_container_client(CONTAINER)
        if seed == "api":
            container.create_container()
            began = time.perf_counter()
            with ThreadPoolExecutor(seed_threads) as pool:
                for _ in pool.map(lambda i: container.upload_blob(blob_name(i % folders, i), b""), range(blobs),
                                  chunksize=256):
                    pass
            seeded = time.perf_counter() - began
            _add(rows, ("azurite", f"seed: {blobs:,} empty blobs, {seed_threads} threads",
                        f"{blobs / seeded:,.0f} blobs/s", f"{seeded:.0f} s"))

        def bare() -> int:
            n = 0
            for page in container.list_blobs(include=["metadata", "tags"], results_per_page=5000).by_page():
                n += sum(1 for _ in page)
            return n

        n, seconds = timed("bare", bare)
        base = n / seconds
        _add(rows, ("azurite", "bare SDK loop (list_blobs pages of 5000)", f"{base:,.0f} obj/s", "1.00"))
        for at_once in ranges:
            state_dir = Path(tempfile.mkdtemp(dir=workdir))
            state = StateStore(state_dir / "state.db")
            try:
                source = AzureBlobSource.from_connection_string(cs, CONTAINER, page_size=5000)
                (_, listed, _), seconds = timed("ranges", lambda: list_into(state, source, at_once))
                assert listed == n, (listed, n)
                _add(rows, ("azurite", f"listing into the state, {at_once} range(s) at once",
                             f"{listed / seconds:,.0f} obj/s", f"{listed / seconds / base:.2f}"))
            finally:
                state.close()
        if killed:
            # One range: a ranged listing starts with "/"-delimited requests, which Azurite answers
            # by paging through every blob of the container (minutes at 10^6; Azure does not).
            rows += killed_listing("azurite", "azurite", n, 1, workdir, cs)
    finally:
        if started:
            stop_pid(server.pid)
    return rows


class CountingSource:
    """An Azure source that counts the listing requests it sends and the entries they return, per
    range prefix (the listing's ranges are "/"-delimited folders)."""

    def __init__(self, source):
        self.source = source
        self.pages: dict[str, int] = {}
        self.entries = 0

    def __getattr__(self, name):
        return getattr(self.source, name)

    def folders(self, prefix: str, limit: int):
        return self.source.folders(prefix, limit)

    def list(self, prefix: str = ""):
        return self.source.list(prefix)

    def list_name(self, name: str):
        return self.source.list_name(name)

    def list_pages(self, part: ListingRange, marker: str | None = None) -> Iterator[ListingPage]:
        for page in self.source.list_pages(part, marker):
            self.pages[part.prefix] = self.pages.get(part.prefix, 0) + 1
            self.entries += len(page.objects)
            yield page


def bench_source(spec: str, cs: str | None = None):
    """The source a `list-into` child and the resuming run list: "azurite" (the bench container of
    the Azurite of connection string `cs`, else BENCH_AZURITE_CONNECTION_STRING) or
    "synthetic:<objects>:<folders>"."""
    if spec.startswith("synthetic:"):
        _, objects, folders = spec.split(":")
        return SyntheticSource(int(objects), int(folders))
    from connectors.azure_blob import AzureBlobSource

    # Azurite answers a "/"-delimited listing of a large container slowly (it pages through every blob).
    return AzureBlobSource.from_connection_string(cs or os.environ["BENCH_AZURITE_CONNECTION_STRING"], CONTAINER,
                                                  page_size=5000, read_timeout=1800)


def listing_child(state_path: str, at_once: int, source: str) -> int:
    """`list-into`: a migrate run's listing of `source` (`bench_source`) into the state at
    `state_path`, in a process of its own that the parent kills part-way."""
    state = StateStore(state_path)
    try:
        list_into(state, bench_source(source), at_once)
    finally:
        state.close()
    return 0


def killed_listing(label: str, source: str, objects: int, at_once: int, workdir: Path,
                   cs: str | None = None) -> list[tuple[str, str, str, str]]:
    """A listing of `source` (`bench_source`, holding `objects`) killed (SIGKILL) once half its
    objects are stored, then a run that takes it over: what the killed one had stored, the requests
    the resumed one sends per range (none to a range done before the kill), and the final listing
    checked (every object once)."""
    import signal
    import sqlite3
    import subprocess

    state_path = workdir / f"killed-{label}" / "state.db"
    state_path.parent.mkdir()
    StateStore(state_path).close()  # the schema, before the child and this process poll it
    child = subprocess.Popen([sys.executable, __file__, "list-into", "--state", str(state_path),
                              "--at-once", str(at_once), "--source", source],
                             env={**os.environ, **({"BENCH_AZURITE_CONNECTION_STRING": cs} if cs else {})})
    began = time.perf_counter()
    db = sqlite3.connect(state_path, timeout=60)

    def stored() -> tuple[int, int, int]:
        found, done, ranges = db.execute(
            "SELECT coalesce(sum(objects), 0), coalesce(sum(done), 0), count(*) FROM listing_ranges").fetchone()
        return int(found), int(done), int(ranges)

    try:
        while child.poll() is None and stored()[0] < objects // 2:
            time.sleep(0.2)
        if child.poll() is not None:
            raise SystemExit(f"the listing process ended (exit {child.returncode}) before it could be killed")
        child.send_signal(signal.SIGKILL)
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
    first = time.perf_counter() - began
    kept, done, ranges = stored()
    done_prefixes = {p for (p,) in db.execute("SELECT prefix FROM listing_ranges WHERE done")}
    db.close()
    rows = []
    _add(rows, (label, f"killed listing ({at_once} at once): {kept:,} objects stored, {done} of {ranges} "
                       "ranges done", f"{first:.0f} s", f"{kept / first:,.0f} obj/s"))
    counting = CountingSource(bench_source(source, cs))
    state = StateStore(state_path)
    try:
        # What the next migrate run does first, its project's lock free: the killed run is dead.
        state.mark_interrupted([r.id for r in state.running_runs()])
        (run, n, listing), seconds = timed("resume", lambda: list_into(state, counting, at_once))
        listed_again = sorted(p for p in counting.pages if p in done_prefixes)
        keys, distinct = db_counts(state, run)
    finally:
        state.close()
    assert listing.taken_over is not None, "the second run did not take over the killed listing"
    assert (n, keys, distinct) == (objects, objects, objects), (n, keys, distinct, objects)
    assert not listed_again, f"ranges done before the kill listed again: {listed_again}"
    _add(rows, (label, f"resumed: {sum(counting.pages.values()):,} listing requests for {counting.entries:,} "
                       f"entries ({objects - kept:,} not stored before the kill), none to the {done} range(s) "
                       f"done; {n:,} objects, each once", f"{seconds:.0f} s",
                f"{counting.entries / seconds:,.0f} obj/s"))
    return rows


def db_counts(state: StateStore, run: int) -> tuple[int, int]:
    """The listing rows of `run` and their distinct keys."""
    import sqlalchemy as sa

    from engine.state.schema import listing

    with state.engine.connect() as conn:
        return tuple(conn.execute(sa.select(sa.func.count(), sa.func.count(sa.distinct(listing.c.source_key)))
                                  .where(listing.c.run_id == run)).one())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="part", required=True)
    az = sub.add_parser("azurite")
    az.add_argument("--blobs", type=int, default=100_000)
    az.add_argument("--folders", type=int, default=16)
    az.add_argument("--seed-threads", type=int, default=32)
    az.add_argument("--seed", choices=("api", "database"), default="api",
                    help="api: Put Blob requests (slows as the container grows); database: Azurite's "
                         "metadata database written directly, then loaded by Azurite (10^6 blobs)")
    az.add_argument("--ranges", default="1,2,4", help="the listings into the state: ranges at once, comma-separated")
    az.add_argument("--killed", action="store_true",
                    help="also a listing killed half-way (one range) and the run that resumes it")
    child = sub.add_parser("list-into")  # a listing in its own process, killed by --killed
    child.add_argument("--state", required=True)
    child.add_argument("--at-once", type=int, default=4)
    child.add_argument("--source", required=True, help='"azurite" or "synthetic:<objects>:<folders>"')
    syn = sub.add_parser("synthetic")
    syn.add_argument("--objects", type=int, default=10_000_000)
    syn.add_argument("--folders", type=int, default=16)
    syn.add_argument("--postgres", action="store_true", help="also on a private PostgreSQL server")
    syn.add_argument("--no-sqlite", action="store_true")
    syn.add_argument("--killed", action="store_true",
                     help="also a listing killed half-way (4 ranges at once, SQLite) and the run that resumes it")
    args = parser.parse_args()
    if args.part == "list-into":
        return listing_child(args.state, args.at_once, args.source)

    workdir = Path(tempfile.mkdtemp(prefix="bench-listing-"))
    rows: list[tuple[str, str, str, str]] = []
    try:
        if args.part == "azurite":
            rows = azurite(args.blobs, args.folders, args.seed_threads, args.seed,
                           [int(n) for n in args.ranges.split(",") if n], args.killed, workdir)
            header = ("where", "what", "rate", "ratio / time")
        else:
            header = ("state", "what", "rate / time", "peak RSS MiB")
            if not args.no_sqlite:
                rows += synthetic(args.objects, args.folders, str(workdir / "state.db"), "sqlite")
            if args.postgres:
                from tests.pg import start_postgres

                workdir.chmod(0o755)  # the server runs as the `postgres` user when this runs as root
                pg = start_postgres(workdir / "pg")
                try:
                    rows += synthetic(args.objects, args.folders, pg.create_database("bench"), "postgresql")
                finally:
                    pg.stop()
            if args.killed:
                rows += killed_listing("synthetic", f"synthetic:{args.objects}:{args.folders}", args.objects, 4,
                                       workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(4)]
    for r in [header] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
