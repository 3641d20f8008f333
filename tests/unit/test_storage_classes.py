"""Which storage class an object lands in, by its source tier: the provider catalog's
`tier_classes`, the destination's `storage_class`, the dataset's `tier_classes`; and the classes a
configuration names are checked against the provider's before anything is read."""

from __future__ import annotations

import pytest

from config.errors import ConfigFileError
from config.loader import load_config
from config.providers import ProviderProfile, load_catalog
from connectors.base import ObjectMeta, SinkLimits
from engine.endpoints import storage_classes
from engine.placement import place
from tests.unit.test_config import variant, write


def test_the_catalog_maps_cool_and_cold_at_ovhcloud_and_nothing_at_scaleway():
    ovh = load_catalog()["ovhcloud"]
    assert ovh.tier_classes == {"Cool": "STANDARD_IA", "Cold": "STANDARD_IA"}
    assert load_catalog()["scaleway"].tier_classes == {}


def test_a_profile_mapping_a_tier_to_a_class_it_lacks_is_refused():
    data = load_catalog()["lab"].model_dump()
    data["tier_classes"] = {"Archive": "DEEP_ARCHIVE"}
    with pytest.raises(ValueError, match="tier_classes.Archive: 'DEEP_ARCHIVE' is not one of storage_classes"):
        ProviderProfile.model_validate(data)


@pytest.mark.parametrize("changes, expected", [
    ({}, {"Hot": None, "cool": "STANDARD_IA", "COLD": "STANDARD_IA", None: None}),
    ({"destinations__ovh__storage_class": "EXPRESS_ONEZONE"},
     {"Hot": "EXPRESS_ONEZONE", "Cool": "EXPRESS_ONEZONE", None: "EXPRESS_ONEZONE"}),
    ({"destinations__ovh__storage_class": "EXPRESS_ONEZONE", "datasets__claims__tier_classes": {"cool": "STANDARD"}},
     {"Hot": "EXPRESS_ONEZONE", "Cool": "STANDARD", "Cold": "EXPRESS_ONEZONE"}),
    ({"datasets__claims__tier_classes": {"Hot": "STANDARD"}}, {"Hot": "STANDARD", "Cool": "STANDARD_IA"}),
])
def test_the_dataset_then_the_destination_then_the_catalog_choose_the_class(tmp_path, changes, expected):
    loaded = load_config(write(tmp_path, variant(**changes)))  # the gate checked the classes
    class_of = storage_classes(loaded, "claims")
    assert {tier: class_of(tier) for tier in expected} == expected


def test_placement_writes_the_class_it_is_given():
    meta = ObjectMeta("a/b.csv", 3, "e", tier="Cool")
    assert place(meta, "", "x/", SinkLimits(), storage_class="STANDARD_IA").write_meta.storage_class == "STANDARD_IA"
    assert place(meta, "", "x/", SinkLimits()).write_meta.storage_class is None


def test_a_dataset_naming_a_class_its_provider_lacks_is_refused_with_the_field(tmp_path):
    with pytest.raises(ConfigFileError, match=r"field `datasets.claims.tier_classes`: OVHcloud has no storage class "
                                              r"'GLACIER' \(known: STANDARD, STANDARD_IA, EXPRESS_ONEZONE\)"):
        load_config(write(tmp_path, variant(datasets__claims__tier_classes={"Cool": "GLACIER"})))
