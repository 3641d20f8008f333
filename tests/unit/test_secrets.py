"""Credential references: `*_env` or `*_block` fields, their form, and how `config.secrets` reads them.

The block reader here is a plain dictionary of block documents standing in for the Prefect API
(the reader is exitplan's own seam, `config.secrets.set_block_reader`); the real Prefect reader is
exercised against a real Prefect API in tests/integration/test_credential_blocks.py.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from config import secrets
from config.errors import ConfigFileError, ExitCode
from config.loader import load_config
from config.models import (
    AzureBlobSourceConfig,
    OpenBaoKekConfig,
    Pkcs11KekConfig,
    S3Credentials,
    ScalewayKmsKekConfig,
)
from connectors.kms import kek_reference, open_kek
from engine.endpoints import open_sink, open_source
from flows.cli import main

CONN = "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=a2V5;BlobEndpoint=http://127.0.0.1:10000/devstoreaccount1;"

LAB = {
    "version": 1,
    "project": "secrets",
    "sources": {"az": {"kind": "azure_blob", "connection_string_block": "secret/azure-conn"}},
    "destinations": {"lab": {"provider": "lab", "endpoint_url": "http://127.0.0.1:5000", "region": "eu-west-3",
                             "bucket": "exitplan-lab", "credentials": {"block": "aws-credentials/lab"}}},
    "datasets": {"claims": {"source": "az", "container": "claims", "destination": "lab", "public": True}},
}

PROD = {
    "version": 1,
    "project": "secrets",
    "sources": {"az": {"kind": "azure_blob", "account_url": "https://acct.blob.core.windows.net",
                       "sas_token_block": "secret/azure-sas"}},
    "destinations": {"ovh": {"provider": "ovhcloud", "endpoint_url": "https://s3.gra.io.cloud.ovh.net", "region": "gra",
                             "bucket": "hdh-exit", "credentials": {"block": "aws-credentials/ovh-prod"}}},
    "datasets": {"claims": {"source": "az", "container": "claims", "destination": "ovh"}},
    "keys": {"kek": {"backend": "openbao", "address": "https://bao.example.eu:8200", "key_name": "k",
                     "token_block": "secret/bao-token"}},
}


class Blocks:
    """Block documents by (type slug, name), and the reads made."""

    def __init__(self, **documents):
        self.documents = {tuple(ref.split("/")): data for ref, data in documents.items()}
        self.reads: list[str] = []
        self.fail: Exception | None = None

    def __call__(self, slug: str, name: str):
        self.reads.append(f"{slug}/{name}")
        if self.fail is not None:
            raise self.fail
        try:
            return self.documents[(slug, name)]
        except KeyError:
            raise secrets.BlockNotFound() from None


@pytest.fixture
def blocks():
    store = Blocks()
    previous = secrets.set_block_reader(store)
    yield store
    secrets.set_block_reader(previous)


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "exitplan.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def with_changes(base: dict, *path_and_value) -> dict:
    data = copy.deepcopy(base)
    *parents, last, value = path_and_value
    node = data
    for p in parents:
        node = node[p]
    node[last] = value
    return data


# ---------------------------------------------------------------------------------------------
# The reference's form
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ref", ["secret/ovh-key", "aws-credentials/ovh-prod", "azure-blob-storage-credentials/p1"])
def test_block_references_parse(ref):
    slug, name = secrets.parse_block_ref(ref)
    assert f"{slug}/{name}" == ref


@pytest.mark.parametrize("ref", ["secret", "secret/", "/name", "Secret/x", "secret/My_Key", "secret/a/b", "secret/ x", ""])
def test_malformed_block_references_are_refused(ref):
    with pytest.raises(ValueError, match="not a Prefect block reference"):
        secrets.parse_block_ref(ref)


@pytest.mark.parametrize(
    "field, ref, fragments",
    [
        (("sources", "az", "connection_string_block"), "secret/Bad_Name",
         ["sources.az.connection_string_block", "not a Prefect block reference", "<block-type-slug>/<block-name>"]),
        (("sources", "az", "connection_string_block"), "aws-credentials/x",
         ["sources.az.connection_string_block", "`secret/NAME` or `azure-blob-storage-credentials/NAME`"]),
        (("destinations", "lab", "credentials", "block"), "secret/x",
         ["destinations.lab.credentials.block", "expected `aws-credentials/NAME`", "access_key_id_block"]),
        (("destinations", "lab", "credentials"), {"access_key_id_block": "aws-credentials/x"},
         ["destinations.lab.credentials.access_key_id_block", "expected `secret/NAME`"]),
    ],
)
def test_block_type_must_fit_the_field(tmp_path, field, ref, fragments):
    with pytest.raises(ConfigFileError) as info:
        load_config(write(tmp_path, with_changes(LAB, *field, ref)), check_policy=False)
    message = str(info.value)
    assert all(f in message for f in fragments), message
    assert "\n" not in message


# ---------------------------------------------------------------------------------------------
# Environment variable or block, never both
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "where, fields, named",
    [
        (("sources", "az"), {"connection_string_env": "AZ", "connection_string_block": "secret/azure-conn"},
         ("sources.az", "`connection_string_env` and `connection_string_block` are both set")),
        (("sources", "az"), {"account_url": "https://acct.blob.core.windows.net", "sas_token_env": "SAS",
                             "sas_token_block": "secret/sas"},
         ("sources.az", "`sas_token_env` and `sas_token_block` are both set")),
        (("destinations", "ovh", "credentials"), {"access_key_id_env": "K", "access_key_id_block": "secret/k", "block": None},
         ("destinations.ovh.credentials", "`access_key_id_env` and `access_key_id_block` are both set")),
        (("destinations", "ovh", "credentials"), {"session_token_env": "T", "session_token_block": "secret/t", "block": None},
         ("destinations.ovh.credentials", "`session_token_env` and `session_token_block` are both set")),
        (("destinations", "ovh", "credentials"), {"block": "aws-credentials/ovh", "secret_access_key_env": "S"},
         ("destinations.ovh.credentials", "`block` and `secret_access_key_env` are both set")),
        (("keys", "kek"), {"token_env": "VAULT_TOKEN"},
         ("keys.kek", "`token_env` and `token_block` are both set")),
        (("keys", "kek"), {"backend": "pkcs11", "token_label": "t", "key_label": "k", "pin_env": "PIN",
                           "pin_block": "secret/pin", "address": None, "key_name": None, "token_block": None},
         ("keys.kek", "`pin_env` and `pin_block` are both set")),
        (("keys", "kek"), {"backend": "scaleway-kms", "key_id": "11111111-2222-3333-4444-555555555555",
                           "secret_key_env": "SCW", "secret_key_block": "secret/scw", "address": None,
                           "key_name": None, "token_block": None},
         ("keys.kek", "`secret_key_env` and `secret_key_block` are both set")),
    ],
)
def test_env_and_block_for_the_same_credential_is_a_config_error(tmp_path, capsys, where, fields, named):
    data = copy.deepcopy(PROD)
    node = data
    for p in where:
        node = node[p]
    node.update(fields)
    for k in [k for k, v in node.items() if v is None]:
        del node[k]
    path = write(tmp_path, data)
    with pytest.raises(ConfigFileError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: field `{named[0]}`") and named[1] in message, message
    assert "\n" not in message
    assert main(["keys", "show", "--config", str(path)]) == ExitCode.USAGE
    assert named[1] in capsys.readouterr().err


def test_defaults_are_unchanged_and_references_record_one_source():
    assert S3Credentials().reference("access_key_id") == ("access_key_id_env", {"env": "AWS_ACCESS_KEY_ID"})
    assert S3Credentials().reference("secret_access_key") == ("secret_access_key_env", {"env": "AWS_SECRET_ACCESS_KEY"})
    assert S3Credentials().reference("session_token") is None
    mixed = S3Credentials(secret_access_key_block="secret/s")
    assert mixed.reference("access_key_id") == ("access_key_id_env", {"env": "AWS_ACCESS_KEY_ID"})
    assert mixed.reference("secret_access_key") == ("secret_access_key_block", {"block": "secret/s"})
    whole = S3Credentials(block="aws-credentials/p")
    assert all(whole.reference(i) == ("block", {"block": "aws-credentials/p"})
               for i in ("access_key_id", "secret_access_key", "session_token"))
    # What keyset.meta.json records for an env-configured KEK did not change (and re-validates).
    bao = OpenBaoKekConfig(backend="openbao", address="https://bao.example.eu", key_name="k")
    assert kek_reference(bao) == {"backend": "openbao", "address": "https://bao.example.eu", "mount": "transit",
                                  "key_name": "k", "token_env": "VAULT_TOKEN"}
    assert OpenBaoKekConfig(**kek_reference(bao)) == bao
    by_block = OpenBaoKekConfig(backend="openbao", address="https://bao.example.eu", key_name="k", token_block="secret/t")
    assert "token_env" not in kek_reference(by_block) and OpenBaoKekConfig(**kek_reference(by_block)) == by_block
    assert Pkcs11KekConfig(backend="pkcs11", token_label="t", key_label="k").pin_env == "PKCS11_PIN"
    assert ScalewayKmsKekConfig(backend="scaleway-kms", key_id="11111111-2222-3333-4444-555555555555").secret_key_env == "SCW_SECRET_KEY"


def test_source_needs_exactly_one_credential():
    with pytest.raises(ValueError, match="exactly one of .*connection_string_block"):
        AzureBlobSourceConfig(connection_string_block="secret/a", sas_token_block="secret/b", account_url="https://a.blob.core.windows.net")
    with pytest.raises(ValueError, match="`sas_token_block` needs `account_url`"):
        AzureBlobSourceConfig(sas_token_block="secret/b")
    with pytest.raises(ValueError, match="emulator"):
        AzureBlobSourceConfig(connection_string_block="secret/a", emulator="azurite")


def test_literal_secret_is_still_refused_with_a_pointer(tmp_path):
    data = with_changes(PROD, "destinations", "ovh", "credentials", {"secret_access_key": "abc"})
    with pytest.raises(ConfigFileError) as info:
        load_config(write(tmp_path, data))
    assert "secret_access_key_env" in str(info.value) and "_block" in str(info.value) and "abc" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------

def test_each_block_type_gives_its_field(blocks):
    blocks.documents.update({
        ("secret", "s"): {"value": "from-secret"},
        ("aws-credentials", "a"): {"aws_access_key_id": "AKIA1", "aws_secret_access_key": "s3cr3t", "aws_session_token": None},
        ("azure-blob-storage-credentials", "z"): {"connection_string": CONN, "account_url": None},
    })
    assert secrets.read_secret(None, "f", block="secret/s", item="access_key_id") == "from-secret"
    assert secrets.read_secret(None, "f", block="aws-credentials/a", item="access_key_id") == "AKIA1"
    assert secrets.read_secret(None, "f", block="aws-credentials/a", item="secret_access_key") == "s3cr3t"
    assert secrets.read_secret(None, "f", block="aws-credentials/a", item="session_token", required=False) is None
    assert secrets.read_secret(None, "f", block="azure-blob-storage-credentials/z", item="connection_string") == CONN


def test_unreadable_blocks_are_one_sentence_naming_field_and_block(blocks, tmp_path):
    blocks.documents[("aws-credentials", "half")] = {"aws_access_key_id": "AKIA1", "aws_secret_access_key": ""}
    blocks.documents[("secret", "json")] = {"value": {"user": "u", "password": "hunter2"}}
    cases = [
        (dict(block="secret/nope"), "there is no Prefect block secret/nope"),
        (dict(block="aws-credentials/half", item="secret_access_key"), "has no `aws_secret_access_key` value"),
        (dict(block="secret/json"), "holds a dict in `value`, not a string"),
        (dict(block="azure-blob-storage-credentials/z", item="secret_access_key"), "does not hold a secret access key"),
    ]
    for kwargs, fragment in cases:
        with pytest.raises(ConfigFileError) as info:
            secrets.read_secret(tmp_path / "c.yaml", "destinations.x.credentials.block", **kwargs)
        message = str(info.value)
        assert message.startswith(f"{tmp_path / 'c.yaml'}: field `destinations.x.credentials.block`")
        assert fragment in message and kwargs["block"] in message and "hunter2" not in message
        assert info.value.exit_code == ExitCode.USAGE
    blocks.fail = secrets.BlockUnreachable("the Prefect API at http://127.0.0.1:1/api cannot be reached (ConnectError)")
    with pytest.raises(ConfigFileError, match=r"field `f`: the Prefect block secret/s cannot be read: the Prefect API"):
        secrets.read_secret(None, "f", block="secret/s")
    blocks.fail = RuntimeError("token=hunter2 in some URL")
    with pytest.raises(ConfigFileError) as info:
        secrets.read_secret(None, "f", block="secret/s")
    assert "RuntimeError" in str(info.value) and "hunter2" not in str(info.value)


def test_no_reader_installed_is_a_config_error():
    previous = secrets.set_block_reader(None)
    try:
        with pytest.raises(ConfigFileError, match="field `f`: the Prefect block secret/s cannot be read here"):
            secrets.read_secret(None, "f", block="secret/s")
    finally:
        secrets.set_block_reader(previous)


def test_environment_variables_still_work(monkeypatch):
    monkeypatch.setenv("EP_TEST_SECRET", "v")
    assert secrets.read_secret(None, "f", env="EP_TEST_SECRET") == "v"
    monkeypatch.delenv("EP_TEST_SECRET")
    with pytest.raises(ConfigFileError, match="field `f` names the environment variable EP_TEST_SECRET, which is not set"):
        secrets.read_secret(None, "f", env="EP_TEST_SECRET")
    assert secrets.read_secret(None, "f", env="EP_TEST_SECRET", required=False) is None
    with pytest.raises(ValueError):
        secrets.read_secret(None, "f", env="A", block="secret/a")


# ---------------------------------------------------------------------------------------------
# Where the engine and the KEK factory read them
# ---------------------------------------------------------------------------------------------

def test_lab_mode_reads_the_source_block_at_load_unless_account_url_says_where(tmp_path, blocks):
    blocks.documents[("secret", "azure-conn")] = {"value": CONN}
    loaded = load_config(write(tmp_path, LAB))
    assert loaded.lab_mode and blocks.reads == ["secret/azure-conn"]
    blocks.reads.clear()
    data = with_changes(LAB, "sources", "az", "account_url", "http://127.0.0.1:10000/devstoreaccount1")
    assert load_config(write(tmp_path, data)).lab_mode and blocks.reads == []
    blocks.documents.clear()
    with pytest.raises(ConfigFileError, match=r"field `sources\.az\.connection_string_block`: there is no Prefect block secret/azure-conn"):
        load_config(write(tmp_path, LAB))


def test_endpoints_read_blocks_at_the_last_moment(tmp_path, blocks, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    blocks.documents.update({
        ("secret", "azure-conn"): {"value": CONN},
        ("aws-credentials", "lab"): {"aws_access_key_id": "AKIAFROMBLOCK", "aws_secret_access_key": "s3cr3t",
                                     "aws_session_token": "tok"},
    })
    loaded = load_config(write(tmp_path, LAB))
    blocks.reads.clear()
    sink = open_sink(loaded, "lab")
    assert blocks.reads == ["aws-credentials/lab"] * 3
    kwargs = sink._client_kwargs
    assert (kwargs["aws_access_key_id"], kwargs["aws_secret_access_key"], kwargs["aws_session_token"]) == ("AKIAFROMBLOCK", "s3cr3t", "tok")
    assert "s3cr3t" not in repr(loaded) and "s3cr3t" not in repr(sink)
    source = open_source(loaded, "claims")
    assert source.account == "devstoreaccount1"

    # Separate Secret blocks, session token absent from an aws-credentials block: fine; named alone: required.
    blocks.documents[("secret", "k")] = {"value": "AKIASECRET"}
    blocks.documents[("secret", "s")] = {"value": "s2"}
    creds = {"access_key_id_block": "secret/k", "secret_access_key_block": "secret/s", "session_token_block": "secret/t"}
    loaded = load_config(write(tmp_path, with_changes(LAB, "destinations", "lab", "credentials", creds)))
    with pytest.raises(ConfigFileError, match=r"credentials\.session_token_block`: there is no Prefect block secret/t"):
        open_sink(loaded, "lab")
    del creds["session_token_block"]
    loaded = load_config(write(tmp_path, with_changes(LAB, "destinations", "lab", "credentials", creds)))
    assert open_sink(loaded, "lab")._client_kwargs["aws_access_key_id"] == "AKIASECRET"


def test_lab_destination_without_credentials_keeps_the_lab_default(tmp_path, blocks, monkeypatch):
    from config.lab import LAB_S3_ACCESS_KEY

    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    blocks.documents[("secret", "azure-conn")] = {"value": CONN}
    data = copy.deepcopy(LAB)
    del data["destinations"]["lab"]["credentials"]
    assert open_sink(load_config(write(tmp_path, data)), "lab")._client_kwargs["aws_access_key_id"] == LAB_S3_ACCESS_KEY


def test_kek_credentials_from_blocks(blocks):
    from tests.unit.test_kms_rest_adapters import AD, KEY_ID, SCW_SECRET, FakeKms

    fake = FakeKms()
    try:
        blocks.documents[("secret", "scw")] = {"value": SCW_SECRET}
        kek = open_kek(ScalewayKmsKekConfig(backend="scaleway-kms", key_id=KEY_ID, secret_key_block="secret/scw", api_url=fake.url))
        assert kek.decrypt(kek.encrypt(b"k", AD), AD) == b"k"
        assert fake.requests[-1][1]["X-Auth-Token"] == SCW_SECRET
    finally:
        fake.server.shutdown()
        fake.server.server_close()
    with pytest.raises(ConfigFileError, match=r"field `keys\.kek\.pin_block`: there is no Prefect block secret/pin"):
        open_kek(Pkcs11KekConfig(backend="pkcs11", token_label="t", key_label="k", pin_block="secret/pin"))
