"""What only the SFTP connector does, on the test's OpenSSH sshd: host keys pinned, logins refused,
hostile names refused by name, a file changed during its read detected, symbolic links reported
and not followed, uploads in parts kept across a new connector, listings streamed per directory."""

from __future__ import annotations

import base64
import concurrent.futures
import gc
import hashlib
import os
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from paramiko.sftp import CMD_MKDIR, CMD_OPENDIR, CMD_STAT

from connectors import sftp as sftp_module
from connectors.base import (
    AuthError,
    ConfigError,
    ContentSettings,
    InvalidRequest,
    NotFound,
    SourceChanged,
    TransientError,
    WriteMeta,
)
from connectors.openssh import SESSIONS_PER_MASTER
from connectors.sftp import HostKeyPin, HostKeyRefused, SftpLogin, SftpStore
from flows import lab_processes as lp
from tests.contract.contract_support import SftpHarness, md5

ROOT = Path(__file__).resolve().parents[2]

MiB = 1024 * 1024


@pytest.fixture(params=["openssh", "paramiko"])
def harness(sshd, request):
    """A fresh directory, its stores' sessions carried by each transport in turn."""
    return SftpHarness(sshd, transport=request.param)


def _fingerprint(pub_path) -> str:
    blob = base64.b64decode(open(pub_path).read().split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def _store(sshd, harness, pin: HostKeyPin, login: SftpLogin | None = None) -> SftpStore:
    login = login or SftpLogin(sshd.username, sshd.user_key.read_text())
    return SftpStore(lp.LOOPBACK, sshd.port, str(harness.dir), login, pin, connections=1, transport=harness.transport)


def test_a_pinned_fingerprint_is_accepted(sshd, harness):
    store = _store(sshd, harness, HostKeyPin(fingerprints=(_fingerprint(f"{sshd.host_key}.pub"),)))
    assert list(store.list()) == []


def test_an_unknown_host_key_is_refused_before_logging_in(sshd, harness, tmp_path):
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)

    with pytest.raises(HostKeyRefused) as info:
        _store(sshd, harness, HostKeyPin(fingerprints=(_fingerprint(f"{other}.pub"),)))
    assert "unknown" in str(info.value) and _fingerprint(f"{sshd.host_key}.pub") in str(info.value)
    assert isinstance(info.value, ConfigError)

    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(HostKeyRefused):
        _store(sshd, harness, HostKeyPin(known_hosts=str(empty)))


def test_a_changed_host_key_is_refused(sshd, harness, tmp_path):
    """known_hosts pins another key for this very host and port: a changed key (or a machine in
    the middle), never accepted."""
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    kind, blob = open(f"{other}.pub").read().split()[:2]
    known = tmp_path / "known_hosts"
    known.write_text(f"[{lp.LOOPBACK}]:{sshd.port} {kind} {blob}\n")

    with pytest.raises(HostKeyRefused) as info:
        _store(sshd, harness, HostKeyPin(known_hosts=str(known)))
    assert "NOT the one pinned" in str(info.value)


def test_no_pin_at_all_is_a_configuration_error(sshd, harness):
    with pytest.raises(ConfigError):
        _store(sshd, harness, HostKeyPin())


def test_a_key_the_server_does_not_know_and_a_password_are_refused(sshd, harness, tmp_path):
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    pin = HostKeyPin(known_hosts=str(sshd.known_hosts))
    with pytest.raises(AuthError):
        _store(sshd, harness, pin, SftpLogin(sshd.username, stranger.read_text()))
    with pytest.raises(AuthError):  # the lab's sshd is key-only
        _store(sshd, harness, pin, SftpLogin(sshd.username, password="guess"))


def test_an_encrypted_key_needs_its_passphrase(sshd, harness, tmp_path):
    locked = tmp_path / "locked"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "s3cret phrase", "-f", str(locked)], check=True)
    pin = HostKeyPin(known_hosts=str(sshd.known_hosts))
    with pytest.raises(AuthError) as info:
        _store(sshd, harness, pin, SftpLogin(sshd.username, locked.read_text()))
    assert "passphrase" in str(info.value)
    # With it, the key is read; the server does not know it, so the login itself is refused.
    with pytest.raises(AuthError) as info:
        _store(sshd, harness, pin, SftpLogin(sshd.username, locked.read_text(), passphrase="s3cret phrase"))
    assert "refused the login" in str(info.value)


def _signed(sshd, tmp_path, name: str, *sign_args: str) -> tuple[str, str]:
    """A new key (unknown to authorized_keys) and its certificate signed by the lab's user CA."""
    key = tmp_path / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    subprocess.run(["ssh-keygen", "-q", "-s", str(sshd.user_ca_key), "-I", name, *sign_args, f"{key}.pub"],
                   check=True, capture_output=True)
    return key.read_text(), (tmp_path / f"{name}-cert.pub").read_text()


def test_a_key_certified_by_the_trusted_user_ca_logs_in(sshd, harness, tmp_path):
    pin = HostKeyPin(known_hosts=str(sshd.known_hosts))
    key, certificate = _signed(sshd, tmp_path, "certified", "-n", sshd.username, "-V", "-5m:+1h")
    store = _store(sshd, harness, pin, SftpLogin(sshd.username, key, certificate=certificate))
    assert list(store.list()) == []
    # The same key without its certificate is a stranger to the server.
    with pytest.raises(AuthError):
        _store(sshd, harness, pin, SftpLogin(sshd.username, key))


@pytest.mark.parametrize("sign_args", [("-n", "somebody-else"), ("-n", "{user}", "-V", "20200101:20200102")],
                         ids=["other principal", "expired"])
def test_a_certificate_the_server_does_not_accept_is_refused(sshd, harness, tmp_path, sign_args):
    pin = HostKeyPin(known_hosts=str(sshd.known_hosts))
    key, certificate = _signed(sshd, tmp_path, "refused", *(a.format(user=sshd.username) for a in sign_args))
    with pytest.raises(AuthError) as info:
        _store(sshd, harness, pin, SftpLogin(sshd.username, key, certificate=certificate))
    assert "refused the login" in str(info.value)


def test_a_certificate_of_another_kind_of_key_is_named(sshd, harness, tmp_path):
    rsa = tmp_path / "rsa"
    subprocess.run(["ssh-keygen", "-q", "-t", "rsa", "-b", "2048", "-N", "", "-f", str(rsa)], check=True)
    subprocess.run(["ssh-keygen", "-q", "-s", str(sshd.user_ca_key), "-I", "rsa", "-n", sshd.username, f"{rsa}.pub"],
                   check=True, capture_output=True)
    pin = HostKeyPin(known_hosts=str(sshd.known_hosts))
    for certificate, fragment in (((tmp_path / "rsa-cert.pub").read_text(), "not a certificate of the ssh-ed25519"),
                                  ("not a certificate", "cannot be read")):
        with pytest.raises(AuthError) as info:
            _store(sshd, harness, pin, SftpLogin(sshd.username, sshd.user_key.read_text(), certificate=certificate))
        assert fragment in str(info.value)


@pytest.mark.parametrize("key", ["../escape", "a/../../escape", "/etc/passwd", "a//b", "a/./b", "new\nline",
                                 "tab\there", "nul\x00byte", "dir/", ".exitplan-sftp/meta/x.json", ""])
def test_hostile_names_are_refused_by_name(harness, key):
    store = harness.sink()
    for call in (lambda: store.put(key, b"x", 1, WriteMeta(), None), lambda: store.head(key),
                 lambda: store.read_range(key, 0, 1), lambda: store.open_multipart(key, WriteMeta()),
                 lambda: store.delete(key)):
        with pytest.raises(InvalidRequest) as info:
            call()
        assert repr(key) in str(info.value)
    assert not (harness.dir.parent / "escape").exists()
    assert sorted(p.name for p in harness.dir.iterdir() if p.name != ".exitplan-sftp") == []


