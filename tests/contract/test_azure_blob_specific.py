"""Azure-only behaviour of `AzureBlobSource`, against Azurite: tiers, credentials, pool, failures.

The shared cases live in test_contract_source.py; these are the ones only Azure has (Archive tier,
SAS and Entra ID constructors), need Azure-side knobs (pool size), or put the fault proxy in front
of Azurite (busy server, cut responses, error codes).
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta, timezone

import pytest
from azure.storage.blob import BlobServiceClient, ContainerSasPermissions, generate_container_sas

from connectors.azure_blob import AzureBlobSource
from connectors.base import AuthError, ConfigError, InvalidRequest, NotFound, SourceChanged, Throttled, TransientError
from flows import lab_processes as lp
from tests.contract.contract_support import unique_name


@pytest.fixture
def container(azurite_connection_string):
    """A fresh container; yields (its name, its azure SDK client)."""
    name = unique_name()
    client = BlobServiceClient.from_connection_string(azurite_connection_string).create_container(name)
    return name, client


def _account_url(azurite) -> str:
    return f"http://{lp.LOOPBACK}:{azurite.port}/{lp.AZURITE_ACCOUNT}"


def test_label_names_account_and_container(azurite_connection_string, container):
    name, _ = container
    source = AzureBlobSource.from_connection_string(azurite_connection_string, name)
    assert source.label == f"azure:{lp.AZURITE_ACCOUNT}/{name}"


def test_tiers_are_reported_and_an_archived_blob_asks_for_rehydration(azurite_connection_string, container):
    name, client = container
    for key, tier in (("hot", "Hot"), ("cool", "Cool"), ("archived", "Archive")):
        client.upload_blob(key, b"data of " + key.encode())
        client.get_blob_client(key).set_standard_blob_tier(tier)
    source = AzureBlobSource.from_connection_string(azurite_connection_string, name)

    assert {m.key: m.tier for m in source.list()} == {"archived": "Archive", "cool": "Cool", "hot": "Hot"}
    assert source.head("archived").tier == "Archive"
    assert source.read_range("cool", 0, 4) == b"data"
    with pytest.raises(InvalidRequest) as info:
        source.read_range("archived", 0, 4, if_match=source.head("archived").etag)
    assert "rehydrate" in str(info.value)
    assert not info.value.retryable


def test_sas_constructor_reads_and_a_sas_without_list_is_refused(azurite, container):
    name, client = container
    client.upload_blob("k", b"secret-free payload")
    expiry = datetime.now(timezone.utc) + timedelta(hours=1)

    def sas(**permissions) -> str:
        return generate_container_sas(lp.AZURITE_ACCOUNT, name, account_key=lp.AZURITE_KEY,
                                      permission=ContainerSasPermissions(**permissions), expiry=expiry)

    reader = AzureBlobSource.from_sas(_account_url(azurite), sas(read=True, list=True), name)
    assert reader.label == f"azure:{lp.AZURITE_ACCOUNT}/{name}"
    assert [m.key for m in reader.list()] == ["k"]
    assert reader.read_range("k", 0, 6, if_match=reader.head("k").etag) == b"secret"

    read_only = AzureBlobSource.from_sas(_account_url(azurite), "?" + sas(read=True), name)
    assert read_only.read_range("k", 0, 6) == b"secret"
    with pytest.raises(AuthError):
        list(read_only.list())

    forged = AzureBlobSource.from_sas(_account_url(azurite), sas(read=True, list=True)[:-6] + "AAAAA%3D", name)
    with pytest.raises(AuthError):
        forged.head("k")


def test_default_credential_constructor(azurite, container):
    """Entra ID needs https (the SDK refuses to send a token over http); nothing is sent while building."""
    name, _ = container

    class NeverAsked:
        """A token credential the test never lets the SDK use (no token requests leave the host)."""

        def get_token(self, *scopes, **kwargs):
            raise AssertionError("no token should be requested")

    account_url = f"https://{lp.LOOPBACK}:{lp.free_port()}/{lp.AZURITE_ACCOUNT}"
    source = AzureBlobSource.from_default_credential(account_url, name, credential=NeverAsked())
    assert source.label == f"azure:{lp.AZURITE_ACCOUNT}/{name}"
    assert AzureBlobSource.from_default_credential(account_url, name).label == source.label
    with pytest.raises(ConfigError) as info:
        AzureBlobSource.from_default_credential(_account_url(azurite), name, credential=NeverAsked())
    assert "HTTPS" in str(info.value)


def test_unreachable_account_is_transient_and_fast():
    conn_str = lp.azurite_connection_string(lp.free_port())
    source = AzureBlobSource.from_connection_string(conn_str, "nothing-here", retry_total=0)
    for call in (lambda: list(source.list()), lambda: source.head("k"), lambda: source.read_range("k", 0, 1)):
        with pytest.raises(TransientError) as info:
            call()
        assert info.value.retryable


def test_missing_container_message_names_it(azurite_connection_string):
    source = AzureBlobSource.from_connection_string(azurite_connection_string, "no-such-container")
    with pytest.raises(NotFound) as info:
        list(source.list())
    assert "'no-such-container'" in str(info.value)


def test_a_bad_connection_string_is_a_config_error_without_the_key():
    with pytest.raises(ConfigError) as info:
        AzureBlobSource.from_connection_string("AccountKey=c2VjcmV0;no-endpoint", "c")
    assert "c2VjcmV0" not in str(info.value)


def test_connection_pool_holds_max_connections_concurrent_readers(azurite_connection_string, container, caplog):
    """With more concurrent readers than requests' default pool (10), connections must be kept."""
    name, client = container
    payload = bytes(range(256)) * 4096  # 1 MiB
    client.upload_blob("big", payload)
    readers = 16
    source = AzureBlobSource.from_connection_string(azurite_connection_string, name, max_connections=readers)
    etag = source.head("big").etag
    barrier = threading.Barrier(readers)
    errors: list[BaseException] = []

    def read(i: int) -> None:
        try:
            barrier.wait(timeout=10)
            for _ in range(3):
                assert source.read_range("big", i * 1000, i * 1000 + 512 * 1024, if_match=etag) == \
                    payload[i * 1000:i * 1000 + 512 * 1024]
        except BaseException as exc:  # collected and re-raised in the main thread
            errors.append(exc)

    with caplog.at_level(logging.WARNING, logger="urllib3.connectionpool"):
        threads = [threading.Thread(target=read, args=(i,)) for i in range(readers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    assert not [r for r in caplog.records if "pool is full" in r.getMessage()]


def test_busy_server_is_retried_then_throttled(azurite_via_proxy, container):
    proxy, conn_str = azurite_via_proxy
    name, client = container
    client.upload_blob("k", b"payload")
    source = AzureBlobSource.from_connection_string(conn_str, name, retry_total=1, retry_initial_backoff=0.05, retry_increment_base=0)

    proxy.fail_next(1, status=503, code="ServerBusy")
    assert source.read_range("k", 0, 7) == b"payload"

    proxy.fail_next(2, status=503, code="ServerBusy")
    with pytest.raises(Throttled):
        source.head("k")
    proxy.fail_next(2, status=429, code="TooManyRequests", method="GET")
    with pytest.raises(Throttled):
        list(source.list())
    proxy.fail_next(2, status=500, code="InternalError")
    with pytest.raises(TransientError):
        source.head("k")


def test_a_response_cut_half_way_is_transient(azurite_via_proxy, container):
    proxy, conn_str = azurite_via_proxy
    name, client = container
    payload = bytes(range(256)) * 1024
    client.upload_blob("k", payload)
    source = AzureBlobSource.from_connection_string(conn_str, name, retry_total=1, retry_initial_backoff=0.05, retry_increment_base=0)
    etag = source.head("k").etag

    # The SDK retries a broken download itself: cut more often than it retries.
    proxy.cut_next_response(method="GET", times=4)
    with pytest.raises(TransientError) as info:
        source.read_range("k", 0, len(payload), if_match=etag)
    assert info.value.retryable
    proxy.clear()
    assert source.read_range("k", 0, len(payload), if_match=etag) == payload


@pytest.mark.parametrize("status,code,error", [
    (403, "AuthorizationFailure", AuthError),
    (412, "ConditionNotMet", SourceChanged),
    (404, "BlobNotFound", NotFound),
    (409, "BlobArchived", InvalidRequest),
])
def test_error_codes_map_to_connector_errors(azurite_via_proxy, container, status, code, error):
    proxy, conn_str = azurite_via_proxy
    name, client = container
    client.upload_blob("k", b"payload")
    source = AzureBlobSource.from_connection_string(conn_str, name, retry_total=0)
    proxy.fail_next(1, status=status, code=code, method="GET")
    with pytest.raises(error):
        source.read_range("k", 0, 3)


def _every_kind_of_entry(client) -> None:
    """Blobs with everything a listing entry carries: content headers, Content-MD5, metadata, tags,
    tiers, kinds, snapshots, names to be encoded in URLs. (A name with a control character, which
    Azure lists percent-encoded, makes Azurite's listing fail with a 500, the SDK's as ours: that
    case is read from a recorded answer in tests/unit/test_direct_requests.py.)"""
    from azure.storage.blob import ContentSettings as AzureContent

    import hashlib

    body = b"listing entry"
    client.upload_blob("a/headers.csv", body, content_settings=AzureContent(
        content_type="text/csv", content_encoding="gzip", content_language="fr-FR", cache_control="no-cache",
        content_disposition='attachment; filename="x.csv"', content_md5=bytearray(hashlib.md5(body).digest())),
        metadata={"Origin": "hdh", "lower": "v a l u e"}, tags={"project": "hdh", "phase": "2"})
    for key in ("a/b/deep.bin", "a/ünïcödé é.dcm", "a/100%.txt", "a/plus+and&amp", "b/other"):
        client.upload_blob(key, body)
    client.get_blob_client("a/b/deep.bin").create_snapshot()
    client.get_blob_client("a/b/deep.bin").create_snapshot(metadata={"snap": "2"})
    client.get_blob_client("b/other").set_standard_blob_tier("Archive")
    client.get_blob_client("a/cool").upload_blob(b"c")
    client.get_blob_client("a/cool").set_standard_blob_tier("Cool")
    client.get_blob_client("a/page").create_page_blob(1024)
    client.get_blob_client("a/append").create_append_blob()


def test_direct_listing_gives_what_the_sdk_listing_gives(azurite_connection_string, container):
    from connectors.base import ListingRange

    name, client = container
    _every_kind_of_entry(client)
    direct = AzureBlobSource.from_connection_string(azurite_connection_string, name, page_size=2)
    through_sdk = AzureBlobSource.from_connection_string(azurite_connection_string, name, page_size=2)
    through_sdk.use_sdk_only()
    assert direct._direct_requests() is not None

    def pages(source, part):
        return [(p.objects, p.marker, p.history) for p in source.list_pages(part)]

    listed = list(direct.list())
    assert listed == list(through_sdk.list())
    assert {m.key for m in listed} >= {"a/ünïcödé é.dcm", "a/page", "b/other"}
    headers = next(m for m in listed if m.key == "a/headers.csv")
    assert headers.metadata == {"Origin": "hdh", "lower": "v a l u e"} and headers.tags == {"project": "hdh", "phase": "2"}
    assert headers.content.content_encoding == "gzip" and headers.content_md5 is not None
    assert list(direct.list("a/")) == list(through_sdk.list("a/"))
    for part in (ListingRange(""), ListingRange("a/"), ListingRange("a/", direct=True)):
        assert pages(direct, part) == pages(through_sdk, part)
    assert direct.list_name("a/b/deep.bin") == through_sdk.list_name("a/b/deep.bin")
    for prefix, limit in (("", 10), ("a/", 20), ("a/", 3), ("a/b/", 5)):
        assert direct.folders(prefix, limit) == through_sdk.folders(prefix, limit)
    assert len(direct.list_name("a/b/deep.bin").history) == 2


def test_direct_listing_of_a_missing_container_names_it(azurite_connection_string):
    source = AzureBlobSource.from_connection_string(azurite_connection_string, "no-such-container-here")
    assert source._direct_requests() is not None
    with pytest.raises(NotFound) as info:
        list(source.list())
    assert "no-such-container-here" in str(info.value)
