"""Restore on hostile ground, on the lab servers (Azurite → the S3 server → a real filesystem).

Every object the destination holds is restored or named with its reason and counted; nothing is
written outside `--to` (links planted there are never followed), no existing file is replaced
without `--overwrite`, no object's temporary file can be another object's file, plaintext is
0600 in 0700 directories whatever the umask, and nothing of restore's own is left behind.
"""

from __future__ import annotations

import json
import os
import stat
import uuid
from pathlib import Path

import pytest
import yaml
from azure.storage.blob import BlobServiceClient

from config.errors import ExitCode
from engine.restore import PRIVATE_PREFIX, SIDECAR
from flows.cli import main
from tests.integration.test_encryption_e2e import cli
from tests.s3client import keys_below, lab_s3_client

pytestmark = pytest.mark.integration

CS_VAR = "EXITPLAN_TEST_AZURE_CS"
BUCKET = "exitplan-restore"


@pytest.fixture(scope="module")
def s3(s3_server):
    return lab_s3_client(s3_server.url, BUCKET)


@pytest.fixture
def migrated(tmp_path, monkeypatch, azurite_connection_string, s3_server, s3):
    """`migrated(blobs, concurrency=4, slash=True, metadata=None)`: a fresh container holding `blobs`
    (with `metadata[name]` where given), migrated
    (encrypted) with a project of its own below the destination prefix `<container>/` (or
    `<container>` when not `slash`); returns the config path."""
    monkeypatch.setenv(CS_VAR, azurite_connection_string)

    def make(blobs: dict[str, bytes], concurrency: int = 4, slash: bool = True,
             metadata: dict[str, dict[str, str]] | None = None) -> Path:
        container = f"rst{uuid.uuid4().hex[:10]}"
        cc = BlobServiceClient.from_connection_string(azurite_connection_string).create_container(container)
        for name, data in blobs.items():
            cc.upload_blob(name, data, metadata=(metadata or {}).get(name))
        cfg = {
            "version": 1,
            "project": container,  # a project of its own: the bucket is shared by the module
            "sources": {"az": {"kind": "azure_blob", "connection_string_env": CS_VAR}},
            "destinations": {"lab": {"provider": "lab", "endpoint_url": s3_server.url, "region": "eu-west-3",
                                     "bucket": BUCKET}},
            "datasets": {"scans": {"source": "az", "container": container, "destination": "lab",
                                   "dest_prefix": f"{container}/" if slash else container}},
            "transfer": {"concurrency": concurrency, "part_size": "5MiB", "small_object_cutoff": "1MiB"},
            "state": {"path": str(tmp_path / "state")},
            "keys": {"kek": {"backend": "local", "path": str(tmp_path / "kek.key")}},
        }
        path = tmp_path / "exitplan.yaml"
        path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
        assert main(["keys", "init", "--config", str(path)]) == 0
        assert main(["migrate", "--config", str(path)]) == 0
        return path

    return make


def restore(capsys, cfg: Path, to: Path, *extra) -> tuple[int, str, str]:
    return cli(capsys, "restore", "--config", cfg, "--dataset", "scans", "--to", to, *extra)


def files_under(root: Path) -> dict[str, bytes]:
    """Every regular file below `root` (links are not followed), by relative path, but restore's
    list of the objects' properties (`SIDECAR`)."""
    found = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = Path(directory) / name
            if path.is_file() and not path.is_symlink():
                found[path.relative_to(root).as_posix()] = path.read_bytes()
    sidecar = found.pop(SIDECAR, None)
    if sidecar is not None:  # it names restored objects only (files planted before are not)
        assert all((root / json.loads(line)["path"]).exists() for line in sidecar.decode().splitlines())
    return found


def assert_nothing_of_restore_left(root: Path) -> None:
    assert [p for p in root.rglob("*") if p.name.startswith(PRIVATE_PREFIX)] == []


