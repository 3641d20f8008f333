"""Where a dataset's listing comes from: the source listed live, or the Azure Blob Inventory report
the dataset names (`datasets.<name>.inventory`). Either way an iterator of `ObjectMeta` under the
dataset's prefix, so that placement, the copy, the dry run and the inventory are the same.

A report is a past listing: each object is still read pinned to the report's ETag, so an object
changed since is re-read at its current version and one deleted since fails with its name
(engine/pipeline.py); objects created since are not in it. docs/DESIGN.md, "Inventory reports".
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

from config.errors import UserError
from config.models import LoadedConfig
from connectors.base import ObjectMeta, ObjectSource

from .endpoints import open_azure_container

if TYPE_CHECKING:
    from connectors.azure_inventory import InventoryReport


def dataset_listing(loaded: LoadedConfig, name: str, source: ObjectSource) -> Iterator[ObjectMeta]:
    """The objects of dataset `name` under its prefix: `source.list(prefix)`, or its inventory
    report's rows (`ReportListing`; the manifest is read and checked here, before any row)."""
    ds = loaded.config.datasets[name]
    if ds.inventory is None:
        return source.list(ds.prefix)
    return ReportListing(open_report(loaded, name), ds.container, ds.prefix)


def open_report(loaded: LoadedConfig, name: str) -> "InventoryReport":
    """Dataset `name`'s inventory report, its manifest checked (a `ConfigError` says why not)."""
    from connectors.azure_inventory import InventoryReport  # the Azure SDK, only when a report is used

    ds = loaded.config.datasets[name]
    inv = ds.inventory
    reader = open_azure_container(loaded, inv.source or ds.source, inv.container)
    return InventoryReport.open(reader, inv.container, inv.manifest_path, dataset_container=ds.container,
                                dataset_prefix=ds.prefix, field_name=f"datasets.{name}.inventory.report")


class ReportListing:
    """A dataset's objects read from its inventory report (iterate it once); `origin` and
    `not_copied` for the inventory and the dry run to show."""

    def __init__(self, report: "InventoryReport", container: str, prefix: str):
        self.report = report
        self._objects = report.objects(container, prefix)

    def __iter__(self) -> Iterator[ObjectMeta]:
        return self._objects

    @property
    def origin(self) -> str:
        return self.report.origin

    @property
    def not_copied(self) -> dict[str, int]:
        return dict(self.report.not_copied)


def listed_from(inventory, listing) -> None:
    """Note on a `DatasetInventory` (or anything with `listed_from` and `not_copied`) that
    `listing` was read from an inventory report, and the report's rows that were not objects."""
    if isinstance(listing, ReportListing):
        inventory.listed_from = listing.origin
        inventory.not_copied = listing.not_copied


def refuse_delete_removed(loaded: LoadedConfig, datasets: list[str]) -> None:
    """`--delete-removed` deletes the copies of objects a listing no longer has; a report is a past
    listing (objects created since are not in it), so it is refused for datasets read from one."""
    from_reports = [n for n in datasets if loaded.config.datasets[n].inventory is not None]
    if from_reports:
        raise UserError(f"--delete-removed cannot be used with dataset(s) {', '.join(from_reports)}: they are read from "
                        "an inventory report, which does not have the objects created after it was made; run without "
                        "--delete-removed, or remove `inventory` to list the source live")
