"""The Azure Blob Inventory report reader (connectors/azure_inventory.py): rows as Azure documents
them, the manifest's checks, and a report written by the lab generator read back into the same
`ObjectMeta` it was made from. The report's container is an in-memory store."""

from __future__ import annotations

import base64
import hashlib
import json
import sys
from datetime import datetime, timezone

import pytest

from connectors.azure_blob import ARCHIVED
from connectors.azure_inventory import (
    InventoryReport,
    RangedBlobFile,
    _mapping,
    field_key,
    object_meta,
    row_not_copied,
)
from connectors.base import ConfigError, ContentSettings, ObjectMeta, WriteMeta
from connectors.memory import MemoryStore
from lab.inventory_report import MemoryReportWriter, SCHEMA_FIELDS, write_report

STARTED = datetime(2026, 11, 30, 1, 0, 0, tzinfo=timezone.utc)
FOLDER = "2026/11/30/01-00-00/exitplan"
MANIFEST = f"{FOLDER}/exitplan-manifest.json"



def row(**cells) -> dict:
    """A report row keyed as the reader keys Azure's column names."""
    return {field_key(k): v for k, v in cells.items()}


# A row with the fields of Azure's documented schema (blob-inventory: "Custom schema fields
# supported for blob inventory"), as a CSV report writes them.
DOCUMENTED = row(**{
    "Name": "claims/2024/03/claims-00042.csv", "Creation-Time": "2021-05-26T13:25:36.1234567Z",
    "Last-Modified": "Wed, 26 May 2021 13:30:02 GMT", "Etag": '"0x8D92045F3C0AD12"', "Content-Length": "12710",
    "Content-Type": "text/csv", "Content-Encoding": "", "Content-Language": "fr", "Content-CRC64": "",
    "Content-MD5": base64.b64encode(hashlib.md5(b"x").digest()).decode(), "Cache-Control": "no-cache",
    "Content-Disposition": "", "BlobType": "BlockBlob", "AccessTier": "Cool", "AccessTierInferred": "false",
    "Metadata": '{"origin":"hôpital","Batch":"7"}', "Tags": '{"retention":"10y"}', "LeaseStatus": "unlocked",
})


def test_a_documented_row_gives_the_listing_s_object_meta():
    meta = object_meta(DOCUMENTED, "claims")
    assert meta.key == "2024/03/claims-00042.csv"
    assert meta.size == 12710
    assert meta.etag == "0x8D92045F3C0AD12"  # quotes stripped, as the listing strips them
    assert meta.content_md5 == hashlib.md5(b"x").digest()
    assert meta.tier == "Cool" and meta.kind == "block" and meta.not_copyable is None
    assert meta.content == ContentSettings(content_type="text/csv", content_language="fr", cache_control="no-cache")
    assert meta.metadata == {"origin": "hôpital", "Batch": "7"}
    assert meta.tags == {"retention": "10y"}
    assert meta.created == datetime(2021, 5, 26, 13, 25, 36, 123456, tzinfo=timezone.utc)
    assert meta.last_modified == datetime(2021, 5, 26, 13, 30, 2, tzinfo=timezone.utc)


def test_blob_types_tiers_and_empty_cells():
    page = object_meta({**DOCUMENTED, "blobtype": "PageBlob", "accesstier": "", "contentmd5": "",
                        "metadata": "", "tags": ""}, "claims")
    assert (page.kind, page.tier, page.content_md5, page.metadata, page.tags) == ("page", None, None, {}, {})
    assert object_meta({**DOCUMENTED, "blobtype": "AppendBlob"}, "claims").kind == "append"
    archived = object_meta({**DOCUMENTED, "accesstier": "Archive"}, "claims")
    assert archived.not_copyable == ARCHIVED
    filling = object_meta({**DOCUMENTED, "copystatus": "pending", "copyprogress": "10/100"}, "claims")
    assert filling.not_copyable.startswith("a copy into it is still in progress") and "10/100" in filling.not_copyable
    assert object_meta({**DOCUMENTED, "copystatus": "success"}, "claims").not_copyable is None


def test_a_row_that_cannot_be_read_is_refused_by_name():
    with pytest.raises(ConfigError, match="claims-00042.csv.*Content-MD5"):
        object_meta({**DOCUMENTED, "contentmd5": "not-base64!"}, "claims")
    with pytest.raises(ConfigError, match="Metadata"):
        object_meta({**DOCUMENTED, "metadata": "origin=x"}, "claims")


