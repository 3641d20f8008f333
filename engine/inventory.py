"""Inventory: what a dataset holds and what will not fit the destination, in one streamed pass.

Memory stays flat whatever the number of objects: counters only, plus at most
`MAX_EXAMPLES` named examples per problem. `inventory` does it for a configuration's datasets
(`exitplan inventory`); `inventory_dataset` for one listing (the flows' listing pass too).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

from config.models import DatasetConfig, LoadedConfig
from connectors.base import ObjectMeta, SinkLimits, count_in

from .endpoints import close_endpoint, destination_limits, open_source, storage_classes
from .errors import call_endpoint
from .listing import dataset_listing, listed_from, selects
from .output_format import IDENTITY
from .placement import (DEFAULT_TIERS, DoesNotFit, FileBesideDirectory, NotAPath, clash_sentence, place, relative_key,
                        restore_path, tier_label)

# Tink key ids are 32-bit: with no keyset yet, inventory counts the widest id's metadata.
WIDEST_KEY_ID = 2**32 - 1

MAX_EXAMPLES = 10
HOT_TIERS = DEFAULT_TIERS


@dataclass
class DatasetInventory:
    """Figures for one dataset. `misfits` are (key, reason) examples, at most MAX_EXAMPLES."""

    dataset: str
    source: str
    destination: str
    objects: int = 0
    bytes: int = 0
    largest_key: str | None = None
    largest_size: int = 0
    without_md5: int = 0
    not_hot: int = 0
    tiers: dict[str, int] = field(default_factory=dict)
    # Objects per source kind (Azure: block, page, append); the kind is kept as exitplan metadata.
    kinds: dict[str, int] = field(default_factory=dict)
    misfit_count: int = 0
    misfits: list[tuple[str, str]] = field(default_factory=list)
    # Carried, but restored as directories (0-byte `x/` or `hdi_isfolder=true`: `is_directory_marker`).
    directory_markers: int = 0
    # Carried and verified, but restore will name them instead of writing them as files
    # (`placement.restore_path`, `FileBesideDirectory`): (key, reason) examples, at most MAX_EXAMPLES.
    unrestorable_count: int = 0
    unrestorable: list[tuple[str, str]] = field(default_factory=list)
    # Where the listing came from when it is not a live one ("inventory report … (completed …, N
    # rows)"), and what the listing named that is not carried (snapshots, earlier versions, report
    # rows that are not objects): reason -> (objects, bytes).
    listed_from: str | None = None
    not_copied: dict[str, tuple[int, int]] = field(default_factory=dict)
    # The objects that fit, by the storage class they land in (None: the bucket's default):
    # class -> (objects, bytes).
    classes: dict[str | None, tuple[int, int]] = field(default_factory=dict)
    # Earlier states of blobs carried as objects of their own (`history: all`): "snapshot" or
    # "version" -> how many.
    earlier_states: dict[str, int] = field(default_factory=dict)

    def add(self, meta: ObjectMeta, misfit: str | None, storage_class: str | None = None) -> None:
        self.objects += 1
        self.bytes += meta.size
        if meta.size > self.largest_size or self.largest_key is None:
            self.largest_key, self.largest_size = meta.key, meta.size
        if meta.content_md5 is None:
            self.without_md5 += 1
        # Page and append blobs have no access tier: not counted as Hot (`kinds` counts them).
        tier = tier_label(meta.tier, meta.kind)
        self.tiers[tier] = self.tiers.get(tier, 0) + 1
        if (meta.tier or "").lower() not in HOT_TIERS:
            self.not_hot += 1
        if meta.kind is not None:
            self.kinds[meta.kind] = self.kinds.get(meta.kind, 0) + 1
        if meta.earlier_state is not None:
            self.earlier_states[meta.earlier_state] = self.earlier_states.get(meta.earlier_state, 0) + 1
        if misfit:
            self.misfit_count += 1
            if len(self.misfits) < MAX_EXAMPLES:
                self.misfits.append((meta.key, misfit))
        else:
            count_in(self.classes, storage_class, meta.size)

    def not_restorable(self, key: str, reason: str) -> None:
        self.unrestorable_count += 1
        if len(self.unrestorable) < MAX_EXAMPLES:
            self.unrestorable.append((key, reason))

    def as_dict(self) -> dict:
        d = asdict(self)
        d["misfits"] = [{"key": k, "reason": r} for k, r in self.misfits]
        d["unrestorable"] = [{"key": k, "reason": r} for k, r in self.unrestorable]
        d["classes"] = [{"storage_class": c, "objects": n, "bytes": b} for c, (n, b) in self.classes.items()]
        return d


def selected(listing: Iterable[ObjectMeta], ds: DatasetConfig) -> Iterable[ObjectMeta]:
    """The objects of a listing that the dataset's include/exclude patterns select."""
    return (m for m in listing if selects(ds, m))