def test_a_file_changed_during_its_read_is_detected(harness, monkeypatch):
    """The partner rewrites the file once the first read is answered, while the others are still
    to be sent (two reads in flight at most): the second look, sent behind the last read, sees it."""
    data = os.urandom(2 * MiB)
    harness.seed("delivery.csv", data)
    store = harness.source()
    pinned = store.head("delivery.csv").etag
    real = sftp_module._Replies._async_response
    rewritten = []

    def the_partner_rewrites_after_the_first_read(self, t, msg, num):
        if t == sftp_module.CMD_DATA and not rewritten:
            (harness.dir / "delivery.csv").write_bytes(data + b"appended while being read")
            rewritten.append(num)
        return real(self, t, msg, num)

    monkeypatch.setattr(sftp_module, "_READ_WINDOW", 2)
    monkeypatch.setattr(sftp_module._Replies, "_async_response", the_partner_rewrites_after_the_first_read)
    with pytest.raises(SourceChanged) as info:
        store.read_range("delivery.csv", 0, MiB, if_match=pinned)
    assert "changed while it was read" in str(info.value)
    assert rewritten
    monkeypatch.undo()
    # Re-read from its new version (what the engine does after SourceChanged), it is whole.
    now = store.head("delivery.csv")
    assert now.etag != pinned
    assert store.read_range("delivery.csv", 0, now.size, if_match=now.etag) == data + b"appended while being read"


def test_a_small_read_takes_two_round_trips_and_closes_its_file(harness, monkeypatch):
    """The open; a look at the file, the reads, a second look and the close (3 before, 5 before
    that). A round trip is a wait for an answer after requests were sent."""
    data = os.urandom(100_000)
    harness.seed("small.csv", data)
    store = harness.source()
    pinned = store.head("small.csv").etag
    events = []
    real_send, real_read = sftp_module.paramiko.SFTPClient._async_request, sftp_module.paramiko.SFTPClient._read_response

    def send(self, fileobj, t, *args):
        events.append(("send", t))
        return real_send(self, fileobj, t, *args)

    def read(self, *args, **kwargs):
        events.append(("read", None))
        return real_read(self, *args, **kwargs)

    monkeypatch.setattr(sftp_module.paramiko.SFTPClient, "_async_request", send)
    monkeypatch.setattr(sftp_module.paramiko.SFTPClient, "_read_response", read)
    assert store.read_range("small.csv", 0, len(data), if_match=pinned) == data
    sent = [t for kind, t in events if kind == "send"]
    assert sent == [sftp_module.CMD_OPEN, sftp_module.CMD_FSTAT, sftp_module.CMD_READ, sftp_module.CMD_FSTAT,
                    sftp_module.CMD_CLOSE]
    waits = sum(1 for before, now in zip(events, events[1:]) if before[0] == "send" and now[0] == "read")
    assert waits == 2
    monkeypatch.undo()
    assert store.read_range("small.csv", 10, 20, if_match=pinned) == data[10:20]
    with pytest.raises(InvalidRequest, match="outside"):
        store.read_range("small.csv", 0, len(data) + 1, if_match=pinned)
    with pytest.raises(SourceChanged):
        store.read_range("small.csv", 0, 10, if_match="s1-t1")
    assert store.read_range("small.csv", 5, 5, if_match=pinned) == b""