def test_parquet_cells_maps_and_timestamps():
    stamp = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=timezone.utc)
    meta = object_meta({**DOCUMENTED, "creationtime": stamp, "contentmd5": hashlib.md5(b"x").digest(),
                        "metadata": [("a", "1")], "contentlength": 5}, "claims")
    assert meta.created == stamp and meta.content_md5 == hashlib.md5(b"x").digest() and meta.metadata == {"a": "1"}
    assert _mapping({"k": 1}, "Tags") == {"k": "1"}


@pytest.mark.parametrize("cells, reason", [
    ({"Snapshot": "2021-05-26T13:25:36.0000000Z"}, "snapshots"),
    ({"VersionId": "2021-05-26T13:25:36.0000000Z", "IsCurrentVersion": "false"}, "earlier versions"),
    ({"Deleted": "true", "RemainingRetentionDays": "6"}, "soft-deleted"),
])
def test_snapshots_versions_and_deleted_rows_are_not_objects(cells, reason):
    assert reason in row_not_copied({**DOCUMENTED, **row(**cells)})


def test_the_current_version_is_an_object():
    assert row_not_copied({**DOCUMENTED, **row(VersionId="2021-05-26T13:25:36.0000000Z", IsCurrentVersion="true",
                                               Snapshot="", Deleted="false")}) is None


# ---- a whole report ----------------------------------------------------------------------------


def blobs() -> list[ObjectMeta]:
    source = MemoryStore()
    metas = [
        source.add("a/one.csv", b"1,2\n" * 10, meta=WriteMeta(ContentSettings(content_type="text/csv"),
                                                             {"origin": "hôpital"}, {"team": "x"})),
        source.add("a/empty", b""),
        source.add("b/blocks.bin", b"\0" * 100, content_md5=False, tier="Cool"),
        source.add("elsewhere/c.txt", b"c"),
    ]
    return [ObjectMeta(**{**m.__dict__, "kind": "block", "created": m.last_modified}) for m in metas]


def report_store(metas, *, fmt="csv", rows_per_file=0) -> MemoryStore:
    store = MemoryStore()
    write_report(MemoryReportWriter(store), "inventory", list(metas), "claims", fmt=fmt, started=STARTED,
                 rows_per_file=rows_per_file)
    return store


def open_report(store, prefix="", manifest=MANIFEST) -> InventoryReport:
    return InventoryReport.open(store, "inventory", manifest, dataset_container="claims", dataset_prefix=prefix,
                                field_name="datasets.claims.inventory.report")


def rewrite_manifest(store: MemoryStore, change) -> None:
    """Change the manifest and write its checksum again, as a different (but complete) run would."""
    manifest = json.loads(store.data(MANIFEST))
    change(manifest)
    body = json.dumps(manifest).encode()
    store.add(MANIFEST, body)
    store.add(MANIFEST.replace(".json", ".checksum"), hashlib.md5(body).hexdigest().encode())


