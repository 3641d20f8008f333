"""End to end on real servers: seed Azurite → `exitplan migrate` → read back with boto3.

The oracles are independent implementations: every object read back from the S3 server with boto3
is ciphertext, and stock tink decrypts it to exactly its source as read with the Azure SDK, with
its content headers and metadata carried over; `exitplan restore` gives the same bytes back.
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from pathlib import Path

import io

import pytest
import tink
import yaml
from azure.storage.blob import BlobServiceClient, ContentSettings, StandardBlobTier
from tink import streaming_aead

from config.lab import LAB_BUCKET
from config.loader import load_config
from connectors.base import ContentSettings as ContentHeaders
from engine import keys as project_keys
from engine.crypto.tink_format import content_of
from engine.placement import decode_header_value
from flows.cli import main
from tests.projects import project_name
from tests.s3client import lab_s3_client

pytestmark = pytest.mark.integration

CS_VAR = "EXITPLAN_TEST_AZURE_CS"


@pytest.fixture(scope="module")
def s3(s3_server):
    return lab_s3_client(s3_server.url, LAB_BUCKET)


@pytest.fixture
def env(monkeypatch, azurite_connection_string):
    monkeypatch.setenv(CS_VAR, azurite_connection_string)


def write_config(tmp_path: Path, s3_server, datasets: dict, *, init_keys: bool = True, **transfer) -> Path:
    cfg = {
        "version": 1,
        "project": project_name(tmp_path, "e2e"),
        "sources": {"az": {"kind": "azure_blob", "connection_string_env": CS_VAR}},
        "destinations": {"lab": {"provider": "lab", "endpoint_url": s3_server.url, "region": "eu-west-3", "bucket": LAB_BUCKET}},
        "datasets": datasets,
        "transfer": {"concurrency": 4, **transfer},
        "state": {"path": str(tmp_path / "state")},
        "keys": {"kek": {"backend": "local", "path": str(tmp_path / "kek.key")}},
    }
    path = tmp_path / "exitplan.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    if init_keys:
        assert main(["keys", "init", "--config", str(path)]) == 0
    return path


def tink_decrypt(config: Path, data: bytes, metadata: dict) -> bytes:
    """Decrypt with stock tink: the keyset unwrapped by the project's KEK, the associated data from
    the object's metadata (docs/FORMAT.md)."""
    handle = project_keys.load_keyset(load_config(config))
    primitive = handle.primitive(streaming_aead.StreamingAead)
    aad = metadata["exitplan-associated-data"].encode()
    with primitive.new_decrypting_stream(io.BytesIO(data), aad) as stream:
        return stream.read()


