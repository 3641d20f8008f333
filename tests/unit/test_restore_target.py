"""Restore's target directory on a real filesystem (engine/restore.py `TargetDirectory`), and the
names restore gives objects back (engine/placement.py `source_key_of`)."""

from __future__ import annotations

import errno
import os
import stat
import threading
from pathlib import Path

import pytest

from engine.placement import dest_key_prefix, destination_key, source_key_of
from engine.restore import PRIVATE_PREFIX, TargetDirectory, TargetRefused


def write(target: TargetDirectory, key: str, data: bytes) -> None:
    name = target.name_for(key)
    target.check_free(name)
    with target.temporary() as temporary:
        temporary.file.write(data)
        temporary.file.flush()
        target.place(temporary, name)


def private_dirs(root: Path) -> list[Path]:
    return [p for p in root.iterdir() if p.name.startswith(PRIVATE_PREFIX)]


def test_the_private_directory_is_0700_holds_only_temporaries_and_is_removed(tmp_path):
    with TargetDirectory.open(tmp_path / "out") as target:
        (private,) = private_dirs(tmp_path / "out")
        assert stat.S_IMODE(private.stat().st_mode) == 0o700 and len(private.name) == len(PRIVATE_PREFIX) + 32
        with target.temporary() as temporary:
            temporary.file.write(b"partial plaintext")
            temporary.file.flush()
            (temporary,) = private.iterdir()
            assert stat.S_IMODE(temporary.stat().st_mode) == 0o600
        assert list(private.iterdir()) == []  # not placed: removed on leaving
        with pytest.raises(TargetRefused, match="restore's own private directory"):
            target.name_for(private.name + "/x")
    assert private_dirs(tmp_path / "out") == []


