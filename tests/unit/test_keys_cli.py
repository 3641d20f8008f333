"""`exitplan keys …` with the lab's `local` KEK: exit codes, refusals, and no secret in the output.

The same commands against OpenBao and SoftHSM2 run in tests/integration/test_kek_backends.py.
"""

from __future__ import annotations

import base64
import json
import logging
import os
from pathlib import Path

import pytest
import yaml

from config.errors import ExitCode
from config.loader import load_config
from engine import keys
from flows.cli import main

LAB = {
    "version": 1,
    "project": "cli-test",
    "sources": {"azurite": {"kind": "azure_blob", "connection_string_env": "EP_TEST_NO_CONN", "emulator": "azurite"}},
    "destinations": {"lab-s3": {"provider": "lab", "endpoint_url": "http://127.0.0.1:5000", "region": "eu-west-3",
                                "bucket": "exitplan-lab"}},
    "datasets": {"claims": {"source": "azurite", "container": "claims", "destination": "lab-s3"}},
    "keys": {"kek": {"backend": "local"}},
}
PROD = {
    "version": 1,
    "project": "hdh-exit",
    "sources": {"az": {"kind": "azure_blob", "account_url": "https://acct.blob.core.windows.net", "credential": "default"}},
    "destinations": {"ovh": {"provider": "ovhcloud", "endpoint_url": "https://s3.gra.io.cloud.ovh.net", "region": "gra",
                             "bucket": "hdh-exit"}},
    "datasets": {"claims": {"source": "az", "container": "claims", "destination": "ovh"}},
}


@pytest.fixture(autouse=True)
def _no_lab_env(monkeypatch):
    monkeypatch.delenv("EP_TEST_NO_CONN", raising=False)
    monkeypatch.delenv("EXITPLAN_STATE_DIR", raising=False)


