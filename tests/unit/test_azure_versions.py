"""Versions in a live listing, against List Blobs answers recorded in the service's documented
shape (Azurite keeps no versions: it returns no `VersionId`, so these answers are served from a
loopback HTTP server). Each blob's current version is its object; earlier versions, the versions
of a deleted blob and snapshots are history, counted and named as not carried."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

from config.models import DatasetConfig
from connectors.azure_blob import AzureBlobSource
from connectors.base import NOT_CARRIED, ListingRange
from engine.listing import LiveListing


def blob_xml(name: str, size: int, *, version: str | None = None, current: bool | None = None,
             snapshot: str | None = None, etag: str = "0x8D9", tier: str = "Hot", archive_status: str | None = None,
             copy: str = "") -> str:
    """One `<Blob>` of a List Blobs answer, in the service's documented shape."""
    extra = ""
    if snapshot:
        extra += f"<Snapshot>{snapshot}</Snapshot>"
    if version:
        extra += f"<VersionId>{version}</VersionId>"
    if current is not None:
        extra += f"<IsCurrentVersion>{str(current).lower()}</IsCurrentVersion>"
    return (f"<Blob><Name>{name}</Name>{extra}<Properties>"
            "<Creation-Time>Mon, 02 Nov 2026 10:00:00 GMT</Creation-Time>"
            "<Last-Modified>Mon, 02 Nov 2026 10:00:00 GMT</Last-Modified>"
            f"<Etag>{etag}</Etag><Content-Length>{size}</Content-Length>"
            "<Content-Type>text/csv</Content-Type><Content-Encoding /><Content-Language />"
            f"<Content-MD5 /><Cache-Control /><BlobType>BlockBlob</BlobType><AccessTier>{tier}</AccessTier>"
            f"{f'<ArchiveStatus>{archive_status}</ArchiveStatus>' if archive_status else ''}{copy}"
            "<LeaseStatus>unlocked</LeaseStatus>"
            "<LeaseState>available</LeaseState><ServerEncrypted>true</ServerEncrypted>"
            "</Properties><Metadata /></Blob>")


def page_xml(blobs: list[str], next_marker: str | None) -> bytes:
    """A List Blobs answer holding `blobs`."""
    return ('<?xml version="1.0" encoding="utf-8"?>'
            '<EnumerationResults ServiceEndpoint="http://127.0.0.1/devstoreaccount1" ContainerName="vers">'
            f"<MaxResults>3</MaxResults><Blobs>{''.join(blobs)}</Blobs>"
            f"<NextMarker>{next_marker or ''}</NextMarker></EnumerationResults>").encode()


# Copy Blob's properties as List Blobs gives them (include=copy): one still filling, one done.
COPY = ("<CopyId>6f2c1a</CopyId><CopySource>https://other.blob.core.windows.net/c/{name}</CopySource>"
        "<CopyStatus>{status}</CopyStatus><CopyProgress>{progress}</CopyProgress>"
        "<CopyCompletionTime>Mon, 02 Nov 2026 10:00:00 GMT</CopyCompletionTime>")
COPYING = COPY.format(name="d.bin", status="pending", progress="4096/70")
COPIED = COPY.format(name="e.bin", status="success", progress="80/80")
V1, V2, V3 = "2026-11-01T10:00:00.0000000Z", "2026-11-02T10:00:00.0000000Z", "2026-11-03T10:00:00.0000000Z"
SNAP = "2026-11-04T10:00:00.0000000Z"
# Two pages, as the service cuts them (an opaque marker that goes on inside a.csv's versions):
# a.csv has two earlier versions and its current one; b.csv was deleted (its only version is not
# current); c.csv has a snapshot beside the blob (no versioning when it was written: no version id).
PAGES = {
    None: page_xml([blob_xml("a.csv", 10, version=V1), blob_xml("a.csv", 20, version=V2)], "2!88!MDAwMDA3IWEuY3N2"),
    "2!88!MDAwMDA3IWEuY3N2": page_xml([blob_xml("a.csv", 30, version=V3, current=True),
                                    blob_xml("b.csv", 40, version=V1),
                                    blob_xml("c.csv", 50, snapshot=SNAP), blob_xml("c.csv", 60),
                                    blob_xml("d.bin", 70, copy=COPYING), blob_xml("e.bin", 80, copy=COPIED)], None),
}