def test_a_name_the_filesystem_cannot_hold_fails_its_object_and_is_counted(tmp_path, capsys, migrated):
    """Finding 1: the object whose name is too long was neither written nor counted, and restore
    said "restored 1 of 1 objects" with exit code 0."""
    long_name = "n/" + "y" * 300 + ".txt"
    cfg = migrated({"a.txt": b"alpha\n", long_name: b"a long name\n"})
    code, out, err = restore(capsys, cfg, tmp_path / "out")
    assert code == ExitCode.FAILED, (out, err)
    assert "restored 1 of 2 objects" in out and "1 failed" in out
    assert "y" * 30 in err and "304 bytes long" in err and "at most 255 bytes" in err
    assert files_under(tmp_path / "out") == {"a.txt": b"alpha\n"}
    assert_nothing_of_restore_left(tmp_path / "out")


def test_an_objects_temporary_file_never_collides_with_another_objects_file(tmp_path, capsys, migrated):
    """Issue 18, item 1: `x.txt` beside `x.txt.exitplan-partial` (restore's old temporary name),
    restored 16 at a time, left files holding the other object's bytes, with exit code 0."""
    blobs = {}
    for i in range(120):
        blobs[f"x{i:03d}.txt"] = f"the object x{i:03d}.txt\n".encode() * (50 + i)
        blobs[f"x{i:03d}.txt.exitplan-partial"] = f"the other object, number {i}\n".encode() * (70 + i)
    cfg = migrated(blobs, concurrency=16)
    code, out, err = restore(capsys, cfg, tmp_path / "out")
    assert code == 0, err
    assert "restored 240 of 240 objects" in out and "240 matched the SHA-256" in out
    assert files_under(tmp_path / "out") == blobs
    assert_nothing_of_restore_left(tmp_path / "out")


def test_restore_never_follows_a_link_and_never_replaces_a_file_unasked(tmp_path, capsys, migrated):
    """Issue 18, item 2: links planted in the target sent plaintext out of it, and an existing file
    was overwritten without a word."""
    blobs = {"sub/file.txt": b"would land elsewhere\n", "victim.txt": b"victim's plaintext\n",
             "plain.txt": b"restored plain\n", "link.txt": b"restored link\n", "ok/fine.txt": b"fine\n"}
    cfg = migrated(blobs)
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "dir").mkdir(parents=True)
    (elsewhere / "file").write_bytes(b"precious\n")
    (elsewhere / "file2").write_bytes(b"precious too\n")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "sub").symlink_to(elsewhere / "dir")
    (out_dir / "victim.txt.exitplan-partial").symlink_to(elsewhere / "file")
    (out_dir / "link.txt").symlink_to(elsewhere / "file2")
    (out_dir / "plain.txt").write_bytes(b"the user's own file\n")

    code, out, err = restore(capsys, cfg, out_dir)
    assert code == ExitCode.FAILED
    assert "restored 2 of 5 objects" in out and "3 failed" in out
    assert f"{out_dir}/sub is a symbolic link; restore never follows a link" in err
    assert f"{out_dir}/plain.txt exists already (a file); restore never replaces a file unless --overwrite" in err
    assert f"{out_dir}/link.txt exists already (a symbolic link)" in err
    assert list((elsewhere / "dir").iterdir()) == []
    assert (elsewhere / "file").read_bytes() == b"precious\n" and (elsewhere / "file2").read_bytes() == b"precious too\n"
    assert (out_dir / "plain.txt").read_bytes() == b"the user's own file\n"
    assert not (out_dir / "victim.txt").is_symlink() and (out_dir / "victim.txt").read_bytes() == blobs["victim.txt"]
    assert (out_dir / "ok" / "fine.txt").read_bytes() == b"fine\n"

    # --overwrite replaces the file and the link itself (never what the link points to); a link
    # on the way to an object is still never followed.
    code, out, err = restore(capsys, cfg, out_dir, "--overwrite")
    assert code == ExitCode.FAILED
    assert "restored 4 of 5 objects" in out and "sub is a symbolic link" in err
    assert (out_dir / "plain.txt").read_bytes() == blobs["plain.txt"]
    assert not (out_dir / "link.txt").is_symlink() and (out_dir / "link.txt").read_bytes() == blobs["link.txt"]
    assert (elsewhere / "file2").read_bytes() == b"precious too\n" and list((elsewhere / "dir").iterdir()) == []
    assert_nothing_of_restore_left(out_dir)