def write(tmp_path: Path, data: dict, name: str = "exitplan.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


class Cli:
    def __init__(self, capsys):
        self.capsys = capsys
        self.seen: list[str] = []

    def __call__(self, *argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        out = self.capsys.readouterr()
        self.seen.append(out.out + out.err)
        return code, out.out, out.err


@pytest.fixture()
def cli(capsys) -> Cli:
    return Cli(capsys)


def test_lifecycle_exit_codes_and_no_secret(tmp_path, cli, caplog):
    caplog.set_level(logging.DEBUG)
    cfg = write(tmp_path, LAB)
    code, out, err = cli("keys", "init", "--config", cfg)
    assert code == ExitCode.OK and "created the keyset" in out and not err
    kek_file = tmp_path / ".exitplan" / "kek.key"
    assert kek_file.exists() and (kek_file.stat().st_mode & 0o777) == 0o600

    code, out, _ = cli("keys", "show", "--config", cfg)
    assert code == ExitCode.OK and "local key file" in out and "yes" in out

    code, out, _ = cli("keys", "rotate", "--config", cfg)
    assert code == ExitCode.OK and "now primary" in out

    code, out, _ = cli("keys", "show", "--format", "json", "--verify", "--config", cfg)
    report = json.loads(out)
    assert code == ExitCode.OK and report["verified"] and len(report["keys"]) == 2
    assert sum(k["primary"] for k in report["keys"]) == 1

    code, out, _ = cli("keys", "show", "--audit-public-key", "--config", cfg)
    assert code == ExitCode.OK and out.startswith("-----BEGIN PUBLIC KEY-----") and out.rstrip().endswith("-----END PUBLIC KEY-----")

    code, _, err = cli("keys", "init", "--config", cfg)
    assert code == ExitCode.USAGE and "already exists" in err and "never overwritten" in err

    loaded = load_config(cfg)
    dk = keys.load_data_keys(loaded)
    kek = kek_file.read_bytes()
    audit_raw = keys.load_audit_signing_key(loaded).private_bytes_raw()
    secrets = [kek.hex(), base64.b64encode(kek).decode(), audit_raw.hex(), base64.b64encode(audit_raw).decode()]
    for k in dk.keys.values():
        secrets += [k.ikm.hex(), base64.b64encode(k.ikm).decode()]
    text = "\n".join(cli.seen) + "\n".join(r.getMessage() for r in caplog.records)
    assert "cli-test" in text
    for s in secrets:
        assert s not in text
    for f in (tmp_path / ".exitplan").rglob("*"):  # nothing unwrapped on disk either, kept versions included
        if f.is_file() and f.name != "kek.key":
            raw = f.read_bytes()
            assert all(s.encode() not in raw for s in secrets) and all(k.ikm not in raw for k in dk.keys.values())


def test_wrong_kek_is_exit_4_and_changes_nothing(tmp_path, cli):
    cfg = write(tmp_path, LAB)
    assert cli("keys", "init", "--config", cfg)[0] == ExitCode.OK
    keyset = tmp_path / ".exitplan" / "keyset.json"
    before = keyset.read_bytes()
    kek_file = tmp_path / ".exitplan" / "kek.key"
    kek_file.write_bytes(os.urandom(32))
    for argv in (("keys", "show", "--verify"), ("keys", "rotate"), ("keys", "rewrap")):
        code, _, err = cli(*argv, "--config", cfg)
        assert code == ExitCode.KEY_ERROR, argv
        assert "does not open" in err and "Traceback" not in err
    assert keyset.read_bytes() == before


def test_missing_keyset_is_exit_4(tmp_path, cli):
    code, _, err = cli("keys", "rotate", "--config", write(tmp_path, LAB))
    assert code == ExitCode.KEY_ERROR and "exitplan keys init" in err


def test_no_keys_section_is_exit_2(tmp_path, cli):
    # Without `keys`, only public datasets pass the gate; `keys init` then says what is missing.
    data = {k: v for k, v in LAB.items() if k != "keys"}
    data["datasets"] = {n: dict(d, public=True) for n, d in data["datasets"].items()}
    code, _, err = cli("keys", "init", "--config", write(tmp_path, data))
    assert code == ExitCode.USAGE and "`keys`" in err


def test_unencrypted_datasets_are_refused_without_keys(tmp_path, cli):
    data = {k: v for k, v in LAB.items() if k != "keys"}
    code, _, err = cli("keys", "init", "--config", write(tmp_path, data))
    assert code == ExitCode.REFUSED and "written unencrypted" in err and "public: true" in err


def test_usage_errors_are_exit_2(tmp_path, cli):
    assert cli("keys")[0] == ExitCode.USAGE
    assert cli("keys", "show")[0] == ExitCode.USAGE  # --config is required
    bad = dict(LAB, keys={"kek": {"backend": "floppy"}})
    code, _, err = cli("keys", "init", "--config", write(tmp_path, bad))
    assert code == ExitCode.USAGE and "keys.kek" in err


def test_local_kek_refused_outside_the_lab(tmp_path, cli):
    cfg = write(tmp_path, dict(PROD, keys={"kek": {"backend": "local"}}))
    code, _, err = cli("keys", "init", "--config", cfg)
    assert code == ExitCode.REFUSED
    assert "local key file is for the lab only" in err and "source `az` is at acct.blob.core.windows.net" in err
    assert not (tmp_path / ".exitplan").exists()


def test_plain_http_kms_refused_outside_the_lab(tmp_path, cli):
    kek = {"backend": "openbao", "address": "http://bao.example.eu:8200", "key_name": "k"}
    code, _, err = cli("keys", "init", "--config", write(tmp_path, dict(PROD, keys={"kek": kek})))
    assert code == ExitCode.REFUSED and "plain HTTP to a KMS" in err


def test_literal_secret_in_kek_config_is_refused(tmp_path, cli):
    kek = {"backend": "openbao", "address": "https://bao.example.eu:8200", "key_name": "k", "token": "s.abc"}
    code, _, err = cli("keys", "init", "--config", write(tmp_path, dict(PROD, keys={"kek": kek})))
    assert code == ExitCode.USAGE and "token_env" in err and "s.abc" not in err


def test_missing_credential_variable_is_exit_4(tmp_path, cli, monkeypatch):
    monkeypatch.delenv("EP_TEST_TOKEN", raising=False)
    kek = {"backend": "openbao", "address": "http://127.0.0.1:1", "key_name": "k", "token_env": "EP_TEST_TOKEN"}
    code, _, err = cli("keys", "init", "--config", write(tmp_path, dict(LAB, keys={"kek": kek})))
    assert code == ExitCode.KEY_ERROR and "EP_TEST_TOKEN is not set" in err


def test_rotate_kek_needs_a_versioned_backend(tmp_path, cli):
    cfg = write(tmp_path, LAB)
    cli("keys", "init", "--config", cfg)
    code, _, err = cli("keys", "rotate", "--kek", "--config", cfg)
    assert code == ExitCode.USAGE and "exitplan keys rewrap" in err


def test_rewrap_between_local_keys_keeps_data_keys(tmp_path, cli):
    cfg = write(tmp_path, LAB)
    cli("keys", "init", "--config", cfg)
    before = {i: k.ikm for i, k in keys.load_data_keys(load_config(cfg)).keys.items()}
    old = write(tmp_path, LAB, name="old.yaml")
    write(tmp_path, dict(LAB, keys={"kek": {"backend": "local", "path": "new-kek.key"}}))
    code, out, err = cli("keys", "rewrap", "--config", cfg, "--old-config", old)
    assert code == ExitCode.OK, err
    assert "new-kek.key" in out
    after = {i: k.ikm for i, k in keys.load_data_keys(load_config(cfg)).keys.items()}
    assert after == before
