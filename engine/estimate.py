"""How long and how much: the dry run's estimate of a migration, per dataset and in total.

Pure arithmetic over the dry run's per-object plan (`PlanTally`, fed one `PlannedObject` at a time,
counters only) and the terms it is priced at (`EstimateTerms`: a throughput, the providers' request
rates, the price catalog of `config.price_catalog` with the configuration's `estimate` section over
it). `terms_for` gathers the terms from a configuration and its state store; `estimate` does the
sums. Every figure says what it assumes, one sentence each, and every price where it comes from.

Units: bytes; GB is 10^9 bytes, MB/s 10^6 bytes a second (the providers' price units); seconds;
EUR excluding VAT.

- Duration: the longest of the bytes written at the throughput, the destination's write requests at
  its published request rate, the storage account's requests at its request target, and (for
  Archive-tier objects) the rehydration time followed by their own copy; datasets run one after
  another, so the total is the sum.
- One-off costs: Azure's internet egress (its monthly bands applied to the whole migration, shared
  out to the datasets by their bytes), read operations (one per request written: a single PUT reads
  the object in one GET, a multipart upload one ranged GET per part) by the blob's tier, data
  retrieval for Cool and Cold, List Blobs calls (5,000 blobs each), the rehydration of Archive-tier
  objects; at the destination, write requests (each part, plus a multipart upload's create and
  complete) and ingress.
- Per month: the destination's storage of what the dataset will hold there (objects written now,
  objects unchanged since an earlier run, and Archive-tier objects once copied), as written (the
  ciphertext's size when encrypted: `PlannedObject.output_size`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

from config.models import LoadedConfig
from config.policy import destination_profile
from config.price_catalog import (UNCONFIRMED, AzurePriceCatalog, AzureRegionPrices, DestinationPrices,
                                  destination_prices, load_azure_prices, with_overrides)
from config.sizes import format_size
from connectors.base import ObjectMeta

from .dataset_copy import PlannedObject
from .placement import tier_label

GB = 10**9
MB = 10**6
LIST_PAGE = 5_000  # blobs per List Blobs call, at most
# Write requests of a multipart upload besides its parts: CreateMultipartUpload, CompleteMultipartUpload.
MULTIPART_EXTRA_REQUESTS = 2
# MB/s assumed when nothing was measured and the configuration sets no `estimate.throughput_mb_s`.
DEFAULT_THROUGHPUT_MB_S = 50.0
AZURE_TIERS = ("Hot", "Cool", "Cold", "Archive")


# ---------------------------------------------------------------------------------------------
# What the dry run planned
# ---------------------------------------------------------------------------------------------


@dataclass
class Figures:
    objects: int = 0
    bytes: int = 0

    def add(self, size: int) -> None:
        self.objects += 1
        self.bytes += size


@dataclass(frozen=True)
class SizedWrite:
    """How an object of a given size would be written (an Archive-tier one: once rehydrated): output
    bytes and requests."""

    output_size: int
    parts: int
    single_put: bool


def azure_tier(tier: str | None) -> str:
    """The Azure tier a blob is priced at: its own, Hot when it has none (page and append blobs)."""
    for name in AZURE_TIERS:
        if (tier or "").lower() == name.lower():
            return name
    return "Hot"


@dataclass
class PlanTally:
    """One dataset's dry run, counted for the estimate (memory: a few counters per tier and kind).

    `rehydrated(size)` plans an Archive-tier object as it would be written once rehydrated (the dry
    run refuses it: it cannot be read yet)."""

    dataset: str
    rehydrated: Callable[[int], SizedWrite | None] = lambda size: None
    listed: Figures = field(default_factory=Figures)
    by_tier: dict[str, Figures] = field(default_factory=dict)
    by_kind: dict[str, Figures] = field(default_factory=dict)
    to_copy: Figures = field(default_factory=Figures)
    copy_output: int = 0
    copy_parts: int = 0
    copy_multipart: int = 0
    # Read requests and bytes read at the source, by Azure tier.
    reads: dict[str, int] = field(default_factory=dict)
    read_bytes: dict[str, int] = field(default_factory=dict)
    unchanged: Figures = field(default_factory=Figures)
    unchanged_output: int = 0
    refused: int = 0
    archived: Figures = field(default_factory=Figures)
    archived_output: int = 0
    archived_parts: int = 0
    archived_multipart: int = 0
    # Bytes the destination would hold, by the storage class they land in (None: the destination's
    # own class, `DestinationTerms.storage_class`; an Archive blob's once rehydrated too).
    stored_by_class: dict[str | None, int] = field(default_factory=dict)

    def add(self, planned: PlannedObject) -> None:
        self.listed.add(planned.size)
        self.by_tier.setdefault(tier_label(planned.tier, planned.kind), Figures()).add(planned.size)
        self.by_kind.setdefault(planned.kind or "object", Figures()).add(planned.size)
        if planned.action == "write":
            self.to_copy.add(planned.size)
            self.copy_output += planned.output_size
            self.copy_parts += planned.parts
            self.copy_multipart += not planned.single_put
            self._stored(planned.storage_class, planned.output_size)
            tier = azure_tier(planned.tier)
            self.reads[tier] = self.reads.get(tier, 0) + planned.parts
            self.read_bytes[tier] = self.read_bytes.get(tier, 0) + planned.size
        elif planned.action == "skip":
            self.unchanged.add(planned.size)
            self.unchanged_output += planned.output_size
            self._stored(planned.storage_class, planned.output_size)
        elif azure_tier(planned.tier) == "Archive" and (later := self.rehydrated(planned.size)) is not None:
            self.archived.add(planned.size)
            self.archived_output += later.output_size
            self.archived_parts += later.parts
            self.archived_multipart += not later.single_put
            self._stored(None, later.output_size)
        else:
            self.refused += 1

    def _stored(self, storage_class: str | None, size: int) -> None:
        self.stored_by_class[storage_class] = self.stored_by_class.get(storage_class, 0) + size

    @property
    def write_requests(self) -> int:
        """Requests the destination receives for the objects copied now."""
        return self.copy_parts + MULTIPART_EXTRA_REQUESTS * self.copy_multipart

    @property
    def archived_write_requests(self) -> int:
        return self.archived_parts + MULTIPART_EXTRA_REQUESTS * self.archived_multipart

    @property
    def list_calls(self) -> int:
        return math.ceil(self.listed.objects / LIST_PAGE) if self.listed.objects else 0


def listing_tally(dataset: str, listed: Iterable[ObjectMeta], planned: Callable[[int], SizedWrite | None]
                  ) -> PlanTally:
    """A listing (the state's newest, for the report) counted as if every object were copied from
    scratch: `planned(size)` says how it would be written (None: it would not fit); Archive-tier
    objects count as to rehydrate first."""
    tally = PlanTally(dataset, planned)
    for meta in listed:
        plan = None if azure_tier(meta.tier) == "Archive" else planned(meta.size)
        tally.add(PlannedObject(meta.key, meta.key, meta.size, plan.output_size, plan.parts, plan.single_put, "write",
                                tier=meta.tier, kind=meta.kind) if plan is not None else
                  PlannedObject(meta.key, None, meta.size, 0, 0, False, "refuse", tier=meta.tier, kind=meta.kind))
    return tally


# ---------------------------------------------------------------------------------------------
# What it is priced at
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Throughput:
    bytes_per_second: float
    basis: str  # a sentence: where the figure comes from


@dataclass(frozen=True)
class AzureTerms:
    region: str
    prices: AzureRegionPrices
    catalog: AzurePriceCatalog
    priority: str  # rehydration priority: standard or high
    replaced: frozenset[str] = frozenset()  # figures the configuration sets

    def provenance(self, figure: str) -> str:
        return "set in the configuration (estimate.prices.azure)" if figure in self.replaced else \
            self.prices.provenance(figure)


@dataclass(frozen=True)
class DestinationTerms:
    destination: str
    provider: str
    storage_class: str
    prices: DestinationPrices | None  # None: the provider profile files none
    put_rate: float | None  # requests/s, None: not published
    put_rate_basis: str
    replaced: frozenset[str] = frozenset()

    def provenance(self, figure: str) -> str:
        if figure in self.replaced:
            return f"set in the configuration (estimate.prices.destinations.{self.destination})"
        return self.prices.provenance(figure) if self.prices else UNCONFIRMED


@dataclass(frozen=True)
class EstimateTerms:
    throughput: Throughput
    azure: AzureTerms
    destinations: dict[str, DestinationTerms]  # by dataset
    azure_sources: frozenset[str]  # the datasets read from Azure Blob Storage


# ---------------------------------------------------------------------------------------------
# The estimate
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limit:
    """One bound on a dataset's duration, with the sentence that says what it assumes."""

    what: str
    seconds: float
    sentence: str


@dataclass(frozen=True)
class Cost:
    what: str
    eur: float | None  # None: no price for it
    sentence: str


@dataclass(frozen=True)
class Rehydration:
    objects: int
    bytes: int
    eur: float
    early_deletion_max_eur: float
    hours: float
    priority: str


@dataclass(frozen=True)
class DatasetEstimate:
    dataset: str
    tally: PlanTally
    limits: tuple[Limit, ...]
    once: tuple[Cost, ...]  # one-off costs
    monthly: tuple[Cost, ...]
    rehydration: Rehydration | None

    @property
    def seconds(self) -> float:
        return max((lim.seconds for lim in self.limits), default=0.0)

    @property
    def bound_by(self) -> str:
        return max(self.limits, key=lambda lim: lim.seconds).what if self.limits else "nothing to copy"

    def once_eur(self, what: str | None = None) -> float:
        return sum(c.eur or 0.0 for c in self.once if what is None or c.what == what)

    def monthly_eur(self) -> float:
        return sum(c.eur or 0.0 for c in self.monthly)


@dataclass(frozen=True)
class Estimate:
    datasets: tuple[DatasetEstimate, ...]
    assumptions: tuple[str, ...]  # one sentence each, what every figure rests on
    prices: tuple[str, ...]  # one line per price block: its figures and where they come from

    @property
    def seconds(self) -> float:
        return sum(d.seconds for d in self.datasets)

    def once_eur(self, what: str | None = None) -> float:
        return sum(d.once_eur(what) for d in self.datasets)

    def monthly_eur(self) -> float:
        return sum(d.monthly_eur() for d in self.datasets)

    def as_dict(self) -> dict:
        """The estimate as plain data (the flows' artifact, a JSON output)."""
        return {
            "datasets": [{
                "dataset": d.dataset, "objects_to_copy": d.tally.to_copy.objects, "bytes_to_copy": d.tally.to_copy.bytes,
                "bytes_written": d.tally.copy_output, "write_requests": d.tally.write_requests,
                "by_tier": {t: vars(f) for t, f in sorted(d.tally.by_tier.items())},
                "by_kind": {k: vars(f) for k, f in sorted(d.tally.by_kind.items())},
                "seconds": d.seconds, "bound_by": d.bound_by,
                "limits": [{"what": lim.what, "seconds": lim.seconds, "assumes": lim.sentence} for lim in d.limits],
                "once_eur": {c.what: c.eur for c in d.once}, "monthly_eur": {c.what: c.eur for c in d.monthly},
                "rehydration": vars(d.rehydration) if d.rehydration else None,
            } for d in self.datasets],
            "seconds": self.seconds, "once_eur": self.once_eur(), "monthly_eur": self.monthly_eur(),
            "assumptions": list(self.assumptions), "prices": list(self.prices),
        }


def tiered_egress_eur(gb: float, prices: AzureRegionPrices) -> float:
    """Azure's internet egress for `gb` GB in one month: each band's GB at its price."""
    cost = floor = 0.0
    for band in prices.egress_gb:
        top = band.up_to_gb if band.up_to_gb is not None else math.inf
        if gb > floor:
            cost += (min(gb, top) - floor) * band.eur_per_gb
        floor = top
    return cost


def _per(n: float, rate: float | None) -> float:
    return n / rate if rate else 0.0


def _dataset_estimate(t: PlanTally, terms: EstimateTerms, egress_eur: float) -> DatasetEstimate:
    dest = terms.destinations[t.dataset]
    azure = terms.azure if t.dataset in terms.azure_sources else None
    rate = terms.throughput.bytes_per_second
    limits = [Limit("bytes", t.copy_output / rate,
                    f"{t.copy_output / GB:,.2f} GB written at {rate / MB:,.1f} MB/s ({terms.throughput.basis})")]
    if dest.put_rate:
        limits.append(Limit("destination requests", t.write_requests / dest.put_rate,
                            f"{t.write_requests:,} write requests at {dest.put_rate:,.0f}/s ({dest.put_rate_basis})"))
    if azure:
        reads = sum(t.reads.values()) + t.list_calls
        limits.append(Limit("Azure requests", reads / azure.prices.requests_per_second,
                            f"{reads:,} read and list requests at {azure.prices.requests_per_second:,.0f}/s "
                            f"(the storage account's request target, {azure.provenance('requests_per_second')})"))
    once: list[Cost] = []
    rehydration = None
    if azure:
        p = azure.prices
        once.append(Cost("Azure egress", egress_eur,
                         f"{(t.to_copy.bytes + t.archived.bytes) / GB:,.2f} GB out of Azure's {azure.region} to the internet, "
                         "its share of the migration's egress at Azure's monthly bands"))
        read_eur = sum(n * p.read_per_10000[tier] / 10_000 for tier, n in t.reads.items())
        read_eur += t.archived_parts * p.read_per_10000["Hot"] / 10_000
        once.append(Cost("Azure reads", read_eur, f"{sum(t.reads.values()) + t.archived_parts:,} read operations, "
                                                  "one per request written, at the blob's tier (Archive: once rehydrated to Hot)"))
        retrieval = sum(b / GB * p.retrieval_gb[tier] for tier, b in t.read_bytes.items())
        if retrieval:
            once.append(Cost("Azure retrieval", retrieval, "data retrieval of the Cool and Cold blobs read, per GB"))
        once.append(Cost("Azure listing", t.list_calls * p.list_per_10000 / 10_000,
                         f"{t.list_calls:,} List Blobs calls of up to {LIST_PAGE:,} blobs"))
        if t.archived.objects:
            prio = azure.priority
            rehydrate = t.archived.bytes / GB * p.rehydrate_gb[prio] + t.archived.objects * p.rehydrate_per_10000[prio] / 10_000
            early = t.archived.bytes / GB * p.storage_gb_month["Archive"] * azure.catalog.early_deletion_days["Archive"] / 30
            rehydration = Rehydration(t.archived.objects, t.archived.bytes, rehydrate, early,
                                      azure.catalog.rehydration_hours[prio], prio)
            once.append(Cost("Azure rehydration", rehydrate,
                             f"{t.archived.objects:,} Archive-tier objects ({t.archived.bytes / GB:,.2f} GB) rehydrated at "
                             f"{prio} priority"))
            limits.append(Limit("rehydration", rehydration.hours * 3600 + t.archived_output / rate,
                                f"up to {rehydration.hours:g} h of {prio}-priority rehydration "
                                f"({azure.catalog.provenance('rehydration_hours')}), then "
                                f"{t.archived_output / GB:,.2f} GB written"))
    monthly: list[Cost] = []
    stored = t.copy_output + t.unchanged_output + t.archived_output
    requests = t.write_requests + t.archived_write_requests
    if dest.prices is None:
        once.append(Cost("destination requests", None, f"provider `{dest.provider}` files no prices"))
        monthly.append(Cost("destination storage", None, f"provider `{dest.provider}` files no prices"))
    else:
        dp = dest.prices
        once.append(Cost("destination requests", requests * dp.put_per_1000 / 1000,
                         f"{requests:,} write requests at €{dp.put_per_1000:g} per 1,000"))
        if dp.ingress_gb:
            once.append(Cost("destination ingress", stored / GB * dp.ingress_gb, f"{stored / GB:,.2f} GB in"))
        monthly.append(_storage_cost(dest, dp, stored, t.stored_by_class))
    return DatasetEstimate(t.dataset, t, tuple(limits), tuple(once), tuple(monthly), rehydration)


def _storage_cost(dest: DestinationTerms, prices: DestinationPrices, stored: int, by_class: dict[str | None, int]
                  ) -> Cost:
    """A month of the destination's storage: each storage class's bytes at its price (a class
    without a filed price: no figure, and the setting that gives one)."""
    classes: dict[str, int] = {}
    for cls, size in (by_class.items() if by_class else [(None, stored)]):
        classes[cls or dest.storage_class] = classes.get(cls or dest.storage_class, 0) + size
    unpriced = [c for c in sorted(classes) if c not in prices.storage_gb_month]
    if unpriced:
        return Cost("destination storage", None, f"no {', '.join(unpriced)} price for `{dest.provider}`: set " + ", ".join(
            f"estimate.prices.destinations.{dest.destination}.storage_gb_month.{c}" for c in unpriced))
    parts = [f"{classes[c] / GB:,.2f} GB {c} at €{prices.storage_gb_month[c]:g}" for c in sorted(classes)]
    if len(parts) == 1:
        only = next(iter(classes))
        how = f"{stored / GB:,.2f} GB stored as written, {only} at €{prices.storage_gb_month[only]:g} per GB-month"
    else:
        how = f"{stored / GB:,.2f} GB stored as written: {', '.join(parts)} per GB-month"
    return Cost("destination storage", sum(size / GB * prices.storage_gb_month[c] for c, size in classes.items()),
                how)


def _price_lines(terms: EstimateTerms, datasets: Iterable[str]) -> tuple[str, ...]:
    """One line per price block used: its figures, grouped by where they come from."""

    def grouped(label: str, figures: Iterable[str], provenance: Callable[[str], str]) -> str:
        by: dict[str, list[str]] = {}
        for f in figures:
            by.setdefault(provenance(f), []).append(f)
        return f"{label}: " + "; ".join(f"{', '.join(fs)}: {where}" for where, fs in by.items())

    lines = []
    if terms.azure_sources:
        a = terms.azure
        lines.append(grouped(f"Azure {a.region}", [f for f in type(a.prices).model_fields if f not in ("sources", "location")],
                             a.provenance))
        lines.append(grouped("Azure (every region)", ["rehydration_hours", "early_deletion_days"], a.catalog.provenance))
    seen = set()
    for name in datasets:
        d = terms.destinations[name]
        if d.destination in seen:
            continue
        seen.add(d.destination)
        if d.prices is None:
            lines.append(f"destination {d.destination} ({d.provider}): no prices filed")
        else:
            lines.append(grouped(f"destination {d.destination} ({d.provider})",
                                 [f for f in type(d.prices).model_fields if f != "sources"], d.provenance))
    return tuple(lines)


def estimate(tallies: Iterable[PlanTally], terms: EstimateTerms) -> Estimate:
    """The estimate of the datasets `tallies` counted, priced at `terms`."""
    tallies = list(tallies)
    egress_bytes = {t.dataset: t.to_copy.bytes + t.archived.bytes for t in tallies if t.dataset in terms.azure_sources}
    total_egress = sum(egress_bytes.values())
    egress_eur = tiered_egress_eur(total_egress / GB, terms.azure.prices) if terms.azure_sources else 0.0
    datasets = tuple(_dataset_estimate(t, terms, egress_eur * egress_bytes.get(t.dataset, 0) / total_egress
                                       if total_egress else 0.0) for t in tallies)
    assumptions = [
        f"throughput: {terms.throughput.bytes_per_second / MB:,.1f} MB/s ({terms.throughput.basis})",
        "duration: per dataset the longest of its limits; datasets are copied one after another, so the total is their sum",
        "prices: EUR excluding VAT, list prices; GB is 10^9 bytes",
    ]
    if terms.azure_sources:
        assumptions += [
            f"Azure egress: Azure's monthly bands applied to the whole migration as if in one month "
            f"({total_egress / GB:,.2f} GB); the credit Azure grants on request to a customer leaving Azure is not deducted",
            "Azure reads: one read operation per request written (a single PUT: one GET; multipart: one ranged GET per part)",
            "Cool and Cold blobs are read in place: copying them does not move them, so no early deletion is charged",
        ]
        if any(d.rehydration for d in datasets):
            days = terms.azure.catalog.early_deletion_days["Archive"]
            assumptions.append(
                f"rehydration: Archive-tier objects rehydrated to Hot in place; an object archived less than {days} days "
                f"ago also costs early deletion (at most the figure shown, for objects archived today)")
    for d in datasets:
        dt = terms.destinations[d.dataset]
        if not dt.put_rate:
            assumptions.append(f"{d.dataset}: {dt.provider} publishes no request rate; the requests are not a limit here")
    return Estimate(datasets, tuple(assumptions), _price_lines(terms, [t.dataset for t in tallies]))


# ---------------------------------------------------------------------------------------------
# The terms of a configuration
# ---------------------------------------------------------------------------------------------


def measured_throughput(runs) -> Throughput | None:
    """The throughput of the newest finished migrate run that sent bytes (`StateStore.recent_runs`)."""
    for r in reversed(runs):
        if r.command == "migrate" and not r.dry_run and r.finished_at and r.bytes_sent > 0:
            seconds = (r.finished_at - r.started_at).total_seconds()
            if seconds > 0:
                return Throughput(r.bytes_sent / seconds,
                                  f"measured by run #{r.id}: {r.bytes_sent / GB:,.2f} GB sent in {seconds:,.0f} s")
    return None


def throughput_for(loaded: LoadedConfig, runs) -> Throughput:
    """The last run's measured throughput, else the configuration's, else `DEFAULT_THROUGHPUT_MB_S`."""
    measured = measured_throughput(runs)
    if measured is not None:
        return measured
    configured = loaded.config.estimate.throughput_mb_s
    if configured is not None:
        return Throughput(configured * MB, "estimate.throughput_mb_s; no migrate run measured yet")
    return Throughput(DEFAULT_THROUGHPUT_MB_S * MB, "assumed: no migrate run measured yet and no "
                                                    "estimate.throughput_mb_s set")


def terms_for(loaded: LoadedConfig, datasets: list[str], runs) -> EstimateTerms:
    """The terms the configuration's datasets are priced at (`runs`: the state store's recent runs,
    empty without a state)."""
    cfg = loaded.config
    catalog = load_azure_prices()
    region = cfg.estimate.azure_region
    azure_prices, azure_replaced = with_overrides(catalog.regions[region], cfg.estimate.prices.azure,
                                                  "estimate.prices.azure")
    destinations = {}
    for name in datasets:
        dest_name = cfg.datasets[name].destination
        dest = cfg.destinations[dest_name]
        profile = destination_profile(loaded, dest_name)
        prices, replaced = destination_prices(profile.prices, cfg.estimate.prices.destinations.get(dest_name),
                                              f"estimate.prices.destinations.{dest_name}")
        rates = profile.request_rates
        rate, which = (rates.put, "PUT") if rates.put else (rates.total, "total")
        destinations[name] = DestinationTerms(
            dest_name, profile.name, getattr(dest, "storage_class", None) or "STANDARD", prices, rate,
            f"{profile.name}'s published {which} rate per bucket" if rate else "", replaced)
    azure_sources = frozenset(n for n in datasets if cfg.sources[cfg.datasets[n].source].kind == "azure_blob")
    return EstimateTerms(throughput_for(loaded, runs), AzureTerms(region, azure_prices, catalog,
                                                                  cfg.estimate.rehydrate_priority, azure_replaced),
                         destinations, azure_sources)


# ---------------------------------------------------------------------------------------------
# As text (the terminal, the flows' artifact, the report)
# ---------------------------------------------------------------------------------------------

HEADERS = ["dataset", "to copy", "size", "written", "duration", "bound by", "Azure", "destination", "per month",
           "rehydrate first"]


def format_duration(seconds: float) -> str:
    """12 s, 4 min 10 s, 1 h 05 min, 2 d 03 h."""
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 86400} d {s % 86400 // 3600:02d} h"


def format_eur(eur: float | None) -> str:
    if eur is None:
        return "no price"
    if 0 < eur < 0.01:
        return "< €0.01"
    return f"€{eur:,.2f}"


def _azure_once(d: DatasetEstimate) -> float:
    return sum(c.eur or 0.0 for c in d.once if c.what.startswith("Azure") and c.what != "Azure rehydration")


def _destination_once(d: DatasetEstimate) -> float:
    return sum(c.eur or 0.0 for c in d.once if c.what.startswith("destination"))


def _rehydrate_cell(r: Rehydration | None) -> str:
    return "—" if r is None else f"{r.objects:,} ({format_size(r.bytes)}), {format_eur(r.eur)}, ≤ {r.hours:g} h"


def table_rows(est: Estimate) -> list[list[str]]:
    """One row per dataset and a total row, under `HEADERS`."""
    rows = [[d.dataset, f"{d.tally.to_copy.objects:,}", format_size(d.tally.to_copy.bytes), format_size(d.tally.copy_output),
             format_duration(d.seconds), d.bound_by, format_eur(_azure_once(d)), format_eur(_destination_once(d)),
             format_eur(d.monthly_eur()) if all(c.eur is not None for c in d.monthly) else "no price",
             _rehydrate_cell(d.rehydration)] for d in est.datasets]
    if len(est.datasets) > 1:
        archived = [d.rehydration for d in est.datasets if d.rehydration]
        rows.append(["total", f"{sum(d.tally.to_copy.objects for d in est.datasets):,}",
                     format_size(sum(d.tally.to_copy.bytes for d in est.datasets)),
                     format_size(sum(d.tally.copy_output for d in est.datasets)), format_duration(est.seconds), "",
                     format_eur(sum(_azure_once(d) for d in est.datasets)),
                     format_eur(sum(_destination_once(d) for d in est.datasets)), format_eur(est.monthly_eur()),
                     "—" if not archived else f"{sum(r.objects for r in archived):,} "
                                                f"({format_size(sum(r.bytes for r in archived))}), "
                                                f"{format_eur(sum(r.eur for r in archived))}"])
    return rows


def _mix(figures: dict[str, Figures]) -> str:
    return ", ".join(f"{name} {f.objects:,} ({format_size(f.bytes)})" for name, f in sorted(figures.items()))


def _summed(mixes: Iterable[dict[str, Figures]]) -> dict[str, Figures]:
    total: dict[str, Figures] = {}
    for mix in mixes:
        for name, f in mix.items():
            t = total.setdefault(name, Figures())
            t.objects += f.objects
            t.bytes += f.bytes
    return total


def detail_lines(est: Estimate) -> list[str]:
    """Per dataset: the tier and kind mix, each limit and cost with what it assumes; then the
    assumptions and the prices' sources, one line each."""
    lines = []
    for d in est.datasets:
        lines.append(f"{d.dataset}: listed {d.tally.listed.objects:,} objects; by tier: {_mix(d.tally.by_tier)}; "
                     f"by kind: {_mix(d.tally.by_kind)}")
        for lim in d.limits:
            lines.append(f"  {lim.what}: {format_duration(lim.seconds)} = {lim.sentence}")
        for c in (*d.once, *d.monthly):
            per = " per month" if c in d.monthly else ""
            lines.append(f"  {c.what}: {format_eur(c.eur)}{per} = {c.sentence}")
        if d.rehydration:
            r = d.rehydration
            lines.append(f"  rehydrate first: {r.objects:,} Archive-tier objects, {format_size(r.bytes)}: "
                         f"{format_eur(r.eur)}, up to {r.hours:g} h at {r.priority} priority; early deletion at most "
                         f"{format_eur(r.early_deletion_max_eur)}")
    if len(est.datasets) > 1:
        lines.append(f"total: listed {sum(d.tally.listed.objects for d in est.datasets):,} objects; by tier: "
                     f"{_mix(_summed(d.tally.by_tier for d in est.datasets))}; by kind: "
                     f"{_mix(_summed(d.tally.by_kind for d in est.datasets))}")
    lines += [f"assumes {a}" for a in est.assumptions]
    lines += [f"prices of {p}" for p in est.prices]
    return lines
