"""Unit list prices for the estimate (`engine.estimate`): the destinations' in each provider profile
(`prices:`, `config/providers/*.yaml`), Azure's per region in `config/prices/azure.yaml`.

Every figure is EUR excluding VAT and carries where it comes from: a figure named in its block's
`sources` was read on that provider's public price page on that date; any other figure is "as
filed, unconfirmed" (written from the provider's price list at the time, not checked against a page
one can cite) and the estimate says so wherever it uses it. The configuration's `estimate.prices`
replaces figures one by one (`overrides_model`); a replaced figure is shown as the configuration's.
"""

from __future__ import annotations

from datetime import date
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from .errors import ConfigFileError
from .yaml_files import load_yaml_file

AZURE_PRICES = Path(__file__).resolve().parent / "prices" / "azure.yaml"
UNCONFIRMED = "as filed, unconfirmed"
# Azure's access tiers, as its listings spell them; page and append blobs have none and are read at
# Hot's prices.
AzureTier = Literal["Hot", "Cool", "Cold", "Archive"]
Priority = Literal["standard", "high"]
Price = float  # EUR, excluding VAT


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Provenance(_Strict):
    """Where a figure was read: the provider's public price page and the day it was read."""

    url: str = Field(pattern=r"^https://\S+$")
    read: date

    def sentence(self) -> str:
        return f"{self.url} (read {self.read.isoformat()})"


class _Sourced(_Strict):
    """A block of figures with `sources`: figure name -> the page it was read on."""

    sources: dict[str, Provenance] = {}

    @model_validator(mode="after")
    def _sources_name_figures(self):
        figures = set(type(self).model_fields) - {"sources"}
        for name in self.sources:
            if name not in figures:
                raise ValueError(f"`sources` names {name!r}, which is not one of this block's figures "
                                 f"({', '.join(sorted(figures))})")
        return self

    def provenance(self, figure: str) -> str:
        """Where `figure` comes from, as the estimate shows it."""
        found = self.sources.get(figure)
        return found.sentence() if found else UNCONFIRMED


class DestinationPrices(_Sourced):
    """A destination provider's unit prices (the `prices:` block of its profile)."""

    # EUR per GB-month (10^9 bytes) stored, by storage class; the destination's `storage_class`
    # (default STANDARD) picks one.
    storage_gb_month: dict[str, Price] = Field(min_length=1)
    # Write requests (a PUT, and each multipart create, part and complete), per 1,000.
    put_per_1000: Price = Field(0.0, ge=0)
    get_per_1000: Price = Field(0.0, ge=0)
    # Data out of and into the provider, per GB.
    egress_gb: Price = Field(0.0, ge=0)
    ingress_gb: Price = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _no_negative_storage(self):
        for name, price in self.storage_gb_month.items():
            if price < 0:
                raise ValueError(f"`storage_gb_month.{name}` is negative; write the price per GB-month, 0 or more")
        return self


class EgressTier(_Strict):
    """A band of Azure's internet egress, billed per month: the GB up to `up_to_gb` (counted from
    the month's first byte; None: no upper bound) at `eur_per_gb`."""

    up_to_gb: float | None = Field(gt=0)
    eur_per_gb: Price = Field(ge=0)


class AzureRegionPrices(_Sourced):
    """One Azure region's unit prices for reading a storage account out (standard GPv2, LRS)."""

    location: str
    egress_gb: tuple[EgressTier, ...] = Field(min_length=1)
    # Read operations (a GET, or a ranged GET per part) per 10,000, by the blob's tier.
    read_per_10000: dict[AzureTier, Price]
    # List Blobs calls (at most 5,000 blobs each), per 10,000.
    list_per_10000: Price = Field(ge=0)
    # Data retrieval per GB read, by tier (Cool and Cold charge it; Hot does not).
    retrieval_gb: dict[AzureTier, Price]
    # Storage per GB-month, by tier: the base of an early-deletion charge.
    storage_gb_month: dict[AzureTier, Price]
    # Rehydration out of Archive, by priority: per GB, and per 10,000 blobs (Set Blob Tier).
    rehydrate_gb: dict[Priority, Price]
    rehydrate_per_10000: dict[Priority, Price]
    # Requests per second a storage account serves (Azure's scalability target).
    requests_per_second: float = Field(gt=0)

    @model_validator(mode="after")
    def _tiers_ascend(self):
        bounds = [t.up_to_gb for t in self.egress_gb]
        if bounds[-1] is not None:
            raise ValueError("the last `egress_gb` band must have `up_to_gb: null` (no upper bound)")
        if any(b is None for b in bounds[:-1]) or bounds[:-1] != sorted(bounds[:-1]):
            raise ValueError("`egress_gb` bands must be in ascending `up_to_gb` order, only the last without one")
        return self