def test_a_link_anywhere_on_the_way_is_refused_and_never_followed(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "out"
    (out / "a").mkdir(parents=True)
    (out / "a" / "b").symlink_to(outside)
    (out / "top").symlink_to(outside)
    with TargetDirectory.open(out) as target:
        for key in ("a/b/c.txt", "top/x.txt", "a/b/deeper/x.txt"):
            with pytest.raises(TargetRefused, match="is a symbolic link; restore never follows a link"):
                write(target, key, b"secret")
        name = target.name_for("top/late.txt")  # a link planted after the check: still refused
        with target.temporary() as temporary, pytest.raises(TargetRefused, match="top is a symbolic link"):
            target.place(temporary, name)
    assert list(outside.iterdir()) == []


def test_a_taken_name_is_refused_unless_overwrite_which_replaces_the_link_itself(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "target-of-link").write_bytes(b"keep me")
    (out / "link").symlink_to(tmp_path / "target-of-link")
    (out / "file").write_bytes(b"the user's")
    (out / "dir").mkdir()
    with TargetDirectory.open(out) as target:
        for key, kind in (("link", "a symbolic link"), ("file", "a file")):
            with pytest.raises(TargetRefused, match=f"exists already \\({kind}\\); restore never replaces"):
                write(target, key, b"restored")
        with pytest.raises(TargetRefused, match="dir is a directory"):
            write(target, "dir", b"restored")
    with TargetDirectory.open(out, overwrite=True) as target:
        write(target, "link", b"restored link")
        write(target, "file", b"restored file")
        with pytest.raises(TargetRefused, match="dir is a directory"):
            write(target, "dir", b"restored")
    assert (out / "link").read_bytes() == b"restored link" and not (out / "link").is_symlink()
    assert (out / "file").read_bytes() == b"restored file"
    assert (tmp_path / "target-of-link").read_bytes() == b"keep me"


def test_a_name_taken_while_the_object_was_read_is_still_not_replaced(tmp_path):
    out = tmp_path / "out"
    with TargetDirectory.open(out) as target:
        name = target.name_for("late.txt")
        target.check_free(name)  # free now
        (out / "late.txt").write_bytes(b"arrived meanwhile")
        with target.temporary() as temporary, pytest.raises(TargetRefused, match="exists already"):
            target.place(temporary, name)
    assert (out / "late.txt").read_bytes() == b"arrived meanwhile"


def test_one_name_placed_by_many_threads_at_once_is_written_once(tmp_path):
    """Only one object can take a name (link() is atomic): the others are refused, none replaced."""
    won, refused = [], []
    start = threading.Barrier(8)

    def place(n: int) -> None:
        try:
            with target.temporary() as temporary:
                temporary.file.write(f"writer {n}".encode())
                temporary.file.flush()
                start.wait(5)
                target.place(temporary, target.name_for("same.txt"))
            won.append(n)
        except TargetRefused:
            refused.append(n)

    with TargetDirectory.open(tmp_path / "out") as target:
        threads = [threading.Thread(target=place, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(won) == 1 and len(refused) == 7
    assert (tmp_path / "out" / "same.txt").read_bytes() == f"writer {won[0]}".encode()


def test_without_hard_links_a_name_is_still_never_replaced(tmp_path, monkeypatch):
    """FAT and exFAT have no hard links: look, then rename, one object at a time."""
    def no_links(*args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    with TargetDirectory.open(tmp_path / "out") as target:
        write(target, "d/one.txt", b"first")
        with target.temporary() as temporary:
            temporary.file.write(b"second")
            temporary.file.flush()
            with pytest.raises(TargetRefused, match="exists already"):
                target.place(temporary, target.name_for("d/one.txt"))
    assert (tmp_path / "out" / "d" / "one.txt").read_bytes() == b"first"
    assert private_dirs(tmp_path / "out") == []


@pytest.mark.parametrize("key, sentence", [
    ("n/" + "y" * 300 + ".txt", "is 304 bytes long, and the filesystem of .* allows at most 255 bytes per name"),
    ("é" * 128, "is 256 bytes long"),  # bytes, not characters
    ("../escape.txt", "cannot be written as a file safely"),
    ("a//b", "cannot be written as a file safely"),
    ("/abs", "cannot be written as a file safely"),
])
def test_a_key_that_cannot_be_a_path_below_the_directory_is_refused_by_name(tmp_path, key, sentence):
    with TargetDirectory.open(tmp_path / "out") as target, pytest.raises(TargetRefused, match=sentence):
        target.name_for(key)


def test_a_file_on_the_way_is_named(tmp_path):
    with TargetDirectory.open(tmp_path / "out") as target:
        write(target, "a", b"a file")
        with pytest.raises(TargetRefused, match="out/a is a file, not a directory"):
            write(target, "a/b", b"below a file")
        target.make_directory(target.name_for("m/n/"))
    assert stat.S_IMODE((tmp_path / "out" / "m" / "n").stat().st_mode) == 0o700


def test_a_target_that_cannot_be_a_directory_is_a_usage_error(tmp_path):
    from config.errors import ExitCode, UserError

    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(UserError, match="--to .*file/out: not a directory") as raised:
        TargetDirectory.open(tmp_path / "file" / "out")
    assert raised.value.exit_code == ExitCode.USAGE


def naming_cases():
    """(source prefix, destination prefix, key below the prefix) as datasets hold them; not the one
    name `destination_key` cannot tell apart (`data//lead` and `data/lead` below a prefix without
    `/`: both `backup/lead`; there the encrypted object's associated data tells)."""
    for source_prefix, dest_prefix in (("", ""), ("", "backup/"), ("", "backup"), ("data/", "backup"),
                                       ("data/", "backup/"), ("data", "b/c")):
        for rel in ("x.txt", "dir/y.txt", "folder/", "", "/lead"):
            ambiguous = dest_prefix and not dest_prefix.endswith("/") and rel.startswith("/")
            if source_prefix + rel and not ambiguous:
                yield source_prefix, dest_prefix, rel


@pytest.mark.parametrize("source_prefix, dest_prefix, rel", list(naming_cases()))
def test_source_key_of_gives_back_what_destination_key_named(source_prefix, dest_prefix, rel):
    source = source_prefix + rel
    dest = destination_key(source, source_prefix, dest_prefix)
    assert source_key_of(dest, source_prefix, dest_prefix) == source
    assert dest.startswith(dest_key_prefix(dest_prefix)) or dest == dest_prefix


def test_an_object_restores_with_its_properties_and_a_destination_without_tags_is_said_so(tmp_path):
    """The sidecar record of one object: metadata with the source's names (from
    `exitplan-metadata-names`), content headers, source times; a destination that cannot give tags
    back does not fail the object's bytes, its record says so."""
    from connectors.base import ContentSettings, Unsupported, WriteMeta
    from connectors.memory import MemoryStore
    from engine.restore import restore_object

    class NoTagging(MemoryStore):
        def tags(self, key: str) -> dict[str, str]:
            raise Unsupported("no tagging API here")

    for store, tags in ((MemoryStore(), {"Dept": "Cardio"}), (NoTagging(), None)):
        meta = store.add("d/scan.bin", b"bytes\n", meta=WriteMeta(
            ContentSettings(content_type="application/dicom"),
            {"patientid": "P-007", "exitplan-metadata-names": "PatientId",
             "exitplan-source-modified": "2026-01-02T03:04:05Z"}, {"Dept": "Cardio"}))
        with TargetDirectory.open(tmp_path / type(store).__name__) as target:
            result = restore_object(store, meta, dataset="scans", source_key="d/scan.bin", rel_key="d/scan.bin",
                                    target=target, keys=None, expected_sha256=None)
        assert result.status == "ok", result.reason
        assert (target.path / "d" / "scan.bin").stat().st_mtime == 1767323045
        record = result.properties
        assert record["metadata"] == {"PatientId": "P-007"} and record["content"] == {"content_type": "application/dicom"}
        assert record["source"] == {"last_modified": "2026-01-02T03:04:05Z"}
        if tags:
            assert record["tags"] == tags and "tags_unreadable" not in record
        else:
            assert "tags" not in record and "no tagging API here" in record["tags_unreadable"]