def lab_datasets(prefix: str) -> dict:
    return {c: {"source": "az", "container": c, "destination": "lab", "dest_prefix": f"{prefix}/{c}/"}
            for c in ("claims", "stays", "imaging")}


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def list_keys(s3, prefix: str) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=LAB_BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_migrate_copies_every_seeded_object_byte_exact(tmp_path, capsys, env, seeded, s3, s3_server,
                                                       azurite_connection_string):
    prefix = f"e2e-{uuid.uuid4().hex[:8]}"
    # Small parts so the 5 MiB and 8 MiB boundary blobs go multipart, several parts each.
    config = write_config(tmp_path, s3_server, lab_datasets(prefix), part_size="5MiB", small_object_cutoff="4MiB")
    code, out, err = run(capsys, "migrate", "--config", str(config))
    assert code == 0, err
    assert f"{len(seeded)} objects" in out

    azure = BlobServiceClient.from_connection_string(azurite_connection_string)
    sizes = set()
    key_ids = set()
    for obj in seeded:
        key = f"{prefix}/{obj.container}/{obj.name}"
        got = s3.get_object(Bucket=LAB_BUCKET, Key=key)
        raw = got["Body"].read()
        source = azure.get_blob_client(obj.container, obj.name)
        expected = source.download_blob().readall()
        # A short plaintext can occur in random ciphertext by chance; 16 bytes and more cannot.
        assert raw != expected and (len(expected) < 16 or expected[:64] not in raw), f"{key} is stored in clear"
        body = tink_decrypt(config, raw, got["Metadata"])
        assert body == expected, key
        key_ids.add(got["Metadata"]["exitplan-key-id"])
        props = source.get_blob_properties()
        # The ciphertext is bytes to every HTTP client; the source's content headers travel in
        # exitplan's metadata, exactly.
        assert got["ContentType"] == "application/octet-stream", key
        assert not {"ContentEncoding", "CacheControl", "ContentDisposition", "ContentLanguage"} & set(got), key
        sc = props.content_settings
        assert content_of(got["Metadata"]) == ContentHeaders(
            content_type=sc.content_type, content_encoding=sc.content_encoding, cache_control=sc.cache_control,
            content_disposition=sc.content_disposition, content_language=sc.content_language), key
        carried = {k: decode_header_value(v) for k, v in got["Metadata"].items() if not k.startswith("exitplan-")}
        assert carried == {k.lower(): v for k, v in props.metadata.items()}, key
        sizes.add(len(body))
    assert len(key_ids) == 1
    # The wrapped keyset travels with the data.
    assert s3.head_object(Bucket=LAB_BUCKET, Key=f"_exitplan/{project_name(tmp_path, 'e2e')}/keyset.json")["ContentLength"] > 0
    mib = 1024 * 1024
    # The seed exercised what it promises: empty objects and part boundaries ± 1.
    assert {0, 5 * mib - 1, 5 * mib, 5 * mib + 1, 8 * mib - 1, 8 * mib, 8 * mib + 1} <= sizes

    # The state store knows every object, its digest, and its destination ETag.
    db = sqlite3.connect(tmp_path / "state" / "state.db")
    rows = db.execute("SELECT source_key, state, sha256, dest_etag FROM objects").fetchall()
    assert len(rows) == len(seeded) and all(r[1] == "uploaded" and r[2] and r[3] for r in rows)
    by_key = {r[0]: r[2] for r in rows}
    for obj in seeded:
        assert by_key[obj.name] == obj.digests().sha256

    # A second run finds nothing to do.
    code, out, err = run(capsys, "migrate", "--config", str(config))
    assert code == 0, err
    copied_rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["claims"], ["stays"], ["imaging"])]
    assert copied_rows and all(r[2] == "0" and r[3] == r[1] for r in copied_rows), out


def test_dry_run_writes_nothing_anywhere(tmp_path, capsys, env, seeded, s3, s3_server):
    prefix = f"dry-{uuid.uuid4().hex[:8]}"
    config = write_config(tmp_path, s3_server, lab_datasets(prefix))
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    code, out, err = run(capsys, "migrate", "--config", str(config), "--dry-run")
    assert code == 0, err
    lines = [line for line in out.splitlines() if line.startswith("would write")]
    assert len(lines) == len(seeded)
    written = {line.split(": ", 1)[1].rsplit("  (", 1)[0] for line in lines}
    assert written == {f"{prefix}/{o.container}/{o.name}" for o in seeded}
    table = out[out.index("\ndataset "):]
    # --summary: the same table, no line per object
    code, summary, err = run(capsys, "migrate", "--config", str(config), "--dry-run", "--summary")
    assert code == 0, err
    assert "would write" not in summary and summary.strip() == table.strip()
    assert run(capsys, "migrate", "--config", str(config), "--summary")[0] == 2  # only with --dry-run
    assert list_keys(s3, prefix) == []
    assert s3.list_multipart_uploads(Bucket=LAB_BUCKET, Prefix=prefix).get("Uploads", []) == []
    # Nothing local either: no state store, no file created or touched (the keyset was only read).
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before
    assert not (tmp_path / "state" / "state.db").exists()