def without_precision(meta: ObjectMeta, ms: bool) -> ObjectMeta:
    cut = (lambda t: t.replace(microsecond=t.microsecond // 1000 * 1000)) if ms else (lambda t: t)
    return ObjectMeta(**{**meta.__dict__, "last_modified": cut(meta.last_modified), "created": cut(meta.created)})


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
@pytest.mark.parametrize("rows_per_file", [0, 3])
def test_a_report_reads_back_as_the_objects_it_was_made_from(fmt, rows_per_file):
    metas = blobs()
    report = open_report(report_store(metas, fmt=fmt, rows_per_file=rows_per_file))
    assert report.format == fmt and report.object_count == 4 and len(report.files) == (2 if rows_per_file else 1)
    assert "completed" in report.origin and "4 rows" in report.origin
    read = sorted(report.objects("claims"), key=lambda m: m.key)
    assert read == sorted((without_precision(m, fmt == "parquet") for m in metas), key=lambda m: m.key)


def test_only_the_dataset_s_prefix_and_repeated_rows_counted():
    metas = blobs()
    store = report_store(metas + [metas[0]])  # Azure may list a blob twice
    report = open_report(store, prefix="a/")
    assert sorted(m.key for m in report.objects("claims", "a/")) == ["a/empty", "a/one.csv"]
    assert report.rows == 5
    assert list(report.not_copied.values()) == [(1, metas[0].size)] and "repeated" in next(iter(report.not_copied))


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(status="Failed"), "status 'Failed'"),
    (lambda m: m["ruleDefinition"]["filters"].update(blobTypes=["blockBlob"]), "appendBlob, pageBlob"),
    (lambda m: m["ruleDefinition"]["filters"].update(prefixMatch=["other"]), "does not cover claims/"),
    (lambda m: m["ruleDefinition"]["filters"].update(excludePrefix=["claims/a"]), "excludePrefix"),
    (lambda m: m["ruleDefinition"]["filters"].update(creationTime=3), "creationTime"),
    (lambda m: m["ruleDefinition"]["schemaFields"].remove("Tags"), "lack Tags"),
    (lambda m: m["files"][0].update(size=m["files"][0]["size"] + 1), "the manifest says"),
    (lambda m: m["files"].append({"blob": f"{FOLDER}/gone.csv", "size": 1}), "gone.csv named by the manifest is missing"),
    (lambda m: m.update(destinationContainer="elsewhere"), "belongs to container 'elsewhere'"),
])
def test_a_report_that_may_leave_objects_out_is_refused_before_any_row(change, message):
    store = report_store(blobs())
    rewrite_manifest(store, change)
    with pytest.raises(ConfigError, match=message) as raised:
        open_report(store)
    assert "datasets.claims.inventory.report" in str(raised.value)


def test_a_run_without_its_checksum_or_with_a_changed_manifest_is_refused():
    store = report_store(blobs())
    store.add(MANIFEST, store.data(MANIFEST) + b" ")
    with pytest.raises(ConfigError, match="does not match its checksum"):
        open_report(store)
    store.delete(MANIFEST.replace(".json", ".checksum"))
    with pytest.raises(ConfigError, match="has not completed"):
        open_report(store)
    with pytest.raises(ConfigError, match="no such manifest blob"):
        open_report(store, manifest=f"{FOLDER}/other-manifest.json")


def test_rows_that_do_not_add_up_or_a_file_altered_are_refused_when_read():
    store = report_store(blobs())
    rewrite_manifest(store, lambda m: m["summary"].update(objectCount=5))
    with pytest.raises(ConfigError, match="hold 4 rows, its manifest says 5"):
        list(open_report(store).objects("claims"))
    store = report_store(blobs())
    name = f"{FOLDER}/exitplan.csv"
    body = store.data(name)
    store.add(name, body.replace(b"text/csv", b"text/txt"))  # same size, other bytes
    with pytest.raises(ConfigError, match="MD5 is .* the manifest says"):
        list(open_report(store).objects("claims"))


def test_a_file_without_a_required_column_is_refused():
    store = report_store(blobs())
    name = f"{FOLDER}/exitplan.csv"
    body = store.data(name).replace(b",Tags\r\n", b",Tagz\r\n", 1)
    store.add(name, body)
    rewrite_manifest(store, lambda m: m["files"][0].update(md5=hashlib.md5(body).hexdigest()))
    with pytest.raises(ConfigError, match="has no Tags column"):
        list(open_report(store).objects("claims"))


def test_a_parquet_report_without_pyarrow_says_which_extra_to_install(monkeypatch):
    store = report_store(blobs(), fmt="parquet")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ConfigError, match=r"exitplan\[inventory\]"):
        open_report(store)


class CountingStore(MemoryStore):
    def __init__(self):
        super().__init__()
        self.bytes_read = 0

    def read_range(self, key, start, end, *, if_match=None):
        self.bytes_read += end - start
        return super().read_range(key, start, end, if_match=if_match)


def test_a_ranged_file_hashes_in_one_pass_what_it_read_out_of_order():
    store = CountingStore()
    data = bytes(range(256)) * 20_000
    meta = store.add("f", data)
    f = RangedBlobFile(store, "f", len(data), meta.etag)
    f.seek(len(data) - 10)
    assert f.read(10) == data[-10:]  # a footer first, as Parquet is read
    f.seek(4)
    assert f.read(1000) == data[4:1004]  # the small gap before is fetched and hashed
    assert f.md5() == hashlib.md5(data).digest()
    assert store.bytes_read == len(data) + 10  # the file once, and the footer twice