def test_plaintext_is_private_whatever_the_umask(tmp_path, capsys, migrated):
    """Issue 18, item 8: restored files were created readable by others."""
    cfg = migrated({"top.txt": b"top\n", "deep/er/file.txt": b"deep\n"})
    out_dir = tmp_path / "new" / "out"
    previous = os.umask(0)
    try:
        code, out, err = restore(capsys, cfg, out_dir)
    finally:
        os.umask(previous)
    assert code == 0, err
    modes = {p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode)
             for p in [tmp_path / "new", *(tmp_path / "new").rglob("*")]}
    assert modes == {"new": 0o700, "new/out": 0o700, "new/out/top.txt": 0o600, "new/out/deep": 0o700,
                     "new/out/deep/er": 0o700, "new/out/deep/er/file.txt": 0o600,
                     f"new/out/{SIDECAR}": 0o600}


def test_a_name_that_is_both_a_file_and_a_directory_fails_one_object_by_name(tmp_path, capsys, migrated):
    """`a` and `a/b` in one dataset: one of them cannot be written; it is named and counted (the
    old code dropped `a/b`'s error with its future and said "restored 2 of 2"), and it is always `a`."""
    cfg = migrated({"a": b"the file a\n", "a/b": b"the file a/b\n", "c.txt": b"c\n"})
    code, out, err = restore(capsys, cfg, tmp_path / "out")
    assert code == ExitCode.FAILED
    assert "restored 2 of 3 objects" in out and "1 failed" in out
    # The directory wins, whichever object a worker reaches first (issue 12, item 6).
    assert files_under(tmp_path / "out") == {"a/b": b"the file a/b\n", "c.txt": b"c\n"}
    assert "'a' is a file, and the key 'a/b' continues below that name, so it is a directory too" in err
    assert_nothing_of_restore_left(tmp_path / "out")


def test_a_directory_marker_is_restored_as_a_directory_and_counted(tmp_path, capsys, migrated):
    """A blob whose name ends in `/` (an empty "folder" blob) was skipped without a word; one
    that holds bytes cannot be a directory and is named."""
    cfg = migrated({"folder/": b"", "full/": b"bytes in a folder blob\n", "folder/inside.txt": b"inside\n"})
    code, out, err = restore(capsys, cfg, tmp_path / "out")
    assert code == ExitCode.FAILED
    assert "restored 2 of 3 objects" in out
    assert "its key ends with '/', so it can only be restored as the directory" in err and "holds 23 bytes" in err
    assert (tmp_path / "out" / "folder").is_dir() and stat.S_IMODE((tmp_path / "out" / "folder").stat().st_mode) == 0o700
    assert files_under(tmp_path / "out") == {"folder/inside.txt": b"inside\n"}
    assert not (tmp_path / "out" / "full").exists()
    # verify finds them too (it used to skip such keys in its listing and call them missing)
    for mode in ((), ("--deep",)):
        code, out, err = cli(capsys, "verify", "--config", cfg, *mode)
        assert code == 0, err
        assert "0 with discrepancies" in err or "discrepan" not in err


def test_a_destination_prefix_without_a_slash_restores_under_the_source_names(tmp_path, capsys, migrated, s3):
    """`dest_prefix: backup` names objects `backup/KEY`; restore took `/KEY` for the name and
    failed every object."""
    blobs = {"a.txt": b"a\n", "sub/b.txt": b"b\n"}
    cfg = migrated(blobs, slash=False)
    container = yaml.safe_load(cfg.read_text())["datasets"]["scans"]["container"]
    assert {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=container)["Contents"]} \
        == {f"{container}/a.txt", f"{container}/sub/b.txt"}
    code, out, err = restore(capsys, cfg, tmp_path / "out")
    assert code == 0, err
    assert "restored 2 of 2 objects" in out and "2 matched the SHA-256" in out
    assert files_under(tmp_path / "out") == blobs
    code, out, err = restore(capsys, cfg, tmp_path / "only-sub", "--prefix", "sub/")
    assert code == 0, err
    assert files_under(tmp_path / "only-sub") == {"sub/b.txt": b"b\n"}