def test_a_read_answered_short_after_its_close_was_sent_is_read_again(harness, caplog):
    """A server that answers a read with fewer bytes than asked though it stated its limit (here:
    the store asks for more than OpenSSH's 255 KiB): the range is read again, asking for the rest
    before the close; said once, and the store asks so from then on."""
    data = os.urandom(700_000)
    harness.seed("big.csv", data)
    store = harness.source()
    pinned = store.head("big.csv").etag
    assert store._close_early
    store.read_request = 4 * MiB
    with caplog.at_level("INFO", logger="connectors.sftp"):
        assert store.read_range("big.csv", 0, len(data), if_match=pinned) == data
        assert store.read_range("big.csv", 100, 600_000, if_match=pinned) == data[100:600_000]
    assert not store._close_early
    assert sum("answers reads shorter" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(SourceChanged):
        store.read_range("big.csv", 0, 10, if_match="s1-t1")


def _temporary_files(harness) -> list[str]:
    """The temporary files the store left: data files in its tmp directory, metadata files below meta."""
    control = harness.dir / ".exitplan-sftp"
    return sorted(str(p.relative_to(control)) for p in control.rglob("*")
                  if p.is_file() and (p.parent.name == "tmp" or p.name.endswith(".tmp")))


def test_a_small_put_takes_four_round_trips_and_leaves_no_temporary_file(harness, monkeypatch):
    """Both files opened at once; the data written, synced, looked at and closed; the metadata
    file written and closed with the data's rename; the metadata file's rename (six before). A
    round trip is a wait for an answer after requests were sent."""
    store = harness.sink()
    store.put("d/first", b"1", 1, WriteMeta(), None)  # the directories are made (and remembered) here
    events = []
    real_send, real_read = sftp_module.paramiko.SFTPClient._async_request, sftp_module.paramiko.SFTPClient._read_response
    real_register = sftp_module._Batch.register

    def send(self, fileobj, t, *args):
        events.append(("send", t))
        return real_send(self, fileobj, t, *args)

    def register(self):  # an OpenSSH session's writes, framed by the writer
        events.append(("send", sftp_module.CMD_WRITE))
        return real_register(self)

    def read(self, *args, **kwargs):
        events.append(("read", None))
        return real_read(self, *args, **kwargs)

    monkeypatch.setattr(sftp_module.paramiko.SFTPClient, "_async_request", send)
    monkeypatch.setattr(sftp_module.paramiko.SFTPClient, "_read_response", read)
    monkeypatch.setattr(sftp_module._Batch, "register", register)
    data = os.urandom(10_000)
    meta = WriteMeta(ContentSettings(content_type="text/csv"), {"owner": "partner"})
    etag = store.put("d/small.csv", data, len(data), meta, md5(data))
    monkeypatch.undo()
    sent = [t for kind, t in events if kind == "send"]
    assert sent.count(sftp_module.CMD_OPEN) == 2 and sent[:2] == [sftp_module.CMD_OPEN] * 2
    assert sent.count(sftp_module.CMD_CLOSE) == 2
    waits = sum(1 for before, now in zip(events, events[1:]) if before[0] == "send" and now[0] == "read")
    assert waits == 4
    head = store.head("d/small.csv")
    assert (head.etag, head.size, head.content.content_type, head.metadata) == (etag, len(data), "text/csv",
                                                                                 {"owner": "partner"})
    assert head.content_md5 == md5(data)
    assert harness.raw_read("d/small.csv") == data
    assert _temporary_files(harness) == []


def test_every_temporary_file_is_in_the_temporary_directory_and_can_be_removed_by_name(harness, monkeypatch):
    """A put's file and metadata file, and a control file (an upload's record), are written under
    names in `.exitplan-sftp/tmp/` only: what a killed write leaves is there, listed with its size
    and time, and removed by name (`exitplan cleanup`); a name that is not one of its files is refused."""
    store = harness.sink()
    names = []
    real_all, real_one = sftp_module.open_all_for_writing, sftp_module.open_for_writing

    def opened_all(sftp, paths):
        names.extend(paths)
        return real_all(sftp, paths)

    def opened_one(sftp, path, **kwargs):
        names.append(path)
        return real_one(sftp, path, **kwargs)

    monkeypatch.setattr(sftp_module, "open_all_for_writing", opened_all)
    monkeypatch.setattr(sftp_module, "open_for_writing", opened_one)
    store.put("deep/er/file.csv", b"data", 4, WriteMeta(ContentSettings(content_type="text/csv")), None)
    store.open_multipart("deep/er/big.bin", WriteMeta())
    monkeypatch.undo()
    temporary = harness.dir / ".exitplan-sftp" / "tmp"
    assert len(names) == 3 and all(os.path.dirname(n) == str(temporary) for n in names)
    assert _temporary_files(harness) == []
    assert store.temporary_files() == []
    (temporary / "left-by-a-kill").write_bytes(b"x" * 10)
    [left] = store.temporary_files()
    assert (left.name, left.size) == ("left-by-a-kill", 10) and left.modified is not None
    for bad in ("../deep/er/file.csv", "a/b", "..", ""):
        with pytest.raises(InvalidRequest):
            store.remove_temporary_file(bad)
    store.remove_temporary_file("left-by-a-kill")
    store.remove_temporary_file("left-by-a-kill")  # gone already: nothing to do
    assert store.temporary_files() == [] and harness.raw_read("deep/er/file.csv") == b"data"


def test_a_metadata_file_that_cannot_be_opened_fails_the_put_and_leaves_nothing(harness, monkeypatch):
    """The server refuses to open the metadata file's temporary name: the put fails, the data's
    temporary file is closed and removed, nothing shows under the key, and the session goes on."""
    store = harness.sink()
    real = sftp_module.paramiko.SFTPClient._async_request
    opens = []

    def refuse_metadata(self, fileobj, t, *args):
        if t == sftp_module.CMD_OPEN:  # a put opens its file, then its metadata file: refuse the second
            opens.append(args[0])
            if len(opens) % 2 == 0:
                args = (args[0].replace("/.exitplan-sftp/tmp/", "/.exitplan-sftp/no-such-directory/"),) + args[1:]
        return real(self, fileobj, t, *args)

    monkeypatch.setattr(sftp_module.paramiko.SFTPClient, "_async_request", refuse_metadata)
    data = os.urandom(10_000)
    with pytest.raises(Exception) as info:
        store.put("refused.csv", data, len(data), WriteMeta(), md5(data))
    assert "refused.csv" in str(info.value)
    monkeypatch.undo()
    assert not (harness.dir / "refused.csv").exists()
    assert _temporary_files(harness) == []
    store.put("refused.csv", data, len(data), WriteMeta(), md5(data))
    assert harness.raw_read("refused.csv") == data
    assert _temporary_files(harness) == []


def test_symbolic_links_are_reported_not_followed(harness, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"not part of the delivery")
    harness.seed("real.csv", b"a,b\n")
    os.symlink(outside, harness.dir / "linked-dir")
    os.symlink(harness.dir / "real.csv", harness.dir / "linked-file")
    store = harness.source()

    listed = {m.key: m for m in store.list()}
    assert sorted(listed) == ["linked-dir", "linked-file", "real.csv"]  # named, never left out
    assert listed["real.csv"].not_copyable is None
    assert all("symbolic link" in listed[k].not_copyable and listed[k].size == 0 for k in ("linked-dir", "linked-file"))
    assert sorted(store.skipped_links) == ["linked-dir", "linked-file"]
    # placement refuses them by name, so inventory, migrate and the exit code say so
    from connectors.base import SinkLimits
    from engine.placement import DoesNotFit, place

    with pytest.raises(DoesNotFit, match="symbolic link"):
        place(listed["linked-dir"], "", "", SinkLimits())


def test_the_listing_reads_a_few_directories_ahead_at_once_and_yields_keys_in_order(harness, monkeypatch):
    """Each directory's next `list_ahead` subdirectories are read at once, over sessions of their
    own (far away, one directory at a time set the pace of a tree of small directories), while the
    keys still come in order, each directory whole; a directory further ahead is read when the walk
    comes near it (memory: `list_ahead` directories per level), so a file written there meanwhile
    is listed."""
    for d in range(12):
        for f in ("b", "a/x", "a/y"):
            harness.seed(f"d{d:02d}/{f}", b"x")
    harness.seed("d03/a/z/deep", b"x")
    harness.seed("top", b"x")
    store = harness.source()
    store.list_ahead = 3
    lock, calls, running, most = threading.Lock(), [], [0], [0]
    real = sftp_module.paramiko.SFTPClient.listdir_attr

    def slow_listdir(self, path="."):
        with lock:
            calls.append(path)
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.05)
        try:
            return real(self, path)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(sftp_module.paramiko.SFTPClient, "listdir_attr", slow_listdir)
    listing = store.list()
    assert next(listing).key == "d00/a/x"
    assert len(calls) <= 1 + 3 + 3  # the root, then at most three ahead at each of two levels
    harness.seed("d10/late", b"y")
    rest = [m.key for m in listing]
    expected = sorted([f"d{d:02d}/{f}" for d in range(12) for f in ("b", "a/x", "a/y")]
                      + ["d03/a/z/deep", "d10/late", "top"])
    assert ["d00/a/x"] + rest == expected
    assert 1 < most[0] <= 3
    assert len(calls) == len(set(calls)) == 1 + 12 + 12 + 1  # every directory read once


def test_parts_survive_a_lost_connector_and_nothing_shows_before_complete(harness):
    """A killed writer leaves whole parts and no file under the final name; a new connector lists
    the parts and completes the upload from them."""
    part1, part2 = os.urandom(5 * MiB), os.urandom(MiB)
    store = harness.sink()
    upload = store.open_multipart("escrow/archive.tar", WriteMeta())
    r1 = upload.upload_part(1, part1, len(part1), md5(part1), offset=0)
    store.close()  # the process dies here
    assert not (harness.dir / "escrow" / "archive.tar").exists()

    again = harness.reopen_sink()
    [pending] = list(again.list_multipart_uploads("escrow/"))
    resumed = again.resume_multipart("escrow/archive.tar", pending.upload_id)
    assert resumed.list_parts() == [r1]
    r2 = resumed.upload_part(2, part2, len(part2), md5(part2), offset=len(part1))
    resumed.complete([r1, r2])
    assert harness.raw_read("escrow/archive.tar") == part1 + part2
    assert list(again.list_multipart_uploads()) == []
    assert sorted(os.listdir(harness.dir / ".exitplan-sftp" / "uploads")) == []


def test_a_part_sent_without_its_md5_is_named_by_its_write(harness):
    """The engine sends SFTP parts no MD5 (`part_md5`): the part is not hashed, its receipt names
    that write (another write of the same bytes gets another name, so a receipt recorded for one
    write never vouches for the next), and a new connector lists it as answered."""
    part = os.urandom(MiB)
    store = harness.sink()
    assert store.part_md5 is False and store.etag_is_md5 is False
    upload = store.open_multipart("named.bin", WriteMeta())
    first = upload.upload_part(1, part, len(part), None, offset=0)
    again = upload.upload_part(1, part, len(part), None, offset=0)
    assert first.etag != again.etag and md5(part).hex() not in (first.etag, again.etag)
    store.close()

    reopened = harness.reopen_sink()
    resumed = reopened.resume_multipart("named.bin", upload.upload_id)
    assert resumed.list_parts() == [again]
    with pytest.raises(InvalidRequest, match="not held as sent"):
        resumed.complete([first])
    resumed.complete([again])
    assert harness.raw_read("named.bin") == part