@pytest.fixture(scope="module")
def service():
    asked: list[dict[str, list[str]]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            query = parse_qs(urlsplit(self.path).query)
            asked.append(query)
            body = PAGES.get(query.get("marker", [None])[0])
            self.send_response(200 if body is not None else 400)
            self.send_header("Content-Type", "application/xml")
            self.send_header("x-ms-version", "2021-08-06")
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/devstoreaccount1", asked
    server.shutdown()


def _source(url: str) -> AzureBlobSource:
    return AzureBlobSource.from_sas(url, "sv=2021-08-06&sig=recorded", "vers", page_size=3, retry_total=0)


def test_current_versions_are_the_objects_and_the_rest_is_history(service):
    url, asked = service
    pages = list(_source(url).list_pages(ListingRange("")))
    assert "versions" in asked[0]["include"][0] and "snapshots" in asked[0]["include"][0]
    objects = [(m.key, m.size, m.version_id) for p in pages for m in p.objects]
    assert objects == [("a.csv", 30, V3), ("c.csv", 60, None), ("d.bin", 70, None), ("e.bin", 80, None)]
    history = [(m.key, m.size, m.earlier_state) for p in pages for m in p.history]
    assert history == [("a.csv", 10, "version"), ("a.csv", 20, "version"), ("b.csv", 40, "version"),
                       ("c.csv", 50, "snapshot")]
    # The service's opaque marker is followed as given: no second listing of a name.
    assert [q.get("marker") for q in asked[-2:]] == [None, ["2!88!MDAwMDA3IWEuY3N2"]]


def test_a_live_listing_counts_what_it_does_not_carry(service):
    url, _ = service
    listing = LiveListing(_source(url), DatasetConfig(source="azure", container="vers", destination="d"))
    assert [m.key for m in listing] == ["a.csv", "c.csv", "d.bin", "e.bin"]
    assert listing.not_copied == {NOT_CARRIED["version"]: (3, 70), NOT_CARRIED["snapshot"]: (1, 50)}


def test_a_blob_a_copy_is_still_filling_is_listed_as_not_copyable_now_with_the_reason(service):
    url, asked = service
    metas = {m.key: m for p in _source(url).list_pages(ListingRange("")) for m in p.objects}
    assert "copy" in asked[-1]["include"][0].split(",")
    assert metas["d.bin"].not_copyable.startswith("a copy into it is still in progress at the source")
    assert "4096/70 bytes" in metas["d.bin"].not_copyable
    assert metas["e.bin"].not_copyable is None and metas["c.csv"].not_copyable is None


def test_history_keys_name_the_earlier_state_and_nothing_else_parses_as_one():
    from connectors.base import ObjectMeta, history_key, history_of

    snap = ObjectMeta("2024/d/a.csv", 3, "e", snapshot=SNAP)
    version = ObjectMeta("2024/d/a.csv", 3, "e", version_id=V1, current_version=False)
    assert history_key(snap, "2024/") == f"2024/.exitplan-history/d/a.csv/snapshot-{SNAP}"
    assert history_of(history_key(snap, "2024/")) == ("2024/d/a.csv", "snapshot", SNAP)
    assert history_of(history_key(version, "")) == ("2024/d/a.csv", "version", V1)
    for key in ("a.csv", ".exitplan-history/a.csv", ".exitplan-history/a.csv/snapshot-yesterday",
                ".exitplan-history/a.csv/copy-2026-11-01T10:00:00.0000000Z", f".exitplan-history/snapshot-{SNAP}"):
        assert history_of(key) is None, key


def test_history_all_needs_a_live_listing():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="`history: all` needs a live listing"):
        DatasetConfig(source="az", container="c", destination="d", history="all",
                      inventory={"report": "inv/2026/11/30/01-00-00/rule"})
