"""`exitplan report`: one self-contained HTML file (no script, nothing fetched) with the datasets'
figures, the sovereignty table and the manifest's fingerprint. No server: the report contacts no
endpoint, it reads the state store, the keyset's public part and the manifest."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

import pytest
import yaml

from config.loader import load_config
from engine import state as st
from engine.audit import AuditManifest, file_sha256, line_hash, manifest_path
from engine.keys import load_audit_signing_key
from engine.report import SIZE_LABELS
from flows.cli import main

CONFIG = {
    "version": 1,
    "project": "report-test",
    "sources": {"azurite": {"kind": "azure_blob", "connection_string_env": "EP_TEST_NO_CONN", "emulator": "azurite"}},
    "destinations": {"lab-s3": {"provider": "lab", "endpoint_url": "http://127.0.0.1:5000", "region": "eu-west-3",
                                "bucket": "exitplan-lab"}},
    "datasets": {"claims": {"source": "azurite", "container": "claims", "destination": "lab-s3", "dest_prefix": "claims/"},
                 "open-data": {"source": "azurite", "container": "open", "destination": "lab-s3",
                               "dest_prefix": "open/", "public": True}},
    "keys": {"kek": {"backend": "local"}},
}


@pytest.fixture(autouse=True)
def _no_lab_env(monkeypatch):
    monkeypatch.delenv("EP_TEST_NO_CONN", raising=False)
    monkeypatch.delenv("EXITPLAN_STATE_DIR", raising=False)


@pytest.fixture
def project(tmp_path, capsys) -> Path:
    """A config, its keys, a state with two runs (verified, unverified, failed objects), a manifest."""
    cfg = tmp_path / "exitplan.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG))
    assert main(["keys", "init", "--config", str(cfg)]) == 0
    loaded = load_config(cfg)
    with st.StateStore(loaded.state_dir / "state.db") as store:
        for run_no, (dataset, sizes) in enumerate([("claims", [0, 500, 70_000, 5_000_000]), ("open-data", [1, 2_000])]):
            run = store.start_run("migrate", cfg)
            for i, size in enumerate(sizes):
                oid = store.add_object(run, dataset, f"k{i}", f"etag{i}", size, dest_key=f"{dataset}/k{i}",
                                       state=st.IN_PROGRESS)
                store.transition(oid, st.UPLOADED, sha256=f"{i:064x}", dest_etag=f"d{i}", output_size=size + 56)
                if i == 1:
                    store.transition(oid, st.VERIFIED)
                if i == 2:
                    store.transition(oid, st.FAILED, reason="verify: etag: expected d2, found x")
            store.add_run_totals(run, objects_total=len(sizes), objects_ok=len(sizes), bytes_sent=sum(sizes))
            store.finish_run(run, "ok")
    signing = load_audit_signing_key(loaded)
    with AuditManifest(manifest_path(loaded), loaded.config.project, signing.public_key()) as m:
        m.append({"type": "run_start", "run": 1})
        m.append_signed({"type": "run_end", "run": 1, "status": "ok"}, signing)
    capsys.readouterr()
    return cfg


def report(capsys, cfg: Path, out: Path) -> tuple[int, str, str]:
    code = main(["report", "--config", str(cfg), "--out", str(out)])
    o, e = capsys.readouterr()
    assert "Traceback" not in e
    return code, o, e


def test_the_report_is_self_contained(project, tmp_path, capsys):
    out = tmp_path / "r" / "report.html"
    code, o, e = report(capsys, project, out)
    assert code == 0, e
    page = out.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page.lower() and "@import" not in page and "url(" not in page
    assert page.count("<svg") == 4  # bytes over time, throughput, sizes, verification status


def test_the_report_has_the_figures_the_sovereignty_table_and_the_fingerprint(project, tmp_path, capsys):
    out = tmp_path / "report.html"
    code, o, e = report(capsys, project, out)
    assert code == 0, e
    page = out.read_text(encoding="utf-8")
    loaded = load_config(project)
    # Sovereignty: provider, jurisdiction, region, bucket, and who holds the keys, per dataset.
    section = page.split("Where the data is, and who holds the keys")[1].split("<h2>")[0]
    for header in ("provider", "operated by", "legal seat", "jurisdiction", "region", "bucket or directory",
                   "encryption and keys"):
        assert f"<th>{header}</th>" in section
    assert "exitplan-lab" in section and "eu-west-3" in section
    assert "keyset wrapped by a local key file (lab only)" in section
    assert "not encrypted (dataset marked public)" in section
    # Figures: claims has 4 objects: k1 verified, k2 failed by verify, k0 and k3 not verified.
    row = re.search(r"<tr><td><b>claims</b>.*?</tr>", page).group(0)
    cells = re.findall(r"<td[^>]*>(.*?)</td>", row)
    assert re.sub("<[^>]+>", "", cells[3]) == "4"
    assert [re.sub("<[^>]+>", "", c) for c in cells[6:9]] == ["1", "2", "1"]
    # Whether it is complete: no run recorded going through its source listing, so not known.
    assert re.sub("<[^>]+>", "", cells[10]) == "not known"
    assert "claims: 1 of 4 objects verified; 1 never arrived (1 found wrong); 2 at the destination but " \
           "not verified yet; not known to be complete: no migrate run went through" in page
    assert "0 of 2</b><span>datasets complete" in page
    # The manifest's fingerprint: the file's SHA-256 and the last record hash, and the check.
    path = manifest_path(loaded)
    last = path.read_bytes().split(b"\n")[-2]
    assert file_sha256(path) in page and line_hash(last) in page
    assert "chain intact and 1 run end signed" in page
    assert line_hash(last) in o
    # The size histogram's labels are there.
    assert all(label.replace("<", "&lt;") in page for label in SIZE_LABELS)


def test_the_report_prices_the_newest_listing_next_to_what_was_measured(project, tmp_path, capsys):
    from connectors.base import ObjectMeta

    loaded = load_config(project)
    with st.StateStore(loaded.state_dir / "state.db") as store:
        run = store.start_run("migrate", project)
        store.dataset_started(run, "claims")
        store.record_listing(run, "claims", [(0, ObjectMeta("a", 1000, "e1", tier="Hot")),
                                             (0, ObjectMeta("b", 3000, "e2", tier="Cool")),
                                             (0, ObjectMeta("c", 2000, "e3", tier="Archive"))])
        store.add_run_totals(run, bytes_sent=4000)
        store.finish_run(run, "ok")
    out = tmp_path / "report.html"
    code, o, e = report(capsys, project, out)
    assert code == 0, e
    page = out.read_text(encoding="utf-8")
    section = page.split("<h2>Estimate and measured</h2>")[1].split("<h2>")[0]
    row = re.search(r"<tr><td>claims</td>.*?</tr>", section).group(0)
    cells = [re.sub("<[^>]+>", "", c) for c in re.findall(r"<td[^>]*>(.*?)</td>", row)]
    # Two objects to copy (the Archive one first rehydrated, up to 15 h); 4 objects stored at the
    # destination by the earlier runs (0 + 500 + 5,000,000 bytes, plus 56 each, k2 failed).
    assert cells[1] == "2" and cells[4] == "15 h 00 min" and cells[5] == "rehydration"
    assert cells[9].startswith("1 (2.0 KiB)") and cells[10] == "4.8 MiB"
    assert "claims: run #3" in section and "by tier: Archive 1 (2.0 KiB), Cool 1 (2.9 KiB), Hot 1 (1000 B)" in section
    assert "learn.microsoft.com/en-us/training" in section  # the rehydration time's page, named without a link


def test_a_broken_manifest_is_said_so_in_the_report(project, tmp_path, capsys):
    path = manifest_path(load_config(project))
    path.write_bytes(path.read_bytes().replace(b'"status":"ok"', b'"status":"OK"'))
    out = tmp_path / "report.html"
    assert report(capsys, project, out)[0] == 0
    assert "does NOT check: line 3: the run_end signature does not verify" in out.read_text(encoding="utf-8")


def test_a_report_before_any_run(tmp_path, capsys):
    cfg = tmp_path / "exitplan.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG))
    out = tmp_path / "report.html"
    code, o, e = report(capsys, cfg, out)
    assert code == 0, e
    page = out.read_text(encoding="utf-8")
    assert "No state yet" in page and "no manifest yet" in page and "no data yet" in page
