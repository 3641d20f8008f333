"""Config loading and the sovereignty gate: each bad input is one clear sentence and the right code."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from config.errors import ConfigFileError, ExitCode, PolicyRefusal
from config.loader import load_config
from config.providers import load_catalog
from config.sizes import parse_size
from engine.endpoints import sink_limits
from flows.cli import main

REPO = Path(__file__).resolve().parents[2]

PROD = {
    "version": 1,
    "project": "hdh-exit",
    "sources": {"az": {"kind": "azure_blob", "account_url": "https://acct.blob.core.windows.net", "credential": "default"}},
    "destinations": {
        "ovh": {
            "provider": "ovhcloud",
            "endpoint_url": "https://s3.gra.io.cloud.ovh.net",
            "region": "gra",
            "bucket": "hdh-exit",
            "credentials": {"access_key_id_env": "OVH_KEY", "secret_access_key_env": "OVH_SECRET"},
        }
    },
    "datasets": {"claims": {"source": "az", "container": "claims", "destination": "ovh"}},
    "keys": {"kek": {"backend": "openbao", "address": "https://bao.example.eu:8200", "key_name": "exitplan"}},
}


def write(tmp_path: Path, data, name="exitplan.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


def variant(**changes):
    """PROD with dotted-path changes applied; a value of None deletes the field."""
    data = copy.deepcopy(PROD)
    for dotted, value in changes.items():
        node = data
        *parents, last = dotted.split("__")
        for p in parents:
            node = node[p]
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return data


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def test_production_example_loads_and_passes_the_gate():
    loaded = load_config(REPO / "config/examples/ovhcloud.yaml")
    assert not loaded.lab_mode
    assert loaded.config.datasets["claims"].include == ("*.csv", "*.csv.gz")
    assert str(loaded.state_dir) == "/var/lib/exitplan/hdh-exit"


def test_lab_example_is_lab_mode_without_any_environment(monkeypatch):
    for var in ("AZURE_STORAGE_CONNECTION_STRING", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(var, raising=False)
    loaded = load_config(REPO / "config/examples/lab.yaml")
    assert loaded.lab_mode
    assert loaded.config.destinations["lab-s3"].endpoint_url == "http://127.0.0.1:5000"
    assert loaded.state_dir == REPO / "config/examples/.exitplan"


def test_lab_example_follows_lab_env(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("EXITPLAN_LAB_S3_PORT", "5123")
    loaded = load_config(REPO / "config/examples/lab.yaml")
    assert loaded.config.destinations["lab-s3"].endpoint_url == "http://127.0.0.1:5123"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:5999")
    loaded = load_config(REPO / "config/examples/lab.yaml")
    assert loaded.config.destinations["lab-s3"].endpoint_url == "http://127.0.0.1:5999"


@pytest.mark.parametrize(
    "data, fragments",
    [
        ("project: [unclosed", ["not valid YAML", "line 1"]),
        ("- a\n- b\n", ["expected a YAML mapping"]),
        (variant(destinations__ovh__bukket="x"), ["destinations.ovh.bukket", "not a known setting"]),
        (variant(destinations__ovh__bucket=None), ["destinations.ovh.bucket", "required"]),
        (variant(destinations__ovh__secret_access_key="abc"), ["destinations.ovh.secret_access_key", "environment variable", "_env"]),
        (variant(datasets__claims__destination="nowhere"), ["datasets.claims.destination", "destination 'nowhere' is not defined"]),
        (variant(transfer={"memory_budget": "lots"}), ["transfer.memory_budget", "not a size"]),
        (variant(transfer={"part_size": "5000000"}), ["transfer", "whole number of MiB"]),
        (variant(destinations__ovh__endpoint_url="s3.gra.io.cloud.ovh.net"), ["destinations.ovh.endpoint_url", "expected a URL"]),
        (variant(destinations__ovh__endpoint_url="https://s3.gra.io.cloud.ovh.net/bucket"), ["endpoint_url", "no path"]),
        (variant(destinations__ovh__bucket="Bad_Bucket"), ["destinations.ovh.bucket", "expected form"]),
        (variant(sources__az__credential=None), ["sources.az", "exactly one of"]),
        (variant(destinations__ovh__storage_class="DEEP_ARCHIVE"), ["storage_class", "no storage class 'DEEP_ARCHIVE'"]),
        (variant(destinations__ovh__endpoint_url="${EXITPLAN_TEST_UNSET_VAR}"), ["EXITPLAN_TEST_UNSET_VAR is not set"]),
        (variant(datasets__claims__changes="feed", datasets__claims__history="all"),
         ["datasets.claims", "cannot keep each snapshot and earlier version in step"]),
        (variant(datasets__claims__changes="nightly"), ["datasets.claims.changes", "'listing' or 'feed'"]),
    ],
)
def test_config_errors_are_one_sentence_with_exit_code_2(tmp_path, capsys, data, fragments):
    path = write(tmp_path, data)
    with pytest.raises(ConfigFileError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(str(path))
    for fragment in fragments:
        assert fragment in message
    assert "\n" not in message
    code, err = run_cli(capsys, "inventory", "--config", str(path))
    assert code == ExitCode.USAGE
    assert fragments[0] in err


def test_missing_config_file(tmp_path, capsys):
    code, err = run_cli(capsys, "inventory", "--config", str(tmp_path / "nope.yaml"))
    assert code == ExitCode.USAGE
    assert "no such configuration file" in err


@pytest.mark.parametrize(
    "changes, fragments",
    [
        ({"destinations__ovh__provider": "aws"}, ["destination `ovh`", "provider `aws` is not in the provider catalog"]),
        ({"destinations__ovh__endpoint_url": "https://s3.amazonaws.com"}, ["endpoint host `s3.amazonaws.com`", "not a known OVHcloud host", "check `endpoint_url`"]),
        ({"destinations__ovh__region": "us-east-va"}, ["no region `us-east-va`"]),
        ({"destinations__ovh__endpoint_url": "http://s3.gra.io.cloud.ovh.net"}, ["plain HTTP"]),
        ({"destinations__ovh__verify_tls": False}, ["TLS verification"]),
        ({"destinations__ovh__provider": "lab", "destinations__ovh__region": "eu-west-3",
          "destinations__ovh__endpoint_url": "http://127.0.0.1:5000"}, ["lab's S3 server", "source `az` is at acct.blob.core.windows.net"]),
        ({"sources__az__account_url": "http://acct.blob.core.windows.net"}, ["source `az`", "plain HTTP"]),
        ({"policy": {"allowed_jurisdictions": ["CH"]}}, ["jurisdiction EU", "not one of the allowed jurisdictions (CH)"]),
        ({"keys": None}, ["dataset `claims`", "written unencrypted"]),
        ({"keys": {"kek": {"backend": "local"}}}, ["key-encryption key", "lab only"]),
        ({"keys": {"kek": {"backend": "openbao", "address": "http://bao.example.eu:8200", "key_name": "k"}}}, ["plain HTTP to a KMS"]),
        # A provider KMS outside the catalogued (EU) regions: the keys would be held elsewhere.
        ({"keys": {"kek": {"backend": "ovhcloud-kms", "endpoint": "https://ca-east-bhs.okms.ovh.net", "okms_id": "11111111-2222-3333-4444-555555555555", "key_id": "66666666-7777-8888-9999-000000000000"}}},
         ["`keys.kek.endpoint` host `ca-east-bhs.okms.ovh.net`", "not a catalogued OVHcloud KMS host",
          "eu-west-rbx.okms.ovh.net"]),
        ({"keys": {"kek": {"backend": "ovhcloud-kms", "endpoint": "https://kms.example.com", "okms_id": "11111111-2222-3333-4444-555555555555", "key_id": "66666666-7777-8888-9999-000000000000"}}},
         ["host `kms.example.com` is not a catalogued OVHcloud KMS host"]),
        ({"keys": {"kek": {"backend": "scaleway-kms", "api_url": "https://api.example.com",
                           "key_id": "11111111-2222-3333-4444-555555555555"}}},
         ["host `api.example.com` is not a catalogued Scaleway KMS host for region `fr-par`"]),
    ],
)
def test_sovereignty_gate_refuses_with_exit_code_3(tmp_path, capsys, changes, fragments):
    path = write(tmp_path, variant(**changes))
    with pytest.raises(PolicyRefusal) as info:
        load_config(path)
    for fragment in fragments:
        assert fragment in str(info.value)
    code, err = run_cli(capsys, "inventory", "--config", str(path))
    assert code == ExitCode.REFUSED
    assert fragments[0] in err


@pytest.mark.parametrize("kek", [
    {"backend": "ovhcloud-kms", "endpoint": "https://eu-west-rbx.okms.ovh.net", "okms_id": "11111111-2222-3333-4444-555555555555", "key_id": "66666666-7777-8888-9999-000000000000"},
    {"backend": "scaleway-kms", "region": "nl-ams", "key_id": "11111111-2222-3333-4444-555555555555"},
])
def test_a_provider_kms_in_a_catalogued_eu_region_is_accepted(tmp_path, kek):
    assert load_config(write(tmp_path, variant(keys={"kek": kek}))).config.keys.kek.backend == kek["backend"]


def test_a_public_dataset_needs_no_keys(tmp_path):
    data = variant(keys=None)
    data["datasets"]["claims"]["public"] = True
    assert load_config(write(tmp_path, data)).config.keys is None


def test_virtual_hosted_bucket_endpoint_is_accepted(tmp_path):
    path = write(tmp_path, variant(destinations__ovh__endpoint_url="https://hdh-exit.s3.gra.io.cloud.ovh.net"))
    assert load_config(path).config.destinations["ovh"].host == "hdh-exit.s3.gra.io.cloud.ovh.net"


def test_catalog_has_the_expected_providers_and_limits():
    catalog = load_catalog()
    assert {"ovhcloud", "scaleway", "outscale", "ionos", "lab"} <= set(catalog)
    assert sink_limits(catalog["scaleway"]).max_parts == 1000
    assert sink_limits(catalog["ovhcloud"]).max_parts == 10_000
    assert catalog["lab"].lab_only and catalog["lab"].jurisdiction == "lab"
    for profile in catalog.values():
        assert profile.legal_seat and profile.jurisdiction and profile.prices is not None
        assert profile.limits.min_part_size <= profile.limits.max_part_size


@pytest.mark.parametrize("first, second", [("claims/", "claims/2024/"), ("", "x/"), ("data", "data1/"), ("a/", "a/")])
def test_datasets_whose_keys_could_meet_on_one_destination_are_refused(tmp_path, capsys, first, second):
    """Prefix `a/` with key `b/f` and prefix `a/b/` with key `f` are the same object: the later copy
    would replace the earlier one without a word."""
    data = variant(datasets__claims__dest_prefix=first)
    data["datasets"]["stays"] = {"source": "az", "container": "stays", "destination": "ovh", "dest_prefix": second}
    path = write(tmp_path, data)
    code, err = run_cli(capsys, "inventory", "--config", str(path))
    assert code == ExitCode.USAGE
    assert "datasets `claims` and `stays` write to destination `ovh`" in err and "dest_prefix" in err
    data["datasets"]["stays"]["dest_prefix"] = "stays/"
    data["datasets"]["claims"]["dest_prefix"] = "claims/"
    assert load_config(write(tmp_path, data)).config.datasets["stays"].dest_prefix == "stays/"


def test_provider_overrides_change_behaviour_for_one_destination(tmp_path):
    from config.policy import destination_profile

    overrides = {"multipart": {"etag": "opaque"}, "request_rates": {"put": 50}, "limits": {"max_tags": 5}}
    loaded = load_config(write(tmp_path, variant(destinations__ovh__provider_overrides=overrides)))
    profile = destination_profile(loaded, "ovh")
    assert profile.multipart.etag == "opaque" and profile.multipart.list_parts  # merged key by key
    assert profile.request_rates.put == 50 and profile.request_rates.get == 900  # the catalog's get kept
    assert profile.limits.max_tags == 5 and profile.limits.max_parts == 10_000
    assert load_catalog()["ovhcloud"].multipart.etag == "md5"  # the catalog itself unchanged


@pytest.mark.parametrize("overrides", [
    {},
    {"multipart": {"etag": "opaque", "list_parts": False, "abort": False, "list_uploads": False},
     "flexible_checksums": True, "direct_requests": False},
])
def test_the_destination_profile_reaches_its_s3_connector(tmp_path, monkeypatch, overrides):
    """What the destination's S3Store is told: whether ETags are MD5s, which multipart operations
    the provider answers, and whether boto3 may send flexible checksum headers (the client's own
    setting, not only the store's attribute)."""
    from config.policy import destination_profile
    from engine.endpoints import open_sink

    monkeypatch.setenv("OVH_KEY", "k")
    monkeypatch.setenv("OVH_SECRET", "s")
    loaded = load_config(write(tmp_path, variant(destinations__ovh__provider_overrides=overrides or None)))
    mp = destination_profile(loaded, "ovh").multipart
    store = open_sink(loaded, "ovh")
    assert store.etag_is_md5 == (mp.etag == "md5") == (not overrides)
    b = store.behaviour
    assert (b.list_parts, b.abort, b.list_uploads, b.flexible_checksums, b.direct_requests) == (
        (True, True, True, False, True) if not overrides else (False, False, False, True, False))
    assert store._direct_ok() == (not overrides)  # direct_requests: false: every request through the client
    assert store._client.meta.config.request_checksum_calculation == (
        "when_supported" if overrides else "when_required")


@pytest.mark.parametrize("direct", [True, False])
def test_an_azure_source_s_direct_requests_setting_reaches_its_connector(tmp_path, direct):
    from engine.endpoints import open_azure_container

    loaded = load_config(write(tmp_path, variant(sources__az__direct_requests=direct)))
    assert (open_azure_container(loaded, "az", "claims")._direct_requests() is not None) == direct


@pytest.mark.parametrize("overrides, fragments", [
    ({"jurisdiction": "EU"}, ["`destinations.ovh.provider_overrides.jurisdiction` cannot be overridden"]),
    ({"regions": {}}, ["`destinations.ovh.provider_overrides.regions` cannot be overridden"]),
    ({"multipart": {"etag": "sha1"}}, ["`destinations.ovh.provider_overrides.multipart.etag`", "'md5' or 'opaque'"]),
    ({"request_rates": {"put": -1}}, ["`destinations.ovh.provider_overrides.request_rates.put`"]),
])
def test_bad_provider_overrides_are_config_errors(tmp_path, capsys, overrides, fragments):
    path = write(tmp_path, variant(destinations__ovh__provider_overrides=overrides))
    with pytest.raises(ConfigFileError) as info:
        load_config(path)
    for fragment in fragments:
        assert fragment in str(info.value)
    code, err = run_cli(capsys, "inventory", "--config", str(path))
    assert code == ExitCode.USAGE and fragments[0] in err


def test_adding_a_provider_is_a_file_not_code(tmp_path, monkeypatch):
    extra = tmp_path / "providers"
    extra.mkdir()
    profile = yaml.safe_load((REPO / "config/providers/ionos.yaml").read_text())
    profile.update(name="cleura", display_name="Cleura", legal_seat="Karlskrona, Sweden", country="SE",
                   regions={"sto2": {"location": "Stockholm", "hosts": ["s3-sto2.citycloud.com"]}})
    (extra / "cleura.yaml").write_text(yaml.safe_dump(profile))
    offshore = dict(profile, name="offshore", display_name="Offshore", jurisdiction="US",
                    regions={"us-1": {"location": "Virginia", "hosts": ["s3.offshore.example"]}})
    (extra / "offshore.yaml").write_text(yaml.safe_dump(offshore))
    monkeypatch.setenv("EXITPLAN_PROVIDERS_DIR", str(extra))
    ok = write(tmp_path, variant(destinations__ovh__provider="cleura", destinations__ovh__region="sto2",
                                 destinations__ovh__endpoint_url="https://s3-sto2.citycloud.com"), "ok.yaml")
    assert load_config(ok).config.destinations["ovh"].provider == "cleura"
    refused = write(tmp_path, variant(destinations__ovh__provider="offshore", destinations__ovh__region="us-1",
                                      destinations__ovh__endpoint_url="https://s3.offshore.example"), "refused.yaml")
    with pytest.raises(PolicyRefusal, match="jurisdiction US"):
        load_config(refused)


def test_a_broken_provider_profile_names_its_file_and_field(tmp_path, monkeypatch):
    extra = tmp_path / "providers"
    extra.mkdir()
    (extra / "broken.yaml").write_text("name: broken\ndisplay_name: B\nlegal_entity: B\nlegal_seat: X\ncountry: FR\njurisdiction: EU\nregions: {}\n")
    monkeypatch.setenv("EXITPLAN_PROVIDERS_DIR", str(extra))
    with pytest.raises(ConfigFileError, match=r"broken.yaml: field `regions`"):
        load_catalog()


@pytest.mark.parametrize("text, expected", [("16MiB", 16 * 2**20), ("5GiB", 5 * 2**30), ("1.5TB", 1_500_000_000_000), (4096, 4096), ("10 kb", 10_000)])
def test_sizes(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["16 parsecs", "-1", True, "MiB"])
def test_bad_sizes(bad):
    with pytest.raises(ValueError):
        parse_size(bad)