def test_a_source_listing_carries_what_the_metadata_files_hold(harness, monkeypatch):
    """A tree this connector wrote, read as a dataset's source (`source_details`): each file is
    listed as `head` gives it (content settings, metadata, the MD5 of a file written whole), its
    metadata file opened with the others of its directory; a file changed since its metadata file
    was written, or without one, lists bare. A destination's listing opens no metadata file, nor
    does a source's in a tree without `.exitplan-sftp/meta/`."""
    writer = harness.sink()
    data = os.urandom(1000)
    meta = WriteMeta(ContentSettings(content_type="text/csv", content_language="fr"), {"owner": "partner"})
    for key in ("a/one.csv", "a/two.csv", "b/three.csv", "top.csv"):
        writer.put(key, data, len(data), meta, md5(data))
    upload = writer.open_multipart("a/big.bin", WriteMeta(ContentSettings(content_type="application/x-tar"),
                                                          {"k": "v"}))
    upload.complete([upload.upload_part(1, data, len(data), None, offset=0)])
    (harness.dir / "b" / "three.csv").write_bytes(b"changed")
    (harness.dir / "a" / "plain.csv").write_bytes(b"no metadata file")
    opened = []
    real = sftp_module.paramiko.SFTPClient._async_request

    def count(self, fileobj, t, *args):
        if t == sftp_module.CMD_OPEN and "/.exitplan-sftp/meta/" in str(args[0]):
            opened.append(args[0])
        return real(self, fileobj, t, *args)

    source = harness.source()
    monkeypatch.setattr(sftp_module.paramiko.SFTPClient, "_async_request", count)
    listed = {m.key: m for m in source.list()}
    assert sorted(listed) == ["a/big.bin", "a/one.csv", "a/plain.csv", "a/two.csv", "b/three.csv", "top.csv"]
    assert len(opened) == 6  # one per file, never one per file per round trip (tested for puts above)
    for key in ("a/one.csv", "a/two.csv", "top.csv"):
        assert (listed[key].content, listed[key].metadata, listed[key].content_md5) == (meta.content, meta.metadata,
                                                                                        md5(data))
    assert (listed["a/big.bin"].content.content_type, listed["a/big.bin"].metadata) == ("application/x-tar",
                                                                                        {"k": "v"})
    assert listed["a/big.bin"].content_md5 is None
    for key in ("b/three.csv", "a/plain.csv"):
        assert (listed[key].content, listed[key].metadata, listed[key].content_md5) == (ContentSettings(), {}, None)
    for key, m in listed.items():
        assert m == source.head(key)

    opened.clear()
    assert len(list(harness.sink().list())) == 6 and opened == []
    bare = list(source.list(details=False))  # the progress count's listing
    assert [(m.key, m.etag, m.metadata) for m in bare] == [(k, listed[k].etag, {}) for k in sorted(listed)]
    assert opened == []
    # A dataset's directory below the source's configured root (`tree_root`) finds the metadata
    # files of the tree written from there.
    below = harness._store(harness.dir / "a", tree_root=str(harness.dir))
    below.source_details = True
    found = {m.key: m for m in below.list()}
    assert (found["one.csv"].metadata, found["big.bin"].metadata, found["plain.csv"].metadata) == (
        meta.metadata, {"k": "v"}, {})
    assert found["one.csv"] == below.head("one.csv")
    opened.clear()
    partner = SftpHarness(harness.layout, transport=harness.transport)
    partner.seed("delivery.csv", data)
    shutil.rmtree(partner.dir / ".exitplan-sftp")
    [bare] = partner.source().list()
    assert (bare.key, bare.metadata, bare.content_md5) == ("delivery.csv", {}, None) and opened == []


def test_a_source_file_whose_metadata_file_is_unreadable_is_named_not_copied_bare(harness):
    """A metadata file that is not a JSON object: the file cannot be carried with what exitplan
    wrote for it, so a source's listing names it as not copyable (inventory, migrate and the exit
    code say so) rather than copy it without its content headers and metadata."""
    writer = harness.sink()
    data = b"id,amount\n1,2\n"
    for key in ("bad.csv", "good.csv"):
        writer.put(key, data, len(data), WriteMeta(ContentSettings(content_type="text/csv"), {"k": "v"}), None)
    (harness.dir / ".exitplan-sftp" / "meta" / "bad.csv.json").write_text("[not, an, object")
    listed = {m.key: m for m in harness.source().list()}
    why = listed["bad.csv"].not_copyable
    assert "is not a JSON object" in why and "repair or remove" in why
    assert listed["good.csv"].not_copyable is None and listed["good.csv"].metadata == {"k": "v"}
    assert [m.key for m in harness.sink().list() if m.not_copyable] == []  # a destination's listing reads none


def test_a_half_written_part_is_never_listed(harness, monkeypatch):
    store = harness.sink()
    upload = store.open_multipart("half", WriteMeta())
    with pytest.raises(Exception):
        upload.upload_part(1, sftp_module.io.BytesIO(b"x" * 1000), 5000, None, offset=0)  # the body ends early
    assert upload.list_parts() == []
    assert not (harness.dir / "half").exists()


def test_parts_are_written_in_place_and_the_file_is_renamed_not_copied(harness):
    """The parts go into one file at their offsets, in any order; completing renames that file
    (the same inode under the final name): no byte is copied on the server, which needs the
    object's size once, not twice."""
    part1, part2, part3 = os.urandom(5 * MiB + 3), os.urandom(5 * MiB + 3), os.urandom(777)
    store = harness.sink()
    upload = store.open_multipart("in-place.bin", WriteMeta())
    receipts = [upload.upload_part(3, part3, len(part3), None, offset=2 * len(part1)),
                upload.upload_part(1, part1, len(part1), None, offset=0),
                upload.upload_part(2, part2, len(part2), None, offset=len(part1))]
    held = harness.dir / ".exitplan-sftp" / "uploads" / upload.upload_id
    assert sorted(p.name for p in held.iterdir()) == sorted(
        ["upload.json", "data"] + [f"part-{r.number:05d}-{r.etag}-{o}-{r.size}"
                                   for r, o in zip(receipts, (2 * len(part1), 0, len(part1)))])
    inode = (held / "data").stat().st_ino
    upload.complete(sorted(receipts, key=lambda r: r.number))
    assert harness.raw_read("in-place.bin") == part1 + part2 + part3
    assert (harness.dir / "in-place.bin").stat().st_ino == inode and not held.exists()


def test_a_run_killed_once_the_object_is_renamed_leaves_no_part_behind(harness, monkeypatch):
    """Killed after `complete` renamed the file, before the upload's directory went: the next run
    finds no part (so it sends them again), never markers vouching for data that is gone."""
    part1, part2 = os.urandom(5 * MiB), os.urandom(10)
    store = harness.sink()
    upload = store.open_multipart("renamed.bin", WriteMeta())
    receipts = [upload.upload_part(1, part1, len(part1), None, offset=0),
                upload.upload_part(2, part2, len(part2), None, offset=len(part1))]
    publish = store._publish

    def killed_after(*args, **kwargs):
        publish(*args, **kwargs)
        raise KeyboardInterrupt  # the process dies here

    monkeypatch.setattr(store, "_publish", killed_after)
    with pytest.raises(KeyboardInterrupt):
        upload.complete(receipts)
    assert harness.raw_read("renamed.bin") == part1 + part2
    again = harness.reopen_sink()
    resumed = again.resume_multipart("renamed.bin", upload.upload_id)
    assert resumed.list_parts() == []
    receipts = [resumed.upload_part(1, part1, len(part1), None, offset=0),
                resumed.upload_part(2, part2, len(part2), None, offset=len(part1))]
    resumed.complete(receipts)
    assert harness.raw_read("renamed.bin") == part1 + part2 and list(again.list_multipart_uploads()) == []


