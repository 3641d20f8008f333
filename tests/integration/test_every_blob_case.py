"""Every kind of blob a real storage account holds, in one container, through the whole exit:
inventory, dry run, migrate, verify --deep, restore, a second migrate. Inventory's figures are what
migrate does; every blob's bytes, content headers, metadata (with the case of its names) and tags
come back from restore, or the blob is named with the reason; stock tink decrypts every object
written; the second run copies nothing. (Azurite has no versioning: versions are in
tests/unit/test_azure_versions.py.)"""

from __future__ import annotations

import gzip
import json

import pytest
from azure.storage.blob import ContentSettings, StandardBlobTier

from config.loader import load_config
from connectors.base import NOT_CARRIED, ListingRange
from engine.endpoints import destination_limits, open_source
from engine.inventory import format_metadata
from engine.placement import encode_header_value, metadata_bytes
from engine.restore import SIDECAR
from tests.integration.test_completeness import BUCKET, cli, project, s3  # noqa: F401 - fixtures
from tests.integration.test_migrate_e2e import tink_decrypt
from tests.s3client import keys_below

pytestmark = pytest.mark.integration

CSV = "id,name\n1,Ada\n2,Grace\n".encode()
CASED = {"PatientId": "P-00017", "studyDate": "2026-11-30", "Note": "café au lait"}
TAGS = {"Dept": "Cardio", "Study": "x y/z", "Retention": "10y"}


def seed(cc) -> dict[str, bytes]:
    """The blobs, and the bytes each holds as stored (what must arrive)."""
    stored = {}

    def put(name, data, **kw):
        cc.upload_blob(name, data, **kw)
        stored[name] = data

    put("gz/claims.csv.gz", gzip.compress(CSV * 50),
        content_settings=ContentSettings(content_type="text/csv", content_encoding="gzip", content_language="fr"))
    put("gz/notes.txt", b"\x78\x9c" + b"deflated-looking bytes",
        content_settings=ContentSettings(content_type="text/plain", content_encoding="deflate"))
    put("meta/cased.csv", CSV, metadata=CASED, tags=TAGS)
    put("snap/a.txt", b"before")
    cc.get_blob_client("snap/a.txt").create_snapshot()
    put("snap/a.txt", b"after", overwrite=True)
    page = cc.get_blob_client("kinds/disk.vhd")
    page.create_page_blob(size=2 * 512)
    page.upload_page(b"\x07" * 512, offset=512, length=512)
    stored["kinds/disk.vhd"] = bytes(512) + b"\x07" * 512
    append = cc.get_blob_client("kinds/log.txt")
    append.create_append_blob()
    append.append_block(b"one\n")
    append.append_block(b"two\n")
    stored["kinds/log.txt"] = b"one\ntwo\n"
    put("tiers/cool.bin", b"cool", standard_blob_tier=StandardBlobTier.COOL)
    cc.upload_blob("tiers/frozen.bin", b"frozen", standard_blob_tier=StandardBlobTier.ARCHIVE)
    put("dirs/marker/", b"")
    put("dirs/d", b"a file named like a folder")
    put("dirs/d/file.txt", b"inside")
    put("names/a//b.txt", b"double slash")
    return stored


def at_the_limit(cc, loaded, container: str, name: str, over: int) -> None:
    """Give blob `name` metadata that makes its S3 metadata, exitplan's own included, exactly
    2,048 + `over` bytes, measured with the code migrate places objects with."""
    limit = destination_limits(loaded, "lab").max_metadata_bytes
    reserved = format_metadata(loaded, "docs")
    source = open_source(loaded, "docs")
    value = "v" * 1000
    for _ in range(5):
        cc.get_blob_client(name).set_blob_metadata({"pad": value})
        (meta,) = [m for page in source.list_pages(ListingRange(name)) for m in page.objects if m.key == name]
        size = metadata_bytes({**reserved(meta), "pad": encode_header_value(value)})
        if size == limit + over:
            return
        value = "v" * (len(value) + limit + over - size)
    raise AssertionError(f"could not bring {name}'s metadata to {limit + over} bytes")