def inventory_dataset(
    name: str,
    ds: DatasetConfig,
    listing: Iterable[ObjectMeta],
    limits: SinkLimits,
    *,
    source_label: str = "",
    reserved: Callable[[ObjectMeta], dict[str, str]] | None = None,
    storage_class: Callable[[str | None], str | None] | None = None,
    progress: Callable[[DatasetInventory], None] | None = None,
    progress_every: int = 10_000,
) -> DatasetInventory:
    """Stream `listing` (the source listed under the dataset's prefix) into a `DatasetInventory`.
    `reserved(meta)`: the metadata exitplan itself will write on the object (`format_metadata`),
    counted in the destination's limit exactly as migrate's placement counts it; `storage_class(tier)`:
    the class an object lands in (`endpoints.storage_classes`)."""
    inv = DatasetInventory(dataset=name, source=source_label, destination=ds.destination)
    clashes = FileBesideDirectory()
    for meta in selected(listing, ds):
        try:
            placed = place(meta, ds.prefix, ds.dest_prefix, limits, reserved=reserved(meta) if reserved else None,
                           storage_class=storage_class(meta.tier) if storage_class else None)
            misfit, landing = None, placed.write_meta.storage_class
        except DoesNotFit as exc:
            misfit, landing = str(exc), None
        inv.add(meta, misfit, landing)
        if misfit is None:  # what restore will meet among the objects migrate carries
            rel_key = relative_key(meta.key, ds.prefix)
            try:
                directory = restore_path(rel_key, meta.size, meta.metadata)[1]
            except NotAPath as exc:
                inv.not_restorable(meta.key, str(exc))
            else:
                inv.directory_markers += directory
                for (key, rel), below in clashes.add(rel_key, (meta.key, rel_key), file=not directory):
                    if below is not None:
                        inv.not_restorable(key, clash_sentence(rel, below))
        if progress and inv.objects % progress_every == 0:
            progress(inv)
    return inv


def format_metadata(loaded: LoadedConfig, name: str) -> Callable[[ObjectMeta], dict[str, str]]:
    """The metadata migrate's output format will write on each object of dataset `name`, known
    without the KEK: the primary key id is read from the keyset's clear info (the widest id when
    `keys init` has not run yet, so what inventory says fits always fits)."""
    if loaded.config.datasets[name].public:
        return IDENTITY.metadata_for
    from .crypto.tink_format import encrypted_metadata
    from .keys import local_keyset_info

    info = local_keyset_info(loaded)
    key_id = info.primary_id if info is not None else WIDEST_KEY_ID
    return lambda meta: encrypted_metadata(key_id, name, meta)


def inventory(loaded: LoadedConfig, datasets: list[str]) -> list[DatasetInventory]:
    """The inventory of each dataset (one streamed listing each)."""
    results = []
    for name in datasets:
        ds = loaded.config.datasets[name]
        source = call_endpoint(f"dataset `{name}`: source", open_source, loaded, name)
        limits = destination_limits(loaded, ds.destination)
        reserved = format_metadata(loaded, name)
        try:
            listing = call_endpoint(f"dataset `{name}`: listing {source.label}", dataset_listing, loaded, name, source)
            results.append(call_endpoint(f"dataset `{name}`: listing {source.label}", lambda: inventory_dataset(
                name, ds, listing, limits, source_label=source.label, reserved=reserved,
                storage_class=storage_classes(loaded, name))))
        finally:
            close_endpoint(source, f"dataset `{name}`: source")
        listed_from(results[-1], listing)
    return results