def test_the_dry_run_ends_with_the_estimate_then_rests_it_on_the_measured_throughput(tmp_path, capsys, env, s3,
                                                                                     s3_server, azurite_connection_string):
    """The estimate: the tier mix, the Archive blob to rehydrate first, each figure's assumption; after a
    migration, the duration rests on that run's measured throughput."""
    container = f"est{uuid.uuid4().hex[:8]}"
    cc = BlobServiceClient.from_connection_string(azurite_connection_string).create_container(container)
    cc.upload_blob("a.csv", b"x" * 1000)
    cc.upload_blob("b.bin", b"y" * 3000, standard_blob_tier=StandardBlobTier.COOL)
    cc.upload_blob("old.bin", b"z" * 2000, standard_blob_tier=StandardBlobTier.ARCHIVE)
    config = write_config(tmp_path, s3_server, {"est": {"source": "az", "container": container, "destination": "lab",
                                                        "dest_prefix": f"{container}/"}})
    data = yaml.safe_load(config.read_text())
    data["estimate"] = {"throughput_mb_s": 25, "azure_region": "francecentral"}
    config.write_text(yaml.safe_dump(data))

    code, out, err = run(capsys, "migrate", "--config", str(config), "--dry-run")
    assert code == 0, err
    basis = out[out.index("estimate: what the figures"):out.index("\ndataset ")]
    assert "est: listed 3 objects; by tier: Archive 1 (2.0 KiB), Cool 1 (2.9 KiB), Hot 1 (1000 B)" in basis
    assert "at 25.0 MB/s (estimate.throughput_mb_s; no migrate run measured yet)" in basis
    assert "rehydrate first: 1 Archive-tier objects, 2.0 KiB" in basis and "up to 15 h at standard priority" in basis
    assert "prices of Azure francecentral:" in basis and "as filed, unconfirmed" in basis
    table = out[out.index("\nestimate (EUR"):]
    (row,) = [line.split("  ") for line in table.splitlines() if line.startswith("est ")]
    cells = [c.strip() for c in row if c.strip()]
    assert cells[1] == "2" and cells[4] == "15 h 00 min" and cells[5] == "rehydration", table

    # --summary: the estimate's table, not what it rests on
    code, summary, err = run(capsys, "migrate", "--config", str(config), "--dry-run", "--summary")
    assert code == 0, err
    assert "\nestimate (EUR" in summary and "estimate: what the figures" not in summary

    # After a migration (the Archive blob fails by name), the duration rests on its measured throughput.
    code, out, err = run(capsys, "migrate", "--config", str(config))
    assert code == 1 and "old.bin" in err
    code, out, err = run(capsys, "migrate", "--config", str(config), "--dry-run")
    assert code == 0, err
    assert "MB/s (measured by run #1:" in out
    assert "est: listed 3 objects" in out and "would skip" in out


def test_objects_that_do_not_fit_fail_by_name_and_the_rest_is_copied(tmp_path, capsys, env, s3, s3_server,
                                                                     azurite_connection_string):
    container = f"misfit{uuid.uuid4().hex[:8]}"
    azure = BlobServiceClient.from_connection_string(azurite_connection_string)
    cc = azure.create_container(container)
    long_name = "dossier-" + "é" * 600  # 608 characters: a valid Azure name, 1,208 UTF-8 bytes
    cc.upload_blob(long_name, b"too long for S3")
    cc.upload_blob("ok.csv", b"a,b\n1,2\n", content_settings=ContentSettings(content_type="text/csv"))
    config = write_config(tmp_path, s3_server, {"misfit": {"source": "az", "container": container,
                                                           "destination": "lab", "dest_prefix": f"{container}/"}})
    code, out, err = run(capsys, "migrate", "--config", str(config))
    assert code == 1
    assert long_name in err and "UTF-8 bytes" in err
    assert list_keys(s3, container) == [f"{container}/ok.csv"]
    got = s3.get_object(Bucket=LAB_BUCKET, Key=f"{container}/ok.csv")
    assert tink_decrypt(config, got["Body"].read(), got["Metadata"]) == b"a,b\n1,2\n"


def test_inventory_over_a_few_thousand_blobs(tmp_path, capsys, env, s3_server, azurite_connection_string):
    from concurrent.futures import ThreadPoolExecutor

    container = f"inv{uuid.uuid4().hex[:8]}"
    azure = BlobServiceClient.from_connection_string(azurite_connection_string)
    cc = azure.create_container(container)
    names = [f"2024/{i % 12:02d}/claim {i:05d} é+%#.csv" for i in range(3000)]

    def upload(i_name):
        i, name = i_name
        cc.upload_blob(name, b"x" * (i % 97), validate_content=False)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(upload, enumerate(names)))
    config = write_config(tmp_path, s3_server, {"inv": {"source": "az", "container": container,
                                                        "destination": "lab", "exclude": ["2024/11/*"]}},
                          init_keys=False)
    code, out, err = run(capsys, "inventory", "--config", str(config), "--format", "json")
    assert code == 0, err
    (inv,) = json.loads(out)
    kept = [i for i, n in enumerate(names) if not n.startswith("2024/11/")]
    assert inv["objects"] == len(kept)
    assert inv["bytes"] == sum(i % 97 for i in kept)
    assert inv["largest_size"] == 96
    assert inv["misfit_count"] == 0