def test_a_part_without_its_offset_or_out_of_place_is_refused(harness):
    store = harness.sink()
    upload = store.open_multipart("misplaced.bin", WriteMeta())
    with pytest.raises(InvalidRequest, match="without its offset"):
        upload.upload_part(1, b"x" * 10, 10, None)
    r1 = upload.upload_part(1, b"x" * (5 * MiB), 5 * MiB, None, offset=0)
    r2 = upload.upload_part(2, b"y" * 10, 10, None, offset=5 * MiB + 1)  # a byte after where part 1 ends
    with pytest.raises(InvalidRequest, match="part 2 .* was written at byte 5,242,881, not after the parts before it"):
        upload.complete([r1, r2])
    assert not (harness.dir / "misplaced.bin").exists()
    upload.abort()


def test_a_data_file_shorter_than_its_parts_is_refused_never_grown_with_zeros(harness):
    """Whatever cut the upload's file behind the store (a full disk, someone's hand), `complete`
    refuses it by name: growing it to the parts' length would publish zeros where a part was."""
    store = harness.sink()
    upload = store.open_multipart("cut.bin", WriteMeta())
    receipt = upload.upload_part(1, b"z" * 1000, 1000, None, offset=0)
    os.truncate(harness.dir / ".exitplan-sftp" / "uploads" / upload.upload_id / "data", 600)
    with pytest.raises(InvalidRequest, match="holds 600 bytes of data, its parts 1,000"):
        upload.complete([receipt])
    assert not (harness.dir / "cut.bin").exists()
    upload.abort()


def test_a_new_uploads_parts_are_written_without_listing_it_first(harness, monkeypatch):
    """An upload this store opened: a part tried for the first time has no marker to remove, so the
    upload's directory is not listed first (four round trips); the same upload resumed by another
    store, and a part tried again, are."""
    store = harness.sink()
    upload = store.open_multipart("parts.bin", WriteMeta())
    opened = []
    real = sftp_module.paramiko.SFTPClient._async_request

    def count(self, fileobj, t, *args):
        if t == CMD_OPENDIR:
            opened.append(t)
        return real(self, fileobj, t, *args)

    monkeypatch.setattr(sftp_module.paramiko.SFTPClient, "_async_request", count)
    big = 5 * MiB
    first = upload.upload_part(1, b"a" * big, big, None, offset=0)
    second = upload.upload_part(2, b"b" * 10, 10, None, offset=big)
    assert opened == []
    again = upload.upload_part(2, b"c" * 10, 10, None, offset=big)
    assert len(opened) == 1
    resumed = harness.sink().resume_multipart("parts.bin", upload.upload_id)
    assert resumed.list_parts() == [first, again] != [first, second]
    resumed.upload_part(2, b"d" * 10, 10, None, offset=big)
    monkeypatch.undo()
    assert len(opened) == 3  # the listing of list_parts, then the resumed upload's part
    resumed.complete(resumed.list_parts())
    assert harness.raw_read("parts.bin") == b"a" * big + b"d" * 10


def test_a_part_written_again_has_no_marker_while_its_bytes_change(harness, monkeypatch):
    """A part sent again (a retry) loses its marker before its bytes are touched: killed half-way,
    it is not listed (the engine sends it again), never listed with the old tag over new bytes."""
    store = harness.sink()
    upload = store.open_multipart("rewritten.bin", WriteMeta())
    first = upload.upload_part(1, b"a" * 1000, 1000, None, offset=0)
    assert upload.list_parts() == [first]

    def killed(*args, **kwargs):
        raise TransientError("sftp: the connection was lost")

    monkeypatch.setattr(store, "_write_file", killed)
    with pytest.raises(TransientError):
        upload.upload_part(1, b"b" * 1000, 1000, None, offset=0)
    assert upload.list_parts() == []
    monkeypatch.undo()
    again = upload.upload_part(1, b"b" * 1000, 1000, None, offset=0)
    upload.complete([again])
    assert harness.raw_read("rewritten.bin") == b"b" * 1000


def test_a_key_below_a_file_is_refused_with_a_sentence(harness):
    store = harness.sink()
    store.put("a", b"file", 4, WriteMeta(), None)
    with pytest.raises(InvalidRequest) as info:
        store.put("a/b", b"below", 5, WriteMeta(), None)
    assert "'a' is a file" in str(info.value)
    assert harness.raw_read("a") == b"file"


def test_a_directory_removed_behind_the_store_is_made_again(harness):
    """The store remembers the directories it made; one removed since (by anyone) is looked for
    and made again on the next write, not reported as a missing file."""
    store = harness.sink()
    store.put("d/e/one", b"1", 1, WriteMeta(), None)
    for gone in ("d/e/one", "d/e"):
        path = harness.dir / gone
        path.unlink() if path.is_file() else path.rmdir()
    for meta_dir in (harness.dir / ".exitplan-sftp" / "meta" / "d" / "e",):
        for f in meta_dir.iterdir():
            f.unlink()
        meta_dir.rmdir()
    store.put("d/e/two", b"22", 2, WriteMeta(), None)
    assert harness.raw_read("d/e/two") == b"22"
    assert store.head("d/e/two").size == 2


def test_directories_are_looked_for_up_to_the_nearest_one_known(harness, monkeypatch):
    """Making a directory looks at its missing parents only up to one the store made or found
    before (each look is a round trip): two looks and two makes for `a/b/x/y` once `a/b` is known,
    for the file and for its metadata file; none above."""
    store = harness.sink()
    store.put("a/b/c/one", b"1", 1, WriteMeta(), None)
    sent = []
    real = sftp_module.paramiko.SFTPClient._async_request

    def count(self, fileobj, t, *args):
        if t in (CMD_STAT, CMD_MKDIR):
            path = args[0]
            sent.append((t, path.decode() if isinstance(path, bytes) else path))
        return real(self, fileobj, t, *args)

    monkeypatch.setattr(sftp_module.paramiko.SFTPClient, "_async_request", count)
    store.put("a/b/x/y/two", b"22", 2, WriteMeta(), None)
    monkeypatch.undo()
    looked = sorted(p[len(str(harness.dir)) + 1:] for t, p in sent if t == CMD_STAT)
    made = sorted(p[len(str(harness.dir)) + 1:] for t, p in sent if t == CMD_MKDIR)
    assert looked == [".exitplan-sftp/meta/a/b/x", ".exitplan-sftp/meta/a/b/x/y", "a/b/x", "a/b/x/y"]
    assert made == looked
    assert harness.raw_read("a/b/x/y/two") == b"22"


def test_a_root_removed_behind_the_store_is_named_on_the_next_write(harness):
    store = harness.sink()
    store.put("d/one", b"1", 1, WriteMeta(), None)
    subprocess.run(["rm", "-rf", str(harness.dir)], check=True)
    with pytest.raises(NotFound, match="root directory .* does not exist"):
        store.put("d/two", b"2", 1, WriteMeta(), None)