def test_markers_double_slashes_and_a_file_beside_a_directory_follow_one_rule(tmp_path, capsys, migrated):
    """Issue 12, item 6: inventory names up front what restore will name; the directory wins over
    the file `d` whatever the order the workers reach them (`d/file` is restored, `d` named, every
    time); an ADLS marker (0 bytes, `hdi_isfolder=true`, no `/`) beside its contents is a directory;
    `a//b` is carried, verified and named by restore; the second migrate copies nothing."""
    blobs = {"d": b"", "d/file": b"in d\n", "adls": b"", "adls/f": b"in adls\n", "a//b": b"two slashes\n",
             "dir/": b"", "ok.txt": b"ok\n"}
    cfg = migrated(blobs, concurrency=8, metadata={"adls": {"hdi_isfolder": "true"}, "dir/": {"hdi_isfolder": "true"}})
    capsys.readouterr()  # the fixture's own commands
    code, out, err = cli(capsys, "inventory", "--config", cfg, "--format", "json")
    assert code == 0, err
    (inv,) = json.loads(out)
    assert inv["directory_markers"] == 2 and inv["misfit_count"] == 0
    assert sorted(u["key"] for u in inv["unrestorable"]) == ["a//b", "d"]
    code, out, err = cli(capsys, "verify", "--config", cfg, "--deep")
    assert code == 0, (out, err)
    for attempt in range(3):
        to = tmp_path / f"out{attempt}"
        code, out, err = restore(capsys, cfg, to)
        assert code == ExitCode.FAILED, (out, err)
        assert "restored 5 of 7 objects" in out and "2 failed" in out
        assert "'d' is a file, and the key 'd/file' continues below that name" in err
        assert "'a//b' cannot be written as a file safely: it has an empty segment" in err
        assert files_under(to) == {"d/file": b"in d\n", "adls/f": b"in adls\n", "ok.txt": b"ok\n"}
        assert (to / "dir").is_dir() and (to / "adls").is_dir()
        assert_nothing_of_restore_left(to)
    code, out, err = cli(capsys, "migrate", "--config", cfg)
    assert code == 0 and "scans: 0 B copied, 7 objects (7 unchanged)" in err, (out, err)


