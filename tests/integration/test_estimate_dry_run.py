"""`migrate --dry-run` ends with the estimate: the tier mix, what would be rehydrated first, each
figure's assumption; after a migration, the duration rests on that run's measured throughput."""

from __future__ import annotations

import uuid

import yaml
from azure.storage.blob import BlobServiceClient, StandardBlobTier

from tests.integration.test_migrate_e2e import env, run, s3, write_config  # noqa: F401 (fixtures)


def test_the_dry_run_shows_the_estimate_and_then_the_measured_throughput(tmp_path, capsys, env, s3, s3_server,
                                                                         azurite_connection_string):
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