def test_missing_bucket_or_container_is_one_sentence_and_exit_2(tmp_path, capsys, env, s3, s3_server):
    datasets = {"claims": {"source": "az", "container": "claims", "destination": "lab", "dest_prefix": "x/"}}
    config = write_config(tmp_path, s3_server, datasets)
    text = config.read_text().replace(f"bucket: {LAB_BUCKET}", "bucket: no-such-bucket")
    config.write_text(text)
    code, out, err = run(capsys, "migrate", "--config", str(config))
    assert code == 2
    assert "no-such-bucket" in err and "does not exist" in err
    assert not list(tmp_path.joinpath("state").glob("state.db"))

    (tmp_path / "c2").mkdir()
    config = write_config(tmp_path / "c2", s3_server, {"claims": dict(datasets["claims"], container="no-such-container")})
    for argv in (("migrate",), ("inventory",)):
        code, out, err = run(capsys, *argv, "--config", str(config))
        assert code == 2, err
        assert "no-such-container" in err and "does not exist" in err


def test_inventory_predicts_what_migrate_refuses(tmp_path, capsys, env, s3, s3_server, azurite_connection_string):
    """A blob with 1,950 bytes of metadata fits S3's 2 KB alone, not beside exitplan's own
    encryption metadata: inventory counts it as not fitting, and migrate refuses that object and
    no other."""
    container = f"fit{uuid.uuid4().hex[:8]}"
    cc = BlobServiceClient.from_connection_string(azurite_connection_string).create_container(container)
    cc.upload_blob("heavy.bin", b"h", metadata={"note": "x" * 1946})
    cc.upload_blob("light.bin", b"l", metadata={"note": "x" * 100})
    config = write_config(tmp_path, s3_server, {"fit": {"source": "az", "container": container,
                                                        "destination": "lab", "dest_prefix": f"{container}/"}})
    capsys.readouterr()  # what keys init printed
    code, out, err = run(capsys, "inventory", "--config", str(config), "--format", "json")
    assert code == 0, err
    (inv,) = json.loads(out)
    assert inv["misfit_count"] == 1 and [m["key"] for m in inv["misfits"]] == ["heavy.bin"]
    code, out, err = run(capsys, "migrate", "--config", str(config))
    assert code == 1
    assert "heavy.bin" in err and "exitplan's own included" in err
    assert list_keys(s3, container) == [f"{container}/light.bin"]


def test_a_gzip_blob_is_carried_as_stored_and_its_headers_in_metadata(tmp_path, capsys, env, s3, s3_server,
                                                                      azurite_connection_string):
    """A blob stored gzip-encoded, with a content type and a non-ASCII content disposition: the
    ciphertext says only that it is bytes (no Content-Encoding a client would act on), decrypts to
    the stored (compressed) bytes, and its metadata gives back every content header exactly."""
    import gzip

    container = f"gz{uuid.uuid4().hex[:8]}"
    cc = BlobServiceClient.from_connection_string(azurite_connection_string).create_container(container)
    stored = gzip.compress(b"patient,visit\n" * 5000)
    headers = ContentSettings(content_type="text/csv", content_encoding="gzip", content_language="fr",
                              content_disposition='attachment; filename="séjours.csv"', cache_control="no-cache")
    cc.upload_blob("visits.csv", stored, content_settings=headers)
    config = write_config(tmp_path, s3_server, {"gz": {"source": "az", "container": container,
                                                       "destination": "lab", "dest_prefix": f"{container}/"}})
    code, out, err = run(capsys, "migrate", "--config", str(config))
    assert code == 0, err
    got = s3.get_object(Bucket=LAB_BUCKET, Key=f"{container}/visits.csv")
    assert got["ContentType"] == "application/octet-stream" and "ContentEncoding" not in got
    assert tink_decrypt(config, got["Body"].read(), got["Metadata"]) == stored
    assert content_of(got["Metadata"]) == ContentHeaders(
        content_type="text/csv", content_encoding="gzip", content_language="fr",
        content_disposition='attachment; filename="séjours.csv"', cache_control="no-cache")
    code, out, err = run(capsys, "verify", "--config", str(config), "--deep")
    assert code == 0, out + err
