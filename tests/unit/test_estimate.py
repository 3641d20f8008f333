"""The estimate's arithmetic against figures computed by hand, and its `estimate:` configuration.

Prices below are round test figures (not the catalog's), so every expected value can be checked on
paper; the comments give each sum.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from types import SimpleNamespace

import pytest

from config.errors import ConfigFileError, ExitCode
from config.loader import load_config
from config.price_catalog import AzurePriceCatalog, AzureRegionPrices, DestinationPrices, UNCONFIRMED, load_azure_prices
from config.providers import load_catalog
from engine.dataset_copy import PlannedObject
from engine.estimate import (AzureTerms, DestinationTerms, EstimateTerms, PlanTally, SizedWrite, Throughput, detail_lines,
                             estimate, format_duration, table_rows, throughput_for, tiered_egress_eur)
from tests.unit.test_config import run_cli, variant, write

GB = 10**9

REGION = AzureRegionPrices(
    location="test",
    egress_gb=({"up_to_gb": 100, "eur_per_gb": 0.0}, {"up_to_gb": 10240, "eur_per_gb": 0.08},
               {"up_to_gb": None, "eur_per_gb": 0.05}),
    read_per_10000={"Hot": 1.0, "Cool": 2.0, "Cold": 3.0, "Archive": 50.0},
    list_per_10000=0.5,
    retrieval_gb={"Hot": 0.0, "Cool": 0.01, "Cold": 0.03, "Archive": 0.0},
    storage_gb_month={"Hot": 0.02, "Cool": 0.01, "Cold": 0.004, "Archive": 0.002},
    rehydrate_gb={"standard": 0.02, "high": 0.1},
    rehydrate_per_10000={"standard": 100.0, "high": 1000.0},
    requests_per_second=20_000,
)
CATALOG = AzurePriceCatalog(rehydration_hours={"standard": 15, "high": 1},
                            early_deletion_days={"Cool": 30, "Cold": 90, "Archive": 180}, regions={"test": REGION})
DEST_PRICES = DestinationPrices(storage_gb_month={"STANDARD": 0.01}, put_per_1000=0.005, egress_gb=0.01)


def write_obj(key, size, output, parts, tier="Hot", kind="block"):
    return PlannedObject(key, f"d/{key}", size, output, parts, parts == 1, "write", tier=tier, kind=kind)


def claims_tally() -> PlanTally:
    """Seven objects: four to write (three Hot, one Cool), one unchanged, one in Archive, one refused."""
    t = PlanTally("claims", rehydrated=lambda size: SizedWrite(size, 80, False))
    for planned in (
        write_obj("h1", GB, GB + 1000, 1),  # a single PUT
        write_obj("h2", GB, GB + 1000, 10),
        write_obj("h3", GB, GB + 1000, 20, tier=None),  # a block blob stating no tier: Hot, as `inventory` counts it
        write_obj("c1", 2 * GB, 2 * GB + 2000, 40, tier="Cool"),
        PlannedObject("u1", "d/u1", 5 * GB, 5 * GB, 0, False, "skip", "unchanged since run 1", tier="Hot", kind="block"),
        PlannedObject("a1", None, 4 * GB, 0, 0, False, "refuse", "it is in the Archive tier", tier="Archive", kind="block"),
        PlannedObject("x1", None, 1, 0, 0, False, "refuse", "does not fit", tier=None, kind="page"),
    ):
        t.add(planned)
    return t


def imaging_tally() -> PlanTally:
    t = PlanTally("imaging")
    t.add(write_obj("scan", 200 * GB, 200 * GB + 200_000, 100))
    return t


def terms(**changes) -> EstimateTerms:
    dest = DestinationTerms("ovh", "ovhcloud", "STANDARD", DEST_PRICES, 300.0, "ovhcloud's published PUT rate per bucket")
    base = dict(throughput=Throughput(100e6, "estimate.throughput_mb_s"),
                azure=AzureTerms("test", REGION, CATALOG, "standard"),
                destinations={"claims": dest, "imaging": dest}, azure_sources=frozenset({"claims", "imaging"}))
    return EstimateTerms(**{**base, **changes})


def test_the_tally_counts_by_tier_kind_and_action():
    t = claims_tally()
    assert (t.listed.objects, t.listed.bytes) == (7, 14 * GB + 1)
    assert {k: (f.objects, f.bytes) for k, f in t.by_tier.items()} == {
        "Hot": (4, 8 * GB), "Cool": (1, 2 * GB), "Archive": (1, 4 * GB), "none": (1, 1)}
    assert {k: f.objects for k, f in t.by_kind.items()} == {"block": 6, "page": 1}
    # 1 + 10 + 20 + 40 parts; three multipart uploads add a create and a complete each: 71 + 6.
    assert (t.to_copy.objects, t.to_copy.bytes, t.copy_output, t.copy_parts, t.write_requests) == (
        4, 5 * GB, 5 * GB + 5000, 71, 77)
    assert t.reads == {"Hot": 31, "Cool": 40} and t.read_bytes == {"Hot": 3 * GB, "Cool": 2 * GB}
    assert (t.archived.objects, t.archived.bytes, t.archived_output, t.archived_write_requests) == (1, 4 * GB, 4 * GB, 82)
    assert (t.unchanged.objects, t.unchanged_output, t.refused, t.list_calls) == (1, 5 * GB, 1, 1)


def test_egress_bands_are_applied_in_turn():
    assert tiered_egress_eur(50, REGION) == 0.0  # within the free 100 GB
    assert tiered_egress_eur(209, REGION) == pytest.approx(109 * 0.08)  # 8.72
    # (10,240 - 100) x 0.08 + (20,000 - 10,240) x 0.05 = 811.2 + 488
    assert tiered_egress_eur(20_000, REGION) == pytest.approx(1299.2)


def test_the_estimate_matches_the_hand_computed_figures():
    est = estimate([claims_tally(), imaging_tally()], terms())
    claims, imaging = est.datasets
    limits = {lim.what: lim.seconds for lim in claims.limits}
    assert limits["bytes"] == pytest.approx((5 * GB + 5000) / 100e6)  # 50.00005 s
    assert limits["destination requests"] == pytest.approx(77 / 300)
    assert limits["Azure requests"] == pytest.approx((71 + 1) / 20_000)  # reads and one List Blobs call
    assert limits["rehydration"] == pytest.approx(15 * 3600 + 4 * GB / 100e6)  # 54,040 s: 15 h, then 40 s
    assert claims.seconds == pytest.approx(54_040) and claims.bound_by == "rehydration"
    assert imaging.seconds == pytest.approx((200 * GB + 200_000) / 100e6)  # 2,000.002 s
    assert est.seconds == pytest.approx(54_040 + 2_000.002)

    # Egress: 9 GB (written now and Archive) + 200 GB = 209 GB -> 109 GB x 0.08 = 8.72, shared by bytes.
    assert claims.once_eur("Azure egress") == pytest.approx(8.72 * 9 / 209)
    assert imaging.once_eur("Azure egress") == pytest.approx(8.72 * 200 / 209)
    # Reads: 31 Hot x 1.0 + 40 Cool x 2.0 + 80 parts of the rehydrated object at Hot's 1.0, per 10,000.
    assert claims.once_eur("Azure reads") == pytest.approx((31 + 80 + 80) / 10_000)
    assert claims.once_eur("Azure retrieval") == pytest.approx(2 * 0.01)  # the Cool object's 2 GB
    assert claims.once_eur("Azure listing") == pytest.approx(0.5 / 10_000)
    # Rehydration: 4 GB x 0.02 + 1 blob x 100 / 10,000; early deletion at most 4 GB x 0.002 x 180 / 30.
    assert claims.once_eur("Azure rehydration") == pytest.approx(0.09)
    assert claims.rehydration.early_deletion_max_eur == pytest.approx(0.048)
    assert claims.rehydration.hours == 15
    # Destination: (77 + 82) write requests x 0.005 / 1,000; stored 5 GB + 5,000 + 5 GB + 4 GB at 0.01.
    assert claims.once_eur("destination requests") == pytest.approx(159 * 0.005 / 1000)
    assert claims.monthly_eur() == pytest.approx((14 * GB + 5000) / GB * 0.01)
    assert imaging.monthly_eur() == pytest.approx((200 * GB + 200_000) / GB * 0.01)
    assert est.monthly_eur() == pytest.approx(0.14000005 + 2.000002)
    assert est.as_dict()["datasets"][0]["rehydration"]["objects"] == 1
    # Both datasets' mix: Hot is claims' 8 GB and imaging's 200 GB; block, every object but the page blob (214 GB).
    assert "total: listed 8 objects; by tier: Archive 1 (3.7 GiB), Cool 1 (1.9 GiB), Hot 5 (193.7 GiB), none 1 (1 B); " \
           "by kind: block 7 (199.3 GiB), page 1 (1 B)" in detail_lines(est)


def test_every_figure_says_what_it_assumes_and_where_its_price_comes_from():
    est = estimate([claims_tally()], terms())
    lines = detail_lines(est)
    assert any("by tier: Archive 1 (3.7 GiB), Cool 1 (1.9 GiB), Hot 4 (7.5 GiB), none 1 (1 B)" in line for line in lines)
    assert any("5.00 GB written at 100.0 MB/s (estimate.throughput_mb_s)" in line for line in lines)
    assert any("77 write requests at 300/s (ovhcloud's published PUT rate per bucket)" in line for line in lines)
    assert any("credit Azure grants on request" in line for line in lines)
    assert any(line.startswith("prices of Azure test:") and UNCONFIRMED in line for line in lines)
    (row,) = table_rows(est)
    assert row[:6] == ["claims", "4", "4.7 GiB", "4.7 GiB", "15 h 00 min", "rehydration"]


def test_a_source_outside_azure_costs_nothing_at_azure_and_an_unpublished_rate_is_no_limit():
    dest = DestinationTerms("box", "hetzner", "STANDARD", DEST_PRICES, None, "")
    est = estimate([imaging_tally()], terms(destinations={"imaging": dest}, azure_sources=frozenset()))
    (imaging,) = est.datasets
    assert [lim.what for lim in imaging.limits] == ["bytes"]
    assert not [c for c in imaging.once if c.what.startswith("Azure")]
    assert any("hetzner publishes no request rate" in a for a in est.assumptions)


def test_a_storage_class_without_a_price_is_named_not_guessed():
    dest = DestinationTerms("ovh", "ovhcloud", "STANDARD_IA", DEST_PRICES, 300.0, "")
    (d,) = estimate([imaging_tally()], terms(destinations={"imaging": dest})).datasets
    (storage,) = d.monthly
    assert storage.eur is None and "estimate.prices.destinations.ovh.storage_gb_month.STANDARD_IA" in storage.sentence


def test_each_storage_class_is_priced_at_its_own_price_and_an_unpriced_one_is_named():
    prices = DestinationPrices(storage_gb_month={"STANDARD": 0.01, "STANDARD_IA": 0.005})
    t = PlanTally("imaging")
    t.add(write_obj("hot", 100 * GB, 100 * GB, 10))
    t.add(PlannedObject("cool", "cool", 50 * GB, 50 * GB, 5, False, "write", tier="Cool", storage_class="STANDARD_IA"))
    dest = DestinationTerms("ovh", "ovhcloud", "STANDARD", prices, 300.0, "")
    (d,) = estimate([t], terms(destinations={"imaging": dest})).datasets
    (storage,) = d.monthly
    assert storage.eur == pytest.approx(100 * 0.01 + 50 * 0.005)
    assert "50.00 GB STANDARD_IA at €0.005" in storage.sentence and "100.00 GB STANDARD at €0.01" in storage.sentence
    only_standard = DestinationTerms("ovh", "ovhcloud", "STANDARD", DEST_PRICES, 300.0, "")
    (d,) = estimate([t], terms(destinations={"imaging": only_standard})).datasets
    assert d.monthly[0].eur is None and "storage_gb_month.STANDARD_IA" in d.monthly[0].sentence


def _run(id_, sent, seconds, *, command="migrate", dry_run=False):
    start = datetime(2026, 12, 1, 8)
    return SimpleNamespace(id=id_, command=command, dry_run=dry_run, started_at=start,
                           finished_at=start + timedelta(seconds=seconds), bytes_sent=sent)


def test_the_throughput_is_the_last_measured_run_then_the_configuration_then_the_default():
    loaded = SimpleNamespace(config=SimpleNamespace(estimate=SimpleNamespace(throughput_mb_s=20.0)))
    runs = [_run(1, 10 * GB, 100), _run(2, 6 * GB, 200), _run(3, 0, 5), _run(4, GB, 1, command="verify")]
    measured = throughput_for(loaded, runs)
    assert measured.bytes_per_second == pytest.approx(30e6) and "run #2" in measured.basis
    assert throughput_for(loaded, []).bytes_per_second == 20e6
    loaded.config.estimate.throughput_mb_s = None
    assert "assumed" in throughput_for(loaded, []).basis


def test_durations_read_as_a_person_would_say_them():
    assert [format_duration(s) for s in (12.4, 250, 3900, 2 * 86400 + 3 * 3600)] == [
        "12 s", "4 min 10 s", "1 h 05 min", "2 d 03 h"]


def test_the_catalogs_load_and_say_which_figures_were_read_on_a_page():
    azure = load_azure_prices()
    assert azure.regions["francecentral"].provenance("egress_gb") == UNCONFIRMED
    assert azure.provenance("rehydration_hours").startswith("https://learn.microsoft.com/")
    assert azure.rehydration_hours == {"standard": 15, "high": 1}
    hetzner = load_catalog()["hetzner"].prices
    assert "docs.hetzner.com" in hetzner.provenance("storage_gb_month") and hetzner.provenance("egress_gb") == UNCONFIRMED


@pytest.mark.parametrize("changes, fragments", [
    ({"estimate": {"throughput_mb_s": 0}}, ["estimate.throughput_mb_s", "greater than 0"]),
    ({"estimate": {"azure_region": "mars"}}, ["estimate.azure_region", "no Azure region 'mars'", "westeurope"]),
    ({"estimate": {"currency": "USD"}}, ["estimate.currency", "'EUR'"]),
    ({"estimate": {"prices": {"azure": {"list_per_10000": -1}}}}, ["estimate.prices.azure.list_per_10000", "greater than or equal to 0"]),
    ({"estimate": {"prices": {"azure": {"egress_gb": [{"up_to_gb": 100, "eur_per_gb": 0.1}]}}}},
     ["estimate.prices.azure", "last `egress_gb` band"]),
    ({"estimate": {"prices": {"destinations": {"nowhere": {"egress_gb": 0.01}}}}},
     ["estimate.prices.destinations.nowhere", "destination 'nowhere' is not defined"]),
    ({"estimate": {"prices": {"destinations": {"ovh": {"storage_gb_mont": 0.01}}}}},
     ["estimate.prices.destinations.ovh.storage_gb_mont", "not a known setting"]),
])
def test_estimate_settings_are_checked_with_a_sentence_and_exit_code_2(tmp_path, capsys, changes, fragments):
    path = write(tmp_path, {**variant(), **changes})
    with pytest.raises(ConfigFileError) as info:
        load_config(path)
    message = str(info.value)
    assert all(f in message for f in fragments), message
    assert "\n" not in message and message.count("field `") == 1, message
    code, err = run_cli(capsys, "inventory", "--config", str(path))
    assert code == ExitCode.USAGE and fragments[0] in err


def test_configured_prices_replace_the_catalogs_one_by_one(tmp_path):
    from engine.estimate import terms_for

    path = write(tmp_path, {**variant(), "estimate": {"azure_region": "francecentral", "throughput_mb_s": 80,
                                                      "prices": {"azure": {"list_per_10000": 0.07},
                                                                 "destinations": {"ovh": {"storage_gb_month": {"STANDARD_IA": 0.004}}}}}})
    loaded = load_config(path)
    t = terms_for(loaded, ["claims"], [])
    assert t.azure.prices.list_per_10000 == 0.07 and t.azure.region == "francecentral"
    assert t.azure.provenance("list_per_10000").startswith("set in the configuration")
    assert t.azure.prices.read_per_10000 == load_azure_prices().regions["francecentral"].read_per_10000
    ovh = t.destinations["claims"]
    assert ovh.prices.storage_gb_month == {"STANDARD": 0.007, "STANDARD_IA": 0.004}
    assert ovh.put_rate == 300 and t.throughput.bytes_per_second == 80e6
    assert t.azure_sources == {"claims"}