def test_the_lab_report_names_azure_s_fields():
    assert SCHEMA_FIELDS[0] == "Name" and {"Content-Length", "Etag", "Content-MD5", "BlobType", "AccessTier"} <= set(SCHEMA_FIELDS)


# ---- the configuration -------------------------------------------------------------------------

S3_SOURCE = {"kind": "s3", "endpoint_url": "https://s3.gra.io.cloud.ovh.net", "region": "gra"}


def config_with(tmp_path, inventory: dict, **sources):
    import yaml

    data = {
        "version": 1, "project": "hdh-exit",
        "sources": {"az": {"kind": "azure_blob", "account_url": "https://acct.blob.core.windows.net",
                           "credential": "default"}, **sources},
        "destinations": {"ovh": {"provider": "ovhcloud", "endpoint_url": "https://s3.gra.io.cloud.ovh.net",
                                 "region": "gra", "bucket": "hdh-exit",
                                 "credentials": {"access_key_id_env": "OVH_KEY", "secret_access_key_env": "OVH_SECRET"}}},
        "datasets": {"claims": {"source": "az", "container": "claims", "destination": "ovh", "inventory": inventory}},
        "keys": {"kek": {"backend": "openbao", "address": "https://bao.example.eu:8200", "key_name": "exitplan"}},
    }
    path = tmp_path / "exitplan.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_the_report_path_is_a_folder_or_its_manifest(tmp_path):
    from config.loader import load_config

    folder = load_config(config_with(tmp_path, {"report": f"inventory/{FOLDER}"})).config.datasets["claims"].inventory
    assert (folder.container, folder.manifest_path) == ("inventory", MANIFEST)
    manifest = load_config(config_with(tmp_path, {"report": f"inventory/{MANIFEST}"})).config.datasets["claims"].inventory
    assert manifest.manifest_path == MANIFEST


@pytest.mark.parametrize("inventory, sources, fragment", [
    ({"report": f"inventory/{FOLDER}", "source": "bucket"}, {"bucket": S3_SOURCE},
     "`datasets.claims.inventory.source`: the report must be read from an Azure Blob source"),
    ({"report": f"inventory/{FOLDER}", "source": "nowhere"}, {}, "source 'nowhere' is not defined"),
    ({"report": "inventory"}, {}, "datasets.claims.inventory.report"),
])
def test_a_report_outside_azure_is_refused_with_exit_2(tmp_path, capsys, inventory, sources, fragment):
    from config.errors import ConfigFileError, ExitCode
    from config.loader import load_config
    from flows.cli import main

    path = config_with(tmp_path, inventory, **sources)
    with pytest.raises(ConfigFileError, match=fragment):
        load_config(path)
    assert main(["inventory", "--config", str(path)]) == ExitCode.USAGE


def test_a_report_for_a_dataset_read_from_s3_is_refused(tmp_path):
    import yaml
    from config.errors import ConfigFileError
    from config.loader import load_config

    path = config_with(tmp_path, {"report": f"inventory/{FOLDER}"}, bucket=S3_SOURCE)
    data = yaml.safe_load(path.read_text())
    data["datasets"]["claims"].update(source="bucket", inventory={"report": f"inventory/{FOLDER}", "source": "az"})
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigFileError, match="`datasets.claims.inventory`: an inventory report lists an Azure Blob"):
        load_config(path)


def test_a_report_file_replaced_after_its_manifest_was_checked_is_not_read():
    from connectors.base import SourceChanged

    store = report_store(blobs())
    report = open_report(store)
    name = f"{FOLDER}/exitplan.csv"
    store.add(name, store.data(name))  # same bytes, a new ETag: Azure rewrote it
    with pytest.raises(SourceChanged):
        list(report.objects("claims"))


def test_a_cell_that_cannot_be_read_names_the_file_and_row():
    store = report_store(blobs())
    name = f"{FOLDER}/exitplan.csv"
    md5 = base64.b64encode(hashlib.md5(b"1,2\n" * 10).digest())
    body = store.data(name).replace(md5, b"!" * len(md5), 1)
    assert body != store.data(name)
    store.add(name, body)
    rewrite_manifest(store, lambda m: m["files"][0].update(md5=hashlib.md5(body).hexdigest()))
    with pytest.raises(ConfigError, match=r"exitplan.csv, row 1: blob 'claims/a/one.csv': Content-MD5"):
        list(open_report(store).objects("claims"))
