"""The sovereignty gate against inputs built to slip past it: connection strings the gate and the
Azure SDK could read differently, URLs whose host Python and urllib3 read differently, provider
profiles from `EXITPLAN_PROVIDERS_DIR` that relabel a host, and hosts of clouds outside the EU.

Each case is judged on the endpoint the request would really go to; a refusal is one sentence and
the right exit code (2 for a configuration that cannot be read one way, 3 for a policy refusal).
"""

from __future__ import annotations

import copy
import hashlib
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from config.azure_connection import ConnectionStringError, blob_endpoints
from config.errors import ConfigFileError, ExitCode, PolicyRefusal
from config.hosts import NON_EU_CLOUDS, ambiguous_url, non_eu_cloud
from config.lab import AZURITE_KEY
from config.loader import load_config
from config.policy import check_sovereignty
from config.providers import added_profiles, load_catalog
from flows.cli import main

REPO = Path(__file__).resolve().parents[2]
ACCOUNT_KEY = AZURITE_KEY  # a published key: the tests check that no key is ever repeated
CONN_ENV = "EXITPLAN_TEST_GATE_CONNECTION_STRING"

# A lab configuration: Azurite by a connection string, the lab's S3 server, a local KEK.
LAB = {
    "version": 1,
    "project": "gate-test",
    "sources": {"az": {"kind": "azure_blob", "connection_string_env": CONN_ENV}},
    "destinations": {"s3": {"provider": "lab", "endpoint_url": "http://127.0.0.1:5000", "region": "eu-west-3",
                            "bucket": "exitplan-lab"}},
    "datasets": {"claims": {"source": "az", "container": "claims", "destination": "s3"}},
    "keys": {"kek": {"backend": "local"}},
}

# A production configuration: an OVHcloud bucket, keys in OpenBao.
PROD = {
    "version": 1,
    "project": "gate-test",
    "sources": {"az": {"kind": "azure_blob", "connection_string_env": CONN_ENV}},
    "destinations": {"ovh": {"provider": "ovhcloud", "endpoint_url": "https://s3.gra.io.cloud.ovh.net",
                             "region": "gra", "bucket": "hdh-exit"}},
    "datasets": {"claims": {"source": "az", "container": "claims", "destination": "ovh"}},
    "keys": {"kek": {"backend": "openbao", "address": "https://bao.example.eu:8200", "key_name": "exitplan"}},
}

LOCAL = "http://127.0.0.1:10000/devstoreaccount1"
REMOTE = "https://acct.blob.core.windows.net/"