def test_a_refused_write_fails_the_put_and_leaves_the_session_usable(harness, monkeypatch):
    """The server refuses a write in the middle of a pipelined body: the put fails (every answer
    read, the file closed, the temporary file removed), and the same session writes the next one."""
    store = harness.sink()
    real = sftp_module.paramiko.SFTPClient._async_request
    refused = []

    def refuse_third_write(self, fileobj, t, *args):
        if t == sftp_module.CMD_WRITE and len(refused) < 3:
            refused.append(1)
            if len(refused) == 3:
                args = (b"no-such-handle",) + args[1:]  # the server answers "failure"
        return real(self, fileobj, t, *args)

    real_pipe_write = sftp_module.PipelinedWriter._send_write

    def refuse_third_pipe_write(self, chunk):  # an OpenSSH session's writes are framed by the writer
        refused.append(1)
        if len(refused) != 3:
            return real_pipe_write(self, chunk)
        field, self._handle_field = self._handle_field, struct.pack(">I", 14) + b"no-such-handle"
        try:
            return real_pipe_write(self, chunk)
        finally:
            self._handle_field = field

    monkeypatch.setattr(sftp_module.paramiko.SFTPClient, "_async_request", refuse_third_write)
    monkeypatch.setattr(sftp_module.PipelinedWriter, "_send_write", refuse_third_pipe_write)
    data = os.urandom(MiB)
    with pytest.raises(Exception) as info:
        store.put("refused.bin", data, len(data), WriteMeta(), md5(data))
    assert "refused.bin" in str(info.value)
    assert not (harness.dir / "refused.bin").exists()
    assert _temporary_files(harness) == []
    assert len(refused) >= 3
    store.put("next.bin", data, len(data), WriteMeta(), md5(data))
    assert harness.raw_read("next.bin") == data


def test_without_fsync_the_file_is_looked_at_by_name(harness, monkeypatch):
    """A server without fsync@openssh.com: said once, and the marker comes from a stat of the
    closed file."""
    store = harness.sink()
    real = sftp_module.paramiko.SFTPClient._async_request

    def no_fsync(self, fileobj, t, *args):
        if t == sftp_module.CMD_EXTENDED and args and args[0] == "fsync@openssh.com":
            args = ("fsync@unknown.example",) + args[1:]  # answered "unsupported"
        return real(self, fileobj, t, *args)

    monkeypatch.setattr(sftp_module.paramiko.SFTPClient, "_async_request", no_fsync)
    etag = store.put("unsynced", b"abc", 3, WriteMeta(), None)
    assert store._fsync_offered is False
    assert store.head("unsynced").etag == etag
    store.put("unsynced-2", b"abcd", 4, WriteMeta(), None)
    assert store.head("unsynced-2").size == 4


def test_reads_ask_what_the_server_answers_whole(harness, monkeypatch):
    """OpenSSH answers a read with at most 261,120 bytes (`limits@openssh.com`): a read asks for
    that much, so no answer comes short and no request is asked again for its last kilobyte."""
    data = os.urandom(8 * MiB)
    store = harness.sink()
    store.put("big.bin", data, len(data), WriteMeta(), None)
    asked = []
    real = sftp_module.paramiko.SFTPClient._async_request

    def count(self, fileobj, t, *args):
        if t == sftp_module.CMD_READ:
            asked.append(args[-1])
        return real(self, fileobj, t, *args)

    monkeypatch.setattr(sftp_module.paramiko.SFTPClient, "_async_request", count)
    assert store.read_range("big.bin", 0, len(data)) == data
    assert store.read_request == 261_120
    assert len(asked) == -(-len(data) // 261_120) and set(asked[:-1]) == {261_120}


# ---- the OpenSSH client as transport (connectors/openssh.py) ------------------------------------

def _openssh(sshd, harness_dir, **login) -> SftpStore:
    pin = HostKeyPin(known_hosts=str(sshd.known_hosts))
    return SftpStore(lp.LOOPBACK, sshd.port, str(harness_dir), SftpLogin(sshd.username, sshd.user_key.read_text(), **login),
                     pin, connections=2, transport="openssh")


def test_openssh_is_given_no_key_on_disk_and_nothing_but_the_pinned_host_keys(sshd, tmp_path):
    (tmp_path / "d").mkdir()
    store = _openssh(sshd, tmp_path / "d")
    try:
        argv = store._launcher.argv
        key_text = sshd.user_key.read_text()
        assert not any(line in " ".join(argv) for line in key_text.splitlines()[1:-1])
        files = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in argv if "=" in a and a.split("=", 1)[1].startswith("/")}
        assert set(files) == {"IdentityFile", "UserKnownHostsFile", "GlobalKnownHostsFile"}
        assert files["GlobalKnownHostsFile"] == "/dev/null"
        for option in ("IdentityFile", "UserKnownHostsFile"):
            assert files[option].startswith(f"/proc/{os.getpid()}/fd/")
            assert os.readlink(files[option]).startswith("/memfd:")  # in memory: no file on any disk
        known = [line.split() for line in open(files["UserKnownHostsFile"]).read().splitlines()]
        pinned = HostKeyPin(known_hosts=str(sshd.known_hosts)).pinned_keys(lp.LOOPBACK, sshd.port)
        assert pinned and [k[1:] for k in known] == [[key.get_name(), key.get_base64()] for key in pinned]
        assert {k[0] for k in known} == {f"[{lp.LOOPBACK}]:{sshd.port}"}
        assert "StrictHostKeyChecking=yes" in argv and "BatchMode=yes" in argv and "-a" in argv and "-x" in argv
        assert "ClearAllForwardings=yes" in argv and "IdentityAgent=none" in argv and argv[1:3] == ["-F", "/dev/null"]
        store.put("a.bin", b"abc", 3, WriteMeta(), None)
        pipes = [session[0] for session in store._sessions._all]
        assert pipes and all(p.process.poll() is None for p in pipes)
    finally:
        store.close()
    assert all(p.process.poll() is not None for p in pipes)  # every ssh process ended with the store


def test_openssh_refuses_a_host_key_other_than_the_one_checked(sshd, tmp_path, monkeypatch):
    """The keys handed to ssh are the pinned ones; a server showing another one (here: ssh is told
    to expect another key) is refused by ssh, and the store says so, even though paramiko, asked
    to diagnose, finds the server's key pinned."""
    import paramiko

    real = sftp_module.OpenSshLauncher.__init__
    other = paramiko.Ed25519Key.from_private_key_file(str(_other_key(tmp_path)))

    def expecting_another_key(self, ssh, host, port, username, host_keys, *args):
        real(self, ssh, host, port, username, [other], *args)

    monkeypatch.setattr(sftp_module.OpenSshLauncher, "__init__", expecting_another_key)
    with pytest.raises(HostKeyRefused, match="host key"):
        SftpStore(lp.LOOPBACK, sshd.port, str(tmp_path), SftpLogin(sshd.username, sshd.user_key.read_text()),
                  HostKeyPin(known_hosts=str(sshd.known_hosts)), transport="auto")


def _other_key(tmp_path):
    path = tmp_path / "other_host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path


def test_without_the_openssh_client_auto_uses_paramiko_and_openssh_is_refused(sshd, tmp_path, monkeypatch):
    monkeypatch.setattr(sftp_module, "openssh_path", lambda: None)
    login, pin = SftpLogin(sshd.username, sshd.user_key.read_text()), HostKeyPin(known_hosts=str(sshd.known_hosts))
    with SftpStore(lp.LOOPBACK, sshd.port, str(tmp_path), login, pin, transport="auto") as store:
        assert store.transport == "paramiko"
        store.put("a.bin", b"abc", 3, WriteMeta(), None)
    with pytest.raises(ConfigError, match="`transport: openssh` cannot be used.*openssh-client.*`transport: paramiko`"):
        SftpStore(lp.LOOPBACK, sshd.port, str(tmp_path), login, pin, transport="openssh")


def _transient_failures_then_a_read(store: SftpStore) -> None:
    """Three reads of a.bin after its sessions died: transient failures, then the bytes."""
    outcomes = []
    for _ in range(3):
        try:
            outcomes.append(store.read_range("a.bin", 0, 3))
        except TransientError as exc:
            outcomes.append(exc)
    assert outcomes[-1] == b"abc" and all(o == b"abc" or isinstance(o, TransientError) for o in outcomes)