def test_metadata_names_tags_content_headers_and_source_times_come_back(tmp_path, capsys, migrated, s3,
                                                                          azurite_connection_string):
    """Issue 12, item 3: metadata names kept their case only as S3 lower-cased them, index tags were
    dropped, the source's times and ETag were nowhere. Now tags are the object's S3 tags (or, past
    the destination's tag limit, exitplan metadata), and restore gives back what a file holds (the
    bytes, the last-modified time) and lists the rest in DIR/.exitplan-properties.jsonl."""
    import gzip

    from engine.restore import SIDECAR

    packed = gzip.compress(b"gzip-encoded plaintext\n" * 20)
    cfg = migrated({"scan.bin": packed, "plain.txt": b"plain\n"})
    container = yaml.safe_load(cfg.read_text())["datasets"]["scans"]["container"]
    cc = BlobServiceClient.from_connection_string(azurite_connection_string).get_container_client(container)
    from azure.storage.blob import ContentSettings

    names = {"PatientId": "P-007", "lower": "ascii é", "Note": "=?UTF-8?B?bm90IGVuY29kZWQ=?="}
    tags = {"Dept": "Cardio", "study": "a b/c"}
    cc.upload_blob("scan.bin", packed, overwrite=True, metadata=names, tags=tags,
                   content_settings=ContentSettings(content_type="application/dicom", content_encoding="gzip",
                                                    content_language="fr"))
    source = cc.get_blob_client("scan.bin").get_blob_properties()
    capsys.readouterr()
    code, out, err = cli(capsys, "migrate", "--config", cfg)
    assert code == 0, err
    dest_key = f"{container}/scan.bin"
    head = s3.head_object(Bucket=BUCKET, Key=dest_key)
    assert head["ContentType"] == "application/octet-stream" and "ContentEncoding" not in head
    assert set(head["Metadata"]["exitplan-metadata-names"].split(",")) == {"PatientId", "Note"}
    assert head["Metadata"]["exitplan-source-etag"] == source.etag.strip('"')
    assert {t["Key"]: t["Value"] for t in s3.get_object_tagging(Bucket=BUCKET, Key=dest_key)["TagSet"]} == tags

    to = tmp_path / "out"
    code, out, err = restore(capsys, cfg, to)
    assert code == 0, err
    assert (to / "scan.bin").read_bytes() == packed  # as stored: never inflated
    assert abs((to / "scan.bin").stat().st_mtime - source.last_modified.timestamp()) < 1
    records = {r["key"]: r for r in map(json.loads, (to / SIDECAR).read_text().splitlines())}
    assert set(records) == {"scan.bin", "plain.txt"}
    scan = records["scan.bin"]
    assert scan["path"] == "scan.bin" and scan["size"] == len(packed)
    assert source.metadata == names and scan["metadata"] == names and scan["tags"] == tags
    assert scan["content"] == {"content_type": "application/dicom", "content_encoding": "gzip", "content_language": "fr"}
    assert scan["source"]["etag"] == source.etag.strip('"')
    assert scan["source"]["created"].startswith(source.creation_time.strftime("%Y-%m-%dT%H:%M:%S"))
    assert "metadata" not in records["plain.txt"] and "tags" not in records["plain.txt"]

    # A destination that keeps fewer tags than the blob has: they travel in exitplan's metadata.
    doc = yaml.safe_load(cfg.read_text())
    doc["destinations"]["lab"]["provider_overrides"] = {"limits": {"max_tags": 1}}
    cfg.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    cc.upload_blob("scan.bin", packed, overwrite=True, metadata=names, tags=tags)
    assert cli(capsys, "migrate", "--config", cfg)[0] == 0
    assert s3.get_object_tagging(Bucket=BUCKET, Key=dest_key)["TagSet"] == []
    assert s3.head_object(Bucket=BUCKET, Key=dest_key)["Metadata"]["exitplan-tags"] == "Dept=Cardio&study=a%20b%2Fc"
    code, out, err = restore(capsys, cfg, tmp_path / "again")
    assert code == 0, err
    again = {r["key"]: r for r in map(json.loads, (tmp_path / "again" / SIDECAR).read_text().splitlines())}
    assert again["scan.bin"]["tags"] == tags and again["scan.bin"]["metadata"] == names