def write(tmp_path: Path, data: dict, name: str = "exitplan.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def one_sentence_without_secret(message: str) -> None:
    assert "\n" not in message.strip()
    assert ACCOUNT_KEY not in message and ACCOUNT_KEY[:12] not in message


# ---------------------------------------------------------------------------------------------
# Connection strings: the endpoint the SDK will use decides lab mode
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("conn, key", [
    # The SDK keeps the last of a repeated key: a real account, in clear, while the first says loopback.
    (f"BlobEndpoint={LOCAL};BLOBENDPOINT={REMOTE.replace('https', 'http')};AccountName=acct;AccountKey={ACCOUNT_KEY}",
     "BlobEndpoint"),
    # Keys are compared by str.upper(): a dotless ı upper-cases to I.
    (f"BlobEndpoint={LOCAL};BlobEndpo\u0131nt={REMOTE};AccountName=acct;AccountKey={ACCOUNT_KEY}", "BlobEndpoint"),
    (f"AccountName=devstoreaccount1;accountname=acct;AccountKey={ACCOUNT_KEY};BlobEndpoint={LOCAL}", "AccountName"),
])
def test_a_repeated_connection_string_key_is_refused_with_exit_2_naming_it(tmp_path, capsys, monkeypatch, conn, key):
    monkeypatch.setenv(CONN_ENV, conn)
    path = write(tmp_path, LAB)
    with pytest.raises(ConfigFileError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(str(path)) and f"sources.az.connection_string_env" in message
    assert f"`{key}` twice" in message and "keep one" in message
    one_sentence_without_secret(message)
    code, err = run_cli(capsys, "migrate", "--dry-run", "--config", str(path))
    assert code == ExitCode.USAGE and f"`{key}` twice" in err
    one_sentence_without_secret(err)


@pytest.mark.parametrize("conn, host", [
    # `True` is not `true` to the SDK: no emulator, the account on Azure.
    (f"UseDevelopmentStorage=True;AccountName=acct;AccountKey={ACCOUNT_KEY}", "acct.blob.core.windows.net"),
    # An empty BlobEndpoint counts as absent to the SDK.
    (f"BlobEndpoint=;AccountName=acct;AccountKey={ACCOUNT_KEY}", "acct.blob.core.windows.net"),
])
def test_lab_mode_follows_the_endpoint_the_sdk_derives(tmp_path, monkeypatch, conn, host):
    monkeypatch.setenv(CONN_ENV, conn)
    with pytest.raises(PolicyRefusal) as info:
        load_config(write(tmp_path, LAB))
    assert "lab's S3 server" in str(info.value) and f"source `az` is at {host}" in str(info.value)
    one_sentence_without_secret(str(info.value))


def test_a_connection_string_to_the_emulator_is_still_lab_mode(monkeypatch, tmp_path):
    for conn in ("UseDevelopmentStorage=true",
                 f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={ACCOUNT_KEY};BlobEndpoint={LOCAL};"):
        monkeypatch.setenv(CONN_ENV, conn)
        assert load_config(write(tmp_path, LAB)).lab_mode


@pytest.mark.parametrize("conn", [
    # Python's urllib reads 127.0.0.1 as the host, urllib3 (the SDK's requests) the account.
    f"AccountName=acct;AccountKey={ACCOUNT_KEY};BlobEndpoint=http://acct.blob.core.windows.net\\@127.0.0.1:10000/acct",
    f"AccountName=acct;AccountKey={ACCOUNT_KEY};BlobEndpoint=http://acct.blob.core.windows.net@127.0.0.1:10000/acct",
    f"AccountName=acct;AccountKey={ACCOUNT_KEY};BlobEndpoint=http://127.0.0.1:10000/acct;"
    "BlobSecondaryEndpoint=acct-secondary.blob.core.windows.net",
])
def test_an_endpoint_read_two_ways_is_refused_with_exit_2(tmp_path, capsys, monkeypatch, conn):
    monkeypatch.setenv(CONN_ENV, conn)
    path = write(tmp_path, LAB)
    with pytest.raises(ConfigFileError) as info:
        load_config(path)
    one_sentence_without_secret(str(info.value))
    code, err = run_cli(capsys, "inventory", "--config", str(path))
    assert code == ExitCode.USAGE


@pytest.mark.parametrize("conn", [
    f"DefaultEndpointsProtocol=http;AccountName=acct;AccountKey={ACCOUNT_KEY};EndpointSuffix=core.windows.net",
    f"AccountName=acct;AccountKey={ACCOUNT_KEY};BlobEndpoint=http://acct.blob.core.windows.net",
])
def test_plain_http_to_an_account_through_a_connection_string_is_refused(tmp_path, capsys, monkeypatch, conn):
    monkeypatch.setenv(CONN_ENV, conn)
    path = write(tmp_path, PROD)
    with pytest.raises(PolicyRefusal) as info:
        load_config(path)
    assert "source `az`" in str(info.value) and "plain HTTP" in str(info.value)
    one_sentence_without_secret(str(info.value))
    code, err = run_cli(capsys, "inventory", "--config", str(path))
    assert code == ExitCode.REFUSED


@pytest.mark.parametrize("field, url", [
    ("sources.az.account_url", "http://acct.blob.core.windows.net\\@127.0.0.1:10000/acct"),
    ("keys.kek.address", "http://bao.example.com\\@127.0.0.1:8200"),
    ("keys.kek.address", "http://bao.example.com@127.0.0.1:8200"),
])
def test_a_url_whose_host_reads_two_ways_is_refused_in_the_config(tmp_path, field, url):
    data = copy.deepcopy(LAB)
    if field.startswith("sources"):
        data["sources"]["az"] = {"kind": "azure_blob", "account_url": url, "sas_token_env": "EXITPLAN_TEST_SAS"}
    else:
        data["keys"]["kek"] = {"backend": "openbao", "address": url, "key_name": "k"}
    with pytest.raises(ConfigFileError, match=field.replace(".", r"\.")):
        load_config(write(tmp_path, data))


@pytest.mark.parametrize("url, problem", [
    ("http://a.example\\@127.0.0.1/", "backslash"),
    ("http://a.example@127.0.0.1/", "plain host"),
    ("http://a.example%40127.0.0.1/", "plain host"),
    ("http://127.0.0.1\t/", "control"),
    ("https://s3.gra.io.cloud.ovh.net", None),
    ("http://[::1]:10000/devstoreaccount1", None),
])
def test_ambiguous_urls(url, problem):
    why = ambiguous_url(url)
    assert (why is None) if problem is None else (problem in why)


def test_malformed_connection_strings_name_the_part_never_a_value():
    with pytest.raises(ConnectionStringError, match="part 2") as info:
        blob_endpoints(f"AccountName=acct;{ACCOUNT_KEY.rstrip('=')}")  # a key pasted without its name
    one_sentence_without_secret(str(info.value))
    with pytest.raises(ConnectionStringError, match="only|without `BlobEndpoint`"):
        blob_endpoints("AccountName=acct;BlobSecondaryEndpoint=https://acct-secondary.blob.core.windows.net")


# ---------------------------------------------------------------------------------------------
# Provider profiles from EXITPLAN_PROVIDERS_DIR
# ---------------------------------------------------------------------------------------------


def providers_dir(tmp_path: Path, monkeypatch, **profiles: dict) -> Path:
    extra = tmp_path / "providers"
    extra.mkdir(exist_ok=True)
    for name, profile in profiles.items():
        (extra / f"{name}.yaml").write_text(yaml.safe_dump(profile), encoding="utf-8")
    monkeypatch.setenv("EXITPLAN_PROVIDERS_DIR", str(extra))
    return extra


def shipped(name: str) -> dict:
    return yaml.safe_load((REPO / f"config/providers/{name}.yaml").read_text(encoding="utf-8"))


def aws_dest(provider: str, region: str = "gra", host: str = "s3.eu-west-3.amazonaws.com") -> dict:
    data = copy.deepcopy(PROD)
    data["sources"]["az"] = {"kind": "azure_blob", "account_url": "https://acct.blob.core.windows.net",
                             "credential": "default"}
    data["destinations"]["ovh"].update(provider=provider, region=region, endpoint_url=f"https://{host}")
    return data


def test_a_profile_may_not_replace_a_shipped_one(tmp_path, capsys, monkeypatch):
    """A replacement `ovhcloud.yaml` pointing `gra` at an AWS host: refused before it is used."""
    relabelled = shipped("ovhcloud")
    relabelled["regions"]["gra"]["hosts"] = ["s3.eu-west-3.amazonaws.com"]
    providers_dir(tmp_path, monkeypatch, ovhcloud=relabelled)
    path = write(tmp_path, aws_dest("ovhcloud"))
    with pytest.raises(PolicyRefusal) as info:
        load_config(path)
    assert "ovhcloud.yaml" in str(info.value) and "would replace exitplan's own provider profile `ovhcloud`" in str(info.value)
    code, err = run_cli(capsys, "migrate", "--dry-run", "--config", str(path))
    assert code == ExitCode.REFUSED and "would replace" in err


def test_a_profile_replacing_a_shipped_one_is_refused_even_unused(tmp_path, monkeypatch):
    # The lab's profile replaced, the configuration names only OVHcloud: the catalog is refused whole.
    providers_dir(tmp_path, monkeypatch, lab=dict(shipped("lab")))
    with pytest.raises(PolicyRefusal, match="`lab`"):
        load_catalog()


@pytest.mark.parametrize("host", ["s3.eu-west-3.amazonaws.com", "bucket.s3.amazonaws.com.", "storage.googleapis.com",
                                  "acct.blob.core.windows.net", "objectstorage.eu-frankfurt-1.oraclecloud.com",
                                  "s3.eu-de.cloud-object-storage.appdomain.cloud", "oss-eu-central-1.aliyuncs.com",
                                  "fra1.digitaloceanspaces.com", "acct.r2.cloudflarestorage.com"])
def test_a_new_provider_claiming_eu_for_a_non_eu_cloud_host_is_refused(tmp_path, capsys, monkeypatch, host):
    claims_eu = dict(shipped("ionos"), name="eu-storage", display_name="EU Storage",
                     regions={"gra": {"location": "Gravelines, France", "hosts": [host.rstrip(".")]}})
    providers_dir(tmp_path, monkeypatch, **{"eu-storage": claims_eu})
    path = write(tmp_path, aws_dest("eu-storage", host=host))
    with pytest.raises(PolicyRefusal) as info:
        load_config(path)
    message = str(info.value)
    assert "destination `ovh`" in message and f"`{host}`" in message and "a cloud outside the EU" in message
    assert non_eu_cloud(host) in message
    code, err = run_cli(capsys, "inventory", "--config", str(path))
    assert code == ExitCode.REFUSED


def test_a_kms_on_a_non_eu_cloud_is_refused(tmp_path):
    data = copy.deepcopy(PROD)
    data["sources"]["az"] = {"kind": "azure_blob", "account_url": "https://acct.blob.core.windows.net",
                             "credential": "default"}
    data["keys"]["kek"]["address"] = "https://ec2-3-120-0-1.eu-central-1.compute.amazonaws.com:8200"
    with pytest.raises(PolicyRefusal, match="keys.kek.address.*Amazon Web Services"):
        load_config(write(tmp_path, data))


def test_no_shipped_host_is_on_the_non_eu_list():
    for profile in load_catalog().values():
        for region in (*profile.regions.values(), *profile.kms_regions.values()):
            assert not [h for h in region.hosts if non_eu_cloud(h)], profile.name
    assert non_eu_cloud("amazonaws.com.evil.example") is None and non_eu_cloud("notamazonaws.com") is None
    assert all(d == d.lower() and not d.startswith(".") for ds in NON_EU_CLOUDS.values() for d in ds)


def test_an_added_profile_is_named_with_its_hash_in_the_verdict(tmp_path, monkeypatch):
    cleura = dict(shipped("ionos"), name="cleura", display_name="Cleura", legal_seat="Karlskrona, Sweden",
                  country="SE", regions={"sto2": {"location": "Stockholm", "hosts": ["s3-sto2.citycloud.com"]}})
    extra = providers_dir(tmp_path, monkeypatch, cleura=cleura)
    loaded = load_config(write(tmp_path, aws_dest("cleura", region="sto2", host="s3-sto2.citycloud.com")))
    [verdict] = check_sovereignty(loaded)
    digest = hashlib.sha256((extra / "cleura.yaml").read_bytes()).hexdigest()
    assert verdict.catalog_file is not None and verdict.catalog_file.sha256 == digest
    assert str((extra / "cleura.yaml").resolve()) in verdict.catalog_file.sentence()
    assert digest in verdict.catalog_file.sentence()
    assert [f.provider for f in added_profiles()] == ["cleura"]
    monkeypatch.delenv("EXITPLAN_PROVIDERS_DIR")
    assert added_profiles() == ()


# ---------------------------------------------------------------------------------------------
# End to end: the installed command, as an operator runs it
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["migrate", "--dry-run"], ["migrate"]])
def test_the_exitplan_command_refuses_a_relabelled_aws_host_with_exit_3(tmp_path, monkeypatch, command):
    claims_eu = dict(shipped("ovhcloud"), name="ovhcloud-gra2", display_name="OVHcloud",
                     regions={"gra": {"location": "Gravelines, France", "hosts": ["s3.eu-west-3.amazonaws.com"]}})
    extra = providers_dir(tmp_path, monkeypatch, **{"ovhcloud-gra2": claims_eu})
    data = aws_dest("ovhcloud-gra2")
    data["state"] = {"path": str(tmp_path / "state")}
    path = write(tmp_path, data)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "AZURE_"))}
    env.update(EXITPLAN_PROVIDERS_DIR=str(extra), PREFECT_SERVER_EPHEMERAL_ENABLED="false", DO_NOT_TRACK="1")
    done = subprocess.run([str(Path(sys.executable).parent / "exitplan"), *command, "--config", str(path)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == ExitCode.REFUSED, done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    [sentence] = done.stderr.strip().splitlines()
    assert "destination `ovh`" in sentence and "s3.eu-west-3.amazonaws.com" in sentence
    assert "Amazon Web Services" in sentence
    assert not (tmp_path / "state").exists()  # nothing was written: no state, no manifest


def test_a_connection_string_changed_since_the_load_is_judged_again(tmp_path, monkeypatch):
    """The variable (or block) is read again when the source opens: lab mode was decided on the
    string read at load, so a string that now leaves loopback is refused before any request."""
    from engine.endpoints import open_source

    monkeypatch.setenv(CONN_ENV, f"AccountName=devstoreaccount1;AccountKey={ACCOUNT_KEY};BlobEndpoint={LOCAL}")
    loaded = load_config(write(tmp_path, LAB))
    assert loaded.lab_mode
    monkeypatch.setenv(CONN_ENV, f"AccountName=acct;AccountKey={ACCOUNT_KEY};BlobEndpoint={REMOTE}")
    with pytest.raises(PolicyRefusal, match="now names acct.blob.core.windows.net") as info:
        open_source(loaded, "claims")
    one_sentence_without_secret(str(info.value))
    monkeypatch.setenv(CONN_ENV, f"BlobEndpoint={LOCAL};BLOBENDPOINT={REMOTE};AccountName=acct;AccountKey={ACCOUNT_KEY}")
    with pytest.raises(ConfigFileError, match="`BlobEndpoint` twice"):
        open_source(loaded, "claims")


@pytest.mark.parametrize("host, refused", [("52.95.150.10", True), ("[2600:1f18::1]", True), ("10.20.0.5", False)])
def test_a_public_ip_address_as_a_destination_is_refused(tmp_path, monkeypatch, host, refused):
    """An added profile may list an address: a public one names no operator the policy could judge
    (it may be any cloud's); a private one is the operator's own network."""
    onprem = dict(shipped("ionos"), name="onprem", display_name="On premises",
                  regions={"dc1": {"location": "Lyon, France", "hosts": [host.strip("[]")]}})
    providers_dir(tmp_path, monkeypatch, onprem=onprem)
    path = write(tmp_path, aws_dest("onprem", region="dc1", host=host))
    if refused:
        with pytest.raises(PolicyRefusal, match="public IP address"):
            load_config(path)
    else:
        assert load_config(path).config.destinations["ovh"].host == host


@pytest.mark.parametrize("kek, fragment", [
    ({"backend": "openbao", "address": "https://52.95.150.10:8200", "key_name": "k"}, "public IP address"),
    ({"backend": "pkcs11", "module": "/opt/cloudhsm/lib/libcloudhsm_pkcs11.so", "token_label": "t", "key_label": "k"},
     "AWS CloudHSM"),
    ({"backend": "pkcs11", "module": "/usr/local/lib/libkmsp11.so", "token_label": "t", "key_label": "k"},
     "Google Cloud KMS"),
])
def test_keys_held_where_the_gate_cannot_judge_or_outside_the_eu_are_refused(tmp_path, kek, fragment):
    data = aws_dest("ovhcloud", host="s3.gra.io.cloud.ovh.net")
    data["keys"]["kek"] = kek
    with pytest.raises(PolicyRefusal, match=fragment):
        load_config(write(tmp_path, data))


def test_an_hsm_or_kms_on_the_operators_own_network_passes(tmp_path):
    data = aws_dest("ovhcloud", host="s3.gra.io.cloud.ovh.net")
    for kek in ({"backend": "openbao", "address": "https://10.20.0.7:8200", "key_name": "k"},
                {"backend": "pkcs11", "module": "/usr/lib/softhsm/libsofthsm2.so", "token_label": "t", "key_label": "k"}):
        data["keys"]["kek"] = kek
        assert load_config(write(tmp_path, data)).config.keys.kek.backend == kek["backend"]


def test_the_flow_summary_names_an_added_profile():
    """The flows' summary artifact shows the gate's rows; a row from an added profile names it."""
    from flows.artifacts import MigrateOutcome, summary_markdown

    result = SimpleNamespace(run_id=7, summaries=(), all_ok=True, key_holders={}, removed=(), audit=None,
                             state_path="state.db", not_carried={})
    outcome = MigrateOutcome("p", None, ["claims"], result, [], [], [], 1.0)
    named = "provider profile `cleura` read from /etc/exitplan/cleura.yaml (SHA-256 ab12), not from exitplan's own catalog"
    row = {"dataset": "claims", "destination": "ovh", "provider": "Cleura", "operator": "Cleura AB",
           "seat": "Karlskrona", "jurisdiction": "EU", "region": "sto2 (Stockholm)", "bucket": "b", "profile": named}
    assert f"**{named}**" in summary_markdown(outcome, [row], None).splitlines()
    assert "provider profile" not in summary_markdown(outcome, [dict(row, profile="")], None)