class AzurePriceCatalog(_Sourced):
    """`config/prices/azure.yaml`: facts shared by every region, and the regions' prices."""

    currency: Literal["EUR"] = "EUR"
    # How long a rehydration out of Archive may take, in hours, by priority.
    rehydration_hours: dict[Priority, float]
    # Days a blob must stay in a tier before leaving it costs an early-deletion charge.
    early_deletion_days: dict[AzureTier, int]
    regions: dict[str, AzureRegionPrices] = Field(min_length=1)


class PriceError(ValueError):
    """A price set in the configuration that makes its block invalid: `field` names it, `problem` says why."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"field `{field}`: {problem}")
        self.field = field
        self.problem = problem


def _price_error(exc: ValidationError, where: str, hint: str = "") -> PriceError:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    return PriceError(where + (f".{loc}" if loc else ""), hint + err["msg"].removeprefix("Value error, "))


def overrides_model(base: type[BaseModel], name: str) -> type[BaseModel]:
    """A model of `base`'s figures, every one optional: what the configuration may replace
    (`estimate.prices`); `sources` is the catalog's alone (a figure set in the configuration is shown
    as the configuration's)."""
    fields: dict[str, Any] = {
        field: (Optional[Annotated[info.annotation, *info.metadata] if info.metadata else info.annotation], None)
        for field, info in base.model_fields.items() if field != "sources"}
    return create_model(name, __config__=ConfigDict(extra="forbid", frozen=True), **fields)


DestinationPriceOverrides = overrides_model(DestinationPrices, "DestinationPriceOverrides")
AzurePriceOverrides = overrides_model(AzureRegionPrices, "AzurePriceOverrides")


def with_overrides(prices: _Sourced, overrides: BaseModel | None, where: str) -> tuple[_Sourced, frozenset[str]]:
    """`prices` with the figures `overrides` sets (mappings merged key by key), and the names of
    the figures replaced. `PriceError` naming the field under `where` when the result is invalid."""
    if overrides is None:
        return prices, frozenset()
    changes = overrides.model_dump(exclude_none=True)
    if not changes:
        return prices, frozenset()
    merged = prices.model_dump()
    for key, value in changes.items():
        merged[key] = {**merged[key], **value} if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
        merged["sources"].pop(key, None)
    try:
        return type(prices).model_validate(merged), frozenset(changes)
    except ValidationError as exc:
        raise _price_error(exc, where) from None


def destination_prices(catalog: DestinationPrices | None, overrides: BaseModel | None, where: str
                       ) -> tuple[DestinationPrices | None, frozenset[str]]:
    """A destination's prices: its profile's (`catalog`, None when the profile files none) with the
    configuration's `overrides` (at `where`); with no catalog prices the overrides must be complete."""
    if catalog is not None:
        return with_overrides(catalog, overrides, where)
    if overrides is None or not overrides.model_dump(exclude_none=True):
        return None, frozenset()
    changes = overrides.model_dump(exclude_none=True)
    try:
        return DestinationPrices.model_validate(changes), frozenset(changes)
    except ValidationError as exc:
        raise _price_error(exc, where, "the provider profile files no prices, so set them all here: ") from None


@lru_cache(maxsize=1)
def load_azure_prices(path: Path = AZURE_PRICES) -> AzurePriceCatalog:
    """The Azure price catalog (a `ConfigFileError`, exit 2, naming the field when it is wrong)."""
    try:
        return AzurePriceCatalog.model_validate(load_yaml_file(path, "the Azure price catalog"))
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ConfigFileError(f"{path}: field `{where}`: {err['msg']}") from None