def test_page_append_and_cool_blobs_carry_their_kind_and_an_archive_blob_is_named_not_retried(
        tmp_path, capsys, migrated, s3, azurite_connection_string):
    """Issue 12, item 4: page and append blobs were counted as Hot and became plain objects without a
    word; an Archive blob failed every attempt of every run."""
    from azure.storage.blob import StandardBlobTier

    cfg = migrated({"block.txt": b"block\n"})
    container = yaml.safe_load(cfg.read_text())["datasets"]["scans"]["container"]
    cc = BlobServiceClient.from_connection_string(azurite_connection_string).get_container_client(container)
    page = cc.get_blob_client("disk.vhd")
    page.create_page_blob(size=4 * 512)
    page.upload_page(b"\x07" * 512, offset=512, length=512)  # pages 0, 2, 3 never written: zeros
    append = cc.get_blob_client("log.txt")
    append.create_append_blob()
    for line in (b"one\n", b"two\n"):
        append.append_block(line)
    cc.upload_blob("cool.bin", b"cool\n", standard_blob_tier=StandardBlobTier.COOL)
    cc.upload_blob("frozen.bin", b"frozen\n", standard_blob_tier=StandardBlobTier.ARCHIVE)
    capsys.readouterr()

    code, out, err = cli(capsys, "inventory", "--config", cfg, "--format", "json")
    assert code == 0, err
    (inv,) = json.loads(out)
    assert inv["kinds"] == {"block": 3, "page": 1, "append": 1}
    assert inv["tiers"] == {"Hot": 1, "Cool": 1, "Archive": 1, "none": 2}
    assert [m["key"] for m in inv["misfits"]] == ["frozen.bin"] and "Archive tier" in inv["misfits"][0]["reason"]
    # The lab's catalog entry maps Cool to STANDARD_IA; the rest lands in the bucket's default class.
    assert {c["storage_class"]: c["objects"] for c in inv["classes"]} == {"STANDARD_IA": 1, None: 3}
    code, out, err = cli(capsys, "migrate", "--config", cfg, "--dry-run")
    assert code == 0, err
    assert f"would write  scans: {container}/cool.bin  (" in out and "1 PUT, STANDARD_IA)" in out
    assert "scans: would land in storage classes: STANDARD_IA 1 (5 B), the bucket default 2 (" in out, out

    for _ in range(2):  # refused with its reason each time, never read and retried
        code, out, err = cli(capsys, "migrate", "--config", cfg)
        assert code == ExitCode.FAILED and "frozen.bin" in err and "Archive tier" in err, (out, err)
    head = s3.head_object(Bucket=BUCKET, Key=f"{container}/disk.vhd")["Metadata"]
    assert head["exitplan-source-kind"] == "page"
    cool = s3.head_object(Bucket=BUCKET, Key=f"{container}/cool.bin")
    assert cool["Metadata"]["exitplan-source-tier"] == "Cool" and cool["StorageClass"] == "STANDARD_IA"
    assert "StorageClass" not in s3.head_object(Bucket=BUCKET, Key=f"{container}/log.txt")  # STANDARD

    to = tmp_path / "out"
    code, out, err = restore(capsys, cfg, to)
    assert files_under(to) == {"block.txt": b"block\n", "disk.vhd": bytes(512) + b"\x07" * 512 + bytes(1024),
                               "log.txt": b"one\ntwo\n", "cool.bin": b"cool\n"}
    records = {r["key"]: r for r in map(json.loads, (to / SIDECAR).read_text().splitlines())}
    assert records["disk.vhd"]["source"]["kind"] == "page" and records["log.txt"]["source"]["kind"] == "append"
    assert records["cool.bin"]["source"]["tier"] == "Cool"


