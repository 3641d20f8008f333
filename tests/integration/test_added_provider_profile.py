"""A provider profile from `EXITPLAN_PROVIDERS_DIR` is named, with its SHA-256, wherever its
provider is shown: the dry run, the run summary, the audit manifest's `run_start` and the report.

On the lab servers: a copy of the lab's profile under another name (`lab-annex`) is the added
profile; the migration itself is the ordinary one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from config.loader import load_config
from engine.audit import manifest_path
from flows.cli import main
from tests.projects import project_name, write_project
from tests.s3client import lab_s3_client

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CS_VAR = "EXITPLAN_TEST_ADDED_PROFILE_CS"


@pytest.fixture
def annex(tmp_path, monkeypatch) -> tuple[Path, str]:
    """The added profile's file and its SHA-256; EXITPLAN_PROVIDERS_DIR points at its directory."""
    extra = tmp_path / "providers"
    extra.mkdir()
    profile = yaml.safe_load((REPO / "config/providers/lab.yaml").read_text(encoding="utf-8"))
    profile.update(name="lab-annex", display_name="lab annex")
    path = extra / "lab-annex.yaml"
    path.write_text(yaml.safe_dump(profile), encoding="utf-8")
    monkeypatch.setenv("EXITPLAN_PROVIDERS_DIR", str(extra))
    return path.resolve(), hashlib.sha256(path.read_bytes()).hexdigest()


def test_an_added_profile_is_named_in_the_dry_run_summary_manifest_and_report(
        tmp_path, capsys, monkeypatch, annex, azurite_connection_string, s3_server):
    monkeypatch.setenv(CS_VAR, azurite_connection_string)
    bucket = project_name(tmp_path, "annex")
    lab_s3_client(s3_server.url, bucket)
    config, _, blobs = write_project(tmp_path, azurite_connection_string, s3_server.url, project="annex",
                                     bucket=bucket, cs_var=CS_VAR)
    data = yaml.safe_load(config.read_text(encoding="utf-8"))
    data["destinations"]["lab"]["provider"] = "lab-annex"
    config.write_text(yaml.safe_dump(data), encoding="utf-8")
    path, sha256 = annex
    named = f"provider profile `lab-annex` read from {path} (SHA-256 {sha256}), not from exitplan's own catalog"

    assert main(["migrate", "--dry-run", "--config", str(config)]) == 0
    assert named in capsys.readouterr().out

    assert main(["migrate", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "at lab annex" in out and named in out

    records = [json.loads(line) for line in manifest_path(load_config(config)).read_text().splitlines()]
    [start] = [r for r in records if r["type"] == "run_start"]
    assert start["provider_profiles_added"] == [{"provider": "lab-annex", "file": str(path), "sha256": sha256}]
    transfers = [r for r in records if r["type"] == "transfer"]
    assert len(transfers) == len(blobs) and {t["destination"]["provider"] for t in transfers} == {"lab-annex"}

    report = tmp_path / "report.html"
    assert main(["report", "--config", str(config), "--out", str(report)]) == 0
    html = report.read_text(encoding="utf-8")
    assert sha256 in html and str(path) in html and "the operator's word" in html


def test_without_an_added_profile_the_manifest_says_nothing_of_one(tmp_path, capsys, monkeypatch,
                                                                   azurite_connection_string, s3_server):
    monkeypatch.delenv("EXITPLAN_PROVIDERS_DIR", raising=False)
    monkeypatch.setenv(CS_VAR, azurite_connection_string)
    bucket = project_name(tmp_path, "plain")
    lab_s3_client(s3_server.url, bucket)
    config, _, _ = write_project(tmp_path, azurite_connection_string, s3_server.url, project="plain",
                                 bucket=bucket, cs_var=CS_VAR)
    assert main(["migrate", "--dry-run", "--config", str(config)]) == 0
    assert "provider profile" not in capsys.readouterr().out
    assert main(["migrate", "--config", str(config)]) == 0
    assert "provider profile" not in capsys.readouterr().out
    records = [json.loads(line) for line in manifest_path(load_config(config)).read_text().splitlines()]
    [start] = [r for r in records if r["type"] == "run_start"]
    assert "provider_profiles_added" not in start