def test_every_blob_case_is_carried_or_named_and_inventory_predicts_migrate(project, capsys, s3, tmp_path):
    stored = seed(project.cc)
    cfg = project.make()
    loaded = load_config(cfg)
    for name, over in (("limit/fits.bin", 0), ("limit/over.bin", 1)):
        project.cc.upload_blob(name, name.encode())
        at_the_limit(project.cc, loaded, project.container, name, over)
    stored["limit/fits.bin"] = b"limit/fits.bin"
    capsys.readouterr()

    # Inventory: every kind, tier, snapshot, and what will not fit, before anything is written.
    code, out, err = cli(capsys, "inventory", "--config", cfg, "--format", "json")
    assert code == 0, err
    (inv,) = json.loads(out)
    refused = {m["key"] for m in inv["misfits"]}
    assert refused == {"tiers/frozen.bin", "limit/over.bin"}
    assert inv["objects"] == len(stored) + len(refused)
    assert inv["kinds"] == {"block": len(stored) + len(refused) - 2, "page": 1, "append": 1}
    assert inv["tiers"]["Cool"] == 1 and inv["tiers"]["Archive"] == 1 and inv["tiers"]["none"] == 2
    assert inv["not_copied"] == {NOT_CARRIED["snapshot"]: [1, len(b"before")]}
    # carried, but not restorable as files (named by inventory first, then by restore)
    unrestorable = {"dirs/d", "names/a//b.txt"}
    assert inv["directory_markers"] == 1 and {u["key"] for u in inv["unrestorable"]} == unrestorable
    assert {c["storage_class"]: c["objects"] for c in inv["classes"]} == {"STANDARD_IA": 1, None: len(stored) - 1}

    # The dry run plans exactly that.
    code, out, err = cli(capsys, "migrate", "--config", cfg, "--dry-run")
    assert code == 0, err
    assert out.count("would write  docs: ") == len(stored)
    assert {line.split(": ", 1)[1].split("  (")[0] for line in out.splitlines()
            if line.startswith("would refuse")} == refused

    # The migration does it, and names the two it refuses.
    code, out, err = cli(capsys, "migrate", "--config", cfg)
    assert code == 1 and all(key in err for key in refused), (out, err)
    assert keys_below(s3, BUCKET, f"{project.container}/") == set(stored)
    assert f"docs: not carried: 1 (6 B) {NOT_CARRIED['snapshot']}" in out

    # Every object written decrypts with stock tink to the bytes as stored at the source.
    for name, data in stored.items():
        obj = s3.get_object(Bucket=BUCKET, Key=f"{project.container}/{name}")
        assert obj["ContentType"] == "application/octet-stream" and "ContentEncoding" not in obj, name
        assert tink_decrypt(cfg, obj["Body"].read(), obj["Metadata"]) == data, name
    tags = s3.get_object_tagging(Bucket=BUCKET, Key=f"{project.container}/meta/cased.csv")["TagSet"]
    assert {t["Key"]: t["Value"] for t in tags} == TAGS

    # Deep verify: every written object read back and matched; the refused ones keep the dataset
    # incomplete, by name.
    code, out, err = cli(capsys, "verify", "--config", cfg, "--deep")
    assert code == 1 and all(key in out + err for key in refused), (out, err)
    assert "discrepanc" not in (out + err).replace("0 with discrepancies", ""), (out, err)

    # Restore: the bytes as stored, the headers, metadata names with their case and the tags in the
    # sidecar; the marker as a directory; a file beside a folder of its name, and a name with `//`,
    # named, not skipped.
    to = tmp_path / "back"
    code, out, err = cli(capsys, "restore", "--config", cfg, "--dataset", "docs", "--to", to)
    assert code == 1 and all(f"'{key}'" in out + err for key in unrestorable), (out, err)
    for name, data in stored.items():
        if name in unrestorable or name == "dirs/marker/":
            continue
        assert (to / name).read_bytes() == data, name
    assert (to / "dirs" / "marker").is_dir() and (to / "dirs" / "d").is_dir()
    sidecar = {r["key"]: r for r in map(json.loads, (to / SIDECAR).read_text().splitlines())}
    assert sidecar["gz/claims.csv.gz"]["content"] == {"content_type": "text/csv", "content_encoding": "gzip",
                                                      "content_language": "fr"}
    assert sidecar["gz/notes.txt"]["content"]["content_encoding"] == "deflate"
    assert sidecar["meta/cased.csv"]["metadata"] == CASED and sidecar["meta/cased.csv"]["tags"] == TAGS
    assert sidecar["kinds/disk.vhd"]["source"]["kind"] == "page"
    assert sidecar["tiers/cool.bin"]["source"]["tier"] == "Cool"

    # The second migration copies nothing, and names the same refusals and snapshot.
    code, out, err = cli(capsys, "migrate", "--config", cfg)
    assert code == 1 and "0 objects, 0 B copied" in out and all(key in err for key in refused), (out, err)
    assert f"docs: not carried: 1 (6 B) {NOT_CARRIED['snapshot']}" in out


