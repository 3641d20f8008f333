"""SFTP sources and destinations in the configuration: the host key always pinned, one login,
the sovereignty gate on the destination's host, lab mode, and keys that cannot be file paths
refused before any byte moves."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest

from config.errors import ConfigFileError, PolicyRefusal
from config.loader import load_config
from connectors.base import ObjectMeta, SinkLimits
from engine.placement import DoesNotFit, place
from tests.unit.test_config import PROD, write

FINGERPRINT = "SHA256:" + "A" * 43
PARTNER = {"kind": "sftp", "host": "sftp.partner.example", "username": "exit", "root": "/out",
           "host_key_fingerprints": [FINGERPRINT], "private_key_env": "PARTNER_KEY"}
ESCROW = {"kind": "sftp", "provider": "hetzner", "region": "fsn1", "host": "u12345.your-storagebox.de", "port": 23,
          "username": "u12345", "root": "/home/escrow", "known_hosts": "known_hosts", "private_key_env": "ESCROW_KEY"}


def config(**sections):
    data = copy.deepcopy(PROD)
    data.update(sections)
    return data


def test_an_sftp_source_and_destination_load(tmp_path):
    data = config(sources={"partner": PARTNER}, destinations={"escrow": ESCROW},
                  datasets={"in": {"source": "partner", "container": "deliveries", "destination": "escrow"}})
    loaded = load_config(write(tmp_path, data))
    assert loaded.config.sources["partner"].kind == "sftp"
    assert loaded.config.destinations["escrow"].bucket == "/home/escrow"
    assert not loaded.lab_mode and "sftp.partner.example" in loaded.not_lab_reason


def test_configs_without_kind_still_mean_azure_and_s3(tmp_path):
    data = copy.deepcopy(PROD)
    data["sources"]["az"].pop("kind")
    loaded = load_config(write(tmp_path, data))
    assert loaded.config.sources["az"].kind == "azure_blob" and loaded.config.destinations["ovh"].kind == "s3"


@pytest.mark.parametrize("change,message", [
    ({"host_key_fingerprints": None}, "host key must be pinned"),
    ({"host_key_fingerprints": ["MD5:aa:bb"]}, "host_key_fingerprints"),
    ({"private_key_env": None}, "exactly one of `private_key_env`"),
    ({"private_key_file": "id_ed25519"}, "exactly one of `private_key_env`"),
    ({"password_env": "PW"}, "only with `auth: password`"),
    ({"auth": "password"}, "needs `password_env` or `password_block`"),
    ({"auth": "password", "password_env": "PW"}, "remove the private key settings"),
    ({"root": "relative/dir"}, "absolute path"),
    ({"certificate_file": "id-cert.pub", "certificate_env": "CERT"}, "one certificate per login"),
    ({"auth": "password", "password_env": "PW", "private_key_env": None, "certificate_env": "CERT"},
     "remove the private key settings"),
    ({"private_key_env": None, "private_key_block": "secret/k", "passphrase_env": "P", "passphrase_block": "secret/p"},
     "both set"),
])
def test_sftp_source_mistakes_are_one_sentence(tmp_path, change, message):
    source = {k: v for k, v in {**PARTNER, **change}.items() if v is not None}
    data = config(sources={"partner": source}, datasets={"in": {"source": "partner", "container": "d",
                                                                "destination": "ovh"}})
    with pytest.raises(ConfigFileError) as info:
        load_config(write(tmp_path, data))
    assert message in str(info.value)
    assert "sources.partner" in str(info.value) and ".sftp" not in str(info.value)


def test_a_password_login_is_accepted_only_when_asked(tmp_path):
    source = {k: v for k, v in PARTNER.items() if k != "private_key_env"}
    data = config(sources={"partner": {**source, "auth": "password", "password_env": "PARTNER_PASSWORD"}},
                  datasets={"in": {"source": "partner", "container": "d", "destination": "ovh"}})
    assert load_config(write(tmp_path, data)).config.sources["partner"].auth == "password"


@pytest.mark.parametrize("field", ["password", "private_key", "passphrase"])
def test_secrets_are_never_read_from_the_file(tmp_path, field):
    data = config(sources={"partner": {**PARTNER, field: "literal"}},
                  datasets={"in": {"source": "partner", "container": "d", "destination": "ovh"}})
    with pytest.raises(ConfigFileError) as info:
        load_config(write(tmp_path, data))
    assert f"{field}_env" in str(info.value)


@pytest.mark.parametrize("change,why", [
    ({"host": "sftp.example.com"}, "is not a known Hetzner SFTP host"),
    ({"host": "a.b.your-storagebox.de"}, "is not a known Hetzner SFTP host"),
    ({"region": "gra"}, "no SFTP region `gra`"),
    ({"provider": "ovhcloud", "region": "gra"}, "no SFTP region `gra`"),
    ({"provider": "lab", "region": "lab", "host": "127.0.0.1"}, "usable only when every endpoint is on loopback"),
    ({"provider": "nowhere"}, "not in the provider catalog"),
])
def test_the_gate_refuses_an_sftp_destination_off_the_catalog(tmp_path, change, why):
    data = config(destinations={"escrow": {**ESCROW, **change}},
                  datasets={"claims": {"source": "az", "container": "c", "destination": "escrow"}})
    with pytest.raises(PolicyRefusal) as info:
        load_config(write(tmp_path, data))
    assert "destination `escrow`" in str(info.value) and why in str(info.value)


def test_an_sftp_destination_under_another_jurisdiction_is_refused(tmp_path):
    data = config(destinations={"escrow": ESCROW}, policy={"allowed_jurisdictions": ["CH"]},
                  datasets={"claims": {"source": "az", "container": "c", "destination": "escrow"}})
    with pytest.raises(PolicyRefusal) as info:
        load_config(write(tmp_path, data))
    assert "jurisdiction EU" in str(info.value)


@pytest.mark.parametrize("key", ["a/../b", "a//b", "./a", "tab\tname", "dir/", ".exitplan-sftp/x"])
def test_keys_that_cannot_be_file_paths_do_not_fit_an_sftp_destination(key):
    meta = ObjectMeta(key=key, size=1, etag="e")
    with pytest.raises(DoesNotFit) as info:
        place(meta, "", "", SinkLimits(keys_are_paths=True))
    assert repr(key) in str(info.value)
    assert place(meta, "", "", SinkLimits()).dest_key == key  # an S3 key may be anything


def test_an_s3_source_is_a_bucket_read_over_https_outside_the_lab(tmp_path):
    bucket = {"kind": "s3", "endpoint_url": "https://s3.gra.io.cloud.ovh.net", "region": "gra"}
    data = config(sources={"old": bucket}, datasets={"c": {"source": "old", "container": "archive",
                                                          "destination": "ovh"}})
    loaded = load_config(write(tmp_path, data))
    assert loaded.config.sources["old"].kind == "s3" and not loaded.lab_mode
    for change, why in (({"endpoint_url": "http://s3.gra.io.cloud.ovh.net"}, "plain HTTP"),
                        ({"verify_tls": False}, "TLS verification")):
        data = config(sources={"old": {**bucket, **change}},
                      datasets={"c": {"source": "old", "container": "archive", "destination": "ovh"}})
        with pytest.raises(PolicyRefusal) as info:
            load_config(write(tmp_path, data))
        assert "source `old`" in str(info.value) and why in str(info.value)


def test_the_connector_imports_paramiko_without_invoke():
    # invoke (paramiko's, for ssh_config's `Match exec`) is 45 ms of an SFTP run's start-up.
    code = ("import sys; import connectors.sftp, paramiko; print('invoke' in sys.modules);"
            "import invoke; print(invoke.__name__)")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "invoke"]
