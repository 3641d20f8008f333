"""The dry run of a migration (`exitplan migrate --dry-run`): what would be written, per object and
per dataset, with nothing written anywhere."""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from typing import Callable

from config.models import LoadedConfig
from connectors.base import ConnectorError

from .endpoints import destination_limits, open_source
from .errors import RunError, call_endpoint
from .key_copies import check_keysets
from .dataset_copy import DryRunSummary, PlannedObject, dry_run, place_all
from .inventory import selected
from .listing import ReportListing, dataset_listing
from .output_format import IDENTITY
from .project import open_state
from .run import output_formats, placer, transfer_settings


def plan(loaded: LoadedConfig, datasets: list[str], on_object: Callable[[str, PlannedObject], None]
         ) -> list[DryRunSummary]:
    """What `migrate` would write, per dataset, touching nothing: the state store is only read (if
    it exists), and of the destination only its keyset copies, refused (exit 4) as `migrate` would
    refuse them. The keyset is unwrapped (a read), so a dry run also proves the KEK works."""
    formats = output_formats(loaded, datasets)
    check_keysets(loaded, [n for n in datasets if formats[n] is not IDENTITY])
    settings = transfer_settings(loaded)
    state = open_state(loaded, read_only=True)
    results = []
    try:
        for name in datasets:
            ds = loaded.config.datasets[name]
            source = call_endpoint(f"dataset `{name}`: source", open_source, loaded, name)
            limits = destination_limits(loaded, ds.destination)
            try:
                listing = dataset_listing(loaded, name, source)
                summary = dry_run(name, place_all(selected(listing, ds), placer(loaded, name, limits, formats[name])),
                                  limits, settings, output_format=formats[name], state=state,
                                  on_object=partial(on_object, name))
                if isinstance(listing, ReportListing):
                    summary = replace(summary, listed_from=listing.origin, not_copied=tuple(listing.not_copied.items()))
                results.append(summary)
            except ConnectorError as exc:
                raise RunError(f"dataset `{name}`: listing {source.label}: {exc}", exc) from None
    finally:
        if state is not None:
            state.close()
    return results