def test_a_dataset_chooses_the_class_of_a_tier_over_the_destination_s_and_a_class_the_provider_lacks_is_refused(
        capsys, migrated, s3, azurite_connection_string):
    """Issue 12, item 4: tiers map to storage classes (catalog, destination, dataset), and `storage_class`
    is sent, not only checked."""
    from azure.storage.blob import StandardBlobTier

    cfg = migrated({"a.txt": b"a"})
    container = yaml.safe_load(cfg.read_text())["datasets"]["scans"]["container"]
    cc = BlobServiceClient.from_connection_string(azurite_connection_string).get_container_client(container)
    cc.upload_blob("cool.bin", b"cool", standard_blob_tier=StandardBlobTier.COOL)
    cc.upload_blob("hot.bin", b"hot")
    doc = yaml.safe_load(cfg.read_text())
    doc["datasets"]["scans"]["tier_classes"] = {"COOL": "GLACIER"}
    cfg.write_text(yaml.safe_dump(doc), encoding="utf-8")
    capsys.readouterr()
    code, out, err = cli(capsys, "migrate", "--config", cfg)
    assert code == ExitCode.USAGE and "field `datasets.scans.tier_classes`" in err and "'GLACIER'" in err, err
    assert "Traceback" not in err and keys_below(s3, BUCKET, f"{container}/") == {"a.txt"}

    doc["datasets"]["scans"]["tier_classes"] = {"cool": "STANDARD"}
    doc["destinations"]["lab"]["storage_class"] = "STANDARD_IA"
    cfg.write_text(yaml.safe_dump(doc), encoding="utf-8")
    code, out, err = cli(capsys, "migrate", "--config", cfg)
    assert code == 0, err
    assert s3.head_object(Bucket=BUCKET, Key=f"{container}/cool.bin").get("StorageClass", "STANDARD") == "STANDARD"
    assert s3.head_object(Bucket=BUCKET, Key=f"{container}/hot.bin")["StorageClass"] == "STANDARD_IA"
    # The class is recorded (state, manifest) and quick verify holds the destination to it.
    records = [json.loads(line) for line in (cfg.parent / "state" / "audit" / "manifest.jsonl").read_text().splitlines()]
    (hot,) = [r for r in records if r["type"] == "transfer" and r["source"]["key"] == "hot.bin"]
    assert hot["destination"]["storage_class"] == "STANDARD_IA"
    assert cli(capsys, "verify", "--config", cfg)[0] == 0
    key = f"{container}/hot.bin"
    s3.copy_object(Bucket=BUCKET, Key=key, CopySource={"Bucket": BUCKET, "Key": key}, StorageClass="STANDARD")
    code, out, err = cli(capsys, "verify", "--config", cfg)
    assert code == 1 and "storage class STANDARD_IA" in out + err and "hot.bin" in out + err, (out, err)


def test_rehydrate_brings_archive_blobs_online_and_the_next_migrate_copies_them(
        capsys, migrated, s3, azurite_connection_string):
    """Issue 12, item 4: the opt-in rehydration step. Azurite rehydrates at once (a pending
    rehydration is shown against recorded answers in tests/unit/test_rehydrate.py)."""
    from azure.storage.blob import StandardBlobTier

    cfg = migrated({"a.txt": b"a"})
    container = yaml.safe_load(cfg.read_text())["datasets"]["scans"]["container"]
    cc = BlobServiceClient.from_connection_string(azurite_connection_string).get_container_client(container)
    for name in ("old/1.bin", "old/2.bin"):
        cc.upload_blob(name, name.encode() * 100, standard_blob_tier=StandardBlobTier.ARCHIVE)
    capsys.readouterr()
    code, out, err = cli(capsys, "migrate", "--config", cfg)
    assert code == ExitCode.FAILED and "old/1.bin" in err and "`exitplan rehydrate`" in err, (out, err)

    code, out, err = cli(capsys, "rehydrate", "--config", cfg, "--dry-run")
    assert code == 0, err
    assert "dry run: nothing was asked" in out and "would ask for 2 blob(s) to be rehydrated to Hot" in out, out
    assert {b.name: b.blob_tier for b in cc.list_blobs(name_starts_with="old/")} == {
        "old/1.bin": "Archive", "old/2.bin": "Archive"}

    code, out, err = cli(capsys, "rehydrate", "--config", cfg, "--tier", "cool", "--priority", "high", "--json")
    assert code == 0, err
    (scans,) = json.loads(out)
    assert scans["requested"] == {"objects": 2, "bytes": 1800} and scans["failed"]["objects"] == 0
    assert {b.name: b.blob_tier for b in cc.list_blobs(name_starts_with="old/")} == {
        "old/1.bin": "Cool", "old/2.bin": "Cool"}

    code, out, err = cli(capsys, "rehydrate", "--config", cfg, "--wait", "--poll", "0.1")
    assert code == 0 and "no blob is left in the Archive tier" in out, (out, err)
    assert cli(capsys, "migrate", "--config", cfg)[0] == 0
    # Rehydrated to Cool: the lab's catalog maps Cool to STANDARD_IA.
    assert s3.head_object(Bucket=BUCKET, Key=f"{container}/old/1.bin")["StorageClass"] == "STANDARD_IA"
    assert keys_below(s3, BUCKET, f"{container}/") == {"a.txt", "old/1.bin", "old/2.bin"}