def test_an_ssh_process_that_dies_costs_one_transient_failure_then_a_fresh_session(sshd, tmp_path):
    (tmp_path / "d").mkdir()
    store = _openssh(sshd, tmp_path / "d")
    try:
        store.put("a.bin", b"abc", 3, WriteMeta(), None)
        for pipe, _client in list(store._sessions._all):
            pipe.process.kill()
            pipe.process.wait()
        _transient_failures_then_a_read(store)
        assert all(p.process.poll() is None for p, _ in store._sessions._all)
    finally:
        store.close()


def _logins(sshd) -> int:
    return (sshd.directory / "sshd.log").read_text().count("Accepted publickey")


def _sessions_store(layout, root, sessions: int) -> SftpStore:
    return SftpStore(lp.LOOPBACK, layout.port, str(root), SftpLogin(layout.username, layout.user_key.read_text()),
                     HostKeyPin(known_hosts=str(layout.known_hosts)), connections=sessions, transport="openssh")


def _hold_sessions_at_once(store: SftpStore, sessions: int) -> None:
    """`sessions` sessions of `store` open at the same time, each used once."""
    held = threading.Barrier(sessions)

    def hold(_: int) -> None:
        with store.session() as sftp:
            held.wait(timeout=60)
            sftp.stat(".")

    with concurrent.futures.ThreadPoolExecutor(sessions) as pool:
        list(pool.map(hold, range(sessions)))


def test_openssh_sessions_share_one_connection_that_ends_with_the_store(sshd, tmp_path):
    """Four sessions at once, one login: the master connection the four `ssh` processes are
    multiplexed over, which checked the host key against the keys known_hosts pins (no paramiko
    login first); the master and its control socket end with the store."""
    (tmp_path / "d").mkdir()
    before = _logins(sshd)
    store = _sessions_store(sshd, tmp_path / "d", 4)
    try:
        _hold_sessions_at_once(store, 4)
        assert len(store._sessions._all) == 4
        (master,), control = store._launcher._masters, store._launcher._control_dir
        assert master.pipe.is_active() and stat.S_IMODE(os.stat(control).st_mode) == 0o700
        argvs = [pipe.process.args for pipe, _ in store._sessions._all]
        assert all("ControlMaster=no" in argv and f"ControlPath={master.control}" in argv for argv in argvs)
        assert _logins(sshd) - before == 1
    finally:
        store.close()
    assert master.pipe.process.poll() is not None and not os.path.exists(control)


def test_a_store_dropped_unclosed_leaves_no_control_directory(sshd, tmp_path):
    (tmp_path / "d").mkdir()
    store = _openssh(sshd, tmp_path / "d")
    store.put("a.bin", b"abc", 3, WriteMeta(), None)
    control = store._launcher._control_dir
    assert os.path.isdir(control)
    del store
    gc.collect()
    assert not os.path.exists(control)


def test_control_directories_killed_processes_left_are_removed_by_the_next_store(sshd, tmp_path, monkeypatch):
    """A killed process cannot remove its control directory: the next store's process removes the
    ones whose process no longer runs (by the number in the name), and keeps a running one's."""
    from connectors import openssh

    gone = subprocess.Popen(["true"])
    gone.wait()
    parent, ns, me = tempfile.gettempdir(), openssh._pid_namespace(), os.getpid()
    left = os.path.join(parent, f"exitplan-ssh-{ns}-{gone.pid}-test{me}")
    running = os.path.join(parent, f"exitplan-ssh-{ns}-{os.getppid()}-test{me}")
    elsewhere = os.path.join(parent, f"exitplan-ssh-{ns + 1}-{gone.pid}-test{me}")  # a pid of another namespace
    other = os.path.join(parent, f"exitplan-ssh-test{me}")  # not a name this sweep reads
    for path in (left, running, elsewhere, other):
        os.makedirs(path, exist_ok=True)
    open(os.path.join(left, "m1"), "w").close()  # the socket of a master that was killed with it
    monkeypatch.setattr(openssh, "_swept", set())
    (tmp_path / "d").mkdir()
    store = _openssh(sshd, tmp_path / "d")
    try:
        assert os.path.basename(store._launcher._control_dir).startswith(f"exitplan-ssh-{ns}-{me}-")
        assert not os.path.exists(left)
        assert all(os.path.isdir(path) for path in (running, elsewhere, other))
    finally:
        store.close()
        for path in (left, running, elsewhere, other):
            shutil.rmtree(path, ignore_errors=True)


def test_more_sessions_than_one_connection_carries_open_another(sshd, tmp_path):
    """sshd's MaxSessions is 10 by default, a master's own session included: twelve sessions go
    over two master connections (9 and 3), two logins in all (ssh checks the pinned host key
    itself: no paramiko login first)."""
    (tmp_path / "d").mkdir()
    before = _logins(sshd)
    store = _sessions_store(sshd, tmp_path / "d", 12)
    try:
        _hold_sessions_at_once(store, 12)
        masters = store._launcher._masters
        assert sorted(len(m.sessions) for m in masters) == [3, SESSIONS_PER_MASTER]
        assert _logins(sshd) - before == 2
    finally:
        store.close()


def test_sessions_a_server_refuses_to_multiplex_get_connections_of_their_own(tmp_path):
    """A server that allows fewer sessions per connection (sshd's `MaxSessions`, here 2: the
    master's own and one more) than the store has: `ssh` opens the others as connections of their
    own, and every session works."""
    from flows.lab_sftp import prepare_sshd, sshd_spec

    layout = prepare_sshd(tmp_path / "sshd", lp.free_port())
    layout.config.write_text(layout.config.read_text().replace("MaxSessions 64", "MaxSessions 2"))
    server = lp.start_server(sshd_spec(layout), tmp_path / "sshd.log")
    try:
        store = _sessions_store(layout, layout.root, 4)
        try:
            _hold_sessions_at_once(store, 4)
            assert len(store._sessions._all) == 4
        finally:
            store.close()
        assert (tmp_path / "sshd.log").read_text().count("Accepted publickey") == 4  # master, 3 alone
    finally:
        lp.stop_pid(server.pid)


def test_a_master_connection_that_dies_costs_one_transient_failure_then_a_new_one(sshd, tmp_path):
    (tmp_path / "d").mkdir()
    store = _openssh(sshd, tmp_path / "d")
    try:
        store.put("a.bin", b"abc", 3, WriteMeta(), None)
        (master,) = store._launcher._masters
        master.pipe.process.kill()
        master.pipe.process.wait()
        _transient_failures_then_a_read(store)
        masters = store._launcher._masters
        assert [m.pipe.is_active() for m in masters] == [True] and master not in masters
    finally:
        store.close()


def test_a_pipe_that_failed_once_is_not_lent_again_while_its_ssh_lingers():
    """A session over a master that died: its `ssh` may not have exited yet when the pool looks;
    the pipe's own failure (end of stream, a refused send) is enough to discard it."""
    import socket
    import tempfile

    from connectors.openssh import SshPipe

    for failure in ("recv", "send"):
        ours, theirs = socket.socketpair()
        lingering = subprocess.Popen(["sleep", "30"])
        pipe = SshPipe(ours, lingering, tempfile.TemporaryFile())
        try:
            assert pipe.is_active()
            theirs.close()
            if failure == "recv":
                assert pipe.recv(10) == b""
            else:
                with pytest.raises(OSError):
                    for _ in range(100):
                        pipe.send(b"x" * 65536)
            assert not pipe.is_active() and lingering.poll() is None
        finally:
            lingering.kill()
            pipe.close()