def test_tags_and_a_tier_changed_at_the_source_reach_the_copy_on_the_next_run(project, capsys, s3):  # noqa: F811
    """Azure sets a blob's tags and its tier without a new ETag: a delta that compared the ETag
    alone would call both blobs unchanged and leave the copy with the old tags and class."""
    project.cc.upload_blob("tagged.csv", b"a,b\n", tags={"retention": "5y"})
    project.cc.upload_blob("tiered.bin", b"x" * 100, standard_blob_tier=StandardBlobTier.HOT)
    project.cc.upload_blob("still.bin", b"same")
    cfg = project.make()
    assert cli(capsys, "migrate", "--config", cfg)[0] == 0
    etags = {name: project.cc.get_blob_client(name).get_blob_properties().etag for name in ("tagged.csv", "tiered.bin")}

    project.cc.get_blob_client("tagged.csv").set_blob_tags({"retention": "10y"})
    project.cc.get_blob_client("tiered.bin").set_standard_blob_tier(StandardBlobTier.COOL)
    assert etags == {name: project.cc.get_blob_client(name).get_blob_properties().etag for name in etags}
    code, out, err = cli(capsys, "migrate", "--config", cfg)
    assert code == 0, err
    row = next(line.split() for line in out.splitlines() if line.startswith("docs "))
    assert row[1:5] == ["3", "2", "1", "0"], out  # objects, copied, unchanged (still.bin), failed
    tags = s3.get_object_tagging(Bucket=BUCKET, Key=f"{project.container}/tagged.csv")["TagSet"]
    assert {t["Key"]: t["Value"] for t in tags} == {"retention": "10y"}
    head = s3.head_object(Bucket=BUCKET, Key=f"{project.container}/tiered.bin")
    assert head.get("StorageClass") == "STANDARD_IA"


def test_a_blob_archived_after_its_copy_stays_unchanged_and_one_changed_then_archived_is_refused(  # noqa: F811
        project, capsys, s3):
    """Moving a copied blob to the Archive tier gives it no new ETag: its copy stands, said with the
    reason the source cannot give it now (exit 0); a blob rewritten and then archived cannot be read
    for its new bytes and is refused by name (exit 1). The dry run says the same."""
    project.cc.upload_blob("cold/kept.bin", b"k" * 50)
    project.cc.upload_blob("cold/rewritten.bin", b"old")
    cfg = project.make()
    assert cli(capsys, "migrate", "--config", cfg)[0] == 0
    project.cc.get_blob_client("cold/kept.bin").set_standard_blob_tier(StandardBlobTier.ARCHIVE)
    code, out, err = cli(capsys, "migrate", "--config", cfg, "--dry-run")
    assert code == 0 and "would skip   docs: cold/kept.bin  (unchanged since run 1; its copy stands (" in out, (out, err)
    code, out, err = cli(capsys, "migrate", "--config", cfg)
    assert code == 0, (out, err)
    row = next(line.split() for line in out.splitlines() if line.startswith("docs "))
    assert row[1:5] == ["2", "0", "2", "0"], out

    project.cc.upload_blob("cold/rewritten.bin", b"new bytes", overwrite=True,
                           standard_blob_tier=StandardBlobTier.ARCHIVE)
    code, out, err = cli(capsys, "migrate", "--config", cfg, "--dry-run")
    assert "would refuse docs: cold/rewritten.bin" in out and "would skip   docs: cold/kept.bin" in out, out
    code, out, err = cli(capsys, "migrate", "--config", cfg)
    assert code == 1 and "cold/rewritten.bin" in err and "cold/kept.bin" not in err, (out, err)
    row = next(line.split() for line in out.splitlines() if line.startswith("docs "))
    assert row[1:5] == ["2", "0", "1", "1"], out
