"""Rehydration against Blob service answers in the documented shape, served from loopback:
Azurite rehydrates an Archive blob at once, so a rehydration that is still pending, and a Set Blob
Tier request the service refuses, are shown to exitplan here."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from urllib.parse import parse_qs, urlsplit

import pytest

from config.models import DatasetConfig, TransferConfig
from connectors.azure_blob import AzureBlobSource
from engine import rehydrate as rh
from engine import state as st
from engine.state import StateStore
from tests.unit.test_azure_versions import blob_xml, page_xml


class Account:
    """Three Archive blobs: `slow.bin` is already being rehydrated (readable after two more
    listings), `a.bin` is not (readable once asked, two listings later), `held.bin` cannot be
    rehydrated (the service answers 409 to its Set Blob Tier)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.listings = 0
        self.asked: list[tuple[str, str | None, str | None]] = []
        self.pending = {"slow.bin": 0}  # blob -> listing at which its rehydration began

    def page(self) -> bytes:
        with self.lock:
            self.listings += 1
            blobs = [blob_xml("hot.txt", 5)]
            for name, size in (("a.bin", 100), ("held.bin", 7), ("slow.bin", 40)):
                began = self.pending.get(name)
                if began is not None and self.listings - began > 2:
                    blobs.append(blob_xml(name, size, tier="Hot"))
                else:
                    blobs.append(blob_xml(name, size, tier="Archive",
                                          archive_status="rehydrate-pending-to-hot" if began is not None else None))
            return page_xml(blobs, None)

    def set_tier(self, name: str, tier: str | None, priority: str | None) -> int:
        with self.lock:
            self.asked.append((name, tier, priority))
            if name == "held.bin":
                return 409
            self.pending.setdefault(name, self.listings)
            return 202


@pytest.fixture
def account():
    state = Account()

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, status: int, body: bytes = b"", code: str | None = None):
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("x-ms-version", "2021-08-06")
            if code:
                self.send_header("x-ms-error-code", code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):  # noqa: N802 - http.server's name
            self._answer(200, state.page())

        def do_PUT(self):  # noqa: N802
            url = urlsplit(self.path)
            assert parse_qs(url.query)["comp"] == ["tier"]
            status = state.set_tier(url.path.rsplit("/", 1)[-1], self.headers.get("x-ms-access-tier"),
                                    self.headers.get("x-ms-rehydrate-priority"))
            if status == 409:
                body = (b'<?xml version="1.0" encoding="utf-8"?><Error><Code>BlobImmutableDueToPolicy</Code>'
                        b"<Message>This operation is not permitted as the blob is immutable due to a policy.</Message>"
                        b"</Error>")
                self._answer(409, body, "BlobImmutableDueToPolicy")
            else:
                self._answer(status)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/devstoreaccount1"
    yield state
    server.shutdown()


@pytest.fixture
def loaded(account, monkeypatch):
    monkeypatch.setattr(rh, "open_source", lambda loaded, name: AzureBlobSource.from_sas(
        account.url, "sv=2021-08-06&sig=recorded", "arch", retry_total=0))
    account.state = None  # no state: nothing copied yet
    monkeypatch.setattr(rh, "open_state", lambda loaded, read_only: account.state)
    ds = DatasetConfig(source="az", container="arch", destination="d")
    return SimpleNamespace(config=SimpleNamespace(datasets={"scans": ds}, transfer=TransferConfig(concurrency=2)))


def test_one_pass_asks_for_the_archive_blobs_not_being_rehydrated_and_names_a_refusal(account, loaded):
    (found,) = rh.rehydrate(loaded, ["scans"], tier="Cool", priority="High")
    assert sorted(account.asked) == [("a.bin", "Cool", "High"), ("held.bin", "Cool", "High")]
    assert (found.requested.objects, found.requested.bytes) == (1, 100)
    assert (found.pending.objects, found.pending.bytes) == (1, 40)
    assert found.failed.objects == 1 and found.failures[0][0] == "held.bin"
    assert "BlobImmutableDueToPolicy" in found.failures[0][1]
    assert found.archived.objects == 3


def test_a_dry_run_asks_for_nothing(account, loaded):
    (found,) = rh.rehydrate(loaded, ["scans"], dry_run=True)
    assert account.asked == [] and found.requested.objects == 2 and found.pending.objects == 1


def test_waiting_lists_until_only_the_refused_blob_is_left_then_stops_at_the_timeout(account, loaded):
    passes = []
    slept = []
    found = rh.wait_readable(loaded, ["scans"], tier="Hot", priority="Standard", poll=60, timeout=300,
                             progress=lambda f, waited: passes.append(([x.archived.objects for x in f], waited)),
                             sleep=slept.append, clock=lambda: 60 * len(slept))
    # a.bin and slow.bin come online; held.bin, refused at every pass, is still archived at the end,
    # the pass at the timeout (one more poll would pass it).
    assert passes == [([3], 0), ([3], 60), ([2], 120), ([1], 180), ([1], 240), ([1], 300)]
    assert found[0].failures[0][0] == "held.bin" and slept == [60] * 5
    assert [name for name, _, _ in account.asked].count("a.bin") == 1  # asked once, then pending
    assert [name for name, _, _ in account.asked].count("held.bin") == 6  # asked again at every pass


def test_a_dataset_not_read_from_azure_is_refused_when_named_and_set_aside_otherwise():
    from config.errors import ExitCode, UserError

    sources = {"az": SimpleNamespace(kind="azure_blob"), "partner": SimpleNamespace(kind="sftp")}
    datasets = {"scans": SimpleNamespace(source="az"), "deliveries": SimpleNamespace(source="partner")}
    loaded = SimpleNamespace(config=SimpleNamespace(sources=sources, datasets=datasets))
    assert rh.azure_datasets(loaded, ["scans", "deliveries"], named=False) == (["scans"], ["deliveries"])
    with pytest.raises(UserError) as caught:
        rh.azure_datasets(loaded, ["deliveries"], named=True)
    assert caught.value.exit_code == ExitCode.USAGE and "`deliveries`" in str(caught.value)


def test_a_blob_archived_after_its_copy_is_not_asked_for_and_one_changed_since_is(account, loaded, tmp_path):
    account.state = StateStore(tmp_path / "state.db")
    run = account.state.start_run("migrate")
    for key, etag, size in (("a.bin", "0x8D9", 100), ("held.bin", "0x8D8", 7)):  # held.bin rewritten since
        oid = account.state.add_object(run, "scans", key, etag, size, dest_key=key, state=st.IN_PROGRESS)
        account.state.transition(oid, st.UPLOADED)
    (found,) = rh.rehydrate(loaded, ["scans"])
    assert [name for name, _, _ in account.asked] == ["held.bin"]
    assert (found.copied.objects, found.copied.bytes) == (1, 100) and found.archived.objects == 2
    assert found.as_dict()["copied"] == {"objects": 1, "bytes": 100}