def test_the_master_connection_does_not_outlive_the_process_that_opened_it(sshd, tmp_path):
    """The process ends without closing its store (as when killed): the master's own session sees
    its pipe close, and the master ends; no `ssh` is left connected to the server."""
    (tmp_path / "d").mkdir()
    script = (
        "import os, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from connectors.sftp import HostKeyPin, SftpLogin, SftpStore\n"
        f"store = SftpStore('127.0.0.1', {sshd.port}, {str(tmp_path / 'd')!r}, SftpLogin({sshd.username!r}, "
        f"open({str(sshd.user_key)!r}).read()), HostKeyPin(known_hosts={str(sshd.known_hosts)!r}), "
        "transport='openssh')\n"
        "print(store._launcher._masters[0].pipe.process.pid, flush=True)\n"
        "os._exit(0)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    pid = int(done.stdout.split()[0])
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and _running(pid):
        time.sleep(0.1)
    assert not _running(pid)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_large_writes_go_in_requests_as_large_as_the_server_takes(sshd, tmp_path):
    (tmp_path / "d").mkdir()
    store = _openssh(sshd, tmp_path / "d")
    try:
        assert store.max_write == 261120  # OpenSSH's, from limits@openssh.com
        data = os.urandom(3 * MiB + 5)
        sent = []
        real = sftp_module.PipelinedWriter._send_write

        def count(self, chunk):
            sent.append(chunk.nbytes)
            return real(self, chunk)

        sftp_module.PipelinedWriter._send_write = count
        try:
            store.put("big.bin", data, len(data), WriteMeta(), md5(data))
        finally:
            sftp_module.PipelinedWriter._send_write = real
        assert (tmp_path / "d" / "big.bin").read_bytes() == data
        assert sent[:13] == [255 * 1024] * 12 + [len(data) - 12 * 255 * 1024]  # then the metadata file's
    finally:
        store.close()


def test_an_ssh_login_refused_falls_back_to_paramiko_under_auto_and_fails_under_openssh(sshd, tmp_path, monkeypatch,
                                                                                        caplog):
    """paramiko logged in, then `ssh` is refused (here: handed a key the server does not know):
    `auto` goes on with paramiko and says so; `openssh` fails with ssh's reason."""
    stranger = _other_key(tmp_path).read_bytes()
    monkeypatch.setattr(sftp_module, "unencrypted_key", lambda _text, _passphrase: stranger)
    login, pin = SftpLogin(sshd.username, sshd.user_key.read_text()), HostKeyPin(known_hosts=str(sshd.known_hosts))
    with SftpStore(lp.LOOPBACK, sshd.port, str(tmp_path), login, pin, transport="auto") as store:
        assert store.transport == "paramiko"
        store.put("a.bin", b"abc", 3, WriteMeta(), None)
    assert "could not open an SFTP session" in caplog.text and "Permission denied" in caplog.text
    with pytest.raises(AuthError, match="ssh: the server refused the login.*Permission denied"):
        SftpStore(lp.LOOPBACK, sshd.port, str(tmp_path), login, pin, transport="openssh")


def test_a_fingerprint_pin_is_checked_by_paramiko_first_then_ssh_expects_that_key(sshd, tmp_path):
    """A fingerprint gives ssh no key to check against: paramiko's login checks the server's key
    against it, then ssh logs in expecting exactly that key (two logins); with known_hosts, ssh
    alone (one login, no paramiko transport made)."""
    (tmp_path / "d").mkdir()
    login = SftpLogin(sshd.username, sshd.user_key.read_text())
    before = _logins(sshd)
    pin = HostKeyPin(fingerprints=(_fingerprint(f"{sshd.host_key}.pub"),))
    with SftpStore(lp.LOOPBACK, sshd.port, str(tmp_path / "d"), login, pin, connections=1, transport="openssh") as store:
        assert store.transport == "openssh" and store._host_key is not None
        known = open(next(a.split("=", 1)[1] for a in store._launcher.argv if a.startswith("UserKnownHostsFile="))).read()
        assert known.split() == [f"[{lp.LOOPBACK}]:{sshd.port}", store._host_key.get_name(), store._host_key.get_base64()]
        store.put("a.bin", b"abc", 3, WriteMeta(), None)
    assert _logins(sshd) - before == 2

    made = []
    real_transport = sftp_module.paramiko.Transport

    def transport(*args, **kwargs):
        made.append(args)
        return real_transport(*args, **kwargs)

    before = _logins(sshd)
    pin = HostKeyPin(known_hosts=str(sshd.known_hosts))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sftp_module.paramiko, "Transport", transport)
        with SftpStore(lp.LOOPBACK, sshd.port, str(tmp_path / "d"), login, pin, connections=1,
                       transport="auto") as store:
            assert store.transport == "openssh" and not made
            assert store.read_request == 261_120  # the server's limits, asked over the ssh session
            assert store.read_range("a.bin", 0, 3) == b"abc"
    assert _logins(sshd) - before == 1


def test_ssh_failing_first_sends_the_open_down_the_paramiko_path(sshd, tmp_path, monkeypatch):
    """`ssh` fails at the first login for a reason of its own: paramiko's login (which would have
    named a refused key or login) succeeds, `ssh` fails again with the key it checked, and in
    `auto` paramiko carries the sessions; `openssh` required raises what ssh said."""
    (tmp_path / "d").mkdir()
    login, pin = SftpLogin(sshd.username, sshd.user_key.read_text()), HostKeyPin(known_hosts=str(sshd.known_hosts))

    def broken(self):
        raise sftp_module.SshSessionFailed("ssh: something of its own")

    monkeypatch.setattr(sftp_module.OpenSshLauncher, "start", broken)
    with SftpStore(lp.LOOPBACK, sshd.port, str(tmp_path / "d"), login, pin, transport="auto") as store:
        assert store.transport == "paramiko"
        store.put("a.bin", b"abc", 3, WriteMeta(), None)
    with pytest.raises(TransientError, match="something of its own"):
        SftpStore(lp.LOOPBACK, sshd.port, str(tmp_path / "d"), login, pin, transport="openssh")


def test_a_host_key_being_rotated_in_by_fingerprint_is_accepted_beside_an_old_known_hosts_key(sshd, tmp_path):
    """known_hosts still pins the old key, the new one is pinned by its fingerprint: `ssh`, given
    the old key, refuses the server; paramiko's check accepts the fingerprint, and `ssh` then
    carries the sessions with exactly the key paramiko checked."""
    (tmp_path / "d").mkdir()
    kind, blob = open(f"{_other_key(tmp_path)}.pub").read().split()[:2]
    old = tmp_path / "known_hosts"
    old.write_text(f"[{lp.LOOPBACK}]:{sshd.port} {kind} {blob}\n")
    pin = HostKeyPin(known_hosts=str(old), fingerprints=(_fingerprint(f"{sshd.host_key}.pub"),))
    login = SftpLogin(sshd.username, sshd.user_key.read_text())
    with SftpStore(lp.LOOPBACK, sshd.port, str(tmp_path / "d"), login, pin, transport="openssh") as store:
        assert store.transport == "openssh"
        store.put("a.bin", b"abc", 3, WriteMeta(), None)
        assert store.read_range("a.bin", 0, 3) == b"abc"
    with pytest.raises(HostKeyRefused, match="NOT the one pinned"):  # without the fingerprint: refused
        SftpStore(lp.LOOPBACK, sshd.port, str(tmp_path / "d"), login, HostKeyPin(known_hosts=str(old)),
                  transport="openssh")
